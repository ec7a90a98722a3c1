"""`moe2gguf prune`: allocate the kept channels/experts from CALIB/ and rewrite the checkpoint.

Methods (same calibration, same parameter budget):
  coverage     per-expert widths chosen jointly over all experts of all layers to cover the
               most attribution (layout `ragged`); experts may reach width 0 and be removed
  uniform      one width for every expert, each expert's channels chosen by attribution
  magnitude    one width for every expert, channels chosen by weight norms
  reap         whole experts removed per layer, lowest REAP saliency first (mean over routed
               tokens of router weight x expert-output norm, `scores.reap_saliency`)
  frequency    whole experts removed per layer, lowest router mass first (summed router
               weights; this was `expert-drop` before REAP proper was added)

Cross-layer comparability: a layer's scores are divided by the mean square of the residual
stream it writes to (see `scores.normalise_layers`), i.e. they measure relative perturbation.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property

import click
import torch
from safetensors import SafetensorError, safe_open

from moe2gguf.arch import EXPERT_PARTS, MoEArch, arch_for_config
from moe2gguf.calib import CALIB_JSON, GRAM_DIR, SCORES, gram_file, gram_parts, read_calib_json
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.device import resolve
from moe2gguf.errors import UserError, atomic_dir, check_output
from moe2gguf.exporter.quantize import ftype_of
from moe2gguf.exporter.writer import check_against_config
from moe2gguf.layout import DEFAULT_LAYOUT, LAYOUTS, PRUNE_LAYOUTS
from moe2gguf.options import METHODS, PROBE_SHAPES, RENAMED
from moe2gguf.prune import allocate as A
from moe2gguf.prune.calibrate import calibration_windows
from moe2gguf.prune.reconstruct import MIN_TOKENS_PER_CHANNEL, enough_tokens, refit_memory_refusal
from moe2gguf.prune.reconstruct import reconstruct as run_reconstruct
from moe2gguf.prune.rewrite import routed_params, write_pruned
from moe2gguf.prune.scores import channel_scores, normalise_layers, reap_saliency
from moe2gguf.recipe import parse_size

EXPERT_METHODS = ("reap", "frequency")  # whole experts removed, kept ones stay whole
REPORT = "prune_report.json"


def check_method(method: str) -> None:
    """One line for a renamed or unknown method (CLI, recipes and the Python API alike)."""
    if method in RENAMED:
        raise UserError(RENAMED[method])
    if method not in METHODS:
        raise UserError(f"unknown --method {method}; one of {', '.join(METHODS)}")


class Calib:
    """CALIB/ read back and checked against the model it is applied to."""

    def __init__(self, path: str | pathlib.Path, arch: MoEArch, ckpt: Checkpoint):
        self.path = pathlib.Path(path)
        info_f = self.path / CALIB_JSON
        if not info_f.is_file() or not (self.path / SCORES).is_file():
            raise UserError(f"{self.path} is not a calibration folder (no {CALIB_JSON}/{SCORES}); run `moe2gguf calibrate MODEL -o {self.path}` first")
        self.info = read_calib_json(info_f)
        again = f"run `moe2gguf calibrate {ckpt.path} -o {self.path}` again"
        want = {
            "architectures": list(arch.hf_architectures[:1]),
            "n_layers": arch.n_layers,
            "hidden_size": arch.hidden_size,
            "n_experts": arch.n_experts,
            "expert_width": arch.expert_width,
        }
        for k, v in want.items():
            if self.info.get(k) != v:
                raise UserError(
                    f"{self.path} was calibrated on another model ({k} {self.info.get(k)} vs {v} in {ckpt.path}); "
                    f"run `moe2gguf calibrate {ckpt.path}` and pass that folder"
                )
        try:
            with safe_open(self.path / SCORES, framework="pt") as f:
                self.t = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise UserError(f"{self.path / SCORES} is truncated or corrupt ({e}); {again}") from None
        E, W = arch.n_experts, arch.expert_width
        shapes = {"sq_act": (E, W), "abs_act": (E, W), "down_norm": (E, W), "magnitude": (E, W), "freq": (E,), "mass": (E,), "resid_mean_sq": (1,)}
        for bid in arch.moe_layers:
            for what, shape in shapes.items():
                got = self.t.get(f"layers.{bid}.{what}")
                if got is None or tuple(got.shape) != shape:
                    raise UserError(
                        f"{self.path}: scores of layer {bid} ({what}) have shape {None if got is None else tuple(got.shape)}, "
                        f"{ckpt.path} needs {shape}; recalibrate on this model"
                    )
            gram = self.t.get(f"layers.{bid}.gram")  # older CALIBs kept them here
            if gram is not None and tuple(gram.shape) != (E, W, W):
                raise UserError(f"{self.path}: gram of layer {bid} has shape {tuple(gram.shape)}, {ckpt.path} needs {(E, W, W)}; {again}")
        for what, shape in {"reap": (E,), "taylor": (E, W)}.items():  # optional: older CALIBs lack them
            for bid in arch.moe_layers:
                got = self.t.get(f"layers.{bid}.{what}")
                if got is not None and tuple(got.shape) != shape:
                    raise UserError(f"{self.path}: {what} of layer {bid} has shape {tuple(got.shape)}, {ckpt.path} needs {shape}; {again}")
        self.again = again
        for k, v in self.t.items():
            # every score is a count, a norm, a square or an absolute value: never below 0
            # (Gram matrices, which older CALIBs keep here, are signed off the diagonal)
            negative = not k.endswith(".gram") and bool((v < 0).any())
            if not v.is_floating_point() or not bool(torch.isfinite(v).all()) or negative:
                raise UserError(f"{self.path / SCORES}: {k} holds NaN/Inf, negative or non-float values; the calibration is damaged, {again}")
        self.layers = arch.moe_layers

    def require(self, what: str, purpose: str) -> None:
        """One line when this CALIB lacks `what` (calibrated before it was recorded, or the
        Taylor pass was skipped for the model's size)."""
        if all(f"layers.{b}.{what}" in self.t for b in self.layers):
            return
        note = str(self.info.get(what, ""))
        if note.startswith("skipped"):
            raise UserError(f"{self.path} has no {what} scores for {purpose}: calibration {note}; use --score energy")
        raise UserError(f"{self.path} was calibrated before {purpose} was recorded (no {what} in {SCORES}); {self.again}")

    def attribution(self, kind: str = "energy", normalise: bool = True) -> list[torch.Tensor]:
        if kind == "taylor":
            self.require("taylor", "--score taylor")
        raw = [channel_scores(kind, self.layer(b)) for b in self.layers]
        if not normalise:
            return raw
        return normalise_layers(raw, [float(self.t[f"layers.{b}.resid_mean_sq"]) for b in self.layers], kind)

    def layer(self, bid: int) -> dict[str, torch.Tensor]:
        """Layer `bid`'s calibration tensors by name (freq, sq_act, taylor, ...)."""
        p = f"layers.{bid}."
        return {k[len(p) :]: v for k, v in self.t.items() if k.startswith(p)}

    def reap(self) -> list[torch.Tensor]:
        """REAP's per-expert saliency of every MoE layer."""
        self.require("reap", "--method reap")
        return [reap_saliency(r, f) for r, f in zip(self.get("reap"), self.get("freq"), strict=True)]

    def get(self, what: str) -> list[torch.Tensor]:
        return [self.t[f"layers.{b}.{what}"] for b in self.layers]

    @cached_property
    def grams(self) -> Mapping[int, Sequence[torch.Tensor]] | None:
        """Each MoE layer's per-expert Gram matrices for the refit, or None when this CALIB has
        none (`refit_note` says why); every expert's is found in its layer's files here, before
        the work (`LayerGrams`)."""
        if all(f"layers.{b}.gram" in self.t for b in self.layers):
            return {b: self.t[f"layers.{b}.gram"] for b in self.layers}
        missing = [b for b in self.layers if not gram_file(self.path, b).is_file()]
        if not missing:
            return LayerGrams(self)
        if len(missing) < len(self.layers):  # some layers' files are there: damaged, not a CALIB without them
            raise UserError(f"{self.path / GRAM_DIR} lacks the Gram matrices of MoE layer {missing[0]} ({gram_file(self.path, missing[0]).name}); {self.again}")
        return None

    @property
    def refit_note(self) -> str:
        if self.info.get("gram") is False:
            return f"{self.path} has no Gram matrices (calibrated with --no-gram); the least-squares refit needs them: calibrate without --no-gram"
        return f"{self.path} has no Gram matrices (calibrated by an older moe2gguf); the least-squares refit needs them: {self.again}"


class LayerGrams(Mapping[int, Sequence[torch.Tensor]]):
    """CALIB/gram/, read as the rewrite or the probe reaches each expert (its values checked
    then): at Qwen3-30B-A3B an expert's Gram matrix is 2.4 MB, a layer's 302 MB and the model's
    14 GiB. Which file holds each expert's is read from the files' headers at once: a CALIB that
    lacks one is refused before the probe and the rewrite, not when they reach its layer (the
    48th of Qwen3-30B-A3B's after about an hour of them)."""

    def __init__(self, cal: Calib):
        self.cal = cal
        self._layers = {b: _ExpertGrams(cal, gram_parts(cal.path, b)) for b in cal.layers}
        for g in self._layers.values():
            g.check()

    def __getitem__(self, bid: int) -> Sequence[torch.Tensor]:
        return self._layers[bid]

    def __iter__(self) -> Iterator[int]:
        return iter(self.cal.layers)

    def __len__(self) -> int:
        return len(self.cal.layers)


class _ExpertGrams(Sequence[torch.Tensor]):
    """One layer's Gram matrices, one expert at a time from the file that holds it."""

    def __init__(self, cal: Calib, paths: list[pathlib.Path]):
        self.cal, self.paths = cal, paths
        self.n, self.width = cal.info["n_experts"], cal.info["expert_width"]
        self._where: dict[str, pathlib.Path] | None = None

    def _file(self, key: str) -> pathlib.Path:
        if self._where is None:
            where = {}
            for f in self.paths:
                try:
                    with safe_open(f, framework="pt") as fh:
                        where.update(dict.fromkeys(fh.keys(), f))
                except (SafetensorError, OSError) as e:
                    raise UserError(f"{f} is truncated or corrupt ({e}); {self.cal.again}") from None
            self._where = where
        if key not in self._where:
            raise UserError(f"{self.cal.path / GRAM_DIR} lacks the Gram matrix of expert {key} ({len(self.paths)} files of this layer); {self.cal.again}")
        return self._where[key]

    def check(self) -> None:
        """Every expert's matrix is in one of the layer's files (their headers only)."""
        for xid in range(self.n):
            self._file(str(xid))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, xid: int) -> torch.Tensor:  # type: ignore[override]
        cal, w = self.cal, self.width
        f = self._file(str(xid))
        try:
            with safe_open(f, framework="pt") as fh:
                g = fh.get_tensor(str(xid))
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f} is truncated or corrupt ({e}); {cal.again}") from None
        if tuple(g.shape) != (w, w) or not g.is_floating_point() or not bool(torch.isfinite(g).all()):
            raise UserError(f"{f}: a Gram matrix is not {w}x{w} finite floats; the calibration is damaged, {cal.again}")
        return g


