"""Predict a GGUF's size before anything is pruned or written, with llama.cpp's own rules.

llama.cpp picks a type per tensor (Q4_K_M puts attn_v/ffn_down of some layers in Q6_K, a
row width that is not a multiple of 256 falls back to a legacy type, ...). Rather than
re-implement those rules, we write a *skeleton* GGUF — the real header, hyper-parameters
and tensor infos, with the tensor data left as a hole in a sparse file — and ask
llama_model_quantize for a dry run, which reports the type it would give every tensor.
Bytes then follow from ggml's block sizes. Works from architecture numbers alone, so a
recipe for a 30B model is planned on a laptop without its weights.
"""

from __future__ import annotations

import ctypes
import pathlib
import re
import tempfile
from dataclasses import dataclass, field
from typing import Protocol

import gguf
import llama_cpp
import llama_cpp._logger as lg
import numpy as np

from moe2gguf.arch import MoEArch, arch_for_config
from moe2gguf.checkpoint import EXPERT_WIDTHS_KEY, Checkpoint
from moe2gguf.exporter.quantize import overrides_of
from moe2gguf.exporter.quantize import quantize
from moe2gguf.exporter.writer import plan_export, write_gguf
from moe2gguf.modeling import build_model

# Bytes of tokenizer metadata per vocabulary entry when the tokenizer files are absent
# (token text + its length + type + merges). Measured on Qwen-style BPE GGUFs: ~6 MB for
# 152k tokens; the estimate matters below 0.1% of any real model.
TOKENIZER_BYTES_PER_TOKEN = 40


class ShapeCheckpoint(Checkpoint):
    """A checkpoint known by its config alone: tensor shapes come from the model built on
    the meta device, so nothing is read and no memory is used for weights."""

    has_files = False

    def __init__(self, config: dict, name: str = "planned"):
        self.path = pathlib.Path(name)
        self.config = dict(config)
        arch = arch_for_config(self.config)
        model = build_model(arch)
        self._shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (k == arch.head_name and arch.tied_embeddings)}
        self._dtypes = {k: "F16" for k in self._shapes}
        self._files = {k: "" for k in self._shapes}
        self._handles = {}

    def tensor(self, name: str):  # noqa: ANN201 - never called for a skeleton
        raise RuntimeError(f"{name}: a ShapeCheckpoint has no weights")

    @property
    def weight_bytes(self) -> int:
        return 2 * sum(int(np.prod(s)) for s in self._shapes.values())


