"""Dilated ResNet backbones in the four layouts used by the reference KD codes.

ResNet: He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385.
Dilated ("atrous") stages: Chen et al., "Rethinking Atrous Convolution for Semantic Image
Segmentation", arXiv:1706.05587. Deep 3x3 stem ("V1c"): He et al., "Bag of Tricks for Image
Classification with Convolutional Neural Networks", arXiv:1812.01187.

A residual block computes  y = relu(F(x) + P(x)),  F = stacked conv-BN(-ReLU), P = identity or a
1x1 conv (stride s) + BN projection when the shape changes. Turning a stride-2 stage into a
stride-1 stage with dilation d keeps every later receptive field unchanged while the feature map
stays at output stride (OS) 8 (d = 2 for layer3, 4 for layer4) or 16 (d = 2 for layer4).

The stride of a down-sampling block sits on its 3x3 conv (torchvision "V1.5"/"V1b"), and the
projection shortcut is a strided 1x1 conv + BN, in every flavour. ``stride_in_1x1=True`` moves a
Bottleneck's stride onto its first 1x1 conv instead: the original MSRA ResNet, whose ImageNet weights
maskrcnn-benchmark and tianzhi0549/FCOS start from (their ``STRIDE_IN_1X1``); parameter shapes are the same.

Flavours (all facts from docs/specs/seg_models.md, checked against the public code):

* ``"cirkd"`` -- winycg/CIRKD ``ResNetV1b(deep_stem=True)``: stem 3x3 convs 64-64-128 (stride 2 on
  the first, bias-free, BN, ReLU), MaxPool(3, 2, 1) in floor mode; layer1 therefore starts from 128
  channels and its first block has a projection shortcut even for BasicBlock. Dilation follows
  gluoncv: the first block of a dilated stage uses half the stage dilation in its first 3x3 conv
  (BasicBlock: conv1 d/2, conv2 d; Bottleneck: its single 3x3 conv d/2), later blocks use d.
* ``"skd"`` -- irfanICMLL/structure_knowledge_distillation ``pspnet_combine.ResNet``: the same deep
  stem, but MaxPool(3, 2, 1, ceil_mode=True) (a 512 crop gives 65x65 maps), and uniform dilation
  (every 3x3 conv of a dilated stage uses d, multi-grid (1, 1, 1)). The reference normalises with
  ``InPlaceABNSync(activation='none')`` followed by an explicit ``nn.ReLU``, i.e. plain BN + ReLU,
  which is what we build (the LeakyReLU of InPlace-ABN appears only in the segmentation heads).
* ``"mmseg"`` -- open-mmlab/mmsegmentation ``ResNetV1c`` with ``strides=(1, 2, 1, 1)``,
  ``dilations=(1, 1, 2, 4)``, ``contract_dilation=True``: stem 3x3 convs 32-32-64, layer1 starts
  from 64 channels (no projection in the first R18 block). The first block of a dilated stage uses
  d/2; mmseg's BasicBlock dilates only conv1 (its conv2 always has dilation 1).
* ``"torchvision"`` -- torchvision's ResNet layout (7x7 stride-2 stem, BN, ReLU, MaxPool(3, 2, 1)).
  Dilation as torchvision's ``replace_stride_with_dilation`` (the first block of a dilated stage
  keeps the previous dilation, i.e. d/2); torchvision refuses dilated BasicBlocks, so R18/R34 use
  CIRKD's "vanilla" v1b rule (conv1 d/2, conv2 d in the first block), which coincides with
  the Bottleneck rule. ``output_stride=32`` gives the undilated detection backbone.

Init (all flavours): kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0, as CIRKD does
before it loads ImageNet weights (mmseg additionally zero-inits the last BN of each block, but only
when it trains from scratch, which no reference config does).

``frozen_stages`` / ``norm_eval`` follow mmdetection: ``frozen_stages=k`` stops gradients of the
stem and layer1..layer_k and keeps them in eval mode; ``norm_eval=True`` keeps every BN in eval
mode (frozen running statistics) while the model trains.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

FLAVOURS = ("cirkd", "skd", "mmseg", "torchvision")
DEPTHS = (18, 34, 50, 101)
OUTPUT_STRIDES = (8, 16, 32)
FEATURE_NAMES = ("c2", "c3", "c4", "c5")

_STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# (strides, dilations) of layer1..layer4.
_STAGE_GEOMETRY = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}
# Stem conv widths; a single width means the 7x7 stem.
_STEM_WIDTHS = {"cirkd": (64, 64, 128), "skd": (64, 64, 128), "mmseg": (32, 32, 64), "torchvision": (64,)}
_DILATION_RULE = {"cirkd": "halve_first", "skd": "uniform", "mmseg": "halve_first_conv1_only",
                  "torchvision": "halve_first"}


def _check_choice(argument: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")


def block_dilations(rule: str, stage_dilation: int, block_index: int) -> tuple[int, int]:
    """Dilations (first 3x3 conv, second 3x3 conv) of one block; a Bottleneck uses the first only."""
    first = stage_dilation // 2 if block_index == 0 and stage_dilation > 1 else stage_dilation
    if rule == "halve_first":
        return first, stage_dilation
    if rule == "halve_first_conv1_only":
        return first, 1
    if rule == "uniform":
        return stage_dilation, stage_dilation
    raise ValueError(f"rule must be one of 'halve_first', 'halve_first_conv1_only', 'uniform', got {rule!r}")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation,
                     bias=False)


class BasicBlock(nn.Module):
    """y = relu(BN(conv3x3(relu(BN(conv3x3_s(x))))) + P(x))."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, dilations: tuple[int, int],
                 downsample: nn.Module | None):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride, dilations[0])
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilations[1])
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """y = relu(BN(conv1x1(relu(BN(conv3x3_s(relu(BN(conv1x1(x))))))) + P(x)), width 4*planes."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, dilations: tuple[int, int],
                 downsample: nn.Module | None, stride_in_1x1: bool = False):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = nn.Conv2d(in_channels, planes, 1, stride=stride_1x1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride_3x3, dilations[0])
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def _make_stem(widths: tuple[int, ...], ceil_mode: bool) -> nn.Sequential:
    if len(widths) == 1:
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
    else:
        layers = []
        in_channels = 3
        for index, width in enumerate(widths):
            layers += [_conv3x3(in_channels, width, stride=2 if index == 0 else 1),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            in_channels = width
    layers.append(nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=ceil_mode))
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """ResNet trunk (no pooling / fc) returning OrderedDict(c2=layer1, c3=layer2, c4=layer3, c5=layer4).

    ``stride_in_1x1`` (Bottleneck depths only): the stride of each down-sampling block on its first 1x1 conv."""

    def __init__(self, depth: int, flavour: str, output_stride: int = 8, frozen_stages: int = -1,
                 norm_eval: bool = False, stride_in_1x1: bool = False):
        super().__init__()
        _check_choice("depth", depth, DEPTHS)
        _check_choice("flavour", flavour, FLAVOURS)
        _check_choice("output_stride", output_stride, OUTPUT_STRIDES)
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4 (-1 = nothing frozen), got {frozen_stages}")
        if stride_in_1x1 and depth < 50:
            raise ValueError(f"stride_in_1x1 applies to Bottleneck ResNets (depth 50, 101), got depth {depth}")
        self.depth, self.flavour, self.output_stride = depth, flavour, output_stride
        self.frozen_stages, self.norm_eval, self.stride_in_1x1 = frozen_stages, norm_eval, stride_in_1x1

        block = BasicBlock if depth in (18, 34) else Bottleneck
        block_options = {"stride_in_1x1": True} if stride_in_1x1 else {}
        stem_widths = _STEM_WIDTHS[flavour]
        self.stem = _make_stem(stem_widths, ceil_mode=flavour == "skd")
        strides, dilations = _STAGE_GEOMETRY[output_stride]
        in_channels = stem_widths[-1]
        self.out_channels: dict[str, int] = {}
        for stage, (num_blocks, stride, dilation) in enumerate(
                zip(_STAGE_BLOCKS[depth], strides, dilations)):
            planes = 64 * 2 ** stage
            out_channels = planes * block.expansion
            downsample = None
            if stride != 1 or in_channels != out_channels:
                downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                           nn.BatchNorm2d(out_channels))
            blocks = []
            for index in range(num_blocks):
                blocks.append(block(in_channels if index == 0 else out_channels, planes,
                                    stride if index == 0 else 1,
                                    block_dilations(_DILATION_RULE[flavour], dilation, index),
                                    downsample if index == 0 else None, **block_options))
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            self.out_channels[FEATURE_NAMES[stage]] = out_channels
            in_channels = out_channels

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self._frozen_modules():
            module.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.stem(x)
        feats: OrderedDict[str, Tensor] = OrderedDict()
        for stage, name in enumerate(FEATURE_NAMES):
            x = getattr(self, f"layer{stage + 1}")(x)
            feats[name] = x
        return feats


def build_backbone(depth: int, flavour: str, output_stride: int = 8, pretrained: str | None = None,
                   frozen_stages: int = -1, norm_eval: bool = False, stride_in_1x1: bool = False) -> ResNet:
    """Build a (dilated) ResNet; ``pretrained`` is a local checkpoint path (see ``load_backbone_weights``)."""
    backbone = ResNet(depth, flavour, output_stride, frozen_stages, norm_eval, stride_in_1x1)
    if pretrained is not None:
        load_backbone_weights(backbone, pretrained)
    return backbone


# ----------------------------------------------------------------------------------------------
# Checkpoint loading

def read_torch_file(path: str | Path, source: str, weights_only: bool = False):
    """``torch.load`` of ``path`` on the CPU; a missing, truncated or foreign file raises one line naming
    ``source``. ``weights_only=False`` unpickles fully, as train.py checkpoints (RNG states) need; the
    ImageNet trunk files need no more than tensors and are read with ``weights_only=True``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{source}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as error:
        if not weights_only:
            raise ValueError(f"{source}: cannot be read (UnpicklingError: {_first_line(error)})") from None
        raise ValueError(f"{source}: not loadable with torch.load(weights_only=True); re-save just its state "
                         f"dict ({_first_line(error)})") from None
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{source}: cannot be read ({type(error).__name__}: {_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


def tensors_of(content, source: str) -> dict[str, Tensor]:
    """The state dict a loaded file holds: the file itself, or its ``state_dict`` (mmcv: mmdet, mmseg),
    ``model`` (train.py, RepDistiller, maskrcnn-benchmark) or ``model_state_dict`` (VNL) entry; DataParallel's
    leading ``module.`` is stripped."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(content, Mapping) and isinstance(content.get(key), Mapping):
            content = content[key]
            break
    if not isinstance(content, Mapping) or not content or not all(isinstance(v, Tensor) for v in content.values()):
        found = type(content).__name__
        if isinstance(content, Mapping):
            found += f" with keys {', '.join(map(str, list(content)[:5]))}"
        raise ValueError(f"{source}: expected weights (a state dict of tensors, or a checkpoint holding one "
                         f"under 'state_dict' or 'model'), found {found}")
    return {key.removeprefix("module."): value for key, value in content.items()}


def read_checkpoint(path: str | Path, source: str | None = None, weights_only: bool = False) -> dict[str, Tensor]:
    """Tensor dict of a weights file (see ``read_torch_file`` and ``tensors_of``)."""
    source = source or f"checkpoint {path}"
    return tensors_of(read_torch_file(path, source, weights_only), source)


Rule = tuple[re.Pattern, Callable[[re.Match], str]]


def rename_keys(state_dict: Mapping[str, Tensor], rules: list[Rule], source: str) -> dict[str, Tensor]:
    """Rename each key by the first rule whose pattern matches its start; a rule may map to "" (= drop).

    Keys no rule matches raise a ValueError listing them, so a wrong checkpoint fails loudly.
    """
    renamed: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        for pattern, replace in rules:
            match = pattern.match(key)
            if match:
                prefix = replace(match)
                if prefix:
                    renamed[prefix + key[match.end():]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: cannot map {len(unknown)} checkpoint key(s): {_preview(unknown)}")
    return renamed


def _stem_rule(prefix: str, target: str) -> Rule:
    # Stem conv k / bn k (torchvision: k = 1 only; caffe-style deep stem: k = 1..3) sit at indices
    # 3(k-1) and 3(k-1)+1 of our stem Sequential (conv, bn, relu triplets), which is also mmseg's layout.
    def replace(match: re.Match) -> str:
        return f"{target}stem.{3 * (int(match[2]) - 1) + (match[1] == 'bn')}."
    return re.compile(rf"{re.escape(prefix)}(conv|bn)([123])\."), replace


def backbone_key_rules(prefix: str = "", target: str = "") -> list[Rule]:
    """Rules mapping ``prefix``+{torchvision, caffe deep-stem, mmcv V1c, ours} keys to ``target``+ours."""
    return [
        _stem_rule(prefix, target),
        (re.compile(rf"{re.escape(prefix)}(stem\.\d+\.|layer[1-4]\.)"), lambda match: target + match[1]),
    ]


def convert_backbone_state_dict(state_dict: Mapping[str, Tensor],
                                source: str = "checkpoint") -> dict[str, Tensor]:
    """Map an ImageNet ResNet state dict to our keys; ``fc.*`` (classifier) is dropped.

    Accepted layouts: torchvision (conv1/bn1/layerN/fc), CIRKD / pytorch-segmentation-toolbox deep
    stem "resnet*-imagenet.pth" (conv1/bn1/conv2/bn2/conv3/bn3/layerN/fc), mmcv V1c
    (stem.0/stem.1/stem.3/.../layerN) and ours (stem.i/layerN). Block-internal names are the same
    in all of them.
    """
    drop_fc: Rule = (re.compile(r"fc\."), lambda match: "")
    return rename_keys(state_dict, backbone_key_rules() + [drop_fc], source)


# Whole-model files keep their trunk under one prefix: mmdet, mmseg and kd_ref models under "backbone.",
# CIRKD segmentors under "pretrained.". SKD segmentors keep it at the top level next to their heads.
_TRUNK_PREFIXES = ("backbone.", "pretrained.")
_SKD_HEAD_PREFIXES = ("pspmodule.", "head.", "dsn.")


def backbone_part(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The trunk's weights of a detector / segmentor / classifier file (the whole dict otherwise)."""
    for prefix in _TRUNK_PREFIXES:
        part = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if part:
            return part
    if any(key.startswith(("pspmodule.", "dsn.", "head.0.stages.")) for key in state_dict):
        return {key: value for key, value in state_dict.items() if not key.startswith(_SKD_HEAD_PREFIXES)}
    return dict(state_dict)


_DEPTH_OF_BLOCKS = {(blocks, depth >= 50): depth for depth, blocks in _STAGE_BLOCKS.items()}


def describe_backbone(state_dict: Mapping[str, Tensor], prefix: str = "") -> str:
    """``"ResNet-101 (deep stem 64-64-128)"``: the trunk that our-layout keys under ``prefix`` imply."""
    blocks = tuple(len({key[len(f"{prefix}layer{stage}."):].split(".")[0] for key in state_dict
                        if key.startswith(f"{prefix}layer{stage}.")}) for stage in range(1, 5))
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state_dict
    depth = _DEPTH_OF_BLOCKS.get((blocks, bottleneck))
    name = f"ResNet-{depth}" if depth else f"ResNet with {'-'.join(map(str, blocks))} blocks per stage"
    stem = state_dict.get(f"{prefix}stem.0.weight")
    if stem is None:
        return f"{name} (no stem)"
    if stem.shape[-1] == 7:
        return f"{name} (7x7 stem)"
    widths = [state_dict[f"{prefix}stem.{index}.weight"].shape[0] for index in (0, 3, 6)
              if f"{prefix}stem.{index}.weight" in state_dict]
    return f"{name} (deep stem {'-'.join(map(str, widths))})"


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """load_state_dict that reports missing / unexpected / mis-shaped keys together in a one-line ValueError.

    Missing BN ``num_batches_tracked`` counters are tolerated (old torchvision and InPlace-ABN
    checkpoints have none; they only matter for momentum=None) and keep the module's own value.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or mismatched:
        problems = [f"{len(keys)} {label} (e.g. {_preview(keys)})" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
                    if keys]
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))
    module.load_state_dict({**own, **state_dict})


def load_backbone_weights(backbone: ResNet, path: str | Path) -> None:
    """Load ImageNet weights from a local file in any layout ``convert_backbone_state_dict`` accepts, or
    the trunk of a whole detector / segmentor / classifier file (``backbone_part``)."""
    source = f"pretrained weights {path}"
    state_dict = convert_backbone_state_dict(backbone_part(read_checkpoint(path, source, weights_only=True)), source)
    found, expected = describe_backbone(state_dict), describe_backbone(backbone.state_dict())
    if found != expected:
        raise ValueError(f"{source}: holds a {found}; the model's {backbone.flavour}-flavour backbone is a "
                         f"{expected}")
    load_state_dict_checked(backbone, state_dict, source)


def _preview(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... ({len(keys) - limit} more)"
