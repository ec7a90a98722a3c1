"""Byte-level BPE pre-tokenizers beyond Qwen2/Llama-3: tokenizers built here (no download)
with the pre-tokenizer blocks DeepSeek-V2 (deepseek-llm), DeepSeek-V3 (deepseek-v3) and
OLMoE / GPT-2 (ByteLevel with GPT-2's regex) publish in their tokenizer.json (copied as data in
tests/data/published_tokenizers.json, never built from moe2gguf's regexes), trained on a few KB
of the bundled calibration text, exported with a tiny OLMoE checkpoint; llama.cpp must tokenize
sample texts exactly like Hugging Face. Those blocks split hand-written texts as written here,
and a wrong pre-tokenizer name makes the llama.cpp check fail."""

from __future__ import annotations

import json
import pathlib

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, OlmoeForCausalLM, PreTrainedTokenizerFast

from conftest import REFERENCE, TOKENIZER_FILES, build_tiny
from moe2gguf.errors import UserError
from moe2gguf.exporter import tokenizer as tokmod
from moe2gguf.exporter.export import export
from test_families import FAMILIES
from test_tokenizer_real import PUBLISHED

TEXTS = [
    "def f(x):\n    if x > 0:\n        return x  # positive\n\treturn -x\n\n\nclass A:\n    pass\n",
    "Call 1234567 or 3.14159, year 2024; 12 345 and x1y22z333.",
    "Café naïve façade — “quotes” ‘single’ … µ Ωmega Привет мир Ελληνικά",
    "中文测试，日本語のテキスト、カタカナ。한국어 텍스트 mixed中文123",
    "Wait!!! What??? ...--- ***bold*** (a)[b]{c} <<>> @@##$$%% a.b,c;d:e",
    "line1\n\nline2\r\n  \n   trailing   \n\n\n",
    "I'm, you're, it's, they'll, we'd, I've, DON'T 'quoted'",
    "  leading and   multiple    spaces   \t tabs\t\there ",
    "'sure, 'tis 'sun'\n'round cafe\u0301 nai\u0308ve re\u0301sume\u0301 \u00a9Corp \u20acuro",
]

# llama.cpp's name -> the published tokenizer.json whose pre_tokenizer block it stands for
PUBLISHED_FOR = {"deepseek-llm": "deepseek-v2", "deepseek-v3": "deepseek-v3", "olmo": "gpt-2", "gpt-2": "gpt-2"}


def tok_json(pre: dict) -> dict:
    """An empty BPE tokenizer.json with this pre_tokenizer block."""
    return json.loads(Tokenizer(models.BPE()).to_str()) | {"pre_tokenizer": pre}


def hf_pre_tokenizer(name: str):
    """The pre_tokenizer of the real models' tokenizer.json, as the tokenizers library reads it."""
    return Tokenizer.from_str(json.dumps(tok_json(PUBLISHED[PUBLISHED_FOR[name]]["pre_tokenizer"]))).pre_tokenizer


# Pre-tokenization worked out by hand from each published regex (Ġ: a space after ByteLevel).
# GPT-2: contractions, optional space + letters / digits / other; a run of spaces keeps its
# last one for the next word. V3: digits cut in groups of 3 first, then letters with a leading
# non-letter. V2: letter runs with one optional leading space, punctuation runs, then every
# digit alone (Digits(individual)).
EXPECTED_SPLITS = {
    "gpt-2": [("I'm 12345 x  y!!", ["I", "'m", "Ġ12345", "Ġx", "Ġ", "Ġy", "!!"])],
    "deepseek-v3": [
        ("Call 1234567 or 3.14", ["Call", "Ġ", "123", "456", "7", "Ġor", "Ġ", "3", ".", "14"]),
        ("中文123", ["ä¸Ńæĸĩ", "123"]),
    ],
    "deepseek-llm": [
        ("Call 1234567 or 3.14", ["Call", "Ġ", "1", "2", "3", "4", "5", "6", "7", "Ġor", "Ġ", "3", ".", "1", "4"]),
    ],
}


@pytest.mark.parametrize("name", list(EXPECTED_SPLITS))
def test_published_pre_tokenizers_split_as_written(name):
    pre = hf_pre_tokenizer(name)
    for text, pieces in EXPECTED_SPLITS[name]:
        assert [p for p, _ in pre.pre_tokenize_str(text)] == pieces, text


