"""Benchmark (not a test): every verb at Qwen3-30B-A3B's real layer size (or Mixtral-8x7B's, --dims), in RAM, disk and time.

    python tools/bench_scale.py --layers 2 4 --work /tmp/bench-scale --json out.json
    python tools/bench_scale.py --layers 2 --old-commit 0d15e18     # also the old code, same files
    python tools/bench_scale.py --dims mixtral-8x7b --layers 1 2 --tokens 4096   # few, wide experts
    python tools/bench_scale.py --dims deepseek-v3 --layers 1 --tokens 4096 --no-baseline --verbs calibrate,prune-cheapest

Builds (once, cached under --work) a synthetic checkpoint with Qwen3-30B-A3B's layer
dimensions (hidden 2048, 128 experts x 768, top-8, 32 query / 4 KV heads of 128, vocabulary
151,936, untied head, bf16) but only --layers decoder layers: random weights (std 0.02, norms 1),
written shard by shard (embeddings, one shard per layer, head), never the whole model in RAM,
with the bundled model's 4,096-entry tokenizer (the GGUF pads the vocabulary with unused
[PADi] tokens, as convert_hf_to_gguf does). Then runs each verb as a child process exactly as a
user types it and measures, per verb: wall time, seconds per layer, peak RSS of the whole
process tree (sum of RSS over the child and its descendants, /proc polled every 0.2 s; mmapped
weight pages count, as `top` shows them), the largest single process's maxrss (wait4), the
exact peak of each step of our verbs (each layer, probed shape, rewritten layer:
$MOE2GGUF_PEAK_LOG, moe2gguf/memory.py), the ratio of the tree peak to one decoder layer +
embeddings + head (bf16 bytes), and for export the peak bytes in its output folder beyond the
final GGUF (temporary disk) and any file left.

Verbs: calibrate (--tokens/--ctx, by default calibrate's own 32,768 and 512), prune with
its defaults (--ratio 0.25 --layout llama.cpp, named because the old code's default layout was
ragged) and its cheapest setting (+ --probe 0 --no-reconstruct; the refit stays on), export of the unpruned checkpoint to Q4_K_M, check of that GGUF against llama.cpp's
own Q4_K_M of the same checkpoint (KLD ~0 says the two exports agree). The baseline, in the
same run on the same files: llama.cpp's convert_hf_to_gguf.py --outtype bf16 (its pre-tokenizer
hash lookup patched to "qwen2", the regex of the bundled tokenizer, as tools/parity_upstream.py
does) + llama-quantize Q4_K_M; with check, llama-perplexity's own KLD on that Q4_K_M at check's
--ctx/--chunks (the logits of the base to a file, then the model against them), whose peak is
what llama.cpp itself holds to run the model that check runs.

--old-commit runs the same verbs with the code of an older commit, from a temporary git
worktree (removed at the end) on the same venv, each under --rss-limit and --timeout: a verb
killed there is reported as "killed at X GiB" / "timed out".
Prints machine, load average at start and end, and a markdown table; --json writes all rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
REF = ROOT / "moe2gguf" / "data" / "reference-moe"
GiB = 2**30

# Qwen3-30B-A3B's config.json, less the layer count (set per run) and the vocabulary ids of
# its own tokenizer (ours is the bundled one: eos 2, pad 0)
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", attention_bias=False, attention_dropout=0.0,
    bos_token_id=None, eos_token_id=2, pad_token_id=0, decoder_sparse_step=1, head_dim=128, hidden_act="silu",
    hidden_size=2048, initializer_range=0.02, intermediate_size=6144, max_position_embeddings=40960,
    max_window_layers=48, mlp_only_layers=[], moe_intermediate_size=768, norm_topk_prob=True,
    num_attention_heads=32, num_experts=128, num_experts_per_tok=8, num_key_value_heads=4,
    output_router_logits=False, rms_norm_eps=1e-6, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"},
    router_aux_loss_coef=0.001, sliding_window=None, tie_word_embeddings=False, dtype="bfloat16",
    use_cache=True, use_sliding_window=False, vocab_size=151936,
)
# --dims: whose layer dimensions the synthetic checkpoint has (Qwen3-MoE's tensor layout for these
# two), and the decoder layers of that model, for the extrapolation. Mixtral-8x7B: few, wide
# experts (8 x 14,336 of hidden 4,096, top-2, 32 query / 8 KV heads of 128, vocabulary 32,000),
# where per-expert matrices of width x width (the refit's Gram matrices) outgrow the layer itself
DIMS = {
    "qwen3-30b-a3b": (QWEN3_30B_A3B, 48),
    "mixtral-8x7b": (dict(QWEN3_30B_A3B, hidden_size=4096, intermediate_size=14336, moe_intermediate_size=14336, num_experts=8,
                          num_experts_per_tok=2, num_key_value_heads=8, vocab_size=32000, max_window_layers=32), 32),
}
# deepseek-v3: its own layout, as published (tests/data/published_configs.json): MLA attention,
# 256 routed experts of 7168 x 2048 + 1 shared, sigmoid group-limited routing, block-FP8
# weights (float8 e4m3 + a float32 factor per 128 x 128 block); every layer an MoE one (its 3
# dense layers and the MTP layer left out) and the bundled tokenizer's ids. 58 MoE layers.
_V3 = json.loads((ROOT / "tests" / "data" / "published_configs.json").read_text())["DeepSeek-V3"]["config"]
DIMS["deepseek-v3"] = (dict({k: v for k, v in _V3.items() if k != "auto_map"}, first_k_dense_replace=0, num_nextn_predict_layers=0,
                            bos_token_id=None, eos_token_id=2, pad_token_id=0), 58)
# the weights block-FP8 stores (DeepSeek-V3's: every linear layer's but the embeddings, the
# head and the router)
FP8_WEIGHTS = re.compile(r"\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
# routed experts per shard where a layer is larger than a shard should be (DeepSeek-V3's is
# 11 GB in FP8): the builder holds one shard in memory
EXPERTS_PER_SHARD = 32
# where docs/bench/bench_scale.md unpacks llama-cpp-python's source and builds its tools
LLAMA_CPP = pathlib.Path("/tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
SHAPE_KEYS = ("hidden_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from parity_upstream import BOOT as CONVERT_BOOT  # noqa: E402


# ---------------------------------------------------------------- synthetic checkpoint

def layer_tensors(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    if cfg["model_type"] == "deepseek_v3":
        return _v3_layer_tensors(cfg, i)
    h, d, e, w = cfg["hidden_size"], cfg["head_dim"], cfg["num_experts"], cfg["moe_intermediate_size"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    p = f"model.layers.{i}."
    t = {
        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
        p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
        p + "mlp.gate.weight": (e, h),
    }
    for j in range(e):
        t[f"{p}mlp.experts.{j}.gate_proj.weight"] = (w, h)
        t[f"{p}mlp.experts.{j}.up_proj.weight"] = (w, h)
        t[f"{p}mlp.experts.{j}.down_proj.weight"] = (h, w)
    return t


def _v3_layer_tensors(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    h, e, w, heads = cfg["hidden_size"], cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["num_attention_heads"]
    nope, rope, v, ql, kvl = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["q_lora_rank"], cfg["kv_lora_rank"]
    p = f"model.layers.{i}."
    t = {
        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_a_proj.weight": (ql, h), p + "self_attn.q_a_layernorm.weight": (ql,),
        p + "self_attn.q_b_proj.weight": (heads * (nope + rope), ql),
        p + "self_attn.kv_a_proj_with_mqa.weight": (kvl + rope, h), p + "self_attn.kv_a_layernorm.weight": (kvl,),
        p + "self_attn.kv_b_proj.weight": (heads * (nope + v), kvl), p + "self_attn.o_proj.weight": (h, heads * v),
        p + "mlp.gate.weight": (e, h), p + "mlp.gate.e_score_correction_bias": (e,),
    }
    shared = cfg["n_shared_experts"] * w
    for part, shape in (("gate_proj", (shared, h)), ("up_proj", (shared, h)), ("down_proj", (h, shared))):
        t[f"{p}mlp.shared_experts.{part}.weight"] = shape
    for j in range(e):
        t[f"{p}mlp.experts.{j}.gate_proj.weight"] = (w, h)
        t[f"{p}mlp.experts.{j}.up_proj.weight"] = (w, h)
        t[f"{p}mlp.experts.{j}.down_proj.weight"] = (h, w)
    return t


def write_shard(path: pathlib.Path, shapes: dict[str, tuple[int, ...]], seed: int, fp8_block: tuple[int, int] | None = None) -> None:
    """Random bf16 tensors (std 0.02 as HF initialises Qwen3-MoE; norm weights 1, a router
    bias 0), one shard. With `fp8_block`, the weights FP8_WEIGHTS names are stored as block-FP8
    of the same spread: float8 e4m3 values of std 448 / 4.5 and a factor of 0.02 * 4.5 / 448
    per block (DeepSeek's own factors are each block's maximum over 448)."""
    import torch
    from safetensors.torch import save_file

    if path.exists():
        return
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("e_score_correction_bias"):
            tensors[name] = torch.zeros(shape, dtype=torch.float32)
        elif len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        elif fp8_block is not None and FP8_WEIGHTS.search(name):
            tensors[name] = (torch.randn(shape, generator=g) * (448 / 4.5)).clamp_(-448, 448).to(torch.float8_e4m3fn)
            blocks = tuple(math.ceil(n / b) for n, b in zip(shape, fp8_block, strict=True))
            tensors[name + "_scale_inv"] = torch.full(blocks, 0.02 * 4.5 / 448, dtype=torch.float32)
        else:
            tensors[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    tmp = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def build_checkpoint(work: pathlib.Path, layers: int, dims: dict = QWEN3_30B_A3B) -> pathlib.Path:
    """work/ckpt-L{layers}: shards generated once in work/shards (layer i is the same tensor
    in every depth) and hard-linked, so the 4-layer model costs two more layers of time."""
    out = work / f"ckpt-L{layers}"
    if (out / ".complete").exists():
        return out
    cfg = dict(dims, num_hidden_layers=layers)
    pool = work / "shards"
    pool.mkdir(parents=True, exist_ok=True)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    fp8 = tuple(cfg["quantization_config"]["weight_block_size"]) if "quantization_config" in cfg else None
    shards = {"embed.safetensors": ({"model.embed_tokens.weight": (v, h)}, 1_000_000)}
    for i in range(layers):
        tensors = layer_tensors(cfg, i)
        if fp8 is None:
            shards[f"layer-{i:03d}.safetensors"] = (tensors, i)
            continue
        # the layer's own tensors, then its routed experts EXPERTS_PER_SHARD at a time
        names = sorted(tensors, key=lambda n: ".experts." in n)
        first = next(k for k, n in enumerate(names) if ".experts." in n)
        parts = [names[:first]] + [names[k : k + 3 * EXPERTS_PER_SHARD] for k in range(first, len(names), 3 * EXPERTS_PER_SHARD)]
        for k, part in enumerate(parts):
            shards[f"layer-{i:03d}-{k:02d}.safetensors"] = ({n: tensors[n] for n in part}, 1000 * i + k)
    shards["head.safetensors"] = ({"model.norm.weight": (h,), "lm_head.weight": (v, h)}, 2_000_000)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    weight_map = {}
    for fname, (shapes, seed) in shards.items():
        print(f"  building {fname} ...", file=sys.stderr, flush=True)
        write_shard(pool / fname, shapes, seed, fp8)
        os.link(pool / fname, out / fname)
        weight_map.update({n: fname for n in shapes})
        if fp8 is not None:
            weight_map.update({n + "_scale_inv": fname for n in shapes if FP8_WEIGHTS.search(n)})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        if (REF / f).exists():
            shutil.copy(REF / f, out / f)
    (out / ".complete").write_text("")
    return out


def built_checkpoint(work: pathlib.Path, layers: int, dims: dict) -> pathlib.Path:
    """`build_checkpoint` in a process of its own: built here, its tensors would stay in this
    process's RSS, which every measured child starts with (Popen forks before it execs), so
    their maxrss would be this process's."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(build_checkpoint, (work, layers, dims))


