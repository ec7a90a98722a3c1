"""Qwen2-MoE (Qwen1.5-MoE-A2.7B): softmax top-k router plus one sigmoid-gated shared expert."""

from __future__ import annotations

import gguf
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from moe2gguf.arch import register
from moe2gguf.arch.base import MoEArch
from moe2gguf.errors import UserError
from moe2gguf.layout import Layout


@register
class Qwen2Moe(MoEArch):
    hf_architectures = ("Qwen2MoeForCausalLM",)
    model_type = "qwen2_moe"
    gguf_arch = gguf.MODEL_ARCH.QWEN2MOE
    config_class = Qwen2MoeConfig
    model_class = Qwen2MoeForCausalLM
    # the prefix also covers mlp.shared_expert_gate (counted as shared-expert parameters)
    shared_template = "model.layers.{bid}.mlp.shared_expert"
    # convert_hf_to_gguf keeps the (1, H) shared-expert gate F32
    gguf_f32_tensors = (gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,)

    def shared_width(self, bid: int) -> int:
        return self.hf_config.shared_expert_intermediate_size

    def check_supported(self) -> None:
        c = self.hf_config
        # llama.cpp's qwen2moe graph hard-codes these; exporting anyway would change the model
        if c.norm_topk_prob:
            raise UserError("config flag norm_topk_prob=true is not handled: llama.cpp's qwen2moe never renormalises the top-k weights; use a checkpoint with norm_topk_prob=false")
        if c.mlp_only_layers or c.decoder_sparse_step != 1:
            raise UserError("config flags mlp_only_layers/decoder_sparse_step (dense layers) are not handled: llama.cpp's qwen2moe makes every layer MoE")
        if getattr(c, "use_sliding_window", False):
            raise UserError("config flag use_sliding_window=true is not handled by the qwen2moe export; set it false")
        if c.tie_word_embeddings:
            raise UserError("config flag tie_word_embeddings=true is not handled: llama.cpp's qwen2moe needs its own output.weight")

    def set_gguf_parameters(self, writer: gguf.GGUFWriter, widths: list[list[int]], layout: Layout) -> None:
        self.set_gguf_common_parameters(writer, widths, layout)
        writer.add_expert_shared_feed_forward_length(self.hf_config.shared_expert_intermediate_size)
