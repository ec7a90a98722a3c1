"""Checkpoint -> F32/F16 GGUF with gguf-py, streamed one tensor at a time.

The header (KV + tensor infos) is written first from shapes alone; then each tensor is
loaded (memory-mapped safetensors), converted and appended, so peak memory is about one
layer's stacked experts. What the GGUF holds is the target `Layout`'s to say (default: the
one stock llama.cpp runs): experts narrower than their width group's widest are zero-padded
to it, exact (act(0) * 0 = 0 and zero down-columns add nothing) but storing the padding, or
refused where the layout refuses; the expert width and count keys are scalars or per-layer
arrays as the layout states them.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch

from moe2gguf.arch import EXPERT_PARTS, MoEArch, arch_for_config
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.errors import UserError
from moe2gguf.exporter.tokenizer import add_tokenizer
from moe2gguf.gguf_names import KV_EXPERT_WIDTHS
from moe2gguf.modeling import build_model
from moe2gguf.progress import bar
from moe2gguf.layout import DEFAULT_LAYOUT, LAYOUTS, Layout

WRITE_TYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16, "BF16": gguf.GGMLQuantizationType.BF16}
# the numpy dtype gguf-py writes each type from (bf16 as its 16 bits)
NUMPY_OF = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16, gguf.GGMLQuantizationType.BF16: np.uint16}
# the torch dtype a tensor of each type is assembled in (stacked experts: no float32 round trip)
TORCH_OF = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16, gguf.GGMLQuantizationType.BF16: torch.bfloat16}
# the checkpoint's own float types that an intermediate GGUF holds exactly
EXACT_WRITE_TYPE = {"BF16": "BF16", "F16": "F16"}


@dataclass
class Planned:
    name: str
    shape: tuple[int, ...]  # numpy (PyTorch) order
    load: Callable[[], torch.Tensor]
    dtype: gguf.GGMLQuantizationType


@dataclass
class ExportPlan:
    arch: MoEArch
    ckpt: Checkpoint
    widths: list[list[int]]  # as stored in the checkpoint
    stored: list[list[int]]  # as the GGUF stores them (`Layout.stored_widths`)
    layout: Layout
    tensors: list[Planned] = field(default_factory=list)

    @property
    def width(self) -> int:
        """The widest expert tensor of the GGUF."""
        return max(w for layer in self.stored for w in layer)

    @property
    def padded(self) -> bool:
        return self.stored != self.widths

    @property
    def kept_expert_params(self) -> int:
        return 3 * self.arch.hidden_size * sum(sum(layer) for layer in self.widths)

    @property
    def stored_expert_params(self) -> int:
        return 3 * self.arch.hidden_size * sum(sum(layer) for layer in self.stored)


def check_against_config(ckpt: Checkpoint, arch: MoEArch) -> None:
    """Every tensor the config implies exists with the implied shape (meta model, no memory)."""
    model = build_model(arch)
    for name, p in model.state_dict().items():
        if name == arch.head_name and arch.head_is_tied(ckpt):
            continue
        if name not in ckpt:
            raise UserError(f"{ckpt.path} lacks tensor {name}; the checkpoint's tensors disagree with its config.json")
        if tuple(ckpt.shape(name)) != tuple(p.shape):
            raise UserError(
                f"{ckpt.path}: tensor {name} has shape {tuple(ckpt.shape(name))}, config implies {tuple(p.shape)}; "
                "the checkpoint's tensors disagree with its config.json"
            )


def plan_export(model_dir: str | pathlib.Path | Checkpoint, write_type: str = "F32", layout: Layout = LAYOUTS[DEFAULT_LAYOUT]) -> ExportPlan:
    ckpt = model_dir if isinstance(model_dir, Checkpoint) else Checkpoint(model_dir)
    arch = arch_for_config(ckpt.config)
    widths = arch.expert_widths()
    if len(widths) != arch.n_layers:
        raise UserError(f"config {ckpt.path}/config.json lists expert widths for {len(widths)} layers, the model has {arch.n_layers}; the checkpoint is inconsistent")
    try:
        stored = layout.stored_widths(widths)
    except ValueError as e:
        raise UserError(f"{e}: re-run `moe2gguf prune --layout {layout.name}`") from None
    check_against_config(ckpt, arch)
    if max(w for layer in stored for w in layer) == 0:
        raise UserError(f"{ckpt.path}: every expert has width 0; nothing to export")
    qtype = WRITE_TYPES[write_type]
    plan = ExportPlan(arch, ckpt, widths, stored, layout)
    tmap = arch.gguf_tensor_map()
    experts = arch.expert_tensor_names()

    def dtype_for(gname: str, ndim: int) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType.F32 if arch.keeps_f32(gname, ndim) else qtype

    padded = stored

    plain: list[tuple[int, int, Planned]] = []
    for i, hf in enumerate(ckpt.tensor_names):
        if hf in experts:
            continue
        gname = arch.gguf_name(hf, tmap)
        if gname is None:  # rotary tables, MTP layers (MoEArch.is_mtp): llama.cpp has none
            continue
        # the arch may rename, split or transform the tensor: run its hook on a meta tensor
        # for the shapes now, and on the real tensor at write time
        meta = torch.empty(ckpt.shape(hf), device="meta")
        for k, (name, t) in enumerate(arch.modify_tensor(hf, gname, meta, padded)):
            shape = tuple(t.shape)
            load = _modified_loader(ckpt, arch, hf, gname, padded, k)
            bid = arch.layer_of(hf)
            plain.append((-1 if bid is None else bid, i, Planned(name, shape, load, dtype_for(name, len(shape)))))
    layered: dict[int, list[Planned]] = {}
    for bid, _, p in sorted(plain, key=lambda t: (t[0], t[1])):
        layered.setdefault(bid, []).append(p)
    for bid, layer in enumerate(widths):
        width = max(stored[bid], default=0)
        for part in EXPERT_PARTS if layer else ():
            shape = (len(layer), arch.hidden_size, width) if part == "down" else (len(layer), width, arch.hidden_size)
            gname = arch.gguf_expert_name(bid, part)
            layered.setdefault(bid, []).append(Planned(gname, shape, _expert_loader(ckpt, arch, bid, part, layer, width, TORCH_OF[qtype]), qtype))
    tail = layered.pop(-1, [])
    head = [p for p in tail if p.name.startswith("token_embd")]
    tail = [p for p in tail if not p.name.startswith("token_embd")]
    plan.tensors = head + [p for bid in sorted(layered) for p in layered[bid]] + tail
    return plan


def _modified_loader(ckpt: Checkpoint, arch: MoEArch, hf: str, gname: str, padded: list[list[int]], k: int) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        return arch.modify_tensor(hf, gname, ckpt.tensor(hf), padded)[k][1]

    return load


def _expert_loader(ckpt: Checkpoint, arch: MoEArch, bid: int, part: str, layer: list[int], width: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """The layer's experts of `part` stacked (zero-padded to `width`) directly in the written
    dtype: a bf16 checkpoint's BF16 intermediate is copied, not converted to float32 and back
    (one rounding either way; at Qwen3-30B-A3B that round trip made the writer 1.8x slower than
    convert_hf_to_gguf and held 0.8 GB per stacked tensor instead of 0.4)."""

    def load() -> torch.Tensor:
        hidden = arch.hidden_size
        shape = (len(layer), hidden, width) if part == "down" else (len(layer), width, hidden)
        out = torch.zeros(shape, dtype=dtype)
        for xid, w in enumerate(layer):
            name = arch.expert_name(bid, xid, part)
            t = ckpt.tensor(name)
            want = (hidden, w) if part == "down" else (w, hidden)
            if tuple(t.shape) != want:
                raise UserError(f"{ckpt.path}: tensor {name} has shape {tuple(t.shape)}, config implies {want}; the checkpoint's tensors disagree with its config.json")
            if part == "down":
                out[xid, :, :w] = t
            else:
                out[xid, :w, :] = t
        return out

    return load


def _to_numpy(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.float().numpy().astype(NUMPY_OF[qtype], copy=False)


def _nbytes(p: Planned) -> int:
    return int(np.prod(p.shape)) * np.dtype(NUMPY_OF[p.dtype]).itemsize


def intermediate_type(ckpt: Checkpoint) -> str:
    """The write type that holds every 2-D+ float weight of the checkpoint exactly, at its own
    size: BF16 for a bf16 checkpoint, as convert_hf_to_gguf writes one, F16 for f16, else F32."""
    kinds = {ckpt.dtype(n) for n in ckpt.tensor_names if len(ckpt.shape(n)) >= 2}
    return EXACT_WRITE_TYPE.get(kinds.pop(), "F32") if len(kinds) == 1 else "F32"


def write_gguf(plan: ExportPlan, path: pathlib.Path, file_type: int, progress: bool = True, data: bool = True) -> int:
    """Write the plan's GGUF to `path` (a temporary name: callers make it atomic); returns the
    offset where tensor data begins (the metadata's bytes: sizing wants it, and reading it back
    with GGUFReader parses every vocabulary entry, 6 s at 151,936)."""
    arch = plan.arch
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(file_type)
    arch.set_gguf_parameters(writer, plan.stored, plan.layout)
    if plan.padded or plan.ckpt.expert_widths is not None:
        writer.add_array(KV_EXPERT_WIDTHS, [w for layer in plan.widths for w in layer])
    if plan.ckpt.has_files:
        add_tokenizer(writer, plan.ckpt.path, arch.hf_config.vocab_size)
    for p in plan.tensors:
        writer.add_tensor_info(p.name, p.shape, np.dtype(NUMPY_OF[p.dtype]), _nbytes(p), raw_dtype=p.dtype)
    add_general_metadata(writer, plan.ckpt.path if plan.ckpt.has_files else None, plan.ckpt.path.name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if not data:
        return _skip_data(writer, plan)
    start = writer.fout[0].tell()
    for p in bar(plan.tensors, desc="writing GGUF", unit="tensor", disable=not progress):
        data = p.load()
        if tuple(data.shape) != p.shape:
            raise UserError(f"tensor {p.name} changed shape while loading ({tuple(data.shape)} != {p.shape}); the checkpoint is being modified")
        writer.write_tensor_data(_to_numpy(data, p.dtype))
        del data
    writer.close()
    return gguf.GGUFWriter.ggml_pad(start, writer.data_alignment)


def add_general_metadata(writer: gguf.GGUFWriter, model_dir: pathlib.Path | None, name: str) -> None:
    """The general.* keys as convert_hf_to_gguf writes them, with gguf-py's own rules: name,
    basename, size label, ... from the folder, its model card and generation_config.json
    (`gguf.Metadata`), the size class from the tensors written when nothing names one, and
    ggml's quantization version. Needs the tensor infos already added."""
    total, shared, experts, count = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, None, total)
    meta.name = meta.name or name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, experts, count)
    meta.set_gguf_meta_model(writer)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _skip_data(writer: gguf.GGUFWriter, plan: ExportPlan) -> int:
    """End the file with a hole as long as the tensor data: a sparse skeleton that llama.cpp's
    quantizer can plan (dry run) for a model whose weights are not here."""
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    size = start = fout.tell()
    for p in plan.tensors:
        size += gguf.GGUFWriter.ggml_pad(_nbytes(p), writer.data_alignment)
    fout.flush()
    fout.truncate(size)
    fout.close()
    writer.fout = None
    return start
