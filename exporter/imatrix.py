"""Importance matrices in llama.cpp's GGUF imatrix format: write, read, and remap onto
the tensors of an export (pruned experts and channels via the checkpoint's prune map).

Format (common/imatrix-loader.cpp): KV general.type="imatrix", imatrix.datasets,
imatrix.chunk_count, imatrix.chunk_size; per weight `<gguf name>.in_sum2` F32 [n_mat, n_in]
(sum over tokens of x^2 per input channel, n_mat = experts for *_exps, else 1) and
`<gguf name>.counts` F32 [n_mat, 1] (tokens seen per matrix). Names are the UNPRUNED
model's GGUF tensor names.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch
from safetensors import SafetensorError

from moe2gguf.calib import CALIB_JSON, IMATRIX, read_calib_json
from moe2gguf.checkpoint import PRUNE_MAP, read_prune_map
from moe2gguf.errors import UserError
from moe2gguf.inputs import first_line
from moe2gguf.modeling import ExpertList, load_model

SUMS = ".in_sum2"
COUNTS = ".counts"
PAD_IMPORTANCE = 1e-6  # relative to the row's mean: zero-padded channels hold only zeros


@dataclass
class Imatrix:
    """sums[name]: [n_mat, n_in] float32; counts[name]: [n_mat] float32."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    calib: dict | None = None

    def mean(self, name: str) -> np.ndarray:
        """Mean squared activation per matrix and channel; matrices never seen -> ones (as llama-quantize)."""
        s = self.sums[name].astype(np.float64)
        c = self.counts[name].astype(np.float64).reshape(-1, 1)
        out = np.ones_like(s)
        seen = c[:, 0] > 0
        out[seen] = s[seen] / c[seen]
        return out.astype(np.float32)


def write_imatrix(
    path: str | pathlib.Path,
    entries: dict[str, tuple[np.ndarray, np.ndarray]],
    datasets: list[str],
    chunk_count: int,
    chunk_size: int,
) -> None:
    """Write an imatrix GGUF that llama-quantize --imatrix reads.

    entries: GGUF weight name (e.g. "blk.0.ffn_down_exps.weight") -> (sums [n_mat, n_in],
    counts [n_mat] or [n_mat, 1]); sums are sums of squared inputs, counts tokens seen.
    """
    w = gguf.GGUFWriter(path, arch="", use_temp_file=False)
    # an imatrix has no architecture: drop the general.architecture key GGUFWriter adds
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(gguf.Keys.IMatrix.DATASETS, list(datasets))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(chunk_count))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
    for name in sorted(entries):
        sums, counts = entries[name]
        sums = np.ascontiguousarray(sums, dtype=np.float32)
        if sums.ndim == 1:
            sums = sums[None]
        counts = np.ascontiguousarray(counts, dtype=np.float32).reshape(sums.shape[0], 1)
        w.add_tensor(name + SUMS, sums)
        w.add_tensor(name + COUNTS, counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def resolve(src: str | pathlib.Path) -> tuple[pathlib.Path, dict | None]:
    """A CALIB folder or an imatrix .gguf -> (imatrix file, calib.json contents or None)."""
    p = pathlib.Path(src)
    f = p / IMATRIX if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"--imatrix {src}: no {IMATRIX} found; pass a `moe2gguf calibrate` folder or an imatrix .gguf")
    cj = f.parent / CALIB_JSON
    calib = read_calib_json(cj, required=()) if cj.exists() else None  # only what it has is compared
    return f, calib


def read_imatrix(src: str | pathlib.Path) -> Imatrix:
    f, calib = resolve(src)
    try:
        return _read_imatrix(f, calib)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError/struct/index errors on a damaged file
        raise UserError(f"--imatrix {f} is truncated or not a GGUF file ({first_line(e)}); pass the imatrix.gguf that calibrate wrote, or calibrate again") from None


def _read_imatrix(f: pathlib.Path, calib: dict | None) -> Imatrix:
    r = gguf.GGUFReader(f)

    def field_val(key: str):
        fld = r.get_field(key)
        return None if fld is None else fld.contents()

    if field_val(gguf.Keys.General.TYPE) != gguf.GGUFType.IMATRIX:
        raise UserError(f"--imatrix {f} is a GGUF but not an importance matrix (general.type != imatrix)")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        if t.name.endswith(SUMS):
            sums[t.name.removesuffix(SUMS)] = np.array(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        elif t.name.endswith(COUNTS):
            counts[t.name.removesuffix(COUNTS)] = np.array(t.data, dtype=np.float32).reshape(-1)
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))[0]
        raise UserError(f"--imatrix {f}: {odd} lacks its sums or counts; the file is damaged, recompute it")
    for n in sums:
        if len(counts[n]) != sums[n].shape[0]:
            raise UserError(f"--imatrix {f}: {n} has {sums[n].shape[0]} matrices but {len(counts[n])} counts; the file is damaged")
    return Imatrix(
        sums,
        counts,
        list(field_val(gguf.Keys.IMatrix.DATASETS) or []),
        int(field_val(gguf.Keys.IMatrix.CHUNK_COUNT) or 0),
        int(field_val(gguf.Keys.IMatrix.CHUNK_SIZE) or 0),
        calib,
    )


