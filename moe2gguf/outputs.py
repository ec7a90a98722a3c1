"""Outputs that never destroy anything: the one place that decides what a verb may write.

Every verb hands its output path and its inputs to `atomic_dir` / `atomic_file` (or
`claim_dir` for a run folder, which is filled in place). An existing path is replaced only
when it is an earlier output of the same verb (a folder carrying MARKER, a GGUF, a check
report, a file of a run folder), and then whole: the new output is written under a
temporary name in the same folder and swapped in when complete. Anything else (a user's
folder or file, an input, a folder inside an input or holding one, a FIFO, a device, a
symbolic link) is refused in one line before any work starts.

Temporary names carry the writer's PID (`.NAME.moe2gguf-<pid>-<rand>.partial`), so the next
writer in the same folder removes the leftovers of a process that died (kill -9, power
loss); every exit path of a live process removes its own (the CLI turns SIGTERM into an
exception for that). Failures of the file system (disk full, read-only, no permission,
cross-device link, name too long) become one-line user errors naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import pathlib
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator

from moe2gguf import __version__
from moe2gguf.errors import UserError

MARKER = ".moe2gguf-output.json"
# .NAME.moe2gguf-<pid>-<8 hex>.<kind>; NAME is cut so a long output name still leaves room
TEMP_RE = re.compile(r"^\..*\.moe2gguf-(?P<pid>\d+)-[0-9a-f]{8}\.(?:partial|old|f32)$")
_NAME_IN_TEMP = 100
# below this many free bytes a failed write is taken to be a full disk, whatever the
# library that hit it made of ENOSPC (safetensors and llama.cpp do not raise OSError)
_FULL_BYTES = 1 << 20

PathLike = str | os.PathLike


# --- what an existing path is ---------------------------------------------------------------
def _head(path: pathlib.Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def is_gguf(path: pathlib.Path) -> bool:
    return _head(path, 4) == b"GGUF"


def is_check_report(path: pathlib.Path) -> bool:
    """A `check --json` report: a JSON object with the report's own keys (DESIGN.md)."""
    if path.stat().st_size > 16 << 20:
        return False
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        return False
    # perplexity ("ppl"), task accuracy ("acc", `check --task` without --text), or both
    return isinstance(data, dict) and "backend" in data and bool({"ppl", "acc"} & data.keys())


def in_run_folder(path: pathlib.Path) -> bool:
    """A file under its fixed name in a run folder (run.json, report.json, the demo plot)."""
    return marked_verb(path.parent) == "run"


def is_numpy_file(path: pathlib.Path) -> bool:
    """An .npz (a zip) or an .npy, the two forms moe2gguf's cache files take."""
    head = _head(path, 6)
    return head[:4] == b"PK\x03\x04" or head == b"\x93NUMPY"


# verb -> (what its file output is, how to recognise an earlier one)
FILE_KINDS: dict[str, tuple[str, Callable[[pathlib.Path], bool]]] = {
    "export": ("a GGUF", is_gguf),
    "check": ("a `moe2gguf check --json` report", is_check_report),
    "run": ("a file of a moe2gguf run folder", in_run_folder),
    "cache": ("a moe2gguf cache file", is_numpy_file),
}


