"""The fine-grained bundled model (moe2gguf/data/reference-moe-fine): the shape the recipes
target (many narrow experts, top-8), trained, and measured on the reference model's texts."""

from __future__ import annotations

import json
import pathlib

import torch
import yaml

from moe2gguf.modeling import load_model
from moe2gguf.protocol import score_logprobs, targets_of, torch_logprobs, windows
from moe2gguf.prune.calibrate import tokenize

DATA = pathlib.Path(__file__).resolve().parent.parent / "moe2gguf" / "data"
FINE = DATA / "reference-moe-fine"
REF = DATA / "reference-moe"


def test_fine_model_has_many_narrow_experts_top8_and_fits_20mb():
    cfg = json.loads((FINE / "config.json").read_text())
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))  # transformers 5 saves num_local_experts
    assert experts >= 64 and cfg["num_experts_per_tok"] == 8
    assert cfg["moe_intermediate_size"] * 2 <= cfg["hidden_size"] == 256  # narrow experts; K-quants along rows
    assert (FINE / "model.safetensors").stat().st_size <= 20 * 10**6
    # its recipe describes this very checkpoint (the demo's `--model fine` runs it)
    recipe = yaml.safe_load((DATA / "reference-moe-fine.yaml").read_text())
    assert {k: experts if k == "num_experts" else cfg.get(k) for k in recipe["model"]["config"]} == recipe["model"]["config"]


def test_fine_model_shares_the_reference_tokens_and_texts():
    assert (FINE / "tokenizer.json").read_text() == (REF / "tokenizer.json").read_text()
    recipe = yaml.safe_load((DATA / "reference-moe-fine.yaml").read_text())
    assert recipe["calibration"]["texts"] == ["reference-moe/calib.txt"] and recipe["check"]["text"] == "reference-moe/eval.txt"


def test_fine_model_predicts_held_out_text_far_better_than_uniform():
    torch.set_grad_enabled(False)
    model, _, _ = load_model(str(FINE))
    ids = tokenize(FINE, [str(REF / "eval.txt")])[0]
    wins = windows(ids, 256, 8)
    ppl = score_logprobs(torch_logprobs(model, wins), targets_of(wins)).ppl
    vocab = json.loads((FINE / "config.json").read_text())["vocab_size"]
    # a uniform model scores PPL = vocab (4096), the untrained one about that (training_log.json, step 0)
    assert ppl < vocab / 16, f"held-out PPL {ppl:.1f} is not far below uniform ({vocab})"
