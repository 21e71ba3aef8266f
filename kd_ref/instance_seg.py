"""Instance segmentation: SOLO (v1) and Mask R-CNN on a ResNet-FPN, with mmdetection 2.x semantics.

SOLO ("SOLO: Segmenting Objects by Locations", Wang et al., arXiv:1912.04488), as mmdet 2.x
``SOLOHead`` (the code GDD's instance-segmentation configs train):

* FPN P2..P5 (lateral 1x1 + output 3x3, Xavier-uniform as mmdet) plus P6 = ``max_pool2d(P5, 1, 2)``.
  The head reads five levels: P2 resized bilinearly to P3's size, P3, P4, P5, and P6 resized to P5's
  size, i.e. strides (8, 8, 16, 32, 32).
* Mask branch (shared over levels): the level's feature with two CoordConv channels (x, y in [-1, 1])
  -> ``stacked_convs`` x [conv3x3 (no bias) -> GN(32) -> ReLU] -> bilinear x2 -> ``conv_mask_list[l]``
  1x1 to S_l^2 mask logits, one per grid cell, at strides (4, 4, 8, 16, 16).
* Category branch: the level's feature resized to S_l x S_l -> the same conv stack -> conv3x3 to C
  sigmoid logits per cell.
* Targets (:func:`solo_targets`): an instance is positive on every level whose scale range holds
  sqrt(box area); the cells around its mask's centre of mass (box half-size x ``pos_scale``, at most
  one cell from the centre cell) take its class and predict its mask, downsampled by stride / 2.
* Losses: Dice on the positive cells' masks (weight 3, divided by the number of positives) and sigmoid
  focal loss on every cell x class (alpha 0.25, gamma 2, divided by positives + 1).
* Inference: point NMS on the category maps, candidates above 0.1, their masks at stride 4 (every level's
  resized to level 0's, which is already at stride 4) thresholded at 0.5, masks of at most the level's
  stride pixels there dropped, scores times "maskness", matrix NMS (Gaussian, sigma 2): the code's NMS (the
  mmdet SOLO used by GDD and the WXinlong/SOLO release), not the mask NMS of the v1 paper; the kept masks
  are resized to the padded input (x4), cropped to the image, and resized to the original image.

Backbone: torchvision-style ResNet, stem and ``layer1`` frozen, every BatchNorm in eval mode with
trainable affine parameters (mmdet ``norm_eval=True``, ``frozen_stages=1``), not FrozenBatchNorm.

Mask R-CNN (:class:`MaskRCNN`, mmdet ``mask_rcnn_r50_fpn``): the project's Faster R-CNN plus a mask
head on 14x14 RoIAlign features of the positive sampled RoIs (class-specific 28x28 logits, binary
cross-entropy against the matched GT mask RoIAligned to 28x28); at test time the masks of the final
boxes are pasted into the image by bilinear resampling. Each positive RoI's mask target is the GT its
box target was assigned to (mmdet's ``pos_assigned_gt_inds``). Its R-CNN assigner matches low-quality proposals (mmdet 2.x
``mask_rcnn_r50_fpn.py``, ``train_cfg.rcnn.assigner.match_low_quality=True``; Faster R-CNN keeps False).

Evaluation outputs (``instances``, one dict per image): ``mask_probs`` float (K, h, w) and ``masks``
bool (K, h, w) on the input image (unpadded), ``labels`` (K,), ``scores`` (K,) (Mask R-CNN also
``boxes`` and ``roi_mask_probs`` (K, 28, 28)). :func:`masks_at_original_size` gives the masks scored on
the original image as mmdet does: SOLO's ``mask_probs`` resized bilinearly, then > 0.5 (``SOLOHead.
_get_results_single``); Mask R-CNN's 28x28 masks pasted directly on the original image into the boxes
mapped back to it, then >= 0.5 (``FCNMaskHead.get_seg_masks`` with ``rescale=True``).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align, sigmoid_focal_loss

from kd_ref import detectors, transforms
from kd_ref.backbones import backbone_key_rules, build_backbone, read_checkpoint, rename_keys

PRIOR_PROB = 0.01
COCO_GRIDS = (40, 36, 24, 16, 12)
COCO_SCALE_RANGES = ((1, 96), (48, 192), (96, 384), (192, 768), (384, 2048))
SOLO_STRIDES = (8, 8, 16, 32, 32)


# ----------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------
def coord_features(n: int, h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """(n, 2, h, w) CoordConv map: channel 0 = x, channel 1 = y, each ``linspace(-1, 1)`` over its axis."""
    xs = torch.linspace(-1, 1, w, device=device, dtype=dtype)
    ys = torch.linspace(-1, 1, h, device=device, dtype=dtype)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y])[None].expand(n, 2, h, w)


def center_of_mass(mask: torch.Tensor, eps: float = 1e-6) -> tuple:
    """(center_h, center_w) of a (h, w) mask: sum(mask * index) / max(sum(mask), eps), indices 0..h-1."""
    mask = mask if mask.is_floating_point() else mask.float()
    h, w = mask.shape
    normaliser = mask.sum().clamp(min=eps)
    rows = torch.arange(h, device=mask.device, dtype=mask.dtype)[:, None]
    cols = torch.arange(w, device=mask.device, dtype=mask.dtype)[None, :]
    return (mask * rows).sum() / normaliser, (mask * cols).sum() / normaliser


def dice_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-instance Dice loss (n,) of mask logits ``pred`` (n, h, w) against 0/1 ``target``:
    ``1 - 2 sum(p t) / ((sum(p^2) + eps) + (sum(t^2) + eps))`` with p = sigmoid(pred)."""
    p = pred.sigmoid().flatten(1)
    t = target.flatten(1).to(p.dtype)
    a = (p * t).sum(1)
    b = (p * p).sum(1) + eps
    c = (t * t).sum(1) + eps
    return 1 - 2 * a / (b + c)


def downsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """0/1 masks (..., h, w) -> uint8 (..., round(h / factor), round(w / factor)): mmcv's bilinear
    ``imrescale`` of the uint8 mask (half-pixel sampling, no antialiasing), rounded (0.5 rounds up)."""
    h, w = mask.shape[-2:]
    size = (int(h / factor + 0.5), int(w / factor + 0.5))
    flat = mask.reshape(-1, 1, h, w).float()
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=False) >= 0.5
    return out.to(torch.uint8).reshape(*mask.shape[:-2], *size)


def _cell(position, extent: int, num_grid: int) -> int:
    """Grid cell of ``position`` along an axis of ``extent`` pixels, as mmdet computes it:
    trunc((position / extent) / (1 / S))."""
    return int(torch.div(position / extent, 1.0 / num_grid, rounding_mode="trunc"))


def solo_targets(gt_bboxes, gt_labels, gt_masks, featmap_sizes, num_grids=COCO_GRIDS,
                 scale_ranges=COCO_SCALE_RANGES, strides=SOLO_STRIDES, pos_scale=0.2, num_classes=80):
    """SOLO targets of one image: per level, (mask targets of the positive cells (P, h, w) uint8 in cell
    order, labels (S, S) int64 with background ``num_classes``, positives (S^2,) bool).

    ``gt_masks`` (K, H, W) lie on the padded input, whose size is taken as 4 x ``featmap_sizes[0]``."""
    device = gt_labels.device
    padded_h, padded_w = 4 * featmap_sizes[0][0], 4 * featmap_sizes[0][1]
    boxes = gt_bboxes.float()
    box_scales = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    half_w = 0.5 * (boxes[:, 2] - boxes[:, 0]) * pos_scale
    half_h = 0.5 * (boxes[:, 3] - boxes[:, 1]) * pos_scale
    non_empty = gt_masks.flatten(1).sum(1) > 0 if gt_masks.numel() else torch.zeros(0, dtype=torch.bool)
    mask_targets, labels_out, positives_out = [], [], []
    for (low, high), stride, size, num_grid in zip(scale_ranges, strides, featmap_sizes, num_grids):
        labels = torch.full((num_grid, num_grid), num_classes, dtype=torch.int64, device=device)
        positive = torch.zeros(num_grid ** 2, dtype=torch.bool, device=device)
        canvas = torch.zeros(num_grid ** 2, *size, dtype=torch.uint8, device=device)
        selected = torch.nonzero((box_scales >= low) & (box_scales <= high)).flatten().tolist()
        for k in selected:
            if not non_empty[k]:
                continue
            center_h, center_w = center_of_mass(gt_masks[k])
            ci, cj = _cell(center_h, padded_h, num_grid), _cell(center_w, padded_w, num_grid)
            top = max(0, _cell(center_h - half_h[k], padded_h, num_grid))
            bottom = min(num_grid - 1, _cell(center_h + half_h[k], padded_h, num_grid))
            left = max(0, _cell(center_w - half_w[k], padded_w, num_grid))
            right = min(num_grid - 1, _cell(center_w + half_w[k], padded_w, num_grid))
            top, bottom = max(top, ci - 1), min(bottom, ci + 1)
            left, right = max(left, cj - 1), min(right, cj + 1)
            labels[top:bottom + 1, left:right + 1] = gt_labels[k]
            small = downsample_mask(gt_masks[k], stride // 2)[:size[0], :size[1]]
            cells = torch.tensor([i * num_grid + j for i in range(top, bottom + 1) for j in range(left, right + 1)],
                                 dtype=torch.long, device=device)
            canvas[cells] = 0
            canvas[cells, :small.shape[0], :small.shape[1]] = small
            positive[cells] = True
        mask_targets.append(canvas[positive])
        labels_out.append(labels)
        positives_out.append(positive)
    return mask_targets, labels_out, positives_out


def point_nms(cls_prob: torch.Tensor, kernel: int = 2) -> torch.Tensor:
    """Keep a probability (N, C, S, S) only where it equals the max of its ``kernel`` x ``kernel`` window
    (ties kept); zero elsewhere."""
    local_max = F.max_pool2d(cls_prob, kernel, stride=1, padding=1)
    return cls_prob * (local_max[..., :-1, :-1] == cls_prob)


def mask_matrix_nms(masks, labels, scores, mask_area=None, nms_pre=500, max_num=100, kernel="gaussian",
                    sigma=2.0, filter_thr=0.05):
    """Matrix NMS (SOLOv2) of bool ``masks`` (n, h, w): each score decays by its same-class overlaps with
    higher-scored masks, compensated by how much those were suppressed themselves. Returns (scores,
    labels, keep_inds into the inputs), best first; -1 disables ``nms_pre`` / ``max_num`` / ``filter_thr``."""
    if kernel not in ("gaussian", "linear"):
        raise ValueError(f"mask_matrix_nms: kernel must be 'gaussian' or 'linear', got {kernel!r}")
    empty = (scores.new_zeros(0), labels.new_zeros(0), labels.new_zeros(0))
    if len(labels) == 0:
        return empty
    if mask_area is None:
        mask_area = masks.flatten(1).sum(1)
    scores, order = scores.sort(descending=True)
    if 0 < nms_pre < len(order):
        order, scores = order[:nms_pre], scores[:nms_pre]
    keep_inds = order
    flat = masks[order].flatten(1).to(scores.dtype)
    area = mask_area[order].to(scores.dtype)
    labels = labels[order]
    inter = flat @ flat.T
    iou = (inter / (area[:, None] + area[None, :] - inter)).triu(diagonal=1)
    same_class = (labels[:, None] == labels[None, :]).triu(diagonal=1)
    decay_iou = iou * same_class
    compensate = decay_iou.max(0).values[:, None]  # row i: the suppression mask i itself suffered
    if kernel == "gaussian":
        decay = (torch.exp(-sigma * decay_iou ** 2) / torch.exp(-sigma * compensate ** 2)).min(0).values
    else:
        decay = ((1 - decay_iou) / (1 - compensate)).min(0).values
    scores = scores * decay
    if filter_thr > 0:
        keep = scores >= filter_thr
        if not keep.any():
            return empty
        scores, labels, keep_inds = scores[keep], labels[keep], keep_inds[keep]
    scores, order = scores.sort(descending=True)
    if 0 < max_num < len(order):
        order, scores = order[:max_num], scores[:max_num]
    return scores, labels[order], keep_inds[order]


def masks_at_size(mask_probs: torch.Tensor, size: tuple, threshold: float = 0.5) -> torch.Tensor:
    """Bool masks (K, H, W) at ``size``: the soft masks (K, h, w) resized bilinearly, then > ``threshold``."""
    if mask_probs.shape[0] == 0:
        return torch.zeros(0, *size, dtype=torch.bool, device=mask_probs.device)
    resized = F.interpolate(mask_probs[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    return resized > threshold


def masks_at_original_size(found: dict, target: dict) -> torch.Tensor:
    """Bool masks (K, H, W) of one image's ``instances`` entry on its original image (``target["orig_size"]``,
    unflipped). Mask R-CNN output (with ``roi_mask_probs``) is pasted there into its boxes in original
    pixels and thresholded inclusively, as mmdet's ``get_seg_masks`` (pasting on the input and resizing
    would blur the mask edges twice); SOLO's soft masks are resized (:func:`masks_at_size`)."""
    size = tuple(target["orig_size"])
    if "roi_mask_probs" in found:
        # a flipped input's masks are mirrored in their boxes: paste them in the flipped original, then flip
        boxes = transforms.boxes_to_original(found["boxes"].detach().double(), target).to(found["roi_mask_probs"])
        masks = paste_masks(found["roi_mask_probs"], boxes, size) >= 0.5
    else:
        masks = masks_at_size(found["mask_probs"], size)
    return masks.flip(-1) if target["flipped"] else masks


def _pad_masks(masks: torch.Tensor, size: tuple) -> torch.Tensor:
    """GT masks (K, h, w) zero-padded bottom/right to the batch's padded input ``size``."""
    return F.pad(masks, (0, size[1] - masks.shape[-1], 0, size[0] - masks.shape[-2]))


def _empty_instances(size: tuple, device) -> dict:
    return {"mask_probs": torch.zeros(0, *size, device=device), "masks": torch.zeros(0, *size, dtype=torch.bool,
                                                                                      device=device),
            "labels": torch.zeros(0, dtype=torch.long, device=device), "scores": torch.zeros(0, device=device)}


def _check_masks(targets) -> None:
    for i, target in enumerate(targets):
        masks = target.get("masks")
        if masks is None or masks.dim() != 3 or masks.shape[0] != target["labels"].shape[0]:
            raise ValueError(f"targets[{i}] needs masks (K, H, W), one per box, for instance segmentation; got "
                             f"{None if masks is None else tuple(masks.shape)} for {target['labels'].shape[0]} boxes")


# ----------------------------------------------------------------------------------------------------
# SOLO
# ----------------------------------------------------------------------------------------------------
class ConvGNReLU(nn.Module):
    """conv3x3 (no bias) -> GroupNorm(32) -> ReLU, named ``conv`` / ``gn`` as mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(32, out_channels)

    def forward(self, x):
        return F.relu(self.gn(self.conv(x)), inplace=True)


class SOLOHead(nn.Module):
    """Mask and category branches over the five head levels: ``forward(levels) -> (mask_preds, cls_preds)``
    with mask_preds[l] (N, S_l^2, 2H_l, 2W_l) and cls_preds[l] (N, C, S_l, S_l), both logits."""

    def __init__(self, num_classes: int, in_channels: int = 256, feat_channels: int = 256, stacked_convs: int = 7,
                 num_grids=COCO_GRIDS, cls_down_index: int = 0):
        super().__init__()
        self.num_grids, self.cls_down_index = tuple(num_grids), cls_down_index
        self.mask_convs = nn.ModuleList(ConvGNReLU(in_channels + 2 if i == 0 else feat_channels, feat_channels)
                                        for i in range(stacked_convs))
        self.cls_convs = nn.ModuleList(ConvGNReLU(in_channels if i == 0 else feat_channels, feat_channels)
                                       for i in range(stacked_convs))
        self.conv_mask_list = nn.ModuleList(nn.Conv2d(feat_channels, grid ** 2, 1) for grid in self.num_grids)
        self.conv_cls = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        prior_bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.constant_(module.bias, prior_bias)

    def forward(self, levels):
        mask_preds, cls_preds = [], []
        for level, (x, grid) in enumerate(zip(levels, self.num_grids)):
            mask_feat = torch.cat([x, coord_features(x.shape[0], *x.shape[-2:], x.device, x.dtype)], 1)
            for layer in self.mask_convs:
                mask_feat = layer(mask_feat)
            mask_feat = F.interpolate(mask_feat, scale_factor=2, mode="bilinear", align_corners=False)
            mask_preds.append(self.conv_mask_list[level](mask_feat))
            cls_feat = x
            for index, layer in enumerate(self.cls_convs):
                if index == self.cls_down_index:
                    cls_feat = F.interpolate(cls_feat, size=(grid, grid), mode="bilinear", align_corners=False)
                cls_feat = layer(cls_feat)
            cls_preds.append(self.conv_cls(cls_feat))
        return mask_preds, cls_preds


class SOLO(detectors._FPNDetector):
    """SOLO v1 on a ResNet-FPN (mmdet 2.x ``SOLO`` + ``SOLOHead``).

    Output dict: ``feats`` (c2..c5, p2..p6; P2 before the head's resize), ``mask_preds`` / ``cls_preds``
    (per head level, logits); training with targets adds ``losses`` {loss_mask, loss_cls}; eval with
    ``predict`` adds ``instances``. Targets need ``boxes``, ``labels`` and ``masks`` (K, h, w) on the
    input image; boxes come from the annotation, not from the mask.
    """

    def __init__(self, backbone, num_classes, num_grids=COCO_GRIDS, scale_ranges=COCO_SCALE_RANGES,
                 strides=SOLO_STRIDES, pos_scale=0.2, stacked_convs=7, feat_channels=256, cls_down_index=0,
                 score_thr=0.1, mask_thr=0.5, nms_pre=500, max_per_img=100, sigma=2.0, filter_thr=0.05):
        if not len(num_grids) == len(scale_ranges) == len(strides) == 5:
            raise ValueError(f"SOLO: num_grids, scale_ranges and strides need one entry per head level (5), got "
                             f"{len(num_grids)}, {len(scale_ranges)}, {len(strides)}")
        super().__init__(backbone, num_classes, detectors.FPN(backbone.out_channels, first_level=2, num_outs=5))
        self.head = SOLOHead(num_classes, 256, feat_channels, stacked_convs, num_grids, cls_down_index)
        self.num_grids, self.scale_ranges, self.strides = tuple(num_grids), tuple(scale_ranges), tuple(strides)
        self.pos_scale = pos_scale
        self.score_thr, self.mask_thr, self.nms_pre, self.max_per_img = score_thr, mask_thr, nms_pre, max_per_img
        self.sigma, self.filter_thr = sigma, filter_thr

    @staticmethod
    def head_levels(feats):
        """The head's five inputs: P2 resized to P3's size, P3, P4, P5, P6 resized to P5's size."""
        p2, p3, p4, p5, p6 = (feats[f"p{i}"] for i in range(2, 7))
        return [F.interpolate(p2, size=p3.shape[-2:], mode="bilinear", align_corners=False), p3, p4, p5,
                F.interpolate(p6, size=p5.shape[-2:], mode="bilinear", align_corners=False)]

    def forward(self, images, targets=None, image_sizes=None, predict=True):
        image_sizes = detectors._check_inputs(images, targets, image_sizes, self.num_classes)
        feats = self.extract_feats(images)
        mask_preds, cls_preds = self.head(self.head_levels(feats))
        out = {"feats": feats, "mask_preds": mask_preds, "cls_preds": cls_preds}
        if self.training and targets is not None:
            _check_masks(targets)
            out["losses"] = self.loss(mask_preds, cls_preds, targets, tuple(images.shape[-2:]))
        elif not self.training and predict:
            out["instances"] = self.predict(mask_preds, cls_preds, image_sizes)
        return out

    def loss(self, mask_preds, cls_preds, targets, padded_size):
        featmap_sizes = [tuple(pred.shape[-2:]) for pred in mask_preds]
        selected, mask_targets, labels = [[] for _ in mask_preds], [[] for _ in mask_preds], [[] for _ in cls_preds]
        for i, target in enumerate(targets):
            masks = _pad_masks(target["masks"].to(torch.uint8), padded_size)
            per_level = solo_targets(target["boxes"], target["labels"].to(mask_preds[0].device), masks,
                                     featmap_sizes, self.num_grids, self.scale_ranges, self.strides,
                                     self.pos_scale, self.num_classes)
            for level, (level_masks, level_labels, positive) in enumerate(zip(*per_level)):
                selected[level].append(mask_preds[level][i][positive])
                mask_targets[level].append(level_masks)
                labels[level].append(level_labels.flatten())
        # without positives the sum of the empty selections: 0, still in the graph (as mmdet)
        dice = torch.cat([dice_loss(torch.cat(preds), torch.cat(masks), eps=1e-3)
                          for preds, masks in zip(selected, mask_targets)])
        num_pos = len(dice)
        loss_mask = 3.0 * dice.sum() / max(num_pos, 1)
        flat_cls = torch.cat([pred.permute(0, 2, 3, 1).reshape(-1, self.num_classes) for pred in cls_preds])
        flat_labels = torch.cat([torch.cat(level) for level in labels])
        onehot = F.one_hot(flat_labels, self.num_classes + 1)[:, :self.num_classes].to(flat_cls.dtype)
        loss_cls = sigmoid_focal_loss(flat_cls, onehot, alpha=0.25, gamma=2.0, reduction="sum") / (num_pos + 1)
        return {"loss_mask": loss_mask, "loss_cls": loss_cls}

    @torch.no_grad()
    def predict(self, mask_preds, cls_preds, image_sizes, output_sizes=None):
        """Per image ``{"mask_probs", "masks", "labels", "scores"}``, masks on the input image (cropped from
        the padded input) or, given ``output_sizes``, resized to those sizes."""
        # the head's level-0 masks are already at stride 4 (its stride-8 features upsampled x2): mmdet 2.x
        # SOLOHead.forward resizes every level's masks to that size, and _get_results_single filters, scores and
        # NMSes them there, then resizes to 4x (the padded input) -- as WXinlong/SOLO does (@f4cd03b
        # mmdet/models/anchor_heads/solo_head.py:131, 172, 320, 355)
        map_size = tuple(mask_preds[0].shape[-2:])
        padded = tuple(4 * side for side in map_size)
        cell_strides = torch.cat([torch.full((grid ** 2,), float(stride)) for grid, stride in
                                  zip(self.num_grids, self.strides)]).to(mask_preds[0].device)
        level_of_cell = torch.cat([torch.full((grid ** 2,), level) for level, grid in enumerate(self.num_grids)])
        offsets = [0] + torch.tensor([grid ** 2 for grid in self.num_grids]).cumsum(0).tolist()
        results = []
        for i, size in enumerate(image_sizes):
            probs = torch.cat([point_nms(pred[i:i + 1].sigmoid())[0].permute(1, 2, 0).reshape(-1, self.num_classes)
                               for pred in cls_preds])
            candidates = torch.nonzero(probs > self.score_thr)
            result = _empty_instances(size, probs.device)
            if len(candidates):
                cells, labels = candidates[:, 0], candidates[:, 1]
                scores = probs[cells, labels]
                # upsample only the candidate cells' soft masks to stride 4 (each map is upsampled on its own)
                soft = probs.new_zeros(len(cells), *map_size)
                for level, pred in enumerate(mask_preds):
                    mine = torch.nonzero(level_of_cell.to(cells.device)[cells] == level).flatten()
                    if len(mine):
                        maps = pred[i, cells[mine] - offsets[level]].sigmoid()
                        soft[mine] = F.interpolate(maps[None], size=map_size, mode="bilinear",
                                                   align_corners=False)[0]
                binary = soft > self.mask_thr
                area = binary.flatten(1).sum(1).to(soft.dtype)
                keep = area > cell_strides[cells]
                if keep.any():
                    soft, binary, area, scores, labels = soft[keep], binary[keep], area[keep], scores[keep], labels[keep]
                    scores = scores * (soft * binary).flatten(1).sum(1) / area
                    scores, labels, kept = mask_matrix_nms(binary, labels, scores, mask_area=area, nms_pre=self.nms_pre,
                                                           max_num=self.max_per_img, kernel="gaussian",
                                                           sigma=self.sigma, filter_thr=self.filter_thr)
                    if len(kept):
                        full = F.interpolate(soft[kept][None], size=padded, mode="bilinear", align_corners=False)[0]
                        mask_probs = full[:, :size[0], :size[1]]
                        result = {"mask_probs": mask_probs, "masks": mask_probs > self.mask_thr, "labels": labels,
                                  "scores": scores}
            if output_sizes is not None:
                result["masks"] = masks_at_size(result["mask_probs"], output_sizes[i], self.mask_thr)
            results.append(result)
        return results


# ----------------------------------------------------------------------------------------------------
# Mask R-CNN
# ----------------------------------------------------------------------------------------------------
class MaskHead(nn.Module):
    """4 x [conv3x3 + ReLU] -> ConvTranspose 2x2/2 + ReLU -> 1x1 to C class-specific 28x28 logits."""

    def __init__(self, num_classes: int, channels: int = 256, num_convs: int = 4):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_convs))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, num_classes, 1)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, roi_feats):
        x = roi_feats
        for conv in self.convs:
            x = F.relu(conv(x), inplace=True)
        return self.logits(F.relu(self.upsample(x), inplace=True))


