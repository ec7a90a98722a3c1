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

import gguf
import llama_cpp
import llama_cpp._logger as lg
import numpy as np

from moe2gguf.arch import MoEArch, arch_for_config
from moe2gguf.checkpoint import EXPERT_WIDTHS_KEY, Checkpoint
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
        write_gguf(plan, skel, gguf.LlamaFileType.ALL_F32, progress=False, data=False)
        data_start = _data_offset(skel)
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


def _data_offset(path: pathlib.Path) -> int:
    reader = gguf.GGUFReader(path)
    return int(reader.data_offset)
