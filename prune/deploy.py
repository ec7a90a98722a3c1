"""Allocation inside the layout stock llama.cpp runs, and planning to a GGUF size target.

Stock llama.cpp (0.3.36, qwen3moe/qwen2moe/deepseek2) stores one expert width W and one expert
count K for the whole model (`LAYOUTS["llama.cpp"]`); which K experts each layer keeps and which
W channels each kept expert keeps are free. For a given (K, W) the best choice is exact and
cheap: per expert its top-W channels by attribution, per layer the K experts whose top-W channels
hold the most. So the allocation enumerates the feasible (K, W) pairs (K >= top-k, W a multiple of
the layout's alignment), ranks them by attribution (`shape_quality`), and measures the most
promising ones as pruned models on calibration tokens (prune/probe.py), keeping the least KLD:

* under a parameter budget (`--ratio`): K * W * channel cost <= (1 - R) * routed parameters;
* under a byte budget (`--target-size`): the GGUF size llama.cpp's own dry run predicts for a
  model of K experts of width W (exporter/sizing.py), which prices the type fallback of widths
  that are not multiples of 256 (Q4_K -> Q5_0, Q6_K -> Q8_0 on ffn_down_exps rows). Every
  shape is sized from the same floor of types (`lean_down_types`), and the bytes left under
  the target are then spent on per-tensor type upgrades (`tensor_types`).

Pure functions apart from `predict_layout_bytes`/`plan_tensor_types`, which ask llama.cpp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from moe2gguf.prune.allocate import Allocation, Layout, coverage, group_topk, min_grouped_experts


@dataclass(frozen=True)
class Shape:
    """One deployable shape: K experts of width W in every MoE layer."""

    experts: int
    width: int


def feasible_shapes(layout: Layout, n_experts: int, width: int, n_used: int, groups: int = 1, groups_used: int = 1) -> list[Shape]:
    """Every (K, W) the layout can hold short of the unpruned model, K >= top-k. Under grouped
    routing (`groups` contiguous expert groups, `groups_used` picked per token) K is a multiple
    of `groups` whose best `groups_used` groups still hold top-k's experts."""
    if layout.width != "model" or layout.count != "model":
        raise NotImplementedError(f"layout {layout.name}: shape enumeration is for one width and one count per model")
    widths = sorted({w for w in range(layout.align, width + 1, layout.align)} | {width})
    k_min = min_grouped_experts(n_used, groups, groups_used)
    ks = [k for k in range(k_min, n_experts + 1) if k % groups == 0]
    return [Shape(k, w) for k in ks for w in widths if (k, w) != (n_experts, width)]


