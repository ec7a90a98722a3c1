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
from collections.abc import Iterator, Mapping, Sequence

import torch

from moe2gguf.arch import EXPERT_PARTS, MoEArch
from moe2gguf.checkpoint import CONFIG, EXPERT_WIDTHS_KEY, INDEX, PRUNE_MAP, Checkpoint, write_prune_map
from moe2gguf.memory import release_freed
from moe2gguf.progress import bar
from moe2gguf.prune.allocate import Allocation

F64 = torch.float64


def refit_down(down: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """Least-squares refit of the kept down_proj columns: the D_K minimising
    sum_x ||p D h(x) - p D_K h_K(x)||^2 + lam ||D_K - D[:, K]||^2 over the calibration tokens,
    i.e. D_K = D[:, K] + D[:, R] G[R, K] (G[K, K] + lam)^-1 with G = sum p^2 h h^T, R the
    removed channels and lam = ridge * mean diag G[K, K]. The removed channels' output is
    re-expressed through the kept ones where they correlate.

    The ridge pulls toward the plain slice, not toward zero: a kept channel calibration never
    reached keeps its column (a ridge toward zero erased it). It also makes the solve cheap:
    right-hand sides only for the removed channels (192 of 768 at 25% of Qwen3-30B-A3B's
    experts), in float64 where the Gram matrix's conditioning needs it; the product with D is
    float32 (float64 for a float64 D), whose error (1e-7 relative) is far below the bf16 the
    result is stored in."""
    dt = F64 if down.dtype == F64 else torch.float32
    removed = torch.ones(down.shape[1], dtype=torch.bool)
    removed[keep] = False
    drop = removed.nonzero().squeeze(1)
    if not drop.numel():
        return down[:, keep].to(dt)
    # Memory, at Mixtral-8x7B's width of 14,336 (k = 10,752 kept): the blocks are indexed before
    # their float64 copies (a float64 copy of the whole matrix is 1.6 GB), the kept block
    # (0.9 GB) is factored in place (as the column-major view of itself: it is symmetric), and
    # the factor is applied by two triangular solves, which do not copy it as cholesky_solve
    # does (tools/bench_scale.py --dims mixtral-8x7b)
    def kept_block() -> torch.Tensor:
        gkk = gram[keep[:, None], keep].to(F64)
        gkk.diagonal().add_(ridge * float(gkk.diagonal().mean().clamp_min(1e-30)))
        return gkk

    gkk = kept_block()
    chol, info = torch.linalg.cholesky_ex(gkk.mT, check_errors=False, out=(gkk.mT, torch.empty((), dtype=torch.int32)))
    if info:  # not positive definite even with the ridge: a general solve of the block, made again
        gkk = kept_block()
        x = torch.linalg.solve(gkk, gram[keep[:, None], drop].to(F64))
    else:
        y = torch.linalg.solve_triangular(chol, gram[keep[:, None], drop].to(F64), upper=False)
        x = torch.linalg.solve_triangular(chol.mT, y, upper=True)
        del y
    del chol, gkk
    return down[:, keep].to(dt) + down[:, drop].to(dt) @ x.T.to(dt)


def sliced_down(down: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor | None = None) -> torch.Tensor:
    """One expert's down_proj columns of its kept channels, refit when `gram` is given."""
    if gram is None or keep.numel() == down.shape[1]:  # nothing removed: nothing to refit
        return down[:, keep].contiguous()
    return refit_down(down, gram, keep).to(down.dtype).contiguous()


def kept_experts(channels: list[torch.Tensor]) -> list[int]:
    """Original index of each expert the allocation keeps (non-empty `channels`), in order."""
    return [xid for xid, ch in enumerate(channels) if ch.numel() > 0]


def pruned_tensors(
    ckpt: Checkpoint, arch: MoEArch, bid: int, channels: list[torch.Tensor], grams: Sequence[torch.Tensor] | None = None,
    parts: Sequence[str] = EXPERT_PARTS,
) -> Iterator[tuple[str, torch.Tensor]]:
    """MoE layer `bid` as the rewrite stores it, one tensor at a time: kept experts' `parts`
    sliced (down refit when `grams`, per expert [width, width], is given), renumbered 0..K-1,
    then the router tensors cut to their rows. One at a time so that a writer can let each go
    once it is on disk: a whole pruned layer (0.9 GB at Qwen3-30B-A3B) held beside the shard
    being filled made the rewrite's peak depend on where the layer fell in the shards."""
    rows = kept_experts(channels)
    for k, xid in enumerate(rows):
        keep = channels[xid]
        for p in parts:
            w = ckpt.tensor(arch.expert_name(bid, xid, p))
            t = sliced_down(w, keep, grams[xid] if grams is not None else None) if p == "down" else w[keep].contiguous()
            del w  # the unpruned tensor (a copy where it was dequantized) is not held while the writer takes the slice
            yield arch.expert_name(bid, k, p), t
    for name in arch.router_tensor_names(bid):
        if name in ckpt:  # the router, and per-expert router extras (V3's selection bias)
            yield name, ckpt.tensor(name)[rows]


def pruned_layer(
    ckpt: Checkpoint, arch: MoEArch, bid: int, channels: list[torch.Tensor], grams: Sequence[torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """`pruned_tensors` of layer `bid` as one dict (tensors by checkpoint name), and the original
    index of each kept expert."""
    return dict(pruned_tensors(ckpt, arch, bid, channels, grams)), kept_experts(channels)


def routed_params(arch: MoEArch, shapes: dict[str, tuple[int, ...]]) -> int:
    return arch.param_counts(shapes).routed_experts


# Shards of at most this many bytes: peak memory of the rewrite is one shard plus one layer,
# never the whole model (a 60 GB checkpoint is rewritten on a 24 GB machine). The buffered
# shard counts against prune's peak: at four Qwen3-30B-A3B layers (tools/bench_scale.py) 2 GiB
# shards peaked at 5.01 GiB, 1 GiB at 3.59, 512 MiB at 3.45, the bound being 3.48.
SHARD_BYTES = 512 << 20


class _ShardWriter:
    """Buffers tensors and writes safetensors shards as they fill; names them as
    save_pretrained does (one file: model.safetensors; several: -0000i-of-0000n + index)."""

    def __init__(self, out: pathlib.Path, limit: int = SHARD_BYTES):
        self.out, self.limit = out, limit
        self.buf: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.total = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.contiguous()
        self.buf[name] = t
        self.shapes[name] = tuple(t.shape)
        nbytes = t.numel() * t.element_size()
        self.size += nbytes
        self.total += nbytes
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buf:
            return
        tmp = f".shard-{len(self.files):05d}.safetensors"
        save_file(self.buf, self.out / tmp, metadata={"format": "pt"})
        self.files.append((tmp, list(self.buf)))
        self.buf, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            (self.out / self.files[0][0]).rename(self.out / "model.safetensors")
            return
        n = len(self.files)
        weight_map = {}
        for i, (tmp, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / tmp).rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        (self.out / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2))


def write_pruned(
    ckpt: Checkpoint,
    arch: MoEArch,
    alloc: Allocation,
    out: pathlib.Path,
    grams: Mapping[int, Sequence[torch.Tensor]] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> dict[str, tuple[int, ...]]:
    """Write config.json, the weights (layer by layer, sharded), prune_map.safetensors and the
    tokenizer files to `out`. Returns the written tensor shapes (the truth ratio_achieved is
    computed from)."""
    moe = set(arch.moe_layers)
    expert_names = arch.expert_tensor_names()
    routers = {n for b in moe for n in arch.router_tensor_names(b) if n in ckpt}
    per_layer: dict[int, list[str]] = {}
    rest: list[str] = []
    for name in ckpt.tensor_names:
        if name in expert_names or name in routers:
            continue
        bid = arch.layer_of(name)
        if bid is not None and bid < arch.n_layers:
            per_layer.setdefault(bid, []).append(name)
        else:  # embeddings, final norm, head, and the MTP layers (MoEArch.is_mtp): copied
            # unchanged, since neither transformers nor the export reads the MTP layers
            rest.append(name)

    shards = _ShardWriter(out, shard_bytes)
    for name in rest:
        shards.add(name, ckpt.tensor(name))
    stored_widths: list[list[int]] = []
    pmap: dict[int, tuple[list[int], list[list[int]]]] = {}
    # a layer's refit and slicing: 7 s at Qwen3-30B-A3B's size, minutes at Mixtral-8x7B's
    for bid in bar(range(arch.n_layers), desc="rewrite", unit="layer"):
        for name in per_layer.get(bid, []):
            shards.add(name, ckpt.tensor(name))
        if bid not in moe:
            stored_widths.append([])
            continue
        for name, t in pruned_tensors(ckpt, arch, bid, alloc.channels[bid], grams[bid] if grams is not None else None):
            shards.add(name, t)  # the buffer holds what is not on disk yet; nothing else does
        rows = kept_experts(alloc.channels[bid])
        kept = [alloc.channels[bid][x] for x in rows]
        stored_widths.append([int(ch.numel()) for ch in kept])
        pmap[bid] = (rows, [ch.tolist() for ch in kept])
        release_freed()
    shards.close()

    write_prune_map(out, pmap)
    (out / CONFIG).write_text(json.dumps(pruned_config(arch, ckpt.config, stored_widths), indent=2))
    skip = {CONFIG, INDEX, PRUNE_MAP, "prune_report.json"}
    for f in ckpt.path.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in skip:
            shutil.copy(f, out / f.name)  # tokenizer, chat template, generation config
    return shards.shapes


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
            # config classes alias keys both ways (Qwen3-MoE: num_experts -> num_local_experts);
            # a stale partner key would win on load
            for alias, target in getattr(arch.config_class, "attribute_map", {}).items():
                if key in (alias, target):
                    partner = target if key == alias else alias
                    if partner in cfg:
                        cfg[partner] = value
    return cfg