def bf16_bytes(cfg: dict, layers: int) -> dict[str, int]:
    """bf16 bytes of one decoder layer, embeddings + head, and the whole model."""
    layer = sum(2 * math.prod(s) for s in layer_tensors(cfg, 0).values())  # as bf16, the FP8 ones too
    eh = 2 * 2 * cfg["vocab_size"] * cfg["hidden_size"] + 2 * cfg["hidden_size"]
    return {"layer": layer, "embed_head": eh, "model": eh + layers * layer}


# ---------------------------------------------------------------- measuring a child

def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rfind(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_rss(pid: int) -> tuple[int, int]:
    """Sums of VmRSS and of RssAnon (private memory, without mapped file pages) over pid and its
    descendants, in bytes."""
    kids, todo, total, anon = _children_map(), [pid], 0, 0
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total, anon


def dir_bytes(path: pathlib.Path) -> int:
    total = 0
    if not path.exists():
        return 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def measure(cmd: list[str], env: dict, watch: pathlib.Path | None, timeout: float, rss_limit: float, log: pathlib.Path) -> dict:
    """Run cmd, polling its process tree's RSS (and watch's bytes) every 0.2 s; kill the tree
    above rss_limit bytes or after timeout seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as lf:
        lf.write(" ".join(cmd) + "\n")
        lf.flush()
        # cwd outside any checkout: `python -c` puts the cwd first on sys.path, before PYTHONPATH
        p = subprocess.Popen(cmd, env=env, cwd=log.parent, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
    peak, peak_anon, peak_dir, status = 0, 0, 0, None
    while True:
        try:
            pid, st, ru = os.wait4(p.pid, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            break
        rss, anon = tree_rss(p.pid)
        peak, peak_anon = max(peak, rss), max(peak_anon, anon)
        if watch is not None:
            peak_dir = max(peak_dir, dir_bytes(watch))
        if status is None and peak > rss_limit:
            status = f"killed at {peak / GiB:.1f} GiB"
        elif status is None and time.perf_counter() - t0 > timeout:
            status = f"timed out ({timeout:.0f} s)"
        if status is not None:
            os.killpg(p.pid, signal.SIGKILL)
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(st)
    row = {"cmd": " ".join(cmd), "wall_s": wall, "peak_tree_rss": peak, "peak_tree_anon": peak_anon, "max_proc_rss": ru.ru_maxrss * 1024,
           "cpu_s": ru.ru_utime + ru.ru_stime, "rc": rc, "status": status or ("ok" if rc == 0 else f"exit {rc}"),
           "log": str(log)}
    if watch is not None:
        row["peak_dir_bytes"] = peak_dir
    return row


# ---------------------------------------------------------------- the runs

# the CLI as `moe2gguf` runs it; PYTHONPATH decides whose package (this checkout or an old worktree)
CLI = [sys.executable, "-c", "import sys; sys.argv[0] = 'moe2gguf'; from moe2gguf.cli import main; main()"]


def old_worktree(commit: str, where: pathlib.Path) -> pathlib.Path:
    """A worktree of `commit` whose moe2gguf package holds its own prune/ and exporter/ (the
    editable install maps moe2gguf.prune to this checkout's prune/, so the old ones are linked in)."""
    if where.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), commit], check=True,
                   stdout=subprocess.DEVNULL)
    for sub in ("prune", "exporter"):
        (where / "moe2gguf" / sub).symlink_to(where / sub)
    probe = subprocess.run([sys.executable, "-c", "import moe2gguf.prune.calibrate as c; print(c.__file__)"], cwd="/",
                           env=dict(os.environ, PYTHONPATH=str(where)), capture_output=True, text=True, check=True).stdout
    if not probe.strip().startswith(str(where)):
        raise SystemExit(f"the old code does not import from {where} ({probe.strip()})")
    return where


