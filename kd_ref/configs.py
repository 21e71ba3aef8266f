"""Registries and presets.

* ``METHODS``: method name -> how to build its distiller and how model outputs bind to the distiller's
  ``forward`` arguments, per task. Adding a method is one file plus one entry here.
* ``TASKS``: task name -> models, data and evaluation (``kd_ref.tasks``).
* ``PRESETS``: preset name -> a full :class:`Recipe` (models, data, crop, batch, schedule, loss weights).
  Every distillation preset of a paper row has a baseline twin, ``<preset>_baseline``: the same recipe
  with ``method="none"``.
"""
from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from kd_ref import tasks
from kd_ref.dist import DISTDistiller
from kd_ref.gdd import GDDDistiller
from kd_ref.kd import KDDistiller
from kd_ref.skd import SKDDistiller
from kd_ref.sokd import BoundBase, SoKDPlugin


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
    pretrained: str | None = None    # local ImageNet weights for the student backbone
    # data
    crop: tuple = (512, 1024)
    scales: tuple = (0.5, 2.0)       # random rescale range
    scale_step: float | None = 0.1   # 0.5 + k/10 as CIRKD/SKD; None = continuous as mmseg
    cat_max_ratio: float | None = None  # mmseg re-draws crops dominated by one class (0.75)
    normalization: str = "bgr_mean"  # "bgr_mean" (CIRKD/SKD) or "imagenet_rgb" (mmseg, torchvision)
    synthetic_size: tuple = (128, 128)
    synthetic_train: int = 2000
    synthetic_val: int = 100
    image_scale: tuple = (1333, 800)  # det: keep-ratio resize bounds (long side, short side), mmdet img_scale
    # optimisation
    batch_size: int = 16             # total over all processes
    iters: int = 40000
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
    # bookkeeping
    eval_every: int = 0
    ckpt_every: int = 1000
    seed: int = 0
    method_options: dict = field(default_factory=dict)
    teacher_preset: str | None = None  # recipe that trains the teacher on synthetic data


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


# ------------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """``build(recipe, student, teacher) -> distiller``; ``bind[task](student_out, teacher_out, batch)``
    returns the keyword arguments of the distiller's ``forward``."""
    build: Callable | None
    bind: dict = field(default_factory=dict)

    @property
    def needs_teacher(self) -> bool:
        return self.build is not None


def _logits(student_out, teacher_out, batch):
    return {"logits_s": student_out["logits"], "logits_t": teacher_out["logits"]}


def _outputs(student_out, teacher_out, batch):
    return {"student_out": student_out, "teacher_out": teacher_out}


# GDD taps (gdd.md §3): the last backbone stage for segmentation.
GDD_LEVELS = {"seg": ["c5"]}


def _build_gdd(recipe, student, teacher):
    levels = GDD_LEVELS[recipe.task]
    return GDDDistiller(levels, [student.out_channels[name] for name in levels],
                        [teacher.out_channels[name] for name in levels], **recipe.method_options)


def _gdd_seg(student_out, teacher_out, batch):
    return {"feats_s": [student_out["feats"][name] for name in GDD_LEVELS["seg"]],
            "feats_t": [teacher_out["feats"][name] for name in GDD_LEVELS["seg"]]}


def _skd_seg(student_out, teacher_out, batch):
    return {"logits_s": student_out["logits"], "logits_t": teacher_out["logits"],
            "feat_s": student_out["feats"]["head"], "feat_t": teacher_out["feats"]["head"]}


METHODS: dict[str, Method] = {
    "none": Method(None),
    "kd": Method(lambda recipe, student, teacher: KDDistiller(**recipe.method_options),
                 {"seg": _logits, "cls": _logits}),
    "dist": Method(lambda recipe, student, teacher: DISTDistiller(recipe.task, **recipe.method_options),
                   {"seg": _outputs}),
    "gdd": Method(_build_gdd, {"seg": _gdd_seg}),
    "skd": Method(lambda recipe, student, teacher: SKDDistiller(recipe.num_classes, **recipe.method_options),
                  {"seg": _skd_seg}),
}


