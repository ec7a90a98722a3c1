"""Measured choice of the deployable shape (K experts x width W) for `--layout llama.cpp`.

Attribution ranks channels inside an expert well, but it cannot price removing a whole expert:
the removed expert's tokens go to kept experts whose channels were chosen on other tokens, and
whether that costs a little or a lot depends on how alike the experts are. On the bundled
model, at about 25% removed (`moe2gguf check <pruned> --base <model>`, PyTorch, 20 windows):

    6 x 256 (two experts removed)    KLD 0.00261
    7 x 224                          KLD 0.00108
    8 x 192 (no expert removed)      KLD 0.00245

a curve no fixed weight on removed-expert attribution follows. So the candidate shapes are
measured: each one's pruned model, built exactly as the rewrite writes it (kept experts, their
channels, the refit down_proj, the router cut to the kept rows), runs on calibration tokens,
and its KL-divergence from the unpruned model is the score. One layer-by-layer pass serves
every candidate: a decoder layer is materialised once and runs the unpruned hidden states and
each candidate's own, with the MoE block's output swapped for the candidate's block. Peak
memory is one layer (its unpruned experts only while the unpruned stream runs, or while a
re-fit needs their output), one candidate's router and down_proj (its experts' gate/up rows
are sliced from the checkpoint as each expert runs; all of them where a re-fit needs them), a
hidden-state copy per candidate, and one slice of the output head (`_kld_sums`). The KLD is
taken where `check` takes it, on the second half of each window (every k-th of those where the
head is so large that all of them would cost more than `HEAD_MACS`).

On the bundled model (8,192 calibration tokens, 12 s for ten shapes) this ranks the ten shapes
from 4x256 to 8x192 in the same order as their KLD on the held-out eval.txt, where the
attribution heuristic (`deploy.EXPERT_LOSS_WEIGHT`) got the 0.75 group wrong (6x256 first).

`--reconstruct` (on by default in this layout) changes the ranking: it helps a shape that
removed experts more (eval KLD 6x256 0.00261 -> 0.00158, 8x192 0.00245 -> 0.00207). So the
probe then re-fits every candidate the same way (`reconstruct.BlockFit`) on half the batches
and measures on the other half. The re-fit needs the tokens prune's own uses: fit on 4,096
tokens it overfits (held-out KLD of 6x256 0.0080, worse than without it); fit on 16,384 of
the 32,768 calibration tokens it ranks 7x224 < 6x256 < 8x192 as eval.txt does (60 s, 7 shapes),
those figures taken on every position. On `check`'s positions, the second half of each window
(as now), prune's defaults at --ratio 0.25 rank 7x224 (0.00091) < 8x192 (0.00172) ~ 6x256
(0.00176), against 0.00088 < 0.00172 (6x256) ~ 0.00181 (8x192) on every position; the shape
chosen at --ratio 0.25 and 0.5 on both bundled models is the same either way.
Where a candidate's re-fit would be the matrix-free solve (`reconstruct.joint_fits`: more than
4,096 kept channels per layer, e.g. 124 x 608 at Qwen3-30B-A3B) it costs as much as the final
re-fit itself, once per candidate; there the probe ranks the shapes without it, prune's final
re-fit still runs, and prune_report.json says so (`deployable.probe_refit_skipped`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from moe2gguf.arch import MoEArch, arch_for_config
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.device import CPU, moved
from moe2gguf.memory import release_freed, trim
from moe2gguf.modeling import ExpertReader, as_stored, build_model, hidden_of, load_weights, to_device, unload
from moe2gguf.prune.calibrate import catch_layer_inputs
from moe2gguf.prune.deploy import Shape, ShapeScores, allocate_shape
from moe2gguf.progress import bar
from moe2gguf.protocol import scored
from moe2gguf.prune.reconstruct import BlockFit
from moe2gguf.prune.rewrite import kept_experts, pruned_config, pruned_layer, pruned_tensors

PROBE_TOKENS = 8192  # calibration tokens the shapes are measured on
# windows run through a layer at once. With the unpruned experts resident beside a candidate's
# block, 8 windows of 512 took the probe to 3.95 GiB at Qwen3-30B-A3B's layer size and 4 to
# 3.43 (2 windows: 3.31, 10% slower); without them 4 windows peaked at 2.55 GiB, and with the
# candidates' gate/up sliced as each expert runs its shapes peak at 1.4-1.7 GiB, the unpruned
# stream, its experts read as they run too, at 1.1-1.2 (tools/bench_scale.py)
PROBE_BATCH = 4


class _Overlay:
    """A checkpoint seen through replaced tensors (one pruned layer, or the weights of a layer
    already in memory), for `load_weights` and `pruned_layer`."""

    def __init__(self, ckpt: Checkpoint, tensors: dict[str, torch.Tensor]):
        self.ckpt, self.tensors, self.path = ckpt, tensors, ckpt.path

    def tensor(self, name: str) -> torch.Tensor:
        return self.tensors[name] if name in self.tensors else self.ckpt.tensor(name)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors or name in self.ckpt

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape) if name in self.tensors else self.ckpt.shape(name)


def candidates(fit: list[Shape], table: ShapeScores, n: int) -> list[Shape]:
    """The widest fitting width per expert count (a narrower one with the same count only
    loses channels), ranked by attribution quality, the first `n`."""
    widest: dict[int, Shape] = {}
    for s in fit:
        if s.experts not in widest or s.width > widest[s.experts].width:
            widest[s.experts] = s
    ranked = sorted(widest.values(), key=lambda s: -table.quality(s))
    return ranked[:n]


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _final_head(model: nn.Module, arch: MoEArch, ckpt: Checkpoint) -> tuple[nn.Module, torch.Tensor]:
    """The final norm (materialised) and the output projection's weight as stored: the model's
    own, or the input embedding's where the config ties them (names from the arch hooks)."""
    norm = model.get_submodule(arch.final_norm)
    load_weights(norm, f"{arch.final_norm}.", ckpt, torch.float32)
    if arch.head_name in ckpt:
        return norm, ckpt.tensor(arch.head_name)
    if not arch.head_is_tied(ckpt):
        raise RuntimeError(f"{ckpt.path} has no {arch.head_name} and does not tie it to the embeddings")
    return norm, ckpt.tensor(f"{_name_of(model, model.get_input_embeddings())}.weight")


