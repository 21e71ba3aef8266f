"""Benchmarks that print figures measured side by side in one run.

    python -m kd_ref.bench effect --task seg [--methods none kd dist gdd skd] [--seeds 0 1 2] [--iters N]
    python -m kd_ref.bench cost [--tasks seg det cls] [--methods ...] [--student A --teacher B]
                                [--size H W] [--batch-size N] [--rounds N] [--device cuda] [--amp]
    python -m kd_ref.bench pairwise [--nodes 1024 4096 16384 65536] [--channels 128 512] [--device cuda]

``effect`` trains one teacher per seed on the synthetic data (the preset's teacher recipe), then the
student with every method from the same initialisation seed and data order, and prints the mean and
standard deviation of the main metric per method, so one can see whether distillation helps at small
scale. Runs are kept under ``--out`` (default ``runs/bench_effect_<task>``) and reused when complete.

``cost`` times one training iteration (forward, backward, optimizer step, and the method's extra
optimizer step or per-step hook) of every method of a task on one model pair, one fixed batch of the
synthetic scenes and randomly initialised weights (the cost does not depend on them). The student alone
(``none``) and the teacher forward alone are measured too, all cases interleaved round by round after
warm-up, and the table gives per case: the median seconds, the ratio to the student step, the ratio to
the floor any distiller pays (student step + teacher forward), the overhead beyond that floor in % of a
student step, and the peak memory of a training run of that case alone (see ``step_peak_bytes``).
Per-epoch hooks (GKD's prototypes) run once before timing and are not in the figures. The defaults are
the task's synthetic-demo pair at the demo sizes, a few minutes on a CPU; for real sizes on a GPU, e.g.
``--tasks seg --student deeplabv3_r18 --teacher deeplabv3_r101 --size 512 1024 --batch-size 8 --amp``.

``pairwise`` compares the dense (N x N graphs) and Gram forms of SKD's pair-wise loss
(``kd_ref.skd.pair_wise_kd``) on one image of N nodes: seconds for forward + backward, peak memory, and
the relative difference of the loss and of its gradient. Dense sizes whose estimated memory exceeds
``--memory-budget-gib`` (default half of the memory available now) are skipped and the table says so.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import glob
import io
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from kd_ref import configs, datasets, engine, tasks
from kd_ref.metrics import COCO_STAT_NAMES, confusion_matrix, segmentation_scores
from kd_ref.skd import pair_wise_kd


def _train_or_reuse(recipe, out: str, runtime, teacher_ckpt: str | None = None) -> dict:
    metrics_file = os.path.join(out, "metrics.json")
    if os.path.isfile(metrics_file):
        with open(metrics_file) as handle:
            return json.load(handle)
    resume = os.path.isfile(os.path.join(out, "last.pt"))
    return engine.train(recipe, out, runtime, resume=resume, teacher_ckpt=teacher_ckpt, workers=0, quiet=True)


def effect_presets(task: str, entries: list) -> dict:
    """``{method: preset}`` for ``entries``, each a method (its synthetic preset for ``task``) or a preset
    name (e.g. ``synthetic_det_frcnn_none``); all must train against one teacher preset."""
    presets = {}
    for entry in entries:
        preset = entry if entry in configs.PRESETS else configs.default_preset(task, entry, "synthetic")
        presets[configs.PRESETS[preset].method] = preset
    teachers = {configs.PRESETS[p].teacher_preset for p in presets.values()} - {None}
    if len(teachers) > 1:
        raise ValueError(f"--methods {' '.join(entries)}: their presets ({', '.join(presets.values())}) train "
                         f"against different teachers ({', '.join(sorted(teachers))}); compare the methods of "
                         "one student/teacher pair at a time, naming presets where needed")
    return presets


def default_effect_methods(task: str) -> list:
    """The methods whose synthetic preset for ``task`` shares the ``none`` preset's teacher."""
    teacher = configs.PRESETS[configs.default_preset(task, "none", "synthetic")].teacher_preset
    return sorted(m for (t, m, d), preset in configs.DEFAULT_PRESETS.items()
                  if t == task and d == "synthetic" and configs.PRESETS[preset].teacher_preset in (teacher, None))


