"""Weights from wherever a researcher has them into a kd_ref model, and a converter for the command line.

    python -m kd_ref.convert --task seg --arch pspnet_r101 --flavour mmseg \
        pspnet_r101-d8_512x1024_80k_cityscapes_20200606_112211-e1e1100f.pth psp_r101_teacher.pt

:func:`load_weights` is the one loading path of ``train.py --teacher-ckpt``, ``--student-init``,
``--pretrained`` on classification and ``evaluate.py --ckpt``. It takes a ``train.py`` checkpoint, a
plain state dict or a released file (``{"state_dict": ...}`` as mmcv saves it, ``{"model": ...}`` as
RepDistiller does, DataParallel's ``module.`` stripped), recognises the layout from the keys
(``LAYOUTS``), maps the keys with that layout's table and loads strictly. Before loading it compares
what the file's keys imply (architecture, backbone depth and stem, classes) with the model the recipe
built, so a file of another model is refused with one line that names both instead of a key list.

Segmentation layouts also fix the flavour: mmseg files fit the ``mmseg`` flavour only, CIRKD files
``cirkd`` (and ``torchvision``, which shares CIRKD's module names), SKD files ``skd``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kd_ref import classifiers, depth, detectors, instance_seg, segmentors
from kd_ref.mobilenet import VNL_ENCODER, tonylins_key
from kd_ref.backbones import describe_backbone, load_state_dict_checked, read_torch_file, tensors_of
from kd_ref.recipe import Recipe

TASKS = ("seg", "det", "cls", "ins", "depth")

# The layout of the files kd_ref writes (train.py's last.pt, best.pt and teacher caches, python -m kd_ref.convert
# outputs), stored in them as "format_version". Within a version they load, evaluate and resume (a recipe field
# missing from a stored recipe takes its default); a file of another version is refused.
CHECKPOINT_FORMAT_VERSION = 1
KD_REF_MARKERS = ("format_version", "recipe", "layout")  # entries only kd_ref writes: train.py's, convert's


def check_format(content, source: str) -> None:
    """Refuse a kd_ref file (one carrying an entry of ``KD_REF_MARKERS``) of another format version than
    ``CHECKPOINT_FORMAT_VERSION``, or of none, with one line; released weights and plain state dicts pass."""
    if not isinstance(content, Mapping) or not any(key in content for key in KD_REF_MARKERS):
        return
    version = content.get("format_version", 0)
    if version != CHECKPOINT_FORMAT_VERSION:
        written = " (written before format versions)" if version == 0 else ""
        raise ValueError(f"{source}: checkpoint format {version}{written}, this kd_ref reads format "
                         f"{CHECKPOINT_FORMAT_VERSION}")


def read_file(path: str | os.PathLike, source: str):
    """``read_torch_file`` of a weight or checkpoint file, refused by :func:`check_format` when it is a kd_ref
    file of another format version."""
    content = read_torch_file(path, source)
    check_format(content, source)
    return content


def _has(*keys: str) -> Callable[[set], bool]:
    return lambda names: all(key in names for key in keys)


def _any_prefixed(*prefixes: str) -> Callable[[set], bool]:
    return lambda names: any(name.startswith(prefixes) for name in names)


def _both(first: Callable[[set], bool], second: Callable[[set], bool]) -> Callable[[set], bool]:
    return lambda names: first(names) and second(names)


def _ours(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    return dict(state_dict)


def _segmentor_table(flavour: str) -> Callable[[Mapping[str, Tensor], str], dict[str, Tensor]]:
    return lambda state_dict, source: segmentors.convert_reference_state_dict(state_dict, flavour, source)


@dataclass(frozen=True)
class Layout:
    """A key layout: ``recognise(key set)`` tells it apart, ``to_ours(state_dict, source)`` renames."""
    name: str
    task: str
    recognise: Callable[[set], bool]
    to_ours: Callable[[Mapping[str, Tensor], str], dict[str, Tensor]]
    flavours: tuple = ()  # segmentation: the flavours whose models the layout's code defines
    # what the layout demands of the model beyond its keys and shapes: raises a one-line ValueError
    check_model: Callable[[nn.Module, Mapping[str, Tensor], str], None] | None = None
    # recipe fields (input normalisation, model options) the layout's code fixes, from the converted keys
    recipe_fields: Callable[[Mapping[str, Tensor]], dict] | None = None


# First match wins: the released layouts carry marker keys no other layout has; ours come after them.
LAYOUTS = (
    Layout("mmdet 2.x RetinaNet", "det", _has("bbox_head.retina_cls.weight"), detectors.convert_mmdet_state_dict),
    Layout("mmdet 2.x Faster R-CNN", "det", _has("roi_head.bbox_head.fc_cls.weight"),
           detectors.convert_mmdet_state_dict),
    Layout("kd_ref detector", "det", _has("neck.output_convs.0.weight"), _ours),
    Layout("mmseg", "seg", _has("decode_head.conv_seg.weight"), _segmentor_table("mmseg"), ("mmseg",)),
    Layout("CIRKD", "seg", _both(_any_prefixed("pretrained."), _any_prefixed("head.", "auxlayer.")),
           _segmentor_table("cirkd"), ("cirkd", "torchvision")),
    Layout("SKD", "seg", _any_prefixed("pspmodule.", "head.0.stages."), _segmentor_table("skd"), ("skd",)),
    Layout("kd_ref segmentor", "seg", _has("decode_head.classifier.weight"), _ours),
    Layout("ImageNet ResNet (torchvision keys)", "cls", _has("conv1.weight", "layer4.0.conv1.weight", "fc.weight"),
           classifiers.convert_torchvision_state_dict),
    Layout("RepDistiller WRN", "cls", _has("block1.layer.0.conv1.weight"), classifiers.convert_wrn_state_dict),
    Layout("kd_ref / RepDistiller classifier", "cls",
           _both(_has("fc.weight"), _any_prefixed("backbone.layer", "layer1.", "block1.")), _ours),
)


# Instance segmenters carry the detectors' marker keys too (an mmdet Mask R-CNN has Faster R-CNN's heads, our
# SOLO and Mask R-CNN our FPN): their layouts are tried first.
INSTANCE_LAYOUTS = (
    Layout("mmdet 2.x SOLO", "ins", _has("mask_head.conv_cls.weight"), instance_seg.convert_mmdet_solo_state_dict),
    Layout("mmdet 2.x Mask R-CNN", "ins", _has("roi_head.mask_head.conv_logits.weight"),
           instance_seg.convert_mmdet_mask_rcnn_state_dict),
    Layout("kd_ref instance segmenter", "ins", _any_prefixed("head.conv_cls.", "mask_head.logits."), _ours),
)
LAYOUTS = INSTANCE_LAYOUTS + LAYOUTS


def _describe_solo_head(sd: Mapping[str, Tensor]) -> str:
    grids = tuple(round(sd[f"head.conv_mask_list.{l}.weight"].shape[0] ** 0.5) for l in range(5))
    return (f"solo (grids {grids}, {sd['head.conv_cls.weight'].shape[1]}-channel head of "
            f"{_count_blocks(sd, 'head.mask_convs.')} convs)")


def recognise(state_dict: Mapping[str, Tensor], source: str) -> Layout:
    """The layout of ``state_dict``'s keys; an unknown one raises a ValueError naming a few keys."""
    names = set(state_dict)
    for layout in LAYOUTS:
        if layout.recognise(names):
            return layout
    raise ValueError(f"{source}: a key layout kd_ref does not know (keys {', '.join(sorted(names)[:3])}, ...); "
                     f"known: {', '.join(layout.name for layout in LAYOUTS)}")


