"""`moe2gguf demo`: the whole flow on the bundled reference MoE, ending in the report table.

It is `moe2gguf run --recipe recipes/reference-moe.yaml` (the recipe ships inside the package)
plus a PNG of quality against file size, so a new user sees in a few minutes what pruning
buys over plain quantization on a model that really was trained. `--model fine` runs the same
flow on the fine-grained bundled model (64 experts of width 64, 8 per token) instead.
"""

from __future__ import annotations

import pathlib

import click

from moe2gguf.errors import atomic_file
from moe2gguf.run import report_table, run

DATA = pathlib.Path(__file__).resolve().parent / "data"
# --model choice -> the bundled recipe it runs
RECIPES = {"reference": DATA / "reference-moe.yaml", "fine": DATA / "reference-moe-fine.yaml"}
RECIPE = RECIPES["reference"]


def plot(rows: list[dict], path: pathlib.Path, title: str = "reference MoE") -> None:
    """Perplexity against GGUF bytes, one labelled point per row."""
    import matplotlib  # its backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in rows:
        x, y = r["file_bytes"] / 2**20, r["ppl"]
        ax.scatter([x], [y], s=40)
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("GGUF file size (MiB)")
    ax.set_ylabel("perplexity on held-out text (lower is better)")
    ax.set_title(f"{title}: quality vs size (llama.cpp)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, "run") as tmp:  # the plot is a file of the run folder
        fig.savefig(tmp, format="png")
    plt.close(fig)


def demo_main(output: str, quiet: bool, model: str = "reference") -> None:
    """The `demo` verb once moe2gguf/commands.py has parsed its options."""
    rows = run(str(RECIPES[model]), output=output, quiet=quiet)
    png = pathlib.Path(output) / "quality_vs_size.png"
    plot(rows, png, "reference MoE" if model == "reference" else "fine-grained reference MoE")
    click.echo(report_table(rows))
    click.echo(f"\nplot: {png}")
