"""calibrate: layer-by-layer statistics, the CALIB/ contract, memory per layer, bad input."""

from __future__ import annotations

import contextlib
import ctypes
import json
import pathlib

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import REFERENCE, save_tiny, tiny_qwen3moe_config
from moe2gguf.arch import arch_for_config
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.cli import cli
from moe2gguf.modeling import load_model
from moe2gguf.prune.calibrate import Calibration, calibrate, spread_windows



@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The head of the reference calibration text: enough tokens, fast to tokenize."""
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text((REFERENCE / "calib.txt").read_text()[:20000])
    return str(p)


def _windows(n: int, ctx: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 4000, size=(n, ctx))


def test_layer_by_layer_pass_equals_the_whole_model(tiny_qwen3moe: pathlib.Path) -> None:
    """The output-projection imatrix is the sum of squares of the final normed hidden state:
    if the per-layer loop (catcher, kwargs, rotary, masks) is right it matches a full forward."""
    ckpt = Checkpoint(tiny_qwen3moe)
    wins = _windows(3, 32)
    cal = Calibration(ckpt, arch_for_config(ckpt.config), wins, batch=2)
    cal.run()
    model, _, _ = load_model(str(tiny_qwen3moe))
    with torch.no_grad():
        h = model.model(torch.from_numpy(wins)).last_hidden_state.double()
    got = cal.inputs["lm_head"].sum2
    assert torch.allclose(got, (h * h).sum((0, 1)), rtol=1e-4)
    # every routed token was observed once per used expert
    for s in cal.experts.values():
        assert float(s.freq.sum()) == wins.size * 2
        assert float(s.mass.sum()) == pytest.approx(wins.size, rel=1e-5)  # normalised top-k weights


def test_calib_dir_contract(tiny_qwen3moe: pathlib.Path, tmp_path: pathlib.Path, text: str) -> None:
    out = tmp_path / "calib"
    calibrate(str(tiny_qwen3moe), [text], str(out), tokens=256, ctx=64)
    info = json.loads((out / "calib.json").read_text())
    for k in ("architectures", "n_layers", "hidden_size", "n_experts", "expert_width", "tokens", "ctx", "texts"):
        assert k in info
    assert info["tokens"] == 256 and info["ctx"] == 64
    assert not any(p.name.startswith(".layer") for p in out.iterdir())  # the per-layer statistics were read back and removed
    r = gguf.GGUFReader(out / "imatrix.gguf")
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(r.fields["imatrix.chunk_count"].parts[-1][0]) == 4
    t = {x.name: x for x in r.tensors}
    exps = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.FFN_DOWN_EXP].format(bid=1) + ".weight"
    assert t[exps + ".in_sum2"].data.shape == (8, 32)  # [n_experts, width]
    assert t[exps + ".counts"].data.shape == (8, 1)
    assert t["blk.0.attn_q.weight.in_sum2"].data.shape == (1, 64)
    assert t["blk.0.ffn_gate_inp.weight.counts"].data.reshape(-1)[0] == 256
    assert "output.weight.in_sum2" in t


def test_windows_are_spread_over_all_texts() -> None:
    a, b = np.arange(1000), np.arange(1000, 1500)
    w = spread_windows([a, b], ["a", "b"], tokens=400, ctx=100)
    assert w.shape == (4, 100)
    assert (w[:2] < 1000).all() and (w[2:] >= 1000).all()
    assert w[1, 0] >= 500  # spread over the text, not its first windows


@pytest.mark.parametrize("block", [64 << 20, 1000], ids=["whole", "blocks"])
def test_weight_scores_are_the_float64_norms_of_the_stored_weights(tiny_qwen3moe: pathlib.Path, block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """CALIB's per-channel weight scores (down_norm: ||down[:, j]||; magnitude: ||gate[j]||
    ||up[j]|| ||down[:, j]||) are those of the checkpoint's weights in float64, however many
    rows are made float64 at once (a few here)."""
    from safetensors.torch import load_file

    from moe2gguf.prune import scores as S

    monkeypatch.setattr(S, "NORM_BLOCK_BYTES", block)
    ckpt = Checkpoint(tiny_qwen3moe)
    cal = Calibration(ckpt, arch_for_config(ckpt.config), _windows(1, 32), gram=False)
    cal.run()
    t = cal.score_tensors()
    w = load_file(str(tiny_qwen3moe / "model.safetensors"))
    for bid in range(2):
        part = {p: torch.stack([w[f"model.layers.{bid}.mlp.experts.{x}.{p}_proj.weight"].double() for x in range(8)]) for p in ("gate", "up", "down")}
        down = part["down"].norm(dim=1)
        torch.testing.assert_close(t[f"layers.{bid}.down_norm"], down, rtol=1e-12, atol=0)
        torch.testing.assert_close(t[f"layers.{bid}.magnitude"], part["gate"].norm(dim=2) * part["up"].norm(dim=2) * down, rtol=1e-12, atol=0)


@pytest.mark.parametrize("chunk_rows", [7, 4096])
def test_gram_matrices_are_the_float64_sums_over_every_batch_and_leave_no_activations(chunk_rows: int, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Gram matrices CALIB stores (what prune's refit reads) are sum p^2 h h^T over every
    batch an expert saw, to float32 rounding (the channel moments the scores come from to
    float64 rounding), whatever the widths (one zero) and however the
    spilled activations are summed (in float32 over a few rows at a time, or over all of them);
    an expert no token reached
    gets zeros; the activations on disk are gone once the matrices are made."""
    from moe2gguf.prune import gram as G
    from moe2gguf.prune.scores import ExpertStats

    monkeypatch.setattr(G, "CHUNK_ROWS", chunk_rows)
    widths = [24, 0, 40, 8, 40, 16]
    stats = ExpertStats(len(widths), widths, hidden=16, gram=G.GramSpill(tmp_path / "acts", widths))
    gen = torch.Generator().manual_seed(0)
    want = [torch.zeros(w, w, dtype=torch.float64) for w in widths]
    moments = {k: [torch.zeros(w if k != "in_sum2" else 16, dtype=torch.float64) for w in widths] for k in ("abs_act", "sq_act", "mid_sum2", "in_sum2")}
    for _batch in range(3):
        for xid, w in enumerate(widths[:-1]):  # the last expert is never routed to
            n = int(torch.randint(1, 30, (1,), generator=gen))
            h, x, p = torch.randn(n, w, generator=gen), torch.randn(n, 16, generator=gen), torch.rand(n, 1, generator=gen)
            given = h.clone()
            stats.add_batch(xid, x, h, p)
            assert torch.equal(h, given)  # the caller's activations are not scaled in place
            ph = p.double() * h.double()
            want[xid] += ph.T @ ph
            for k, v in (("abs_act", ph.abs()), ("sq_act", ph * ph), ("mid_sum2", h.double() ** 2), ("in_sum2", x.double() ** 2)):
                moments[k][xid] += v.sum(0)
    for k, v in moments.items():  # the channel moments the scores come from, to float64 rounding
        got = stats.in_sum2 if k == "in_sum2" else torch.cat(getattr(stats, k))
        torch.testing.assert_close(got.flatten(), (torch.stack(v) if k == "in_sum2" else torch.cat(v)).flatten(), rtol=1e-12, atol=1e-12)
    got = list(stats.gram.matrices())
    assert [(g.dtype, tuple(g.shape)) for g in got] == [(torch.float32, (w, w)) for w in widths]
    for g, ref in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=1e-6 * max([1.0, *ref.abs().flatten().tolist()]))
    assert not torch.any(got[-1]) and not list((tmp_path / "acts").iterdir())


