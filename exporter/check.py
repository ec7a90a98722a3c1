"""`moe2gguf check`: perplexity, KL-divergence and top-1 agreement against a base, memory
and speed, for a GGUF (llama-cpp-python) or a checkpoint folder (PyTorch).

Both backends follow moe2gguf.protocol (the llama-perplexity protocol), and run in a child
process so peak RSS is the model's; neither holds more than one window of log-probabilities
(moe2gguf/logprobs.py). A base's log-probabilities are computed once and cached as a uint16
grid, as llama-perplexity's --kl-divergence-base file keeps them (key: base path + mtime +
text hash + ctx + chunks + KV type).

The checkpoint stack (torch) and llama.cpp are imported where a backend needs them: a GGUF
check never loads torch, a checkpoint check never loads llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import tempfile
import zipfile

import click
import gguf
import numpy as np

from moe2gguf import llama_runtime
from moe2gguf.errors import UserError, atomic_file, check_output
from moe2gguf.exporter import tasks as T
from moe2gguf.exporter.runner import run_in_child
from moe2gguf.exporter.task_runner import run_tasks_in_child
from moe2gguf.gguf_names import EXPERT_TENSORS, KV_EXPERT_WIDTHS
from moe2gguf.inputs import hf_tokenizer, read_text, regular_file, require_gguf
from moe2gguf.protocol import windows
from moe2gguf.units import human_bytes



def backend_of(path: str | pathlib.Path) -> str:
    p = pathlib.Path(path)
    if p.is_dir():
        from moe2gguf.checkpoint import Checkpoint

        Checkpoint(p)  # config and weights checked before a tokenizer or a child reads them
        return "torch"
    regular_file(p, "model", "pass a .gguf file or a Hugging Face model folder")
    with open(p, "rb") as f:
        if f.read(4) == b"GGUF":
            require_gguf(p)
            return "llama.cpp"
    raise UserError(f"{p} is neither a GGUF file nor a checkpoint folder; pass a .gguf or a Hugging Face model folder")


def tokenize(path: str, backend: str, text: str) -> list[int]:
    """The model's own tokenizer: llama.cpp's for a GGUF, the HF one for a checkpoint."""
    if backend == "llama.cpp":
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # its default (True) suppresses nothing
            llm = llama_runtime.open_llama(path, vocab_only=True, verbose=False)
        # BOS only if the model asks for it, as llama-perplexity does
        return llm.tokenize(text.encode("utf-8"), add_bos=llm._model.add_bos_token(), special=False)
    tok = hf_tokenizer(path)  # the whole text is tokenized once, then windowed
    return list(tok(text, add_special_tokens=True)["input_ids"])


def _mtime(p: pathlib.Path) -> float:
    if p.is_dir():
        return max((f.stat().st_mtime for f in p.iterdir() if f.is_file()), default=p.stat().st_mtime)
    return p.stat().st_mtime


def cache_dir() -> pathlib.Path:
    d = llama_runtime.cache_folder()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file or a device at that path, a read-only home, ...
        raise UserError(f"cannot use the cache folder {d} ({e.strerror}); set MOE2GGUF_CACHE to a folder you can write") from None
    return d


# what reading a cache entry raises when it is missing, truncated or not ours
DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


CACHE_LIMIT_ENV = "MOE2GGUF_CACHE_GB"
CACHE_LIMIT_GB = 20.0  # a Qwen3-scale base grid is ~5 GB: room for a few (base, text, ctx) sets


def cache_limit_bytes() -> int:
    raw = os.environ.get(CACHE_LIMIT_ENV)
    try:
        gb = CACHE_LIMIT_GB if raw is None else float(raw)
    except ValueError:
        gb = math.nan
    if not math.isfinite(gb) or gb < 0:
        raise UserError(f"{CACHE_LIMIT_ENV}={raw!r} is not a size in GB; set it to a number such as 20, or unset it")
    return int(gb * 2**30)


def evict(folder: pathlib.Path, limit: int, keep: tuple[pathlib.Path, ...]) -> list[pathlib.Path]:
    """Remove the least recently used base entries (a grid and its windows, or task results go
    together) until the folder's base entries fit in `limit` bytes; `keep` (the entry in use)
    stays whatever its size. Only files named as this module names them are touched. Returns
    what was removed."""
    entries: dict[str, list[pathlib.Path]] = {}
    for f in folder.glob("base-*.np[yz]"):
        if f.is_file() and not f.is_symlink():
            entries.setdefault(f.stem, []).append(f)
    kept = {k.stem for k in keep}

    def used(files: list[pathlib.Path]) -> float:
        return max(f.stat().st_mtime for f in files)

    total = sum(f.stat().st_size for files in entries.values() for f in files)
    removed = []
    for stem, files in sorted(entries.items(), key=lambda kv: used(kv[1])):
        if total <= limit:
            break
        if stem in kept:
            continue
        for f in files:
            total -= f.stat().st_size
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def _touch(*entries: pathlib.Path) -> None:
    """Mark entries as just used (eviction goes by modification time: atime is often off)."""
    for f in entries:
        try:
            os.utime(f)
        except OSError:
            pass  # a read-only cache still serves hits


def _drop(*entries: pathlib.Path) -> None:
    """Remove damaged cache entries (our names, in our cache folder), so they are rewritten
    rather than refused as someone else's file."""
    for f in entries:
        f.unlink(missing_ok=True)


