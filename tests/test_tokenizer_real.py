"""The tokenizers users actually download, checked against llama.cpp's own test vectors.

The llama-cpp-python sdist (a dependency's source distribution, fetched once per machine
into a cache) ships `vendor/llama.cpp/models/ggml-vocab-*.gguf`: vocab-only GGUFs of real
tokenizers (DeepSeek-LLM/V2, Qwen2, Llama-3, GPT-2), with `.inp` texts and the `.out` ids
llama.cpp gives them. Each real tokenizer is rebuilt for Hugging Face from that vocabulary
(tokens + merges) and the model's published normalizer/pre-tokenizer blocks
(tests/data/published_tokenizers.json: data copied from the released tokenizer.json, not
from moe2gguf's tables), saved into a checkpoint built from the published config.json
(tests/data/published_configs.json, shrunk, random weights), exported, and then:
HF's tokenization == the `.out` ids == llama.cpp's tokenization of our GGUF, on every `.inp`
text. A Qwen1.5-MoE folder with only vocab.json + merges.txt (as Qwen publishes it) must
export the same way. Nothing is committed but the few-line definitions.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile

import gguf
import pytest
import torch

from moe2gguf.exporter import tokenizer as tokmod
from moe2gguf.exporter.export import export

DATA = pathlib.Path(__file__).parent / "data"
PUBLISHED = json.loads((DATA / "published_tokenizers.json").read_text(encoding="utf-8"))
CONFIGS = json.loads((DATA / "published_configs.json").read_text(encoding="utf-8"))
SDIST = "llama-cpp-python==0.3.36"
SEP = "\n__ggml_vocab_test__\n"


CACHE = pathlib.Path(os.environ.get("MOE2GGUF_CACHE", pathlib.Path.home() / ".cache" / "moe2gguf")) / "llama-cpp-python-0.3.36"


def _sdist() -> pathlib.Path:
    """The llama-cpp-python sdist in the cache ($MOE2GGUF_CACHE or ~/.cache/moe2gguf),
    downloaded with pip the first time; RuntimeError when PyPI cannot be reached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    if not list(CACHE.glob("llama_cpp_python-*.tar.gz")):
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", SDIST, "-d", str(CACHE)],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"pip download {SDIST}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return next(CACHE.glob("llama_cpp_python-*.tar.gz"))


def _extract(dest: pathlib.Path, keep) -> pathlib.Path:  # noqa: ANN001 - a predicate on member names
    """Members of the sdist's vendor/llama.cpp that `keep` accepts, under dest (written
    whole or not at all)."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    with tarfile.open(_sdist()) as tf:
        for m in tf.getmembers():
            rel = m.name.split("/vendor/llama.cpp/", 1)[-1] if "/vendor/llama.cpp/" in m.name else None
            if rel and m.isfile() and keep(rel):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(tf.extractfile(m).read())
    tmp.rename(dest)
    return dest


def llama_cpp_models() -> pathlib.Path:
    """vendor/llama.cpp/models of the sdist: the ggml-vocab-*.gguf files and their vectors."""
    return _extract(CACHE / "vocab", lambda rel: rel.startswith("models/ggml-vocab-")) / "models"


def llama_cpp_source() -> pathlib.Path:
    """The sdist's llama.cpp (convert_hf_to_gguf.py, conversion/, gguf-py/), for tools/."""
    return _extract(CACHE / "llama.cpp", lambda rel: rel.startswith(("convert_hf_to_gguf", "conversion/", "gguf-py/", "models/ggml-vocab-")))


@pytest.fixture(scope="session")
def vocab_dir() -> pathlib.Path:
    try:
        return llama_cpp_models()
    except RuntimeError as e:
        pytest.skip(f"the real tokenizer vocabularies ship in the {SDIST} sdist, which could not be downloaded ({e})")


