"""How long `moe2gguf --help` and `moe2gguf VERB --help` take, as a user starts them.

Each command runs N times as a fresh process; the median wall time is printed next to the
median of `python -c "import click"` measured in the same run (the floor any click program
pays), with the machine's load average, since on a shared machine the load moves both.

    python tools/bench_cli.py [-n 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from moe2gguf.commands import VERBS


def median_seconds(argv: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10, help="runs per command (median)")
    args = ap.parse_args()
    exe = shutil.which("moe2gguf")
    cli = [exe] if exe else [sys.executable, "-m", "moe2gguf.cli"]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  (cores: {os.cpu_count()})")
    floor = median_seconds([sys.executable, "-c", "import click"], args.n)
    print(f"{'command':<28} {'median s':>9} {'x import click':>14}")
    baseline = 'python -c "import click"'
    print(f"{baseline:<28} {floor:>9.3f} {1.0:>14.2f}")
    for extra in [[]] + [[v.name] for v in VERBS]:
        s = median_seconds([*cli, *extra, "--help"], args.n)
        print(f"{' '.join(['moe2gguf', *extra, '--help']):<28} {s:>9.3f} {s / floor:>14.2f}")
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}  (n = {args.n} runs per command)")


if __name__ == "__main__":
    main()
