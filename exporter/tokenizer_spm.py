"""A SentencePiece tokenizer (tokenizer.model: Mixtral, Llama-2 style) as llama.cpp's "llama" vocabulary.

Pieces, scores and types come from gguf-py's SentencePieceVocab (added_tokens.json included);
the ids tokenizer_config.json's added_tokens_decoder names become control / user-defined
tokens; special ids, add_bos/add_eos and the chat template come from gguf-py's SpecialVocab.
"""

from __future__ import annotations

import json
import pathlib

import gguf

from moe2gguf.errors import UserError

SPACE = "\u2581"  # SentencePiece's visible space


def _sentencepiece_vocab(model_dir: pathlib.Path) -> gguf.SentencePieceVocab | None:
    """gguf-py's reader of model_dir/tokenizer.model, or None when there is none or it is not a
    SentencePiece model (some repos ship a tiktoken file under that name)."""
    if not (model_dir / "tokenizer.model").is_file():
        return None
    try:
        return gguf.SentencePieceVocab(model_dir)
    except ValueError as e:  # added_tokens.json ids not contiguous after the base vocab
        raise UserError(f"{model_dir / 'added_tokens.json'}: {e}") from e
    except (RuntimeError, OSError):
        return None


def add_sentencepiece_tokenizer(writer: gguf.GGUFWriter, model_dir: pathlib.Path, vocab_size: int) -> bool:
    """Write tokenizer.ggml.* for model_dir/tokenizer.model and return True; False (nothing
    written) when the folder has no SentencePiece model. Pieces are padded with unused [PADi]
    entries up to the model's vocab_size."""
    vocab = _sentencepiece_vocab(model_dir)
    if vocab is None:
        return False
    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if len(tokens) > vocab_size:
        raise UserError(f"tokenizer.model has {len(tokens)} tokens but config vocab_size is {vocab_size}; the tokenizer belongs to another model")
    for i in range(len(tokens), vocab_size):  # the values convert_hf_to_gguf pads with
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-10000.0)
        types.append(gguf.TokenType.UNUSED)
    # HF's added tokens, as convert_hf_to_gguf types them: special ones are control tokens
    # (Mixtral's <unk>, <s>, </s> included), the others user-defined pieces llama.cpp matches
    # verbatim in the raw text, so their SentencePiece spaces become spaces; all score -1000.
    cfg_file = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    for key, added in (cfg.get("added_tokens_decoder") or {}).items():
        i, content = int(key), added["content"]
        if i >= vocab_size:
            raise UserError(f"tokenizer_config.json adds token id {i} but config vocab_size is {vocab_size}; the tokenizer belongs to another model")
        if added.get("special"):
            tokens[i], types[i] = content.encode("utf-8"), gguf.TokenType.CONTROL
        else:
            tokens[i], types[i] = content.replace(SPACE, " ").encode("utf-8"), gguf.TokenType.USER_DEFINED
        scores[i] = -1000.0
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # llama.cpp prepends a space to the text (SentencePiece's dummy prefix) unless told not
    # to; convert_hf_to_gguf writes the key only for models without it, and so do we
    if not vocab.sentencepiece_tokenizer.EncodeAsPieces("a")[0].startswith(SPACE):
        writer.add_add_space_prefix(False)
    gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return True
