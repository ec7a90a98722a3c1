"""Run one model over token windows, in a child process, so that its peak RSS is the
model's own. Module-level imports are numpy only: the llama.cpp child never imports torch.

Each backend writes `logprobs.npy` ([n_windows * ctx/2, V] float32, the scored positions)
and returns the measured numbers as a dict.
"""

from __future__ import annotations

import pathlib
import resource
import sys
import time

import numpy as np

DECODE_TOKENS = 32


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))).astype(np.float32)


def _peak_rss() -> int:
    """Peak RSS of this process's own address space. Linux carries getrusage's ru_maxrss over
    execve from the forking parent, so a child started by a big parent would report the
    parent's peak; VmHWM belongs to the new address space alone."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def run_llama(gguf_path: str, wins: np.ndarray, out_dir: str, kv_type: str, threads: int) -> dict:
    import llama_cpp

    from moe2gguf.llama_runtime import extra_bufts_in_use, open_llama

    ctx = wins.shape[1]
    half = ctx // 2
    kv = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[kv_type]
    # the parent decided (and said) whether extra buffer types run here; see run_in_child
    llm = open_llama(
        gguf_path, announce=False, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False,
        n_threads=threads, n_threads_batch=threads, type_k=kv, type_v=kv,
    )
    n_vocab = llm.n_vocab()
    out = np.lib.format.open_memmap(pathlib.Path(out_dir) / "logprobs.npy", "w+", np.float32, (len(wins) * half, n_vocab))
    t_eval = 0.0
    kv_bytes = 0
    for i, w in enumerate(wins):
        llm.reset()  # next eval drops the previous window's KV cells
        t0 = time.perf_counter()
        llm.eval(w.tolist())
        t_eval += time.perf_counter() - t0
        if i == 0:
            # KV cells of one full window, as llama.cpp serialises them
            kv_bytes = int(llama_cpp.llama_state_seq_get_size(llm.ctx, 0))
        logits = np.asarray(llm.scores[half - 1 : ctx - 1])
        out[i * half : (i + 1) * half] = _log_softmax(logits)
    out.flush()
    # greedy decode after half a window of prompt
    llm.reset()
    llm.eval(wins[0, :half].tolist())
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(DECODE_TOKENS):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t_dec = time.perf_counter() - t0
    return {
        "model_buffer_bytes": int(llama_cpp.llama_model_size(llm.model)),
        "kv_cache_bytes": kv_bytes,
        "prompt_tokens_per_s": wins.size / t_eval,
        "decode_tokens_per_s": DECODE_TOKENS / t_dec,
        "peak_rss_bytes": _peak_rss(),
        "llama_extra_bufts": extra_bufts_in_use(llm),
    }


def run_torch(model_dir: str, wins: np.ndarray, out_dir: str, threads: int) -> dict:
    import torch

    from moe2gguf.modeling import load_model
    from moe2gguf.protocol import scored

    torch.set_num_threads(threads)
    model, _arch, _ckpt = load_model(model_dir, torch.float32)
    ctx = wins.shape[1]
    half = ctx // 2
    seen: set[int] = set()
    buf = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            buf += t.numel() * t.element_size()
    first = True
    out = None
    t_eval = 0.0
    kv_bytes = 0
    with torch.no_grad():
        for i, w in enumerate(wins):
            ids = torch.from_numpy(np.ascontiguousarray(w))[None]
            t0 = time.perf_counter()
            res = model(ids, use_cache=True)
            t_eval += time.perf_counter() - t0
            lp = torch.log_softmax(res.logits[0, scored(ctx)].float(), -1).numpy()
            if first:
                out = np.lib.format.open_memmap(pathlib.Path(out_dir) / "logprobs.npy", "w+", np.float32, (len(wins) * half, lp.shape[-1]))
                kv_bytes = _cache_bytes(res.past_key_values)
                first = False
            out[i * half : (i + 1) * half] = lp
            del res
        out.flush()
        ids = torch.from_numpy(np.ascontiguousarray(wins[0, :half]))[None]
        res = model(ids, use_cache=True)
        cache = res.past_key_values
        tok = res.logits[0, -1].argmax().view(1, 1)
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            res = model(tok, past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            tok = res.logits[0, -1].argmax().view(1, 1)
        t_dec = time.perf_counter() - t0
    return {
        "model_buffer_bytes": buf,
        "kv_cache_bytes": kv_bytes,
        "prompt_tokens_per_s": wins.size / t_eval,
        "decode_tokens_per_s": DECODE_TOKENS / t_dec,
        "peak_rss_bytes": _peak_rss(),
    }


def _cache_bytes(cache) -> int:  # noqa: ANN001 - transformers Cache
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
    return total


def main(argv: list[str]) -> None:
    """python -m moe2gguf.exporter.runner BACKEND PATH OUT_DIR KV_TYPE THREADS (windows in OUT_DIR)."""
    import json

    backend, path, out_dir, kv_type, threads = argv
    wins = np.load(pathlib.Path(out_dir) / "windows.npy")
    try:
        if backend == "llama.cpp":
            res = run_llama(path, wins, out_dir, kv_type, int(threads))
        else:
            res = run_torch(path, wins, out_dir, int(threads))
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        res = {"error": f"{type(e).__name__}: {e}"}
    (pathlib.Path(out_dir) / "result.json").write_text(json.dumps(res))


def child_command(backend: str, path: str, out_dir: str, kv_type: str, threads: int) -> list[str]:
    return [sys.executable, "-m", "moe2gguf.exporter.runner", backend, path, out_dir, kv_type, str(threads)]


def run_in_child(backend: str, path: str, wins: np.ndarray, out_dir: str, kv_type: str = "f16", threads: int = 0) -> tuple[np.ndarray, dict]:
    """(logprobs [n*ctx/2, V] memory-mapped, measurements) from a fresh interpreter, so
    nothing the parent imported (torch for a GGUF run) counts in the model's peak RSS."""
    import json
    import os
    import signal
    import subprocess

    from moe2gguf.errors import UserError
    from moe2gguf.subproc import failure

    threads = threads or os.cpu_count() or 1
    np.save(pathlib.Path(out_dir) / "windows.npy", wins)
    env = None
    extra_bufts = False
    if backend == "llama.cpp":
        from moe2gguf import llama_runtime

        # decided (probed, announced) here, where stderr reaches the user; the child obeys
        extra_bufts = llama_runtime.extra_bufts_verdict().extra_bufts
        env = {**os.environ, llama_runtime.ENV: "1" if extra_bufts else "0"}
    cmd = child_command(backend, path, out_dir, kv_type, threads)
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    res_file = pathlib.Path(out_dir) / "result.json"
    if proc.returncode != 0 or not res_file.is_file():
        why = failure(proc) if proc.returncode != 0 else "it ended without a result"
        hint = ""
        if extra_bufts and proc.returncode == -signal.SIGILL:
            hint = f"; if this CPU cannot run llama.cpp's AMX/repacked kernels, run again with {llama_runtime.ENV}=0"
        raise UserError(f"{backend} could not run {path}: {why}{hint}")
    res = json.loads(res_file.read_text())
    if "error" in res:
        raise UserError(f"{backend} could not run {path}: {res['error']}")
    return np.load(pathlib.Path(out_dir) / "logprobs.npy", mmap_mode="r"), res


if __name__ == "__main__":
    main(sys.argv[1:])
