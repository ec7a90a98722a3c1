"""Helpers every tests/test_arch_<family>.py uses (round trip, prune flow, independent
counts), plus the generic arch hooks they rely on (`modify_tensor`, `keeps_f32`,
renamed expert parts)."""

from __future__ import annotations

import json
import pathlib
import re

import gguf
import numpy as np
import torch
from click.testing import CliRunner
from safetensors import safe_open

from moe2gguf.cli import cli
from moe2gguf.exporter.export import export
from test_export import assert_same_logits
from conftest import REFERENCE, save_tiny


def build_tiny(model_cls: type, config, out: pathlib.Path, seed: int = 0, attn_std: float | None = None) -> pathlib.Path:
    """A random tiny checkpoint of the real HF class, with the reference tokenizer.
    HF's 0.02-std init makes near-uniform routers; widen them so top-k choices are decided
    by clear margins (a near-tie could route differently in F32 llama.cpp vs torch).
    `attn_std` re-draws the attention projections wider, so attention is sharp and a wrong
    RoPE / attention scale shows in the logits (at 0.02 attention is nearly uniform)."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"\.gate\.weight$|shared_expert_gate\.weight$", name):
                p.normal_(0.0, 0.5)
            elif attn_std is not None and ".self_attn." in name and name.endswith("proj.weight"):
                p.normal_(0.0, attn_std)
    return save_tiny(model, out)


def f32_roundtrip(folder: pathlib.Path, tmp: pathlib.Path) -> float:
    """Export F32 and compare llama.cpp's logits with PyTorch's; returns the max difference
    as a fraction of the logit range (asserted < 1e-3 inside)."""
    out = tmp / f"{folder.name}-f32.gguf"
    export(str(folder), str(out), "F32", progress=False)
    return assert_same_logits(folder, out)


def gguf_shapes(path: pathlib.Path) -> dict[str, tuple[int, ...]]:
    r = gguf.GGUFReader(path)
    return {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}


def gguf_value(path: pathlib.Path, key: str):
    return gguf.GGUFReader(path).get_field(key).contents()


def prune_flow(folder: pathlib.Path, tmp: pathlib.Path, ratio: float = 0.3, layout: str = "llama.cpp") -> tuple[pathlib.Path, pathlib.Path, dict]:
    """calibrate -> prune (coverage, in `layout`) -> export Q4_K_M -> check, all through the CLI.
    Returns (pruned checkpoint, GGUF, check report). A ragged prune keeps every expert (at
    least one channel each), since stock llama.cpp needs one expert count for the model."""
    keep_experts = ["--min-width", "1"] if layout == "ragged" else []
    text = str(REFERENCE / "calib.txt")
    calib, pruned, gg, rep = tmp / "calib", tmp / "pruned", tmp / "pruned-q4.gguf", tmp / "report.json"
    r = CliRunner()
    for args in (
        ["calibrate", str(folder), "--text", text, "-o", str(calib), "--tokens", "512", "--ctx", "64"],
        ["prune", str(folder), "--calib", str(calib), "--ratio", str(ratio), "-o", str(pruned), "--method", "coverage", "--layout", layout, *keep_experts],
        ["export", str(pruned), "-o", str(gg), "--quant", "Q4_K_M", "--imatrix", str(calib)],
        ["check", str(gg), "--text", str(REFERENCE / "eval.txt"), "--ctx", "64", "--chunks", "2", "--json", str(rep)],
    ):
        res = r.invoke(cli, args, catch_exceptions=False)
        assert res.exit_code == 0, f"{args[0]} failed: {res.output}"
    return pruned, gg, json.loads(rep.read_text())


def load_in_llama_cpp(path: pathlib.Path) -> None:
    """Stock llama.cpp (llama-cpp-python) loads the file and produces finite logits."""
    from moe2gguf.llama_runtime import open_llama

    llm = open_llama(path, n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval([1, 2, 3, 4])
    assert np.isfinite(np.array(llm.scores[:4])).all()


def tensor_counts(folder: pathlib.Path, routed: str, shared: str | None, n_used: int) -> dict[str, int]:
    """Independent counts from the safetensors headers: `routed`/`shared` are regexes over
    tensor names (group 1 = layer, group 2 = expert for `routed`), no registry involved."""
    total = experts = shared_n = 0
    per_layer: dict[int, int] = {}
    ids: dict[int, set[int]] = {}
    with safe_open(folder / "model.safetensors", "pt") as f:
        for name in f.keys():
            numel = int(np.prod(f.get_slice(name).get_shape()))
            total += numel
            if m := re.search(routed, name):
                experts += numel
                bid = int(m.group(1))
                per_layer[bid] = per_layer.get(bid, 0) + numel
                ids.setdefault(bid, set()).add(int(m.group(2)))
            elif shared is not None and re.search(shared, name):
                shared_n += numel
    active = total - experts + sum(n_used * per_layer[b] / len(ids[b]) for b in per_layer)
    return {"total": total, "experts": experts, "shared": shared_n, "active": round(active), "moe_layers": sorted(per_layer)}


def assert_refused(folder: pathlib.Path, tmp: pathlib.Path, flag: str, value) -> None:
    """Setting `flag` in config.json makes export exit 2 with one line naming the flag, no file."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg[flag] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp / "refused.gguf"
    res = CliRunner().invoke(cli, ["export", str(folder), "-o", str(out), "--quant", "F32"])
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and flag in res.output, res.output
    assert not out.exists()


# --- the generic hooks themselves -------------------------------------------------------


def test_renamed_expert_parts_keep_checkpoint_names_and_aliases():
    from moe2gguf.modeling import ExpertMLP

    m = ExpertMLP(8, 4, "silu", device="cpu", parts={"gate": "w1", "up": "w3", "down": "w2"})
    assert sorted(m.state_dict()) == ["w1.weight", "w2.weight", "w3.weight"]
    # the generic code (calibration) still reaches the parts by their usual names
    assert m.gate_proj is m.w1 and m.up_proj is m.w3 and m.down_proj is m.w2
    x = torch.randn(3, 8)
    assert torch.equal(m.intermediate(x), torch.nn.functional.silu(m.w1(x)) * m.w3(x))


def test_default_expert_parts_are_unchanged():
    from moe2gguf.modeling import ExpertMLP

    m = ExpertMLP(8, 4, "silu", device="cpu")
    assert sorted(m.state_dict()) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