def run_code(label: str, code: pathlib.Path | None, ckpt: pathlib.Path, layers: int, a: argparse.Namespace,
             baseline_q4: pathlib.Path | None) -> list[dict]:
    work = a.work / f"run-{label.replace(' ', '-')}-L{layers}"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if code is not None:
        env["PYTHONPATH"] = str(code)
    cli = CLI
    calib = work / "calib"
    steps = [  # (verb, arguments, folder watched for temporary disk); outputs replaced by each run
        ("calibrate", ["calibrate", str(ckpt), "--text", str(REF / "calib.txt"), "-o", str(calib),
                       "--tokens", str(a.tokens), "--ctx", str(a.ctx)], None),
        ("prune (cheapest)", ["prune", str(ckpt), "--calib", str(calib), "--ratio", str(a.ratio), "--layout", "llama.cpp",
                              "--probe", "0", "--no-reconstruct", "-o", str(work / "pruned-cheap")], None),
        ("prune (defaults)", ["prune", str(ckpt), "--calib", str(calib), "--ratio", str(a.ratio),
                              "--layout", "llama.cpp", "-o", str(work / "pruned-default")], None),
        ("export Q4_K_M", ["export", str(ckpt), "-o", str(work / "export" / "model-Q4_K_M.gguf"), "--quant", "Q4_K_M"],
         work / "export"),
    ]
    if baseline_q4 is not None:
        steps.append(("check vs llama.cpp Q4_K_M", ["check", str(work / "export" / "model-Q4_K_M.gguf"), "--base", str(baseline_q4),
                                                    "--text", str(REF / "eval.txt"), "--ctx", str(a.check_ctx),
                                                    "--chunks", str(a.check_chunks), "--json", str(work / "check.json")], None))
    rows = []
    for name, args, watch in steps:
        if name.split()[0] + ("-" + name.split()[1][1:-1] if name.startswith("prune") else "") not in a.verbs:
            continue
        out = pathlib.Path(args[args.index("-o") + 1] if "-o" in args else args[args.index("--json") + 1])
        for old in (out, watch):
            if old is not None and old.is_dir():
                shutil.rmtree(old)
            elif old is not None and old.exists():
                old.unlink()
        if watch is not None:
            watch.mkdir(parents=True)
        if name.startswith("check") and rows and rows[-1]["status"] != "ok":
            continue
        print(f"[{label} L{layers}] {name} ...", file=sys.stderr, flush=True)
        peaks = work / f"{name.split()[0]}-{len(rows)}.peaks"
        peaks.unlink(missing_ok=True)
        row = measure(cli + args, dict(env, MOE2GGUF_PEAK_LOG=str(peaks)), watch, a.timeout, a.rss_limit * GiB,
                      work / f"{name.split()[0]}-{len(rows)}.log")
        row.update(code=label, layers=layers, verb=name, **step_peaks(peaks, row))
        if watch is not None:
            final = [f for f in watch.iterdir()]
            out = watch / "model-Q4_K_M.gguf"
            row["left_behind"] = [f.name for f in final if f != out]
            row["gguf_bytes"] = out.stat().st_size if out.exists() else 0
            row["temp_disk"] = max(0, row["peak_dir_bytes"] - row["gguf_bytes"])
        if name.startswith("check") and (work / "check.json").exists():
            rep = json.loads((work / "check.json").read_text())
            row["kld"] = rep.get("kld", rep.get("kld_mean"))
        print(f"    {row['status']}, {row['wall_s']:.0f} s, tree RSS {row['peak_tree_rss'] / GiB:.2f} GiB", file=sys.stderr, flush=True)
        rows.append(row)
        a.sink(row)
    return rows


