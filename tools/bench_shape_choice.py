"""Cost of choosing the deployable shape (K experts x width W) of `prune --layout llama.cpp`:
the per-shape scoring of commit 0d15e18 against the prefix-sum table (`deploy.ShapeScores`),
timed in the same run on the same random scores.

    python tools/bench_shape_choice.py [--sample 16] [--seed 0]

Scores are random (uniform cubed: a few strong channels per expert, as attribution has) with
Qwen3-30B-A3B's dimensions (48 MoE layers x 128 experts x 768 channels, top-8) and the bundled
model's (4 x 8 x 256, top-2); the shapes are the llama.cpp layout's (widths in steps of 32).
The old path scored every shape once per use: `best_shape` ranked the shapes that fit the
budget by `shape_quality`, then the report took `shape_coverage` and `shape_quality` of every
shape; at 30B that is thousands of calls each sorting every layer, so it is timed on a random
sample of shapes and scaled to the calls `plan_deployable` made (--ratio 0.25, --probe 0; on
the bundled model's dimensions every shape is timed and the old choice compared with the new). The new path
is timed whole: the table of every shape, the choice and the report's lookups. The values of
both are compared on the sample.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from moe2gguf.prune.allocate import LAYOUTS
from moe2gguf.prune.deploy import ShapeScores, feasible_shapes

OLD_COMMIT = "0d15e18"
REPO = Path(__file__).resolve().parent.parent
DIMS = {"Qwen3-30B-A3B": (48, 128, 768, 8), "bundled reference-moe": (4, 8, 256, 2)}
RATIO = 0.25


def old_deploy() -> types.ModuleType:
    """prune/deploy.py as it was at OLD_COMMIT, loaded as a module of its own."""
    try:
        src = subprocess.run(["git", "show", f"{OLD_COMMIT}:prune/deploy.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"bench_shape_choice: cannot read prune/deploy.py at {OLD_COMMIT} ({e}); run it inside a git clone of moe2gguf")
    mod = types.ModuleType("deploy_0d15e18")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up there
    exec(compile(src, f"{OLD_COMMIT}:prune/deploy.py", "exec"), mod.__dict__)  # noqa: S102 - our own file at an older commit
    return mod


def bench(name: str, layers: int, experts: int, width: int, top_k: int, old: types.ModuleType, sample: int, rng: random.Random) -> dict:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    scores = [torch.rand(experts, width, generator=g) ** 3 for _ in range(layers)]
    shapes = feasible_shapes(LAYOUTS["llama.cpp"], experts, width, top_k)
    n_fit = sum(1 for s in shapes if s.experts * s.width <= (1 - RATIO) * experts * width)
    calls = n_fit + 2 + 2 * len(shapes)  # old plan_deployable: rank the fitting shapes, the best one's coverage and quality, both of every shape

    t0 = time.perf_counter()
    table = ShapeScores.of(scores, shapes)
    fit = [s for s in shapes if s.experts * s.width <= (1 - RATIO) * experts * width]
    best, _ = table.best(fit)
    report = [(table.coverage(s), table.quality(s)) for s in shapes]
    new_s = time.perf_counter() - t0

    picked = shapes if len(shapes) <= max(sample, 64) else rng.sample(shapes, sample)  # a small model: every shape
    t0 = time.perf_counter()
    old_vals = [(old.shape_coverage(scores, s), old.shape_quality(scores, s)) for s in picked]
    per_call = (time.perf_counter() - t0) / (2 * len(picked))
    old_s = per_call * calls
    diff = max(max(abs(a - table.coverage(s)), abs(b - table.quality(s))) for s, (a, b) in zip(picked, old_vals, strict=True))
    if len(picked) == len(shapes):  # every shape timed: the old choice itself is checked too
        assert old.best_shape(scores, fit)[0] == best, (old.best_shape(scores, fit)[0], best)
    assert len(report) == len(shapes)
    return {"name": name, "dims": f"{layers} x {experts} x {width}", "shapes": len(shapes), "calls": calls, "sampled": len(picked),
            "old_s": old_s, "new_s": new_s, "diff": diff, "best": f"{best.experts}x{best.width}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=int, default=16, help="shapes the old path is timed on (then scaled to its call count)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    old = old_deploy()
    load = os.getloadavg()
    print(f"machine: {platform.machine()} {platform.processor() or platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads, Python {platform.python_version()}")
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min)")
    print(f"old: {OLD_COMMIT} shape_coverage/shape_quality per shape; new: ShapeScores (one sort per layer); --ratio {RATIO} choice + report\n")
    print("| dims (layers x experts x width) | shapes | old calls | old s (scaled from sample) | new s | old / new | max abs difference | chosen (probe 0) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (layers, experts, width, top_k) in DIMS.items():
        r = bench(name, layers, experts, width, top_k, old, args.sample, rng)
        print(f"| {r['name']}: {r['dims']} | {r['shapes']:,} | {r['calls']:,} ({r['sampled']} timed) | {r['old_s']:.2f} | {r['new_s']:.4f} | "
              f"{r['old_s'] / r['new_s']:,.0f}x | {r['diff']:.1e} | {r['best']} |")
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
