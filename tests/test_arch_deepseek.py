"""DeepSeek-V2 as llama.cpp's `deepseek2`: F32 export is exact (MLA with kv_b split into
k_b/v_b, a leading dense layer, shared experts, YaRN), the prune flow ends in a GGUF stock
llama.cpp loads (shared experts zero-padded to a multiple of the routed width), inspect
counts match, and routing llama.cpp does not reproduce is refused."""

from __future__ import annotations

import pathlib

import pytest
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from moe2gguf.inspect import inspect_model
from test_arch_common import assert_refused, build_tiny, f32_roundtrip, gguf_shapes, gguf_value, load_in_llama_cpp, prune_flow, tensor_counts

H, W, E, NSH = 64, 32, 8, 2
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}


def config(**kw) -> DeepseekV2Config:
    c = dict(
        vocab_size=4096, hidden_size=H, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=E, num_experts_per_tok=2, n_shared_experts=NSH, moe_intermediate_size=W, first_k_dense_replace=1,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    c.update(kw)
    return DeepseekV2Config(**c)


@pytest.fixture
def tiny(tmp_path: pathlib.Path) -> pathlib.Path:
    return build_tiny(DeepseekV2ForCausalLM, config(), tmp_path / "tiny-deepseek-v2")


@pytest.mark.parametrize("variant", ["default-rope", "yarn+q_lora"])
def test_f32_export_matches_torch(tmp_path, variant):
    # V2-Lite's shape: plain q_proj, YaRN; the full V2 has q_lora (q_a/q_b) too
    kw = {} if variant == "default-rope" else {"rope_parameters": YARN, "q_lora_rank": 24, "routed_scaling_factor": 2.0}
    # sharp attention (attn_std), so a wrong YaRN or attention scale shows in the logits
    tiny = build_tiny(DeepseekV2ForCausalLM, config(**kw), tmp_path / "tiny-deepseek-v2", attn_std=0.15)
    rel = f32_roundtrip(tiny, tmp_path)
    print(f"deepseek_v2 {variant} max logit diff {rel:.2e} of range")
    out = tmp_path / f"{tiny.name}-f32.gguf"
    shapes = gguf_shapes(out)
    assert shapes["blk.0.ffn_up.weight"] == (H, 96)  # the leading dense layer
    assert shapes["blk.1.attn_k_b.weight"] == (16, 16, 4)  # {nope, kv_lora, n_head}
    assert shapes["blk.1.attn_v_b.weight"] == (16, 16, 4)  # {kv_lora, v_head, n_head}
    assert "blk.1.attn_kv_b.weight" not in shapes
    assert shapes["blk.2.ffn_gate_shexp.weight"] == (H, W * NSH)
    assert gguf_value(out, "deepseek2.expert_shared_count") == NSH


def test_inspect_counts_dense_layers_and_shared_experts(tiny):
    info = inspect_model(str(tiny))
    want = tensor_counts(tiny, r"layers\.(\d+)\.mlp\.experts\.(\d+)\.", r"\.mlp\.shared_experts\.", n_used=2)
    assert (info["params_total"], info["params_routed_experts"], info["params_active_per_token"]) == (want["total"], want["experts"], want["active"])
    assert info["params_shared_experts"] == want["shared"] == 2 * 3 * H * W * NSH
    assert info["dense_layers"] == [0] and want["moe_layers"] == [1, 2]
    assert info["experts_shared"] == 1 and info["experts_routed"] == E


def narrowed(src: pathlib.Path, dst: pathlib.Path, widths: list[list[int]]) -> pathlib.Path:
    """A pruned-style checkpoint: expert k of layer b keeps its first widths[b][k] channels."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from moe2gguf.arch import arch_for_config

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    arch = arch_for_config(cfg)
    t = load_file(dst / "model.safetensors")
    for bid, layer in enumerate(widths):
        for k, w in enumerate(layer):
            for part in ("gate", "up"):
                t[arch.expert_name(bid, k, part)] = t[arch.expert_name(bid, k, part)][:w].contiguous()
            t[arch.expert_name(bid, k, "down")] = t[arch.expert_name(bid, k, "down")][:, :w].contiguous()
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    cfg["moe2gguf_expert_widths"] = widths
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_shared_experts_padded_to_the_routed_width_exactly(tiny, tmp_path):
    # exported width 24 < 32: the loader wants shared width 24 * k, so the 64-wide shared
    # experts are zero-padded to 24 * 3 = 72; exact, as the logits show
    widths = [[], [24, 16, 24, 8, 24, 16, 8, 8], [8, 24, 16, 24, 8, 8, 16, 24]]
    pruned = narrowed(tiny, tmp_path / "narrow", widths)
    f32_roundtrip(pruned, tmp_path)
    out = tmp_path / "narrow-f32.gguf"
    assert gguf_value(out, "deepseek2.expert_shared_count") == 3
    assert gguf_shapes(out)["blk.1.ffn_down_shexp.weight"] == (72, H)
    assert gguf_shapes(out)["blk.1.ffn_down_exps.weight"] == (24, H, E)


@pytest.mark.parametrize("layout", ["llama.cpp", "ragged"])
def test_prune_flow_loads_in_stock_llama_cpp(tiny, tmp_path, layout):
    pruned, gg, rep = prune_flow(tiny, tmp_path, ratio=0.3, layout=layout)
    info = inspect_model(str(pruned))
    width = max(w for layer in info["expert_widths"] for w in layer)
    shapes = gguf_shapes(gg)
    assert shapes["blk.1.ffn_down_exps.weight"] == (width, H, info["experts_per_layer"][1])
    # the loader ties the shared width to n_ff_exp * expert_shared_count: padded up to it
    k = gguf_value(gg, "deepseek2.expert_shared_count")
    assert k * width >= W * NSH and (k - 1) * width < W * NSH
    assert shapes["blk.1.ffn_down_shexp.weight"] == (k * width, H)
    assert rep["backend"] == "llama.cpp" and rep["ppl"] > 0
    load_in_llama_cpp(gg)


@pytest.mark.parametrize("flag, value", [("topk_method", "group_limited_greedy"), ("scoring_func", "sigmoid"), ("moe_layer_freq", 2)])
def test_unhandled_flags_are_refused(tiny, tmp_path, flag, value):
    assert_refused(tiny, tmp_path, flag, value)
