"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): routed experts only, softmax top-k router."""

from __future__ import annotations

import gguf
from torch import nn
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe2gguf.arch import register
from moe2gguf.arch.base import MoEArch
from moe2gguf.errors import UserError
from moe2gguf.layout import Layout


@register
class Qwen3Moe(MoEArch):
    hf_architectures = ("Qwen3MoeForCausalLM",)
    model_type = "qwen3_moe"
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    config_class = Qwen3MoeConfig
    model_class = Qwen3MoeForCausalLM

    def is_moe_layer(self, bid: int) -> bool:
        c = self.hf_config
        return bid not in (c.mlp_only_layers or []) and c.num_experts > 0 and (bid + 1) % c.decoder_sparse_step == 0

    def check_supported(self) -> None:
        c = self.hf_config
        if getattr(c, "use_sliding_window", False):
            raise UserError("config flag use_sliding_window=true is not handled by the qwen3moe export; set it false or use an unmodified Qwen3-MoE config")

    def install_experts(self, model: nn.Module, widths: list[list[int]]) -> None:
        from moe2gguf.modeling import ExpertList  # modeling imports this package

        for bid, w in enumerate(widths):
            if not w:
                continue
            block = self.moe_block(model, bid)
            block.experts = ExpertList(self.hidden_size, w, self.hf_config.hidden_act)
            if len(w) != block.gate.num_experts:
                block.gate.num_experts = len(w)
                block.gate.weight = nn.Parameter(block.gate.weight.new_empty(len(w), self.hidden_size))

    def set_gguf_parameters(self, writer: gguf.GGUFWriter, widths: list[list[int]], layout: Layout) -> None:
        self.set_gguf_common_parameters(writer, widths, layout)