@pytest.mark.parametrize("gram", [False, True], ids=["scores", "scores+gram"])
def test_memory_stays_per_layer(tmp_path: pathlib.Path, gram: bool) -> None:
    """A 12-layer model: at every layer only that layer's weights are materialised, and the
    process's anonymous memory does not grow by the layers already done, Gram matrices
    included (each layer's go to CALIB/gram/ as it finishes)."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = tiny_qwen3moe_config(num_hidden_layers=12, hidden_size=128, moe_intermediate_size=512, head_dim=32)
    path = save_tiny(Qwen3MoeForCausalLM(cfg), tmp_path / "deep")
    ckpt = Checkpoint(path)
    cal = Calibration(ckpt, arch_for_config(ckpt.config), _windows(2, 64), gram=gram)
    seen_bytes, rss = [], []

    def on_layer(bid: int, model: torch.nn.Module) -> None:
        seen_bytes.append(sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.device.type != "meta"))
        rss.append(_rss_anon())

    (tmp_path / "calib").mkdir()
    cal.run(on_layer, spill=tmp_path / "calib")
    assert len(list((tmp_path / "calib").glob("gram/layer-*.safetensors"))) == (12 if gram else 0)
    layer_bytes = cal.layer_bytes
    whole = sum(ckpt.numel(n) * 4 for n in ckpt.tensor_names)
    assert max(seen_bytes) <= layer_bytes < whole / 8
    assert cal.peak_bytes <= max(layer_bytes, 4096 * 128 * 4)  # one layer, or the embedding alone
    # RSS after the last layer vs after the second: a whole-model load would add 10 layers, and
    # Gram matrices kept in memory 10 layers' worth (82 MiB measured; spilled: 2-3 MiB)
    assert rss[-1] - rss[1] < 3 * layer_bytes, (rss, layer_bytes)


def _rss_anon() -> int:
    """Anonymous memory in use: glibc first hands freed heap pages back (malloc_trim), or its
    caching, which varies with what earlier tests in this process allocated, would be counted."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def test_text_too_short_is_exit_2_and_writes_nothing(tiny_qwen3moe: pathlib.Path, tmp_path: pathlib.Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    out = tmp_path / "calib"
    r = CliRunner().invoke(cli, ["calibrate", str(tiny_qwen3moe), "--text", str(short), "-o", str(out), "--tokens", "4096", "--ctx", "64"])
    assert r.exit_code == 2
    assert "too few" in r.output and "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.glob(".calib*"))