def channel_cost(ckpt: Checkpoint, arch: MoEArch) -> list[int]:
    """Parameters per channel in every MoE layer (gate row + up row + down column)."""
    out = []
    for b in arch.moe_layers:
        n = sum(ckpt.numel(arch.expert_name(b, 0, p)) for p in EXPERT_PARTS)
        out.append(n // arch.expert_width)
    return out


def group_note(arch: MoEArch, method: str, layout: str) -> dict:
    """prune_report.json entry for a router that groups experts (DeepSeek-V3 n_group): how the
    allocation kept the groups equal."""
    groups = {arch.expert_groups(b) for b in arch.moe_layers}
    if max(groups) <= 1:
        return {}
    rule = {
        "llama.cpp": "K experts per layer, K a multiple of the group count, K / groups best of each group",
        "experts": "the kept count rounded to a multiple of the group count, each group keeps its best equal share",
        "ragged": "every expert kept (at least one channel each): removing experts unevenly would change the grouping",
    }[layout if method == "coverage" else "experts" if method in EXPERT_METHODS else "ragged"]
    return {"expert_groups": {"groups": sorted(groups), "rule": rule}}


def plan(
    calib: Calib,
    ckpt: Checkpoint,
    arch: MoEArch,
    ratio: float,
    method: str,
    layout: str = "ragged",
    score: str = "energy",
    normalise: bool = True,
    min_width: int = 0,
) -> tuple[A.Allocation, float]:
    """The allocation of a method (per MoE layer) and the coverage of the attribution it keeps."""
    attr = calib.attribution(score, normalise)
    cost = channel_cost(ckpt, arch)
    budget = (1.0 - ratio) * sum(c * arch.n_experts * arch.expert_width for c in cost)
    if method == "coverage":
        floor = A.top_expert_floor([s.sum(1) for s in attr], arch.n_used)
        if min_width:  # every expert keeps at least min_width channels (none is removed)
            floor = [f.clamp_min(min_width) for f in floor]
        floor = A.keep_every_expert_if_grouped(floor, [arch.expert_groups(b) for b in arch.moe_layers])
        try:
            alloc = A.allocate(attr, cost, budget, A.LAYOUTS[layout], floor)
        except ValueError:
            raise UserError(f"--min-width {min_width} in every expert alone exceeds the budget of --ratio {ratio}; lower --min-width") from None
    elif method == "uniform":
        alloc = A.allocate(attr, cost, budget, A.LAYOUTS["uniform"])
    elif method == "magnitude":
        alloc = A.allocate(calib.get("magnitude"), cost, budget, A.LAYOUTS["uniform"])
    elif method in EXPERT_METHODS:
        groups = [arch.expert_groups(b) for b in arch.moe_layers]
        k_min = max(A.min_grouped_experts(arch.n_used, g, arch.expert_groups_used(b)) for g, b in zip(groups, arch.moe_layers))
        if arch.n_experts - round(ratio * arch.n_experts) < k_min:  # top-k must stay reachable
            most = (arch.n_experts - k_min) / arch.n_experts
            raise UserError(f"--method {method} keeps at least {k_min} experts per layer, so it removes at most {most:g}; lower --ratio or use --method coverage")
        widths = [[arch.expert_width] * arch.n_experts for _ in calib.layers]
        saliency = calib.reap() if method == "reap" else calib.get("mass")
        alloc = A.allocate_expert_drop(saliency, widths, ratio, k_min, groups)
    else:
        check_method(method)
    return alloc, A.coverage(attr, alloc)


def prune(
    model: str,
    calib: str,
    ratio: float | None,
    output: str,
    method: str = "coverage",
    layout: str = DEFAULT_LAYOUT,
    score: str = "energy",
    normalise: bool = True,
    refit: bool = True,
    min_width: int = 0,
    target_size: int | None = None,
    quant: str = "Q4_K_M",
    width: int | None = None,
    experts: int | None = None,
    reconstruct: bool | None = None,
    probe: int = PROBE_SHAPES,
    device: str = "auto",
) -> dict:
    check_method(method)
    dev = resolve(device)
    if target_size is not None:  # the size target picks the ratio, in the layout llama.cpp runs
        if method != "coverage":
            raise UserError(f"--target-size plans coverage pruning in the llama.cpp layout; drop --method {method} or give --ratio instead")
        layout = "llama.cpp"
    elif ratio is None or not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio {ratio} is outside (0, 1); it is the fraction of routed-expert parameters removed, e.g. 0.25 (or give --target-size)")
    if layout not in PRUNE_LAYOUTS:
        raise UserError(f"--layout {layout} is not available; use one of {', '.join(PRUNE_LAYOUTS)}")
    shape_choice = A.LAYOUTS[layout].one_shape and method == "coverage"  # one (count, width) for the model
    forced = [f"--{k} {v}" for k, v in (("width", width), ("experts", experts)) if v is not None]
    if forced and not shape_choice:  # they shape the one llama.cpp layout; elsewhere they would be ignored
        raise UserError(f"{' '.join(forced)} applies to --method coverage with --layout llama.cpp (or --target-size), not to "
                        f"--method {method} --layout {layout}; drop it or prune with --method coverage")
    asked = reconstruct is not None
    if reconstruct is None:  # on where it measurably pays (prune/reconstruct.py): removed experts' tokens are re-routed
        reconstruct = shape_choice
    check_output(output, "prune", [model, calib], folder=True)  # before the work, not after it
    ckpt = Checkpoint(model)
    arch = arch_for_config(ckpt.config)
    if ckpt.expert_widths is not None:
        raise UserError(f"{ckpt.path} is already pruned; prune the unpruned model with a larger --ratio instead")
    check_against_config(ckpt, arch)  # a tensor missing outside the experts would be missing from the pruned copy too
    if min_width > arch.expert_width:  # whatever the layout: a number the model cannot hold
        raise UserError(f"--min-width {min_width} is wider than the experts themselves ({arch.expert_width} channels); give 0..{arch.expert_width}")
    cal = Calib(calib, arch, ckpt)
    deploy_entries: dict = {}
    if shape_choice:
        from moe2gguf.prune.deploy import DeployRequest, plan_deployable  # deploy.py imports this module

        ftype_of(quant)
        req = DeployRequest(ratio, target_size, quant, A.LAYOUTS[layout], score, normalise, width, experts, probe, refit, reconstruct, dev)
        layer_alloc, cov, deploy_entries = plan_deployable(cal, ckpt, arch, req)
        for note in deploy_entries["notes"]:  # the ratio band missed, bytes lost to the type fallback
            click.echo(f"note: {note}", err=True)
    else:
        layer_alloc, cov = plan(cal, ckpt, arch, ratio, method, layout, score, normalise, min_width)
    # the allocation is per MoE layer; the rewrite wants every layer ([] for dense ones)
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(arch.n_layers)]
    for b, ch in zip(cal.layers, layer_alloc.channels, strict=True):
        per_layer[b] = ch
    alloc = A.Allocation(per_layer)
    recon_skipped = None
    if reconstruct:
        reconstruct, recon_skipped = reconstruct_verdict(cal, layer_alloc, arch, asked)
    grams = cal.grams if refit else None
    if refit and grams is None:
        click.echo(f"note: {cal.refit_note}", err=True)
    before = routed_params(arch, {n: ckpt.shape(n) for n in ckpt.tensor_names})
    with atomic_dir(output, "prune", [model, calib]) as tmp:
        shapes = write_pruned(ckpt, arch, alloc, tmp, grams)
        recon = None
        if reconstruct:
            recon = run_reconstruct(ckpt, arch, tmp, calibration_windows(model, cal.info), device=dev)
        new_arch = arch_for_config(json.loads((tmp / "config.json").read_text()))
        after = routed_params(new_arch, shapes)
        report = {
            "method": method,
            "layout": layout if method == "coverage" else ("uniform" if method in ("uniform", "magnitude") else "whole experts"),
            "ratio_requested": ratio,
            "ratio_achieved": 1.0 - after / before,
            "widths": alloc.widths,
            "experts_kept": [sum(1 for w in layer if w) for layer in alloc.widths],
            "coverage": cov,
            "score": score,
            "normalise": "residual mean square" if normalise else "none",
            "refit_down": grams is not None,
            **({"refit_skipped": cal.refit_note} if refit and grams is None else {}),
            "reconstruct": recon,
            **({"reconstruct_skipped": recon_skipped} if recon_skipped else {}),
            "min_width": min_width,
            "calib": str(cal.path),
            "params_routed_before": before,
            "params_routed_after": after,
            **deploy_entries,
        }
        report.update(group_note(arch, method, layout))
        if target_size is not None:
            from moe2gguf.exporter.sizing import finish_target

            report.update(finish_target(tmp, report, target_size))
        (tmp / REPORT).write_text(json.dumps(report, indent=1))
    return report


