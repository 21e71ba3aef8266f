"""Registries: what builds and wires models and distillers (presets, the data, are ``kd_ref/presets*.py``).

* ``METHODS``: method name -> how to build its distiller and how model outputs bind to the distiller's
  ``forward`` arguments, per task. Adding a method is one file plus one entry here.
* ``TASKS``: task name -> models, data and evaluation (``kd_ref.tasks``).
* :func:`check_recipe`: a recipe the task or method cannot train is refused before anything is built.

The recipe type and its torch-free helpers are in ``kd_ref.recipe``, the presets in ``kd_ref.presets``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from kd_ref import tasks
from kd_ref.detectors import flatten_levels
from kd_ref.dist import DISTDistiller
from kd_ref.drivers import BoundBase, ScheduledGKDDistiller, SoKDPlugin, anchor_level_features
from kd_ref.gdd import GDDDistiller
from kd_ref.instance_seg import copy_non_backbone_weights
from kd_ref.kd import KDDistiller
from kd_ref.recipe import Recipe
from kd_ref.skd import DepthSKDDistiller, FCOSSKDDistiller, SKDDistiller

# ------------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class Method:
    """``build(recipe, student, teacher) -> distiller``; ``bind[task](student_out, teacher_out, batch)``
    returns the keyword arguments of the distiller's ``forward``; ``check(recipe)``, if given, refuses a recipe
    the method cannot train (before any model is built or teacher trained; ``build`` calls it too)."""
    build: Callable | None
    bind: dict = field(default_factory=dict)
    check: Callable | None = None

    @property
    def needs_teacher(self) -> bool:
        return self.build is not None


def _logits(student_out, teacher_out, batch):
    return {"logits_s": student_out["logits"], "logits_t": teacher_out["logits"]}


def _outputs(student_out, teacher_out, batch):
    return {"student_out": student_out, "teacher_out": teacher_out}


def is_two_stage(name: str) -> bool:
    return name.startswith("faster_rcnn")


# GDD taps (gdd.md §3): the last backbone stage for segmentation; the FPN outputs for detection
# (Faster R-CNN P2-P5, without the max-pooled P6; one-stage RetinaNet P3-P7).
GDD_SEG_LEVELS = ["c5"]
GDD_TWO_STAGE_LEVELS = ["p2", "p3", "p4", "p5"]
GDD_ONE_STAGE_LEVELS = ["p3", "p4", "p5", "p6", "p7"]


def gdd_levels(task: str, detector: str | None = None) -> list:
    if task == "seg":
        return GDD_SEG_LEVELS
    if task == "ins":
        return GDD_INS_LEVELS
    return GDD_TWO_STAGE_LEVELS if is_two_stage(detector) else GDD_ONE_STAGE_LEVELS


def _build_gdd(recipe, student, teacher):
    """``method_options``: GDDDistiller's (alpha, tau) and ``init_student`` (GDD's instance-segmentation
    config: before training, the teacher's neck and head weights replace the student's)."""
    options = dict(recipe.method_options)
    if options.pop("init_student", False):
        copy_non_backbone_weights(teacher, student)
    levels = gdd_levels(recipe.task, recipe.student)
    return GDDDistiller(levels, [student.out_channels[name] for name in levels],
                        [teacher.out_channels[name] for name in levels], **options)


def _gdd_feats(levels):
    def bind(student_out, teacher_out, batch):
        return {"feats_s": [student_out["feats"][name] for name in levels],
                "feats_t": [teacher_out["feats"][name] for name in levels]}
    return bind


def _gdd_det(student_out, teacher_out, batch):
    levels = GDD_TWO_STAGE_LEVELS if "rois" in student_out else GDD_ONE_STAGE_LEVELS
    return _gdd_feats(levels)(student_out, teacher_out, batch)


# DIST on detection (dist.md §3): RetinaNet per-level sigmoid classification maps; Faster R-CNN RoI
# class logits, the teacher's RoI head run on the student's sampled RoIs (engine.teacher_inputs).
def _build_dist(recipe, student, teacher):
    if recipe.task != "det":
        return DISTDistiller(recipe.task, **recipe.method_options)
    if is_two_stage(recipe.student):
        return DISTDistiller("det_frcnn", **recipe.method_options)
    return DISTDistiller("det_retina", **{"use_sigmoid": True, **recipe.method_options})


def _dist_det(student_out, teacher_out, batch):
    key = "roi_cls_logits" if "rois" in student_out else "cls_logits"
    return {"student_out": student_out[key], "teacher_out": teacher_out[key]}


def _skd_seg(student_out, teacher_out, batch):
    return {"logits_s": student_out["logits"], "logits_t": teacher_out["logits"],
            "feat_s": student_out["feats"]["head"], "feat_t": teacher_out["feats"]["head"]}


def _check_kd(recipe):
    if recipe.task == "det" and not is_two_stage(recipe.student):
        raise ValueError(f"--method kd on detection distils Faster R-CNN's RoI class logits; {recipe.student} "
                         "has none (a one-stage detector's per-anchor sigmoid scores are not a softmax)")


def _build_kd(recipe, student, teacher):
    _check_kd(recipe)
    return KDDistiller(**recipe.method_options)


def _kd_det(student_out, teacher_out, batch):
    """Softmax KD on the RoI class logits (K + 1, with background) of the student's sampled RoIs, which the
    teacher's RoI head scores too (engine.teacher_inputs): the logit base of SoKD's COCO code (sokd.md §5;
    its per-RoI class mask is not reproduced, ours)."""
    return {"logits_s": student_out["roi_cls_logits"], "logits_t": teacher_out["roi_cls_logits"]}


METHODS: dict[str, Method] = {
    "none": Method(None),
    "kd": Method(_build_kd, {"seg": _logits, "cls": _logits, "det": _kd_det}, check=_check_kd),
    "dist": Method(_build_dist, {"seg": _outputs, "det": _dist_det}),
    "gdd": Method(_build_gdd, {"seg": _gdd_feats(GDD_SEG_LEVELS), "det": _gdd_det}),
    "skd": Method(lambda recipe, student, teacher: SKDDistiller(recipe.num_classes, **recipe.method_options),
                  {"seg": _skd_seg}),
}


def supported_methods(task: str) -> list:
    return sorted(name for name, method in METHODS.items() if method.build is None or task in method.bind)


TASKS = {"seg": tasks.SegTask()}


def check_recipe(recipe: Recipe) -> None:
    """Refuse, with one line, a recipe its task or method cannot train; needs no file, model or data."""
    TASKS[recipe.task].check_recipe(recipe)
    check = METHODS[recipe.method].check
    if check is not None:
        check(recipe)


# ------------------------------------------------------------------- classification and SoKD
TASKS["cls"] = tasks.ClsTask()


def _logits_as_outputs(student_out, teacher_out, batch):
    return {"student_out": student_out["logits"], "teacher_out": teacher_out["logits"]}


def _outputs_and_batch(student_out, teacher_out, batch):
    return {"student_out": student_out, "teacher_out": teacher_out, "batch": batch}


METHODS["dist"].bind["cls"] = _logits_as_outputs      # DIST on the fc logits (dist.md §3)

# SoKD (sokd.md §5): on classification the stage before the last (CIFAR stage 2 of its res32x4 config,
# ImageNet stage 3), named c4 in both classifier families; on detection the last FPN output (the COCO
# row's P6 of Faster R-CNN's P2-P6; RetinaNet's P7 by analogy, ours). Bases: methods whose loss SoKD is
# added to in the same step, each on the task's own binding of that method.
SOKD_TAPS = {"cls": "c4"}
SOKD_DET_TAPS = {"two_stage": "p6", "one_stage": "p7"}
SOKD_BASES = ("none", "kd", "dist", "gdd")


def sokd_tap(recipe) -> str:
    if recipe.task == "det":
        return SOKD_DET_TAPS["two_stage" if is_two_stage(recipe.student) else "one_stage"]
    return SOKD_TAPS[recipe.task]


def feature_shape(model, name: str, image_size: tuple) -> tuple:
    """``(C, H, W)`` of ``model``'s feature ``name`` for one ``image_size`` input (a probe forward in eval
    mode, no gradient, so neither BN statistics nor RNG state change)."""
    was_training = model.training
    parameter = next(model.parameters())
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, *image_size, device=parameter.device, dtype=parameter.dtype))
    model.train(was_training)
    return tuple(out["feats"][name].shape[1:])


def _sokd_tap_shapes(recipe, student, teacher, tap: str) -> list:
    """``(C, H, W)`` of the tap in student and teacher, which choose the adapter's spatial matcher.
    Classifiers: a probe at the crop. Detectors: inputs vary in size, but the tap is the same pyramid
    level (same stride) in both, so the maps always have equal sizes (the 1x1 matcher) and only the
    channels are read."""
    if recipe.task == "det":
        return [(model.out_channels[tap], 1, 1) for model in (student, teacher)]
    return [feature_shape(model, tap, recipe.crop) for model in (student, teacher)]


def _check_sokd(recipe):
    """The base is one of SOKD_BASES with a binding for the task, and passes that method's own check."""
    base_name = recipe.method_options.get("base", "none")
    bases = [name for name in SOKD_BASES if name == "none" or recipe.task in METHODS[name].bind]
    if base_name not in bases:
        raise ValueError(f"--sokd-base {base_name}: for --task {recipe.task} expected one of {bases}")
    base_check = METHODS[base_name].check
    if base_check is not None:
        base_check(dataclasses.replace(recipe, method=base_name))