def _other_model(src: str, what: str) -> UserError:
    return UserError(f"--imatrix {src} was computed on another model ({what}); run `moe2gguf calibrate` on this model's unpruned original")


def imatrix_for_plan(src: str | pathlib.Path, plan) -> dict[str, np.ndarray]:  # noqa: ANN001 - ExportPlan (import cycle)
    """GGUF tensor name -> flat float32 importance for llama_model_quantize, matching the
    export's tensors exactly (kept experts, kept channels, zero-padding)."""
    im = read_imatrix(src)
    arch = plan.arch
    if im.calib is not None:
        c = im.calib
        archs = set(c.get("architectures") or [])
        if archs and not archs & set(arch.hf_architectures):
            raise _other_model(src, f"architectures {sorted(archs)}")
        for key, mine in (("n_layers", arch.n_layers), ("hidden_size", arch.hidden_size)):
            if key in c and int(c[key]) != mine:
                raise _other_model(src, f"{key} {c[key]} != {mine}")
    try:
        pmap = read_prune_map(plan.ckpt.path) or {}
    except (SafetensorError, KeyError, ValueError, IndexError) as e:  # truncated, a key missing or misnamed
        raise UserError(f"{plan.ckpt.path / PRUNE_MAP} is damaged ({first_line(e)}); prune the model again, or export without --imatrix") from None
    expert_names = {arch.gguf_expert_name(b, p): (b, p) for b in range(arch.n_layers) for p in ("gate", "up", "down")}
    out: dict[str, np.ndarray] = {}
    for t in plan.tensors:
        if len(t.shape) < 2 or t.name not in im.sums:
            continue
        mean = im.mean(t.name)
        n_in = t.shape[-1]
        n_mat = t.shape[0] if len(t.shape) == 3 else 1
        if t.name in expert_names:
            bid, part = expert_names[t.name]
            if bid in pmap:
                ids, channels = pmap[bid]
                if max(ids) >= mean.shape[0]:
                    raise _other_model(src, f"{t.name} has {mean.shape[0]} experts, the prune map uses expert {max(ids)}")
                rows = mean[ids]
                if part == "down":
                    fitted = np.empty((len(ids), n_in), dtype=np.float32)
                    for k, ch in enumerate(channels):
                        if ch and max(ch) >= rows.shape[1]:
                            raise _other_model(src, f"{t.name} has {rows.shape[1]} channels, the prune map uses channel {max(ch)}")
                        kept = rows[k, ch]
                        fitted[k, : len(ch)] = kept
                        ref = float(kept.mean()) if len(ch) else float(rows[k].mean())
                        fitted[k, len(ch) :] = max(ref, 1e-12) * PAD_IMPORTANCE
                    rows = fitted
                mean = rows
        if mean.shape[0] == n_mat and mean.shape[1] < n_in and arch.pads_input(t.name):
            # the arch zero-padded this tensor's input columns (deepseek2's shared experts): pad alike
            fill = max(float(mean.mean()), 1e-12) * PAD_IMPORTANCE
            mean = np.concatenate([mean, np.full((n_mat, n_in - mean.shape[1]), fill, dtype=mean.dtype)], axis=1)
        if mean.shape != (n_mat, n_in):
            if t.name.startswith("token_embd"):
                continue  # llama.cpp never uses an imatrix for the embedding lookup
            raise _other_model(src, f"{t.name}: importance shape {mean.shape}, tensor needs {(n_mat, n_in)}")
        out[t.name] = mean.reshape(-1)
    if not out:
        raise _other_model(src, "none of its entries names a tensor of this model")
    return out


def torch_imatrix(model_dir: str | pathlib.Path, text_ids: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reference importance matrix from a PyTorch forward pass over token windows [n, ctx]
    (sums of squared inputs per GGUF weight; experts observed through ExpertList). Used by
    tests and benchmarks; `moe2gguf calibrate` writes the production one."""
    model, arch, ckpt = load_model(str(model_dir))
    tmap = arch.gguf_tensor_map()
    entries: dict[str, list[np.ndarray]] = {}
    hooks = []

    def add(name: str, n_mat: int, idx: int, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        e = entries.setdefault(name, [np.zeros((n_mat, x.shape[-1])), np.zeros(n_mat)])
        e[0][idx] += (x * x).sum(0).numpy()
        e[1][idx] += x.shape[0]

    for mname, mod in model.named_modules():
        if isinstance(mod, ExpertList):
            bid = arch.layer_of(mname)
            n = len(mod)

            def obs(xid, _token, x, h, w, _y, bid=bid, n=n):  # noqa: ANN001
                for part in ("gate", "up"):
                    add(arch.gguf_expert_name(bid, part), n, xid, x)
                add(arch.gguf_expert_name(bid, "down"), n, xid, h)

            mod.observer = obs
        elif isinstance(mod, torch.nn.Linear) and ".experts." not in mname:
            gname = arch.gguf_name(mname + ".weight", tmap)
            if gname is None:
                continue
            hooks.append(mod.register_forward_hook(lambda m, inp, out, g=gname: add(g, 1, 0, inp[0])))
    try:
        with torch.no_grad():
            for w in text_ids:
                model(torch.from_numpy(np.asarray(w))[None])
    finally:
        for h in hooks:
            h.remove()
    return {k: (v[0].astype(np.float32), v[1].astype(np.float32)) for k, v in entries.items()}
