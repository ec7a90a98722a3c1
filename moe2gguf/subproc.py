"""How a child process ended, in words a user can act on.

Python reports a child killed by a signal as a negative return code (-4 for SIGILL); a user
needs the signal's name and what it means ("killed by SIGILL (illegal instruction)"), which
says at once whether the CPU, the memory limit or another process ended it.
"""

from __future__ import annotations

import signal
import subprocess


def exit_reason(returncode: int) -> str:
    """'killed by SIGILL (illegal instruction)' for a signal, 'exit code N' otherwise."""
    if returncode >= 0:
        return f"exit code {returncode}"
    sig = -returncode
    try:
        name = signal.Signals(sig).name
    except ValueError:  # a real-time or platform-specific signal without a name
        name = f"signal {sig}"
    desc = signal.strsignal(sig)
    if not desc:
        return f"killed by {name}"
    return f"killed by {name} ({desc[0].lower()}{desc[1:]})"


def failure(proc: subprocess.CompletedProcess) -> str:
    """Why a finished child failed: how it ended, then the last line it wrote to stderr (when
    captured), which for a Python child is the exception."""
    err = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else (proc.stderr or "")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    reason = exit_reason(proc.returncode)
    return f"{reason}: {lines[-1].strip()}" if lines else reason


def run_checked(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run for scripts: a failed child ends the script with one line naming the
    command and how it ended (its signal's name, not a negative code). stderr is captured
    unless the caller routes it, so the line can quote it."""
    kwargs.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.run([str(c) for c in cmd], **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"error: {cmd[0]} failed, {failure(proc)}")
    return proc
