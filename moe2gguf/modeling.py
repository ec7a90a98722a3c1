"""PyTorch side: routed experts as a list of per-expert MLPs with their own widths.

transformers fuses each layer's experts into 3D tensors, which cannot hold experts of
different widths. `ExpertList` stores them one by one, with parameter names equal to the
checkpoint's (`...mlp.experts.{xid}.gate_proj.weight`), so a pruned checkpoint loads with a
plain `load_state_dict`, and calibration observes every expert through one tap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers.activations import ACT2FN

from moe2gguf.arch import MoEArch, arch_for_config
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.errors import UserError
from moe2gguf.memory import physical_ram

# observer(xid, token, x, h, w, y): the rows `token` of the block's input that reach expert
# xid, those tokens x, their intermediate activations h (act(gate x) * up x, the input of
# down_proj), their router weights w and the expert's output y = down_proj(h) before the
# router weight (None for an expert pruned to width 0).
ExpertObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], None]
# resident(xid): a context in which expert xid's weights are in memory, for experts whose
# weights are not held between calls (the probe's candidates, prune/probe.py)
ExpertLoader = Callable[[int], contextlib.AbstractContextManager]


DEFAULT_PARTS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# 16-bit float dtypes an expert weight may stay in (load_weights' experts_as_stored), by their
# safetensors names
HALF_STORED = {"BF16": torch.bfloat16, "F16": torch.float16}
HALF_DTYPES = tuple(HALF_STORED.values())


# Streamed experts whose reading converts them (block-FP8, dequantized to bf16: 0.2 s an expert
# at DeepSeek-V3's 7168 x 2048 on 2 cores, so 45 s a layer for every batch of its 256) are kept
# once read, for the layer's other batches, up to this fraction of the machine's memory; the
# rest are read again. A bf16/f16/f32 expert is a view of the checkpoint's mapped pages:
# reading it again costs nothing, and it is never kept.
KEEP_CONVERTED_FRACTION = 0.25


# StoredLinear upcasts at most this many bytes of its weight at once: a whole float32 copy of one
# of Mixtral-8x7B's expert weights (14,336 x 4,096) is 235 MB
UPCAST_BYTES = 32 << 20


class StoredLinear(nn.Linear):
    """nn.Linear whose weight may be held in the checkpoint's 16-bit dtype and is upcast to the
    input's dtype at each call. Exact (bf16/f16 -> f32 loses nothing), so experts computed in
    float32 cost 2 bytes a parameter resident, not 4: at Qwen3-30B-A3B a layer's 128 experts
    are 1.2 GB instead of 2.4. A weight larger than `UPCAST_BYTES` upcast is applied a block
    of output rows at a time (equal to float32 rounding)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        size = x.element_size() * w.shape[1]
        if w.dtype == x.dtype or size * w.shape[0] <= UPCAST_BYTES:
            return nn.functional.linear(x, w.to(x.dtype), b)
        step = max(1, UPCAST_BYTES // size)
        out = x.new_empty(*x.shape[:-1], w.shape[0])
        for i in range(0, w.shape[0], step):
            out[..., i : i + step] = nn.functional.linear(x, w[i : i + step].to(x.dtype), None if b is None else b[i : i + step])
        return out


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, width: int, act: str, device: torch.device | str = "meta", parts: dict[str, str] | None = None):
        super().__init__()
        self.gate_proj = StoredLinear(hidden, width, bias=False, device=device)
        self.up_proj = StoredLinear(hidden, width, bias=False, device=device)
        self.down_proj = StoredLinear(width, hidden, bias=False, device=device)
        self.act_fn = ACT2FN[act]
        if parts is not None and parts != DEFAULT_PARTS:
            # register the linears under the checkpoint's part names (Mixtral: w1/w3/w2) so
            # parameter names stay checkpoint names; gate_proj/up_proj/down_proj remain
            # unregistered aliases of the same modules for the generic code
            for part, name in parts.items():
                lin = self._modules.pop(DEFAULT_PARTS[part])
                setattr(self, name, lin)
                self.__dict__[DEFAULT_PARTS[part]] = lin

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)


