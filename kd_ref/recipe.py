"""What a run is, with no torch import: the :class:`Recipe` type, the checks and conversions that read
only a recipe (schedule, ImageNet weights file, ``--set`` overrides, the digest and the fields a resumed
run may change), and :func:`register`, with which the preset modules (``kd_ref/presets_*.py``) add a
paper row and its baseline twin. ``kd_ref.tasks`` and ``kd_ref.methods`` hold the registries that build models and
distillers; the command-line tools read presets through this module alone, so listing them or naming an
unknown one answers before torch is imported."""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field


@dataclass
class Recipe:
    """Everything a run needs besides the data root and the machine."""
    task: str = "seg"
    method: str = "none"
    data: str = "synthetic"
    student: str = "pspnet_r18"
    teacher: str | None = None
    flavour: str = "cirkd"           # model/backbone family of the reference tables (segmentors)
    num_classes: int = 19
    # ImageNet weights the student backbone starts from: a local file (PRETRAINED_WEIGHTS names the file each
    # preset expects, its layout and where the reference gets it); None: from scratch
    pretrained: str | None = None
    # data
    crop: tuple = (512, 1024)
    scales: tuple = (0.5, 2.0)       # random rescale range
    scale_step: float | None = 0.1   # 0.5 + k/10 as CIRKD/SKD; None = continuous as mmseg
    cat_max_ratio: float | None = None  # mmseg re-draws crops dominated by one class (0.75)
    photometric_distortion: bool = False  # mmseg PhotoMetricDistortion after the flip (transforms.py)
    normalization: str = "bgr_mean"  # "bgr_mean" (CIRKD/SKD) or "imagenet_rgb" (mmseg, torchvision)
    synthetic_size: tuple = (128, 128)
    synthetic_train: int = 2000
    synthetic_val: int = 100
    synthetic_style: str = "standard"  # SyntheticScenes.STYLES
    # seed the scenes are drawn from; None: the recipe's ``seed``, which then varies the data set along with
    # the initial weights and the data order
    synthetic_seed: int | None = None
    # a trained checkpoint of the student architecture to start from (a train.py last.pt or a plain state
    # dict); GKD's released configs start from the trained baseline detector
    student_init: str | None = None
    image_scale: tuple = (1333, 800)  # det: keep-ratio resize bounds (long side, short side), mmdet img_scale
    # det multi-scale training (mmdet 2.x Resize img_scale list): () trains at image_scale; 'value' picks one
    # pair per sample, 'range' draws long and short side between two pairs. Evaluation stays at image_scale.
    train_image_scales: tuple = ()
    multiscale_mode: str = "value"
    rcnn_rois_per_image: int = 512   # det, Faster R-CNN: RoIs sampled per training image (mmdet 512)
    classes: tuple | None = None     # det, VOC layout: the tree's class names (None: the 20 VOC classes)
    # det: per-GPU batches of one aspect group (w/h > 1), each group padded to whole batches by repeating
    # its images (mmdet GroupSampler); False: plain shuffling, the last partial batch dropped
    group_by_aspect: bool = False
    # under CUDA DDP, the student's BatchNorm becomes SyncBatchNorm; False keeps per-GPU BatchNorm, as the
    # classification references (DIST_KD, mdistiller) and VNL's DataParallel depth training do
    sync_bn: bool = True
    # optimisation
    batch_size: int = 16             # total over all processes
    iters: int | None = 40000        # None when ``epochs`` counts the schedule
    # epoch-based references (mmdet EpochBasedRunner): the run is ``epochs`` passes over the training set
    # (repeated ``dataset_repeat`` times, mmdet RepeatDataset), ``lr_steps`` and ``eval_every`` count epochs,
    # and the iterations follow from the set's length at run time (resolve_schedule)
    epochs: int | None = None
    dataset_repeat: int = 1
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "poly"
    poly_power: float = 0.9
    min_lr: float = 0.0
    lr_steps: tuple = ()
    warmup_iters: int = 0
    warmup_ratio: float = 0.001
    grad_clip: float | None = None
    # --- launch geometry and optimiser parameter groups. ``gpus``: the number of processes the
    # reference ran (its torchrun/dist_train count; ``batch_size`` stays the total over them), None for recipes
    # without a reference launch (the synthetic demos); a run on another count is told which per-process terms
    # that changes (process_count_note). The rest as torchvision's classification references name them: SGD
    # with Nesterov momentum; the weight decay of normalisation-layer parameters and of biases (None: the
    # recipe's weight_decay); a factor on the learning rate of biases (maskrcnn-benchmark SOLVER.BIAS_LR_FACTOR).
    gpus: int | None = None
    nesterov: bool = False
    norm_weight_decay: float | None = None
    bias_weight_decay: float | None = None
    bias_lr_factor: float = 1.0
    # weight of the model's own (task) losses in the objective: mdistiller's CIFAR KD is 0.1 CE + 0.9 KD
    task_loss_weight: float = 1.0
    # bookkeeping
    eval_every: int = 0
    keep_best: bool = False          # keep best.pt by the task's main metric over the evaluations
    # iterations (updates done, in epoch-based recipes too) at which the student is also evaluated; with
    # keep_best only these evaluations compete for best.pt (SKD's code scores snapshots at fixed steps)
    eval_at: tuple = ()
    ckpt_every: int = 1000           # iterations, also in epoch-based recipes
    seed: int = 0
    method_options: dict = field(default_factory=dict)
    # keyword options of the model builders, shared by student and teacher: DepthNet's bins, range, focal
    # and loss weight (depth), FCOS's options (det, FCOS only); empty = the builders' defaults
    model_options: dict = field(default_factory=dict)
    teacher_preset: str | None = None  # recipe that trains the teacher on synthetic data
    source: str = ""                 # the reference config(s) the preset mirrors; documentation only