def test_a_calib_its_disk_cannot_take_is_refused_before_the_pass_and_no_gram_is_the_way_out(tiny_qwen3moe: pathlib.Path, tmp_path: pathlib.Path, text: str,
                                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """CALIB's Gram matrices grow with width^2 per expert and layer (210 GB at Mixtral-8x7B):
    with less free disk than they and one layer's activations take (128 KiB here), calibrate
    is one line before any work (exit 2) naming both sizes and --no-gram, and writes nothing;
    with --no-gram it calibrates, and prune says its refit was skipped for that reason."""
    from moe2gguf.prune import calibrate as C

    monkeypatch.setattr(C, "free_bytes", lambda _p: 100_000)
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "calib"
    args = ["calibrate", str(tiny_qwen3moe), "--text", text, "-o", str(out), "--tokens", "256", "--ctx", "64"]
    r = CliRunner().invoke(cli, args)
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert "128.00 KiB" in lines[0] and "97.66 KiB are free" in lines[0] and "--no-gram" in lines[0] and "calibration.gram: false" in lines[0]
    assert sorted(tmp_path.iterdir()) == before
    r = CliRunner().invoke(cli, [*args, "--no-gram"])
    assert r.exit_code == 0 and not (out / "gram").exists(), r.output
    r = CliRunner().invoke(cli, ["prune", str(tiny_qwen3moe), "--calib", str(out), "--ratio", "0.3", "--layout", "ragged", "-o", str(tmp_path / "pruned")])
    assert r.exit_code == 0 and "--no-gram" in r.output, r.output
    rep = json.loads((tmp_path / "pruned" / "prune_report.json").read_text())
    assert rep["refit_down"] is False and "--no-gram" in rep["refit_skipped"]


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_device_torch_cannot_see_is_exit_2_and_writes_nothing(device: str, tiny_qwen3moe: pathlib.Path, tmp_path: pathlib.Path, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """--device cuda with the pinned CPU wheel (forced here, so a GPU machine runs it too):
    one line that says what torch sees and how to fix it, before any work."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    out = tmp_path / "calib"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = CliRunner().invoke(cli, ["calibrate", str(tiny_qwen3moe), "--text", text, "-o", str(out), "--tokens", "256", "--ctx", "64", "--device", device])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and f"--device {device}" in lines[0] and "--device cpu" in lines[0] and "Traceback" not in r.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize(("cuda", "mps", "want"), [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_takes_the_accelerator_torch_sees(cuda: bool, mps: bool, want: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from moe2gguf.device import resolve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve("auto").type == want


def test_calibrate_on_the_cpu_device_by_name_equals_auto_here(tiny_qwen3moe: pathlib.Path, tmp_path: pathlib.Path, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's default (auto) on a machine without an accelerator is the CPU, and the CALIB it
    writes is the one --device cpu writes, to the bit."""
    from safetensors.torch import load_file

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    runs = {}
    for dev in ("auto", "cpu"):
        r = CliRunner().invoke(cli, ["calibrate", str(tiny_qwen3moe), "--text", text, "-o", str(tmp_path / dev), "--tokens", "256", "--ctx", "64", "--device", dev])
        assert r.exit_code == 0, r.output
        assert r.output.rstrip().endswith("(on cpu)")
        runs[dev] = load_file(tmp_path / dev / "scores.safetensors")
    assert runs["auto"].keys() == runs["cpu"].keys()
    assert all(torch.equal(runs["auto"][k], runs["cpu"][k]) for k in runs["cpu"])
