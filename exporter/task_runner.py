"""Score multiple-choice tasks (exporter/tasks.py) with one model, in a child process as
exporter/runner.py runs perplexity, so the model's memory is its own and a crash of llama.cpp
is reported, not inherited.

Per task the shared prefix of the choices is evaluated once. llama.cpp: as llama-perplexity
does, consecutive tasks share one batch, where a task's prefix tokens belong to every one of
its choices' sequences and each choice's own tokens to its own sequence (so the numbers are
llama-perplexity's; batching many tasks also keeps small models from spending their time
in thread synchronisation). PyTorch: the prefix with a KV cache, then each choice's tokens
from the cache cropped back to it.
Module-level imports are numpy only: the llama.cpp child never imports torch.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Iterator

import numpy as np

from moe2gguf import llama_runtime
from moe2gguf.errors import UserError
from moe2gguf.exporter import tasks as T
from moe2gguf.subproc import run_with_progress, say_ready, say_step

PARALLEL = 32  # sequences per llama.cpp batch, as `llama-perplexity -np 32` (context 32 x 512 tokens)
BATCH = 2048  # tokens per llama_decode call (llama-perplexity's n_batch)


def load_llama(path: str, **kw: object):  # noqa: ANN201 - llama_cpp.Llama, imported lazily
    """The one place this module loads a GGUF: through moe2gguf.llama_runtime, which the parent
    told (run_tasks_in_child) whether llama.cpp's extra buffer types run on this CPU."""
    return llama_runtime.open_llama(path, announce=False, verbose=False, **kw)


def _logprob(logits: np.ndarray, tok: int) -> float:
    x = logits.astype(np.float64)
    m = x.max()
    return float(x[tok] - m - np.log(np.exp(x - m).sum()))


def _row(p: T.Plan, s: int, pos: int) -> tuple[int, int]:
    """Where a request's logits come from: (-1, pos) in the shared prefix, else (s, pos)."""
    return (-1, pos) if pos < p.prefix else (s, pos)


def _score(fmt: str, items: list[T.Task], plans: list[T.Plan], rows: Iterator[tuple[int, dict]]) -> list[dict]:
    """Each task's outcome; `rows` yields, task after task, (i, logits of every _row its
    plan's requests read)."""
    out = []
    say_ready()
    for i, r in rows:
        t, p = items[i], plans[i]
        lp = [_logprob(r[_row(p, s, pos)], tok) for s, pos, tok in p.requests]
        out.append(T.choose(fmt, t, p, lp).to_json())
        say_step()
    return out