@dataclass
class SizePlan:
    quant: str
    total_bytes: int
    tensor_types: dict[str, str]  # GGUF tensor name -> ggml type llama.cpp would use
    tensor_bytes: dict[str, int]
    meta_bytes: int
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # numpy shape, rows last

    def bytes_matching(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(b for n, b in self.tensor_bytes.items() if rx.search(n))


def layout_config(arch: MoEArch, n_experts: int, width: int) -> dict:
    """The config of the model with one expert count and one width in every MoE layer (what
    stock llama.cpp runs), as a pruned checkpoint records it."""
    cfg = dict(arch.raw)
    cfg[EXPERT_WIDTHS_KEY] = [[width] * n_experts if arch.is_moe_layer(b) else [] for b in range(arch.n_layers)]
    return cfg


_CONVERT = re.compile(r"(\S+)\s+- \[[^\]]*\], type =\s*(\w+),.*?size =\s*[\d.]+ MiB(?: ->\s*[\d.]+ MiB \((\w+)\))?", re.S)


def _dry_run_types(skeleton: pathlib.Path, quant: str, overrides: list[tuple[str, str]] | None) -> dict[str, str]:
    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:  # noqa: ARG001
        chunks.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        # the dry run writes nothing; dst only has to be a valid path
        quantize(skeleton, skeleton.with_suffix(".dry"), quant, overrides=overrides, verbose=True, dry_run=True)
    finally:
        llama_cpp.llama_log_set(lg.llama_log_callback, ctypes.c_void_p(0))
    log = "".join(chunks)
    types: dict[str, str] = {}
    for m in _CONVERT.finditer(log):
        name, cur, new = m.groups()
        types[name] = (new or cur).upper()
    return types


def _row_bytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of numpy shape `shape` (rows along the last axis) in `type_name`."""
    qt = gguf.GGMLQuantizationType[type_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qt]
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return n_rows * (shape[-1] // block) * type_size


def predict_size(ckpt: Checkpoint, quant: str, overrides: list[tuple[str, str]] | None = None) -> SizePlan:
    """The GGUF size llama.cpp would produce for `ckpt` at `quant` (types from its dry run)."""
    plan = plan_export(ckpt)
    with tempfile.TemporaryDirectory(prefix="moe2gguf-size-") as d:
        skel = pathlib.Path(d) / "skeleton.gguf"
        data_start = write_gguf(plan, skel, gguf.LlamaFileType.ALL_F32, progress=False, data=False)
        types = _dry_run_types(skel, quant, overrides)
    meta = data_start
    if not ckpt.has_files:
        meta += TOKENIZER_BYTES_PER_TOKEN * plan.arch.hf_config.vocab_size
    sizes: dict[str, int] = {}
    for p in plan.tensors:
        t = types.get(p.name)
        if t is None:
            raise RuntimeError(f"llama.cpp's dry run did not report {p.name}; the log format changed")
        sizes[p.name] = gguf.GGUFWriter.ggml_pad(_row_bytes(t, p.shape), 32)
    shapes = {p.name: tuple(p.shape) for p in plan.tensors}
    return SizePlan(quant.upper(), meta + sum(sizes.values()), types, sizes, meta, shapes)


# ----- byte and type planning of pruned shapes (prune/deploy.py asks; llama.cpp's own dry run) ---


class ShapeLike(Protocol):
    """K experts of width W in every MoE layer (prune/deploy.py's Shape)."""

    experts: int
    width: int


def predict_layout_bytes(ckpt: Checkpoint, arch: MoEArch, shape: ShapeLike, quant: str, overrides: list[tuple[str, str]] | None = None) -> SizePlan:
    """SizePlan of `ckpt` rewritten to `shape`: tensor bytes from a skeleton of that shape,
    metadata (tokenizer, names) from the real checkpoint's own skeleton."""
    plan = predict_size(ShapeCheckpoint(layout_config(arch, shape.experts, shape.width), ckpt.path.name), quant, overrides)
    plan.total_bytes += _meta_delta(ckpt, arch, quant)
    return plan


_META: dict[tuple[str, str], int] = {}


def _meta_delta(ckpt: Checkpoint, arch: MoEArch, quant: str) -> int:
    """Real metadata bytes minus the skeleton's estimate, plus the per-expert widths array a
    pruned checkpoint's GGUF carries (4 bytes per expert and its key)."""
    key = (str(ckpt.path), quant)
    if key not in _META:
        real = predict_size(ckpt, quant).meta_bytes
        skel = predict_size(ShapeCheckpoint(ckpt.config, ckpt.path.name), quant).meta_bytes
        _META[key] = real - skel + 4 * arch.n_experts * len(arch.moe_layers) + 64
    return _META[key]


def kquant_fallback(plan: SizePlan, wanted: dict[str, str]) -> dict[str, dict]:
    """ffn_down_exps tensors whose type llama.cpp changed because the row width is not a
    multiple of the K-quant block (256): name -> {wanted, used, extra_bytes}, extra_bytes being
    what the fallback costs over the wanted type's bits per weight."""
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


def lean_down_types(plan: SizePlan) -> list[tuple[str, str]]:
    """Overrides that put every ffn_down_exps at its layer's ffn_gate_exps type (the file type's
    base type, before the _M mixes' extra bits on ffn_down), or, where the width is not a
    multiple of that type's block, at the block-32 type of the same bits (SAME_BITS). A size
    target starts every shape from this floor and spends what is left on upgrades, so that a
    shape with more experts is not priced out by llama.cpp's Q6_K -> Q8_0 fallback."""
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


def plan_tensor_types(plan: SizePlan, leftover: int) -> tuple[dict[str, str], int]:
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
    if t not in LADDER:
        return None
    for nxt in LADDER[LADDER.index(t) + 1 :]:
        if shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[nxt]][0] == 0:
            return nxt
    return None


def _bytes(t: str, shape: tuple[int, ...]) -> int:
    return gguf.GGUFWriter.ggml_pad(_row_bytes(t, shape), 32)



MARGIN = 256  # bytes kept free under a target: a longer GGUF name than the model folder's (predictions are exact otherwise)


def finish_target(out: pathlib.Path, report: dict, target_size: int) -> dict:
    """Exact prediction for the written checkpoint with its planned tensor types."""
    plan = predict_size(Checkpoint(out), report["quant"], overrides_of(report["tensor_types"]))
    if plan.total_bytes > target_size:
        raise RuntimeError(f"planned {plan.total_bytes} bytes > target {target_size}: the layout prediction missed; report this")
    return {"predicted_bytes": plan.total_bytes, "tensor_types": plan.tensor_types}
