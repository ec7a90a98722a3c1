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
import pathlib
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moe2gguf.arch import MoEArch, arch_for_config
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.modeling import build_model, hidden_of, load_weights
from moe2gguf.prune.calibrate import catch_layer_inputs

F64 = torch.float64
RIDGE = 1e-3
# The joint system of a layer has (K*W)^2 float64 entries, and building it costs
# tokens * (K*W)^2: 2.4 MB and seconds on the bundled model (6x256), but 1.2 GB and minutes at
# 32x384, and 43 GB for Qwen3-30B-A3B at 96x768 (`python tools/bench_cost.py`). Above this
# limit the same least squares is solved matrix-free (`Blockwise`: per-expert blocks + the
# features, conjugate gradients), which is faster there as well as smaller.
JOINT_LIMIT = 128 << 20
# A relative residual of 1e-3 leaves the block error within 0.05% of the converged one on the
# bundled model, in 12-19 iterations instead of 30-50 for 1e-6. Stopping early is safe (each CG
# step lowers the objective), so the cap bounds the cost where convergence is slow.
CG_ITERS, CG_TOL = 20, 1e-3
STORED = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}  # safetensors dtype names


def joint_fits(n_features: int) -> bool:
    """Whether a layer with this many kept channels (K*W) gets the dense joint solve."""
    return 8 * n_features**2 <= JOINT_LIMIT


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
    only its diagonal block A_e = sum f_e f_e^T, B_e = sum y f_e^T and its features f_e on the
    tokens routed to it (tokens x top-k x W floats). The ridge system D (A + lam I) = B + lam D0
    is solved by conjugate gradients, applying A through the features
    (D A)_e = sum_x (sum_e' D_e' f_e'(x)) f_e(x)^T, preconditioned by the blocks (A_e + lam I)^-1.
    Memory: the features, K*W^2 for the blocks and about eight float64 copies of D (hidden x
    K*W; for Qwen3-30B-A3B at 96x768 that is ~1.2 GB each); each iteration costs one pass of
    the features through D in float64."""

    def __init__(self, widths: list[int], hidden: int):
        self.A = [torch.zeros(w, w, dtype=F64) for w in widths]
        self.B = [torch.zeros(hidden, w, dtype=F64) for w in widths]
        self.feats: list[list[torch.Tensor]] = [[] for _ in widths]
        self.tokens: list[list[torch.Tensor]] = [[] for _ in widths]
        self.hidden, self.yy, self.n = hidden, 0.0, 0
        self.iters, self.residual = 0, 0.0  # of the last solve

    def add(self, parts: list[tuple[int, torch.Tensor, torch.Tensor]], target: torch.Tensor) -> None:
        """parts: (expert, token rows in this batch, p'_e h_e on them) for every selected expert."""
        y = target.float()  # one batch's products in float32, summed over batches in float64
        for xid, tok, f in parts:
            f = f.float()
            self.A[xid] += (f.T @ f).to(F64)
            self.B[xid] += (y[tok].T @ f).to(F64)
            self.feats[xid].append(f)
            self.tokens[xid].append(tok + self.n)
        self.yy += float(y.double().square().sum())
        self.n += y.shape[0]

    def _cat(self) -> None:
        self.feats = [[torch.cat(f)] if len(f) > 1 else f for f in self.feats]
        self.tokens = [[torch.cat(t)] if len(t) > 1 else t for t in self.tokens]

    def apply(self, downs: list[torch.Tensor]) -> list[torch.Tensor]:
        """(D A)_e for stacked-by-expert D, through the stored features (the products in float32,
        as the features are: the solve stops at a relative residual of CG_TOL anyway)."""
        pred = torch.zeros(self.n, self.hidden, dtype=torch.float32)
        for d, f, t in zip(downs, self.feats, self.tokens, strict=True):
            if f:
                pred.index_add_(0, t[0], f[0] @ d.float().T)
        return [(pred[t[0]].T @ f[0]).to(F64) if f else torch.zeros_like(d) for d, f, t in zip(downs, self.feats, self.tokens, strict=True)]

    def error(self, downs: list[torch.Tensor]) -> float:
        """sum_x ||y - D f||^2 = yy - 2 <D, B> + <D, D A>."""
        da = self.apply(downs)
        return self.yy + sum(float((d * (q - 2 * b)).sum()) for d, q, b in zip(downs, da, self.B, strict=True))

    def solve(self, downs0: list[torch.Tensor], ridge: float = RIDGE) -> list[torch.Tensor]:
        self._cat()
        d0 = [d.to(F64) for d in downs0]
        diag = torch.cat([a.diagonal() for a in self.A])
        lam = ridge * float(diag.mean().clamp_min(1e-30))
        pre = [torch.linalg.cholesky(a + lam * torch.eye(a.shape[0], dtype=F64)) for a in self.A]

        def op(x: list[torch.Tensor]) -> list[torch.Tensor]:
            return [q + lam * xi for q, xi in zip(self.apply(x), x, strict=True)]

        def precond(r: list[torch.Tensor]) -> list[torch.Tensor]:  # r_e (A_e + lam)^-1
            return [torch.cholesky_solve(ri.T, c).T for ri, c in zip(r, pre, strict=True)]

        def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
            return sum(float((x * y).sum()) for x, y in zip(a, b, strict=True))

        x = [d.clone() for d in d0]
        r = [b + lam * d - q for b, d, q in zip(self.B, d0, op(x), strict=True)]
        z = precond(r)
        p, rz = [zi.clone() for zi in z], dot(r, z)
        r0 = dot(r, r) ** 0.5
        self.iters = 0
        while self.iters < CG_ITERS and dot(r, r) ** 0.5 > CG_TOL * max(r0, 1e-300):
            self.iters += 1
            q = op(p)
            alpha = rz / max(dot(p, q), 1e-300)
            x = [xi + alpha * pi for xi, pi in zip(x, p, strict=True)]
            r = [ri - alpha * qi for ri, qi in zip(r, q, strict=True)]
            z = precond(r)
            rz_new = dot(r, z)
            p = [zi + (rz_new / rz) * pi for zi, pi in zip(z, p, strict=True)]
            rz = rz_new
        self.residual = dot(r, r) ** 0.5 / max(r0, 1e-300)  # reported: 1e-6 when converged
        return x


def features(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """[tokens, sum widths]: p'_e(x) h_e(x) in expert e's block where e is selected, else 0."""
    offs = [0]
    for e in experts:
        offs.append(offs[-1] + e.down_proj.in_features)
    f = hidden.new_zeros(hidden.shape[0], offs[-1], dtype=torch.float32)
    for xid, token, h in expert_features(hidden, index, weights, experts):
        f[token, offs[xid] : offs[xid + 1]] += h
    return f


def expert_features(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, experts: nn.ModuleList) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """`features` kept sparse: (expert, its tokens, p'_e h_e on them) per selected expert."""
    out = []
    for xid in index.unique().tolist():
        token, slot = torch.where(index == xid)
        out.append((xid, token, experts[xid].intermediate(hidden[token]).float() * weights[token, slot].unsqueeze(-1).float()))
    return out


# ----- one block ---------------------------------------------------------------------------------


class BlockFit:
    """Normal equations of one pruned MoE block, fed while the block runs: `observe()` hooks
    it; after each call, `add(y_orig)` takes the unpruned block's output on the same input.
    `solve()` re-fits the kept experts' down_proj in place."""

    def __init__(self, block: nn.Module, hidden: int):
        self.block, self.experts = block, block.experts
        self.widths = [e.down_proj.in_features for e in self.experts]
        self.joint = joint_fits(sum(self.widths))
        self.eq = Normal(sum(self.widths), hidden) if self.joint else Blockwise(self.widths, hidden)
        self.got: dict = {}

    @contextlib.contextmanager
    def observe(self) -> Iterator[None]:
        got = self.got

        def post(_m, _args, out):  # noqa: ANN001, ANN202
            got["block"] = hidden_of(out)

        def routed(_m, args, kw, out):  # noqa: ANN001, ANN202
            h, idx, w = MoEArch.experts_inputs(args, kw)
            got["feat"] = features(h, idx, w, self.experts) if self.joint else expert_features(h, idx, w, self.experts)
            got["routed"] = out

        hs = [self.block.register_forward_hook(post), self.experts.register_forward_hook(routed, with_kwargs=True)]
        try:
            yield
        finally:
            for hd in hs:
                hd.remove()

    def add(self, y_orig: torch.Tensor) -> None:
        # the routed part the unpruned block produced (shared experts etc. are equal in both)
        h = y_orig.shape[-1]
        target = (y_orig - self.got["block"]).reshape(-1, h) + self.got["routed"].reshape(-1, h)
        self.eq.add(self.got["feat"], target)

    def solve(self, ridge: float = RIDGE) -> tuple[list[torch.Tensor], dict]:
        """Write the re-fit down_proj into the block; returns them and the relative errors."""
        d0 = [e.down_proj.weight.double() for e in self.experts]
        if self.joint:
            d = solve_down(self.eq, torch.cat(d0, dim=1), ridge)
            before, after = block_error(self.eq, torch.cat(d0, dim=1)), block_error(self.eq, d)
            out = list(torch.split(d, self.widths, dim=1))
        else:
            out = self.eq.solve(d0, ridge)
            before, after = self.eq.error(d0), self.eq.error(out)
        for e, d in zip(self.experts, out, strict=True):
            e.down_proj.weight.copy_(d.float())
        rep = {"rel_err_before": before / self.eq.yy, "rel_err_after": after / self.eq.yy, "solver": "joint" if self.joint else "blockwise CG"}
        if not self.joint:
            rep.update(cg_iterations=self.eq.iters, cg_relative_residual=self.eq.residual)
        return out, rep


# ----- the layer-by-layer pass ------------------------------------------------------------------


@torch.no_grad()
def reconstruct(orig: Checkpoint, arch: MoEArch, pruned_dir: pathlib.Path, windows, batch: int = 8, ridge: float = RIDGE) -> dict:  # noqa: ANN001
    """Re-fit the down_proj of every kept expert in the pruned checkpoint `pruned_dir` (written
    by the rewrite) in place. Returns per MoE layer the relative block-output error on the
    calibration tokens before and after."""
    pck = Checkpoint(pruned_dir)
    parch = arch_for_config(pck.config)
    model, omodel = build_model(parch), build_model(arch)
    layers, olayers = model.get_submodule(parch.layers_attr), omodel.get_submodule(arch.layers_attr)
    hidden, kwargs, _ = catch_layer_inputs(model, parch, pck, windows, batch)

    new: dict[str, torch.Tensor] = {}
    report: dict[str, dict] = {}
    for bid in range(parch.n_layers):
        prefix = f"{parch.layers_attr}.{bid}."
        layer = layers[bid]
        load_weights(layer, prefix, pck, torch.float32)
        if parch.is_moe_layer(bid):
            olayer = olayers[bid]
            load_weights(olayer, prefix, orig, torch.float32)
            block, oblock = parch.moe_block(model, bid), arch.moe_block(omodel, bid)
            fit = BlockFit(block, parch.hidden_size)
            x_in: list[torch.Tensor] = []
            grab = block.register_forward_pre_hook(lambda _m, args: x_in.append(args[0]))
            try:
                with fit.observe():
                    for h, kw in zip(hidden, kwargs, strict=True):
                        layer(h, **kw)
                        fit.add(hidden_of(oblock(x_in.pop())))
            finally:
                grab.remove()
            downs, report[str(bid)] = fit.solve(ridge)
            for xid, d in enumerate(downs):
                name = parch.expert_name(bid, xid, "down")
                new[name] = d.to(STORED.get(pck.dtype(name), torch.float32))  # not float64 over all layers
            olayer.to("meta")
        for i, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
            hidden[i] = hidden_of(layer(h, **kw))
        layer.to("meta")
    _rewrite_tensors(pathlib.Path(pruned_dir), new)
    return report


def _rewrite_tensors(out: pathlib.Path, new: dict[str, torch.Tensor]) -> None:
    """Replace tensors in the safetensors files of `out`, each cast to its stored dtype."""
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
        save_file(t, f, metadata=meta)
    if left:
        raise RuntimeError(f"reconstruct: tensors not found in {out}: {sorted(left)[:3]}")
