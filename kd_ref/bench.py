"""Benchmarks that print figures measured side by side in one run.

    python -m kd_ref.bench effect --task seg [--methods none kd dist gdd skd] [--seeds 0 1 2] [--iters N]
    python -m kd_ref.bench cost [--tasks seg det cls] [--methods ...] [--student A --teacher B]
                                [--size H W] [--batch-size N] [--rounds N] [--device cuda] [--amp [bf16|fp16]]
    python -m kd_ref.bench pairwise [--nodes 1024 4096 16384 65536] [--channels 128 512] [--device cuda]
    python -m kd_ref.bench flops --preset NAME [NAME ...] [--peak-tflops 125] [--utilisation 0.25]
    python -m kd_ref.bench constant-depth [--preset synthetic_depth_none]
    python -m kd_ref.bench evaluation [--seg-root DIR] [--coco-root DIR] [--rounds N]
    python -m kd_ref.bench data [--task seg|det|cls] [--root DIR] [--rounds N] [--gpu-images-per-second N]

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

``flops`` counts the FLOPs of one training iteration of each preset at its input size and total batch
(student forward and backward, teacher forward, distiller, extra optimizer step, per-step hook) with
torch.utils.flop_counter, multiplies by the run's iterations (epochs from the reference training-set
sizes), adds a per-epoch pass (GKD's prototypes) and converts to GPU-hours at a stated sustained
throughput; it prints the formula. Segmentation and classification steps run on fake tensors (no
compute, no weights); detection and instance-segmentation steps, which size tensors by their values,
are computed on CPU on one probe image of the data set's reference size, with random weights, and
counted per image x the batch (``iteration_flops``).
``constant-depth`` scores the floor a synthetic depth demo must beat: the median training depth predicted
everywhere on the validation scenes.

``evaluation`` scores the same files with our evaluation and with the official evaluators (cityscapesscripts
for mIoU, when installed; pycocotools COCOeval alone on the results our evaluation writes), interleaved, and
says whether the results are identical; by default on exported trees of the real resolution.

``data`` measures images/s of one worker thread on the same files for each task's real-data recipe
(seg: the Cityscapes default preset, det: the COCO one, cls: ImageNet): our training sample (decode +
augmentation, as the task builds it, then the collate: what a DataLoader worker runs, and what a GPU
waits for), our evaluation sample (decode + evaluation transform + collate), decode alone (image, and
label for seg), and a plain PIL / torchvision.transforms pipeline doing the same augmentation. Every task
hands unfinished batches to the device (uint8 pixels; seg: unflipped, unnormalised crop windows and uint8
labels), where the data set's ``prepare_batch`` finishes them
(kd_ref.datasets); its cost on the CPU, where it runs in the training process, is timed per image in the
same rounds (the "device step" rows, on batches of one collated beforehand).
The pipelines run round-robin, one pass over the files each per round, so machine load affects all
alike; the ratio training / decode is the figure to compare between machines. Without ``--root`` it
exports a small tree of the real resolution into a temporary folder (Cityscapes 1024x2048 PNGs, COCO-size
480x640 JPEGs, ImageNet-size 375x500 JPEGs). The last line turns the training rate into the DataLoader
workers one GPU needs at ``--gpu-images-per-second``.
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
from torch.utils._python_dispatch import TorchDispatchMode

from kd_ref import cli, datasets, engine, tasks, transforms
from kd_ref.methods import METHODS, supported_methods
from kd_ref.tasks import TASKS
from kd_ref.metrics import COCO_STAT_NAMES, confusion_matrix, segmentation_scores
from kd_ref.skd import pair_wise_kd
from kd_ref.presets import DEFAULT_PRESETS, PRESETS, default_preset
from kd_ref.recipe import Recipe, parse_overrides, resolve_schedule


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
        preset = entry if entry in PRESETS else default_preset(task, entry, "synthetic")
        presets[PRESETS[preset].method] = preset
    teachers = {PRESETS[p].teacher_preset for p in presets.values()} - {None}
    if len(teachers) > 1:
        raise ValueError(f"--methods {' '.join(entries)}: their presets ({', '.join(presets.values())}) train "
                         f"against different teachers ({', '.join(sorted(teachers))}); compare the methods of "
                         "one student/teacher pair at a time, naming presets where needed")
    return presets


def default_effect_methods(task: str) -> list:
    """The methods whose synthetic preset for ``task`` shares the ``none`` preset's teacher."""
    teacher = PRESETS[default_preset(task, "none", "synthetic")].teacher_preset
    return sorted(m for (t, m, d), preset in DEFAULT_PRESETS.items()
                  if t == task and d == "synthetic" and PRESETS[preset].teacher_preset in (teacher, None))


def effect(task: str, methods: list, seeds: list, iters: int | None, teacher_iters: int | None, out: str,
           device: str | None = None, overrides: dict | None = None) -> dict:
    """``{method: [metric per seed]}`` for ``methods`` (see :func:`effect_presets`); prints a summary table.
    ``overrides`` are recipe fields applied to teacher and students alike (e.g. a smaller image size)."""
    overrides = overrides or {}
    runtime = engine.setup_runtime(device)
    key = TASKS[task].main_metric
    student_presets = effect_presets(task, methods)
    results = {method: [] for method in student_presets}
    for seed in seeds:
        teacher_name = next((PRESETS[p].teacher_preset for p in student_presets.values()
                             if PRESETS[p].teacher_preset), None)
        teacher_ckpt = None
        if teacher_name is not None:
            teacher = dataclasses.replace(PRESETS[teacher_name], seed=seed,
                                          iters=teacher_iters or PRESETS[teacher_name].iters, **overrides)
            teacher_dir = os.path.join(out, f"seed{seed}", "teacher")
            teacher_metrics = _train_or_reuse(teacher, teacher_dir, runtime)
            teacher_ckpt = os.path.join(teacher_dir, "last.pt")
            results.setdefault("teacher", []).append(teacher_metrics[key])
        for method, preset in student_presets.items():
            recipe = dataclasses.replace(PRESETS[preset], seed=seed,
                                         iters=iters or PRESETS[preset].iters, **overrides)
            needs_teacher = METHODS[method].needs_teacher
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


