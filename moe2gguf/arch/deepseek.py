"""DeepSeek-V2 (V2-Lite, V2) and DeepSeek-V3: multi-head latent attention, leading dense
layers, always-on shared experts; llama.cpp runs both as `deepseek2`."""

from __future__ import annotations

import math
import re

import gguf
import torch
from torch import nn
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from moe2gguf.arch import register
from moe2gguf.arch.base import MoEArch
from moe2gguf.errors import UserError
from moe2gguf.fp8 import is_block_fp8
from moe2gguf.layout import Layout

_SHARED = re.compile(r"\.mlp\.shared_experts\.(gate|up|down)_proj\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@register
class DeepseekV2(MoEArch):
    hf_architectures = ("DeepseekV2ForCausalLM",)
    model_type = "deepseek_v2"
    gguf_arch = gguf.MODEL_ARCH.DEEPSEEK2
    config_class = DeepseekV2Config
    model_class = DeepseekV2ForCausalLM
    shared_template = "model.layers.{bid}.mlp.shared_experts"
    n_experts_key = "n_routed_experts"
    # moe_intermediate_size also sizes the shared experts (moe_intermediate_size *
    # n_shared_experts), so a pruned checkpoint must not rewrite it: the routed width goes
    # to a key of our own that HF ignores, and the per-expert widths are in config anyway
    expert_width_key = "moe2gguf_expert_width"
    gating = gguf.ExpertGatingFuncType.SOFTMAX
    scoring_func = "softmax"

    @property
    def n_experts(self) -> int:
        return self.hf_config.n_routed_experts

    def is_moe_layer(self, bid: int) -> bool:
        return bid >= self.hf_config.first_k_dense_replace

    def shared_width(self, bid: int) -> int:
        c = self.hf_config
        return c.moe_intermediate_size * c.n_shared_experts if self.is_moe_layer(bid) else 0

    def check_supported(self) -> None:
        c = self.hf_config
        if c.topk_method != "greedy":
            # HF scores groups by their max; llama.cpp's deepseek2 by the sum of the top two
            raise UserError(f"config flag topk_method={c.topk_method!r} is not handled: llama.cpp's deepseek2 implements greedy top-k for V2; use topk_method='greedy'")
        self._check_common()

    def _check_common(self) -> None:
        c, raw = self.hf_config, self.raw
        if raw.get("scoring_func", self.scoring_func) != self.scoring_func:
            raise UserError(f"config flag scoring_func={raw['scoring_func']!r} is not handled: transformers' {self.model_type} always scores with {self.scoring_func}")
        if raw.get("moe_layer_freq", 1) != 1:
            raise UserError(f"config flag moe_layer_freq={raw['moe_layer_freq']} is not handled: transformers and llama.cpp make every layer after first_k_dense_replace MoE")
        if getattr(c, "mlp_bias", False) or getattr(c, "attention_bias", False):
            raise UserError("config flag mlp_bias/attention_bias=true is not handled: llama.cpp's deepseek2 has no such biases")
        rope = c.rope_parameters or {}
        if rope.get("rope_type", "default") not in ("default", "yarn"):
            raise UserError(f"config flag rope_type={rope['rope_type']!r} is not handled by the deepseek2 export; default and yarn are")
        if (q := raw.get("quantization_config")) and not is_block_fp8(q):  # block FP8 is read (moe2gguf/fp8.py)
            raise UserError(f"config flag quantization_config (quant_method={q.get('quant_method')!r}) is not block FP8 (quant_method 'fp8' with weight_block_size): dequantize the checkpoint to bf16 first")

    def install_experts(self, model: nn.Module, widths: list[list[int]]) -> None:
        super().install_experts(model, widths)
        for bid, w in enumerate(widths):
            gate = self.moe_block(model, bid).gate if w else None
            bias = getattr(gate, "e_score_correction_bias", None)
            if bias is not None and bias.shape[0] != len(w):
                gate.register_buffer("e_score_correction_bias", bias.new_empty(len(w)), persistent=True)

    def gguf_name(self, hf_name: str, tmap: gguf.TensorNameMap) -> str | None:
        # gguf-py knows the router bias under llama.cpp's renamed form
        return super().gguf_name(hf_name.replace("e_score_correction_bias", "e_score_correction.bias"), tmap)

    def _routed_width(self, widths: list[list[int]]) -> int:
        # one shared-expert count for the model: sized from the widest stored routed width
        # (the layout decides whether that is every layer's)
        return max(w for layer in widths for w in layer)

    def _shared_count(self, width: int) -> int:
        # the loader sizes the shared experts as n_ff_exp * expert_shared_count: the
        # smallest count that holds the unpruned shared width (zero-padded, exact)
        return math.ceil(self.shared_width(self.moe_layers[0]) / width)

    def pads_input(self, gguf_name: str) -> bool:
        return ".ffn_down_shexp." in gguf_name

    def modify_tensor(self, hf_name: str, gguf_name: str, tensor: torch.Tensor, widths: list[list[int]]) -> list[tuple[str, torch.Tensor]]:
        c = self.hf_config
        if hf_name.endswith("self_attn.kv_b_proj.weight"):
            # MLA: llama.cpp wants kv_b split per head into k_b (transposed) and v_b
            bid = int(_LAYER.match(hf_name).group(1))
            kv = tensor.reshape(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
            k_b, v_b = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
            name = lambda t: gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight"  # noqa: E731
            return [(name(gguf.MODEL_TENSOR.ATTN_K_B), k_b.transpose(1, 2).contiguous()), (name(gguf.MODEL_TENSOR.ATTN_V_B), v_b.contiguous())]
        if m := _SHARED.search(hf_name):
            width = self._routed_width(widths)
            pad = width * self._shared_count(width) - tensor.shape[1 if m.group(1) == "down" else 0]
            if pad:
                tensor = nn.functional.pad(tensor, (0, pad) if m.group(1) == "down" else (0, 0, 0, pad))
        return [(gguf_name, tensor)]

    def set_gguf_parameters(self, writer: gguf.GGUFWriter, widths: list[list[int]], layout: Layout) -> None:
        c = self.hf_config
        width = self._routed_width(widths)
        writer.add_block_count(self.n_layers)
        writer.add_context_length(c.max_position_embeddings)
        writer.add_embedding_length(self.hidden_size)
        writer.add_feed_forward_length(c.intermediate_size)  # the leading dense layers
        writer.add_head_count(c.num_attention_heads)
        writer.add_head_count_kv(1)  # MLA: one latent KV head
        writer.add_layer_norm_rms_eps(c.rms_norm_eps)
        writer.add_vocab_size(c.vocab_size)
        self.add_expert_shape(writer, widths, layout)
        writer.add_expert_used_count(self.n_used)
        writer.add_expert_gating_func(self.gating)
        self._set_groups(writer)
        writer.add_leading_dense_block_count(c.first_k_dense_replace)
        writer.add_expert_shared_count(self._shared_count(width))
        writer.add_expert_weights_scale(float(c.routed_scaling_factor))
        # q_lora_rank 0 = plain q_proj (the loader requires the key unless n_layer says "lite")
        writer.add_q_lora_rank(c.q_lora_rank or 0)
        writer.add_kv_lora_rank(c.kv_lora_rank)
        writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
        writer.add_value_length(c.kv_lora_rank)
        writer.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
        writer.add_value_length_mla(c.v_head_dim)
        writer.add_rope_dimension_count(c.qk_rope_head_dim)
        rope = c.rope_parameters or {}
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        if rope.get("rope_type") == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(rope["factor"]))
            writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
            if rope.get("beta_fast") is not None:
                writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
            if rope.get("beta_slow") is not None:
                writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
            if rope.get("mscale_all_dim"):
                # the loader divides by 0.1 again (convert_hf_to_gguf writes it this way)
                writer.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))

    def _set_groups(self, writer: gguf.GGUFWriter) -> None:
        # V2 greedy routing ignores groups; llama.cpp would apply them if n_group > 1
        writer.add_expert_group_count(1)
        writer.add_expert_group_used_count(1)


