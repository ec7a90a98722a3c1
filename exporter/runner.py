"""Run one model over token windows, in a child process, so that its peak RSS is the
model's own. Module-level imports are numpy only: the llama.cpp child never imports torch.

The child scores each window as it goes (moe2gguf/logprobs.py): it writes each scored
position's NLL, and against a base's log-prob grid file its KLD and top-1 match, to
`scores.npz`; asked to, it also writes its own grid file, to be a base later. No more than
one window of log-probabilities is ever held, so memory does not grow with the windows.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import sys
import time

import numpy as np

from moe2gguf import llama_runtime
from moe2gguf.errors import UserError
from moe2gguf.logprobs import HEADER, GridFile, NoRoom, Scores, score_window
from moe2gguf.subproc import run_with_progress, say_ready, say_step

DECODE_TOKENS = 32
JOB = "job.json"
WINDOWS = "windows.npy"
RESULT = "result.json"
SCORES = "scores.npz"


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


class Scorer:
    """Scores windows one at a time against the base's grid file (if any) and writes this
    model's own grid file (if asked), reading and writing one window's rows at a time."""

    def __init__(self, wins: np.ndarray, base_lp: str | None, save_lp: str | None):
        self.half = wins.shape[1] // 2
        self.targets = wins[:, self.half :]
        self.base = GridFile(base_lp, "r") if base_lp else None
        if self.base is not None and self.base.shape[0] != wins.size // 2:
            raise ValueError(f"the base's grid holds {self.base.shape[0]} positions, not {wins.size // 2}; run check again")
        self.save_lp = save_lp
        self.save: GridFile | None = None
        self.parts: list[Scores] = []

    def add(self, i: int, logits: np.ndarray) -> None:
        base_rows = None
        if self.base is not None:
            if self.base.shape[1] != HEADER + logits.shape[1]:
                raise ValueError(f"vocabulary {logits.shape[1]} vs the base's {self.base.shape[1] - HEADER}; compare models of one family")
            base_rows = self.base.read(i * self.half, self.half)
        if self.save_lp and self.save is None:
            self.save = GridFile(self.save_lp, "w", (len(self.targets) * self.half, HEADER + logits.shape[1]))
        s, rows = score_window(logits, self.targets[i], base_rows, grid=self.save is not None)
        if self.save is not None:
            self.save.write(rows)
        self.parts.append(s)

    def finish(self, out_dir: pathlib.Path) -> None:
        for f in (self.save, self.base):
            if f is not None:
                f.close()
        s = Scores.concat(self.parts)
        extra = {} if s.kld is None else {"kld": s.kld, "top1": s.top1}
        np.savez(out_dir / SCORES, nll=s.nll, **extra)


def run_llama(gguf_path: str, wins: np.ndarray, scorer: Scorer, kv_type: str, threads: int) -> dict:
    import llama_cpp

    ctx = wins.shape[1]
    half = ctx // 2
    kv = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[kv_type]
    # the parent decided (and said) whether extra buffer types run here; see run_in_child
    llm = llama_runtime.open_llama(
        gguf_path, announce=False, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False,
        n_threads=threads, n_threads_batch=threads, type_k=kv, type_v=kv,
    )
    t_eval = 0.0
    kv_bytes = 0
    say_ready()
    for i, w in enumerate(wins):
        llm.reset()  # next eval drops the previous window's KV cells
        t0 = time.perf_counter()
        llm.eval(w.tolist())
        t_eval += time.perf_counter() - t0
        if i == 0:
            # KV cells of one full window, as llama.cpp serialises them
            kv_bytes = int(llama_cpp.llama_state_seq_get_size(llm.ctx, 0))
        scorer.add(i, llm.scores[half - 1 : ctx - 1])
        say_step()
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
        "llama_extra_bufts": llama_runtime.extra_bufts_in_use(llm),
    }


def run_torch(model_dir: str, wins: np.ndarray, scorer: Scorer, threads: int, device: str = "cpu") -> dict:
    import torch

    from moe2gguf.modeling import load_model
    from moe2gguf.protocol import scored

    torch.set_num_threads(threads)
    dev = torch.device(device)  # resolved (and refused where torch sees no such device) by the parent
    model, _arch, _ckpt = load_model(model_dir, torch.float32)
    model.to(dev)
    ctx = wins.shape[1]
    half = ctx // 2
    seen: set[int] = set()
    buf = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            buf += t.numel() * t.element_size()
    t_eval = 0.0
    kv_bytes = 0
    say_ready()
    with torch.no_grad():
        for i, w in enumerate(wins):
            ids = torch.from_numpy(np.ascontiguousarray(w))[None].to(dev)
            t0 = time.perf_counter()
            res = model(ids, use_cache=True)
            logits = res.logits[0, scored(ctx)].float().cpu()  # waits for the device: timed with the pass
            t_eval += time.perf_counter() - t0
            if i == 0:
                kv_bytes = _cache_bytes(res.past_key_values)
            scorer.add(i, logits.numpy())
            say_step()
            del res
        ids = torch.from_numpy(np.ascontiguousarray(wins[0, :half]))[None].to(dev)
        res = model(ids, use_cache=True)
        cache = res.past_key_values
        tok = res.logits[0, -1].argmax().view(1, 1)
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            res = model(tok, past_key_values=cache, use_cache=True)
            cache = res.past_key_values
            tok = res.logits[0, -1].argmax().view(1, 1)
        tok.cpu()  # waits for the device
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
    """python -m moe2gguf.exporter.runner OUT_DIR (the job and its windows in OUT_DIR)."""
    out_dir = pathlib.Path(argv[0])
    job = json.loads((out_dir / JOB).read_text())
    wins = np.load(out_dir / WINDOWS)
    try:
        scorer = Scorer(wins, job["base_lp"], job["save_lp"])
        if job["backend"] == "llama.cpp":
            res = run_llama(job["path"], wins, scorer, job["kv_type"], job["threads"])
        else:
            res = run_torch(job["path"], wins, scorer, job["threads"], job.get("device", "cpu"))
        scorer.finish(out_dir)
    except NoRoom as e:
        res = {"error": str(e), "no_room": True}
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        res = {"error": f"{type(e).__name__}: {e}"}
    (out_dir / RESULT).write_text(json.dumps(res))


def child_command(out_dir: str) -> list[str]:
    return [sys.executable, "-m", "moe2gguf.exporter.runner", out_dir]


def run_in_child(
    backend: str, path: str, wins: np.ndarray, out_dir: str, kv_type: str = "f16", threads: int = 0,
    base_lp: str | None = None, save_lp: str | None = None, label: str = "score", device: str = "cpu",
) -> tuple[Scores, dict]:
    """(per-position scores, measurements) from a fresh interpreter, so nothing the parent
    imported (torch for a GGUF run) counts in the model's peak RSS. Against the grid file
    `base_lp` the scores hold KLD and top-1; `save_lp` receives this model's own grid."""
    d = pathlib.Path(out_dir)
    threads = threads or os.cpu_count() or 1
    np.save(d / WINDOWS, wins)
    job = {"backend": backend, "path": path, "kv_type": kv_type, "threads": threads, "base_lp": base_lp, "save_lp": save_lp, "device": device}
    (d / JOB).write_text(json.dumps(job))
    env, extra_bufts = llama_runtime.child_env(backend)
    rc, why = run_with_progress(child_command(out_dir), len(wins), f"{label} {pathlib.Path(path).name}", "window", d, env)
    res_file = d / RESULT
    if rc != 0 or not res_file.is_file():
        why = why or "it ended without a result"
        raise UserError(f"{backend} could not run {path}: {why}{llama_runtime.child_hint(rc, extra_bufts)}")
    res = json.loads(res_file.read_text())
    if res.get("no_room"):
        raise UserError(f"{res['error']}; free space there, or set MOE2GGUF_CACHE to a folder with room")
    if "error" in res:
        raise UserError(f"{backend} could not run {path}: {res['error']}")
    with np.load(d / SCORES) as z:
        scores = Scores(z["nll"], z["kld"] if "kld" in z else None, z["top1"] if "top1" in z else None)
    return scores, res


if __name__ == "__main__":
    main(sys.argv[1:])