def base_grid(base: str, text: str, ctx: int, chunks: int | None, kv_type: str, threads: int, device: str = "cpu") -> tuple[np.ndarray, pathlib.Path]:
    """(windows, the base's log-prob grid file; moe2gguf/logprobs.py), from the cache or
    computed once. Two files: the grid, then the windows, which say the grid is whole."""
    p = pathlib.Path(base).resolve()
    backend = backend_of(p)
    limit = cache_limit_bytes()  # a bad setting is refused before the base runs
    key = hashlib.sha256(
        json.dumps([str(p), _mtime(p), hashlib.sha256(text.encode()).hexdigest(), ctx, chunks, kv_type]
                   + ([device] if backend == "torch" and device != "cpu" else [])).encode()  # a device rounds its own way
    ).hexdigest()[:24]
    grid, wins_f = cache_dir() / f"base-{key}.npy", cache_dir() / f"base-{key}.npz"
    try:
        with np.load(wins_f) as z:
            wins = z["windows"]
        rows = np.load(grid, mmap_mode="r").shape[0]
        if rows == wins.size // 2 and grid.stat().st_mtime <= wins_f.stat().st_mtime:
            _touch(grid, wins_f)  # the grid first: it must stay no newer than the windows
            return wins, grid
    except DAMAGED:
        pass  # missing or damaged (a full disk, a kill): computed again
    _drop(grid, wins_f)
    wins = windows(tokenize(str(p), backend, text), ctx, chunks)
    with tempfile.TemporaryDirectory(prefix="moe2gguf-base-") as d, atomic_file(grid, "cache") as tmp:
        run_in_child(backend, str(p), wins, d, kv_type, threads, save_lp=str(tmp), label="base", device=device if backend == "torch" else "cpu")
    with atomic_file(wins_f, "cache") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, windows=wins)
    evict(grid.parent, limit, keep=(grid, wins_f))
    return wins, grid


def torch_device(name: str, backends: list[str], model: str) -> str:
    """--device for the PyTorch runs among `backends`, as a torch device type; refused in one
    line where torch sees no such device, or where only GGUFs run (llama.cpp runs them on the
    CPU here). A GGUF-only check never imports torch for this."""
    if "torch" not in backends:
        if name not in ("auto", "cpu"):
            raise UserError(f"--device {name} applies to a PyTorch run (a model folder); {model} is a GGUF, which llama.cpp runs on the CPU; "
                            "drop --device")
        return "cpu"
    from moe2gguf.device import resolve

    return resolve(name).type


def params_experts(path: pathlib.Path, backend: str) -> int:
    """Routed-expert parameters actually kept (zero-padding not counted)."""
    if backend == "torch":
        from moe2gguf.arch import arch_for_config
        from moe2gguf.checkpoint import Checkpoint

        ck = Checkpoint(path)
        arch = arch_for_config(ck.config)
        return arch.param_counts({n: ck.shape(n) for n in ck.tensor_names}).routed_experts
    r = gguf.GGUFReader(path)
    fld = r.get_field(KV_EXPERT_WIDTHS)
    suffix = {part: gguf.TENSOR_NAMES[t].split(".")[-1] for part, t in EXPERT_TENSORS.items()}
    hidden = None
    total = 0
    for t in r.tensors:
        kind = t.name.split(".")[-2]
        if kind in suffix.values():
            total += int(np.prod([int(x) for x in t.shape]))
            hidden = int(t.shape[1]) if kind == suffix["down"] else int(t.shape[0])
    if fld is not None and hidden is not None:
        return len(EXPERT_TENSORS) * hidden * int(sum(int(v) for v in fld.contents()))
    return total


