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
from moe2gguf.prune.allocate import LAYOUTS, coverage, group_topk
from moe2gguf.prune.deploy import (
    EXPERT_LOSS_WEIGHT,
    Shape,
    ShapeScores,
    allocate_shape,
    best_shape,
    feasible_shapes,
    shape_coverage,
    shape_quality,
)
from moe2gguf.prune.prune import prune


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    """A tiny Qwen3-MoE whose experts are 256 wide (so Q4_K fits and 32-steps exist) + its calibration."""
    return calibrated_tiny_qwen3moe(tmp_path_factory.mktemp("wide"), seed=0, tokens=512, ctx=64, moe_intermediate_size=256)


def test_feasible_shapes_follow_the_layout_entry() -> None:
    """The widths offered are the multiples of the layout's alignment (plus the full width), the
    counts run from top-k (or the grouped minimum) to all experts, only the unpruned shape is
    left out, and a layout entry with another alignment or a per-layer width changes exactly that."""
    from dataclasses import replace

    lay = LAYOUTS["llama.cpp"]
    shapes = feasible_shapes(lay, 8, 256, 2)
    assert {s.width for s in shapes} == set(range(32, 257, 32)) and {s.experts for s in shapes} == set(range(2, 9))
    assert len(shapes) == 7 * 8 - 1 and Shape(8, 256) not in shapes
    # a width that is no multiple of the alignment still offers the full width, never more
    assert {s.width for s in feasible_shapes(lay, 8, 80, 2)} == {32, 64, 80}
    # grouped routing (2 groups, 1 used per token, top-2): counts 4 and 6 and 8 only
    assert {s.experts for s in feasible_shapes(lay, 8, 64, 2, groups=2, groups_used=1)} == {4, 6, 8}
    # the alignment is data: a layout entry made here with 64-channel blocks offers 64s
    assert {s.width for s in feasible_shapes(replace(lay, align=64), 8, 256, 2)} == {64, 128, 192, 256}
    with pytest.raises(ValueError, match="no one shape"):  # per-layer widths are not one (K, W) for the model
        feasible_shapes(replace(lay, width="layer"), 8, 256, 2)


def test_shape_allocation_keeps_top_experts_and_channels() -> None:
    s = torch.zeros(4, 8)
    s[0, :6] = 10.0  # expert 0: six strong channels
    s[1, :2] = 5.0
    s[2] = 1.0  # expert 2: eight weak ones
    alloc = allocate_shape([s], Shape(2, 4))
    assert alloc.widths == [[4, 4, 0, 0]]  # top-4 sums: expert 0 40, expert 1 10, expert 2 4
    assert alloc.channels[0][0].tolist() == [0, 1, 2, 3]
    assert shape_coverage([s], Shape(2, 4)) == pytest.approx(50 / (60 + 10 + 8))
    # (2, 4) covers more (50 of 78 against 32) but removes expert 2, which counts 5x:
    # quality 1 - (20 + 5 * 8) / 78 against 1 - 46 / 78 for (3, 2), which keeps every scored expert
    assert shape_quality([s], Shape(2, 4)) == pytest.approx(1 - 60 / 78)
    assert shape_quality([s], Shape(3, 2)) == pytest.approx(1 - 46 / 78)
    assert best_shape([s], [Shape(2, 4), Shape(3, 2)]) == (Shape(3, 2), pytest.approx(32 / 78))
    # without the removed-expert weight the ranking is coverage's, and flips
    assert shape_quality([s], Shape(2, 4), weight=1.0) > shape_quality([s], Shape(3, 2), weight=1.0)


# ----- ShapeScores against the per-shape definitions it replaced (0d15e18) ------------------


def _ref_coverage(scores, shape, groups=None):  # noqa: ANN001, ANN202
    total = kept = 0.0
    for s, g in zip(scores, groups or [1] * len(scores), strict=True):
        s = s.double()
        top = torch.sort(s, dim=1, descending=True).values[:, : shape.width].sum(1)
        kept += float(top[group_topk(top, shape.experts, g)].sum())
        total += float(s.sum())
    return kept / total if total > 0 else 1.0


def _ref_quality(scores, shape, weight=EXPERT_LOSS_WEIGHT, groups=None):  # noqa: ANN001, ANN202
    total = chan = gone = 0.0
    for s, g in zip(scores, groups or [1] * len(scores), strict=True):
        s = s.double()
        top = torch.sort(s, dim=1, descending=True).values[:, : shape.width].sum(1)
        keep = group_topk(top, shape.experts, g)
        mask = torch.zeros(s.shape[0], dtype=torch.bool)
        mask[keep] = True
        full = s.sum(1)
        chan += float((full[mask] - top[mask]).sum())
        gone += float(full[~mask].sum())
        total += float(full.sum())
    return 1.0 - (chan + weight * gone) / total if total > 0 else 1.0