def _field_default(name: str):
    spec = next(f for f in dataclasses.fields(Recipe) if f.name == name)
    return spec.default if spec.default_factory is dataclasses.MISSING else spec.default_factory()


# Fields that document a recipe without changing the run: a resumed run may differ in them.
# ``gpus`` only says how the reference launched the run (a different process count is reported, not refused).
DOCUMENTATION_FIELDS = ("source", "gpus")


def resumed_recipe(stored: dict, recipe: Recipe, explicit: frozenset = frozenset()) -> tuple:
    """The recipe a resumed run continues, and the fields it reset: a field the checkpoint's stored recipe
    lacks was added after the checkpoint was written, so the run goes on with that field's default, which
    reproduces the behaviour of the code that wrote it, even where a preset now sets it otherwise (e.g. the
    mmdet rows' ``group_by_aspect``). A field in ``explicit`` (set by a flag of this command) is kept as
    given, so that :func:`recipe_changes` reports it when it differs from what the checkpoint was trained with."""
    reset = {spec.name: _field_default(spec.name) for spec in dataclasses.fields(Recipe)
             if spec.name not in stored and spec.name not in DOCUMENTATION_FIELDS and spec.name not in explicit
             and getattr(recipe, spec.name) != _field_default(spec.name)}
    return dataclasses.replace(recipe, **reset), sorted(reset)


def recipe_changes(stored: dict, recipe: Recipe) -> list:
    """Fields in which ``recipe`` differs from a checkpoint's stored recipe (a dict). A field the stored
    recipe lacks was added after the checkpoint was written and counts as its default, which reproduces
    the behaviour of the code that wrote it."""
    old = {spec.name: stored[spec.name] if spec.name in stored else _field_default(spec.name)
           for spec in dataclasses.fields(Recipe)}
    return [name for name, value in old.items() if name not in DOCUMENTATION_FIELDS and value != getattr(recipe, name)]