class ExpertList(nn.ModuleList):
    """Routed experts of one layer; called as transformers' fused experts module is."""

    def __init__(self, hidden: int, widths: list[int], act: str, device: torch.device | str = "meta", parts: dict[str, str] | None = None):
        super().__init__(ExpertMLP(hidden, w, act, device, parts) for w in widths)
        self.observer: ExpertObserver | None = None
        self.resident: ExpertLoader | None = None
        self.device = torch.device("cpu")  # where `resident` puts weights it reads (`to_device`)

    def loaded(self, xid: int) -> contextlib.AbstractContextManager:
        """A context in which expert xid's weights are in memory (`resident`, where set)."""
        return self.resident(xid) if self.resident is not None else contextlib.nullcontext()

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if top_k_index.is_meta:  # a router freed to the meta device: no expert would run, and the block would add zeros
            raise RuntimeError("the MoE block runs with its router's weights freed (on the meta device)")
        out = torch.zeros_like(hidden)
        for xid in top_k_index.unique().tolist():
            token, slot = torch.where(top_k_index == xid)
            expert = self[xid]
            x = hidden[token]
            w = top_k_weights[token, slot].unsqueeze(-1)
            with self.loaded(xid):
                h = expert.intermediate(x)
                y = expert.down_proj(h) if h.shape[-1] else None  # an expert pruned to nothing contributes nothing
            if self.observer is not None:
                self.observer(xid, token, x, h, w, y)
            if y is not None:
                out.index_add_(0, token, (y * w).to(out.dtype))
        return out


def hidden_of(out: torch.Tensor | tuple) -> torch.Tensor:
    """The hidden states of a decoder layer's or MoE block's output (some return a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def build_model(arch: MoEArch, widths: list[list[int]] | None = None) -> nn.Module:
    """The HF model on the meta device with `ExpertList` experts; no memory for weights."""
    with torch.device("meta"):
        model = arch.model_class(arch.hf_config)
    arch.install_experts(model, widths if widths is not None else arch.expert_widths())
    arch.fresh_buffers(model)
    return model.eval()


def as_stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An expert weight as it is held for computing in `dtype`: in its 16-bit dtype where it is
    stored so (`StoredLinear` upcasts it per call), else converted."""
    return t if t.dtype in HALF_DTYPES else t.to(dtype)


