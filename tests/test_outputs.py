"""Outputs never destroy anything (DESIGN.md "Outputs and errors"), table-driven over verbs.

An existing -o is replaced only when it is an earlier output of the same verb, whole; a user's
folder or file, an input, a folder inside an input or holding one, a FIFO, a device, a link,
`.` are refused in one line with everything left as it was. Temporaries carry the writer's
PID, go away on an error, on SIGTERM and SIGINT, and a dead writer's are removed by the next
writer in that folder. File-system failures (read-only, disk full, name too long) and Click
usage errors are one line and exit code 2.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import signal
import stat
import shutil
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import REFERENCE, calibrated_tiny_qwen3moe, one_error_line, tmpfs
from moe2gguf.outputs import MARKER, TEMP_RE, is_gguf, marked_verb

FOLDER_VERBS = ("calibrate", "prune", "run")
FILE_VERBS = ("export", "check")


# --- a shared little world: a model, its calibration, a pruned copy, a GGUF, a report --------
class World:
    def __init__(self, root: pathlib.Path):
        self.root = root
        self.model, self.calib = calibrated_tiny_qwen3moe(root, seed=0, tokens=512, ctx=64)
        self.text = root / "calib.txt"
        from moe2gguf.exporter.export import export
        from moe2gguf.prune.prune import prune

        self.pruned = root / "pruned"
        prune(str(self.model), str(self.calib), 0.25, str(self.pruned), method="uniform")
        self.gguf = root / "f32.gguf"
        export(str(self.model), str(self.gguf), "F32", progress=False)
        self.recipe = root / "tiny.yaml"
        cfg = json.loads((self.model / "config.json").read_text())
        keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts_per_tok", "norm_topk_prob",
                "tie_word_embeddings")
        self.recipe.write_text(yaml.safe_dump({
            "model": {"name": "tiny", "architecture": "Qwen3MoeForCausalLM", "path": str(self.model), "config": {**{k: cfg[k] for k in keys}, "num_experts": cfg.get("num_experts", cfg.get("num_local_experts"))}},
            "calibration": {"texts": [str(self.text)], "tokens": 512, "ctx": 64},
            "prune": {"method": "uniform", "ratio": 0.25, "layout": "ragged"},
            "export": {"quant": "Q8_0"},
            "check": {"text": str(self.text), "ctx": 64, "chunks": 1},
        }))

    def args(self, verb: str, out: str | os.PathLike) -> list[str]:
        """The cheapest command line of `verb` writing `out`."""
        return {
            "calibrate": ["calibrate", self.model, "--text", self.text, "-o", out, "--tokens", "256", "--ctx", "64"],
            "prune": ["prune", self.model, "--calib", self.calib, "--ratio", "0.25", "--method", "uniform", "-o", out],
            "run": ["run", "--recipe", self.recipe, "-o", out],
            "export": ["export", self.model, "-o", out, "--quant", "F32"],
            "check": ["check", self.gguf, "--text", self.text, "--ctx", "64", "--chunks", "1", "--json", out],
        }[verb]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("world"))


def moe(capsys, *args: object) -> tuple[int, str]:
    """`moe2gguf ARGS` through the real entry point, in this process: (exit code, stderr)."""
    from moe2gguf.cli import main

    old = signal.getsignal(signal.SIGTERM)
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, old)
    return code, capsys.readouterr().err


def snapshot(*paths: pathlib.Path) -> dict:
    """Every entry under `paths` with its kind and content hash: what must not change."""
    out = {}
    for p in paths:
        for q in [p, *(sorted(p.rglob("*")) if p.is_dir() and not p.is_symlink() else [])]:
            st = q.lstat()
            digest = hashlib.sha256(q.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[str(q)] = (stat.S_IFMT(st.st_mode), digest, os.readlink(q) if q.is_symlink() else None)
    return out


def temps(folder: pathlib.Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".moe2gguf-" in p.name or p.name.endswith(".partial")]


# --- refusals: (verb, case) -> a setup returning (-o, what must stay as it was, words of the message)
def _user_folder(w, t):
    (t / "mine").mkdir()
    (t / "mine" / "notes.txt").write_text("x")
    return t / "mine", [t / "mine"], "did not write"


def _user_file(w, t):
    (t / "notes.txt").write_text("x")
    return t / "notes.txt", [t / "notes.txt"], None


def _the_model(w, t, verb):
    src = w.gguf if verb == "check" else w.model  # what the verb reads
    return src, [src], "is the input"


def _inside_model(w, t):
    return w.model / "out", [w.model], "inside the input"


def _source_weights(w, t):
    return w.model / "model.safetensors", [w.model], "inside the input"


def _holds_model(w, t):
    return w.root, [w.model], "holds the input"


def _the_calib(w, t):
    return w.calib, [w.calib], None


def _other_verb(w, t):
    return w.pruned, [w.pruned], "output of `moe2gguf prune`"


def _fifo(w, t):
    os.mkfifo(t / "fifo")
    return t / "fifo", [t / "fifo"], "a FIFO"


def _char_device(w, t):
    if os.geteuid() == 0:  # root could replace a real device node: use one of our own
        os.mknod(t / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return t / "null", [t / "null"], "a character device"
    return pathlib.Path("/dev/null"), [pathlib.Path("/dev/null")], "a character device"


def _symlink(w, t):
    (t / "real").mkdir()
    (t / "link").symlink_to(t / "real")
    return t / "link", [t / "link", t / "real"], "a symbolic link"


def _file_symlink(w, t):
    (t / "real.gguf").write_bytes(w.gguf.read_bytes())
    (t / "link.gguf").symlink_to(t / "real.gguf")
    return t / "link.gguf", [t / "link.gguf", t / "real.gguf"], "a symbolic link"


def _input_symlink(w, t):
    (t / "link.gguf").symlink_to(w.gguf)
    return t / "link.gguf", [t / "link.gguf", w.gguf], "is the input"


def _dot(w, t):
    (t / "keep.txt").write_text("x")
    return pathlib.Path("."), [t], "names an existing folder itself"


def _no_parent(w, t):
    return t / "missing" / "out", [], "does not exist"


def _name_too_long(w, t):
    return t / ("x" * 300), [], "too long"


def _trailing_slash(w, t):
    # pathlib drops the slash: the file would be written where the user named a folder
    return f"{t / 'missing'}/", [], "names a folder, not a file"


def _a_file_for_a_folder(w, t):
    (t / "file").write_text("x")
    return t / "file", [t / "file"], "existing file"


def _a_folder_for_a_file(w, t):
    (t / "dir").mkdir()
    return t / "dir", [t / "dir"], "is a folder"


def _report_for_export(w, t):
    (t / "r.json").write_text(json.dumps({"backend": "torch", "ppl": 1.0}))
    return t / "r.json", [t / "r.json"], "not a GGUF"


def _gguf_for_check(w, t):
    (t / "copy.gguf").write_bytes(w.gguf.read_bytes())
    return t / "copy.gguf", [t / "copy.gguf"], "not a `moe2gguf check --json` report"


REFUSALS = {
    # a folder output (calibrate, prune, run)
    "user folder with a file": (FOLDER_VERBS, _user_folder),
    "the model": (FOLDER_VERBS + FILE_VERBS, _the_model),
    "inside the model": (FOLDER_VERBS + ("export",), _inside_model),
    "a folder holding the model": (FOLDER_VERBS + FILE_VERBS, _holds_model),
    "another verb's output": (("calibrate", "run"), _other_verb),
    "a FIFO": (FOLDER_VERBS + FILE_VERBS, _fifo),
    "a character device": (FOLDER_VERBS + FILE_VERBS, _char_device),
    "a symlink to a folder": (FOLDER_VERBS, _symlink),
    "a symlink to a GGUF": (FILE_VERBS, _file_symlink),
    "a symlink to the input": (("check",), _input_symlink),
    "-o .": (FOLDER_VERBS + FILE_VERBS, _dot),
    "a missing parent folder": (("calibrate", "prune", "export", "check"), _no_parent),
    "a name too long": (FOLDER_VERBS + FILE_VERBS, _name_too_long),
    "a file where a folder goes": (FOLDER_VERBS, _a_file_for_a_folder),
    "a folder where a file goes": (FILE_VERBS, _a_folder_for_a_file),
    "a file name ending in /": (FILE_VERBS, _trailing_slash),
    "a user's file": (FILE_VERBS, _user_file),
    "the source weights": (("export",), _source_weights),
    "CALIB": (("prune", "run"), _the_calib),
    "a check report": (("export",), _report_for_export),
    "a GGUF": (("check",), _gguf_for_check),
}
CASES = [(verb, case) for case, (verbs, _) in REFUSALS.items() for verb in verbs]


@pytest.mark.parametrize(("verb", "case"), CASES, ids=[f"{v}-{c}" for v, c in CASES])
def test_output_that_is_not_the_verbs_own_is_refused_and_left_as_it_was(verb, case, world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `-o .` moves into the case's folder
    setup = REFUSALS[case][1]
    out, keep, words = setup(world, tmp_path, verb) if setup is _the_model else setup(world, tmp_path)
    before = snapshot(*keep)
    code, err = moe(capsys, *world.args(verb, out))
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    if words:
        assert words in err, err
    assert snapshot(*keep) == before
    if case in ("a missing parent folder", "a name too long", "a file name ending in /"):
        assert not os.path.lexists(tmp_path / "missing")
    assert temps(tmp_path) == [] and temps(world.root) == []


# --- what may be written --------------------------------------------------------------------
def test_earlier_output_of_the_same_verb_is_replaced_whole(world, tmp_path, capsys):
    out = tmp_path / "calib"
    shutil.copytree(world.calib, out)  # an earlier calibration
    (out / "left-over.bin").write_text("from the earlier run")  # the replacement must be whole
    code, err = moe(capsys, *world.args("calibrate", out))
    assert code == 0, err
    assert not (out / "left-over.bin").exists() and (out / "imatrix.gguf").is_file()
    assert json.loads((out / "calib.json").read_text())["tokens"] == 256 and marked_verb(out) == "calibrate"
    assert temps(tmp_path) == []


def test_an_empty_folder_may_be_the_output(world, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    code, err = moe(capsys, *world.args("prune", out))
    assert code == 0, err
    assert marked_verb(out) == "prune" and (out / "prune_report.json").is_file()


def test_export_replaces_its_own_gguf_and_leaves_no_f32_scratch(world, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert moe(capsys, *world.args("export", out))[0] == 0
    f32_bytes = out.stat().st_size
    code, err = moe(capsys, "export", world.model, "-o", out, "--quant", "Q8_0")
    assert code == 0, err
    assert out.read_bytes()[:4] == b"GGUF" and out.stat().st_size < f32_bytes / 2
    assert temps(tmp_path) == []


def test_check_report_is_replaced_by_a_report_only(tmp_path):
    from moe2gguf.errors import UserError
    from moe2gguf.outputs import atomic_file

    out = tmp_path / "r.json"
    out.write_text(json.dumps({"backend": "llama.cpp", "ppl": 9.0}))  # an earlier `check --json`
    with atomic_file(out, "check") as tmp:
        tmp.write_text(json.dumps({"backend": "torch", "ppl": 1.5}))
    assert json.loads(out.read_text())["ppl"] == 1.5
    out.write_text(json.dumps({"my": "settings"}))  # a user's JSON under that name
    with pytest.raises(UserError, match="is not a `moe2gguf check --json` report"), atomic_file(out, "check") as tmp:
        tmp.write_text("{}")
    assert json.loads(out.read_text()) == {"my": "settings"} and temps(tmp_path) == []


# --- the file system failing ----------------------------------------------------------------
@contextlib.contextmanager
def read_only_folder(where: pathlib.Path):
    """Permission bits for a user; root ignores them, so for root a read-only tmpfs."""
    if os.geteuid() != 0:
        where.mkdir()
        where.chmod(0o555)
        try:
            yield where
        finally:
            where.chmod(0o755)
    else:
        with tmpfs(where, "1m", ro=True):
            yield where


@pytest.mark.parametrize("verb", ["calibrate", "export", "run"])
def test_read_only_folder_is_one_line(verb, world, tmp_path, capsys):
    with read_only_folder(tmp_path / "ro") as ro:
        code, err = moe(capsys, *world.args(verb, ro / "out"))
        assert code == 2 and one_error_line(err), err
        assert "read-only" in err or "no permission" in err
        assert list(ro.iterdir()) == []


@pytest.mark.parametrize("verb", ["calibrate", "prune", "export"])
def test_disk_full_is_one_line_and_leaves_nothing(verb, world, tmp_path, capsys):
    with tmpfs(tmp_path / "small", "1m") as small:
        filler = small / "filler"
        free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
        filler.write_bytes(b"\0" * (free - 16384))  # 16 KiB left: less than any of these outputs
        code, err = moe(capsys, *world.args(verb, small / "out"))
        assert code == 2 and one_error_line(err), err
        # calibrate sees before its pass that the refit's Gram matrices cannot fit
        assert "disk full" in err or (verb == "calibrate" and "not enough free disk" in err and "--no-gram" in err), err
        assert sorted(p.name for p in small.iterdir()) == ["filler"]


def test_file_size_limit_is_one_line_and_leaves_nothing(world, tmp_path):
    """`ulimit -f` below the output's size: Python ignores SIGXFSZ, so the write fails with
    EFBIG, which is named in one line; the temporary is removed."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = tmp_path / "m.gguf"
    r = subprocess.run([sys.executable, "-m", "moe2gguf.cli", *map(str, world.args("export", out))], capture_output=True, text=True,
                       preexec_fn=limit, timeout=600)
    assert r.returncode == 2 and one_error_line(r.stderr), r.stderr
    assert "largest file allowed" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_library_error_wrapping_efbig_is_one_line(world, tmp_path):
    """safetensors reports a failed write as its own error ("... (os error 27)"): calibrate,
    which saves with safetensors, names it as the OSError it is."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    r = subprocess.run([sys.executable, "-m", "moe2gguf.cli", *map(str, world.args("calibrate", tmp_path / "calib"))], capture_output=True,
                       text=True, preexec_fn=limit, timeout=600)
    assert r.returncode == 2 and one_error_line(r.stderr), r.stderr
    assert "largest file allowed" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_is_one_line(world, capsys, monkeypatch):
    import moe2gguf.inspect

    def no_memory(model: str, as_json: bool) -> None:
        raise MemoryError

    monkeypatch.setattr(moe2gguf.inspect, "inspect_main", no_memory)
    code, err = moe(capsys, "inspect", world.model)
    assert code == 2 and one_error_line(err), err
    assert "out of memory" in err


def test_a_deleted_current_folder_is_one_line(world, tmp_path):
    """Run from a folder deleted under the shell: one line saying so (torch's libraries would
    otherwise fail to load with a oneMKL "FATAL ERROR")."""
    gone = tmp_path / "gone"
    gone.mkdir()
    argv = " ".join(f"'{a}'" for a in world.args("export", "rel.gguf"))
    r = subprocess.run(["sh", "-c", f"cd '{gone}' && rmdir '{gone}' && exec '{sys.executable}' -c 'from moe2gguf.cli import main; main()' {argv}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and one_error_line(r.stderr), r.stderr
    assert "the current folder no longer exists" in r.stderr


# --- signals, kills, races ------------------------------------------------------------------
def signal_when_temp_appears(folder: pathlib.Path, sig: int) -> threading.Thread:
    """Send `sig` to this process as soon as one of its temporaries exists in `folder`."""

    def watch() -> None:
        end = time.time() + 300
        while time.time() < end:
            if any(TEMP_RE.match(n) and f"-{os.getpid()}-" in n for n in temps(folder)):
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_write_removes_the_temp_and_keeps_the_earlier_output(sig, world, tmp_path, capsys):
    out = tmp_path / "calib"
    shutil.copytree(world.calib, out)
    before = snapshot(out)
    # a job started in the background (`cmd &`, nohup) inherits SIGINT ignored, and moe2gguf
    # rightly keeps it so; Ctrl-C at a terminal, which this pins, is not ignored
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        watcher = signal_when_temp_appears(tmp_path, sig)
        code, err = moe(capsys, *world.args("calibrate", out))
        watcher.join()
    finally:
        signal.signal(signal.SIGINT, old)
    assert code == (143 if sig == signal.SIGTERM else 130), err
    assert err.strip().splitlines()[-1] == ("terminated" if sig == signal.SIGTERM else "aborted") and "Traceback" not in err
    assert temps(tmp_path) == []
    assert snapshot(out) == before


def test_sighup_mid_write_removes_the_temp(world, tmp_path):
    """The terminal closing (SIGHUP, whose default action ends the process on the spot) removes
    the temporaries as SIGTERM does; exit code 128 + 1."""
    out = tmp_path / "calib"
    p = subprocess.Popen([sys.executable, "-m", "moe2gguf.cli", *map(str, world.args("calibrate", out))], stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    end = time.time() + 300
    while not temps(tmp_path) and p.poll() is None and time.time() < end:
        time.sleep(0.01)
    p.send_signal(signal.SIGHUP)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 129 and err.strip().splitlines()[-1] == "terminated", err
    assert temps(tmp_path) == [] and not out.exists()


# A writer in its own process, without the weight of the CLI's imports: it opens the output,
# writes, says so in a file, waits for `go` to exist, then finishes (the rename).
WRITER = """
import os, pathlib, sys, time
from moe2gguf.outputs import atomic_dir, atomic_file
out, verb, go = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
with (atomic_dir if verb == "calibrate" else atomic_file)(out, verb) as tmp:
    body = b"GGUF" + str(os.getpid()).encode() * 100000
    if verb == "calibrate":
        (tmp / "a.bin").write_bytes(body)
        (tmp / "b.bin").write_bytes(body)
    else:
        tmp.write_bytes(body)
    (go.parent / f"ready-{os.getpid()}").touch()
    while not go.exists():
        time.sleep(0.01)
