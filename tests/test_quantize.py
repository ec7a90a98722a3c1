"""Quantization through llama.cpp with our importance matrix: the imatrix format round-trips,
is remapped onto pruned experts/channels, refuses another model's imatrix, and Q4_K_M stays
close to F32."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from click.testing import CliRunner

from moe2gguf.checkpoint import write_prune_map
from moe2gguf.cli import cli
from moe2gguf.errors import UserError
from moe2gguf.exporter.export import export
from moe2gguf.exporter.imatrix import imatrix_for_plan, read_imatrix, torch_imatrix, write_imatrix
from moe2gguf.exporter.writer import plan_export
from test_export import make_ragged


def synthetic_imatrix(plan_dir: pathlib.Path, out: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Distinct values per (matrix, channel) for every weight of the unpruned model."""
    plan = plan_export(plan_dir)
    entries = {}
    for t in plan.tensors:
        if len(t.shape) < 2 or t.name.startswith("token_embd"):
            continue
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        n_in = t.shape[-1]
        sums = (np.arange(n_mat * n_in, dtype=np.float32).reshape(n_mat, n_in) + 1) * 10
        entries[t.name] = (sums, np.full(n_mat, 10, dtype=np.float32))
    write_imatrix(out, entries, ["synthetic"], 3, 256)
    return entries


def test_imatrix_round_trip_and_count_normalisation(tmp_path):
    sums = np.array([[4.0, 8.0], [1.0, 1.0]], dtype=np.float32)
    write_imatrix(tmp_path / "im.gguf", {"blk.0.ffn_down_exps.weight": (sums, np.array([2.0, 0.0]))}, ["a.txt", "b.txt"], 7, 512)
    im = read_imatrix(tmp_path / "im.gguf")
    assert im.datasets == ["a.txt", "b.txt"] and im.chunk_count == 7 and im.chunk_size == 512
    np.testing.assert_array_equal(im.sums["blk.0.ffn_down_exps.weight"], sums)
    # divided by counts; an expert never routed to gets ones (as llama-quantize does)
    np.testing.assert_array_equal(im.mean("blk.0.ffn_down_exps.weight"), [[2.0, 4.0], [1.0, 1.0]])


def test_imatrix_is_remapped_onto_pruned_experts_and_channels(tiny_qwen3moe, tmp_path):
    entries = synthetic_imatrix(tiny_qwen3moe, tmp_path / "im.gguf")
    widths = [[16, 8, 32, 8], [8, 16, 24, 32]]
    pruned = make_ragged(tiny_qwen3moe, tmp_path / "pruned", widths)
    # pretend the stored experts came from these originals and channels
    orig = {0: [1, 3, 4, 7], 1: [0, 2, 5, 6]}
    kept = {b: (orig[b], [list(range(31, 31 - w, -1)) for w in widths[b]]) for b in orig}
    write_prune_map(pruned, kept)
    got = imatrix_for_plan(tmp_path / "im.gguf", plan_export(pruned))
    mean_down = entries["blk.1.ffn_down_exps.weight"][0] / 10
    down = got["blk.1.ffn_down_exps.weight"].reshape(4, 32)
    np.testing.assert_allclose(down[1, :16], mean_down[2, kept[1][1][1]])
    assert (down[1, 16:] > 0).all() and (down[1, 16:] < 1e-3 * down[1, :16].min()).all()  # padding: small positive
    gate = got["blk.0.ffn_gate_exps.weight"].reshape(4, 64)
    np.testing.assert_allclose(gate, entries["blk.0.ffn_gate_exps.weight"][0][orig[0]] / 10)
    # and llama.cpp accepts it
    out = tmp_path / "pruned.gguf"
    export(str(pruned), str(out), "Q8_0", str(tmp_path / "im.gguf"), progress=False)
    assert out.stat().st_size > 0