def effect(task: str, methods: list, seeds: list, iters: int | None, teacher_iters: int | None, out: str,
           device: str | None = None, overrides: dict | None = None) -> dict:
    """``{method: [metric per seed]}`` for ``methods`` (see :func:`effect_presets`); prints a summary table.
    ``overrides`` are recipe fields applied to teacher and students alike (e.g. a smaller image size)."""
    overrides = overrides or {}
    runtime = engine.setup_runtime(device)
    key = configs.TASKS[task].main_metric
    student_presets = effect_presets(task, methods)
    results = {method: [] for method in student_presets}
    for seed in seeds:
        teacher_name = next((configs.PRESETS[p].teacher_preset for p in student_presets.values()
                             if configs.PRESETS[p].teacher_preset), None)
        teacher_ckpt = None
        if teacher_name is not None:
            teacher = dataclasses.replace(configs.PRESETS[teacher_name], seed=seed,
                                          iters=teacher_iters or configs.PRESETS[teacher_name].iters, **overrides)
            teacher_dir = os.path.join(out, f"seed{seed}", "teacher")
            teacher_metrics = _train_or_reuse(teacher, teacher_dir, runtime)
            teacher_ckpt = os.path.join(teacher_dir, "last.pt")
            results.setdefault("teacher", []).append(teacher_metrics[key])
        for method, preset in student_presets.items():
            recipe = dataclasses.replace(configs.PRESETS[preset], seed=seed,
                                         iters=iters or configs.PRESETS[preset].iters, **overrides)
            needs_teacher = configs.METHODS[method].needs_teacher
            metrics = _train_or_reuse(recipe, os.path.join(out, f"seed{seed}", method), runtime,
                                      teacher_ckpt if needs_teacher else None)
            results[method].append(metrics[key])
            if runtime.is_main:
                print(f"seed {seed} {method:>8}: {key} {metrics[key]:.2f}", flush=True)
    if runtime.is_main:
        print(f"\n{task} on synthetic scenes, {len(seeds)} seed(s): {key} mean ± std")
        for method, values in results.items():
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"  {method:>8}  {statistics.mean(values):6.2f} ± {spread:.2f}")
    return results



# ------------------------------------------------------------------------------------------- memory
def _libc_malloc_trim() -> Callable[[], None]:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: freed heap pages simply stay resident
        return lambda: None
    return lambda: trim(0)


_malloc_trim = _libc_malloc_trim()


def _proc_bytes(path: str, field: str) -> int:
    """A ``field: N kB`` line of a Linux /proc file, in bytes."""
    with open(path) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"{path} has no {field} line")


def mark_memory(device: torch.device) -> int:
    """Bytes in use now, and start a new peak from here. CUDA: allocated tensor bytes. CPU (Linux):
    resident set size, after handing freed heap pages back to the system (malloc_trim) and resetting the
    kernel's high-water mark (clear_refs 5), so that pages an earlier case left resident neither hide
    this case's peak nor count in it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _proc_bytes("/proc/self/status", "VmRSS")


def peak_memory(device: torch.device) -> int:
    """Peak bytes since the last :func:`mark_memory` (CUDA max allocated; CPU peak RSS)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _proc_bytes("/proc/self/status", "VmHWM")


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


# --------------------------------------------------------------------------------------------- cost
@dataclass
class CostCase:
    """One timed unit of work. ``resident_bytes()`` is what the case keeps between two runs (weights,
    optimizer state), read after warm-up when the optimizer state exists."""
    name: str
    run: Callable[[], None]
    resident_bytes: Callable[[], int]


@dataclass
class Measurement:
    seconds: list
    transient_bytes: int = 0


