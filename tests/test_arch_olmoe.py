"""OLMoE: F32 export is exact in llama.cpp (Q/K norms, expert width as feed_forward_length),
the prune flow ends in a GGUF stock llama.cpp loads, inspect counts match the tensors, and
flags llama.cpp does not reproduce (clip_qkv, norm_topk_prob) are refused."""

from __future__ import annotations

import pathlib

import pytest
from transformers import OlmoeConfig, OlmoeForCausalLM

from moe2gguf.inspect import inspect_model
from test_arch_common import assert_refused, build_tiny, f32_roundtrip, gguf_shapes, gguf_value, load_in_llama_cpp, prune_flow, tensor_counts

H, W, E = 64, 32, 8


def config(**kw) -> OlmoeConfig:
    c = dict(
        vocab_size=4096, hidden_size=H, intermediate_size=W, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        num_experts=E, num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, pad_token_id=0, eos_token_id=2,
    )
    c.update(kw)
    return OlmoeConfig(**c)


@pytest.fixture
def tiny(tmp_path: pathlib.Path) -> pathlib.Path:
    return build_tiny(OlmoeForCausalLM, config(), tmp_path / "tiny-olmoe")


def test_f32_export_matches_torch(tiny, tmp_path):
    rel = f32_roundtrip(tiny, tmp_path)
    print(f"olmoe max logit diff {rel:.2e} of range")
    out = tmp_path / f"{tiny.name}-f32.gguf"
    assert gguf_shapes(out)["blk.1.ffn_up_exps.weight"] == (H, W, E)
    assert gguf_value(out, "olmoe.feed_forward_length") == W


def test_inspect_counts_match_tensors(tiny):
    info = inspect_model(str(tiny))
    want = tensor_counts(tiny, r"layers\.(\d+)\.mlp\.experts\.(\d+)\.", None, n_used=2)
    assert (info["params_total"], info["params_routed_experts"], info["params_active_per_token"]) == (want["total"], want["experts"], want["active"])
    assert info["params_shared_experts"] == 0 and info["experts_shared"] == 0 and info["dense_layers"] == []
    assert info["expert_width"] == W


@pytest.mark.parametrize("layout", ["llama.cpp", "ragged"])
def test_prune_flow_loads_in_stock_llama_cpp(tiny, tmp_path, layout):
    pruned, gg, rep = prune_flow(tiny, tmp_path, layout=layout)
    info = inspect_model(str(pruned))
    width = max(w for layer in info["expert_widths"] for w in layer)
    assert gguf_shapes(gg)["blk.1.ffn_gate_exps.weight"] == (H, width, info["experts_per_layer"][1])
    assert gguf_value(gg, "olmoe.feed_forward_length") == width  # the loader's expert width
    assert rep["backend"] == "llama.cpp" and rep["ppl"] > 0
    load_in_llama_cpp(gg)


@pytest.mark.parametrize("flag, value", [("clip_qkv", 8.0), ("norm_topk_prob", True), ("num_key_value_heads", 2)])
def test_unhandled_flags_are_refused(tiny, tmp_path, flag, value):
    assert_refused(tiny, tmp_path, flag, value)
