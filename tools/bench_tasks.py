"""Our task accuracy on a GGUF equals llama-perplexity's, task by task, in its three formats.

    python tools/bench_tasks.py --llama-bin /tmp/lcbuild/bin

--llama-bin is a folder holding llama-perplexity built from the llama.cpp inside the
llama-cpp-python sdist (the same llama.cpp our runs load):
    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d S && tar xzf S/*.tar.gz -C S
    cmake -S S/llama_cpp_python-0.3.36/vendor/llama.cpp -B B -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF
    cmake --build B --target llama-perplexity -j2          # then --llama-bin B/bin

The reference model is exported to F32 and Q4_K_M; the task files are the bundled hellaswag
task and a winogrande CSV and a multiple-choice binary made by tools/make_task.py from the same
held-out text. Each (GGUF, format) is scored on all tasks and on a random subset (`--tasks N`,
which llama-perplexity draws with its fixed seed), by `check --task` (llama-cpp-python) and by
`llama-perplexity --hellaswag/--winogrande/--multiple-choice -np 32` (the batches check
decodes). Per task correctness is read
back from llama-perplexity's running output (its running accuracy for hellaswag and
multiple-choice, the chosen option for winogrande) and compared with ours in order.
"""

from __future__ import annotations

import argparse
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import make_task  # noqa: E402 - tools/ is not a package

from moe2gguf.exporter import tasks as T  # noqa: E402
from moe2gguf.exporter.export import export  # noqa: E402
from moe2gguf.exporter.task_runner import PARALLEL, run_tasks_in_child  # noqa: E402

REF = make_task.REF
FLAGS = {"hellaswag": ("--hellaswag", "-f"), "winogrande": ("--winogrande", "-f"), "multiple-choice": ("--multiple-choice", "-bf")}
_HS = re.compile(r"^(\d+)\t([0-9.]+)%\t\[")
_WG = re.compile(r"^(\d+)\t([0-9.]+)\t\s*(\S+)\s+(\S+)\s+([12])\s+([12])\s*$")
_MC = re.compile(r"^(\d+)\t([0-9.]+)\s*$")


def from_running_accuracy(pairs: list[tuple[int, float]]) -> list[bool]:
    """Per-task correctness from 'i <running accuracy in %>' lines (8 decimals: exact counts)."""
    out, prev = [], 0
    for i, acc in pairs:
        n = round(acc * i / 100)
        out.append(n > prev)
        prev = n
    return out


def llama_perplexity(binary: pathlib.Path, gguf: pathlib.Path, fmt: str, task: pathlib.Path, n: int, threads: int) -> tuple[list[bool], float]:
    flag, file_arg = FLAGS[fmt]
    # -np: the tasks per batch check packs (so both sides decode the same batches)
    cmd = [binary, "-m", gguf, flag, file_arg, task, f"{flag}-tasks", n, "-np", PARALLEL, "-t", threads, "--no-warmup"]
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, errors="replace")
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(map(str, cmd))} failed: {proc.stderr.strip().splitlines()[-1:]}")
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    if fmt == "winogrande":
        return [m.group(5) == m.group(6) for ln in lines if (m := _WG.match(ln))], dt
    rx = _HS if fmt == "hellaswag" else _MC
    return from_running_accuracy([(int(m.group(1)), float(m.group(2))) for ln in lines if (m := rx.match(ln))]), dt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bin", type=pathlib.Path, required=True, help="folder with llama-perplexity")
    ap.add_argument("--model", type=pathlib.Path, default=REF)
    ap.add_argument("--quants", nargs="+", default=["F32", "Q4_K_M"])
    ap.add_argument("-n", type=int, default=200, help="tasks in the generated winogrande / multiple-choice files")
    ap.add_argument("--subset", type=int, default=100, help="the random subset scored as well (--tasks N)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    binary = a.llama_bin / "llama-perplexity"
    lines = (a.model / "eval.txt").read_text(encoding="utf-8").split("\n")
    rows = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as d:
        d = pathlib.Path(d)
        files = {"hellaswag": make_task.BUNDLED, "winogrande": d / "wg.csv", "multiple-choice": d / "mc.bin"}
        files["winogrande"].write_text(make_task.winogrande(lines, a.n, random.Random(1)), encoding="utf-8")
        files["multiple-choice"].write_bytes(make_task.multiple_choice(lines, a.n, random.Random(2)))
        for q in a.quants:
            gguf = d / f"{q}.gguf"
            export(str(a.model), str(gguf), q, progress=False)
            for fmt, f in files.items():
                for n in (None, a.subset):
                    _, items = T.read_tasks(f, fmt, n)
                    t0 = time.perf_counter()
                    ours = run_tasks_in_child("llama.cpp", str(gguf), fmt, items, threads=a.threads, label=f"{q} {fmt}")
                    t_ours = time.perf_counter() - t0
                    # llama-perplexity: --hellaswag-tasks defaults to 400, the others to all (0)
                    theirs, t_lp = llama_perplexity(binary, gguf, fmt, f, n or (len(items) if fmt == "hellaswag" else 0), a.threads)
                    mine = [s.correct_norm for s in ours]
                    s = T.summary(fmt, ours)
                    key = "acc_norm" if T.has_norm(fmt) else "acc"
                    equal = sum(x == y for x, y in zip(mine, theirs))
                    rows.append(
                        f"| {q} | {fmt} | {f.name} | {'all' if n is None else n} | {len(theirs)} | {len(mine)} | {sum(theirs)} | {sum(mine)} | "
                        f"{equal}/{max(len(mine), len(theirs))} | {key} {100 * s[key]:.2f} ± {100 * s[key + '_se']:.2f} | {t_lp:.1f} | {t_ours:.1f} |"
                    )
                    print(rows[-1], flush=True)
    print(f"\nmodel {a.model.name}; llama-perplexity {binary}; KV cache f16 on both sides; {time.perf_counter() - t_start:.0f} s in all\n")
    print("| GGUF | format | file | --tasks | tasks (llama-perplexity) | tasks (ours) | correct (llama-perplexity) | correct (ours) | same outcome, task by task | ours | llama-perplexity s | ours s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