def reconstruct_verdict(cal: Calib, alloc: A.Allocation, arch: MoEArch, asked: bool) -> tuple[bool, str | None]:
    """Whether the block re-fit runs, and why not. It is skipped where it would hold more than
    this machine's memory (the pruned model is still written: the OOM killer would lose it), and
    by default where the CALIB has too few tokens for the channels a layer keeps (it would fit
    the text, not the model, prune/reconstruct.py); asked for by name, it then runs and a note
    says what to expect."""
    tokens = int(cal.info["tokens"])
    layer_bytes = int(cal.info.get("max_layer_param_bytes", 0))
    layers = ([int(c.numel()) for c in layer if c.numel()] or [0] for layer in alloc.channels)
    if why := next(filter(None, (refit_memory_refusal(w, tokens, arch.n_used, arch.hidden_size, layer_bytes) for w in layers)), None):
        click.echo(f"note: the block re-fit is skipped: {why}; the pruned model is written without it", err=True)
        return False, why
    kept = max(sum(int(ch.numel()) for ch in layer) for layer in alloc.channels)
    if enough_tokens(tokens, kept):
        return True, None
    need = MIN_TOKENS_PER_CHANNEL * kept
    why = (f"a layer keeps {kept:,} channels and the re-fit needs {MIN_TOKENS_PER_CHANNEL} calibration tokens per channel ({need:,}); "
           f"{cal.path} has {tokens:,}, on which it would fit the calibration text, not the model (held-out KLD worse than without it)")
    if asked:
        click.echo(f"note: --reconstruct: {why}; it runs as asked", err=True)
        return True, None
    click.echo(f"note: the block re-fit is skipped: {why}; calibrate with --tokens {need} to have it", err=True)
    return False, f"{why}; calibrate with --tokens {need} to have it"