def test_imatrix_of_another_model_is_refused(tiny_qwen3moe, tmp_path):
    from conftest import save_tiny, tiny_qwen3moe_config
    from transformers import Qwen3MoeForCausalLM

    other = save_tiny(Qwen3MoeForCausalLM(tiny_qwen3moe_config(hidden_size=96, head_dim=24)), tmp_path / "other")
    synthetic_imatrix(other, tmp_path / "im.gguf")
    out = tmp_path / "q.gguf"
    res = CliRunner().invoke(cli, ["export", str(tiny_qwen3moe), "-o", str(out), "--quant", "Q8_0", "--imatrix", str(tmp_path / "im.gguf")])
    assert res.exit_code == 2, res.output
    assert "another model" in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()
    # a CALIB folder whose calib.json names another model is refused before shapes are looked at
    calib = tmp_path / "calib"
    calib.mkdir()
    synthetic_imatrix(tiny_qwen3moe, calib / "imatrix.gguf")
    (calib / "calib.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"], "n_layers": 2, "hidden_size": 96}))
    with pytest.raises(UserError, match="another model"):
        imatrix_for_plan(calib, plan_export(tiny_qwen3moe))


def test_unknown_tensor_type_override_is_refused(tiny_qwen3moe, tmp_path):
    out = tmp_path / "q.gguf"
    res = CliRunner().invoke(cli, ["export", str(tiny_qwen3moe), "-o", str(out), "--quant", "Q8_0", "--tensor-type", "ffn_down_exps=Q9_K"])
    assert res.exit_code == 2 and not out.exists()


def ref_imatrix(model: pathlib.Path, calib: pathlib.Path, chunks: int = 16) -> pathlib.Path:
    from moe2gguf.exporter.check import tokenize
    from moe2gguf.protocol import read_text, windows

    wins = windows(tokenize(str(model), "torch", read_text(model / "calib.txt")), 256, chunks)
    calib.mkdir(exist_ok=True)
    write_imatrix(calib / "imatrix.gguf", torch_imatrix(model, wins), ["calib.txt"], len(wins), 256)
    return calib


@pytest.mark.slow
def test_bundled_q4_k_m_close_to_f32_and_imatrix_lowers_kld(reference_model, tmp_path, monkeypatch):
    """Q4_K_M with our imatrix: PPL within 1% of F32 and lower KLD than without it. At 3 bits
    llama.cpp's imatrix path does not beat its plain one on this small model (see README),
    so there the test pins only that the imatrix carries information: ours beats its inverse."""
    from moe2gguf.exporter.check import check
    from moe2gguf.exporter.quantize import quantize
    from moe2gguf.exporter.writer import plan_export

    monkeypatch.setenv("MOE2GGUF_CACHE", str(tmp_path / "cache"))
    text = str(reference_model / "eval.txt")
    f32 = tmp_path / "f32.gguf"
    export(str(reference_model), str(f32), "F32", progress=False)
    calib = ref_imatrix(reference_model, tmp_path / "calib")
    kld = {}
    for im in (None, calib):
        out = tmp_path / f"q4-{im is not None}.gguf"
        export(str(reference_model), str(out), "Q4_K_M", str(im) if im else None, progress=False)
        r = check(str(out), text, base=str(f32), chunks=16)
        kld[im is not None] = r["kld"]
        if im is not None:
            assert abs(r["ppl"] / check(str(f32), text, chunks=16)["ppl"] - 1) < 0.01
    assert kld[True] < kld[False], f"imatrix did not lower KLD at Q4_K_M: {kld}"

    plan = plan_export(str(reference_model))
    ours = imatrix_for_plan(calib, plan)
    inverse = {k: (1.0 / np.maximum(v, 1e-8)).astype(np.float32) for k, v in ours.items()}
    low = {}
    for name, im in (("ours", ours), ("inverse", inverse)):
        out = tmp_path / f"q2-{name}.gguf"
        quantize(f32, out, "Q2_K", imatrix=im)
        low[name] = check(str(out), text, base=str(f32), chunks=16)["kld"]
    assert low["ours"] < 0.9 * low["inverse"], low