def measure(cases: list, warmup: int, rounds: int, device: torch.device) -> dict:
    """``{case name: Measurement}``. Every round runs every case once, starting one case later than the
    previous round, so that drifting machine load falls on all cases alike; the first ``warmup`` rounds
    are discarded. Memory is taken in one more, untimed round (``transient_bytes``: the peak a run
    reaches above the memory in use before it), because on CPU resetting the peak hands pages back to
    the system and the run after it pays for faulting them in again."""
    results = {case.name: Measurement([]) for case in cases}
    for round_index in range(warmup + rounds):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            seconds = timed(case.run, device)
            if round_index >= warmup:
                results[case.name].seconds.append(seconds)
    for case in cases:
        before = mark_memory(device)
        case.run()
        results[case.name].transient_bytes = peak_memory(device) - before
    return results


def timed(work: Callable[[], object], device: torch.device) -> float:
    """Seconds ``work()`` takes, including the GPU work it queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tick = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - tick


def step_peak_bytes(case: CostCase, measurement: Measurement) -> int:
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


def cost_recipe(task: str, method: str, overrides: dict) -> configs.Recipe:
    """The task's synthetic preset for ``method`` (the ``none`` preset with the method swapped in when
    the method has no synthetic preset of its own), with ``overrides`` applied."""
    preset = configs.DEFAULT_PRESETS.get((task, method, "synthetic"))
    if preset is None:
        recipe = dataclasses.replace(configs.PRESETS[configs.default_preset(task, "none", "synthetic")],
                                     method=method, method_options={})
    else:
        recipe = configs.PRESETS[preset]
    recipe = dataclasses.replace(recipe, **overrides)
    configs.TASKS[task].check_recipe(recipe)
    if recipe.teacher is None:
        raise ValueError(f"bench cost --tasks {task}: the synthetic preset has no teacher; pass --teacher ARCH")
    return recipe


def fixed_batch(recipe: configs.Recipe, runtime: engine.Runtime) -> dict:
    """One training batch of ``recipe``'s data, augmented as the engine's first epoch would be."""
    dataset, collate = configs.TASKS[recipe.task].build_data(recipe, "train", None)
    if len(dataset) < recipe.batch_size:
        raise ValueError(f"--batch-size {recipe.batch_size}: the training set has only {len(dataset)} samples")
    first_epoch = engine.EpochAugmentation(dataset, recipe.seed)
    return engine.move_to(collate([first_epoch[i] for i in range(recipe.batch_size)]), runtime.device)


def _place(model: torch.nn.Module, runtime: engine.Runtime) -> torch.nn.Module:
    model.to(runtime.device)
    if runtime.device.type == "cuda":  # as the engine runs them
        model.to(memory_format=torch.channels_last)
    return model


def training_case(name: str, recipe: configs.Recipe, teacher: torch.nn.Module, batch: dict,
                  runtime: engine.Runtime) -> CostCase:
    """One engine iteration of ``recipe`` as a :class:`CostCase`: student forward, teacher forward,
    distiller, backward and SGD step (with the AMP gradient scaler on GPU), then the distiller's extra
    optimizer step and ``after_step`` hook when it has them. DDP, gradient clipping and logging are left
    out. The student starts from ``recipe.seed``, so every case trains the same network. The learning
    rate is 0 (the optimizer still does all its work): the weights stay as initialised, so every round
    times the same computation. Training them instead made a CPU GDD step go from 10 s to 78 s within
    three steps (random weights drifting, likely into denormal or overflowing values)."""
    recipe = dataclasses.replace(recipe, lr=0.0)
    task, method = configs.TASKS[recipe.task], configs.METHODS[recipe.method]
    torch.manual_seed(recipe.seed)
    student = _place(task.build_model(recipe, recipe.student), runtime).train()
    distiller = method.build(recipe, student, teacher).to(runtime.device) if method.needs_teacher else None
    bind = method.bind.get(recipe.task)
    optimizers = engine.build_optimizers(recipe, student, distiller)
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp and runtime.device.type == "cuda")
    if hasattr(distiller, "before_epoch"):
        dataset, collate = task.build_data(recipe, "train", None)
        distiller.before_epoch(engine.EpochContext(0, student, teacher, dataset, collate, runtime))

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
        if hasattr(distiller, "after_step"):
            objective = engine.search_objective(student, teacher, distiller, bind, teacher_out,
                                                recipe.task_loss_weight)
            distiller.after_step(engine.StepContext(0, batch, student, teacher, objective, runtime))

    modules = [student] + ([teacher, distiller] if distiller is not None else [])
    held = [optimizers.student] + ([optimizers.extra] if optimizers.extra is not None else [])
    return CostCase(name, step, lambda: tensor_bytes(modules, held))


def teacher_case(teacher: torch.nn.Module, recipe: configs.Recipe, batch: dict,
                 runtime: engine.Runtime) -> CostCase:
    """The teacher forward alone, as a distillation step runs it (a two-stage teacher scores the RoIs a
    student sampled once, before timing)."""
    torch.manual_seed(recipe.seed)
    student = _place(configs.TASKS[recipe.task].build_model(recipe, recipe.student), runtime).train()
    with torch.no_grad(), runtime.autocast():
        student_out = student(batch["images"], batch["targets"], batch.get("image_sizes"))
    sampled = {key: value for key, value in student_out.items() if key == "rois"}
    del student, student_out

    def forward() -> None:
        with runtime.autocast():
            engine.teacher_forward(teacher, batch, sampled)
    return CostCase(TEACHER_FORWARD, forward, lambda: tensor_bytes([teacher]))


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


def cost_tables(task: str, methods: list, overrides: dict, runtime: engine.Runtime, warmup: int,
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


def pair_table(task: str, base: configs.Recipe, recipes: dict, runtime: engine.Runtime, warmup: int,
               rounds: int) -> tuple:
    """``(description, rows, skipped)`` of one student/teacher pair."""
    batch = fixed_batch(base, runtime)
    teacher = _place(configs.TASKS[task].build_model(base, base.teacher), runtime).eval().requires_grad_(False)
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
                   f"{size[0]}x{size[1]}, {runtime.device.type}{' AMP' if runtime.amp else ''}, "
                   f"median of {rounds} interleaved rounds after {warmup} warm-up")
    return description, cost_rows(seconds, peaks), skipped


def cost(tasks: list, methods: list | None = None, overrides: dict | None = None, size: tuple | None = None,
         device: str | None = None, amp: bool = False, warmup: int = 1, rounds: int = 5) -> dict:
    """``{task: rows}`` for the pair of the task's ``none`` preset and ``{"<task>: <student> <- <teacher>":
    rows}`` for any other pair; prints one table per pair, and a line per skipped method. ``methods``
    None: every method the task supports; ``overrides``: recipe fields for every task; ``size``: the input
    (H, W), see :func:`size_overrides`."""
    runtime = engine.setup_runtime(device, amp)
    tables = {}
    for task in tasks:
        if task not in configs.TASKS:
            raise ValueError(f"--tasks {task}: expected some of {sorted(configs.TASKS)}")
        supported = [m for m in configs.supported_methods(task) if m != STUDENT_ALONE]
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


# ----------------------------------------------------------------------------------------- pairwise
def dense_pairwise_bytes(batch: int, num_nodes: int) -> int:
    """Estimated peak of the dense form: about six float32 N x N matrices per image are alive at once
    (both graphs, their difference and its square, then their gradients in backward)."""
    return 6 * 4 * batch * num_nodes ** 2


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def correlated_features(batch: int, channels: int, num_nodes: int, latent: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
    """(B, C, N, 1) non-negative features driven by a shared low-dimensional ``latent`` (B, L, N): student
    and teacher graphs then agree roughly, as after training, where the Gram terms nearly cancel."""
    mixing = torch.randn(channels, latent.shape[1], generator=generator, device=latent.device)
    noise = torch.randn(batch, channels, num_nodes, generator=generator, device=latent.device)
    return torch.relu(mixing @ latent + 0.5 * noise).unsqueeze(-1)


def _timed_pairwise(feat_s, feat_t, impl: str, repeats: int, device) -> tuple:
    """(median seconds of forward + backward after one warm-up run, peak bytes of one more run above
    its start, loss, gradient w.r.t. the student feature)."""
    def forward_backward():
        leaf = feat_s.detach().requires_grad_(True)
        loss = pair_wise_kd(leaf, feat_t, kernel=None, impl=impl)
        loss.backward()
        return loss.detach(), leaf.grad

    forward_backward()
    seconds = statistics.median(timed(forward_backward, device) for _ in range(repeats))
    before = mark_memory(device)
    loss, grad = forward_backward()
    return seconds, peak_memory(device) - before, loss, grad


def relative_difference(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-300))


def pairwise(nodes: list, channels: tuple = (128, 512), batch: int = 1, repeats: int = 3,
             device: str | None = None, memory_budget_gib: float | None = None, seed: int = 0) -> list:
    """One row per N: dense and Gram seconds and peak MiB (or why dense was skipped) and the relative
    difference of loss and gradient; prints the table."""
    runtime = engine.setup_runtime(device)
    budget = (memory_budget_gib * 2 ** 30 if memory_budget_gib is not None
              else available_memory_bytes(runtime.device) / 2)
    generator = torch.Generator(runtime.device).manual_seed(seed)
    rows = []
    for num_nodes in nodes:
        latent = torch.randn(batch, 16, num_nodes, generator=generator, device=runtime.device)
        feat_s, feat_t = (correlated_features(batch, c, num_nodes, latent, generator) for c in channels)
        gram_s, gram_peak, gram_loss, gram_grad = _timed_pairwise(feat_s, feat_t, "gram", repeats, runtime.device)
        row = {"nodes": num_nodes, "gram_seconds": gram_s, "gram_peak_mb": gram_peak / 2 ** 20}
        needed = dense_pairwise_bytes(batch, num_nodes)
        if needed > budget:
            row["dense_skipped"] = (f"skipped: needs ~{needed / 2 ** 30:.1f} GiB, "
                                    f"budget {budget / 2 ** 30:.1f} GiB")
        else:
            dense_s, dense_peak, dense_loss, dense_grad = _timed_pairwise(feat_s, feat_t, "dense", repeats,
                                                                          runtime.device)
            row.update(dense_seconds=dense_s, dense_peak_mb=dense_peak / 2 ** 20,
                       loss_rel_diff=relative_difference(gram_loss, dense_loss),
                       grad_rel_diff=relative_difference(gram_grad, dense_grad))
        rows.append(row)
    print_table(f"SKD pair-wise loss, dense vs Gram: batch {batch}, C_s {channels[0]}, C_t {channels[1]}, "
                f"{runtime.device.type}, forward + backward, median of {repeats}",
                ["N", "dense s", "dense peak MB", "gram s", "gram peak MB", "rel. diff loss", "rel. diff grad"],
                [_pairwise_cells(row) for row in rows])
    return rows


def _pairwise_cells(row: dict) -> list:
    gram = [f"{row['gram_seconds']:.3f}", f"{row['gram_peak_mb']:.0f}"]
    if "dense_skipped" in row:
        return [str(row["nodes"]), row["dense_skipped"], "-", *gram, "-", "-"]
    return [str(row["nodes"]), f"{row['dense_seconds']:.3f}", f"{row['dense_peak_mb']:.0f}", *gram,
            f"{row['loss_rel_diff']:.1e}", f"{row['grad_rel_diff']:.1e}"]


# ------------------------------------------------------------------------------------------- output
# ---------------------------------------------------------------------------------- evaluation rates
def _cityscapes_pairs(root: str, images: int, out: str) -> list:
    """``(prediction, ground truth)`` labelIds PNG pairs of the first ``images`` labels of ``root``'s val split.

    The predictions are the ground truth's train ids shifted 8 pixels to the right (ignored pixels become
    road), written as labelIds in ``out``: a prediction that is mostly right, with errors along every edge,
    in the format the official evaluator reads."""
    from PIL import Image

    labels = sorted(glob.glob(os.path.join(root, "gtFine", "val", "*", "*_gtFine_labelIds.png")))[:images]
    if not labels:
        raise FileNotFoundError(f"Cityscapes root {root}: no gtFine/val/<city>/*_gtFine_labelIds.png "
                                "(python -m kd_ref.datasets export --format cityscapes --size 1024 2048 DIR)")
    train_to_label_id = np.array(datasets.CITYSCAPES_LABEL_IDS, np.uint8)
    pairs = []
    for label in labels:
        shifted = np.roll(datasets.LABEL_ID_TO_TRAIN_ID[datasets.read_label(label)], 8, axis=1)
        prediction = os.path.join(out, os.path.basename(label).replace("_gtFine_labelIds", "_pred_labelIds"))
        Image.fromarray(train_to_label_id[np.where(shifted == datasets.IGNORE_INDEX, 0, shifted)]).save(prediction)
        pairs.append((prediction, label))
    return pairs


def kd_ref_cityscapes_scores(pairs: list) -> tuple:
    """``(confusion matrix, scores)`` of labelIds PNG pairs by kd_ref's path: decode (``datasets.read_label``),
    ``confusion_matrix`` with the data set's labelId -> train id map, ``segmentation_scores``."""
    num_classes = len(datasets.CITYSCAPES_CLASSES)
    counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    id_map = torch.from_numpy(datasets.LABEL_ID_TO_TRAIN_ID)
    for prediction, label in pairs:
        # read_label returns a read-only view of the decoded image; torch wants a writable array
        pred, target = (torch.from_numpy(np.array(datasets.read_label(path))) for path in (prediction, label))
        counts += confusion_matrix(pred, target, num_classes, datasets.IGNORE_INDEX, value_map=id_map)
    return counts, segmentation_scores(counts)