def _build_sokd(recipe, student, teacher):
    """``method_options``: ``base`` (one of SOKD_BASES with a binding for the task), ``base_options``
    ({base name: keyword arguments}, the entry of the chosen base is used, so ``--sokd-base`` switches base
    and options together), ``tap`` (default :func:`sokd_tap`), ``num_heat`` (default num_classes),
    ``search_iters``, ``search_options`` and SoKDDistiller's keyword arguments (k, w_feat, w_dam,
    search_mode, ...)."""
    _check_sokd(recipe)
    options = dict(recipe.method_options)
    base_name = options.pop("base", "none")
    base_options = options.pop("base_options", {}).get(base_name, {})
    tap = options.pop("tap", sokd_tap(recipe))
    base = None
    if base_name != "none":
        base_method = METHODS[base_name]
        base_recipe = dataclasses.replace(recipe, method=base_name, method_options=base_options)
        base = BoundBase(base_method.build(base_recipe, student, teacher), base_method.bind[recipe.task])
    return SoKDPlugin(student, *_sokd_tap_shapes(recipe, student, teacher, tap),
                      options.pop("num_heat", recipe.num_classes), tap, base=base, **options)


METHODS["sokd"] = Method(_build_sokd, {"cls": _outputs_and_batch}, check=_check_sokd)