def nearest_widths(w: int, layout: Layout, full: int) -> list[int]:
    a = layout.align
    lo, hi = max(a, w // a * a), min(full, -(-w // a) * a)
    return sorted({lo, hi})


def allocate_shape(scores: list[torch.Tensor], shape: Shape, groups: list[int] | None = None) -> Allocation:
    """Per layer the K experts with the most top-W score (K / groups per expert group when the
    router groups experts), per kept expert its top-W channels."""
    channels = []
    for s, g in zip(scores, groups or [1] * len(scores), strict=True):
        s = s.double()
        order = torch.argsort(s, dim=1, descending=True, stable=True)[:, : shape.width]
        top = s.gather(1, order).sum(1)
        keep = set(group_topk(top, shape.experts, g).tolist())
        channels.append([torch.sort(order[e]).values if e in keep else torch.empty(0, dtype=torch.int64) for e in range(s.shape[0])])
    return Allocation(channels)


def shape_coverage(scores: list[torch.Tensor], shape: Shape, groups: list[int] | None = None) -> float:
    """coverage(allocate_shape(...)) without building the allocation."""
    total = kept = 0.0
    for s, g in zip(scores, groups or [1] * len(scores), strict=True):
        s = s.double()
        top = torch.sort(s, dim=1, descending=True).values[:, : shape.width].sum(1)
        kept += float(top[group_topk(top, shape.experts, g)].sum())
        total += float(s.sum())
    return kept / total if total > 0 else 1.0


# A removed expert costs more than its attribution says: its tokens are re-routed to kept experts
# whose channels were chosen on other tokens. Measured on the bundled model (tools/bench_size.py,
# PyTorch PPL, 40 windows): the ranking of (K, W) by coverage alone was wrong at R=0.5 ((5, 192)
# +3.3% PPL vs (8, 128) +2.4%); counting removed-expert attribution 5x ranks every measured pair right.
EXPERT_LOSS_WEIGHT = 5.0
# ...which is why `--layout llama.cpp` measures its candidate shapes instead (prune/probe.py):
# this many, the most promising by shape_quality; 0 ranks by shape_quality alone
PROBE_SHAPES = 4


def shape_quality(scores: list[torch.Tensor], shape: Shape, weight: float = EXPERT_LOSS_WEIGHT, groups: list[int] | None = None) -> float:
    """Predicted quality of a shape: 1 - (attribution of trimmed channels of kept experts)
    - weight * (attribution of removed experts)."""
    total = chan = gone = 0.0
    for s, g in zip(scores, groups or [1] * len(scores), strict=True):
        s = s.double()
        top = torch.sort(s, dim=1, descending=True).values[:, : shape.width].sum(1)
        keep = group_topk(top, shape.experts, g)
        mask = torch.zeros(s.shape[0], dtype=torch.bool)
        mask[keep] = True
        full = s.sum(1)
        chan += float((full[mask] - top[mask]).sum())
        gone += float(full[~mask].sum())
        total += float(full.sum())
    return 1.0 - (chan + weight * gone) / total if total > 0 else 1.0


def best_shape(scores: list[torch.Tensor], shapes: list[Shape], groups: list[int] | None = None) -> tuple[Shape, float]:
    """The shape of best predicted quality (ties: the smaller one), and its coverage."""
    ranked = sorted(shapes, key=lambda sh: (-shape_quality(scores, sh, groups=groups), sh.experts * sh.width))
    if not ranked:
        raise ValueError("no feasible shape")
    return ranked[0], shape_coverage(scores, ranked[0], groups)


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


# ----- bytes (llama.cpp's own dry run) -------------------------------------------------------


def predict_layout_bytes(ckpt, arch, shape: Shape, quant: str, overrides=None):  # noqa: ANN001, ANN201
    """SizePlan of `ckpt` rewritten to `shape`: tensor bytes from a skeleton of that shape,
    metadata (tokenizer, names) from the real checkpoint's own skeleton."""
    from moe2gguf.exporter.sizing import ShapeCheckpoint, layout_config, predict_size

    plan = predict_size(ShapeCheckpoint(layout_config(arch, shape.experts, shape.width), ckpt.path.name), quant, overrides)
    plan.total_bytes += _meta_delta(ckpt, arch, quant)
    return plan


_META: dict[tuple[str, str], int] = {}


def _meta_delta(ckpt, arch, quant: str) -> int:  # noqa: ANN001
    """Real metadata bytes minus the skeleton's estimate, plus the per-expert widths array a
    pruned checkpoint's GGUF carries (4 bytes per expert and its key)."""
    from moe2gguf.exporter.sizing import ShapeCheckpoint, predict_size

    key = (str(ckpt.path), quant)
    if key not in _META:
        real = predict_size(ckpt, quant).meta_bytes
        skel = predict_size(ShapeCheckpoint(ckpt.config, ckpt.path.name), quant).meta_bytes
        _META[key] = real - skel + 4 * arch.n_experts * len(arch.moe_layers) + 64
    return _META[key]


def kquant_fallback(plan, wanted: dict[str, str]) -> dict[str, dict]:  # noqa: ANN001
    """ffn_down_exps tensors whose type llama.cpp changed because the row width is not a
    multiple of the K-quant block (256): name -> {wanted, used, extra_bytes}, extra_bytes being
    what the fallback costs over the wanted type's bits per weight."""
    import gguf
    import numpy as np

    out = {}
    for name, t in plan.tensor_types.items():
        want = wanted.get(name, t)
        if "ffn_down_exps" in name and want != t:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[want]]
            n = int(np.prod(plan.tensor_shapes[name]))
            out[name] = {"wanted": want, "used": t, "extra_bytes": int(plan.tensor_bytes[name] - n * size / block)}
    return out


# K-quant -> the block-32 type of the same bits per weight (IQ4_NL is llama.cpp's 4.5-bpw
# non-linear type; Q5_0 the 5.5-bpw legacy one); llama.cpp itself falls back one size up
SAME_BITS = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "IQ4_NL", "Q5_K": "Q5_0"}