def paste_masks(mask_probs: torch.Tensor, boxes: torch.Tensor, size: tuple) -> torch.Tensor:
    """Soft (K, 28, 28) masks resampled bilinearly onto their xyxy ``boxes`` in an image of ``size``
    (mmdet ``_do_paste_mask``: pixel centres mapped into the box, zeros outside): (K, h, w)."""
    if len(boxes) == 0:
        return mask_probs.new_zeros(0, *size)
    ys = torch.arange(size[0], device=boxes.device, dtype=mask_probs.dtype) + 0.5
    xs = torch.arange(size[1], device=boxes.device, dtype=mask_probs.dtype) + 0.5
    x0, y0, x1, y1 = (boxes[:, k:k + 1].to(mask_probs.dtype) for k in range(4))
    grid_y = (ys[None] - y0) / (y1 - y0).clamp(min=1e-6) * 2 - 1
    grid_x = (xs[None] - x0) / (x1 - x0).clamp(min=1e-6) * 2 - 1
    grid = torch.stack([grid_x[:, None, :].expand(-1, size[0], -1), grid_y[:, :, None].expand(-1, -1, size[1])], 3)
    return F.grid_sample(mask_probs[:, None], grid, align_corners=False)[:, 0]


class MaskRCNN(detectors.FasterRCNN):
    """Mask R-CNN (He et al., arXiv:1703.06870) on our Faster R-CNN, mmdet ``mask_rcnn_r50_fpn`` semantics.

    Output dict: Faster R-CNN's, plus in training ``losses["loss_mask"]``, ``mask_logits`` (P, 28, 28) of
    the positive RoIs on their GT class; in eval with ``predict``, ``instances`` (with ``boxes``)."""

    mask_size = 28
    rcnn_match_low_quality = True  # mmdet 2.x mask_rcnn_r50_fpn.py, train_cfg.rcnn.assigner

    def __init__(self, backbone, num_classes, mask_thr=0.5, **options):
        super().__init__(backbone, num_classes, **options)
        self.mask_head = MaskHead(num_classes)
        self.mask_thr = mask_thr

    def mask_logits(self, feats, rois):
        """(R, C, 28, 28) mask logits of ``rois`` (R, 5) on 14x14 RoIAlign features of P2-P5."""
        levels = [feats[f"p{i}"] for i in range(2, 6)]
        return self.mask_head(detectors.multilevel_roi_align(levels, rois, self.roi_strides, output_size=14))

    def forward(self, images, targets=None, image_sizes=None, predict=True, rois=None):
        if self.training and targets is not None:
            _check_masks(targets)
        out = super().forward(images, targets, image_sizes, predict, rois)
        if self.training and targets is not None:
            positive = out["roi_labels"] < self.num_classes
            pos_rois, pos_labels = out["rois"][positive], out["roi_labels"][positive]
            logits = self.mask_logits(out["feats"], pos_rois)[torch.arange(len(pos_rois)), pos_labels]
            mask_targets = self.mask_targets(pos_rois, out["roi_gt_indices"][positive], targets)
            loss = (F.binary_cross_entropy_with_logits(logits, mask_targets) if len(pos_rois)
                    else logits.sum() * 0)
            out["losses"]["loss_mask"] = loss
            out["mask_logits"] = logits
        elif not self.training and predict:
            sizes = detectors._check_inputs(images, None, image_sizes, self.num_classes)
            out["instances"] = self.predict_masks(out["feats"], out["detections"], sizes)
        return out

    @torch.no_grad()
    def mask_targets(self, rois, gt_indices, targets):
        """(P, 28, 28) 0/1 targets: each positive RoI's assigned GT mask (``gt_indices``: the GT within its
        image, from :meth:`sample_rois`) RoIAligned to 28x28 (aligned, sampling_ratio 0), thresholded at 0.5."""
        out = rois.new_zeros(len(rois), self.mask_size, self.mask_size)
        for i, target in enumerate(targets):
            mine = torch.nonzero(rois[:, 0] == i).flatten()
            if not len(mine):
                continue
            matched = gt_indices[mine]
            masks = target["masks"].to(rois.dtype)[:, None]
            boxes = torch.cat([torch.arange(len(mine), device=rois.device, dtype=rois.dtype)[:, None],
                               rois[mine, 1:]], 1)
            resampled = roi_align(masks[matched], boxes, self.mask_size, spatial_scale=1.0, sampling_ratio=0,
                                  aligned=True)
            out[mine] = (resampled[:, 0] >= 0.5).to(out.dtype)
        return out

    @torch.no_grad()
    def predict_masks(self, feats, detections, image_sizes):
        results = []
        for i, (found, size) in enumerate(zip(detections, image_sizes)):
            boxes = found["boxes"]
            rois = torch.cat([torch.full_like(boxes[:, :1], i), boxes], 1)
            logits = self.mask_logits(feats, rois)[torch.arange(len(boxes)), found["labels"]]
            roi_mask_probs = logits.sigmoid()
            mask_probs = paste_masks(roi_mask_probs, boxes, size)
            # inclusive threshold, as mmdet's FCNMaskHead.get_seg_masks
            results.append({"mask_probs": mask_probs, "masks": mask_probs >= self.mask_thr, "labels": found["labels"],
                            "scores": found["scores"], "boxes": boxes, "roi_mask_probs": roi_mask_probs})
        return results


