"""Calibration statistics (observers) and the pure math that turns them into scores.

Observers follow the Wanda/GPTQ `add_batch` pattern and keep float64 running sums, so the
result does not depend on how the calibration tokens are batched.

Attribution of channel j of expert e (what `coverage` keeps as much of as it can):

    energy[e, j] = sum_x (p_e(x) * h_j(x))^2 * ||W_down[:, j]||^2

i.e. the squared norm of the channel's contribution to the layer's routed output, weighted by
the router weight p_e(x) of each token x that reaches the expert. We use the second moment
rather than the paper's first moment E|p h_j| ||d_j||: removing a set S of channels changes
the MoE output by sum_{j in S} p h_j d_j, whose expected squared norm is (for weakly
correlated channels) the sum of the removed energies, so energies are additive in exactly
the way a coverage/knapsack allocation assumes. The first-moment score (`abs`) is kept too,
and `tools/bench_prune.py` compares them.

`taylor` is the MoE-Slimming paper's first-order attribution,

    taylor[e, j] = sum_x |h_j(x) * dL/dh_j(x)|

with h the expert's intermediate activation (the input of down_proj) and L the language-model
loss (see `TaylorStats` and `prune.calibrate.taylor_pass` for how the gradient is obtained).

REAP's expert saliency (Lasby et al., "REAP the Experts") is the mean, over the tokens routed
to expert e, of router weight times the norm of the expert's output:

    reap[e] = (1 / |X_e|) sum_{x in X_e} g_e(x) * ||f_e(x)||
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from moe2gguf.device import CPU  # statistics are summed there whatever device computed the batch
from moe2gguf.options import SCORE_KINDS
from moe2gguf.prune.gram import GramSpill

F64 = torch.float64
NORM_BLOCK_BYTES = 64 << 20  # `norms`: the float64 copy of a weight's rows made at once
# The float64 copy of a batch's inputs that `InputStats` and `ScaleStats` sum, made this many
# bytes of rows at a time. Whole, it was 64 MB at 4,096 tokens of hidden 2,048, and its square as
# much again, per hooked projection: in row blocks calibrate peaked at 2.29-2.32 / 2.35-2.45 GiB
# (two runs) at 2 / 4 layers of Qwen3-30B-A3B's size, against 2.45 / 2.56, in the same time
# (tools/bench_scale.py).
ROW_BLOCK_BYTES = 1 << 20


class ExpertStats:
    """Per-expert routing statistics and per-channel activation moments of one MoE layer."""

    def __init__(self, n_experts: int, widths: list[int], hidden: int, gram: GramSpill | None = None):
        self.freq = torch.zeros(n_experts, dtype=F64)  # tokens routed to the expert
        self.mass = torch.zeros(n_experts, dtype=F64)  # sum of their router weights (`frequency`)
        self.reap = torch.zeros(n_experts, dtype=F64)  # sum of router weight x ||expert output|| (REAP)
        self.abs_act = [torch.zeros(w, dtype=F64) for w in widths]  # sum p |h_j|
        self.sq_act = [torch.zeros(w, dtype=F64) for w in widths]  # sum (p h_j)^2
        # sum p^2 h h^T, for the least-squares refit of the kept down_proj columns: the
        # activations go to disk and the matrices are made after the pass (prune/gram.py)
        self.gram = gram
        self.in_sum2 = torch.zeros(n_experts, hidden, dtype=F64)  # imatrix of gate/up
        self.mid_sum2 = [torch.zeros(w, dtype=F64) for w in widths]  # imatrix of down (unweighted)

    def observe(self, xid: int, _token: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None) -> None:
        """As `ExpertList.observer`."""
        self.add_batch(xid, x, h, w, y)

    def add_batch(self, xid: int, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """Tokens x [n, hidden], activations h [n, width], weights w [n, 1], and the expert's
        output out = down_proj(h) [n, hidden] (before the router weight) for REAP's saliency.
        Each sum is one reduction over a float64 copy of h or p h, none over a temporary of their
        size: at Mixtral-8x7B's width of 14,336 each such [n, width] copy is 117 MB a batch."""
        x, w = x.to(CPU, F64), w.to(CPU, F64).reshape(-1, 1)
        h = h.to(CPU, F64, copy=True)  # scaled by w in place below
        self.freq[xid] += x.shape[0]
        self.mass[xid] += w.sum()
        if out is not None:
            self.reap[xid] += (w[:, 0] * out.to(CPU, F64).norm(dim=1)).sum()
        self.in_sum2[xid] += _sum_sq(x)
        self.mid_sum2[xid] += _sum_sq(h)
        ph = h.mul_(w)
        self.abs_act[xid] += torch.linalg.vector_norm(ph, 1, dim=0)
        self.sq_act[xid] += _sum_sq(ph)
        if self.gram is not None:
            self.gram.add(xid, ph)


