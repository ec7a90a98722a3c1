"""What the CLI's options offer: choices, defaults and bounds, each defined once.

This module imports nothing, so `moe2gguf VERB --help` shows them without loading torch or
llama.cpp; the modules that act on a value import it from here.
"""

from __future__ import annotations

# prune --method
METHODS = ("coverage", "uniform", "magnitude", "reap", "frequency")
# old method names: refused with what they are called now
RENAMED = {"expert-drop": "method expert-drop is now called frequency (whole experts by router mass); REAP's saliency is method reap"}
# prune --score: channel attribution kinds (prune/scores.py computes them)
SCORE_KINDS = ("energy", "abs", "taylor")
# A removed expert costs more than its attribution says, which is why `--layout llama.cpp`
# measures its candidate shapes (prune/probe.py): this many, the most promising by shape
# quality; 0 ranks by shape quality alone
PROBE_SHAPES = 4
MAX_PROBE = 64  # candidate shapes built and measured: each is a pruned model run on calibration tokens

# llama.cpp's file types by the names llama-quantize accepts (llama_cpp.LLAMA_FTYPE_*; the
# exporter maps them to llama.cpp's numbers, and tests/test_cli.py pins this list to them)
QUANT_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0", "MXFP4_MOE", "NVFP4", "Q1_0", "Q2_0",
)
DEFAULT_QUANT = "Q4_K_M"

# --device: where calibrate runs each decoder layer (auto: CUDA, then MPS, then CPU)
DEVICES = ("auto", "cpu", "cuda", "mps")

# check --kv-type: llama.cpp KV-cache types
KV_TYPES = ("f16", "f32", "q8_0")
# check --task-format: llama-perplexity's multiple-choice formats (exporter/tasks.py reads them)
TASK_FORMATS = ("hellaswag", "winogrande", "multiple-choice")
MAX_CTX = 1 << 20  # tokens: a window this long needs more KV cache than any machine has
