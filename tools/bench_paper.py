"""The MoE-Slimming paper's own code next to ours: PPL and KLD at the same routed-parameter budgets.

    python tools/bench_paper.py --slimming /tmp/moe-slimming                 # R = 0.25 and 0.5
    python tools/bench_paper.py --slimming DIR --slim-python /tmp/slim-venv/bin/python

`--slimming` is a local clone of github.com/yifu-ding/MoE-Slimming ("Attribution-Guided and
Coverage-Maximized Pruning for Structural MoE Compression"); nothing of it is vendored here. Its
slimmer wants one nn.Module per expert, as transformers 4.57 builds Qwen3-MoE (5.x fuses them),
so its side runs in its own interpreter (`--slim-python`: a venv with torch, transformers 4.57,
peft, datasets) on a patched copy of its src/ in a temporary folder; the clone is never edited.
Every patch is printed. The paper's side runs its released pipeline unchanged otherwise: channel
scoring (src/calibration/channel_scoring: each MoE block copied, experts' outputs scaled by its
alpha = 0.9, backward of the relative L2 error to the block's true output), mask generation with
the configuration of its scripts/scoring.sh and configs (inter-layer `loss_coverage`, intra-layer
`attr_coverage`, channel metric `activation`, no alignment, min_per_expert 0) and its
`build_real_slim_model` as its src/train/eval.py calls it (training-free: no LoRA stage).

Both sides see the same calibration windows (moe2gguf's spread_windows of calib.txt, handed to the
paper's scorer as token ids, not re-tokenized text) and the same held-out eval windows
(moe2gguf.protocol); the paper's side returns its slimmed model's log-probs at the scored positions
and they are scored here with moe2gguf.protocol against our unpruned model, as our rows are. Our
rows come from tools/bench_prune.py (its own calibration and CLI).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_prune  # noqa: E402 - a sibling tool, not a package

from moe2gguf.errors import UserError  # noqa: E402
from moe2gguf.modeling import load_model  # noqa: E402
from moe2gguf.protocol import score_logprobs, targets_of, torch_logprobs, windows  # noqa: E402
from moe2gguf.prune.calibrate import spread_windows, tokenize  # noqa: E402

# (file under src/, text in the release, replacement, why). Applied to a copy; a patch whose text
# is not found stops the run, so a changed release is noticed rather than run half-patched.
PATCHES: list[tuple[str, str, str, str]] = [
    (
        "prune/generate/planners/inter_layer/algo/coverage.py",
        "            target = float(s) * total\n"
        "                if target <= 0.0:\n"
        "                    k_l = 0\n"
        "                else:\n"
        "                    t = torch.tensor(target, device=prefix.device)\n"
        "                idx = torch.searchsorted(prefix, t, right=False)\n"
        "                k_l = int(idx.item()) + 1   # idx is 0-based\n",
        "            target = float(s) * total\n"
        "            if target <= 0.0:\n"
        "                k_l = 0\n"
        "            else:\n"
        "                t = torch.tensor(target, device=prefix.device)\n"
        "                idx = torch.searchsorted(prefix, t, right=False)\n"
        "                k_l = int(idx.item()) + 1   # idx is 0-based\n",
        "IndentationError in the released file: the if/else under `target = ...` dedented one level",
    ),
    (
        "prune/apply/masking/expert/__init__.py",
        "from .replace_pruned_layers import replace_pruned_layers\n",
        "",
        "imports replace_pruned_layers from a module the release does not ship (and nothing calls it)",
    ),
    (
        "prune/apply/masking/expert/__init__.py",
        '    "replace_pruned_layers",\n',
        "",
        "the same name removed from __all__",
    ),
    (
        "base/models/get_model.py",
        "from alignment import get_kbit_device_map\n",
        "get_kbit_device_map = None  # alignment-handbook: only for 4/8-bit loading, not used here\n",
        "imports the alignment-handbook package, used only for quantized (bitsandbytes) loading",
    ),
    (
        "calibration/channel_scoring/forward.py",
        'with torch.autocast(device_type="cuda", dtype=dtype, enabled=True):',
        'with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=False):',
        "CUDA autocast on a CPU machine; float32 throughout instead (no autocast)",
    ),
]

# Runs under --slim-python with the patched copy on sys.path. Data loading is the only thing
# replaced at run time: the scorer's load_datasets returns window keys and its tokenizer maps them
# to our exact calibration token ids.
DRIVER = r'''
import json, sys, time
import numpy as np, torch
root, model_dir, work = sys.argv[1], sys.argv[2], sys.argv[3]
ratios, batch = json.loads(sys.argv[4]), int(sys.argv[5])
sys.path.insert(0, root)
torch.manual_seed(0)
import transformers
from transformers import AutoModelForCausalLM
import src.calibration.channel_scoring.main as scoring
from src.prune.generate import generate_masks
from src.prune.apply.slimming import build_real_slim_model

calib = np.load(f"{work}/calib.npy"); evalw = np.load(f"{work}/eval.npy")
class WindowTokenizer:
    """The scorer calls tokenizer(texts, padding=..., truncation=..., return_tensors="pt")."""
    def __call__(self, texts, **kw):
        ids = torch.from_numpy(np.stack([calib[int(t[1:])] for t in texts]))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
scoring.load_datasets = lambda name, tok, max_samples=None, **kw: [f"w{i}" for i in range(len(calib))][:max_samples]

def load():
    m = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    return m.eval()

class A: pass
args = A(); args.batch_size = batch; args.calib_batches = -(-len(calib) // batch)
args.max_seq_length = calib.shape[1]; args.device = "cpu"; args.dtype = torch.float32
model = load()
n_experts = len(model.model.layers[0].mlp.experts)
print(f"paper side: transformers {transformers.__version__}, torch {torch.__version__}, "
      f"{type(model.model.layers[0].mlp.experts).__name__} of {n_experts} {type(model.model.layers[0].mlp.experts[0]).__name__}", file=sys.stderr)
t0 = time.time()
scoring.main(args, model, WindowTokenizer(), work, "local-calib", verbose=False)
print(f"paper side: channel scoring {time.time() - t0:.0f}s", file=sys.stderr)

@torch.no_grad()
def logprobs(m):
    ctx = evalw.shape[1]
    out = [torch.log_softmax(m(torch.from_numpy(w)[None]).logits[0, ctx // 2 - 1 : ctx - 1].float(), -1) for w in evalw]
    return torch.cat(out)

torch.save(logprobs(model), f"{work}/lp_unpruned.pt")
report = {}
for r in ratios:
    kw = {"prune_ratio": r,
          "mask_method_kwargs": {"inter_layer_method": "loss_coverage", "intra_layer_method": "attr_coverage", "intra_expert_metric": "activation"},
          "adjust_masks_kwargs": {"align_inter": 0, "min_per_expert": 0}}
    masks = generate_masks(scores_dir=work, prune_kwargs=kw, device="cpu", verbose=False)
    m = build_real_slim_model(load(), mask=masks, shrink_gate=False, add_hooks=False, verbose=False)
    inter = masks["intermediate_masks"]
    widths = inter.sum(-1)
    torch.save(logprobs(m), f"{work}/lp_{r}.pt")
    report[str(r)] = {"ratio_achieved": 1 - float(inter.sum()) / inter.numel(),
                      "experts_kept": int((widths > 0).sum()),
                      "layer_keep": [round(float(x), 4) for x in masks["layerwise_keep_plan"]],
                      "widths": widths.tolist()}
json.dump(report, open(f"{work}/paper.json", "w"))
'''


def model_for_457(model: pathlib.Path, dest: pathlib.Path) -> str:
    """The bundled model as transformers 4.57 reads it: same files (linked), config.json with the
    4.x names of the two fields 5.x renamed (else 4.57 silently builds 128 experts, rope 1e6)."""
    dest.mkdir()
    for f in model.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f.resolve())
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_experts"] = cfg["num_local_experts"]
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    return "config.json: num_experts <- num_local_experts, rope_theta <- rope_parameters.rope_theta (transformers 5.x names), weights linked"


def patched_copy(slimming: pathlib.Path, dest: pathlib.Path) -> list[str]:
    """Copy the clone's src/ to dest/src and apply PATCHES there; the lines that describe them."""
    if not (slimming / "src" / "calibration" / "channel_scoring" / "main.py").is_file():
        raise UserError(f"--slimming {slimming} is not a MoE-Slimming clone (no src/calibration/channel_scoring/main.py); pass the clone's root")
    shutil.copytree(slimming / "src", dest / "src")
    done = []
    for rel, old, new, why in PATCHES:
        f = dest / "src" / rel
        text = f.read_text()
        if text.count(old) != 1:
            raise UserError(f"patch for src/{rel} does not apply (release changed?); update PATCHES in tools/bench_paper.py")
        f.write_text(text.replace(old, new))
        done.append(f"src/{rel}: {why}")
    return done


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slimming", required=True, help="root of a local clone of yifu-ding/MoE-Slimming")
    ap.add_argument("--slim-python", default="/tmp/slim-venv/bin/python", help="interpreter with transformers 4.57, peft, datasets, bitsandbytes")
    ap.add_argument("--model", default=str(bench_prune.REF))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--methods", nargs="+", default=["coverage", "reap", "frequency", "uniform"])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=65536, help="calibration tokens (both sides)")
    ap.add_argument("--batch", type=int, default=32, help="paper side: calibration windows per backward")
    a = ap.parse_args(argv)
    try:
        run(a)
    except UserError as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)