def train_bpe(name: str) -> Tokenizer:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = hf_pre_tokenizer(name)
    tk.decoder = decoders.ByteLevel()
    text = (REFERENCE / "calib.txt").read_text(encoding="utf-8")[:8000] + "\n".join(TEXTS) * 20  # merges inside the texts' own pieces
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([text], trainer=trainer)
    return tk


def save_bpe_tokenizer(tk: Tokenizer, out: pathlib.Path) -> None:
    for f in TOKENIZER_FILES:
        (out / f).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>").save_pretrained(out)


def export_with_tokenizer(name: str, tmp: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    tk = train_bpe(name)
    folder = build_tiny(OlmoeForCausalLM, FAMILIES["olmoe"].config(vocab_size=tk.get_vocab_size()), tmp / f"tiny-{name}")
    save_bpe_tokenizer(tk, folder)  # in place of the reference tokenizer build_tiny copied
    out = tmp / f"{name}.gguf"
    export(str(folder), str(out), "F32", progress=False)
    return folder, out


def mismatches(folder: pathlib.Path, gguf_path: pathlib.Path) -> list[str]:
    import llama_cpp

    hf = AutoTokenizer.from_pretrained(folder)
    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    bad = []
    for t in TEXTS:
        want = hf.encode(t, add_special_tokens=False)
        got = llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
        if got != want:
            bad.append(f"{t!r}: llama.cpp {got} != HF {want}")
    return bad


def gguf_pre(path: pathlib.Path) -> str:
    import gguf

    return gguf.GGUFReader(path).get_field("tokenizer.ggml.pre").contents()


@pytest.mark.parametrize("name", ["deepseek-llm", "deepseek-v3", "olmo", "gpt-2"])
def test_llama_cpp_tokenizes_like_hf(name, tmp_path, monkeypatch):
    if name == "gpt-2":  # same ByteLevel tokenizer, on a model that is not OLMo
        monkeypatch.setattr(tokmod, "BYTELEVEL_NAMES", {})
    folder, out = export_with_tokenizer(name, tmp_path)
    assert gguf_pre(out) == name
    bad = mismatches(folder, out)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name, wrong", [("deepseek-llm", "qwen2"), ("deepseek-v3", "llama-bpe"), ("olmo", "llama-bpe")])
def test_wrong_pre_tokenizer_name_is_caught(name, wrong, tmp_path, monkeypatch):
    """The texts above tell the pre-tokenizers apart: naming the wrong one breaks the check."""
    monkeypatch.setattr(tokmod, "pre_tokenizer_name", lambda tok, model_type=None: wrong)
    folder, out = export_with_tokenizer(name, tmp_path)
    assert gguf_pre(out) == wrong
    assert mismatches(folder, out)


def _regex(published: str, step: int) -> str:
    return PUBLISHED[published]["pre_tokenizer"]["pretokenizers"][step]["pattern"]["Regex"]


def test_pre_tokenizer_names():
    """The published blocks get llama.cpp's names for them; blocks llama.cpp would cut
    differently are refused."""
    for name in ("deepseek-llm", "deepseek-v3", "gpt-2"):
        assert tokmod.pre_tokenizer_name(tok_json(PUBLISHED[PUBLISHED_FOR[name]]["pre_tokenizer"])) == name
    assert tokmod.pre_tokenizer_name(tok_json(PUBLISHED["gpt-2"]["pre_tokenizer"]), "olmoe") == "olmo"
    ref = json.loads((REFERENCE / "tokenizer.json").read_text(encoding="utf-8"))
    assert tokmod.pre_tokenizer_name(ref) == "qwen2"
    refused = [
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True),  # llama.cpp adds no prefix space
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_regex("deepseek-v3", 0)), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)]),  # a part of V3
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_regex("qwen2", 0)), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=True)]),  # split twice
        pre_tokenizers.Whitespace(),
    ]
    for pre in refused:
        with pytest.raises(UserError, match="not one llama.cpp knows"):
            tokmod.pre_tokenizer_name(tok_json(json.loads(pre.__getstate__())))