def supported_methods(task: str) -> list:
    return sorted(name for name, method in METHODS.items() if method.build is None or task in method.bind)


# ------------------------------------------------------------------------------------------ presets
TASKS = {"seg": tasks.SegTask()}

PRESETS: dict[str, Recipe] = {}


def register(name: str, recipe: Recipe, baseline: bool = True) -> None:
    """Add a preset and, for a distillation preset, its ``<name>_baseline`` twin."""
    PRESETS[name] = recipe
    if baseline and recipe.method != "none":
        PRESETS[f"{name}_baseline"] = dataclasses.replace(recipe, method="none", method_options={})


# --- CIRKD protocol (winycg/CIRKD, 2022 table; seg_models.md §5): DeepLabV3-R101 teacher.
CIRKD_CITYSCAPES = Recipe(data="cityscapes", flavour="cirkd", crop=(512, 1024), scales=(0.5, 2.0),
                          normalization="bgr_mean", batch_size=16, iters=40000, lr=0.02, weight_decay=1e-4,
                          eval_every=4000, ckpt_every=1000)
register("teacher_deeplabv3_r101_cityscapes", dataclasses.replace(CIRKD_CITYSCAPES, student="deeplabv3_r101"))
register("kd_deeplabv3_r18_cityscapes", dataclasses.replace(
    CIRKD_CITYSCAPES, method="kd", student="deeplabv3_r18", teacher="deeplabv3_r101"))
register("skd_deeplabv3_r18_cityscapes", dataclasses.replace(
    CIRKD_CITYSCAPES, method="skd", student="deeplabv3_r18", teacher="deeplabv3_r101",
    method_options={"preset": "cirkd"}))
# DIST (hunto/DIST_KD segmentation, dist.md §4): CIRKD models, wd 5e-4, poly floor 1e-4.
DIST_CITYSCAPES = dataclasses.replace(CIRKD_CITYSCAPES, method="dist", teacher="deeplabv3_r101",
                                      weight_decay=5e-4, min_lr=1e-4)
register("dist_deeplabv3_r18_cityscapes", dataclasses.replace(DIST_CITYSCAPES, student="deeplabv3_r18"))
register("dist_pspnet_r18_cityscapes", dataclasses.replace(DIST_CITYSCAPES, student="pspnet_r18"))

# --- GDD (ZhgLiu/GDD, mmseg 0.20; gdd.md §6): mmseg models, PSPNet-R101-D8 teacher, 512x512 crops.
MMSEG_CITYSCAPES = Recipe(data="cityscapes", flavour="mmseg", crop=(512, 512), scales=(0.5, 2.0),
                          scale_step=None, cat_max_ratio=0.75, normalization="imagenet_rgb", batch_size=16,
                          iters=40000, lr=0.01, weight_decay=5e-4, min_lr=1e-4, eval_every=4000,
                          ckpt_every=1000)
register("teacher_pspnet_r101_cityscapes_mmseg", dataclasses.replace(MMSEG_CITYSCAPES, student="pspnet_r101"))
register("gdd_pspnet_r18_cityscapes", dataclasses.replace(
    MMSEG_CITYSCAPES, method="gdd", student="pspnet_r18", teacher="pspnet_r101",
    method_options={"alpha": 145.0, "tau": 4.0}))
register("gdd_deeplabv3_r18_cityscapes", dataclasses.replace(
    MMSEG_CITYSCAPES, method="gdd", student="deeplabv3_r18", teacher="pspnet_r101",
    method_options={"alpha": 175.0, "tau": 4.0}))

# --- SKD authors' recipe (irfanICMLL master; skd.md §7): PSPNet-R101 -> PSPNet-R18, 512x512, batch 8.
SKD_ORIGINAL_CITYSCAPES = Recipe(data="cityscapes", flavour="skd", crop=(512, 512), scales=(0.5, 1.6),
                                 normalization="bgr_mean", batch_size=8, iters=40000, lr=0.01,
                                 weight_decay=5e-4, eval_every=4000, ckpt_every=1000)