def step_peaks(log: pathlib.Path, row: dict) -> dict:
    """The exact peak RSS of each step (layer, probed shape, rewritten layer) of the verb's main
    process, from moe2gguf.memory's $MOE2GGUF_PEAK_LOG; empty for code that does not write it.
    Each logged step resets the kernel's high-water mark, so the process's maxrss is the
    larger of wait4's and the steps'."""
    if not log.exists():
        return {}
    steps = [(where, int(b)) for _, b, where in (line.rstrip("\n").split("\t") for line in log.read_text().splitlines())]
    return {"step_peaks": steps, "max_proc_rss": max([row["max_proc_rss"]] + [b for _, b in steps])}


def run_baseline(ckpt: pathlib.Path, layers: int, a: argparse.Namespace) -> tuple[list[dict], pathlib.Path | None]:
    work = a.work / f"run-llama.cpp-L{layers}"
    if work.exists():
        shutil.rmtree(work)
    (work / "out").mkdir(parents=True)
    bf16, q4 = work / "out" / "model-bf16.gguf", work / "out" / "model-Q4_K_M.gguf"
    rows = []
    steps = [
        ("convert_hf_to_gguf bf16", [sys.executable, "-c", CONVERT_BOOT, str(a.llama_cpp), str(ckpt), str(bf16), "qwen2", "bf16"]),
        ("llama-quantize Q4_K_M", [str(a.llama_quantize), str(bf16), str(q4), "Q4_K_M"]),
    ]
    for name, cmd in steps:
        print(f"[llama.cpp L{layers}] {name} ...", file=sys.stderr, flush=True)
        row = measure(cmd, dict(os.environ), work / "out", a.timeout, a.rss_limit * GiB, work / f"{name.split()[0]}.log")
        row.update(code="llama.cpp", layers=layers, verb=name)
        print(f"    {row['status']}, {row['wall_s']:.0f} s, tree RSS {row['peak_tree_rss'] / GiB:.2f} GiB", file=sys.stderr, flush=True)
        rows.append(row)
        a.sink(row)
        if row["status"] != "ok":
            return rows, None
    rows[0]["gguf_bytes"] = bf16.stat().st_size
    rows[1]["gguf_bytes"] = q4.stat().st_size
    if "check" in a.verbs and a.llama_perplexity.exists():
        # what llama.cpp's own tool holds for the same KLD: its logits of the base as a file, then
        # the model against them (here the Q4_K_M against itself: the memory is the model's)
        kld, ppl = work / "base.kld", str(a.llama_perplexity)
        # one window per batch, as check scores them (by default llama-perplexity's first run
        # packs 2048 / ctx windows into one batch, with a KV cache and logits to match)
        common = ["-f", str(REF / "eval.txt"), "-c", str(a.check_ctx), "-b", str(a.check_ctx), "--chunks", str(a.check_chunks),
                  "--kl-divergence-base", str(kld)]
        cmd = ["sh", "-c", '"$0" "$@" && "$0" "$@" --kl-divergence', ppl, "-m", str(q4), *common]
        print(f"[llama.cpp L{layers}] llama-perplexity KLD ...", file=sys.stderr, flush=True)
        row = measure(cmd, dict(os.environ), None, a.timeout, a.rss_limit * GiB, work / "llama-perplexity.log")
        row.update(code="llama.cpp", layers=layers, verb="llama-perplexity KLD (base, then model)")
        print(f"    {row['status']}, {row['wall_s']:.0f} s, tree RSS {row['peak_tree_rss'] / GiB:.2f} GiB", file=sys.stderr, flush=True)
        rows.append(row)
        a.sink(row)
        kld.unlink(missing_ok=True)
    elif "check" in a.verbs:
        print(f"[llama.cpp L{layers}] no {a.llama_perplexity}: check has no llama-perplexity row to compare with", file=sys.stderr, flush=True)
    return rows, q4


