"""The `moe2gguf` command: the group, its verbs (declared in moe2gguf/commands.py, which
imports nothing heavy, so `--help` answers at once) and how errors end the program."""

from __future__ import annotations

import os
import signal
import sys

import click

from moe2gguf import __version__
from moe2gguf.errors import UserError, one_line, os_error
from moe2gguf.commands import VERBS

# click >= 8.2 raises this for a bare group; older versions print the help themselves
NO_ARGS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


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


class Terminated(BaseException):
    """SIGTERM or SIGHUP (the terminal closed), raised where the program is, so every `with`
    block removes its temporaries. A BaseException, like KeyboardInterrupt: no `except
    Exception` may swallow it."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


# signals whose default action would end the program without removing its temporaries
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _on_sigterm(signum: int, frame: object) -> None:
    for s in ENDING_SIGNALS:
        signal.signal(s, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise Terminated(signum)


def usage_line(e: click.UsageError) -> str:
    """Click's three-line usage error as one line, with where to find the right usage."""
    where = e.ctx.command_path if e.ctx is not None else "moe2gguf"
    return f"error: {one_line(e.format_message())} (see `{where} --help`)"


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input (a usage error, a UserError, a failing disk) is one line and exit
    code 2; Ctrl-C exits quietly with 130, SIGTERM with 143, both after removing temporaries."""
    for s in ENDING_SIGNALS:
        if s == signal.SIGTERM or signal.getsignal(s) is not signal.SIG_IGN:  # under nohup, SIGHUP stays ignored
            signal.signal(s, _on_sigterm)
    try:
        os.getcwd()
    except FileNotFoundError:  # relative paths mean nothing, and torch's libraries fail to load (a oneMKL "FATAL ERROR")
        click.echo("error: the current folder no longer exists (deleted while the shell was in it); cd to an existing folder and run again", err=True)
        sys.exit(2)
    try:
        cli.main(args=argv, prog_name="moe2gguf", standalone_mode=False)  # the hints name the command, not `python -m ...`
    except NO_ARGS_HELP as e:  # bare `moe2gguf` or a bare group: the help, not an error line
        e.show()
        sys.exit(e.exit_code)
    except click.UsageError as e:
        click.echo(usage_line(e), err=True)
        sys.exit(2)
    except UserError as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except Terminated as e:
        click.echo("terminated", err=True)
        sys.exit(128 + e.signum)
    except click.ClickException as e:
        click.echo(f"error: {one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except MemoryError:  # a limit (ulimit -v, a cgroup) or a machine too small for the model; temporaries are gone by now
        click.echo("error: out of memory; free memory or raise the limit (ulimit -v, the container's), or use a machine with more", err=True)
        sys.exit(2)
    except OSError as e:  # a file system failing under a verb (disk full, read-only, ...) is not a bug of ours
        err = os_error(e)
        if err is None:
            raise
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
