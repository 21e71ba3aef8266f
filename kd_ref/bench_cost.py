"""Seconds and peak memory of one training step of every distillation method, side by side.

    python -m kd_ref.bench_cost [--tasks seg det cls] [--methods ...] [--student A --teacher B]
                                [--size H W] [--batch-size N] [--warmup N] [--rounds N] [--device cuda]
                                [--amp [bf16|fp16]] [--set FIELD=VALUE ...]

Times one training iteration (forward, backward, optimizer step, and the method's extra optimizer step or
per-step hook) of every method of a task on one model pair, one fixed batch of the synthetic scenes and
randomly initialised weights (the cost does not depend on them). The student alone (``none``) and the
teacher forward alone are measured too, all cases interleaved round by round after warm-up
(:func:`kd_ref.bench_common.measure`). Per-epoch hooks (GKD's prototypes) run once before timing and are
not in the figures. The defaults are the task's synthetic-demo pair at the demo sizes, a few minutes on a
CPU; for real sizes on a GPU, e.g. ``--tasks seg --student deeplabv3_r18 --teacher deeplabv3_r101 --size
512 1024 --batch-size 8 --amp``.

Reading the output: one Markdown table per (student, teacher) pair, a row per case: the median seconds
per step, the ratio to the student step (``x student``), the ratio to the floor any distiller pays
(``x (student + teacher fwd)``), the overhead beyond that floor in % of a student step, and the peak
memory of a training run of that case alone (:func:`step_peak_bytes`). The ratios are the figures to
compare between machines; seconds depend on the machine and its load. A method that cannot be built for
a pair is named on a ``skipped`` line under its table.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
from dataclasses import dataclass

import torch

from kd_ref import cli, engine
from kd_ref.bench_common import Measurement, TimedCase, measure, print_table
from kd_ref.distiller import EpochContext, StepContext, uses_hook
from kd_ref.methods import METHODS, supported_methods
from kd_ref.presets import DEFAULT_PRESETS, PRESETS, default_preset
from kd_ref.recipe import Recipe, parse_overrides
from kd_ref.runtime import Runtime, setup_runtime
from kd_ref.samplers import EpochAugmentation
from kd_ref.tasks import TASKS


def tensor_bytes(modules, optimizers=()) -> int:
    """Bytes held between steps by ``modules`` (parameters, buffers) and ``optimizers`` (their state),
    each tensor counted once."""
    tensors = {}
    for module in modules:
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            tensors[id(tensor)] = tensor
    for optimizer in optimizers:
        for state in optimizer.state.values():
            tensors.update({id(v): v for v in state.values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def step_peak_bytes(case: TimedCase, measurement: Measurement) -> int:
    """Peak memory of a run of ``case`` alone: what it keeps resident plus what one run adds at its peak
    (the bench holds every case at once, so the process-wide figure would mix them)."""
    return case.resident_bytes() + measurement.transient_bytes


def size_overrides(task: str, size: tuple) -> dict:
    """Recipe fields that make the network input ``size`` = (H, W) for ``task`` on synthetic scenes."""
    height, width = size
    if task == "det":
        return {"synthetic_size": (height, width), "image_scale": (max(size), min(size))}
    if task == "cls" and height != width:
        raise ValueError(f"--size {height} {width}: classification inputs are square")
    return {"synthetic_size": (height, width), "crop": (height, width)}


def cost_recipe(task: str, method: str, overrides: dict) -> Recipe:
    """The task's synthetic preset for ``method`` (the ``none`` preset with the method swapped in when
    the method has no synthetic preset of its own), with ``overrides`` applied."""
    preset = DEFAULT_PRESETS.get((task, method, "synthetic"))
    if preset is None:
        recipe = dataclasses.replace(PRESETS[default_preset(task, "none", "synthetic")],
                                     method=method, method_options={})
    else:
        recipe = PRESETS[preset]
    recipe = dataclasses.replace(recipe, **overrides)
    TASKS[task].check_recipe(recipe)
    if recipe.teacher is None:
        raise ValueError(f"bench cost --tasks {task}: the synthetic preset has no teacher; pass --teacher ARCH")
    return recipe


def fixed_batch(recipe: Recipe, runtime: Runtime) -> dict:
    """One training batch of ``recipe``'s data, augmented as the engine's first epoch would be."""
    dataset, collate = TASKS[recipe.task].build_data(recipe, "train", None)
    if len(dataset) < recipe.batch_size:
        raise ValueError(f"--batch-size {recipe.batch_size}: the training set has only {len(dataset)} samples")
    first_epoch = EpochAugmentation(dataset, recipe.seed)
    return dataset.prepare_batch(engine.move_to(collate([first_epoch[i] for i in range(recipe.batch_size)]),
                                                runtime.device))


def _place(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    model.to(runtime.device)
    if runtime.device.type == "cuda":  # as the engine runs them
        model.to(memory_format=torch.channels_last)
    return model


def training_case(name: str, recipe: Recipe, teacher: torch.nn.Module, batch: dict,
                  runtime: Runtime) -> TimedCase:
    """One engine iteration of ``recipe`` as a :class:`TimedCase`: student forward, teacher forward,
    distiller, backward and SGD step (with the AMP gradient scaler on GPU), then the distiller's extra
    optimizer step and ``after_step`` hook when it has them. DDP, gradient clipping and logging are left
    out. The student starts from ``recipe.seed``, so every case trains the same network. The learning
    rate is 0 (the optimizer still does all its work): the weights stay as initialised, so every round
    times the same computation (docs/design/benchmarks.md: why not train them)."""
    recipe = dataclasses.replace(recipe, lr=0.0)
    task, method = TASKS[recipe.task], METHODS[recipe.method]
    torch.manual_seed(recipe.seed)
    student = _place(task.build_model(recipe, recipe.student), runtime).train()
    distiller = method.build(recipe, student, teacher).to(runtime.device) if method.needs_teacher else None
    bind = method.bind.get(recipe.task)
    optimizers = engine.build_optimizers(recipe, student, distiller)
    scaler = runtime.grad_scaler()
    if uses_hook(distiller, "before_epoch"):
        dataset, collate = task.build_data(recipe, "train", None)
        distiller.before_epoch(EpochContext(0, student, teacher, dataset, collate, runtime))

    def backward_and_step(losses: dict, step_optimizer) -> None:
        step_optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(value.float() for value in losses.values())).backward()
        scaler.step(step_optimizer)
        scaler.update()

    def step() -> None:
        with runtime.autocast():
            losses, teacher_out, bound = engine.forward_losses(student, teacher, distiller, bind, batch,
                                                                recipe.task_loss_weight)
        backward_and_step(losses, optimizers.student)
        if optimizers.extra is not None:
            with runtime.autocast():
                extra = distiller.extra_losses(**bound)
            backward_and_step(extra, optimizers.extra)
        if uses_hook(distiller, "after_step"):
            objective = engine.search_objective(student, teacher, distiller, bind, teacher_out,
                                                recipe.task_loss_weight)
            distiller.after_step(StepContext(0, batch, student, teacher, objective, runtime))

    modules = [student] + ([teacher, distiller] if distiller is not None else [])
    held = [optimizers.student] + ([optimizers.extra] if optimizers.extra is not None else [])
    return TimedCase(name, step, lambda: tensor_bytes(modules, held))


def teacher_case(teacher: torch.nn.Module, recipe: Recipe, batch: dict,
                 runtime: Runtime) -> TimedCase:
    """The teacher forward alone, as a distillation step runs it (a two-stage teacher scores the RoIs a
    student sampled once, before timing)."""
    torch.manual_seed(recipe.seed)
    student = _place(TASKS[recipe.task].build_model(recipe, recipe.student), runtime).train()
    with torch.no_grad(), runtime.autocast():
        student_out = student(batch["images"], batch["targets"], batch.get("image_sizes"))
    sampled = {key: value for key, value in student_out.items() if key == "rois"}
    del student, student_out

    def forward() -> None:
        with runtime.autocast():
            engine.teacher_forward(teacher, batch, sampled)
    return TimedCase(TEACHER_FORWARD, forward, lambda: tensor_bytes([teacher]))


# SoKD's policy search (4 extra forward/backward passes per step) runs for search_iters steps only, so
# it is timed both while searching and after the search has ended.
COST_VARIANTS = {"sokd": {"sokd, search over": {"search_iters": 0}}}
STUDENT_ALONE = "none"
TEACHER_FORWARD = "teacher forward"


@dataclass
class CostRow:
    name: str
    seconds: float
    x_student: float
    x_floor: float
    extra_percent: float
    peak_mb: float


def cost_rows(seconds: dict, peak_bytes: dict) -> list:
    """Table rows from median ``seconds`` and ``peak_bytes`` per case. The floor of a distiller is the
    student step plus the teacher forward; ``extra_percent`` is what a case costs beyond it, in % of
    a student step (NaN for the student and teacher rows, which are the floor's parts)."""
    student, teacher = seconds[STUDENT_ALONE], seconds[TEACHER_FORWARD]
    floor = student + teacher
    return [CostRow(name, value, value / student, value / floor,
                    math.nan if name in (STUDENT_ALONE, TEACHER_FORWARD) else 100.0 * (value - floor) / student,
                    peak_bytes[name] / 2 ** 20)
            for name, value in seconds.items()]


def cost_tables(task: str, methods: list, overrides: dict, runtime: Runtime, warmup: int,
                rounds: int) -> list:
    """``[(student, teacher, description, rows, skipped)]``: one table per (student, teacher) pair of the
    methods' recipes, the ``none`` preset's pair first; a method whose synthetic preset uses another
    pair (SoKD on detection runs on Faster R-CNN) is timed against that pair's student step. ``skipped``
    maps a method that cannot be built for its pair (e.g. ``kd`` on a one-stage detector after
    ``--student``) to the reason."""
    base = cost_recipe(task, STUDENT_ALONE, overrides)
    recipes = {method: cost_recipe(task, method, overrides) for method in methods}
    pairs = dict.fromkeys([(base.student, base.teacher)] + [(r.student, r.teacher) for r in recipes.values()])
    tables = []
    for student, teacher in pairs:
        pair_base = dataclasses.replace(base, student=student, teacher=teacher)
        pair_recipes = {m: r for m, r in recipes.items() if (r.student, r.teacher) == (student, teacher)}
        tables.append((student, teacher, *pair_table(task, pair_base, pair_recipes, runtime, warmup, rounds)))
    return tables


def pair_table(task: str, base: Recipe, recipes: dict, runtime: Runtime, warmup: int,
               rounds: int) -> tuple:
    """``(description, rows, skipped)`` of one student/teacher pair."""
    batch = fixed_batch(base, runtime)
    teacher = _place(TASKS[task].build_model(base, base.teacher), runtime).eval().requires_grad_(False)
    cases = [training_case(STUDENT_ALONE, base, teacher, batch, runtime), teacher_case(teacher, base, batch, runtime)]
    skipped = {}
    for method, recipe in recipes.items():
        variants = {method: recipe, **{name: dataclasses.replace(recipe, method_options={**recipe.method_options,
                                                                                         **options})
                                       for name, options in COST_VARIANTS.get(method, {}).items()}}
        try:
            built = [training_case(name, variant, teacher, batch, runtime) for name, variant in variants.items()]
        except ValueError as error:
            skipped[method] = str(error)
            continue
        cases.extend(built)
    results = measure(cases, warmup, rounds, runtime.device)
    seconds = {case.name: statistics.median(results[case.name].seconds) for case in cases}
    peaks = {case.name: step_peak_bytes(case, results[case.name]) for case in cases}
    size = tuple(batch["images"].shape[-2:])
    description = (f"{task}: student {base.student}, teacher {base.teacher}, batch {base.batch_size} x "
                   f"{size[0]}x{size[1]}, {runtime.device.type} {runtime.precision}, "
                   f"median of {rounds} interleaved rounds after {warmup} warm-up")
    return description, cost_rows(seconds, peaks), skipped


def cost(tasks: list, methods: list | None = None, overrides: dict | None = None, size: tuple | None = None,
         device: str | None = None, amp: str | None = None, warmup: int = 1, rounds: int = 5) -> dict:
    """``{task: rows}`` for the pair of the task's ``none`` preset and ``{"<task>: <student> <- <teacher>":
    rows}`` for any other pair; prints one table per pair, and a line per skipped method. ``methods``
    None: every method the task supports; ``overrides``: recipe fields for every task; ``size``: the input
    (H, W), see :func:`size_overrides`; ``amp``: the ``--amp`` request (None: float32)."""
    runtime = setup_runtime(device, amp)
    tables = {}
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"--tasks {task}: expected some of {sorted(TASKS)}")
        supported = [m for m in supported_methods(task) if m != STUDENT_ALONE]
        chosen = supported if methods is None else [m for m in methods if m in supported]
        task_overrides = {**(size_overrides(task, size) if size else {}), **(overrides or {})}
        for index, (student, teacher, description, rows, skipped) in enumerate(
                cost_tables(task, chosen, task_overrides, runtime, warmup, rounds)):
            print_table(description, ["case", "s/step", "x student", "x (student + teacher fwd)",
                                      "extra, % of student step", "peak MB"],
                        [[r.name, f"{r.seconds:.3f}", f"{r.x_student:.2f}", f"{r.x_floor:.2f}",
                          _percent(r.extra_percent), f"{r.peak_mb:.0f}"] for r in rows])
            for method, reason in skipped.items():
                print(f"skipped {method} for {student} <- {teacher}: {reason}")
            tables[task if index == 0 else f"{task}: {student} <- {teacher}"] = rows
    return tables


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:+.0f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_ref.bench_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["seg", "det", "cls"])
    parser.add_argument("--methods", nargs="+", default=None,
                        help="default: every method of each task (methods a task lacks are left out)")
    parser.add_argument("--student", default=None, help="default: the task's synthetic-demo student")
    parser.add_argument("--teacher", default=None, help="default: the task's synthetic-demo teacher")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="input size (default: the synthetic demo's)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the synthetic demo's")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    cli.add_amp_argument(parser)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe override for every case, as in train.py")
    args = parser.parse_args(argv)
    flags = {"student": args.student, "teacher": args.teacher, "batch_size": args.batch_size}
    overrides = {**{k: v for k, v in flags.items() if v is not None}, **parse_overrides(args.overrides)}
    try:
        cost(args.tasks, args.methods, overrides, tuple(args.size) if args.size else None, args.device, args.amp,
             args.warmup, args.rounds)
    except ValueError as err:  # e.g. --amp bf16 on a card without native bf16, --device cuda without one
        parser.error(str(err))


if __name__ == "__main__":
    main()