def official_cityscapes_scores(pairs: list):
    """``(confusion matrix over the 19 classes, mIoU in percent)`` by cityscapesscripts'
    ``evaluateImgLists`` (pixel level only, quiet, no result file), or None when it is not installed."""
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    except ImportError:
        return None
    official.args.quiet, official.args.JSONOutput, official.args.evalInstLevelScore = True, False, False
    result = official.evaluateImgLists([p for p, _ in pairs], [g for _, g in pairs], official.args)
    ids = list(datasets.CITYSCAPES_LABEL_IDS)
    return torch.tensor(result["confMatrix"], dtype=torch.int64)[ids][:, ids], result["averageScoreClasses"] * 100


def coco_detections(base, image_ids: list, per_image: int, seed: int = 0) -> tuple:
    """Detector-like outputs on the inputs DetTask evaluates: for every image, ``per_image`` boxes (its ground
    truth boxes jittered, the rest random) with random scores and labels, on the image resized to
    1333x800 (mmdet's COCO scale), and the matching targets."""
    generator = torch.Generator().manual_seed(seed)
    outputs, targets = [], []
    for image_id in image_ids:
        info = base.coco.imgs[image_id]
        height, width = info["height"], info["width"]
        scale = min(1333 / max(height, width), 800 / min(height, width))
        size = (round(height * scale), round(width * scale))
        truth = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                              (a["bbox"] for a in base.coco.imgToAnns[image_id])], dtype=torch.float32)
        truth = truth.reshape(-1, 4)[torch.randint(max(len(truth), 1), (per_image,), generator=generator)
                                     % max(len(truth), 1)] if len(truth) else torch.zeros(0, 4)
        corners = torch.rand(per_image, 2, generator=generator) * torch.tensor([width, height]) * 0.8
        sides = torch.rand(per_image, 2, generator=generator) * torch.tensor([width, height]) * 0.2 + 4
        boxes = torch.cat([corners, corners + sides], 1)
        boxes[:len(truth)] = truth + torch.randn(len(truth), 4, generator=generator) * 3
        outputs.append({"boxes": boxes * scale, "scores": torch.rand(per_image, generator=generator),
                        "labels": torch.randint(len(base.category_ids), (per_image,), generator=generator)})
        targets.append({"image_id": image_id, "flipped": False, "size": size, "orig_size": (height, width)})
    return outputs, targets


