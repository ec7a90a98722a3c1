"""SentencePiece tokenizers (tokenizer.model, Mixtral / Llama-2 style) export as llama.cpp's
"llama" vocabulary: a tiny byte-fallback BPE SentencePiece model trained here on the bundled
calibration text, saved with a Mixtral-style tokenizer.json / tokenizer_config.json next to a
tiny Mixtral, is tokenized by llama.cpp exactly as SentencePiece and the HF tokenizer.json do
(BOS included), and the F32 logits still round-trip."""

from __future__ import annotations

import json
import pathlib

import pytest
from transformers import MixtralForCausalLM

from conftest import REFERENCE, build_tiny
from test_families import FAMILIES, GGUF, f32_roundtrip

config = FAMILIES["mixtral"].config

spm = pytest.importorskip("sentencepiece")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn [x ** 2 for x in range(10)]  # squares\n",
    "Grüße aus Köln, naïve café — 日本語のテキスト ✓ 🙂",
    "   leading spaces, runs   of  spaces,\n\n\ntrailing   ",
    " a single leading space",
    "x=1;y=22;z=333\r\n",
]
TEMPLATE = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"


def save_spm_tokenizer(out: pathlib.Path, text: pathlib.Path) -> int:
    """Train a Llama-like SentencePiece BPE (byte fallback, identity normalization, dummy
    prefix, <unk>/<s>/</s> = 0/1/2) and save it as Mixtral ships one: tokenizer.model plus a
    legacy LlamaTokenizerFast tokenizer.json (Prepend/Replace normalizer, BPE with byte
    fallback, "<s> $A" post-processor) and tokenizer_config.json. Returns the vocab size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    prefix = out / "sp"
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), vocab_size=512, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, input_sentence_size=2000, minloglevel=2, num_threads=1,
    )
    (out / "tokenizer.model").write_bytes(prefix.with_suffix(".model").read_bytes())
    for f in (".model", ".vocab"):
        prefix.with_suffix(f).unlink()
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    n = sp.vocab_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    # SentencePiece BPE merges, highest-scored result first (what HF's converter derives)
    merges = sorted(
        (-sp.get_score(i), vocab[p[:k]], vocab[p[k:]], p[:k], p[k:])
        for p, i in vocab.items()
        if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))
        for k in range(1, len(p))
        if p[:k] in vocab and p[k:] in vocab
    )
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "chat_template": TEMPLATE,
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for i, t in enumerate(("<unk>", "<s>", "</s>"))},
    }))
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return n


@pytest.fixture(scope="module")
def spm_mixtral(tmp_path_factory) -> pathlib.Path:
    tmp = tmp_path_factory.mktemp("spm")
    text = tmp / "text.txt"
    text.write_text((REFERENCE / "calib.txt").read_text(encoding="utf-8")[:40000], encoding="utf-8")
    folder = tmp / "tiny-mixtral-spm"
    folder.mkdir()
    n = save_spm_tokenizer(folder, text)
    build_tiny(MixtralForCausalLM, config(vocab_size=n, bos_token_id=1, eos_token_id=2, pad_token_id=None), folder, attn_std=0.15)
    save_spm_tokenizer(folder, text)  # build_tiny copied the reference BPE tokenizer over ours
    return folder


def test_llama_cpp_tokenizes_like_sentencepiece_and_hf(spm_mixtral, tmp_path):
    import llama_cpp
    from transformers import PreTrainedTokenizerFast

    rel = f32_roundtrip(spm_mixtral, tmp_path)
    print(f"spm mixtral max logit diff {rel:.2e} of range")
    out = tmp_path / f"{spm_mixtral.name}-f32.gguf"
    gguf_value = GGUF(out).value
    assert gguf_value("tokenizer.ggml.model") == "llama"
    assert gguf_value("tokenizer.ggml.bos_token_id") == 1 and gguf_value("tokenizer.ggml.eos_token_id") == 2
    assert gguf_value("tokenizer.ggml.add_bos_token") is True and gguf_value("tokenizer.ggml.add_eos_token") is False
    assert gguf_value("tokenizer.chat_template") == TEMPLATE

    sp = spm.SentencePieceProcessor(model_file=str(spm_mixtral / "tokenizer.model"))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(spm_mixtral / "tokenizer.json"))
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    for t in TEXTS:
        want = [1, *sp.encode(t)]
        assert hf(t)["input_ids"] == want, f"the HF tokenizer.json disagrees with SentencePiece on {t!r}"
        got = llm.tokenize(t.encode("utf-8"), add_bos=True, special=False)
        assert got == want, f"llama.cpp tokenizes {t!r} differently"
        assert llm.detokenize(got[1:]).decode("utf-8") == " " + t  # the dummy-prefix space comes back