def check(
    model: str,
    text: str | None,
    base: str | None = None,
    ctx: int = 256,
    chunks: int | None = None,
    kv_type: str = "f16",
    threads: int = 0,
    task: str | None = None,
    task_format: str | None = None,
    n_tasks: int | None = None,
    device: str = "auto",
) -> dict:
    """The report dict (DESIGN.md keys) for MODEL on TEXT and/or the multiple-choice TASK file,
    against BASE if given. `device` is where a PyTorch run (a model folder) computes; llama.cpp
    runs a GGUF on the CPU."""
    path = pathlib.Path(model).resolve()
    backend = backend_of(path)
    if text is None and task is None:
        raise UserError("nothing to measure; pass --text FILE (perplexity, KLD) and/or --task FILE (task accuracy)")
    # a bad task file fails here, before any model runs
    job = T.read_tasks(task, task_format, n_tasks) if task is not None else None
    if text is None:
        assert job is not None and task is not None
        return {
            "backend": backend,
            "model": str(path),
            **task_report(path, backend, task, *job, base, kv_type, threads),
            "file_bytes": _file_bytes(path, backend),
            "params_experts": params_experts(path, backend),
        }
    body = read_text(text)
    device = torch_device(device, [backend] + ([backend_of(base)] if base is not None else []), model)
    base_wins = base_lp = None
    if base is not None:
        base_wins, base_lp = base_grid(base, body, ctx, chunks, kv_type, threads, device)
    wins = windows(tokenize(str(path), backend, body), ctx, chunks)
    if base_wins is not None and not np.array_equal(base_wins, wins):
        raise UserError(f"{model} and --base {base} tokenize the text differently; KL-divergence needs the same tokenizer")
    with tempfile.TemporaryDirectory(prefix="moe2gguf-check-") as d:
        s, measured = run_in_child(backend, str(path), wins, d, kv_type, threads, base_lp=None if base_lp is None else str(base_lp),
                                   device=device if backend == "torch" else "cpu")
    report = {
        "backend": backend,
        "model": str(path),
        "text": str(pathlib.Path(text).resolve()),
        "ctx": ctx,
        "chunks": int(len(wins)),
        "tokens_scored": int(len(s.nll)),
        "ppl": s.ppl,
        "ppl_se": s.ppl_se,
    }
    if s.kld is not None:
        n = len(s.kld)
        report["base"] = str(pathlib.Path(base).resolve())
        report["kld"] = float(s.kld.mean())
        report["kld_se"] = float(s.kld.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
        report["top1"] = float(s.top1.mean())
    report["file_bytes"] = _file_bytes(path, backend)
    report["params_experts"] = params_experts(path, backend)
    report.update(measured)
    report["kv_type"] = kv_type if backend == "llama.cpp" else "f32"
    if job is not None and task is not None:
        report.update(task_report(path, backend, task, *job, base, kv_type, threads))
    return report


def task_report(path: pathlib.Path, backend: str, task: str, fmt: str, items: list, base: str | None, kv_type: str, threads: int) -> dict:
    """Task accuracy (exporter/tasks.py keys), and with BASE the agreement of chosen answers."""
    scored = run_tasks_in_child(backend, str(path), fmt, items, kv_type, threads, label=f"{fmt} {path.name}")
    out = {"task": str(pathlib.Path(task).resolve()), "task_format": fmt, **T.summary(fmt, scored)}
    if base is not None:
        if pathlib.Path(base).resolve() == path:  # its own base (run's first row): cached for the next rows
            base_task_results(base, task, fmt, items, kv_type, threads, scored)
        out["agree"] = T.agreement(scored, base_task_results(base, task, fmt, items, kv_type, threads))
    return out


def base_task_results(base: str, task: str, fmt: str, items: list, kv_type: str, threads: int, known: list | None = None) -> list:
    """The base's outcome on each task, from the cache or computed once (key: base path +
    mtime + task file hash + format + the tasks chosen + KV type); `known`: already scored."""
    p = pathlib.Path(base).resolve()
    digest = hashlib.sha256(pathlib.Path(task).read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps([str(p), _mtime(p), digest, fmt, [t.index for t in items], kv_type]).encode()).hexdigest()[:24]
    f = cache_dir() / f"base-tasks-{key}.npz"
    fields = list(T.Scored.__dataclass_fields__)
    try:
        with np.load(f) as z:
            return [T.Scored(**{k: z[k][i].item() for k in fields}) for i in range(len(z["index"]))]
    except (*DAMAGED, TypeError):
        _drop(f)  # missing or damaged: computed again
    scored = known or run_tasks_in_child(backend_of(p), str(p), fmt, items, kv_type, threads, label=f"{fmt} {p.name} (base)")
    with atomic_file(f, "cache") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.array([getattr(s, k) for s in scored]) for k in fields})
    return scored