def fixed_batch(recipe: Recipe, runtime: engine.Runtime) -> dict:
    """One training batch of ``recipe``'s data, augmented as the engine's first epoch would be."""
    dataset, collate = TASKS[recipe.task].build_data(recipe, "train", None)
    if len(dataset) < recipe.batch_size:
        raise ValueError(f"--batch-size {recipe.batch_size}: the training set has only {len(dataset)} samples")
    first_epoch = engine.EpochAugmentation(dataset, recipe.seed)
    return dataset.prepare_batch(engine.move_to(collate([first_epoch[i] for i in range(recipe.batch_size)]),
                                                runtime.device))


def _place(model: torch.nn.Module, runtime: engine.Runtime) -> torch.nn.Module:
    model.to(runtime.device)
    if runtime.device.type == "cuda":  # as the engine runs them
        model.to(memory_format=torch.channels_last)
    return model


def training_case(name: str, recipe: Recipe, teacher: torch.nn.Module, batch: dict,
                  runtime: engine.Runtime) -> CostCase:
    """One engine iteration of ``recipe`` as a :class:`CostCase`: student forward, teacher forward,
    distiller, backward and SGD step (with the AMP gradient scaler on GPU), then the distiller's extra
    optimizer step and ``after_step`` hook when it has them. DDP, gradient clipping and logging are left
    out. The student starts from ``recipe.seed``, so every case trains the same network. The learning
    rate is 0 (the optimizer still does all its work): the weights stay as initialised, so every round
    times the same computation. Training them instead made a CPU GDD step go from 10 s to 78 s within
    three steps (random weights drifting, likely into denormal or overflowing values)."""
    recipe = dataclasses.replace(recipe, lr=0.0)
    task, method = TASKS[recipe.task], METHODS[recipe.method]
    torch.manual_seed(recipe.seed)
    student = _place(task.build_model(recipe, recipe.student), runtime).train()
    distiller = method.build(recipe, student, teacher).to(runtime.device) if method.needs_teacher else None
    bind = method.bind.get(recipe.task)
    optimizers = engine.build_optimizers(recipe, student, distiller)
    scaler = runtime.grad_scaler()
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


def teacher_case(teacher: torch.nn.Module, recipe: Recipe, batch: dict,
                 runtime: engine.Runtime) -> CostCase:
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


def pair_table(task: str, base: Recipe, recipes: dict, runtime: engine.Runtime, warmup: int,
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
    runtime = engine.setup_runtime(device, amp)
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


# ------------------------------------------------------------------------------------------- flops
# Training-set sizes of the references' data sets, in images per epoch before mmdet's RepeatDataset:
# Cityscapes train 2975; COCO train2017 117,266 (118,287 minus the images without usable boxes that
# mmdet's filter_empty_gt drops); VOC 07+12 trainval 16,551; CIFAR-100 train 50,000; ImageNet-1k train
# 1,281,167.
REFERENCE_TRAIN_SIZES = {"cityscapes": 2975, "coco": 117_266, "voc": 16_551, "cifar100": 50_000,
                         "imagenet": 1_281_167}
# Assumed sustained throughput of one GPU: a V100's fp16 tensor-core peak (125 TFLOP/s) at 25 %
# utilisation, our assumption for convolutional training with AMP; both are flags of the subcommand.
V100_FP16_PEAK_TFLOPS = 125.0
ASSUMED_UTILISATION = 0.25
FLOPS_FORMULA = ("GPU-hours = FLOPs per iteration x iterations / (peak FLOP/s x utilisation) / 3600; "
                 "FLOPs as torch.utils.flop_counter counts them (2 per multiply-add; convolutions, "
                 "matrix products and attention only); a per-step hook (SoKD's search) only in the "
                 "iterations that run it")
PROBE_FORMULA = ("det and ins: computed on one probe image with random weights (BatchNorm statistics of the probe), "
                 "FLOPs per image x the total batch; the image is the data set's reference image through the "
                 "preset's keep-ratio resize (COCO 640x480 at 1333x800 -> 800x1067, padded to 800x1088; VOC "
                 "500x375 at 1000x600 -> 600x800, padded to 608x800; synthetic: its size), with 7 GT boxes on "
                 "COCO (its mean, about 7 per image), 2 on VOC (about 2.4) and 2 on synthetic scenes; a per-epoch "
                 "pass (GKD's prototypes) per image x at most min(set size, classes x pgm_max_images) images x "
                 "epochs, its teacher forwards in the first epoch only")


class PlausibleScalars(TorchDispatchMode):
    """Reading a fake tensor's value (``.item()``, ``bool(t)``) gives 1 / True: the value of a sanity check
    that passes (``torch.isfinite(loss).all()``). The counted seg and cls steps read values only in such
    checks, so their FLOPs do not depend on it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return {torch.bool: True}.get(args[0].dtype, 1)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fake_tensors():
    """Tensors with shapes and dtypes but meta-device storage: nothing is computed and no weight is
    allocated, yet they report the CPU device, so the losses' autocast contexts and dtype rules run as in
    training (plain meta tensors do not: autocast refuses the meta device)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True), PlausibleScalars():
        yield


