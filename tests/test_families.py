"""Every model family from one table (as mlx-lm's test_all_models): a row per family holds its
tiny config and what is particular to it, and the same tests run on each row:

- F32 export is exact in llama.cpp (logits equal PyTorch's) and the GGUF has the family's
  tensors and keys (MLA's k_b/v_b split, shared experts, sigmoid gating, renamed experts, ...);
- inspect counts equal counts taken independently from the safetensors headers;
- config flags llama.cpp does not reproduce are refused (exit 2, one line, no file);
- calibrate -> prune (--layout ragged and --layout llama.cpp) -> export Q4_K_M -> check, all
  through the CLI: the achieved routed-parameter ratio is within 2 points of --ratio or at the
  nearest feasible shape the prune printed, the routed parameters counted from the GGUF's expert
  tensors (gguf-py) are what prune_report.json says were kept, and the pruned GGUF's perplexity
  is within PPL_BOUND of the unpruned GGUF's.

The tiny models are random: their perplexity is near the vocabulary size and barely depends on
the experts, so the perplexity bound guards the file against gross breakage, not the pruning's
quality (README's benchmarks measure that on the trained bundled model; training a tiny model
per family here would cost about a minute each). Family-specific tests (DeepSeek's shared-expert padding and router groups,
V3's MTP layer, Mixtral's renamed expert parts) follow the table.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import REFERENCE, build_tiny, tiny_qwen3moe_config
from moe2gguf.cli import cli
from moe2gguf.exporter.export import export
from moe2gguf.inspect import inspect_model
from test_export import assert_same_logits

H, W, E, TOP_K = 64, 32, 8, 2  # every row: hidden 64, routed experts 8 x 32 wide, top-2
RATIO = 0.3  # ragged lands within 2 points; llama.cpp (widths in 32s) has no shape there: nearest printed
# pruned GGUF's PPL within 1% of the unpruned GGUF's (measured at RATIO, both layouts, every
# family: 0.33% at most). Random tiny models of other seeds differ from each other by 0.2-3%,
# so the bound catches a file that computes something else only when that moves PPL this much.
PPL_BOUND = 0.01
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}


# --- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    hf_class: str  # transformers' ForCausalLM class
    defaults: dict[str, Any]  # the tiny config
    config_class: str
    gguf_arch: str
    width_key: str  # the GGUF key llama.cpp sizes ffn_*_exps with
    routed: str  # regex over checkpoint names: group 1 = layer, group 2 = expert
    shared: str | None = None  # regex over checkpoint names of shared-expert tensors
    shared_params: int = 0  # their count, from the config alone
    dense_layers: tuple[int, ...] = ()
    refused: tuple[tuple[str, Any], ...] = ()  # config flags export must refuse
    attn_std: float | None = 0.15  # sharp attention: a wrong RoPE / attention scale shows
    groups: int = 1  # router groups (n_group)
    f32_variants: tuple[tuple[str, dict], ...] = (("default", {}),)  # config overrides per F32 run
    f32_shapes: dict[str, tuple[int, ...] | None] = field(default_factory=dict)  # None: absent
    f32_keys: dict[str, Any] = field(default_factory=dict)
    f32_types: dict[str, str] = field(default_factory=dict)
    not_exported: str | None = None  # checkpoint names llama.cpp leaves out (MTP layers)
    config_width_key: str = "moe_intermediate_size"  # the config key of the routed experts' width

    @property
    def cls(self) -> type:
        import transformers

        return getattr(transformers, self.hf_class)

    def config(self, **kw: Any):  # noqa: ANN201 - a transformers config
        import transformers

        if self.config_class == "Qwen3MoeConfig":
            return tiny_qwen3moe_config(**kw)
        return getattr(transformers, self.config_class)(**{**self.defaults, **kw})

    def build(self, out: pathlib.Path, **kw: Any) -> pathlib.Path:
        folder = build_tiny(self.cls, self.config(**kw), out, attn_std=self.attn_std)
        if self.name == "deepseek-v3":
            add_selection_bias(folder)
            add_mtp_layer(folder)  # as V3 checkpoints carry it, so every test sees one
        return folder


_COMMON = dict(vocab_size=4096, hidden_size=H, num_experts_per_tok=TOP_K, max_position_embeddings=512, tie_word_embeddings=False,
               pad_token_id=0, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
_MLA = dict(intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=E, moe_intermediate_size=W, first_k_dense_replace=1)
S = 48  # Qwen2-MoE's shared expert width

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family(
        "qwen3moe", "Qwen3MoeForCausalLM", {}, "Qwen3MoeConfig", "qwen3moe", "expert_feed_forward_length",
        routed=r"layers\.(\d+)\.mlp\.experts\.(\d+)\.", refused=(("use_sliding_window", True),),
        f32_variants=(),  # tests/test_export.py: the tiny and the bundled model
    ),
    Family(
        "qwen2moe", "Qwen2MoeForCausalLM",
        {**_COMMON, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "moe_intermediate_size": W, "shared_expert_intermediate_size": S, "num_experts": E, "norm_topk_prob": False},
        "Qwen2MoeConfig", "qwen2moe", "expert_feed_forward_length",
        routed=r"layers\.(\d+)\.mlp\.experts\.(\d+)\.", shared=r"\.mlp\.shared_expert", shared_params=2 * (3 * H * S + H),
        refused=(("norm_topk_prob", True), ("decoder_sparse_step", 2), ("tie_word_embeddings", True)), attn_std=None,
        f32_shapes={"blk.1.ffn_gate_exps.weight": (H, W, E), "blk.1.ffn_up_shexp.weight": (H, S)},
        f32_keys={"qwen2moe.expert_shared_feed_forward_length": S},
        # kept F32 as convert_hf_to_gguf does (an F16 (1, H) row is not worth it)
        f32_types={"blk.0.ffn_gate_inp_shexp.weight": "F32"},
    ),
    Family(
        "deepseek-v2", "DeepseekV2ForCausalLM",
        {**_COMMON, **_MLA, "n_shared_experts": 2, "q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
         "routed_scaling_factor": 1.0, "norm_topk_prob": False},
        "DeepseekV2Config", "deepseek2", "expert_feed_forward_length",
        routed=r"layers\.(\d+)\.mlp\.experts\.(\d+)\.", shared=r"\.mlp\.shared_experts\.", shared_params=2 * 3 * H * W * 2,
        dense_layers=(0,), refused=(("topk_method", "group_limited_greedy"), ("scoring_func", "sigmoid"), ("moe_layer_freq", 2)),
        # V2-Lite's shape: plain q_proj, YaRN; the full V2 has q_lora (q_a/q_b) too
        f32_variants=(("default-rope", {}), ("yarn+q_lora", {"rope_parameters": YARN, "q_lora_rank": 24, "routed_scaling_factor": 2.0})),
        f32_shapes={"blk.0.ffn_up.weight": (H, 96),  # the leading dense layer
                    "blk.1.attn_k_b.weight": (16, 16, 4),  # {nope, kv_lora, n_head}
                    "blk.1.attn_v_b.weight": (16, 16, 4),  # {kv_lora, v_head, n_head}
                    "blk.1.attn_kv_b.weight": None, "blk.2.ffn_gate_shexp.weight": (H, W * 2)},
        f32_keys={"deepseek2.expert_shared_count": 2},
    ),
    Family(
        "deepseek-v3", "DeepseekV3ForCausalLM",
        {**_COMMON, **_MLA, "n_shared_experts": 1, "q_lora_rank": 24, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
         "norm_topk_prob": True},
        "DeepseekV3Config", "deepseek2", "expert_feed_forward_length",
        routed=r"layers\.([0-2])\.mlp\.experts\.(\d+)\.", shared=r"layers\.[0-2]\.mlp\.shared_experts\.", shared_params=2 * 3 * H * W,
        dense_layers=(0,), refused=(("rope_interleave", False), ("scoring_func", "softmax"), ("n_group", 3)), groups=2,
        f32_shapes={"blk.1.exp_probs_b.bias": (E,), "blk.1.attn_q_b.weight": (24, 4 * 24), "blk.3.ffn_up_exps.weight": None},
        f32_keys={"deepseek2.expert_gating_func": 2, "deepseek2.expert_group_count": 2, "deepseek2.expert_weights_norm": True,
                  "deepseek2.block_count": 3},  # sigmoid; the MTP layer (3) left out
        not_exported=r"^model\.layers\.3\.",
    ),
    Family(
        "mixtral", "MixtralForCausalLM",
        {**_COMMON, "intermediate_size": W, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_local_experts": E, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
        "MixtralConfig", "llama", "feed_forward_length",
        routed=r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.", refused=(("sliding_window", 4096),), config_width_key="intermediate_size",
        f32_shapes={"blk.0.ffn_down_exps.weight": (W, H, E)},  # fails without the Q/K permutation (logits)
        f32_keys={"general.architecture": "llama", "llama.feed_forward_length": W},
    ),
    Family(
        "olmoe", "OlmoeForCausalLM",
        {**_COMMON, "intermediate_size": W, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
         "num_experts": E, "norm_topk_prob": False},
        "OlmoeConfig", "olmoe", "feed_forward_length",
        routed=r"layers\.(\d+)\.mlp\.experts\.(\d+)\.", refused=(("clip_qkv", 8.0), ("norm_topk_prob", True), ("num_key_value_heads", 2)),
        attn_std=None, f32_shapes={"blk.1.ffn_up_exps.weight": (H, W, E)}, f32_keys={"olmoe.feed_forward_length": W},
        config_width_key="intermediate_size",
    ),
]}
NAMES = list(FAMILIES)


# --- helpers (other test files use them too) ----------------------------------------------


def f32_roundtrip(folder: pathlib.Path, tmp: pathlib.Path) -> float:
    """Export F32 and compare llama.cpp's logits with PyTorch's; returns the max difference
    as a fraction of the logit range (asserted < 1e-3 inside)."""
    out = tmp / f"{folder.name}-f32.gguf"
    export(str(folder), str(out), "F32", progress=False)
    return assert_same_logits(folder, out)


class GGUF:
    """One gguf-py read of a file: tensor shapes, key values, tensor types, and the routed
    parameters its expert tensors hold (zero-padded channels not counted)."""

    def __init__(self, path: pathlib.Path):
        self.reader = gguf.GGUFReader(path)
        self.shapes = {t.name: tuple(int(x) for x in t.shape) for t in self.reader.tensors}
        self.types = {t.name: t.tensor_type.name for t in self.reader.tensors}

    def value(self, key: str) -> Any:
        f = self.reader.get_field(key)
        return None if f is None else f.contents()

    def routed_params(self) -> int:
        """Per layer, a channel (expert e, row c) is kept when its gate row, up row or down
        column holds a non-zero (the writer pads narrower experts with zeros); each kept channel
        holds one gate row, one up row and one down column."""
        total = 0
        layers = sorted({int(m.group(1)) for n in self.shapes if (m := re.match(r"blk\.(\d+)\.ffn_gate_exps\.weight$", n))})
        by_name = {t.name: t for t in self.reader.tensors}
        for b in layers:
            parts = {p: gguf.quants.dequantize(by_name[f"blk.{b}.ffn_{p}_exps.weight"].data, by_name[f"blk.{b}.ffn_{p}_exps.weight"].tensor_type)
                     for p in ("gate", "up", "down")}
            # numpy order: gate/up (experts, width, hidden), down (experts, hidden, width)
            kept = (parts["gate"] != 0).any(-1) | (parts["up"] != 0).any(-1) | (parts["down"] != 0).any(-2)
            total += int(kept.sum()) * (parts["gate"].shape[-1] + parts["up"].shape[-1] + parts["down"].shape[-2])
        return total


def load_in_llama_cpp(path: pathlib.Path) -> None:
    """Stock llama.cpp (llama-cpp-python) loads the file and produces finite logits."""
    from moe2gguf.llama_runtime import open_llama

    llm = open_llama(path, n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval([1, 2, 3, 4])
    assert np.isfinite(np.array(llm.scores[:4])).all()


def tensor_counts(folder: pathlib.Path, fam: Family) -> dict[str, Any]:
    """Independent counts from the safetensors headers, by the row's name patterns (no
    registry involved); tensors llama.cpp does not load (MTP) are left out."""
    total = experts = shared_n = 0
    per_layer: dict[int, int] = {}
    ids: dict[int, set[int]] = {}
    with safe_open(folder / "model.safetensors", "pt") as f:
        for name in f.keys():
            if fam.not_exported and re.search(fam.not_exported, name):
                continue
            numel = int(np.prod(f.get_slice(name).get_shape()))
            total += numel
            if m := re.search(fam.routed, name):
                experts += numel
                bid = int(m.group(1))
                per_layer[bid] = per_layer.get(bid, 0) + numel
                ids.setdefault(bid, set()).add(int(m.group(2)))
            elif fam.shared is not None and re.search(fam.shared, name):
                shared_n += numel
    active = total - experts + sum(TOP_K * per_layer[b] / len(ids[b]) for b in per_layer)
    return {"total": total, "experts": experts, "shared": shared_n, "active": round(active), "moe_layers": sorted(per_layer)}


def add_selection_bias(folder: pathlib.Path) -> None:
    """A non-zero DeepSeek-V3 selection bias, so routing that ignored it would pick other experts."""
    t = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    for name in [n for n in t if n.endswith("e_score_correction_bias")]:
        t[name] = torch.randn(t[name].shape[0], generator=g) * 0.3
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})


def add_mtp_layer(folder: pathlib.Path) -> int:
    """Append a multi-token-prediction layer as real V3 checkpoints store it: layer
    `num_hidden_layers`, a full MoE decoder layer (named like the last one) plus enorm, hnorm,
    eh_proj, its own embed_tokens and shared_head; random values, so that using it anywhere
    would change results. Returns its parameter count."""
    cfg = json.loads((folder / "config.json").read_text())
    n, vocab, hidden = cfg["num_hidden_layers"], cfg["vocab_size"], cfg["hidden_size"]
    t = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(2)
    mtp = {
        re.sub(rf"^model\.layers\.{n - 1}\.", f"model.layers.{n}.", k): torch.randn(v.shape, generator=g) * 0.1
        for k, v in t.items()
        if k.startswith(f"model.layers.{n - 1}.")
    }
    extra = {"enorm.weight": (hidden,), "hnorm.weight": (hidden,), "eh_proj.weight": (hidden, 2 * hidden), "embed_tokens.weight": (vocab, hidden),
             "shared_head.norm.weight": (hidden,), "shared_head.head.weight": (vocab, hidden)}
    mtp.update({f"model.layers.{n}.{k}": torch.randn(shape, generator=g) * 0.1 for k, shape in extra.items()})
    assert f"model.layers.{n}.mlp.experts.0.up_proj.weight" in mtp and len(mtp) > len(extra) + 10
    save_file({**t, **mtp}, folder / "model.safetensors", metadata={"format": "pt"})
    cfg["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return sum(v.numel() for v in mtp.values())


def invoke(*args: Any) -> Any:
    """One CLI call that must succeed; returns click's result (stderr apart)."""
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, f"{args[0]} failed: {res.output}"
    return res