# ---------------------------------------------------------------- report

def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "?"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB RAM"


def table(rows: list[dict], sizes: dict[int, dict[str, int]]) -> str:
    out = ["| code | layers | verb | status | wall s | s/layer | CPU s | peak RSS tree GiB | of it anon GiB | largest process GiB | RSS / (layer+emb+head) | temp disk GiB | left behind |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = sizes[r["layers"]]
        unit = s["layer"] + s["embed_head"]
        temp = f"{r['temp_disk'] / GiB:.2f}" if "temp_disk" in r else ""
        left = (", ".join(r["left_behind"]) or "nothing") if "left_behind" in r else ""
        anon = f"{r['peak_tree_anon'] / GiB:.2f}" if "peak_tree_anon" in r else ""
        out.append(f"| {r['code']} | {r['layers']} | {r['verb']} | {r['status']} | {r['wall_s']:.0f} | {r['wall_s'] / r['layers']:.0f} | "
                   f"{r['cpu_s']:.0f} | {r['peak_tree_rss'] / GiB:.2f} | {anon} | {r['max_proc_rss'] / GiB:.2f} | {r['peak_tree_rss'] / unit:.2f}x | {temp} | {left} |")
    return "\n".join(out)


def ratios(rows: list[dict], full: int = 48) -> list[str]:
    """The issue's ratios, per code and depth: prune / calibrate, export / llama.cpp."""
    lines = []
    by = {(r["code"], r["layers"], r["verb"]): r for r in rows}
    for code, layers in sorted({(r["code"], r["layers"]) for r in rows if r["code"] != "llama.cpp"}):
        def t(v):
            r = by.get((code, layers, v))
            return r["wall_s"] if r and r["status"] == "ok" else None
        cal = t("calibrate")
        for v in ("prune (cheapest)", "prune (defaults)"):
            if cal and t(v):
                lines.append(f"- {code}, {layers} layers: {v} / calibrate = {t(v) / cal:.2f}")
        conv, quant = by.get(("llama.cpp", layers, "convert_hf_to_gguf bf16")), by.get(("llama.cpp", layers, "llama-quantize Q4_K_M"))
        if t("export Q4_K_M") and conv and quant and conv["status"] == quant["status"] == "ok":
            theirs = conv["wall_s"] + quant["wall_s"]
            ours_cpu, theirs_cpu = by[(code, layers, "export Q4_K_M")]["cpu_s"], conv["cpu_s"] + quant["cpu_s"]
            lines.append(f"- {code}, {layers} layers: export Q4_K_M / (convert bf16 + llama-quantize) = "
                         f"{t('export Q4_K_M'):.0f} / {theirs:.0f} s wall = {t('export Q4_K_M') / theirs:.2f}; "
                         f"CPU {ours_cpu:.0f} / {theirs_cpu:.0f} s = {ours_cpu / theirs_cpu:.2f}")
    # slope between depths: seconds per extra layer, extrapolated to the real model's `full` layers
    for code in sorted({r["code"] for r in rows}):
        for v in sorted({r["verb"] for r in rows if r["code"] == code}):
            pts = sorted((r["layers"], r["wall_s"]) for r in rows if r["code"] == code and r["verb"] == v and r["status"] == "ok")
            if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
                (l0, t0), (l1, t1) = pts[0], pts[-1]
                slope = (t1 - t0) / (l1 - l0)
                lines.append(f"- {code} {v}: {slope:.0f} s per extra layer ({l0}->{l1}); {full} layers ~ {(t0 + slope * (full - l0)) / 3600:.1f} h")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="decoder layers of the synthetic checkpoints (default: 2 4)")
    ap.add_argument("--dims", choices=sorted(DIMS), default="qwen3-30b-a3b",
                    help="whose layer dimensions (default qwen3-30b-a3b; mixtral-8x7b: 8 experts of 14,336, 2.9 GB a layer; "
                         "deepseek-v3: its own MLA layout in block-FP8, 256 experts of 7168 x 2048, 23 GB a layer in bf16, 12 GB stored); "
                         "its checkpoints are cached in WORK/DIMS")
    ap.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/bench-scale"),
                    help="folder for the cached checkpoints and every output (about 3.7 GB per layer count of 2, +1.25 GB per layer)")
    ap.add_argument("--tokens", type=int, default=32768, help="calibration tokens (default 32768, calibrate's own: the time targets are ratios to it)")
    ap.add_argument("--ctx", type=int, default=512, help="calibration window (default 512, calibrate's own)")
    ap.add_argument("--ratio", type=float, default=0.25, help="prune --ratio (default 0.25)")
    ap.add_argument("--check-ctx", type=int, default=128, help="check --ctx (default 128)")
    ap.add_argument("--check-chunks", type=int, default=4, help="check --chunks (default 4)")
    ap.add_argument("--verbs", default="calibrate,prune-cheapest,prune-defaults,export,check",
                    help="verbs to run, comma-separated (default: all; a later verb reuses the outputs of an earlier run in --work)")
    ap.add_argument("--no-baseline", action="store_true", help="skip llama.cpp's convert + quantize")
    ap.add_argument("--skip-new", action="store_true", help="run only the baseline and --old-commit")
    ap.add_argument("--label", default="new", help="name of this checkout's rows (default: new)")
    ap.add_argument("--old-commit", help="also run the verbs with this commit's code (temporary worktree)")
    ap.add_argument("--old-layers", type=int, nargs="+", help="layer counts for --old-commit (default: --layers)")
    ap.add_argument("--rss-limit", type=float, default=16.0, help="kill a verb whose process tree passes this many GiB (default 16)")
    ap.add_argument("--timeout", type=float, default=1800, help="kill a verb after this many seconds (default 1800)")
    ap.add_argument("--llama-cpp", type=pathlib.Path, default=LLAMA_CPP,
                    help="llama.cpp source folder with convert_hf_to_gguf.py")
    ap.add_argument("--llama-quantize", type=pathlib.Path, default=LLAMA_CPP / "build" / "bin" / "llama-quantize",
                    help="llama-quantize binary (cmake --build BUILD --target llama-quantize)")
    ap.add_argument("--llama-perplexity", type=pathlib.Path, default=LLAMA_CPP / "build" / "bin" / "llama-perplexity",
                    help="llama-perplexity binary, for check's baseline row (cmake --build BUILD --target llama-perplexity)")
    ap.add_argument("--json", type=pathlib.Path, help="also write every row as JSON here")
    ap.add_argument("--report", type=pathlib.Path, nargs="+", metavar="JSON",
                    help="run nothing: print one table from the --json files of earlier runs (runs split over processes)")
    a = ap.parse_args(argv)
    if a.report:
        return report(a.report)
    if not a.no_baseline and not ((a.llama_cpp / "convert_hf_to_gguf.py").is_file() and a.llama_quantize.is_file()):
        ap.error(f"llama.cpp's baseline needs {a.llama_cpp}/convert_hf_to_gguf.py and {a.llama_quantize}: build them as "
                 "docs/bench/bench_scale.md's first section says, pass --llama-cpp/--llama-quantize, or --no-baseline")
    a.work = (a.work / a.dims).resolve()
    a.verbs = set(a.verbs.split(","))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the worktree is removed on kill too
    a.work.mkdir(parents=True, exist_ok=True)

    start = {"machine": machine(), "load_start": os.getloadavg(), "utc_start": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())}
    rows: list[dict] = []
    sizes: dict[int, dict[str, int]] = {}
    old = None
    # every row is written to --json as soon as it is measured, so a stopped run keeps them
    a.sink = lambda row: (rows.append(row), _emit(rows, sizes, start, a))
    try:
        if a.old_commit:
            old = old_worktree(a.old_commit, pathlib.Path("/tmp") / f"bench-scale-old-{os.getpid()}")
        for layers in a.layers:
            ckpt = built_checkpoint(a.work, layers, DIMS[a.dims][0])
            sizes[layers] = dict(bf16_bytes(json.loads((ckpt / "config.json").read_text()), layers), dims=a.dims, full_layers=DIMS[a.dims][1])
            q4 = a.work / f"run-llama.cpp-L{layers}" / "out" / "model-Q4_K_M.gguf"  # an earlier run's, with --no-baseline
            q4 = q4 if q4.exists() else None
            if not a.no_baseline:
                _, q4 = run_baseline(ckpt, layers, a)
            if not a.skip_new:
                run_code(a.label, None, ckpt, layers, a, q4)
            if old is not None and layers in (a.old_layers or a.layers):
                run_code(f"old {a.old_commit}", old, ckpt, layers, a, q4)
    finally:
        if old is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    _emit(rows, sizes, start, a, final=True)


