"""prune --reconstruct: joint ridge refit of kept experts' down_proj against the unpruned block
output under the pruned routing."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from conftest import REFERENCE
from moe2gguf.prune.calibrate import calibrate, spread_windows, tokenize
from moe2gguf.prune.prune import prune
from moe2gguf.prune.reconstruct import Normal, block_error, solve_down


def test_solve_recovers_a_linear_map_and_error_is_the_residual() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 12, generator=g, dtype=torch.float64)
    d_true = torch.randn(5, 12, generator=g, dtype=torch.float64)
    y = f @ d_true.T + 0.01 * torch.randn(500, 5, generator=g, dtype=torch.float64)
    eq = Normal(12, 5)
    eq.add(f[:200], y[:200])
    eq.add(f[200:], y[200:])
    d0 = torch.zeros(5, 12, dtype=torch.float64)
    d = solve_down(eq, d0, ridge=1e-9)
    assert torch.allclose(d, d_true, atol=5e-3)
    assert block_error(eq, d) == pytest.approx(float(((y - f @ d.T) ** 2).sum()), rel=1e-6)
    assert block_error(eq, d) < block_error(eq, d0)
    # a large ridge keeps D near D0 (the pruned model's own weights), not near zero
    assert torch.allclose(solve_down(eq, d_true, ridge=1e6), d_true, atol=1e-3)


def _logit_error(path: pathlib.Path, base: pathlib.Path, wins) -> float:  # noqa: ANN001
    from moe2gguf.modeling import load_model

    ref, _, _ = load_model(str(base))
    m, _, _ = load_model(str(path))
    ids = torch.from_numpy(wins)
    with torch.no_grad():
        return float(((m(input_ids=ids).logits - ref(input_ids=ids).logits) ** 2).mean())


def test_reconstruction_lowers_the_error_on_calibration_tokens(tiny_qwen3moe: pathlib.Path, tmp_path: pathlib.Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text((REFERENCE / "calib.txt").read_text()[:20000])
    calibrate(str(tiny_qwen3moe), [str(text)], str(tmp_path / "calib"), tokens=1024, ctx=64)
    plain = prune(str(tiny_qwen3moe), str(tmp_path / "calib"), 0.25, str(tmp_path / "plain"), method="frequency")
    rec = prune(str(tiny_qwen3moe), str(tmp_path / "calib"), 0.25, str(tmp_path / "rec"), method="frequency", reconstruct=True)
    assert plain["reconstruct"] is None and plain["experts_kept"] == rec["experts_kept"] == [6, 6]
    for layer in rec["reconstruct"].values():
        assert layer["rel_err_after"] < 0.9 * layer["rel_err_before"]
    assert json.loads((tmp_path / "rec" / "prune_report.json").read_text())["reconstruct"] == rec["reconstruct"]
    wins = spread_windows(tokenize(tiny_qwen3moe, [str(text)]), [str(text)], 1024, 64)
    assert _logit_error(tmp_path / "rec", tiny_qwen3moe, wins) < 0.9 * _logit_error(tmp_path / "plain", tiny_qwen3moe, wins)


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 1], ids=["all-rows", "row-by-row"])
def test_blockwise_solver_reaches_the_joint_solution(chunk_bytes: int, tiny_qwen3moe: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above JOINT_LIMIT the same ridge least squares is solved matrix-free, in chunks of rows
    of D where D is large; it must land where the dense solve does."""
    from safetensors.torch import load_file

    import moe2gguf.prune.reconstruct as R

    text = tmp_path / "calib.txt"
    text.write_text((REFERENCE / "calib.txt").read_text()[:20000])
    calibrate(str(tiny_qwen3moe), [str(text)], str(tmp_path / "calib"), tokens=1024, ctx=64)
    joint = prune(str(tiny_qwen3moe), str(tmp_path / "calib"), 0.25, str(tmp_path / "joint"), method="frequency", reconstruct=True)
    monkeypatch.setattr(R, "JOINT_LIMIT", 0)
    monkeypatch.setattr(R, "CG_TOL", 1e-6)  # run to convergence: the same minimiser
    monkeypatch.setattr(R, "CG_ITERS", 500)
    monkeypatch.setattr(R, "CG_CHUNK_BYTES", chunk_bytes)
    block = prune(str(tiny_qwen3moe), str(tmp_path / "calib"), 0.25, str(tmp_path / "block"), method="frequency", reconstruct=True)
    assert {v["solver"] for v in joint["reconstruct"].values()} == {"joint"}
    assert {v["solver"] for v in block["reconstruct"].values()} == {"blockwise CG"}
    for b in joint["reconstruct"]:
        assert block["reconstruct"][b]["rel_err_after"] == pytest.approx(joint["reconstruct"][b]["rel_err_after"], rel=1e-4)
        assert block["reconstruct"][b]["rel_err_before"] == pytest.approx(joint["reconstruct"][b]["rel_err_before"], rel=1e-6)
    a, c = load_file(tmp_path / "joint" / "model.safetensors"), load_file(tmp_path / "block" / "model.safetensors")
    downs = [k for k in a if "down_proj" in k]
    assert downs and all(torch.allclose(a[k].float(), c[k].float(), rtol=1e-3, atol=1e-5) for k in downs)


@pytest.mark.parametrize("widths", [[4, 4, 4], [3, 6, 5]], ids=["equal-widths", "ragged-widths"])
def test_blockwise_solve_matches_the_dense_ridge_solution(widths: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The matrix-free solver, fed the sparse per-expert features, lands on the dense solve's D
    for equal widths (the llama.cpp layout's batched preconditioner) and ragged ones."""
    import moe2gguf.prune.reconstruct as R

    monkeypatch.setattr(R, "CG_TOL", 1e-7)
    monkeypatch.setattr(R, "CG_ITERS", 500)
    g = torch.Generator().manual_seed(2)
    tokens, hidden, offs = 300, 7, [0]
    for w in widths:
        offs.append(offs[-1] + w)
    dense = torch.zeros(tokens, offs[-1])
    parts = []
    for xid, w in enumerate(widths):
        tok = torch.randperm(tokens, generator=g)[: tokens // 2].sort().values
        f = torch.randn(len(tok), w, generator=g)
        dense[tok, offs[xid] : offs[xid + 1]] = f
        parts.append((xid, tok, f))
    y = dense @ torch.randn(hidden, offs[-1], generator=g).T + 0.1 * torch.randn(tokens, hidden, generator=g)
    d0 = [torch.randn(hidden, w, generator=g) for w in widths]
    eq = R.Normal(offs[-1], hidden)
    eq.add(dense, y)
    want = R.solve_down(eq, torch.cat(d0, 1), ridge=1e-2)
    bw = R.Blockwise(widths, hidden)
    half = tokens // 2  # two batches, as the layer pass feeds them
    for lo, hi in ((0, half), (half, tokens)):
        bw.add([(x, t[(t >= lo) & (t < hi)] - lo, f[(t >= lo) & (t < hi)]) for x, t, f in parts], y[lo:hi])
    got = bw.solve(d0, ridge=1e-2)
    assert torch.allclose(torch.cat(got, 1).double(), want, atol=1e-4, rtol=1e-4)
    assert bw.after == pytest.approx(block_error(eq, want), rel=1e-4)
    assert bw.before == pytest.approx(block_error(eq, torch.cat(d0, 1).double()), rel=1e-5)