"""


def writer(out: pathlib.Path, verb: str, go: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), verb, str(go)], stderr=subprocess.PIPE, text=True)


def wait_ready(flags: pathlib.Path, procs: list[subprocess.Popen]) -> None:
    end = time.time() + 120
    while not all((flags / f"ready-{p.pid}").exists() for p in procs):
        assert time.time() < end and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)


def test_a_killed_writers_temp_is_removed_by_the_next_writer(world, tmp_path, capsys):
    flags = tmp_path / "flags"
    flags.mkdir()
    out = tmp_path / "m.gguf"
    proc = writer(out, "export", flags / "go")
    wait_ready(flags, [proc])
    proc.kill()  # kill -9: nothing runs in the killed process, its temp stays
    proc.wait()
    left = [n for n in temps(tmp_path) if f"-{proc.pid}-" in n]
    assert len(left) == 1 and not out.exists()
    code, err = moe(capsys, *world.args("export", out))
    assert code == 0, err
    assert temps(tmp_path) == [] and is_gguf(out)


def test_a_live_writers_temp_is_left_alone(tmp_path):
    from moe2gguf.outputs import sweep_stale

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".x.moe2gguf-{proc.pid}-0123abcd.partial"
        live.mkdir()
        assert sweep_stale(tmp_path) == [] and live.is_dir()
    finally:
        proc.kill()
        proc.wait()
    assert sweep_stale(tmp_path) == [live] and not live.exists()


@pytest.mark.parametrize("earlier", [False, True], ids=["new", "over an earlier output"])
@pytest.mark.parametrize("verb", ["calibrate", "export"])
def test_two_concurrent_writers_both_finish_and_the_last_rename_wins_whole(verb, earlier, tmp_path):
    """Both writers have their temp open at once; each renames when done: both succeed, the
    output is one writer's whole output (never a mix), no temp is left."""
    flags = tmp_path / "flags"
    flags.mkdir()
    out = tmp_path / ("calib" if verb == "calibrate" else "m.gguf")
    if earlier:
        (go := flags / "go0").touch()
        first = writer(out, verb, go)
        assert first.wait(timeout=120) == 0, first.communicate()
    procs = [writer(out, verb, flags / "go") for _ in range(2)]
    wait_ready(flags, procs)
    (flags / "go").touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    pids = {str(p.pid).encode() for p in procs}
    parts = [out / "a.bin", out / "b.bin"] if verb == "calibrate" else [out]
    bodies = {f.read_bytes()[4:] for f in parts}
    assert len(bodies) == 1 and bodies <= {pid * 100000 for pid in pids}  # one writer's, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["flags", out.name])


# --- usage errors ---------------------------------------------------------------------------
USAGE = {
    "missing argument": (["prune"], "Missing argument", "moe2gguf prune --help"),
    "bad option value": (["prune", "m", "--calib", "c", "--ratio", "abc", "-o", "x"], "'abc' is not a valid float", "moe2gguf prune --help"),
    "unknown option": (["calibrate", "--bogus"], "--bogus", "moe2gguf calibrate --help"),
    "unknown command": (["frobnicate"], "frobnicate", "moe2gguf --help"),
    "bad choice": (["prune", "m", "--calib", "c", "--ratio", "0.5", "-o", "x", "--method", "nope"], "nope", "moe2gguf prune --help"),
}


@pytest.mark.parametrize("case", USAGE)
def test_click_usage_error_is_one_line_with_the_help_to_read(case, capsys):
    args, words, hint = USAGE[case]
    code, err = moe(capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert words in err and f"see `{hint}`" in err, err


def test_marker_names_the_verb_and_version(world):
    data = json.loads((world.calib / MARKER).read_text())
    from moe2gguf import __version__

    assert data == {"verb": "calibrate", "moe2gguf": __version__}
