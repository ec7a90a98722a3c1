"""DeepSeek-V3 as llama.cpp's `deepseek2`: F32 export is exact (sigmoid gating, the
selection bias as exp_probs_b, group-limited routing, renormalised and scaled weights,
q_lora MLA), multi-token-prediction layers are left out, inspect counts match, and
flags llama.cpp does not reproduce are refused."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from moe2gguf.inspect import inspect_model
from test_arch_common import assert_refused, build_tiny, f32_roundtrip, gguf_shapes, gguf_value, load_in_llama_cpp, tensor_counts

H, W, E = 64, 32, 8


def config(**kw) -> DeepseekV3Config:
    c = dict(
        vocab_size=4096, hidden_size=H, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4,  # the class default is 128
        kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=E, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=W, first_k_dense_replace=1,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    c.update(kw)
    return DeepseekV3Config(**c)


@pytest.fixture
def tiny(tmp_path: pathlib.Path) -> pathlib.Path:
    folder = build_tiny(DeepseekV3ForCausalLM, config(), tmp_path / "tiny-deepseek-v3", attn_std=0.15)
    # a non-zero selection bias, so routing that ignored it would pick other experts
    t = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for name in [n for n in t if n.endswith("e_score_correction_bias")]:
        t[name] = torch.randn(E, generator=g) * 0.3
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    add_mtp_layer(folder)  # as V3 checkpoints carry it, so every test below sees one
    return folder


def add_mtp_layer(folder: pathlib.Path) -> int:
    """Append a multi-token-prediction layer as real V3 checkpoints store it: layer
    `num_hidden_layers`, a full MoE decoder layer (named like the last one) plus enorm, hnorm,
    eh_proj, its own embed_tokens and shared_head; random values, so that using it anywhere
    would change results. Returns its parameter count."""
    cfg = json.loads((folder / "config.json").read_text())
    n, vocab = cfg["num_hidden_layers"], cfg["vocab_size"]
    t = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(2)
    mtp = {
        re.sub(rf"^model\.layers\.{n - 1}\.", f"model.layers.{n}.", k): torch.randn(v.shape, generator=g) * 0.1
        for k, v in t.items()
        if k.startswith(f"model.layers.{n - 1}.")
    }
    extra = {"enorm.weight": (H,), "hnorm.weight": (H,), "eh_proj.weight": (H, 2 * H), "embed_tokens.weight": (vocab, H),
             "shared_head.norm.weight": (H,), "shared_head.head.weight": (vocab, H)}
    mtp.update({f"model.layers.{n}.{k}": torch.randn(shape, generator=g) * 0.1 for k, shape in extra.items()})
    assert f"model.layers.{n}.mlp.experts.0.up_proj.weight" in mtp and len(mtp) > len(extra) + 10
    save_file({**t, **mtp}, folder / "model.safetensors", metadata={"format": "pt"})
    cfg["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return sum(v.numel() for v in mtp.values())


def test_f32_export_matches_torch(tiny, tmp_path):
    rel = f32_roundtrip(tiny, tmp_path)
    print(f"deepseek_v3 max logit diff {rel:.2e} of range")
    out = tmp_path / f"{tiny.name}-f32.gguf"
    shapes = gguf_shapes(out)
    assert shapes["blk.1.exp_probs_b.bias"] == (E,)
    assert shapes["blk.1.attn_q_b.weight"] == (24, 4 * 24)
    assert not any(n.startswith("blk.3.") for n in shapes)  # MTP layer left out
    assert gguf_value(out, "deepseek2.expert_gating_func") == 2  # sigmoid
    assert gguf_value(out, "deepseek2.expert_group_count") == 2
    assert gguf_value(out, "deepseek2.expert_weights_norm") is True


def test_inspect_counts_match_tensors(tiny):
    info = inspect_model(str(tiny))
    routed = r"layers\.([0-2])\.mlp\.experts\.(\d+)\."  # the decoder's layers, not MTP's
    want = tensor_counts(tiny, routed, r"layers\.[0-2]\.mlp\.shared_experts\.", n_used=2)
    assert (info["params_routed_experts"], info["params_shared_experts"]) == (want["experts"], want["shared"])
    assert info["dense_layers"] == [0] and info["experts_routed"] == E


def test_mtp_layer_is_counted_apart_and_not_exported(tmp_path):
    # llama.cpp's converter skips model.layers.{bid} with bid >= block_count (the MTP
    # layers): inspect must not count them in the model, export must leave them out
    from click.testing import CliRunner

    from moe2gguf.cli import cli
    from moe2gguf.exporter.export import export

    folder = build_tiny(DeepseekV3ForCausalLM, config(), tmp_path / "tiny-v3-mtp")
    before = inspect_model(str(folder))
    added = add_mtp_layer(folder)
    after = inspect_model(str(folder))
    assert before["params_mtp_not_exported"] == 0 and after["params_mtp_not_exported"] == added
    for key in ("params_total", "params_routed_experts", "params_shared_experts", "params_active_per_token", "bytes_bf16"):
        assert after[key] == before[key], key
    text = CliRunner().invoke(cli, ["inspect", str(folder)], catch_exceptions=False).output
    assert "MTP (not exported)" in text

    out = tmp_path / "mtp-f32.gguf"
    export(str(folder), str(out), "F32", progress=False)
    shapes = gguf_shapes(out)
    assert not any(n.startswith("blk.3.") for n in shapes) and "blk.2.ffn_up_exps.weight" in shapes
    assert gguf_value(out, "deepseek2.block_count") == 3
    load_in_llama_cpp(out)


@pytest.mark.parametrize("flag, value", [("rope_interleave", False), ("scoring_func", "softmax"), ("n_group", 3)])
def test_unhandled_flags_are_refused(tiny, tmp_path, flag, value):
    assert_refused(tiny, tmp_path, flag, value)


def test_router_hooks_name_the_selection_bias(tiny):
    # what prune must slice and preserve when it removes V3 experts
    from moe2gguf.arch import arch_for_config
    from moe2gguf.checkpoint import Checkpoint

    ckpt = Checkpoint(tiny)
    arch = arch_for_config(ckpt.config)
    names = arch.router_tensor_names(1)
    assert all(n in ckpt and ckpt.shape(n)[0] == E for n in names) and len(names) == 2
    assert arch.expert_groups(1) == 2


# --- pruning keeps the router's expert groups equal (n_group contiguous groups) -----------


def test_allocation_keeps_every_group_equal():
    from moe2gguf.prune import allocate as A
    from moe2gguf.prune.deploy import Shape, allocate_shape, feasible_shapes, shape_coverage

    g = torch.Generator().manual_seed(0)
    # group 0 (experts 0-3) holds all the large scores: an ungrouped top-4 would take it whole
    s = torch.rand(E, W, generator=g)
    s[:4] += 10.0
    per_group = lambda widths: [sum(1 for w in widths[i : i + E // 2] if w) for i in (0, E // 2)]  # noqa: E731
    assert per_group(allocate_shape([s], Shape(4, 32)).widths[0]) == [4, 0]  # what grouping forbids
    alloc = allocate_shape([s], Shape(4, 32), groups=[2])
    assert per_group(alloc.widths[0]) == [2, 2]
    # inside each group the best by top-W score
    kept = [e for e, w in enumerate(alloc.widths[0]) if w]
    top = s.sum(1)
    assert kept == sorted(torch.topk(top[:4], 2).indices.tolist() + (4 + torch.topk(top[4:], 2).indices).tolist())
    assert abs(shape_coverage([s], Shape(4, 32), [2]) - A.coverage([s], alloc)) < 1e-12
    # K: multiples of n_group from the fewest whose topk_group groups hold top-k
    lay = A.LAYOUTS["llama.cpp"]
    assert sorted({sh.experts for sh in feasible_shapes(lay, E, 32, 2, groups=2, groups_used=1)}) == [4, 6]
    assert sorted({sh.experts for sh in feasible_shapes(lay, E, 32, 2)}) == [2, 3, 4, 5, 6, 7]
    # expert-drop: kept count rounded to a multiple of n_group, equal per group
    drop = A.allocate_expert_drop([top, top], [[W] * E] * 2, 0.4, 4, groups=[2, 1])
    assert per_group(drop.widths[0]) == [2, 2] and per_group(drop.widths[1]) == [4, 1]
    # ragged coverage: every expert keeps at least one channel when grouped
    floor = A.keep_every_expert_if_grouped(A.top_expert_floor([top], 2), [2])
    ragged = A.allocate([s], [3 * H], 0.3 * E * W * 3 * H, A.LAYOUTS["ragged"], floor)
    assert all(w >= 1 for w in ragged.widths[0])


def test_prune_flow_keeps_groups_and_loads_in_stock_llama_cpp(tiny, tmp_path):
    import json

    from test_arch_common import load_in_llama_cpp, prune_flow

    pruned, gg, rep = prune_flow(tiny, tmp_path, ratio=0.3, layout="llama.cpp")
    report = json.loads((pruned / "prune_report.json").read_text())
    k = report["deployable"]["experts"]
    assert k % 2 == 0 and report["expert_groups"]["groups"] == [2]
    for widths in report["widths"][1:]:  # MoE layers: as many experts kept in each group
        assert sum(1 for w in widths[:4] if w) == sum(1 for w in widths[4:] if w) == k // 2
    width = report["deployable"]["width"]
    shapes = gguf_shapes(gg)
    assert shapes["blk.1.ffn_down_exps.weight"] == (width, H, k)
    assert shapes["blk.2.ffn_gate_exps.weight"] == (H, width, k)
    assert shapes["blk.1.exp_probs_b.bias"] == (k,) and shapes["blk.1.ffn_gate_inp.weight"] == (H, k)
    assert gguf_value(gg, "deepseek2.expert_count") == k
    assert gguf_value(gg, "deepseek2.expert_group_count") == 2
    assert gguf_value(gg, "deepseek2.expert_group_used_count") == 1
    assert rep["backend"] == "llama.cpp" and rep["ppl"] > 0
    load_in_llama_cpp(gg)
