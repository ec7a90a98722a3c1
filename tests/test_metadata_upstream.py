"""Metadata as llama.cpp's convert_hf_to_gguf writes it (tools/parity_families.py compares
every key on every family): general.size_label from the tensors written and
general.quantization_version; SentencePiece added tokens typed and scored as upstream types
them (Mixtral's <unk>/<s>/</s>: control, -1000); a ByteLevel post-processor (Qwen) adds
neither BOS nor EOS, whatever tokenizer_config.json says."""

from __future__ import annotations

import json

import gguf
from transformers import MixtralForCausalLM

from conftest import REFERENCE
from moe2gguf.exporter.export import export
from conftest import build_tiny
from test_families import FAMILIES, GGUF
from test_tokenizer_real import PUBLISHED
from test_tokenizer_spm import save_spm_tokenizer


def test_size_label_and_quantization_version(tiny_qwen3moe, tmp_path):
    out = tmp_path / "tiny.gguf"
    export(str(tiny_qwen3moe), str(out), "F32", progress=False)
    r = gguf.GGUFReader(out)
    n_params = sum(int(t.n_elements) for t in r.tensors)
    experts = sum(int(t.n_elements) for t in r.tensors if "_exps." in t.name)
    # gguf-py's rule: experts x (shared params + one expert's params), rounded
    want = f"8x{gguf.model_weight_count_rounded_notation(n_params - experts + experts // 8, min_digits=2)}"
    assert r.get_field("general.size_label").contents() == want
    assert r.get_field("general.quantization_version").contents() == gguf.GGML_QUANT_VERSION


def test_sentencepiece_added_tokens_typed_as_upstream(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text((REFERENCE / "calib.txt").read_text(encoding="utf-8")[:40000], encoding="utf-8")
    folder = tmp_path / "mixtral-spm"
    folder.mkdir()
    n = save_spm_tokenizer(folder, text)
    build_tiny(MixtralForCausalLM, FAMILIES["mixtral"].config(vocab_size=n + 3, bos_token_id=1, eos_token_id=2, pad_token_id=None), folder)
    save_spm_tokenizer(folder, text)  # build_tiny copied the reference tokenizer over it
    out = tmp_path / "spm.gguf"
    export(str(folder), str(out), "F32", progress=False)
    g = GGUF(out)
    types, scores = g.value("tokenizer.ggml.token_type"), g.value("tokenizer.ggml.scores")
    assert types[:3] == [gguf.TokenType.CONTROL] * 3  # <unk> too: tokenizer_config lists it as special
    assert scores[:3] == [-1000.0] * 3
    assert types[-3:] == [gguf.TokenType.UNUSED] * 3 and scores[-3:] == [-10000.0] * 3  # padding past the SentencePiece model


def test_byte_level_post_processor_adds_no_bos_nor_eos(tiny_qwen3moe, tmp_path):
    tok = json.loads((tiny_qwen3moe / "tokenizer.json").read_text(encoding="utf-8"))
    tok["post_processor"] = PUBLISHED["qwen2"]["post_processor"]
    (tiny_qwen3moe / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    cfg = json.loads((tiny_qwen3moe / "tokenizer_config.json").read_text(encoding="utf-8"))
    (tiny_qwen3moe / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}), encoding="utf-8")
    out = tmp_path / "qwen.gguf"
    export(str(tiny_qwen3moe), str(out), "F32", progress=False)
    g = GGUF(out)
    assert g.value("tokenizer.ggml.add_bos_token") is False
    assert g.value("tokenizer.ggml.add_eos_token") is False
