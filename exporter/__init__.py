"""GGUF export, quantization through llama.cpp, and `check` (PPL/KLD/memory/speed)."""