def prune_main(
    model: str, calib: str, ratio: float | None, output: str, method: str, layout: str, target_size: str | None, quant: str,
    width: int | None, experts: int | None, probe: int, score: str, min_width: int, refit: bool, reconstruct: bool | None, device: str = "auto",
) -> None:
    """The `prune` verb once moe2gguf/commands.py has parsed its options."""
    if (ratio is None) == (target_size is None):
        raise UserError("give exactly one of --ratio (fraction of expert parameters removed) and --target-size (GGUF bytes)")
    try:
        size = parse_size(target_size) if target_size is not None else None
    except ValueError as e:
        raise UserError(f"--target-size: {e}") from None
    r = prune(model, calib, ratio, output, method, layout, score, refit=refit, min_width=min_width, target_size=size, quant=quant, width=width, experts=experts, reconstruct=reconstruct, probe=probe, device=device)
    if "deployable" in r:
        d = r["deployable"]
        click.echo(
            f"llama.cpp layout: {d['experts']} experts x width {d['width']} per layer (coverage {d['coverage']:.4f}; "
            f"ragged at the same budget {r['ragged']['coverage']:.4f}, lost {r['coverage_lost']:.4f})"
        )
        for name, fb in r["ffn_down_exps_fallback"].items():
            click.echo(f"note: width {d['width']} is not a multiple of {LAYOUTS[layout].kquant_align}: {name} falls back {fb['wanted']} -> {fb['used']} (+{fb['extra_bytes']:,} bytes)")
    if target_size is not None:
        click.echo(f"predicted GGUF at {r['quant']}: {r['predicted_bytes']:,} bytes for target {r['target_size']:,} ({100 * r['predicted_bytes'] / r['target_size']:.2f}%)")
    click.echo(f"wrote {output}: {r['method']} ratio {r['ratio_achieved']:.4f}, coverage {r['coverage']:.4f}, experts kept {r['experts_kept']}")