# ----------------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------------
# Synthetic scenes of 64 pixels (docs/specs/instance_seg.md §9 at a quarter of its 256): §9's grids; the scale ranges and
# pos_scale are ours. At 64 pixels P4 is 4x4 and P5 2x2, and §9's ranges / 4 sent most demo objects (sqrt box
# area 7.5-48.5, median 26, over 200 training scenes) to levels 2-3, whose category branch reads those maps
# upsampled to 8x8 and 6x6 cells. These ranges put every demo object on levels 0-1 (8x8 features), on both
# when its scale is within 12-48, and pos_scale 0.5 (mmdet 0.2) makes most of the 3x3 cells around its centre
# positive: 6,436 positive cells in those 200 scenes instead of 2,190.
SYNTHETIC_SOLO = {"num_grids": (12, 10, 8, 6, 4),
                  "scale_ranges": ((1, 48), (12, 96), (96, 192), (192, 384), (384, 2048)), "pos_scale": 0.5}
# name -> (architecture, depth, SOLO head options)
INSTANCE_MODELS = {
    **{f"solo_r{depth}": ("solo", depth, {}) for depth in (18, 34, 50, 101)},
    **{f"maskrcnn_r{depth}": ("maskrcnn", depth, {}) for depth in (18, 34, 50, 101)},
    "solo_synth_r18": ("solo", 18, {**SYNTHETIC_SOLO, "stacked_convs": 2, "feat_channels": 64}),
    "solo_synth_r50": ("solo", 50, {**SYNTHETIC_SOLO, "stacked_convs": 4, "feat_channels": 128}),
}