def _load_sliced_on_call(block: nn.Module, prefix: str, ckpt: Checkpoint | _Overlay, arch: MoEArch, bid: int, channels: list[torch.Tensor],
                         gram: Sequence[torch.Tensor] | None, device: torch.device) -> None:
    """Materialise a candidate's pruned MoE `block` (parameters under `prefix`) with its kept
    experts' gate/up rows left in the checkpoint: each expert's are sliced from the checkpoint's
    pages while it runs (`ExpertList.resident`) and let go after. The block holds its router,
    its down_proj (made once, with `rewrite.refit_down` where `gram` is given) and one expert's
    gate/up, not all of them: a whole pruned block is 2 GB at Mixtral-8x7B's layer size, and it
    sat beside the next expert's down_proj refit (`tools/bench_scale.py --dims mixtral-8x7b`)."""
    kept = kept_experts(channels)
    tensors = dict(pruned_tensors(ckpt, arch, bid, channels, gram, parts=("down",)))
    for k, xid in enumerate(kept):  # placeholders of the pruned shape, for load_weights' checks
        for p in ("gate", "up"):
            tensors[arch.expert_name(bid, k, p)] = torch.empty(channels[xid].numel(), ckpt.shape(arch.expert_name(bid, xid, p))[1], device="meta")
    load_weights(block, prefix, _Overlay(ckpt, tensors), torch.float32, experts_as_stored=True)
    del tensors
    to_device(block, device)
    experts = block.experts

    @contextlib.contextmanager
    def resident(k: int) -> Iterator[None]:
        lins = (experts[k].gate_proj, experts[k].up_proj)
        held = [lin.weight for lin in lins]
        try:
            for lin, p in zip(lins, ("gate", "up"), strict=True):
                w = as_stored(ckpt.tensor(arch.expert_name(bid, kept[k], p))[channels[kept[k]]], torch.float32)
                lin.weight = nn.Parameter(w.to(device), requires_grad=False)
            yield
        finally:
            for lin, w in zip(lins, held, strict=True):
                lin.weight = w

    experts.resident = resident


