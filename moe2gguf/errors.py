"""User-facing errors and atomic outputs.

Bad input ends with exit code 2 and one line naming the problem and the fix; nothing is
left at the output path. Everything that writes a user-named path goes through
`atomic_file` / `atomic_dir`, which write under a temporary name in the same folder and
rename only on success.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import click


class UserError(click.ClickException):
    """Bad input: printed as one line on stderr, exit code 2, no traceback."""

    exit_code = 2

    def show(self, file=None) -> None:  # noqa: ANN001 - click's signature
        click.echo(f"error: {self.format_message()}", err=True)


def output_parent(path: pathlib.Path) -> pathlib.Path:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist; create it or choose another -o path")
    return parent


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds."""
    path = pathlib.Path(path)
    parent = output_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=parent)
    os.close(fd)
    tmp_path = pathlib.Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[pathlib.Path]:
    """Yield a temporary folder next to `path`; swap it in for `path` only if the block succeeds."""
    path = pathlib.Path(path)
    parent = output_parent(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a folder; choose another output path")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; remove it or choose another output path")
    tmp_path = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=parent))
    try:
        yield tmp_path
        if path.exists():
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old / "x")
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)
