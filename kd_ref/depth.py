"""Monocular depth estimation in the VNL style (Yin et al., "Enforcing geometric constraints of virtual
normal for depth prediction", arXiv:1907.12209; code YvanYin/VNL_Monocular_Depth_Prediction), the depth
task of SKD (Liu et al., "Structured Knowledge Distillation for Dense Prediction", arXiv:1903.04197).

Depth is classified into K bins of equal width in log10 depth between ``d_min`` and ``d_max``; the
network's bin logits are trained with a cross-entropy whose one-hot target is softened over neighbouring
bins (``weighted_bin_ce``), plus the virtual-normal loss on the soft-decoded depth (``bins_to_depth``).
Classifying depth gives teacher and student the same per-pixel distribution over K bins, so SKD's
pixel-wise term applies exactly as in segmentation.

Metrics (VNL ``evaluate_err``) are pooled over every valid pixel of the test set: ``depth_metrics``
returns sums and a pixel count per batch, ``finish_depth_metrics`` divides the totals once.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnext101_32x8d

from kd_ref.backbones import build_backbone, load_state_dict_checked, read_checkpoint
from kd_ref.mobilenet import build_mobilenet_v2

INVALID_DEPTH = 1e-8        # gt depth below this is a hole (the sensor returned 0)
VN_MIN_Z = 1e-4             # a virtual-normal triplet needs every gt point in front of the camera
VN_MIN_DIFF = 0.005         # metres: triplets whose points nearly coincide give no normal
VN_MAX_COS = 0.867          # |cos| above this between two edges: the triplet is nearly collinear
# NYUDv2 Eigen crop of the 480x640 maps (VNL and most depth papers evaluate only inside it).
EIGEN_CROP = (45, 471, 41, 601)
DEPTH_METRIC_NAMES = ("rel", "sq_rel", "rms", "log10", "delta1", "delta2", "delta3")
DEPTH_SUM_NAMES = ("count", "abs_rel", "sq_rel", "sq_err", "log10", "delta1", "delta2", "delta3")


# ----------------------------------------------------------------------------------------------------
# Bins
# ----------------------------------------------------------------------------------------------------
def _log_bin_width(d_min: float, d_max: float, num_bins: int) -> float:
    return (math.log10(d_max) - math.log10(d_min)) / num_bins


def depth_to_bins(depth: Tensor, d_min: float, d_max: float, num_bins: int) -> Tensor:
    """Bin index of every pixel (same shape, int64): clamped into [d_min, d_max], the last bin's upper edge
    included in it; holes (depth < 1e-8) get ``num_bins + 1`` so that no class claims them."""
    width = _log_bin_width(d_min, d_max, num_bins)
    clamped = depth.clamp(d_min, d_max)
    bins = torch.trunc((torch.log10(clamped) - math.log10(d_min)) / width).long().clamp_max(num_bins - 1)
    return torch.where(depth < INVALID_DEPTH, torch.full_like(bins, num_bins + 1), bins)


def bin_weight_matrix(num_bins: int, alpha: float = 0.2, dtype=torch.float64, device=None) -> Tensor:
    """(K, K) target distributions: row j = exp(-alpha (i - j)^2) over bins i, normalised to sum 1."""
    index = torch.arange(num_bins, dtype=dtype, device=device)
    weights = torch.exp(-alpha * (index[None, :] - index[:, None]) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def weighted_bin_ce(logits: Tensor, bins: Tensor, valid: Tensor, num_bins: int, alpha: float = 0.2) -> Tensor:
    """-Σ_valid Σ_k W[bin, k] log softmax(logits)_k / #valid; ``logits`` (N, K, H, W), ``bins`` and
    ``valid`` (N, 1, H, W) or (N, H, W). Nearby bins share the target mass, so a prediction one bin off
    costs less than one far off (VNL's weighted cross-entropy)."""
    bins, valid = bins.reshape(logits.shape[0], *logits.shape[2:]), valid.reshape(logits.shape[0], *logits.shape[2:])
    weights = bin_weight_matrix(num_bins, alpha, logits.dtype, logits.device)
    target = weights[bins.clamp(0, num_bins - 1)].permute(0, 3, 1, 2)      # (N, K, H, W)
    per_pixel = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    per_pixel = torch.where(valid, per_pixel, torch.zeros_like(per_pixel))
    return per_pixel.sum() / valid.sum().clamp_min(1)


def bins_to_depth(prob: Tensor, d_min: float, d_max: float) -> Tensor:
    """Soft decoding of (N, K, H, W) bin probabilities: 10^(Σ_k p_k c_k), c_k the log10 bin centres."""
    num_bins = prob.shape[1]
    width = _log_bin_width(d_min, d_max, num_bins)
    centres = math.log10(d_min) + width * (torch.arange(num_bins, dtype=prob.dtype, device=prob.device) + 0.5)
    return torch.pow(10.0, (prob * centres[None, :, None, None]).sum(dim=1, keepdim=True))


# ----------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------
def _back_project(depth: Tensor, focal: float) -> Tensor:
    """(N, 1, H, W) depth -> (N, H*W, 3) camera points, pinhole with the principal point at (W//2, H//2)."""
    _, _, height, width = depth.shape
    v, u = torch.meshgrid(torch.arange(height, dtype=depth.dtype, device=depth.device),
                          torch.arange(width, dtype=depth.dtype, device=depth.device), indexing="ij")
    x = (u - width // 2) * depth.abs() / focal
    y = (v - height // 2) * depth.abs() / focal
    return torch.stack([x.expand_as(depth), y.expand_as(depth), depth], dim=-1).flatten(1, 3)


def _unit_normals(points: Tensor) -> Tensor:
    """(..., 3 points, 3 xyz) -> unit normals (..., 3) of their planes; a zero normal stays ~0 (norm 0.01)."""
    normal = torch.cross(points[..., 1, :] - points[..., 0, :], points[..., 2, :] - points[..., 0, :], dim=-1)
    norm = normal.norm(dim=-1, keepdim=True)
    return normal / torch.where(norm == 0, torch.full_like(norm, 0.01), norm)


def _informative_triplets(points_gt: Tensor) -> Tensor:
    """(N, T) bool: the gt triplet (N, T, 3 points, 3 xyz) lies in front of the camera, its points are not
    all nearly coincident, and its edges are not nearly collinear (VNL ``filter_mask``)."""
    edges = torch.stack([points_gt[..., 1, :] - points_gt[..., 0, :], points_gt[..., 2, :] - points_gt[..., 0, :],
                         points_gt[..., 2, :] - points_gt[..., 1, :]], dim=-2)          # (N, T, 3 edges, xyz)
    in_front = (points_gt[..., 2] > VN_MIN_Z).all(dim=-1)
    too_close = (edges.abs() < VN_MIN_DIFF).any(dim=-2).all(dim=-1)
    lengths = edges.norm(dim=-1)
    cosines = (edges @ edges.transpose(-1, -2)) / (lengths[..., :, None] * lengths[..., None, :] + 1e-8)
    collinear = (cosines.abs() > VN_MAX_COS).flatten(-2).sum(dim=-1) > 3              # the diagonal gives 3
    return in_front & ~(too_close | collinear)


def virtual_normal_loss(pred: Tensor, gt: Tensor, focal: float, triplets: Tensor | None = None,
                        sample_ratio: float = 0.15, drop_ratio: float = 0.25) -> Tensor:
    """VNL's virtual-normal loss between (N, 1, H, W) depth maps in metres.

    Both maps are back-projected; three pixel sets of ``int(sample_ratio * H * W)`` are drawn with
    replacement (or ``triplets`` (3, T) flat pixel indices are used, the same for every image); triplets
    that are uninformative in the gt are dropped; the loss of a triplet is the L1 distance of the unit
    normals of its gt and predicted planes; the easiest ``drop_ratio`` of them are dropped and the rest
    averaged. A global scale of ``pred`` leaves every normal, hence the loss, unchanged."""
    _, _, height, width = gt.shape
    if triplets is None:
        count = max(int(sample_ratio * height * width), 1)
        triplets = torch.randint(height * width, (3, count), device=gt.device)
    triplets = triplets.to(gt.device)
    index = triplets.t().reshape(-1)                                                      # (T*3,)
    points_gt = _back_project(gt, focal)[:, index].unflatten(1, (-1, 3))                 # (N, T, 3, 3)
    points_pred = _back_project(pred, focal)[:, index].unflatten(1, (-1, 3))
    keep = _informative_triplets(points_gt)
    per_triplet = (_unit_normals(points_gt[keep]) - _unit_normals(points_pred[keep])).abs().sum(dim=-1)
    if per_triplet.numel() == 0:
        return pred.sum() * 0.0       # no informative triplet: a zero that keeps the graph
    per_triplet = per_triplet.sort().values
    return per_triplet[int(per_triplet.numel() * drop_ratio):].mean()


def scale_invariant_log_loss(pred: Tensor, gt: Tensor, valid: Tensor, lam: float = 0.85) -> Tensor:
    """Eigen et al.'s scale-invariant log loss, mean g^2 - lam (mean g)^2, g = log pred - log gt on
    ``valid`` pixels (the regression head's loss)."""
    g = torch.log(pred[valid].clamp_min(INVALID_DEPTH)) - torch.log(gt[valid])
    if g.numel() == 0:
        return pred.sum() * 0.0
    return (g ** 2).mean() - lam * g.mean() ** 2


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------
def eigen_crop(valid: Tensor) -> Tensor:
    """``valid`` (..., 480, 640) restricted to the Eigen crop, rows 45:471 and columns 41:601."""
    if tuple(valid.shape[-2:]) != (480, 640):
        raise ValueError(f"the Eigen crop is defined on 480x640 maps, got {tuple(valid.shape[-2:])}")
    top, bottom, left, right = EIGEN_CROP
    inside = torch.zeros_like(valid)
    inside[..., top:bottom, left:right] = True
    return valid & inside


def depth_metrics(pred: Tensor, gt: Tensor, valid: Tensor) -> dict:
    """Sums over the ``valid`` pixels of one batch, to be added over the whole set (float64 scalars):
    ``count`` and the sums of |d-g|/g, (d-g)^2/g, (d-g)^2, |log10 d - log10 g| and of the δ < 1.25^k hits."""
    d, g = pred[valid].double().clamp_min(INVALID_DEPTH), gt[valid].double()
    ratio = torch.maximum(d / g, g / d)
    sums = {"count": torch.tensor(float(g.numel()), dtype=torch.float64), "abs_rel": ((d - g).abs() / g).sum(),
            "sq_rel": ((d - g) ** 2 / g).sum(), "sq_err": ((d - g) ** 2).sum(),
            "log10": (torch.log10(d) - torch.log10(g)).abs().sum()}
    for k in (1, 2, 3):
        sums[f"delta{k}"] = (ratio < 1.25 ** k).double().sum()
    return {name: value.cpu() for name, value in sums.items()}


def merge_depth_metrics(total: dict | None, batch_sums: dict) -> dict:
    return dict(batch_sums) if total is None else {name: total[name] + batch_sums[name] for name in total}


def finish_depth_metrics(sums: dict) -> dict:
    """Pooled metrics from summed ``depth_metrics``: rel, sq_rel, rms, log10, delta1..3 (NaN if no pixel)."""
    count = float(sums["count"])
    if count == 0:
        return {name: float("nan") for name in DEPTH_METRIC_NAMES} | {"pixels": 0}
    metrics = {"rel": float(sums["abs_rel"]) / count, "sq_rel": float(sums["sq_rel"]) / count,
               "rms": math.sqrt(float(sums["sq_err"]) / count), "log10": float(sums["log10"]) / count}
    metrics.update({f"delta{k}": float(sums[f"delta{k}"]) / count for k in (1, 2, 3)})
    return metrics | {"pixels": int(count)}


# ----------------------------------------------------------------------------------------------------
# DepthNet
# ----------------------------------------------------------------------------------------------------
DEPTH_BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenet_v2", "resnext101_32x8d")
PREDICTIONS = ("bins", "regression")


class ResNeXtTrunk(nn.Module):
    """torchvision's ResNeXt-101 32x8d without pooling and classifier, returning c2..c5 (VNL's teacher
    encoder); torchvision's ImageNet file loads into it once its ``fc.*`` keys are dropped."""

    def __init__(self):
        super().__init__()
        net = resnext101_32x8d(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = {"c2": 256, "c3": 512, "c4": 1024, "c5": 2048}

    def forward(self, x: Tensor) -> OrderedDict:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = OrderedDict()
        for name, layer in zip(("c2", "c3", "c4", "c5"), (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            feats[name] = x
        return feats


def build_depth_encoder(backbone: str, pretrained: str | None = None) -> nn.Module:
    """The encoder of ``DepthNet``, every layer trainable; ``pretrained`` a local ImageNet file."""
    if backbone not in DEPTH_BACKBONES:
        raise ValueError(f"backbone must be one of {DEPTH_BACKBONES}, got {backbone!r}")
    if backbone == "mobilenet_v2":
        return build_mobilenet_v2(pretrained)
    if backbone == "resnext101_32x8d":
        trunk = ResNeXtTrunk()
        if pretrained is not None:
            source = f"pretrained weights {pretrained}"
            state = {k: v for k, v in read_checkpoint(pretrained, source, weights_only=True).items()
                     if not k.startswith("fc.")}
            load_state_dict_checked(trunk, state, source)
        return trunk
    return build_backbone(int(backbone.removeprefix("resnet")), "torchvision", output_stride=32, pretrained=pretrained)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class DepthNet(nn.Module):
    """VNL-like monocular depth network: encoder c2..c5, FPN-style decoder to stride 4, a 3x3 ``head``
    feature (SKD's pair-wise tap) and either a bin classifier (``prediction="bins"``, K log bins in
    [d_min, d_max]) or a softplus depth regressor (``"regression"``).

    Task loss with gt depth targets (N, H, W) or (N, 1, H, W) in metres, 0 = invalid:
    bins: ``loss_wce`` = weighted_bin_ce(up(logits)) and ``loss_vn`` = lambda_vn x virtual_normal_loss of the
    soft-decoded depth (focal ``focal`` pixels); regression: ``loss_silog``. Logits are upsampled
    bilinearly (align_corners=False) to the input size for the loss and for inference.

    Output dict: ``logits`` (N, K, H/4, W/4) (bins only), ``log_depth`` (N, 1, H/4, W/4) log10 of the
    stride-4 depth (the holistic discriminator's input), ``depth`` (N, 1, H, W) metres, ``feats``
    {c2..c5, head}, ``losses`` in training with targets."""

    def __init__(self, backbone: str = "resnet50", num_bins: int = 150, d_min: float = 0.1, d_max: float = 17.0,
                 dec_channels: int = 256, prediction: str = "bins", focal: float = 519.0, lambda_vn: float = 5.0,
                 bin_alpha: float = 0.2, pretrained: str | None = None):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if not 0 < d_min < d_max:
            raise ValueError(f"depth range must satisfy 0 < d_min < d_max, got {d_min}, {d_max}")
        self.backbone = build_depth_encoder(backbone, pretrained)
        self.num_bins, self.d_min, self.d_max = num_bins, d_min, d_max
        self.prediction, self.focal, self.lambda_vn, self.bin_alpha = prediction, focal, lambda_vn, bin_alpha
        channels = self.backbone.out_channels
        self.laterals = nn.ModuleDict({name: _conv_bn_relu(channels[name], dec_channels, 1)
                                       for name in ("c2", "c3", "c4", "c5")})
        self.smooth = nn.ModuleDict({name: _conv_bn_relu(dec_channels, dec_channels, 3) for name in ("c2", "c3", "c4")})
        self.head = _conv_bn_relu(dec_channels, dec_channels, 3)
        self.classifier = nn.Conv2d(dec_channels, num_bins if prediction == "bins" else 1, 1)
        self.out_channels = {**channels, "head": dec_channels}

    def forward(self, images: Tensor, targets: Tensor | None = None, image_sizes=None, predict: bool = True) -> dict:
        feats = dict(self.backbone(images))
        x = self.laterals["c5"](feats["c5"])
        for name in ("c4", "c3", "c2"):
            lateral = self.laterals[name](feats[name])
            x = self.smooth[name](F.interpolate(x, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
                                  + lateral)
        feats["head"] = self.head(x)
        raw = self.classifier(feats["head"])
        out = {"feats": feats}
        size = images.shape[-2:]
        if self.prediction == "bins":
            out["logits"] = raw
            out["log_depth"] = torch.log10(bins_to_depth(raw.float().softmax(dim=1), self.d_min, self.d_max))
            up = F.interpolate(raw.float(), size=size, mode="bilinear", align_corners=False)
            out["depth"] = bins_to_depth(up.softmax(dim=1), self.d_min, self.d_max)
        else:
            stride4 = F.softplus(raw.float()).clamp_min(INVALID_DEPTH)
            out["log_depth"] = torch.log10(stride4)
            up = F.interpolate(stride4, size=size, mode="bilinear", align_corners=False)
            out["depth"] = up
        if self.training and targets is not None:
            out["losses"] = self.losses(up, out["depth"], targets.reshape(images.shape[0], 1, *size).float())
        return out

    def losses(self, upsampled: Tensor, depth: Tensor, gt: Tensor) -> dict:
        valid = gt > INVALID_DEPTH
        if self.prediction == "regression":
            return {"loss_silog": scale_invariant_log_loss(depth, gt, valid)}
        bins = depth_to_bins(gt, self.d_min, self.d_max, self.num_bins)
        return {"loss_wce": weighted_bin_ce(upsampled, bins, valid, self.num_bins, self.bin_alpha),
                "loss_vn": self.lambda_vn * virtual_normal_loss(depth, gt, self.focal)}


# model name -> (encoder, decoder width D): 256 for the teachers, 64 for the light students (spec §2)
DEPTH_MODELS = {"depth_r18": ("resnet18", 64), "depth_r50": ("resnet50", 256), "depth_r101": ("resnet101", 256),
                "depth_mv2": ("mobilenet_v2", 64), "depth_x101": ("resnext101_32x8d", 256)}
DEPTH_OPTION_NAMES = ("num_bins", "d_min", "d_max", "prediction", "focal", "lambda_vn", "bin_alpha")


def build_depth_model(name: str, pretrained: str | None = None, **options) -> DepthNet:
    """``name`` in DEPTH_MODELS; ``options``: DepthNet's task options (DEPTH_OPTION_NAMES)."""
    if name not in DEPTH_MODELS:
        raise ValueError(f"unknown depth model {name!r}; supported: {', '.join(DEPTH_MODELS)}")
    unknown = sorted(set(options) - set(DEPTH_OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown depth model options {unknown}; expected some of {list(DEPTH_OPTION_NAMES)}")
    backbone, channels = DEPTH_MODELS[name]
    return DepthNet(backbone, dec_channels=channels, pretrained=pretrained, **options)
