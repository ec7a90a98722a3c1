"""Reading what a user hands us: files that must be regular, UTF-8 and bounded, JSON that
must have the shape we expect, numbers that must be finite. Every failure is a UserError
naming the file and what to do, so no verb ends in a traceback on a damaged input.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import stat

import click

from moe2gguf.errors import UserError

# Bounds on what is read whole into memory: a text (tokenized at once) and a JSON/YAML file
# (config, index, calib.json, run.json, recipe). Real ones are far below; a device or a
# runaway file above them is refused before it is read.
MAX_TEXT_BYTES = 1 << 30
MAX_JSON_BYTES = 256 << 20


def first_line(e: BaseException, limit: int = 160) -> str:
    """What a library's exception says, as a short fragment of one line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def regular_file(path: str | os.PathLike, what: str, fix: str, limit: int | None = None) -> pathlib.Path:
    """`path` as a regular file of at most `limit` bytes, else a UserError saying what it is."""
    p = pathlib.Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UserError(f"{what} {p} does not exist; {fix}") from None
    except OSError as e:
        raise UserError(f"{what} {p} cannot be read ({e.strerror}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what} {p} is {_kind(st.st_mode)}, not a regular file; {fix}")
    if limit is not None and st.st_size > limit:
        raise UserError(f"{what} {p} has {st.st_size:,} bytes, more than the {limit:,} moe2gguf reads at once; {fix}")
    return p


def read_bytes(path: str | os.PathLike, what: str, fix: str, limit: int) -> bytes:
    p = regular_file(path, what, fix, limit)
    try:
        with open(p, "rb") as f:
            return f.read(limit + 1)[:limit]  # the file may have grown since stat
    except OSError as e:
        raise UserError(f"{what} {p} cannot be read ({e.strerror}); {fix}") from None


def decode_utf8(data: bytes, what: str, path: str | os.PathLike, fix: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); {fix}") from None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (calibration or evaluation text), whole."""
    fix = "pass a UTF-8 text file"
    data = read_bytes(path, "text file", fix, MAX_TEXT_BYTES)
    return decode_utf8(data, "text file", path, "convert it to UTF-8 (e.g. iconv -t UTF-8)")


def read_json(path: str | os.PathLike, what: str, fix: str) -> object:
    """A JSON file's value; UserError (with `fix`) when it is not UTF-8 JSON."""
    data = read_bytes(path, what, fix, MAX_JSON_BYTES)
    text = decode_utf8(data, what, path, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}); {fix}") from None
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply to be JSON we read; {fix}") from None


def read_json_object(path: str | os.PathLike, what: str, fix: str) -> dict:
    v = read_json(path, what, fix)
    if not isinstance(v, dict):
        raise UserError(f"{what} {path} holds a JSON {_json_type(v)}, not an object; {fix}")
    return v


