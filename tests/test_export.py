"""GGUF export: F32 is exact against PyTorch in llama.cpp, hyper-parameters and tokenizer
are what llama.cpp's qwen3moe loader reads, ragged experts are zero-padded exactly, and bad
input exits 2 with one line and no file."""

from __future__ import annotations

import json
import pathlib

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from moe2gguf.cli import cli
from moe2gguf.exporter.export import export

TEXT = "The quick brown fox jumps over the lazy dog. " * 12


def llama_logits(path: pathlib.Path, ids: list[int]) -> np.ndarray:
    from moe2gguf.llama_runtime import open_llama

    # F32 KV cache: the default F16 cache alone costs ~1e-3 of the logit range
    llm = open_llama(path, n_ctx=256, n_batch=256, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def torch_logits(model_dir: pathlib.Path, ids: list[int]) -> np.ndarray:
    from moe2gguf.modeling import load_model

    model, _, _ = load_model(str(model_dir))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def tokens(model_dir: pathlib.Path, n: int = 96) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(TEXT)["input_ids"][:n]


def assert_same_logits(model_dir: pathlib.Path, gguf_path: pathlib.Path) -> float:
    ids = tokens(model_dir)
    t = torch_logits(model_dir, ids)
    g = llama_logits(gguf_path, ids)
    rel = float(np.abs(t - g).max() / (t.max() - t.min()))
    assert rel < 1e-3, f"llama.cpp logits differ from PyTorch by {rel:.2e} of the logit range"
    return rel


def test_f32_export_matches_torch_tiny(tiny_qwen3moe, tmp_path):
    out = tmp_path / "tiny.gguf"
    export(str(tiny_qwen3moe), str(out), "F32", progress=False)
    assert_same_logits(tiny_qwen3moe, out)


def test_f32_export_matches_torch_bundled(reference_model, tmp_path):
    out = tmp_path / "ref.gguf"
    export(str(reference_model), str(out), "F32", progress=False)
    assert_same_logits(reference_model, out)


def test_gguf_carries_loader_keys_and_tokenizer(tiny_qwen3moe, tmp_path):
    out = tmp_path / "tiny.gguf"
    export(str(tiny_qwen3moe), str(out), "F32", progress=False)
    r = gguf.GGUFReader(out)
    arch = "qwen3moe"

    def val(key: str):
        return r.get_field(key).contents()

    cfg = json.loads((tiny_qwen3moe / "config.json").read_text())
    assert val(gguf.Keys.General.ARCHITECTURE) == arch
    assert val(gguf.Keys.LLM.EXPERT_COUNT.format(arch=arch)) == (cfg.get("num_experts") or cfg["num_local_experts"])
    assert val(gguf.Keys.LLM.EXPERT_USED_COUNT.format(arch=arch)) == cfg["num_experts_per_tok"]
    assert val(gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=arch)) == cfg["moe_intermediate_size"]
    assert val(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch)) == cfg["num_key_value_heads"]
    assert val(gguf.Keys.Attention.KEY_LENGTH.format(arch=arch)) == cfg["head_dim"]
    assert val(gguf.Keys.Tokenizer.PRE) == "qwen2"
    assert val(gguf.Keys.Tokenizer.EOS_ID) == 2  # <|im_end|>
    assert "<|im_start|>" in val(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    assert len(val(gguf.Keys.Tokenizer.MERGES)) > 0
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    # ggml order: {n_embd, n_ff_exp, n_expert}
    assert shapes["blk.1.ffn_gate_exps.weight"] == (64, 32, 8)
    assert shapes["blk.1.ffn_down_exps.weight"] == (32, 64, 8)


def make_ragged(src: pathlib.Path, dst: pathlib.Path, widths: list[list[int]]) -> pathlib.Path:
    """A pruned-style checkpoint: expert k of layer b keeps its first widths[b][k] channels."""
    import shutil

    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    for bid, layer in enumerate(widths):
        n_old = (cfg.get("num_experts") or cfg["num_local_experts"])
        keep = range(len(layer))
        new = {}
        for k in keep:
            w = layer[k]
            p = f"model.layers.{bid}.mlp.experts.{k}."
            new[p + "gate_proj.weight"] = t[p + "gate_proj.weight"][:w].contiguous()
            new[p + "up_proj.weight"] = t[p + "up_proj.weight"][:w].contiguous()
            new[p + "down_proj.weight"] = t[p + "down_proj.weight"][:, :w].contiguous()
        for k in range(n_old):
            for part in ("gate_proj", "up_proj", "down_proj"):
                t.pop(f"model.layers.{bid}.mlp.experts.{k}.{part}.weight")
        t.update(new)
        g = f"model.layers.{bid}.mlp.gate.weight"
        t[g] = t[g][: len(layer)].contiguous()
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    cfg["moe2gguf_expert_widths"] = widths
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_ragged_experts_are_zero_padded_exactly(tiny_qwen3moe, tmp_path):
    widths = [[32, 16, 24, 8, 32, 16, 24, 8], [8, 8, 16, 32, 24, 16, 8, 32]]
    ragged = make_ragged(tiny_qwen3moe, tmp_path / "ragged", widths)
    out = tmp_path / "ragged.gguf"
    res = CliRunner().invoke(cli, ["export", str(ragged), "-o", str(out), "--quant", "F32"])
    assert res.exit_code == 0, res.output
    note = [line for line in res.stderr.splitlines() if "padding saves nothing" in line]
    assert len(note) == 1 and "moe2gguf prune" in note[0] and "--layout llama.cpp" in note[0], res.stderr  # how to get the deployable one, in the same line
    assert_same_logits(ragged, out)
    r = gguf.GGUFReader(out)
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert shapes["blk.0.ffn_up_exps.weight"] == (64, 32, 8)  # widest expert, one width for all layers


def test_different_expert_counts_are_refused(tiny_qwen3moe, tmp_path):
    ragged = make_ragged(tiny_qwen3moe, tmp_path / "ragged", [[32] * 8, [32] * 6])
    out = tmp_path / "x.gguf"
    res = CliRunner().invoke(cli, ["export", str(ragged), "-o", str(out), "--quant", "F32"])
    assert res.exit_code == 2
    assert "--layout llama.cpp" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert list(tmp_path.glob("x.gguf*")) == [] and list(tmp_path.glob(".x.gguf*")) == []


@pytest.mark.parametrize(
    "case",
    ["unknown-quant", "missing-folder", "config-disagrees", "imatrix-missing"],
)
def test_bad_input_exits_2_without_output(tiny_qwen3moe, tmp_path, case):
    out = tmp_path / "out.gguf"
    args = ["export", str(tiny_qwen3moe), "-o", str(out), "--quant", "F32"]
    if case == "unknown-quant":
        args[-1] = "Q4_K_X"
    elif case == "missing-folder":
        out = tmp_path / "nope" / "out.gguf"
        args[3] = str(out)
    elif case == "config-disagrees":
        cfg = json.loads((tiny_qwen3moe / "config.json").read_text())
        cfg["moe_intermediate_size"] = 48
        (tiny_qwen3moe / "config.json").write_text(json.dumps(cfg))
    elif case == "imatrix-missing":
        args += ["--imatrix", str(tmp_path / "no-calib")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    assert not out.exists()
    assert [p for p in out.parent.glob("*out.gguf*")] == [] if out.parent.exists() else True


def test_bf16_checkpoint_quantizes_from_a_bf16_intermediate_to_the_same_gguf(tiny_qwen3moe, tmp_path, monkeypatch):
    """No F32 copy of a bf16 model: the temporary GGUF llama.cpp quantizes from is BF16 (the
    checkpoint's own size), and the result is the GGUF quantized from the exact F32 copy."""
    import shutil

    from moe2gguf.exporter import export as ex

    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_qwen3moe, bf16)
    weights = load_file(str(tiny_qwen3moe / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, str(bf16 / "model.safetensors"), metadata={"format": "pt"})
    f32 = tmp_path / "f32"
    shutil.copytree(tiny_qwen3moe, f32)  # the same values, exactly, as float32
    save_file({k: v.to(torch.bfloat16).float() for k, v in weights.items()}, str(f32 / "model.safetensors"), metadata={"format": "pt"})

    seen = {}
    real = ex.quantize

    def spy(src, dst, *a, **kw):  # noqa: ANN001, ANN202
        r = gguf.GGUFReader(src)
        seen[pathlib.Path(dst).name] = (src.stat().st_size, {t.tensor_type.name for t in r.tensors if "_exps" in t.name})
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(ex, "quantize", spy)
    export(str(bf16), str(tmp_path / "from-bf16.gguf"), "Q8_0", progress=False)
    export(str(f32), str(tmp_path / "from-f32.gguf"), "Q8_0", progress=False)
    (size_b, types_b), (size_f, types_f) = [v for _, v in sorted(seen.items())]
    assert types_b == {"BF16"} and types_f == {"F32"}
    assert size_b <= (bf16 / "model.safetensors").stat().st_size * 1.1 + (1 << 20)  # tokenizer and metadata
    a, b = gguf.GGUFReader(tmp_path / "from-bf16.gguf"), gguf.GGUFReader(tmp_path / "from-f32.gguf")
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert x.tensor_type == y.tensor_type and np.array_equal(x.data, y.data), x.name
    assert not list(tmp_path.glob(".*moe2gguf*")) and not list(tmp_path.glob("*.partial"))  # nothing left behind