# Method options that an epoch-based recipe may count in epochs, and the option in iterations each becomes
# (resolve_schedule): SoKD's search length, which its reference counts in epochs (FabienCode/mdistiller
# DFKDTrainer searches while epoch <= DFKD.SERACH_EPOCH).
EPOCH_OPTIONS = {"search_epochs": "search_iters"}


def resolve_schedule(recipe: Recipe, iters_per_epoch: int) -> Recipe:
    """The recipe in iterations for a training set of ``iters_per_epoch`` iterations per epoch: an
    epoch-based recipe's ``iters`` = epochs x iterations per epoch, its ``lr_steps``, ``eval_every`` and the
    method options of ``EPOCH_OPTIONS`` times iterations per epoch (mmdet EpochBasedRunner: max_iters =
    max_epochs x len(data_loader), lr steps at epoch boundaries; CRD/mdistiller classification loops the
    same). An iteration-based recipe is returned unchanged."""
    if recipe.epochs is None:
        return recipe
    options = {EPOCH_OPTIONS.get(name, name): value * iters_per_epoch if name in EPOCH_OPTIONS else value
               for name, value in recipe.method_options.items()}
    return dataclasses.replace(recipe, epochs=None, iters=recipe.epochs * iters_per_epoch,
                               lr_steps=tuple(step * iters_per_epoch for step in recipe.lr_steps),
                               eval_every=recipe.eval_every * iters_per_epoch, method_options=options)


def check_schedule(recipe: Recipe) -> None:
    if (recipe.iters is None) == (recipe.epochs is None):
        raise ValueError(f"recipe: exactly one of iters ({recipe.iters}) and epochs ({recipe.epochs}) must be set")
    if (recipe.epochs or recipe.iters) < 1 or recipe.dataset_repeat < 1:
        raise ValueError(f"recipe: iters/epochs and dataset_repeat must be >= 1, got iters={recipe.iters}, "
                         f"epochs={recipe.epochs}, dataset_repeat={recipe.dataset_repeat}")
    for in_epochs, in_iters in EPOCH_OPTIONS.items():
        if in_epochs in recipe.method_options and (recipe.epochs is None or in_iters in recipe.method_options):
            raise ValueError(f"method_options {in_epochs}: counts epochs of an epoch-based recipe, in place of "
                             f"{in_iters} (the recipe has epochs={recipe.epochs}"
                             f"{', and ' + in_iters if in_iters in recipe.method_options else ''})")
    if recipe.keep_best and recipe.eval_every <= 0 and not recipe.eval_at:
        raise ValueError("--keep-best selects among the evaluations: it needs --eval-every N > 0 or "
                         f"--set eval_at=(N, ...) (the recipe has eval_every={recipe.eval_every})")
    if any(not 1 <= at <= (recipe.iters or at) for at in recipe.eval_at):
        raise ValueError(f"eval_at {tuple(recipe.eval_at)}: expected iterations in 1..{recipe.iters}")
    if recipe.gpus is not None and recipe.gpus < 1:
        raise ValueError(f"gpus {recipe.gpus}: expected the reference's process count, >= 1 (or None)")
    if recipe.nesterov and recipe.momentum <= 0:
        raise ValueError(f"nesterov: Nesterov SGD needs momentum > 0 (the recipe has momentum={recipe.momentum})")
    if recipe.bias_lr_factor <= 0:
        raise ValueError(f"bias_lr_factor {recipe.bias_lr_factor}: expected > 0")
    if recipe.synthetic_seed is not None and recipe.synthetic_seed < 0:
        raise ValueError(f"synthetic_seed {recipe.synthetic_seed}: expected a non-negative integer, or None (the "
                         "recipe's seed)")


