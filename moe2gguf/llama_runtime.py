"""The one way moe2gguf loads a GGUF into llama.cpp (llama-cpp-python), on any CPU.

llama-cpp-python compiles llama.cpp with -march=native, and llama.cpp puts quantized weights in
"extra buffer types" (AMX tiles, weights repacked for AVX2/AVX-512/NEON) for speed. Some cloud VMs
advertise AMX but cannot execute it: every quantized GGUF then dies by SIGILL inside
`ggml_backend_amx_mul_mat`, while the same file loaded with `use_extra_bufts = False` runs.

So once per machine a tiny quantized model (one dense llama block with rows of 256, written by
gguf-py and quantized to Q4_K_M by llama.cpp's quantizer) is loaded with llama.cpp's defaults in a
child process, which evaluates a prompt batch (AMX tiles) and decodes a few tokens (the
single-row kernels). If the child dies, every GGUF is loaded without extra buffer types and one
line on stderr says so; if it lives, nothing changes and the repacked/AMX speed is kept. The verdict is cached in the user cache
folder, keyed by the llama-cpp-python build and the CPU's flags, so another machine or another
build probes again.

MOE2GGUF_EXTRA_BUFTS=0|1|auto forces one path (auto: probe). MOE2GGUF_PROBE_SIGNAL=SIGILL makes
the probe child kill itself with that signal: how tests exercise a machine whose probe dies.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

from moe2gguf.errors import UserError
from moe2gguf.subproc import failure

if TYPE_CHECKING:
    import llama_cpp

ENV = "MOE2GGUF_EXTRA_BUFTS"
PROBE_SIGNAL_ENV = "MOE2GGUF_PROBE_SIGNAL"
CACHE_FILE = "llama-extra-bufts.json"
PROBE_QUANT = "Q4_K_M"  # Q4_K and Q6_K rows of 256: both have AMX and repacked kernels
PROBE_PROMPT = 32  # tokens in one batch: AMX tiles run only for batches of more than one row
PROBE_DECODE = 4
PROBE_TIMEOUT_S = 300
PROBE_SETUP_FAILED = 3  # the child's exit code when it could not build its model (no verdict)
FALLBACK_NOTE = "note: llama.cpp's extra buffer types (AMX/repacked weights) crash on this CPU ({why}); running without them (slower)"
FORCED_NOTE = f"note: {ENV}=0: llama.cpp runs without its extra buffer types (AMX/repacked weights; slower)"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether llama.cpp may use its extra buffer types here, and how that was decided."""

    extra_bufts: bool
    source: str  # "env" | "cache" | "probe"
    detail: str  # what the probe saw: "ok", "killed by SIGILL (illegal instruction)", ...


