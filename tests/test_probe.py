"""prune/probe.py: the deployable shape is chosen by measured KL-divergence of each candidate's
pruned model, and what the probe measures is the model the rewrite writes."""

from __future__ import annotations

import pathlib

import pytest
import torch

from conftest import REFERENCE, calibrated_tiny_qwen3moe
from moe2gguf.arch import arch_for_config
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.exporter.sizing import lean_down_types, predict_layout_bytes
from moe2gguf.modeling import load_model
from moe2gguf.protocol import scored
from moe2gguf.prune.calibrate import calibration_windows
from moe2gguf.prune.deploy import Shape, ShapeScores
from moe2gguf.prune.probe import PROBE_TOKENS, candidates, shape_klds
from moe2gguf.prune.prune import Calib, prune


@pytest.fixture(scope="module")
def model64(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny Qwen3-MoE with experts 64 wide (widths 32 and 64 in the layout) + its calibration."""
    return calibrated_tiny_qwen3moe(tmp_path_factory.mktemp("probe"), seed=1, tokens=2048, ctx=64, moe_intermediate_size=64)


def _klds(pruned: pathlib.Path, base: pathlib.Path, windows) -> torch.Tensor:  # noqa: ANN001
    """KLD at each of check's positions (the second half of each window), window after window."""
    ids = torch.from_numpy(windows)
    pos = scored(windows.shape[1])
    with torch.no_grad():
        lp = torch.log_softmax(load_model(str(pruned))[0](input_ids=ids).logits[:, pos], -1)
        lq = torch.log_softmax(load_model(str(base))[0](input_ids=ids).logits[:, pos], -1)
    return (lq.exp() * (lq - lp)).sum(-1).reshape(-1)


def _kld(pruned: pathlib.Path, base: pathlib.Path, windows) -> float:  # noqa: ANN001
    return float(_klds(pruned, base, windows).mean())


def test_probe_kld_is_the_kld_of_the_written_checkpoint(model64, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moe2gguf.prune.probe as P

    # slices of vocabulary and tokens as a 151,936-entry head is walked (running log-sum-exps)
    monkeypatch.setattr(P, "VOCAB_SLICE", 37)
    monkeypatch.setattr(P, "TOKEN_SLICE", 100)
    model, calib_dir = model64
    ckpt = Checkpoint(model)
    arch = arch_for_config(ckpt.config)
    cal = Calib(calib_dir, arch, ckpt)
    attr = cal.attribution()
    windows = calibration_windows(model, cal.info, PROBE_TOKENS)
    shapes = [Shape(6, 64), Shape(8, 32), Shape(3, 64)]
    got = shape_klds(ckpt, arch, shapes, attr, [1, 1], windows, cal.grams)
    for s in shapes:
        out = tmp_path / f"{s.experts}x{s.width}"
        prune(str(model), str(calib_dir), 1 - s.experts * s.width / (8 * 64) - 1e-9, str(out), layout="llama.cpp",
              width=s.width, experts=s.experts, probe=0, reconstruct=False)
        assert got[s] == pytest.approx(_kld(out, model, windows), rel=1e-3, abs=1e-7)
    assert got[Shape(3, 64)] > got[Shape(6, 64)] > 0  # removing more experts costs more


def test_through_a_head_over_its_budget_the_probe_kld_is_the_written_checkpoints_on_every_kth_position(
    model64, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moe2gguf.prune.probe as P

    model, calib_dir = model64
    ckpt = Checkpoint(model)
    arch = arch_for_config(ckpt.config)
    cal = Calib(calib_dir, arch, ckpt)
    windows = calibration_windows(model, cal.info, PROBE_TOKENS)
    positions = windows.shape[0] * (windows.shape[1] // 2)
    vocab, hidden = ckpt.config["vocab_size"], ckpt.config["hidden_size"]
    # a budget of a third of the positions, as a 151,936-entry head is held to HEAD_MACS; slices
    # of tokens that do not divide the picks, nor the picks the batches of windows
    monkeypatch.setattr(P, "HEAD_MACS", -(-positions * vocab * hidden // 3))
    monkeypatch.setattr(P, "TOKEN_SLICE", 7)
    assert P.kld_stride(positions, vocab, hidden, P.HEAD_MACS) == 3
    shape = Shape(6, 64)
    got = shape_klds(ckpt, arch, [shape], cal.attribution(), [1, 1], windows, cal.grams)[shape]
    out = tmp_path / "6x64"
    prune(str(model), str(calib_dir), 1 - 6 / 8 - 1e-9, str(out), layout="llama.cpp", width=64, experts=6, probe=0, reconstruct=False)
    klds = _klds(out, model, windows)
    assert got == pytest.approx(float(klds[::3].mean()), rel=1e-3, abs=1e-7)
    assert got != pytest.approx(float(klds.mean()), rel=1e-3)  # a subset: not the mean of them all


def test_the_probes_head_budget_holds_the_kld_within_it_and_strides_only_past_it() -> None:
    from moe2gguf.prune.probe import HEAD_MACS, kld_stride

    # Qwen3-30B-A3B's head: the 4,096 scored positions of the probe's 8,192 tokens, every 4th
    assert kld_stride(4096, 151936, 2048, HEAD_MACS) == 4
    assert kld_stride(8192, 4096, 256, HEAD_MACS) == 1  # the bundled model: all of them
    for positions, vocab, hidden in [(4096, 151936, 2048), (16384, 256000, 7168), (5, 1, 1), (2049, 151936, 2048)]:
        stride = kld_stride(positions, vocab, hidden, HEAD_MACS)
        taken = -(-positions // stride)
        assert (taken - 1) * vocab * hidden <= HEAD_MACS  # within one position of the budget
        assert stride == 1 or -(-positions // (stride - 1)) * vocab * hidden > HEAD_MACS  # no more stride than it needs


@pytest.mark.parametrize("per_batch, stride", [([128, 128, 64], 3), ([3, 1, 5, 2], 4), ([4, 4], 7), ([5], 1), ([2, 0, 9], 2)])
def test_kld_picks_are_every_kth_position_across_batches_however_they_are_cut(per_batch: list[int], stride: int) -> None:
    """Batches shorter than the stride (a tiny --ctx through a huge head) get none or one."""
    from moe2gguf.prune.probe import kld_picks

    picks = kld_picks(per_batch, stride)
    starts = [sum(per_batch[:j]) for j in range(len(per_batch))]
    taken = [int(s + i) for s, p in zip(starts, picks, strict=True) for i in p]
    assert taken == list(range(0, sum(per_batch), stride))


def test_llama_cpp_layout_keeps_the_least_kld_candidate_and_reconstructs(model64, tmp_path: pathlib.Path) -> None:
    model, calib_dir = model64
    rep = prune(str(model), str(calib_dir), 0.5, str(tmp_path / "out"), layout="llama.cpp")
    probed = [s for s in rep["shapes_considered"] if "probe_kld" in s]
    # the band around R=0.5 holds 4 x 64 and 8 x 32: one candidate per expert count, both measured
    assert sorted((s["experts"], s["width"]) for s in probed) == [(4, 64), (8, 32)]
    best = min(probed, key=lambda s: s["probe_kld"])
    assert (rep["deployable"]["experts"], rep["deployable"]["width"]) == (best["experts"], best["width"])
    assert rep["deployable"]["chosen_by"].startswith("probe")
    assert rep["reconstruct"] is not None  # on by default in this layout
    ragged = prune(str(model), str(calib_dir), 0.5, str(tmp_path / "ragged"), layout="ragged")
    assert ragged["reconstruct"] is None


def test_candidates_are_the_widest_fitting_width_per_expert_count() -> None:
    fit = [Shape(6, 256), Shape(6, 224), Shape(7, 192), Shape(7, 224), Shape(8, 160)]
    scores = [torch.rand(8, 256, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    table = ShapeScores.of(scores, fit)
    got = candidates(fit, table, 8)
    assert sorted((s.experts, s.width) for s in got) == [(6, 256), (7, 224), (8, 160)]
    # the first n by attribution quality
    assert candidates(fit, table, 2) == sorted(got, key=lambda s: -table.quality(s))[:2]


def test_size_targets_price_unaligned_down_at_its_layers_base_type() -> None:
    """Width 224 is no multiple of Q4_K's 256: llama.cpp would store Q4_K_M's Q6_K ffn_down as
    Q8_0; the target planner's floor is IQ4_NL (Q4_K's bits), which upgrades may raise again."""
    ckpt = Checkpoint(REFERENCE)
    arch = arch_for_config(ckpt.config)
    plain = predict_layout_bytes(ckpt, arch, Shape(7, 224), "Q4_K_M")
    assert "Q8_0" in {t for n, t in plain.tensor_types.items() if "ffn_down_exps" in n}
    lean = predict_layout_bytes(ckpt, arch, Shape(7, 224), "Q4_K_M", lean_down_types(plain))
    assert {t for n, t in lean.tensor_types.items() if "ffn_down_exps" in n} == {"IQ4_NL"}
    assert lean.total_bytes < plain.total_bytes
    aligned = predict_layout_bytes(ckpt, arch, Shape(6, 256), "Q4_K_M")
    assert {t for _, t in lean_down_types(aligned)} == {"Q4_K"}  # Q4_K_M's Q6_K layers go to the base type


def test_where_each_refit_would_be_matrix_free_the_probe_ranks_without_it_and_says_so(model64, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moe2gguf.prune.reconstruct as R

    model, calib_dir = model64
    monkeypatch.setattr(R, "JOINT_LIMIT", 0)  # as at Qwen3-30B-A3B's 124 x 608 kept channels
    rep = prune(str(model), str(calib_dir), 0.5, str(tmp_path / "out"), layout="llama.cpp")
    assert "without --reconstruct's re-fit" in rep["deployable"]["probe_refit_skipped"]
    assert rep["deployable"]["chosen_by"].startswith("probe")
    assert {v["solver"] for v in rep["reconstruct"].values()} == {"blockwise CG"}  # the final re-fit still runs
    for layer in rep["reconstruct"].values():
        assert layer["rel_err_after"] < layer["rel_err_before"]


def test_with_too_few_calibration_tokens_the_re_fit_is_skipped_and_said_so(model64, tmp_path: pathlib.Path) -> None:
    """At R=0.25 a layer keeps 384 channels: the re-fit needs 8 x 384 = 3,072 calibration tokens
    and the CALIB has 2,048, on which it would fit the text rather than the model. By default
    it is skipped with a note naming the fix; asked for by name, it runs."""
    import json

    from click.testing import CliRunner

    from moe2gguf.cli import cli

    model, calib_dir = model64
    out = tmp_path / "default"
    r = CliRunner().invoke(cli, ["prune", str(model), "--calib", str(calib_dir), "--ratio", "0.25", "--layout", "llama.cpp", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["reconstruct"] is None and "--tokens 3072" in rep["reconstruct_skipped"] and "2,048" in rep["reconstruct_skipped"]
    assert "note: the block re-fit is skipped" in r.output
    forced = tmp_path / "forced"
    r = CliRunner().invoke(cli, ["prune", str(model), "--calib", str(calib_dir), "--ratio", "0.25", "--layout", "llama.cpp", "--reconstruct", "-o", str(forced)])
    assert r.exit_code == 0, r.output
    rep = json.loads((forced / "prune_report.json").read_text())
    assert rep["reconstruct"] and "reconstruct_skipped" not in rep and "it runs as asked" in r.output


def test_a_re_fit_larger_than_the_machines_memory_is_skipped_even_asked_for_and_the_model_still_written(
    model64, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block re-fit's per-expert blocks and features grow with width and tokens (7.4 GB of
    blocks alone at Mixtral-8x7B's layer size): where they would pass the machine's memory it is
    skipped with a note, even under --reconstruct, and the pruned model is written (the OOM
    killer would have lost the whole run); the probe then ranks the shapes without it too, as
    the model it writes is (its KLDs are those of --no-reconstruct). At --ratio 0.5 a layer
    keeps 256 channels: the CALIB's 2,048 tokens are enough for the re-fit."""
    import json

    from click.testing import CliRunner

    import moe2gguf.prune.reconstruct as R
    from moe2gguf.cli import cli

    model, calib_dir = model64
    args = ["prune", str(model), "--calib", str(calib_dir), "--ratio", "0.5", "--layout", "llama.cpp"]

    def klds(rep: dict) -> dict:
        return {(s["experts"], s["width"]): s["probe_kld"] for s in rep["shapes_considered"] if "probe_kld" in s}

    def report(out: pathlib.Path, *extra: str) -> tuple[dict, str]:
        r = CliRunner().invoke(cli, [*args, *extra, "-o", str(out)])
        assert r.exit_code == 0, r.output
        return json.loads((out / "prune_report.json").read_text()), r.output

    refit, _ = report(tmp_path / "refit", "--reconstruct")
    plain, _ = report(tmp_path / "plain", "--no-reconstruct")
    assert refit["reconstruct"] and klds(refit) != klds(plain)  # the probe re-fits where memory allows
    monkeypatch.setattr(R, "physical_ram", lambda: 64 << 10)  # 64 KiB: less than any layer's re-fit
    small, out = report(tmp_path / "small-machine", "--reconstruct")
    assert small["reconstruct"] is None and "more than this machine's 64.00 KiB" in small["reconstruct_skipped"]
    assert "note: the block re-fit is skipped" in out and "runs as asked" not in out
    assert klds(small) == klds(plain) and len(klds(small)) > 1
    assert (tmp_path / "small-machine" / "model.safetensors").is_file()