# ------------------------------------------------------------------------------------ detection
TASKS["det"] = tasks.DetTask()

# ------------------------------------------------------------------------------------------ GKD
# GKD (gkd.md §4): all five FPN outputs of each detector, Faster R-CNN P2-P6 (fg/bg averaged over levels) and
# RetinaNet P3-P7 (summed). Instances: the student's positive training samples with their GT class.
GKD_TWO_STAGE_LEVELS = ["p2", "p3", "p4", "p5", "p6"]
GKD_ONE_STAGE_LEVELS = ["p3", "p4", "p5", "p6", "p7"]


def _fpn_strides(levels) -> tuple:
    return tuple(2 ** int(name[1:]) for name in levels)


def _check_gkd(recipe):
    if recipe.task != "det":
        raise ValueError(f"--method gkd distils object detectors: --task det, not {recipe.task}")
    if is_two_stage(recipe.teacher) != is_two_stage(recipe.student):
        raise ValueError(f"--method gkd: student {recipe.student} and teacher {recipe.teacher} must be the same "
                         "kind of detector (the teacher scores the student's positive samples)")


def _build_gkd(recipe, student, teacher):
    """``method_options``: GKDDistiller's loss options and the PGM options of ScheduledGKDDistiller
    (pgm_max_images, pgm_min_size, pgm_seed, num_prototypes, pgm_alpha)."""
    _check_gkd(recipe)
    two_stage = is_two_stage(recipe.student)
    levels = GKD_TWO_STAGE_LEVELS if two_stage else GKD_ONE_STAGE_LEVELS
    options = {"level_reduction": "mean" if two_stage else "sum", **recipe.method_options}
    return ScheduledGKDDistiller(levels, recipe.num_classes, channels_s=student.out_channels[levels[0]],
                                 channels_t=teacher.out_channels[levels[0]], strides=_fpn_strides(levels), **options)


