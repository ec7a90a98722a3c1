"""Memory that must not grow with the model: what tools/bench_scale.py measured at Qwen3-30B-A3B's
layer size, pinned on small models (issue 14)."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_qwen3moe_config
from moe2gguf import checkpoint
from moe2gguf.checkpoint import Checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def _status(key: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _save(tmp_path: pathlib.Path, shard: str) -> pathlib.Path:
    """A bf16 Qwen3-MoE of 4 layers (~13 MB each), in shards of at most `shard`."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = tiny_qwen3moe_config(num_hidden_layers=4, hidden_size=512, moe_intermediate_size=512, num_experts=8, head_dim=64)
    model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m", max_shard_size=shard)
    return tmp_path / "m"


@pytest.fixture
def sharded(tmp_path: pathlib.Path) -> pathlib.Path:
    return _save(tmp_path, "16MB")


@pytest.mark.parametrize("shard, window", [("16MB", 32 << 20), ("200MB", 4 << 20)], ids=["5-shards-window-above-shard", "1-shard-window-4MB"])
def test_streaming_every_tensor_leaves_no_file_pages_in_rss(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, shard: str, window: int) -> None:
    """Reading a checkpoint tensor by tensor (as calibrate, prune and export stream it) keeps at
    most MAP_WINDOW of mapped shard pages in the process's RSS once the tensors are dropped, over
    many shards or within one: with every shard left mapped, the whole model's bytes stayed
    resident (3.5 GB at two Qwen3-30B-A3B layers in bench_scale)."""
    monkeypatch.setattr(checkpoint, "MAP_WINDOW", window)
    ckpt = Checkpoint(_save(tmp_path, shard))
    total = sum(ckpt.numel(n) * 2 for n in ckpt.tensor_names)
    before = _status("RssFile")
    for name in ckpt.tensor_names:
        ckpt.tensor(name).float().sum()  # touch every page, then drop the tensor
    grown = _status("RssFile") - before
    assert total > 40 << 20
    # one window at most is still mapped (the last shard's handle, below its window), however
    # many shards were read: with a window per shard left open this grew with the shard count
    assert grown <= window + (4 << 20), (grown, total)


def _windows(n: int, ctx: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 4096, size=(n, ctx), dtype=np.int64)