register("teacher_pspnet_r101_cityscapes_skd", dataclasses.replace(SKD_ORIGINAL_CITYSCAPES, student="pspnet_r101"))
register("skd_pspnet_r18_cityscapes_original", dataclasses.replace(
    SKD_ORIGINAL_CITYSCAPES, method="skd", student="pspnet_r18", teacher="pspnet_r101",
    method_options={"preset": "original"}))

# --- Built-in synthetic scenes: small enough for a CPU, hard enough that the teacher is clearly better.
SYNTHETIC_SEG = Recipe(data="synthetic", flavour="cirkd", num_classes=tasks.SYNTHETIC_NUM_CLASSES,
                       crop=(128, 128), scales=(0.75, 1.5), normalization="bgr_mean", batch_size=8,
                       iters=300, lr=0.02, weight_decay=1e-4, eval_every=0, ckpt_every=100,
                       synthetic_size=(128, 128), teacher="deeplabv3_r50", teacher_preset="synthetic_seg_teacher")
# SKD's discriminator needs logit maps of at least 64x64 (512-pixel inputs), so the 128-pixel demo runs
# the pixel-wise and pair-wise terms only; the holistic term is exercised at 512 pixels in the tests.
SYNTHETIC_METHOD_OPTIONS = {"none": {}, "kd": {}, "dist": {}, "gdd": {"alpha": 145.0, "tau": 4.0},
                            "skd": {"preset": "cirkd", "use_ho": False}}
register("synthetic_seg_teacher", dataclasses.replace(SYNTHETIC_SEG, student="deeplabv3_r50", teacher=None,
                                                      teacher_preset=None))
for _method, _options in SYNTHETIC_METHOD_OPTIONS.items():
    register(f"synthetic_seg_{_method}", dataclasses.replace(
        SYNTHETIC_SEG, method=_method, student="pspnet_r18", method_options=_options), baseline=False)

# Which preset a bare "--task T --method M [--data D]" means.
DEFAULT_PRESETS = {
    **{("seg", method, "synthetic"): f"synthetic_seg_{method}" for method in SYNTHETIC_METHOD_OPTIONS},
    ("seg", "none", "cityscapes"): "dist_deeplabv3_r18_cityscapes_baseline",
    ("seg", "kd", "cityscapes"): "kd_deeplabv3_r18_cityscapes",
    ("seg", "dist", "cityscapes"): "dist_deeplabv3_r18_cityscapes",
    ("seg", "gdd", "cityscapes"): "gdd_pspnet_r18_cityscapes",
    ("seg", "skd", "cityscapes"): "skd_deeplabv3_r18_cityscapes",
}


def default_preset(task: str, method: str, data: str) -> str:
    key = (task, method, data)
    if key not in DEFAULT_PRESETS:
        combos = ", ".join(f"--task {t} --method {m} --data {d}" for t, m, d in sorted(DEFAULT_PRESETS))
        raise ValueError(f"no default preset for --task {task} --method {method} --data {data}; pass "
                         f"--preset NAME, or use one of: {combos}")
    return DEFAULT_PRESETS[key]


# ------------------------------------------------------------------- classification and SoKD (issue 6)
TASKS["cls"] = tasks.ClsTask()


def _logits_as_outputs(student_out, teacher_out, batch):
    return {"student_out": student_out["logits"], "teacher_out": teacher_out["logits"]}


def _outputs_and_batch(student_out, teacher_out, batch):
    return {"student_out": student_out, "teacher_out": teacher_out, "batch": batch}


METHODS["dist"].bind["cls"] = _logits_as_outputs      # DIST on the fc logits (dist.md §3)

# SoKD (sokd.md §5): the stage before the last (CIFAR stage 2 of its res32x4 config, ImageNet stage 3),
# named c4 in both classifier families. Bases: methods whose loss SoKD is added to in the same step.
SOKD_TAPS = {"cls": "c4"}
SOKD_BASES = ("none", "kd", "dist")


