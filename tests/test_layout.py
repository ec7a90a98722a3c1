"""The `Layout` object is the one authority on what a target holds: a per-layer-width layout
defined here, in the test, runs allocate -> rewrite -> GGUF writing with no other code changed,
and the GGUF states its widths and counts per layer. Stock llama.cpp (one width for the model)
refusing that file is expected: it is the layout of a future release, not of today's."""

from __future__ import annotations

import subprocess
import sys

import gguf
import pytest
import torch
from transformers import Qwen3MoeForCausalLM

from moe2gguf.arch import arch_for_config
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.exporter.writer import plan_export, write_gguf
from moe2gguf.prune import allocate as A
from moe2gguf.prune.prune import channel_cost
from moe2gguf.prune.rewrite import write_pruned
from conftest import save_tiny, tiny_qwen3moe_config

PER_LAYER = A.Layout("per-layer", width="layer", count="layer", align=16, kquant_align=256)
WIDTH = 64  # the tiny model's expert width: 4 steps of 16


@pytest.fixture(scope="module")
def per_layer_gguf(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("layout")
    torch.manual_seed(0)
    model = save_tiny(Qwen3MoeForCausalLM(tiny_qwen3moe_config(moe_intermediate_size=WIDTH)), d / "model")
    ckpt = Checkpoint(model)
    arch = arch_for_config(ckpt.config)
    # layer 0's channels hold 4x the attribution of layer 1's: at half the budget the greedy
    # fill gives layer 0 more width than layer 1 (which keeps at least one step)
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(arch.n_experts, WIDTH, generator=g, dtype=torch.float64) * m for m in (4.0, 1.0)]
    cost = channel_cost(ckpt, arch)
    floor = [torch.full((arch.n_experts,), PER_LAYER.align)] * 2
    alloc = A.allocate(scores, cost, 0.5 * sum(cost) * arch.n_experts * WIDTH, PER_LAYER, floor)
    (d / "pruned").mkdir()
    write_pruned(ckpt, arch, alloc, d / "pruned")
    plan = plan_export(d / "pruned", layout=PER_LAYER)
    out = d / "per-layer.gguf"
    write_gguf(plan, out, gguf.LlamaFileType.ALL_F32, progress=False)
    return alloc, out


def _field(reader: gguf.GGUFReader, key: str) -> list[int]:
    f = reader.fields[key]
    return [int(f.parts[i][0]) for i in f.data]


def test_per_layer_layout_writes_per_layer_widths_and_counts(per_layer_gguf) -> None:
    alloc, out = per_layer_gguf
    widths = [layer[0] for layer in alloc.widths]
    assert all(len(set(layer)) == 1 for layer in alloc.widths)  # one width per layer ...
    assert widths[0] > widths[1] > 0  # ... and they differ between layers
    assert all(w % PER_LAYER.align == 0 for w in widths)
    r = gguf.GGUFReader(out)
    assert _field(r, "qwen3moe.expert_feed_forward_length") == widths  # an array, one entry per layer
    assert _field(r, "qwen3moe.expert_count") == [len(layer) for layer in alloc.widths]
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    for bid, w in enumerate(widths):
        # gguf-py lists shapes innermost first: (hidden, width, experts) for gate/up
        assert shapes[f"blk.{bid}.ffn_up_exps.weight"] == (64, w, 8)
        assert shapes[f"blk.{bid}.ffn_gate_exps.weight"] == (64, w, 8)
        assert shapes[f"blk.{bid}.ffn_down_exps.weight"] == (w, 64, 8)


def test_stock_llama_cpp_refuses_per_layer_widths(per_layer_gguf) -> None:
    """qwen3moe's loader reads one expert count (and sizes every layer with layer 0's width):
    loading fails with its error (an exit status, not a signal) in a child process. When this
    fails because the file loads, a llama.cpp release holds per-layer shapes: add its entry."""
    _, out = per_layer_gguf
    load = "import sys; from moe2gguf.llama_runtime import open_llama; open_llama(sys.argv[1], announce=False, n_ctx=32, verbose=True)"
    proc = subprocess.run([sys.executable, "-c", load, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode > 0, (proc.returncode, proc.stderr[-2000:])
    assert "error loading model" in proc.stderr and "qwen3moe.expert_count" in proc.stderr, proc.stderr[-2000:]


def test_stock_layout_refuses_different_counts_and_pads_widths() -> None:
    """The stock llama.cpp entry: one count for the model (refused otherwise), widths padded to
    the model's widest, both stated as scalars."""
    stock = A.LAYOUTS["llama.cpp"]
    stored = stock.stored_widths([[], [32, 16], [8, 32]])
    assert stored == [[], [32, 32], [32, 32]]
    assert (stock.gguf_widths(stored), stock.gguf_counts(stored)) == (32, 2)
    with pytest.raises(ValueError, match="different expert counts"):
        stock.stored_widths([[32, 32], [32]])
    assert PER_LAYER.stored_widths([[], [32, 16], [8]]) == [[], [32, 32], [8]]
    assert PER_LAYER.gguf_widths([[], [32, 32], [8]]) == [0, 32, 8]
    strict = A.Layout("strict", width="layer", ragged="refuse")
    with pytest.raises(ValueError, match="refuses to pad"):
        strict.stored_widths([[32, 16]])


def test_prune_defaults_to_the_layout_export_writes(tmp_path) -> None:
    """`prune` without --layout allocates for stock llama.cpp (one width, one count), so the
    GGUF `export` writes from it stores no padding; ragged stays an explicit choice."""
    import json

    from click.testing import CliRunner

    from conftest import calibrated_tiny_qwen3moe
    from moe2gguf.cli import cli

    model, calib = calibrated_tiny_qwen3moe(tmp_path, seed=0, tokens=512, ctx=64)
    out = tmp_path / "pruned"
    r = CliRunner().invoke(cli, ["prune", str(model), "--calib", str(calib), "--ratio", "0.25", "--probe", "0", "--no-reconstruct", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["layout"] == A.DEFAULT_LAYOUT == "llama.cpp"
    assert len({w for layer in rep["widths"] for w in layer if w}) == 1 and len(set(rep["experts_kept"])) == 1
    e = CliRunner().invoke(cli, ["export", str(out), "-o", str(tmp_path / "p.gguf"), "--quant", "F32"])
    assert e.exit_code == 0, e.output
    assert "padding saves nothing" not in e.stderr