def test_calibration_holds_bf16_experts_as_stored_with_identical_statistics(sharded: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """calibrate keeps a bf16 checkpoint's experts at 2 bytes a parameter (computed in float32,
    upcast per call): a layer costs about half its float32 size, which is what kept two
    Qwen3-30B-A3B layers' calibration above 1.5x (layer + embeddings + head), and every
    statistic is bit-identical to the all-float32 pass."""
    from moe2gguf.arch import arch_for_config
    from moe2gguf.prune import calibrate as C

    def run() -> tuple[dict[str, torch.Tensor], int]:
        ckpt = Checkpoint(sharded)
        arch = arch_for_config(ckpt.config)
        cal = C.Calibration(ckpt, arch, _windows(2, 32), gram=False)
        cal.run()
        return cal.score_tensors(), cal.layer_bytes

    scores, held = run()
    plain = C.load_weights
    monkeypatch.setattr(C, "load_weights", lambda m, p, ck, dt, **_: plain(m, p, ck, dt))
    scores_f32, held_f32 = run()
    assert held < 0.6 * held_f32, (held, held_f32)
    assert scores.keys() == scores_f32.keys()
    for k, v in scores.items():
        assert torch.equal(v, scores_f32[k]), k


def _peak_during(f) -> int:  # noqa: ANN001
    """How far the process's RSS peaked above where it stood, while f() ran (Linux's VmHWM,
    reset first), with glibc's freed pages handed back before, so the last test's do not count."""
    from moe2gguf.memory import trim

    trim()
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    f()
    return _status("VmHWM") - before


def test_calibration_reads_each_expert_as_it_runs_holding_one_not_its_layer(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """calibrate reads an expert's weights from the checkpoint while it runs and lets them go
    after: its peak stays below a whole layer's experts (23 GB at DeepSeek-V3's size, 1.2 GB at
    Qwen3-30B-A3B's, where the peak fell from 2.32 to 1.33 GiB in tools/bench_scale.py), and
    every statistic is bit-identical to the pass that held the layer."""
    from transformers import Qwen3MoeForCausalLM

    from moe2gguf.arch import arch_for_config
    from moe2gguf.prune import calibrate as C

    torch.manual_seed(0)
    cfg = tiny_qwen3moe_config(num_hidden_layers=2, hidden_size=512, moe_intermediate_size=2048, num_experts=16, head_dim=64)
    Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(checkpoint, "MAP_WINDOW", 1 << 20)  # mapped pages read from stay in RSS up to it
    ckpt = Checkpoint(tmp_path / "m")
    experts = sum(ckpt.numel(n) * 2 for n in ckpt.tensor_names if "layers.0.mlp.experts." in n)
    assert experts == 96 << 20  # large beside what the heap of a long test session adds or takes

    def run() -> dict[str, torch.Tensor]:
        cal = C.Calibration(ckpt, arch_for_config(ckpt.config), _windows(2, 32), gram=False)
        cal.run()
        assert cal.layer_bytes > experts  # what prune's block re-fit weighs: the whole layer's
        return cal.score_tensors()

    run()  # torch's first-call set-up, which would count in the first measured peak
    got: list[dict[str, torch.Tensor]] = []
    streamed = _peak_during(lambda: got.append(run()))
    plain = C.load_weights
    monkeypatch.setattr(C, "load_weights", lambda m, p, ck, dt, **_: plain(m, p, ck, dt, experts_as_stored=True))
    whole = _peak_during(lambda: got.append(run()))
    assert whole > experts
    assert streamed < whole - experts / 2, (streamed, whole, experts)
    for k, v in got[0].items():
        assert torch.equal(v, got[1][k]), k


def test_taylor_pass_is_skipped_where_it_would_hold_more_than_a_layer() -> None:
    """The full-model backward holds the whole model in float32: it is refused for two layers of
    Qwen3-30B-A3B (7 GiB, where it ran and passed 16 GiB) even on a machine with memory to
    spare, and still runs for the bundled model."""
    from moe2gguf.prune.calibrate import taylor_refusal

    two_layers = 1_870_000_000 * 4
    assert taylor_refusal(two_layers, ram=256 << 30) is not None
    assert taylor_refusal(16_290_192 * 2, ram=8 << 30) is None


def test_bf16_intermediate_stacks_experts_in_bf16_bit_exact(sharded: pathlib.Path) -> None:
    """export's BF16 intermediate of a bf16 checkpoint assembles each stacked expert tensor in
    bf16, 2 bytes a parameter (it went through float32: twice the memory, and the writer took
    152 s against convert_hf_to_gguf's 86 s at two Qwen3-30B-A3B layers), holding the
    checkpoint's bits exactly."""
    from moe2gguf.exporter.writer import plan_export

    plan = plan_export(sharded, "BF16")
    ckpt, arch = plan.ckpt, plan.arch
    experts = [p for p in plan.tensors if p.name == arch.gguf_expert_name(1, "down")]
    assert len(experts) == 1
    got = experts[0].load()
    assert got.dtype == torch.bfloat16
    want = torch.stack([ckpt.tensor(arch.expert_name(1, x, "down")) for x in range(arch.n_experts)])
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_peak_log_gives_each_step_its_own_high_water_mark(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$MOE2GGUF_PEAK_LOG (what tools/bench_scale.py reads to show where a pass peaks): each
    release_freed() logs the peak RSS since the previous one, so a 256 MB tensor freed inside a
    step shows in that step and not in the next, and the line names the caller."""
    from moe2gguf.memory import release_freed

    log = tmp_path / "peaks"
    monkeypatch.setenv("MOE2GGUF_PEAK_LOG", str(log))
    release_freed()  # the first step: everything before this test
    x = torch.ones(64 << 20)  # 256 MB, every page touched
    del x
    release_freed()
    release_freed()
    rows = [line.split("\t") for line in log.read_text().splitlines()]
    assert len(rows) == 3
    with_tensor, after = int(rows[1][1]), int(rows[2][1])
    assert with_tensor - after >= 200 << 20, (with_tensor, after)
    assert rows[1][2].endswith("test_peak_log_gives_each_step_its_own_high_water_mark")


def _held_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage alive in this process (each storage once)."""
    import gc

    import warnings

    gc.collect()  # cycles freed or not during the pass would move the count
    held = {}
    with warnings.catch_warnings():  # isinstance() on a deprecated torch alias warns
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                st = o.untyped_storage()
                held[st.data_ptr()] = st.nbytes()
    return sum(held.values())


def test_calibrate_holds_no_statistics_of_the_layers_it_has_done(tmp_path: pathlib.Path) -> None:
    """With CALIB being written (as `calibrate` runs), each MoE layer's statistics (scores, the
    imatrix's sums, Gram matrices) go to disk as the layer ends: what the pass holds at its end
    does not grow with the layer count (kept until `save` they grew it by 6 MB a layer at
    Qwen3-30B-A3B, 35 MB at DeepSeek-V3), and CALIB is the same as from a pass that kept them,
    with no file of its own left."""
    from transformers import Qwen3MoeForCausalLM

    from moe2gguf.arch import arch_for_config
    from moe2gguf.calib import IMATRIX, SCORES
    from moe2gguf.prune.calibrate import Calibration
    from safetensors.torch import load_file

    grown = {}
    for layers in (2, 10):
        torch.manual_seed(0)
        cfg = tiny_qwen3moe_config(num_hidden_layers=layers, num_experts=64, hidden_size=128, moe_intermediate_size=64, head_dim=32)
        model = Qwen3MoeForCausalLM(cfg)
        model.save_pretrained(tmp_path / f"m{layers}")
        ckpt = Checkpoint(tmp_path / f"m{layers}")
        arch = arch_for_config(ckpt.config)
        out = tmp_path / f"calib{layers}"
        out.mkdir()
        cal = Calibration(ckpt, arch, _windows(2, 32))
        before = _held_tensor_bytes()
        cal.run(spill=out)
        grown[layers] = _held_tensor_bytes() - before
        cal.save(out, ["t.txt"])
    kept = Calibration(ckpt, arch, _windows(2, 32))
    kept.run()  # no CALIB folder: everything stays in memory until save
    (tmp_path / "kept").mkdir()
    kept.save(tmp_path / "kept", ["t.txt"])
    # a layer's statistics: 64 experts x (7 x 64 channels + 128 inputs) float64, Gram matrices apart
    per_layer = 64 * (7 * 64 + 128) * 8
    assert grown[10] - grown[2] < per_layer, (grown, per_layer)  # kept: 8 layers' worth more
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "kept").iterdir())
    a, b = load_file(out / SCORES), load_file(tmp_path / "kept" / SCORES)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / IMATRIX).read_bytes() == (tmp_path / "kept" / IMATRIX).read_bytes()