def _seg_batch(recipe: Recipe) -> dict:
    return {"images": torch.zeros(recipe.batch_size, 3, *recipe.crop),
            "targets": torch.zeros(recipe.batch_size, *recipe.crop, dtype=torch.long)}


def _cls_batch(recipe: Recipe) -> dict:
    return {"images": torch.zeros(recipe.batch_size, 3, *recipe.crop),
            "targets": torch.zeros(recipe.batch_size, dtype=torch.long)}


# Tasks whose training step has no data-dependent shapes, so that it runs on fake tensors at the full batch.
FLOP_BATCHES = {"seg": _seg_batch, "cls": _cls_batch}
# Tasks whose step sizes tensors by values (anchor and RoI matching, sampling, NMS) and is counted on real
# tensors instead: the task's ``probe_data`` gives made-up samples through its own training pipeline.
PROBED_TASKS = ("det", "ins")
# The reference image of each detection data set, (H, W): COCO's typical 640x480 (landscape) and VOC's
# 500x375. A preset's keep-ratio ``image_scale`` maps it to the canvas its training steps see: mmdet's
# 1333x800 gives 800x1067 (padded to 800x1088), VOC's 1000x600 gives 600x800 (padded to 608x800).
REFERENCE_IMAGE_SIZES = {"coco": (480, 640), "voc": (375, 500)}
# GT boxes per probe image: COCO train2017 has about 7 per image (860,001 boxes in 118,287 images), VOC
# 07+12 trainval about 2.4 (40,058 objects in 16,551 images); the synthetic scenes hold 1 to 3.
PROBE_OBJECTS = {"coco": 7, "voc": 2, "synthetic": 2}


class GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker, whose backward hooks torch.autograd.grad refuses
    (SKD's gradient penalty): every FLOP is counted under "Global", the total that is read."""
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                               output_padding, groups, output_mask, out_shape, **kwargs) -> int:
    """torch.utils.flop_counter's formula for a convolution's backward, with the weight gradient of a grouped
    convolution divided by its groups: torch's formula pairs every input channel with every output channel
    there, which counts a depthwise convolution's weight gradient (MobileNetV2) channels-times over. The
    input gradient it counts right."""
    from torch.utils.flop_counter import conv_backward_flop
    shapes = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_input = conv_backward_flop(*shapes, [output_mask[0], False], out_val=out_shape)
    grad_weight = conv_backward_flop(*shapes, [False, output_mask[1]], out_val=out_shape)
    return grad_input + grad_weight // groups


def counted(work: Callable[[], object]) -> tuple:
    """``(result, FLOPs)`` of ``work()`` under torch.utils.flop_counter.FlopCounterMode (with
    :func:`grouped_conv_backward_flop`)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten.convolution_backward: grouped_conv_backward_flop})
    counter.mod_tracker = GlobalOnly()
    with counter:
        result = work()
    return result, counter.get_total_flops()


def check_countable(recipe: Recipe) -> None:
    if recipe.task not in FLOP_BATCHES and recipe.task not in PROBED_TASKS:
        raise ValueError(f"bench flops: --task {recipe.task} is not counted: counted tasks are "
                         f"{', '.join(FLOP_BATCHES)} (on fake tensors) and {', '.join(PROBED_TASKS)} (on a real "
                         "probe batch)")


def probe_image_size(recipe: Recipe) -> tuple:
    """(H, W) of a probe image before the training transform: the data set's reference image."""
    return tuple(recipe.synthetic_size) if recipe.data == "synthetic" else REFERENCE_IMAGE_SIZES[recipe.data]


@dataclass
class IterationCount:
    """FLOPs of one training iteration at the total batch, by part (``parts``), ``probe`` (what was counted)
    and, for a distiller with a per-epoch pass, ``epoch_pass``."""
    parts: dict
    probe: str
    epoch_pass: "EpochPass | None" = None


@dataclass
class EpochPass:
    """GKD's prototype pass before every epoch, per PGM image: ``first`` FLOPs in the first epoch (student and
    teacher forwards), ``later`` in every later one (the teacher's pooled features are cached), and
    ``images_per_class``, the pass's cap on the images of one class (``pgm_max_images``)."""
    first: int
    later: int
    images_per_class: int

    def images(self, recipe: Recipe) -> int:
        """An upper bound of the images the pass runs on: each class contributes at most
        ``images_per_class`` images with a box wider and taller than ``pgm_min_size``, and no set more
        images than it has (which ones qualify needs the set's annotations)."""
        return min(reference_train_size(recipe), recipe.num_classes * self.images_per_class)


