"""FLOPs and estimated GPU-hours of a preset's training run.

    python -m kd_ref.bench_flops --preset NAME [NAME ...] [--peak-tflops 125] [--utilisation 0.25]
                                 [--set FIELD=VALUE ...]

Counts the FLOPs of one training iteration of each preset at its input size and total batch (student
forward and backward, teacher forward, distiller, extra optimizer step, per-step hook) with
torch.utils.flop_counter (:func:`iteration_flops`), multiplies by the run's iterations (epochs from the
reference training-set sizes, REFERENCE_TRAIN_SIZES), adds a per-epoch pass (GKD's prototypes) and
converts to GPU-hours at a stated sustained throughput. Segmentation and classification steps run on fake
tensors (no compute, no weights); detection and instance-segmentation steps, which size tensors by their
values, are computed on CPU on one probe image of the data set's reference size, with random weights, and
counted per image x the batch. Nothing is timed: the figures are counts, the same on every machine.

Reading the output: one Markdown table, a row per preset: what was counted (``probe``), TFLOPs per
iteration with its parts, the iterations, the per-epoch pass, the run's PFLOPs and GPU-hours; under it
the formula (FLOPS_FORMULA) and, when a detection or instance-segmentation preset is in the table, how
its probe was made (PROBE_FORMULA). GPU-hours scale with ``--peak-tflops`` x ``--utilisation``, an
assumption; the FLOPs ratios between presets do not depend on it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kd_ref import engine
from kd_ref.bench_common import print_table
from kd_ref.distiller import EpochContext, StepContext, uses_hook
from kd_ref.methods import METHODS
from kd_ref.presets import PRESETS
from kd_ref.recipe import Recipe, parse_overrides, resolve_schedule
from kd_ref.runtime import Runtime
from kd_ref.tasks import TASKS


# Training-set sizes of the references' data sets, in images per epoch before mmdet's RepeatDataset:
# Cityscapes train 2975; COCO train2017 117,266 (118,287 minus the images without usable boxes that
# mmdet's filter_empty_gt drops); VOC 07+12 trainval 16,551; CIFAR-100 train 50,000; ImageNet-1k train
# 1,281,167.
REFERENCE_TRAIN_SIZES = {"cityscapes": 2975, "coco": 117_266, "voc": 16_551, "cifar100": 50_000,
                         "imagenet": 1_281_167}
# Assumed sustained throughput of one GPU: a V100's fp16 tensor-core peak (125 TFLOP/s) at 25 %
# utilisation, our assumption for convolutional training with AMP; both are flags of the command.
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

    With the calibration the probe keeps the RPN's training-time proposals and the sampler's RoIs, as in
    training (``probe`` says how many RoIs the student sampled; docs/design/benchmarks.md: what was
    checked). Only the RoI count changes a detector's FLOPs: NMS, anchor matching and RoIAlign are not
    counted (flop_counter counts convolutions and matrix products).

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
    runtime = Runtime(torch.device("cpu"))
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
        if uses_hook(distiller, "before_epoch"):
            context = EpochContext(0, student, teacher, dataset, collate, runtime, epochs=2)
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
        if distiller is not None and engine.build_optimizers(recipe, student, distiller).extra is not None:
            _, parts["extra step"] = counted(lambda: sum(distiller.extra_losses(**bound).values()).backward())
        if uses_hook(distiller, "after_step"):
            objective = engine.search_objective(student, teacher, distiller, method.bind[recipe.task], teacher_out,
                                                recipe.task_loss_weight)
            context = StepContext(0, batch, student, teacher, objective, runtime)
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
    """Iterations that run the per-step hook: SoKD searches for its first ``search_iters`` (None: all),
    every other hook in every iteration."""
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_ref.bench_flops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", required=True, metavar="NAME")
    parser.add_argument("--peak-tflops", type=float, default=V100_FP16_PEAK_TFLOPS,
                        help="peak throughput of one GPU (default: V100 fp16 tensor cores)")
    parser.add_argument("--utilisation", type=float, default=ASSUMED_UTILISATION,
                        help="sustained fraction of the peak (default: our assumption)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe override for every preset, as in train.py")
    args = parser.parse_args(argv)
    try:
        flops(args.preset, args.peak_tflops, args.utilisation, parse_overrides(args.overrides))
    except ValueError as err:  # an unknown preset or --set field, a task it cannot count
        parser.error(str(err))


if __name__ == "__main__":
    main()
