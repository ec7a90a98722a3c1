"""The verbs' click declarations: arguments, options and help texts, and nothing heavy.

`moe2gguf --help` and `moe2gguf VERB --help` read only this module (click and
moe2gguf/options.py), so they answer at once. Each verb imports its implementation when it
runs: those imports are function-local on purpose (they load torch, transformers or
llama.cpp), and each hands the parsed options to a plain `<verb>_main` function of the module
that does the work.
"""

from __future__ import annotations

from typing import Any

import click

from moe2gguf.errors import UserError
from moe2gguf.inputs import FiniteFloatRange
from moe2gguf.layout import DEFAULT_LAYOUT, PRUNE_LAYOUTS
from moe2gguf.options import DEFAULT_QUANT, DEVICES, KV_TYPES, MAX_CTX, MAX_PROBE, METHODS, PROBE_SHAPES, QUANT_TYPES, RENAMED, SCORE_KINDS, TASK_FORMATS


class MethodChoice(click.Choice):
    """--method's choices; a renamed one is refused in one line saying its new name."""

    def convert(self, value, param, ctx):  # noqa: ANN001,ANN201 - click's signature
        if value in RENAMED:
            raise UserError(RENAMED[value])
        return super().convert(value, param, ctx)


@click.command("inspect")
@click.argument("model", type=click.Path(file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def inspect_cmd(**kwargs: Any) -> None:
    """Show a MoE checkpoint: architecture, layers, experts (routed/shared/used), expert
    widths, parameter counts (total, experts, active per token) and bytes at bf16.

    Reads config.json and the safetensors headers only, so it answers at once even on a
    checkpoint of tens of GB. Works on pruned checkpoints (per-expert widths) too.
    """
    from moe2gguf.inspect import inspect_main  # heavy (torch): loaded when the verb runs

    inspect_main(**kwargs)


@click.command("calibrate")
@click.argument("model", type=click.Path(file_okay=False, path_type=str))
@click.option("--text", "text", multiple=True, required=True, type=click.Path(dir_okay=False, path_type=str), help="Calibration text (repeatable; windows are shared evenly).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Output folder CALIB/.")
@click.option("--tokens", default=32768, show_default=True, type=click.IntRange(1), help="Calibration tokens in all.")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(2), help="Tokens per window (at most the model's max_position_embeddings).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Where each decoder layer runs: auto takes a CUDA or Apple (MPS) GPU when torch sees one, else the CPU (all cores). One layer is on the device at a time; statistics are summed on the CPU in float64.")
@click.option("--gram/--no-gram", default=True, show_default=True, help="Keep each expert's Gram matrix of down_proj inputs for prune's least-squares refit: width x width floats per expert and layer (14 GiB at Qwen3-30B-A3B, 210 GB at Mixtral-8x7B; checked against the free disk first). --no-gram: prune skips the refit.")
def calibrate_cmd(**kwargs: Any) -> None:
    """Run calibration text through MODEL layer by layer and write CALIB/: per-channel
    attribution scores of every expert, routing statistics and a llama.cpp imatrix."""
    from moe2gguf.prune.calibrate import calibrate_main  # heavy (torch): loaded when the verb runs

    calibrate_main(**kwargs)


@click.command("prune")
@click.argument("model", type=click.Path(file_okay=False, path_type=str))
@click.option("--calib", required=True, type=click.Path(file_okay=False, path_type=str), help="Folder written by `moe2gguf calibrate`.")
@click.option("--ratio", type=FiniteFloatRange(0.0, 1.0, min_open=True, max_open=True), help="Fraction of routed-expert parameters to remove, 0 < R < 1.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Output checkpoint folder.")
@click.option("--method", type=MethodChoice(METHODS), default="coverage", show_default=True, help="coverage: channels of all experts chosen jointly by attribution; uniform/magnitude: one width, channels by attribution/weight norm; reap: whole experts by REAP saliency (router weight x expert-output norm); frequency: whole experts by router mass.")
@click.option("--layout", type=click.Choice(PRUNE_LAYOUTS), default=DEFAULT_LAYOUT, show_default=True, help="Widths/counts the target holds (llama.cpp: one width and one expert count for the model, what export writes; ragged: free per expert, for PyTorch evaluation).")
@click.option("--target-size", type=str, help="GGUF size to land at or under (12GB, 11.5GiB, bytes); picks ratio, width, expert count and tensor types.")
@click.option("--quant", default="Q4_K_M", show_default=True, help="llama.cpp file type the target size and width alignment are planned for.")
@click.option("--width", type=click.IntRange(1), help="llama.cpp layout: force this expert width (a multiple of 32).")
@click.option("--experts", type=click.IntRange(1), help="llama.cpp layout: force this expert count per layer.")
@click.option("--probe", default=PROBE_SHAPES, show_default=True, type=click.IntRange(0, MAX_PROBE), help="llama.cpp layout: measure this many candidate shapes (expert count x width) as pruned models on calibration tokens and keep the one of least KL-divergence; 0 ranks shapes by attribution alone.")
@click.option("--score", type=click.Choice(SCORE_KINDS), default="energy", show_default=True, help="Attribution: squared (energy) or absolute (abs) contribution, or the paper's first-order |activation x dLoss/dactivation| (taylor).")
@click.option("--min-width", default=0, show_default=True, type=click.IntRange(0), help="coverage: channels every expert keeps at least (0 lets experts be removed).")
@click.option("--refit/--no-refit", default=True, show_default=True, help="Least-squares refit of kept down_proj columns on calibration activations.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Where the shape probe and the final block re-fit run their decoder layers (and the probe its output head): auto takes a CUDA or Apple (MPS) GPU when torch sees one, else the CPU. The least-squares solves run on the CPU.")
@click.option("--reconstruct/--no-reconstruct", default=None, help="Re-fit kept experts' down_proj per layer so the pruned block, under its new routing, reproduces the unpruned block's output on the calibration text.  [default: on for --method coverage with --layout llama.cpp or --target-size, off otherwise]")
def prune_cmd(**kwargs: Any) -> None:
    """Prune MODEL's routed experts by --ratio (or to --target-size) using CALIB/ and write a
    checkpoint in HF layout (per-expert widths in config.json) with prune_report.json."""
    from moe2gguf.prune.prune import prune_main  # heavy (torch): loaded when the verb runs

    prune_main(**kwargs)


@click.command("export")
@click.argument("model", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(), help="GGUF file to write (atomically; an existing one only if it is a GGUF).")
@click.option(
    "--quant",
    default=None,
    metavar="TYPE",
    help=f"llama.cpp file type: {', '.join(sorted(QUANT_TYPES))}. Default: the per-tensor types a --target-size prune planned, else {DEFAULT_QUANT}.",
)
@click.option(
    "--imatrix",
    type=click.Path(exists=False),
    help="Calibration folder (CALIB/imatrix.gguf) or an imatrix .gguf of the unpruned model; remapped to pruned experts/channels.",
)
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE", help="Per-tensor type override, e.g. 'ffn_down_exps=Q6_K' (repeatable).")
@click.option("--verbose", is_flag=True, help="Show llama.cpp's quantizer log.")
def export_cmd(**kwargs: Any) -> None:
    """Export a (pruned) Hugging Face MoE checkpoint to GGUF for llama.cpp.

    \b
    The model is written as exact F32 with gguf-py, then quantized by llama.cpp's own
    quantizer (llama_model_quantize) to TYPE, fed with the importance matrix of --imatrix.
    Ragged experts are zero-padded to the widest (exact; saves nothing).
    """
    from moe2gguf.exporter.export import export_main  # heavy (torch, llama.cpp): loaded when the verb runs

    export_main(**kwargs)


@click.command("check")
@click.argument("model", metavar="MODEL_OR_GGUF", type=click.Path())
@click.option("--text", type=click.Path(), help="UTF-8 text to score (e.g. the bundled eval.txt).")
@click.option("--base", type=click.Path(), help="Reference (GGUF or checkpoint) for KL-divergence and top-1; its log-probs are cached.")
@click.option("--ctx", default=256, show_default=True, type=click.IntRange(4, MAX_CTX), help="Window length in tokens; the second half of each window is scored.")
@click.option("--chunks", type=click.IntRange(1), help="Score only the first N windows (default: all).")
@click.option("--json", "json_out", type=click.Path(), help="Also write the report as JSON here (an existing file only if it is such a report).")
@click.option("--kv-type", type=click.Choice(KV_TYPES), default="f16", show_default=True, help="llama.cpp KV-cache type (f32 for exact parity with PyTorch).")
@click.option("--threads", type=click.IntRange(0, 4096), default=0, help="CPU threads (default: all cores).")
@click.option("--task", type=click.Path(), help="Multiple-choice task file in a llama-perplexity format: accuracy as llama-perplexity scores it.")
@click.option("--task-format", type=click.Choice(TASK_FORMATS), help="Format of --task (default: detected).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Where a PyTorch run (MODEL or --base a model folder) computes: auto takes a CUDA or Apple (MPS) GPU when torch sees one, else the CPU. A GGUF runs in llama.cpp on the CPU. --task runs on the CPU.")
@click.option("--tasks", "n_tasks", type=int, help="Score N tasks, the N llama-perplexity picks with --<format>-tasks N (default: all).")
def check_cmd(**kwargs: Any) -> None:
    """Measure a GGUF or checkpoint: PPL, KLD/top-1 vs --base, memory, tokens/s, and
    multiple-choice task accuracy.

    \b
    A .gguf runs in llama-cpp-python, a checkpoint folder in PyTorch, with the same
    perplexity protocol as llama-perplexity (non-overlapping windows of --ctx tokens,
    second half scored), so numbers from both backends compare directly.
    --task scores a llama-perplexity --hellaswag / --winogrande / --multiple-choice file
    as llama-perplexity does (acc_norm is its number for hellaswag and multiple-choice,
    acc for winogrande); with --base, the share of tasks where both pick the same answer.
    """
    from moe2gguf.exporter.check import check_main  # numpy, then torch or llama.cpp: loaded when the verb runs

    check_main(**kwargs)


@click.command("run")
@click.option("--recipe", "recipe_file", required=True, type=click.Path(dir_okay=False), help="Recipe YAML (see recipes/).")
@click.option("--model", type=click.Path(file_okay=False), help="Checkpoint folder (default: the recipe's model.path).")
@click.option("-o", "--output", type=click.Path(), help="Run folder (default: runs/<model name>); new, empty or an earlier run's.")
@click.option("--dry-run", is_flag=True, help="Print the plan and predicted GGUF sizes; needs no weights.")
@click.option("--quiet", is_flag=True, help="Only the final table.")
def run_cmd(**kwargs: Any) -> None:
    """Run a recipe end to end: calibrate -> prune -> export -> check.

    \b
    Each step is cached in the run folder (run.json holds what it was made from), so a
    rerun or an interrupted run resumes where it stopped. Ends with a table of the pruned
    GGUF next to the unpruned model at F32 and at the same quant.
    """
    from moe2gguf.run import run_main  # heavy (torch): loaded when the verb runs

    run_main(**kwargs)


@click.command("chat")
@click.argument("gguf", type=click.Path(dir_okay=False, path_type=str))
@click.option("--system", default=None, help="System message put before the conversation.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1, MAX_CTX), help="Longest reply, in tokens.")
@click.option("--temperature", default=0.7, show_default=True, type=FiniteFloatRange(0.0, 100.0), help="Sampling temperature (0 = greedy).")
@click.option("--ctx", "n_ctx", default=2048, show_default=True, type=click.IntRange(16, MAX_CTX), help="Context length in tokens.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1), help="Sampling seed, for repeatable replies.")
def chat_cmd(**kwargs: Any) -> None:
    """Chat with a GGUF using its own chat template (a plain User/Assistant transcript when
    it has none). Type a message and press Enter; `/exit` or end of input stops. Piped
    stdin works too: every line is one user turn."""
    from moe2gguf.chat import chat_main  # llama.cpp (on the first message's model load): loaded when the verb runs

    chat_main(**kwargs)


@click.command("demo")
@click.option("-o", "--output", default="moe2gguf-demo", show_default=True, type=click.Path(), help="Run folder: new, empty or an earlier run's.")
@click.option("--quiet", is_flag=True, help="Only the final table.")
@click.option(
    "--model",
    type=click.Choice(["reference", "fine"]),
    default="reference",
    show_default=True,
    help="Bundled model: reference (8 experts of width 256, 2 per token) or fine "
    "(64 experts of width 64, 8 per token, the shape of Qwen3-30B-A3B and OLMoE; same texts).",
)
def demo_cmd(**kwargs: Any) -> None:
    """Calibrate, prune (25%, the layout stock llama.cpp runs), export to Q4_K_M and check
    the bundled reference MoE; print unpruned F32 / unpruned Q4_K_M / pruned Q4_K_M side by
    side (PPL, KLD, top-1, accuracy on the bundled "finish the line" task, file size, RAM,
    tokens/s) and write quality_vs_size.png.
    A rerun reuses what is already done."""
    from moe2gguf.demo import demo_main  # heavy (torch, matplotlib): loaded when the verb runs

    demo_main(**kwargs)


VERBS = [inspect_cmd, calibrate_cmd, prune_cmd, export_cmd, check_cmd, run_cmd, chat_cmd, demo_cmd]
