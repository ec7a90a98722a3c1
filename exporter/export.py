"""`moe2gguf export`: checkpoint (pruned or not) -> GGUF that stock llama.cpp loads."""

from __future__ import annotations

import json
import pathlib

import click
import gguf

from moe2gguf.checkpoint import Checkpoint
from moe2gguf.errors import UserError, atomic_file, check_output, temp_dir
from moe2gguf.exporter.imatrix import imatrix_for_plan
from moe2gguf.exporter.quantize import check_override, ftype_of, overrides_of, quantize
from moe2gguf.exporter.writer import ExportPlan, intermediate_type, plan_export, write_gguf
from moe2gguf.inputs import read_json_object
from moe2gguf.options import DEFAULT_QUANT

INTERMEDIATE_FTYPE = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16}


def export(
    model: str,
    output: str,
    quant: str | None = None,
    imatrix: str | None = None,
    overrides: list[tuple[str, str]] | None = None,
    verbose: bool = False,
    progress: bool = True,
) -> ExportPlan:
    """Write MODEL as a GGUF at `output`, quantized to `quant` by llama.cpp. Without `quant`, a
    checkpoint pruned with --target-size gets the per-tensor types its prune_report.json planned
    (as llama_model_tensor_override entries), any other DEFAULT_QUANT."""
    quant, overrides = planned_types(model, quant, overrides)
    out = pathlib.Path(output)
    check_output(output, "export", [model, imatrix], folder=False)  # before the work, not after it
    ftype = ftype_of(quant)
    ckpt = Checkpoint(model)
    # llama.cpp quantizes from an intermediate GGUF holding the weights exactly: BF16 for a bf16
    # checkpoint (half the temporary disk of F32), as convert_hf_to_gguf would write it
    inter = "F32" if quant.upper() == "F32" else intermediate_type(ckpt)
    plan = plan_export(ckpt, inter)
    imat = None
    if imatrix is not None:
        imat = imatrix_for_plan(imatrix, plan)
    if plan.padded:
        click.echo(
            f"note: experts have different widths; llama.cpp's {plan.arch.gguf_arch.name.lower()} stores one width per {plan.layout.width}, so they are "
            f"zero-padded to {plan.width}: exact, but padding saves nothing "
            f"({plan.stored_expert_params:,} expert parameters stored for {plan.kept_expert_params:,} kept); for a GGUF that saves them "
            f"prune for the layout it runs: `moe2gguf prune MODEL --calib CALIB --ratio R --layout {plan.layout.name} -o OUT`",
            err=True,
        )
    with atomic_file(out, "export", [model, imatrix]) as tmp:
        if quant.upper() == "F32":
            write_gguf(plan, tmp, ftype, progress=progress)
        else:
            with temp_dir(out, inter.lower()) as d:
                src = d / f"model-{inter.lower()}.gguf"
                write_gguf(plan, src, INTERMEDIATE_FTYPE[inter], progress=progress)
                if progress:
                    click.echo(f"quantizing to {quant.upper()} with llama.cpp{' and the importance matrix' if imat else ''} ...", err=True)
                quantize(src, tmp, quant.upper(), imatrix=imat, overrides=overrides, verbose=verbose)
    return plan


def planned_types(model: str, quant: str | None, overrides: list[tuple[str, str]] | None) -> tuple[str, list[tuple[str, str]] | None]:
    if quant is not None:
        return quant, overrides
    rep = pathlib.Path(model) / "prune_report.json"
    fix = "prune the model again to rewrite it, or pass --quant"
    planned = read_json_object(rep, "prune report", fix) if rep.exists() else {}
    if planned.get("tensor_types") and not (isinstance(planned["tensor_types"], dict) and isinstance(planned.get("quant"), str)):
        raise UserError(f"prune report {rep}: tensor_types/quant are damaged; {fix}")
    if not planned.get("tensor_types"):
        return DEFAULT_QUANT, overrides
    return planned["quant"], (overrides or []) + overrides_of(planned["tensor_types"])


def export_main(model: str, output: str, quant: str | None, imatrix: str | None, tensor_types: tuple[str, ...], verbose: bool) -> None:
    """The `export` verb once moe2gguf/commands.py has parsed its options."""
    overrides = []
    for tt in tensor_types:
        if "=" not in tt:
            raise UserError(f"--tensor-type {tt!r} must look like REGEX=TYPE, e.g. ffn_down_exps=Q6_K")
        pat, typ = tt.rsplit("=", 1)
        check_override(pat, typ)
        overrides.append((pat, typ))
    plan = export(model, output, quant, imatrix, overrides or None, verbose=verbose)
    size = pathlib.Path(output).stat().st_size
    planned = plan.ckpt.path / "prune_report.json"
    target = json.loads(planned.read_text()).get("target_size") if planned.is_file() else None
    label = quant.upper() if quant else (f"{json.loads(planned.read_text())['quant']} with planned tensor types" if target else DEFAULT_QUANT)
    click.echo(f"wrote {output} ({label}, {size / 2**20:.2f} MiB, {size:,} bytes)")
    if target:
        click.echo(f"target size {target:,} bytes: the GGUF is {size:,} bytes, {100 * (1 - size / target):.2f}% {'under' if size <= target else 'OVER'} the target")
