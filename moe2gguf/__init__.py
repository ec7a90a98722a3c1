"""moe2gguf: structured pruning of Mixture-of-Experts LLMs, exported to GGUF for llama.cpp.

Data flow (one module per CLI verb):
    checkpoint -> calibrate -> prune (allocate + rewrite) -> export -> check
"""

__version__ = "0.1.0"
