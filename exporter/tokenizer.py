"""The tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary.

Tokens and types come from tokenizer.json (or, for a folder with vocab.json + merges.txt and
no tokenizer.json, from the tokenizer transformers builds from them); merges, special-token
ids, add_bos/add_eos and the chat template from gguf-py's SpecialVocab (the same reader
convert_hf_to_gguf uses). llama.cpp picks its pre-tokenizer by name, so the HF tokenizer's
whole text pipeline (normalizer, then the ordered pre-tokenizer steps: Split, Digits,
ByteLevel, ...) is matched, as data, against the definitions of the models each llama.cpp
name was made for.
"""

from __future__ import annotations

import json
import pathlib

import gguf

from moe2gguf.errors import UserError
from moe2gguf.inputs import check_chat_template, first_line, load_tokenizer_json
from moe2gguf.exporter.tokenizer_spm import add_sentencepiece_tokenizer

# The regexes llama.cpp hard-codes per pre-tokenizer (src/llama-vocab.cpp), as the HF
# tokenizer.json of the models they were made for writes them in its Split steps.
_QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# DeepSeek-LLM / DeepSeek-V2 (-Lite): newlines, Latin/Greek/Cyrillic/... letter runs, ASCII
# and full-width punctuation runs, trailing spaces, CJK/Hangul runs, digit runs (llama.cpp's
# list; the published tokenizers have a Digits step in place of the last).
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


def _split(regex: str) -> tuple:
    return ("Split", regex, "isolated", False)


_BYTES = ("ByteLevel", False, False)  # bytes -> symbols only: the steps before it cut the text
_GPT2_BYTES = ("ByteLevel", False, True)  # cuts with GPT-2's regex, then maps bytes

# Whole pre-tokenizers (as `_steps` reads a tokenizer.json) -> llama.cpp's name. The keys are
# the step sequences of the published tokenizers the names were made for.
KNOWN_PRE_TOKENIZERS: dict[tuple, str] = {
    (_split(_QWEN2), _BYTES): "qwen2",  # Qwen1.5/2/2.5/3 (Qwen2-MoE, Qwen3-MoE)
    (_split(_LLAMA3), _BYTES): "llama-bpe",
    # DeepSeek-V2 / V2-Lite / deepseek-llm as published: five Splits, then Digits(individual),
    # where llama.cpp runs "\p{N}+"; the two agree while no merge joins two digits
    # (`_check_digit_merges`). Also llama.cpp's own six-regex form.
    (*map(_split, _DEEPSEEK_V2[:5]), ("Digits", True), _BYTES): "deepseek-llm",
    (*map(_split, _DEEPSEEK_V2), _BYTES): "deepseek-llm",
    (*map(_split, _DEEPSEEK_V3), _BYTES): "deepseek-v3",  # DeepSeek-V3 / R1
    # a lone ByteLevel with its GPT-2 regex: GPT-2, GPT-NeoX, OLMo / OLMoE (see BYTELEVEL_NAMES)
    (_GPT2_BYTES,): "gpt-2",
}
# llama.cpp runs GPT-2's regex for "gpt-2" and, identically, for "olmo" (OLMo / OLMoE's
# GPT-NeoX style tokenizers, named as convert_hf_to_gguf names them).
BYTELEVEL_NAMES = {"olmo": "olmo", "olmoe": "olmo"}
# Normalizers llama.cpp agrees with: none, and NFC (Qwen, GPT-NeoX/OLMoE), which llama.cpp does
# not apply (nor does convert_hf_to_gguf ask it to): the two tokenize NFC text alike, and
# text with decomposed accents differently (README, "Tokenizers").
KNOWN_NORMALIZERS: set[tuple] = {(), ("NFC",)}


def _flatten(node: dict | None, key: str) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [q for p in node[key] for q in _flatten(p, key)]
    return [node]


def _step(p: dict) -> tuple:
    """One pre-tokenizer step reduced to the fields that change which tokens come out."""
    kind = p.get("type")
    if kind == "Split" and "Regex" in p.get("pattern", {}):
        return ("Split", p["pattern"]["Regex"], str(p.get("behavior", "")).lower(), bool(p.get("invert", False)))
    if kind == "Digits":
        return ("Digits", bool(p.get("individual_digits", False)))
    if kind == "ByteLevel":  # trim_offsets changes offsets only
        return ("ByteLevel", bool(p.get("add_prefix_space", True)), bool(p.get("use_regex", True)))
    return (str(kind), json.dumps({k: v for k, v in p.items() if k != "type"}, sort_keys=True, ensure_ascii=False))


def _steps(tok: dict) -> tuple[tuple, ...]:
    return tuple(_step(p) for p in _flatten(tok.get("pre_tokenizer"), "pretokenizers"))


def _normalizer(tok: dict) -> tuple:
    return tuple(n.get("type") if set(n) == {"type"} else json.dumps(n, sort_keys=True) for n in _flatten(tok.get("normalizer"), "normalizers"))


def _describe(steps: tuple[tuple, ...]) -> str:
    def one(s: tuple) -> str:
        fields = [repr(f)[:40] for f in s[1:]]
        return f"{s[0]}({', '.join(fields)})"

    return "[" + ", ".join(one(s) for s in steps) + "]" if steps else "none"


