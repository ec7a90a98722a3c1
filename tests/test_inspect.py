"""`inspect` reads config + safetensors headers and reports counts that match the tensors."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from safetensors import safe_open

from moe2gguf.arch import arch_for_config, register
from moe2gguf.arch.base import MoEArch
from moe2gguf.errors import UserError
from moe2gguf.inspect import inspect_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe2gguf.cli", *args], capture_output=True, text=True)


def counts_from_tensors(folder: pathlib.Path) -> dict[str, int]:
    """Independent count: walk every tensor by name, no registry involved."""
    total = experts = 0
    per_layer_expert: dict[int, int] = {}
    n_experts: dict[int, set[int]] = {}
    with safe_open(folder / "model.safetensors", "pt") as f:
        for name in f.keys():
            n = f.get_slice(name).get_shape()
            numel = 1
            for d in n:
                numel *= d
            total += numel
            parts = name.split(".")
            if ".mlp.experts." in name:
                experts += numel
                bid, xid = int(parts[2]), int(parts[5])
                per_layer_expert[bid] = per_layer_expert.get(bid, 0) + numel
                n_experts.setdefault(bid, set()).add(xid)
    cfg = json.loads((folder / "config.json").read_text())
    k = cfg["num_experts_per_tok"]
    active = total - experts + sum(k * per_layer_expert[b] / len(n_experts[b]) for b in per_layer_expert)
    return {"total": total, "experts": experts, "active": round(active)}


@pytest.mark.parametrize("which", ["bundled", "tiny"])
def test_inspect_counts_match_tensors(which, reference_model, tiny_qwen3moe):
    folder = reference_model if which == "bundled" else tiny_qwen3moe
    info = inspect_model(str(folder))
    want = counts_from_tensors(folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert info["params_total"] == want["total"]
    assert info["params_routed_experts"] == want["experts"]
    assert info["params_active_per_token"] == want["active"]
    assert info["bytes_bf16"] == 2 * want["total"]
    assert info["layers"] == cfg["num_hidden_layers"]
    assert info["experts_routed"] == cfg.get("num_experts", cfg.get("num_local_experts"))
    assert info["experts_used"] == cfg["num_experts_per_tok"]
    assert info["expert_widths"] == [[cfg["moe_intermediate_size"]] * info["experts_routed"]] * info["layers"]


def test_inspect_json_cli_on_bundled_model(reference_model):
    r = run_cli("inspect", str(reference_model), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "Qwen3MoeForCausalLM"
    assert info["hidden_size"] % 256 == 0  # K-quants apply along rows, as on real models


def test_inspect_reads_headers_only(tiny_qwen3moe, monkeypatch):
    """No tensor data is loaded: inspect must not call get_tensor."""
    import moe2gguf.checkpoint as ck

    monkeypatch.setattr(ck.Checkpoint, "tensor", lambda *a, **k: pytest.fail("inspect loaded a tensor"))
    assert inspect_model(str(tiny_qwen3moe))["params_total"] > 0


def test_registry_rejects_unknown_architecture():
    with pytest.raises(UserError, match="unsupported architecture FancyMoeForCausalLM.*supports .*Qwen3MoeForCausalLM"):
        arch_for_config({"architectures": ["FancyMoeForCausalLM"], "model_type": "fancy"})


def test_registry_rejects_subclass_without_facts():
    with pytest.raises(TypeError, match="lacks"):

        @register
        class Broken(MoEArch):  # noqa: F841 - the decorator is what is tested
            hf_architectures = ("BrokenForCausalLM",)


def _bad(tmp_path: pathlib.Path, tiny: pathlib.Path, kind: str) -> pathlib.Path:
    d = tmp_path / f"bad-{kind}"
    if kind == "no-config":
        d.mkdir()
        shutil.copy(tiny / "model.safetensors", d)
    elif kind == "dense":
        shutil.copytree(tiny, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "dense-moe-class":
        shutil.copytree(tiny, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg["num_experts"] = 0
        cfg.pop("num_local_experts", None)
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "unknown-type":
        shutil.copytree(tiny, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(architectures=[], model_type="not_a_model")
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "truncated":
        shutil.copytree(tiny, d)
        st = d / "model.safetensors"
        os.truncate(st, st.stat().st_size // 2)
    return d


@pytest.mark.parametrize(
    "kind, message",
    [
        ("no-config", "has no config.json"),
        ("dense", "unsupported architecture Qwen3ForCausalLM"),
        ("dense-moe-class", "no routed experts"),
        ("unknown-type", "unsupported architecture model_type 'not_a_model'"),
        ("truncated", "truncated or corrupt"),
    ],
)
def test_inspect_bad_input_is_one_line_exit_2(tmp_path, tiny_qwen3moe, kind, message):
    r = run_cli("inspect", str(_bad(tmp_path, tiny_qwen3moe, kind)))
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_help_explains_every_verb():
    r = run_cli("--help")
    assert r.returncode == 0
    from moe2gguf.cli import cli

    for name, cmd in cli.commands.items():
        h = run_cli(name, "--help")
        assert h.returncode == 0 and len(h.stdout.splitlines()) > 3, name
        assert (cmd.help or "").strip(), f"{name} has no help text"