def lean_down_types(plan) -> list[tuple[str, str]]:  # noqa: ANN001
    """Overrides that put every ffn_down_exps at its layer's ffn_gate_exps type (the file type's
    base type, before the _M mixes' extra bits on ffn_down), or, where the width is not a
    multiple of that type's block, at the block-32 type of the same bits (SAME_BITS). A size
    target starts every shape from this floor and spends what is left on upgrades, so that a
    shape with more experts is not priced out by llama.cpp's Q6_K -> Q8_0 fallback."""
    import gguf

    out = []
    for name, t in plan.tensor_types.items():
        if "ffn_down_exps" not in name:
            continue
        want = plan.tensor_types.get(name.replace("ffn_down_exps", "ffn_gate_exps"), t)
        if plan.tensor_shapes[name][-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[want]][0]:
            want = SAME_BITS.get(want, want)
        if want != t:
            out.append((f"^{re.escape(name)}$", want))
    return out


# per-tensor upgrades to spend bytes left under a target, most useful first (llama.cpp's own
# Q4_K_M gives attn_v and ffn_down more bits for the same reason)
UPGRADE_ORDER = (r"ffn_down_exps", r"attn_v", r"ffn_down_shexp", r"attn_output", r"output\.weight", r"ffn_gate_exps", r"ffn_up_exps", r"attn_[qk]\.weight", r"token_embd")
LADDER = ("Q2_K", "Q3_K", "Q4_0", "IQ4_NL", "Q4_K", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0")


def plan_tensor_types(plan, leftover: int) -> tuple[dict[str, str], int]:  # noqa: ANN001
    """Spend `leftover` bytes on type upgrades, one ladder step at a time, in UPGRADE_ORDER:
    first whole tensor groups (every ffn_down_exps), then single tensors of the group where a
    whole-group step no longer fits. Returns (types, bytes spent)."""
    types = dict(plan.tensor_types)
    spent = 0

    def step(names: list[str]) -> bool:
        nonlocal spent
        new = {n: _next_type(types[n], plan.tensor_shapes[n]) for n in names}
        if not names or any(t is None for t in new.values()):
            return False
        extra = sum(_bytes(new[n], plan.tensor_shapes[n]) - plan.tensor_bytes[n] for n in names)
        if spent + extra > leftover:
            return False
        spent += extra
        for n in names:
            types[n] = new[n]
            plan.tensor_bytes[n] = _bytes(new[n], plan.tensor_shapes[n])
        return True

    for pat in UPGRADE_ORDER:
        rx = re.compile(pat)
        names = [n for n in types if rx.search(n) and types[n] in LADDER]
        while step(names):
            pass
        for n in names:
            while step([n]):
                pass
    return types, spent


def _next_type(t: str, shape: tuple[int, ...]) -> str | None:
    import gguf

    if t not in LADDER:
        return None
    for nxt in LADDER[LADDER.index(t) + 1 :]:
        if shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[nxt]][0] == 0:
            return nxt
    return None


def _bytes(t: str, shape: tuple[int, ...]) -> int:
    import gguf

    from moe2gguf.exporter.sizing import _row_bytes

    return gguf.GGUFWriter.ggml_pad(_row_bytes(t, shape), 32)


def overrides_of(types: dict[str, str]) -> list[tuple[str, str]]:
    """llama_model_tensor_override entries that pin every tensor to its planned type."""
    return [(f"^{re.escape(n)}$", t) for n, t in sorted(types.items())]


MARGIN = 256  # bytes kept free under a target: a longer GGUF name than the model folder's (predictions are exact otherwise)


def _human(n: float) -> str:
    return f"{n / 2**20:.2f} MiB ({int(n):,} bytes)"


