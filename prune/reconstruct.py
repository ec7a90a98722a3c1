"""Block-output reconstruction after pruning (`prune --reconstruct`).

Removing experts re-routes tokens: a token whose expert is gone goes to a kept one, and the
kept experts' down_proj were trained for their own tokens only. Per MoE layer this re-fits the
kept experts' down_proj matrices jointly (ridge least squares) so that the pruned block, under
its NEW routing, reproduces the ORIGINAL block's output on calibration tokens:

    min_D  sum_x || y(x) - sum_{e kept, selected} p'_e(x) D_e h_e(x) ||^2 + lam ||D - D0||^2

features f(x) = [p'_e(x) h_e(x) for kept e, zero when e is not selected] (K*W of them), target
y(x) the unpruned block's routed output on the same input. The pass is layer by layer like
calibrate's (GPTQ `llama_sequential`): the pruned, reconstructed layers' outputs feed the next
layer, and the target is the unpruned layer applied to that same input.

The ridge pulls towards the pruned model's own down_proj (D0), not towards zero, so
features seen on few tokens stay as they were.

Measured on the bundled model (calibration 32,768 tokens of calib.txt, ctx 256; `moe2gguf check
<out> --text eval.txt --base <model> --chunks 40`, PyTorch; PPL / KLD vs unpruned):
  --layout llama.cpp R=0.25 (6x256)   39.821 / 0.00232  ->  --reconstruct 39.799 / 0.00150
  --layout llama.cpp R=0.5  (6x160)   40.244 / 0.00869  ->  --reconstruct 40.183 / 0.00700
  frequency          R=0.5  (4x256)   44.665 / 0.10691  ->  --reconstruct 41.251 / 0.02366
Frequency (whole experts by router mass) gains more: it removes more experts, so more tokens
are re-routed; the deployable layout stays ahead of it with the refit too. It is on by default
for `--layout llama.cpp` (and `--target-size`), where experts are removed; off for ragged.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moe2gguf.arch import MoEArch, arch_for_config
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.device import CPU, moved
from moe2gguf.memory import physical_ram, release_freed
from moe2gguf.modeling import build_model, hidden_of, load_weights
from moe2gguf.progress import bar
from moe2gguf.prune.calibrate import catch_layer_inputs
from moe2gguf.units import human_bytes

F64 = torch.float64
RIDGE = 1e-3
# The joint system of a layer has (K*W)^2 float64 entries, and building it costs
# tokens * (K*W)^2: 2.4 MB and seconds on the bundled model (6x256), but 1.2 GB and minutes at
# 32x384, and 43 GB for Qwen3-30B-A3B at 96x768 (`python tools/bench_cost.py`). Above this
# limit the same least squares is solved matrix-free (`Blockwise`: per-expert blocks + the
# features, conjugate gradients), which is faster there as well as smaller.
JOINT_LIMIT = 128 << 20
# Held-out KLD after the matrix-free re-fit (JOINT_LIMIT forced to 0, `moe2gguf check --chunks
# 40` on eval.txt) by CG iteration cap: fine-grained model at 64x32 (R=0.5) 0 (no re-fit)
# 0.02325, 1: 0.01868, 3: 0.01714, 4: 0.01683, 8: 0.01679, 20: 0.01681, dense solve 0.01682;
# first bundled model at 6x256 (R=0.25) 0: 0.00231, 2: 0.00149, 4: 0.00149, 20 (converged, 12-19
# iterations): 0.00150. Four iterations hold all of the gain, and each costs about two thirds of
# running the layer's experts on every calibration token (4 vs 6 tokens x top-k x width x hidden
# multiply-adds); the tolerance stops earlier where a layer converges sooner.
CG_ITERS, CG_TOL = 4, 1e-3
# rows of D solved together by `Blockwise`: a float32 vector of that many rows of every kept
# expert is at most this large (CG holds about five)
CG_CHUNK_BYTES = 64 << 20


# Calibration tokens per kept channel of a layer below which the re-fit makes held-out KLD worse
# than no re-fit at all: with fewer equations than that per unknown of a row of D it fits the
# calibration text, not the model. `moe2gguf check --chunks 40` on eval.txt, KLD with the
# re-fit on N calibration tokens (channels kept a layer; KLD without the re-fit), dense solve:
# fine-grained model at 56x64 (3,584; 0.00158) N=4,096 0.00368, 8,192 0.00215, 16,384 (4.6 a
# channel) 0.00168, 32,768 (9.1) 0.00136; at 64x32 (2,048; 0.02325) N=4,096 (2) 0.03827,
# 32,768 (16) 0.01682; the matrix-free solve's four iterations at 56x64: N=2,048 0.00333,
# 4,096 0.00221, 8,192 0.00173; first bundled model at 6x256 (1,536; 0.00231) N=4,096 (2.7)
# 0.00310, 8,192 (5.3) 0.00208, 32,768 (21) 0.00150. The break-even lies between 4.6 and 5.3
# tokens a channel; 8 leaves a margin. Qwen3-30B-A3B keeps about 75,000 channels a layer: 600,000 tokens.
MIN_TOKENS_PER_CHANNEL = 8


def enough_tokens(tokens: int, channels: int) -> bool:
    """Whether `tokens` calibration tokens can re-fit a layer that keeps `channels` channels."""
    return tokens >= MIN_TOKENS_PER_CHANNEL * channels


def joint_fits(n_features: int) -> bool:
    """Whether a layer with this many kept channels (K*W) gets the dense joint solve."""
    return 8 * n_features**2 <= JOINT_LIMIT


def refit_bytes(widths: list[int], tokens: int, top_k: int, hidden: int) -> int:
    """Memory the re-fit of one MoE layer keeping experts of `widths` holds besides its two
    layers, on `tokens` calibration tokens. Joint: the system, its ridged copy and the solve's
    factor. Matrix-free (`Blockwise`): the float64 blocks (two more of the widest while they are
    inverted), the features of each token's top-k experts with their token indices (and one
    expert's copy while they are joined), and CG's vectors and its [tokens, rows] predictions.
    Both: the targets and the hidden states. The blocks and the features are what grows: 7.4 GB
    and 2.8 GB at Mixtral-8x7B's layer size pruned to 8 x 10,752 on 32,768 tokens."""
    n = sum(widths)
    states = 2 * 4 * tokens * hidden
    if joint_fits(n):
        return 3 * 8 * n * n + 8 * n * hidden + states
    w = max(widths)
    rows = max(1, min(hidden, CG_CHUNK_BYTES // (4 * n)))  # as `Blockwise._chunks` cuts them
    feats = tokens * top_k * (4 * w + 8) + 4 * tokens * w
    return 8 * sum(x * x for x in widths) + 16 * w * w + feats + 5 * CG_CHUNK_BYTES + 4 * 4 * tokens * rows + states


def refit_memory_refusal(widths: list[int], tokens: int, top_k: int, hidden: int, layer_bytes: int) -> str | None:
    """Why the re-fit of a layer keeping `widths` would not fit this machine's memory (it holds
    the pruned and the unpruned layer, `layer_bytes` each at most, beside `refit_bytes`), or
    None: skipped before it starts, the pruned model is still written, where the OOM killer
    would lose the whole run."""
    need = 2 * layer_bytes + refit_bytes(widths, tokens, top_k, hidden)
    ram = physical_ram()
    if ram is None or need <= ram:
        return None
    held = "its normal equations" if joint_fits(sum(widths)) else "the kept experts' blocks and the features"
    return f"it would hold about {human_bytes(need)} at this layer size ({held} of {tokens:,} calibration tokens), more than this machine's {human_bytes(ram)}"


# ----- pure math ------------------------------------------------------------------------------


class Normal:
    """Normal equations of one layer: A = sum f f^T, B = sum f y^T, yy = sum ||y||^2."""

    def __init__(self, n_feat: int, hidden: int):
        self.A = torch.zeros(n_feat, n_feat, dtype=F64)
        self.B = torch.zeros(n_feat, hidden, dtype=F64)
        self.yy = 0.0
        self.n = 0

    def add(self, feats: torch.Tensor, target: torch.Tensor) -> None:
        f, y = feats.to(F64), target.to(F64)
        self.A += f.T @ f
        self.B += f.T @ y
        self.yy += float((y * y).sum())
        self.n += f.shape[0]


def block_error(eq: Normal, down: torch.Tensor) -> float:
    """sum_x ||y - D f||^2 for the stacked down matrix D [hidden, n_feat]."""
    d = down.to(F64)
    return eq.yy - 2.0 * float((d * eq.B.T).sum()) + float((d @ eq.A * d).sum())


def solve_down(eq: Normal, down0: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """argmin_D ||y - D f||^2 + lam ||D - D0||^2, lam = ridge * mean diag(A)."""
    d0 = down0.to(F64)
    lam = ridge * float(eq.A.diagonal().mean().clamp_min(1e-30))
    a = eq.A + lam * torch.eye(eq.A.shape[0], dtype=F64)
    return torch.linalg.solve(a, eq.B + lam * d0.T).T


class Blockwise:
    """The same least squares as `Normal` + `solve_down` without the (K*W)^2 matrix: per expert
    only its diagonal block A_e = sum f_e f_e^T and its features f_e on the tokens routed to it
    (tokens x top-k x W floats), and the targets y. The ridge system D (A + lam I) = B + lam D0
    is solved by conjugate gradients, applying A through the features
    (D A)_e = sum_x (sum_e' D_e' f_e'(x)) f_e(x)^T, preconditioned by the blocks (A_e + lam I)^-1.

    Every row of D (one hidden output) is its own least squares with the same A, so the solve
    runs over `CG_CHUNK_BYTES` of rows at a time: memory is the features, the targets, K*W^2 for
    the blocks and a few vectors of one chunk, not of D (for Qwen3-30B-A3B at 124x608 a float64
    D is 1.2 GB and CG keeps five of them plus B; that was prune's 12 GiB).

    The iterates are float32, like the features A is applied through, and one flat [rows, K*W]
    tensor, so the vector steps are one operation each and the preconditioner one batched
    product where the widths are equal: in float64 with a product per expert, the
    preconditioner alone was half of prune's time at 30B layer size (a 1e-3 residual needs no
    float64)."""

    def __init__(self, widths: list[int], hidden: int):
        self.A = [torch.zeros(w, w, dtype=F64) for w in widths]
        self.offsets = [sum(widths[:i]) for i in range(len(widths) + 1)]
        self.feats: list[list[torch.Tensor]] = [[] for _ in widths]
        self.tokens: list[list[torch.Tensor]] = [[] for _ in widths]
        self.targets: list[torch.Tensor] = []
        self.hidden, self.yy, self.n = hidden, 0.0, 0
        self.iters, self.residual = 0, 0.0  # of the last solve: the most any chunk needed
        self.inv: torch.Tensor | None = None  # [K, W, W] preconditioner blocks, equal widths only
        self.before = self.after = 0.0  # block error of the last solve, before and after

    def add(self, parts: list[tuple[int, torch.Tensor, torch.Tensor]], target: torch.Tensor) -> None:
        """parts: (expert, token rows in this batch, p'_e h_e on them) for every selected expert."""
        y = target.float()
        for xid, tok, f in parts:
            f = f.float()
            self.A[xid] += (f.T @ f).to(F64)  # one batch's products in float32, summed in float64
            self.feats[xid].append(f)
            self.tokens[xid].append(tok + self.n)
        self.targets.append(y)
        self.yy += float(y.double().square().sum())
        self.n += y.shape[0]

    def _cat(self) -> None:
        """Each expert's batches as one tensor, an expert at a time: building all of them next to
        the batches was a second copy of the features (0.6 GB at 30B layer size)."""
        for pieces in (self.feats, self.tokens):
            for i in range(len(pieces)):
                if len(pieces[i]) > 1:
                    pieces[i] = [torch.cat(pieces[i])]

    def _blocks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each expert's columns of a [rows, K*W] tensor (views)."""
        return [flat[:, a:b] for a, b in zip(self.offsets, self.offsets[1:])]

    def _predict(self, flat: torch.Tensor) -> torch.Tensor:
        """sum_e D_e f_e(x) for every token, D the [rows, K*W] chunk: [tokens, rows], float32."""
        pred = torch.zeros(self.n, flat.shape[0], dtype=torch.float32)
        for d, f, t in zip(self._blocks(flat), self.feats, self.tokens, strict=True):
            if f:
                pred.index_add_(0, t[0], f[0] @ d.T)
        return pred

    def _back(self, pred: torch.Tensor) -> torch.Tensor:
        """sum_x pred(x) f_e(x)^T per expert: with pred = `_predict(D)`, that is D A."""
        out = pred.new_zeros(pred.shape[1], self.offsets[-1])
        for o, f, t in zip(self._blocks(out), self.feats, self.tokens, strict=True):
            if f:
                o.copy_(pred[t[0]].T @ f[0])
        return out

    def _chunks(self) -> list[slice]:
        per_row = 4 * self.offsets[-1]
        step = max(1, min(self.hidden, CG_CHUNK_BYTES // max(per_row, 1)))
        return [slice(i, min(i + step, self.hidden)) for i in range(0, self.hidden, step)]

    def solve(self, downs0: list[torch.Tensor], ridge: float = RIDGE, on_change: Callable[[slice, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
        """The re-fit down matrices, in the dtype of `downs0` (the block's own weights); the
        block error sum_x ||y - D f||^2 before and after lands in `before` and `after`, and
        `on_change(rows, delta)` gets, chunk by chunk, how much the block's output on every
        calibration token moved in those rows ([tokens, rows], the stored weights' rounding
        included), so the next layer's inputs need no second run of this one."""
        self._cat()
        diag = torch.cat([a.diagonal() for a in self.A])
        lam = ridge * float(diag.mean().clamp_min(1e-30))
        for i, a in enumerate(self.A):  # the blocks are needed only as the preconditioner
            a.diagonal().add_(lam)
            self.A[i] = torch.cholesky_inverse(torch.linalg.cholesky(a)).float()  # applied as a product, not two triangular solves
        if len({a.shape[0] for a in self.A}) == 1:  # one batched product
            self.inv = torch.stack(self.A)
            self.A = list(self.inv.unbind(0))
        out = [torch.empty_like(d) for d in downs0]
        self.iters, self.residual, self.before, self.after = 0, 0.0, 0.0, 0.0
        chunks = self._chunks()
        for c in bar(chunks, desc="re-fit rows", unit="chunk", disable=len(chunks) < 2, leave=False):
            x, iters, res, delta = self._solve_rows(torch.cat([d[c].float() for d in downs0], 1), c, lam, downs0[0].dtype)
            for o, xi in zip(out, self._blocks(x), strict=True):
                o[c] = xi.to(o.dtype)
            if on_change is not None and delta is not None:
                on_change(c, delta)
            del delta
            self.iters, self.residual = max(self.iters, iters), max(self.residual, res)
        self.inv = None
        return out

    def _precond(self, r: torch.Tensor) -> torch.Tensor:
        """r_e (A_e + lam)^-1 for every expert's block of r."""
        if self.inv is not None:
            k, w = self.inv.shape[:2]
            return torch.bmm(r.view(r.shape[0], k, w).transpose(0, 1), self.inv).transpose(0, 1).reshape(r.shape)
        return torch.cat([ri @ inv for ri, inv in zip(self._blocks(r), self.A, strict=True)], 1)

    def _solve_rows(self, d0: torch.Tensor, rows: slice, lam: float, stored: torch.dtype) -> tuple[torch.Tensor, int, float, torch.Tensor | None]:
        """Preconditioned CG for rows `rows` of D ([rows, K*W]), from D0; the result is rounded
        to the `stored` dtype. The block errors before and after, and the change of the block's
        output (None: unchanged), come from products the solve makes anyway plus one
        prediction at the end."""
        y = torch.cat([t[:, rows] for t in self.targets])  # the targets are never concatenated whole
        b = self._back(y)

        def op(x: torch.Tensor) -> torch.Tensor:
            return self._back(self._predict(x)).add_(x, alpha=lam)

        def dot(a: torch.Tensor, b: torch.Tensor) -> float:  # summed in float64: 10^7 terms a chunk
            return float((a * b).sum(dtype=F64))

        pred = self._predict(d0)
        before = float((y - pred).square_().sum(dtype=F64))
        self.before += before
        r = b.sub_(self._back(pred))  # b + lam D0 - (A + lam) D0
        del b
        x = d0
        z = self._precond(r)
        p, rz = z, dot(r, z)
        r0 = dot(r, r) ** 0.5
        iters = 0
        while iters < CG_ITERS and dot(r, r) ** 0.5 > CG_TOL * max(r0, 1e-300):
            iters += 1
            q = op(p)
            alpha = rz / max(dot(p, q), 1e-300)
            x.add_(p, alpha=alpha)
            r.sub_(q, alpha=alpha)
            del q
            z = self._precond(r)
            rz_new = dot(r, z)
            p = z.add_(p, alpha=rz_new / rz)
            rz = rz_new
        res = dot(r, r) ** 0.5 / max(r0, 1e-300)  # reported: 1e-6 when converged
        if not iters:
            self.after += before
            return x, iters, res, None
        x = x.to(stored).float()  # what the checkpoint will hold
        new = self._predict(x)
        self.after += float((y - new).square_().sum(dtype=F64))
        return x, iters, res, new.sub_(pred)


def dense_features(parts: list[tuple[int, torch.Tensor, torch.Tensor]], tokens: int, widths: list[int]) -> torch.Tensor:
    """[tokens, sum widths]: p'_e(x) h_e(x) in expert e's block where e is selected, else 0,
    from the sparse (expert, its tokens, p'_e h_e on them) the experts' observer collects."""
    offs = [0]
    for w in widths:
        offs.append(offs[-1] + w)
    f = torch.zeros(tokens, offs[-1], dtype=torch.float32)
    for xid, token, h in parts:
        f[token, offs[xid] : offs[xid + 1]] += h
    return f


# ----- one block ---------------------------------------------------------------------------------


class BlockFit:
    """Normal equations of one pruned MoE block, fed while the block runs: `observe()` hooks
    it; after each call, `add(y_orig)` takes the unpruned block's output on the same input.
    `solve()` re-fits the kept experts' down_proj in place. The block may run on any device;
    what it observes is summed and solved on the CPU (float64 where the solve needs it)."""

    def __init__(self, block: nn.Module, hidden: int):
        self.block, self.experts = block, block.experts
        self.widths = [e.down_proj.in_features for e in self.experts]
        self.joint = joint_fits(sum(self.widths))
        self.eq = Normal(sum(self.widths), hidden) if self.joint else Blockwise(self.widths, hidden)
        self.got: dict = {}

    @contextlib.contextmanager
    def observe(self) -> Iterator[None]:
        got = self.got
        parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def tap(xid: int, token: torch.Tensor, _x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, _y: torch.Tensor | None) -> None:
            # the activations the block computes anyway (recomputing them cost a fifth of the pass)
            parts.append((xid, token.to(CPU), (h.float() * w.float()).to(CPU)))

        def post(_m, _args, out):  # noqa: ANN001, ANN202
            got["block"] = hidden_of(out).to(CPU)

        def routed(_m, _args, out):  # noqa: ANN001, ANN202
            got["feat"] = dense_features(parts, out.reshape(-1, out.shape[-1]).shape[0], self.widths) if self.joint else list(parts)
            got["routed"] = out.to(CPU)
            parts.clear()

        self.experts.observer = tap
        hs = [self.block.register_forward_hook(post), self.experts.register_forward_hook(routed)]
        try:
            yield
        finally:
            self.experts.observer = None
            for hd in hs:
                hd.remove()

    def add(self, y_orig: torch.Tensor) -> None:
        # the routed part the unpruned block produced (shared experts etc. are equal in both)
        h = y_orig.shape[-1]
        target = (y_orig.to(CPU) - self.got["block"]).reshape(-1, h) + self.got["routed"].reshape(-1, h)
        self.eq.add(self.got["feat"], target)

    def solve(self, ridge: float = RIDGE, on_change: Callable[[slice, torch.Tensor], None] | None = None) -> tuple[list[torch.Tensor], dict]:
        """Write the re-fit down_proj into the block; returns them and the relative errors.
        The matrix-free solver also reports the change of the block's output (`Blockwise.solve`)."""
        if self.joint:
            d0 = torch.cat([e.down_proj.weight.to(CPU, F64) for e in self.experts], dim=1)
            d = solve_down(self.eq, d0, ridge)
            before, after = block_error(self.eq, d0), block_error(self.eq, d)
            out = list(torch.split(d, self.widths, dim=1))
        else:  # in the weights' own dtype: a float64 copy of every kept down_proj is 1.2 GB at 30B
            out = self.eq.solve([e.down_proj.weight.to(CPU) for e in self.experts], ridge, on_change)
            before, after = self.eq.before, self.eq.after
        for e, d in zip(self.experts, out, strict=True):
            e.down_proj.weight.copy_(d)
        rep = {"rel_err_before": before / self.eq.yy, "rel_err_after": after / self.eq.yy, "solver": "joint" if self.joint else "blockwise CG"}
        if not self.joint:
            rep.update(cg_iterations=self.eq.iters, cg_relative_residual=self.eq.residual)
        return out, rep


# ----- the layer-by-layer pass ------------------------------------------------------------------


@torch.no_grad()
def reconstruct(orig: Checkpoint, arch: MoEArch, pruned_dir: pathlib.Path, windows, batch: int = 8, ridge: float = RIDGE,  # noqa: ANN001
                device: torch.device = CPU) -> dict:
    """Re-fit the down_proj of every kept expert in the pruned checkpoint `pruned_dir` (written
    by the rewrite) in place. Returns per MoE layer the relative block-output error on the
    calibration tokens before and after. The layers (pruned and unpruned) and the hidden
    states run on `device`; the solve runs on the CPU (`BlockFit`)."""
    release_freed()  # what the rewrite freed: the first layer would otherwise sit on top of it
    pck = Checkpoint(pruned_dir)
    parch = arch_for_config(pck.config)
    model, omodel = build_model(parch), build_model(arch)
    layers, olayers = model.get_submodule(parch.layers_attr), omodel.get_submodule(arch.layers_attr)
    hidden, kwargs, _ = catch_layer_inputs(model, parch, pck, windows, batch)
    hidden, kwargs = moved(hidden, device), moved(kwargs, device)

    report: dict[str, dict] = {}
    for bid in bar(range(parch.n_layers), desc="reconstruct", unit="layer"):
        prefix = f"{parch.layers_attr}.{bid}."
        layer = layers[bid]
        # experts as stored (bf16): with both layers resident, float32 would be 2x their size
        load_weights(layer, prefix, pck, torch.float32, experts_as_stored=True)
        layer.to(device)
        if parch.is_moe_layer(bid):
            olayer = olayers[bid]
            load_weights(olayer, prefix, orig, torch.float32, experts_as_stored=True)
            olayer.to(device)
            block, oblock = parch.moe_block(model, bid), arch.moe_block(omodel, bid)
            fit = BlockFit(block, parch.hidden_size)
            x_in: list[torch.Tensor] = []
            grab = block.register_forward_pre_hook(lambda _m, args: x_in.append(args[0]))
            try:
                with fit.observe():
                    for i, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
                        out = hidden_of(layer(h, **kw)).contiguous()
                        fit.add(hidden_of(oblock(x_in.pop())))
                        if not fit.joint:  # the re-fit's change is added to it (below)
                            hidden[i] = out
                        del out
            finally:
                grab.remove()
            olayer.to("meta")  # before the solve, which needs memory of its own
            release_freed()
            downs, report[str(bid)] = fit.solve(ridge, None if fit.joint else lambda rows, delta: _add_rows(hidden, rows, delta))
            joint = fit.joint
            del fit
            # written layer by layer: the re-fit down_proj of all layers would be a third of the model
            _rewrite_tensors(pathlib.Path(pruned_dir), {parch.expert_name(bid, xid, "down"): d for xid, d in enumerate(downs)})
            del downs
        if not parch.is_moe_layer(bid) or joint:  # the matrix-free re-fit has updated them already
            for i, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
                hidden[i] = hidden_of(layer(h, **kw))
        layer.to("meta")
        release_freed()
    return report


def _add_rows(hidden: list[torch.Tensor], rows: slice, delta: torch.Tensor) -> None:
    """Add delta [tokens, rows] to columns `rows` of the hidden states, batches in token order."""
    n = 0
    for h in hidden:
        flat = h.view(-1, h.shape[-1])
        flat[:, rows] += delta[n : n + flat.shape[0]].to(flat.device)
        n += flat.shape[0]


def _rewrite_tensors(out: pathlib.Path, new: dict[str, torch.Tensor]) -> None:
    """Replace tensors in the safetensors files of `out`, each cast to its stored dtype. A file
    is rewritten next to itself and renamed over it, so a mapping of the old file (the pruned
    checkpoint being read) keeps its pages."""
    left = dict(new)
    for f in sorted(out.glob("*.safetensors")):
        if f.name == "prune_map.safetensors":
            continue
        with safe_open(f, framework="pt") as s:
            names = list(s.keys())
            if not any(n in left for n in names):
                continue
            meta = s.metadata()
            t = {n: s.get_tensor(n) for n in names}
        for n in names:
            if n in left:
                t[n] = left.pop(n).to(t[n].dtype).contiguous()
        tmp = f.with_name(f".{f.name}.rewrite")
        save_file(t, tmp, metadata=meta)
        del t
        os.replace(tmp, f)
    if left:
        raise RuntimeError(f"reconstruct: tensors not found in {out}: {sorted(left)[:3]}")
