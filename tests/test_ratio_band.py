"""`prune --ratio R --layout llama.cpp` removes R of the routed-expert parameters: within 2 points
of R on every family's tiny model and on the bundled one, or, where no shape the layout can hold
is that close, at the nearest one, printed on stderr and recorded in prune_report.json.

The tiny models' experts are 48 wide, so the layout offers widths 32 and 48 (blocks of 32) and
the achievable ratios are 1 - K/8 and 1 - K/12: the shapes that once won the probe at R=0.25
(8 x 32, ratio 0.333; 7 x 32, 0.417) are outside the band, and R=0.3 has no shape within it.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest
from click.testing import CliRunner

from conftest import REFERENCE, build_tiny
from moe2gguf.cli import cli
from moe2gguf.prune.calibrate import calibrate
from test_families import FAMILIES as ROWS

W, E, TOP_K = 48, 8, 2


def _families() -> dict[str, tuple[type, object, int]]:
    """name -> (HF class, config with experts 48 wide, router groups), from tests/test_families.py's table."""
    return {name: (f.cls, f.config(**{f.config_width_key: W}), f.groups) for name, f in ROWS.items()}


FAMILIES = ["qwen3moe", "qwen2moe", "deepseek-v2", "deepseek-v3", "mixtral", "olmoe"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path, int]:
    cls, config, groups = _families()[request.param]
    d = tmp_path_factory.mktemp(request.param)
    model = build_tiny(cls, config, d / "model")
    text = d / "calib.txt"
    text.write_text((REFERENCE / "calib.txt").read_text()[:20000])  # enough tokens, fast to tokenize
    calibrate(str(model), [str(text)], str(d / "calib"), tokens=512, ctx=64)
    return model, d / "calib", groups


def _achievable(groups: int) -> set[float]:
    """Every ratio a K x W shape reaches here, from the numbers alone: widths 32 and 48, K from
    top-k (grouped: a multiple of the group count from 4) to 8, the unpruned shape left out."""
    k_min = 2 * TOP_K if groups > 1 else TOP_K
    return {1 - k * w / (E * W) for k in range(k_min, E + 1) if k % groups == 0 for w in (32, 48)} - {0.0}


def _prune(model: pathlib.Path, calib: pathlib.Path, ratio: float, out: pathlib.Path, *extra: str) -> tuple[dict, str]:
    r = CliRunner().invoke(cli, ["prune", str(model), "--calib", str(calib), "--ratio", str(ratio), "--layout", "llama.cpp", "-o", str(out), *extra])
    assert r.exit_code == 0, r.output
    return json.loads((out / "prune_report.json").read_text()), r.stderr


@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.5])
def test_ratio_lands_in_the_band_or_at_the_printed_nearest_shape(family, ratio: float, tmp_path: pathlib.Path) -> None:
    model, calib, groups = family
    # the probe still measures every candidate; the re-fit (which does not move the ratio) is off for time
    rep, err = _prune(model, calib, ratio, tmp_path / "p", "--no-reconstruct")
    got = rep["ratio_achieved"]
    reachable = _achievable(groups)
    nearest = min(abs(r - ratio) for r in reachable)
    if nearest <= 0.02 + 1e-9:
        assert abs(got - ratio) <= 0.02 + 1e-9, (got, rep["deployable"])
        assert rep["ratio_band"]["within"] is True and "nearest feasible" not in err
        # the probe only measured shapes inside the band
        assert all(abs(1 - s["params"] / rep["params_routed_before"] - ratio) <= 0.02 + 1e-9 for s in rep["shapes_considered"] if "probe_kld" in s)
    else:
        m = re.search(r"nearest feasible: (\d+) experts x width (\d+), ratio ([0-9.]+)", err)
        assert m, err
        assert abs(got - ratio) == pytest.approx(nearest) and got == pytest.approx(float(m.group(3)), abs=1e-4)
        assert (int(m.group(1)), int(m.group(2))) == (rep["deployable"]["experts"], rep["deployable"]["width"])
        assert rep["ratio_band"]["nearest_feasible"]["ratio"] == pytest.approx(got)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    d = tmp_path_factory.mktemp("bundled")
    calibrate(str(REFERENCE), [str(REFERENCE / "calib.txt")], str(d / "calib"), tokens=2048, ctx=256)
    return REFERENCE, d / "calib"


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_bundled_model_lands_within_2_points(bundled, ratio: float, tmp_path: pathlib.Path) -> None:
    model, calib = bundled
    rep, err = _prune(model, calib, ratio, tmp_path / "p", "--no-reconstruct")
    assert abs(rep["ratio_achieved"] - ratio) <= 0.02 + 1e-9, rep["deployable"]
    assert "nearest feasible" not in err