def _sum_sq(t: torch.Tensor) -> torch.Tensor:
    """sum over rows of t^2, per column, without a temporary of t's size."""
    return torch.linalg.vector_norm(t, 2, dim=0).square_()


class TaylorStats:
    """Per-channel first-order attribution sum_x |h_j(x) * dL/dh_j(x)| of one MoE layer's experts."""

    def __init__(self, widths: list[int]):
        self.taylor = [torch.zeros(w, dtype=F64) for w in widths]

    def add_batch(self, xid: int, h: torch.Tensor, grad: torch.Tensor) -> None:
        """Activations h [n, width] reaching expert xid and the loss gradient with respect to them.
        The absolute value is taken per token, before summing, as the paper's code does: a
        channel whose contributions cancel over tokens still matters to each token."""
        self.taylor[xid] += (h.to(CPU, F64) * grad.to(CPU, F64)).abs().sum(0)


def _row_blocks(x: torch.Tensor, block_bytes: int = ROW_BLOCK_BYTES) -> Iterator[torch.Tensor]:
    """x [n, d] as float64 on the CPU, `block_bytes` of rows at a time."""
    step = max(1, block_bytes // (8 * max(1, x.shape[-1])))
    for i in range(0, x.shape[0], step):
        yield x[i : i + step].to(CPU, F64)


class InputStats:
    """Sum of squared inputs per column and token count of one linear weight (the imatrix)."""

    def __init__(self, n_in: int):
        self.sum2 = torch.zeros(n_in, dtype=F64)
        self.count = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        for rows in _row_blocks(x):
            self.sum2 += (rows * rows).sum(0)
        self.count += x.shape[0]


class ScaleStats:
    """Mean squared norm of a layer's residual-stream output (for cross-layer normalisation)."""

    def __init__(self) -> None:
        self.sum_sq = 0.0
        self.count = 0

    def add_batch(self, y: torch.Tensor) -> None:
        y = y.reshape(-1, y.shape[-1])
        for rows in _row_blocks(y):
            self.sum_sq += float((rows * rows).sum())
        self.count += y.shape[0]

    @property
    def mean_sq(self) -> float:
        return self.sum_sq / max(self.count, 1)


# --- pure math -------------------------------------------------------------------------

def channel_scores(kind: str, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Attribution [n_experts, width] of one layer from its calibration tensors: the activation
    moments `abs_act`/`sq_act` with ||W_down[:, j]|| `down_norm`, or the summed `taylor` terms."""
    if kind == "energy":
        return stats["sq_act"] * stats["down_norm"].square()
    if kind == "abs":
        return stats["abs_act"] * stats["down_norm"]
    if kind == "taylor":
        return stats["taylor"]
    raise ValueError(f"unknown score kind {kind!r}; one of {SCORE_KINDS}")


def reap_saliency(reap_sum: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """REAP's per-expert saliency: the summed g * ||f|| over the tokens routed to each expert,
    divided by their count (an expert no token reached scores 0)."""
    return torch.where(freq > 0, reap_sum / freq.clamp_min(1), torch.zeros_like(reap_sum))


def normalise_layers(scores: list[torch.Tensor], resid_mean_sq: list[float], kind: str) -> list[torch.Tensor]:
    """Make scores of different layers comparable.

    Every layer's output feeds the next layers through an RMSNorm, so what a later layer sees
    of an error e added to the residual stream is e / rms(residual). Dividing a layer's
    scores by the residual stream's mean square (energy) or its rms (abs) turns them into
    relative perturbations, which is what one unit of score means in every layer alike.
    `taylor` is left as it is: its gradient already carries what the rest of the model does
    with a layer's perturbation, so every layer's score is in the same unit (loss).
    """
    if kind == "taylor":
        return list(scores)
    out = []
    for s, ms in zip(scores, resid_mean_sq, strict=True):
        scale = ms if kind == "energy" else ms**0.5
        out.append(s / max(scale, 1e-30))
    return out


def weight_norms(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Magnitude score of every channel of one expert: ||gate_j|| * ||up_j|| * ||down_:,j||
    (the product, because the channel's output scales with each of the three)."""
    return norms(gate, dim=1) * norms(up, dim=1) * norms(down, dim=0)


def norms(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The float64 norms of a 2-D weight's rows (dim=1) or columns (dim=0), a block of rows at a
    time: a float64 copy of a whole expert weight is 470 MB at Mixtral-8x7B's 4,096 x 14,336,
    and the three of one expert were the peak of calibrate's pass there."""
    blocks = [torch.linalg.vector_norm(rows, 2, dim=dim) for rows in _row_blocks(w, NORM_BLOCK_BYTES)]
    if dim == 1:
        return torch.cat(blocks) if blocks else torch.zeros(0, dtype=F64)
    return torch.stack(blocks).square_().sum(0).sqrt_() if blocks else torch.zeros(w.shape[1], dtype=F64)
