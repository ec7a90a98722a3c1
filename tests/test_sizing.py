"""GGUF sizes are predicted by llama.cpp's own dry run on a skeleton, before any weights exist."""

from __future__ import annotations


import gguf
import pytest

from moe2gguf.checkpoint import Checkpoint
from moe2gguf.exporter.export import export
from moe2gguf.exporter.sizing import ShapeCheckpoint, layout_config, predict_size


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q8_0"])
def test_predicted_size_equals_the_written_gguf(tiny_qwen3moe, tmp_path, quant):
    out = tmp_path / f"{quant}.gguf"
    export(str(tiny_qwen3moe), str(out), quant, progress=False)
    plan = predict_size(Checkpoint(tiny_qwen3moe), quant)
    # README promises sizes exact to 32 bytes (GGUF's data alignment: only the header's
    # padding to it can differ)
    assert abs(plan.total_bytes - out.stat().st_size) <= 32


def test_shape_only_prediction_needs_no_weights_and_lands_close(tiny_qwen3moe, tmp_path):
    out = tmp_path / "q4.gguf"
    export(str(tiny_qwen3moe), str(out), "Q4_K_M", progress=False)
    ckpt = Checkpoint(tiny_qwen3moe)
    plan = predict_size(ShapeCheckpoint(ckpt.config), "Q4_K_M")
    real_tensors = out.stat().st_size - int(gguf.GGUFReader(out).data_offset)
    # tensor bytes follow from llama.cpp's types exactly; only tokenizer metadata is estimated
    assert abs((plan.total_bytes - plan.meta_bytes) - real_tensors) <= 32
    assert abs(plan.total_bytes / out.stat().st_size - 1) < 0.1


def test_unaligned_expert_width_falls_back_as_llama_cpp_does(tiny_qwen3moe):
    """A width that is not a multiple of 256 cannot hold Q4_K along ffn_down_exps rows."""
    from moe2gguf.arch import arch_for_config

    ckpt = Checkpoint(tiny_qwen3moe)
    arch = arch_for_config(ckpt.config)
    cfg = layout_config(arch, arch.n_experts, 32)  # tiny width, 32-aligned only
    plan = predict_size(ShapeCheckpoint(cfg), "Q4_K_M")
    downs = {t for n, t in plan.tensor_types.items() if "ffn_down_exps" in n}
    assert downs and not downs & {"Q4_K", "Q6_K"}
    assert downs <= {"Q5_0", "Q8_0", "Q4_0", "Q5_1"}
