"""Mixtral as llama.cpp's `llama` with experts: F32 export is exact (Q/K RoPE permutation,
w1/w3/w2 experts under block_sparse_moe, expert width as feed_forward_length), the prune
flow ends in a GGUF stock llama.cpp loads, inspect counts match, sliding windows are refused."""

from __future__ import annotations

import pathlib

import pytest
from transformers import MixtralConfig, MixtralForCausalLM

from moe2gguf.arch import arch_for_config
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.inspect import inspect_model
from moe2gguf.modeling import build_model
from test_arch_common import assert_refused, build_tiny, f32_roundtrip, gguf_shapes, gguf_value, load_in_llama_cpp, prune_flow, tensor_counts

H, W, E = 64, 32, 8


def config(**kw) -> MixtralConfig:
    c = dict(
        vocab_size=4096, hidden_size=H, intermediate_size=W, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=E, num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, pad_token_id=0, eos_token_id=2,
    )
    c.update(kw)
    return MixtralConfig(**c)


@pytest.fixture
def tiny(tmp_path: pathlib.Path) -> pathlib.Path:
    # sharp attention, so a missing Q/K permutation shows clearly in the logits
    return build_tiny(MixtralForCausalLM, config(), tmp_path / "tiny-mixtral", attn_std=0.15)


def test_model_parameter_names_are_checkpoint_names(tiny):
    # w1/w3/w2 under block_sparse_moe, as on disk: load_weights and the writer need no mapping
    ckpt = Checkpoint(tiny)
    model = build_model(arch_for_config(ckpt.config))
    assert set(model.state_dict()) == set(ckpt.tensor_names)


def test_f32_export_matches_torch(tiny, tmp_path):
    rel = f32_roundtrip(tiny, tmp_path)  # fails without the Q/K permutation
    print(f"mixtral max logit diff {rel:.2e} of range")
    out = tmp_path / f"{tiny.name}-f32.gguf"
    assert gguf_value(out, "general.architecture") == "llama"
    assert gguf_shapes(out)["blk.0.ffn_down_exps.weight"] == (W, H, E)
    assert gguf_value(out, "llama.feed_forward_length") == W


def test_inspect_counts_match_tensors(tiny):
    info = inspect_model(str(tiny))
    want = tensor_counts(tiny, r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.", None, n_used=2)
    assert want["experts"] > 0
    assert (info["params_total"], info["params_routed_experts"], info["params_active_per_token"]) == (want["total"], want["experts"], want["active"])
    assert info["experts_routed"] == E and info["experts_shared"] == 0 and info["dense_layers"] == []


@pytest.mark.parametrize("layout", ["llama.cpp", "ragged"])
def test_prune_flow_loads_in_stock_llama_cpp(tiny, tmp_path, layout):
    pruned, gg, rep = prune_flow(tiny, tmp_path, layout=layout)
    info = inspect_model(str(pruned))
    width = max(w for layer in info["expert_widths"] for w in layer)
    assert gguf_shapes(gg)["blk.1.ffn_up_exps.weight"] == (H, width, info["experts_per_layer"][1])
    assert gguf_value(gg, "llama.feed_forward_length") == width
    assert rep["backend"] == "llama.cpp" and rep["ppl"] > 0
    load_in_llama_cpp(gg)


def test_sliding_window_is_refused(tiny, tmp_path):
    assert_refused(tiny, tmp_path, "sliding_window", 4096)
