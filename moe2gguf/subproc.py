"""How a child process ended, in words a user can act on.

Python reports a child killed by a signal as a negative return code (-4 for SIGILL); a user
needs the signal's name and what it means ("killed by SIGILL (illegal instruction)"), which
says at once whether the CPU, the memory limit or another process ended it.
"""

from __future__ import annotations

import pathlib
import signal
import subprocess

from moe2gguf.progress import bar

# a child's stdout lines that drive the parent's progress bar: model loaded, one unit done
READY, STEP = "@ready", "@step"


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


def say_ready() -> None:
    """In a child run by `run_with_progress`: the model is loaded, the measured work starts."""
    print(READY, flush=True)


def say_step() -> None:
    """In a child run by `run_with_progress`: one unit of work is done."""
    print(STEP, flush=True)


def run_with_progress(cmd: list[str], total: int, desc: str, unit: str, work: pathlib.Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run a child that reports READY then one STEP per unit on stdout, showing a bar with ETA
    from READY on (loading the model is not part of the rate). Returns the return code and,
    for a failure, why in words: how it ended and the last line of its stderr (kept in `work`,
    so a chatty child never blocks on a full pipe)."""
    err_file = work / "stderr.txt"
    progress = None
    with open(err_file, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if line.startswith(READY) and progress is None:
                    progress = bar(range(total), desc=desc, unit=unit)
                elif line.startswith(STEP) and progress is not None:
                    progress.update(1)
            proc.wait()
        except BaseException:  # Ctrl-C, SIGTERM: the child must not run on after us
            proc.kill()
            proc.wait()
            raise
        finally:
            if progress is not None:
                progress.close()
    if proc.returncode == 0:
        return 0, ""
    lines = [ln.strip() for ln in err_file.read_text(errors="replace").splitlines() if ln.strip()]
    reason = exit_reason(proc.returncode)
    return proc.returncode, f"{reason}: {lines[-1]}" if lines else reason
