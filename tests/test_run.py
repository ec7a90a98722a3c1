"""`run` follows a recipe, caches every step, resumes after an interruption, and refuses a
model that is not the recipe's; `--dry-run` plans from architecture numbers alone."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from moe2gguf.errors import UserError

REPO = pathlib.Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
CALIB_TEXT = REPO / "moe2gguf" / "data" / "reference-moe" / "calib.txt"
EVAL_TEXT = REPO / "moe2gguf" / "data" / "reference-moe" / "eval.txt"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe2gguf.cli", *args], capture_output=True, text=True, timeout=600)


def tiny_recipe(tmp_path: pathlib.Path, model: pathlib.Path, **prune) -> pathlib.Path:
    cfg = json.loads((model / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_experts_per_tok", "norm_topk_prob", "tie_word_embeddings")
    numbers = {k: cfg[k] for k in keys}
    numbers["num_experts"] = cfg.get("num_experts", cfg.get("num_local_experts"))
    recipe = {
        "model": {"name": "tiny", "architecture": "Qwen3MoeForCausalLM", "path": str(model), "config": numbers},
        "calibration": {"texts": [str(CALIB_TEXT)], "tokens": 2048, "ctx": 128},
        "prune": {"method": "uniform", "ratio": 0.25, "layout": "ragged", **prune},
        "export": {"quant": "Q8_0"},
        "check": {"text": str(EVAL_TEXT), "ctx": 64, "chunks": 2},
    }
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return p


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_dry_run_plans_every_recipe_without_weights(path):
    r = cli("run", "--recipe", str(path), "--dry-run")
    assert r.returncode == 0, r.stderr
    unpruned = re.search(r"unpruned\s+\S+: [\d.]+ [GMK]iB\s+\(([\d.]+)x smaller than bf16", r.stdout, re.M)
    pruned = re.findall(r"^pruned\s+.*?\(([\d.]+)x smaller than bf16", r.stdout, re.M)
    assert unpruned and len(pruned) == 2, r.stdout
    assert all(float(p) > float(unpruned.group(1)) for p in pruned)  # pruning shrinks the quantized file


def test_interrupted_run_resumes_without_recalibrating(tmp_path, tiny_qwen3moe, monkeypatch, capsys):
    import moe2gguf.exporter.export as export_mod
    import moe2gguf.prune.calibrate as calibrate_mod
    from moe2gguf.run import run

    recipe, out = tiny_recipe(tmp_path, tiny_qwen3moe), tmp_path / "run"
    real_export = export_mod.export

    def killed(model, output, *a, **k):
        if "pruned" in pathlib.Path(output).name:
            raise KeyboardInterrupt  # as if Ctrl-C hit in the middle of the export
        return real_export(model, output, *a, **k)

    monkeypatch.setattr(export_mod, "export", killed)
    with pytest.raises(KeyboardInterrupt):
        run(str(recipe), output=str(out), quiet=True)
    assert "layer/s" not in capsys.readouterr().err  # --quiet: no calibrate/probe progress bars
    assert (out / "calib" / "imatrix.gguf").is_file()
    assert not list(out.glob("pruned-*.gguf"))
    assert not [p for p in out.iterdir() if "partial" in p.name]  # nothing half-written is left

    calls = []
    real_calibrate = calibrate_mod.calibrate
    monkeypatch.setattr(calibrate_mod, "calibrate", lambda *a, **k: calls.append(a) or real_calibrate(*a, **k))
    monkeypatch.setattr(export_mod, "export", real_export)
    rows = run(str(recipe), output=str(out), quiet=True)
    assert calls == []  # calibration was reused
    assert [r["label"] for r in rows] == ["unpruned F32", "unpruned Q8_0", "pruned Q8_0"]
    assert rows[2]["file_bytes"] < rows[1]["file_bytes"]
    assert rows[0]["kld"] == pytest.approx(0.0, abs=1e-6)


def test_recipe_for_another_model_is_refused_and_nothing_written(tmp_path, tiny_qwen3moe):
    recipe = tiny_recipe(tmp_path, tiny_qwen3moe)
    data = yaml.safe_load(recipe.read_text())
    data["model"]["config"]["hidden_size"] = 128
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "never"
    r = cli("run", "--recipe", str(recipe), "-o", str(out))
    assert r.returncode == 2
    assert "hidden_size 64, the recipe says 128" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_recipe_without_model_path_asks_for_model(tmp_path):
    with pytest.raises(UserError, match="pass the checkpoint folder with --model"):
        from moe2gguf.run import run

        run(str(REPO / "recipes" / "qwen3-30b-a3b.yaml"), output=str(tmp_path / "x"))