def test_a_probed_candidate_holds_one_experts_gate_and_up_at_a_time(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the probe runs a candidate shape (no re-fit of the candidate), the tensors alive
    are the candidate's router and down_proj plus ONE expert's gate/up rows, sliced from the
    checkpoint as that expert runs: a whole pruned block held there was 2 GB at
    Mixtral-8x7B's layer size, on top of the refit's Gram matrix. The KLD is unchanged
    (tests/test_probe.py pins it against the written checkpoint)."""
    from conftest import calibrated_tiny_qwen3moe

    from moe2gguf.arch import arch_for_config
    from moe2gguf.modeling import ExpertMLP
    from moe2gguf.prune.calibrate import calibration_windows
    from moe2gguf.prune.deploy import Shape
    from moe2gguf.prune.probe import shape_klds
    from moe2gguf.prune.prune import Calib

    hidden, width, experts, kept, pruned_width = 64, 2048, 8, 6, 1024
    model, calib_dir = calibrated_tiny_qwen3moe(tmp_path, seed=0, tokens=512, ctx=64, moe_intermediate_size=width, num_hidden_layers=1)
    ckpt = Checkpoint(model)
    arch = arch_for_config(ckpt.config)
    cal = Calib(calib_dir, arch, ckpt)
    windows = calibration_windows(model, cal.info, 512)
    held: list[int] = []
    plain = ExpertMLP.intermediate

    def counted(self: ExpertMLP, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj.out_features == pruned_width:  # the candidate's experts, not the unpruned layer's
            held.append(_held_tensor_bytes())
        return plain(self, x)

    monkeypatch.setattr(ExpertMLP, "intermediate", counted)
    before = _held_tensor_bytes()
    klds = shape_klds(ckpt, arch, [Shape(kept, pruned_width)], cal.attribution(), [1], windows, cal.grams)
    assert held and all(v > 0 for v in klds.values())
    f32 = 4  # the tiny checkpoint is stored in float32
    one_gate_up = 2 * pruned_width * hidden * f32
    down = kept * pruned_width * hidden * f32
    embeddings = 4096 * hidden * f32  # materialised for the probe's first layer's inputs
    # besides: hidden states (the unpruned stream's and the candidate's) and the attention, in
    # the 0.5 MB; all of the candidate's gate/up at once (the old probe) was 1.8 MB over the bound
    bound = down + 2 * one_gate_up + embeddings + (512 << 10)
    assert max(held) - before < bound, (max(held) - before, bound)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_the_imatrix_and_scale_sums_of_a_batch_hold_no_float64_copy_of_it() -> None:
    """calibrate sums each hooked projection's inputs (the imatrix) and each layer's output
    (its scale) in float64. A float64 copy of a whole batch, and its square, were 128 MB at
    4,096 tokens of hidden 2,048, per projection: calibrate's layer peaks at Qwen3-30B-A3B's size
    were 0.1-0.2 GiB higher with them. Here a 64 MB batch adds at most 16 MB to the peak while the
    sums stay those of the whole float64 batch."""
    from moe2gguf.prune.scores import InputStats, ScaleStats

    torch.manual_seed(0)
    x = torch.randn(8192, 2048)  # float64 whole: 128 MB, and its square as much again
    x[0, :] *= 1e6  # a large row, where float32 squares would lose the small ones
    inputs, scale = InputStats(2048), ScaleStats()
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the RSS now
    start = _status("VmHWM")
    inputs.add_batch(x)
    scale.add_batch(x)
    grown = _status("VmHWM") - start
    assert grown <= 16 << 20, grown
    x64 = x.double()
    assert torch.allclose(inputs.sum2, (x64 * x64).sum(0), rtol=1e-12, atol=0)
    assert inputs.count == 8192
    assert scale.mean_sq == pytest.approx(float((x64 * x64).sum()) / 8192, rel=1e-12)