def vectors(vocab_dir: pathlib.Path, vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's (text, ids) test pairs for a vocab file (tests/test-tokenizer-0 format)."""
    texts = (vocab_dir / f"{vocab}.inp").read_text(encoding="utf-8").split(SEP)[:-1]
    ids = [[int(x) for x in line.split()] for line in (vocab_dir / f"{vocab}.out").read_text(encoding="utf-8").split("\n")[: len(texts)]]
    assert len(texts) == len(ids) > 40
    return list(zip(texts, ids))


def read_vocab(vocab_gguf: pathlib.Path, *str_keys: str) -> dict:
    """tokens, token types, merges, bos/eos ids, add_bos and the string keys asked for, of a
    GGUF's tokenizer, read by ggml's own GGUF reader (libggml-base, shipped with
    llama-cpp-python): gguf-py's GGUFReader takes about a minute on 280k merges."""
    import ctypes

    import llama_cpp

    lib = ctypes.CDLL(str(pathlib.Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype, lib.gguf_init_from_file.argtypes = ctypes.c_void_p, [ctypes.c_char_p, Params]
    lib.gguf_find_key.restype, lib.gguf_find_key.argtypes = ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_get_arr_n.restype, lib.gguf_get_arr_n.argtypes = ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_arr_str.restype, lib.gguf_get_arr_str.argtypes = ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]
    lib.gguf_get_arr_data.restype, lib.gguf_get_arr_data.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_val_u32.restype, lib.gguf_get_val_u32.argtypes = ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_val_bool.restype, lib.gguf_get_val_bool.argtypes = ctypes.c_bool, [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_val_str.restype, lib.gguf_get_val_str.argtypes = ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(vocab_gguf).encode(), Params(True, None))
    assert ctx, vocab_gguf
    try:
        def key(name: str) -> int:
            return lib.gguf_find_key(ctx, name.encode())

        def strings(name: str) -> list[str]:
            k = key(name)
            return [lib.gguf_get_arr_str(ctx, k, i).decode("utf-8") for i in range(lib.gguf_get_arr_n(ctx, k))]

        k = key("tokenizer.ggml.token_type")
        types = list((ctypes.c_int32 * lib.gguf_get_arr_n(ctx, k)).from_address(lib.gguf_get_arr_data(ctx, k)))
        out = {"tokens": strings("tokenizer.ggml.tokens"), "types": types, "merges": strings("tokenizer.ggml.merges")}
        for name in ("bos_token_id", "eos_token_id"):
            out[name] = lib.gguf_get_val_u32(ctx, k) if (k := key(f"tokenizer.ggml.{name}")) >= 0 else None
        for name in ("add_bos_token", "add_eos_token"):
            out[name] = bool(lib.gguf_get_val_bool(ctx, k)) if (k := key(f"tokenizer.ggml.{name}")) >= 0 else None
        for name in str_keys:
            out[name] = lib.gguf_get_val_str(ctx, k).decode() if (k := key(name)) >= 0 else None
        return out
    finally:
        lib.gguf_free(ctx)


def published_tokenizer_json(vocab_gguf: pathlib.Path, definition: dict) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) of the real tokenizer: vocabulary, merges and
    added tokens from the vocab GGUF, normalizer/pre-tokenizer as the model publishes them."""
    v = read_vocab(vocab_gguf)
    tokens, types, merges = v["tokens"], v["types"], v["merges"]
    normal, control, user = int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": ty == user, "special": ty == control}
        for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (control, user)
    ]
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": definition["normalizer"], "pre_tokenizer": definition["pre_tokenizer"], "post_processor": definition.get("post_processor"),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": definition.get("ignore_merges", False),
                  "vocab": {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == normal},
                  "merges": [m.split(" ", 1) for m in merges]},
    }
    bos, eos = v["bos_token_id"], v["eos_token_id"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # runs tokenizer.json as it is
        "bos_token": tokens[bos] if bos is not None else None, "eos_token": tokens[eos] if eos is not None else None,
        "add_bos_token": bool(v["add_bos_token"]), "add_eos_token": False,
        "model_max_length": 16384,
    }
    return tok, config


def shrunk_config(name: str, **over) -> dict:
    entry = CONFIGS[name]
    return {**entry["config"], **entry["shrink"], **over}


def build_published(name: str, out: pathlib.Path, seed: int = 0, **over) -> pathlib.Path:
    """A checkpoint of the published config (shrunk), random weights, saved by transformers,
    with the published config.json keys (rope_scaling, quantization_config, ...) as released."""
    import transformers

    raw = shrunk_config(name, **over)
    raw_no_q = {k: v for k, v in raw.items() if k != "quantization_config"}
    cls = getattr(transformers, raw["architectures"][0])
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw_no_q.items() if k not in ("architectures", "model_type", "auto_map")})
    model = cls(cfg).eval()
    with torch.no_grad():  # routers decided by clear margins (see conftest.build_tiny)
        for pname, p in model.named_parameters():
            if pname.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
            elif ".self_attn." in pname and pname.endswith("proj.weight"):
                p.normal_(0.0, 0.15)
    model.save_pretrained(out)
    (out / "config.json").write_text(json.dumps(raw_no_q, indent=2))
    return out


def save_tokenizer(folder: pathlib.Path, tok: dict, config: dict) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja"):
        (folder / f).unlink(missing_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def save_vocab_merges(folder: pathlib.Path, tok: dict) -> None:
    """The tokenizer as Qwen publishes Qwen1.5 / Qwen2 ones: vocab.json, merges.txt and a
    tokenizer_config.json naming Qwen2Tokenizer, no tokenizer.json."""
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / f).unlink(missing_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tok["model"]["vocab"], ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in tok["model"]["merges"]) + "\n", encoding="utf-8")
    decoder = {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")} for a in tok["added_tokens"]}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "errors": "replace", "model_max_length": 32768, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }), encoding="utf-8")


def llama_tokenize(gguf_path: pathlib.Path, texts: list[str]) -> list[list[int]]:
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), vocab_only=True, verbose=False)
    return [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]


def hf_tokenize(folder: pathlib.Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    return [hf.encode(t, add_special_tokens=False) for t in texts]


def disagreements(texts: list[str], got: list[list[int]], want: list[list[int]], who: str) -> list[str]:
    return [f"{t!r}: {who} {g} != {w}" for t, g, w in zip(texts, got, want) if g != w]


# --- the published definitions carry llama.cpp's names ------------------------------------


@pytest.mark.parametrize("family", [k for k in PUBLISHED if not k.startswith("_")])
def test_published_pre_tokenizers_get_llama_cpp_names(family):
    d = PUBLISHED[family]
    tok = {"normalizer": d["normalizer"], "pre_tokenizer": d["pre_tokenizer"]}
    assert tokmod.pre_tokenizer_name(tok) == d["llama_cpp"]
    if d["llama_cpp"] == "gpt-2":  # the same pipeline in an OLMoE checkpoint
        assert tokmod.pre_tokenizer_name(tok, "olmoe") == "olmo"


def test_digits_step_with_digit_merges_is_refused():
    # llama.cpp's deepseek-llm keeps digit runs whole where HF's Digits step splits them:
    # equal only while no merge joins digits, which the real vocabulary satisfies
    d = PUBLISHED["deepseek-v2"]
    tok = {"normalizer": d["normalizer"], "pre_tokenizer": d["pre_tokenizer"], "model": {"merges": [["Ġ", "t"], ["1", "2"]]}}
    with pytest.raises(tokmod.UserError, match="digit"):
        tokmod.pre_tokenizer_name(tok)


# --- real vocabularies: HF == llama.cpp's vectors == llama.cpp on our GGUF --------------------


def check_vectors(folder: pathlib.Path, gguf_path: pathlib.Path, pairs: list[tuple[str, list[int]]]) -> None:
    texts, want = [t for t, _ in pairs], [ids for _, ids in pairs]
    bad = disagreements(texts, hf_tokenize(folder, texts), want, "HF")
    bad += disagreements(texts, llama_tokenize(gguf_path, texts), want, "llama.cpp on our GGUF")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("family, checkpoint", [("qwen2", "Qwen1.5-MoE-A2.7B")])  # DeepSeek-V2-Lite: below
def test_real_tokenizer_json_exports_and_tokenizes_like_hf(family, checkpoint, vocab_dir, tmp_path):
    d = PUBLISHED[family]
    folder = build_published(checkpoint, tmp_path / checkpoint)
    tok, config = published_tokenizer_json(vocab_dir / d["vocab"], d)
    save_tokenizer(folder, tok, config)
    out = tmp_path / f"{checkpoint}.gguf"
    export(str(folder), str(out), "F32", progress=False)
    r = read_vocab(out, "tokenizer.ggml.pre")
    assert r["tokenizer.ggml.pre"] == d["llama_cpp"]
    assert (r["add_bos_token"], r["add_eos_token"]) == (False, False)  # Qwen's ByteLevel post-processor, as upstream reads it
    check_vectors(folder, out, vectors(vocab_dir, d["vocab"]))


@pytest.mark.parametrize("family", ["llama-3", "gpt-2"])
def test_other_real_vocabularies_tokenize_like_hf(family, vocab_dir, tmp_path):
    from transformers import Qwen3MoeForCausalLM

    from conftest import save_tiny, tiny_qwen3moe_config

    d = PUBLISHED[family]
    tok, config = published_tokenizer_json(vocab_dir / d["vocab"], d)
    n_vocab = max(max(tok["model"]["vocab"].values()), *(a["id"] for a in tok["added_tokens"])) + 1
    folder = save_tiny(Qwen3MoeForCausalLM(tiny_qwen3moe_config(vocab_size=n_vocab, hidden_size=32, head_dim=8)), tmp_path / family)
    save_tokenizer(folder, tok, config)
    out = tmp_path / f"{family}.gguf"
    export(str(folder), str(out), "F32", progress=False)
    assert read_vocab(out, "tokenizer.ggml.pre")["tokenizer.ggml.pre"] == d["llama_cpp"]
    check_vectors(folder, out, vectors(vocab_dir, d["vocab"]))


def test_deepseek_v2_lite_exports_tokenizes_and_runs_as_in_hf(vocab_dir, tmp_path):
    """DeepSeek-V2-Lite as published (no q_lora, YaRN from rope_scaling, greedy softmax
    routing) with its real tokenizer (five Splits, Digits, ByteLevel; refused before): named
    deepseek-llm, tokenized as HF and llama.cpp's vectors, F32 logits equal PyTorch's."""
    from test_export import assert_same_logits

    d = PUBLISHED["deepseek-v2"]
    folder = build_published("DeepSeek-V2-Lite", tmp_path / "v2-lite")
    save_tokenizer(folder, *published_tokenizer_json(vocab_dir / d["vocab"], d))
    out = tmp_path / "v2-lite.gguf"
    export(str(folder), str(out), "F32", progress=False)
    r = read_vocab(out, "tokenizer.ggml.pre", "deepseek2.rope.scaling.type")
    assert (r["tokenizer.ggml.pre"], r["deepseek2.rope.scaling.type"]) == ("deepseek-llm", "yarn")
    check_vectors(folder, out, vectors(vocab_dir, d["vocab"]))
    assert assert_same_logits(folder, out) < 1e-3


def test_qwen2_vocab_json_merges_txt_folder_exports(vocab_dir, tmp_path):
    """Qwen1.5-MoE as published: vocab.json + merges.txt + tokenizer_config.json, no
    tokenizer.json. The GGUF tokenizes as transformers' Qwen2 tokenizer of that folder and as
    llama.cpp's vectors."""
    d = PUBLISHED["qwen2"]
    folder = build_published("Qwen1.5-MoE-A2.7B", tmp_path / "qwen1.5-moe")
    tok, _ = published_tokenizer_json(vocab_dir / d["vocab"], d)
    save_vocab_merges(folder, tok)
    out = tmp_path / "qwen1.5-moe.gguf"
    export(str(folder), str(out), "F32", progress=False)
    r = read_vocab(out, "tokenizer.ggml.pre")
    assert (r["tokenizer.ggml.pre"], r["eos_token_id"]) == ("qwen2", 151643)
    assert r["merges"] == [" ".join(m) for m in tok["model"]["merges"]]
    check_vectors(folder, out, vectors(vocab_dir, d["vocab"]))
