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
  expert-drop        R=0.5  (4x256)   44.665 / 0.10691  ->  --reconstruct 41.251 / 0.02366
Expert-drop gains more (it removes more experts, so more tokens are re-routed); the deployable
layout stays ahead of expert-drop with the refit too. It is on by default for `--layout
llama.cpp` (and `--target-size`), where experts are removed; off for the ragged layout.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator

import torch
from torch import nn

from moe2gguf.arch import MoEArch, arch_for_config
from moe2gguf.checkpoint import Checkpoint

F64 = torch.float64
RIDGE = 1e-3
# The joint system of a layer has (K*W)^2 float64 entries: 2.4 MB on the bundled model, but
# 43 GB for Qwen3-30B-A3B at 96 experts x 768. Above this the re-fit is skipped (and said).
JOINT_LIMIT = 4 << 30


def joint_fits(n_features: int) -> bool:
    """Whether a layer with this many kept channels (K*W) can be re-fit within JOINT_LIMIT."""
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


def features(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """[tokens, sum widths]: p'_e(x) h_e(x) in expert e's block where e is selected, else 0."""
    widths = [e.down_proj.in_features for e in experts]
    offs = [0]
    for w in widths:
        offs.append(offs[-1] + w)
    f = hidden.new_zeros(hidden.shape[0], offs[-1], dtype=torch.float32)
    for xid in index.unique().tolist():
        token, slot = torch.where(index == xid)
        h = experts[xid].intermediate(hidden[token]).float() * weights[token, slot].unsqueeze(-1).float()
        f[token, offs[xid] : offs[xid + 1]] += h
    return f


# ----- one block ---------------------------------------------------------------------------------


class BlockFit:
    """Normal equations of one pruned MoE block, fed while the block runs: `observe()` hooks
    it; after each call, `add(y_orig)` takes the unpruned block's output on the same input.
    `solve()` re-fits the kept experts' down_proj in place."""

    def __init__(self, block: nn.Module, hidden: int):
        self.block, self.experts = block, block.experts
        self.widths = [e.down_proj.in_features for e in self.experts]
        self.eq = Normal(sum(self.widths), hidden)
        self.got: dict = {}

    @contextlib.contextmanager
    def observe(self) -> Iterator[None]:
        got = self.got

        def post(_m, _args, out):  # noqa: ANN001, ANN202
            got["block"] = out[0] if isinstance(out, tuple) else out

        def routed(_m, args, kw, out):  # noqa: ANN001, ANN202
            h, idx, w = args if len(args) == 3 else (args[0], kw["top_k_index"], kw["top_k_weights"])
            got["feat"] = features(h, idx, w, self.experts)
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
        d0 = torch.cat([e.down_proj.weight.double() for e in self.experts], dim=1)
        d = solve_down(self.eq, d0, ridge)
        err = {"rel_err_before": block_error(self.eq, d0) / self.eq.yy, "rel_err_after": block_error(self.eq, d) / self.eq.yy}
        out, off = [], 0
        for e, w in zip(self.experts, self.widths, strict=True):
            e.down_proj.weight.copy_(d[:, off : off + w].float())
            out.append(d[:, off : off + w])
            off += w
        return out, err


def _output(out):  # noqa: ANN001, ANN202
    return out[0] if isinstance(out, tuple) else out


# ----- the layer-by-layer pass ------------------------------------------------------------------


@torch.no_grad()
def reconstruct(orig: Checkpoint, arch: MoEArch, pruned_dir: pathlib.Path, windows, batch: int = 8, ridge: float = RIDGE) -> dict:  # noqa: ANN001
    """Re-fit the down_proj of every kept expert in the pruned checkpoint `pruned_dir` (written
    by the rewrite) in place. Returns per MoE layer the relative block-output error on the
    calibration tokens before and after, or {"skipped": why} when a layer's system is too large."""
    from moe2gguf.modeling import build_model, load_weights
    from moe2gguf.prune.calibrate import catch_layer_inputs

    pck = Checkpoint(pruned_dir)
    parch = arch_for_config(pck.config)
    widest = max(sum(w) for w in parch.expert_widths())
    if not joint_fits(widest):
        return {"skipped": f"{widest} kept channels per layer need a {8 * widest**2 / 2**30:.0f} GiB joint system (limit {JOINT_LIMIT / 2**30:.0f} GiB)"}
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
                        fit.add(_output(oblock(x_in.pop())))
            finally:
                grab.remove()
            downs, report[str(bid)] = fit.solve(ridge)
            for xid, d in enumerate(downs):
                new[parch.expert_name(bid, xid, "down")] = d
            olayer.to("meta")
        for i, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
            hidden[i] = _output(layer(h, **kw))
        layer.to("meta")
    _rewrite_tensors(pathlib.Path(pruned_dir), new)
    return report


def _rewrite_tensors(out: pathlib.Path, new: dict[str, torch.Tensor]) -> None:
    """Replace tensors in the safetensors files of `out`, each cast to its stored dtype."""
    from safetensors import safe_open
    from safetensors.torch import save_file

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
