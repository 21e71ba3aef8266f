"""MobileNetV2 trunk (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
arXiv:1801.04381) in torchvision's layout, the student backbone of SKD's depth and FCOS rows.

The trunk is torchvision's ``mobilenet_v2().features[:18]`` (the 1x1 conv to 1280 channels and the
classifier are dropped), so torchvision's ImageNet file (``mobilenet_v2-b0353104.pth`` /
``mobilenet_v2-7ebf99e0.pth``) loads key for key. Features are tapped after ``features[3]``, ``[6]``,
``[13]`` and ``[17]`` (strides 4, 8, 16, 32; 24, 32, 96 and 320 channels) and named c2..c5 like the
ResNet stages, which is also where FCOS's MNV2-FPN reads them (``return_features_indices``).

``convert_fcos_mobilenet_keys`` maps the MobileNetV2 of the FCOS code (tonylins/pytorch-mobilenet-v2:
a flat ``conv`` Sequential per block) onto these keys.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2

from kd_ref.backbones import backbone_part, load_state_dict_checked, read_checkpoint

TAP_INDICES = {"c2": 3, "c3": 6, "c4": 13, "c5": 17}
NUM_TRUNK_BLOCKS = 18


class MobileNetV2Backbone(nn.Module):
    """torchvision MobileNetV2 features 0..17 returning OrderedDict(c2, c3, c4, c5).

    ``norm_eval=True`` keeps every BN in eval mode while training (frozen statistics). All layers train:
    FCOS's MNV2 config freezes none (``FREEZE_CONV_BODY_AT: 0``)."""

    def __init__(self, norm_eval: bool = False):
        super().__init__()
        self.features = mobilenet_v2(weights=None).features[:NUM_TRUNK_BLOCKS]
        self.norm_eval = norm_eval
        self.out_channels = {name: self.features[index].out_channels for name, index in TAP_INDICES.items()}

    def train(self, mode: bool = True) -> MobileNetV2Backbone:
        super().train(mode)
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats: OrderedDict[str, Tensor] = OrderedDict()
        taps = {index: name for name, index in TAP_INDICES.items()}
        for index, block in enumerate(self.features):
            x = block(x)
            if index in taps:
                feats[taps[index]] = x
        return feats


def mobilenet_trunk_part(state_dict: dict) -> dict[str, Tensor]:
    """The trunk's keys of a torchvision MobileNetV2 file or of a whole model holding one under
    ``backbone.``: ``features.0..17``; the last 1x1 conv (``features.18``) and ``classifier`` are dropped."""
    part = backbone_part(state_dict)
    return {key: value for key, value in part.items()
            if key.startswith("features.") and int(key.split(".")[1]) < NUM_TRUNK_BLOCKS}


def load_mobilenet_weights(backbone: MobileNetV2Backbone, path: str) -> None:
    """Load torchvision's ImageNet MobileNetV2 file (or our backbone's keys) into ``backbone``."""
    source = f"pretrained weights {path}"
    trunk = mobilenet_trunk_part(read_checkpoint(path, source, weights_only=True))
    if not trunk:
        raise ValueError(f"{source}: holds no MobileNetV2 'features.*' keys (expected torchvision's "
                         "mobilenet_v2 ImageNet file)")
    load_state_dict_checked(backbone, {f"features.{key[len('features.'):]}": value for key, value in trunk.items()},
                            source)


# In the FCOS code's MobileNetV2, block k's ``conv`` Sequential is flat: conv, BN, ReLU6 triplets and a
# final conv, BN; torchvision nests each conv-BN-ReLU6 in its own Sequential. Position -> ours, for the
# expanding blocks (pw, dw, pw-linear) and the first block (expand ratio 1: dw, pw-linear).
_FCOS_EXPANDING = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_FCOS_FIRST_BLOCK = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_FCOS_BLOCK_KEY = re.compile(r"features\.(\d+)\.conv\.(\d+)\.(.+)")


def convert_fcos_mobilenet_keys(key: str) -> str:
    """One ``features.*`` key of the FCOS code's MobileNetV2 -> torchvision's (the stem is the same)."""
    match = _FCOS_BLOCK_KEY.fullmatch(key)
    if match is None:
        return key
    block, position, rest = match.groups()
    table = _FCOS_FIRST_BLOCK if block == "1" else _FCOS_EXPANDING
    if position not in table:
        raise ValueError(f"{key}: not a conv or BN position of an FCOS MobileNetV2 block")
    return f"features.{block}.conv.{table[position]}.{rest}"


def build_mobilenet_v2(pretrained: str | None = None, norm_eval: bool = False) -> MobileNetV2Backbone:
    backbone = MobileNetV2Backbone(norm_eval)
    if pretrained is not None:
        load_mobilenet_weights(backbone, pretrained)
    return backbone

