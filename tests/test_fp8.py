"""Block-FP8 checkpoints, as DeepSeek-V3/R1 are published: every verb reads them as the bf16
model they encode, one tensor at a time.

The checkpoint here is DeepSeek-V3's published config.json (shrunk, block 16x16 instead of
128x128 because the matrices are tiny, read from weight_block_size), random weights quantized
here the way the published ones are: float8_e4m3fn per block of the weight, a float32
`<name>_scale_inv` of ceil(rows/block) x ceil(cols/block) (partial blocks at the edges), the
projections quantized and the router, norms, embeddings and head left in bf16, sharded with
an index (weights and their scales in different files), an MTP layer. Its reference is the
same model dequantized by this file's own loop and saved in bf16 without quantization_config.
"""

from __future__ import annotations

import json
import math
import pathlib
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe2gguf.cli import cli
from moe2gguf.exporter.export import export
from moe2gguf.errors import UserError
from moe2gguf.fp8 import dequantize_block_fp8, hide_scales
from moe2gguf.inspect import inspect_model
from test_families import add_mtp_layer
from test_tokenizer_real import PUBLISHED, build_published

QUANTIZED = re.compile(r"\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
E4M3_MAX = 448.0
# DeepSeek-V3's added tokens that are not special: HF matches them anywhere in the text
V3_PLAIN_ADDED = ["<｜User｜>", "<｜Assistant｜>", "<｜fim▁hole｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>"]


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: scale = amax / 448, stored value = w / scale in e4m3 (DeepSeek's layout)."""
    br, bc = block
    s = torch.empty(math.ceil(w.shape[0] / br), math.ceil(w.shape[1] / bc))
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float()
            s[i, j] = blk.abs().max().clamp(min=1e-12) / E4M3_MAX
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def dequantize_reference(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The reference, block by block (independent of moe2gguf.fp8)."""
    br, bc = block
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            out[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (q[i * br:(i + 1) * br, j * bc:(j + 1) * bc].float() * s[i, j]).to(torch.bfloat16)
    return out


def save_v3_tokenizer(folder: pathlib.Path) -> None:
    """A small BPE trained with DeepSeek-V3's published normalizer/pre-tokenizer, with its
    special tokens and some of its non-special added tokens."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import REFERENCE

    d = PUBLISHED["deepseek-v3"]
    doc = json.loads(Tokenizer(models.BPE()).to_str()) | {"normalizer": d["normalizer"], "pre_tokenizer": d["pre_tokenizer"]}
    tk = Tokenizer.from_str(json.dumps(doc))
    tk.decoder = decoders.ByteLevel()
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials, show_progress=False,
                                  initial_alphabet=[chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 324)])
    tk.train_from_iterator([(REFERENCE / "calib.txt").read_text(encoding="utf-8")[:6000]], trainer=trainer)
    tk.add_tokens(V3_PLAIN_ADDED)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / f).unlink(missing_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=specials[0], eos_token=specials[1], pad_token=specials[2]).save_pretrained(folder)


