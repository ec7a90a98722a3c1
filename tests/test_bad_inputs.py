"""Every kind of bad input, on every verb, ends the same way: exit code 2, exactly one line on
stderr starting with `error:` that names the problem, no traceback, and nothing new on disk
(no output, no temporary file). One table drives the test; each row builds its bad input from
the tiny Qwen3-MoE of conftest (and its calibration and F32 GGUF), runs the CLI in-process
(in a subprocess for inputs that used to hang), and names the fragment the line must hold.
Below the table: the same inputs made valid still work, so the checks refuse only what is bad.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import REFERENCE, calibrated_tiny_qwen3moe

EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"
DOWN = "model.layers.0.mlp.experts.5.down_proj.weight"
DEL = object()  # config value meaning: remove the key
HANG_LIMIT_S = 120  # a row that takes longer hangs (the alias bomb and huge configs did)


@dataclass
class Env:
    """The module's valid inputs; rows derive bad ones from them inside their own folder."""

    model: pathlib.Path
    calib: pathlib.Path
    gguf: pathlib.Path
    text: pathlib.Path

    def model_with(self, w: pathlib.Path, config: dict | None = None, raw_config: bytes | None = None, files: dict[str, bytes] | None = None,
                   drop: tuple[str, ...] = (), tensors: dict[str, torch.Tensor] | None = None) -> pathlib.Path:
        """A copy of the tiny model (weights linked, not copied) with a changed config, files or tensors."""
        d = w / "model"
        d.mkdir()
        for f in self.model.iterdir():
            if f.name not in drop and f.name != "config.json" and not (tensors and f.name == "model.safetensors"):
                (d / f.name).symlink_to(f)
        cfg = json.loads((self.model / "config.json").read_text())
        for k, v in (config or {}).items():
            if v is DEL:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        if "config.json" not in drop:
            (d / "config.json").write_bytes(raw_config if raw_config is not None else json.dumps(cfg).encode())
        if tensors:
            t = load_file(self.model / "model.safetensors")
            t.update(tensors)
            save_file(t, d / "model.safetensors")
        for name, data in (files or {}).items():
            (d / name).unlink(missing_ok=True)
            (d / name).write_bytes(data)
        return d

    def calib_with(self, w: pathlib.Path, info: dict | None = None, raw_info: bytes | None = None, scores: bytes | None = None,
                   score_tensors: dict[str, torch.Tensor | None] | None = None, imatrix: bytes | None = None) -> pathlib.Path:
        """A copy of the calibration with a changed calib.json, scores or imatrix."""
        d = w / "calib"
        d.mkdir()
        for f in self.calib.iterdir():
            (d / f.name).symlink_to(f)
        if info is not None or raw_info is not None:
            cur = json.loads((self.calib / "calib.json").read_text())
            cur.update(info or {})
            (d / "calib.json").unlink()
            (d / "calib.json").write_bytes(raw_info if raw_info is not None else json.dumps(cur).encode())
        if scores is not None or score_tensors is not None:
            (d / "scores.safetensors").unlink()
            if scores is not None:
                (d / "scores.safetensors").write_bytes(scores)
            else:
                t = load_file(self.calib / "scores.safetensors")
                for k, v in score_tensors.items():
                    if v is None:
                        del t[k]
                    else:
                        t[k] = v
                save_file(t, d / "scores.safetensors")
        if imatrix is not None:
            (d / "imatrix.gguf").unlink()
            (d / "imatrix.gguf").write_bytes(imatrix)
        return d

    def file(self, w: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
        p = w / name
        p.write_bytes(data)
        return p

    def gguf_bytes(self, n: int | None = None) -> bytes:
        data = self.gguf.read_bytes()
        return data if n is None else data[:n]

    def recipe(self, w: pathlib.Path, mutate: Callable[[dict], None] | None = None, raw: bytes | None = None) -> pathlib.Path:
        cfg = json.loads((self.model / "config.json").read_text())
        keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_experts_per_tok", "norm_topk_prob", "tie_word_embeddings")
        numbers = {k: cfg[k] for k in keys} | {"num_experts": cfg.get("num_experts", cfg.get("num_local_experts"))}
        r = {
            "model": {"name": "tiny", "architecture": "Qwen3MoeForCausalLM", "path": str(self.model), "config": numbers},
            "calibration": {"texts": [str(self.text)], "tokens": 1024, "ctx": 64},
            "prune": {"method": "uniform", "ratio": 0.25, "layout": "llama.cpp"},
            "export": {"quant": "Q8_0"},
            "check": {"text": str(self.text), "ctx": 64, "chunks": 1},
        }
        if mutate is not None:
            mutate(r)
        p = w / "r.yaml"
        p.write_bytes(raw if raw is not None else yaml.safe_dump(r).encode())
        return p


@pytest.fixture(autouse=True)
def _quiet_and_cached(env: Env, monkeypatch) -> Iterator[None]:
    """Progress bars off (they are not error lines) and llama.cpp's per-machine cache outside
    the rows' folders (it is not an output of the verb)."""
    from moe2gguf.progress import silenced

    monkeypatch.setenv("MOE2GGUF_CACHE", str(env.text.parent / "cache"))
    with silenced():
        yield


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    from moe2gguf.exporter.export import export

    d = tmp_path_factory.mktemp("bad-inputs")
    model, calib = calibrated_tiny_qwen3moe(d, seed=0, tokens=1024, ctx=64)
    gguf_path = d / "tiny-f32.gguf"
    export(str(model), str(gguf_path), "F32", progress=False)
    return Env(model, calib, gguf_path, d / "calib.txt")


@dataclass
class Case:
    id: str
    build: Callable[[Env, pathlib.Path], list[str]]  # (env, the row's own folder) -> argv
    fragment: str  # must appear in the one error line
    stdin: bytes | None = None
    subprocess: bool = False  # inputs that used to hang run in a child with a timeout
    environ: dict[str, str] | None = None  # environment variables set for the row


def _set(path: str, value: object) -> Callable[[dict], None]:
    """Recipe mutation: set a dotted key (DEL removes it)."""

    def go(r: dict) -> None:
        *head, last = path.split(".")
        node = r
        for k in head:
            node = node[k]
        if value is DEL:
            node.pop(last, None)
        else:
            node[last] = value

    return go


ALIAS_BOMB = b"""\
a: &a [x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
model:
  name: bomb
  architecture: Qwen3MoeForCausalLM
  config: {hidden_size: 64, bomb: [*h, *h, *h, *h, *h, *h, *h, *h, *h]}
calibration: {texts: [t.txt]}
prune: {ratio: 0.25}
"""

NOT_UTF8 = b"caf\xe9 \xff\xfe text\n" * 50


def inspect_cfg(name: str, fragment: str, sub: bool = False, **config) -> Case:
    return Case(f"inspect-config-{name}", lambda E, w: ["inspect", str(E.model_with(w, config=config))], fragment, subprocess=sub)


def calibrate(E: Env, w: pathlib.Path, model: pathlib.Path | None = None, text: pathlib.Path | str | None = None, *extra: str) -> list[str]:
    return ["calibrate", str(model or E.model), "--text", str(text or E.text), "-o", str(w / "out"), "--tokens", "256", "--ctx", "64", *extra]


def prune(E: Env, w: pathlib.Path, *extra: str, model: pathlib.Path | None = None, calib: pathlib.Path | None = None) -> list[str]:
    return ["prune", str(model or E.model), "--calib", str(calib or E.calib), "-o", str(w / "out"), "--method", "uniform", *extra]


def export(E: Env, w: pathlib.Path, *extra: str, model: pathlib.Path | None = None) -> list[str]:
    return ["export", str(model or E.model), "-o", str(w / "out.gguf"), "--quant", "F32", *extra]


def check(E: Env, w: pathlib.Path, model: str | pathlib.Path | None = None, text: str | pathlib.Path | None = None, *extra: str) -> list[str]:
    return ["check", str(model or E.gguf), "--text", str(text or E.text), "--ctx", "64", "--chunks", "1", "--json", str(w / "report.json"), *extra]


def run(E: Env, w: pathlib.Path, recipe: pathlib.Path, *extra: str) -> list[str]:
    return ["run", "--recipe", str(recipe), "-o", str(w / "run"), "--quiet", *extra]


def chat(E: Env, w: pathlib.Path, *extra: str, gguf: str | pathlib.Path | None = None) -> list[str]:
    return ["chat", str(gguf or E.gguf), "--temperature", "0", "--max-tokens", "4", "--ctx", "64", *extra]


CASES: list[Case] = [
    # --- config.json: encoding, JSON shape, types, ranges, absurd sizes -----------------------------
    Case("inspect-config-not-utf8", lambda E, w: ["inspect", str(E.model_with(w, raw_config=b'{"hidden_size": "\xff\xfe"}'))], "is not UTF-8"),
    Case("inspect-config-not-json", lambda E, w: ["inspect", str(E.model_with(w, raw_config=b'{"hidden_size": 64,'))], "is not valid JSON"),
    Case("inspect-config-json-list", lambda E, w: ["inspect", str(E.model_with(w, raw_config=b"[1, 2, 3]"))], "holds a JSON list"),
    Case("inspect-config-json-string", lambda E, w: ["inspect", str(E.model_with(w, raw_config=b'"qwen"'))], "holds a JSON string"),
    Case("inspect-config-nested-bomb", lambda E, w: ["inspect", str(E.model_with(w, raw_config=b"[" * 100000 + b"]" * 100000))], "nested too deeply"),
    Case("inspect-config-is-folder", lambda E, w: ["inspect", str(_config_folder(E, w))], "is a folder, not a regular file"),
    Case("inspect-config-missing", lambda E, w: ["inspect", str(E.model_with(w, drop=("config.json",)))], "has no config.json"),
    inspect_cfg("hidden-text", "hidden_size = \"256\" is not a whole number", hidden_size="256"),
    inspect_cfg("hidden-float", "hidden_size = 64.0 is not a whole number", hidden_size=64.0),
    inspect_cfg("hidden-bool", "hidden_size = true is not a whole number", hidden_size=True),
    inspect_cfg("hidden-zero", "hidden_size = 0 is below 1", hidden_size=0),
    inspect_cfg("layers-negative", "num_hidden_layers = -1 is below 1", num_hidden_layers=-1),
    inspect_cfg("heads-zero", "num_attention_heads = 0 is below 1", num_attention_heads=0),
    inspect_cfg("width-negative", "moe_intermediate_size = -32 is below 1", moe_intermediate_size=-32),
    inspect_cfg("vocab-text", "vocab_size = \"4096\" is not a whole number", vocab_size="4096"),
    inspect_cfg("topk-zero", "num_experts_per_tok = 0 is below 1", num_experts_per_tok=0),
    inspect_cfg("topk-above-experts", "num_experts_per_tok = 9 exceeds the 8 routed experts", num_experts_per_tok=9),
    inspect_cfg("experts-negative", "num_local_experts = -8 is below 0", num_local_experts=-8),
    inspect_cfg("sparse-step-zero", "decoder_sparse_step = 0 is below 1", decoder_sparse_step=0),
    inspect_cfg("head-dim-fraction", "head_dim = 2.5 is not a whole number", head_dim=2.5),
    inspect_cfg("50M-experts", "num_local_experts = 50,000,000", num_local_experts=50_000_000),
    inspect_cfg("10M-layers", "num_hidden_layers = 10,000,000", num_hidden_layers=10_000_000),
    inspect_cfg("hidden-1e9", "hidden_size = 1,000,000,000", hidden_size=10**9),
    inspect_cfg("expert-matrices", "= 65,536 experts in all, more than moe2gguf plans for", num_local_experts=4096, num_hidden_layers=16),
    inspect_cfg("experts-per-layer", "num_local_experts = 65,536 is beyond what moe2gguf plans for", num_local_experts=65536),
    inspect_cfg("params", "parameters, more than moe2gguf plans for", hidden_size=2**19, moe_intermediate_size=2**20),
    inspect_cfg("experts-beyond-files", "implies 6,000 routed-expert tensors", num_local_experts=1000),
    inspect_cfg("expert-missing", "lacks tensor model.layers.0.mlp.experts.8.", num_local_experts=9),
    inspect_cfg("mlp-only-layers-text", "does not load as transformers' Qwen3MoeConfig", mlp_only_layers="0"),
    inspect_cfg("architectures-text", "architectures (a list of class names)", architectures="Qwen3MoeForCausalLM"),
    inspect_cfg("unknown-arch", "unsupported architecture", architectures=["FancyMoe"], model_type="fancy"),
    inspect_cfg("dense", "no routed experts (a dense model)", num_local_experts=0),
    inspect_cfg("pruned-widths-damaged", "moe2gguf_expert_widths is not 2 lists", moe2gguf_expert_widths=[[32] * 8, "x"]),
    # --- shard index and weight files ---------------------------------------------------------
    Case("inspect-index-not-json", lambda E, w: ["inspect", str(E.model_with(w, files={"model.safetensors.index.json": b"{nope"}))], "shard index"),
    Case("inspect-index-no-weight-map", lambda E, w: ["inspect", str(E.model_with(w, files={"model.safetensors.index.json": b'{"metadata": {}}'}))], "has no weight_map"),
    Case("inspect-index-missing-shard", lambda E, w: ["inspect", str(E.model_with(w, files={"model.safetensors.index.json": json.dumps({"weight_map": {"lm_head.weight": "model-00002.safetensors"}}).encode()}))], "which is missing"),
    Case("inspect-index-escapes-folder", lambda E, w: ["inspect", str(E.model_with(w, files={"model.safetensors.index.json": json.dumps({"weight_map": {"lm_head.weight": "../model.safetensors"}}).encode()}))], "not a .safetensors file name"),
    Case("inspect-weights-truncated", lambda E, w: ["inspect", str(E.model_with(w, files={"model.safetensors": (E.model / "model.safetensors").read_bytes()[:5000]}))], "truncated or corrupt"),
    Case("inspect-weights-junk", lambda E, w: ["inspect", str(E.model_with(w, files={"model.safetensors": b"\x00" * 64}))], "truncated or corrupt"),
    Case("inspect-int-expert-tensor", lambda E, w: ["inspect", str(E.model_with(w, tensors={EXPERT: torch.zeros(32, 64, dtype=torch.int32)}))], f"{EXPERT} is stored as I32, not as floats"),
    Case("inspect-model-missing", lambda E, w: ["inspect", str(w / "nope")], "is not a folder"),
    # --- weights that are NaN/Inf: caught as they stream by, naming the tensor -------------------
    Case("calibrate-nan-weight", lambda E, w: calibrate(E, w, _nan_model(E, w, float("nan"))), f"{EXPERT} holds NaN or Inf"),
    Case("calibrate-inf-weight", lambda E, w: calibrate(E, w, _nan_model(E, w, float("inf"))), f"{EXPERT} holds NaN or Inf"),
    Case("prune-nan-weight", lambda E, w: prune(E, w, "--ratio", "0.25", model=_nan_model(E, w, float("nan"))), f"{EXPERT} holds NaN or Inf"),
    Case("export-nan-weight", lambda E, w: export(E, w, model=_nan_model(E, w, float("nan"))), f"{EXPERT} holds NaN or Inf"),
    Case("export-inf-embedding", lambda E, w: export(E, w, model=E.model_with(w, tensors={"model.embed_tokens.weight": _poisoned("model.embed_tokens.weight", E, float("-inf"))})), "model.embed_tokens.weight holds NaN or Inf"),
    # --- calibrate: texts, tokenizer, numbers -------------------------------------------------
    Case("calibrate-no-weights", lambda E, w: calibrate(E, w, E.model_with(w, drop=("model.safetensors",))), "has no *.safetensors"),
    Case("calibrate-text-dev-zero", lambda E, w: calibrate(E, w, text="/dev/zero"), "/dev/zero is a device, not a regular file"),
    Case("calibrate-text-fifo", lambda E, w: calibrate(E, w, text=_fifo(w)), "is a pipe, not a regular file"),
    Case("calibrate-text-not-utf8", lambda E, w: calibrate(E, w, text=E.file(w, "t.txt", NOT_UTF8)), "is not UTF-8 text"),
    Case("calibrate-text-missing", lambda E, w: calibrate(E, w, text=w / "nope.txt"), "does not exist"),
    Case("calibrate-text-empty", lambda E, w: calibrate(E, w, text=E.file(w, "t.txt", b"")), "has 0 tokens"),
    Case("calibrate-no-tokenizer", lambda E, w: calibrate(E, w, E.model_with(w, drop=("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))), "has no tokenizer"),
    Case("calibrate-tokenizer-not-json", lambda E, w: calibrate(E, w, E.model_with(w, files={"tokenizer.json": b'{"model": '})), "tokenizer file"),
    Case("calibrate-tokenizer-list", lambda E, w: calibrate(E, w, E.model_with(w, files={"tokenizer.json": b"[]"})), "holds a JSON list"),
    Case("calibrate-tokenizer-bad-vocab", lambda E, w: calibrate(E, w, E.model_with(w, files={"tokenizer.json": b'{"model": {"type": "BPE", "vocab": ["a"]}}'})), "model.vocab is not a mapping"),
    Case("calibrate-tokenizer-unloadable", lambda E, w: calibrate(E, w, E.model_with(w, files={"tokenizer.json": b'{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": 7}}'})), "the tokenizer files do not load"),
    Case("calibrate-tokens-zero", lambda E, w: calibrate(E, w, None, None, "--tokens", "0"), "--tokens"),
    Case("calibrate-tokens-negative", lambda E, w: calibrate(E, w, None, None, "--tokens", "-5"), "--tokens"),
    Case("calibrate-tokens-huge", lambda E, w: calibrate(E, w, None, None, "--tokens", str(10**12)), "for the hidden states"),
    Case("calibrate-tokens-not-number", lambda E, w: calibrate(E, w, None, None, "--tokens", "lots"), "--tokens"),
    Case("calibrate-ctx-one", lambda E, w: calibrate(E, w, None, None, "--ctx", "1"), "--ctx"),
    Case("calibrate-ctx-beyond-model", lambda E, w: calibrate(E, w, None, None, "--ctx", "100000"), "max_position_embeddings"),
    Case("calibrate-config-topk-zero", lambda E, w: calibrate(E, w, E.model_with(w, config={"num_experts_per_tok": 0})), "num_experts_per_tok = 0 is below 1"),
    Case("calibrate-config-string-size", lambda E, w: calibrate(E, w, E.model_with(w, config={"num_hidden_layers": "2"})), "num_hidden_layers = \"2\" is not a whole number"),
    # --- prune: options, CALIB folder ---------------------------------------------------------
    Case("prune-probe-negative", lambda E, w: prune(E, w, "--ratio", "0.25", "--probe", "-3"), "--probe"),
    Case("prune-probe-huge", lambda E, w: prune(E, w, "--ratio", "0.25", "--probe", "100000"), "--probe"),
    Case("prune-min-width-negative", lambda E, w: prune(E, w, "--ratio", "0.25", "--min-width", "-5"), "--min-width"),
    Case("prune-min-width-too-wide", lambda E, w: ["prune", str(E.model), "--calib", str(E.calib), "-o", str(w / "out"), "--ratio", "0.25", "--min-width", "1000"], "wider than the experts themselves"),
    Case("prune-ratio-zero", lambda E, w: prune(E, w, "--ratio", "0"), "--ratio"),
    Case("prune-ratio-above-one", lambda E, w: prune(E, w, "--ratio", "1.5"), "--ratio"),
    Case("prune-ratio-nan", lambda E, w: prune(E, w, "--ratio", "nan"), "not a finite number"),
    Case("prune-ratio-text", lambda E, w: prune(E, w, "--ratio", "half"), "--ratio"),
    Case("prune-width-zero", lambda E, w: prune(E, w, "--ratio", "0.25", "--width", "0"), "--width"),
    Case("prune-experts-negative", lambda E, w: prune(E, w, "--ratio", "0.25", "--experts", "-1"), "--experts"),
    Case("prune-target-size-overflow", lambda E, w: ["prune", str(E.model), "--calib", str(E.calib), "-o", str(w / "out"), "--target-size", "9" * 400 + "TB"], "not a size between"),
    Case("prune-target-size-zero", lambda E, w: ["prune", str(E.model), "--calib", str(E.calib), "-o", str(w / "out"), "--target-size", "0"], "not a size between"),
    Case("prune-calib-missing", lambda E, w: prune(E, w, "--ratio", "0.25", calib=w / "nope"), "is not a calibration folder"),
    Case("prune-calib-json-truncated", lambda E, w: prune(E, w, "--ratio", "0.25", calib=E.calib_with(w, raw_info=(E.calib / "calib.json").read_bytes()[:40])), "is not valid JSON"),
    Case("prune-calib-json-list", lambda E, w: prune(E, w, "--ratio", "0.25", calib=E.calib_with(w, raw_info=b"[]")), "holds a JSON list"),
    Case("prune-calib-json-not-utf8", lambda E, w: prune(E, w, "--ratio", "0.25", calib=E.calib_with(w, raw_info=NOT_UTF8)), "is not UTF-8"),
    Case("prune-calib-json-string-layers", lambda E, w: prune(E, w, "--ratio", "0.25", calib=E.calib_with(w, info={"n_layers": "2"})), 'n_layers is "2", expected a whole number'),
    Case("prune-calib-json-no-texts", lambda E, w: prune(E, w, "--ratio", "0.25", calib=E.calib_with(w, info={"texts": None})), "texts is null, expected a list"),
    Case("prune-calib-json-zero-tokens", lambda E, w: prune(E, w, "--ratio", "0.25", calib=E.calib_with(w, info={"tokens": 0})), "out of range"),
    Case("prune-calib-other-model", lambda E, w: prune(E, w, "--ratio", "0.25", calib=E.calib_with(w, info={"hidden_size": 128})), "was calibrated on another model"),
    Case("prune-scores-truncated", lambda E, w: prune(E, w, "--ratio", "0.25", calib=E.calib_with(w, scores=(E.calib / "scores.safetensors").read_bytes()[:3000])), "scores.safetensors is truncated or corrupt"),
    Case("prune-scores-missing-tensor", lambda E, w: prune(E, w, "--ratio", "0.25", calib=E.calib_with(w, score_tensors={"layers.1.mass": None})), "scores of layer 1 (mass)"),
    Case("prune-scores-nan", lambda E, w: prune(E, w, "--ratio", "0.25", calib=E.calib_with(w, score_tensors={"layers.0.sq_act": torch.full((8, 32), float("nan"), dtype=torch.float64)})), "layers.0.sq_act holds NaN/Inf"),
    # --- export: --imatrix (CALIB or GGUF), tokenizer, quant, prune report ------------------------
    Case("export-imatrix-truncated", lambda E, w: export(E, w, "--imatrix", str(E.calib_with(w, imatrix=(E.calib / "imatrix.gguf").read_bytes()[:2000]))), "is truncated or not a GGUF file"),
    Case("export-imatrix-junk", lambda E, w: export(E, w, "--imatrix", str(E.file(w, "im.gguf", b"GGUF" + os.urandom(200)))), "is truncated or not a GGUF file"),
    Case("export-imatrix-is-model", lambda E, w: export(E, w, "--imatrix", str(E.gguf)), "not an importance matrix"),
    Case("export-imatrix-calib-json-bad", lambda E, w: export(E, w, "--imatrix", str(E.calib_with(w, raw_info=b'{"n_layers": '))), "calibration record"),
    Case("export-imatrix-calib-json-types", lambda E, w: export(E, w, "--imatrix", str(E.calib_with(w, info={"hidden_size": [64]}))), "hidden_size is [64], expected a whole number"),
    Case("export-imatrix-missing", lambda E, w: export(E, w, "--imatrix", str(w / "nope")), "no imatrix.gguf found"),
    Case("export-tokenizer-not-json", lambda E, w: export(E, w, model=E.model_with(w, files={"tokenizer.json": b"\x00\x01"})), "tokenizer file"),
    Case("export-tokenizer-bad-added", lambda E, w: export(E, w, model=E.model_with(w, files={"tokenizer.json": json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}, "added_tokens": [{"id": "x"}]}).encode()})), "added_tokens is not a list"),
    Case("export-tensor-type-bad-regex", lambda E, w: export(E, w, "--tensor-type", "ffn_(=Q8_0"), "not a valid regular expression"),
    Case("export-tensor-type-unknown", lambda E, w: export(E, w, "--tensor-type", "ffn_down=Q9_Z"), "unknown tensor type 'Q9_Z'"),
    Case("export-tensor-type-no-equals", lambda E, w: export(E, w, "--tensor-type", "ffn_down"), "must look like REGEX=TYPE"),
    Case("export-unknown-quant", lambda E, w: ["export", str(E.model), "-o", str(w / "out.gguf"), "--quant", "Q9_X"], "unknown --quant"),
    Case("export-prune-report-damaged", lambda E, w: ["export", str(E.model_with(w, files={"prune_report.json": b'{"tensor_types": '})), "-o", str(w / "out.gguf")], "prune report"),
    Case("export-config-string-size", lambda E, w: export(E, w, model=E.model_with(w, config={"hidden_size": "64"})), 'hidden_size = "64" is not a whole number'),
    # --- check: the GGUF (and --base), the text, numbers --------------------------------------
    Case("check-gguf-truncated", lambda E, w: check(E, w, E.file(w, "m.gguf", E.gguf_bytes(E.gguf.stat().st_size // 2))), "truncated"),
    Case("check-gguf-header-only", lambda E, w: check(E, w, E.file(w, "m.gguf", E.gguf_bytes(64))), "truncated or corrupt GGUF"),
    Case("check-gguf-junk", lambda E, w: check(E, w, E.file(w, "m.gguf", b"GGUF" + os.urandom(4000))), "truncated or corrupt GGUF"),
    Case("check-gguf-is-imatrix", lambda E, w: check(E, w, E.calib / "imatrix.gguf"), "is an importance matrix, not a model"),
    Case("check-base-truncated", lambda E, w: check(E, w, None, None, "--base", str(E.file(w, "b.gguf", E.gguf_bytes(E.gguf.stat().st_size - 100)))), "truncated"),
    Case("check-base-junk", lambda E, w: check(E, w, None, None, "--base", str(E.file(w, "b.bin", b"not a model"))), "neither a GGUF file nor a checkpoint folder"),
    Case("check-base-missing", lambda E, w: check(E, w, None, None, "--base", str(w / "nope.gguf")), "does not exist"),
    Case("check-model-dev-null", lambda E, w: check(E, w, "/dev/null"), "/dev/null is a device"),
    Case("check-text-dev-zero", lambda E, w: check(E, w, None, "/dev/zero"), "/dev/zero is a device, not a regular file"),
    Case("check-text-not-utf8", lambda E, w: check(E, w, None, E.file(w, "t.txt", NOT_UTF8)), "is not UTF-8 text"),
    Case("check-text-missing", lambda E, w: check(E, w, None, w / "nope.txt"), "does not exist"),
    Case("check-ctx-three", lambda E, w: check(E, w, None, None, "--ctx", "3"), "--ctx"),
    Case("check-ctx-huge", lambda E, w: check(E, w, None, None, "--ctx", str(10**8)), "--ctx"),
    Case("check-chunks-zero", lambda E, w: check(E, w, None, None, "--chunks", "0"), "--chunks"),
    Case("check-threads-negative", lambda E, w: check(E, w, None, None, "--threads", "-1"), "--threads"),
    Case("check-folder-no-tokenizer", lambda E, w: check(E, w, E.model_with(w, drop=("tokenizer.json",))), "has no tokenizer"),
    Case("check-folder-bad-config", lambda E, w: check(E, w, E.model_with(w, raw_config=b"[]")), "holds a JSON list"),
    # --- run: the recipe (YAML, names, every step's settings) and its run folder ------------------
    Case("run-alias-bomb", lambda E, w: ["run", "--recipe", str(E.recipe(w, raw=ALIAS_BOMB)), "--dry-run"], "more than 32 aliases", subprocess=True),
    Case("run-dry-50M-experts", lambda E, w: ["run", "--recipe", str(E.recipe(w, _set("model.config.num_experts", 50_000_000))), "--dry-run"], "num_experts = 50,000,000"),
    Case("run-dry-10M-layers", lambda E, w: ["run", "--recipe", str(E.recipe(w, _set("model.config.num_hidden_layers", 10_000_000))), "--dry-run"], "num_hidden_layers = 10,000,000"),
    Case("run-name-dotdot", lambda E, w: run(E, w, E.recipe(w, _set("model.name", "../../../x"))), "not a plain folder name"),
    Case("run-name-absolute", lambda E, w: run(E, w, E.recipe(w, _set("model.name", "/tmp/x"))), "not a plain folder name"),
    Case("run-name-separator", lambda E, w: run(E, w, E.recipe(w, _set("model.name", "a/b"))), "not a plain folder name"),
    Case("run-name-dot", lambda E, w: run(E, w, E.recipe(w, _set("model.name", "."))), "not a plain folder name"),
    Case("run-quant-unknown", lambda E, w: run(E, w, E.recipe(w, _set("export.quant", "Q9_X"))), "export.quant: unknown 'Q9_X'"),
    Case("run-override-bad-regex", lambda E, w: run(E, w, E.recipe(w, _set("export.overrides", {"ffn_(": "Q8_0"}))), "not a valid regular expression"),
    Case("run-override-bad-type", lambda E, w: run(E, w, E.recipe(w, _set("export.overrides", {"ffn_down": "Q9_Z"}))), "unknown tensor type 'Q9_Z'"),
    Case("run-ragged-export", lambda E, w: run(E, w, E.recipe(w, lambda r: r["prune"].update(method="coverage", layout="ragged"))), "use layout: llama.cpp"),
    Case("run-check-text-missing", lambda E, w: run(E, w, E.recipe(w, _set("check.text", str(w / "nope.txt")))), "check.text"),
    Case("run-check-text-absent", lambda E, w: run(E, w, E.recipe(w, _set("check.text", DEL))), "has no check.text"),
    Case("run-check-task-missing", lambda E, w: run(E, w, E.recipe(w, _set("check.task", str(w / "nope.txt")))), "check.task"),
    Case("run-calib-text-missing", lambda E, w: run(E, w, E.recipe(w, _set("calibration.texts", [str(w / "nope.txt")]))), "calibration text"),
    Case("run-calib-text-device", lambda E, w: run(E, w, E.recipe(w, _set("calibration.texts", ["/dev/zero"]))), "is a device"),
    Case("run-check-ctx-odd", lambda E, w: run(E, w, E.recipe(w, _set("check.ctx", 63))), "multiple of 2"),
    Case("run-target-size-overflow", lambda E, w: run(E, w, E.recipe(w, lambda r: r["prune"].update(ratio=None, target_size="9" * 400))), "not a size between"),
    Case("run-topk-zero", lambda E, w: run(E, w, E.recipe(w, _set("model.config.num_experts_per_tok", 0))), "num_experts_per_tok = 0 is below 1"),
    Case("run-source-key", lambda E, w: run(E, w, E.recipe(w, _set("source", "x"))), "unknown key 'source'"),
    Case("run-recipe-not-utf8", lambda E, w: run(E, w, E.recipe(w, raw=b"model: \xff\xfe\n")), "is not UTF-8"),
    Case("run-recipe-dev-zero", lambda E, w: run(E, w, pathlib.Path("/dev/zero")), "is a device"),
    Case("run-recipe-huge", lambda E, w: run(E, w, E.recipe(w, raw=b"# " + b"x" * (2 << 20) + b"\n")), "more than the 1,048,576"),
    Case("run-recipe-nested", lambda E, w: run(E, w, E.recipe(w, raw=b"a: " + b"[" * 50000 + b"]" * 50000 + b"\n")), "recipe"),
    Case("run-recipe-list", lambda E, w: run(E, w, E.recipe(w, raw=b"- a\n- b\n")), "must be a YAML mapping"),
    Case("run-recipe-python-tag", lambda E, w: run(E, w, E.recipe(w, raw=b"model: !!python/object/apply:os.system ['true']\n")), "is not valid YAML"),
    Case("run-state-not-json", lambda E, w: run(E, w, _with_state(E, w, b"{oops")), "run record"),
    Case("run-state-list", lambda E, w: run(E, w, _with_state(E, w, b"[]")), "holds a JSON list"),
    Case("run-state-bad-values", lambda E, w: run(E, w, _with_state(E, w, b'{"calibrate": 5}')), "has no fingerprint text"),
    # --- chat: the GGUF, numbers, and what comes on stdin -------------------------------------
    Case("chat-stdin-not-utf8", lambda E, w: chat(E, w), "input line 1 is not UTF-8", stdin=b"caf\xe9\n"),
    Case("chat-line-beyond-ctx", lambda E, w: chat(E, w), "input line 2 has", stdin=b"hello\n" + b"word " * 500 + b"\n"),
    Case("chat-stdin-no-newlines", lambda E, w: chat(E, w), "longer than 1,048,576 bytes", stdin=b"\x00" * (3 << 20)),
    Case("chat-max-tokens-zero", lambda E, w: chat(E, w, "--max-tokens", "0"), "--max-tokens", stdin=b""),
    Case("chat-max-tokens-fills-ctx", lambda E, w: chat(E, w, "--max-tokens", "64"), "leaves no room", stdin=b""),
    Case("chat-ctx-tiny", lambda E, w: chat(E, w, "--ctx", "4"), "--ctx", stdin=b""),
    Case("chat-temperature-nan", lambda E, w: chat(E, w, "--temperature", "nan"), "not a finite number", stdin=b""),
    Case("chat-temperature-negative", lambda E, w: chat(E, w, "--temperature", "-1"), "--temperature", stdin=b""),
    Case("chat-system-not-utf8", lambda E, w: chat(E, w, "--system", b"caf\xe9".decode("utf-8", "surrogateescape")), "--system is not UTF-8", stdin=b""),
    Case("chat-seed-negative", lambda E, w: chat(E, w, "--seed", "-1"), "--seed", stdin=b""),
    Case("chat-gguf-truncated", lambda E, w: chat(E, w, gguf=E.file(w, "m.gguf", E.gguf_bytes(300))), "truncated", stdin=b""),
    Case("chat-gguf-dev-null", lambda E, w: chat(E, w, gguf="/dev/null"), "/dev/null is a device", stdin=b""),
    Case("chat-gguf-not-gguf", lambda E, w: chat(E, w, gguf=E.file(w, "m.gguf", b"hello")), "is not a GGUF file", stdin=b""),
    # --- found by an independent sweep: shards and shapes that disagree, a tokenizer of another model --
    Case("inspect-shards-duplicate-tensor", lambda E, w: ["inspect", str(_duplicate_shards(E, w))], "is stored in both model-00001-of-00002"),
    Case("export-shards-duplicate-tensor", lambda E, w: export(E, w, model=_duplicate_shards(E, w)), "is stored in both"),
    Case("inspect-expert-shape-wrong", lambda E, w: ["inspect", str(E.model_with(w, tensors={EXPERT: torch.zeros(16, 64)}))], "has shape (16, 64), config implies (32, 64)"),
    Case("prune-expert-shape-wrong", lambda E, w: prune(E, w, "--ratio", "0.25", model=E.model_with(w, tensors={EXPERT: torch.zeros(16, 64)})), "config implies (32, 64)"),
    Case("prune-expert-down-shape-wrong", lambda E, w: prune(E, w, "--ratio", "0.25", model=E.model_with(w, tensors={DOWN: torch.zeros(64, 16)})), "config implies (64, 32)"),
    Case("calibrate-tokenizer-beyond-vocab", lambda E, w: calibrate(E, w, _small_vocab(E, w)), "the tokenizer gives token id"),
    Case("check-tokenizer-beyond-vocab", lambda E, w: check(E, w, _small_vocab(E, w)), "the tokenizer gives token id"),
    # a run refused at its first step leaves no run folder behind (not even the claimed, empty one)
    Case("run-tokenizer-beyond-vocab", lambda E, w: run(E, w, E.recipe(w), "--model", str(_small_vocab(E, w))), "the tokenizer gives token id"),
    # --- found by a second independent sweep (paths, tensors and options the rows above miss) ---
    Case("check-json-empty-path", lambda E, w: check(E, w, None, None, "--json", ""), "--json is an empty path"),
    inspect_cfg("hidden-act-unknown", 'hidden_act = "frobnicate" is not an activation', hidden_act="frobnicate"),
    Case("calibrate-hidden-act-unknown", lambda E, w: calibrate(E, w, E.model_with(w, config={"hidden_act": "frobnicate"})), "is not an activation transformers knows"),
    inspect_cfg("rms-eps-negative", "rms_norm_eps = -1.0 is not a positive number", rms_norm_eps=-1.0),
    inspect_cfg("rope-theta-zero", "rope_theta = 0 is not a positive number", rope_theta=0),
    inspect_cfg("rope-parameters-theta-negative", "rope_parameters.rope_theta = -10000.0 is not a positive number",
                rope_parameters={"rope_type": "default", "rope_theta": -10000.0}),
    inspect_cfg("eos-beyond-vocab", "eos_token_id = 999999 is outside the vocabulary (0..4095)", eos_token_id=999999),
    Case("export-eos-list-beyond-vocab", lambda E, w: export(E, w, model=E.model_with(w, config={"eos_token_id": [2, 4096]})), "eos_token_id = 4096 is outside"),
    Case("export-chat-template-int", lambda E, w: export(E, w, model=E.model_with(w, files={"tokenizer_config.json": b'{"chat_template": 5}'}, drop=("chat_template.jinja",))),
         "chat_template is neither text nor a list"),
    Case("export-chat-template-list-bad", lambda E, w: export(E, w, model=E.model_with(w, files={"tokenizer_config.json": b'{"chat_template": [{"name": 5, "template": "x"}]}'},
                                                                        drop=("chat_template.jinja",))), "chat_template is neither text nor a list"),
    Case("export-chat-template-syntax-error", lambda E, w: export(E, w, model=E.model_with(w, files={"chat_template.jinja": b"{% for m in messages %}{{ m.content }}"})),
         "is not valid Jinja (line 1: Unexpected end of template"),
    Case("export-chat-template-list-syntax-error", lambda E, w: export(E, w, model=E.model_with(w, files={"tokenizer_config.json": b'{"chat_template": [{"name": "tool_use", "template": "{{ x"}]}'},
                                                                          drop=("chat_template.jinja",))), "chat_template (tool_use) is not valid Jinja"),
    Case("export-chat-template-not-utf8", lambda E, w: export(E, w, model=E.model_with(w, files={"chat_template.jinja": b"\xff\xfe{{ x }}"})), "chat template"),
    Case("calibrate-chat-template-not-utf8", lambda E, w: calibrate(E, w, E.model_with(w, files={"chat_template.jinja": b"\xff\xfe{{ x }}"})), "is not UTF-8"),
    Case("export-tokenizer-config-list", lambda E, w: export(E, w, model=E.model_with(w, files={"tokenizer_config.json": b"[]"})), "holds a JSON list"),
    Case("export-tokenizer-merges-bad", lambda E, w: export(E, w, model=E.model_with(w, files={"tokenizer.json": _tokenizer_with(E, merges=[5, 6])})),
         "the tokenizer's merges, special tokens or chat template do not read"),
    Case("export-tokenizer-duplicate-ids", lambda E, w: export(E, w, model=E.model_with(w, files={"tokenizer.json": _tokenizer_with(E, dup=True)})),
         "gives the same id to two tokens"),
    Case("run-tokens-bool", lambda E, w: ["run", "--recipe", str(E.recipe(w, _set("calibration.tokens", True))), "--dry-run"], "calibration.tokens: Input should be a valid integer"),
    Case("run-ratio-text", lambda E, w: ["run", "--recipe", str(E.recipe(w, _set("prune.ratio", "0.5"))), "--dry-run"], "prune.ratio: Input should be a valid number"),
    Case("prune-width-with-uniform", lambda E, w: prune(E, w, "--ratio", "0.25", "--width", str(10**9)), "--width 1000000000 applies to --method coverage"),
    Case("prune-experts-with-ragged", lambda E, w: ["prune", str(E.model), "--calib", str(E.calib), "-o", str(w / "out"), "--ratio", "0.25",
                                                    "--layout", "ragged", "--experts", "1"], "--experts 1 applies to --method coverage"),
    Case("chat-conversation-outgrows-ctx", lambda E, w: chat(E, w), "the conversation has outgrown --ctx 64", stdin=b"hi\n" * 30),
    Case("chat-template-raises", lambda E, w: chat(E, w, gguf=_gguf_with_template(E, w, b"{{ raise_exception('no system role') }}")),
         "the GGUF's chat template fails on this conversation (no system role)", stdin=b"hi\n"),
    Case("chat-template-undefined", lambda E, w: chat(E, w, gguf=_gguf_with_template(E, w, b"{{ messages[0].nope.deeper }}")),
         "the GGUF's chat template fails on this conversation", stdin=b"hi\n"),
    Case("check-threads-beyond-cpus", lambda E, w: check(E, w, None, None, "--threads", str((os.cpu_count() or 1) + 1)), "more than the"),
    Case("check-gguf-unknown-architecture", lambda E, w: check(E, w, _gguf_of_arch(w, "frobnicate")), "llama.cpp could not load"),
    Case("chat-gguf-unknown-architecture", lambda E, w: chat(E, w, gguf=_gguf_of_arch(w, "frobnicate")), "llama.cpp could not load", stdin=b"hi\n"),
    Case("check-base-cache-unusable", lambda E, w: check(E, w, None, None, "--base", str(E.gguf)), "cannot use the cache folder /dev/null",
         environ={"MOE2GGUF_CACHE": "/dev/null"}),
    Case("run-check-ctx-huge", lambda E, w: run(E, w, E.recipe(w, _set("check.ctx", 2**31))), "check.ctx: Input should be less than or equal to 1048576"),
    Case("check-task-fifo", lambda E, w: ["check", str(E.gguf), "--task", str(_fifo(w))], "is a pipe, not a regular file"),
    Case("check-task-dev-zero", lambda E, w: ["check", str(E.gguf), "--task", "/dev/zero"], "/dev/zero is a device"),
    Case("export-prune-map-junk", lambda E, w: export(E, w, "--imatrix", str(E.calib), model=_pruned_with_map(E, w, b"junk" * 10)), "prune_map.safetensors is damaged"),
    Case("export-prune-map-key-missing", lambda E, w: export(E, w, "--imatrix", str(E.calib), model=_pruned_with_map(E, w, drop_channels=True)), "prune_map.safetensors is damaged"),
    Case("inspect-weights-fifo", lambda E, w: ["inspect", str(_weights_fifo(E, w))], "model.safetensors is a pipe, not a regular file", subprocess=True),
    Case("prune-scores-negative", lambda E, w: prune(E, w, "--ratio", "0.25", calib=E.calib_with(w, score_tensors={"layers.0.sq_act": -torch.ones(8, 32, dtype=torch.float64)})),
         "layers.0.sq_act holds NaN/Inf, negative"),
    Case("prune-attention-tensor-missing", lambda E, w: prune(E, w, "--ratio", "0.25", model=_lacking(E, w, "model.layers.0.self_attn.q_proj.weight")),
         "lacks tensor model.layers.0.self_attn.q_proj.weight"),
]


def _config_folder(E: Env, w: pathlib.Path) -> pathlib.Path:
    d = E.model_with(w, drop=("config.json",))
    (d / "config.json").mkdir()
    return d


def _poisoned(name: str, E: Env, value: float) -> torch.Tensor:
    t = load_file(E.model / "model.safetensors")[name].clone()
    t.view(-1)[t.numel() // 2] = value
    return t


def _nan_model(E: Env, w: pathlib.Path, value: float) -> pathlib.Path:
    return E.model_with(w, tensors={EXPERT: _poisoned(EXPERT, E, value)})


def _duplicate_shards(E: Env, w: pathlib.Path) -> pathlib.Path:
    """Two shards without an index, the last tensor of the first stored again in the second."""
    from safetensors.torch import save

    t = load_file(E.model / "model.safetensors")
    names = sorted(t)
    first, second = names[: len(names) // 2], names[len(names) // 2 - 1 :]
    return E.model_with(w, drop=("model.safetensors",), files={
        "model-00001-of-00002.safetensors": save({k: t[k] for k in first}),
        "model-00002-of-00002.safetensors": save({k: t[k] for k in second}),
    })


def _tokenizer_with(E: Env, merges: list | None = None, dup: bool = False) -> bytes:
    """The tiny model's tokenizer.json with its merges replaced, or one id given to two tokens."""
    tok = json.loads((E.model / "tokenizer.json").read_text())
    if merges is not None:
        tok["model"]["merges"] = merges
    if dup:
        vocab = tok["model"]["vocab"]
        vocab[list(vocab)[10]] = 11
    return json.dumps(tok).encode()


def _gguf_with_template(E: Env, w: pathlib.Path, template: bytes) -> pathlib.Path:
    """The tiny model as an F32 GGUF whose chat template is `template`."""
    from moe2gguf.exporter.export import export as write_gguf

    out = w / "t.gguf"
    write_gguf(str(E.model_with(w, files={"chat_template.jinja": template})), str(out), "F32", progress=False)
    return out


def _gguf_of_arch(w: pathlib.Path, arch: str) -> pathlib.Path:
    """A well-formed GGUF (one tensor) of an architecture llama.cpp does not know."""
    import gguf
    import numpy as np

    out = w / "arch.gguf"
    g = gguf.GGUFWriter(str(out), arch)
    g.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return out


def _pruned_with_map(E: Env, w: pathlib.Path, raw: bytes | None = None, drop_channels: bool = False) -> pathlib.Path:
    """The tiny model pruned (uniform, 25 %), its prune_map.safetensors replaced by `raw` or
    lacking one expert's channel list."""
    from safetensors.torch import save

    from moe2gguf.prune.prune import prune as do_prune

    out = w / "pruned"
    do_prune(str(E.model), str(E.calib), 0.25, str(out), method="uniform")
    if drop_channels:
        t = load_file(out / "prune_map.safetensors")
        del t[next(k for k in sorted(t) if k.endswith(".channels"))]
        raw = save(t)
    (out / "prune_map.safetensors").write_bytes(raw)
    return out


def _weights_fifo(E: Env, w: pathlib.Path) -> pathlib.Path:
    d = E.model_with(w, drop=("model.safetensors",))
    os.mkfifo(d / "model.safetensors")
    return d


def _lacking(E: Env, w: pathlib.Path, name: str) -> pathlib.Path:
    """The tiny model with one tensor (not an expert's) left out of its weights."""
    t = load_file(E.model / "model.safetensors")
    del t[name]
    d = E.model_with(w, drop=("model.safetensors",))
    save_file(t, d / "model.safetensors")
    return d


def _small_vocab(E: Env, w: pathlib.Path) -> pathlib.Path:
    """Weights and config of 2048 tokens next to the 4096-token tokenizer of another model."""
    return E.model_with(w, config={"vocab_size": 2048}, tensors={"model.embed_tokens.weight": torch.zeros(2048, 64), "lm_head.weight": torch.zeros(2048, 64)})


def _fifo(w: pathlib.Path) -> pathlib.Path:
    p = w / "fifo.txt"
    os.mkfifo(p)
    return p


def _with_state(E: Env, w: pathlib.Path, state: bytes) -> pathlib.Path:
    (w / "run").mkdir()
    (w / "run" / "run.json").write_bytes(state)
    return E.recipe(w)


def _tree(d: pathlib.Path) -> dict[str, int]:
    """Every path under d (hidden ones too) with its size: what a failed verb must leave alone."""
    return {str(p.relative_to(d)): (p.lstat().st_size if not p.is_dir() else -1) for p in sorted(d.rglob("*"))}


class Hang(BaseException):
    """Raised by the alarm: the verb took longer than HANG_LIMIT_S."""


def run_in_process(argv: list[str]) -> int:
    from moe2gguf.cli import main

    def alarm(signum: int, frame: object) -> None:
        raise Hang(f"{argv[0]} ran past {HANG_LIMIT_S} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_LIMIT_S)
    try:
        main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main() installs its own
    return 0


assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_exit_2_and_nothing_written(case: Case, env: Env, tmp_path: pathlib.Path, capsys, monkeypatch):
    argv = case.build(env, tmp_path)
    for k, v in (case.environ or {}).items():
        monkeypatch.setenv(k, v)
    before = _tree(tmp_path)
    if case.subprocess:
        r = subprocess.run([sys.executable, "-m", "moe2gguf.cli", *argv], input=case.stdin or b"", capture_output=True, timeout=HANG_LIMIT_S)
        code, err = r.returncode, r.stderr.decode("utf-8", "replace")
    else:
        if case.stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(case.stdin), encoding="utf-8"))
        code = run_in_process(argv)
        err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert case.fragment in lines[0], lines[0]
    assert _tree(tmp_path) == before, "a refused input left something behind"


# --- the same kinds of input, valid, still work ------------------------------------------------------


def _ok_recipe(E: Env, w: pathlib.Path) -> pathlib.Path:
    """A recipe that uses a couple of YAML aliases (under the limit), as a person might."""
    text = yaml.safe_dump({k: v for k, v in yaml.safe_load(E.recipe(w).read_text()).items() if k != "check"})
    text += f"check: &chk {{text: {E.text}, ctx: 64, chunks: 1}}\nreported: {{a: 1.0}}\n"
    p = w / "ok.yaml"
    p.write_text(text)
    return p


VALID: list[tuple[str, Callable[[Env, pathlib.Path], list[str]], bytes | None, str]] = [
    ("inspect", lambda E, w: ["inspect", str(E.model)], None, "Qwen3MoeForCausalLM"),
    ("inspect-index", lambda E, w: ["inspect", str(_sharded(E, w))], None, "Qwen3MoeForCausalLM"),
    ("calibrate", lambda E, w: calibrate(E, w), None, "wrote"),
    ("prune", lambda E, w: prune(E, w, "--ratio", "0.25", "--probe", "0", "--min-width", "0"), None, "wrote"),
    ("export-imatrix", lambda E, w: export(E, w, "--imatrix", str(E.calib)), None, "wrote"),
    ("run-dry", lambda E, w: ["run", "--recipe", str(_ok_recipe(E, w)), "--dry-run"], None, "unpruned   Q8_0"),
    ("chat", lambda E, w: chat(E, w), b"hello\n/exit\n", ""),
    # transformers' own {% generation %} tag (assistant masks) is valid Jinja for a chat template
    ("export-template-generation-tag", lambda E, w: export(E, w, model=E.model_with(w, files={"chat_template.jinja": (
        b"{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
        b"{% else %}{{ m.content }}{% endif %}{% endfor %}")})), None, "wrote"),
]


def _sharded(E: Env, w: pathlib.Path) -> pathlib.Path:
    names = list(load_file(E.model / "model.safetensors"))
    idx = {"weight_map": {n: "model.safetensors" for n in names}}
    return E.model_with(w, files={"model.safetensors.index.json": json.dumps(idx).encode()})


@pytest.mark.parametrize("name, build, stdin, expect", VALID, ids=[v[0] for v in VALID])
def test_valid_input_of_each_kind_still_works(name, build, stdin, expect, env: Env, tmp_path: pathlib.Path, capsys, monkeypatch):
    argv = build(env, tmp_path)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    code = run_in_process(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "error:" not in out.err
    assert expect in out.out + out.err
    if name in ("calibrate", "prune"):
        assert (tmp_path / "out").is_dir()
    if name == "export-imatrix":
        assert (tmp_path / "out.gguf").stat().st_size > 0
    if name == "chat":
        assert out.out.strip(), "the model said nothing"


def test_nan_weight_is_named_before_anything_is_written(env: Env, tmp_path: pathlib.Path):
    """Reading a tensor is where NaN/Inf is caught: the Checkpoint refuses it by name."""
    from moe2gguf.checkpoint import Checkpoint
    from moe2gguf.errors import UserError

    ck = Checkpoint(_nan_model(env, tmp_path, float("nan")))
    assert torch.isfinite(ck.tensor("model.layers.0.mlp.experts.3.up_proj.weight")).all()  # its neighbours still read
    with pytest.raises(UserError, match=EXPERT.replace(".", r"\.") + " holds NaN or Inf"):
        ck.tensor(EXPERT)


def test_valid_gguf_and_text_pass_check_validation(env: Env):
    """`check`'s input checks accept what export and the bundled data give (running the model
    is tests/test_check.py's)."""
    from moe2gguf.exporter.check import backend_of
    from moe2gguf.protocol import read_text

    assert backend_of(env.gguf) == "llama.cpp"
    assert backend_of(env.model) == "torch"
    assert read_text(env.text) == env.text.read_text(encoding="utf-8")
    assert read_text(REFERENCE / "eval.txt")


class _Terminal(io.TextIOWrapper):
    def isatty(self) -> bool:
        return True


def test_chat_in_a_terminal_skips_a_bad_line_and_answers_the_next(env: Env, capsys, monkeypatch):
    """A person at a terminal gets a note and keeps the conversation; a script gets exit code 2
    (the table above)."""
    monkeypatch.setattr(sys, "stdin", _Terminal(io.BytesIO(b"caf\xe9\n" + b"word " * 500 + b"\nhello\n/exit\n"), encoding="utf-8"))
    code = run_in_process(["chat", str(env.gguf), "--temperature", "0", "--max-tokens", "4", "--ctx", "64"])
    out = capsys.readouterr()
    assert code == 0, out.err
    notes = [line for line in out.err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 2 and "input line 1 is not UTF-8" in notes[0] and "input line 2 has" in notes[1], out.err
    assert out.out.replace(">", "").strip(), "the model did not answer the good line"
