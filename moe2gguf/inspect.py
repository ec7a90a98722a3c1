"""`moe2gguf inspect`: what a checkpoint is, from config.json and safetensors headers only."""

from __future__ import annotations

import json
import pathlib
from collections import Counter

import click

from moe2gguf.arch import arch_for_config
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.exporter.sizing import ShapeCheckpoint
from moe2gguf.inputs import read_json_object
from moe2gguf.units import human_count

# what a folder holding weights has (safetensors, or .bin/.pt that Checkpoint asks to convert)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def _open_checkpoint(model: str) -> Checkpoint:
    """The checkpoint; a folder holding config.json and no weight files at all is answered
    from the config alone: shapes from the model built on the meta device, as `run --dry-run`
    plans a model it has no weights of."""
    path = pathlib.Path(model)
    if not path.is_dir() or not (path / "config.json").is_file() or any(p for pat in WEIGHT_FILES for p in path.glob(pat)):
        return Checkpoint(model)
    config = read_json_object(path / "config.json", "config", "restore the original config.json of the checkpoint")
    return ShapeCheckpoint(config, model)


def inspect_model(model: str) -> dict:
    ckpt = _open_checkpoint(model)
    arch = arch_for_config(ckpt.config)
    widths = arch.expert_widths()
    shapes = {n: ckpt.shape(n) for n in ckpt.tensor_names}  # every expert tensor is there: Checkpoint checked
    counts = arch.param_counts(shapes)
    moe_layers = arch.moe_layers
    return {
        "model": str(ckpt.path),
        "architecture": arch.hf_architectures[0],
        "model_type": arch.model_type,
        "gguf_arch": arch.gguf_arch.name.lower(),
        "layers": arch.n_layers,
        "moe_layers": len(moe_layers),
        "dense_layers": [b for b in range(arch.n_layers) if b not in moe_layers],
        "hidden_size": arch.hidden_size,
        "experts_routed": arch.n_experts,
        "experts_used": arch.n_used,
        "experts_shared": 1 if any(arch.shared_width(b) for b in moe_layers) else 0,
        "experts_per_layer": [len(w) for w in widths],
        "expert_width": arch.expert_width,
        "expert_widths": widths,
        "pruned": ckpt.expert_widths is not None,
        "params_total": counts.total,
        "params_routed_experts": counts.routed_experts,
        "params_shared_experts": counts.shared_experts,
        "params_active_per_token": counts.active_per_token,
        # multi-token-prediction layers (DeepSeek-V3): stored, but llama.cpp drops them
        "params_mtp_not_exported": counts.mtp,
        "bytes_bf16": 2 * counts.total,
        "file_bytes": ckpt.weight_bytes if ckpt.has_files else 0,
        "weights_read": ckpt.has_files,  # False: answered from config.json alone
    }


def _widths_summary(widths: list[list[int]]) -> str:
    flat = Counter(w for layer in widths for w in layer)
    if len(flat) == 1:
        return f"{next(iter(flat))} (all experts)"
    return f"{min(flat)}..{max(flat)} (per expert; {sum(flat.values())} experts)"


def inspect_main(model: str, as_json: bool) -> None:
    """The `inspect` verb once moe2gguf/commands.py has parsed its options."""
    info = inspect_model(model)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    widths = info["expert_widths"]
    rows = [
        ("architecture", f"{info['architecture']} (GGUF {info['gguf_arch']})"),
        ("layers", f"{info['layers']} ({info['moe_layers']} MoE, dense: {info['dense_layers'] or 'none'})"),
        ("hidden size", info["hidden_size"]),
        ("experts", f"{info['experts_routed']} routed, {info['experts_used']} used per token, {info['experts_shared']} shared"),
        ("experts kept per layer", info["experts_per_layer"] if info["pruned"] else "all"),
        ("expert width", _widths_summary(widths)),
        ("params total", human_count(info["params_total"])),
        ("params routed experts", human_count(info["params_routed_experts"])),
        ("params active / token", human_count(info["params_active_per_token"])),
        *([("MTP (not exported)", human_count(info["params_mtp_not_exported"]))] if info["params_mtp_not_exported"] else []),
        ("bytes at bf16", f"{info['bytes_bf16'] / 2**20:.1f} MiB"),
        ("weights on disk", f"{info['file_bytes'] / 2**20:.1f} MiB" if info["weights_read"] else "none: answered from config.json alone, no weights were read"),
    ]
    for k, v in rows:
        click.echo(f"{k:<24}{v}")