def _gkd_det(student_out, teacher_out, batch):
    """Faster R-CNN: positive sampled RoIs (background is the last class) with their logits and RoIAlign
    features in both heads. RetinaNet: positive anchors; the soft labels are both heads' class logits at
    those anchors, each anchor's robust weight from its box pooled on its own level (gkd.md §4)."""
    if "rois" in student_out:
        levels = GKD_TWO_STAGE_LEVELS
        # the positive rows as integer indices: one host read for all the tensors indexed with them
        positive = (student_out["roi_labels"] < student_out["roi_cls_logits"].shape[1] - 1).nonzero().squeeze(1)
        boxes, image_of = student_out["rois"][positive, 1:], student_out["rois"][positive, 0].long()
        labels = student_out["roi_labels"][positive]
        soft = {"roi_logits_s": student_out["roi_cls_logits"][positive],
                "roi_logits_t": teacher_out["roi_cls_logits"][positive],
                "roi_feats_s": student_out["roi_feats"][positive], "roi_feats_t": teacher_out["roi_feats"][positive],
                "roi_levels": student_out["roi_levels"][positive]}
    else:
        levels = GKD_ONE_STAGE_LEVELS
        anchors = student_out["pos_anchors"]
        boxes, image_of, labels = anchors["boxes"], anchors["batch_idx"], anchors["labels"]
        anchors_per_cell = student_out["bbox_preds"][0].shape[1] // 4
        num_classes = student_out["cls_logits"][0].shape[1] // anchors_per_cell

        def at_positives(out):
            return flatten_levels(out["cls_logits"], num_classes)[image_of, anchors["index"]]

        def pooled(out):
            return anchor_level_features([out["feats"][name] for name in levels], boxes, image_of,
                                         _fpn_strides(levels))
        (roi_feats_s, roi_levels), (roi_feats_t, _) = pooled(student_out), pooled(teacher_out)
        soft = {"roi_logits_s": at_positives(student_out), "roi_logits_t": at_positives(teacher_out),
                "roi_feats_s": roi_feats_s, "roi_feats_t": roi_feats_t, "roi_levels": roi_levels}
    num_images = batch["images"].shape[0]
    # split per image with one host read (the counts); index_add_ rather than bincount, which on CUDA reads
    # the device once more to size its output
    by_image = torch.argsort(image_of, stable=True)
    per_image = torch.zeros(num_images, dtype=torch.long, device=image_of.device).index_add_(
        0, image_of, torch.ones_like(image_of)).tolist()
    return {"feats_s": [student_out["feats"][name] for name in levels],
            "feats_t": [teacher_out["feats"][name] for name in levels],
            "inst_boxes": list(boxes[by_image].split(per_image)),
            "inst_labels": list(labels[by_image].split(per_image)),
            "roi_labels": labels, **soft}


METHODS["gkd"] = Method(_build_gkd, {"det": _gkd_det}, check=_check_gkd)

# ------------------------------------------------------------------------------ SoKD on detection
# sokd.md §5: the plug-in reads the whole outputs (its tap, the base's inputs) and the batch (the boxes)
METHODS["sokd"].bind["det"] = _outputs_and_batch

