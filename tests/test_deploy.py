"""prune --layout llama.cpp and --target-size: one width and one expert count in the written
checkpoint, exportable without padding, size targets met from below, bad input exit 2."""

from __future__ import annotations

import json
import pathlib

import gguf
import pytest
import torch
from click.testing import CliRunner

from conftest import calibrated_tiny_qwen3moe
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.cli import cli
from moe2gguf.exporter.export import export
from moe2gguf.exporter.sizing import predict_size
from moe2gguf.exporter.writer import plan_export
from moe2gguf.prune.allocate import LAYOUTS
from moe2gguf.prune.deploy import Shape, allocate_shape, best_shape, feasible_shapes, shape_coverage
from moe2gguf.prune.prune import prune


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny Qwen3-MoE whose experts are 256 wide (so Q4_K fits and 32-steps exist) + its calibration."""
    return calibrated_tiny_qwen3moe(tmp_path_factory.mktemp("wide"), seed=0, tokens=512, ctx=64, moe_intermediate_size=256)


def test_the_layout_is_data() -> None:
    lay = LAYOUTS["llama.cpp"]
    assert (lay.width, lay.count, lay.align, lay.kquant_align) == ("model", "model", 32, 256)
    shapes = feasible_shapes(lay, 8, 256, 2)
    assert Shape(8, 256) not in shapes and Shape(2, 32) in shapes and all(s.experts >= 2 and s.width % 32 == 0 for s in shapes)


def test_shape_allocation_keeps_top_experts_and_channels() -> None:
    s = torch.zeros(4, 8)
    s[0, :6] = 10.0  # expert 0: six strong channels
    s[1, :2] = 5.0
    s[2] = 1.0  # expert 2: eight weak ones
    alloc = allocate_shape([s], Shape(2, 4))
    assert alloc.widths == [[4, 4, 0, 0]]  # top-4 sums: expert 0 40, expert 1 10, expert 2 4
    assert alloc.channels[0][0].tolist() == [0, 1, 2, 3]
    assert shape_coverage([s], Shape(2, 4)) == pytest.approx(50 / (60 + 10 + 8))
    best, cov = best_shape([s], [Shape(2, 4), Shape(3, 2)])
    assert best in (Shape(2, 4), Shape(3, 2)) and 0 < cov <= 1


def test_llama_cpp_layout_writes_one_width_one_count(wide, tmp_path: pathlib.Path) -> None:
    model, calib = wide
    out = tmp_path / "p"
    r = CliRunner().invoke(cli, ["prune", str(model), "--calib", str(calib), "--ratio", "0.3", "--layout", "llama.cpp", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "prune_report.json").read_text())
    widths = {w for layer in rep["widths"] for w in layer if w}
    assert len(widths) == 1 and len(set(rep["experts_kept"])) == 1
    assert rep["ragged"]["coverage"] >= rep["coverage"] - 1e-9 and rep["coverage_lost"] >= -1e-9
    assert rep["ratio_achieved"] >= 0.3 - 1e-9
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["moe_intermediate_size"] == widths.pop() and cfg["num_experts"] == rep["experts_kept"][0]
    plan = plan_export(out)
    assert not plan.padded  # llama.cpp stores exactly what was kept
    g = tmp_path / "p.gguf"
    export(str(out), str(g), "Q8_0", progress=False)
    exps = [t for t in gguf.GGUFReader(g).tensors if "_exps." in t.name]
    assert len({tuple(int(x) for x in t.shape) for t in exps if "down" not in t.name}) == 1


@pytest.mark.parametrize("frac", [0.15, 0.5, 0.85])
def test_target_size_lands_within_3_percent_under(wide, tmp_path: pathlib.Path, frac: float) -> None:
    model, calib = wide
    full = predict_size(Checkpoint(model), "Q4_K_M").total_bytes
    smallest = 640_000  # a little above 2 experts x width 32 (626 kB here)
    target = int(smallest + frac * (full - smallest))
    out = tmp_path / "p"
    rep = prune(str(model), str(calib), None, str(out), target_size=target, quant="Q4_K_M")
    assert rep["layout"] == "llama.cpp" and rep["predicted_bytes"] <= target
    g = tmp_path / "p.gguf"
    export(str(out), str(g), None, progress=False)  # the per-tensor types the prune planned
    size = g.stat().st_size
    assert 0.97 * target <= size <= target, (target, size, rep["deployable"])


def test_target_below_reach_is_exit_2(wide, tmp_path: pathlib.Path) -> None:
    model, calib = wide
    out = tmp_path / "p"
    r = CliRunner().invoke(cli, ["prune", str(model), "--calib", str(calib), "--target-size", "100KB", "-o", str(out)])
    assert r.exit_code == 2, r.output
    line = r.output.strip()
    assert "smallest GGUF" in line and "2 experts x width 32" in line and "\n" not in line
    assert not out.exists()


def test_unalignable_width_is_exit_2(wide, tmp_path: pathlib.Path) -> None:
    model, calib = wide
    out = tmp_path / "p"
    r = CliRunner().invoke(cli, ["prune", str(model), "--calib", str(calib), "--ratio", "0.5", "--layout", "llama.cpp", "--width", "100", "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert "nearest valid width: 96, 128" in r.output and "\n" not in r.output.strip()
    assert not out.exists()


def test_ratio_and_target_size_together_is_exit_2(wide, tmp_path: pathlib.Path) -> None:
    model, calib = wide
    r = CliRunner().invoke(cli, ["prune", str(model), "--calib", str(calib), "--ratio", "0.5", "--target-size", "1MB", "-o", str(tmp_path / "p")])
    assert r.exit_code == 2 and "exactly one" in r.output, r.output