@contextlib.contextmanager
def _swapped(parent: nn.Module, old: nn.Module, new: nn.Module) -> Iterator[None]:
    """`new` in place of the submodule `old` of `parent` (the candidate's MoE block in the
    unpruned decoder layer), so the unpruned block does not also run: under its registered name
    and under every plain attribute of its owner that is the same module (Mixtral's layer calls
    `self.mlp`, an alias of the registered `block_sparse_moe`, `moe2gguf/arch/mixtral.py`;
    swapped under its name alone, the layer kept calling the unpruned block)."""
    path = _name_of(parent, old)
    owner = parent.get_submodule(path.rpartition(".")[0]) if "." in path else parent
    attr = path.rpartition(".")[2]
    aliases = [k for k, v in vars(owner).items() if v is old]
    setattr(owner, attr, new)
    for k in aliases:
        vars(owner)[k] = new
    try:
        yield
    finally:
        setattr(owner, attr, old)
        for k in aliases:
            vars(owner)[k] = old


# Output-head rows cast to float32 at a time: a 151,936 x 2048 head is 1.2 GB in float32 and its
# logits for 1,024 tokens 0.6 GB, so the vocabulary is walked in slices with running sums.
VOCAB_SLICE = 16384
TOKEN_SLICE = 512
# Multiply-adds through the output head per stream that the KLD may cost: 1,024 positions of
# Qwen3-30B-A3B's 151,936 x 2048 head. Its cost grows with the vocabulary, the precision a ranking
# needs does not: past this, every k-th scored position is taken (spread over all windows). At
# 30B size the 4,096 scored positions of the 8,192 probe tokens took ~150 s on 2 cores (85% of
# it the product, near the cores' peak), more than a layer of calibrate; every other one took
# 61 s, still prune's largest cost that does not grow with the layers (2 layers: probe 116 s,
# rewrite 16 s), so every 4th is taken. The candidates are scored on the same positions, so
# their differences are paired: on both bundled models (4,096 entries, never strided) every
# 2nd, 4th and 8th of the 8,192 positions ranked every candidate as all of them did, at --ratio
# 0.25 and 0.5, down to 64 x 32 < 63 x 32 < 62 x 32, 0.3% apart (tools/bench_probe_stride.py).
HEAD_MACS = 1024 * 151936 * 2048