def calibrate_batchnorm(model: torch.nn.Module, batch: dict) -> None:
    """Set every BatchNorm's running statistics to those of ``batch`` (one forward without gradients, the
    BatchNorms in training mode with cumulative averaging), then restore their modes. A detector's frozen
    BatchNorms normalise by running statistics; at their initial (0, 1), the activations of a randomly
    initialised ResNet-101 grow to ~1e5 over its 23 third-stage blocks, the RPN's decoded boxes leave the
    image and no proposal survives; with the probe's statistics they stay at the scale of a trained network."""
    norms = [module for module in model.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(norm.momentum, norm.training) for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    engine.teacher_forward(model, batch, {})
    for norm, (momentum, training) in zip(norms, saved):
        norm.momentum = momentum
        norm.train(training)


def iteration_flops(recipe: Recipe, probe: str | None = None, probe_images: int = 1) -> IterationCount:
    """FLOPs of one training iteration of ``recipe`` at its input size and total batch, by part: student
    forward (with its task losses), teacher forward, distiller forward, backward of the student objective,
    the distiller's extra optimizer step (forward + backward; e.g. SKD's discriminator) and its per-step
    hook (e.g. SoKD's search).

    ``probe="fake"`` (the default for seg and cls): models and the batch of FLOP_BATCHES on fake tensors,
    nothing computed and no weights needed. ``probe="real"`` (the default, and the only mode, for det and
    ins, whose step sizes tensors by values): the same step computed on CPU with real tensors, models with
    random weights (seeded by the recipe; no weight file is read) whose BatchNorm statistics are those of
    the probe (:func:`calibrate_batchnorm`), on ``probe_images`` images of the task's ``probe_data``: the
    data set's reference image (REFERENCE_IMAGE_SIZES; synthetic: ``synthetic_size``) with PROBE_OBJECTS
    boxes, through the preset's training resize at ``image_scale``; every part is counted per image and
    multiplied by the total batch. (For seg and cls the real probe is the fake batch as real tensors.)

    What the probe gives, checked on every Faster R-CNN of the detection rows (R18, R50, R101 and
    MobileNetV2 at the COCO canvas 800x1088, R50 and R101 at VOC's 608x800): the RPN keeps its
    training-time 1000 proposals per image after NMS and the sampler its 512 RoIs (``probe`` says how
    many RoIs the student sampled), as in training. Without the BatchNorm calibration an R101 keeps no
    proposal and samples only the GT boxes. Only the RoI count changes a detector's FLOPs: NMS, anchor
    matching and RoIAlign are not counted (flop_counter counts convolutions and matrix products).

    A distiller with a per-epoch pass (GKD) runs it first, as the engine does before epoch 0, on the
    probe images and then once more (its teacher features are cached after the first epoch):
    ``epoch_pass``. Its prototype construction (matching pursuit over the pooled instances, on the CPU) is in
    that per-image figure too, so here it scales with the images, although it grows faster with the
    instances of a class; it is not counted separately."""
    probe = probe or ("fake" if recipe.task in FLOP_BATCHES else "real")
    check_countable(recipe)
    if probe == "fake" and recipe.task not in FLOP_BATCHES:
        raise ValueError(f"bench flops: --task {recipe.task} cannot run on fake tensors: its training step sizes "
                         "tensors by their values (target assignment); count it with a real probe")
    task, method = TASKS[recipe.task], METHODS[recipe.method]
    runtime = engine.Runtime(torch.device("cpu"))
    parts, epoch_pass = {}, None
    with fake_tensors() if probe == "fake" else contextlib.nullcontext():
        torch.manual_seed(recipe.seed)
        student = task.build_model(recipe, recipe.student).train()
        teacher = distiller = None
        if method.needs_teacher:
            teacher = task.build_model(recipe, recipe.teacher).eval().requires_grad_(False)
        if recipe.task in FLOP_BATCHES:
            batch, images = FLOP_BATCHES[recipe.task](recipe), recipe.batch_size
            description = f"{probe} tensors, batch {images} at {'x'.join(map(str, recipe.crop))}"
        else:
            dataset, collate = task.probe_data(recipe, probe_image_size(recipe), PROBE_OBJECTS[recipe.data],
                                               probe_images)
            batch = dataset.prepare_batch(collate([dataset.get(index, np.random.default_rng(index))
                                                   for index in range(probe_images)]))
            images = probe_images
            description = (f"{'x'.join(map(str, probe_image_size(recipe)))} image, {PROBE_OBJECTS[recipe.data]} "
                           f"boxes, input {'x'.join(map(str, batch['images'].shape[-2:]))}")
        if probe == "real":
            for model in (student, teacher):
                if model is not None:
                    calibrate_batchnorm(model, batch)
        if method.needs_teacher:
            distiller = method.build(recipe, student, teacher)
        if hasattr(distiller, "before_epoch"):
            context = engine.EpochContext(0, student, teacher, dataset, collate, runtime, epochs=2)
            _, first = counted(lambda: distiller.before_epoch(context))
            _, later = counted(lambda: distiller.before_epoch(dataclasses.replace(context, epoch=1)))
            epoch_pass = EpochPass(first // images, later // images, distiller.pgm_max_images)
        student_out, parts["student forward"] = counted(
            lambda: student(batch["images"], batch["targets"], batch.get("image_sizes")))
        if "rois" in student_out:
            description += f", {len(student_out['rois']) // images} RoIs"
        losses = engine.weighted_task_losses(student_out, recipe.task_loss_weight)
        if distiller is not None:
            teacher_out, parts["teacher forward"] = counted(lambda: engine.teacher_forward(teacher, batch, student_out))
            bound = method.bind[recipe.task](student_out, teacher_out, batch)
            kd_losses, parts["distiller forward"] = counted(lambda: distiller(**bound))
            losses.update(kd_losses)
        _, parts["backward"] = counted(lambda: sum(losses.values()).backward())
        if hasattr(distiller, "extra_optimizer") and list(distiller.extra_parameters()):  # engine.build_optimizers' rule
            _, parts["extra step"] = counted(lambda: sum(distiller.extra_losses(**bound).values()).backward())
        if hasattr(distiller, "after_step"):
            objective = engine.search_objective(student, teacher, distiller, method.bind[recipe.task], teacher_out,
                                                recipe.task_loss_weight)
            context = engine.StepContext(0, batch, student, teacher, objective, runtime)
            _, parts["step hook"] = counted(lambda: distiller.after_step(context))
    return IterationCount({part: value * recipe.batch_size // images for part, value in parts.items()},
                          description, epoch_pass)


def reference_train_size(recipe: Recipe) -> int:
    """Images in one epoch of the recipe's training set (before ``dataset_repeat``): the reference set's
    size, or the synthetic set's length."""
    if recipe.data == "synthetic":
        return recipe.synthetic_train
    if recipe.data not in REFERENCE_TRAIN_SIZES:
        raise ValueError(f"bench flops: no reference training-set size for --data {recipe.data}")
    return REFERENCE_TRAIN_SIZES[recipe.data]


def iterations_per_epoch(recipe: Recipe) -> int:
    return recipe.dataset_repeat * reference_train_size(recipe) // recipe.batch_size


def reference_schedule(recipe: Recipe) -> Recipe:
    """The recipe in iterations, an epoch-based one resolved (kd_ref.recipe.resolve_schedule) at the iterations
    per epoch of the reference training set (repeated ``dataset_repeat`` times, last partial batch dropped)."""
    if recipe.epochs is None:
        return recipe
    return resolve_schedule(recipe, iterations_per_epoch(recipe))


def training_iterations(recipe: Recipe) -> int:
    return reference_schedule(recipe).iters


def searching_iterations(recipe: Recipe) -> int:
    """Iterations that run the per-step hook: SoKD searches for its first ``search_iters`` (None: all;
    see COST_VARIANTS), every other hook in every iteration."""
    resolved = reference_schedule(recipe)
    search = resolved.method_options.get("search_iters")
    return resolved.iters if search is None else min(resolved.iters, search)


def gpu_hours(flops: float, peak_tflops: float, utilisation: float) -> float:
    return flops / (peak_tflops * 1e12 * utilisation) / 3600


def flops(presets: list, peak_tflops: float = V100_FP16_PEAK_TFLOPS, utilisation: float = ASSUMED_UTILISATION,
          overrides: dict | None = None) -> list:
    """Per preset: FLOPs of one iteration by part, the iterations, the run's FLOPs and its GPU-hours at
    ``peak_tflops`` x ``utilisation``; printed as a Markdown table with the formula."""
    unknown = [name for name in presets if name not in PRESETS]
    if unknown:
        raise ValueError(f"--preset {' '.join(unknown)}: no such preset (python train.py --list-presets)")
    recipes = {name: dataclasses.replace(PRESETS[name], **(overrides or {})) for name in presets}
    for recipe in recipes.values():  # every preset is checked before any is counted
        check_countable(recipe)
    rows = []
    for name, recipe in recipes.items():
        count = iteration_flops(reference_schedule(recipe))  # method options in epochs resolved too
        parts = count.parts
        per_iteration = sum(parts.values())
        iterations = training_iterations(recipe)
        total = (per_iteration - parts.get("step hook", 0)) * iterations
        total += parts.get("step hook", 0) * searching_iterations(recipe)
        epoch_pass = "-"
        if count.epoch_pass is not None:
            epochs = math.ceil(iterations / iterations_per_epoch(recipe))
            images = count.epoch_pass.images(recipe)
            pass_total = images * (count.epoch_pass.first + (epochs - 1) * count.epoch_pass.later)
            total += pass_total
            epoch_pass = f"<= {images:,} images x {epochs} epochs: {pass_total / 1e15:.0f} PFLOPs"
        rows.append({"preset": name, "parts": parts, "per_iteration": per_iteration, "iterations": iterations,
                     "probe": count.probe, "epoch_pass": count.epoch_pass, "epoch_pass_cell": epoch_pass,
                     "total": total, "gpu_hours": gpu_hours(total, peak_tflops, utilisation)})
    print_table(f"training FLOPs (batch and input size of each preset; {peak_tflops:g} TFLOP/s peak at "
                f"{utilisation:.0%} utilisation)",
                ["preset", "probe", "TFLOPs / iteration (parts)", "iterations", "per-epoch pass", "PFLOPs",
                 "GPU-hours"],
                [[row["preset"], row["probe"], f"{row['per_iteration'] / 1e12:.2f} ("
                  + ", ".join(f"{part} {value / 1e12:.2f}" for part, value in row["parts"].items()) + ")",
                  str(row["iterations"]), row["epoch_pass_cell"], f"{row['total'] / 1e15:.0f}",
                  f"{row['gpu_hours']:.1f}"] for row in rows])
    print(FLOPS_FORMULA)
    if any(recipe.task in PROBED_TASKS for recipe in recipes.values()):
        print(PROBE_FORMULA)
    return rows


# ------------------------------------------------------------------------------------------- output
# ---------------------------------------------------------------------------------- evaluation rates
def _cityscapes_pairs(root: str, images: int, out: str) -> list:
    """``(prediction file, ground-truth file, prediction)`` of the first ``images`` labels of ``root``'s val split.

    The prediction is the ground truth's train ids shifted 8 pixels to the right (ignored pixels become road):
    mostly right, with errors along every edge. It is kept in memory as train ids, as a model's argmax is, and
    written as labelIds in ``out``, the format the official evaluator reads."""
    from PIL import Image

    labels = sorted(glob.glob(os.path.join(root, "gtFine", "val", "*", "*_gtFine_labelIds.png")))[:images]
    if not labels:
        raise FileNotFoundError(f"Cityscapes root {root}: no gtFine/val/<city>/*_gtFine_labelIds.png "
                                "(python -m kd_ref.datasets export --format cityscapes --size 1024 2048 DIR)")
    train_to_label_id = np.array(datasets.CITYSCAPES_LABEL_IDS, np.uint8)
    pairs = []
    for label in labels:
        shifted = np.roll(datasets.read_cityscapes_train_ids(label), 8, axis=1)
        shifted[shifted == datasets.IGNORE_INDEX] = 0
        prediction = os.path.join(out, os.path.basename(label).replace("_gtFine_labelIds", "_pred_labelIds"))
        Image.fromarray(train_to_label_id[shifted]).save(prediction)
        pairs.append((prediction, label, torch.from_numpy(shifted)))
    return pairs


def kd_ref_cityscapes_scores(pairs: list) -> tuple:
    """``(confusion matrix, scores)`` by the path of ``evaluate.py --task seg``: the ground truth read as the
    Cityscapes loader reads it (``datasets.read_cityscapes_train_ids``), ``confusion_matrix`` against the
    prediction's train ids, ``segmentation_scores``."""
    num_classes = len(datasets.CITYSCAPES_CLASSES)
    counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for _, label, prediction in pairs:
        target = torch.from_numpy(datasets.read_cityscapes_train_ids(label))
        counts += confusion_matrix(prediction, target, num_classes, datasets.IGNORE_INDEX)
    return counts, segmentation_scores(counts)


def official_cityscapes_scores(pairs: list):
    """``(confusion matrix over the 19 classes, mIoU in percent)`` by cityscapesscripts'
    ``evaluateImgLists`` (pixel level only, quiet, no result file), or None when it is not installed."""
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    except ImportError:
        return None
    official.args.quiet, official.args.JSONOutput, official.args.evalInstLevelScore = True, False, False
    result = official.evaluateImgLists([p for p, _, _ in pairs], [g for _, g, _ in pairs], official.args)
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


@contextlib.contextmanager
def one_thread():
    """torch on one thread for the duration: the rates of a DataLoader worker, or of an evaluator next to
    the single-threaded official ones (several threads also slow down badly on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()  # as the official evaluators run
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


def evaluation(seg_root: str | None, coco_root: str | None, rounds: int = 3) -> dict:
    """The ``evaluation`` subcommand: :func:`evaluation_rates` on the given trees; without either root, on an
    exported Cityscapes tree of 8 val images at 1024x2048 and a COCO tree of 100 val images at 480x640."""
    if seg_root is not None or coco_root is not None:
        return evaluation_rates(seg_root, coco_root, rounds=rounds)
    with tempfile.TemporaryDirectory(prefix="kd_ref_bench_evaluation_") as scratch:
        seg_root, coco_root = os.path.join(scratch, "cityscapes"), os.path.join(scratch, "coco")
        datasets.export("cityscapes", seg_root, num_train=1, num_val=8, size=(1024, 2048))
        datasets.export("coco", coco_root, num_train=1, num_val=100, size=(480, 640))
        return evaluation_rates(seg_root, coco_root, rounds=rounds)


def constant_depth(preset: str = "synthetic_depth_none") -> dict:
    """The ``constant-depth`` subcommand: the floor a synthetic depth demo must beat. Predicts the median
    depth of every valid training pixel everywhere on the validation scenes and scores it with the task's
    pooled ``depth_metrics``; prints and returns ``{"median", <metric>: value}``."""
    from kd_ref import depth
    recipe = PRESETS.get(preset)
    if recipe is None or recipe.task != "depth" or recipe.data != "synthetic":
        raise ValueError(f"--preset {preset}: expected a synthetic depth preset (e.g. synthetic_depth_none)")

    def scenes(split: str, length: int):
        return datasets.SyntheticDepthScenes(datasets.SyntheticScenes(
            split, recipe.seed, recipe.synthetic_size, length, style=recipe.synthetic_style))

    train, val = scenes("train", recipe.synthetic_train), scenes("val", recipe.synthetic_val)
    train_depths = [train[index]["depth"] for index in range(len(train))]
    median = float(np.median(np.concatenate([gt[gt > depth.INVALID_DEPTH] for gt in train_depths])))
    sums = None
    for index in range(len(val)):
        gt = torch.from_numpy(val[index]["depth"])
        sums = depth.merge_depth_metrics(sums, depth.depth_metrics(torch.full_like(gt, median), gt,
                                                                   gt > depth.INVALID_DEPTH))
    scores = {"median": median, **depth.finish_depth_metrics(sums)}
    print(f"constant depth {median:.3f} m (median of the {len(train)} training scenes of {preset}) on its "
          f"{len(val)} validation scenes: " + ", ".join(f"{name} {value:.3f}" for name, value in scores.items()
                                                        if name != "median"))
    return scores


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


# ------------------------------------------------------------------------------------------- data
DATA_TREES = {  # task: (export format, data, the real resolution (H, W) of its images)
    "seg": ("cityscapes", "cityscapes", (1024, 2048)),
    "det": ("coco", "coco", (480, 640)),
    "cls": ("imagefolder", "imagenet", (375, 500)),
}


def _pil_rgb(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def _plain_normalise(array, normalization: str):
    """numpy (H, W, 3) uint8 -> float32 (3, H, W) normalised, as a plain pipeline writes it."""
    import numpy as np

    spec = transforms.NORMALIZATIONS[normalization]
    array = array[..., ::-1] if spec["bgr"] else array
    return ((array.astype(np.float32) - np.float32(spec["mean"][::-1] if spec["bgr"] else spec["mean"]))
            / np.float32(spec["std"])).transpose(2, 0, 1)


def _plain_seg(recipe, image_path: str, label_path: str, rng) -> tuple:
    """Decode with PIL, resize the whole image and label, crop, flip, normalise (numpy)."""
    import numpy as np
    from PIL import Image

    image, label = _pil_rgb(image_path), Image.open(label_path)
    scale = transforms.draw_scale(rng, recipe.scales, recipe.scale_step)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = np.asarray(image.resize(size, Image.Resampling.BILINEAR))
    label = datasets.LABEL_ID_TO_TRAIN_ID[np.asarray(label.resize(size, Image.Resampling.NEAREST))]
    top = int(rng.integers(max(size[1] - recipe.crop[0], 0) + 1))
    left = int(rng.integers(max(size[0] - recipe.crop[1], 0) + 1))
    window = (slice(top, top + recipe.crop[0]), slice(left, left + recipe.crop[1]))
    image, label = image[window], label[window]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return _plain_normalise(image, recipe.normalization), label.astype(np.int64)


def _plain_det(recipe, image_path: str, rng):
    """Decode with PIL, keep-ratio resize (PIL bilinear), flip, normalise (numpy)."""
    import numpy as np
    from PIL import Image

    image = _pil_rgb(image_path)
    (height, width), _ = transforms.rescale_size(image.height, image.width, recipe.image_scale)
    image = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return _plain_normalise(image[:, ::-1] if rng.random() < 0.5 else image, recipe.normalization)


def _data_pipelines(task: str, root: str) -> tuple:
    """(recipe, the files' count, {pipeline name: callable(index, rng)}) of ``task`` on the tree at ``root``."""
    import numpy as np
    import torchvision.transforms as tv

    export_format, data, _ = DATA_TREES[task]
    recipe = PRESETS[default_preset(task, "none", data)]
    if task == "det":
        recipe = dataclasses.replace(recipe, num_classes=len(datasets.COCODetection(root, "train2017").classes))
    if task == "cls":
        recipe = dataclasses.replace(recipe, num_classes=len(datasets.ImageFolder(root, "train").classes))
    task_object = TASKS[task]
    train_set, _ = task_object.build_data(recipe, "train", root)
    base = train_set.base
    if task == "seg":
        files = [(image, label) for image, label, _ in base.items]
        eval_set = datasets.SegmentationSet(base, transforms.SegEvalTransform(recipe.normalization))
        decode = lambda i, rng: (datasets.read_image(files[i][0]), datasets.read_label(files[i][1]))
        plain = lambda i, rng: _plain_seg(recipe, *files[i], rng)
    elif task == "det":
        files = [os.path.join(base.image_dir, base.coco.imgs[image_id]["file_name"]) for image_id in base.image_ids]
        eval_set = datasets.DetectionSet(base, transforms.DetTransform(recipe.image_scale, 0.0, recipe.normalization),
                                         train=False)
        decode = lambda i, rng: datasets.read_image(files[i])
        plain = lambda i, rng: _plain_det(recipe, files[i], rng)
    else:
        files = [path for path, _ in base.items]
        eval_set = datasets.ClassificationSet(base, task_object._transform(recipe, train=False))
        spec = transforms.NORMALIZATIONS[recipe.normalization]
        reference = tv.Compose([tv.RandomResizedCrop(recipe.crop[0]), tv.RandomHorizontalFlip(), tv.PILToTensor(),
                                tv.ConvertImageDtype(torch.float32),
                                tv.Normalize([m / 255 for m in spec["mean"]], [s / 255 for s in spec["std"]])])
        decode = lambda i, rng: datasets.read_image(files[i])
        plain = lambda i, rng: reference(_pil_rgb(files[i]))
    training = lambda i, rng: train_set.collate([train_set.get(i, rng)])
    evaluation = lambda i, rng: eval_set.collate([eval_set[i]])
    pipelines = {"training (ours)": training, "evaluation (ours)": evaluation, "decode alone": decode,
                 "plain reference": plain}
    collated = {name: [pipeline(i, np.random.default_rng(i)) for i in range(len(files))]
                for name, pipeline in (("training", training), ("evaluation", evaluation))}
    pipelines["training device step, CPU"] = lambda i, rng: train_set.prepare_batch(collated["training"][i])
    pipelines["evaluation device step, CPU"] = lambda i, rng: eval_set.prepare_batch(collated["evaluation"][i])
    return recipe, len(files), pipelines


def data_rates(pipelines: dict, count: int, rounds: int) -> dict:
    """Images/s of every pipeline, one pass over ``count`` files per pipeline and round, round-robin. Each
    pass starts with an untimed call, so that it runs warm as a worker's loop does rather than in the caches
    the previous pipeline left (the device steps move tens of MB)."""
    import numpy as np

    seconds = dict.fromkeys(pipelines, 0.0)
    for round_index in range(rounds):
        for name, pipeline in pipelines.items():
            pipeline(count - 1, np.random.default_rng([round_index, count]))
            started = time.perf_counter()
            for index in range(count):
                pipeline(index, np.random.default_rng([round_index, index]))
            seconds[name] += time.perf_counter() - started
    return {name: rounds * count / total for name, total in seconds.items()}


@one_thread()  # rates per worker thread: a DataLoader worker runs one
def data(tasks: list, root: str | None = None, rounds: int = 3, gpu_images_per_second: float = 200.0,
         num_images: int = 4) -> dict:
    """Print the ``data`` table of every task (module docstring); returns {task: {pipeline: images/s}}."""
    results = {}
    for task in tasks:
        export_format, _, size = DATA_TREES[task]
        with tempfile.TemporaryDirectory(prefix=f"kd_ref_bench_data_{task}_") as scratch:
            tree = root
            if tree is None:
                tree = scratch
                datasets.export(export_format, tree, num_train=num_images, num_val=1, size=size)
            _, count, pipelines = _data_pipelines(task, tree)
            rates = data_rates(pipelines, count, rounds)
        results[task] = rates
        where = root or f"an exported {export_format} tree of {count} {size[0]}x{size[1]} images"
        print_table(f"{task}: images/s per worker thread, {rounds} interleaved rounds over {where}",
                    ["pipeline", "images/s", "/ decode"],
                    [[name, f"{rate:.1f}", f"{rate / rates['decode alone']:.2f}x"] for name, rate in rates.items()])
        workers = math.ceil(gpu_images_per_second / rates["training (ours)"])
        print(f"  a GPU consuming {gpu_images_per_second:g} images/s needs {workers} DataLoader workers "
              f"of this speed (num_workers={workers}; prefetch_factor=2, two batches queued per worker, "
              "covers a slow sample)")
    return results


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
    cli.add_amp_argument(cost_parser)
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

    constant_parser = commands.add_parser("constant-depth", help="the constant-depth floor of a synthetic depth demo")
    constant_parser.add_argument("--preset", default="synthetic_depth_none")

    evaluation_parser = commands.add_parser("evaluation", help="our evaluation next to the official evaluators'")
    evaluation_parser.add_argument("--seg-root", default=None, help="a Cityscapes tree (its val split)")
    evaluation_parser.add_argument("--coco-root", default=None, help="a COCO tree (its val2017 split)")
    evaluation_parser.add_argument("--rounds", type=int, default=3)

    flops_parser = commands.add_parser("flops", help="FLOPs and GPU-hours of a preset's training run")
    flops_parser.add_argument("--preset", nargs="+", required=True, metavar="NAME")
    flops_parser.add_argument("--peak-tflops", type=float, default=V100_FP16_PEAK_TFLOPS,
                              help="peak throughput of one GPU (default: V100 fp16 tensor cores)")
    flops_parser.add_argument("--utilisation", type=float, default=ASSUMED_UTILISATION,
                              help="sustained fraction of the peak (default: our assumption)")
    flops_parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                              help="recipe override for every preset, as in train.py")
    data_parser = commands.add_parser("data", help="images/s of the input pipelines, per worker thread")
    data_parser.add_argument("--task", choices=sorted(DATA_TREES), default=None, help="default: all three")
    data_parser.add_argument("--root", default=None, help="a tree of the task's real data set (default: export "
                                                         "a small one of the real resolution into a temp folder)")
    data_parser.add_argument("--rounds", type=int, default=3)
    data_parser.add_argument("--num-images", type=int, default=4, help="images of an exported tree")
    data_parser.add_argument("--gpu-images-per-second", type=float, default=200.0,
                             help="what one GPU consumes, for the implied loader settings (default: 200)")

    args = parser.parse_args(argv)
    if args.command == "data":
        if args.root is not None and args.task is None:
            parser.error("--root: name the tree's task with --task seg|det|cls")
        try:
            data([args.task] if args.task else list(DATA_TREES), args.root, args.rounds, args.gpu_images_per_second,
                 args.num_images)
        except (ValueError, OSError) as err:  # a tree that is missing or not of the task's layout
            parser.error(str(err))
    elif args.command == "effect":
        methods = args.methods or default_effect_methods(args.task)
        effect(args.task, methods, args.seeds, args.iters, args.teacher_iters,
               args.out or os.path.join("runs", f"bench_effect_{args.task}"), args.device,
               parse_overrides(args.overrides))
    elif args.command == "cost":
        flags = {"student": args.student, "teacher": args.teacher, "batch_size": args.batch_size}
        overrides = {**{k: v for k, v in flags.items() if v is not None}, **parse_overrides(args.overrides)}
        try:
            cost(args.tasks, args.methods, overrides, tuple(args.size) if args.size else None, args.device, args.amp,
                 args.warmup, args.rounds)
        except ValueError as err:  # e.g. --amp bf16 on a card without native bf16, --device cuda without one
            parser.error(str(err))
    elif args.command == "constant-depth":
        try:
            constant_depth(args.preset)
        except ValueError as err:
            parser.error(str(err))
    elif args.command == "evaluation":
        try:
            evaluation(args.seg_root, args.coco_root, args.rounds)
        except (ValueError, OSError) as err:  # a tree that is missing or not of its layout
            parser.error(str(err))
    elif args.command == "flops":
        try:
            flops(args.preset, args.peak_tflops, args.utilisation, parse_overrides(args.overrides))
        except ValueError as err:  # an unknown preset or --set field, a task it cannot count
            parser.error(str(err))
    else:
        pairwise(args.nodes, tuple(args.channels), args.batch_size, args.repeats, args.device,
                 args.memory_budget_gib)


if __name__ == "__main__":
    main()
