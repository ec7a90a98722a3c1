"""Which channels of which experts to keep: layouts and budget allocation (pure functions).

A `Layout` says, as data, at which granularity a deployment target lets widths differ.
Allocation is written once against it:

* every "group" of experts that must share one width (one expert for `ragged`, all experts
  of a layer for a per-layer width, all experts of the model for one global width) has a value
  curve V_g(w) = sum over its experts of the top-w channel scores of that expert. Each
  expert's channels are sorted by score, so V_g is concave in w;
* widths grow in steps of `layout.align` channels; the steps of all groups are taken in order of
  gain per parameter until the parameter budget is spent. For concave curves this greedy order
  is optimal up to the last step (exactly optimal when all steps cost the same, as channels of
  one architecture do), and it never exceeds the budget.

A deployable layout (`llama.cpp`: one width for the model in steps of 32, one expert count)
is a `LAYOUTS` entry; layouts with one shape for the model are allocated by prune/deploy.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe2gguf.layout import DEFAULT_LAYOUT, LAYOUTS, Layout, Scope  # noqa: F401  (allocation is written against them)

@dataclass
class Allocation:
    """Per layer, per ORIGINAL expert: kept channel ids (sorted ascending; empty = removed)."""

    channels: list[list[torch.Tensor]]

    @property
    def widths(self) -> list[list[int]]:
        return [[int(c.numel()) for c in layer] for layer in self.channels]

    def kept_params(self, channel_cost: list[int]) -> int:
        return sum(sum(w) * c for w, c in zip(self.widths, channel_cost, strict=True))


def _groups(layout: Layout, shape: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """(layer, expert) members of every group sharing a width."""
    if layout.width == "expert":
        return [[(l, e)] for l, (ne, _) in enumerate(shape) for e in range(ne)]
    if layout.width == "layer":
        return [[(l, e) for e in range(ne)] for l, (ne, _) in enumerate(shape)]
    return [[(l, e) for l, (ne, _) in enumerate(shape) for e in range(ne)]]


def allocate(
    scores: list[torch.Tensor],
    channel_cost: list[int],
    budget: float,
    layout: Layout,
    min_width: list[torch.Tensor] | None = None,
) -> Allocation:
    """Keep the channels that cover the most score within `budget` parameters.

    scores: per layer [n_experts, width] (non-negative, comparable across layers);
    channel_cost: per layer, parameters one channel costs (gate row + up row + down column);
    min_width: per layer [n_experts] widths forced before the budget is spent (e.g. so top-k
    routing keeps enough experts); they count against the budget.
    """
    shape = [tuple(s.shape) for s in scores]
    widths_full = {s[1] for s in shape}
    if layout.width != "expert" and len(widths_full) > 1:
        raise ValueError("a shared width needs equally wide experts in the input")
    order = [torch.argsort(s.double(), dim=1, descending=True, stable=True) for s in scores]
    sorted_s = [s.double().gather(1, o) for s, o in zip(scores, order, strict=True)]
    a = layout.align

    gains: list[torch.Tensor] = []
    costs: list[torch.Tensor] = []
    forced: list[torch.Tensor] = []
    group_of: list[torch.Tensor] = []
    groups = _groups(layout, shape)
    for g, members in enumerate(groups):
        width = shape[members[0][0]][1]
        n_steps = width // a
        curve = torch.zeros(n_steps, dtype=torch.float64)
        cost = 0.0
        need = 0
        for l, e in members:
            curve += sorted_s[l][e, : n_steps * a].reshape(n_steps, a).sum(1)
            cost += a * channel_cost[l]
            if min_width is not None:
                need = max(need, -(-int(min_width[l][e]) // a))
        gains.append(curve)
        costs.append(torch.full((n_steps,), cost, dtype=torch.float64))
        forced.append(torch.arange(n_steps) < need)
        group_of.append(torch.full((n_steps,), g, dtype=torch.int64))
    gain, cost, force, grp = (torch.cat(t) for t in (gains, costs, forced, group_of))
    # forced steps first, then by gain per parameter; stable, so within a group (non-increasing
    # gains laid out in step order) steps are always taken as a prefix
    key = torch.where(force, torch.full_like(gain, float("inf")), gain / cost)
    idx = torch.argsort(key, descending=True, stable=True)
    take = torch.cumsum(cost[idx], 0) <= budget + 1e-6
    if force.any() and not take[: int(force.sum())].all():
        raise ValueError("the forced minimum widths alone exceed the budget")
    n_steps_kept = torch.bincount(grp[idx[take]], minlength=len(groups))

    channels: list[list[torch.Tensor]] = [[torch.empty(0, dtype=torch.int64)] * ne for ne, _ in shape]
    for g, members in enumerate(groups):
        w = int(n_steps_kept[g]) * a
        for l, e in members:
            channels[l][e] = torch.sort(order[l][e, :w]).values
    return Allocation(channels)


def top_expert_floor(expert_scores: list[torch.Tensor], k: int, width: int = 1) -> list[torch.Tensor]:
    """min_width for `allocate`: the k best experts of every layer keep at least `width`
    channels, so top-k routing still finds k experts (as REAP checks top_k stays reachable)."""
    out = []
    for s in expert_scores:
        m = torch.zeros(s.numel(), dtype=torch.int64)
        m[torch.topk(s.double(), min(k, s.numel())).indices] = width
        out.append(m)
    return out


def allocate_expert_drop(
    expert_scores: list[torch.Tensor], widths: list[list[int]], ratio: float, min_experts: int, groups: list[int] | None = None
) -> Allocation:
    """REAP-style: per layer remove the round(ratio * n) experts of lowest score (router-weighted
    frequency), keeping at least `min_experts`; kept experts stay whole. With `groups` (per layer,
    the router's contiguous expert groups) the kept count is the nearest multiple of the group
    count and every group keeps its best count / groups."""
    channels = []
    groups = groups or [1] * len(expert_scores)
    for s, w, g in zip(expert_scores, widths, groups, strict=True):
        n = s.numel()
        keep = max(min_experts, n - round(ratio * n))
        if g > 1:
            keep = max(-(-min_experts // g) * g, round(keep / g) * g)
        kept = set(group_topk(s.double(), keep, g).tolist())
        channels.append([torch.arange(w[e]) if e in kept else torch.empty(0, dtype=torch.int64) for e in range(n)])
    return Allocation(channels)


# ----- grouped routing (DeepSeek-V3 n_group): every group keeps the same expert count -------


def group_topk(values: torch.Tensor, k: int, groups: int = 1) -> torch.Tensor:
    """Indices of the k largest `values`; with groups > 1, k / groups from each of `groups`
    contiguous equal groups (so the router's grouping survives the removal). Among equal values
    the lower index wins (a stable sort, where torch.topk leaves ties unspecified), so the
    allocation and the shape scoring of prune/deploy.py keep the same experts."""
    if groups <= 1:
        return torch.argsort(values, descending=True, stable=True)[:k]
    n = values.numel()
    if n % groups or k % groups:
        raise ValueError(f"{k} of {n} experts cannot be kept evenly across {groups} groups")
    size = n // groups
    idx = torch.argsort(values.reshape(groups, size), dim=1, descending=True, stable=True)[:, : k // groups]
    return (idx + torch.arange(groups)[:, None] * size).flatten()


def min_grouped_experts(n_used: int, groups: int, groups_used: int) -> int:
    """Fewest experts a layer may keep: a multiple of `groups` whose `groups_used` best groups
    still hold top-k's n_used experts."""
    return groups * -(-n_used // groups_used) if groups > 1 else n_used


def keep_every_expert_if_grouped(floor: list[torch.Tensor], groups: list[int]) -> list[torch.Tensor]:
    """Ragged coverage under grouped routing: every expert keeps at least one channel, since
    removing experts unevenly across groups would change the grouping."""
    return [f.clamp_min(1) if g > 1 else f for f, g in zip(floor, groups, strict=True)]


def coverage(scores: list[torch.Tensor], alloc: Allocation) -> float:
    """Fraction of the total score that the kept channels hold."""
    total = sum(float(s.double().sum()) for s in scores)
    kept = sum(float(s[e, c].double().sum()) for s, layer in zip(scores, alloc.channels, strict=True) for e, c in enumerate(layer))
    return kept / total if total > 0 else 1.0
