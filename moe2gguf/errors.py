"""User-facing errors and atomic outputs.

Bad input ends with exit code 2 and one line naming the problem and the fix; nothing is
left at the output path. Everything that writes a user-named path goes through
`atomic_file` / `atomic_dir` (moe2gguf/outputs.py, re-exported here), which refuse to
replace anything but an earlier output of the same verb, write under a temporary name in
the same folder and rename only on success.
"""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """Bad input: printed as one line on stderr, exit code 2, no traceback."""

    exit_code = 2

    def show(self, file=None) -> None:  # noqa: ANN001 - click's signature
        click.echo(f"error: {one_line(self.format_message())}", err=True)


def one_line(msg: str) -> str:
    """A message as one line, however it was composed (a library's text may hold newlines)."""
    return " ".join(msg.split())


_OUTPUTS = ("atomic_dir", "atomic_file", "check_output", "claim_dir", "os_error", "output_parent", "temp_dir")


def __getattr__(name: str) -> object:
    """The output helpers live in moe2gguf/outputs.py (which needs UserError from here);
    they are re-exported lazily so either module may be imported first."""
    if name in _OUTPUTS:
        from moe2gguf import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
