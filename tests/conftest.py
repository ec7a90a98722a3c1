"""Shared fixtures: the bundled reference model and tiny random MoE checkpoints built with
transformers' real config classes (no download anywhere)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = REPO / "moe2gguf" / "data" / "reference-moe"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def reference_model() -> pathlib.Path:
    return REFERENCE


def save_tiny(model: torch.nn.Module, out: pathlib.Path) -> pathlib.Path:
    """Save a tiny model with the reference tokenizer, so export and check have a vocab."""
    model.save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (REFERENCE / f).exists():
            shutil.copy(REFERENCE / f, out / f)
    return out


def build_tiny(model_cls: type, config, out: pathlib.Path, seed: int = 0, attn_std: float | None = None) -> pathlib.Path:
    """A random tiny checkpoint of the real HF class, with the reference tokenizer.
    HF's 0.02-std init makes near-uniform routers; widen them so top-k choices are decided
    by clear margins (a near-tie could route differently in F32 llama.cpp vs torch).
    `attn_std` re-draws the attention projections wider, so attention is sharp and a wrong
    RoPE / attention scale shows in the logits (at 0.02 attention is nearly uniform)."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"\.gate\.weight$|shared_expert_gate\.weight$", name):
                p.normal_(0.0, 0.5)
            elif attn_std is not None and ".self_attn." in name and name.endswith("proj.weight"):
                p.normal_(0.0, attn_std)
    return save_tiny(model, out)


def tiny_qwen3moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    kw = dict(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def calibrated_tiny_qwen3moe(d: pathlib.Path, seed: int, tokens: int, ctx: int, **overrides) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny Qwen3-MoE saved under d/model and its calibration d/calib on 20k characters of the
    bundled calib.txt (for module-scoped fixtures: calibration is the slow part)."""
    from transformers import Qwen3MoeForCausalLM

    from moe2gguf.prune.calibrate import calibrate

    torch.manual_seed(seed)
    model = save_tiny(Qwen3MoeForCausalLM(tiny_qwen3moe_config(**overrides)), d / "model")
    text = d / "calib.txt"
    text.write_text((REFERENCE / "calib.txt").read_text()[:20000])
    calibrate(str(model), [str(text)], str(d / "calib"), tokens=tokens, ctx=ctx)
    return model, d / "calib"


@pytest.fixture
def tiny_qwen3moe(tmp_path: pathlib.Path) -> pathlib.Path:
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(tiny_qwen3moe_config())
    return save_tiny(model, tmp_path / "tiny-qwen3moe")


@contextlib.contextmanager
def tmpfs(where: pathlib.Path, size: str, ro: bool = False):
    """A small tmpfs at `where` (root only, where mounting is allowed)."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        if ro:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def one_error_line(err: str) -> bool:
    """Exactly one `error: ...` line and no traceback (progress bars may come before it)."""
    return "Traceback" not in err and [ln for ln in err.splitlines() if ln.startswith("error:")] == [err.splitlines()[-1]]
