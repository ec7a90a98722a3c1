"""Qwen2-MoE: F32 export is exact in llama.cpp (shared expert + sigmoid shared gate, q/k/v
biases), the prune flow ends in a GGUF stock llama.cpp loads, inspect counts shared experts,
and routing flags llama.cpp does not reproduce are refused."""

from __future__ import annotations

import pathlib

import pytest
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from moe2gguf.inspect import inspect_model
from test_arch_common import assert_refused, build_tiny, f32_roundtrip, gguf_shapes, gguf_value, load_in_llama_cpp, prune_flow, tensor_counts

H, W, S, E = 64, 32, 48, 8


def config(**kw) -> Qwen2MoeConfig:
    c = dict(
        vocab_size=4096, hidden_size=H, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        moe_intermediate_size=W, shared_expert_intermediate_size=S, num_experts=E, num_experts_per_tok=2, norm_topk_prob=False,
        max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    c.update(kw)
    return Qwen2MoeConfig(**c)


@pytest.fixture
def tiny(tmp_path: pathlib.Path) -> pathlib.Path:
    return build_tiny(Qwen2MoeForCausalLM, config(), tmp_path / "tiny-qwen2moe")


def test_f32_export_matches_torch(tiny, tmp_path):
    rel = f32_roundtrip(tiny, tmp_path)
    print(f"qwen2_moe max logit diff {rel:.2e} of range")
    out = tmp_path / f"{tiny.name}-f32.gguf"
    shapes = gguf_shapes(out)
    assert shapes["blk.1.ffn_gate_exps.weight"] == (H, W, E)
    assert shapes["blk.1.ffn_up_shexp.weight"] == (H, S)
    assert gguf_value(out, "qwen2moe.expert_shared_feed_forward_length") == S
    # the shared gate is kept F32 as convert_hf_to_gguf does (an F16 (1, H) row is not worth it)
    r = __import__("gguf").GGUFReader(out)
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_gate_inp_shexp.weight")
    assert t.tensor_type == __import__("gguf").GGMLQuantizationType.F32


def test_inspect_counts_shared_experts(tiny):
    info = inspect_model(str(tiny))
    want = tensor_counts(tiny, r"layers\.(\d+)\.mlp\.experts\.(\d+)\.", r"\.mlp\.shared_expert", n_used=2)
    assert info["params_total"] == want["total"]
    assert info["params_routed_experts"] == want["experts"]
    assert info["params_shared_experts"] == want["shared"] == 2 * (3 * H * S + H)
    assert info["params_active_per_token"] == want["active"]
    assert info["experts_shared"] == 1 and info["dense_layers"] == []


@pytest.mark.parametrize("layout", ["llama.cpp", "ragged"])
def test_prune_flow_loads_in_stock_llama_cpp(tiny, tmp_path, layout):
    pruned, gg, rep = prune_flow(tiny, tmp_path, layout=layout)
    info = inspect_model(str(pruned))
    width = max(w for layer in info["expert_widths"] for w in layer)
    n = info["experts_per_layer"][0]
    shapes = gguf_shapes(gg)
    assert shapes["blk.0.ffn_down_exps.weight"] == (width, H, n)
    assert shapes["blk.0.ffn_down_shexp.weight"] == (S, H)  # the shared expert is never pruned
    assert rep["backend"] == "llama.cpp" and rep["ppl"] > 0
    load_in_llama_cpp(gg)


@pytest.mark.parametrize("flag, value", [("norm_topk_prob", True), ("decoder_sparse_step", 2), ("tie_word_embeddings", True)])
def test_unhandled_flags_are_refused(tiny, tmp_path, flag, value):
    assert_refused(tiny, tmp_path, flag, value)