def feature_shape(model, name: str, image_size: tuple) -> tuple:
    """``(C, H, W)`` of ``model``'s feature ``name`` for one ``image_size`` input (a probe forward in eval
    mode, no gradient, so neither BN statistics nor RNG state change)."""
    was_training = model.training
    parameter = next(model.parameters())
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, *image_size, device=parameter.device, dtype=parameter.dtype))
    model.train(was_training)
    return tuple(out["feats"][name].shape[1:])


def _build_sokd(recipe, student, teacher):
    """``method_options``: ``base`` (one of SOKD_BASES), ``base_options`` ({base name: keyword arguments},
    the entry of the chosen base is used, so ``--sokd-base`` switches base and options together),
    ``tap`` (default SOKD_TAPS[task]), ``num_heat`` (default num_classes), ``search_iters``,
    ``search_options`` and SoKDDistiller's keyword arguments (k, w_feat, w_dam, search_mode, ...)."""
    options = dict(recipe.method_options)
    base_name = options.pop("base", "none")
    base_options = options.pop("base_options", {}).get(base_name, {})
    if base_name not in SOKD_BASES:
        raise ValueError(f"--sokd-base {base_name}: expected one of {list(SOKD_BASES)}")
    tap = options.pop("tap", SOKD_TAPS[recipe.task])
    base = None
    if base_name != "none":
        base_method = METHODS[base_name]
        base_recipe = dataclasses.replace(recipe, method=base_name, method_options=base_options)
        base = BoundBase(base_method.build(base_recipe, student, teacher), base_method.bind[recipe.task])
    return SoKDPlugin(student, feature_shape(student, tap, recipe.crop), feature_shape(teacher, tap, recipe.crop),
                      options.pop("num_heat", recipe.num_classes), tap, base=base, **options)


METHODS["sokd"] = Method(_build_sokd, {"cls": _outputs_and_batch})

# --- CIFAR-100 (CRD / RepDistiller protocol, dist.md §4, sokd.md §2.5): 240 epochs of 50,000 images at
# batch 64 (the engine drops the last partial batch: 781 iterations per epoch), SGD lr 0.05, x0.1 at
# epochs 150 / 180 / 210, wd 5e-4. DIST: CE 1 + 2 x DIST at tau 4. SoKD: the final code's CIFAR row is
# DAM + DAFA alone (its masked feature loss replaces FitNet's hint), 50 search epochs of 240.
CIFAR_EPOCH = 50_000 // 64
CIFAR100 = Recipe(task="cls", data="cifar100", num_classes=100, crop=(32, 32), normalization="cifar100",
                  batch_size=64, iters=240 * CIFAR_EPOCH, lr=0.05, weight_decay=5e-4, schedule="step",
                  lr_steps=tuple(e * CIFAR_EPOCH for e in (150, 180, 210)), eval_every=10 * CIFAR_EPOCH,
                  ckpt_every=CIFAR_EPOCH)
CIFAR_DIST_OPTIONS = {"tau": 4.0, "loss_weight": 2.0}
CIFAR_KD_OPTIONS = {"tau": 4.0}
for _teacher in ("resnet32x4", "resnet56", "resnet110", "wrn_40_2"):
    register(f"teacher_{_teacher}_cifar100", dataclasses.replace(CIFAR100, student=_teacher))