def _json_type(v: object) -> str:
    return {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def is_int(v: object) -> bool:
    """A whole number as JSON/YAML spell it (not a bool, not 256.0, not "256")."""
    return isinstance(v, int) and not isinstance(v, bool)


def _has_type(v: object, want: type) -> bool:
    if want is int:
        return is_int(v)
    if want is float:  # any finite number
        return (is_int(v) or isinstance(v, float)) and math.isfinite(v)
    return isinstance(v, want)


_TYPE_NAMES = {int: "whole number", float: "number", list: "list", str: "text", dict: "mapping"}


def require_fields(obj: dict, spec: dict[str, type | tuple[type, ...]], where: str, fix: str) -> None:
    """Each key of `spec` present in `obj` with a value of one of its types (int: a whole number)."""
    for key, want in spec.items():
        wants = want if isinstance(want, tuple) else (want,)
        v = obj.get(key)
        if not any(_has_type(v, w) for w in wants):
            what = "is missing" if key not in obj else f"is {json.dumps(v, default=str)[:40]}"
            names = " or ".join(_TYPE_NAMES.get(w, w.__name__) for w in wants)
            raise UserError(f"{where}: {key} {what}, expected a {names}; {fix}")


def require_tokenizer(model_dir: str | os.PathLike) -> None:
    """The model folder has tokenizer files, and a tokenizer.json is a JSON object with a model."""
    d = pathlib.Path(model_dir)
    if not ((d / "tokenizer.json").exists() or (d / "tokenizer.model").exists() or ((d / "vocab.json").exists() and (d / "merges.txt").exists())):
        raise UserError(
            f"{d} has no tokenizer (no tokenizer.json, tokenizer.model or vocab.json + merges.txt); "
            "copy the tokenizer files of the original model next to config.json"
        )
    if (d / "tokenizer.json").exists():
        load_tokenizer_json(d / "tokenizer.json")
    check_chat_template(d)


def hf_tokenizer(model_dir: str | os.PathLike):  # noqa: ANN201 - a transformers tokenizer
    """transformers' tokenizer of a model folder, for whole texts (no length limit)."""
    from transformers import AutoTokenizer  # seconds to load; this module serves --help too

    require_tokenizer(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - transformers/tokenizers raise anything on damaged files
        raise UserError(f"{model_dir}: the tokenizer files do not load ({first_line(e)}); copy the tokenizer files of the original model again") from None
    tok.model_max_length = 1 << 62  # whole texts are tokenized once, then cut into windows
    cfg = pathlib.Path(model_dir) / "config.json"
    if cfg.is_file():
        from moe2gguf.arch import arch_for_config  # arch imports this module

        vocab_size = arch_for_config(read_json_object(cfg, "config", "restore the original config.json")).hf_config.vocab_size
        top = max(tok.get_vocab().values(), default=-1)
        if top >= vocab_size:  # the embedding would be indexed out of range (an IndexError deep in torch)
            raise UserError(f"{model_dir}: the tokenizer gives token id {top}, the model has {vocab_size} embeddings (vocab_size); "
                            "the tokenizer files belong to another model, copy the original model's tokenizer files")
    return tok


def load_tokenizer_json(path: str | os.PathLike) -> dict:
    """tokenizer.json, checked for the fields a BPE/Unigram tokenizer must have."""
    fix = "copy tokenizer.json of the original model again"
    tok = read_json_object(path, "tokenizer file", fix)
    model = tok.get("model")
    if not isinstance(model, dict):
        raise UserError(f"tokenizer file {path} has no 'model' object; {fix}")
    vocab = model.get("vocab")
    if model.get("type") == "BPE" and not (isinstance(vocab, dict) and all(is_int(i) and i >= 0 for i in vocab.values())):
        raise UserError(f"tokenizer file {path}: model.vocab is not a mapping of tokens to ids; {fix}")
    if isinstance(vocab, dict) and len(set(vocab.values())) != len(vocab):
        raise UserError(f"tokenizer file {path}: model.vocab gives the same id to two tokens; {fix}")
    added = tok.get("added_tokens", [])
    if not isinstance(added, list) or not all(isinstance(a, dict) and is_int(a.get("id")) and a["id"] >= 0 and isinstance(a.get("content"), str) for a in added):
        raise UserError(f"tokenizer file {path}: added_tokens is not a list of {{id, content}} entries; {fix}")
    pre = tok.get("pre_tokenizer")
    if pre is not None and not isinstance(pre, dict):
        raise UserError(f"tokenizer file {path}: pre_tokenizer is not an object; {fix}")
    return tok


def check_chat_template(model_dir: str | os.PathLike) -> None:
    """The chat template, where a model folder has one, is text: chat_template.jinja in UTF-8, or
    tokenizer_config.json's chat_template as a string or a list of {name, template} strings."""
    d = pathlib.Path(model_dir)
    fix = "copy the tokenizer files of the original model again"
    if (d / "tokenizer_config.json").exists():
        t = read_json_object(d / "tokenizer_config.json", "tokenizer config", fix).get("chat_template")
        named = isinstance(t, list) and all(isinstance(x, dict) and isinstance(x.get("name"), str) and isinstance(x.get("template"), str) for x in t)
        if not (t is None or isinstance(t, str) or named):
            raise UserError(f"tokenizer config {d / 'tokenizer_config.json'}: chat_template is neither text nor a list of {{name, template}} texts; {fix}")
        for name, text in [("", t)] if isinstance(t, str) else [(f" ({x['name']})", x["template"]) for x in t or []]:
            _parse_template(text, f"tokenizer config {d / 'tokenizer_config.json'}: chat_template{name}")
    if (d / "chat_template.jinja").exists():
        f = d / "chat_template.jinja"
        _parse_template(decode_utf8(read_bytes(f, "chat template", fix, MAX_JSON_BYTES), "chat template", f, fix), f"chat template {f}")


def _parse_template(text: str, where: str) -> None:
    """A template that does not parse would be written into the GGUF and fail at every chat
    turn; compiled as transformers compiles it for apply_chat_template (its {% generation %}
    tag included)."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # a transformers that moved it: its environment, less {% generation %}
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        compile_template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]).from_string
    try:
        compile_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{where} is not valid Jinja (line {e.lineno}: {e.message}); fix it, or remove it to export without a chat template") from None


def require_gguf(path: str | os.PathLike) -> pathlib.Path:
    """A model GGUF whose header and tensor table gguf-py reads, checked before llama.cpp sees
    it: a truncated or corrupt file is named in one line, never a loader crash."""
    import gguf  # kept out of --help, which reads this module

    fix = "pass a .gguf file written by `moe2gguf export`"
    p = regular_file(path, "model", fix)
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{p} is not a GGUF file (no GGUF magic); {fix}")
    try:
        r = gguf.GGUFReader(p)
        kind = r.get_field(gguf.Keys.General.TYPE)
        kind = kind.contents() if kind is not None else None
        end = max((int(t.data_offset) + int(t.n_bytes) for t in r.tensors), default=0)
    except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError/struct/index errors on a damaged file
        raise UserError(f"{p} is a truncated or corrupt GGUF ({first_line(e)}); export it again") from None
    size = p.stat().st_size
    if end > size:
        raise UserError(f"{p} is a truncated GGUF ({size:,} bytes, its tensors end at {end:,}); export it again")
    if kind == gguf.GGUFType.IMATRIX:
        raise UserError(f"{p} is an importance matrix, not a model; {fix} (an imatrix goes to `export --imatrix`)")
    if not r.tensors:
        raise UserError(f"{p} is a GGUF without tensors; {fix}")
    return p


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (which compare false to any bound)."""

    def convert(self, value, param, ctx):  # noqa: ANN001,ANN201 - click's signature
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv
