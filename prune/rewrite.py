"""The rewrite: slice every kept expert to its own channel set and write OUT/ in HF layout.

Each stored expert keeps gate/up rows and down columns of its kept channels (in their
original order); removed experts (width 0) disappear with their router rows and the kept
ones are renumbered 0..n_kept-1 per layer. `prune_map.safetensors` records where each stored
expert and channel came from.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import torch

from moe2gguf.arch import MoEArch
from moe2gguf.checkpoint import CONFIG, EXPERT_WIDTHS_KEY, INDEX, PRUNE_MAP, Checkpoint, write_prune_map
from moe2gguf.prune.allocate import Allocation

F64 = torch.float64


def refit_down(down: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """Least-squares refit of the kept down_proj columns: the D_K minimising
    sum_x ||p D h(x) - p D_K h_K(x)||^2 over the calibration tokens, i.e.
    D_K = D G[:, K] (G[K, K] + ridge * mean diag)^-1 with G = sum p^2 h h^T.
    The removed channels' output is re-expressed through the kept ones where they correlate."""
    d, g = down.to(F64), gram.to(F64)
    gkk = g[keep][:, keep]
    lam = ridge * float(gkk.diagonal().mean().clamp_min(1e-30))
    gkk = gkk + lam * torch.eye(len(keep), dtype=F64)
    rhs = d @ g[:, keep]  # [hidden, k]
    return torch.linalg.solve(gkk, rhs.T).T  # gkk is symmetric


def slice_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept channels of one expert (gate/up rows, down columns); refit down when gram is given."""
    if gram is None or keep.numel() == down.shape[1]:  # nothing removed: nothing to refit
        new_down = down[:, keep]
    else:
        new_down = refit_down(down, gram, keep).to(down.dtype)
    return gate[keep].contiguous(), up[keep].contiguous(), new_down.contiguous()


def routed_params(arch: MoEArch, shapes: dict[str, tuple[int, ...]]) -> int:
    return arch.param_counts(shapes).routed_experts


def write_pruned(
    ckpt: Checkpoint,
    arch: MoEArch,
    alloc: Allocation,
    out: pathlib.Path,
    grams: dict[int, torch.Tensor] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Write config.json, model.safetensors, prune_map.safetensors and tokenizer files to `out`.
    Returns the written tensor shapes (the truth ratio_achieved is computed from)."""
    from safetensors.torch import save_file

    moe = set(arch.moe_layers)
    expert_names = arch.expert_tensor_names()
    routers = {arch.router_name(b) for b in moe}
    tensors: dict[str, torch.Tensor] = {}
    for name in ckpt.tensor_names:
        if name not in expert_names and name not in routers:
            tensors[name] = ckpt.tensor(name)

    stored_widths: list[list[int]] = []
    pmap: dict[int, tuple[list[int], list[list[int]]]] = {}
    for bid in range(arch.n_layers):
        if bid not in moe:
            stored_widths.append([])
            continue
        kept = [(xid, ch) for xid, ch in enumerate(alloc.channels[bid]) if ch.numel() > 0]
        for k, (xid, ch) in enumerate(kept):
            parts = [ckpt.tensor(arch.expert_name(bid, xid, p)) for p in ("gate", "up", "down")]
            gram = grams[bid][xid] if grams is not None else None
            for p, t in zip(("gate", "up", "down"), slice_expert(*parts, ch, gram), strict=True):
                tensors[arch.expert_name(bid, k, p)] = t
        router = ckpt.tensor(arch.router_name(bid))
        tensors[arch.router_name(bid)] = router[[x for x, _ in kept]].contiguous()
        stored_widths.append([int(ch.numel()) for _, ch in kept])
        pmap[bid] = ([x for x, _ in kept], [ch.tolist() for _, ch in kept])

    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    write_prune_map(out, pmap)
    (out / CONFIG).write_text(json.dumps(pruned_config(arch, ckpt.config, stored_widths), indent=2))
    skip = {CONFIG, INDEX, PRUNE_MAP, "prune_report.json"}
    for f in ckpt.path.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in skip:
            shutil.copy(f, out / f.name)  # tokenizer, chat template, generation config
    return {k: tuple(v.shape) for k, v in tensors.items()}


def pruned_config(arch: MoEArch, config: dict, stored_widths: list[list[int]]) -> dict:
    """Stock config plus per-layer stored widths; when every MoE layer keeps the same count
    and width, the stock count/width keys say so too, so stock transformers loads it."""
    cfg = dict(config)
    cfg[EXPERT_WIDTHS_KEY] = stored_widths
    flat = {w for layer in stored_widths for w in layer}
    counts = {len(layer) for layer in stored_widths if layer}
    if len(flat) == 1 and len(counts) == 1:
        for key, value in ((arch.n_experts_key, counts.pop()), (arch.expert_width_key, flat.pop())):
            cfg[key] = value
            for alias, target in getattr(arch.config_class, "attribute_map", {}).items():
                if target == key and alias in cfg:
                    cfg[alias] = value
    return cfg
