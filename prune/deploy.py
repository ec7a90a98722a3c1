"""Allocation inside a layout of one shape for the model (`Layout.one_shape`; stock llama.cpp's
`LAYOUTS["llama.cpp"]`), and planning to a GGUF size target.

Such a layout holds one width W for every expert and one count K for every layer of the model
(the layout says so, moe2gguf/layout.py); which K experts each layer keeps and which
W channels each kept expert keeps are free. For a given (K, W) the best choice is exact and
cheap: per expert its top-W channels by attribution, per layer the K experts whose top-W channels
hold the most. So the allocation enumerates the feasible (K, W) pairs (K >= top-k, W a multiple of
the layout's alignment), ranks them by attribution (`ShapeScores`: every shape from one sort per
layer), and measures the most promising ones as pruned models on calibration tokens
(prune/probe.py), keeping the least KLD:

* under a parameter budget (`--ratio`): the shapes that remove within `RATIO_BAND` of R of the
  routed parameters, or the nearest ones when none does (said on stderr and in the report);
  a width that is no multiple of 256 costs llama.cpp's type fallback, which the report prices;
* under a byte budget (`--target-size`): the GGUF size llama.cpp's own dry run predicts for a
  model of K experts of width W (exporter/sizing.py), which prices the type fallback of widths
  that are not multiples of 256 (Q4_K -> Q5_0, Q6_K -> Q8_0 on ffn_down_exps rows). Every
  shape is sized from the same floor of types (`lean_down_types`), and the bytes left under
  the target are then spent on per-tensor type upgrades (`tensor_types`).

Shape math here; bytes and tensor types come from exporter/sizing.py (llama.cpp's own dry run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from moe2gguf.arch import MoEArch
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.device import CPU
from moe2gguf.errors import UserError
from moe2gguf.exporter.sizing import (
    MARGIN,
    SizePlan,
    kquant_fallback,
    lean_down_types,
    plan_tensor_types,
    predict_layout_bytes,
    predict_size,
)
from moe2gguf.memory import release_freed
from moe2gguf.options import PROBE_SHAPES
from moe2gguf.prune import allocate as A
from moe2gguf.prune.allocate import Allocation, Layout, coverage, group_topk, min_grouped_experts
from moe2gguf.prune.calibrate import calibration_windows
from moe2gguf.units import human_bytes

if TYPE_CHECKING:
    from moe2gguf.prune.prune import Calib


@dataclass(frozen=True)
class Shape:
    """One deployable shape: K experts of width W in every MoE layer."""

    experts: int
    width: int


def feasible_shapes(layout: Layout, n_experts: int, width: int, n_used: int, groups: int = 1, groups_used: int = 1) -> list[Shape]:
    """Every (K, W) the layout can hold short of the unpruned model, K >= top-k. Under grouped
    routing (`groups` contiguous expert groups, `groups_used` picked per token) K is a multiple
    of `groups` whose best `groups_used` groups still hold top-k's experts."""
    if not layout.one_shape:
        raise ValueError(f"layout {layout.name} has no one shape for the model; allocate it with prune.allocate.allocate")
    widths = sorted({w for w in range(layout.align, width + 1, layout.align)} | {width})
    k_min = min_grouped_experts(n_used, groups, groups_used)
    ks = [k for k in range(k_min, n_experts + 1) if k % groups == 0]
    return [Shape(k, w) for k in ks for w in widths if (k, w) != (n_experts, width)]