# ImageNet weights the real-data presets start from: file -> (layout read by backbones.load_pretrained,
# where the reference gets it). Download the file and pass --pretrained PATH (or place it under this name
# in the working directory).
PRETRAINED_WEIGHTS = {
    **{f"resnet{depth}-imagenet.pth": (
        "CIRKD deep-stem ResNetV1b", "the 'Backbones pretrained on ImageNet' table of winycg/CIRKD's README "
        "(SKD's run_train_val.sh loads a file of this name too: --student-pretrain-model-imgnet)")
       for depth in (18, 101)},
    **{f"resnet{depth}_v1c.pth": (
        "mmcv ResNetV1c", f"mmcv's open-mmlab://resnet{depth}_v1c, which the mmseg configs name as pretrained")
       for depth in (18, 101)},
    **{name: ("torchvision", f"torchvision's ResNet-{name.split('-')[0][6:]} IMAGENET1K_V1 weights "
              f"(https://download.pytorch.org/models/{name}), mmdet 2.x torchvision://resnet{name.split('-')[0][6:]}")
       for name in ("resnet18-f37072fd.pth", "resnet50-0676ba61.pth", "resnet101-63fe2227.pth")},
    "mobilenet_v2-b0353104.pth": ("torchvision MobileNetV2", "torchvision's MobileNet_V2 IMAGENET1K_V1 weights "
                                  "(https://download.pytorch.org/models/mobilenet_v2-b0353104.pth)"),
}


def check_pretrained(recipe: Recipe) -> None:
    """A recipe that names ImageNet weights must find them: a run never silently starts a student the
    reference pre-trains from random weights. (``pretrained=None`` is from scratch, by the preset or by
    ``--pretrained none``.)"""
    if recipe.pretrained is None or os.path.isfile(recipe.pretrained):
        return
    name = os.path.basename(recipe.pretrained)
    layout, origin = PRETRAINED_WEIGHTS.get(name, ("any layout backbones.load_pretrained reads", "-"))
    raise FileNotFoundError(f"--pretrained {recipe.pretrained}: no such file; {recipe.student} starts from ImageNet "
                            f"weights {name} ({layout} layout; the reference gets them from {origin}): pass "
                            "--pretrained PATH, or --pretrained none to train from random weights")


