"""`check`: both backends follow one protocol (PPL agrees within 0.1% between PyTorch and
llama.cpp on an F32 export), every DESIGN.md key is measured, the base is cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import one_error_line, tmpfs

from moe2gguf.cli import cli
from moe2gguf.exporter.check import check
from moe2gguf.exporter.export import export

KEYS = [
    "backend", "model", "text", "ctx", "chunks", "tokens_scored", "ppl", "ppl_se", "kld", "kld_se", "top1",
    "file_bytes", "params_experts", "model_buffer_bytes", "kv_cache_bytes", "peak_rss_bytes",
    "prompt_tokens_per_s", "decode_tokens_per_s",
]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MOE2GGUF_CACHE", str(d))
    return d


def test_ppl_agrees_between_torch_and_llama_cpp_tiny(tiny_qwen3moe, reference_model, tmp_path, cache):
    out = tmp_path / "tiny.gguf"
    export(str(tiny_qwen3moe), str(out), "F32", progress=False)
    text = str(reference_model / "eval.txt")
    jf = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["check", str(out), "--text", text, "--ctx", "64", "--chunks", "3", "--base", str(tiny_qwen3moe), "--json", str(jf)])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.output and "KL-divergence" in res.output
    g = json.loads(jf.read_text())
    assert all(k in g for k in KEYS), [k for k in KEYS if k not in g]
    assert g["backend"] == "llama.cpp" and g["tokens_scored"] == 3 * 32
    assert all(g[k] > 0 for k in ("file_bytes", "params_experts", "model_buffer_bytes", "kv_cache_bytes", "peak_rss_bytes", "prompt_tokens_per_s", "decode_tokens_per_s"))
    t = check(str(tiny_qwen3moe), text, ctx=64, chunks=3)
    assert t["backend"] == "torch"
    assert abs(g["ppl"] / t["ppl"] - 1) < 1e-3, (g["ppl"], t["ppl"])
    assert g["kld"] < 1e-3 and g["top1"] > 0.97
    assert g["params_experts"] == t["params_experts"]
    assert len(list(cache.glob("base-*.npz"))) == 1


def test_base_log_probs_are_cached(tiny_qwen3moe, reference_model, tmp_path, cache, monkeypatch):
    out = tmp_path / "tiny.gguf"
    export(str(tiny_qwen3moe), str(out), "F32", progress=False)
    text = str(reference_model / "eval.txt")
    first = check(str(out), text, base=str(out), ctx=64, chunks=2)
    import moe2gguf.exporter.check as chk

    calls = []
    real = chk.tokenize
    monkeypatch.setattr(chk, "tokenize", lambda *a: calls.append(a) or real(*a))
    second = check(str(out), text, base=str(out), ctx=64, chunks=2)
    assert len(calls) == 1  # only the model itself; the base came from the cache
    # against itself: the cached base is a uint16 grid (moe2gguf/logprobs.py), exact to its step
    assert second["kld"] == first["kld"] and abs(first["kld"]) < 1e-6 and first["top1"] == 1.0


def test_ppl_agrees_between_backends_bundled(reference_model, tmp_path, cache):
    out = tmp_path / "ref.gguf"
    export(str(reference_model), str(out), "F32", progress=False)
    text = str(reference_model / "eval.txt")
    g = check(str(out), text, chunks=2)
    t = check(str(reference_model), text, chunks=2)
    assert abs(g["ppl"] / t["ppl"] - 1) < 1e-3, (g["ppl"], t["ppl"])


@pytest.mark.parametrize("case", ["missing-model", "short-text"])
def test_check_bad_input_exits_2(tiny_qwen3moe, reference_model, tmp_path, cache, case):
    jf = tmp_path / "r.json"
    if case == "missing-model":
        args = ["check", str(tmp_path / "nope.gguf"), "--text", str(reference_model / "eval.txt")]
    else:
        (tmp_path / "short.txt").write_text("too short")
        args = ["check", str(tiny_qwen3moe), "--text", str(tmp_path / "short.txt")]
    res = CliRunner().invoke(cli, args + ["--json", str(jf)])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert not jf.exists()


def test_check_shows_a_window_progress_bar_for_the_model_and_its_base(tiny_qwen3moe, reference_model, tmp_path, cache, capsys):
    from moe2gguf.cli import main

    out = tmp_path / "tiny.gguf"
    export(str(tiny_qwen3moe), str(out), "F32", progress=False)
    main(["check", str(out), "--text", str(reference_model / "eval.txt"), "--ctx", "64", "--chunks", "3", "--base", str(out)])
    err = capsys.readouterr().err
    # tqdm's last state of each bar: every window counted, base first, then the model
    assert "base tiny.gguf" in err and "score tiny.gguf" in err
    assert err.count("3/3 [") >= 2, err[-600:]


def test_a_damaged_base_cache_entry_is_computed_again(tiny_qwen3moe, reference_model, tmp_path, cache):
    out = tmp_path / "tiny.gguf"
    export(str(tiny_qwen3moe), str(out), "F32", progress=False)
    text = str(reference_model / "eval.txt")
    first = check(str(out), text, base=str(out), ctx=64, chunks=2)
    (grid,) = cache.glob("base-*.npy")
    grid.write_bytes(b"not a grid")  # a kill or a full disk mid-write, or a stray file
    again = check(str(out), text, base=str(out), ctx=64, chunks=2)
    assert again["kld"] == first["kld"] and grid.stat().st_size > 100


def test_the_base_cache_stays_within_its_limit_least_recently_used_first(tiny_qwen3moe, reference_model, tmp_path, cache, monkeypatch):
    out = tmp_path / "tiny.gguf"
    export(str(tiny_qwen3moe), str(out), "F32", progress=False)
    text = str(reference_model / "eval.txt")
    check(str(out), text, base=str(out), ctx=64, chunks=2)
    (old_grid,) = cache.glob("base-*.npy")
    size = sum(f.stat().st_size for f in cache.glob("base-*"))
    stranger = cache / "notes.txt"  # not a cache entry: never touched
    stranger.write_text("mine")
    # room for one entry: the next base pushes the older one out, never the one in use
    monkeypatch.setenv("MOE2GGUF_CACHE_GB", str(1.5 * size / 2**30))
    check(str(out), text, base=str(out), ctx=64, chunks=3)
    assert not old_grid.exists()
    assert len(list(cache.glob("base-*.npy"))) == 1 and stranger.read_text() == "mine"
    # limit 0 keeps just the entry in use
    monkeypatch.setenv("MOE2GGUF_CACHE_GB", "0")
    r = check(str(out), text, base=str(out), ctx=64, chunks=2)
    assert len(list(cache.glob("base-*.npy"))) == 1 and r["kld"] < 1e-6


def test_a_bad_cache_limit_is_one_line_before_any_work(tiny_qwen3moe, reference_model, tmp_path, cache, monkeypatch):
    out = tmp_path / "tiny.gguf"
    export(str(tiny_qwen3moe), str(out), "F32", progress=False)
    monkeypatch.setenv("MOE2GGUF_CACHE_GB", "lots")
    res = CliRunner().invoke(cli, ["check", str(out), "--text", str(reference_model / "eval.txt"), "--base", str(out)])
    assert res.exit_code == 2 and "MOE2GGUF_CACHE_GB" in res.output and "Traceback" not in res.output, res.output
    assert not list(cache.glob("base-*"))


def test_a_cache_folder_without_room_for_the_base_is_one_line_naming_it(tiny_qwen3moe, reference_model, tmp_path):
    """The base's grid (8 windows x 64 positions x 4,100 uint16: 4.2 MB) does not fit a 1 MB
    cache disk: said as the disk it is, with the fix, and nothing is left in the cache."""
    out = tmp_path / "tiny.gguf"
    export(str(tiny_qwen3moe), str(out), "F32", progress=False)
    with tmpfs(tmp_path / "small", "1m") as small:
        cmd = [sys.executable, "-m", "moe2gguf.cli", "check", str(out), "--text", str(reference_model / "eval.txt"),
               "--ctx", "128", "--chunks", "8", "--base", str(out), "--json", str(tmp_path / "r.json")]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "MOE2GGUF_CACHE": str(small / "cache")}, timeout=600)
        assert r.returncode == 2 and one_error_line(r.stderr), r.stderr[-1500:]
        assert "disk full" in r.stderr and str(small / "cache") in r.stderr and "MOE2GGUF_CACHE" in r.stderr, r.stderr[-600:]
        left = [p.name for p in (small / "cache").iterdir() if p.name.startswith("base-") or "moe2gguf-" in p.name or p.name.endswith(".partial")]
        assert left == [] and not (tmp_path / "r.json").exists()


def test_a_model_against_itself_never_shows_negative_zero_kld():
    from moe2gguf.exporter.check import table

    shown = table({"backend": "gguf", "model": "m", "kld": -3e-9, "kld_se": 1e-9, "top1": 1.0, "file_bytes": 1, "params_experts": 1})
    assert "0.000000 ±" in shown and "-0.000000" not in shown


def test_device_runs_the_pytorch_path_and_is_refused_where_it_cannot(tiny_qwen3moe, reference_model, tmp_path, cache, monkeypatch):
    """--device cpu scores a model folder as the default does; --device cuda is one line (exit 2)
    where torch sees no GPU (forced, so a GPU machine runs this too) and for a GGUF alone,
    which llama.cpp runs on the CPU."""
    import torch

    text = str(reference_model / "eval.txt")
    auto = check(str(tiny_qwen3moe), text, ctx=64, chunks=2)
    on_cpu = check(str(tiny_qwen3moe), text, ctx=64, chunks=2, device="cpu")
    assert on_cpu["backend"] == "torch" and on_cpu["ppl"] == pytest.approx(auto["ppl"], rel=1e-6)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gguf = tmp_path / "tiny.gguf"
    export(str(tiny_qwen3moe), str(gguf), "F32", progress=False)
    for model, words in ((tiny_qwen3moe, "--device cpu"), (gguf, "drop --device")):
        jf = tmp_path / "r.json"
        res = CliRunner().invoke(cli, ["check", str(model), "--text", text, "--ctx", "64", "--chunks", "2", "--device", "cuda", "--json", str(jf)])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and "--device cuda" in lines[0] and words in lines[0], res.output
        assert not jf.exists()
