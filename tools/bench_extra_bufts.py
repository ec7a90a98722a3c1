"""What loading without llama.cpp's extra buffer types (the AMX / repacked-weights fallback of
moe2gguf/llama_runtime.py) costs on this machine: prompt and decode tokens/s of one GGUF loaded
both ways in one process, trials alternated so both see the same load.

    python tools/bench_extra_bufts.py GGUF [--threads 1] [--trials 30]

On a machine whose CPU cannot run the extra buffer types the "with" row dies by SIGILL: run it
where both paths work (the fallback is what such a machine gets anyway).
"""

from __future__ import annotations

import os
import pathlib
import statistics
import time

import click
import numpy as np

from moe2gguf.exporter.check import tokenize
from moe2gguf.llama_runtime import _plain_cpu_llama

TEXT = pathlib.Path(__file__).resolve().parent.parent / "moe2gguf" / "data" / "reference-moe" / "eval.txt"
PROMPT = 256
DECODE = 64


@click.command()
@click.argument("gguf", type=click.Path(exists=True, dir_okay=False))
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 512))
@click.option("--trials", default=30, show_default=True, type=click.IntRange(1, 10_000))
def main(gguf: str, threads: int, trials: int) -> None:
    import llama_cpp

    ids = tokenize(gguf, "llama.cpp", TEXT.read_text()[:20000])[:PROMPT]
    kw = dict(n_ctx=2 * PROMPT, n_batch=PROMPT, n_ubatch=PROMPT, n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
    llms = {"with extra buffer types": llama_cpp.Llama(gguf, **kw), "without (fallback)": _plain_cpu_llama()(gguf, **kw)}
    res: dict[str, dict[str, list[float]]] = {name: {"prompt": [], "decode": []} for name in llms}
    for _ in range(trials):
        for name, llm in llms.items():
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            res[name]["prompt"].append(len(ids) / (time.perf_counter() - t0))
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            t0 = time.perf_counter()
            for _ in range(DECODE):
                llm.eval([tok])
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            res[name]["decode"].append(DECODE / (time.perf_counter() - t0))
    print(f"{gguf}, {threads} thread(s), {trials} alternating trials, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    base = {k: statistics.median(v) for k, v in res["with extra buffer types"].items()}
    for name, r in res.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        print(f"{name:26s} prompt {med['prompt']:8.1f} tok/s ({med['prompt'] / base['prompt']:.2f}x)  decode {med['decode']:7.1f} tok/s ({med['decode'] / base['decode']:.2f}x)")


if __name__ == "__main__":
    main()
