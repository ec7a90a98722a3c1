"""Mixtral (8x7B, 8x22B): softmax top-k router renormalised over the top-k, routed experts
only; llama.cpp runs it as its `llama` architecture with experts."""

from __future__ import annotations

import gguf
import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from moe2gguf.arch import register
from moe2gguf.arch.base import MoEArch
from moe2gguf.errors import UserError
from moe2gguf.layout import Layout


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half Q/K rows -> llama.cpp's interleaved-pair RoPE layout (as
    convert_hf_to_gguf's LlamaModel.permute does; `llama` uses LLAMA_ROPE_TYPE_NORM)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@register
class Mixtral(MoEArch):
    hf_architectures = ("MixtralForCausalLM",)
    model_type = "mixtral"
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    config_class = MixtralConfig
    model_class = MixtralForCausalLM
    # checkpoint names (Mistral's release and transformers' save_pretrained alike)
    expert_template = "model.layers.{bid}.block_sparse_moe.experts.{xid}.{part}.weight"
    expert_parts = {"gate": "w1", "up": "w3", "down": "w2"}
    router_template = "model.layers.{bid}.block_sparse_moe.gate.weight"
    n_experts_key = "num_local_experts"
    expert_width_key = "intermediate_size"  # Mixtral's experts are its FFN
    expert_width_is_ffn = True

    @property
    def expert_width(self) -> int:
        return self.hf_config.intermediate_size

    def check_supported(self) -> None:
        c = self.hf_config
        if c.sliding_window is not None:
            raise UserError(f"config flag sliding_window={c.sliding_window} is not handled: llama.cpp's llama graph has no sliding-window attention; use sliding_window=null (as Mixtral-8x7B has)")

    def install_experts(self, model: nn.Module, widths: list[list[int]]) -> None:
        # transformers names the block `mlp`, checkpoints `block_sparse_moe`: register it under
        # the checkpoint name (parameter names = checkpoint names) and keep `mlp` as an
        # unregistered alias, so the HF forward (`self.mlp(...)`) still finds it
        for bid in self.moe_layers:
            layer = model.get_submodule(self.layers_attr)[bid]
            if "mlp" in layer._modules:
                block = layer._modules.pop("mlp")
                layer.block_sparse_moe = block
                layer.__dict__["mlp"] = block
        super().install_experts(model, widths)

    def set_gguf_parameters(self, writer: gguf.GGUFWriter, widths: list[list[int]], layout: Layout) -> None:
        self.set_gguf_common_parameters(writer, widths, layout)
        c = self.hf_config
        writer.add_rope_dimension_count(getattr(c, "head_dim", None) or self.hidden_size // c.num_attention_heads)
        writer.add_vocab_size(c.vocab_size)

    def modify_tensor(self, hf_name: str, gguf_name: str, tensor: torch.Tensor, widths: list[list[int]]) -> list[tuple[str, torch.Tensor]]:
        c = self.hf_config
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_rope(tensor, c.num_attention_heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_rope(tensor, c.num_key_value_heads)
        return [(gguf_name, tensor)]
