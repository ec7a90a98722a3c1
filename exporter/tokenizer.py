"""The tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary.

Tokens and types come from tokenizer.json; merges, special-token ids and the chat template
from gguf-py's SpecialVocab (the same reader convert_hf_to_gguf uses). llama.cpp picks its
pre-tokenizer regex by name, so the HF Split regex is matched against the ones we know.
"""

from __future__ import annotations

import json
import pathlib

import gguf

from moe2gguf.errors import UserError
from moe2gguf.exporter.tokenizer_spm import add_sentencepiece_tokenizer

# HF pre-tokenizer Split regex -> llama.cpp pre-tokenizer name (src/llama-vocab.cpp).
KNOWN_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def _split_regexes(pre: dict | None) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [r for p in pre["pretokenizers"] for r in _split_regexes(p)]
    if pre.get("type") == "Split":
        return [pre["pattern"].get("Regex") or pre["pattern"].get("String")]
    return []


def pre_tokenizer_name(tok: dict) -> str:
    regexes = _split_regexes(tok.get("pre_tokenizer"))
    for r in regexes:
        if r in KNOWN_PRE:
            return KNOWN_PRE[r]
    raise UserError(
        "the tokenizer's pre-tokenizer regex is not one llama.cpp knows by name "
        f"({', '.join(sorted(set(KNOWN_PRE.values())))}); export a model with a Qwen2/Llama-3 style BPE tokenizer"
    )


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: pathlib.Path, vocab_size: int) -> None:
    """Write tokenizer.ggml.* keys (vocab, types, merges, special ids, pre, chat template)."""
    if add_sentencepiece_tokenizer(writer, model_dir, vocab_size):  # tokenizer.model (Mixtral, Llama-2 style)
        return
    f = model_dir / "tokenizer.json"
    if not f.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json; copy the tokenizer files of the original model into it")
    tok = json.loads(f.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer type {model.get('type')!r} is not supported; moe2gguf exports byte-level BPE tokenizers")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if max(by_id) >= vocab_size:
        raise UserError(f"tokenizer has token id {max(by_id)} but config vocab_size is {vocab_size}; the tokenizer belongs to another model")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].get("special") or (by_id[i].startswith("<|") and by_id[i].endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
