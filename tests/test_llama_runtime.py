"""llama.cpp on any CPU: the fallback without extra buffer types (AMX/repacked weights) runs a
quantized GGUF end to end and says so; a probe that dies by SIGILL leads to the fallback and is
cached per machine; a child killed by a signal is reported by the signal's name, exit code 2.

The fallback is forced (MOE2GGUF_EXTRA_BUFTS=0, or a probe child that kills itself with
MOE2GGUF_PROBE_SIGNAL), so every path runs on every machine, AMX or not."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from moe2gguf import llama_runtime as rt
from moe2gguf.cli import main
from moe2gguf.exporter import runner
from moe2gguf.exporter.export import export
from moe2gguf.subproc import exit_reason

REPO = pathlib.Path(__file__).resolve().parent.parent
EVAL = REPO / "moe2gguf" / "data" / "reference-moe" / "eval.txt"


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory) -> pathlib.Path:
    """A tiny Qwen3-MoE at Q4_0: rows of 64 are repacked by llama.cpp on AVX2/NEON machines."""
    import torch
    from transformers import Qwen3MoeForCausalLM

    from conftest import save_tiny, tiny_qwen3moe_config

    d = tmp_path_factory.mktemp("q4")
    torch.manual_seed(0)
    model = save_tiny(Qwen3MoeForCausalLM(tiny_qwen3moe_config()), d / "model")
    out = d / "tiny-q4_0.gguf"
    export(str(model), str(out), "Q4_0", progress=False)
    return out


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict:
    """A private cache folder; no override, no probe hook, no verdict remembered in-process."""
    monkeypatch.setenv("MOE2GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(rt.ENV, raising=False)
    monkeypatch.delenv(rt.PROBE_SIGNAL_ENV, raising=False)
    rt._decide.cache_clear()
    rt._announced.clear()
    yield os.environ
    rt._decide.cache_clear()


def check_cli(gguf: pathlib.Path, out_json: pathlib.Path, monkeypatch, capsys, **env: str) -> str:
    """`moe2gguf check` as a new process would run it (nothing remembered in-process); its stderr.
    In-process, so torch is imported once; the model still runs in check's child process."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rt._decide.cache_clear()
    rt._announced.clear()
    capsys.readouterr()
    main(["check", str(gguf), "--text", str(EVAL), "--ctx", "64", "--chunks", "2", "--json", str(out_json)])
    for k in env:
        monkeypatch.delenv(k)
    return capsys.readouterr().err


def notes(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("note:")]


def test_exit_reason_names_the_signal_never_a_negative_code():
    assert exit_reason(-signal.SIGILL) == "killed by SIGILL (illegal instruction)"
    assert exit_reason(-signal.SIGKILL).startswith("killed by SIGKILL")
    assert exit_reason(-signal.SIGSEGV).startswith("killed by SIGSEGV (segmentation fault")
    assert exit_reason(3) == "exit code 3"


def test_forced_fallback_runs_a_quantized_gguf_and_the_report_says_so(q4_gguf, tmp_path, env, monkeypatch, capsys):
    err = check_cli(q4_gguf, tmp_path / "off.json", monkeypatch, capsys, **{rt.ENV: "0"})
    assert notes(err) == [rt.FORCED_NOTE]  # one line, once, though the model is loaded in a child
    off = json.loads((tmp_path / "off.json").read_text())
    assert off["backend"] == "llama.cpp" and off["llama_extra_bufts"] is False
    assert off["tokens_scored"] == 2 * 32 and 1 < off["ppl"] < 1e5 and off["decode_tokens_per_s"] > 0

    err = check_cli(q4_gguf, tmp_path / "on.json", monkeypatch, capsys, **{rt.ENV: "1"})
    assert notes(err) == []
    on = json.loads((tmp_path / "on.json").read_text())
    assert on["llama_extra_bufts"] is True
    # repacked or not, llama.cpp computes the same quantized products (summed in another order)
    assert abs(off["ppl"] / on["ppl"] - 1) < 1e-3, (off["ppl"], on["ppl"])
    assert not (tmp_path / "cache" / rt.CACHE_FILE).exists()  # forced: nothing probed, nothing cached


LOAD_LOGGED = """
import sys
from moe2gguf.llama_runtime import open_llama
llm = open_llama(sys.argv[1], n_ctx=32, verbose=True)
llm.eval([1, 2, 3])
"""