def run(a: argparse.Namespace) -> None:
    model = pathlib.Path(a.model)
    slim_py = pathlib.Path(a.slim_python)
    if not slim_py.is_file():
        raise UserError(f"--slim-python {slim_py} does not exist; make a venv with torch, transformers==4.57.*, peft, datasets, bitsandbytes")
    calib_text, eval_text = (str(p) for p in bench_prune.bench_texts(model))
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        patches = patched_copy(pathlib.Path(a.slimming).resolve(), tmp)
        model_note = model_for_457(model, tmp / "model-4.57")
        calib = spread_windows(tokenize(model, [calib_text]), [calib_text], a.tokens, a.ctx)
        evalw = windows(tokenize(model, [eval_text])[0], a.ctx, a.chunks)
        work = tmp / "work"
        work.mkdir()
        np.save(work / "calib.npy", calib)
        np.save(work / "eval.npy", evalw)
        (tmp / "driver.py").write_text(DRIVER)
        t0 = time.time()
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(tmp)}
        proc = subprocess.run([str(slim_py), str(tmp / "driver.py"), str(tmp), str(tmp / "model-4.57"), str(work), json.dumps(a.ratios), str(a.batch)], env=env, stdout=sys.stderr)  # its chatter is not the table
        if proc.returncode:
            raise UserError(f"the paper's side failed (exit {proc.returncode}, its traceback above); check --slim-python's packages")
        t_paper = time.time() - t0
        paper = json.loads((work / "paper.json").read_text())
        targets = targets_of(evalw)
        m, _, _ = load_model(str(model))
        base = torch_logprobs(m, evalw)
        ours_unpruned = score_logprobs(base, targets)
        theirs_unpruned = score_logprobs(torch.load(work / "lp_unpruned.pt"), targets, base)
        paper_rows = {r: score_logprobs(torch.load(work / f"lp_{r}.pt"), targets, base) for r in a.ratios}

        # our rows: bench_prune's own CLI (its calibration on the same calib.txt / tokens / ctx)
        t0 = time.time()
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            bench_prune.main(["--model", str(model), "--ratios", *map(str, a.ratios), "--methods", *a.methods,
                              "--ctx", str(a.ctx), "--chunks", str(a.chunks), "--tokens", str(a.tokens)])
        t_ours = time.time() - t0

    base_ppl = ours_unpruned.ppl
    print(f"MoE-Slimming patches applied to a temporary copy of {a.slimming}/src:")
    for p in patches:
        print(f"  - {p}")
    print("  - run time: its load_datasets returns our calibration windows' keys and its tokenizer maps them to "
          f"our token ids ({len(calib)} windows x {a.ctx}, spread_windows of calib.txt); CPU, float32")
    print(f"  - model copy for transformers 4.57: {model_note}")
    print(f"paper side {t_paper:.0f}s (scoring + masks + slimming + eval log-probs), ours {t_ours:.0f}s (bench_prune)")
    print(f"unpruned under transformers 4.57 (paper's side): PPL {theirs_unpruned.ppl:.3f} vs {base_ppl:.3f} here, "
          f"KLD {theirs_unpruned.kld.mean():.2e} (the two forwards agree)\n")
    lines = buf.getvalue().rstrip("\n").split("\n")
    print("\n".join(lines))
    for r in a.ratios:
        s, rep = paper_rows[r], paper[str(r)]
        print(f"| MoE-Slimming (paper's code) | {r:g} | {rep['ratio_achieved']:.4f} | - | {rep['experts_kept']} | "
              f"{s.ppl:.3f} ± {s.ppl_se:.3f} | {100 * (s.ppl / base_ppl - 1):+.2f}% | {s.kld.mean():.5f} | {s.top1.mean():.3f} |")
    print()
    for r in a.ratios:
        print(f"MoE-Slimming R={r:g}: per-layer keep {paper[str(r)]['layer_keep']}, per-expert widths {paper[str(r)]['widths']}")


if __name__ == "__main__":
    main()
