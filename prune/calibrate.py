"""`moe2gguf calibrate`: run calibration text through the model one decoder layer at a time.

Loop (GPTQ `llama_sequential` / Wanda `prune_wanda`): catch the inputs of layer 0 once, then
per layer materialise its weights, hook, run every calibration window, unhook (in `finally`),
free the layer, and let its outputs be the next layer's inputs. The routed experts, most of a
layer, are read from the checkpoint as each one runs and let go after (`load_weights`'
stream_experts). Peak memory is one layer without its experts, one expert, and the hidden
states of the calibration tokens, never the whole model.

CALIB/ holds
  calib.json          what was measured (model shape, tokens, ctx, texts, peak layer memory)
  scores.safetensors  per MoE layer: routing freq/mass, REAP's summed g*||f||, channel
                      moments, W_down column norms, magnitude scores, router-weighted Gram
                      matrices, residual scale, and (where the model fits) the Taylor terms
  imatrix.gguf        llama.cpp's GGUF imatrix (general.type=imatrix, <name>.in_sum2/.counts)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterable

import click
import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moe2gguf.arch import MoEArch, arch_for_config
from moe2gguf.calib import CALIB_JSON, IMATRIX, SCORES
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.device import CPU, moved, resolve
from moe2gguf.errors import UserError, atomic_dir, check_output
from moe2gguf.exporter.imatrix import write_imatrix
from moe2gguf.inputs import hf_tokenizer
from moe2gguf.memory import physical_ram, release_freed, trim
from moe2gguf.modeling import HALF_STORED, ExpertObserver, build_model, hidden_of, load_model, load_weights, to_device, unload
from moe2gguf.outputs import free_bytes, sweep_stale
from moe2gguf.protocol import read_text
from moe2gguf.prune.gram import GramSpill, write_grams
from moe2gguf.prune.scores import ExpertStats, InputStats, ScaleStats, TaylorStats, norms, weight_norms
from moe2gguf.progress import bar
from moe2gguf.units import human_bytes

# The Taylor pass holds the whole model (float32) for a full-model backward, the one pass that
# does not stream layers; above this many weight bytes (or half the machine's memory) it is
# skipped and `prune --score taylor` refuses. 1 GiB keeps the bundled and test models in and
# calibrate's memory one layer's wherever that matters: at 8 GiB it ran, and was killed above
# 16 GiB, on two layers of Qwen3-30B-A3B (tools/bench_scale.py)
TAYLOR_LIMIT = 1 << 30


class StopForward(Exception):
    """Raised by the catcher once it has the inputs of the first decoder layer."""


class _Catcher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None
        self.kwargs: dict = {}

    def forward(self, hidden: torch.Tensor, *args, **kwargs):  # noqa: ANN002,ANN003 - the layer's call
        if args:
            raise TypeError("decoder layers are expected to receive everything but hidden_states as keywords")
        self.hidden, self.kwargs = hidden, kwargs
        raise StopForward


@torch.no_grad()
def catch_layer_inputs(model: nn.Module, arch: MoEArch, ckpt: Checkpoint, windows: np.ndarray, batch: int) -> tuple[list[torch.Tensor], list[dict], int]:
    """What reaches decoder layer 0 for every batch of windows: hidden states and the keyword
    arguments the model passes its layers (rotary tables, masks). Only the embedding is
    materialised, and freed again. Returns (hidden, kwargs, bytes materialised meanwhile)."""
    base = model.get_submodule(arch.layers_attr.rpartition(".")[0])
    layers = model.get_submodule(arch.layers_attr)
    embed = model.get_input_embeddings()
    embed_name = next(n for n, m in model.named_modules() if m is embed)
    # a 16-bit table stays so and its rows are upcast as they are looked up (exact): at a
    # vocabulary of 151,936 the float32 table was 1.2 GB next to everything else in memory
    name = f"{embed_name}.weight"
    half = HALF_STORED.get(ckpt.dtype(name)) if name in ckpt else None  # a missing one: load_weights names it
    load_weights(embed, f"{embed_name}.", ckpt, half or torch.float32)
    upcast = embed.register_forward_hook(lambda _m, _args, out: out.float()) if half else None
    catcher, first = _Catcher(), layers[0]
    layers[0] = catcher
    hidden, kwargs = [], []
    try:
        for b in range(0, len(windows), batch):
            try:
                base(input_ids=torch.from_numpy(windows[b : b + batch]), use_cache=False)
            except StopForward:
                pass
            hidden.append(catcher.hidden)
            kwargs.append(catcher.kwargs)
    finally:
        layers[0] = first
        if upcast is not None:
            upcast.remove()
    nbytes = _materialised_bytes(model)
    embed.to("meta")
    return hidden, kwargs, nbytes


def tokenize(model_dir: str | pathlib.Path, texts: list[str]) -> list[np.ndarray]:
    tok = hf_tokenizer(model_dir)
    return [np.asarray(tok(read_text(t))["input_ids"], dtype=np.int64) for t in texts]


def spread_windows(ids: list[np.ndarray], names: list[str], tokens: int, ctx: int) -> np.ndarray:
    """[n, ctx] windows, n = tokens // ctx, shared evenly between the texts and spread evenly
    over each text, so a mixed calibration set is represented whole."""
    if ctx < 2:
        raise UserError(f"--ctx {ctx} must be at least 2")
    n = tokens // ctx
    if n < 1:
        raise UserError(f"--tokens {tokens} is less than one window of --ctx {ctx}; raise --tokens")
    out = []
    for i, (t, name) in enumerate(zip(ids, names, strict=True)):
        want = n // len(ids) + (1 if i < n % len(ids) else 0)
        have = len(t) // ctx
        if have < want:
            raise UserError(
                f"{name} has {len(t)} tokens, too few for its share of {want} windows of {ctx} tokens; "
                "pass a longer text or lower --tokens"
            )
        if want:
            starts = (np.arange(want) * (have / want)).astype(np.int64) * ctx
            out.append(np.stack([t[s : s + ctx] for s in starts]))
    return np.concatenate(out)


def calibration_windows(model_dir: str | pathlib.Path, info: dict, tokens: int | None = None) -> np.ndarray:
    """Windows of the texts a calibration ran on (calib.json `info`), as it cut them: `tokens`
    of them (default: as many as it used) at its context length."""
    texts = info["texts"]
    n = info["tokens"] if tokens is None else min(tokens, info["tokens"])
    return spread_windows(tokenize(model_dir, texts), texts, n, info["ctx"])


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _materialised_bytes(model: nn.Module) -> int:
    return _nbytes(t for t in model.state_dict().values() if not t.is_meta)


def _linear_inputs(layer: nn.Module, prefix: str, experts: nn.Module | None) -> dict[str, nn.Module]:
    """HF name -> module of every 2D weight of the layer outside the routed experts
    (attention projections, router, shared experts); their inputs make the imatrix."""
    skip = {id(m) for m in experts.modules()} if experts is not None else set()
    out = {}
    for name, m in layer.named_modules():
        w = getattr(m, "weight", None)
        if id(m) in skip or not isinstance(w, torch.Tensor) or w.ndim != 2 or isinstance(m, nn.Embedding):
            continue
        out[f"{prefix}{name}"] = m
    return out


class Calibration:
    """The statistics of one pass; `run` fills them, `save` writes CALIB/."""

    def __init__(self, ckpt: Checkpoint, arch: MoEArch, windows: np.ndarray, batch: int = 8, gram: bool = True, device: torch.device = CPU):
        widths = arch.expert_widths()
        if any(w and len(set(w)) > 1 for w in widths) or ckpt.expert_widths is not None:
            raise UserError(f"{ckpt.path} is already pruned; calibrate the unpruned model and prune it once")
        self.ckpt, self.arch, self.windows, self.batch = ckpt, arch, windows, batch
        self.gram, self.device = gram, device
        self.spill: pathlib.Path | None = None  # where each layer's statistics go once it is done
        self.experts: dict[int, ExpertStats] = {}
        self.spilled: dict[int, pathlib.Path] = {}  # MoE layer -> its statistics, written as it ended (`run`)
        self.grams: dict[int, list[torch.Tensor]] = {}  # MoE layer -> its Gram matrices, when `run` had no CALIB to write them to
        self.scale: dict[int, ScaleStats] = {}
        self.inputs: dict[str, InputStats] = {}  # HF module name -> stats
        self.weights: dict[str, torch.Tensor] = {}  # per layer: down_norm, magnitude
        self.taylor: dict[int, TaylorStats] = {}
        self.taylor_note = "not run"  # calib.json: how the Taylor terms were computed, or why not
        self.peak_bytes = 0  # most parameter bytes ever materialised at once
        self.layer_bytes = 0  # largest decoder layer

    def _observe_inputs(self, modules: dict[str, nn.Module]) -> list:
        handles = []
        for name, m in modules.items():
            stats = self.inputs.setdefault(name, InputStats(m.weight.shape[1]))
            handles.append(m.register_forward_pre_hook(lambda _m, args, s=stats: s.add_batch(args[0])))
        return handles

    @torch.no_grad()
    def run(self, on_layer: Callable[[int, nn.Module], None] | None = None, spill: pathlib.Path | None = None) -> None:
        """One pass over the layers. With `spill` (the CALIB folder being written), each layer's
        Gram matrices and other statistics are written there as soon as the layer is done, so
        memory holds one layer's; without it they stay in memory until `save`. The activations
        the Gram matrices are made from go to disk either way (prune/gram.py): to `spill`, or
        to a temporary folder."""
        self.spill = spill
        with contextlib.ExitStack() as stack:
            if spill is not None:
                acts = spill / _SPILL_DIR / "activations"
            else:
                acts = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moe2gguf-gram-")))
            self._run(acts, on_layer, spill)

    def _run(self, acts: pathlib.Path, on_layer: Callable[[int, nn.Module], None] | None, spill: pathlib.Path | None) -> None:
        arch, ckpt = self.arch, self.ckpt
        model = build_model(arch)
        layers = model.get_submodule(arch.layers_attr)
        hidden, kwargs, self.peak_bytes = catch_layer_inputs(model, arch, ckpt, self.windows, self.batch)
        dev = self.device
        hidden, kwargs = moved(hidden, dev), moved(kwargs, dev)

        for bid in bar(range(arch.n_layers), desc="calibrate", unit="layer"):
            layer = layers[bid]
            prefix = f"{arch.layers_attr}.{bid}."
            # computed in float32, experts held as stored (bf16: half the layer's memory)
            load_weights(layer, prefix, ckpt, torch.float32, stream_experts=True)
            to_device(layer, dev)  # the one layer on the device (a no-op on the CPU)
            experts = arch.moe_block(model, bid).experts if arch.is_moe_layer(bid) else None
            # the experts are read as they run (`stream_experts`): memory holds one at a time, the
            # layer's size (what prune's block re-fit holds twice) counts them all
            held, per_expert = _materialised_bytes(model), [_nbytes(e.state_dict().values()) for e in experts or ()] or [0]
            self.layer_bytes = max(self.layer_bytes, held + sum(per_expert))
            self.peak_bytes = max(self.peak_bytes, held + max(per_expert))
            handles = self._observe_inputs(_linear_inputs(layer, prefix, experts))
            scale = self.scale[bid] = ScaleStats()
            if experts is not None:
                widths = [e.down_proj.in_features for e in experts]
                stats = self.experts[bid] = ExpertStats(len(experts), widths, arch.hidden_size, GramSpill(acts, widths) if self.gram else None)
                experts.observer = stats.observe
            try:
                for i, (h, kw) in enumerate(zip(hidden, kwargs, strict=True)):
                    out = hidden_of(layer(h, **kw))
                    scale.add_batch(out)
                    hidden[i] = out
                    trim()  # the batch's freed activations, before the next batch lands elsewhere in the heap
            finally:
                for hd in handles:
                    hd.remove()
                if experts is not None:
                    experts.observer = None
            if experts is not None:
                down_norm, magnitude = [], []
                for xid, e in enumerate(experts):
                    with experts.loaded(xid):
                        down_norm.append(norms(e.down_proj.weight, dim=0))
                        magnitude.append(weight_norms(e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight))
                self.weights[f"layers.{bid}.down_norm"] = torch.stack(down_norm)
                self.weights[f"layers.{bid}.magnitude"] = torch.stack(magnitude)
            if on_layer is not None:
                on_layer(bid, model)
            unload(layer)  # free it: the next layer reuses the memory
            release_freed()
            if experts is not None:
                self._finish_layer(bid, spill)

        # final norm, then the input of the output projection
        norm = model.get_submodule(arch.final_norm)
        load_weights(norm, f"{arch.final_norm}.", ckpt, torch.float32)
        norm.to(dev)
        head = model.get_output_embeddings()
        out_stats = self.inputs.setdefault(arch.head_name.removesuffix(".weight"), InputStats(head.weight.shape[1]))
        for h in hidden:
            out_stats.add_batch(norm(h))
        self.tied = arch.head_is_tied(ckpt)

    def run_taylor(self) -> None:
        """The paper's first-order attribution by full-model backward, or a note why not."""
        need = sum(self.ckpt.numel(n) for n in self.ckpt.tensor_names) * 4
        reason = taylor_refusal(need)
        if reason is not None:
            self.taylor_note = f"skipped: {reason}"
            return
        self.taylor = taylor_pass(self.ckpt.path, self.windows, self.batch)
        self.taylor_note = "full-model LM loss (mean next-token cross-entropy over the calibration windows)"

    # --- writing --------------------------------------------------------------------
    def _layer_tensors(self, bid: int) -> dict[str, torch.Tensor]:
        """MoE layer `bid`'s statistics as CALIB keeps them: its entries of scores.safetensors and
        the sums of squares of its experts' inputs that go to the imatrix (`_IMATRIX_ONLY`)."""
        if bid in self.spilled:
            return load_file(self.spilled[bid])
        s, p = self.experts[bid], f"layers.{bid}."
        t = {p + "freq": s.freq, p + "mass": s.mass, p + "reap": s.reap, p + "abs_act": torch.stack(s.abs_act), p + "sq_act": torch.stack(s.sq_act),
             p + "in_sum2": s.in_sum2, p + "mid_sum2": torch.stack(s.mid_sum2)}
        t.update({k: v for k, v in self.weights.items() if k.startswith(p)})
        return {k: v.contiguous() for k, v in t.items()}

    def _finish_layer(self, bid: int, spill: pathlib.Path | None) -> None:
        """MoE layer `bid`'s Gram matrices, made from its activations on disk once its weights are
        freed (one expert's matrix at a time), and its other statistics: written to `spill`, or
        kept for `save`."""
        gs = self.experts[bid].gram
        if gs is not None:
            if spill is not None:
                gs.write(spill, bid)
            else:
                self.grams[bid] = list(gs.matrices())
            self.experts[bid].gram = None
        if spill is not None:
            self._spill_layer(spill, bid)

    def _spill_layer(self, folder: pathlib.Path, bid: int) -> None:
        """Write layer `bid`'s statistics to `folder` and drop them from memory: kept until `save`
        they grew the pass by 6 MB a layer at Qwen3-30B-A3B (35 MB at DeepSeek-V3's 256 experts
        of hidden 7168), whatever the layer's own size."""
        f = folder / _SPILL_DIR / f"layer-{bid}.safetensors"
        f.parent.mkdir(exist_ok=True)
        save_file(self._layer_tensors(bid), f)
        self.spilled[bid] = f
        del self.experts[bid]
        for k in [k for k in self.weights if k.startswith(f"layers.{bid}.")]:
            del self.weights[k]

    def _moe_layers(self) -> list[int]:
        return sorted(self.experts.keys() | self.spilled.keys())

    def score_tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        for bid in self._moe_layers():
            t.update({k: v for k, v in self._layer_tensors(bid).items() if not k.endswith(_IMATRIX_ONLY)})
        for bid, s in self.taylor.items():
            t[f"layers.{bid}.taylor"] = torch.stack(s.taylor)
        for bid, s in self.scale.items():
            t[f"layers.{bid}.resid_mean_sq"] = torch.tensor([s.mean_sq], dtype=torch.float64)
        return {k: v.contiguous() for k, v in t.items()}

    def imatrix_entries(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """GGUF tensor name -> (in_sum2 [n_mat, n_in], counts [n_mat, 1]), unpruned model's names."""
        arch = self.arch
        names = gguf.get_tensor_name_map(arch.gguf_arch, arch.n_layers)
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for hf, s in self.inputs.items():
            if f"{hf}.weight" == arch.head_name and self.tied:
                # a tied output projection multiplies by token_embd, so that is the weight
                # llama.cpp quantizes with these statistics
                g = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD]
            else:
                g = names.get_name(hf)
            if g is None:
                raise RuntimeError(f"gguf-py has no name for {hf} in {arch.gguf_arch.name}")
            out[f"{g}.weight"] = (s.sum2.numpy()[None], np.array([[s.count]], dtype=np.float64))
        for bid in self._moe_layers():
            t, p = self._layer_tensors(bid), f"layers.{bid}."
            counts = t[p + "freq"].numpy()[:, None]
            for part, x in (("gate", t[p + "in_sum2"]), ("up", t[p + "in_sum2"]), ("down", t[p + "mid_sum2"])):
                out[arch.gguf_expert_name(bid, part)] = (x.numpy(), counts)
        return out

    def save(self, out: pathlib.Path, texts: list[str]) -> None:
        save_file(self.score_tensors(), out / SCORES)
        for bid, g in self.grams.items():  # not written during the pass
            write_grams(out, bid, [m.shape[0] for m in g], g.__getitem__)
        write_imatrix(out / IMATRIX, self.imatrix_entries(), texts, len(self.windows), self.windows.shape[1])
        if self.spilled:  # read into the files above, not part of CALIB (nor readable after this)
            shutil.rmtree(next(iter(self.spilled.values())).parent)
        arch = self.arch
        info = {
            "architectures": list(arch.hf_architectures[:1]),
            "model": str(self.ckpt.path),
            "n_layers": arch.n_layers,
            "moe_layers": arch.moe_layers,
            "hidden_size": arch.hidden_size,
            "n_experts": arch.n_experts,
            "n_used": arch.n_used,
            "expert_width": arch.expert_width,
            "tokens": int(self.windows.size),
            "ctx": int(self.windows.shape[1]),
            "windows": int(len(self.windows)),
            "texts": texts,
            "score": "router-weighted channel moments; see moe2gguf.prune.scores",
            "gram": bool(self.gram),  # in gram/layer-N.safetensors (older CALIBs: in scores)
            "taylor": self.taylor_note,
            "peak_param_bytes": self.peak_bytes,
            "max_layer_param_bytes": self.layer_bytes,
        }
        (out / CALIB_JSON).write_text(json.dumps(info, indent=1))