# the backbone options a recipe's ``model_options`` may set; their defaults are mmdet's
INSTANCE_OPTION_NAMES = ("frozen_stages", "norm_eval")


def build_instance_model(name: str, num_classes: int, pretrained_backbone: str | None = None,
                         rcnn_rois_per_image: int = 512, frozen_stages: int = 1, norm_eval: bool = True):
    """``name`` in INSTANCE_MODELS. By default the ResNet stem + stage 1 are frozen and every BN is in eval
    mode (mmdet, for an ImageNet-initialised backbone); from scratch ``frozen_stages=-1, norm_eval=False``
    trains them all, with batch statistics (a random frozen stem and BN at its initial statistics would not)."""
    if name not in INSTANCE_MODELS:
        raise ValueError(f"unknown instance segmentation model {name!r}; supported: {', '.join(INSTANCE_MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(norm_eval, bool):
        raise ValueError(f"norm_eval must be True or False, got {norm_eval!r}")
    arch, depth, options = INSTANCE_MODELS[name]
    backbone = build_backbone(depth, "torchvision", output_stride=32, pretrained=pretrained_backbone,
                              frozen_stages=frozen_stages, norm_eval=norm_eval)
    if arch == "solo":
        return SOLO(backbone, num_classes, **options)
    return MaskRCNN(backbone, num_classes, num_rois=rcnn_rois_per_image)


def copy_non_backbone_weights(teacher: nn.Module, student: nn.Module) -> None:
    """GDD's ``init_student``: every teacher weight outside ``backbone.`` (neck and heads) is copied into
    the student, whose backbone keeps its own (ImageNet) weights. Both must share those shapes."""
    student_state = student.state_dict()
    copied = {key: value for key, value in teacher.state_dict().items() if not key.startswith("backbone.")}
    mismatched = [key for key, value in copied.items()
                  if key not in student_state or student_state[key].shape != value.shape]
    if mismatched:
        raise ValueError(f"init_student: the student's neck and head differ from the teacher's "
                         f"({', '.join(mismatched[:3])}, ...); they must have the same architecture outside the backbone")
    student.load_state_dict({**student_state, **copied})


# ----------------------------------------------------------------------------------------------------
# Released mmdetection 2.x checkpoints -> our keys
# ----------------------------------------------------------------------------------------------------
def _rule(pattern, replace):
    return re.compile(pattern), (lambda match: match.expand(replace))


MMDET_SOLO_RULES = backbone_key_rules("backbone.", "backbone.") + [
    _rule(r"neck\.lateral_convs\.(\d+)\.conv\.", r"neck.lateral_convs.\1."),
    _rule(r"neck\.fpn_convs\.(\d+)\.conv\.", r"neck.output_convs.\1."),
    _rule(r"mask_head\.", "head."),
]
MMDET_MASK_HEAD_RULES = [
    _rule(r"roi_head\.mask_head\.convs\.(\d+)\.conv\.", r"mask_head.convs.\1."),
    _rule(r"roi_head\.mask_head\.upsample\.", "mask_head.upsample."),
    _rule(r"roi_head\.mask_head\.conv_logits\.", "mask_head.logits."),
]


def convert_mmdet_solo_state_dict(state_dict, source="mmdet SOLO checkpoint"):
    """mmdet 2.x ``SOLO`` keys -> ours (ConvModule ``.conv.`` unwrapped in the FPN, ``mask_head.`` -> ``head.``;
    the head's ConvModules keep their ``conv`` / ``gn`` names, as ours)."""
    return rename_keys(state_dict, MMDET_SOLO_RULES, source)


def convert_mmdet_mask_rcnn_state_dict(state_dict, source="mmdet Mask R-CNN checkpoint"):
    """mmdet 2.x ``MaskRCNN`` keys -> ours: the Faster R-CNN part by the detector's table, the
    ``FCNMaskHead`` (``convs.i.conv``, ``upsample``, ``conv_logits``) by ours."""
    mask_keys = {key: value for key, value in state_dict.items() if key.startswith("roi_head.mask_head.")}
    rest = {key: value for key, value in state_dict.items() if key not in mask_keys}
    return {**detectors.convert_mmdet_state_dict(rest, source), **rename_keys(mask_keys, MMDET_MASK_HEAD_RULES, source)}


def load_mmdet_solo(path: str) -> dict:
    """A released mmdet 2.x SOLO checkpoint (``{"state_dict": ...}``) as a state dict in our keys."""
    return convert_mmdet_solo_state_dict(read_checkpoint(path, f"mmdet SOLO checkpoint {path}"), path)