def cache_folder() -> pathlib.Path:
    """moe2gguf's user cache: $MOE2GGUF_CACHE, else $XDG_CACHE_HOME/moe2gguf, else ~/.cache/moe2gguf.
    Not created here: a machine whose home is read-only simply probes every run."""
    if os.environ.get("MOE2GGUF_CACHE"):
        return pathlib.Path(os.environ["MOE2GGUF_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(os.environ["XDG_CACHE_HOME"]) / "moe2gguf"
    return pathlib.Path.home() / ".cache" / "moe2gguf"


def cpu_flags() -> str:
    """What the CPU says it can do: the first processor's model and flags in /proc/cpuinfo on
    Linux (`flags` on x86, `Features` on ARM), else what the platform module knows."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        k, _, v = line.partition(":")
        fields.setdefault(k.strip().lower(), v.strip())
    found = [fields[k] for k in ("model name", "flags", "features", "cpu implementer", "cpu part") if fields.get(k)]
    if found:
        return " | ".join(found)
    return " | ".join([platform.system(), platform.machine(), platform.processor()])


def llama_build() -> str:
    """llama-cpp-python's version and the identity (name, size, mtime) of its compiled
    libraries: a reinstall with other compile flags is another build."""
    from importlib import metadata, util

    try:
        version = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        version = "unknown"
    libs = []
    spec = util.find_spec("llama_cpp")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        for f in sorted(pathlib.Path(loc).glob("lib/*")):
            try:
                st = f.stat()
            except OSError:
                continue
            libs.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return f"{version} " + hashlib.sha256("\n".join(libs).encode()).hexdigest()[:12]


def machine_key() -> str:
    """Cache key of a verdict: the llama.cpp build and the CPU it runs on."""
    return hashlib.sha256(json.dumps([llama_build(), platform.machine(), cpu_flags()]).encode()).hexdigest()[:24]


def _read_cache(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent, unreadable or damaged: probe again
    return data if isinstance(data, dict) else {}


def _write_cache(path: pathlib.Path, key: str, v: Verdict) -> None:
    """Add this machine's verdict, atomically; a cache that cannot be written is skipped,
    never an error of the user's command."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = {
            "extra_bufts": v.extra_bufts,
            "detail": v.detail,
            "llama_cpp_python": llama_build(),
            "machine": platform.machine(),
            "probed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            pathlib.Path(tmp).unlink(missing_ok=True)


def probe(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool | None, str]:
    """Run the tiny quantized decode in a child. (True, "ok") if it lived, (False, how it died)
    if it died, (None, why) if it could not even build its model (no verdict)."""
    work = tempfile.mkdtemp(prefix="moe2gguf-probe-")
    try:
        cmd = [sys.executable, "-m", "moe2gguf.llama_runtime", work]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"probe timed out after {timeout:.0f} s"
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the child may have died before cleaning up
    if proc.returncode == 0:
        return True, "ok"
    if proc.returncode == PROBE_SETUP_FAILED:
        return None, failure(proc)
    return False, failure(proc)


@functools.lru_cache(maxsize=None)
def _decide(folder: pathlib.Path, key: str) -> Verdict:
    """Cached verdict, or a probe (once per process for a cache that cannot be written)."""
    path = folder / CACHE_FILE
    hit = _read_cache(path).get(key)
    if isinstance(hit, dict) and isinstance(hit.get("extra_bufts"), bool):
        return Verdict(hit["extra_bufts"], "cache", str(hit.get("detail", "")))
    ok, detail = probe()
    if ok is None:
        # The probe says nothing about the CPU: keep llama.cpp's defaults, decide again next run.
        return Verdict(True, "probe", detail)
    v = Verdict(ok, "probe", detail)
    _write_cache(path, key, v)
    return v


_announced: set[str] = set()


def extra_bufts_verdict(announce: bool = True) -> Verdict:
    """May llama.cpp use its extra buffer types on this machine? $MOE2GGUF_EXTRA_BUFTS when set
    to 0 or 1, else the cached or probed answer. A fallback is announced once per process."""
    forced = os.environ.get(ENV, "auto").strip().lower()
    if forced in ("0", "1"):
        v = Verdict(forced == "1", "env", f"{ENV}={forced}")
    elif forced in ("", "auto"):
        v = _decide(cache_folder(), machine_key())
    else:
        raise UserError(f"{ENV}={os.environ[ENV]!r} is not 0, 1 or auto; unset it to let moe2gguf probe this CPU")
    if announce and not v.extra_bufts:
        note = FORCED_NOTE if v.source == "env" else FALLBACK_NOTE.format(why=v.detail)
        if note not in _announced:
            _announced.add(note)
            print(note, file=sys.stderr, flush=True)
    return v


def child_env(backend: str) -> tuple[dict[str, str] | None, bool]:
    """(environment, extra buffer types on) for a child process that runs `backend`. The
    verdict is decided (probed, announced) in the parent, where stderr reaches the user; a
    llama.cpp child obeys it through ENV."""
    if backend != "llama.cpp":
        return None, False
    extra = extra_bufts_verdict().extra_bufts
    return {**os.environ, ENV: "1" if extra else "0"}, extra


def child_hint(returncode: int, extra_bufts: bool) -> str:
    """What to add to a failed llama.cpp child's error line: a SIGILL with extra buffer types
    on points at the override (the probe passed, yet a kernel it did not reach crashed)."""
    if extra_bufts and returncode == -signal.SIGILL:
        return f"; if this CPU cannot run llama.cpp's AMX/repacked kernels, run again with {ENV}=0"
    return ""


@functools.lru_cache(maxsize=1)
def _plain_cpu_llama() -> type:
    import llama_cpp

    class PlainCpuLlama(llama_cpp.Llama):
        """llama_cpp.Llama with weights in plain CPU buffers. Llama() has no argument for
        llama_model_params.use_extra_bufts; its __init__ assigns self.model_params and loads the
        model from it, so the flag is set on the struct as it is assigned."""

        @property
        def model_params(self):  # noqa: ANN201 - llama_cpp.llama_model_params
            return self.__dict__["_plain_model_params"]

        @model_params.setter
        def model_params(self, params) -> None:  # noqa: ANN001
            params.use_extra_bufts = False
            self.__dict__["_plain_model_params"] = params

    return PlainCpuLlama


def open_llama(path: str | os.PathLike, *, announce: bool = True, **llama_kwargs: Any) -> llama_cpp.Llama:
    """llama_cpp.Llama(path, **llama_kwargs), with extra buffer types only where they run."""
    import llama_cpp

    if llama_kwargs.get("vocab_only"):
        cls = llama_cpp.Llama  # no weights: nothing to probe
    else:
        cls = llama_cpp.Llama if extra_bufts_verdict(announce).extra_bufts else _plain_cpu_llama()
    try:
        return cls(str(path), **llama_kwargs)
    except ValueError as e:  # "Failed to load model from file": llama.cpp logs why, Python learns only that
        raise UserError(f"llama.cpp could not load {path} ({e}): an architecture or tensor set this llama.cpp does not know, "
                        "or a damaged file; export it again with `moe2gguf export`") from None


def extra_bufts_in_use(llm: llama_cpp.Llama) -> bool:
    """Whether this loaded model got llama.cpp's extra buffer types."""
    return bool(llm.model_params.use_extra_bufts)


def write_probe_model(path: pathlib.Path, width: int = 256) -> None:
    """A one-block dense llama, random F32, written by gguf-py: the smallest model whose every
    matrix has rows of 256, so K-quants apply and llama.cpp's AMX/repacked kernels take them.
    Built without torch so a probe costs about a second."""
    import gguf
    import numpy as np

    T = gguf.MODEL_TENSOR
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_context_length(64)
    w.add_embedding_length(width)
    w.add_block_count(1)
    w.add_feed_forward_length(width)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # SentencePiece-style vocabulary: three control tokens and the 256 byte tokens
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE] * 256)
    rng = np.random.default_rng(0)
    shapes = {
        T.TOKEN_EMBD: (len(tokens), width), T.OUTPUT_NORM: (width,), T.OUTPUT: (len(tokens), width),
        T.ATTN_NORM: (width,), T.ATTN_Q: (width, width), T.ATTN_K: (width, width), T.ATTN_V: (width, width),
        T.ATTN_OUT: (width, width), T.FFN_NORM: (width,), T.FFN_GATE: (width, width), T.FFN_UP: (width, width),
        T.FFN_DOWN: (width, width),
    }
    for t, shape in shapes.items():
        data = np.ones(shape, np.float32) if len(shape) == 1 else rng.standard_normal(shape, dtype=np.float32) * 0.05
        w.add_tensor(gguf.TENSOR_NAMES[t].format(bid=0) + ".weight", data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _probe_child(work: pathlib.Path) -> int:
    """The probe itself (child process): build, quantize with llama.cpp, load with llama.cpp's
    defaults, evaluate a prompt batch and decode."""
    sig = os.environ.get(PROBE_SIGNAL_ENV)
    if sig:
        os.kill(os.getpid(), signal.Signals[sig.upper()])
    try:
        import llama_cpp
        import numpy as np

        from moe2gguf.exporter.quantize import quantize

        write_probe_model(work / "probe-f32.gguf")
        quantize(work / "probe-f32.gguf", work / "probe.gguf", PROBE_QUANT, nthread=2)
    except Exception as e:  # noqa: BLE001 - reported as the probe's one line
        print(f"probe could not build its model: {type(e).__name__}: {e}", file=sys.stderr)
        return PROBE_SETUP_FAILED

    def run(cls: type) -> None:
        llm = cls(str(work / "probe.gguf"), n_ctx=64, n_batch=64, n_ubatch=64, n_threads=2, n_threads_batch=2, verbose=False)
        llm.eval(list(range(3, 3 + PROBE_PROMPT)))
        for _ in range(PROBE_DECODE):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])

    try:
        run(llama_cpp.Llama)
    except Exception as e:  # noqa: BLE001
        # an error (not a crash): blame the extra buffer types only if the plain load runs
        try:
            run(_plain_cpu_llama())
        except Exception as e2:  # noqa: BLE001
            print(f"probe could not run its model: {type(e2).__name__}: {e2}", file=sys.stderr)
            return PROBE_SETUP_FAILED
        print(f"llama.cpp fails with extra buffer types only: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_probe_child(pathlib.Path(sys.argv[1])))