def plan_deployable(cal, ckpt, arch, ratio, target_size, quant, score="energy", normalise=True, width=None, experts=None, probe=PROBE_SHAPES, refit=True, reconstruct=False):  # noqa: ANN001, ANN201, PLR0913
    """(per-MoE-layer Allocation, coverage, report entries) for `--layout llama.cpp`. With
    `probe` > 0 the shape is the one of least measured KLD (on calibration tokens) among the `probe` most
    promising fitting shapes (prune/probe.py); with 0, the one of best attribution quality."""
    from moe2gguf.errors import UserError
    from moe2gguf.exporter.sizing import predict_size
    from moe2gguf.prune import allocate as A
    from moe2gguf.prune.prune import channel_cost

    layout = A.LAYOUTS["llama.cpp"]
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

    def choose(fit: list[Shape]) -> tuple[Shape, float]:
        if probe <= 0:
            return best_shape(attr, fit, groups)
        from moe2gguf.prune.calibrate import calibration_windows
        from moe2gguf.prune.probe import PROBE_TOKENS, candidates, shape_klds

        cands = candidates(fit, attr, groups, probe)
        if len(cands) == 1:  # e.g. --experts given: nothing to compare
            return cands[0], shape_coverage(attr, cands[0], groups)
        # the re-fit needs as many tokens as prune's own (prune/probe.py); the plain probe far fewer
        tokens = cal.info["tokens"] if reconstruct else PROBE_TOKENS
        measured.update(shape_klds(ckpt, arch, cands, attr, groups, calibration_windows(ckpt.path, cal.info, tokens), cal.grams if refit else None, reconstruct))
        best = min(cands, key=lambda s: (measured[s], s.experts * s.width))
        return best, shape_coverage(attr, best, groups)

    if target_size is None:
        budget = (1.0 - ratio) * total
        fit = [s for s in shapes if shape_params(s, cost) <= budget + 1e-6]
        if not fit:
            small = min(shapes, key=lambda s: shape_params(s, cost))
            most = 1 - shape_params(small, cost) / total
            raise UserError(
                f"--ratio {ratio} leaves no shape llama.cpp runs: the smallest is {small.experts} experts x width {small.width} "
                f"(ratio {most:.4f}); lower --ratio"
            )
        shape, cov = choose(fit)
        budget_ragged = budget
    else:
        if target_size >= base.total_bytes:
            raise UserError(
                f"--target-size {_human(target_size)} is not below the unpruned model at {quant} ({_human(base.total_bytes)}); "
                f"export it without pruning, or give a smaller target"
            )
        fit = [s for s in shapes if sized[s].total_bytes <= target_size - MARGIN]
        if not fit:
            small = min(shapes, key=lambda s: sized[s].total_bytes)
            raise UserError(
                f"--target-size {_human(target_size)} is below the smallest GGUF this model reaches at {quant}: "
                f"{_human(sized[small].total_bytes)} ({small.experts} experts x width {small.width}); raise --target-size or use a smaller --quant"
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
    entries = {
        "deployable": {"experts": shape.experts, "width": shape.width, "coverage": cov, "quality": shape_quality(attr, shape, groups=groups),
                       "chosen_by": "probe KLD on calibration tokens" if measured else "attribution quality"},
        "ragged": {"widths": ragged.widths, "experts_kept": [sum(1 for w in l if w) for l in ragged.widths], "coverage": ragged_cov,
                   "ratio": 1 - ragged.kept_params(cost) / total},
        "coverage_lost": ragged_cov - cov,
        "quant": quant.upper(),
        "predicted_bytes_at_quant": plan.total_bytes,
        "ffn_down_exps_fallback": fallback,
        "shapes_considered": [
            {"experts": s.experts, "width": s.width, "coverage": shape_coverage(attr, s, groups), "quality": shape_quality(attr, s, groups=groups), "params": shape_params(s, cost), **({"bytes": sized[s].total_bytes} if s in sized else {}),
             **({"probe_kld": measured[s]} if s in measured else {})}
            for s in shapes
        ],
    }
    if target_size is not None:
        entries["target_size"] = target_size
        entries["tensor_types"] = types
    if n_group > 1:
        entries["expert_groups"] = {"groups": n_group, "groups_used": groups_used, "experts_per_group": shape.experts // n_group}
    return allocate_shape(attr, shape, groups), cov, entries


def finish_target(out, report: dict, target_size: int) -> dict:  # noqa: ANN001
    """Exact prediction for the written checkpoint with its planned tensor types."""
    from moe2gguf.checkpoint import Checkpoint
    from moe2gguf.exporter.sizing import predict_size

    plan = predict_size(Checkpoint(out), report["quant"], overrides_of(report["tensor_types"]))
    if plan.total_bytes > target_size:
        raise RuntimeError(f"planned {plan.total_bytes} bytes > target {target_size}: the layout prediction missed; report this")
    return {"predicted_bytes": plan.total_bytes, "tensor_types": plan.tensor_types}


__all__ = [
    "plan_deployable",
    "Shape",
    "allocate_shape",
    "best_shape",
    "coverage",
    "feasible_shapes",
    "kquant_fallback",
    "lean_down_types",
    "nearest_widths",
    "overrides_of",
    "plan_tensor_types",
    "predict_layout_bytes",
    "shape_coverage",
    "shape_params",
]