def report(files: list[pathlib.Path]) -> None:
    """One table from several runs' --json files."""
    runs = [json.loads(f.read_text()) for f in files]
    latest = {(r["code"], r["layers"], r["verb"]): r for run in runs for r in run["rows"]}  # a later file's row wins
    rows = list(latest.values())
    sizes = {int(k): v for run in runs for k, v in run["sizes"].items()}
    for f, run in zip(files, runs, strict=True):
        ar = run["args"]
        print(f"- {f.name}: {run['machine']}; load {'/'.join(f'{x:.1f}' for x in run['load_start'])} at start ({run['utc_start']}), "
              f"{'/'.join(f'{x:.1f}' for x in run['load_end'])} at end ({run['utc_end']}); calibrate --tokens {ar['tokens']} --ctx {ar['ctx']}, "
              f"prune --ratio {ar['ratio']}, check --ctx {ar['check_ctx']} --chunks {ar['check_chunks']}")
    _sizes_and_table(rows, sizes)


def _sizes_and_table(rows: list[dict], sizes: dict) -> None:
    for layers, s in sorted(sizes.items()):
        print(f"{layers} layers of {s.get('dims', 'qwen3-30b-a3b')}: one layer {s['layer'] / GiB:.2f} GiB, embeddings + head {s['embed_head'] / GiB:.2f} GiB, "
              f"model {s['model'] / GiB:.2f} GiB (bf16); 1.5x (layer + embeddings + head) = {1.5 * (s['layer'] + s['embed_head']) / GiB:.2f} GiB")
    print()
    print(table(rows, sizes))
    print()
    print("\n".join(ratios(rows, next((s.get("full_layers", 48) for s in sizes.values()), 48))))
    print()
    print("\n".join(step_lines(rows)))


