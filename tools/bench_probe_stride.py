"""Does the probe rank the candidate shapes the same on every k-th scored position? (prune/probe.py
`HEAD_MACS`: through a head as large as Qwen3-30B-A3B's, the KLD is taken on every 4th one.)

    python tools/bench_probe_stride.py [--model DIR --calib CALIB] [--ratios 0.25 0.5] [--strides 1 2 4]

Runs the probe exactly as `prune --layout llama.cpp` with its defaults does (the same candidates,
windows and re-fit) and keeps each scored position's KL-divergence per candidate, then prints
per stride the mean KLD of every candidate over every k-th position (counted as the probe counts
them) and the candidate it would choose. Without --calib the model is calibrated first
(`moe2gguf calibrate` with its defaults, 32,768 tokens of --text, into a temporary folder).
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

import moe2gguf.prune.probe as P
from moe2gguf.arch import arch_for_config
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.prune import deploy as D
from moe2gguf.prune.prune import Calib

BUNDLED = pathlib.Path(__file__).resolve().parent.parent / "moe2gguf" / "data" / "reference-moe"


def per_position_klds(model: pathlib.Path, calib: pathlib.Path, ratio: float) -> tuple[list[D.Shape], np.ndarray]:
    """The candidates `prune --ratio` measures (llama.cpp layout, its defaults: `plan_deployable`
    chooses them, windows and re-fit included) and [positions, candidates] KLDs on the positions
    the probe scores, in its order, stride 1."""
    ckpt = Checkpoint(model)
    arch = arch_for_config(ckpt.config)
    rows: list[np.ndarray] = []
    cands: list[D.Shape] = []
    whole, probe, budget = P._kld_sums, P.shape_klds, P.HEAD_MACS

    def each_row(ref, got, norm, head):  # noqa: ANN001, ANN202
        k = np.array([whole(ref[i : i + 1], [g[i : i + 1] for g in got], norm, head) for i in range(ref.shape[0])])
        rows.append(k)
        return list(k.sum(0))

    def recorded(ckpt, arch, shapes, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        cands[:] = shapes
        return probe(ckpt, arch, shapes, *args, **kwargs)

    P._kld_sums, P.shape_klds, P.HEAD_MACS = each_row, recorded, 1 << 62  # every position: the strides are taken here
    try:
        D.plan_deployable(Calib(calib, arch, ckpt), ckpt, arch, D.DeployRequest(ratio, None, "Q4_K_M", reconstruct=True))
    finally:
        P._kld_sums, P.shape_klds, P.HEAD_MACS = whole, probe, budget
    return cands, np.concatenate(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=pathlib.Path, default=BUNDLED, help="checkpoint (default: the bundled model)")
    ap.add_argument("--calib", type=pathlib.Path, help="its CALIB folder (default: calibrate it first)")
    ap.add_argument("--text", type=pathlib.Path, help="calibration text without --calib (default: calib.txt in the model's folder)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4])
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        calib = a.calib
        if calib is None:
            calib = pathlib.Path(tmp) / "calib"
            text = a.text or a.model / "calib.txt"
            subprocess.run([sys.executable, "-m", "moe2gguf.cli", "calibrate", str(a.model), "--text", str(text), "-o", str(calib)], check=True)
        for ratio in a.ratios:
            cands, k = per_position_klds(a.model, calib, ratio)
            names = [f"{c.experts}x{c.width}" for c in cands]
            print(f"--ratio {ratio}: {k.shape[0]} scored positions; candidates {', '.join(names)}")
            for stride in a.strides:
                mean = k[::stride].mean(0)
                print(f"  every {stride}: " + "  ".join(f"{n} {m:.5f}" for n, m in zip(names, mean, strict=True))
                      + f"  -> {names[int(np.argmin(mean))]}")


if __name__ == "__main__":
    main()
