"""What the deployable layout's extra passes cost, as multiples of calibration, one run.

    python tools/bench_cost.py                     # random Qwen3-MoE, 32 experts x 512, ~3 min
    python tools/bench_cost.py --experts 64 --width 768 --hidden 1024

Builds a random Qwen3-MoE with transformers' real config class (timing does not need trained
weights) and the bundled tokenizer, calibrates it on the bundled calib.txt, then times
`prune --layout llama.cpp` with the shape probe and `--reconstruct` switched on and off, and
the matrix-free re-fit forced where the dense one would do. Every time is printed as a ratio to
the calibration measured in the same run, so the table carries to other machines and, roughly,
to other sizes (all passes are layer by layer over the same calibration tokens).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

import torch

REF = pathlib.Path(__file__).resolve().parent.parent / "moe2gguf" / "data" / "reference-moe"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--width", type=int, default=512, help="expert intermediate size")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    ap.add_argument("--ratio", type=float, default=0.25)
    a = ap.parse_args(argv)

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    import moe2gguf.prune.reconstruct as R
    from moe2gguf.progress import silenced
    from moe2gguf.prune.calibrate import calibrate
    from moe2gguf.prune.prune import prune

    cfg = Qwen3MoeConfig(
        vocab_size=4096, hidden_size=a.hidden, intermediate_size=2 * a.hidden, moe_intermediate_size=a.width,
        num_hidden_layers=a.layers, num_attention_heads=8, num_key_value_heads=4, head_dim=a.hidden // 8,
        num_experts=a.experts, num_experts_per_tok=a.top_k, norm_topk_prob=True, tie_word_embeddings=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as d, silenced():
        d = pathlib.Path(d)
        torch.manual_seed(0)
        Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d / "model")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(REF / f, d / "model" / f)
        model = str(d / "model")

        t = time.perf_counter()
        calibrate(model, [str(REF / "calib.txt")], d / "calib", tokens=a.tokens, ctx=256)
        base = time.perf_counter() - t
        rows = [("calibrate", base, "")]
        cases = [
            ("prune, shape by attribution (--probe 0 --no-reconstruct)", {"probe": 0, "reconstruct": False}, None),
            ("prune, probe 4 shapes (--no-reconstruct)", {"probe": 4, "reconstruct": False}, None),
            ("prune, --probe 0 --reconstruct (dense solve forced)", {"probe": 0, "reconstruct": True}, 1 << 40),
            ("prune, --probe 0 --reconstruct (matrix-free solve forced)", {"probe": 0, "reconstruct": True}, 0),
            ("prune, defaults (probe 4 + re-fit each, --reconstruct; solver by size)", {}, None),
        ]
        for label, kw, limit in cases:
            saved = R.JOINT_LIMIT
            if limit is not None:
                R.JOINT_LIMIT = limit
            try:
                t = time.perf_counter()
                rep = prune(model, str(d / "calib"), a.ratio, str(d / "out"), layout="llama.cpp", **kw)
                took = time.perf_counter() - t
            finally:
                R.JOINT_LIMIT = saved
            shutil.rmtree(d / "out")
            dep = rep["deployable"]
            rows.append((label, took, f"{dep['experts']}x{dep['width']}"))
            print(f"{label}: {took:.1f}s", file=sys.stderr, flush=True)

    print(f"random Qwen3-MoE: {a.layers} layers, hidden {a.hidden}, {a.experts} experts x {a.width}, top-{a.top_k}; "
          f"{a.tokens} calibration tokens, ctx 256; ratio {a.ratio}; {torch.get_num_threads()} threads\n")
    print("| step | seconds | x calibrate | shape |")
    print("|---|---|---|---|")
    for label, took, shape in rows:
        print(f"| {label} | {took:.1f} | {took / base:.1f} | {shape} |")


if __name__ == "__main__":
    main()