def _refuse(why: str) -> UserError:
    names = sorted(set(KNOWN_PRE_TOKENIZERS.values()) | set(BYTELEVEL_NAMES.values()))
    return UserError(
        f"the tokenizer's pre-tokenizer {why}, which is not one llama.cpp knows by name ({', '.join(names)}); "
        "export a model with a Qwen2/Llama-3, DeepSeek-V2/V3, OLMo or GPT-2 style BPE tokenizer"
    )


def _merge_pairs(tok: dict) -> list[tuple[str, str]]:
    merges = tok.get("model", {}).get("merges") or []
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _check_digit_merges(tok: dict) -> None:
    """HF's Digits(individual) never lets a merge join digits; llama.cpp's "\\p{N}+" would."""
    for a, b in _merge_pairs(tok):
        if a.isascii() and b.isascii() and (a + b).isdigit():
            raise UserError(
                f"the tokenizer splits digits one by one but has the merge {a!r} + {b!r}; llama.cpp's deepseek-llm "
                "pre-tokenizer keeps digit runs whole and would use it, so numbers would tokenize differently"
            )


def pre_tokenizer_name(tok: dict, model_type: str | None = None) -> str:
    """llama.cpp's name for the normalizer + pre-tokenizer of a tokenizer.json. `model_type`
    (config.json) only picks between names llama.cpp treats alike (gpt-2 / olmo)."""
    steps = _steps(tok)
    name = KNOWN_PRE_TOKENIZERS.get(steps)
    if name is None:
        raise _refuse(f"is {_describe(steps)}")
    norm = _normalizer(tok)
    if norm not in KNOWN_NORMALIZERS:
        raise UserError(
            f"the tokenizer's normalizer {list(norm)} changes the text in a way llama.cpp does not reproduce; "
            "export a model whose tokenizer.json has no normalizer or NFC"
        )
    if ("Digits", True) in steps:
        _check_digit_merges(tok)
    if name == "gpt-2":
        return BYTELEVEL_NAMES.get(model_type or "", "gpt-2")
    return name


def read_tokenizer_json(model_dir: pathlib.Path) -> dict:
    """tokenizer.json as a dict; for a folder with vocab.json + merges.txt only (many Qwen2
    checkpoints), the same document for the tokenizer transformers builds from them."""
    f = model_dir / "tokenizer.json"
    if f.is_file():
        return load_tokenizer_json(f)  # checked: JSON object with a model, vocab and added tokens
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        from transformers import AutoTokenizer  # seconds to load, for the rare vocab.json + merges.txt model

        try:
            hf = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{model_dir}: transformers cannot build a tokenizer from vocab.json + merges.txt ({e}); copy the original tokenizer files into it") from None
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise UserError(f"{model_dir}: vocab.json + merges.txt load as {type(hf).__name__}, not a byte-level BPE tokenizer; copy the model's tokenizer.json into it")
        return json.loads(backend.to_str())
    raise UserError(f"{model_dir} has no tokenizer.json (nor vocab.json + merges.txt); copy the tokenizer files of the original model into it")


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: pathlib.Path, vocab_size: int) -> None:
    """Write tokenizer.ggml.* keys (vocab, types, merges, special ids, add_bos/add_eos, pre,
    chat template)."""
    if add_sentencepiece_tokenizer(writer, model_dir, vocab_size):  # tokenizer.model (Mixtral, Llama-2 style)
        return
    tok = read_tokenizer_json(model_dir)
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
            # HF's non-special added tokens match anywhere in the text, as llama.cpp's
            # user-defined ones do; convert_hf_to_gguf also types the non-special ones that
            # look special (DeepSeek's <｜...｜>) control, which llama.cpp then matches only when
            # parsing special tokens (README, "Tokenizers")
            special = added[i].get("special") or (by_id[i].startswith("<|") and by_id[i].endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok, model_type))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    check_chat_template(model_dir)
    try:  # gguf-py reads merges, special ids and the template; it raises anything on a damaged file
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
        if (model_dir / "tokenizer.json").is_file():
            _post_processor_adds(tok, special)
        special.add_to_gguf(writer, quiet=True)
    except (TypeError, ValueError, KeyError, AttributeError, UnicodeDecodeError) as e:
        raise UserError(f"{model_dir}: the tokenizer's merges, special tokens or chat template do not read ({first_line(e)}); "
                        "copy the tokenizer files of the original model again") from None


def _post_processor_adds(tok: dict, special: gguf.SpecialVocab) -> None:
    """What convert_hf_to_gguf's own gguf-py reads from a ByteLevel post-processor (Qwen,
    OLMoE), and gguf 0.19 does not yet: it adds neither BOS nor EOS, which outranks
    tokenizer_config.json's add_bos_token / add_eos_token."""
    post = tok.get("post_processor") or {}
    steps = {p.get("type") for p in post.get("processors", [post])}
    if "ByteLevel" in steps and not steps & {"TemplateProcessing", "RobertaProcessing"}:
        special.add_special_token["bos"] = False
        special.add_special_token["eos"] = False
