"""Benchmark (not a test): our F32 export vs llama.cpp's own convert_hf_to_gguf.py.

    python tools/parity_upstream.py MODEL_DIR [--llama-cpp DIR]

Runs upstream's converter on the same checkpoint (from DIR, or from the llama-cpp-python
0.3.36 sdist that this script `pip download`s into a temp dir), and our `export --quant F32`,
then shows that both GGUFs hold the same tensors (names, types, shapes) and give the same
logits in llama-cpp-python. Upstream identifies pre-tokenizers by a hash of known
tokenizers; ours is unknown to it, so its get_vocab_base_pre is monkeypatched to "qwen2"
(the regex our tokenizer uses) in the converter's process. No upstream code is copied.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tarfile
import tempfile

import numpy as np

from moe2gguf.subproc import run_checked

# llama.cpp's converter, run in its own process with its own gguf-py:
#   python -c BOOT LLAMA_CPP MODEL OUT PRE OUTTYPE
# PRE, when not empty, replaces the pre-tokenizer detection (by hash of known tokenizers)
BOOT = """
import sys
root, model, out, pre, outtype = sys.argv[1:6]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base as base
if pre:
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype]
import runpy
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def fetch_llama_cpp(tmp: pathlib.Path) -> pathlib.Path:
    run_checked([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "llama-cpp-python==0.3.36", "-d", str(tmp)])
    sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tf:
        tf.extractall(tmp, filter="data")
    return next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))


def tensors(path: pathlib.Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape)) for t in r.tensors}


def logits(path: pathlib.Path, ids: list[int]) -> np.ndarray:
    from moe2gguf.llama_runtime import open_llama

    llm = open_llama(path, n_ctx=len(ids), n_batch=len(ids), logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=pathlib.Path)
    ap.add_argument("--llama-cpp", type=pathlib.Path, help="llama.cpp source folder (with convert_hf_to_gguf.py)")
    ap.add_argument("--tokens", type=int, default=128)
    a = ap.parse_args()
    from moe2gguf.exporter.export import export

    with tempfile.TemporaryDirectory(prefix="parity-") as d:
        tmp = pathlib.Path(d)
        root = a.llama_cpp or fetch_llama_cpp(tmp)
        up = tmp / "upstream-f32.gguf"
        ours = tmp / "ours-f32.gguf"
        run_checked([sys.executable, "-c", BOOT, str(root), str(a.model), str(up), "qwen2", "f32"])
        export(str(a.model), str(ours), "F32", progress=False)
        tu, to = tensors(up), tensors(ours)
        only = sorted(set(tu) ^ set(to))
        diff = sorted(n for n in set(tu) & set(to) if tu[n] != to[n])
        print(f"tensors: upstream {len(tu)}, ours {len(to)}; only in one: {only or 'none'}; type/shape differ: {diff or 'none'}")
        for n in diff:
            print(f"  {n}: upstream {tu[n]}, ours {to[n]}")
        from transformers import AutoTokenizer

        text = (a.model / "eval.txt").read_text() if (a.model / "eval.txt").is_file() else "The quick brown fox jumps over the lazy dog. " * 40
        ids = AutoTokenizer.from_pretrained(a.model)(text[:20000])["input_ids"][: a.tokens]
        lu, lo = logits(up, ids), logits(ours, ids)
        rel = float(np.abs(lu - lo).max() / (lu.max() - lu.min()))
        print(f"logits on {len(ids)} tokens: max|diff| = {np.abs(lu - lo).max():.3e} ({rel:.2e} of the logit range)")
        ok = not only and not diff and rel < 1e-5
        print("PARITY" if ok else "DIFFERENT")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
