"""The training engine: one loop for every task and distillation method.

:func:`train` builds a :class:`TrainingRun` and runs its named steps::

    run.restore(); run.check_teacher(); run.start()   # --resume; the teacher's outputs on the first batch
    while iterations are left:
        run.begin_epoch()                   # the data at the current iteration; at an epoch's start, before_epoch
        for batch in run.loader:
            step = run.train_step(batch)    # forward, backward, the one read from the device, the student's update
            run.extra_step(step)            # the distiller's extra optimizer (an adversary), if it has one
            run.step_hooks(batch, step)     # the distiller's after_step
            run.log(step); run.evaluate_if_due(); run.checkpoint(...)   # stops after a SIGTERM/SIGINT
    run.finish()                            # the final evaluation, into metrics.json

One iteration (:meth:`TrainingRun.train_step`)::

    student_out = student(images, targets)                      # task losses in student_out["losses"]
    teacher_out = teacher(images, predict=False)                # eval mode, no grad: constants
    kd_losses   = distiller(**bind(student_out, teacher_out, batch))
    loss        = w * sum(student_out["losses"]) + sum(kd_losses)   # w = recipe.task_loss_weight
    extra       = sum(distiller.extra_losses(**bound))          # only with an extra optimizer
    backward(loss); backward(extra); read every loss and gradient norm at once; step the student optimizer

The registry (``kd_ref.methods.METHODS``) says how model outputs bind to the distiller's arguments,
so the engine never knows what a method does: it calls the hooks of :class:`kd_ref.distiller.Distiller`
(before_epoch, after_step, extra_parameters, extra_optimizer, extra_losses, sync_batchnorm_modules) on
every distiller, no-ops unless the method defines them.

Stops: a non-finite loss stops the run (``FloatingPointError``) before any update and any checkpoint; a
non-finite gradient norm skips that optimizer's step under fp16's GradScaler and stops the run otherwise.

Schedules: ``iters`` iterations, or ``epochs`` passes over the training set repeated ``dataset_repeat``
times, counted when the run starts (``kd_ref.recipe.resolve_schedule``). Evaluations run every
``eval_every`` iterations, at ``eval_at`` and at the end; under ``keep_best`` the best (of ``eval_at``'s,
when set) is also written to ``best.pt``.

Distributed (torchrun): the student is wrapped in DDP, its BatchNorm synchronised on CUDA unless the recipe's
``sync_bn`` is False (:func:`synchronise_batchnorm`, with the distiller's ``sync_batchnorm_modules()``); the
distiller's own gradients are all-reduced. ``batch_size`` is the total over all processes: N processes at
batch B/N train as one process at batch B, up to floating-point reduction order
(tests/test_ddp_equivalence.py).

Checkpoints (``last.pt``, replaced atomically) hold the student, the distiller, every optimizer and scaler,
the precision, the iteration, the recipe as given and every rank's RNG state: ``--resume`` continues exactly.

Elsewhere: the process, preemption, checkpoint files, the JSON log and the memory estimate are in
:mod:`kd_ref.runtime`; the resumable samplers and the per-sample augmentation seeds in :mod:`kd_ref.samplers`.
Why the engine is built this way: ``docs/design/engine.md``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from kd_ref import convert, methods, tasks
from kd_ref.distiller import Distiller, EpochContext, StepContext
from kd_ref.precision import tree_at_least_float32
from kd_ref.recipe import Recipe, check_schedule, recipe_changes, resolve_schedule, resumed_recipe
from kd_ref.runtime import (BatchNormWatch, JsonlLog, PreemptionGuard, Runtime, TrainingInterrupted, atomic_save,
                            check_on_every_rank, load_checkpoint, peak_memory_mb, precision_change_note, rng_state,
                            set_rng_state, unwrap, write_json)
from kd_ref.samplers import EpochAugmentation, build_train_sampler


# ---------------------------------------------------------------------------------------- schedule
def lr_factor(iteration: int, recipe: "Recipe") -> float:
    """Multiplier of the base lr at ``iteration`` (0-based): linear warm-up, then poly or steps.

    poly:  lr = min_lr + (base - min_lr) * (1 - it / iters) ** power    (min_lr = 0: CIRKD/SKD form)
    step:  lr = base * 0.1 ** (number of milestones passed)
    """
    if recipe.schedule == "poly":
        decay = (1 - iteration / recipe.iters) ** recipe.poly_power
        floor = recipe.min_lr / recipe.lr if recipe.lr else 0.0  # lr 0 (a frozen probe run) stays 0
        factor = floor + (1 - floor) * decay
    elif recipe.schedule == "step":
        factor = 0.1 ** sum(iteration >= m for m in recipe.lr_steps)
    else:
        raise ValueError(f"recipe.schedule must be 'poly' or 'step', got {recipe.schedule!r}")
    if iteration < recipe.warmup_iters:
        progress = iteration / recipe.warmup_iters
        factor *= recipe.warmup_ratio + (1 - recipe.warmup_ratio) * progress
    return factor


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor * group.get("lr_mult", 1.0)


# --------------------------------------------------------------------------------------------- train
ETA_AFTER = 10  # iterations after which a run says its measured s/it and the time left


def build_optimizer(params, recipe: "Recipe") -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                           nesterov=recipe.nesterov)


# The layers whose parameters take ``norm_weight_decay`` (torchvision references' set_weight_decay list).
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)


def parameter_groups(sources: list, recipe: "Recipe") -> list:
    """SGD parameter groups of ``sources``, pairs (module, the parameters of it to optimise, in order): per
    source, the biases (every parameter named ``bias``, normalisation layers' included, as torchvision's
    custom "bias" key and maskrcnn-benchmark's make_optimizer) at ``bias_weight_decay`` and
    ``bias_lr_factor`` x lr (the group's ``lr_mult``, which set_lr reads), the other parameters of
    normalisation layers at ``norm_weight_decay``, the rest at ``weight_decay``. Parameters of equal
    settings share a group, so a recipe at the defaults has one group per source, as the checkpoints
    written before these fields existed (an optimizer state loads only into groups of the same sizes)."""
    norm_decay = recipe.weight_decay if recipe.norm_weight_decay is None else recipe.norm_weight_decay
    bias_decay = recipe.weight_decay if recipe.bias_weight_decay is None else recipe.bias_weight_decay
    groups = []
    for module, params in sources:
        owners = {id(param): (layer, name) for layer in (module.modules() if module is not None else ())
                  for name, param in layer.named_parameters(recurse=False)}
        by_setting: dict[tuple, list] = {(recipe.weight_decay, 1.0): []}
        for param in params:
            layer, name = owners[id(param)]
            if name == "bias":
                setting = (bias_decay, recipe.bias_lr_factor)
            elif isinstance(layer, NORM_LAYERS):
                setting = (norm_decay, 1.0)
            else:
                setting = (recipe.weight_decay, 1.0)
            by_setting.setdefault(setting, []).append(param)
        groups += [{"params": members, "weight_decay": decay, "lr_mult": lr_mult}
                   for (decay, lr_mult), members in by_setting.items() if members or len(by_setting) == 1]
    return groups


@dataclass
class Optimizers:
    """The student optimizer (student parameters and the distiller's own, ``distiller_params``) and,
    when a distiller has parameters of its own optimizer (SKD's discriminator), that ``extra`` optimizer
    with its per-iteration lr multiplier."""
    student: torch.optim.Optimizer
    distiller_params: list
    extra: torch.optim.Optimizer | None = None
    extra_lr_lambda: object = None
    extra_params: list = dataclasses.field(default_factory=list)


def build_optimizers(recipe: "Recipe", student: nn.Module, distiller: Distiller | None) -> Optimizers:
    """The student optimizer over the student's trainable parameters and the distiller's, except the distiller's
    ``extra_parameters()``, and the distiller's ``extra_optimizer`` over those, if it returns one."""
    extra_params = list(distiller.extra_parameters()) if distiller is not None else []
    extra_ids = {id(p) for p in extra_params}
    distiller_params = [p for p in distiller.parameters() if id(p) not in extra_ids] if distiller else []
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameter_groups([(student, trainable), (distiller, distiller_params)], recipe), recipe)
    built = distiller.extra_optimizer(recipe.iters) if extra_params else None
    if built is None:
        return Optimizers(optimizer, distiller_params)
    extra, extra_lr_lambda = built
    return Optimizers(optimizer, distiller_params, extra, extra_lr_lambda or (lambda iteration: 1.0), extra_params)


def teacher_inputs(student_out: dict) -> dict:
    """Extra teacher inputs taken from the student's outputs: a two-stage student's sampled RoIs, so
    that the teacher's RoI head scores the same boxes (DIST, GKD on Faster R-CNN)."""
    return {"rois": student_out["rois"].detach()} if "rois" in student_out else {}


def teacher_forward(teacher: nn.Module, batch: dict, student_out: dict) -> dict:
    """The teacher's outputs on ``batch``, constants for the distiller. Called inside the step's autocast,
    so with ``--amp`` on GPU it runs in fp16, and channels-last there (the models are converted when built).

    torch.no_grad rather than torch.inference_mode: every distiller combines teacher outputs with student
    tensors in ops that save them for backward (the gradient of KL(p_t || p_s) needs p_t), and autograd
    refuses to save inference-mode tensors. Inference mode would only spare version-counter and view
    bookkeeping; making its outputs usable would take a copy of each."""
    with torch.no_grad():
        return teacher(batch["images"], image_sizes=batch.get("image_sizes"), predict=False,
                       **teacher_inputs(student_out))


def weighted_task_losses(student_out: dict, task_loss_weight: float) -> dict:
    """The model's task losses, each times ``task_loss_weight`` (the recipe's; e.g. mdistiller's 0.1 CE next
    to 0.9 KD), under their own names."""
    return {name: task_loss_weight * value for name, value in student_out["losses"].items()}


def forward_losses(student: nn.Module, teacher: nn.Module | None, distiller: Distiller | None, bind,
                   batch: dict, task_loss_weight: float = 1.0, teacher_out: dict | None = None) -> tuple:
    """One step's forward: ``(losses, teacher_out, bound)``, the student's weighted task losses plus the
    distiller's weighted losses, the teacher's outputs and the distiller's bound inputs (None, None
    without a distiller). ``bind`` is the method's binding for the task. A given ``teacher_out`` (of
    this batch) is reused unless the teacher must score what this student forward sampled (a two-stage
    student's new RoIs, :func:`teacher_inputs`)."""
    student_out = student(batch["images"], batch["targets"], batch.get("image_sizes"))
    losses = weighted_task_losses(student_out, task_loss_weight)
    if distiller is None:
        return losses, None, None
    if teacher_out is None or teacher_inputs(student_out):
        teacher_out = teacher_forward(teacher, batch, student_out)
    bound = bind(student_out, teacher_out, batch)
    losses.update(distiller(**bound))
    return losses, teacher_out, bound


def search_objective(student: nn.Module, teacher: nn.Module, distiller: nn.Module, bind, teacher_out: dict,
                     task_loss_weight: float = 1.0):
    """``loss_fn(batch)`` of :class:`StepContext`: the training loss of ``student`` on the step's batch,
    against the step's teacher outputs where they still apply (:func:`forward_losses`), what a per-step
    search (SoKD) differentiates.

    It runs in float32 whatever ``--amp`` is: autocast off, and the step's teacher outputs (half precision
    under autocast, which float32 layers refuse as input) lifted to float32. Float32 rather than the step's
    autocast because SoKD's unrolled search takes a finite difference of this objective between parameters
    shifted by ``fd_radius`` in norm, spread over every parameter: per weight a shift far below 1% of its
    value, under bf16's resolution (8 significant bits, 0.4%) and near fp16's (11 bits, 0.05%).

    Building it computes nothing: the engine hands one to every ``after_step`` hook, most of which never call
    it, and only a search step (SoKD's ``search_iters``) evaluates it; the float32 copy is made on the first
    evaluation."""
    lifted_teacher_out = functools.cache(lambda: tree_at_least_float32(teacher_out))

    def objective(batch: dict) -> torch.Tensor:
        with torch.autocast(next(student.parameters()).device.type, enabled=False):
            losses, _, _ = forward_losses(student, teacher, distiller, bind, batch, task_loss_weight,
                                          lifted_teacher_out())
        return sum(losses.values())
    return objective


def _average_gradients(params, runtime: Runtime) -> None:
    if runtime.world_size == 1:
        return
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= runtime.world_size


def synchronise_batchnorm(student: nn.Module, distiller: Distiller | None, runtime: Runtime,
                          sync_student: bool = True) -> nn.Module:
    """For a CUDA DDP run, the student (returned; only if ``sync_student``, the recipe's ``sync_bn``) and the
    distiller's ``sync_batchnorm_modules()`` with every BatchNorm converted to SyncBatchNorm, the one place
    where this happens; otherwise unchanged. The conversion keeps parameter and buffer tensors, so optimizers
    and hooks holding them stay valid."""
    if runtime.device.type != "cuda" or runtime.world_size == 1:
        return student
    for module in distiller.sync_batchnorm_modules() if distiller is not None else []:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"{type(distiller).__name__}.sync_batchnorm_modules(): return the modules holding "
                             "BatchNorm layers, not a BatchNorm itself (it is replaced inside its parent)")
        nn.SyncBatchNorm.convert_sync_batchnorm(module)  # converts the BatchNorm children in place
    return nn.SyncBatchNorm.convert_sync_batchnorm(student) if sync_student else student


def backward(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor, average=None,
             grad_clip: float | None = None) -> torch.Tensor:
    """Backpropagate ``loss`` into the freshly zeroed gradients of ``optimizer``'s parameters, ``average()`` them
    (DDP averaging outside DDP), unscale them and clip their global norm to ``grad_clip``. Returns that norm
    (before clipping; 0 without gradients) as a tensor left on the device: the caller reads it together with
    the step's other values (:func:`update`)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if average is not None:
        average()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return loss.detach().new_zeros((), dtype=torch.float32)
    if grad_clip:
        return nn.utils.clip_grad_norm_(params, grad_clip)
    return nn.utils.get_total_norm(grads)


def check_gradient(scaler: torch.amp.GradScaler, gradient_norm: float, iteration: int, name: str) -> None:
    """Stop with FloatingPointError on a non-finite gradient norm (read on the host) that no enabled ``scaler``
    (fp16) will handle by skipping the step."""
    if not math.isfinite(gradient_norm) and not scaler.is_enabled():
        raise FloatingPointError(f"non-finite gradient of the {name} loss at iteration {iteration} (finite loss, "
                                 f"gradient norm {gradient_norm}); no GradScaler runs outside --amp fp16, so "
                                 "stopping before the update (the last checkpoint is left untouched)")


def update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, gradient_norm: float) -> None:
    """Step ``optimizer`` after :func:`backward` and :func:`check_gradient`, given the gradient norm read on the
    host. A non-finite norm under an enabled ``scaler`` skips the step and lowers the scale: what
    ``GradScaler.step`` decides from its own inf flag, without a second read from the device."""
    if math.isfinite(gradient_norm):
        optimizer.step()
    scaler.update()  # from the inf flags unscale_ left on the device: lowers the scale after an overflow


TEACHER_OUTPUT_LIMIT = 1e4  # |value| of a sane network's logits and features, far below fp16's 65504


def _named_tensors(outputs, prefix: str = ""):
    if torch.is_tensor(outputs):
        yield prefix, outputs
    elif isinstance(outputs, dict):
        for key, value in outputs.items():
            yield from _named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(outputs, (list, tuple)):
        for index, value in enumerate(outputs):
            yield from _named_tensors(value, f"{prefix}[{index}]")


def check_teacher_outputs(teacher_out: dict, teacher_ckpt: str) -> None:
    """Stop with one line naming the teacher checkpoint when its outputs on the first batch are not finite
    or beyond ``TEACHER_OUTPUT_LIMIT`` (a diverged teacher, e.g. BatchNorm statistics of a run at a tiny
    batch), before the distillation losses turn it into an anonymous non-finite loss."""
    named = [(name, tensor) for name, tensor in _named_tensors(teacher_out)
             if tensor.is_floating_point() and tensor.numel() > 0]
    if not named:
        return
    # one read from the device for all outputs (this runs on the first batch only)
    maxima = torch.stack([tensor.detach().abs().amax().float() for _, tensor in named]).tolist()
    for (name, _), largest in zip(named, maxima):
        if not math.isfinite(largest) or largest > TEACHER_OUTPUT_LIMIT:
            raise ValueError(f"--teacher-ckpt {teacher_ckpt}: the teacher's output {name} reaches |x| = {largest:.3g} "
                             f"on the first batch (expected finite, <= {TEACHER_OUTPUT_LIMIT:g}): the teacher "
                             "diverged; retrain it (check its BatchNorm statistics and batch size)")


def _check_finite(losses: dict, iteration: int) -> None:
    """Stop on a non-finite one of the step's loss values (floats, read from the device)."""
    bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
    if bad:
        raise FloatingPointError(f"non-finite loss at iteration {iteration}: {bad}; stopping before the "
                                 "update (the last checkpoint is left untouched)")


def train(recipe: "Recipe", out_dir: str, runtime: Runtime, resume: bool = False,
          teacher_ckpt: str | None = None, workers: int = 2, data_root: str | None = None,
          quiet: bool = False, explicit_fields: frozenset = frozenset()) -> dict:
    """Train ``recipe.student`` (distilled by ``recipe.method`` from ``recipe.teacher`` when the method
    needs one); returns the final evaluation metrics, also written to ``<out_dir>/metrics.json``.
    ``explicit_fields``: the recipe fields the command line set (see :meth:`TrainingRun.__init__`)."""
    run = TrainingRun(recipe, out_dir, runtime, resume, teacher_ckpt, workers, data_root, quiet, explicit_fields)
    run.restore()
    run.check_teacher()  # before start(): a refused teacher leaves the output folder as it was
    run.start()
    with PreemptionGuard() as guard:
        while run.iteration < run.recipe.iters:
            run.begin_epoch()
            tick = time.perf_counter()
            for batch in run.loader:
                batch = run.train_set.prepare_batch(move_to(batch, runtime.device))
                step = run.train_step(batch, data_seconds=time.perf_counter() - tick,
                                      stop_flag=guard.agreed_flag(runtime))
                run.extra_step(step)
                run.step_hooks(batch, step)
                run.iteration += 1
                run.log(step, seconds=time.perf_counter() - tick)
                run.evaluate_if_due()
                if run.checkpoint(stop_signal=guard.requested(step.values.stop_signal)):
                    break
                tick = time.perf_counter()
    return run.finish()


@dataclass
class StepValues:
    """The iteration's one read from the device (:func:`read_step_values`): every named loss (the task's and the
    distiller's, weighted; the extra optimizer's apart), the student objective ``total``, the gradient norm of
    each optimizer (``extra_norm`` None without an extra optimizer) and, under DDP, the stop request agreed by
    all ranks (``stop_signal``; None in a single process, whose request is on the host)."""
    losses: dict[str, float]
    extra: dict[str, float]
    total: float
    student_norm: float
    extra_norm: float | None
    stop_signal: int | None


def read_step_values(losses: dict, extra: dict, total: torch.Tensor, student_norm: torch.Tensor,
                     extra_norm: torch.Tensor | None, stop_flag: torch.Tensor | None) -> StepValues:
    """The step's scalars on the device, stacked and read at once: one ``.tolist()``, the iteration's only wait
    for the device."""
    optional = [tensor for tensor in (extra_norm, stop_flag) if tensor is not None]
    scalars = [*losses.values(), *extra.values(), total, student_norm, *optional]
    values = iter(torch.stack([value.detach().float().reshape(()) for value in scalars]).tolist())
    return StepValues(losses={name: next(values) for name in losses}, extra={name: next(values) for name in extra},
                      total=next(values), student_norm=next(values),
                      extra_norm=None if extra_norm is None else next(values),
                      stop_signal=None if stop_flag is None else int(next(values)))


@dataclass
class Step:
    """One iteration's results: its :class:`StepValues`, the teacher outputs (which the step hook's objective
    reuses), the lr factor and the time spent waiting for the data."""
    values: StepValues
    teacher_out: dict | None
    lr_factor: float
    data_seconds: float


class TrainingRun:
    """The state of one training run and its named steps; :func:`train` is the loop over them.

    Building checks the recipe and every input file before the (slow) data set is read, then builds the
    models, the data, the distiller and the optimizers; :meth:`restore` loads a ``--resume`` checkpoint.
    On resume, the fields the checkpoint predates take their defaults unless ``explicit_fields`` (set by
    flags) holds them; an explicit value the checkpoint was not trained with is then refused.
    """

    def __init__(self, recipe: "Recipe", out_dir: str, runtime: Runtime, resume: bool,
                 teacher_ckpt: str | None, workers: int, data_root: str | None, quiet: bool,
                 explicit_fields: frozenset = frozenset()):
        self.task, self.method = tasks.TASKS[recipe.task], methods.METHODS[recipe.method]
        methods.check_recipe(recipe)
        check_schedule(recipe)
        self.out_dir, self.runtime, self.workers, self.quiet = out_dir, runtime, workers, quiet
        self.teacher_ckpt = teacher_ckpt
        self.ckpt_path = os.path.join(out_dir, "last.pt")
        self.log_file = JsonlLog(os.path.join(out_dir, "log.jsonl"), runtime.is_main)
        self.resume_state = load_checkpoint(self.ckpt_path) if resume else None
        if resume:
            recipe, reset = resumed_recipe(self.resume_state["recipe"], recipe, explicit_fields)
            if reset and runtime.is_main:
                print(f"--resume: {self.ckpt_path} predates the recipe fields {reset}; the run continues with "
                      "their defaults, as it was trained")
        changed = recipe_changes(self.resume_state["recipe"], recipe) if resume else []
        if changed:
            raise ValueError(f"--resume: the recipe differs from the one in {self.ckpt_path} in {changed}")
        self._build_models(recipe, teacher_ckpt)
        self._build_data(recipe, data_root)
        self._build_distiller_and_optimizers()
        self.iteration = 0
        self.best = None  # {"iteration", main metric} of the best evaluation so far (keep_best)

    def _build_models(self, recipe, teacher_ckpt) -> None:
        runtime, task = self.runtime, self.task
        init_student = recipe.student_init is not None and self.resume_state is None  # a resumed run has its own weights
        if init_student and not os.path.isfile(recipe.student_init):  # checked before the (slow) data set is read
            raise FileNotFoundError(f"student_init {recipe.student_init}: no such file; the recipe starts {recipe.student} "
                                    "from a trained checkpoint of it: train one with train.py and pass its last.pt (or a "
                                    "state dict) with --student-init PATH")
        torch.manual_seed(recipe.seed)
        # The models and their weight files come first, so a wrong file stops the run before the data set is
        # read; building the data draws nothing from the global torch RNG, so the initial weights are the same.
        self.student = task.build_model(recipe, recipe.student, pretrained=recipe.pretrained)
        if init_student:
            convert.load_weights(self.student, recipe.student_init, f"student_init {recipe.student_init}")
        self.student.to(runtime.device)
        self.teacher = None
        if self.method.needs_teacher:
            self.teacher = task.build_model(recipe, recipe.teacher, pretrained=None)
            if teacher_ckpt is None:
                raise ValueError(f"--method {recipe.method} needs a teacher: pass --teacher-ckpt PATH "
                                 f"(a {recipe.teacher} checkpoint)")
            convert.load_weights(self.teacher, teacher_ckpt, f"--teacher-ckpt {teacher_ckpt}")
            self.teacher.to(runtime.device).eval().requires_grad_(False)

    def _build_data(self, recipe, data_root) -> None:
        runtime = self.runtime
        self.train_set, self.collate = self.task.build_data(recipe, "train", data_root)
        self.val_set, _ = self.task.build_data(recipe, "val", data_root)
        self.per_rank_batch = recipe.batch_size // runtime.world_size
        if self.per_rank_batch * runtime.world_size != recipe.batch_size or self.per_rank_batch == 0:
            raise ValueError(f"--batch-size {recipe.batch_size} must be a positive multiple of the number "
                             f"of processes ({runtime.world_size})")
        self.augmented = EpochAugmentation(self.train_set, recipe.seed, recipe.dataset_repeat)
        self.sampler = build_train_sampler(recipe, self.augmented, runtime, self.per_rank_batch)
        if len(self.sampler) < self.per_rank_batch:
            raise ValueError(f"training set has {len(self.train_set)} samples: fewer than one batch of "
                             f"{recipe.batch_size} over {runtime.world_size} process(es)")
        self.loader = DataLoader(self.augmented, batch_size=self.per_rank_batch, sampler=self.sampler,
                                 num_workers=self.workers, collate_fn=self.collate, drop_last=True,
                                 persistent_workers=False, pin_memory=runtime.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(recipe.seed))
        self.iters_per_epoch = len(self.sampler) // self.per_rank_batch
        self.recipe_record = dataclasses.asdict(recipe)  # checkpoints keep the recipe as given (epochs stay epochs)
        self.recipe = resolve_schedule(recipe, self.iters_per_epoch)
        self.epochs = math.ceil(self.recipe.iters / self.iters_per_epoch)

    def _build_distiller_and_optimizers(self) -> None:
        runtime, recipe = self.runtime, self.recipe
        self.distiller = self.method.build(recipe, self.student, self.teacher) if self.method.build else None
        if self.distiller is not None:
            self.distiller.to(runtime.device)
        if runtime.device.type == "cuda":
            self.student.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        self.student = synchronise_batchnorm(self.student, self.distiller, runtime, recipe.sync_bn)
        self.optimizers = build_optimizers(recipe, self.student, self.distiller)
        self.bind = self.method.bind.get(recipe.task)
        extra = self.optimizers.extra
        self.extra_base_lrs = [g["lr"] for g in extra.param_groups] if extra else []
        self.scaler = runtime.grad_scaler()
        self.extra_scaler = runtime.grad_scaler()

    # ------------------------------------------------------------------------------------ restore
    def restore(self) -> None:
        """Load the ``--resume`` checkpoint (if any), then wrap the student in DDP for a distributed run."""
        state, runtime = self.resume_state, self.runtime
        self.start_iter = 0
        if state is not None:
            self.student.load_state_dict(state["model"])
            if self.distiller is not None:
                self.distiller.load_state_dict(state["distiller"])
            self.optimizers.student.load_state_dict(state["optimizer"])
            if self.optimizers.extra is not None:
                self.optimizers.extra.load_state_dict(state["extra_optimizer"])
            # a scaler state exists only after fp16; an fp16 run resumed from another precision keeps its fresh
            # scalers (their initial scale), and a disabled scaler ignores the state it is given
            if state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
                self.extra_scaler.load_state_dict(state["extra_scaler"])
            note = precision_change_note(state["precision"], runtime.precision, self.ckpt_path)
            if note and runtime.is_main:
                print(note)
            self.start_iter = state["iteration"]
            self.log_file.truncate(self.start_iter)
            self.best = state["best"]
            set_rng_state(state["rng"][min(runtime.rank, len(state["rng"]) - 1)])
            if runtime.is_main and not self.quiet:
                print(f"resumed from {self.ckpt_path} at iteration {self.start_iter}")
        self.iteration = self.start_iter
        self.model = self.student
        if runtime.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
                find_unused_parameters=self.task.find_unused_parameters)

    def start(self) -> None:
        """The output folder is made (not before: a run refused while it is built writes nothing); a fresh run
        replaces its previous outputs; the progress bar and the clock start."""
        os.makedirs(self.out_dir, exist_ok=True)
        if self.resume_state is None and self.runtime.is_main:
            discard_previous_run(self.out_dir)
        recipe = self.recipe
        self.bar = tqdm(total=recipe.iters, initial=self.start_iter, desc=f"train {recipe.student} [{recipe.method}]",
                        disable=not self.runtime.is_main or self.quiet, dynamic_ncols=True)
        self.started = time.perf_counter()

    # -------------------------------------------------------------------------------- the steps
    def check_teacher(self) -> None:
        """:func:`check_teacher_outputs` on the run's first batch (the one its first iteration trains on),
        before anything long runs: the first epoch hook (GKD's prototype pass over the training set) would
        otherwise go through a diverged teacher before the run names it. The batch is read here on its own
        (every augmentation draw comes from its sample's generator, and the device step draws nothing, so the
        loop then reads the same batch). A two-stage teacher's RoI head is not run here (it scores the
        student's RoIs, which do not exist yet): its backbone, neck and RPN outputs are checked. Under DDP every
        rank checks its own batch and all stop if one fails."""
        if self.teacher is None or self.iteration >= self.recipe.iters:   # a finished run resumed trains no batch
            return
        epoch, offset = divmod(self.iteration, self.iters_per_epoch)
        self.augmented.epoch = epoch
        self.sampler.set_epoch(epoch)
        start = offset * self.per_rank_batch
        indices = self.sampler.epoch_indices()[start:start + self.per_rank_batch]
        batch = self.collate([self.augmented[index] for index in indices])
        batch = self.train_set.prepare_batch(move_to(batch, self.runtime.device))
        with self.runtime.autocast():
            teacher_out = teacher_forward(self.teacher, batch, {})
        check_on_every_rank(self.runtime, lambda: check_teacher_outputs(teacher_out, self.teacher_ckpt),
                            hint="the teacher's outputs on that rank's first batch")

    def begin_epoch(self) -> None:
        """Position the data at the current iteration; at an epoch's start, the distiller's epoch hook."""
        self.epoch, offset = divmod(self.iteration, self.iters_per_epoch)
        self.augmented.epoch = self.epoch
        self.sampler.set_position(self.epoch, offset * self.per_rank_batch)
        if offset == 0 and self.distiller is not None:
            self.distiller.before_epoch(EpochContext(self.epoch, unwrap(self.model), self.teacher, self.train_set,
                                                     self.collate, self.runtime, self.epochs))
        self.model.train()

    def train_step(self, batch: dict, data_seconds: float, stop_flag: torch.Tensor | None = None) -> Step:
        """Forward (task, distiller and extra losses), backward of the student's and the extra objective, the
        iteration's one read from the device (every loss and gradient norm, stacked: the finiteness checks
        and the logged values), then the student's update.

        The extra objective's backward comes before the student's update although its step follows it: its
        graph holds only the distiller's extra parameters and detached inputs, which the student's update does
        not change, so its gradients are the same, and both norms travel in the one read, as does the DDP
        stop request ``stop_flag`` (:meth:`PreemptionGuard.agreed_flag`)."""
        recipe, runtime, optimizers = self.recipe, self.runtime, self.optimizers
        factor = lr_factor(self.iteration, recipe)
        set_lr(optimizers.student, recipe.lr, factor)
        first = self.iteration == self.start_iter
        watch = BatchNormWatch([unwrap(self.model), self.distiller], runtime.world_size) if first else None
        with runtime.autocast():
            losses, teacher_out, bound = forward_losses(self.model, self.teacher, self.distiller, self.bind, batch,
                                                        recipe.task_loss_weight)
            extra = self.distiller.extra_losses(**bound) if optimizers.extra is not None else {}
        if first:
            watch.close(warn=runtime.is_main)
        losses = {name: value.float() for name, value in losses.items()}
        extra = {name: value.float() for name, value in extra.items()}
        total = sum(losses.values())
        student_norm = backward(optimizers.student, self.scaler, total,
                                lambda: _average_gradients(optimizers.distiller_params, runtime), recipe.grad_clip)
        extra_norm = None
        if optimizers.extra is not None:
            extra_norm = backward(optimizers.extra, self.extra_scaler, sum(extra.values()),
                                  lambda: _average_gradients(optimizers.extra_params, runtime))
        values = read_step_values(losses, extra, total, student_norm, extra_norm, stop_flag)
        _check_finite({**values.losses, **values.extra}, self.iteration)
        check_gradient(self.scaler, values.student_norm, self.iteration, "student")
        if values.extra_norm is not None:
            check_gradient(self.extra_scaler, values.extra_norm, self.iteration, "extra")
        update(optimizers.student, self.scaler, values.student_norm)
        return Step(values, teacher_out, factor, data_seconds)

    def extra_step(self, step: Step) -> None:
        """The update of the distiller's own optimizer (an adversary) from the gradients of its extra losses
        (:meth:`train_step`)."""
        optimizers = self.optimizers
        if optimizers.extra is None:
            return
        for group, base in zip(optimizers.extra.param_groups, self.extra_base_lrs):
            group["lr"] = base * optimizers.extra_lr_lambda(self.iteration)
        update(optimizers.extra, self.extra_scaler, step.values.extra_norm)

    def step_hooks(self, batch: dict, step: Step) -> None:
        """The distiller's ``after_step`` hook, with the objective at the updated parameters (:func:`search_objective`,
        which computes nothing until the hook calls it)."""
        if self.distiller is None:
            return
        student = unwrap(self.model)
        objective = search_objective(student, self.teacher, self.distiller, self.bind, step.teacher_out,
                                     self.recipe.task_loss_weight)
        self.distiller.after_step(StepContext(self.iteration, batch, student, self.teacher, objective, self.runtime))

    def log(self, step: Step, seconds: float) -> None:
        """The step's line of ``log.jsonl`` (every loss, the extra optimizer's after the others), the progress
        bar, and once the measured time per iteration."""
        recipe, runtime, iteration = self.recipe, self.runtime, self.iteration
        if iteration - self.start_iter == ETA_AFTER and iteration < recipe.iters and runtime.is_main and not self.quiet:
            rate = (time.perf_counter() - self.started) / ETA_AFTER
            self.bar.write(f"train {recipe.student} [{recipe.method}]: {rate:.2f} s/it over the first {ETA_AFTER} "
                           f"iterations, about {rate * (recipe.iters - iteration) / 60:.1f} min for the "
                           f"{recipe.iters - iteration} left (evaluations not included)")
        if runtime.is_main:
            lr, values = recipe.lr * step.lr_factor, step.values
            self.log_file.write({"iteration": iteration, "epoch": self.epoch, "lr": lr,
                                 **{k: round(v, 6) for k, v in {**values.losses, **values.extra}.items()},
                                 "loss": round(values.total, 6), "seconds": round(seconds, 4),
                                 "data_seconds": round(step.data_seconds, 4),
                                 "peak_memory_mb": round(peak_memory_mb(runtime.device), 1)})
            self.bar.set_postfix(loss=f"{values.total:.3f}", lr=f"{lr:.2e}")
            self.bar.update(1)

    def evaluate(self) -> dict:
        """Score the student on the validation set; with ``keep_best``, a new best also goes to ``best.pt``."""
        metrics = evaluate(self.task, unwrap(self.model), self.val_set, self.collate, self.runtime, self.recipe,
                           self.workers, self.quiet)
        self.log_file.write({"iteration": self.iteration, "eval": metrics})
        main, recipe = self.task.main_metric, self.recipe
        score = metrics[main]
        competes = recipe.keep_best and (not recipe.eval_at or self.iteration in recipe.eval_at)
        if competes and (self.best is None or score > self.best[main]):  # NaN is never best
            self.best = {"iteration": self.iteration, main: score}
            self.save(os.path.join(self.out_dir, "best.pt"))
            self.log_file.write({"iteration": self.iteration, "best": self.best})
        return metrics

    def evaluate_if_due(self) -> None:
        every = self.recipe.eval_every
        due = every and self.iteration % every == 0 or self.iteration in self.recipe.eval_at
        if due and self.iteration != self.recipe.iters:
            self.evaluate()
            self.model.train()

    def checkpoint(self, stop_signal: int) -> bool:
        """Save at the end, when asked to stop, or every ``ckpt_every``; raise :class:`TrainingInterrupted`
        after a stop request. True after the last iteration."""
        last = self.iteration == self.recipe.iters
        every = self.recipe.ckpt_every
        if last or stop_signal or (every and self.iteration % every == 0):
            self.save()
        if stop_signal:
            self.bar.close()
            raise TrainingInterrupted(stop_signal, self.iteration, self.ckpt_path)
        return last

    def save(self, path: str | None = None) -> None:
        runtime, optimizers = self.runtime, self.optimizers
        rngs = [rng_state()]
        if runtime.world_size > 1:
            rngs = [None] * runtime.world_size
            dist.all_gather_object(rngs, rng_state())
        if runtime.is_main:
            atomic_save({
                "format_version": convert.CHECKPOINT_FORMAT_VERSION,
                "model": unwrap(self.model).state_dict(),
                "distiller": self.distiller.state_dict() if self.distiller else None,
                "optimizer": optimizers.student.state_dict(),
                "extra_optimizer": optimizers.extra.state_dict() if optimizers.extra else None,
                "scaler": self.scaler.state_dict(), "extra_scaler": self.extra_scaler.state_dict(),
                "precision": runtime.precision,
                "iteration": self.iteration, "recipe": self.recipe_record, "rng": rngs, "best": self.best,
            }, path or self.ckpt_path)

    def finish(self) -> dict:
        """The final evaluation, written to ``metrics.json`` (with the best one under ``keep_best``)."""
        self.bar.close()
        metrics = self.evaluate()
        if self.recipe.keep_best:
            metrics = {**metrics, "best": self.best}
        if self.runtime.is_main:
            write_json(os.path.join(self.out_dir, "metrics.json"), metrics)
        return metrics


RUN_OUTPUTS = ("log.jsonl", "metrics.json", "best.pt")  # last.pt is replaced atomically by the first save


def discard_previous_run(out_dir: str) -> None:
    """A fresh run in a folder that held one (train.py asks for --overwrite first) starts a new history: the old
    log, scores and best checkpoint go once everything is built and the data read, just before the first step,
    so a run refused during setup leaves the folder as it was."""
    for name in RUN_OUTPUTS:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)