def _file_bytes(path: pathlib.Path, backend: str) -> int:
    if backend == "llama.cpp":
        return path.stat().st_size
    from moe2gguf.checkpoint import Checkpoint

    return Checkpoint(path).weight_bytes


def task_rows(r: dict) -> list[tuple[str, str]]:
    rows = [
        ("task", f"{pathlib.Path(r['task']).name} ({r['task_format']}, {r['tasks']} tasks, chance {100 * r['task_chance']:.1f} %)"),
        ("accuracy (acc)", f"{100 * r['acc']:.2f} ± {100 * r['acc_se']:.2f} %"),
    ]
    if "acc_norm" in r:
        rows.append(("acc_norm (llama-perplexity)", f"{100 * r['acc_norm']:.2f} ± {100 * r['acc_norm_se']:.2f} %"))
    if "agree" in r:
        rows.append(("answers as --base", f"{100 * r['agree']:.2f} %"))
    return rows


def table(r: dict) -> str:
    rows = [("backend", r["backend"]), ("model", r["model"])]
    if "ppl" in r:
        rows += [
            ("tokens scored", f"{r['tokens_scored']} ({r['chunks']} x {r['ctx'] // 2} of ctx {r['ctx']})"),
            ("perplexity", f"{r['ppl']:.4f} ± {r['ppl_se']:.4f}"),
        ]
    if "kld" in r:
        # a model against itself can average to -1e-9 on the base's uint16 grid: not "-0.000000"
        rows += [("KL-divergence", f"{max(r['kld'], 0.0):.6f} ± {r['kld_se']:.6f}"), ("top-1 agreement", f"{100 * r['top1']:.2f} %")]
    if "acc" in r:
        rows += task_rows(r)
    rows += [("file", human_bytes(r["file_bytes"])), ("routed-expert params kept", f"{r['params_experts']:,}")]
    if "ppl" in r:
        rows += [
            ("model buffer", human_bytes(r["model_buffer_bytes"])),
            ("KV cache", human_bytes(r["kv_cache_bytes"])),
            ("peak RSS", human_bytes(r["peak_rss_bytes"])),
            ("prompt", f"{r['prompt_tokens_per_s']:.1f} tok/s"),
            ("decode", f"{r['decode_tokens_per_s']:.1f} tok/s"),
        ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def check_main(
    model: str, text: str | None, base: str | None, ctx: int, chunks: int | None, json_out: str | None, kv_type: str, threads: int,
    task: str | None, task_format: str | None, n_tasks: int | None, device: str = "auto",
) -> None:
    """The `check` verb once moe2gguf/commands.py has parsed its options."""
    cpus = os.cpu_count() or 1
    if threads > cpus:  # llama.cpp's threads spin-wait for each other: on fewer cores a reply takes minutes per token
        raise UserError(f"--threads {threads} is more than the {cpus} CPUs of this machine, which slows llama.cpp down to a crawl; "
                        f"give at most {cpus} (0: all of them)")
    if json_out is not None:  # before the measurement, not after it (an empty name is refused, not ignored)
        check_output(json_out, "check", [model, text, base, task], folder=False)
    r = check(model, text, base, ctx, chunks, kv_type, threads, task, task_format, n_tasks, device)
    if json_out is not None:
        with atomic_file(json_out, "check", [model, text, base, task]) as tmp:
            tmp.write_text(json.dumps(r, indent=2) + "\n")
    click.echo(table(r))