def step_lines(rows: list[dict]) -> list[str]:
    """Per verb and depth, the exact peak of each step, in order, grouped by where the step
    ends: a peak that grows with depth shows as a rising sequence."""
    lines = []
    for r in rows:
        groups: dict[str, list[str]] = {}
        for where, b in r.get("step_peaks", []):
            groups.setdefault(where, []).append(f"{b / GiB:.2f}")
        if groups:
            lines.append(f"- {r['code']}, {r['layers']} layers, {r['verb']}: peak RSS per step, GiB: "
                         + "; ".join(f"{w}: {' '.join(v)}" for w, v in groups.items()))
    return lines


def _emit(rows: list[dict], sizes: dict, start: dict, a: argparse.Namespace, final: bool = False) -> None:
    end = {"load_end": os.getloadavg(), "utc_end": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())}
    if a.json:
        a.json.write_text(json.dumps({**start, **end, "args": {k: str(v) for k, v in vars(a).items()},
                                      "sizes": sizes, "rows": rows}, indent=1))
    if not final:
        return
    print(f"machine: {start['machine']}; load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in start['load_start'])} at start "
          f"({start['utc_start']}), {'/'.join(f'{x:.1f}' for x in end['load_end'])} at end ({end['utc_end']})")
    print(f"calibration: {a.tokens} tokens of the bundled calib.txt, --ctx {a.ctx}; prune --ratio {a.ratio}; "
          f"check --ctx {a.check_ctx} --chunks {a.check_chunks}")
    _sizes_and_table(rows, sizes)


if __name__ == "__main__":
    main()