def move_to(batch, device: torch.device):
    """Move every tensor of a (nested) batch to ``device``. The data set's ``prepare_batch`` then runs the
    device half of its pipeline (kd_ref.datasets)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def shard_indices(length: int, runtime: Runtime) -> list:
    """Evaluation shard of this rank: every sample exactly once over all ranks (no padding)."""
    return list(range(runtime.rank, length, runtime.world_size))


@torch.no_grad()
def evaluate(task, model: nn.Module, dataset, collate, runtime: Runtime, recipe, workers: int = 2,
             quiet: bool = False, save_pred: str | None = None) -> dict:
    """Run ``model`` over this rank's shard of ``dataset`` and reduce the task's metrics over ranks."""
    model.eval()
    shard = torch.utils.data.Subset(dataset, shard_indices(len(dataset), runtime))
    loader = DataLoader(shard, batch_size=1, num_workers=workers, collate_fn=collate)
    state = task.new_eval_state(recipe)
    for batch in tqdm(loader, desc="eval", disable=not runtime.is_main or quiet, dynamic_ncols=True, leave=False):
        batch = dataset.prepare_batch(move_to(batch, runtime.device))
        with runtime.autocast():
            out = model(batch["images"], image_sizes=batch.get("image_sizes"))
        task.update_eval_state(state, out, batch, save_pred)
    return task.finish_eval_state(state, runtime)