# --- the tests every row runs ---------------------------------------------------------------


@pytest.fixture(scope="module", params=NAMES)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Family, pathlib.Path]:
    """Each family's tiny checkpoint, built once for the module (tests that edit it copy it)."""
    fam = FAMILIES[request.param]
    return fam, fam.build(tmp_path_factory.mktemp(fam.name) / f"tiny-{fam.name}")


F32_CASES = [(f.name, v, kw) for f in FAMILIES.values() for v, kw in f.f32_variants]


@pytest.mark.parametrize(("name", "variant", "kw"), F32_CASES, ids=[f"{n}-{v}" for n, v, _ in F32_CASES])
def test_f32_export_matches_torch_and_has_the_family_tensors(name: str, variant: str, kw: dict, tmp_path: pathlib.Path) -> None:
    fam = FAMILIES[name]
    folder = fam.build(tmp_path / f"tiny-{name}", **kw)
    rel = f32_roundtrip(folder, tmp_path)
    print(f"{name} {variant} max logit diff {rel:.2e} of range")
    g = GGUF(tmp_path / f"{folder.name}-f32.gguf")
    for tensor, shape in fam.f32_shapes.items():
        assert g.shapes.get(tensor) == shape, tensor
    for key, value in fam.f32_keys.items():
        assert g.value(key) == value, key
    for tensor, kind in fam.f32_types.items():
        assert g.types[tensor] == kind, tensor
    cfg = json.loads((folder / "config.json").read_text())
    if not cfg.get("kv_lora_rank"):  # MLA states its own key lengths
        arch = g.value("general.architecture")
        # as convert_hf_to_gguf: stated when config.json states head_dim, else llama.cpp's default
        assert g.value(f"{arch}.attention.key_length") == cfg.get("head_dim")
        assert g.value(f"{arch}.attention.value_length") == cfg.get("head_dim")


