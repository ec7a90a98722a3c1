"""What a deployment target holds, as data: the `Layout` every module asks.

prune allocates for a layout (prune/allocate.py: a greedy fill where widths are free per expert
or per layer, prune/deploy.py: a choice among (count, width) shapes where the model has one of
each), the GGUF writer pads or refuses what the layout does not hold and states the expert
width and count keys as it says (a scalar for the model, or a per-layer array), and the arch
files write those keys through it. No other module re-checks widths or counts.

Pure data, no torch: the CLI reads the names and the default without loading a model stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["expert", "layer", "model"]


@dataclass(frozen=True)
class Layout:
    """What a deployment target holds, as data: every other module asks this object (the
    allocator, the shape search, the GGUF writer and the arch hooks), none re-checks it.

    The GGUF states a number whose scope is the whole model as a scalar and one whose scope is
    a layer as a per-layer array (llama.cpp's `get_key_or_arr`); a 3-D GGUF expert tensor has
    one width per layer, so widths free per expert are stored at their layer's widest."""

    name: str
    width: Scope  # the experts that share one width: each expert, each layer, or the whole model
    align: int = 1  # widths are multiples of this many channels
    drop_experts: bool = True  # an expert may reach width 0 and be removed (router row with it)
    count: Literal["layer", "model"] = "layer"  # experts kept: free per layer, or one count for the model
    kquant_align: int = 1  # widths that keep K-quants along rows; others fall back (priced by exporter.sizing)
    # a checkpoint whose widths differ inside one of this layout's width groups, on export:
    # zero-padded to the group's widest (exact, but the padding saves nothing) or refused
    ragged: Literal["pad", "refuse"] = "pad"

    @property
    def one_shape(self) -> bool:
        """One expert count and one width for the whole model: the allocation is a choice
        among (count, width) shapes (prune/deploy.py), not a greedy fill (`allocate`)."""
        return self.width == "model" and self.count == "model"

    def stored_widths(self, widths: list[list[int]]) -> list[list[int]]:
        """Per layer, per expert, the width the target stores: every expert at the widest of its
        width group. ValueError naming the problem when the layout refuses what it would pad,
        or when layers keep different expert counts under one count for the model."""
        counts = sorted({len(w) for w in widths if w})
        if self.count == "model" and len(counts) > 1:
            raise ValueError(f"layers keep different expert counts ({', '.join(map(str, counts))}); layout {self.name} holds one expert count for the model")
        scope = "layer" if self.width == "expert" else self.width
        groups = [[w] for w in widths] if scope == "layer" else [widths]
        out: list[list[int]] = []
        for group in groups:
            widest = max((w for layer in group for w in layer), default=0)
            if self.ragged == "refuse" and any(w != widest for layer in group for w in layer):
                raise ValueError(f"experts have different widths; layout {self.name} holds one width per {scope} and refuses to pad")
            out += [[widest] * len(layer) for layer in group]
        return out

    def gguf_value(self, per_layer: list[int], scope: Scope) -> int | list[int]:
        """A per-layer number (0 for a layer without experts) as the GGUF states it: a scalar
        when `scope` is the whole model, else the per-layer array."""
        if scope != "model":
            return list(per_layer)
        values = {v for v in per_layer if v}
        if len(values) != 1:
            raise ValueError(f"layout {self.name}: one value for the model expected, got {sorted(values)}")
        return values.pop()

    def gguf_widths(self, stored: list[list[int]]) -> int | list[int]:
        """The expert width key (`expert_feed_forward_length`) of `stored_widths`' result."""
        return self.gguf_value([max(layer, default=0) for layer in stored], self.width)

    def gguf_counts(self, stored: list[list[int]]) -> int | list[int]:
        """The expert count key (`expert_count`) of `stored_widths`' result."""
        return self.gguf_value([len(layer) for layer in stored], self.count)


LAYOUTS: dict[str, Layout] = {
    "ragged": Layout("ragged", width="expert"),
    # the baselines' layout: one width for every expert of the model
    "uniform": Layout("uniform", width="model", drop_experts=False),
    # stock llama.cpp 0.3.36 (qwen3moe/qwen2moe/deepseek2/llama/olmoe): one n_ff_exp and one
    # n_expert for the model; legacy quant blocks need widths in 32s, K-quant blocks in 256s.
    # A release that loads per-layer widths is one more entry:
    # Layout("llama.cpp-per-layer", width="layer", count="layer", align=32, kquant_align=256).
    "llama.cpp": Layout("llama.cpp", width="model", count="model", align=32, kquant_align=256),
}
# what `prune` allocates for and `export` writes unless told otherwise: the layout llama.cpp runs
DEFAULT_LAYOUT = "llama.cpp"

# the layouts `prune --layout` allocates for (uniform is the baselines' allocation, not a target)
PRUNE_LAYOUTS = ("llama.cpp", "ragged")