def parse_overrides(items: list) -> dict:
    """``["iters=10", "crop=(64, 64)"]`` -> recipe fields, values read as Python literals."""
    fields = {f.name for f in dataclasses.fields(Recipe)}
    overrides = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {item}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        try:
            overrides[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[name] = text  # a bare word such as a model name
    return overrides


def recipe_digest(recipe: Recipe) -> str:
    """A short digest of every field of ``recipe``: equal recipes, equal digests."""
    text = json.dumps(dataclasses.asdict(recipe), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# Recipe fields that only a distillation config sets (the method, its options, the student's starting
# checkpoint, the down-weighted task loss next to a KD term): a baseline twin has their defaults.
DISTILLATION_FIELDS = ("method", "method_options", "student_init", "task_loss_weight")


def register(presets: dict, name: str, recipe: Recipe, baseline: "bool | Recipe" = True) -> None:
    """Add to ``presets`` the preset ``name`` and, for a distillation preset, its ``<name>_baseline`` twin:
    the recipe with the defaults of ``DISTILLATION_FIELDS`` (``--method none``), or, when the distillation
    config also changes the optimisation (e.g. adds gradient clipping), ``baseline`` given as the recipe
    that config extends. The twin keeps the teacher, for reference. ``False``: no twin."""
    presets[name] = recipe
    if baseline is not False and recipe.method != "none":
        twin = baseline if isinstance(baseline, Recipe) else recipe
        defaults = {key: _field_default(key) for key in DISTILLATION_FIELDS}
        presets[f"{name}_baseline"] = dataclasses.replace(twin, teacher=recipe.teacher, **defaults)


def register_demo(presets: dict, prefix: str, recipe: Recipe, method_options: dict, defaults: dict | None = None):
    """Add a synthetic demo's ``<prefix>_<method>`` presets, one per method of ``method_options`` ({method:
    its options}): ``recipe`` with that method, without twins (the demo's ``none`` row is the baseline).
    With ``defaults`` (a DEFAULT_PRESETS table), each becomes what ``--task/--method/--data`` of its
    recipe mean."""
    for method, options in method_options.items():
        name = f"{prefix}_{method}"
        register(presets, name, dataclasses.replace(recipe, method=method, method_options=options), baseline=False)
        if defaults is not None:
            defaults[(recipe.task, method, recipe.data)] = name


# ------------------------------------------------------------------------------------- launch geometry
# Terms of the objective computed over each process's share of the batch, by method (recipe.method) and by
# student family (the prefix of recipe.student): with N processes of B/N images, DDP averages N such terms,
# which is not the term over B images that the reference's own process count gave. Only terms whose value
# depends on how the batch is split are listed (a mean over images or pixels does not).
PER_PROCESS_TERMS = {
    "method": {
        "skd": "SKD's pixel-wise term under pi_normalize 'spatial' (the authors' code's: a sum over the process's "
               "images; N processes of B/N weigh it 1/N of one process of B; method_options "
               "pi_normalize='spatial_whole_batch' scales it so that any split equals one process of B)",
        "dist": "DIST's intra-class relation (a correlation over the samples of each process)",
    },
    "student": {
        "retinanet": "RetinaNet's focal and box losses (divided by the positive anchors of the process's images, "
                     "as mmdet 2.x)",
        "solo": "SOLO's mask and category losses (divided by the positives of the process's images, as mmdet 2.x)",
        "maskrcnn": "Mask R-CNN's mask loss (a mean over the process's positive RoIs, as mmdet 2.x)",
        "depth": "VNL's virtual-normal term (the easiest quarter of the triplets pooled over the process's images "
                 "is dropped)",
    },
    # sync_bn False: the student's BatchNorm normalises each process's batch (classification and depth references)
    "batchnorm": "the student's BatchNorm batch statistics (sync_bn False: per process, as in the reference)",
}


def per_process_terms(recipe: Recipe) -> list:
    """The descriptions of PER_PROCESS_TERMS that apply to ``recipe``. SKD's pixel-wise term is per process
    only when it is a sum over images (pi_normalize 'spatial', as in the authors' code)."""
    terms = []
    if recipe.method == "skd" and recipe.task == "seg":
        from kd_ref.skd import SKDDistiller  # imports torch: called once a run has started
        default = inspect.signature(SKDDistiller).parameters["pi_normalize"].default
        if recipe.method_options.get("pi_normalize", default) == "spatial":
            terms.append(PER_PROCESS_TERMS["method"]["skd"])
    if recipe.method == "dist":
        terms.append(PER_PROCESS_TERMS["method"]["dist"])
    terms += [text for family, text in PER_PROCESS_TERMS["student"].items() if recipe.student.startswith(family)]
    if not recipe.sync_bn:
        terms.append(PER_PROCESS_TERMS["batchnorm"])
    return terms


def reference_launch(name: str, recipe: Recipe) -> str:
    """The command that runs preset ``name`` as its reference did: ``recipe.gpus`` processes (torchrun), or a
    single plain process for a recipe without a reference launch."""
    if recipe.gpus is None:
        return f"python train.py --preset {name}"
    return f"torchrun --nproc_per_node={recipe.gpus} train.py --preset {name}"


def process_count_note(recipe: Recipe, processes: int) -> str | None:
    """One line for a run on ``processes`` processes where the reference ran ``recipe.gpus``: the batch per
    process it changes and the per-process terms (per_process_terms) that therefore differ; None when the
    counts agree or the recipe names none."""
    if recipe.gpus is None or processes == recipe.gpus:
        return None
    terms = per_process_terms(recipe)
    changed = "; ".join(terms) if terms else "none known besides the batch per process"
    return (f"note: {processes} process(es) where the reference ran {recipe.gpus} (total batch {recipe.batch_size}: "
            f"{recipe.batch_size // processes} per process instead of {recipe.batch_size // recipe.gpus}); "
            f"per-process terms this changes: {changed}")