def test_inspect_counts_match_the_tensors(tiny: tuple[Family, pathlib.Path]) -> None:
    fam, folder = tiny
    info = inspect_model(str(folder))
    want = tensor_counts(folder, fam)
    assert want["experts"] > 0
    got = (info["params_total"], info["params_routed_experts"], info["params_shared_experts"], info["params_active_per_token"])
    assert got == (want["total"], want["experts"], want["shared"], want["active"])
    assert want["shared"] == fam.shared_params  # the regexes found what the config says
    assert info["dense_layers"] == list(fam.dense_layers)
    assert want["moe_layers"] == [b for b in range(fam.config().num_hidden_layers) if b not in fam.dense_layers]
    assert info["experts_routed"] == E and info["experts_shared"] == (1 if fam.shared_params else 0)


REFUSED_CASES = [(f.name, flag, value) for f in FAMILIES.values() for flag, value in f.refused]


@pytest.mark.parametrize(("tiny", "flag", "value"), REFUSED_CASES, indirect=["tiny"], ids=[f"{n}-{f}" for n, f, _ in REFUSED_CASES])
def test_unhandled_flags_are_refused(tiny: tuple[Family, pathlib.Path], tmp_path: pathlib.Path, flag: str, value: Any) -> None:
    """Setting the flag in config.json makes export exit 2 with one line naming it, no file."""
    _, folder = tiny
    copy = pathlib.Path(shutil.copytree(folder, tmp_path / folder.name))
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, flag: value}))
    out = tmp_path / "refused.gguf"
    res = CliRunner().invoke(cli, ["export", str(copy), "-o", str(out), "--quant", "F32"])
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and flag in res.output, res.output
    assert not out.exists()


