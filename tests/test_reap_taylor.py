"""`--method reap`, `--method frequency` and `--score taylor` against computations made here
independently, on the stock transformers model (its fused experts, its router), never through
moe2gguf's ExpertList or observers."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import calibrated_tiny_qwen3moe

from moe2gguf.arch import arch_for_config
from moe2gguf.calib import CALIB_JSON, SCORES
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.cli import cli
from moe2gguf.errors import UserError
from moe2gguf.prune.calibrate import calibration_windows
from moe2gguf.prune.prune import Calib, prune
from moe2gguf.recipe import load_recipe

RECIPE = pathlib.Path(__file__).resolve().parent.parent / "moe2gguf" / "data" / "reference-moe.yaml"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    return calibrated_tiny_qwen3moe(tmp_path_factory.mktemp("reap"), seed=3, tokens=2048, ctx=64)


@pytest.fixture(scope="module")
def direct(calibrated: tuple[pathlib.Path, pathlib.Path]) -> dict[str, list[torch.Tensor]]:
    """Per MoE layer, from the stock HF model run on the calibration windows: REAP's mean
    g * ||f|| per expert, router mass per expert, and sum |h * dL/dh| per expert channel with
    dL/dh from autograd (L the mean next-token cross-entropy over all windows)."""
    from transformers import AutoModelForCausalLM

    model_dir, calib = calibrated
    info = json.loads((calib / CALIB_JSON).read_text())
    ids = torch.from_numpy(calibration_windows(model_dir, info))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    mlps = [layer.mlp for layer in model.model.layers]
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (block input, block output)

    def keep(i: int):
        def hook(_m, args, out):
            out.retain_grad()
            seen[i] = (args[0].detach(), out)

        return hook

    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(mlps)]
    try:
        x = model.get_input_embeddings()(ids).requires_grad_(True)
        logits = model(inputs_embeds=x, use_cache=False).logits
        n = ids.shape[0] * (ids.shape[1] - 1)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / n
        loss.backward()
    finally:
        for h in handles:
            h.remove()

    out: dict[str, list[torch.Tensor]] = {"reap": [], "mass": [], "taylor": []}
    for i, mlp in enumerate(mlps):
        xin, y = seen[i]
        xs = xin.reshape(-1, xin.shape[-1]).double()
        dy = y.grad.reshape(-1, y.shape[-1]).double()
        probs = torch.softmax(xs @ mlp.gate.weight.double().T, dim=-1)
        top, idx = torch.topk(probs, model.config.num_experts_per_tok, dim=-1)
        top = top / top.sum(-1, keepdim=True)  # norm_topk_prob
        E, width = model.config.num_experts, model.config.moe_intermediate_size
        reap_sum, count, mass = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
        taylor = torch.zeros(E, width, dtype=torch.float64)
        gate_up, down = mlp.experts.gate_up_proj.double(), mlp.experts.down_proj.double()
        for t in range(xs.shape[0]):
            for slot in range(idx.shape[1]):
                e, g = int(idx[t, slot]), top[t, slot]
                gate, up = (gate_up[e] @ xs[t]).chunk(2)
                h = torch.nn.functional.silu(gate) * up
                f = down[e] @ h
                reap_sum[e] += g * f.norm()
                count[e] += 1
                mass[e] += g
                # the block output is y = sum_e g_e * down_e h_e, so dL/dh_e = g_e * down_e^T dL/dy
                taylor[e] += (h * (g * down[e].T @ dy[t])).abs()
        out["reap"].append(torch.where(count > 0, reap_sum / count.clamp_min(1), 0.0))
        out["mass"].append(mass)
        out["taylor"].append(taylor)
    return out


def _calib(calibrated: tuple[pathlib.Path, pathlib.Path]) -> Calib:
    model_dir, calib = calibrated
    ckpt = Checkpoint(model_dir)
    return Calib(calib, arch_for_config(ckpt.config), ckpt)


def _kept(report: dict) -> list[set[int]]:
    return [{e for e, w in enumerate(layer) if w} for layer in report["widths"]]


def _top(scores: list[torch.Tensor], k: int) -> list[set[int]]:
    return [set(torch.argsort(s, descending=True, stable=True)[:k].tolist()) for s in scores]


def test_reap_saliency_equals_the_mean_of_router_weight_times_expert_output_norm(calibrated, direct) -> None:
    got = _calib(calibrated).reap()
    for g, want in zip(got, direct["reap"], strict=True):
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-9), (g, want)
        assert torch.equal(torch.argsort(g, descending=True), torch.argsort(want, descending=True))


def test_method_reap_removes_the_experts_of_lowest_direct_saliency(calibrated, direct, tmp_path: pathlib.Path) -> None:
    model_dir, calib = calibrated
    rep = prune(str(model_dir), str(calib), 0.25, str(tmp_path / "reap"), method="reap", layout="ragged")
    assert rep["method"] == "reap" and rep["experts_kept"] == [6, 6]
    assert _kept(rep) == _top(direct["reap"], 6)


def test_method_frequency_keeps_todays_router_mass_ranking(calibrated, direct, tmp_path: pathlib.Path) -> None:
    """`frequency` is the former expert-drop: the experts of most summed router weight stay."""
    model_dir, calib = calibrated
    rep = prune(str(model_dir), str(calib), 0.25, str(tmp_path / "freq"), method="frequency", layout="ragged")
    assert rep["experts_kept"] == [6, 6]
    assert _kept(rep) == _top(direct["mass"], 6)
    for g, want in zip(_calib(calibrated).get("mass"), direct["mass"], strict=True):
        assert torch.allclose(g, want, rtol=1e-5)


def test_taylor_score_equals_autograd_gradient_times_activation(calibrated, direct) -> None:
    cal = _calib(calibrated)
    got = cal.attribution("taylor")
    raw = cal.attribution("taylor", normalise=False)
    assert all(torch.equal(a, b) for a, b in zip(got, raw, strict=True))  # loss units already: not rescaled per layer
    for g, want in zip(got, direct["taylor"], strict=True):
        assert want.abs().sum() > 0
        assert torch.allclose(g, want, rtol=1e-3, atol=1e-3 * float(want.abs().max())), (g - want).abs().max()


def test_expert_drop_is_refused_with_its_new_name(calibrated, tmp_path: pathlib.Path) -> None:
    model_dir, calib = calibrated
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["prune", str(model_dir), "--calib", str(calib), "--ratio", "0.25", "-o", str(out), "--method", "expert-drop"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "frequency" in lines[0] and "reap" in lines[0], r.output
    assert not out.exists()


def test_expert_drop_in_a_recipe_is_refused_with_its_new_name(tmp_path: pathlib.Path) -> None:
    import yaml

    data = yaml.safe_load(RECIPE.read_text())
    data["prune"]["method"] = "expert-drop"
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=r"prune\.method: .*frequency.*reap") as e:
        load_recipe(p)
    assert "\n" not in e.value.format_message()
    data["prune"]["method"] = "reap"
    p.write_text(yaml.safe_dump(data))
    assert load_recipe(p).prune.method == "reap"


@pytest.mark.parametrize("args, missing", [(["--method", "reap"], "reap"), (["--score", "taylor"], "taylor")])
def test_calib_without_reap_or_taylor_asks_to_recalibrate(calibrated, tmp_path: pathlib.Path, args: list[str], missing: str) -> None:
    """A CALIB written before REAP/Taylor were recorded is refused in one line naming calibrate."""
    model_dir, calib = calibrated
    old = tmp_path / "old"
    old.mkdir()
    (old / CALIB_JSON).write_text((calib / CALIB_JSON).read_text())
    info = json.loads((calib / CALIB_JSON).read_text())
    info.pop(missing, None)
    (old / CALIB_JSON).write_text(json.dumps(info))
    save_file({k: v for k, v in load_file(calib / SCORES).items() if not k.endswith(f".{missing}")}, old / SCORES)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["prune", str(model_dir), "--calib", str(old), "--ratio", "0.25", "-o", str(out), "--layout", "ragged", *args])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "calibrate" in lines[0] and missing in lines[0], r.output
    assert not out.exists()


def test_taylor_pass_skipped_for_a_model_too_large_is_refused_in_one_line(calibrated, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moe2gguf.prune import calibrate as C

    model_dir, calib = calibrated
    monkeypatch.setattr(C, "TAYLOR_LIMIT", 1024)  # below the tiny model's weights
    text = json.loads((calib / CALIB_JSON).read_text())["texts"]
    C.calibrate(str(model_dir), text, str(tmp_path / "calib"), tokens=128, ctx=64)
    info = json.loads((tmp_path / "calib" / CALIB_JSON).read_text())
    assert info["taylor"].startswith("skipped")
    assert not any(k.endswith(".taylor") for k in load_file(tmp_path / "calib" / SCORES))
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["prune", str(model_dir), "--calib", str(tmp_path / "calib"), "--ratio", "0.25", "-o", str(out), "--score", "taylor", "--layout", "ragged"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--score energy" in r.output, r.output
    assert not out.exists()
