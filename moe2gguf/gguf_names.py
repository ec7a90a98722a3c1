"""GGUF names moe2gguf writes and reads back, defined once for the exporter, calibration and
`check` (gguf-py only: reading a GGUF's names needs neither torch nor llama.cpp)."""

from __future__ import annotations

import gguf

# Expert parts -> gguf-py's 3D expert tensors (one per layer, experts stacked), the same for
# every MoE family llama.cpp knows.
EXPERT_TENSORS: dict[str, gguf.MODEL_TENSOR] = {
    "gate": gguf.MODEL_TENSOR.FFN_GATE_EXP,
    "up": gguf.MODEL_TENSOR.FFN_UP_EXP,
    "down": gguf.MODEL_TENSOR.FFN_DOWN_EXP,
}

# Our own KV: the true per-expert widths when the GGUF stores padding, so `check` can
# report kept parameters honestly (llama.cpp ignores unknown keys).
KV_EXPERT_WIDTHS = "moe2gguf.expert_widths"
