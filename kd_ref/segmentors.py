"""PSPNet and DeepLabV3 segmentors (+ FCN auxiliary head) in the layouts of the reference KD codes.

PSPNet: Zhao et al., "Pyramid Scene Parsing Network", arXiv:1612.01105 -- the c5 map x is average
pooled to b x b bins (b = 1, 2, 3, 6), each pooled map goes through conv1x1-BN-act and is upsampled
back; concat(x, up_1, up_2, up_3, up_6) -> conv3x3-BN-act -> dropout = "head" feature -> conv1x1.
DeepLabV3: Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation",
arXiv:1706.05587 -- ASPP = concat(conv1x1(x), conv3x3_r12(x), conv3x3_r24(x), conv3x3_r36(x),
up(conv1x1(avgpool(x)))) (each conv-BN-ReLU), then the flavour's fusion convs -> "head" -> conv1x1.
Auxiliary FCN head on c4 (= layer3): conv3x3-BN-act -> dropout -> conv1x1.

Task loss (training mode with targets), logits upsampled bilinearly to the label size, in float32:
    loss_seg = CE(up(logits), y),   loss_seg_aux = 0.4 * CE(up(aux_logits), y),   ignore label 255.

Flavours (facts: docs/specs/seg_models.md; checked against the public code):

* ``"cirkd"`` (winycg/CIRKD before the 2025 "CIRKDV2" commit 351400e, the version behind the
  published tables): PSP branches C5/4 wide, input first in the concat, head width P = 128 (c5 512)
  / 512 (c5 2048), nn.Dropout(0.1). ASPP width 128 (c5 512) / 256 (c5 2048); fusion = conv1x1
  (5D -> D)-BN-ReLU-Dropout(0.5) then conv3x3-BN-ReLU-Dropout(0.1) (= ``x_feat_after_aspp``).
  Aux: conv3x3 (C4 -> C4/4, no bias)-BN-ReLU-Dropout(0.1)-conv1x1. align_corners=True everywhere.
  Heads keep PyTorch's default init (the reference sets none).
* ``"torchvision"``: the cirkd heads on the 7x7-stem backbone (CIRKD's ``resnet*_vanilla``).
* ``"skd"`` (irfanICMLL/structure_knowledge_distillation, ``pspnet_combine``; PSPNet only): head
  BN is InPlace-ABN with its default LeakyReLU(0.01); branches P wide (P = 128 / 512), pooled maps
  first in the concat, Dropout2d(0.1). The aux ("dsn") head is conv3x3 C4 -> P **with bias**,
  BN-LeakyReLU, Dropout2d(0.1), conv1x1. align_corners=True. Default PyTorch init.
* ``"mmseg"`` (mmsegmentation 0.20 PSPHead / ASPPHead / FCNHead of the ``*_r{18,50,101}-d8``
  configs): width 128 (c5 512) / 512 (c5 2048) for both heads, PSP branches as wide as the head,
  input first; ASPP = concat(image pool, conv1x1, r12, r24, r36) -> conv3x3-BN-ReLU (no 1x1
  projection, no Dropout(0.5)); aux FCN C4 -> C4/4 (one conv, no input concat); Dropout2d(0.1)
  before each classifier; align_corners=False in the heads and in the loss; conv init
  kaiming-normal (fan_out), classifiers normal(std 0.01). mmseg 0.20's CrossEntropyLoss averages
  over **all** label pixels (ignored ones contribute 0; ``avg_non_ignore`` only arrived in 0.23),
  so this flavour divides the summed CE by the pixel count instead of the valid-pixel count.

``forward`` follows the kd_ref model contract and returns {"logits", "aux_logits" (whenever the aux
head exists, also in eval mode), "feats": {"c2".."c5", "head"}, "losses" (training with targets)}.
``convert_reference_state_dict`` maps released CIRKD / SKD / mmseg checkpoints onto our keys
(:mod:`kd_ref.convert` recognises the layout and loads them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_ref.backbones import FLAVOURS, ResNet, Rule, backbone_key_rules, build_backbone, rename_keys

ARCHITECTURES = ("pspnet", "deeplabv3")
SEGMENTOR_NAMES = tuple(f"{arch}_r{depth}" for arch in ARCHITECTURES for depth in (18, 34, 50, 101))
IGNORE_INDEX = 255
AUX_LOSS_WEIGHT = 0.4
PSP_BINS = (1, 2, 3, 6)
ASPP_RATES = (12, 24, 36)


@dataclass(frozen=True)
class HeadStyle:
    """Per-flavour conventions shared by all heads of one segmentor."""

    activation: Callable[[], nn.Module]
    dropout: type[nn.Module]
    align_corners: bool
    loss_over_all_pixels: bool


_STYLES = {
    "cirkd": HeadStyle(lambda: nn.ReLU(inplace=True), nn.Dropout, True, False),
    "torchvision": HeadStyle(lambda: nn.ReLU(inplace=True), nn.Dropout, True, False),
    "skd": HeadStyle(lambda: nn.LeakyReLU(0.01, inplace=True), nn.Dropout2d, True, False),
    "mmseg": HeadStyle(lambda: nn.ReLU(inplace=True), nn.Dropout2d, False, True),
}


def _conv_bn_act(in_channels: int, out_channels: int, kernel_size: int, style: HeadStyle,
                 dilation: int = 1, bias: bool = False) -> list[nn.Module]:
    padding = dilation * (kernel_size // 2)
    return [nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=bias),
            nn.BatchNorm2d(out_channels), style.activation()]


class PyramidPoolingHead(nn.Module):
    """PSP head; returns (logits, head feature after the dropout)."""

    def __init__(self, in_channels: int, branch_channels: int, channels: int, num_classes: int,
                 style: HeadStyle, input_first: bool):
        super().__init__()
        self.align_corners, self.input_first = style.align_corners, input_first
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(bins), *_conv_bn_act(in_channels, branch_channels, 1, style))
            for bins in PSP_BINS)
        concat_channels = in_channels + len(PSP_BINS) * branch_channels
        self.bottleneck = nn.Sequential(*_conv_bn_act(concat_channels, channels, 3, style))
        self.dropout = style.dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = [F.interpolate(branch(x), x.shape[-2:], mode="bilinear", align_corners=self.align_corners)
                  for branch in self.branches]
        parts = [x] + pooled if self.input_first else pooled + [x]
        feature = self.dropout(self.bottleneck(torch.cat(parts, dim=1)))
        return self.classifier(feature), feature


class ASPPHead(nn.Module):
    """DeepLabV3 head; returns (logits, head feature after the last dropout).

    ``project=True`` is CIRKD's fusion (conv1x1-BN-ReLU-Dropout(0.5) before the conv3x3, branch
    order [1x1, r12, r24, r36, pool]); ``project=False`` is mmseg's (conv3x3 on the concat, order
    [pool, 1x1, r12, r24, r36]).
    """

    def __init__(self, in_channels: int, channels: int, num_classes: int, style: HeadStyle, project: bool):
        super().__init__()
        self.align_corners, self.image_pool_first = style.align_corners, not project
        self.branches = nn.ModuleList(
            [nn.Sequential(*_conv_bn_act(in_channels, channels, 1, style))]
            + [nn.Sequential(*_conv_bn_act(in_channels, channels, 3, style, dilation=rate)) for rate in ASPP_RATES])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_act(in_channels, channels, 1, style))
        concat_channels = (len(ASPP_RATES) + 2) * channels
        if project:
            self.project = nn.Sequential(*_conv_bn_act(concat_channels, channels, 1, style), nn.Dropout(0.5))
            concat_channels = channels
        else:
            self.project = None
        self.bottleneck = nn.Sequential(*_conv_bn_act(concat_channels, channels, 3, style))
        self.dropout = style.dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pooled = F.interpolate(self.image_pool(x), x.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        parts = [branch(x) for branch in self.branches]
        parts = [pooled] + parts if self.image_pool_first else parts + [pooled]
        fused = torch.cat(parts, dim=1)
        if self.project is not None:
            fused = self.project(fused)
        feature = self.dropout(self.bottleneck(fused))
        return self.classifier(feature), feature


class FCNHead(nn.Module):
    """Auxiliary head: conv3x3-BN-act -> dropout -> conv1x1 logits."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, style: HeadStyle, conv_bias: bool):
        super().__init__()
        self.block = nn.Sequential(*_conv_bn_act(in_channels, channels, 3, style, bias=conv_bias))
        self.dropout = style.dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.block(x)))


