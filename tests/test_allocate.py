"""Allocation: pure tensor-in/tensor-out functions of moe2gguf.prune.allocate."""

from __future__ import annotations

import pytest
import torch

from moe2gguf.prune import allocate as A


def _scores(seed: int, layers: int = 3, experts: int = 5, width: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed, like real attribution: few channels hold most of it
    return [torch.rand(experts, width, generator=g, dtype=torch.float64) ** 6 for _ in range(layers)]


@pytest.mark.parametrize("layout", ["ragged", "uniform", "per-layer"])
@pytest.mark.parametrize("seed", range(5))
def test_allocation_never_exceeds_budget(layout: str, seed: int) -> None:
    lay = A.LAYOUTS.get(layout, A.Layout("per-layer", width="layer"))
    s = _scores(seed)
    cost = [7, 11, 13]  # different per-channel costs per layer
    total = sum(c * x.numel() for c, x in zip(cost, s))
    for frac in (0.0, 0.13, 0.5, 0.77, 1.0):
        alloc = A.allocate(s, cost, frac * total, lay)
        assert alloc.kept_params(cost) <= frac * total + 1e-9


def test_ragged_keeps_the_globally_best_channels_when_costs_are_equal() -> None:
    s = _scores(1)
    flat = torch.cat([x.flatten() for x in s])
    k = 100
    alloc = A.allocate(s, [1, 1, 1], k, A.LAYOUTS["ragged"])
    assert sum(map(sum, alloc.widths)) == k
    assert A.coverage(s, alloc) == pytest.approx(float(flat.topk(k).values.sum() / flat.sum()))


def test_uniform_layout_gives_one_width_and_each_expert_its_best_channels() -> None:
    s = _scores(2)
    alloc = A.allocate(s, [1, 1, 1], 0.5 * 3 * 5 * 16, A.LAYOUTS["uniform"])
    assert {w for layer in alloc.widths for w in layer} == {8}
    for x, layer in zip(s, alloc.channels):
        for e, ch in enumerate(layer):
            assert set(ch.tolist()) == set(x[e].topk(8).indices.tolist())


def test_alignment_rounds_widths_to_multiples() -> None:
    s = _scores(3)
    alloc = A.allocate(s, [1, 1, 1], 100, A.Layout("aligned", width="model", align=4))
    assert all(w % 4 == 0 for layer in alloc.widths for w in layer)
    assert alloc.kept_params([1, 1, 1]) <= 100


def test_floor_keeps_top_k_experts_alive_even_with_zero_scores() -> None:
    s = [torch.zeros(4, 8, dtype=torch.float64), torch.rand(4, 8, dtype=torch.float64)]
    floor = A.top_expert_floor([torch.tensor([0.0, 3.0, 1.0, 0.0]), torch.ones(4)], k=2)
    alloc = A.allocate(s, [1, 1], 20, A.LAYOUTS["ragged"], floor)
    assert sum(1 for w in alloc.widths[0] if w) >= 2
    assert alloc.widths[0][1] >= 1 and alloc.widths[0][2] >= 1
    assert alloc.kept_params([1, 1]) <= 20


def test_expert_drop_removes_lowest_mass_experts_per_layer() -> None:
    mass = [torch.tensor([5.0, 1.0, 4.0, 2.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    alloc = A.allocate_expert_drop(mass, [[8] * 4, [8] * 4], 0.5, min_experts=2)
    assert alloc.widths == [[8, 0, 8, 0], [0, 0, 8, 8]]


def test_coverage_of_everything_is_one() -> None:
    s = _scores(4)
    alloc = A.allocate(s, [1, 1, 1], 1e9, A.LAYOUTS["ragged"])
    assert A.coverage(s, alloc) == pytest.approx(1.0)