@register
class DeepseekV3(DeepseekV2):
    """V3 routing: sigmoid scores, a per-expert selection bias (`e_score_correction_bias`,
    llama.cpp's exp_probs_b), group-limited top-k, optional renormalisation. Its checkpoints
    carry multi-token-prediction layers after the decoder's; MoEArch.is_mtp's default (layers
    numbered num_hidden_layers and up) names them, so inspect counts them apart and export
    leaves them out, as llama.cpp's converter does."""

    hf_architectures = ("DeepseekV3ForCausalLM",)
    model_type = "deepseek_v3"
    config_class = DeepseekV3Config
    model_class = DeepseekV3ForCausalLM
    gating = gguf.ExpertGatingFuncType.SIGMOID
    scoring_func = "sigmoid"

    def check_supported(self) -> None:
        c = self.hf_config
        if not getattr(c, "rope_interleave", True):
            raise UserError("config flag rope_interleave=false is not handled: llama.cpp's deepseek2 rotates interleaved pairs; use rope_interleave=true")
        if c.n_routed_experts % c.n_group:
            raise UserError(f"config flags n_routed_experts={c.n_routed_experts} and n_group={c.n_group} disagree: the experts must split into equal groups")
        self._check_common()

    def router_tensor_names(self, bid: int) -> list[str]:
        return [self.router_name(bid), self.router_name(bid).replace(".weight", ".e_score_correction_bias")]

    def expert_groups(self, bid: int) -> int:
        return self.hf_config.n_group

    def expert_groups_used(self, bid: int) -> int:
        return self.hf_config.topk_group

    def _set_groups(self, writer: gguf.GGUFWriter) -> None:
        # llama.cpp's group rule (sum of the top two biased scores per group) is V3's
        c = self.hf_config
        writer.add_expert_group_count(c.n_group)
        writer.add_expert_group_used_count(c.topk_group)

    def set_gguf_parameters(self, writer: gguf.GGUFWriter, widths: list[list[int]], layout: Layout) -> None:
        super().set_gguf_parameters(writer, widths, layout)
        if self.hf_config.norm_topk_prob:  # V2's HF code never renormalises, V3's does
            writer.add_expert_weights_norm(True)