def kld_stride(positions: int, vocab: int, hidden: int, budget: int) -> int:
    """Every how many scored positions the probe's KLD is taken: 1 while `positions` fit the
    head's budget of multiply-adds, else the least stride that brings them within it."""
    return max(1, -(-positions * vocab * hidden // budget))


def kld_picks(per_batch: list[int], stride: int) -> list[torch.Tensor]:
    """Per batch of `per_batch[j]` scored positions, the indices of its positions that are
    every `stride`-th of all of them, counted across batches (a batch may have none)."""
    picks, start = [], 0
    for n in per_batch:
        picks.append(torch.arange(-start % stride, max(n, -start % stride), stride))
        start += n
    return picks


def _kld_sums(ref: torch.Tensor, got: list[torch.Tensor], norm: nn.Module, head: torch.Tensor) -> list[float]:
    """Per stream in `got`, the sum over tokens of KL(p_ref || p_got). With d = z_got - z_ref,
    KL = log E_p[e^d] - E_p[d] = log1p(A) - A + C, where A = E_p[expm1(d)] and
    C = E_p[expm1(d) - d] >= 0: no term cancels, so float32 logits serve (d comes from one
    product with h_got - h_ref, small where the streams are close), where z_ref - z_got and
    two log-sum-exps of logits near 20 needed float64. E_p is accumulated over vocabulary
    slices, rescaled as the running maximum of z_ref moves; memory is one slice of the head
    and of the logits."""
    r = norm(ref.reshape(-1, ref.shape[-1]))
    ds = [norm(g.reshape(-1, g.shape[-1])) - r for g in got]
    dev = r.device

    def f64(x: torch.Tensor) -> torch.Tensor:  # the running sums: on the CPU (MPS has no float64)
        return x.to(CPU, torch.float64)

    totals = [0.0] * len(got)
    for t in range(0, r.shape[0], TOKEN_SLICE):
        rt, dt = r[t : t + TOKEN_SLICE], [d[t : t + TOKEN_SLICE] for d in ds]
        n = rt.shape[0]
        m = torch.full((n,), -torch.inf, device=dev)  # running max of z_ref
        s = torch.zeros(n, dtype=torch.float64)  # sum exp(z_ref - m)
        a = [torch.zeros(n, dtype=torch.float64) for _ in got]  # sum exp(z_ref - m) expm1(d)
        c = [torch.zeros(n, dtype=torch.float64) for _ in got]  # sum exp(z_ref - m) (expm1(d) - d)
        both = torch.cat([rt, *dt])  # one product for every stream: 19.6 s, not 24.4, for 5 x 512 tokens at 151,936
        for v in range(0, head.shape[0], VOCAB_SLICE):
            z = both @ head[v : v + VOCAB_SLICE].to(dev, torch.float32).T
            zr = z[:n]
            m_new = torch.maximum(m, zr.amax(-1))
            scale = f64(torch.exp(m - m_new))
            e = torch.exp(zr.sub_(m_new[:, None]))
            s = s * scale + f64(e.sum(-1))
            for i in range(len(dt)):
                zd = z[(i + 1) * n : (i + 2) * n]
                x = torch.expm1(zd)
                a[i] = a[i] * scale + f64(torch.einsum("ij,ij->i", e, x))
                c[i] = c[i] * scale + f64(torch.einsum("ij,ij->i", e, x.sub_(zd)))
            m = m_new
            trim()
        for i in range(len(got)):
            big_a = a[i] / s
            totals[i] += float((torch.log1p(big_a) - big_a + c[i] / s).sum())
    return totals


@torch.no_grad()
def shape_klds(
    ckpt: Checkpoint,
    arch: MoEArch,
    shapes: list[Shape],
    scores: list[torch.Tensor],
    groups: list[int],
    windows: np.ndarray,
    grams: Mapping[int, Sequence[torch.Tensor]] | None = None,
    reconstruct: bool = False,
    batch: int = PROBE_BATCH,
    device: torch.device = CPU,
) -> dict[Shape, float]:
    """Per shape, the mean KL-divergence of the pruned model's next-token distribution from the
    unpruned one's on `windows`, at the positions `check` scores (every `kld_stride`-th of them
    through a head larger than `HEAD_MACS` allows). Layer by layer: each decoder layer is
    materialised once and runs the unpruned stream and, with its MoE block's output replaced by
    the shape's pruned block, every shape's own stream. With `reconstruct`, each pruned block is
    first re-fit as `prune --reconstruct` does (prune/reconstruct.py) on the even batches of
    windows, and the KLD is taken on the odd ones, so that a shape is not credited for fitting
    its own test tokens (a single window is both). The KLD is before quantization: under
    `--target-size` the shapes then get different bytes left for type upgrades, which the probe
    does not see. On `device` run the layers, the candidates' blocks, their streams and the
    head's slices; the re-fit's sums and the KLD's running sums stay on the CPU in float64."""
    if reconstruct:  # at least two batches: one to fit on, one to measure on
        batch = max(1, min(batch, len(windows) // 2))
    model = build_model(arch)
    layers = model.get_submodule(arch.layers_attr)
    ref, kwargs, _ = catch_layer_inputs(model, arch, ckpt, windows, batch)
    ref, kwargs = moved(ref, device), moved(kwargs, device)
    streams = {s: [h.clone() for h in ref] for s in shapes}
    allocs = {s: allocate_shape(scores, s, groups) for s in shapes}
    pruned = {}
    for s in shapes:  # meta-device models of each shape, for their blocks' structure
        widths = [[s.width] * s.experts if arch.is_moe_layer(b) else [] for b in range(arch.n_layers)]
        parch = arch_for_config(pruned_config(arch, ckpt.config, widths))
        pruned[s] = (parch, build_model(parch))
    moe_index = {b: i for i, b in enumerate(arch.moe_layers)}
    fit_batches = range(0, len(ref), 2)

    def run(layer: nn.Module, hidden: list[torch.Tensor], batches: range | None = None) -> list[torch.Tensor]:
        out = []
        for i in batches if batches is not None else range(len(hidden)):
            out.append(hidden_of(layer(hidden[i], **kwargs[i])))
            trim()
        return out

    for bid in bar(range(arch.n_layers), desc="probe shapes", unit="layer"):
        layer = layers[bid]
        # experts as stored (bf16), read as they run, but where the re-fit slices its candidates
        # from them in memory
        whole = bid in moe_index and reconstruct and device == CPU
        load_weights(layer, f"{arch.layers_attr}.{bid}.", ckpt, torch.float32, experts_as_stored=True, stream_experts=not whole)
        to_device(layer, device)  # the one layer on the device (a no-op on the CPU)
        ref[:] = run(layer, ref)
        source: Checkpoint | _Overlay = ckpt
        if whole:
            # the re-fit's target is the unpruned block's output: it stays, and the shapes are
            # sliced from it in memory rather than read again (on an accelerator, from the pages)
            source = _Overlay(ckpt, layer.state_dict(prefix=f"{arch.layers_attr}.{bid}.", keep_vars=False))
        elif bid in moe_index and device == CPU and isinstance(reader := arch.moe_block(model, bid).experts.resident, ExpertReader):
            # the experts the unpruned stream dequantized and kept (block-FP8) are sliced from,
            # not dequantized again by every shape for every batch
            source = _Overlay(ckpt, reader.kept)
        if bid in moe_index and not reconstruct:
            # every shape's forward swaps it out: what it holds besides its streamed experts (the
            # router, shared experts) need not stay beside a pruned block
            unload(arch.moe_block(model, bid))
            release_freed()
        for s in bar(shapes, desc=f"layer {bid}", unit="shape", disable=bid not in moe_index, leave=False):
            if bid not in moe_index:
                streams[s][:] = run(layer, streams[s])
                continue
            parch, pmodel = pruned[s]
            block = parch.moe_block(pmodel, bid)
            name = _name_of(pmodel, block)
            channels, gram = allocs[s].channels[moe_index[bid]], grams[bid] if grams is not None else None
            if reconstruct:  # the re-fit needs every kept expert's weights at once
                tensors, _ = pruned_layer(source, arch, bid, channels, gram)
                load_weights(block, f"{name}.", _Overlay(ckpt, tensors), torch.float32, experts_as_stored=True)
                block.to(device)
                del tensors
            else:
                _load_sliced_on_call(block, f"{name}.", source, arch, bid, channels, gram, device)
            oblock = arch.moe_block(model, bid)
            if reconstruct:  # the unpruned block's output on the pruned stream is the fit's target
                fit = BlockFit(block, arch.hidden_size)

                def swap_and_fit(_m, args, out, block=block, fit=fit):  # noqa: ANN001, ANN202
                    y = block(*args)
                    fit.add(hidden_of(out))
                    return y

                hook = oblock.register_forward_hook(swap_and_fit)
                try:
                    with fit.observe():
                        run(layer, streams[s], fit_batches)
                finally:
                    hook.remove()
                fit.solve()
            with _swapped(layer, oblock, block):
                streams[s][:] = run(layer, streams[s])
            block.to("meta")
            block.experts.resident = None
            release_freed()
        # an overlay holds the layer's tensors, mapped from the checkpoint: kept past the loop it
        # held the last layer's 1.2 GB of file pages through the KLD at 30B layer size
        del source
        unload(layer)
        release_freed()
    norm, head = _final_head(model, arch, ckpt)
    norm.to(device)
    test = range(1, len(ref), 2) if reconstruct and len(ref) > 1 else range(len(ref))
    # the positions `check` scores (the second half of each window): they are what the probe
    # predicts, and the output head over 151,936 entries costs twice as much on every position
    pos = scored(windows.shape[1])
    per_batch = [ref[i].shape[0] * (pos.stop - pos.start) for i in test]
    stride = kld_stride(sum(per_batch), head.shape[0], head.shape[1], HEAD_MACS)
    picks = dict(zip(test, kld_picks(per_batch, stride), strict=True))
    n = sum(len(p) for p in picks.values())
    total = dict.fromkeys(shapes, 0.0)
    # slice by slice, for the progress bar: through a 151,936-entry head a slice takes ~20 s
    slices = [(i, t) for i in test for t in range(0, len(picks[i]), TOKEN_SLICE)]
    for i, t in bar(slices, desc="probe KLD", unit="slice", disable=len(slices) < 2):

        def rows(x: torch.Tensor, i: int = i, t: int = t) -> torch.Tensor:
            return x[:, pos].reshape(-1, x.shape[-1])[picks[i][t : t + TOKEN_SLICE]]

        for s, k in zip(shapes, _kld_sums(rows(ref[i]), [rows(streams[s][i]) for s in shapes], norm, head), strict=True):
            total[s] += k
    return {s: total[s] / n for s in shapes}
