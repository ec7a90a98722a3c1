"""The contract every architecture file fulfils.

An architecture is one short subclass of `MoEArch` holding its facts as data: the HF
config and model classes, HF tensor-name templates, the GGUF architecture (names come from
gguf-py's tables), and the few hooks that differ between families. Calibration, allocation,
rewriting and export are written once against this contract.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import gguf
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from moe2gguf.checkpoint import EXPERT_WIDTHS_KEY
from moe2gguf.errors import UserError
from moe2gguf.gguf_names import EXPERT_TENSORS
from moe2gguf.inputs import first_line
from moe2gguf.layout import Layout

EXPERT_PARTS = ("gate", "up", "down")

# config.json keys that are sizes or counts, in whichever family has them: whole numbers of at
# least this (null allowed: transformers fills its default). Checked before transformers sees
# the config, so "256" or -5 is named here instead of failing deep inside a model class.
SIZE_KEYS: dict[str, int] = {
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "moe_intermediate_size": 1,
    "shared_expert_intermediate_size": 0, "num_hidden_layers": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "head_dim": 1, "max_position_embeddings": 1, "num_experts": 0,
    "num_local_experts": 0, "n_routed_experts": 0, "num_experts_per_tok": 1, "n_shared_experts": 0,
    "first_k_dense_replace": 0, "decoder_sparse_step": 1, "moe_layer_freq": 1, "kv_lora_rank": 1,
    "q_lora_rank": 0, "qk_rope_head_dim": 1, "qk_nope_head_dim": 1, "v_head_dim": 1, "n_group": 1,
    "topk_group": 1, "num_nextn_predict_layers": 0,
}
# What moe2gguf plans for, far above every published MoE (the counts in PUBLISHED): a config
# beyond them is a typo or a hostile file, refused before a model skeleton, a name list or a
# size plan is built from it.
MAX_LAYERS = 1 << 10
MAX_EXPERTS = 1 << 12  # routed experts per layer
# MoE layers x experts: sizing builds one module per expert on the meta device (minutes at
# this bound on a small machine), inspect and export name each one
MAX_EXPERT_MATRICES = 1 << 15
MAX_DIM = 1 << 20  # hidden size, expert width
MAX_PARAMS = 1 << 43  # about 8.8e12
PUBLISHED = {"layers": "at most 128", "hidden size": "at most 16,384", "routed experts": "at most 512"}


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _require_int(key: str, v: object, lo: int) -> None:
    if not _is_int(v):
        raise UserError(f"config key {key} = {json.dumps(v, default=str)[:60]} is not a whole number; write a number >= {lo} in config.json")
    if v < lo:
        raise UserError(f"config key {key} = {v} is below {lo}; fix config.json")


def check_size_keys(raw: dict, extra: tuple[str, ...] = ()) -> None:
    """Type and range of every size key present in a config (the family's own count and width
    keys in `extra`)."""
    for key in (*SIZE_KEYS, *extra):
        v = raw.get(key)
        if v is not None:
            _require_int(key, v, SIZE_KEYS.get(key, 0))


# config.json keys that are positive real numbers (a norm's epsilon, RoPE's base): a negative
# epsilon or a zero base loads in transformers and llama.cpp alike, and computes NaN
POSITIVE_KEYS = ("rms_norm_eps", "rope_theta")
# token ids the GGUF needs; one outside the vocabulary is dropped on export (a chat that
# never ends). pad is left out: unused by llama.cpp, and some published configs set it to vocab_size
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id")


def check_number_keys(raw: dict) -> None:
    """Range of the real-valued keys and the special token ids present in a config."""
    values = [(key, raw.get(key)) for key in POSITIVE_KEYS]
    if isinstance(raw.get("rope_parameters"), dict):
        values.append(("rope_parameters.rope_theta", raw["rope_parameters"].get("rope_theta")))
    for key, v in values:
        if v is not None and not ((_is_int(v) or isinstance(v, float)) and math.isfinite(v) and v > 0):
            raise UserError(f"config key {key} = {json.dumps(v, default=str)[:60]} is not a positive number; fix config.json")
    vocab = raw.get("vocab_size")
    for key in TOKEN_ID_KEYS:
        ids = raw.get(key)
        for i in ids if isinstance(ids, list) else [ids]:
            if _is_int(i) and _is_int(vocab) and not 0 <= i < vocab:
                raise UserError(f"config key {key} = {i} is outside the vocabulary (0..{vocab - 1}); fix config.json")


@dataclass(frozen=True)
class ParamCounts:
    total: int
    routed_experts: int
    shared_experts: int
    active_per_token: int
    # tensors of the multi-token-prediction layers (`MoEArch.is_mtp`), in none of the above
    mtp: int


class MoEArch:
    """One Mixture-of-Experts family. Subclasses set the ClassVars and override hooks."""

    hf_architectures: ClassVar[tuple[str, ...]]
    model_type: ClassVar[str]
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    config_class: ClassVar[type[PretrainedConfig]]
    model_class: ClassVar[type[PreTrainedModel]]

    # HF tensor-name templates of the routed experts: {bid} layer, {xid} expert, {part} a key
    # of `expert_parts`. gate/up hold channels as rows, down as columns.
    expert_template: ClassVar[str] = "model.layers.{bid}.mlp.experts.{xid}.{part}.weight"
    expert_parts: ClassVar[dict[str, str]] = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    router_template: ClassVar[str] = "model.layers.{bid}.mlp.gate.weight"
    shared_template: ClassVar[str | None] = None
    layers_attr: ClassVar[str] = "model.layers"
    # config.json keys of the routed-expert count and width (a pruned checkpoint with one
    # count and width everywhere rewrites them so stock transformers loads it)
    n_experts_key: ClassVar[str] = "num_experts"
    expert_width_key: ClassVar[str] = "moe_intermediate_size"
    # the output projection's tensor and the final norm's module, as the checkpoint names them
    head_name: ClassVar[str] = "lm_head.weight"
    final_norm: ClassVar[str] = "model.norm"

    _required = ("hf_architectures", "model_type", "gguf_arch", "config_class", "model_class")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [a for a in cls._required if not hasattr(cls, a)]
        if missing:
            raise TypeError(f"{cls.__name__} lacks {', '.join(missing)}")

    def __init__(self, config: dict):
        self.raw = dict(config)
        check_size_keys(self.raw, (self.n_experts_key, self.expert_width_key))
        check_number_keys(self.raw)
        for alias, key in getattr(self.config_class, "attribute_map", {}).items():
            if alias in self.raw and key in self.raw and self.raw[alias] != self.raw[key]:
                raise UserError(f"config keys {alias} = {self.raw[alias]!r} and {key} = {self.raw[key]!r} name the same number and disagree; keep one in config.json")
        known = {k: v for k, v in config.items() if not k.startswith("moe2gguf_")}
        try:
            self.hf_config = self.config_class.from_dict(known)
        except Exception as e:  # noqa: BLE001 - transformers raises anything on a malformed config
            raise UserError(f"config does not load as transformers' {self.config_class.__name__} ({first_line(e)}); restore the original config.json") from None
        from transformers.activations import ACT2FN  # its table of names; an unknown one is a KeyError when the model is built

        act = getattr(self.hf_config, "hidden_act", None)
        if act is not None and (not isinstance(act, str) or act not in ACT2FN):
            raise UserError(f"config key hidden_act = {json.dumps(act, default=str)[:60]} is not an activation transformers knows; restore the original config.json")
        try:
            self.check_supported()
            self._check_sizes()
        except (TypeError, AttributeError, KeyError, ValueError, ZeroDivisionError) as e:
            raise UserError(f"config has a value of the wrong type or shape ({first_line(e)}); restore the original config.json") from None

    def _key(self, name: str) -> str:
        """The config key as this config.json spells it (transformers maps aliases such as
        Qwen3-MoE's num_local_experts onto num_experts)."""
        amap = getattr(self.config_class, "attribute_map", {})
        spellings = (name, amap.get(name), *(alias for alias, key in amap.items() if key == name))
        return next((k for k in spellings if k is not None and k in self.raw), name)

    def _check_sizes(self) -> None:
        """The numbers every verb builds on, as this family reads them: whole, in range, and
        small enough to plan (layers x experts) and to hold (parameters) before anything is
        allocated. Refused with the reason, never a MemoryError or a hang later."""
        n_experts_key, width_key = self._key(self.n_experts_key), self._key(self.expert_width_key)
        for what, key, v, lo, hi in (
            ("layers", "num_hidden_layers", self.n_layers, 1, MAX_LAYERS),
            ("hidden size", "hidden_size", self.hidden_size, 1, MAX_DIM),
            ("routed experts", n_experts_key, self.n_experts, 0, MAX_EXPERTS),
        ):
            _require_int(key, v, lo)
            if v > hi:
                raise UserError(f"config key {key} = {v:,} is beyond what moe2gguf plans for ({what}: at most {hi:,}; published MoEs have {PUBLISHED[what]}); fix config.json")
        if not self.n_experts or not self.moe_layers:
            return  # a dense model: arch_for_config refuses it by name
        _require_int("num_experts_per_tok", self.n_used, 1)
        _require_int(width_key, self.expert_width, 1)
        if self.n_used > self.n_experts:
            raise UserError(f"config key num_experts_per_tok = {self.n_used} exceeds the {self.n_experts} routed experts ({n_experts_key}); top-k must be 1..{self.n_experts}, fix config.json")
        matrices = len(self.moe_layers) * self.n_experts
        if matrices > MAX_EXPERT_MATRICES:
            raise UserError(
                f"config has {len(self.moe_layers):,} MoE layers x {self.n_experts:,} experts = {matrices:,} experts in all, more than moe2gguf "
                f"plans for (at most {MAX_EXPERT_MATRICES:,}; DeepSeek-V3 has 14,848); fix config.json"
            )
        stored = self.raw.get(EXPERT_WIDTHS_KEY)
        if stored is not None:
            ok = isinstance(stored, list) and len(stored) == self.n_layers and all(
                isinstance(layer, list) and len(layer) <= self.n_experts and all(_is_int(w) and 0 <= w <= MAX_DIM for w in layer) for layer in stored
            )
            if not ok:
                raise UserError(f"config key {EXPERT_WIDTHS_KEY} is not {self.n_layers} lists of expert widths; the pruned checkpoint's config.json is damaged, prune again")
        widths = self.expert_widths()
        params = 3 * self.hidden_size * sum(sum(w) for w in widths)
        vocab = getattr(self.hf_config, "vocab_size", 0) or 0
        params += 2 * vocab * self.hidden_size + 4 * self.n_layers * self.hidden_size**2
        if params > MAX_PARAMS:
            raise UserError(
                f"config implies about {params:.3g} parameters, more than moe2gguf plans for (at most {MAX_PARAMS:.3g}; the largest "
                "published MoEs have about 1e12); fix the sizes in config.json"
            )

    # --- hyper-parameters (override where the HF config names differ) -----------------
    @property
    def n_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.hf_config.hidden_size

    @property
    def n_experts(self) -> int:
        return self.hf_config.num_experts

    @property
    def n_used(self) -> int:
        return self.hf_config.num_experts_per_tok

    @property
    def expert_width(self) -> int:
        return self.hf_config.moe_intermediate_size

    def is_moe_layer(self, bid: int) -> bool:
        return True

    def shared_width(self, bid: int) -> int:
        return 0

    def check_supported(self) -> None:
        """Refuse config flags that change the model in ways this file does not handle."""

    def is_mtp(self, hf_name: str) -> bool:
        """True for a tensor of a layer numbered `n_layers` or above: how DeepSeek-V3 stores its
        multi-token-prediction (MTP) layers (`num_nextn_predict_layers` of them). Neither
        transformers nor llama.cpp runs them (upstream's converter skips model.layers.{bid}
        with bid >= block_count), so they are counted apart and never exported."""
        bid = self.layer_of(hf_name)
        return bid is not None and bid >= self.n_layers

    def layer_of(self, hf_name: str) -> int | None:
        """The decoder layer a tensor or module name belongs to (None: embeddings, final norm,
        head)."""
        m = re.match(re.escape(self.layers_attr) + r"\.(\d+)(\.|$)", hf_name)
        return int(m.group(1)) if m else None

    @property
    def tied_embeddings(self) -> bool:
        """The config ties the output projection to the input embedding."""
        return bool(getattr(self.hf_config, "tie_word_embeddings", False))

    def head_is_tied(self, stored: object) -> bool:
        """The output projection is the input embedding: tied in the config and not among the
        `stored` tensor names (a checkpoint, a set)."""
        return self.tied_embeddings and self.head_name not in stored

    # --- experts as stored ------------------------------------------------------------
    @property
    def moe_layers(self) -> list[int]:
        return [b for b in range(self.n_layers) if self.is_moe_layer(b)]

    def expert_widths(self) -> list[list[int]]:
        """Per layer, the width of every stored routed expert ([] for a dense layer)."""
        stored = self.raw.get(EXPERT_WIDTHS_KEY)
        if stored is not None:
            return [list(w) for w in stored]
        return [[self.expert_width] * self.n_experts if self.is_moe_layer(b) else [] for b in range(self.n_layers)]

    def expert_name(self, bid: int, xid: int, part: str) -> str:
        return self.expert_template.format(bid=bid, xid=xid, part=self.expert_parts[part])

    def router_name(self, bid: int) -> str:
        return self.router_template.format(bid=bid)

    def router_tensor_names(self, bid: int) -> list[str]:
        """Every tensor of layer `bid` with one entry per routed expert along dim 0 (the
        router, and e.g. DeepSeek-V3's selection bias): removing experts slices them all."""
        return [self.router_name(bid)]

    def expert_groups(self, bid: int) -> int:
        """Contiguous expert groups the router picks from (DeepSeek-V3 n_group): removing
        experts must keep the same count in every group, or the grouping changes."""
        return 1

    def expert_groups_used(self, bid: int) -> int:
        """Groups the router keeps per token (DeepSeek-V3 topk_group); top-k picks inside them,
        so a pruned layer needs (experts per group) * this >= n_used."""
        return self.expert_groups(bid)

    def expert_tensor_names(self) -> set[str]:
        return {
            self.expert_name(b, x, p)
            for b, widths in enumerate(self.expert_widths())
            for x in range(len(widths))
            for p in EXPERT_PARTS
        }

    def shared_tensor_names(self, all_names: list[str]) -> set[str]:
        if self.shared_template is None:
            return set()
        prefixes = tuple(self.shared_template.format(bid=b) for b in self.moe_layers)
        return {n for n in all_names if n.startswith(prefixes)}

    def param_counts(self, shapes: dict[str, tuple[int, ...]]) -> ParamCounts:
        """Counts from tensor shapes (safetensors headers); active = non-routed + top-k mean
        experts. MTP tensors count only in `mtp`: the model that runs is without them."""

        def numel(name: str) -> int:
            n = 1
            for d in shapes[name]:
                n *= d
            return n

        mtp = sum(numel(n) for n in shapes if self.is_mtp(n))
        total = sum(numel(n) for n in shapes) - mtp
        routed = 0
        active_routed = 0.0
        for bid, widths in enumerate(self.expert_widths()):
            if not widths:
                continue
            layer = sum(numel(self.expert_name(bid, x, p)) for x in range(len(widths)) for p in EXPERT_PARTS)
            routed += layer
            active_routed += min(self.n_used, len(widths)) * layer / len(widths)
        shared = sum(numel(n) for n in self.shared_tensor_names(list(shapes)))
        return ParamCounts(total, routed, shared, int(round(total - routed + active_routed)), mtp)

    # --- PyTorch model ----------------------------------------------------------------
    def moe_block(self, model: nn.Module, bid: int) -> nn.Module:
        return model.get_submodule(self.layers_attr)[bid].mlp

    def install_experts(self, model: nn.Module, widths: list[list[int]]) -> None:
        """Replace each MoE block's experts by an `ExpertList` of the given widths (and its
        router by one with as many rows), so that parameter names equal checkpoint names.
        Default: transformers' usual block (`.experts`, `.gate` with `weight` and `num_experts`)."""
        from moe2gguf.modeling import ExpertList  # modeling imports this package

        for bid, w in enumerate(widths):
            if not w:
                continue
            block = self.moe_block(model, bid)
            block.experts = ExpertList(self.hidden_size, w, self.hf_config.hidden_act, parts=self.expert_parts)
            if len(w) != block.gate.num_experts:
                block.gate.num_experts = len(w)
                block.gate.weight = nn.Parameter(block.gate.weight.new_empty(len(w), self.hidden_size))

    def fresh_buffers(self, model: nn.Module) -> None:
        """Re-create non-persistent buffers (rotary tables) that a meta-device build lacks."""
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=self.hf_config)

    # --- GGUF -------------------------------------------------------------------------
    gguf_expert_tensors: ClassVar[dict[str, gguf.MODEL_TENSOR]] = EXPERT_TENSORS
    # GGUF tensors written F32 whatever the export type, besides norms, 1-D tensors and the
    # router (convert_hf_to_gguf keeps these F32 too, e.g. qwen2moe's ffn_gate_inp_shexp).
    gguf_f32_tensors: ClassVar[tuple[gguf.MODEL_TENSOR, ...]] = ()

    def keeps_f32(self, gguf_name: str, ndim: int) -> bool:
        """Written F32 whatever the export type, as convert_hf_to_gguf keeps them: norms, 1-D
        tensors, the router, and this family's `gguf_f32_tensors`."""
        if ndim <= 1 or gguf_name.endswith("_norm.weight") or ".ffn_gate_inp." in gguf_name:
            return True
        base = re.sub(r"^blk\.\d+\.", "blk.{bid}.", gguf_name).rsplit(".", 1)[0]
        return base in {gguf.TENSOR_NAMES[t] for t in self.gguf_f32_tensors}

    def pads_input(self, gguf_name: str) -> bool:
        """True when `modify_tensor` zero-pads this tensor's input columns, so the export pads
        its importance-matrix entry alike (deepseek2's shared experts)."""
        return False

    # llama.cpp's loaders for llama (Mixtral) and olmoe size ffn_*_exps with feed_forward_length
    # instead of expert_feed_forward_length
    expert_width_is_ffn: ClassVar[bool] = False

    def add_expert_shape(self, writer: gguf.GGUFWriter, widths: list[list[int]], layout: Layout) -> None:
        """The expert count and the expert width keys, scalar or per-layer array as `layout`
        states them (`widths` as stored: `layout.stored_widths`)."""
        key = lambda k: k.format(arch=writer.arch)  # noqa: E731
        for k, v in ((gguf.Keys.LLM.EXPERT_COUNT, layout.gguf_counts(widths)),
                     (gguf.Keys.LLM.FEED_FORWARD_LENGTH if self.expert_width_is_ffn else gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, layout.gguf_widths(widths))):
            if isinstance(v, int):
                writer.add_uint32(key(k), v)
            else:
                writer.add_array(key(k), v)

    def modify_tensor(self, hf_name: str, gguf_name: str, tensor: torch.Tensor, widths: list[list[int]]) -> list[tuple[str, torch.Tensor]]:
        """The GGUF tensors one non-expert HF tensor becomes (default: itself under `gguf_name`).
        Called on a meta tensor first (the header needs shapes), then on the real one, so use
        shape-only torch ops. `widths` are the exported (padded) routed-expert widths."""
        return [(gguf_name, tensor)]

    def set_gguf_parameters(self, writer: gguf.GGUFWriter, widths: list[list[int]], layout: Layout) -> None:
        """Hyper-parameters the llama.cpp loader reads. `widths` are the widths as exported
        (`layout.stored_widths`): the expert keys come from them and the layout
        (`add_expert_shape`), never from the HF config."""
        raise NotImplementedError(f"GGUF export is not implemented for {self.model_type}")

    def set_gguf_common_parameters(self, writer: gguf.GGUFWriter, widths: list[list[int]], layout: Layout) -> None:
        """Keys shared by every decoder-only MoE in llama.cpp (as TextModel writes them)."""
        c = self.hf_config
        writer.add_block_count(self.n_layers)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(self.hidden_size)
        if not self.expert_width_is_ffn:
            writer.add_feed_forward_length(c.intermediate_size)
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(c.num_key_value_heads)
        # stated only when the config states it, as convert_hf_to_gguf does; llama.cpp's
        # default (hidden / heads) is what transformers computes when it is absent
        if head_dim := getattr(c, "head_dim", None):
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        rope = getattr(c, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
        if theta is not None:
            writer.add_rope_freq_base(float(theta))
        if rope.get("rope_type", "default") not in ("default", None):
            raise UserError(f"rope_type {rope['rope_type']!r} is not handled by the {self.model_type} export yet; use a checkpoint with default RoPE")
        self.add_expert_shape(writer, widths, layout)
        writer.add_expert_used_count(self.n_used)

    def gguf_tensor_map(self) -> gguf.TensorNameMap:
        return gguf.get_tensor_name_map(self.gguf_arch, self.n_layers)

    def gguf_name(self, hf_name: str, tmap: gguf.TensorNameMap) -> str | None:
        """GGUF name of a non-expert HF tensor (None: not part of the GGUF, e.g. rotary tables
        and MTP layers)."""
        if hf_name.endswith("rotary_emb.inv_freq") or self.is_mtp(hf_name):
            return None
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {hf_name} has no GGUF name for {self.gguf_arch.name.lower()}; the checkpoint does not match its architecture")
        return name

    def gguf_expert_name(self, bid: int, part: str) -> str:
        return gguf.TENSOR_NAMES[self.gguf_expert_tensors[part]].format(bid=bid) + ".weight"


def require_router_shape(arch: MoEArch, bid: int, shape: tuple[int, ...], n_experts: int) -> None:
    if shape != (n_experts, arch.hidden_size):
        raise UserError(
            f"{arch.router_name(bid)} has shape {tuple(shape)}, config says ({n_experts}, {arch.hidden_size}); "
            "the checkpoint's tensors disagree with its config.json"
        )


def new_linear(n_in: int, n_out: int, device: torch.device | str = "meta") -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=False, device=device)
