"""Train the bundled reference MoE (a small Qwen3-MoE) on Python's standard library.

Every machine that runs Python has the standard library's sources, so this model is
reproducible without a download. Files are split by a hash of their path into train,
calibration and held-out evaluation text; the calibration and evaluation texts are saved
next to the model so that tests and the demo measure on text the model never saw.

    python tools/train_reference.py                 # ~30 min on 2 cores
    python tools/train_reference.py --steps 20 -o /tmp/ref   # smoke run
    OMP_NUM_THREADS=1 python tools/train_reference.py --fine   # the fine-grained model (reference-moe-fine), ~45 min

--fine is shorthand for the second bundled model's shape (64 experts of width 64, 8 used per
token, 2 layers: Qwen3-30B-A3B / OLMoE proportions in 15.6 MB; 1,800 steps of 8 x 256 tokens)
and for reusing the first model's tokenizer and its calib/eval texts (--tokenizer), so both
models are measured on the same text with the same tokens. Each option can still be given
alone and overrides the preset.

The architecture is real (transformers' Qwen3MoeForCausalLM) with real-model proportions
where they matter to llama.cpp: hidden size 256 so K-quants apply along rows, expert width
256, 8 routed experts with 2 used per token, QK-norm, GQA.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import sysconfig
import time

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

# Qwen2's pre-tokenizer regex: llama.cpp knows it as the "qwen2" pre-tokenizer, so the GGUF
# tokenizes exactly as the HF tokenizer does.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DATA = pathlib.Path(__file__).resolve().parent.parent / "moe2gguf" / "data"
DEFAULT_OUT = DATA / "reference-moe"
# The fine-grained model: many narrow experts, top-8, as the models the recipes target.
# 1,800 steps of batch 8: 42 min with OMP_NUM_THREADS=1 on one core while the other was busy
# (1.4 s a step; with two torch threads on loaded cores a step took 28 s). Held-out PPL 31.3;
# 300 steps had left it at 136.
FINE = {"layers": 2, "experts": 64, "top_k": 8, "expert_width": 64, "tokenizer": DATA / "reference-moe",
        "out": DATA / "reference-moe-fine", "steps": 1800, "batch": 8, "experts_impl": "grouped_mm"}
BASE = {"layers": 4, "experts": 8, "top_k": 2, "expert_width": 256, "tokenizer": None, "out": DEFAULT_OUT,
        "steps": 800, "batch": 16, "experts_impl": "eager"}


def stdlib_files() -> list[pathlib.Path]:
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
    return sorted(f for f in root.rglob("*.py") if not skip.intersection(f.relative_to(root).parts))


def split_of(path: pathlib.Path) -> str:
    """Deterministic split by path: 90% train, 5% calibration, 5% evaluation."""
    rel = path.relative_to(sysconfig.get_paths()["stdlib"]).as_posix()
    bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20
    return "eval" if bucket == 0 else "calib" if bucket == 1 else "train"


def read_splits() -> dict[str, str]:
    parts: dict[str, list[str]] = {"train": [], "calib": [], "eval": []}
    for f in stdlib_files():
        parts[split_of(f)].append(f.read_text(encoding="utf-8", errors="replace"))
    return {k: "\n\n".join(v) for k, v in parts.items()}


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_config(vocab_size: int, layers: int = 4, experts: int = 8, top_k: int = 2, expert_width: int = 256) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=expert_width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )


@torch.no_grad()
def evaluate(model: Qwen3MoeForCausalLM, ids: torch.Tensor, ctx: int, chunks: int) -> float:
    """Perplexity with the project's protocol: score the second half of each window."""
    model.eval()
    nll, n = 0.0, 0
    for c in range(min(chunks, len(ids) // ctx)):
        window = ids[c * ctx : (c + 1) * ctx].unsqueeze(0)
        logits = model(window, output_router_logits=False).logits[0, ctx // 2 - 1 : -1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[0, ctx // 2 :], reduction="sum").item()
        n += ctx - ctx // 2
    model.train()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="default 800; --fine: 300")
    ap.add_argument("--batch", type=int, default=None, help="default 16; --fine: 8")
    ap.add_argument("-o", "--out", type=pathlib.Path, default=None, help="default moe2gguf/data/reference-moe; --fine: reference-moe-fine")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; --fine: 2)")
    ap.add_argument("--experts", type=int, default=None, help="routed experts per layer (default 8; --fine: 64)")
    ap.add_argument("--top-k", type=int, default=None, help="experts used per token (default 2; --fine: 8)")
    ap.add_argument("--expert-width", type=int, default=None, help="expert intermediate size (default 256; --fine: 64)")
    ap.add_argument(
        "--tokenizer",
        type=pathlib.Path,
        default=None,
        help="reuse this model folder's tokenizer and its calib.txt/eval.txt instead of training a tokenizer "
        "and writing new texts (--fine: moe2gguf/data/reference-moe)",
    )
    ap.add_argument("--fine", action="store_true", help="the fine-grained reference model's shape, tokenizer and output folder")
    ap.add_argument(
        "--experts-impl",
        default=None,
        choices=["eager", "batched_mm", "grouped_mm"],
        help="transformers' experts forward used in training (default eager; --fine: grouped_mm, faster with 64 experts); "
        "the weights are the same tensors whichever is used",
    )
    args = ap.parse_args()
    for k, v in (FINE if args.fine else BASE).items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    torch.manual_seed(args.seed)
    t0 = time.time()
    texts = read_splits()
    if args.tokenizer is not None:
        # Same tokens and the very same calibration/evaluation text as that model, so the two
        # models' numbers are comparable; the train split is the same hash split of the stdlib.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.tokenizer)
        texts["calib"] = (args.tokenizer / "calib.txt").read_text(encoding="utf-8")
        texts["eval"] = (args.tokenizer / "eval.txt").read_text(encoding="utf-8")
    else:
        tokenizer = train_tokenizer(texts["train"], args.vocab)
    train_ids = torch.tensor(tokenizer(texts["train"])["input_ids"], dtype=torch.long)
    eval_ids = torch.tensor(tokenizer(texts["eval"])["input_ids"], dtype=torch.long)
    print(f"train tokens {len(train_ids):,}  eval tokens {len(eval_ids):,}  ({time.time() - t0:.0f}s)", flush=True)

    config = make_config(len(tokenizer), args.layers, args.experts, args.top_k, args.expert_width)
    config._experts_implementation = args.experts_impl
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model = Qwen3MoeForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    log: list[dict] = []
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq + 1] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(batch[:, :-1], labels=batch[:, :-1].clone(), output_router_logits=True)
        # HF shifts labels internally; feed the inputs as labels.
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            entry = {"step": step, "loss": round(out.loss.item(), 4), "lr": lr_at(step), "elapsed_s": round(time.time() - t0)}
            if step % 200 == 0 or step == args.steps - 1:
                entry["eval_ppl"] = round(evaluate(model, eval_ids, 256, 32), 3)
            log.append(entry)
            print(json.dumps(entry), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    if args.tokenizer is None:
        (args.out / "calib.txt").write_text(texts["calib"], encoding="utf-8")
        (args.out / "eval.txt").write_text(texts["eval"], encoding="utf-8")
    final = evaluate(model.float(), eval_ids, 256, 64)
    summary = {
        "script": "tools/train_reference.py",
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "python_stdlib": sysconfig.get_paths()["stdlib"],
        "torch": torch.__version__,
        "train_tokens": len(train_ids),
        "tokens_seen": args.steps * args.batch * args.seq,
        "eval_tokens": len(eval_ids),
        "final_eval_ppl_ctx256_64chunks_fp32": round(final, 4),
        "wall_s": round(time.time() - t0),
        "log": log,
    }
    (args.out / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"final eval ppl {final:.3f}; saved to {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
