"""`moe2gguf run --recipe FILE`: calibrate -> prune -> export -> check, as the recipe says.

Every step writes its output atomically into the run folder and records a fingerprint of
what it was made from in run.json; a rerun (or a run that was interrupted) skips every step
whose output exists with the same fingerprint, so an export killed half-way does not redo
calibration. The run ends in the report table: the pruned GGUF next to the unpruned model
at F32 and at the same quant, measured in the same way — the honest comparison.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass

import click

from moe2gguf.arch import MoEArch, arch_for_config
from moe2gguf.checkpoint import Checkpoint
from moe2gguf.errors import UserError, atomic_file, claim_dir
from moe2gguf.exporter import check as check_step, export as export_step  # steps are called via their modules: tests replace one
from moe2gguf.exporter.sizing import ShapeCheckpoint, layout_config, predict_size
from moe2gguf.outputs import release_dir
from moe2gguf.inputs import read_json_object
from moe2gguf.layout import LAYOUTS
from moe2gguf.progress import silenced
from moe2gguf.prune import calibrate as calibrate_step, prune as prune_step
from moe2gguf.recipe import Recipe, load_recipe, parse_size
from moe2gguf.units import human_bytes

STATE = "run.json"
REPORT = "report.json"


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_identity(ckpt: Checkpoint) -> dict:
    """What a cached step depends on in the model: its config and weight files."""
    files = sorted(ckpt.path.glob("*.safetensors"))
    return {"config": ckpt.config, "weights": [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files]}


def check_recipe_matches(recipe: Recipe, arch: MoEArch, model_dir: pathlib.Path) -> None:
    """The model given must be the one the recipe describes (architecture and its numbers)."""
    if recipe.model.architecture not in arch.hf_architectures:
        raise UserError(
            f"{model_dir} is a {arch.hf_architectures[0]}, the recipe is for {recipe.model.architecture}; "
            "pass the recipe's model with --model or use a recipe for this model"
        )
    planned = arch_for_config({**recipe.model.config, "architectures": [recipe.model.architecture]})
    for what in ("n_layers", "hidden_size", "n_experts", "n_used", "expert_width"):
        a, b = getattr(planned, what), getattr(arch, what)
        if a != b:
            raise UserError(f"{model_dir} has {what} {b}, the recipe says {a}; pass the recipe's model with --model")


def load_state(path: pathlib.Path) -> dict[str, str]:
    """run.json of an earlier run: {step: fingerprint}. A damaged one is refused by name (it
    decides which outputs are kept, so it is never guessed at)."""
    if not path.exists():
        return {}
    fix = f"delete {path} to start the run over (steps already done are redone)"
    state = read_json_object(path, "run record", fix)
    odd = next((k for k, v in state.items() if not isinstance(v, str)), None)
    if odd is not None:
        raise UserError(f"run record {path}: step {odd!r} has no fingerprint text; {fix}")
    return state


def cached_rows(path: pathlib.Path) -> list[dict] | None:
    """The rows of an earlier report.json, or None when it is missing or damaged (then measured again)."""
    try:
        rows = read_json_object(path, "report", "").get("rows")
    except UserError:
        return None
    return rows if isinstance(rows, list) and all(isinstance(r, dict) for r in rows) else None


@dataclass
class Step:
    name: str
    output: pathlib.Path
    fingerprint: str
    make: Callable[[], None]


class Run:
    """The steps of one recipe in one folder, each skipped when already done."""

    def __init__(self, recipe: Recipe, model_dir: pathlib.Path, out: pathlib.Path, quiet: bool = False):
        self.recipe, self.model_dir, self.out, self.quiet = recipe, model_dir, out, quiet
        self.ckpt = Checkpoint(model_dir)
        self.arch = arch_for_config(self.ckpt.config)
        check_recipe_matches(recipe, self.arch, model_dir)
        self.state_path = out / STATE
        self.state: dict = load_state(self.state_path)

    def say(self, msg: str) -> None:
        if not self.quiet:
            click.echo(msg, err=True)

    def do(self, step: Step) -> None:
        if step.output.exists() and self.state.get(step.name) == step.fingerprint:
            self.say(f"[{step.name}] done before, kept: {step.output}")
            return
        self.say(f"[{step.name}] -> {step.output}")
        step.make()
        self.state[step.name] = step.fingerprint
        with atomic_file(self.state_path, "run") as tmp:
            tmp.write_text(json.dumps(self.state, indent=1) + "\n")

    # --- the flow ------------------------------------------------------------------------
    def steps(self) -> list[Step]:
        r, out = self.recipe, self.out
        quant = r.export.quant.upper()
        cal, pruned = out / "calib", out / "pruned"
        gguf_pruned = out / f"pruned-{quant}.gguf"
        gguf_f32, gguf_base = out / "unpruned-F32.gguf", out / f"unpruned-{quant}.gguf"
        texts = [str(r.resolve(t)) for t in r.calibration.texts]
        # a recipe that leaves `gram` on fingerprints as it did before the field existed
        fp_cal = _fingerprint(_model_identity(self.ckpt), texts, r.calibration.model_dump(exclude={"gram"} if r.calibration.gram else None))
        fp_prune = _fingerprint(fp_cal, r.prune.model_dump())
        fp_exp = _fingerprint(fp_prune, r.export.model_dump())
        fp_base = _fingerprint(fp_cal, r.export.model_dump())
        overrides = list(r.export.overrides.items()) or None
        imatrix = str(cal) if r.export.imatrix else None
        model = str(self.model_dir)

        def calibrate() -> None:
            calibrate_step.calibrate(model, texts, str(cal), r.calibration.tokens, r.calibration.ctx, gram=r.calibration.gram)

        def prune() -> None:
            kw = {"target_size": parse_size(r.prune.target_size), "quant": quant} if r.prune.target_size else {}
            prune_step.prune(model, str(cal), r.prune.ratio, str(pruned), method=r.prune.method, layout=r.prune.layout, **kw)

        def export(src: str, dst: pathlib.Path, q: str, imat: str | None) -> Callable[[], None]:
            def go() -> None:
                export_step.export(src, str(dst), q, imat, overrides if q == quant else None, progress=not self.quiet)

            return go

        return [
            Step("calibrate", cal, fp_cal, calibrate),
            Step("prune", pruned, fp_prune, prune),
            Step("export", gguf_pruned, fp_exp, export(str(pruned), gguf_pruned, quant, imatrix)),
            Step("export-unpruned-f32", gguf_f32, _fingerprint(_model_identity(self.ckpt)), export(model, gguf_f32, "F32", None)),
            Step(f"export-unpruned-{quant}", gguf_base, fp_base, export(model, gguf_base, quant, imatrix)),
        ]

    def rows(self) -> list[tuple[str, pathlib.Path]]:
        quant = self.recipe.export.quant.upper()
        return [
            ("unpruned F32", self.out / "unpruned-F32.gguf"),
            (f"unpruned {quant}", self.out / f"unpruned-{quant}.gguf"),
            (f"pruned {quant}", self.out / f"pruned-{quant}.gguf"),
        ]

    def check_all(self) -> list[dict]:
        c = self.recipe.check
        text = self.recipe.resolve(c.text)
        if text is None:
            raise UserError("the recipe has no check.text; add the evaluation text to the recipe")
        base = str(self.out / "unpruned-F32.gguf")
        task = self.recipe.resolve(c.task)
        task_id = [str(task), task.stat().st_size, int(task.stat().st_mtime)] if task is not None and task.is_file() else str(task)
        fp = _fingerprint(self.state.get("export"), self.state.get("export-unpruned-f32"), self.state.get(f"export-unpruned-{self.recipe.export.quant.upper()}"), c.model_dump(), str(text), task_id)
        report_path = self.out / REPORT
        rows = cached_rows(report_path) if self.state.get("check") == fp else None
        if rows is not None:
            self.say(f"[check] done before, kept: {report_path}")
            return rows
        self.say("[check] measuring every row against the unpruned F32 GGUF ...")
        rows = []
        for label, path in self.rows():
            rep = check_step.check(str(path), str(text), base=base, ctx=c.ctx, chunks=c.chunks, task=str(task) if task else None, n_tasks=c.tasks)
            rows.append({"label": label, **rep})
        with atomic_file(report_path, "run") as tmp:
            tmp.write_text(json.dumps({"recipe": str(self.recipe.source), "rows": rows}, indent=1) + "\n")
        self.state["check"] = fp
        with atomic_file(self.state_path, "run") as tmp:
            tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        return rows


def task_cell(r: dict) -> str:
    """The task score llama-perplexity reports for the format (acc_norm, or acc for winogrande)
    with its standard error, in percent."""
    key = "acc_norm" if "acc_norm" in r else "acc"
    return f"{100 * r[key]:.1f} ± {100 * r[key + '_se']:.1f}"


def report_table(rows: list[dict]) -> str:
    tasks = all("acc" in r for r in rows)
    head = f"| {'model':<18} | {'PPL':>9} | {'KLD':>9} | {'top-1':>6} |"
    head += f" {'task acc %':>11} | {'same answer':>11} |" if tasks else ""
    head += f" {'file MiB':>8} | {'RAM MiB':>8} | {'prompt t/s':>10} | {'decode t/s':>10} |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        task = f" {task_cell(r):>11} | {100 * r.get('agree', 1.0):>10.1f}% |" if tasks else ""
        lines.append(
            f"| {r['label']:<18} | {r['ppl']:>9.4f} | {r.get('kld', 0.0):>9.5f} | {100 * r.get('top1', 1.0):>5.1f}% |{task} "
            f"{r['file_bytes'] / 2**20:>8.2f} | {r['peak_rss_bytes'] / 2**20:>8.1f} | {r['prompt_tokens_per_s']:>10.1f} | {r['decode_tokens_per_s']:>10.1f} |"
        )
    if tasks:
        r = rows[0]
        metric = "acc_norm" if "acc_norm" in r else "acc"
        lines.append(
            f"\ntask: {pathlib.Path(r['task']).name}, {r['tasks']} {r['task_format']} tasks, {metric} as llama-perplexity "
            f"scores it (chance {100 * r['task_chance']:.0f} %); same answer: share of tasks answered as by the unpruned F32"
        )
    return "\n".join(lines)


def run(recipe_file: str, model: str | None = None, output: str | None = None, quiet: bool = False) -> list[dict]:
    recipe = load_recipe(recipe_file)
    model_dir = pathlib.Path(model) if model else recipe.resolve(recipe.model.path)
    if model_dir is None:
        raise UserError(f"recipe {recipe_file} names no local model path; pass the checkpoint folder with --model")
    recipe.check_files()  # every input of every step, before the first one runs
    out = pathlib.Path(output) if output else pathlib.Path("runs") / recipe.model.name
    runner = Run(recipe, model_dir, out, quiet)  # validates before anything is written
    # the run folder is run's own output: new, empty or an earlier run's (to resume), never a user's
    fresh = not os.path.lexists(out)
    claim_dir(out, "run", [model_dir, *(recipe.resolve(t) for t in (*recipe.calibration.texts, recipe.check.text) if t)])
    try:
        with silenced(quiet):
            for step in runner.steps():
                runner.do(step)
            return runner.check_all()
    except BaseException:
        if fresh:  # failed before the first step wrote anything: leave no folder behind
            release_dir(out, "run")
        raise


def plan_text(recipe_file: str) -> str:
    """The plan and the predicted GGUF sizes, from the recipe's architecture numbers alone."""
    r = load_recipe(recipe_file)
    cfg = {**r.model.config, "architectures": [r.model.architecture]}
    arch = arch_for_config(cfg)
    quant = r.export.quant.upper()
    full = ShapeCheckpoint(cfg, r.model.name)
    bf16 = full.weight_bytes
    lines = [
        f"recipe     {recipe_file}",
        f"model      {r.model.name} ({r.model.architecture}): {arch.n_layers} layers, {arch.n_experts} experts x width "
        f"{arch.expert_width}, {arch.n_used} used",
        f"calibrate  {r.calibration.tokens} tokens in windows of {r.calibration.ctx} from {', '.join(r.calibration.texts)}",
        f"prune      {r.prune.method}, layout {r.prune.layout}, "
        + (f"ratio {r.prune.ratio}" if r.prune.ratio is not None else f"target size {r.prune.target_size}"),
        f"export     {quant}{' with the calibration imatrix' if r.export.imatrix else ''}",
        f"bf16       {human_bytes(bf16)}",
    ]
    base = predict_size(full, quant)
    lines.append(f"unpruned   {quant}: {human_bytes(base.total_bytes)}  ({bf16 / base.total_bytes:.2f}x smaller than bf16)")
    for label, (k, w) in deployable_shapes(arch, r.prune.ratio if r.prune.ratio is not None else 0.25):
        shape = ShapeCheckpoint(layout_config(arch, k, w), r.model.name)
        plan = predict_size(shape, quant)
        params = shape.weight_bytes // 2
        downs = sorted({t for n, t in plan.tensor_types.items() if "ffn_down_exps" in n})
        lines.append(
            f"pruned     {label}: {k} experts x width {w}: {human_bytes(plan.total_bytes)}  "
            f"({bf16 / plan.total_bytes:.2f}x smaller than bf16; ffn_down_exps in {'/'.join(downs)})"
        )
        # A "4-bit" figure counts 4.00 bits per weight; llama.cpp's files also hold block
        # scales (Q4_K is 4.5 bpw), the Q6_K tensors of the _M mix and the metadata.
        lines.append(
            f"           {8 * plan.total_bytes / params:.2f} bits per weight on average; "
            f"at an ideal 4.00 bpw the same {params / 1e9:.2f}B parameters would be {bf16 / (params / 2):.2f}x smaller than bf16"
        )
    for key, value in r.reported.items():
        lines.append(f"reported   {key}: {value}")
    return "\n".join(lines)


def deployable_shapes(arch: MoEArch, ratio: float) -> list[tuple[str, tuple[int, int]]]:
    """The two ends of the layouts stock llama.cpp runs at this ratio: fewer experts of full
    width, or every expert narrower (the allocator picks between and in between them from
    the calibration scores)."""
    e, w, a = arch.n_experts, arch.expert_width, LAYOUTS["llama.cpp"].align
    k = max(arch.n_used, round((1 - ratio) * e))
    narrower = max(a, int((1 - ratio) * w) // a * a)
    return [("fewer experts", (k, w)), ("narrower experts", (e, narrower))]


def run_main(recipe_file: str, model: str | None, output: str | None, dry_run: bool, quiet: bool) -> None:
    """The `run` verb once moe2gguf/commands.py has parsed its options."""
    if dry_run:
        click.echo(plan_text(recipe_file))
        return
    rows = run(recipe_file, model, output, quiet)
    click.echo(report_table(rows))