def marked_verb(folder: pathlib.Path) -> str | None:
    """The verb whose output `folder` is, from its MARKER; None when unmarked."""
    m = folder / MARKER
    try:
        if not stat.S_ISREG(m.lstat().st_mode) or m.stat().st_size > 4096:
            return None
        data = json.loads(m.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data.get("verb") if isinstance(data, dict) and isinstance(data.get("verb"), str) else None


def write_marker(folder: pathlib.Path, verb: str) -> None:
    """Mark `folder` as `verb`'s output (whole or not at all: a torn marker would lock the folder)."""
    tmp = temp_name(folder / MARKER)
    try:
        tmp.write_text(json.dumps({"verb": verb, "moe2gguf": __version__}) + "\n")
        os.replace(tmp, folder / MARKER)
    finally:
        tmp.unlink(missing_ok=True)


def _kind_of_mode(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "a file"


# --- where an output may go -----------------------------------------------------------------
# the option a verb's output is named with, for messages (everything else writes -o)
_OPTION = {"check": "--json"}


def option_of(verb: str) -> str:
    return _OPTION.get(verb, "-o")


def output_target(path: PathLike, opt: str = "-o") -> pathlib.Path:
    """The absolute output path: its folder resolved, its own name kept (a link is not followed)."""
    if os.fspath(path) == "":
        raise UserError(f"{opt} is an empty path; give the output's name, e.g. {opt} out")
    p = pathlib.Path(path)
    if p.name in ("", ".", ".."):
        raise UserError(f"{opt} {path} names an existing folder itself, not a new entry in it; give a new name, e.g. {opt} {p / 'out'}")
    return p.parent.resolve() / p.name


def output_parent(path: pathlib.Path) -> pathlib.Path:
    parent = output_target(path).parent
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist; create it or choose another -o path")
    return parent


def _ids(path: pathlib.Path) -> set[tuple[int, int]]:
    """(device, inode) of `path` and every folder above it: nesting that survives links and bind mounts."""
    out = set()
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            st = p.stat()
            out.add((st.st_dev, st.st_ino))
    return out


def _id(path: pathlib.Path, follow: bool) -> tuple[int, int] | None:
    try:
        st = path.stat() if follow else path.lstat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_inputs(target: pathlib.Path, inputs: Iterable[PathLike | None], shown: PathLike) -> None:
    own = {i for i in (_id(target, False), _id(target, True)) if i is not None}  # the entry, and what a link names
    above = _ids(target.parent)
    for inp in inputs:
        if inp is None:
            continue
        src = pathlib.Path(inp).resolve()
        src_id = _id(src, True)
        if src == target or src_id in own:
            raise UserError(f"{shown} is the input {inp}; writing there would destroy it, choose another output path")
        if src in target.parents or src_id in above:
            raise UserError(f"{shown} is inside the input {inp}; choose an output path outside it")
        if target in src.parents or own & _ids(src.parent):
            raise UserError(f"{shown} holds the input {inp}; replacing it would destroy the input, choose another output path")


def _check_writable(parent: pathlib.Path, shown: PathLike) -> None:
    if os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise UserError(f"cannot write {shown}: {parent} is on a read-only file system; choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {shown}: no permission to write in {parent}; choose another output path")


def check_output(path: PathLike, verb: str, inputs: Iterable[PathLike | None] = (), *, folder: bool, parents: bool = False) -> pathlib.Path:
    """Refuse, in one line, an output path that `verb` must not write; return it absolute.

    Allowed: a new name in an existing writable folder (any missing folders above it too
    with `parents`), an empty folder (for a folder output), or an earlier output of `verb`."""
    try:
        return _check_output(path, verb, inputs, folder, parents)
    except OSError as e:  # a name too long, a folder we may not even look into, ...
        raise os_error(e, output_target(path, option_of(verb))) or e from None


def _check_output(path: PathLike, verb: str, inputs: Iterable[PathLike | None], folder: bool, parents: bool) -> pathlib.Path:
    o = option_of(verb)
    if not folder and os.fspath(path).endswith(os.sep):
        # pathlib drops the slash, which would write a file where the user named a folder
        raise UserError(f"{o} {path} ends in {os.sep!r}, which names a folder, not a file; give a file name, e.g. {o} {os.fspath(path).rstrip(os.sep) or 'out'}")
    target = output_target(path, o)
    shown = f"{o} {path}"
    _check_inputs(target, inputs, shown)
    parent = target.parent
    if not parent.is_dir():
        if not parents:
            raise UserError(f"output folder {parent} does not exist; create it or choose another {o} path")
        parent = next(p for p in parent.parents if p.exists())
        if not parent.is_dir():
            raise UserError(f"cannot create {o} {path}: {parent} is not a folder; choose another output path")
        _check_writable(parent, shown)
        return target
    _check_writable(parent, shown)
    try:
        st = target.lstat()
    except FileNotFoundError:
        return target
    what = _kind_of_mode(st.st_mode)
    if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise UserError(f"{o} {path} is {what}; moe2gguf writes only regular files and folders, choose another output path")
    if folder:
        if not stat.S_ISDIR(st.st_mode):
            raise UserError(f"{o} {path} is an existing file, not a folder moe2gguf wrote; choose another output path")
        if os.path.ismount(target):
            raise UserError(f"{o} {path} is a mount point; give a new folder inside it, e.g. {o} {pathlib.Path(path) / 'out'}")
        owner = marked_verb(target)
        if owner == verb or (owner is None and not any(os.scandir(target))):
            return target
        if owner is not None:
            raise UserError(f"{o} {path} is the output of `moe2gguf {owner}`, not of {verb}; choose another output path")
        raise UserError(f"{o} {path} is an existing folder that moe2gguf did not write ({MARKER} missing); it is left as it is: "
                        "choose a new folder name, or empty it")
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{o} {path} is a folder; give a file name in it, e.g. {o} {pathlib.Path(path) / 'out'}")
    kind, recognise = FILE_KINDS[verb]
    try:
        ours = recognise(target)
    except OSError:
        ours = False
    if not ours:
        raise UserError(f"{o} {path} exists and is not {kind}; it is left as it is: choose another output path")
    return target


# --- temporary names ------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is dead for our purpose
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove(p: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


def sweep_stale(folder: pathlib.Path) -> list[pathlib.Path]:
    """Remove the temporary files of dead moe2gguf processes in `folder`; return them."""
    gone = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return gone
    for e in entries:
        m = TEMP_RE.match(e.name)
        if m and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
            _remove(pathlib.Path(e.path))
            gone.append(pathlib.Path(e.path))
    return gone


def temp_name(target: pathlib.Path, kind: str = "partial") -> pathlib.Path:
    return target.parent / f".{target.name[:_NAME_IN_TEMP]}.moe2gguf-{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def _make_temp(target: pathlib.Path, kind: str, folder: bool) -> pathlib.Path:
    for _ in range(100):
        tmp = temp_name(target, kind)
        try:
            if folder:
                os.mkdir(tmp, 0o777)  # the umask decides, as for any folder the user makes
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))


@contextlib.contextmanager
def _temp(target: pathlib.Path, kind: str, folder: bool) -> Iterator[pathlib.Path]:
    """A temporary next to `target`, removed on every exit path; what fails inside (the
    caller's writing and renaming included) is judged as a user error before it is removed."""
    temps: list[pathlib.Path] = []
    try:
        with _user_errors(target, temps):
            temps.append(_make_temp(target, kind, folder))
            yield temps[0]
    finally:
        for t in temps:
            _remove(t)


@contextlib.contextmanager
def temp_dir(near: PathLike, kind: str = "f32") -> Iterator[pathlib.Path]:
    """A scratch folder next to the output `near` (same disk), under the same rules as any temp."""
    with _temp(output_target(near), kind, folder=True) as tmp:
        yield tmp


# --- file-system failures as user errors ----------------------------------------------------
def free_bytes(path: pathlib.Path) -> int:
    """Bytes this process may still write at `path` (a huge number where it cannot be told)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 1 << 62
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _tree_bytes(p: pathlib.Path) -> int:
    try:
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def os_error(e: OSError, target: pathlib.Path | None = None) -> UserError | None:
    """The one-line user error an OSError stands for, or None for one that is a bug."""
    name = e.filename or target or "?"
    where = f" -o {target}" if target is not None else ""
    fix = "choose another output path" if target is not None else "check the path"
    msgs = {
        errno.ENOSPC: f"disk full writing {name}; free space there or {fix}",
        errno.EDQUOT: f"disk quota exceeded writing {name}; free space there or {fix}",
        errno.EROFS: f"cannot write{where or ' ' + str(name)}: read-only file system; {fix}",
        errno.EACCES: f"no permission for {name}; {fix} or fix its permissions",
        errno.EPERM: f"operation not permitted on {name}; {fix} or fix its permissions",
        errno.EXDEV: f"cannot move {name} across file systems; give{where or ' an output path'} on one file system (not through a link)",
        errno.ENAMETOOLONG: f"name too long: {name}; use a shorter path",
        errno.ELOOP: f"too many levels of symbolic links in {name}; give the real path",
        errno.ENOTDIR: f"a part of {name} is not a folder; check the path",
        errno.EISDIR: f"{name} is a folder, a file was expected; check the path",
        errno.ENOENT: f"{name} does not exist; check the path",
        errno.EMFILE: f"too many open files writing {name}; raise the limit (ulimit -n)",
        errno.EIO: f"input/output error on {name}; the disk or network file system failed, check it",
        errno.EFBIG: f"{name} grew beyond the largest file allowed here (ulimit -f, or the file system's limit); raise the limit or {fix}",
        errno.EBUSY: f"{name} is busy (a mount point or in use); {fix}",
        errno.ENOTEMPTY: f"{name} changed while it was written (another writer?); run again",
        errno.ETXTBSY: f"{name} is busy (a running program); {fix}",
    }
    msg = msgs.get(e.errno)
    return UserError(msg) if msg else None


# how Rust libraries (safetensors) report a failed system call in their own exception type
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _as_os_error(e: Exception) -> Exception:
    """`e`, or the OSError it wraps when a library reports one in its own type."""
    m = None if isinstance(e, OSError) else _RUST_OS_ERROR.search(str(e))
    return OSError(int(m[1]), os.strerror(int(m[1]))) if m else e


@contextlib.contextmanager
def _user_errors(target: pathlib.Path, temps: list[pathlib.Path] | None = None) -> Iterator[None]:
    """OSErrors (and a full disk, however a library reports it) as one-line user errors.
    Runs before the temporaries in `temps` are removed, so the disk is seen as the write left it."""
    try:
        yield
    except UserError:
        raise  # already said as the user should read it (a cache folder's own disk-full line)
    except Exception as e:
        e = _as_os_error(e)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or free_bytes(target.parent) < _FULL_BYTES:
            written = sum(_tree_bytes(t) for t in temps or [])
            raise UserError(
                f"disk full writing {target} ({_mib(written)} written before it filled); "
                "free more space on that disk or choose another output path"
            ) from None
        if isinstance(e, OSError) and (err := os_error(e, target)) is not None:
            raise err from None
        raise


# --- atomic outputs -------------------------------------------------------------------------
_RENAME_EXCHANGE = 2


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    if err == errno.ENOENT:
        raise FileNotFoundError(err, os.strerror(err), str(b))
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(p: pathlib.Path) -> None:
    """Flush what was written, so a crash after the rename cannot leave a renamed but empty output."""
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and not f.is_symlink()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit_dir(tmp: pathlib.Path, target: pathlib.Path, path: PathLike, verb: str, inputs: list) -> None:
    for _ in range(20):  # another writer may swap its own output in between: the last one wins
        check_output(path, verb, inputs, folder=True)
        if not target.exists():
            try:
                os.rename(tmp, target)
                return
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue
                raise
        try:
            if _exchange(tmp, target):
                _remove(tmp)  # now the earlier output
                return
        except FileNotFoundError:
            continue
        if not any(os.scandir(target)):
            os.rename(tmp, target)  # replaces an empty folder atomically
            return
        old = temp_name(target, "old")
        try:
            os.rename(target, old)
        except FileNotFoundError:
            continue
        try:
            os.rename(tmp, target)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.rename(old, target)  # put the earlier output back
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        _remove(old)
        return
    raise UserError(f"-o {path} kept changing while it was written (other writers?); run again")


@contextlib.contextmanager
def atomic_dir(path: PathLike, verb: str, inputs: Iterable[PathLike | None] = ()) -> Iterator[pathlib.Path]:
    """Yield an empty temporary folder next to `path`; when the block succeeds, mark it as
    `verb`'s output and swap it in for `path` (refused unless new, empty or `verb`'s own)."""
    inputs = list(inputs)
    target = check_output(path, verb, inputs, folder=True)
    sweep_stale(target.parent)
    with _temp(target, "partial", folder=True) as tmp:
        yield tmp
        write_marker(tmp, verb)  # last: files copied from the model may carry a marker of their own
        _fsync_tree(tmp)
        _commit_dir(tmp, target, path, verb, inputs)


@contextlib.contextmanager
def atomic_file(path: PathLike, verb: str, inputs: Iterable[PathLike | None] = ()) -> Iterator[pathlib.Path]:
    """Yield a temporary file name next to `path`; rename it to `path` only if the block succeeds
    (refused unless `path` is new or an earlier output of `verb`, see FILE_KINDS)."""
    inputs = list(inputs)
    target = check_output(path, verb, inputs, folder=False)
    sweep_stale(target.parent)
    with _temp(target, "partial", folder=False) as tmp:
        yield tmp
        _fsync_tree(tmp)
        check_output(path, verb, inputs, folder=False)  # still ours (or still free) at the last moment
        os.replace(tmp, target)


def claim_dir(path: PathLike, verb: str, inputs: Iterable[PathLike | None] = ()) -> pathlib.Path:
    """A folder that `verb` fills in place (a run folder: its steps are cached and resumed):
    created and marked when new or empty, reused when `verb`'s own, refused otherwise."""
    target = check_output(path, verb, list(inputs), folder=True, parents=True)
    with _user_errors(target):
        target.mkdir(parents=True, exist_ok=True)
        if marked_verb(target) != verb:
            write_marker(target, verb)
        sweep_stale(target)
    return target


def release_dir(path: PathLike, verb: str) -> None:
    """Undo `claim_dir` for a folder it created when the verb failed before writing anything
    into it: a refused input leaves nothing at the output path. A folder holding any step's
    output (or not `verb`'s) is kept, to be resumed."""
    target = output_target(path)
    if marked_verb(target) != verb:
        return
    sweep_stale(target)
    if [e.name for e in os.scandir(target)] == [MARKER]:
        with contextlib.suppress(OSError):
            (target / MARKER).unlink()
            target.rmdir()
