"""Quality vs GGUF size on the bundled model: pruned + quantized against plain quantization.

    python tools/bench_size.py -o docs/bench            # ~16 min on 2 cores
    python tools/bench_size.py -o /tmp/b --chunks 10    # quicker, noisier
    python tools/bench_size.py -o /tmp/b --methods reap --ladder Q4_K_M   # the REAP rows alone
    python tools/bench_size.py -o /tmp/b --model moe2gguf/data/reference-moe-fine   # the fine-grained model

Every point is a real GGUF measured with moe2gguf.exporter.check.check (llama-cpp-python,
held-out eval.txt, ctx 256, the first --chunks windows) for PPL and KLD against the unpruned
F32 GGUF. All quantized files get the same importance matrix (the calibration's, remapped to
pruned experts/channels). Rows:
  * the unpruned model at Q8_0 .. Q2_K and IQ types (the "quant ladder");
  * coverage in the llama.cpp layout (one width, one expert count), uniform, and the
    whole-expert baselines reap (REAP's saliency) and frequency (router mass) at R=0.25 and
    0.5, each at Q4_K_M and Q5_K_M;
  * coverage with --target-size at the exact bytes of the uniform, reap and frequency Q4_K_M
    files (the equal-bytes comparison; per-tensor types planned by prune), and, as ablations,
    each whole-expert baseline given our --reconstruct and coverage at the first baseline's
    bytes without it;
  * coverage with --target-size at the exact bytes of the unpruned Q3_K_M and IQ3_XXS files.
Every GGUF is also scored on a multiple-choice task (--task, default the bundled "finish the
line" task; `check --task`, llama-perplexity's acc_norm) with the share of answers equal to the
unpruned F32 GGUF's. Writes OUT/bench_size.md (the table) and OUT/bench_size.png (bytes vs KLD,
and bytes vs task accuracy), and prints whether pruned + Q4_K_M lies on or below the unpruned
ladder's front at equal bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile
import time

import numpy as np

REF = pathlib.Path(__file__).resolve().parent.parent / "moe2gguf" / "data" / "reference-moe"
METHODS = ("coverage", "uniform", "reap", "frequency")
EXPERT_DROP = ("reap", "frequency")  # whole-expert baselines: each gets the --reconstruct ablation
LADDER = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS")


def expert_params(path: pathlib.Path) -> int:
    """Elements of the ffn_{gate,up,down}_exps tensors, counted from the GGUF (padding included)."""
    import gguf

    r = gguf.GGUFReader(path)
    return sum(int(np.prod([int(x) for x in t.shape])) for t in r.tensors if "_exps." in t.name)


def front_at(points: list[tuple[int, float]], x: int) -> float | None:
    """KLD of the unpruned quant front (lower convex hull not needed: the Pareto front,
    interpolated linearly in bytes and log KLD) at `x` bytes; None outside its range."""
    pts = sorted(points)
    front = []
    for b, k in pts:  # Pareto: keep points no larger file beats
        if not front or k < front[-1][1]:
            front.append((b, k))
    for (b0, k0), (b1, k1) in zip(front, front[1:], strict=False):
        if b0 <= x <= b1:
            t = (x - b0) / (b1 - b0)
            return math.exp((1 - t) * math.log(max(k0, 1e-9)) + t * math.log(max(k1, 1e-9)))
    return None


def main(argv: list[str] | None = None) -> None:  # noqa: PLR0915
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True, help="folder for bench_size.md and bench_size.png")
    ap.add_argument("--model", default=str(REF))
    ap.add_argument("--calib", default=None, help="reuse a calibration folder of MODEL (default: calibrate --tokens on calib.txt)")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="rows pruned at --ratios; coverage --target-size rows follow each baseline listed")
    ap.add_argument("--ladder", nargs="+", choices=LADDER, default=list(LADDER),
                    help="unpruned quant types (Q4_K_M is the table's reference row)")
    ap.add_argument("--task", default=str(REF / "task-line-ending.txt"),
                    help="multiple-choice task file scored on every GGUF (llama-perplexity format; '' to skip)")
    ap.add_argument("--keep", default=None, help="keep the GGUFs and checkpoints in this folder (default: a temporary one)")
    a = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe2gguf.errors import UserError
    from moe2gguf.exporter.check import check
    from moe2gguf.exporter.export import export
    from moe2gguf.prune.calibrate import calibrate
    from moe2gguf.prune.prune import prune

    from bench_prune import bench_texts  # the fine-grained model reads reference-moe's texts

    out = pathlib.Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    model = pathlib.Path(a.model)
    calib_text, eval_text = (str(p) for p in bench_texts(model))
    t_start = time.time()
    ctx = tempfile.TemporaryDirectory(prefix="bench-size-") if a.keep is None else None
    work = pathlib.Path(ctx.name if ctx else a.keep)
    work.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        print(f"[{time.time() - t_start:5.0f}s] {msg}", file=sys.stderr, flush=True)

    calib = a.calib
    if calib is None:
        calib = str(work / "calib")
        calibrate(str(model), [calib_text], calib, tokens=a.tokens, ctx=a.ctx)
        say(f"calibrated {a.tokens} tokens")
    f32 = work / "unpruned-F32.gguf"
    export(str(model), str(f32), "F32", progress=False)
    base_experts = expert_params(f32)

    rows: list[dict] = []

    def measure(label: str, kind: str, gguf: pathlib.Path, **extra: object) -> dict:
        r = check(str(gguf), eval_text, base=str(f32), ctx=a.ctx, chunks=a.chunks, task=a.task or None)  # one call: PPL, KLD, task
        row = {"label": label, "kind": kind, "bytes": gguf.stat().st_size, "ppl": r["ppl"], "ppl_se": r["ppl_se"], "kld": r["kld"],
               "kld_se": r["kld_se"], "top1": r["top1"], "experts_frac": expert_params(gguf) / base_experts, **extra}
        if a.task:
            row |= {"task_acc": r.get("acc_norm", r["acc"]), "task_acc_se": r.get("acc_norm_se", r["acc_se"]), "task_agree": r.get("agree", 1.0)}
        rows.append(row)
        task_msg = f"  task {100 * row['task_acc']:.1f}%" if a.task else ""
        say(f"{label}: {row['bytes']:,} B  ppl {row['ppl']:.3f}  kld {row['kld']:.5f}{task_msg}")
        return row

    measure("unpruned F32", "reference", f32)
    for q in a.ladder:
        g = work / f"unpruned-{q}.gguf"
        try:
            export(str(model), str(g), q, imatrix=calib, progress=False)
        except UserError as e:
            say(f"skip {q}: {e.format_message()}")
            continue
        measure(f"unpruned {q}", "unpruned", g, quant=q)

    labels = {"coverage": ("coverage (llama.cpp layout)", {"layout": "llama.cpp"})}
    methods = [(labels.get(m, (m, {}))[0], m, labels.get(m, (m, {}))[1]) for m in METHODS if m in a.methods]
    drops = [m for m in EXPERT_DROP if m in a.methods]
    for r in a.ratios:
        sizes = {}
        for label, method, kw in methods:
            ck = work / f"{method}-{r}"
            rep = prune(str(model), calib, r, str(ck), method=method, **kw)
            shape = rep.get("deployable")
            for q in ("Q4_K_M", "Q5_K_M"):
                g = work / f"{method}-{r}-{q}.gguf"
                export(str(ck), str(g), q, imatrix=calib, progress=False)
                row = measure(f"{label} R={r} {q}", method, g, quant=q, ratio=rep["ratio_achieved"],
                              shape=f"{shape['experts']}x{shape['width']}" if shape else None)
                if q == "Q4_K_M":
                    sizes[method] = row["bytes"]
        # ablation: the baseline given our reconstruction too, so the gain of the allocation shows apart from it
        for method in drops:
            ck = work / f"{method}-recon-{r}"
            rep = prune(str(model), calib, r, str(ck), method=method, reconstruct=True)
            g = work / f"{method}-recon-{r}-Q4_K_M.gguf"
            export(str(ck), str(g), "Q4_K_M", imatrix=calib, progress=False)
            measure(f"{method} + reconstruct R={r} Q4_K_M", method, g, quant="Q4_K_M", ratio=rep["ratio_achieved"])
        targets = [(m, True) for m in ("uniform", *drops) if m in a.methods] + [(m, False) for m in drops[:1]]
        for other, recon in targets:  # coverage at exactly the bytes of the baseline's file
            tag = "" if recon else " --no-reconstruct"
            ck = work / f"target-{other}-{r}{tag.strip()}"
            try:
                rep = prune(str(model), calib, None, str(ck), target_size=sizes[other], quant="Q4_K_M", reconstruct=recon)
            except UserError as e:
                say(f"skip target {other} R={r}: {e.format_message()}")
                continue
            g = ck.parent / f"{ck.name}.gguf"  # with_suffix would cut "0.25" to "0"
            export(str(ck), str(g), None, imatrix=calib, progress=False)  # the planned per-tensor types
            d = rep["deployable"]
            measure(f"coverage --target-size = {other} R={r} Q4_K_M bytes{tag}", "coverage-target", g, quant="planned", ratio=rep["ratio_achieved"],
                    shape=f"{d['experts']}x{d['width']}", target=sizes[other], baseline=f"{other} R={r} Q4_K_M", reconstruct=recon)

    for q in ("Q3_K_M", "IQ3_XXS"):  # pruned + Q4 at exactly the bytes of a plain lower-bit quant
        plain = next((x for x in rows if x["label"] == f"unpruned {q}"), None)
        if plain is None:
            continue
        ck = work / f"target-{q}"
        try:
            rep = prune(str(model), calib, None, str(ck), target_size=plain["bytes"], quant="Q4_K_M")
        except UserError as e:
            say(f"skip target {q}: {e.format_message()}")
            continue
        g = ck.parent / f"{ck.name}.gguf"  # with_suffix would cut "0.25" to "0"
        export(str(ck), str(g), None, imatrix=calib, progress=False)
        d = rep["deployable"]
        measure(f"coverage --target-size = unpruned {q} bytes", "coverage-target", g, quant="planned", ratio=rep["ratio_achieved"],
                shape=f"{d['experts']}x{d['width']}", target=plain["bytes"], baseline=f"unpruned {q}", reconstruct=True)

    # ---- table, plot, sentence ----
    base_q4 = next((r for r in rows if r["label"] == "unpruned Q4_K_M"), rows[0])
    lines = [
        f"model {model.name} | eval {pathlib.Path(eval_text).name} | ctx {a.ctx} | chunks {a.chunks} | imatrix from {a.tokens} calib tokens | "
        f"llama-cpp-python check, KLD vs unpruned F32 GGUF",
        "",
        f"| model | GGUF bytes | expert params (of unpruned) | shape K x W | PPL | ΔPPL vs {base_q4['label']} | KLD | top-1 | task acc_norm | same answer as F32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["bytes"]):
        task = f"{100 * r['task_acc']:.1f} ± {100 * r['task_acc_se']:.1f}% | {100 * r['task_agree']:.1f}%" if "task_acc" in r else "- | -"
        lines.append(
            f"| {r['label']} | {r['bytes']:,} | {100 * r['experts_frac']:.1f}% | {r.get('shape') or '-'} | {r['ppl']:.3f} ± {r['ppl_se']:.3f} | "
            f"{100 * (r['ppl'] / base_q4['ppl'] - 1):+.2f}% | {r['kld']:.5f} ± {r['kld_se']:.5f} | {100 * r['top1']:.2f}% | {task} |"
        )
    ladder = [(r["bytes"], r["kld"]) for r in rows if r["kind"] == "unpruned"]
    verdicts = []
    for r in rows:
        if r["kind"] in ("coverage", "coverage-target") and r.get("quant") in ("Q4_K_M", "planned"):
            f = front_at(ladder, r["bytes"])
            if f is not None:
                verdicts.append((r, f))
    if verdicts:
        parts = [f"{r['label']} ({r['bytes']:,} B) KLD {r['kld']:.4f} vs front {f:.4f} ({100 * (r['kld'] / f - 1):+.0f}%)" for r, f in verdicts]
        below = [r for r, f in verdicts if r["kld"] <= f]
        sentence = (
            f"Pruned+Q4 lies {'below' if len(below) == len(verdicts) else 'above' if not below else 'partly below, partly above'} the unpruned quant front "
            f"at equal bytes ({len(below)}/{len(verdicts)} points below): " + "; ".join(parts) + "."
        )
    else:
        sentence = "No pruned+Q4 point falls inside the byte range of the unpruned quant ladder, so no equal-bytes comparison is possible."
    lines += ["", sentence, "", "Equal bytes, coverage --target-size against the baseline file it is sized to (lower is better):", ""]
    for r in rows:
        if r["kind"] != "coverage-target":
            continue
        same_bytes = [x for x in rows if x["label"] in (r["baseline"], r["baseline"].replace(" R=", " + reconstruct R="))]
        for b in same_bytes:
            win = r["kld"] < b["kld"] and r["ppl"] < b["ppl"]
            lines.append(
                f"- {r['label']} ({r['shape']}, {r['bytes']:,} B) vs {b['label']} ({b['bytes']:,} B): KLD {r['kld']:.5f} vs {b['kld']:.5f}, "
                f"PPL {r['ppl']:.3f} vs {b['ppl']:.3f}: {'better on both' if win else 'NOT better on both'}"
            )
    (out / "bench_size.md").write_text("\n".join(lines) + "\n")
    (out / "bench_size.json").write_text(json.dumps(rows, indent=1))

    panels = ["kld", "task_acc"] if a.task else ["kld"]
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5.5), squeeze=False)
    style = {"unpruned": ("o-", "black"), "coverage": ("s", "tab:red"), "coverage-target": ("*", "tab:red"), "uniform": ("^", "tab:blue"), "frequency": ("v", "tab:green"), "reap": ("D", "tab:purple")}
    for ax, key in zip(axes[0], panels, strict=True):
        for kind, (marker, color) in style.items():
            pts = sorted((r["bytes"], r[key], r["label"]) for r in rows if r["kind"] == kind)
            if not pts:
                continue
            xs = [p[0] / 2**20 for p in pts]
            ys = [max(p[1], 1e-6) if key == "kld" else 100 * p[1] for p in pts]
            ax.plot(xs, ys, marker, color=color, ms=9 if kind == "coverage-target" else 6, label=kind)
            for x, y, lab in zip(xs, ys, [p[2] for p in pts], strict=True):
                short = lab.replace("unpruned ", "").replace("coverage (llama.cpp layout)", "cov").replace("coverage --target-size = ", "cov@")
                ax.annotate(short.replace(" Q4_K_M bytes", ""), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("GGUF file size (MiB)")
        if key == "kld":
            ax.set_ylabel("KL-divergence vs unpruned F32 (log)")
            ax.set_yscale("log")
            ax.set_title(f"{model.name}: pruned + quantized vs plain quantization (eval, {a.chunks} x {a.ctx // 2} tokens)")
        else:
            ax.set_ylabel("task acc_norm (%)")
            ax.set_title(f"task accuracy on {pathlib.Path(a.task).name}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench_size.png", dpi=130)
    print("\n".join(lines))
    say(f"wrote {out / 'bench_size.md'} and {out / 'bench_size.png'}")
    if ctx:
        ctx.cleanup()


if __name__ == "__main__":
    main()