def kd_ref_coco_scores(base, outputs: list, targets: list, save_pred: str | None = None) -> dict:
    """COCO box AP of detector outputs by kd_ref's evaluation path: ``DetTask``'s eval state (boxes to original
    pixels, results, pycocotools ``COCOeval``); ``save_pred=DIR`` also writes the results file."""
    task = tasks.DetTask()
    task.eval_base = base
    state = task.new_eval_state(SimpleNamespace(data="coco", num_classes=len(base.category_ids)))
    for found, target in zip(outputs, targets):
        task.update_eval_state(state, {"detections": [found]}, {"targets": [target]}, save_pred)
    return task.finish_eval_state(state, engine.Runtime(torch.device("cpu")))


def official_coco_stats(coco_gt, results: list) -> list:
    """AP ... APl in percent of COCO results by pycocotools alone: ``loadRes``, ``COCOeval`` evaluate,
    accumulate, summarize."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(value) * 100 for value in evaluator.stats[:len(COCO_STAT_NAMES)]]


def evaluation_rates(seg_root: str | None = None, coco_root: str | None = None, images: int = 8,
                     coco_images: int = 100, detections_per_image: int = 100, warmup: int = 1,
                     rounds: int = 3) -> dict:
    """Images/s of kd_ref's evaluation next to the official evaluators' on the same files, interleaved round
    by round (:func:`measure`, median of ``rounds``), with a check that both give the same results.

    * mIoU (``seg_root``, a Cityscapes-layout tree): ``images`` ground-truth labels of the val split and
      predictions made from them (:func:`_cityscapes_pairs`), scored by :func:`kd_ref_cityscapes_scores` and
      by cityscapesscripts (skipped with one line when it is not installed; it is no dependency).
    * COCO box AP (``coco_root``, a COCO-layout tree): ``detections_per_image`` detections on each of
      ``coco_images`` val2017 images (:func:`coco_detections`), through DetTask's evaluation and through
      pycocotools alone on the results that evaluation writes.

    Returns ``{case: images/s}`` plus ``"seg identical"`` / ``"coco identical"`` (booleans)."""
    cpu = torch.device("cpu")
    rates = {}
    if seg_root is not None:
        with tempfile.TemporaryDirectory() as predictions:
            pairs = _cityscapes_pairs(seg_root, images, predictions)
            cases = [CostCase("kd_ref mIoU", lambda: kd_ref_cityscapes_scores(pairs), lambda: 0)]
            official = official_cityscapes_scores(pairs)
            if official is None:
                print("cityscapesscripts is not installed: the official mIoU evaluator is skipped "
                      "(pip install cityscapesscripts to compare with it)")
            else:
                cases.append(CostCase("cityscapesscripts", lambda: official_cityscapes_scores(pairs), lambda: 0))
                counts, scores = kd_ref_cityscapes_scores(pairs)
                rates["seg identical"] = bool(torch.equal(counts, official[0])) and math.isclose(
                    scores["mIoU"], official[1], rel_tol=1e-12)
            for name, measured in measure(cases, warmup, rounds, cpu).items():
                rates[name] = len(pairs) / statistics.median(measured.seconds)
        _print_rates(f"mIoU evaluation of {len(pairs)} PNG pairs from {seg_root}, one thread", rates,
                     "kd_ref mIoU", "cityscapesscripts", rates.get("seg identical"))
    if coco_root is not None:
        base = datasets.COCODetection(coco_root, "val2017")
        outputs, targets = coco_detections(base, base.image_ids[:coco_images], detections_per_image)
        with tempfile.TemporaryDirectory() as written:
            ours = kd_ref_coco_scores(base, outputs, targets, save_pred=written)
            with open(os.path.join(written, "detections.json")) as handle:
                results = json.load(handle)
        rates["coco identical"] = [ours[name] for name in COCO_STAT_NAMES] == official_coco_stats(base.coco, results)
        cases = [CostCase("kd_ref COCO AP", lambda: kd_ref_coco_scores(base, outputs, targets), lambda: 0),
                 CostCase("pycocotools COCOeval", lambda: official_coco_stats(base.coco, results), lambda: 0)]
        for name, measured in measure(cases, warmup, rounds, cpu).items():
            rates[name] = len(targets) / statistics.median(measured.seconds)
        _print_rates(f"COCO box AP of {len(targets)} images x {detections_per_image} detections from {coco_root}, "
                     "one thread", rates, "kd_ref COCO AP", "pycocotools COCOeval", rates["coco identical"])
    return rates


def _print_rates(title: str, rates: dict, ours: str, official: str, identical) -> None:
    rows = [[ours, f"{rates[ours]:.1f}", f"{rates[ours] / rates[official]:.2f}" if official in rates else "-"]]
    if official in rates:
        rows.append([official, f"{rates[official]:.1f}", "1.00"])
    print_table(title, ["evaluator", "images/s", f"rate / {official}'s"], rows)
    if identical is not None:
        print(f"identical results: {'yes' if identical else 'NO'}")


def print_table(title: str, header: list, rows: list) -> None:
    """A Markdown table (pastes into the README as it is) under a title line."""
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_ref.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    effect_parser = commands.add_parser("effect", help="does distillation help? (mean ± std over seeds)")
    effect_parser.add_argument("--task", default="seg")
    effect_parser.add_argument("--methods", nargs="+", default=None,
                               help="methods (their synthetic presets) or preset names, one teacher for all "
                                    "(default: every method whose synthetic preset shares the none preset's teacher)")
    effect_parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    effect_parser.add_argument("--iters", type=int, default=None, help="student iterations (default: preset)")
    effect_parser.add_argument("--teacher-iters", type=int, default=None)
    effect_parser.add_argument("--out", default=None)
    effect_parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    effect_parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                               help="recipe override for every run, as in train.py")

    cost_parser = commands.add_parser("cost", help="seconds and memory of a training step per method")
    cost_parser.add_argument("--tasks", nargs="+", default=["seg", "det", "cls"])
    cost_parser.add_argument("--methods", nargs="+", default=None,
                             help="default: every method of each task (methods a task lacks are left out)")
    cost_parser.add_argument("--student", default=None, help="default: the task's synthetic-demo student")
    cost_parser.add_argument("--teacher", default=None, help="default: the task's synthetic-demo teacher")
    cost_parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                             help="input size (default: the synthetic demo's)")
    cost_parser.add_argument("--batch-size", type=int, default=None, help="default: the synthetic demo's")
    cost_parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    cost_parser.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    cost_parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    cost_parser.add_argument("--amp", action="store_true", help="fp16 autocast + GradScaler on CUDA, bf16 on CPU")
    cost_parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                             help="recipe override for every case, as in train.py")

    pairwise_parser = commands.add_parser("pairwise", help="SKD pair-wise loss: dense vs Gram form")
    pairwise_parser.add_argument("--nodes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    pairwise_parser.add_argument("--channels", type=int, nargs=2, metavar=("C_S", "C_T"), default=[128, 512],
                                 help="student and teacher channels (default: DeepLabV3-R18 / -R101 heads)")
    pairwise_parser.add_argument("--batch-size", type=int, default=1)
    pairwise_parser.add_argument("--repeats", type=int, default=3)
    pairwise_parser.add_argument("--memory-budget-gib", type=float, default=None,
                                 help="skip dense sizes estimated above this (default: half the available memory)")
    pairwise_parser.add_argument("--device", choices=["cpu", "cuda"], default=None)

    args = parser.parse_args(argv)
    if args.command == "effect":
        methods = args.methods or default_effect_methods(args.task)
        effect(args.task, methods, args.seeds, args.iters, args.teacher_iters,
               args.out or os.path.join("runs", f"bench_effect_{args.task}"), args.device,
               configs.parse_overrides(args.overrides))
    elif args.command == "cost":
        flags = {"student": args.student, "teacher": args.teacher, "batch_size": args.batch_size}
        overrides = {**{k: v for k, v in flags.items() if v is not None}, **configs.parse_overrides(args.overrides)}
        cost(args.tasks, args.methods, overrides, tuple(args.size) if args.size else None, args.device, args.amp,
             args.warmup, args.rounds)
    else:
        pairwise(args.nodes, tuple(args.channels), args.batch_size, args.repeats, args.device,
                 args.memory_budget_gib)


if __name__ == "__main__":
    main()
