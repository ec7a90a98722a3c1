"""prune: exact rewrite, zero-attribution removal, report/budget, reload + inspect, bad input."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import REFERENCE, save_tiny, tiny_qwen3moe_config
from moe2gguf.arch import arch_for_config
from moe2gguf.checkpoint import Checkpoint, read_prune_map
from moe2gguf.cli import cli
from moe2gguf.inspect import inspect_model
from moe2gguf.modeling import load_model
from moe2gguf.prune.allocate import Allocation
from moe2gguf.prune.calibrate import calibrate
from moe2gguf.prune.prune import prune
from moe2gguf.prune.rewrite import refit_down, write_pruned



@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The head of the reference calibration text: enough tokens, fast to tokenize."""
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text((REFERENCE / "calib.txt").read_text()[:20000])
    return str(p)
IDS = torch.randint(3, 4000, (2, 48), generator=torch.Generator().manual_seed(1))


def _logits(path: pathlib.Path) -> torch.Tensor:
    model, _, _ = load_model(str(path))
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture
def calib(tiny_qwen3moe: pathlib.Path, tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    out = tmp_path / "calib"
    calibrate(str(tiny_qwen3moe), [text], str(out), tokens=512, ctx=64)
    return out


def test_rewrite_with_all_channels_kept_is_exact(tiny_qwen3moe: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """Every channel kept, each expert's listed in its own shuffled order: the rewrite takes gate
    rows, up rows and down columns in that one order (so the logits are the unpruned ones up to
    the order of the down projection's sum), and with random Gram matrices given it copies an
    expert that loses nothing rather than refitting it (the written columns are the originals)."""
    ckpt = Checkpoint(tiny_qwen3moe)
    arch = arch_for_config(ckpt.config)
    g = torch.Generator().manual_seed(0)
    perms = [[torch.randperm(32, generator=g) for _ in range(8)] for _ in range(2)]
    assert all(not torch.equal(p, torch.arange(32)) for layer in perms for p in layer)
    out = tmp_path / "out"
    out.mkdir()
    grams = {b: torch.rand(8, 32, 32, generator=g) for b in range(2)}
    write_pruned(ckpt, arch, Allocation(perms), out, grams)
    assert torch.allclose(_logits(out), _logits(tiny_qwen3moe), rtol=1e-5, atol=1e-5)
    written = load_file(out / "model.safetensors")
    for b, e in ((0, 0), (1, 5)):
        p = perms[b][e]
        assert torch.equal(written[arch.expert_name(b, e, "gate")], ckpt.tensor(arch.expert_name(b, e, "gate"))[p])
        assert torch.equal(written[arch.expert_name(b, e, "down")], ckpt.tensor(arch.expert_name(b, e, "down"))[:, p])


def test_removing_zero_attribution_channels_changes_nothing(tmp_path: pathlib.Path, text: str) -> None:
    """Channels whose down_proj column is zero contribute nothing, so their attribution is 0;
    coverage pruning by exactly their share must remove them and leave the logits unchanged."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    src = save_tiny(Qwen3MoeForCausalLM(tiny_qwen3moe_config()), tmp_path / "m")
    t = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    dead = {}
    for name in t:
        if name.endswith("down_proj.weight"):
            dead[name] = torch.randperm(32, generator=g)[:8]  # 8 of 32 channels in every expert
            t[name][:, dead[name]] = 0
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    cal = tmp_path / "calib"
    calibrate(str(src), [text], str(cal), tokens=512, ctx=64)
    out = tmp_path / "out"
    rep = prune(str(src), str(cal), 0.25, str(out), "coverage", "ragged", refit=False)
    assert rep["coverage"] == pytest.approx(1.0)
    pmap = read_prune_map(out)
    for bid, (experts, channels) in pmap.items():
        assert experts == list(range(8))
        for x, ch in zip(experts, channels):
            assert set(ch).isdisjoint(dead[f"model.layers.{bid}.mlp.experts.{x}.down_proj.weight"].tolist())
    assert torch.allclose(_logits(out), _logits(src), atol=1e-5)
    # the least-squares refit must not undo that: kept columns stay (up to the tiny ridge)
    out2 = tmp_path / "out2"
    prune(str(src), str(cal), 0.25, str(out2), "coverage", "ragged", refit=True)
    assert torch.allclose(_logits(out2), _logits(src), atol=1e-3)


def test_refit_reduces_the_output_error_on_correlated_channels() -> None:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 12, generator=g, dtype=torch.float64)
    h = torch.randn(500, 6, generator=g, dtype=torch.float64) @ mix  # 12 channels, rank 6
    down = torch.randn(5, 12, generator=g, dtype=torch.float64)
    keep = torch.arange(8)
    ref = h @ down.T
    plain = h[:, keep] @ down[:, keep].T
    fitted = h[:, keep] @ refit_down(down, h.T @ h, keep, ridge=1e-9).T
    assert (fitted - ref).norm() < 1e-3 * (plain - ref).norm()


def test_refit_keeps_the_columns_of_channels_calibration_never_reached() -> None:
    """A kept channel with no calibration activation has nothing to fit: its down_proj column
    stays as trained (a ridge toward zero erased it), while the reached ones are refit."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(400, 12, generator=g, dtype=torch.float64)
    h[:, 3:6] = 0.0  # channels 3..5 never fire on the calibration text
    h[:, 8:] = h[:, :4] @ torch.randn(4, 4, generator=g, dtype=torch.float64)  # removed ones correlate
    down = torch.randn(5, 12, generator=g, dtype=torch.float64)
    keep = torch.arange(8)
    new = refit_down(down, h.T @ h, keep)
    assert torch.equal(new[:, 3:6], down[:, 3:6])
    assert (new[:, :3] - down[:, :3]).abs().max() > 0.1
    ref = h @ down.T
    assert (h[:, keep] @ new.T - ref).norm() < 1e-2 * (h[:, keep] @ down[:, keep].T - ref).norm()


@pytest.mark.parametrize("method", ["coverage", "uniform", "magnitude", "reap", "frequency"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_report_budget_reload_and_inspect(method: str, ratio: float, tiny_qwen3moe: pathlib.Path, calib: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["prune", str(tiny_qwen3moe), "--calib", str(calib), "--ratio", str(ratio), "-o", str(out), "--method", method, "--layout", "ragged"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "prune_report.json").read_text())
    for k in ("method", "layout", "ratio_requested", "ratio_achieved", "widths", "experts_kept", "coverage"):
        assert k in rep
    assert rep["ratio_achieved"] >= ratio - 1e-9  # never over budget
    assert abs(rep["ratio_achieved"] - ratio) <= 0.005
    assert len(rep["widths"]) == 2 and all(len(w) == 8 for w in rep["widths"])
    assert rep["experts_kept"] == [sum(1 for w in layer if w) for layer in rep["widths"]]
    assert all(k >= 2 for k in rep["experts_kept"])  # top-2 routing stays possible
    info = inspect_model(str(out))
    assert info["expert_widths"] == [[w for w in layer if w] for layer in rep["widths"]]
    assert 1 - info["params_routed_experts"] / inspect_model(str(tiny_qwen3moe))["params_routed_experts"] == pytest.approx(rep["ratio_achieved"])
    logits = _logits(out)
    assert torch.isfinite(logits).all()
    assert (out / "tokenizer.json").is_file() and (out / "prune_map.safetensors").is_file()


def test_prune_shows_its_rewrite_per_layer_with_an_eta(tiny_qwen3moe: pathlib.Path, calib: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The rewrite's refit takes 55 s an expert at Mixtral-8x7B's size (8 a layer), 7 s a layer at
    Qwen3-30B-A3B's: it shows the layers done, of how many, and the time left."""
    r = CliRunner().invoke(cli, ["prune", str(tiny_qwen3moe), "--calib", str(calib), "--ratio", "0.25", "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert re.search(r"rewrite: 100%.* 2/2 \[\d\d:\d\d<\d\d:\d\d", r.stderr), r.stderr


def test_ratio_outside_0_1_is_exit_2(tiny_qwen3moe: pathlib.Path, calib: pathlib.Path, tmp_path: pathlib.Path) -> None:
    for bad in ("0", "1", "1.5", "-0.2"):
        out = tmp_path / "out"
        r = CliRunner().invoke(cli, ["prune", str(tiny_qwen3moe), "--calib", str(calib), "--ratio", bad, "-o", str(out)])
        assert r.exit_code == 2 and "--ratio" in r.output, r.output
        assert not out.exists()


def test_calib_from_another_model_is_exit_2(calib: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from transformers import Qwen3MoeForCausalLM

    other = save_tiny(Qwen3MoeForCausalLM(tiny_qwen3moe_config(moe_intermediate_size=16)), tmp_path / "other")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["prune", str(other), "--calib", str(calib), "--ratio", "0.25", "-o", str(out)])
    assert r.exit_code == 2 and "another model" in r.output, r.output
    assert "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("args", [["--method", "coverage", "--min-width", "32"], ["--method", "frequency"], ["--method", "reap"]])
def test_unreachable_budget_is_exit_2(args: list[str], tiny_qwen3moe: pathlib.Path, calib: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A floor above the budget, or dropping whole experts below top-k experts, is refused, not silently missed."""
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["prune", str(tiny_qwen3moe), "--calib", str(calib), "--ratio", "0.9", "-o", str(out), "--layout", "ragged", *args])
    assert r.exit_code == 2 and "lower --" in r.output, r.output
    assert not out.exists()


def test_rewrite_streams_into_shards_that_reload_identically(tiny_qwen3moe: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A big model is rewritten layer by layer into bounded shards (+ index), never held whole."""
    ckpt = Checkpoint(tiny_qwen3moe)
    arch = arch_for_config(ckpt.config)
    alloc = Allocation([[torch.arange(0, 32, 2) if x % 3 else torch.empty(0, dtype=torch.int64) for x in range(8)] for _ in range(2)])
    one, many = tmp_path / "one", tmp_path / "many"
    one.mkdir()
    many.mkdir()
    write_pruned(ckpt, arch, alloc, one)
    write_pruned(ckpt, arch, alloc, many, shard_bytes=64 << 10)
    shards = sorted(p.name for p in many.glob("*.safetensors") if p.name != "prune_map.safetensors")
    assert len(shards) > 2 and shards[0].startswith("model-00001-of-")
    assert (many / "model.safetensors.index.json").is_file() and not list(many.glob(".shard-*"))
    assert [p.name for p in one.glob("model*.safetensors")] == ["model.safetensors"]
    assert torch.equal(_logits(many), _logits(one))


def test_one_count_one_width_checkpoint_loads_in_stock_transformers(tiny_qwen3moe: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The deployable shape (K experts of width W everywhere) is a plain HF checkpoint: the
    config's count/width keys, aliases included, say K and W, and transformers loads it."""
    from transformers import AutoModelForCausalLM

    ckpt = Checkpoint(tiny_qwen3moe)
    arch = arch_for_config(ckpt.config)
    alloc = Allocation([[torch.arange(16) if x < 6 else torch.empty(0, dtype=torch.int64) for x in range(8)] for _ in range(2)])
    out = tmp_path / "out"
    out.mkdir()
    write_pruned(ckpt, arch, alloc, out)
    info = inspect_model(str(out))
    assert info["experts_routed"] == 6 and info["expert_width"] == 16
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(stock(IDS).logits, _logits(out), atol=1e-5)


def test_refit_reads_the_gram_matrices_calibrate_wrote_per_layer(tiny_qwen3moe: pathlib.Path, calib: pathlib.Path, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CALIB keeps each layer's Gram matrices in gram/layer-N.safetensors (never all in RAM);
    prune's refit reads them a layer at a time and gives what the older one-file CALIB gave,
    and what a CALIB gives whose layers' matrices are split over several files (as calibrate
    splits wide experts', and a layer written again in fewer files leaves none of the old
    split's parts); without them prune says so and the report records why; a damaged or
    missing one is one line, exit 2."""
    import shutil

    from safetensors import safe_open

    from moe2gguf.calib import gram_file, gram_part
    from moe2gguf.prune import gram as gram_module
    from moe2gguf.prune.gram import write_grams

    with safe_open(calib / "scores.safetensors", framework="pt") as f:
        assert not [k for k in f.keys() if "gram" in k]
    for bid in range(2):
        with safe_open(gram_file(calib, bid), framework="pt") as f:
            assert sorted(f.keys(), key=int) == [str(x) for x in range(8)]
            g = f.get_tensor("0")
        assert g.shape == (32, 32) and torch.allclose(g, g.T) and float(torch.linalg.eigvalsh(g.double()).min()) > -1e-6 * float(g.diagonal().max())
    args = ["prune", str(tiny_qwen3moe), "--ratio", "0.3", "--layout", "ragged"]
    r = CliRunner().invoke(cli, [*args, "--calib", str(calib), "-o", str(tmp_path / "new")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "new" / "prune_report.json").read_text())["refit_down"] is True

    old = tmp_path / "old-calib"  # the earlier layout: the Gram matrices inside scores.safetensors
    shutil.copytree(calib, old)
    t = load_file(str(old / "scores.safetensors"))
    for bid in range(2):
        t[f"layers.{bid}.gram"] = torch.stack([load_file(str(gram_file(old, bid)))[str(x)] for x in range(8)])
    save_file(t, str(old / "scores.safetensors"))
    shutil.rmtree(old / "gram")
    r = CliRunner().invoke(cli, [*args, "--calib", str(old), "-o", str(tmp_path / "old")])
    assert r.exit_code == 0, r.output
    new_w, old_w = load_file(str(tmp_path / "new" / "model.safetensors")), load_file(str(tmp_path / "old" / "model.safetensors"))
    assert new_w.keys() == old_w.keys() and all(torch.equal(new_w[k], old_w[k]) for k in new_w)

    parts = tmp_path / "parts-calib"  # a layer's matrices over several files: here one per expert
    shutil.copytree(calib, parts)
    shutil.rmtree(parts / "gram")
    monkeypatch.setattr(gram_module, "PART_BYTES", 1)
    for bid in range(2):
        layer = load_file(str(gram_file(calib, bid)))
        write_grams(parts, bid, [32] * 8, lambda x, layer=layer: layer[str(x)])
    assert len(list((parts / "gram").iterdir())) == 16
    r = CliRunner().invoke(cli, [*args, "--calib", str(parts), "-o", str(tmp_path / "parts")])
    assert r.exit_code == 0, r.output
    parts_w = load_file(str(tmp_path / "parts" / "model.safetensors"))
    assert parts_w.keys() == new_w.keys() and all(torch.equal(new_w[k], parts_w[k]) for k in new_w)
    gram_part(parts, 1, 5).unlink()  # experts 5-7 of layer 1 are no longer found
    r = CliRunner().invoke(cli, [*args, "--calib", str(parts), "-o", str(tmp_path / "parts-bad")])
    assert r.exit_code == 2 and "expert 5" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "parts-bad").exists()
    monkeypatch.undo()  # the layers written again, one file each: the parts left of the split are no longer read
    for bid in range(2):
        layer = load_file(str(gram_file(calib, bid)))
        write_grams(parts, bid, [32] * 8, lambda x, layer=layer: layer[str(x)])
    assert sorted(p.name for p in (parts / "gram").iterdir()) == ["layer-0.safetensors", "layer-1.safetensors"]
    r = CliRunner().invoke(cli, [*args, "--calib", str(parts), "-o", str(tmp_path / "parts-joined")])
    assert r.exit_code == 0, r.output
    joined_w = load_file(str(tmp_path / "parts-joined" / "model.safetensors"))
    assert all(torch.equal(new_w[k], joined_w[k]) for k in new_w)

    none = tmp_path / "no-gram"
    shutil.copytree(calib, none)
    shutil.rmtree(none / "gram")
    r = CliRunner().invoke(cli, [*args, "--calib", str(none), "-o", str(tmp_path / "unfit")])
    assert r.exit_code == 0 and "no Gram matrices" in r.output, r.output
    rep = json.loads((tmp_path / "unfit" / "prune_report.json").read_text())
    assert rep["refit_down"] is False and "calibrate" in rep["refit_skipped"]

    one_layer = tmp_path / "one-layer-gram"  # layer 0's matrices there, layer 1's lost: damaged, not a CALIB without them
    shutil.copytree(calib, one_layer)
    gram_file(one_layer, 1).unlink()
    r = CliRunner().invoke(cli, [*args, "--calib", str(one_layer), "-o", str(tmp_path / "one")])
    assert r.exit_code == 2 and "layer-1.safetensors" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "one").exists()

    gram_file(calib, 1).write_bytes(gram_file(calib, 1).read_bytes()[:100])  # truncated
    r = CliRunner().invoke(cli, [*args, "--calib", str(calib), "-o", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "layer-1.safetensors" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_prune_on_a_device_torch_cannot_see_is_exit_2_before_any_work(device: str, tiny_qwen3moe: pathlib.Path, calib: pathlib.Path,
                                                                      tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--device for the shape probe, as for calibrate: with no such GPU (forced, so a GPU machine
    runs this too) one line naming the device and the fix, and nothing written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    out = tmp_path / "pruned"
    r = CliRunner().invoke(cli, ["prune", str(tiny_qwen3moe), "--calib", str(calib), "--ratio", "0.25", "--layout", "llama.cpp", "-o", str(out), "--device", device])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and f"--device {device}" in lines[0] and "--device cpu" in lines[0] and "Traceback" not in r.output
    assert not out.exists() and not list(tmp_path.glob(".pruned*"))
