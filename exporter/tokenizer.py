"""The tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary.

Tokens and types come from tokenizer.json; merges, special-token ids and the chat template
from gguf-py's SpecialVocab (the same reader convert_hf_to_gguf uses). llama.cpp picks its
pre-tokenizer regexes by name, so the HF pre-tokenizer (its Split regexes, or ByteLevel's
built-in GPT-2 regex) is matched against the ones llama.cpp hard-codes.
"""

from __future__ import annotations

import json
import pathlib

import gguf

from moe2gguf.errors import UserError
from moe2gguf.exporter.tokenizer_spm import add_sentencepiece_tokenizer

# The regexes llama.cpp hard-codes per pre-tokenizer (src/llama-vocab.cpp), as the HF
# tokenizer.json of the models they were made for writes them: a Sequence of Split
# pre-tokenizers (then a ByteLevel with use_regex=False), matched here as the whole ordered
# tuple of Split regexes.
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# DeepSeek-LLM / DeepSeek-V2 (-Lite): newlines, Latin/Greek/Cyrillic/... letter runs, ASCII
# and full-width punctuation runs, trailing spaces, CJK/Hangul runs, digit runs.
_DEEPSEEK_V2 = (
    "[\r\n]",
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377"
    "\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
    "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
)
# DeepSeek-V3 / R1: digit groups of up to 3, CJK/kana runs, then a Llama-3-like regex.
_DEEPSEEK_V3 = (
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
KNOWN_SPLITS: dict[tuple[str, ...], str] = {
    (_QWEN2,): "qwen2",
    (_LLAMA3,): "llama-bpe",
    _DEEPSEEK_V2: "deepseek-llm",
    _DEEPSEEK_V3: "deepseek-v3",
}
# A lone ByteLevel(use_regex=True) splits with GPT-2's regex, which llama.cpp runs for "gpt-2"
# and, identically, for "olmo" (GPT-NeoX style tokenizers of OLMo / OLMoE, named as
# convert_hf_to_gguf names them).
BYTELEVEL_NAMES = {"olmo": "olmo", "olmoe": "olmo"}


def _flatten(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [q for p in pre["pretokenizers"] for q in _flatten(p)]
    return [pre]


def _refuse(why: str) -> UserError:
    names = sorted(set(KNOWN_SPLITS.values()) | set(BYTELEVEL_NAMES.values()) | {"gpt-2"})
    return UserError(
        f"the tokenizer's pre-tokenizer {why}, which is not one llama.cpp knows by name ({', '.join(names)}); "
        "export a model with a Qwen2/Llama-3, DeepSeek-V2/V3, OLMo or GPT-2 style BPE tokenizer"
    )


def pre_tokenizer_name(tok: dict, model_type: str | None = None) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json. `model_type` (config.json)
    only picks between names llama.cpp treats alike (gpt-2 / olmo)."""
    steps = _flatten(tok.get("pre_tokenizer"))
    splits = [s for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    others = sorted({str(s.get("type")) for s in steps} - {"Split", "ByteLevel"})
    if others:
        raise _refuse(f"has {', '.join(others)} steps")
    if any(b.get("add_prefix_space") for b in byte_level):
        raise _refuse("adds a prefix space")
    regexes = tuple(s["pattern"].get("Regex") or s["pattern"].get("String") for s in splits)
    uses_regex = any(b.get("use_regex", True) for b in byte_level)
    if splits and not uses_regex:
        if regexes in KNOWN_SPLITS:
            return KNOWN_SPLITS[regexes]
        raise _refuse(f"splits with {len(regexes)} regex(es) {list(regexes)!r}")
    if not splits and len(byte_level) == 1 and uses_regex:
        return BYTELEVEL_NAMES.get(model_type or "", "gpt-2")
    raise _refuse(f"mixes {len(splits)} Split step(s) with ByteLevel(use_regex={uses_regex})")


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: pathlib.Path, vocab_size: int) -> None:
    """Write tokenizer.ggml.* keys (vocab, types, merges, special ids, pre, chat template)."""
    if add_sentencepiece_tokenizer(writer, model_dir, vocab_size):  # tokenizer.model (Mixtral, Llama-2 style)
        return
    f = model_dir / "tokenizer.json"
    if not f.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json; copy the tokenizer files of the original model into it")
    tok = json.loads(f.read_text(encoding="utf-8"))
    cfg = model_dir / "config.json"
    model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type") if cfg.is_file() else None
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
    writer.add_tokenizer_pre(pre_tokenizer_name(tok, model_type))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