for _teacher, _student in (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20")):
    register(f"dist_{_student}_cifar100", dataclasses.replace(
        CIFAR100, method="dist", student=_student, teacher=_teacher, method_options=CIFAR_DIST_OPTIONS))
for _teacher, _student in (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_40_1"), ("wrn_40_2", "wrn_16_2"),
                           ("resnet56", "resnet20"), ("resnet110", "resnet32")):
    register(f"sokd_{_student}_cifar100", dataclasses.replace(
        CIFAR100, method="sokd", student=_student, teacher=_teacher, method_options={
            "base": "none", "base_options": {"kd": CIFAR_KD_OPTIONS, "dist": CIFAR_DIST_OPTIONS},
            "search_iters": 50 * CIFAR_EPOCH}))

# --- ImageNet R34 -> R18 (DIST baseline recipe, dist.md §4; sokd.md §6): 100 epochs of 1,281,167 images
# at batch 256, SGD lr 0.1, x0.1 every 30 epochs, wd 1e-4. KD: CE 1 + KD at tau 4 (DIST's KD row).
# DIST: CE 1 + 2 x DIST at tau 1. SoKD over KD, 5 search epochs (its ImageNet plug-in config). The
# teacher is torchvision's ResNet-34 (python -m kd_ref.classifiers convert, then --teacher-ckpt).
IMAGENET_EPOCH = 1_281_167 // 256
IMAGENET = Recipe(task="cls", data="imagenet", num_classes=1000, crop=(224, 224), normalization="imagenet_rgb",
                  batch_size=256, iters=100 * IMAGENET_EPOCH, lr=0.1, weight_decay=1e-4, schedule="step",
                  lr_steps=tuple(e * IMAGENET_EPOCH for e in (30, 60, 90)), eval_every=10 * IMAGENET_EPOCH,
                  ckpt_every=1000, student="resnet18", teacher="resnet34")
IMAGENET_KD_OPTIONS = {"tau": 4.0}
IMAGENET_DIST_OPTIONS = {"tau": 1.0, "loss_weight": 2.0}
register("kd_resnet18_imagenet", dataclasses.replace(IMAGENET, method="kd", method_options=IMAGENET_KD_OPTIONS))
register("dist_resnet18_imagenet", dataclasses.replace(IMAGENET, method="dist",
                                                       method_options=IMAGENET_DIST_OPTIONS))
register("sokd_resnet18_imagenet", dataclasses.replace(IMAGENET, method="sokd", method_options={
    "base": "kd", "base_options": {"kd": IMAGENET_KD_OPTIONS, "dist": IMAGENET_DIST_OPTIONS},
    "search_iters": 5 * IMAGENET_EPOCH}))

# --- Built-in synthetic classification: a CPU demo in which the teacher clearly beats the student.
SYNTHETIC_CLS = Recipe(task="cls", data="synthetic", num_classes=tasks.SYNTHETIC_NUM_IMAGE_CLASSES, crop=(32, 32),
                       synthetic_size=(32, 32), synthetic_train=4000, synthetic_val=500, normalization="cifar100",
                       batch_size=32, iters=400, lr=0.05, weight_decay=5e-4, schedule="step", lr_steps=(300,),
                       eval_every=0, ckpt_every=100, student="resnet8", teacher="resnet56",
                       teacher_preset="synthetic_cls_teacher")
SYNTHETIC_CLS_METHOD_OPTIONS = {
    "none": {}, "kd": CIFAR_KD_OPTIONS, "dist": CIFAR_DIST_OPTIONS,
    "sokd": {"base": "kd", "base_options": {"kd": CIFAR_KD_OPTIONS, "dist": CIFAR_DIST_OPTIONS},
             "search_iters": 100}}
register("synthetic_cls_teacher", dataclasses.replace(SYNTHETIC_CLS, student=SYNTHETIC_CLS.teacher, teacher=None,
                                                      teacher_preset=None))
for _method, _options in SYNTHETIC_CLS_METHOD_OPTIONS.items():
    register(f"synthetic_cls_{_method}", dataclasses.replace(SYNTHETIC_CLS, method=_method, method_options=_options),
             baseline=False)

DEFAULT_PRESETS.update({
    **{("cls", method, "synthetic"): f"synthetic_cls_{method}" for method in SYNTHETIC_CLS_METHOD_OPTIONS},
    ("cls", "none", "cifar100"): "dist_resnet8x4_cifar100_baseline",
    ("cls", "dist", "cifar100"): "dist_resnet8x4_cifar100",
    ("cls", "sokd", "cifar100"): "sokd_resnet8x4_cifar100",
    ("cls", "none", "imagenet"): "kd_resnet18_imagenet_baseline",
    ("cls", "kd", "imagenet"): "kd_resnet18_imagenet",
    ("cls", "dist", "imagenet"): "dist_resnet18_imagenet",
    ("cls", "sokd", "imagenet"): "sokd_resnet18_imagenet",
})