def load_weights(module: nn.Module, prefix: str, ckpt: Checkpoint, dtype: torch.dtype, experts_as_stored: bool = False,
                 stream_experts: bool = False) -> None:
    """Materialise `module`'s parameters from the checkpoint tensors named `prefix + key`, as
    `dtype`; with `experts_as_stored`, routed-expert weights stored as bf16/f16 stay so
    (`StoredLinear` computes them in the input's dtype). With `stream_experts` (implies it),
    the routed experts' weights are not loaded: each expert's are read from the checkpoint's
    pages while it runs (`ExpertList.resident`) and let go after, so the module holds one
    expert's, not its layer's (23 GB at DeepSeek-V3's 256 experts of 7168 x 2048)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    lists = {n: m for n, m in module.named_modules() if isinstance(m, ExpertList)}
    stored = set()
    if experts_as_stored or stream_experts:
        stored = {f"{n}.{k}" if n else k for n, m in lists.items() for k in m.state_dict()}

    def read(k: str) -> torch.Tensor:
        if stream_experts and k in stored and prefix + k in ckpt:  # a placeholder: shape and dtype as it will be held
            held = HALF_STORED.get(ckpt.dtype(prefix + k), dtype)
            return torch.empty(ckpt.shape(prefix + k), dtype=held, device="meta")
        t = ckpt.tensor(prefix + k)
        return as_stored(t, dtype) if k in stored else t.to(dtype)

    state = {k: read(k) for k in expected}
    for k, v in state.items():
        if tuple(v.shape) != expected[k]:
            raise UserError(
                f"{ckpt.path}: tensor {prefix + k} has shape {tuple(v.shape)}, config implies {expected[k]}; "
                "the checkpoint's tensors disagree with its config.json"
            )
    module.load_state_dict(state, assign=True, strict=True)
    if stream_experts:
        ram = physical_ram()
        keep = int(KEEP_CONVERTED_FRACTION * ram) if ram else 0
        for n, m in lists.items():
            m.resident = ExpertReader(m, f"{prefix}{n}." if n else prefix, ckpt, dtype, keep)


class ExpertReader:
    """`ExpertList.resident` for experts whose parameters are placeholders: expert xid's
    weights read from the checkpoint as stored (`as_stored`), on `experts.device`, for the time
    of the context. Experts whose reading converts them (`Checkpoint.dequantizes`) are kept
    once read, by checkpoint name in `kept`, while they fit in `keep_bytes`
    (`KEEP_CONVERTED_FRACTION`): the first that fit, not the most recent, since every batch
    calls the experts in the same order, which would turn a least-recently-used cache over
    every one of them. `unload` lets them go."""

    def __init__(self, experts: ExpertList, prefix: str, ckpt: Checkpoint, dtype: torch.dtype, keep_bytes: int):
        self.experts, self.prefix, self.ckpt, self.dtype, self.keep_bytes = experts, prefix, ckpt, dtype, keep_bytes
        self.kept: dict[str, torch.Tensor] = {}
        self._kept_bytes = 0

    def _read(self, names: list[str]) -> list[torch.Tensor]:
        if all(n in self.kept for n in names):
            return [self.kept[n] for n in names]
        ws = [as_stored(self.ckpt.tensor(n), self.dtype).to(self.experts.device) for n in names]
        size = sum(w.numel() * w.element_size() for w in ws)
        if any(self.ckpt.dequantizes(n) for n in names) and self._kept_bytes + size <= self.keep_bytes:
            self.kept.update(zip(names, ws, strict=True))
            self._kept_bytes += size
        return ws

    @contextlib.contextmanager
    def __call__(self, xid: int) -> Iterator[None]:
        expert = self.experts[xid]
        params = [(name, *name.rpartition(".")[::2]) for name, _ in expert.named_parameters()]
        held = dict(expert.named_parameters())
        try:
            for (_, owner, attr), w in zip(params, self._read([f"{self.prefix}{xid}.{p[0]}" for p in params]), strict=True):
                setattr(expert.get_submodule(owner), attr, nn.Parameter(w, requires_grad=False))
            yield
        finally:
            for name, owner, attr in params:
                setattr(expert.get_submodule(owner), attr, held[name])


def unload(module: nn.Module) -> None:
    """Free `module`'s weights (to the meta device), the streamed experts' kept ones included."""
    module.to("meta")
    for m in module.modules():
        if isinstance(m, ExpertList):
            m.resident = None


def to_device(module: nn.Module, device: torch.device) -> None:
    """`module.to(device)` for a module some of whose parameters are meta placeholders
    (`load_weights`' streamed experts), which `Module.to` cannot move: every other tensor."""
    for m in module.modules():
        if isinstance(m, ExpertList):
            m.device = device
        for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if not t.is_meta and t.device != device:
                setattr(m, n, nn.Parameter(t.to(device), requires_grad=False) if isinstance(t, nn.Parameter) else t.to(device))


def load_model(path: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, MoEArch, Checkpoint]:
    """A whole checkpoint (pruned or not) as a PyTorch model ready for inference."""
    ckpt = Checkpoint(path)
    arch = arch_for_config(ckpt.config)
    model = build_model(arch)
    tied = arch.head_is_tied(ckpt)
    head = model.get_output_embeddings()
    for name, child in list(model.named_children()):
        if child is head and tied:
            continue
        load_weights(child, f"{name}.", ckpt, dtype)
    if tied:
        head.weight = model.get_input_embeddings().weight
    arch.fresh_buffers(model)
    return model, arch, ckpt
