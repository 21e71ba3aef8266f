"""MobileNetV2 trunk (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
arXiv:1801.04381) in torchvision's layout, the student backbone of SKD's depth and FCOS rows.

The trunk is torchvision's ``mobilenet_v2().features[:18]`` (the 1x1 conv to 1280 channels and the
classifier are dropped), so torchvision's ImageNet file (``mobilenet_v2-b0353104.pth`` /
``mobilenet_v2-7ebf99e0.pth``) loads key for key. Features are tapped after ``features[3]``, ``[6]``,
``[13]`` and ``[17]`` (strides 4, 8, 16, 32; 24, 32, 96 and 320 channels) and named c2..c5 like the
ResNet stages, which is also where FCOS's MNV2-FPN reads them (``return_features_indices``) and where the
FPN of SoKD's detectron2 MobileNetV2 student reads its m2..m5 (``kd_ref.detectors.MOBILENET_DETECTORS``).

Three other codes lay the same weights out differently, and ``--pretrained`` takes each of them:

* tonylins/pytorch-mobilenet-v2 (its ImageNet ``mobilenet_v2.pth.tar``; the FCOS code's MobileNetV2 is a
  copy): ``features.0`` conv-BN stem, a flat ``conv`` Sequential per block (conv, BN, ReLU6 triplets and a
  final conv, BN), ``features.18`` (1x1 to 1280) and ``classifier.1``; ``tonylins_key`` renames a key.
* VNL (YvanYin/VNL_Monocular_Depth_Prediction, ``lib/models/MobileNetV2.py``) keeps tonylins's blocks in
  five stages ``depth_model.encoder_modules.bottomup.res1..res5`` (features 0, 1-3, 4-6, 7-13, 14-17);
  its stride-8 encoder dilates res4/res5 where ours strides, with the same parameter shapes.
"""
from __future__ import annotations

import re
from collections import OrderedDict

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


VNL_ENCODER = "depth_model.encoder_modules.bottomup."
_VNL_STAGE_START = {"res1": 0, "res2": 1, "res3": 4, "res4": 7, "res5": 14}


def _vnl_to_tonylins(key: str) -> str:
    stage, index, rest = key[len(VNL_ENCODER):].split(".", 2)
    if stage == "res1":  # Sequential(conv_bn): res1.0.{0,1} is features.0.{0,1}
        return f"features.0.{rest}"
    return f"features.{_VNL_STAGE_START[stage] + int(index)}.{rest}"


def mobilenet_trunk_part(state_dict: dict) -> dict[str, Tensor]:
    """The trunk's keys, in torchvision's names, of a torchvision, tonylins or VNL MobileNetV2 file or of a
    whole model holding one under ``backbone.``: ``features.0..17``; the last 1x1 conv (``features.18``),
    ``classifier`` and VNL's decoder are dropped."""
    if any(key.startswith(VNL_ENCODER) for key in state_dict):
        part = {_vnl_to_tonylins(key): value for key, value in state_dict.items() if key.startswith(VNL_ENCODER)}
    else:
        part = backbone_part(state_dict)
    if "features.1.conv.0.weight" in part:  # tonylins's flat blocks (torchvision: features.1.conv.0.0.weight)
        part = {tonylins_key(key): value for key, value in part.items()
                if not key.startswith("features.") or int(key.split(".")[1]) < NUM_TRUNK_BLOCKS}
    return {key: value for key, value in part.items()
            if key.startswith("features.") and int(key.split(".")[1]) < NUM_TRUNK_BLOCKS}


def load_mobilenet_weights(backbone: MobileNetV2Backbone, path: str) -> None:
    """Load an ImageNet MobileNetV2 file (torchvision's or tonylins's), a VNL model's MobileNetV2 encoder or
    our backbone's keys into ``backbone``."""
    source = f"pretrained weights {path}"
    trunk = mobilenet_trunk_part(read_checkpoint(path, source, weights_only=True))
    if not trunk:
        raise ValueError(f"{source}: holds no MobileNetV2 'features.*' keys (expected torchvision's or tonylins's "
                         "mobilenet_v2 ImageNet file, or a VNL MobileNetV2 depth model)")
    load_state_dict_checked(backbone, trunk, source)


# Position in tonylins's flat ``conv`` Sequential -> torchvision's nested one, for the expanding blocks (pw,
# dw, pw-linear) and the first block (expand ratio 1: dw, pw-linear).
_TONYLINS_EXPANDING = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_TONYLINS_FIRST_BLOCK = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_TONYLINS_BLOCK_KEY = re.compile(r"features\.(\d+)\.conv\.(\d+)\.(.+)")


def tonylins_key(key: str) -> str:
    """One ``features.*`` key of tonylins's MobileNetV2 -> torchvision's (the stem is the same)."""
    match = _TONYLINS_BLOCK_KEY.fullmatch(key)
    if match is None:
        return key
    block, position, rest = match.groups()
    table = _TONYLINS_FIRST_BLOCK if block == "1" else _TONYLINS_EXPANDING
    if position not in table:
        raise ValueError(f"{key}: not a conv or BN position of a tonylins MobileNetV2 block")
    return f"features.{block}.conv.{table[position]}.{rest}"


def build_mobilenet_v2(pretrained: str | None = None, norm_eval: bool = False) -> MobileNetV2Backbone:
    backbone = MobileNetV2Backbone(norm_eval)
    if pretrained is not None:
        load_mobilenet_weights(backbone, pretrained)
    return backbone

