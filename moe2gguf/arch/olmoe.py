"""OLMoE (OLMoE-1B-7B): softmax top-k router, routed experts only, Q/K RMS-norm over the
whole projection."""

from __future__ import annotations

import gguf
from transformers import OlmoeConfig, OlmoeForCausalLM

from moe2gguf.arch import register
from moe2gguf.arch.base import MoEArch
from moe2gguf.errors import UserError
from moe2gguf.layout import Layout


@register
class Olmoe(MoEArch):
    hf_architectures = ("OlmoeForCausalLM",)
    model_type = "olmoe"
    gguf_arch = gguf.MODEL_ARCH.OLMOE
    config_class = OlmoeConfig
    model_class = OlmoeForCausalLM
    # OLMoE has no separate MoE width: the experts' width is intermediate_size
    expert_width_key = "intermediate_size"
    expert_width_is_ffn = True

    @property
    def expert_width(self) -> int:
        return self.hf_config.intermediate_size

    def check_supported(self) -> None:
        c = self.hf_config
        # each is something llama.cpp's olmoe graph/loader does not do
        if c.norm_topk_prob:
            raise UserError("config flag norm_topk_prob=true is not handled: llama.cpp's olmoe never renormalises the top-k weights; use a checkpoint with norm_topk_prob=false")
        if c.clip_qkv is not None:
            raise UserError(f"config flag clip_qkv={c.clip_qkv} is not handled: llama.cpp's olmoe does not clamp q/k/v; use a checkpoint with clip_qkv=null")
        if c.num_key_value_heads != c.num_attention_heads:
            raise UserError("config flag num_key_value_heads != num_attention_heads is not handled: llama.cpp's olmoe sizes attn_k_norm for full heads")
        if c.attention_bias:
            raise UserError("config flag attention_bias=true is not handled: llama.cpp's olmoe has no q/k/v biases")
        if c.tie_word_embeddings:
            raise UserError("config flag tie_word_embeddings=true is not handled: llama.cpp's olmoe needs its own output.weight")

    def set_gguf_parameters(self, writer: gguf.GGUFWriter, widths: list[list[int]], layout: Layout) -> None:
        self.set_gguf_common_parameters(writer, widths, layout)
