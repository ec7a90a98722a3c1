"""Benchmark (not a test): upstream parity for every supported family on tiny random models.

    python tools/parity_families.py [--llama-cpp DIR]

Builds each family's tiny checkpoint exactly as its test does (tests/test_arch_*.py: the
real transformers config class, sharp attention, the reference tokenizer) and runs
tools/parity_upstream.py on it: llama.cpp's own convert_hf_to_gguf.py against our F32 export,
tensors and logits. Mixtral's upstream path needs `pip install sentencepiece`.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent


def families() -> list[tuple[str, type, object]]:
    sys.path.insert(0, str(REPO / "tests"))
    import test_arch_deepseek as ds
    import test_arch_deepseek_v3 as d3
    import test_arch_mixtral as mx
    import test_arch_olmoe as ol
    import test_arch_qwen2_moe as q2
    from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, MixtralForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM

    return [
        ("qwen2moe", Qwen2MoeForCausalLM, q2.config()),
        ("olmoe", OlmoeForCausalLM, ol.config()),
        ("mixtral", MixtralForCausalLM, mx.config()),
        # upstream writes no q_lora_rank when it is absent, and llama.cpp then refuses a
        # 2-layer deepseek2; the q_lora variant is the one both converters can express
        ("deepseek2 (q_lora)", DeepseekV2ForCausalLM, ds.config(q_lora_rank=32)),
        ("deepseek3", DeepseekV3ForCausalLM, d3.config()),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", help="unpacked llama.cpp source (default: parity_upstream downloads it)")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="parity-families-") as d:
        for name, cls, cfg in families():
            from test_arch_common import build_tiny

            folder = build_tiny(cls, cfg, pathlib.Path(d) / name.split()[0], attn_std=0.15)
            cmd = [sys.executable, str(REPO / "tools" / "parity_upstream.py"), str(folder)]
            if a.llama_cpp:
                cmd += ["--llama-cpp", a.llama_cpp]
            r = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("tensors:", "logits on"))]
            if "PARITY" in r.stdout:
                verdict = "PARITY"
            elif lines:
                verdict = "logits differ"
            else:
                verdict = "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:100]
            rows.append((name, "; ".join(lines) or "-", verdict))
    print("| family | upstream vs ours | verdict |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