# per-layer statistics written during the pass (`Calibration._spill_layer`), in the folder being
# written, until `save` has read them into scores.safetensors and the imatrix
_SPILL_DIR = ".layer-stats"
# entries of a layer's statistics that only the imatrix takes, not scores.safetensors
_IMATRIX_ONLY = (".in_sum2", ".mid_sum2")


def taylor_refusal(weight_bytes: int, limit: int | None = None, ram: int | None = None) -> str | None:
    """Why the full-model backward of the Taylor pass is not run, or None when it fits."""
    limit = TAYLOR_LIMIT if limit is None else limit
    ram = physical_ram() if ram is None else ram
    cap = min(limit, ram // 2) if ram else limit
    if weight_bytes > cap:
        return (
            f"full-model backward needs the whole model in float32 ({weight_bytes / 2**30:,.1f} GiB), "
            f"more than the {cap / 2**30:,.1f} GiB allowed on this machine"
        )
    return None


def taylor_pass(model_dir: str | pathlib.Path, windows: np.ndarray, batch: int) -> dict[int, TaylorStats]:
    """sum_x |h_j(x) * dL/dh_j(x)| for every channel j of every routed expert, h the expert's
    intermediate activation (input of down_proj), L the model's mean next-token cross-entropy
    over all calibration windows.

    Why the full-model loss: it is what the paper's attribution is defined with, and the only
    gradient that says what a channel costs the model's output rather than one layer's. The
    price is that the whole model must be resident (float32) with one batch's activations, so
    unlike the statistics above this pass does not stream layers; `taylor_refusal` skips it
    for models that do not fit (bundled and test models fit), and `prune --score taylor` then
    refuses in one line. (The paper's released code instead back-propagates a block-local
    relative-L2 error against the unpruned block's output, which is zero at the unpruned
    weights; we do not use it.) Weights never get gradients; only activations do. Each
    window's loss is independent, so the sums do not depend on how windows are batched.
    """
    model, arch, _ = load_model(str(model_dir), torch.float32)
    model.requires_grad_(False)
    stats: dict[int, TaylorStats] = {}
    blocks = {bid: arch.moe_block(model, bid).experts for bid in arch.moe_layers}
    for bid, experts in blocks.items():
        s = stats[bid] = TaylorStats([e.down_proj.in_features for e in experts])
        experts.observer = _grad_tap(s)
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    embed = model.get_input_embeddings()
    try:
        with torch.enable_grad():
            for b in bar(range(0, len(windows), batch), desc="taylor", unit="batch"):
                ids = torch.from_numpy(windows[b : b + batch])
                # activations need gradients although no weight does: start the graph here
                x = embed(ids).requires_grad_(True)
                logits = model(inputs_embeds=x, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
                (loss / n_pred).backward()
    finally:
        for experts in blocks.values():
            experts.observer = None
    return stats


def _grad_tap(stats: TaylorStats) -> ExpertObserver:
    """An experts' observer that hooks each routed activation h and, when backward reaches it,
    adds |h * dL/dh| to `stats`."""

    def observe(xid: int, _token: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, _y: torch.Tensor | None) -> None:
        if h.requires_grad:
            act = h.detach()
            h.register_hook(lambda g: stats.add_batch(xid, act, g))

    return observe


def check_fits(arch: MoEArch, tokens: int, ctx: int) -> None:
    """Refuse a window longer than the model was trained for, or more tokens than this machine
    can hold the hidden states of (they are all kept, float32, plus one layer's outputs),
    before anything is tokenized or allocated."""
    if tokens < 1 or ctx < 2:
        raise UserError(f"--tokens {tokens} and --ctx {ctx} must be at least 1 and 2")
    longest = getattr(arch.hf_config, "max_position_embeddings", None)
    if isinstance(longest, int) and ctx > longest:
        raise UserError(f"--ctx {ctx} is longer than the {longest} positions the model was trained for (max_position_embeddings); lower --ctx")
    need = 2 * tokens * arch.hidden_size * 4
    ram = physical_ram()
    if ram and need > ram:
        raise UserError(
            f"--tokens {tokens:,} needs {need / 2**30:,.1f} GiB for the hidden states (hidden size {arch.hidden_size}), "
            f"more than this machine's {ram / 2**30:,.1f} GiB of memory; lower --tokens"
        )


def check_disk(arch: MoEArch, tokens: int, output: pathlib.Path, gram: bool = True) -> None:
    """Refuse before the pass a CALIB its disk cannot take: the refit's Gram matrices are width^2
    floats per expert and layer (14 GiB at Qwen3-30B-A3B, 210 GB at Mixtral-8x7B), plus one
    layer's activations while its matrices are made (prune/gram.py)."""
    if not gram:
        return
    widths = [layer for layer in arch.expert_widths() if layer]
    grams = sum(4 * w * w for layer in widths for w in layer)
    acts = max((4 * tokens * arch.n_used * max(layer) for layer in widths), default=0)
    where = next(p for p in (output, *output.parents) if p.exists())
    free = free_bytes(where)
    if grams + acts > free:
        raise UserError(
            f"not enough free disk for {output}: it needs {human_bytes(grams + acts)} for the refit's Gram matrices ({human_bytes(grams)} for {len(widths)} MoE layers of "
            f"{max(len(layer) for layer in widths)} experts up to {max(max(layer) for layer in widths):,} wide) and one layer's activations "
            f"({human_bytes(acts)}); {human_bytes(free)} are free there. Free space, choose another -o, or pass --no-gram "
            "(a recipe: calibration.gram: false; prune then skips the least-squares refit)"
        )


def calibrate(model: str, text: tuple[str, ...] | list[str], output: str, tokens: int = 32768, ctx: int = 512, batch: int = 8, device: str = "auto",
              gram: bool = True) -> Calibration:
    dev = resolve(device)
    ckpt = Checkpoint(model)
    arch = arch_for_config(ckpt.config)
    texts = [str(pathlib.Path(t).resolve()) for t in text]  # absolute: later steps (reconstruct) re-read them from elsewhere
    if not texts:
        raise UserError("no calibration text; pass --text FILE (several allowed)")
    check_fits(arch, tokens, ctx)
    target = check_output(output, "calibrate", [model, *texts], folder=True)  # before the work, not after it
    sweep_stale(target.parent)  # a killed run's partial CALIB must not count against the disk (atomic_dir sweeps it anyway)
    check_disk(arch, tokens, target, gram)
    wins = spread_windows(tokenize(model, texts), texts, tokens, ctx)
    cal = Calibration(ckpt, arch, wins, batch=batch, gram=gram, device=dev)
    with atomic_dir(output, "calibrate", [model, *texts]) as tmp:
        cal.run(spill=tmp)
        cal.run_taylor()
        cal.save(tmp, texts)
    return cal


def calibrate_main(model: str, text: tuple[str, ...], output: str, tokens: int, ctx: int, device: str, gram: bool = True) -> None:
    """The `calibrate` verb once moe2gguf/commands.py has parsed its options."""
    cal = calibrate(model, text, output, tokens, ctx, device=device, gram=gram)
    click.echo(f"wrote {output}: {cal.windows.size} tokens in {len(cal.windows)} windows of {cal.windows.shape[1]} (on {cal.device.type})")
