"""The `moe2gguf` command. Each verb lives in its own module; this file only gathers them."""

from __future__ import annotations

import sys

import click

from moe2gguf import __version__
from moe2gguf.errors import UserError
from moe2gguf.inspect import inspect_cmd
from moe2gguf.prune.calibrate import calibrate_cmd
from moe2gguf.prune.prune import prune_cmd
from moe2gguf.exporter.check import check_cmd
from moe2gguf.exporter.export import export_cmd
from moe2gguf.run import run_cmd
from moe2gguf.chat import chat_cmd
from moe2gguf.demo import demo_cmd

VERBS = [inspect_cmd, calibrate_cmd, prune_cmd, export_cmd, check_cmd, run_cmd, chat_cmd, demo_cmd]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moe2gguf")
def cli() -> None:
    """Shrink Mixture-of-Experts LLMs for llama.cpp.

    \b
    checkpoint -> calibrate -> prune -> export -> check
    Start with `moe2gguf inspect MODEL` on a Hugging Face MoE checkpoint folder.
    """


for verb in VERBS:
    cli.add_command(verb)


def main(argv: list[str] | None = None) -> None:
    """Entry point: UserError is one line and exit code 2; Ctrl-C exits quietly with 130."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except UserError as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