@pytest.fixture(scope="module", params=NAMES)
def calibrated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A family's tiny model, its calibration (512 tokens), its unpruned Q4_K_M GGUF and that
    GGUF's check report: what both layouts' flows compare against."""
    fam = FAMILIES[request.param]
    d = tmp_path_factory.mktemp(f"flow-{fam.name}")
    model = fam.build(d / f"tiny-{fam.name}")
    calib_text, eval_text = d / "calib.txt", d / "eval.txt"
    calib_text.write_text((REFERENCE / "calib.txt").read_text()[:20000])  # enough tokens, fast to tokenize
    eval_text.write_text((REFERENCE / "eval.txt").read_text()[:4000])
    invoke("calibrate", model, "--text", calib_text, "-o", d / "calib", "--tokens", 512, "--ctx", 64)
    base = d / "base-q4.gguf"
    invoke("export", model, "-o", base, "--quant", "Q4_K_M", "--imatrix", d / "calib")
    invoke("check", base, "--text", eval_text, "--ctx", 64, "--chunks", 2, "--json", d / "base.json")
    return {"fam": fam, "model": model, "calib": d / "calib", "eval": eval_text, "routed": GGUF(base).routed_params(),
            "ppl": json.loads((d / "base.json").read_text())["ppl"]}


@pytest.mark.parametrize("layout", ["ragged", "llama.cpp"])
def test_prune_flow_keeps_the_reported_parameters_and_perplexity(calibrated: dict[str, Any], layout: str, tmp_path: pathlib.Path) -> None:
    """calibrate -> prune -> export Q4_K_M -> check through the CLI, both layouts named
    explicitly. A ragged prune keeps every expert (at least one channel each), since stock
    llama.cpp needs one expert count for the model; the GGUF pads it to the widest expert."""
    fam: Family = calibrated["fam"]
    pruned, gg, rep_path = tmp_path / "pruned", tmp_path / "pruned-q4.gguf", tmp_path / "check.json"
    keep_experts = ["--min-width", 1] if layout == "ragged" else []
    res = invoke("prune", calibrated["model"], "--calib", calibrated["calib"], "--ratio", RATIO, "-o", pruned, "--method", "coverage",
                 "--layout", layout, *keep_experts)
    invoke("export", pruned, "-o", gg, "--quant", "Q4_K_M", "--imatrix", calibrated["calib"])
    invoke("check", gg, "--text", calibrated["eval"], "--ctx", 64, "--chunks", 2, "--json", rep_path)
    report = json.loads((pruned / "prune_report.json").read_text())
    g = GGUF(gg)

    # what was kept, counted in the file llama.cpp runs, is what the report says
    kept = g.routed_params()
    assert (report["params_routed_before"], report["params_routed_after"]) == (calibrated["routed"], kept)
    got = 1 - kept / calibrated["routed"]
    assert report["ratio_achieved"] == pytest.approx(got, abs=1e-12)
    k, width = g.value(f"{fam.gguf_arch}.expert_count"), g.value(f"{fam.gguf_arch}.{fam.width_key}")
    if abs(got - RATIO) > 0.02 + 1e-9:  # only where no shape is that close: the nearest, printed
        m = re.search(r"nearest feasible: (\d+) experts x width (\d+), ratio ([0-9.]+)", res.stderr)
        assert layout == "llama.cpp" and m, res.stderr
        assert (int(m.group(1)), int(m.group(2))) == (k, width) and got == pytest.approx(float(m.group(3)), abs=1e-4)
        # and it is the nearest: widths come in 32s, so at W = 32 the shapes are K x 32, K from
        # top-k (grouped routing: a multiple of the groups from 2 x top-k) to E - 1
        counts = range(TOP_K * fam.groups if fam.groups > 1 else TOP_K, E, fam.groups)
        assert abs(got - RATIO) == pytest.approx(min(abs(1 - c / E - RATIO) for c in counts))
    # one count and one width for the model, as stock llama.cpp loads them
    for b in range(fam.config().num_hidden_layers):
        if b not in fam.dense_layers:
            assert g.shapes[f"blk.{b}.ffn_gate_exps.weight"] == g.shapes[f"blk.{b}.ffn_up_exps.weight"] == (H, width, k)
            assert g.shapes[f"blk.{b}.ffn_down_exps.weight"] == (width, H, k)
            assert g.shapes[f"blk.{b}.ffn_gate_inp.weight"] == (H, k)
    assert k == (E if layout == "ragged" else max(report["experts_kept"]))
    FLOW_CHECKS.get(fam.name, lambda *a: None)(g, report, k, width)

    rep = json.loads(rep_path.read_text())
    print(f"{fam.name} {layout}: ratio {got:.4f}, kept {kept:,} of {calibrated['routed']:,}, PPL {rep['ppl']:.1f} vs unpruned {calibrated['ppl']:.1f}")
    assert rep["backend"] == "llama.cpp"
    assert abs(rep["ppl"] / calibrated["ppl"] - 1) <= PPL_BOUND, (rep["ppl"], calibrated["ppl"])


def test_the_probe_measures_the_model_the_rewrite_writes(calibrated: dict[str, Any], tmp_path: pathlib.Path) -> None:
    """Per family, the shape probe's KLD of a shape is the KLD of the checkpoint prune writes in
    that shape (the same windows, the same positions, in PyTorch), and fewer experts cost more.
    Mixtral's decoder layer calls its MoE block through `mlp`, an alias of the registered
    `block_sparse_moe`: the probe swapped the candidate in under the registered name only, so
    every Mixtral candidate scored as the unpruned model or with no MoE block at all, and its
    choice of shape was arbitrary."""
    from moe2gguf.arch import arch_for_config
    from moe2gguf.checkpoint import Checkpoint
    from moe2gguf.modeling import load_model
    from moe2gguf.protocol import scored
    from moe2gguf.prune.calibrate import calibration_windows
    from moe2gguf.prune.deploy import Shape
    from moe2gguf.prune.probe import shape_klds
    from moe2gguf.prune.prune import Calib, prune

    fam, model = calibrated["fam"], calibrated["model"]
    ckpt = Checkpoint(model)
    arch = arch_for_config(ckpt.config)
    cal = Calib(calibrated["calib"], arch, ckpt)
    windows = calibration_windows(model, cal.info, 512)
    few = TOP_K * fam.groups if fam.groups > 1 else TOP_K
    shapes = [Shape(E - fam.groups, W), Shape(few, W)]
    got = shape_klds(ckpt, arch, shapes, cal.attribution(), [arch.expert_groups(b) for b in arch.moe_layers], windows, cal.grams)

    ids, pos = torch.from_numpy(windows), scored(windows.shape[1])

    def log_probs(path: pathlib.Path) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(load_model(str(path))[0](input_ids=ids).logits[:, pos].double(), -1)

    base = log_probs(model)
    for s in shapes:
        out = tmp_path / f"{s.experts}x{s.width}"
        prune(str(model), str(calibrated["calib"]), 1 - s.experts / E - 1e-9, str(out), layout="llama.cpp", width=s.width, experts=s.experts,
              probe=0, reconstruct=False)
        want = float((base.exp() * (base - log_probs(out))).sum(-1).mean())
        assert got[s] == pytest.approx(want, rel=1e-3, abs=1e-7), (fam.name, s)
    assert got[shapes[1]] > got[shapes[0]] > 0, got


def _qwen2moe_flow(g: GGUF, report: dict, k: int, width: int) -> None:
    assert g.shapes["blk.0.ffn_down_shexp.weight"] == (S, H)  # the shared expert is never pruned


def _deepseek_v2_flow(g: GGUF, report: dict, k: int, width: int) -> None:
    # the loader ties the shared width to n_ff_exp * expert_shared_count: padded up to it
    n_sh = g.value("deepseek2.expert_shared_count")
    assert n_sh * width >= W * 2 > (n_sh - 1) * width
    assert g.shapes["blk.1.ffn_down_shexp.weight"] == (n_sh * width, H)


def _deepseek_v3_flow(g: GGUF, report: dict, k: int, width: int) -> None:
    assert k % 2 == 0 and report["expert_groups"]["groups"] == [2]
    for widths in report["widths"][1:]:  # MoE layers: as many experts kept in each group
        assert sum(1 for w in widths[:4] if w) == sum(1 for w in widths[4:] if w) == k // 2
    assert g.shapes["blk.1.exp_probs_b.bias"] == (k,)
    assert (g.value("deepseek2.expert_group_count"), g.value("deepseek2.expert_group_used_count")) == (2, 1)


FLOW_CHECKS: dict[str, Callable[[GGUF, dict, int, int], None]] = {
    "qwen2moe": _qwen2moe_flow, "deepseek-v2": _deepseek_v2_flow, "deepseek-v3": _deepseek_v3_flow,
}


# --- what only one family has ---------------------------------------------------------------


def test_renamed_expert_parts_keep_checkpoint_names_and_aliases() -> None:
    from moe2gguf.modeling import ExpertMLP

    m = ExpertMLP(8, 4, "silu", device="cpu", parts={"gate": "w1", "up": "w3", "down": "w2"})
    assert sorted(m.state_dict()) == ["w1.weight", "w2.weight", "w3.weight"]
    # the generic code (calibration) still reaches the parts by their usual names
    assert m.gate_proj is m.w1 and m.up_proj is m.w3 and m.down_proj is m.w2
    x = torch.randn(3, 8)
    assert torch.equal(m.intermediate(x), torch.nn.functional.silu(m.w1(x)) * m.w3(x))
    assert sorted(ExpertMLP(8, 4, "silu", device="cpu").state_dict()) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]


def test_mixtral_parameter_names_are_checkpoint_names(tmp_path: pathlib.Path) -> None:
    # w1/w3/w2 under block_sparse_moe, as on disk: load_weights and the writer need no mapping
    from moe2gguf.arch import arch_for_config
    from moe2gguf.checkpoint import Checkpoint
    from moe2gguf.modeling import build_model

    ckpt = Checkpoint(FAMILIES["mixtral"].build(tmp_path / "tiny-mixtral"))
    assert set(build_model(arch_for_config(ckpt.config)).state_dict()) == set(ckpt.tensor_names)


def narrowed(src: pathlib.Path, dst: pathlib.Path, widths: list[list[int]]) -> pathlib.Path:
    """A pruned-style checkpoint: expert k of layer b keeps its first widths[b][k] channels."""
    from moe2gguf.arch import arch_for_config

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    arch = arch_for_config(cfg)
    t = load_file(dst / "model.safetensors")
    for bid, layer in enumerate(widths):
        for k, w in enumerate(layer):
            for part in ("gate", "up"):
                t[arch.expert_name(bid, k, part)] = t[arch.expert_name(bid, k, part)][:w].contiguous()
            t[arch.expert_name(bid, k, "down")] = t[arch.expert_name(bid, k, "down")][:, :w].contiguous()
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    cfg["moe2gguf_expert_widths"] = widths
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_deepseek_shared_experts_padded_to_the_routed_width_exactly(tmp_path: pathlib.Path) -> None:
    # exported width 24 < 32: the loader wants shared width 24 * k, so the 64-wide shared
    # experts are zero-padded to 24 * 3 = 72; exact, as the logits show
    widths = [[], [24, 16, 24, 8, 24, 16, 8, 8], [8, 24, 16, 24, 8, 8, 16, 24]]
    pruned = narrowed(FAMILIES["deepseek-v2"].build(tmp_path / "tiny"), tmp_path / "narrow", widths)
    f32_roundtrip(pruned, tmp_path)
    g = GGUF(tmp_path / "narrow-f32.gguf")
    assert g.value("deepseek2.expert_shared_count") == 3
    assert g.shapes["blk.1.ffn_down_shexp.weight"] == (72, H)
    assert g.shapes["blk.1.ffn_down_exps.weight"] == (24, H, E)
    assert g.routed_params() == sum(sum(layer) for layer in widths) * 3 * H  # the padding is zeros


def test_deepseek_v3_mtp_layer_is_counted_apart_and_not_exported(tmp_path: pathlib.Path) -> None:
    # llama.cpp's converter skips model.layers.{bid} with bid >= block_count (the MTP
    # layers): inspect must not count them in the model, export must leave them out
    fam = FAMILIES["deepseek-v3"]
    folder = build_tiny(fam.cls, fam.config(), tmp_path / "tiny-v3-mtp")
    before = inspect_model(str(folder))
    added = add_mtp_layer(folder)
    after = inspect_model(str(folder))
    assert before["params_mtp_not_exported"] == 0 and after["params_mtp_not_exported"] == added
    for key in ("params_total", "params_routed_experts", "params_shared_experts", "params_active_per_token", "bytes_bf16"):
        assert after[key] == before[key], key
    assert "MTP (not exported)" in CliRunner().invoke(cli, ["inspect", str(folder)], catch_exceptions=False).output
    out = tmp_path / "mtp-f32.gguf"
    export(str(folder), str(out), "F32", progress=False)
    g = GGUF(out)
    assert not any(n.startswith("blk.3.") for n in g.shapes) and "blk.2.ffn_up_exps.weight" in g.shapes
    assert g.value("deepseek2.block_count") == 3
    load_in_llama_cpp(out)


def test_deepseek_v3_router_hooks_name_the_selection_bias(tmp_path: pathlib.Path) -> None:
    # what prune must slice and preserve when it removes V3 experts
    from moe2gguf.arch import arch_for_config
    from moe2gguf.checkpoint import Checkpoint

    ckpt = Checkpoint(FAMILIES["deepseek-v3"].build(tmp_path / "tiny"))
    arch = arch_for_config(ckpt.config)
    names = arch.router_tensor_names(1)
    assert all(n in ckpt and ckpt.shape(n)[0] == E for n in names) and len(names) == 2
    assert arch.expert_groups(1) == 2


def test_allocation_keeps_every_router_group_equal() -> None:
    """DeepSeek-V3's n_group contiguous groups: every allocation keeps them equal."""
    from moe2gguf.prune import allocate as A
    from moe2gguf.prune.deploy import Shape, allocate_shape, feasible_shapes, shape_coverage

    g = torch.Generator().manual_seed(0)
    # group 0 (experts 0-3) holds all the large scores: an ungrouped top-4 would take it whole
    s = torch.rand(E, W, generator=g)
    s[:4] += 10.0
    per_group = lambda widths: [sum(1 for w in widths[i : i + E // 2] if w) for i in (0, E // 2)]  # noqa: E731
    assert per_group(allocate_shape([s], Shape(4, 32)).widths[0]) == [4, 0]  # what grouping forbids
    alloc = allocate_shape([s], Shape(4, 32), groups=[2])
    assert per_group(alloc.widths[0]) == [2, 2]
    # inside each group the best by top-W score
    kept = [e for e, w in enumerate(alloc.widths[0]) if w]
    top = s.sum(1)
    assert kept == sorted(torch.topk(top[:4], 2).indices.tolist() + (4 + torch.topk(top[4:], 2).indices).tolist())
    assert abs(shape_coverage([s], Shape(4, 32), [2]) - A.coverage([s], alloc)) < 1e-12
    # K: multiples of n_group from the fewest whose topk_group groups hold top-k
    lay = A.LAYOUTS["llama.cpp"]
    assert sorted({sh.experts for sh in feasible_shapes(lay, E, 32, 2, groups=2, groups_used=1)}) == [4, 6]
    assert sorted({sh.experts for sh in feasible_shapes(lay, E, 32, 2)}) == [2, 3, 4, 5, 6, 7]
    # expert-drop: kept count rounded to a multiple of n_group, equal per group
    drop = A.allocate_expert_drop([top, top], [[W] * E] * 2, 0.4, 4, groups=[2, 1])
    assert per_group(drop.widths[0]) == [2, 2] and per_group(drop.widths[1]) == [4, 1]
    # ragged coverage: every expert keeps at least one channel when grouped
    floor = A.keep_every_expert_if_grouped(A.top_expert_floor([top], 2), [2])
    ragged = A.allocate([s], [3 * H], 0.3 * E * W * 3 * H, A.LAYOUTS["ragged"], floor)
    assert all(w >= 1 for w in ragged.widths[0])
