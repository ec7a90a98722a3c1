"""KL-divergence in bounded memory: the base's log-probabilities are kept as a uint16 grid (as
llama-perplexity's --kl-divergence-base file keeps them) and compared one window at a time, so
`check --base` on Qwen3's 151,936-entry vocabulary runs 64 windows of 512 in under 2 GB."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REFERENCE, save_tiny, tiny_qwen3moe_config
from moe2gguf.logprobs import HEADER, LEVELS, RANGE, pack, score_window, unpack

QWEN3_VOCAB = 151_936


def _exact_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((40, QWEN3_VOCAB)) * 3).astype(np.float32)


def test_grid_keeps_every_log_prob_near_the_top_within_one_step(logits):
    lp = _exact_log_softmax(logits)
    back = unpack(pack(lp.astype(np.float32))).astype(np.float64)
    near = lp >= lp.max(-1, keepdims=True) - RANGE
    # half a step of rounding, plus the shift renormalising the rounded row moves every entry by
    assert np.abs(back - lp)[near].max() <= RANGE / LEVELS
    assert np.allclose(np.exp(back.astype(np.float64)).sum(-1), 1, atol=1e-5)  # renormalised
    assert pack(lp[:1].astype(np.float32)).shape == (1, HEADER + QWEN3_VOCAB) and pack(lp[:1].astype(np.float32)).dtype == np.uint16


def test_kld_and_top1_from_the_grid_match_a_float64_computation(logits):
    rng = np.random.default_rng(1)
    other = logits + rng.standard_normal(logits.shape).astype(np.float32) * 0.2
    other[::4] += 5 * (np.arange(QWEN3_VOCAB) == 7)  # some positions change their argmax
    targets = rng.integers(0, QWEN3_VOCAB, len(logits))
    base, grid = score_window(logits, targets, grid=True)
    s, _ = score_window(other, targets, base_rows=grid)
    b, m = _exact_log_softmax(logits), _exact_log_softmax(other)
    kld = (np.exp(b) * (b - m)).sum(-1)
    np.testing.assert_allclose(base.nll, -b[np.arange(len(b)), targets], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(s.nll, -m[np.arange(len(m)), targets], rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(s.kld, kld, rtol=2e-3)
    assert (s.top1 == (b.argmax(-1) == m.argmax(-1))).all() and 0 < s.top1.mean() < 1
    # against itself the divergence is the grid's resolution, not more
    assert np.abs(score_window(logits, targets, base_rows=grid)[0].kld).max() < 1e-6


def _big_vocab_model(d: pathlib.Path) -> pathlib.Path:
    """A tiny Qwen3-MoE whose vocabulary (embeddings, head, tokenizer) has Qwen3's 151,936
    entries: the reference BPE tokenizer padded with entries no merge reaches."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = save_tiny(Qwen3MoeForCausalLM(tiny_qwen3moe_config(vocab_size=QWEN3_VOCAB, hidden_size=32, head_dim=8)), d / "big-vocab")
    tok = json.loads((REFERENCE / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for i in range(len(vocab), QWEN3_VOCAB):
        vocab[f"zz{i:06d}"] = i
    (model / "tokenizer.json").write_text(json.dumps(tok))
    return model


@pytest.mark.slow
def test_check_base_on_qwen3_vocab_runs_64_windows_of_512_under_2_gb(tmp_path):
    from moe2gguf.exporter.export import export

    gguf = tmp_path / "big-vocab-f32.gguf"
    export(str(_big_vocab_model(tmp_path)), str(gguf), "F32", progress=False)
    cache, report = tmp_path / "cache", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "moe2gguf.cli", "check", str(gguf), "--base", str(gguf), "--text", str(REFERENCE / "eval.txt"),
           "--ctx", "512", "--chunks", "64", "--threads", "2", "--json", str(report)]
    # a parent of its own, so RUSAGE_CHILDREN covers the check process and its children only
    measure = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r)")
    try:
        out = subprocess.run([sys.executable, "-c", measure, *cmd], capture_output=True, text=True, env={**os.environ, "MOE2GGUF_CACHE": str(cache)})
        assert out.returncode == 0, out.stderr[-2000:]
        peak = int(out.stdout.strip().splitlines()[-1])
        r = json.loads(report.read_text())
        assert r["tokens_scored"] == 64 * 256
        assert peak < 2 << 30 and r["peak_rss_bytes"] < 2 << 30, (peak, r["peak_rss_bytes"])
        assert abs(r["kld"]) < 1e-6 and r["top1"] > 0.999  # against itself, through the grid
        # the cached base is the uint16 grid: 2 bytes per position and vocabulary entry
        (grid,) = cache.glob("base-*.npy")
        assert np.load(grid, mmap_mode="r").shape == (64 * 256, HEADER + QWEN3_VOCAB)
        assert grid.stat().st_size < 64 * 256 * (HEADER + QWEN3_VOCAB) * 2 + 4096
    finally:
        for f in cache.glob("base-*"):  # 5 GB: not left in pytest's kept temp folders
            f.unlink()