def nearest_widths(w: int, layout: Layout, full: int) -> list[int]:
    a = layout.align
    lo, hi = max(a, w // a * a), min(full, -(-w // a) * a)
    return sorted({lo, hi})


def _f64(s: torch.Tensor) -> np.ndarray:
    # numpy, single-threaded: torch's threaded sort and float64 cast of one layer's scores were
    # 7x slower than this on 2 busy cores (tools/bench_shape_choice.py)
    return s.detach().cpu().numpy().astype(np.float64)


def top_sums(s: torch.Tensor | np.ndarray) -> np.ndarray:
    """[experts, width + 1] float64: column w holds each expert's top-w channel score (one sort
    of the layer, summed as prefixes; column 0 is 0)."""
    a = s if isinstance(s, np.ndarray) else _f64(s)
    out = np.zeros((a.shape[0], a.shape[1] + 1))
    np.cumsum(-np.sort(-a, axis=1), axis=1, out=out[:, 1:])
    return out


def allocate_shape(scores: list[torch.Tensor], shape: Shape, groups: list[int] | None = None) -> Allocation:
    """Per layer the K experts with the most top-W score (K / groups per expert group when the
    router groups experts), per kept expert its top-W channels."""
    channels = []
    for s, g in zip(scores, groups or [1] * len(scores), strict=True):
        order = torch.argsort(s.double(), dim=1, descending=True, stable=True)[:, : shape.width]
        keep = set(group_topk(torch.from_numpy(top_sums(s)[:, shape.width].copy()), shape.experts, g).tolist())
        channels.append([torch.sort(order[e]).values if e in keep else torch.empty(0, dtype=torch.int64) for e in range(s.shape[0])])
    return Allocation(channels)


# A removed expert costs more than its attribution says: its tokens are re-routed to kept experts
# whose channels were chosen on other tokens. Measured on the bundled model (tools/bench_size.py,
# PyTorch PPL, 40 windows): the ranking of (K, W) by coverage alone was wrong at R=0.5 ((5, 192)
# +3.3% PPL vs (8, 128) +2.4%); counting removed-expert attribution 5x ranks every measured pair right.
EXPERT_LOSS_WEIGHT = 5.0
# ...which is why `--layout llama.cpp` measures PROBE_SHAPES candidate shapes instead (prune/probe.py)


class ShapeScores:
    """Coverage and predicted quality of every shape (K, W) of a grid, as `allocate_shape`
    would keep it. Quality = 1 - (attribution of trimmed channels of kept experts) - weight *
    (attribution of removed experts), over the total attribution.

    Per layer the channel scores are sorted once and summed as prefixes (`top_sums`: every
    expert's top-W score for every W is one column); per W the experts are ordered once by that
    score (within their router group, ties to the lower index as `group_topk` breaks them) and
    summed as prefixes again, so the K best experts' score is one entry. Every shape is then a
    lookup: scoring the 2,903 shapes of a 128-expert x 768 model costs one sort of the channels
    and one of the experts per grid width in each layer, not a sort of the layer per shape
    (tools/bench_shape_choice.py)."""

    def __init__(self, scores: list[torch.Tensor], widths: list[int], counts: list[int], groups: list[int] | None = None):
        self.widths, self.counts = sorted(set(widths)), sorted(set(counts))
        self._w = {w: i for i, w in enumerate(self.widths)}
        self._k = {k: i for i, k in enumerate(self.counts)}
        self.kept_top = np.zeros((len(self.counts), len(self.widths)))  # sum of kept experts' top-W scores
        self.kept_full = np.zeros_like(self.kept_top)  # sum of kept experts' whole scores
        self.total = 0.0
        for s, g in zip(scores, groups or [1] * len(scores), strict=True):
            n, width = s.shape
            if n % g or any(k % g or not g <= k <= n for k in self.counts) or self.widths[-1] > width:
                raise ValueError(f"shapes {self.counts} x {self.widths} do not fit {n} experts of width {width} in {g} groups")
            size = n // g
            a = _f64(s)
            top = top_sums(a)[:, self.widths].reshape(g, size, len(self.widths))
            full = a.sum(1)
            order = np.argsort(-top, axis=1, kind="stable")  # descending, ties to the lower index
            at = [k // g - 1 for k in self.counts]  # the best k/g of every group
            self.kept_top += np.take_along_axis(top, order, 1).cumsum(1)[:, at].sum(0)
            self.kept_full += np.take_along_axis(np.broadcast_to(full.reshape(g, size, 1), top.shape), order, 1).cumsum(1)[:, at].sum(0)
            self.total += float(full.sum())

    @classmethod
    def of(cls, scores: list[torch.Tensor], shapes: list[Shape], groups: list[int] | None = None) -> ShapeScores:
        return cls(scores, [s.width for s in shapes], [s.experts for s in shapes], groups)

    def _at(self, shape: Shape) -> tuple[float, float]:
        i, j = self._k[shape.experts], self._w[shape.width]
        return float(self.kept_top[i, j]), float(self.kept_full[i, j])

    def coverage(self, shape: Shape) -> float:
        """coverage(allocate_shape(...)) without building the allocation."""
        return self._at(shape)[0] / self.total if self.total > 0 else 1.0

    def quality(self, shape: Shape, weight: float = EXPERT_LOSS_WEIGHT) -> float:
        top, full = self._at(shape)
        return 1.0 - ((full - top) + weight * (self.total - full)) / self.total if self.total > 0 else 1.0

    def best(self, shapes: list[Shape]) -> tuple[Shape, float]:
        """The shape of best predicted quality (ties: the smaller one), and its coverage."""
        if not shapes:
            raise ValueError("no feasible shape")
        best = min(shapes, key=lambda sh: (-self.quality(sh), sh.experts * sh.width))
        return best, self.coverage(best)


def shape_coverage(scores: list[torch.Tensor], shape: Shape, groups: list[int] | None = None) -> float:
    """coverage(allocate_shape(...)) without building the allocation."""
    return ShapeScores.of(scores, [shape], groups).coverage(shape)


def shape_quality(scores: list[torch.Tensor], shape: Shape, weight: float = EXPERT_LOSS_WEIGHT, groups: list[int] | None = None) -> float:
    """Predicted quality of a shape (`ShapeScores.quality`)."""
    return ShapeScores.of(scores, [shape], groups).quality(shape, weight)


def best_shape(scores: list[torch.Tensor], shapes: list[Shape], groups: list[int] | None = None) -> tuple[Shape, float]:
    """The shape of best predicted quality (ties: the smaller one), and its coverage."""
    return ShapeScores.of(scores, shapes, groups).best(shapes)


def expert_grouping(arch) -> tuple[list[int], int, int]:  # noqa: ANN001
    """(groups per MoE layer, groups of the model, groups used per token) from the arch hooks;
    one expert count for the model needs one grouping."""
    groups = [arch.expert_groups(b) for b in arch.moe_layers]
    used = {arch.expert_groups_used(b) for b in arch.moe_layers}
    if len(set(groups)) > 1 or len(used) > 1:
        raise NotImplementedError("per-layer expert groupings in the llama.cpp layout")
    return groups, groups[0], used.pop()


def shape_params(shape: Shape, channel_cost: list[int]) -> int:
    return shape.experts * shape.width * sum(channel_cost)


# `--ratio R` lands within this many points of R (routed-expert parameters removed): a shape
# that removes much more than asked is not a better answer to the question, whatever the probe
# measures of it (on the tiny DeepSeek model it once picked 2 of 8 experts for R=0.3)
RATIO_BAND = 0.02


def ratio_band(shapes: list[Shape], ratio: float, full_params: int, channel_cost: list[int], band: float = RATIO_BAND) -> tuple[list[Shape], bool]:
    """(the shapes whose removed fraction of routed parameters is within `band` of `ratio`,
    True), or, when there is none, (the nearest ones, all at the same least distance, False)."""
    def dist(s: Shape) -> float:
        return abs(1.0 - shape_params(s, channel_cost) / full_params - ratio)

    inside = [s for s in shapes if dist(s) <= band + 1e-9]
    if inside or not shapes:
        return inside, True
    near = min(dist(s) for s in shapes)
    return [s for s in shapes if dist(s) <= near + 1e-9], False


def fallback_note(shape: Shape, ratio: float, plan: SizePlan, base: SizePlan, fallback: dict[str, dict], aligned: tuple[Shape, float, int] | None, kquant_align: int) -> list[str]:
    """What llama.cpp's type fallback on an unaligned width does to the bytes `--ratio` saves,
    and the aligned shape of the band (shape, ratio, bytes) that would keep the native types."""
    if not fallback:
        return []
    extra = sum(f["extra_bytes"] for f in fallback.values())
    moves = ", ".join(sorted({f"{f['wanted']} -> {f['used']}" for f in fallback.values()}))
    smaller = lambda b: f"{100 * (1 - b / base.total_bytes):.1f}%"  # noqa: E731
    alt = ""
    if aligned is not None:
        a, r, b = aligned
        alt = f"; {a.experts} x {a.width} (ratio {r:.4f}, --experts {a.experts} --width {a.width}) keeps them: {b:,} bytes, {smaller(b)} smaller"
    return [
        f"{shape.experts} experts x width {shape.width} removes {100 * ratio:.1f}% of routed parameters, but the {plan.quant} GGUF is "
        f"{smaller(plan.total_bytes)} smaller ({smaller(plan.total_bytes - extra)} without the fallback): width {shape.width} is no multiple "
        f"of {kquant_align}, so llama.cpp stores ffn_down_exps {moves} (+{extra:,} bytes){alt}; --target-size plans bytes instead"
    ]




@dataclass(frozen=True)
class DeployRequest:
    """What `prune` asks of a layout with one shape for the model: a parameter ratio or a GGUF
    size target at `quant`, optionally a forced width / expert count, and how to choose."""

    ratio: float | None
    target_size: int | None
    quant: str
    layout: Layout = A.LAYOUTS["llama.cpp"]
    score: str = "energy"
    normalise: bool = True
    width: int | None = None
    experts: int | None = None
    probe: int = PROBE_SHAPES  # candidate shapes measured as pruned models (0: attribution alone)
    refit: bool = True
    reconstruct: bool = False
    device: torch.device = CPU  # where the probe runs its layers and the output head


def plan_deployable(cal: Calib, ckpt: Checkpoint, arch: MoEArch, req: DeployRequest) -> tuple[Allocation, float, dict]:
    """(per-MoE-layer Allocation, coverage, report entries) for a layout of one shape (K experts
    of width W in every layer). With `probe` > 0 the shape is the one of least measured KLD (on
    calibration tokens) among the `probe` most promising fitting shapes (prune/probe.py); with 0,
    the one of best attribution quality."""
    from moe2gguf.prune.prune import channel_cost  # prune.py imports this module

    layout, ratio, target_size, quant, width, experts = req.layout, req.ratio, req.target_size, req.quant.upper(), req.width, req.experts
    score, normalise, probe, refit, reconstruct = req.score, req.normalise, req.probe, req.refit, req.reconstruct
    attr = cal.attribution(score, normalise)
    cost = channel_cost(ckpt, arch)
    full_w, n_e, k_min = arch.expert_width, arch.n_experts, arch.n_used
    total = sum(cost) * n_e * full_w
    groups, n_group, groups_used = expert_grouping(arch)
    shapes = feasible_shapes(layout, n_e, full_w, k_min, n_group, groups_used)
    if width is not None:
        if not 0 < width <= full_w or (width % layout.align and width != full_w):
            near = ", ".join(str(w) for w in nearest_widths(min(max(width, 1), full_w), layout, full_w))
            raise UserError(
                f"--width {width} cannot be aligned: llama.cpp stores expert rows in blocks of {layout.align} "
                f"(K-quants in {layout.kquant_align}) up to the model's {full_w}; nearest valid width: {near}"
            )
        shapes = [s for s in shapes if s.width == width]
    if experts is not None:
        if not k_min <= experts <= n_e:
            raise UserError(f"--experts {experts} is outside {k_min}..{n_e} (top-{k_min} routing needs {k_min} experts per layer)")
        if experts % n_group or experts < min_grouped_experts(k_min, n_group, groups_used):
            raise UserError(
                f"--experts {experts} does not split into the router's {n_group} expert groups (top-{k_min} from {groups_used} of them); "
                f"give a multiple of {n_group} from {min_grouped_experts(k_min, n_group, groups_used)}"
            )
        shapes = [s for s in shapes if s.experts == experts]
    if not shapes:
        raise UserError(f"--width {width} with --experts {experts} is the unpruned model; give a smaller one")
    base = predict_size(ckpt, quant)
    # one llama.cpp dry run per shape: every shape under a size target, only the ones reported
    # under --ratio (there are thousands on a 128-expert model)
    sized: dict[Shape, object] = {}
    if target_size is not None:  # every shape from the same floor of types; upgrades come after the choice
        for s in shapes:
            sized[s] = predict_layout_bytes(ckpt, arch, s, quant)
            ov = lean_down_types(sized[s])
            if ov:
                sized[s] = predict_layout_bytes(ckpt, arch, s, quant, ov)
    types = None
    measured: dict[Shape, float] = {}

    table = ShapeScores.of(attr, shapes, groups)  # every shape's coverage and quality, one sort per layer
    notes: list[str] = []
    probe_refit: dict[str, str] = {}

    def choose(fit: list[Shape]) -> tuple[Shape, float]:
        if probe <= 0:
            return table.best(fit)
        from moe2gguf.prune.probe import PROBE_TOKENS, candidates, shape_klds  # probe.py imports this module
        from moe2gguf.prune.reconstruct import enough_tokens, joint_fits, refit_memory_refusal

        cands = candidates(fit, table, probe)
        if len(cands) == 1:  # e.g. --experts given: nothing to compare
            return cands[0], table.coverage(cands[0])
        # the re-fit needs as many tokens as prune's own (prune/probe.py); the plain probe far fewer
        # where the final re-fit is skipped, for too few tokens or for memory (prune.py says so), so is the probe's
        have, layer_bytes = int(cal.info["tokens"]), int(cal.info.get("max_layer_param_bytes", 0))
        recon = reconstruct and all(enough_tokens(have, c.experts * c.width) for c in cands) and not any(
            refit_memory_refusal([c.width] * c.experts, have, arch.n_used, arch.hidden_size, layer_bytes) for c in cands)
        refit_each = recon and all(joint_fits(c.experts * c.width) for c in cands)
        if recon and not refit_each:
            probe_refit["skipped"] = (f"the probe ranked the shapes without --reconstruct's re-fit: at up to {max(c.experts * c.width for c in cands):,} "
                                      f"kept channels per layer each shape's re-fit is the matrix-free solve, as costly as the final one")
            notes.append(probe_refit["skipped"])
        tokens = cal.info["tokens"] if refit_each else PROBE_TOKENS
        measured.update(shape_klds(ckpt, arch, cands, attr, groups, calibration_windows(ckpt.path, cal.info, tokens), cal.grams if refit else None, refit_each,
                                   device=req.device))
        release_freed()  # the probe's layers and head slices, before the rewrite allocates its own
        best = min(cands, key=lambda s: (measured[s], s.experts * s.width))
        return best, table.coverage(best)

    band: dict = {}
    if target_size is None:
        fit, inside = ratio_band(shapes, ratio, total, cost)
        shape, cov = choose(fit)
        got = 1 - shape_params(shape, cost) / total
        band = {"requested": ratio, "tolerance": RATIO_BAND, "within": inside, "shapes_in_band": [[s.experts, s.width] for s in fit] if inside else [],
                **({} if inside else {"nearest_feasible": {"experts": shape.experts, "width": shape.width, "ratio": got}})}
        if not inside:
            notes.append(
                f"--ratio {ratio}: no shape llama.cpp runs removes within {RATIO_BAND:g} of it (one expert count, widths in steps of "
                f"{layout.align}); nearest feasible: {shape.experts} experts x width {shape.width}, ratio {got:.4f}"
            )
        budget_ragged = shape_params(shape, cost)  # ragged at the same parameters: what the layout itself costs
    else:
        if target_size >= base.total_bytes:
            raise UserError(
                f"--target-size {human_bytes(target_size, exact=True)} is not below the unpruned model at {quant} ({human_bytes(base.total_bytes, exact=True)}); "
                f"export it without pruning, or give a smaller target"
            )
        fit = [s for s in shapes if sized[s].total_bytes <= target_size - MARGIN]
        if not fit:
            small = min(shapes, key=lambda s: sized[s].total_bytes)
            raise UserError(
                f"--target-size {human_bytes(target_size, exact=True)} is below the smallest GGUF this model reaches at {quant}: "
                f"{human_bytes(sized[small].total_bytes, exact=True)} ({small.experts} experts x width {small.width}); raise --target-size or use a smaller --quant"
            )
        shape, cov = choose(fit)
        types, _ = plan_tensor_types(sized[shape], target_size - MARGIN - sized[shape].total_bytes)
        budget_ragged = shape_params(shape, cost)
    for s in {shape, *measured}:
        if s not in sized:
            sized[s] = predict_layout_bytes(ckpt, arch, s, quant)
    plan = sized[shape]
    floor = A.keep_every_expert_if_grouped(A.top_expert_floor([s.sum(1) for s in attr], k_min), groups)
    ragged = A.allocate(attr, cost, budget_ragged, A.LAYOUTS["ragged"], floor)
    ragged_cov = A.coverage(attr, ragged)
    fallback = kquant_fallback(plan, base.tensor_types)
    aligned = None
    if target_size is None and fallback:  # the band's best shape that keeps the quant's native types, priced for the user
        native = [s for s in fit if s.width % layout.kquant_align == 0]
        if native:
            a = min(native, key=lambda s: (measured.get(s, float("inf")), -table.quality(s)))
            if a not in sized:
                sized[a] = predict_layout_bytes(ckpt, arch, a, quant)
            aligned = (a, 1 - shape_params(a, cost) / total, sized[a].total_bytes)
        notes += fallback_note(shape, 1 - shape_params(shape, cost) / total, plan, base, fallback, aligned, layout.kquant_align)
    entries = {
        "deployable": {"experts": shape.experts, "width": shape.width, "coverage": cov, "quality": table.quality(shape),
                       "chosen_by": "probe KLD on calibration tokens" if measured else "attribution quality",
                       **({"probe_refit_skipped": probe_refit["skipped"]} if probe_refit else {})},
        "ragged": {"widths": ragged.widths, "experts_kept": [sum(1 for w in l if w) for l in ragged.widths], "coverage": ragged_cov,
                   "ratio": 1 - ragged.kept_params(cost) / total},
        "coverage_lost": ragged_cov - cov,
        "quant": quant.upper(),
        "predicted_bytes_at_quant": plan.total_bytes,
        "unpruned_bytes_at_quant": base.total_bytes,
        "bytes_ratio_at_quant": 1 - plan.total_bytes / base.total_bytes,
        "ffn_down_exps_fallback": fallback,
        "fallback_bytes": sum(f["extra_bytes"] for f in fallback.values()),
        **({"aligned_alternative": {"experts": aligned[0].experts, "width": aligned[0].width, "ratio": aligned[1], "bytes_at_quant": aligned[2]}} if aligned else {}),
        "notes": notes,
        "shapes_considered": [
            {"experts": s.experts, "width": s.width, "coverage": table.coverage(s), "quality": table.quality(s), "params": shape_params(s, cost), **({"bytes": sized[s].total_bytes} if s in sized else {}),
             **({"probe_kld": measured[s]} if s in measured else {})}
            for s in shapes
        ],
    }
    if band:
        entries["ratio_band"] = band
    if target_size is not None:
        entries["target_size"] = target_size
        entries["tensor_types"] = types
    if n_group > 1:
        entries["expert_groups"] = {"groups": n_group, "groups_used": groups_used, "experts_per_group": shape.experts // n_group}
    return allocate_shape(attr, shape, groups), cov, entries


__all__ = [
    "DeployRequest",
    "plan_deployable",
    "RATIO_BAND",
    "Shape",
    "ShapeScores",
    "allocate_shape",
    "best_shape",
    "coverage",
    "fallback_note",
    "feasible_shapes",
    "nearest_widths",
    "ratio_band",
    "shape_coverage",
    "shape_params",
]
