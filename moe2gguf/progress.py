"""Progress bars of long steps: tqdm, all silenced at once by `run`/`demo --quiet`.

tqdm reads its TQDM_* environment variables when it is imported, so setting TQDM_DISABLE
later does nothing; the switch lives here instead."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
_silenced = False


def bar(iterable: Iterable[T], desc: str, unit: str, disable: bool = False, leave: bool = True) -> Iterable[T]:
    """A progress bar with ETA; `leave=False` for one nested in another's step (cleared when done)."""
    return tqdm(iterable, desc=desc, unit=unit, disable=disable or _silenced, leave=leave)


@contextlib.contextmanager
def silenced(on: bool = True) -> Iterator[None]:
    global _silenced  # noqa: PLW0603 - one process-wide switch, restored on exit
    old, _silenced = _silenced, on or _silenced
    try:
        yield
    finally:
        _silenced = old