# --------------------------------------------------------------------- instance segmentation
# instance_seg.md: SOLO (v1) and Mask R-CNN, COCO mask AP. GDD taps P2-P5 (before SOLO's resize of P2; the
# max-pooled P6 is not distilled). DIST and SKD are not bound: neither paper nor its code distils an
# instance segmenter (DIST's dense form is for semantic maps and detector class scores, SKD's for semantic
# segmentation), so a binding would be ours alone.
TASKS["ins"] = tasks.InsTask()
GDD_INS_LEVELS = ["p2", "p3", "p4", "p5"]
METHODS["gdd"].bind["ins"] = _gdd_feats(GDD_INS_LEVELS)

# ------------------------------------------------------------------------------ depth and FCOS
# SKD's other two dense tasks (depth_fcos.md): monocular depth (VNL-style bins, NYUDv2) and FCOS detection,
# with MobileNetV2 students. The SKD weights of both are ours ([ours] in kd_ref/skd.py); the paper rows are
# FCOS-MV2-C128 30.9 -> 34.0 COCO AP and VNL rel 0.135 -> 0.130 on NYUDv2 (irfanICMLL/
# structure_knowledge_distillation README).
TASKS["depth"] = tasks.DepthTask()
FCOS_LEVELS = ["p3", "p4", "p5", "p6", "p7"]


def is_fcos(name: str | None) -> bool:
    return name is not None and name.startswith("fcos")


def _skd_depth(student_out, teacher_out, batch):
    """Bin logits (absent from a regression head), the decoder's head feature, the stride-4 log depth."""
    return {"logits_s": student_out.get("logits"), "logits_t": teacher_out.get("logits"),
            "feat_s": student_out["feats"]["head"], "feat_t": teacher_out["feats"]["head"],
            "log_depth_s": student_out["log_depth"], "log_depth_t": teacher_out["log_depth"]}


def _skd_fcos(student_out, teacher_out, batch):
    return {"logits_s": student_out["cls_logits"], "logits_t": teacher_out["cls_logits"],
            "feats_s": [student_out["feats"][name] for name in FCOS_LEVELS],
            "feats_t": [teacher_out["feats"][name] for name in FCOS_LEVELS]}


_build_skd_seg, _check_skd_seg = METHODS["skd"].build, METHODS["skd"].check


def _check_skd(recipe):
    if recipe.task == "det" and not (is_fcos(recipe.student) and is_fcos(recipe.teacher)):
        raise ValueError(f"--method skd on detection distils FCOS students from FCOS teachers (depth_fcos.md §6); "
                         f"got {recipe.student} <- {recipe.teacher}")
    if recipe.task == "depth" and recipe.model_options.get("prediction") == "regression" \
            and recipe.method_options.get("use_pi", False):
        raise ValueError("method_options use_pi: a regression depth head has no bin logits for pixel-wise KD")
    if _check_skd_seg is not None:
        _check_skd_seg(recipe)


def _build_skd(recipe, student, teacher):
    """depth: DepthSKDDistiller (pixel-wise only with the bin head); det: FCOSSKDDistiller; seg as before."""
    _check_skd(recipe)
    if recipe.task == "depth":
        options = {"use_pi": student.prediction == "bins", **recipe.method_options}
        return DepthSKDDistiller(student.num_bins, **options)
    if recipe.task == "det":
        return FCOSSKDDistiller(**recipe.method_options)
    return _build_skd_seg(recipe, student, teacher)


METHODS["skd"] = Method(_build_skd, {**METHODS["skd"].bind, "depth": _skd_depth, "det": _skd_fcos}, check=_check_skd)
_check_gkd_anchors = METHODS["gkd"].check


def _check_gkd_not_fcos(recipe):
    """GKD's one-stage path reads anchor assignments; FCOS has locations, not anchors."""
    if recipe.task == "det" and (is_fcos(recipe.student) or is_fcos(recipe.teacher)):
        raise ValueError(f"--method gkd: {recipe.student if is_fcos(recipe.student) else recipe.teacher} is an FCOS "
                         "detector; GKD here distils RetinaNet and Faster R-CNN")
    _check_gkd_anchors(recipe)


METHODS["gkd"] = dataclasses.replace(METHODS["gkd"], check=_check_gkd_not_fcos)
