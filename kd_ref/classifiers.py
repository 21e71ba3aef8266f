"""Image classifiers of the KD classification benchmarks.

* ImageNet: torchvision's ResNet-18/34/50 (He et al., "Deep Residual Learning for Image Recognition",
  arXiv:1512.03385): the undilated torchvision-flavour trunk of :mod:`kd_ref.backbones`
  (output stride 32), global average pooling, one fully connected layer.
* CIFAR-100: the networks of the KD literature as defined by HobbitLong/RepDistiller (CRD; also
  copied unchanged by megvii-research/mdistiller and the DIST CIFAR code):

  - ``resnet<d>`` (d = 6n + 2) and ``resnet8x4`` / ``resnet32x4``: conv3x3 stem (no max-pool) then three
    stages of n post-activation BasicBlocks, strides 1, 2, 2, widths 16-16-32-64 (x4: 32-64-128-256);
    the same block as torchvision's ResNet, y = relu(BN(conv(relu(BN(conv_s(x))))) + P(x)), with a
    1x1 conv + BN projection P where the shape changes.
  - ``wrn_<d>_<k>`` (Zagoruyko & Komodakis, "Wide Residual Networks", arXiv:1605.07146; d = 6n + 4):
    conv3x3 stem, three stages of n pre-activation blocks of widths 16k, 32k, 64k (strides 1, 2, 2),
    then BN-ReLU before pooling. A block computes a = relu(BN(x)), y = conv(relu(BN(conv_s(a)))) + S,
    with S = x when the shape is kept and S = conv1x1_s(a) otherwise (RepDistiller's ``equalInOut``).

  The reference pools with ``AvgPool2d(8)`` on the 8x8 map of a 32x32 input; global average pooling is
  the same there and also accepts other input sizes (the synthetic data). Init as the reference:
  kaiming-normal (fan_out) convs, BN weight 1 / bias 0, PyTorch's default Linear (WRN: zero bias).

Stage features are named so that ``c5`` is the last stage before pooling in every family:
torchvision ``layer1..layer4`` = ``c2..c5`` (the kd_ref convention), and the three CIFAR stages are
``c3, c4, c5``. A tap name therefore means the same depth from the top for both families (SoKD taps
``c4``: the CIFAR stage-2 output of its res32x4 config, ImageNet stage 3). ``feats["pool"]`` is the
pooled ``(B, D)`` vector that enters the classifier; the WRN stage features are the raw block outputs
(before the final BN-ReLU), as RepDistiller returns them.

``forward(images, targets=None, image_sizes=None, predict=True)`` returns ``{"logits": (B, K),
"feats": {...}}`` plus, in training mode with targets, ``"losses": {"loss_cls": CE(logits, targets)}``
(float32, mean over the batch). ``image_sizes`` and ``predict`` exist for the common model contract.

Released weights: ``convert_torchvision_state_dict`` and ``convert_wrn_state_dict`` map torchvision's
ImageNet files and RepDistiller / mdistiller WRN checkpoints onto our keys (their CIFAR ResNet keys
already are ours); :mod:`kd_ref.convert` recognises those layouts and loads them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_ref.backbones import BasicBlock, Rule, build_backbone, convert_backbone_state_dict, rename_keys

# name -> (depth, stem width and the widths of the three stages)
CIFAR_RESNETS = {
    **{f"resnet{depth}": (depth, (16, 16, 32, 64)) for depth in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
# name -> (depth, widen factor)
WIDE_RESNETS = {f"wrn_{depth}_{widen}": (depth, widen) for depth in (16, 40) for widen in (1, 2)}
IMAGENET_RESNETS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}
CLASSIFIER_NAMES = tuple(IMAGENET_RESNETS) + tuple(CIFAR_RESNETS) + tuple(WIDE_RESNETS)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _init_like_reference(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class Classifier(nn.Module):
    """Stage features -> global average pooling -> ``fc``. Subclasses define ``stages(images) ->
    (named stage features, the map that is pooled)``."""

    def __init__(self, num_classes: int, pooled_channels: int, out_channels: dict[str, int]):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.fc = nn.Linear(pooled_channels, num_classes)
        self.out_channels = {**out_channels, "pool": pooled_channels}

    def forward(self, images: Tensor, targets: Tensor | None = None, image_sizes=None,
                predict: bool = True) -> dict:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        feats, last = self.stages(images)
        feats["pool"] = torch.flatten(F.adaptive_avg_pool2d(last, 1), 1)
        out = {"logits": self.fc(feats["pool"]), "feats": feats}
        if targets is not None and self.training:
            if targets.shape != (images.shape[0],) or targets.is_floating_point():
                raise ValueError(f"targets must be int64 class indices of shape ({images.shape[0]},), "
                                 f"got {targets.dtype} {tuple(targets.shape)}")
            with torch.autocast(images.device.type, enabled=False):
                out["losses"] = {"loss_cls": F.cross_entropy(out["logits"].float(), targets)}
        return out


class ImageNetResNet(Classifier):
    """torchvision ResNet-18/34/50: the torchvision-flavour trunk at output stride 32 + fc."""

    def __init__(self, depth: int, num_classes: int = 1000):
        backbone = build_backbone(depth, "torchvision", output_stride=32)
        super().__init__(num_classes, backbone.out_channels["c5"], backbone.out_channels)
        self.backbone = backbone

    def stages(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        feats = dict(self.backbone(images))
        return feats, feats["c5"]


class CifarResNet(Classifier):
    """RepDistiller ``resnet<d>`` / ``resnet<d>x4``: conv3x3-BN-ReLU stem and three BasicBlock stages."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        stage_names = ("c3", "c4", "c5")
        super().__init__(num_classes, widths[3], dict(zip(stage_names, widths[1:])))
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_channels = widths[0]
        for index, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = []
            for block in range(blocks_per_stage):
                downsample = None
                if block == 0 and (stride != 1 or in_channels != width):
                    downsample = nn.Sequential(nn.Conv2d(in_channels, width, 1, stride=stride, bias=False),
                                               nn.BatchNorm2d(width))
                blocks.append(BasicBlock(in_channels, width, stride if block == 0 else 1, (1, 1), downsample))
                in_channels = width
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.stage_names = stage_names
        _init_like_reference(self)

    def stages(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        x = F.relu(self.bn1(self.conv1(images)))
        feats = {}
        for index, name in enumerate(self.stage_names):
            x = getattr(self, f"layer{index + 1}")(x)
            feats[name] = x
        return feats, x


class WideBasicBlock(nn.Module):
    """Pre-activation WRN block: a = relu(bn1(x)); y = conv2(relu(bn2(conv1_s(a)))) + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        # the projection takes the activated input; an identity shortcut the raw one (RepDistiller)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if in_channels != out_channels else None)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(Classifier):
    """RepDistiller ``wrn_<d>_<k>``: conv3x3 stem, three pre-activation stages, BN-ReLU, pool, fc."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100):
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        stage_names = ("c3", "c4", "c5")
        super().__init__(num_classes, widths[3], dict(zip(stage_names, widths[1:])))
        self.conv1 = _conv3x3(3, widths[0])
        in_channels = widths[0]
        for index, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = []
            for block in range(blocks_per_stage):
                blocks.append(WideBasicBlock(in_channels, width, stride if block == 0 else 1))
                in_channels = width
            self.add_module(f"block{index + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(widths[3])
        self.stage_names = stage_names
        _init_like_reference(self)
        nn.init.zeros_(self.fc.bias)

    def stages(self, images: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        x = self.conv1(images)
        feats = {}
        for index, name in enumerate(self.stage_names):
            x = getattr(self, f"block{index + 1}")(x)
            feats[name] = x
        return feats, F.relu(self.bn(x))


def build_classifier(name: str, num_classes: int) -> Classifier:
    """Build classifier ``name`` (one of ``CLASSIFIER_NAMES``) with ``num_classes`` outputs."""
    if name in IMAGENET_RESNETS:
        model = ImageNetResNet(IMAGENET_RESNETS[name], num_classes)
    elif name in CIFAR_RESNETS:
        model = CifarResNet(*CIFAR_RESNETS[name], num_classes=num_classes)
    elif name in WIDE_RESNETS:
        model = WideResNet(*WIDE_RESNETS[name], num_classes=num_classes)
    else:
        raise ValueError(f"classifier {name!r}: expected one of {', '.join(CLASSIFIER_NAMES)}")
    return model


# ----------------------------------------------------------------------------------------------
# Weights of torchvision and of the CIFAR KD codes

def _rule(pattern: str, replacement: str) -> Rule:
    return re.compile(pattern), lambda match: match.expand(replacement)


# RepDistiller / mdistiller WRN keys -> ours (their ResNet keys already are ours)
_WRN_RULES = [
    _rule(r"block([123])\.layer\.(\d+)\.convShortcut\.", r"block\1.\2.shortcut."),
    _rule(r"block([123])\.layer\.(\d+)\.", r"block\1.\2."),
    _rule(r"bn1\.", "bn."),
    _rule(r"(conv1|fc)\.", r"\1."),
]


def convert_torchvision_state_dict(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """torchvision ImageNet ResNet keys (``conv1``, ``bn1``, ``layerN``, ``fc``) -> ``ImageNetResNet``'s."""
    trunk = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    head = {k: v for k, v in state_dict.items() if k.startswith("fc.")}
    return {**{f"backbone.{k}": v for k, v in convert_backbone_state_dict(trunk, source).items()}, **head}


def convert_wrn_state_dict(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """RepDistiller / mdistiller ``wrn_d_k`` keys (``blockN.layer.i``, ``convShortcut``, ``bn1``) -> ours."""
    return rename_keys(state_dict, _WRN_RULES, source)
