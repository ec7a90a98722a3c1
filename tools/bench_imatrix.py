"""Does our importance matrix help llama.cpp's quantizer? KLD vs F32 with and without it.

    python tools/bench_imatrix.py                          # bundled model
    python tools/bench_imatrix.py --llama-bin /tmp/lcbuild/bin   # + llama.cpp's own tools

Calibrates once (calib.txt), exports the F32 GGUF and each quant with and without
`--imatrix`, and checks every file in llama-cpp-python against the F32 GGUF on eval.txt,
all in one run. Prints a markdown table (PPL, KLD ± se, top-1, file bytes).

With --llama-bin (a folder holding llama-imatrix and llama-quantize, built from the
llama-cpp-python sdist: `cmake -B B vendor/llama.cpp && cmake --build B --target
llama-imatrix llama-quantize`), two more rows per quant: llama.cpp's own importance matrix
(llama-imatrix on the same calibration text and token count), and our imatrix.gguf fed to
the llama-quantize command line, which shows the file is the format that tool reads.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import tempfile

from moe2gguf.exporter.check import check
from moe2gguf.exporter.export import export
from moe2gguf.prune.calibrate import calibrate
from moe2gguf.subproc import run_checked

REF = pathlib.Path(__file__).resolve().parent.parent / "moe2gguf" / "data" / "reference-moe"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REF))
    ap.add_argument("--quants", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    ap.add_argument("--tokens", type=int, default=32768, help="calibration tokens")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--llama-bin", type=pathlib.Path, help="folder with llama.cpp's llama-imatrix and llama-quantize")
    a = ap.parse_args(argv)
    model = pathlib.Path(a.model)
    text = str(model / "eval.txt")
    with tempfile.TemporaryDirectory(prefix="bench-imatrix-") as d:
        d = pathlib.Path(d)
        calibrate(str(model), [str(model / "calib.txt")], str(d / "calib"), a.tokens, a.ctx)
        f32 = d / "f32.gguf"
        export(str(model), str(f32), "F32", progress=False)
        rows = [("F32", "-", check(str(f32), text, str(f32), a.ctx, a.chunks))]
        for q in a.quants:
            for label, imat in (("no", None), ("yes", str(d / "calib"))):
                out = d / f"{q}-{label}.gguf"
                export(str(model), str(out), q, imat, progress=False)
                rows.append((q, label, check(str(out), text, str(f32), a.ctx, a.chunks)))
        if a.llama_bin:
            upstream = d / "llama-imatrix.gguf"
            run([a.llama_bin / "llama-imatrix", "-m", f32, "-f", model / "calib.txt", "-o", upstream, "-c", a.ctx, "--chunks", a.tokens // a.ctx])
            for q in a.quants:
                for label, imat in (("llama-imatrix", upstream), ("ours, via llama-quantize", d / "calib" / "imatrix.gguf")):
                    out = d / f"{q}-{label.split()[0]}-cli.gguf"
                    run([a.llama_bin / "llama-quantize", "--imatrix", imat, f32, out, q])
                    rows.append((q, label, check(str(out), text, str(f32), a.ctx, a.chunks)))
    print(f"model {model.name}, eval.txt, ctx {a.ctx}, {a.chunks} chunks, KLD vs the F32 GGUF\n")
    print("| quant | imatrix | PPL | KLD | top-1 | file bytes |")
    print("|---|---|---|---|---|---|")
    for q, label, r in rows:
        print(f"| {q} | {label} | {r['ppl']:.4f} | {r['kld']:.5f} ± {r['kld_se']:.5f} | {100 * r['top1']:.2f}% | {r['file_bytes']:,} |")


def run(cmd: list) -> None:
    run_checked(cmd, stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
