"""Benchmark (not a test): upstream parity for every supported family on tiny random models.

    python tools/parity_families.py [--llama-cpp DIR]

Builds each family's tiny checkpoint exactly as its test does (tests/test_arch_*.py: the
real transformers config class, sharp attention, the reference tokenizer) and runs
tools/parity_upstream.py on it: llama.cpp's own convert_hf_to_gguf.py against our F32 export,
tensors and logits.

DeepSeek-V3 (measured with llama-cpp-python 0.3.36's converter): upstream's GGUF holds the same
tensors as ours, bit for bit, and the same keys but one: it writes `expert_gating_func` only
when config.json has a `scoring_func` key (conversion/base.py). transformers' DeepseekV3Config
has no such key and its model always scores with sigmoid, so a checkpoint saved by transformers
(as the tiny one here) converts upstream without the key, and llama.cpp's deepseek2 loader then
defaults to softmax gating: logits 5.2e-3 apart (3.45e-3 of the range) on 128 tokens, while ours
(sigmoid, written from the architecture) matches transformers to 2.8e-7
(tests/test_arch_deepseek_v3.py). With `"scoring_func": "sigmoid"` in config.json, as DeepSeek's
own released checkpoints carry, the two GGUFs give identical logits (max|diff| 0): the row
"deepseek3 (+scoring_func)" shows it. So ours is right; upstream's gap is its converter reading
the gating from a key transformers does not write.
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
        # the same model with the key DeepSeek's released config.json has and upstream reads
        ("deepseek3 (+scoring_func)", DeepseekV3ForCausalLM, d3.config()),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", help="unpacked llama.cpp source (default: parity_upstream downloads it)")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="parity-families-") as d:
        for name, cls, cfg in families():
            from test_arch_common import build_tiny

            folder = build_tiny(cls, cfg, pathlib.Path(d) / name.split()[0] / str(len(rows)), attn_std=0.15)
            if "scoring_func" in name:  # see the docstring: upstream defaults to softmax without it
                import json

                c = json.loads((folder / "config.json").read_text())
                (folder / "config.json").write_text(json.dumps({**c, "scoring_func": "sigmoid"}, indent=2))
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
    print("\ndeepseek3: upstream writes expert_gating_func only from config.json's scoring_func, which transformers' "
          "DeepseekV3Config does not save; without it llama.cpp gates with softmax instead of V3's sigmoid (see this script's docstring)")


if __name__ == "__main__":
    main()