def test_fallback_keeps_weights_out_of_extra_buffers(q4_gguf, env):
    """llama.cpp's own load log: with the fallback no weight lands in a repacked/AMX buffer; with
    extra buffer types on an x86 AVX2 machine (this CI) they do, so the flag really reaches it."""
    logs = {}
    for v in ("0", "1"):
        r = subprocess.run([sys.executable, "-c", LOAD_LOGGED, str(q4_gguf)], capture_output=True, text=True, env={**os.environ, rt.ENV: v}, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        logs[v] = [ln for ln in r.stderr.splitlines() if "model buffer size" in ln]
    extra = ("CPU_REPACK", "AMX")
    assert logs["0"] and not any(b in ln for ln in logs["0"] for b in extra), logs["0"]
    if " avx2 " in f" {rt.cpu_flags()} ":
        assert any(b in ln for ln in logs["1"] for b in extra), logs["1"]


def test_probe_killed_by_sigill_leads_to_the_fallback_and_is_cached(q4_gguf, tmp_path, env, monkeypatch, capsys):
    err = check_cli(q4_gguf, tmp_path / "a.json", monkeypatch, capsys, **{rt.PROBE_SIGNAL_ENV: "SIGILL"})
    assert notes(err) == [rt.FALLBACK_NOTE.format(why="killed by SIGILL (illegal instruction)")]
    assert json.loads((tmp_path / "a.json").read_text())["llama_extra_bufts"] is False
    cached = json.loads((tmp_path / "cache" / rt.CACHE_FILE).read_text())
    assert [(e["extra_bufts"], e["detail"]) for e in cached.values()] == [(False, "killed by SIGILL (illegal instruction)")]

    assert not list((tmp_path / "cache").glob(".*.partial"))

    # the next process on this machine does not probe: the cached verdict holds (and is said)
    # though a probe would now kill itself with another signal
    monkeypatch.setenv(rt.PROBE_SIGNAL_ENV, "SIGSEGV")
    rt._decide.cache_clear()
    rt._announced.clear()
    assert rt.extra_bufts_verdict() == rt.Verdict(False, "cache", "killed by SIGILL (illegal instruction)")
    assert notes(capsys.readouterr().err) == [rt.FALLBACK_NOTE.format(why="killed by SIGILL (illegal instruction)")]


def test_verdict_is_keyed_by_build_and_cpu(env, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(rt, "probe", lambda: calls.append(1) or (len(calls) == 2, "probed"))
    key_a = rt.machine_key()
    assert rt.extra_bufts_verdict(announce=False) == rt.Verdict(False, "probe", "probed")
    rt._decide.cache_clear()  # a new process: the file answers
    assert rt.extra_bufts_verdict(announce=False) == rt.Verdict(False, "cache", "probed")
    assert len(calls) == 1

    monkeypatch.setattr(rt, "cpu_flags", lambda: "fpu sse2 avx2 amx_tile amx_int8")  # another CPU
    assert rt.machine_key() != key_a
    assert rt.extra_bufts_verdict(announce=False) == rt.Verdict(True, "probe", "probed")
    monkeypatch.setattr(rt, "llama_build", lambda: "0.3.99 another-build")  # another llama.cpp build
    rt.extra_bufts_verdict(announce=False)
    assert len(calls) == 3
    cached = json.loads((tmp_path / "cache" / rt.CACHE_FILE).read_text())
    assert sorted(e["extra_bufts"] for e in cached.values()) == [False, False, True]


def test_probe_without_a_verdict_keeps_defaults_and_caches_nothing(env, monkeypatch, tmp_path):
    monkeypatch.setattr(rt, "probe", lambda: (None, "probe could not build its model: OSError: disk full"))
    assert rt.extra_bufts_verdict().extra_bufts is True
    assert not (tmp_path / "cache" / rt.CACHE_FILE).exists()


def test_unwritable_cache_never_fails_the_command(env, monkeypatch, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("MOE2GGUF_CACHE", str(tmp_path / "file" / "cache"))  # mkdir fails, even as root
    monkeypatch.setattr(rt, "probe", lambda: (False, "killed by SIGILL (illegal instruction)"))
    assert rt.extra_bufts_verdict().extra_bufts is False
    assert rt.extra_bufts_verdict().extra_bufts is False  # remembered in-process, announced once
    assert capsys.readouterr().err.count("note:") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_real_probe_gives_a_verdict_on_this_machine():
    """The probe builds its model and decodes; it lives here, or dies by a signal on a CPU that
    cannot run llama.cpp's extra buffer types. Either is a verdict; no verdict is a bug."""
    ok, detail = rt.probe()
    assert ok is True and detail == "ok" or ok is False and detail.startswith("killed by SIG"), (ok, detail)


def test_bad_override_is_one_line_exit_2(q4_gguf, env, monkeypatch, capsys):
    monkeypatch.setenv(rt.ENV, "yes")
    with pytest.raises(SystemExit) as e:
        main(["check", str(q4_gguf), "--text", str(EVAL), "--ctx", "64", "--chunks", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and rt.ENV in err[0] and "0, 1 or auto" in err[0]


@pytest.mark.parametrize("sig", [signal.SIGILL, signal.SIGKILL])
def test_child_killed_by_a_signal_is_named_exit_2(q4_gguf, env, monkeypatch, capsys, sig):
    die = f"import os, signal; os.kill(os.getpid(), signal.{sig.name})"
    monkeypatch.setattr(runner, "child_command", lambda *a: [sys.executable, "-c", die])
    monkeypatch.setenv(rt.ENV, "1")
    with pytest.raises(SystemExit) as e:
        main(["check", str(q4_gguf), "--text", str(EVAL), "--ctx", "64", "--chunks", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    # the raw return code (-4, -9) must not be what the user reads; the temp path may hold digits
    assert f"killed by {sig.name} ({signal.strsignal(sig).lower()})" in err[0]
    assert f"exit code -{int(sig)}" not in err[0] and f": -{int(sig)}" not in err[0]
    # only a SIGILL with extra buffer types on points at the override
    assert (f"{rt.ENV}=0" in err[0]) == (sig == signal.SIGILL)