def segmentation_ce(logits: Tensor, targets: Tensor, align_corners: bool, over_all_pixels: bool) -> Tensor:
    """CE of bilinearly upsampled logits in float32, ignore label 255.

    Mean over valid pixels, or (``over_all_pixels``) over all pixels as mmseg 0.20 does. A crop with
    no valid pixel gives 0 instead of the 0/0 NaN of the reference losses.
    """
    with torch.autocast(logits.device.type, enabled=False):
        upsampled = F.interpolate(logits.float(), targets.shape[-2:], mode="bilinear", align_corners=align_corners)
        total = F.cross_entropy(upsampled, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        if over_all_pixels:
            return total / targets.numel()
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


class Segmentor(nn.Module):
    """Backbone + decode head (+ aux head on c4); forward follows the kd_ref model contract."""

    def __init__(self, backbone: ResNet, decode_head: nn.Module, aux_head: nn.Module | None, *,
                 flavour: str, num_classes: int, head_channels: int):
        super().__init__()
        self.backbone, self.decode_head, self.aux_head = backbone, decode_head, aux_head
        self.flavour, self.num_classes = flavour, num_classes
        self.align_corners = _STYLES[flavour].align_corners
        self.loss_over_all_pixels = _STYLES[flavour].loss_over_all_pixels
        self.out_channels = {**backbone.out_channels, "head": head_channels}

    def forward(self, images: Tensor, targets: Tensor | None = None, image_sizes=None,
                predict: bool = True) -> dict:
        with_losses = targets is not None and self.training
        if with_losses and (targets.dim() != 3 or targets.shape[0] != images.shape[0]):
            raise ValueError(f"targets must be (B, H, W) label maps with B = {images.shape[0]}, "
                             f"got shape {tuple(targets.shape)}")
        feats = dict(self.backbone(images))
        logits, feats["head"] = self.decode_head(feats["c5"])
        out = {"logits": logits, "feats": feats}
        if self.aux_head is not None:
            out["aux_logits"] = self.aux_head(feats["c4"])
        if with_losses:
            out["losses"] = self.losses(out, targets)
        return out

    def losses(self, out: dict, targets: Tensor) -> dict[str, Tensor]:
        """Weighted task losses from the outputs of ``forward``; ``targets`` (B, H, W), 255 = ignore."""
        losses = {"loss_seg": segmentation_ce(out["logits"], targets, self.align_corners,
                                              self.loss_over_all_pixels)}
        if "aux_logits" in out:
            losses["loss_seg_aux"] = AUX_LOSS_WEIGHT * segmentation_ce(
                out["aux_logits"], targets, self.align_corners, self.loss_over_all_pixels)
        return losses


def _head_channels(arch: str, flavour: str, c5_channels: int) -> int:
    if flavour == "mmseg":
        return 128 if c5_channels == 512 else 512
    if arch == "deeplabv3":
        return 128 if c5_channels == 512 else 256
    return 128 if c5_channels == 512 else 512


def build_segmentor(name: str, num_classes: int = 19, flavour: str = "cirkd",
                    pretrained_backbone: str | None = None, aux: bool = True,
                    output_stride: int = 8) -> Segmentor:
    """Build e.g. ``build_segmentor("deeplabv3_r101", flavour="cirkd")``; see the module docstring."""
    if name not in SEGMENTOR_NAMES:
        raise ValueError(f"name must be one of {SEGMENTOR_NAMES}, got {name!r}")
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    arch, depth = name.split("_r")
    if flavour == "skd" and arch != "pspnet":
        raise ValueError(f"flavour 'skd' defines PSPNet only (the SKD code has no DeepLabV3), got {name!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    backbone = build_backbone(int(depth), flavour, output_stride, pretrained_backbone)
    style = _STYLES[flavour]
    c4_channels, c5_channels = backbone.out_channels["c4"], backbone.out_channels["c5"]
    channels = _head_channels(arch, flavour, c5_channels)
    if arch == "pspnet":
        branch_channels = c5_channels // 4 if flavour in ("cirkd", "torchvision") else channels
        decode_head = PyramidPoolingHead(c5_channels, branch_channels, channels, num_classes, style,
                                         input_first=flavour != "skd")
    else:
        decode_head = ASPPHead(c5_channels, channels, num_classes, style, project=flavour != "mmseg")
    aux_head = None
    if aux:
        aux_channels = channels if flavour == "skd" else c4_channels // 4
        aux_head = FCNHead(c4_channels, aux_channels, num_classes, style, conv_bias=flavour == "skd")
    if flavour == "mmseg":
        for head in (decode_head, aux_head):
            if head is not None:
                _init_like_mmseg(head)
    return Segmentor(backbone, decode_head, aux_head, flavour=flavour, num_classes=num_classes,
                     head_channels=channels)


def _init_like_mmseg(head: nn.Module) -> None:
    for module in head.modules():
        if isinstance(module, nn.Conv2d):
            if module is head.classifier:
                nn.init.normal_(module.weight, std=0.01)
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------
# Released checkpoints of the reference codes -> our keys

def _rule(pattern: str, replace: str | Callable[[re.Match], str]) -> Rule:
    return re.compile(pattern), (replace if callable(replace) else (lambda match: match.expand(replace)))


def _cirkd_rules() -> list[Rule]:
    # CIRKD: backbone under "pretrained." (ResNetV1b names), "head." (_DeepLabHead / _PSPHead),
    # "auxlayer.block" = Sequential(conv, bn, relu, dropout, conv).
    return backbone_key_rules("pretrained.", "backbone.") + [
        _rule(r"head\.aspp\.b0\.([01])\.", r"decode_head.branches.0.\1."),
        _rule(r"head\.aspp\.b([123])\.block\.([01])\.", r"decode_head.branches.\1.\2."),
        _rule(r"head\.aspp\.b4\.gap\.([12])\.", r"decode_head.image_pool.\1."),
        _rule(r"head\.aspp\.project\.([01])\.", r"decode_head.project.\1."),
        _rule(r"head\.psp\.conv([1-4])\.([01])\.",
              lambda m: f"decode_head.branches.{int(m[1]) - 1}.{int(m[2]) + 1}."),
        _rule(r"head\.block\.([01])\.", r"decode_head.bottleneck.\1."),
        _rule(r"head\.block\.4\.", "decode_head.classifier."),
        _rule(r"head\.classifier\.", "decode_head.classifier."),
        _rule(r"auxlayer\.block\.([01])\.", r"aux_head.block.\1."),
        _rule(r"auxlayer\.block\.4\.", "aux_head.classifier."),
    ]


def _skd_rules() -> list[Rule]:
    # SKD: backbone at top level; "pspmodule.stages.i" = Sequential(pool, conv, abn),
    # "pspmodule.bottleneck" = Sequential(conv, abn, dropout), "head" = classifier conv,
    # "dsn" = Sequential(conv, abn, dropout, conv). The pytorch-segmentation-toolbox teacher it
    # loads stores the PSP module under "head.0." and the classifier under "head.1.".
    psp_rules = []
    for psp in (r"pspmodule\.", r"head\.0\."):
        psp_rules += [_rule(psp + r"stages\.(\d)\.([12])\.", r"decode_head.branches.\1.\2."),
                      _rule(psp + r"bottleneck\.([01])\.", r"decode_head.bottleneck.\1.")]
    return backbone_key_rules("", "backbone.") + psp_rules + [
        _rule(r"head\.(1\.)?", "decode_head.classifier."),
        _rule(r"dsn\.([01])\.", r"aux_head.block.\1."),
        _rule(r"dsn\.3\.", "aux_head.classifier."),
        _rule(r"fc\.", ""),  # SKD's teacher loader skips ImageNet classifier leftovers too
    ]


def _mmseg_rules() -> list[Rule]:
    # mmseg: ConvModule = {conv, bn}; backbone keys already match ours.
    return backbone_key_rules("backbone.", "backbone.") + [
        _rule(r"decode_head\.psp_modules\.(\d)\.1\.conv\.", r"decode_head.branches.\1.1."),
        _rule(r"decode_head\.psp_modules\.(\d)\.1\.bn\.", r"decode_head.branches.\1.2."),
        _rule(r"decode_head\.image_pool\.1\.conv\.", "decode_head.image_pool.1."),
        _rule(r"decode_head\.image_pool\.1\.bn\.", "decode_head.image_pool.2."),
        _rule(r"decode_head\.aspp_modules\.(\d)\.conv\.", r"decode_head.branches.\1.0."),
        _rule(r"decode_head\.aspp_modules\.(\d)\.bn\.", r"decode_head.branches.\1.1."),
        _rule(r"decode_head\.bottleneck\.conv\.", "decode_head.bottleneck.0."),
        _rule(r"decode_head\.bottleneck\.bn\.", "decode_head.bottleneck.1."),
        _rule(r"decode_head\.conv_seg\.", "decode_head.classifier."),
        _rule(r"auxiliary_head\.convs\.0\.conv\.", "aux_head.block.0."),
        _rule(r"auxiliary_head\.convs\.0\.bn\.", "aux_head.block.1."),
        _rule(r"auxiliary_head\.conv_seg\.", "aux_head.classifier."),
    ]


_REFERENCE_RULES = {"cirkd": _cirkd_rules, "torchvision": _cirkd_rules, "skd": _skd_rules,
                    "mmseg": _mmseg_rules}


def convert_reference_state_dict(state_dict: Mapping[str, Tensor], flavour: str,
                                 source: str | None = None) -> dict[str, Tensor]:
    """Map a released segmentation checkpoint of the flavour's reference code onto our keys.

    cirkd / torchvision: CIRKD ``DeepLabV3`` / ``PSPNet`` (``pretrained.*``, ``head.*``, ``auxlayer.*``);
    skd: SKD ``pspnet_combine`` (``conv1``.., ``pspmodule.*``, ``head.*``, ``dsn.*``, or the toolbox
    teacher's ``head.0.*`` / ``head.1.*``); mmseg: ``backbone.*``, ``decode_head.*``,
    ``auxiliary_head.*``. A leading ``module.`` is stripped; unknown keys raise a ValueError.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    stripped = {key.removeprefix("module."): value for key, value in state_dict.items()}
    return rename_keys(stripped, _REFERENCE_RULES[flavour](), source=source or f"{flavour} reference checkpoint")