def score_llama(path: str, fmt: str, items: list[T.Task], kv_type: str, threads: int) -> list[dict]:
    """As `llama-perplexity -np PARALLEL` evaluates tasks: consecutive tasks packed into one
    batch (T.pack), each task's shared prefix once with the sequence ids of all its choices,
    each choice's own tokens in its own sequence; a unified KV cache cleared between
    batches, which are decoded BATCH tokens at a time."""
    import llama_cpp

    llm = load_llama(path, n_ctx=32, n_batch=32, n_ubatch=32, n_threads=threads, n_threads_batch=threads)

    def tokenize(s: str) -> list[int]:
        # common_tokenize(ctx, text, add_special = true): BOS/EOS as the model's metadata says
        return llm.tokenize(s.encode("utf-8"), add_bos=True, special=False)

    plans = [T.plan(fmt, t, [tokenize(s) for s in T.texts(fmt, t)]) for t in items]
    packs = T.pack(fmt, plans, PARALLEL, PARALLEL * 512)
    need = max(sum(plans[i].tokens for i in pk) for pk in packs)
    n_seq = max(sum(len(plans[i].seqs) for i in pk) for pk in packs)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = -(-need // 256) * 256
    params.n_batch, params.n_ubatch = min(BATCH, params.n_ctx), min(512, params.n_ctx)  # llama-perplexity's defaults
    params.n_seq_max, params.kv_unified = n_seq, True
    params.n_threads = params.n_threads_batch = threads
    params.type_k = params.type_v = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[kv_type]
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not make a context of {params.n_ctx} tokens for {n_seq} sequences")
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, n_seq)
    n_vocab = llm.n_vocab()

    def rows() -> Iterator[tuple[int, dict]]:
        for pk in packs:
            # (token, position, sequence ids, (task, row) when its logits are read)
            toks: list[tuple[int, int, range | tuple[int], tuple | None]] = []
            s0 = 0
            for i in pk:
                p = plans[i]
                want = {_row(p, s, pos) for s, pos, _ in p.requests}
                toks += [(p.seqs[0][j], j, range(s0, s0 + len(p.seqs)), (i, (-1, j)) if (-1, j) in want else None) for j in range(p.prefix)]
                for s, q in enumerate(p.seqs):
                    toks += [(q[j], j, (s0 + s,), (i, (s, j)) if (s, j) in want else None) for j in range(p.prefix, len(q))]
                s0 += len(p.seqs)
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            got: dict[int, dict] = {i: {} for i in pk}
            for c0 in range(0, len(toks), params.n_batch):
                chunk = toks[c0 : c0 + params.n_batch]
                for n, (tok, pos, seqs, key) in enumerate(chunk):
                    batch.token[n], batch.pos[n], batch.n_seq_id[n] = tok, pos, len(seqs)
                    for j, sid in enumerate(seqs):
                        batch.seq_id[n][j] = sid
                    batch.logits[n] = key is not None
                batch.n_tokens = len(chunk)
                rc = llama_cpp.llama_decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc} on a batch of {len(chunk)} tokens")
                for n, (*_, key) in enumerate(chunk):
                    if key is not None:
                        got[key[0]][key[1]] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, n), shape=(n_vocab,)).copy()
            yield from got.items()

    try:
        return _score(fmt, items, plans, rows())
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def score_torch(path: str, fmt: str, items: list[T.Task], threads: int) -> list[dict]:
    """The shared prefix once with a KV cache, then each choice's own tokens from it (the
    cache cropped back to the prefix between choices)."""
    import torch
    from transformers import AutoTokenizer

    from moe2gguf.modeling import load_model

    torch.set_num_threads(threads)
    model, _arch, _ckpt = load_model(path, torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 1 << 62
    plans = [T.plan(fmt, t, [list(tok(s, add_special_tokens=True)["input_ids"]) for s in T.texts(fmt, t)]) for t in items]

    @torch.no_grad()
    def logits_of(p: T.Plan) -> dict:
        want = {_row(p, s, pos) for s, pos, _ in p.requests}
        res = model(torch.tensor([p.seqs[0][: p.prefix]]), use_cache=True)
        cache = res.past_key_values
        rows = {(s, pos): res.logits[0, pos].float().numpy() for s, pos in want if s < 0}
        for s in sorted({s for s, _ in want if s >= 0}):
            extra = cache.get_seq_length() - p.prefix
            if extra > 0:
                cache.crop(-extra)  # back to the shared prefix (transformers 5: tokens to remove)
            r = model(torch.tensor([p.seqs[s][p.prefix :]]), past_key_values=cache, use_cache=True)
            rows.update({(c, pos): r.logits[0, pos - p.prefix].float().numpy() for c, pos in want if c == s})
        return rows

    return _score(fmt, items, plans, ((i, logits_of(p)) for i, p in enumerate(plans)))


def main(argv: list[str]) -> None:
    """python -m moe2gguf.exporter.task_runner BACKEND PATH DIR KV_TYPE THREADS (DIR/tasks.json in,
    DIR/result.json out)."""
    backend, path, d, kv_type, threads = argv
    try:
        job = json.loads((pathlib.Path(d) / "tasks.json").read_text())
        items = [T.Task.from_json(x) for x in job["tasks"]]
        if backend == "llama.cpp":
            res: dict = {"items": score_llama(path, job["format"], items, kv_type, int(threads))}
        else:
            res = {"items": score_torch(path, job["format"], items, int(threads))}
    except UserError as e:  # a bad task: the parent repeats the message as it is
        res = {"error": e.message, "user": True}
    except Exception as e:  # noqa: BLE001 - reported to the parent as one line
        res = {"error": f"{type(e).__name__}: {e}"}
    (pathlib.Path(d) / "result.json").write_text(json.dumps(res))


def run_tasks_in_child(backend: str, path: str, fmt: str, items: list[T.Task], kv_type: str = "f16", threads: int = 0, label: str = "tasks") -> list[T.Scored]:
    """Each task's outcome, from a fresh interpreter; a progress bar with ETA meanwhile."""
    threads = threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="moe2gguf-tasks-") as d:
        dp = pathlib.Path(d)
        (dp / "tasks.json").write_text(json.dumps({"format": fmt, "tasks": [t.to_json() for t in items]}))
        cmd = [sys.executable, "-m", "moe2gguf.exporter.task_runner", backend, path, d, kv_type, str(threads)]
        env, extra_bufts = llama_runtime.child_env(backend)
        rc, why = run_with_progress(cmd, len(items), label, "task", dp, env)
        res_file = dp / "result.json"
        if rc != 0 or not res_file.is_file():
            why = why or "it ended without a result"
            raise UserError(f"{backend} could not score {path}: {why}{llama_runtime.child_hint(rc, extra_bufts)}")
        res = json.loads(res_file.read_text())
    if "error" in res:
        raise UserError(res["error"] if res.get("user") else f"{backend} could not score {path}: {res['error']}")
    return [T.Scored(**x) for x in res["items"]]


if __name__ == "__main__":
    main(sys.argv[1:])