@pytest.mark.parametrize(
    ("kind", "n_group", "groups_used"),
    [("random", 1, 1), ("random", 4, 2), ("ties", 1, 1), ("ties", 2, 1), ("zeros", 1, 1)],
)
def test_shape_scores_equal_the_per_shape_definitions(kind: str, n_group: int, groups_used: int) -> None:
    """Every feasible shape's coverage and quality from the prefix-sum table equal the per-shape
    computation (to float rounding: 1e-12), and the shape each picks is the same: random scores,
    DeepSeek-V3-style grouped routing, tied scores (small integers: tied experts' top-W sums are
    exactly equal, and both sides keep the lower index), and layers of zero attribution."""
    g = torch.Generator().manual_seed(n_group)
    n_layers, n_e, width = 3, 16, 96
    if kind == "random":
        scores = [torch.rand(n_e, width, generator=g) ** 3 for _ in range(n_layers)]
    elif kind == "ties":
        scores = [torch.randint(0, 3, (n_e, width), generator=g).float() for _ in range(n_layers)]
        scores[0][1] = scores[0][0]  # whole experts tied too
    else:
        scores = [torch.zeros(n_e, width) for _ in range(n_layers)]
        scores[1] = torch.rand(n_e, width, generator=g)
    groups = [n_group] * n_layers
    shapes = feasible_shapes(LAYOUTS["llama.cpp"], n_e, width, 2, n_group, groups_used)
    table = ShapeScores.of(scores, shapes, groups)
    for s in shapes:
        assert table.coverage(s) == pytest.approx(_ref_coverage(scores, s, groups), rel=1e-12, abs=1e-15), s
        assert table.quality(s) == pytest.approx(_ref_quality(scores, s, groups=groups), rel=1e-12, abs=1e-15), s
        # and the coverage it reports is the coverage of the allocation the rewrite keeps
        assert table.coverage(s) == pytest.approx(coverage(scores, allocate_shape(scores, s, groups)), rel=1e-12, abs=1e-15), s
    ref_best = sorted(shapes, key=lambda sh: (-_ref_quality(scores, sh, groups=groups), sh.experts * sh.width))[0]
    assert table.best(shapes)[0] == ref_best


def test_llama_cpp_layout_writes_one_width_one_count(wide, tmp_path: pathlib.Path) -> None:
    model, calib = wide
    out = tmp_path / "p"
    r = CliRunner().invoke(cli, ["prune", str(model), "--calib", str(calib), "--ratio", "0.3", "--layout", "llama.cpp", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "prune_report.json").read_text())
    widths = {w for layer in rep["widths"] for w in layer if w}
    assert len(widths) == 1 and len(set(rep["experts_kept"])) == 1
    assert rep["ragged"]["coverage"] >= rep["coverage"] - 1e-9 and rep["coverage_lost"] >= -1e-9
    # no 8 x 256 shape removes 28-32%: the nearest, 6x224 or 7x192 (34.4%), said in the report
    assert rep["ratio_band"]["within"] is False and rep["ratio_achieved"] == pytest.approx(0.34375)
    assert rep["ratio_band"]["nearest_feasible"]["ratio"] == pytest.approx(rep["ratio_achieved"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["moe_intermediate_size"] == widths.pop() and cfg["num_experts"] == rep["experts_kept"][0]
    plan = plan_export(out)
    assert not plan.padded  # llama.cpp stores exactly what was kept
    g = tmp_path / "p.gguf"
    export(str(out), str(g), "Q8_0", progress=False)
    exps = [t for t in gguf.GGUFReader(g).tensors if "_exps." in t.name]
    assert len({tuple(int(x) for x in t.shape) for t in exps if "down" not in t.name}) == 1


def test_ratio_reports_the_bytes_the_type_fallback_costs(wide, tmp_path: pathlib.Path) -> None:
    """R=0.5 on 8 experts x 256: the band holds 4 x 256 and 8 x 128; attribution keeps every
    expert (8 x 128), whose ffn_down rows are no multiple of 256. The report and stderr say what
    the GGUF at Q4_K_M will weigh, what llama.cpp's fallback adds, and the aligned shape of the
    band with its bytes; the exported file weighs what was said."""
    model, calib = wide
    out = tmp_path / "p"
    r = CliRunner().invoke(cli, ["prune", str(model), "--calib", str(calib), "--ratio", "0.5", "--layout", "llama.cpp", "--probe", "0", "--no-reconstruct", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "prune_report.json").read_text())
    assert (rep["deployable"]["experts"], rep["deployable"]["width"]) == (8, 128)
    assert rep["fallback_bytes"] == sum(f["extra_bytes"] for f in rep["ffn_down_exps_fallback"].values()) > 0
    assert rep["bytes_ratio_at_quant"] == pytest.approx(1 - rep["predicted_bytes_at_quant"] / rep["unpruned_bytes_at_quant"])
    alt = rep["aligned_alternative"]
    assert (alt["experts"], alt["width"], alt["ratio"]) == (4, 256, 0.5) and alt["bytes_at_quant"] < rep["predicted_bytes_at_quant"]
    note = next(line for line in r.stderr.splitlines() if "no multiple of 256" in line)
    assert f"+{rep['fallback_bytes']:,} bytes" in note and "--experts 4 --width 256" in note and f"{alt['bytes_at_quant']:,} bytes" in note
    g = tmp_path / "p.gguf"
    export(str(out), str(g), "Q4_K_M", progress=False)
    assert abs(g.stat().st_size - rep["predicted_bytes_at_quant"]) <= 256  # only the file name's length differs


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
