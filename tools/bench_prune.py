"""PPL and KLD (vs the unpruned model) of every prune method at several ratios, one run.

    python tools/bench_prune.py                      # bundled model, R = 0.25 and 0.5
    python tools/bench_prune.py --ablations          # + coverage variants (score, normalisation, refit)
    python tools/bench_prune.py --methods coverage --deployable   # the cost of the llama.cpp layout
    python tools/bench_prune.py --methods coverage reap frequency --scores taylor   # + coverage by the paper's Taylor score
    python tools/bench_prune.py --model moe2gguf/data/reference-moe-fine   # the fine-grained model (64 x 64, top-8)

Calibrates once on calib.txt, prunes with every method into a temporary folder, and scores
each with moe2gguf.protocol on eval.txt (ctx 256, the first --chunks windows, second halves).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import torch

from moe2gguf.errors import UserError
from moe2gguf.modeling import load_model
from moe2gguf.protocol import score_logprobs, targets_of, torch_logprobs, windows
from moe2gguf.prune.calibrate import calibrate, tokenize
from moe2gguf.prune.prune import prune
from moe2gguf.options import SCORE_KINDS

REF = pathlib.Path(__file__).resolve().parent.parent / "moe2gguf" / "data" / "reference-moe"
FINE = REF.with_name("reference-moe-fine")  # the fine-grained bundled model: 64 experts x 64, top-8


def bench_texts(model: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """calib.txt and eval.txt of a model folder. The fine-grained bundled model shares the
    reference model's tokenizer and texts (tools/train_reference.py --fine), so they are read
    from there rather than shipped twice."""
    home = model if (model / "calib.txt").is_file() or model.resolve() != FINE.resolve() else REF
    return home / "calib.txt", home / "eval.txt"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REF))
    ap.add_argument("--calib-text", default=None, help="default: MODEL/calib.txt (the fine model: reference-moe's)")
    ap.add_argument("--eval-text", default=None, help="default: MODEL/eval.txt (the fine model: reference-moe's)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--methods", nargs="+", default=["coverage", "uniform", "magnitude", "reap", "frequency"])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=65536, help="calibration tokens")
    ap.add_argument("--scores", nargs="+", default=[], choices=SCORE_KINDS, help="also coverage with these channel scores (e.g. taylor)")
    ap.add_argument("--ablations", action="store_true", help="also coverage with abs scores / no normalisation / no refit")
    ap.add_argument("--deployable", action="store_true", help="also coverage in the llama.cpp layout, with and without --reconstruct")
    a = ap.parse_args(argv)
    model = pathlib.Path(a.model)
    calib_default, eval_default = bench_texts(model)
    calib_text = a.calib_text or str(calib_default)
    eval_text = a.eval_text or str(eval_default)
    torch.set_grad_enabled(False)

    ids = tokenize(model, [eval_text])[0]
    wins = windows(ids, a.ctx, a.chunks)
    targets = targets_of(wins)

    def evaluate(path: str | pathlib.Path, base: torch.Tensor | None):
        m, _, _ = load_model(str(path))
        lp = torch_logprobs(m, wins)
        return lp, score_logprobs(lp, targets, base)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        t0 = time.time()
        calibrate(str(model), [calib_text], tmp / "calib", tokens=a.tokens, ctx=a.ctx)
        print(f"calibrated {a.tokens} tokens in {time.time() - t0:.0f}s", file=sys.stderr)
        base, s = evaluate(model, None)
        rows.append(("unpruned", 0.0, 0.0, 1.0, [], s))
        variants = [(m, {}) for m in a.methods]
        variants += [("coverage", {"score": s}) for s in a.scores if s != "energy"]
        if a.ablations:
            variants += [
                ("coverage", {"score": "abs"}),
                ("coverage", {"normalise": False}),
                ("coverage", {"refit": False}),
                ("uniform", {"refit": False}),
                ("coverage", {"min_width": 8}),
                ("coverage", {"min_width": 32}),
            ]
        if a.deployable:
            variants += [("coverage", {"layout": "llama.cpp"}), ("coverage", {"layout": "llama.cpp", "reconstruct": False})]
        for r in a.ratios:
            for method, kw in variants:
                out = tmp / "pruned"
                try:
                    # ragged unless a variant says otherwise: this table compares allocations, not layouts
                    rep = prune(str(model), str(tmp / "calib"), r, str(out), method, **{"layout": "ragged", **kw})
                except UserError as e:  # e.g. a min-width floor above the budget
                    print(f"skip {method} {kw} R={r}: {e.format_message()}", file=sys.stderr)
                    continue
                _, s = evaluate(out, base)
                name = method + "".join(f" {k}={v}" for k, v in kw.items())
                if "deployable" in rep:
                    name += f" ({rep['deployable']['experts']}x{rep['deployable']['width']})"
                rows.append((name, r, rep["ratio_achieved"], rep["coverage"], rep["experts_kept"], s))
                # each row as it is measured, so a run cut short still reports what it finished
                print(f"{name} R={r}: ratio {rep['ratio_achieved']:.4f} coverage {rep['coverage']:.4f} experts {sum(rep['experts_kept'])} "
                      f"ppl {s.ppl:.3f} kld {s.kld.mean():.5f} top1 {s.top1.mean():.3f}", file=sys.stderr)

    base_ppl = rows[0][5].ppl
    print(f"model {model} | eval {eval_text} | ctx {a.ctx} | chunks {a.chunks} | calib {calib_text} ({a.tokens} tokens)\n")
    print("| method | R | R achieved | coverage | experts kept | PPL | ΔPPL | KLD | top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r, ra, cov, kept, s in rows:
        kld = f"{s.kld.mean():.5f}" if s.kld is not None else "-"
        top1 = f"{s.top1.mean():.3f}" if s.top1 is not None else "-"
        print(f"| {name} | {r:g} | {ra:.4f} | {cov:.4f} | {sum(kept) if kept else '-'} | {s.ppl:.3f} ± {s.ppl_se:.3f} | {100 * (s.ppl / base_ppl - 1):+.2f}% | {kld} | {top1} |")


if __name__ == "__main__":
    main()