def make_pair(d: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(block-FP8 checkpoint, its bf16 dequantization) under d."""
    src = build_published("DeepSeek-V3", d / "src")
    save_v3_tokenizer(src)
    add_mtp_layer(src)
    cfg = json.loads((src / "config.json").read_text())
    q_cfg = json.loads((pathlib.Path(__file__).parent / "data" / "published_configs.json").read_text())["DeepSeek-V3"]["shrink"]["quantization_config"]
    block = tuple(q_cfg["weight_block_size"])
    weights = {k: v.to(torch.bfloat16) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v for k, v in load_file(src / "model.safetensors").items()}
    fp8_t, ref_t = {}, {}
    for k, v in weights.items():
        if QUANTIZED.search(k):
            q, s = quantize(v, block)
            fp8_t[k], fp8_t[k + "_scale_inv"] = q, s
            ref_t[k] = dequantize_reference(q, s, block)
        else:
            fp8_t[k] = ref_t[k] = v
    fp8, ref = d / "v3-fp8", d / "v3-bf16"
    for folder, tensors, config in ((fp8, fp8_t, {**cfg, "quantization_config": q_cfg}), (ref, ref_t, cfg)):
        folder.mkdir()
        for f in src.iterdir():
            if f.suffix != ".safetensors" and f.name != "config.json":
                (folder / f.name).write_bytes(f.read_bytes())
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    # the FP8 one sharded as published: each weight's scale in the other shard
    names = sorted(fp8_t)
    shards = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    for fname in sorted(set(shards.values())):
        save_file({n: fp8_t[n] for n in names if shards[n] == fname}, fp8 / fname, metadata={"format": "pt"})
    (fp8 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    save_file(ref_t, ref / "model.safetensors", metadata={"format": "pt"})
    assert any(shards[n] != shards[n + "_scale_inv"] for n in names if n + "_scale_inv" in fp8_t)
    return fp8, ref


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    return make_pair(tmp_path_factory.mktemp("fp8"))


@pytest.mark.parametrize("shape", [(40, 24), (48, 32)], ids=["partial-blocks", "whole-blocks"])
def test_dequantize_block_fp8_with_partial_blocks(shape: tuple[int, int]):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * 3
    q, s = quantize(w, (16, 16))  # 40 x 24: 3 x 2 blocks, the last row and column of blocks partial
    got = dequantize_block_fp8(q, s, (16, 16))
    assert got.dtype == torch.bfloat16 and torch.equal(got, dequantize_reference(q, s, (16, 16)))
    assert float((got.float() - w).abs().max()) < 0.1 * float(w.abs().max())  # e4m3 keeps 3 mantissa bits
    with pytest.raises(ValueError):
        dequantize_block_fp8(q, s[:, :1], (16, 16))


def test_scales_are_hidden_and_a_missing_one_is_refused():
    q_cfg = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    files = {"a.weight": "f", "a.weight_scale_inv": "f", "norm.weight": "f"}
    shapes = {"a.weight": (32, 16), "a.weight_scale_inv": (2, 1), "norm.weight": (16,)}
    dtypes = {"a.weight": "F8_E4M3", "a.weight_scale_inv": "F32", "norm.weight": "BF16"}
    config = {"quantization_config": q_cfg}
    block, scales = hide_scales(config, files, shapes, dtypes)
    assert block == (16, 16) and scales == {"a.weight_scale_inv": "f"} and config == {}
    assert list(files) == list(shapes) == ["a.weight", "norm.weight"] and dtypes["a.weight"] == "BF16"
    with pytest.raises(UserError, match="b.weight_scale_inv"):
        hide_scales({"quantization_config": q_cfg}, {"b.weight": "f"}, {"b.weight": (16, 16)}, {"b.weight": "F8_E4M3"})


def logits(path: pathlib.Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.fixture(scope="module")
def outs(pair, tmp_path_factory) -> dict[str, pathlib.Path]:
    """Both checkpoints exported to F32, by folder name."""
    d = tmp_path_factory.mktemp("fp8-gguf")
    for folder in pair:
        export(str(folder), str(d / f"{folder.name}.gguf"), "F32", progress=False)
    return {folder.name: d / f"{folder.name}.gguf" for folder in pair}


def test_fp8_checkpoint_exports_as_its_bf16_dequantization(pair, outs):
    fp8, ref = pair
    import gguf

    tensors = [{t.name: tuple(t.shape) for t in gguf.GGUFReader(p).tensors} for p in outs.values()]
    assert tensors[0] == tensors[1] and not any("scale" in n for n in tensors[0])
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(fp8)("def main(argv):\n    return 0  # <｜User｜> hi")["input_ids"][:48]
    a, b = logits(outs[fp8.name], ids), logits(outs[ref.name], ids)
    assert np.abs(a - b).max() == 0.0, f"FP8 export differs from the bf16 model by {np.abs(a - b).max():.3e}"
    assert np.abs(a).max() > 0


def test_fp8_tokenizer_keeps_deepseek_v3_added_tokens_as_hf_does(pair, outs):
    """The non-special <｜...｜> added tokens are user-defined in our GGUF: llama.cpp matches
    them in plain text as HF does (convert_hf_to_gguf types them control; README)."""
    import gguf
    import llama_cpp
    from transformers import AutoTokenizer

    fp8, _ = pair
    out = outs[fp8.name]
    r = gguf.GGUFReader(out)
    assert r.get_field("tokenizer.ggml.pre").contents() == "deepseek-v3"
    hf = AutoTokenizer.from_pretrained(fp8)
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    texts = ["<｜User｜>Hello, 12345 world<｜Assistant｜>", "x<｜tool▁sep｜>y 中文カタカナ", "  spaces\n\n and 3.14159 !!!"]
    for t in texts:
        assert llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) == hf.encode(t, add_special_tokens=False), t
    types = r.get_field("tokenizer.ggml.token_type").contents()
    assert types[hf.convert_tokens_to_ids("<｜User｜>")] == gguf.TokenType.USER_DEFINED


def test_inspect_counts_fp8_as_bf16(pair):
    fp8, ref = pair
    a, b = inspect_model(str(fp8)), inspect_model(str(ref))
    for key in ("params_total", "params_routed_experts", "params_shared_experts", "params_active_per_token", "params_mtp_not_exported"):
        assert a[key] == b[key], key
    assert a["file_bytes"] < b["file_bytes"]  # the fp8 files are smaller on disk


def test_calibrate_reads_fp8_as_bf16_and_prune_writes_bf16(pair, tmp_path):
    from moe2gguf.arch import arch_for_config
    from moe2gguf.checkpoint import Checkpoint
    from moe2gguf.prune.calibrate import Calibration

    fp8, ref = pair
    wins = np.random.default_rng(0).integers(3, 700, size=(2, 32))
    stats = []
    for folder in pair:
        ckpt = Checkpoint(folder)
        cal = Calibration(ckpt, arch_for_config(ckpt.config), wins, batch=2)
        cal.run()
        stats.append({k: (s.freq.clone(), s.mass.clone()) for k, s in cal.experts.items()})
    assert stats[0].keys() == stats[1].keys()
    for k in stats[0]:
        assert all(torch.equal(x, y) for x, y in zip(stats[0][k], stats[1][k])), k

    from conftest import REFERENCE

    text = tmp_path / "calib.txt"
    text.write_text((REFERENCE / "calib.txt").read_text()[:8000])
    calib, pruned = tmp_path / "calib", tmp_path / "pruned"
    runner = CliRunner()
    for args in (["calibrate", str(fp8), "--text", str(text), "-o", str(calib), "--tokens", "256", "--ctx", "64"],
                 ["prune", str(fp8), "--calib", str(calib), "--ratio", "0.25", "-o", str(pruned), "--method", "uniform", "--layout", "ragged", "--min-width", "1"]):
        res = runner.invoke(cli, args, catch_exceptions=False)
        assert res.exit_code == 0, res.output
    cfg = json.loads((pruned / "config.json").read_text())
    assert "quantization_config" not in cfg
    dtypes = {}
    for f in pruned.glob("model*.safetensors"):
        with safe_open(f, "pt") as h:
            dtypes.update({n: h.get_slice(n).get_dtype() for n in h.keys()})
    assert not any(n.endswith("_scale_inv") for n in dtypes)
    assert dtypes["model.layers.1.self_attn.kv_b_proj.weight"] == "BF16"
    assert dtypes["model.layers.1.mlp.experts.0.down_proj.weight"] == "BF16"


def test_other_quantization_configs_are_refused(pair, tmp_path):
    fp8, _ = pair
    bad = tmp_path / "gptq"
    bad.mkdir()
    for f in fp8.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "config.json").unlink()
    cfg = json.loads((fp8 / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    out = tmp_path / "refused.gguf"
    res = CliRunner().invoke(cli, ["export", str(bad), "-o", str(out), "--quant", "F32"])
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and "quantization_config" in res.output and "gptq" in res.output
    assert not out.exists()


@pytest.mark.parametrize("keep", [0.25, 0.0], ids=["kept", "read-every-batch"])
def test_calibrate_dequantizes_each_fp8_expert_once_a_layer_where_memory_allows(pair, monkeypatch: pytest.MonkeyPatch, keep: float):
    """calibrate reads a layer's experts as each runs; a block-FP8 expert costs a dequantization
    at every read (0.2 s at DeepSeek-V3's 7168 x 2048, 45 s a layer per batch), so once read it
    is kept for the layer's other batches while the kept ones fit in a quarter of memory. With
    none kept (a machine too small), every batch dequantizes again, with the same statistics."""
    from moe2gguf import modeling
    from moe2gguf.arch import arch_for_config
    from moe2gguf.checkpoint import Checkpoint
    from moe2gguf.prune.calibrate import Calibration

    fp8, _ = pair
    reads: list[str] = []
    real = Checkpoint.tensor
    monkeypatch.setattr(Checkpoint, "tensor", lambda self, name: reads.append(name) or real(self, name))
    monkeypatch.setattr(modeling, "KEEP_CONVERTED_FRACTION", keep)
    ckpt = Checkpoint(fp8)
    arch = arch_for_config(ckpt.config)
    wins = np.random.default_rng(0).integers(3, 700, size=(6, 32))
    cal = Calibration(ckpt, arch, wins, batch=2)  # 3 batches
    cal.run()
    names = {arch.expert_name(b, x, p) for b, w in enumerate(arch.expert_widths()) for x in range(len(w)) for p in ("gate", "up", "down")}
    assert names and all(ckpt.dequantizes(n) for n in names)
    routed = [n for n in reads if n in names]
    if keep:  # once each, by the pass or by the weight norms after it
        assert sorted(routed) == sorted(names), (len(routed), len(names))
    else:  # again by every batch that reaches the expert, and by the weight norms
        assert len(routed) > 2 * len(names), (len(routed), len(names))
    scores = cal.score_tensors()
    monkeypatch.setattr(modeling, "KEEP_CONVERTED_FRACTION", 0.25 if not keep else 0.0)
    again = Calibration(Checkpoint(fp8), arch, wins, batch=2)
    again.run()
    for k, v in again.score_tensors().items():
        assert torch.equal(v, scores[k]), k


def test_the_shape_probe_slices_fp8_candidates_from_the_experts_it_dequantized(pair, tmp_path, monkeypatch: pytest.MonkeyPatch):
    """prune's shape probe runs the unpruned layer, then every candidate shape, each over every
    batch, slicing the candidate's experts as they run: from a block-FP8 checkpoint each slice
    was a dequantization (shapes x batches of them a layer, about 15 min a layer at
    DeepSeek-V3's size). The probe now slices them from the experts its unpruned stream
    dequantized and kept: each expert tensor is read once a layer, whatever the shapes."""
    from collections import Counter

    from conftest import REFERENCE
    from moe2gguf.arch import arch_for_config
    from moe2gguf.checkpoint import Checkpoint
    from moe2gguf.prune.calibrate import calibration_windows
    from moe2gguf.prune.deploy import Shape
    from moe2gguf.prune.probe import shape_klds
    from moe2gguf.prune.prune import Calib

    fp8, _ = pair
    text = tmp_path / "calib.txt"
    text.write_text((REFERENCE / "calib.txt").read_text()[:8000])
    res = CliRunner().invoke(cli, ["calibrate", str(fp8), "--text", str(text), "-o", str(tmp_path / "calib"), "--tokens", "512", "--ctx", "64"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ckpt = Checkpoint(fp8)
    arch = arch_for_config(ckpt.config)
    cal = Calib(tmp_path / "calib", arch, ckpt)
    groups = [arch.expert_groups(b) for b in arch.moe_layers]
    n, width = cal.info["n_experts"], cal.info["expert_width"]
    shapes = [Shape(n, width // 2), Shape(n - max(groups), width)]
    reads: Counter[str] = Counter()
    real = Checkpoint.tensor
    monkeypatch.setattr(Checkpoint, "tensor", lambda self, name: reads.update([name]) or real(self, name))
    windows = calibration_windows(fp8, cal.info, 512)
    got = shape_klds(ckpt, arch, shapes, cal.attribution(), groups, windows, cal.grams, batch=2)  # 4 batches
    assert all(v > 0 for v in got.values()), got
    experts = [arch.expert_name(b, x, p) for b, w in enumerate(arch.expert_widths()) for x in range(len(w)) for p in ("gate", "up", "down")]
    assert experts and all(ckpt.dequantizes(e) for e in experts)
    assert max(reads[e] for e in experts) == 1, Counter(reads[e] for e in experts)