def _count_blocks(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    return len({key[len(prefix):].split(".")[0] for key in state_dict if key.startswith(prefix)})


def implied_model(state_dict: Mapping[str, Tensor]) -> tuple[str, int | None]:
    """(architecture, number of classes) that a state dict in our keys implies, e.g.
    ``("pspnet on a ResNet-101 (deep stem 64-64-128)", 19)``."""
    sd = state_dict
    if "head.conv_cls.weight" in sd:
        return f"{_describe_solo_head(sd)} on a {describe_backbone(sd, 'backbone.')}", sd["head.conv_cls.weight"].shape[0]
    if "mask_head.logits.weight" in sd:
        return f"maskrcnn on a {describe_backbone(sd, 'backbone.')}", sd["mask_head.logits.weight"].shape[0]
    if "head.cls_tower.0.weight" in sd:
        return (f"fcos on a {_trunk(sd)} with a {sd['head.cls_logits.weight'].shape[1]}-channel head",
                sd["head.cls_logits.weight"].shape[0])
    if "laterals.c5.0.weight" in sd:
        outputs = sd["classifier.weight"].shape[0]
        head = f"{outputs} depth bins" if outputs > 1 else "depth regression"
        return f"depth net ({head}, decoder {sd['head.0.weight'].shape[0]}) on a {_trunk(sd)}", None
    if "decode_head.classifier.weight" in sd:
        arch = "deeplabv3" if "decode_head.image_pool.1.weight" in sd else "pspnet"
        aux = "" if "aux_head.classifier.weight" in sd else " without aux head"
        return f"{arch}{aux} on a {describe_backbone(sd, 'backbone.')}", sd["decode_head.classifier.weight"].shape[0]
    if "rpn_head.cls_out.weight" in sd and "box_head.cls_out.weight" in sd:
        return f"faster_rcnn on a {_trunk(sd)}", sd["box_head.cls_out.weight"].shape[0] - 1
    if "head.cls_out.weight" in sd and "head.reg_out.weight" in sd:
        anchors = sd["head.reg_out.weight"].shape[0] // 4
        return f"retinanet on a {describe_backbone(sd, 'backbone.')}", sd["head.cls_out.weight"].shape[0] // anchors
    classes = sd["fc.weight"].shape[0] if "fc.weight" in sd else None
    if "backbone.layer1.0.conv1.weight" in sd:
        return f"ImageNet classifier on a {describe_backbone(sd, 'backbone.')}", classes
    if "block1.0.conv1.weight" in sd:
        depth = 6 * _count_blocks(sd, "block1.") + 4
        return f"wrn_{depth}_{sd['block1.0.conv1.weight'].shape[0] // 16}", classes
    if "layer1.0.conv1.weight" in sd and "conv1.weight" in sd:
        depth = 6 * _count_blocks(sd, "layer1.") + 2
        return f"resnet{depth}{'x4' if sd['conv1.weight'].shape[0] == 32 else ''}", classes
    return "a model of unknown structure", classes


def describe(state_dict: Mapping[str, Tensor]) -> str:
    arch, classes = implied_model(state_dict)
    return arch if classes is None else f"{arch}, {classes} classes"


def task_of(model: nn.Module) -> str:
    if isinstance(model, (instance_seg.SOLO, instance_seg.MaskRCNN)):  # a MaskRCNN is a FasterRCNN too
        return "ins"
    if isinstance(model, segmentors.Segmentor):
        return "seg"
    if isinstance(model, (detectors.RetinaNet, detectors.FasterRCNN, detectors.FCOS)):
        return "det"
    if isinstance(model, depth.DepthNet):
        return "depth"
    if isinstance(model, classifiers.Classifier):
        return "cls"
    raise ValueError(f"{type(model).__name__}: not a kd_ref segmentor, detector or classifier")


def _expected(model: nn.Module) -> str:
    flavour = f" ({model.flavour} flavour)" if isinstance(model, segmentors.Segmentor) else ""
    return describe(model.state_dict()) + flavour


def to_model_keys(model: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> tuple[Layout, dict]:
    """Recognise, convert and check ``state_dict`` against ``model``: (layout, state dict in ``model``'s
    keys). Another task, flavour, architecture or class count raises a one-line ValueError."""
    layout = recognise(state_dict, source)
    task, expected = task_of(model), _expected(model)
    if layout.task != task:
        raise ValueError(f"{source}: a {layout.name} file (a {layout.task} model); the recipe expects "
                         f"{expected} (a {task} model)")
    converted = layout.to_ours(state_dict, source)
    found = describe(converted)
    if layout.flavours and model.flavour not in layout.flavours:
        raise ValueError(f"{source}: a {layout.name} file ({found}) for flavour {' or '.join(layout.flavours)}; "
                         f"the recipe expects {expected} (--set flavour={layout.flavours[0]})")
    if found != describe(model.state_dict()):
        raise ValueError(f"{source}: a {layout.name} file holding {found}; the recipe expects {expected}")
    if layout.check_model is not None:
        layout.check_model(model, converted, source)
    return layout, converted


def load_weights(model: nn.Module, weights: str | os.PathLike | Mapping[str, Tensor], source: str) -> Layout:
    """Load every weight of ``model`` strictly from a file path or an already read state dict, in any
    layout of ``LAYOUTS``; returns the layout it recognised."""
    state_dict = weights if isinstance(weights, Mapping) else tensors_of(read_file(weights, source), source)
    layout, converted = to_model_keys(model, state_dict, source)
    load_state_dict_checked(model, converted, f"{source} ({layout.name})")
    return layout



# ---------------------------------------------------------------------------------- FCOS and depth
def _trunk(state_dict: Mapping[str, Tensor]) -> str:
    if "backbone.features.0.0.weight" in state_dict:
        return "MobileNetV2"
    if "backbone.conv1.weight" in state_dict:
        return "ResNeXt-101 32x8d" if state_dict["backbone.layer1.0.conv1.weight"].shape[0] == 256 else "ResNet (torchvision)"
    return describe_backbone(state_dict, "backbone.")


_FCOS_HEAD = ("cls_tower.", "bbox_tower.", "cls_logits.", "bbox_pred.", "centerness.", "scales.")


_FCOS_STEM = {"backbone.body.stem.conv1.": "backbone.stem.0.", "backbone.body.stem.bn1.": "backbone.stem.1."}


def convert_fcos_state_dict(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """tianzhi0549/FCOS (maskrcnn-benchmark) keys -> ours. Trunk: MobileNetV2 ``backbone.body.features`` ->
    ``backbone.features`` (``tonylins_key``: the FCOS code's MobileNetV2 is tonylins's); ResNet
    ``backbone.body.stem.conv1/bn1`` -> our stem, ``backbone.body.layerN`` -> ``backbone.layerN`` (block names
    as torchvision's; FrozenBatchNorm
    keeps weight, bias, running_mean, running_var, as our BN does). FPN: ``fpn_inner{2,3,4}`` /
    ``fpn_layer{2,3,4}`` -> the lateral / output convs of P3-P5, ``top_blocks.p6/p7`` -> ``neck.p6/p7``;
    ``rpn.head.*`` -> ``head.*`` (same tower indices: conv, GN, ReLU triplets). The ResNet files put a
    bottleneck's stride on its 1x1 conv, which their model must build too (``fcos_resnet_check``)."""
    converted = {}
    for key, value in state_dict.items():
        stem = next((prefix for prefix in _FCOS_STEM if key.startswith(prefix)), None)
        if key.startswith("backbone.body.features."):
            converted["backbone." + tonylins_key(key[len("backbone.body."):])] = value
        elif stem is not None:
            converted[_FCOS_STEM[stem] + key[len(stem):]] = value
        elif key.startswith("backbone.body.layer"):
            converted["backbone." + key[len("backbone.body."):]] = value
        elif key.startswith("backbone.fpn.fpn_inner") or key.startswith("backbone.fpn.fpn_layer"):
            kind, rest = key[len("backbone.fpn.fpn_"):].split(".", 1)
            index = int(kind[-1]) - 2                          # fpn_inner2 reads C3
            target = "lateral_convs" if kind.startswith("inner") else "output_convs"
            converted[f"neck.{target}.{index}.{rest}"] = value
        elif key.startswith("backbone.fpn.top_blocks."):
            converted["neck." + key[len("backbone.fpn.top_blocks."):]] = value
        elif key.startswith("rpn.head.") and key[len("rpn.head."):].startswith(_FCOS_HEAD):
            converted["head." + key[len("rpn.head."):]] = value
        else:
            raise ValueError(f"{source}: key {key} is not part of an FCOS ResNet-FPN or MNV2-FPN model")
    return converted


def fcos_resnet_check(model: nn.Module, converted: Mapping[str, Tensor], source: str) -> None:
    """An FCOS-code ResNet file loads into a ResNet whose bottlenecks stride in their 1x1 conv only: the
    weights have the same shapes either way, the outputs do not."""
    if "backbone.layer1.0.conv1.weight" in converted and not getattr(model.backbone, "stride_in_1x1", False):
        raise ValueError(f"{source}: an FCOS-code ResNet file, whose bottlenecks stride in their 1x1 conv; the "
                         f"recipe's {describe(model.state_dict())} strides in the 3x3 conv "
                         "(--set \"model_options={'stride_in_1x1': True}\")")


def _code_fields(state_dict: Mapping[str, Tensor], source: str, converted_from: str | None) -> dict:
    """The recipe fields a file's layout's code fixes ({} for most layouts)."""
    layouts = {layout.name: layout for layout in LAYOUTS}
    layout = layouts.get(converted_from) or recognise(state_dict, source)
    if layout.recipe_fields is None:
        return {}
    return layout.recipe_fields(state_dict if converted_from in layouts else layout.to_ours(state_dict, source))


def recipe_for_file(recipe, state_dict: Mapping[str, Tensor], source: str, converted_from: str | None = None):
    """The recipe a file without one (released weights) is run with: ``recipe`` with the input normalisation
    and the model options its layout's code fixes (e.g. an FCOS-code ResNet: caffe2 BGR input statistics and
    stride-in-1x1 bottlenecks); ``recipe`` itself for every other layout. ``converted_from``: the layout a
    ``python -m kd_ref.convert`` output was written from (its ``layout`` entry), whose keys are ours."""
    fields = _code_fields(state_dict, source, converted_from)
    options = {**recipe.model_options, **fields.pop("model_options", {})}
    return dataclasses.replace(recipe, model_options=options, **fields)


def file_normalization(content, source: str) -> str | None:
    """The input normalisation the model of a read weight file (``read_torch_file``) was trained on: its
    train.py recipe's, or the one its layout's code fixes (FCOS files: ``caffe2_bgr``); None where the file
    does not tell (released mmseg/mmdet/torchvision weights)."""
    if isinstance(content, Mapping) and isinstance(content.get("recipe"), Mapping):
        # a field missing from a stored recipe takes its default
        return content["recipe"].get("normalization", Recipe.normalization)
    converted_from = content.get("layout") if isinstance(content, Mapping) else None
    return _code_fields(tensors_of(content, source), source, converted_from).get("normalization")


def check_teacher_normalization(recipe, content, source: str) -> None:
    """Distillation feeds the teacher the student's inputs: a teacher file trained on other input statistics
    (e.g. the FCOS code's caffe2 BGR 0-255 against ImageNet RGB) would see inputs it never saw, so refuse it."""
    trained_on = file_normalization(content, source)
    if trained_on is not None and trained_on != recipe.normalization:
        raise ValueError(f"{source}: the teacher was trained on {trained_on} inputs, the recipe feeds "
                         f"normalization={recipe.normalization}; the teacher sees the student's inputs, so train on "
                         f"its statistics (--set normalization={trained_on}) or pass a teacher trained on "
                         f"{recipe.normalization}")


def _fcos_recipe_fields(converted: Mapping[str, Tensor]) -> dict:
    # every FCOS config keeps maskrcnn-benchmark's input defaults, the MobileNetV2 ones included
    fields = {"normalization": "caffe2_bgr"}
    if "backbone.layer1.0.conv1.weight" in converted:
        fields["model_options"] = {"stride_in_1x1": True}
    return fields


def refuse_vnl_model(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """A VNL depth model (YvanYin/VNL_Monocular_Depth_Prediction ``MetricDepthModel``) does not map onto our
    DepthNet: its decoder (``encoder_modules.topdown_lateral_modules`` FTB laterals, an ASPP or global-pool
    ``bottomup_top``, ``decoder_modules`` AFA/FTB blocks and a dilated 3x3 predictor) has no counterpart in
    DepthNet's FPN-style decoder, and its released encoder is a ResNeXt-101 32x4d (ours: 32x8d). Only a
    MobileNetV2 encoder carries over, as ImageNet-style initial weights through ``--pretrained``."""
    mobilenet = any(key.startswith(VNL_ENCODER + "res2.0.conv.") for key in state_dict)  # ResNeXt: res2.0.conv1
    hint = ("its MobileNetV2 encoder loads with --pretrained" if mobilenet else
            "its ResNeXt encoder (32x4d in the released files) does not match kd_ref's ResNeXt-101 32x8d either")
    raise ValueError(f"{source}: a VNL depth model (YvanYin/VNL_Monocular_Depth_Prediction), whose decoder "
                     f"(FTB/AFA blocks, ASPP or global-pool top) kd_ref's DepthNet does not build; {hint}")


LAYOUTS = LAYOUTS + (
    Layout("VNL depth model", "depth", _any_prefixed("depth_model.encoder_modules."), refuse_vnl_model),
    Layout("FCOS (tianzhi0549/FCOS)", "det", _has("rpn.head.cls_logits.weight"), convert_fcos_state_dict,
           check_model=fcos_resnet_check, recipe_fields=_fcos_recipe_fields),
    Layout("kd_ref depth model", "depth", _has("laterals.c5.0.weight"), _ours),
)


# ----------------------------------------------------------------------------------------------
# python -m kd_ref.convert

def build_model(task: str, arch: str, num_classes: int | None, flavour: str | None,
                model_options: dict | None = None) -> nn.Module:
    """The kd_ref model the converted weights are loaded into (``flavour``: segmentation only;
    ``model_options``: those a layout's code fixes, e.g. an FCOS-code ResNet's stride-in-1x1 bottlenecks)."""
    if task == "seg":
        return segmentors.build_segmentor(arch, num_classes=num_classes, flavour=flavour or "cirkd")
    if flavour is not None:
        raise ValueError(f"--flavour {flavour}: only segmentors have flavours (--task seg)")
    if task == "depth":
        return depth.build_depth_model(arch)
    if task == "det":
        fcos = arch in detectors.FCOS_DETECTORS
        return detectors.build_detector(arch, num_classes, fcos_options=model_options if fcos else None)
    if task == "ins":
        return instance_seg.build_instance_model(arch, num_classes)
    return classifiers.build_classifier(arch, num_classes)


def convert(task: str, arch: str, src: str, dst: str, num_classes: int | None = None,
            flavour: str | None = None) -> tuple[Layout, str]:
    """Write ``src`` (any accepted layout) as a checkpoint with ``model`` in our keys to ``dst``, which must
    not exist yet; returns (recognised layout, description of the model)."""
    if task not in TASKS:
        raise ValueError(f"--task {task}: expected one of {', '.join(TASKS)}")
    if os.path.exists(dst):
        raise ValueError(f"DST {dst}: exists already; choose a new file (nothing is overwritten)")
    source = f"SRC {src}"
    state_dict = tensors_of(read_file(src, source), source)
    layout = recognise(state_dict, source)
    if layout.task != task:
        raise ValueError(f"{source}: a {layout.name} file (a {layout.task} model), not a --task {task} one")
    converted = layout.to_ours(state_dict, source)
    file_classes = implied_model(converted)[1]
    if num_classes is None and file_classes is None and task != "depth":  # a depth model has no classes
        raise ValueError(f"{source}: the file does not show its class count; pass --num-classes")
    options = layout.recipe_fields(converted).get("model_options") if layout.recipe_fields else None
    model = build_model(task, arch, num_classes or file_classes, flavour or (layout.flavours or (None,))[0], options)
    load_weights(model, state_dict, source)
    tmp = f"{dst}.tmp"
    torch.save({"format_version": CHECKPOINT_FORMAT_VERSION, "model": model.state_dict(), "source": os.path.abspath(src), "layout": layout.name,
                "task": task, "arch": arch}, tmp)
    os.replace(tmp, dst)
    return layout, _expected(model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kd_ref.convert",
        description="write released weights (mmseg, CIRKD, SKD, mmdet 2.x detectors, SOLO and Mask R-CNN, torchvision, RepDistiller) or a "
                    "state dict as a kd_ref checkpoint for train.py --teacher-ckpt / --student-init and "
                    "evaluate.py --ckpt")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--arch", required=True, help="kd_ref architecture, e.g. pspnet_r101, retinanet_r101, resnet34")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the file's class count")
    parser.add_argument("--flavour", default=None, choices=segmentors.FLAVOURS,
                        help="segmentors: default the flavour of the file's layout (cirkd for kd_ref files)")
    parser.add_argument("src")
    parser.add_argument("dst")
    args = parser.parse_args(argv)
    try:
        layout, model = convert(args.task, args.arch, args.src, args.dst, args.num_classes, args.flavour)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.src}: recognised a {layout.name} file; wrote {args.arch} ({model}) to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
