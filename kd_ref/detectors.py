"""RetinaNet and Faster R-CNN with a ResNet-FPN, written on ``torchvision.ops``.

The detection papers (GKD, GDD, DIST, SoKD) train their detectors with mmdetection 2.x; every default
below is that library's (configs ``retinanet_r50_fpn.py`` / ``faster_rcnn_r50_fpn.py``):

* FPN: lateral 1x1 + output 3x3 convs, 256 channels, nearest top-down upsampling, Xavier-uniform init.
  Faster R-CNN uses P2-P5 plus P6 = ``max_pool2d(P5, 1, stride=2)``; RetinaNet uses P3-P5 plus
  P6 = conv3x3/2(C5) and P7 = conv3x3/2(P6) (``add_extra_convs='on_input'``; mmdet's RetinaNet keeps
  ``relu_before_extra_convs=False``, so there is no ReLU before the P7 conv).
* Anchors (mmdet v2 ``AnchorGenerator``, centre offset 0): at level stride s the base anchor of ratio r
  (= h / w) and scale k is ``(-w/2, -h/2, w/2, h/2)`` with ``w = s·k/√r``, ``h = s·k·√r``, shifted to
  ``(x·s, y·s)``; order = (row, column, ratio, scale). RetinaNet: scales 4·2^(i/3), i=0..2, strides
  8..128; RPN: scale 8, strides 4..64; ratios 0.5, 1, 2. In training an anchor counts only if its cell
  lies inside the image padded to a multiple of 32 (mmdet's valid flags, ``allowed_border=-1``).
* Box coding (``DeltaXYWHBBoxCoder``), p = reference box, g = target box, σ = stds:
  ``d = ((g_x - p_x)/p_w, (g_y - p_y)/p_h, log(g_w/p_w), log(g_h/p_h)) / σ``; decoding clamps
  ``d_w, d_h`` to ``±log(1000/16)`` and clips to the image. σ = 1 for RetinaNet/RPN, (.1,.1,.2,.2) for RCNN.
* Assignment (``MaxIoUAssigner``): IoU >= pos_thr -> positive, IoU < neg_thr -> negative, else ignored;
  with low-quality matching each GT also claims every box that reaches its own best IoU (if that IoU is
  >= min_pos_iou). Boxes are labelled -1 ignore, 0 background, g+1 for GT g.
* RetinaNet loss: focal loss ``FL(p_t) = -α_t (1-p_t)^γ log p_t`` (α 0.25, γ 2) over all non-ignored anchors
  and L1 on the deltas of positives, both summed and divided by ``Σ_images max(#pos, 1)``.
* RPN loss: 256 anchors per image sampled 1:1, binary CE + L1, divided by
  ``Σ_images max(#pos,1) + max(#neg,1)``. Proposals: per level the top ``nms_pre`` scores (2000 train,
  1000 test), decode, drop empty boxes, NMS 0.7 within each level, keep the best 1000 per image.
* RCNN: GT boxes are prepended to the proposals, IoU 0.5 assignment, 512 RoIs with at most 25 %
  positives, RoIAlign 7x7 (``sampling_ratio=0, aligned=True``) on level
  ``clamp(floor(log2(√(wh)/56 + 1e-6)), 0, 3)`` of P2-P5, two shared fc-1024, softmax classifier with the
  background as the LAST class, class-specific deltas. CE averaged over RoIs; L1 of the positives' deltas
  summed and divided by the number of RoIs.
* Both samplers draw uniform subsets as mmdet's ``RandomSampler``, from one generator per training image
  seeded by its target's ``sampling_seed`` (``sampling_generators``), so the draws do not depend on the
  DDP process or the batch an image is in.
* Test: RetinaNet keeps, per level, the top 1000 (anchor, class) pairs with sigmoid score > 0.05
  (mmdet >= 2.18 post-processing); Faster R-CNN keeps (RoI, class) pairs with softmax score > 0.05. Then
  class-wise NMS 0.5 and the best 100 detections per image.

Where mmdet would let a GT with zero IoU to every anchor (a degenerate box) claim all anchors through the
low-quality rule with ``min_pos_iou=0``, we skip that GT (our choice; valid boxes never trigger it).
Parameter counts match mmdet's published sizes, which count trainable parameters only (the frozen stem
and first stage excluded): RetinaNet R50-FPN, 80 classes: 37,968,692 total / 37,743,348 trainable;
Faster R-CNN R50-FPN: 41,753,056 / 41,527,712.
"""
import math
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_iou, roi_align, sigmoid_focal_loss

from kd_ref.backbones import backbone_key_rules, build_backbone, rename_keys
from kd_ref.mobilenet import build_mobilenet_v2

SIZE_DIVISOR = 32
MAX_LOG_RATIO = math.log(1000.0 / 16)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)
UNIT_STDS = (1.0, 1.0, 1.0, 1.0)
BACKBONE_LEVELS = ("c2", "c3", "c4", "c5")


# ----------------------------------------------------------------------------------------------------
# Anchors and box coding
# ----------------------------------------------------------------------------------------------------
def base_anchors(base_size, scales, ratios):
    """Anchors of one cell centred at (0, 0), ratio-major then scale: (len(ratios)*len(scales), 4)."""
    scales = torch.as_tensor(scales, dtype=torch.float32)
    h_ratios = torch.as_tensor(ratios, dtype=torch.float32).sqrt()
    widths = (base_size / h_ratios[:, None] * scales[None, :]).reshape(-1)
    heights = (base_size * h_ratios[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([-0.5 * widths, -0.5 * heights, 0.5 * widths, 0.5 * heights], dim=1)


class AnchorGenerator:
    """Anchors of every pyramid level, laid out like the flattened head outputs (row, column, anchor)."""

    def __init__(self, strides, scales, ratios=(0.5, 1.0, 2.0)):
        self.strides = tuple(strides)
        self.cell_anchors = [base_anchors(stride, scales, ratios) for stride in self.strides]
        self.num_anchors = len(scales) * len(ratios)

    def grid(self, feat_sizes, device):
        """List per level of (H*W*A, 4) anchors in input-image pixels."""
        anchors = []
        for (height, width), stride, cell in zip(feat_sizes, self.strides, self.cell_anchors):
            ys = torch.arange(height, device=device, dtype=torch.float32) * stride
            xs = torch.arange(width, device=device, dtype=torch.float32) * stride
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + cell.to(device)).reshape(-1, 4))
        return anchors

    def valid_flags(self, feat_sizes, image_size, device):
        """(total anchors,) bool: the anchor's cell lies in the image padded to a multiple of 32."""
        pad_h, pad_w = (math.ceil(side / SIZE_DIVISOR) * SIZE_DIVISOR for side in image_size)
        flags = []
        for (height, width), stride in zip(feat_sizes, self.strides):
            rows = torch.arange(height, device=device) < min(math.ceil(pad_h / stride), height)
            cols = torch.arange(width, device=device) < min(math.ceil(pad_w / stride), width)
            cell_ok = rows[:, None] & cols[None, :]
            flags.append(cell_ok[..., None].expand(height, width, self.num_anchors).reshape(-1))
        return torch.cat(flags)


def encode_boxes(boxes, gt_boxes, stds):
    """Deltas (N, 4) that move ``boxes`` onto ``gt_boxes`` (both (N, 4) xyxy), divided by ``stds``."""
    pw, ph = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    px, py = boxes[:, 0] + 0.5 * pw, boxes[:, 1] + 0.5 * ph
    gw, gh = gt_boxes[:, 2] - gt_boxes[:, 0], gt_boxes[:, 3] - gt_boxes[:, 1]
    gx, gy = gt_boxes[:, 0] + 0.5 * gw, gt_boxes[:, 1] + 0.5 * gh
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=1)
    return deltas / deltas.new_tensor(stds)


def decode_boxes(boxes, deltas, stds, max_shape=None):
    """Apply ``deltas`` (..., 4) to ``boxes`` (broadcastable, xyxy); clip to ``max_shape`` = (h, w)."""
    deltas = deltas * deltas.new_tensor(stds)
    dx, dy = deltas[..., 0], deltas[..., 1]
    dw, dh = deltas[..., 2].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO), deltas[..., 3].clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    pw, ph = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    cx, cy = boxes[..., 0] + 0.5 * pw + pw * dx, boxes[..., 1] + 0.5 * ph + ph * dy
    w, h = pw * dw.exp(), ph * dh.exp()
    decoded = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    if max_shape is not None:
        height, width = max_shape
        decoded = torch.stack([decoded[..., 0].clamp(0, width), decoded[..., 1].clamp(0, height),
                               decoded[..., 2].clamp(0, width), decoded[..., 3].clamp(0, height)], dim=-1)
    return decoded


def flatten_levels(level_outputs, channels):
    """Per-level head outputs (N, A*C, H, W) -> (N, Σ H*W*A, C), in the anchor order of ``AnchorGenerator``.

    Distillers gather a teacher's logits at the student's positive anchors with
    ``flatten_levels(cls_logits, K)[pos["batch_idx"], pos["index"]]``.
    """
    batch = level_outputs[0].shape[0]
    return torch.cat([out.permute(0, 2, 3, 1).reshape(batch, -1, channels) for out in level_outputs], dim=1)


# ----------------------------------------------------------------------------------------------------
# Assignment, sampling, losses, post-processing
# ----------------------------------------------------------------------------------------------------
def assign_by_iou(boxes, gt_boxes, pos_iou, neg_iou, min_pos_iou, match_low_quality):
    """Max-IoU assignment of ``boxes`` (N, 4) to ``gt_boxes`` (G, 4): (N,) int64, -1 ignore, 0 bg, g+1."""
    assigned = torch.full((boxes.shape[0],), -1, dtype=torch.long, device=boxes.device)
    if gt_boxes.shape[0] == 0:
        return assigned.zero_()
    if boxes.shape[0] == 0:
        return assigned
    iou = box_iou(gt_boxes, boxes)
    max_iou, best_gt = iou.max(dim=0)
    assigned[max_iou < neg_iou] = 0
    positive = max_iou >= pos_iou
    assigned[positive] = best_gt[positive] + 1
    if match_low_quality:
        # Later GTs overwrite earlier ones on ties, as in mmdet's per-GT loop.
        gt_best = iou.max(dim=1).values
        for g in range(gt_boxes.shape[0]):
            if gt_best[g] > 0 and gt_best[g] >= min_pos_iou:
                assigned[iou[g] == gt_best[g]] = g + 1
    return assigned


def _random_subset(indices, count, generator):
    if indices.numel() <= count:
        return indices
    return indices[torch.randperm(indices.numel(), generator=generator, device=indices.device)[:count]]


def sample_indices(assigned, num_samples, pos_fraction, generator=None):
    """mmdet's RandomSampler: a uniform subset of at most ``num_samples * pos_fraction`` positives, then of
    negatives filling up the rest; drawn from ``generator`` (None: torch's global generator)."""
    positives = _random_subset(torch.nonzero(assigned > 0).flatten(), int(num_samples * pos_fraction), generator)
    negatives = _random_subset(torch.nonzero(assigned == 0).flatten(), num_samples - positives.numel(), generator)
    return positives, negatives


def sampling_generators(targets, device):
    """One generator per training image for the RPN and RoI samplers, seeded by the target's
    ``sampling_seed`` (drawn by the data set from the sample's own augmentation generator). The draws then
    depend on the image alone, not on the process or its position in a batch: N DDP processes sample
    what one process over the global batch samples, and a resumed run what an uninterrupted one does.
    A target without a seed draws from torch's global generator."""
    generators = []
    for target in targets:
        seed = target.get("sampling_seed")
        generators.append(None if seed is None else torch.Generator(device).manual_seed(int(seed)))
    return generators


def focal_loss(logits, targets, avg_factor, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss of (M, K) logits against 0/1 targets, summed and divided by ``avg_factor``."""
    return sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum") / avg_factor


def l1_loss(pred, target, avg_factor):
    return (pred - target).abs().sum() / avg_factor


def topk_above_threshold(scores, score_thr, topk=None):
    """(row, class) pairs of ``scores`` (N, K) above ``score_thr``, best ``topk`` first: (scores, rows, labels)."""
    pairs = torch.nonzero(scores > score_thr)
    kept = scores[pairs[:, 0], pairs[:, 1]]
    kept, order = kept.sort(descending=True)
    if topk is not None:
        kept, order = kept[:topk], order[:topk]
    return kept, pairs[order, 0], pairs[order, 1]


def nms_detections(boxes, scores, labels, iou_thr, max_dets):
    """Class-wise NMS, best ``max_dets`` kept: dict(boxes, scores, labels)."""
    keep = batched_nms(boxes, scores, labels, iou_thr)[:max_dets]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------
class FPN(nn.Module):
    """Feature pyramid on c2..c5 starting at ``first_level`` (2 or 3), ``num_outs`` outputs p<first>..

    ``extra="maxpool"`` adds levels by stride-2 subsampling of the last output (Faster R-CNN);
    ``extra="conv_on_input"`` adds stride-2 3x3 convs, the first on the last backbone map (RetinaNet).
    """

    def __init__(self, in_channels, out_channels=256, first_level=2, num_outs=5, extra="maxpool"):
        super().__init__()
        if extra not in ("maxpool", "conv_on_input"):
            raise ValueError(f"extra must be 'maxpool' or 'conv_on_input', got {extra!r}")
        self.inputs = BACKBONE_LEVELS[first_level - 2:]
        self.names = tuple(f"p{first_level + i}" for i in range(num_outs))
        self.extra = extra
        used = [in_channels[name] for name in self.inputs]
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in used)
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in used)
        self.num_extra = num_outs - len(used)
        self.extra_convs = nn.ModuleList()
        if extra == "conv_on_input":
            # The first extra level reads the last backbone map (C5), later ones the previous output.
            extra_in = ([used[-1]] + [out_channels] * self.num_extra)[:self.num_extra]
            self.extra_convs.extend(nn.Conv2d(c, out_channels, 3, stride=2, padding=1) for c in extra_in)
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)

    def forward(self, backbone_feats):
        laterals = [conv(backbone_feats[name]) for conv, name in zip(self.lateral_convs, self.inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        outs = [conv(lateral) for conv, lateral in zip(self.output_convs, laterals)]
        if self.extra == "maxpool":
            for _ in range(self.num_extra):
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        else:
            source = backbone_feats[self.inputs[-1]]
            for conv in self.extra_convs:
                source = conv(source)
                outs.append(source)
        return OrderedDict(zip(self.names, outs))


def _conv_relu_stack(channels, depth):
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _init_normal(module, std):
    nn.init.normal_(module.weight, std=std)
    nn.init.zeros_(module.bias)


class RetinaHead(nn.Module):
    """Shared head: 4 conv+ReLU per branch, then a 3x3 classifier (A*K sigmoid logits) and regressor (A*4)."""

    def __init__(self, num_classes, num_anchors=9, channels=256, stacked_convs=4, prior_prob=0.01):
        super().__init__()
        self.cls_convs = _conv_relu_stack(channels, stacked_convs)
        self.reg_convs = _conv_relu_stack(channels, stacked_convs)
        self.cls_out = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                _init_normal(conv, 0.01)
        # Start every anchor at foreground probability prior_prob so the focal loss is not swamped at step 0.
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, levels):
        cls_logits = [self.cls_out(self.cls_convs(x)) for x in levels]
        bbox_preds = [self.reg_out(self.reg_convs(x)) for x in levels]
        return cls_logits, bbox_preds


class RPNHead(nn.Module):
    """Shared conv3x3+ReLU, then 1x1 objectness (A sigmoid logits) and 1x1 deltas (A*4)."""

    def __init__(self, num_anchors=3, channels=256):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.cls_out = nn.Conv2d(channels, num_anchors, 1)
        self.reg_out = nn.Conv2d(channels, num_anchors * 4, 1)
        for conv in (self.conv, self.cls_out, self.reg_out):
            _init_normal(conv, 0.01)

    def forward(self, levels):
        hidden = [F.relu(self.conv(x)) for x in levels]
        return [self.cls_out(h) for h in hidden], [self.reg_out(h) for h in hidden]


class BoxHead(nn.Module):
    """Two shared fc-1024 on the flattened 7x7 RoI features, then K+1 class logits and 4K deltas."""

    def __init__(self, num_classes, channels=256, roi_size=7, fc_channels=1024):
        super().__init__()
        self.shared_fcs = nn.Sequential(nn.Flatten(), nn.Linear(channels * roi_size * roi_size, fc_channels),
                                        nn.ReLU(inplace=True), nn.Linear(fc_channels, fc_channels),
                                        nn.ReLU(inplace=True))
        self.cls_out = nn.Linear(fc_channels, num_classes + 1)
        self.reg_out = nn.Linear(fc_channels, num_classes * 4)
        for fc in self.shared_fcs:
            if isinstance(fc, nn.Linear):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.zeros_(fc.bias)
        _init_normal(self.cls_out, 0.01)
        _init_normal(self.reg_out, 0.001)

    def forward(self, roi_feats):
        hidden = self.shared_fcs(roi_feats)
        return self.cls_out(hidden), self.reg_out(hidden)


def roi_levels(rois, num_levels=4, finest_scale=56.0):
    """Pyramid level (0 = P2) RoIAlign reads for each RoI (R, 5): floor(log2(√(wh)/56 + 1e-6)), clamped."""
    scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


def multilevel_roi_align(levels, rois, strides, output_size=7, finest_scale=56.0):
    """RoIAlign (R, 5) rois = (batch_idx, x1, y1, x2, y2), each on its own level: (R, C, s, s)."""
    assigned = roi_levels(rois, len(levels), finest_scale)
    pooled = levels[0].new_zeros(rois.shape[0], levels[0].shape[1], output_size, output_size)
    for level, (feat, stride) in enumerate(zip(levels, strides)):
        idx = torch.nonzero(assigned == level).flatten()
        if idx.numel():
            pooled[idx] = roi_align(feat, rois[idx], output_size, spatial_scale=1.0 / stride,
                                    sampling_ratio=0, aligned=True)
    return pooled


# ----------------------------------------------------------------------------------------------------
# Detectors
# ----------------------------------------------------------------------------------------------------
def _check_inputs(images, targets, image_sizes, num_classes):
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    batch = images.shape[0]
    if image_sizes is None:
        image_sizes = [tuple(images.shape[-2:])] * batch
    if len(image_sizes) != batch:
        raise ValueError(f"image_sizes must have one (h, w) per image ({batch}), got {len(image_sizes)}")
    if targets is not None:
        if len(targets) != batch:
            raise ValueError(f"targets must have one dict per image ({batch}), got {len(targets)}")
        for i, target in enumerate(targets):
            boxes, labels = target["boxes"], target["labels"]
            if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
                raise ValueError(f"targets[{i}] needs boxes (K, 4) and labels (K,), got {tuple(boxes.shape)} "
                                 f"and {tuple(labels.shape)}")
            if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"targets[{i}]['labels'] must lie in [0, {num_classes}), got "
                                 f"{labels.min().item()}..{labels.max().item()}")
    return [tuple(int(side) for side in size) for size in image_sizes]


class _FPNDetector(nn.Module):
    """Backbone + FPN; ``feats`` holds c2..c5 and the pyramid levels."""

    def __init__(self, backbone, num_classes, neck):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.num_classes = num_classes
        self.out_channels = {**backbone.out_channels,
                             **{name: neck.output_convs[0].out_channels for name in neck.names}}

    def extract_feats(self, images):
        feats = OrderedDict(self.backbone(images))
        feats.update(self.neck(feats))
        return feats

    def pyramid(self, feats):
        return [feats[name] for name in self.neck.names]


class RetinaNet(_FPNDetector):
    """RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", arXiv 1708.02002), mmdet 2.x defaults.

    Output dict: ``feats`` (c2..c5, p3..p7), ``cls_logits`` / ``bbox_preds`` (per level (N, A*K, H, W) /
    (N, A*4, H, W)); training with targets adds ``losses`` {loss_cls, loss_bbox} and ``pos_anchors``
    {boxes (P, 4), labels (P,), batch_idx (P,), index (P,) into ``flatten_levels``, levels (P,) 0 = P3};
    eval with ``predict`` adds ``detections``.
    """

    def __init__(self, backbone, num_classes, score_thr=0.05, nms_iou=0.5, max_dets=100, nms_pre=1000):
        super().__init__(backbone, num_classes,
                         FPN(backbone.out_channels, first_level=3, num_outs=5, extra="conv_on_input"))
        self.anchor_generator = AnchorGenerator((8, 16, 32, 64, 128), [4 * 2 ** (i / 3) for i in range(3)])
        self.head = RetinaHead(num_classes, self.anchor_generator.num_anchors)
        self.score_thr, self.nms_iou, self.max_dets, self.nms_pre = score_thr, nms_iou, max_dets, nms_pre

    def forward(self, images, targets=None, image_sizes=None, predict=True):
        image_sizes = _check_inputs(images, targets, image_sizes, self.num_classes)
        feats = self.extract_feats(images)
        cls_logits, bbox_preds = self.head(self.pyramid(feats))
        out = {"feats": feats, "cls_logits": cls_logits, "bbox_preds": bbox_preds}
        feat_sizes = [tuple(x.shape[-2:]) for x in cls_logits]
        anchors = self.anchor_generator.grid(feat_sizes, images.device)
        if self.training and targets is not None:
            out["losses"], out["pos_anchors"] = self.loss(cls_logits, bbox_preds, anchors, feat_sizes, targets,
                                                          image_sizes)
        elif not self.training and predict:
            out["detections"] = self.predict(cls_logits, bbox_preds, anchors, image_sizes)
        return out

    def loss(self, cls_logits, bbox_preds, anchors, feat_sizes, targets, image_sizes):
        flat_cls = flatten_levels(cls_logits, self.num_classes)
        flat_reg = flatten_levels(bbox_preds, 4)
        all_anchors = torch.cat(anchors)
        anchor_level = torch.cat([torch.full((len(a),), lvl, device=all_anchors.device)
                                  for lvl, a in enumerate(anchors)])
        cls_terms, cls_targets, reg_terms, reg_targets, positives = [], [], [], [], []
        avg_factor = 0
        for i, (target, size) in enumerate(zip(targets, image_sizes)):
            gt_boxes, gt_labels = target["boxes"].to(all_anchors), target["labels"].to(all_anchors.device)
            valid = self.anchor_generator.valid_flags(feat_sizes, size, all_anchors.device)
            assigned = torch.full_like(valid, -1, dtype=torch.long)
            assigned[valid] = assign_by_iou(all_anchors[valid], gt_boxes, pos_iou=0.5, neg_iou=0.4,
                                            min_pos_iou=0.0, match_low_quality=True)
            pos = torch.nonzero(assigned > 0).flatten()
            used = assigned >= 0
            onehot = torch.zeros_like(flat_cls[i])
            onehot[pos, gt_labels[assigned[pos] - 1]] = 1.0
            cls_terms.append(flat_cls[i][used])
            cls_targets.append(onehot[used])
            matched = gt_boxes[assigned[pos] - 1]
            reg_terms.append(flat_reg[i][pos])
            reg_targets.append(encode_boxes(all_anchors[pos], matched, UNIT_STDS))
            positives.append((i, pos, gt_labels[assigned[pos] - 1]))
            avg_factor += max(pos.numel(), 1)
        losses = {"loss_cls": focal_loss(torch.cat(cls_terms), torch.cat(cls_targets), avg_factor),
                  "loss_bbox": l1_loss(torch.cat(reg_terms), torch.cat(reg_targets), avg_factor)}
        index = torch.cat([pos for _, pos, _ in positives])
        pos_anchors = {"boxes": all_anchors[index],
                       "labels": torch.cat([labels for _, _, labels in positives]),
                       "batch_idx": torch.cat([torch.full_like(pos, i) for i, pos, _ in positives]),
                       "index": index,
                       "levels": anchor_level[index]}
        return losses, pos_anchors

    @torch.no_grad()
    def predict(self, cls_logits, bbox_preds, anchors, image_sizes):
        detections = []
        for i, size in enumerate(image_sizes):
            boxes, scores, labels = [], [], []
            for level_cls, level_reg, level_anchors in zip(cls_logits, bbox_preds, anchors):
                probs = flatten_levels([level_cls[i:i + 1]], self.num_classes)[0].sigmoid()
                deltas = flatten_levels([level_reg[i:i + 1]], 4)[0]
                top_scores, rows, top_labels = topk_above_threshold(probs, self.score_thr, self.nms_pre)
                boxes.append(decode_boxes(level_anchors[rows], deltas[rows], UNIT_STDS, max_shape=size))
                scores.append(top_scores)
                labels.append(top_labels)
            detections.append(nms_detections(torch.cat(boxes), torch.cat(scores), torch.cat(labels),
                                             self.nms_iou, self.max_dets))
        return detections


class FasterRCNN(_FPNDetector):
    """Faster R-CNN with FPN (Ren et al. arXiv 1506.01497; Lin et al. arXiv 1612.03144), mmdet 2.x defaults.

    Output dict: ``feats`` (c2..c5, p2..p6), ``rpn_cls_logits`` / ``rpn_bbox_preds`` (per level).
    Training with targets adds ``losses`` {loss_rpn_cls, loss_rpn_bbox, loss_cls, loss_bbox} and the
    sampled RoIs: ``rois`` (R, 5) = (batch_idx, x1, y1, x2, y2), positives first within each image;
    ``roi_labels`` (R,) with background = K; ``roi_targets`` (R, 4) encoded deltas (0 for negatives);
    ``roi_levels`` (R,) (0 = P2); ``roi_feats`` (R, 256, 7, 7); ``roi_cls_logits`` (R, K+1);
    ``roi_bbox_preds`` (R, 4K). Eval with ``predict`` adds ``proposals`` and ``detections``.
    """

    roi_strides = (4, 8, 16, 32)
    # mmdet's faster_rcnn_r50_fpn.py: the R-CNN assigner does not match low-quality proposals
    rcnn_match_low_quality = False

    def __init__(self, backbone, num_classes, score_thr=0.05, nms_iou=0.5, max_dets=100,
                 rpn_train=(2000, 1000), rpn_test=(1000, 1000), rpn_nms_iou=0.7, num_rois=512, pos_fraction=0.25):
        super().__init__(backbone, num_classes, FPN(backbone.out_channels, first_level=2, num_outs=5))
        self.anchor_generator = AnchorGenerator((4, 8, 16, 32, 64), [8])
        self.rpn_head = RPNHead(self.anchor_generator.num_anchors)
        self.box_head = BoxHead(num_classes)
        self.score_thr, self.nms_iou, self.max_dets = score_thr, nms_iou, max_dets
        self.rpn_train, self.rpn_test, self.rpn_nms_iou = rpn_train, rpn_test, rpn_nms_iou
        self.num_rois, self.pos_fraction = num_rois, pos_fraction

    def roi_features(self, feats, rois):
        """RoIAlign 7x7 of ``rois`` (R, 5) on P2-P5 of ``feats`` (a detector's ``feats`` dict)."""
        levels = [feats[f"p{i}"] for i in range(2, 6)]
        return multilevel_roi_align(levels, rois, self.roi_strides)

    def roi_logits(self, feats, rois):
        """(R, K+1) class logits of this detector's RoI head on given ``rois``, pooled from ``feats``."""
        return self.box_head(self.roi_features(feats, rois))[0]

    def forward(self, images, targets=None, image_sizes=None, predict=True, rois=None):
        """``rois`` (R, 5): also run the RoI head on these boxes (``roi_feats``, ``roi_cls_logits``); a
        teacher gets the student's sampled RoIs this way, so both heads score the same boxes."""
        image_sizes = _check_inputs(images, targets, image_sizes, self.num_classes)
        feats = self.extract_feats(images)
        levels = self.pyramid(feats)
        rpn_cls, rpn_reg = self.rpn_head(levels)
        out = {"feats": feats, "rpn_cls_logits": rpn_cls, "rpn_bbox_preds": rpn_reg}
        feat_sizes = [tuple(x.shape[-2:]) for x in levels]
        anchors = self.anchor_generator.grid(feat_sizes, images.device)
        if self.training and targets is not None:
            generators = sampling_generators(targets, images.device)
            losses = self.rpn_loss(rpn_cls, rpn_reg, anchors, feat_sizes, targets, image_sizes, generators)
            proposals = self.proposals(rpn_cls, rpn_reg, anchors, image_sizes, *self.rpn_train)
            sampled, labels, deltas, gt_indices = self.sample_rois(proposals, targets, generators)
            roi_feats = self.roi_features(feats, sampled)
            cls_logits, bbox_preds = self.box_head(roi_feats)
            losses.update(self.rcnn_loss(cls_logits, bbox_preds, labels, deltas))
            out.update(losses=losses, rois=sampled, roi_labels=labels, roi_targets=deltas, roi_gt_indices=gt_indices,
                       roi_levels=roi_levels(sampled), roi_feats=roi_feats, roi_cls_logits=cls_logits,
                       roi_bbox_preds=bbox_preds)
        elif not self.training and predict:
            out["proposals"] = self.proposals(rpn_cls, rpn_reg, anchors, image_sizes, *self.rpn_test)
            out["detections"] = self.predict(feats, out["proposals"], image_sizes)
        if rois is not None:
            out["roi_feats"] = self.roi_features(feats, rois)
            out["roi_cls_logits"], out["roi_bbox_preds"] = self.box_head(out["roi_feats"])
        return out

    def rpn_loss(self, rpn_cls, rpn_reg, anchors, feat_sizes, targets, image_sizes, generators):
        """RPN losses; ``generators`` (one per image, :func:`sampling_generators`) draw the anchor sample."""
        flat_cls = flatten_levels(rpn_cls, 1)
        flat_reg = flatten_levels(rpn_reg, 4)
        all_anchors = torch.cat(anchors)
        logits, labels, reg_terms, reg_targets = [], [], [], []
        avg_factor = 0
        for i, (target, size, generator) in enumerate(zip(targets, image_sizes, generators)):
            gt_boxes = target["boxes"].to(all_anchors)
            valid = self.anchor_generator.valid_flags(feat_sizes, size, all_anchors.device)
            assigned = torch.full_like(valid, -1, dtype=torch.long)
            assigned[valid] = assign_by_iou(all_anchors[valid], gt_boxes, pos_iou=0.7, neg_iou=0.3,
                                            min_pos_iou=0.3, match_low_quality=True)
            pos, neg = sample_indices(assigned, 256, 0.5, generator)
            logits.append(flat_cls[i, torch.cat([pos, neg]), 0])
            labels.append(torch.cat([torch.ones_like(pos), torch.zeros_like(neg)]).to(all_anchors))
            reg_terms.append(flat_reg[i][pos])
            reg_targets.append(encode_boxes(all_anchors[pos], gt_boxes[assigned[pos] - 1], UNIT_STDS))
            avg_factor += max(pos.numel(), 1) + max(neg.numel(), 1)
        bce = F.binary_cross_entropy_with_logits(torch.cat(logits), torch.cat(labels), reduction="sum")
        return {"loss_rpn_cls": bce / avg_factor,
                "loss_rpn_bbox": l1_loss(torch.cat(reg_terms), torch.cat(reg_targets), avg_factor)}

    @torch.no_grad()
    def proposals(self, rpn_cls, rpn_reg, anchors, image_sizes, nms_pre, max_num):
        """Per image (n, 4) proposals: per-level top ``nms_pre``, NMS within each level, best ``max_num``."""
        result = []
        for i, size in enumerate(image_sizes):
            boxes, scores, level_ids = [], [], []
            for level, (level_cls, level_reg, level_anchors) in enumerate(zip(rpn_cls, rpn_reg, anchors)):
                level_scores = flatten_levels([level_cls[i:i + 1]], 1)[0, :, 0].sigmoid()
                top_scores, top = level_scores.topk(min(nms_pre, level_scores.numel()))
                deltas = flatten_levels([level_reg[i:i + 1]], 4)[0, top]
                boxes.append(decode_boxes(level_anchors[top], deltas, UNIT_STDS, max_shape=size))
                scores.append(top_scores)
                level_ids.append(torch.full_like(top, level))
            boxes, scores, level_ids = torch.cat(boxes), torch.cat(scores), torch.cat(level_ids)
            non_empty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, level_ids = boxes[non_empty], scores[non_empty], level_ids[non_empty]
            keep = batched_nms(boxes, scores, level_ids, self.rpn_nms_iou)[:max_num]
            result.append(boxes[keep])
        return result

    @torch.no_grad()
    def sample_rois(self, proposals, targets, generators):
        """GT-augmented proposals -> sampled ``rois`` (R, 5), ``labels`` (R,) (bg = K), ``deltas`` (R, 4) and
        ``gt_indices`` (R,): the GT each RoI is assigned to, within its image (-1 for negatives; mmdet's
        ``pos_assigned_gt_inds``); ``generators`` as in :meth:`rpn_loss`, which has drawn from them first."""
        rois, labels, deltas, gt_indices = [], [], [], []
        for i, (props, target, generator) in enumerate(zip(proposals, targets, generators)):
            gt_boxes, gt_labels = target["boxes"].to(props), target["labels"].to(props.device)
            candidates = torch.cat([gt_boxes, props])
            own_gt = torch.arange(1, gt_boxes.shape[0] + 1, device=props.device)
            assigned = torch.cat([own_gt, assign_by_iou(props, gt_boxes, pos_iou=0.5, neg_iou=0.5,
                                                        min_pos_iou=0.5,
                                                        match_low_quality=self.rcnn_match_low_quality)])
            pos, neg = sample_indices(assigned, self.num_rois, self.pos_fraction, generator)
            picked = candidates[torch.cat([pos, neg])]
            rois.append(torch.cat([torch.full_like(picked[:, :1], i), picked], dim=1))
            matched = assigned[pos] - 1
            labels.append(torch.cat([gt_labels[matched], torch.full_like(neg, self.num_classes)]))
            deltas.append(torch.cat([encode_boxes(candidates[pos], gt_boxes[matched], RCNN_STDS),
                                     picked.new_zeros(neg.numel(), 4)]))
            gt_indices.append(torch.cat([matched, torch.full_like(neg, -1)]))
        return torch.cat(rois), torch.cat(labels), torch.cat(deltas), torch.cat(gt_indices)

    def rcnn_loss(self, cls_logits, bbox_preds, labels, deltas):
        positive = labels < self.num_classes
        pos_preds = bbox_preds.view(-1, self.num_classes, 4)[positive, labels[positive]]
        return {"loss_cls": F.cross_entropy(cls_logits, labels),
                "loss_bbox": l1_loss(pos_preds, deltas[positive], max(labels.numel(), 1))}

    @torch.no_grad()
    def predict(self, feats, proposals, image_sizes):
        rois = torch.cat([torch.cat([torch.full_like(p[:, :1], i), p], dim=1) for i, p in enumerate(proposals)])
        cls_logits, bbox_preds = self.box_head(self.roi_features(feats, rois))
        probs = cls_logits.softmax(dim=1)[:, :self.num_classes]
        bbox_preds = bbox_preds.view(-1, self.num_classes, 4)
        detections = []
        for i, size in enumerate(image_sizes):
            mine = rois[:, 0] == i
            boxes = decode_boxes(rois[mine, None, 1:], bbox_preds[mine], RCNN_STDS, max_shape=size)
            scores, rows, labels = topk_above_threshold(probs[mine], self.score_thr)
            detections.append(nms_detections(boxes[rows, labels], scores, labels, self.nms_iou, self.max_dets))
        return detections


# ----------------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------------
_ARCHITECTURES = {"retinanet": RetinaNet, "faster_rcnn": FasterRCNN}
# SoKD's MobileNetV2 student (its detectron2 code's build_mobilenetv2_fpn_backbone): the FPN reads m2..m5, the
# outputs of the 24-, 32-, 96- and 320-channel stages (our c2..c5 taps); norm "FrozenBN" with FREEZE_AT 0,
# i.e. no layer frozen and every BN in eval mode (its affine parameters train here, as in our ResNets).
MOBILENET_DETECTORS = ("faster_rcnn_mv2",)
SUPPORTED_DETECTORS = tuple(f"{arch}_r{depth}" for arch in _ARCHITECTURES for depth in (18, 34, 50, 101)) \
    + MOBILENET_DETECTORS


def build_detector(name, num_classes, pretrained_backbone=None, rcnn_rois_per_image=512, fcos_options=None):
    """``name`` in SUPPORTED_DETECTORS (e.g. "faster_rcnn_r50"); ResNet stem + stage 1 frozen, BN in eval;
    ``faster_rcnn_mv2``: a MobileNetV2 trunk (torchvision layout) with BN in eval, nothing frozen.
    ``rcnn_rois_per_image``: Faster R-CNN's training RoI sample per image (a one-stage detector has none);
    ``fcos_options``: FCOS's options (``build_fcos``)."""
    if name not in SUPPORTED_DETECTORS:
        raise ValueError(f"unknown detector {name!r}; supported: {', '.join(SUPPORTED_DETECTORS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if name in FCOS_DETECTORS:
        return build_fcos(name, num_classes, pretrained_backbone, **(fcos_options or {}))
    if name in MOBILENET_DETECTORS:
        return FasterRCNN(build_mobilenet_v2(pretrained_backbone, norm_eval=True), num_classes,
                          num_rois=rcnn_rois_per_image)
    arch, depth = name.rsplit("_r", 1)
    backbone = build_backbone(int(depth), "torchvision", output_stride=32, pretrained=pretrained_backbone,
                              frozen_stages=1, norm_eval=True)
    options = {"num_rois": rcnn_rois_per_image} if arch == "faster_rcnn" else {}
    return _ARCHITECTURES[arch](backbone, num_classes, **options)


# ----------------------------------------------------------------------------------------------------
# Released mmdetection 2.x checkpoints -> our keys
# ----------------------------------------------------------------------------------------------------
def _mmdet_rules(num_laterals):
    """mmdet 2.x names (``FPN``, ``RetinaHead``, ``RPNHead``, ``Shared2FCBBoxHead``) -> ours.

    mmdet wraps each FPN / RetinaNet-tower conv in a ``ConvModule`` (``.conv.``; no norm in these configs)
    and appends RetinaNet's two extra P6/P7 convs to ``fpn_convs`` after the ``num_laterals`` output convs.
    Our conv towers interleave ReLUs (conv i at index 2i), as do the two shared fcs after the Flatten.
    Output channels need no reordering: mmdet lays the RetinaNet classifier out as (anchor, class) with
    sigmoid classes only, Faster R-CNN's ``fc_cls`` has the background last and ``fc_reg`` 4 deltas per
    class, class-major, all as our heads and ``flatten_levels`` read them.
    """
    def fpn_conv(match):
        index = int(match[1])
        if index < num_laterals:
            return f"neck.output_convs.{index}."
        return f"neck.extra_convs.{index - num_laterals}."

    def tower(ours):
        return lambda match: f"head.{ours}.{2 * int(match[1])}."

    def rule(pattern, replace):
        return re.compile(pattern), (replace if callable(replace) else (lambda match: match.expand(replace)))

    return backbone_key_rules("backbone.", "backbone.") + [
        rule(r"neck\.lateral_convs\.(\d+)\.conv\.", r"neck.lateral_convs.\1."),
        rule(r"neck\.fpn_convs\.(\d+)\.conv\.", fpn_conv),
        rule(r"bbox_head\.cls_convs\.(\d+)\.conv\.", tower("cls_convs")),
        rule(r"bbox_head\.reg_convs\.(\d+)\.conv\.", tower("reg_convs")),
        rule(r"bbox_head\.retina_cls\.", "head.cls_out."),
        rule(r"bbox_head\.retina_reg\.", "head.reg_out."),
        rule(r"rpn_head\.rpn_conv\.", "rpn_head.conv."),
        rule(r"rpn_head\.rpn_cls\.", "rpn_head.cls_out."),
        rule(r"rpn_head\.rpn_reg\.", "rpn_head.reg_out."),
        rule(r"roi_head\.bbox_head\.shared_fcs\.(\d+)\.", lambda m: f"box_head.shared_fcs.{2 * int(m[1]) + 1}."),
        rule(r"roi_head\.bbox_head\.fc_cls\.", "box_head.cls_out."),
        rule(r"roi_head\.bbox_head\.fc_reg\.", "box_head.reg_out."),
    ]


def convert_mmdet_state_dict(state_dict, source="mmdet checkpoint"):
    """Map a RetinaNet or Faster R-CNN ResNet-FPN checkpoint of mmdetection 2.x onto our keys; keys no
    rule knows raise a ValueError naming them."""
    num_laterals = len({key.split(".")[2] for key in state_dict if key.startswith("neck.lateral_convs.")})
    return rename_keys(state_dict, _mmdet_rules(num_laterals), source)


# ----------------------------------------------------------------------------------------------------
# FCOS (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", arXiv:1904.01355; the
# tianzhi0549/FCOS code, maskrcnn-benchmark based)
# ----------------------------------------------------------------------------------------------------
# Every location of P3..P7 predicts per-class sigmoid scores, a centerness logit and its distances
# (l, t, r, b) to the four sides of a box. A location is positive for a box that contains it (with centre
# sampling: only near the box centre) whose largest distance falls in the level's range; of several such
# boxes the smallest wins. Losses: sigmoid focal (α 0.25, γ 2) over all locations / #pos; IoU loss on the
# positives weighted by their centerness target / Σ weights; BCE of centerness / #pos. Under DDP #pos and
# Σ weights are averaged over the ranks, as in the FCOS code. Test: p > 0.05, score = p · sigmoid(centerness),
# top 1000 per level, class-wise NMS 0.6, 100 per image.
FCOS_STRIDES = (8, 16, 32, 64, 128)
FCOS_SIZES_OF_INTEREST = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, 1e8))
FCOS_IOU_LOSSES = ("iou", "linear_iou", "giou")


def fcos_points(sizes, strides=FCOS_STRIDES, dtype=torch.float32, device=None):
    """Locations of every level, (h*w, 2) (x, y) row-major: (j·s + s//2, i·s + s//2) for stride s."""
    points = []
    for (height, width), stride in zip(sizes, strides):
        ys = torch.arange(height, dtype=dtype, device=device) * stride + stride // 2
        xs = torch.arange(width, dtype=dtype, device=device) * stride + stride // 2
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return points


def fcos_targets(points, gt_boxes, gt_labels, num_classes, sizes_of_interest=FCOS_SIZES_OF_INTEREST,
                 center_sampling_radius=0.0, strides=FCOS_STRIDES):
    """Targets of one image: labels (P,) (background = ``num_classes``) and (l, t, r, b) (P, 4) to the
    assigned box (also filled at background locations, where they are unused), over the levels of
    ``points`` (a list of (h*w, 2)) concatenated in level order."""
    counts = [len(level) for level in points]
    xy = torch.cat(points)
    lower = torch.cat([xy.new_full((n,), float(lo)) for n, (lo, _) in zip(counts, sizes_of_interest)])
    upper = torch.cat([xy.new_full((n,), float(hi)) for n, (_, hi) in zip(counts, sizes_of_interest)])
    if gt_boxes.shape[0] == 0:
        return torch.full((xy.shape[0],), num_classes, dtype=torch.long, device=xy.device), xy.new_zeros(xy.shape[0], 4)
    boxes = gt_boxes.to(xy)
    xs, ys = xy[:, 0, None], xy[:, 1, None]
    reg = torch.stack([xs - boxes[:, 0], ys - boxes[:, 1], boxes[:, 2] - xs, boxes[:, 3] - ys], dim=2)  # (P, G, 4)
    if center_sampling_radius > 0:
        radius = torch.cat([xy.new_full((n,), float(s) * center_sampling_radius) for n, s in zip(counts, strides)])
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        x1 = torch.maximum(cx - radius[:, None], boxes[:, 0])
        y1 = torch.maximum(cy - radius[:, None], boxes[:, 1])
        x2 = torch.minimum(cx + radius[:, None], boxes[:, 2])
        y2 = torch.minimum(cy + radius[:, None], boxes[:, 3])
        inside = torch.stack([xs - x1, ys - y1, x2 - xs, y2 - ys], dim=2).min(dim=2).values > 0
    else:
        inside = reg.min(dim=2).values > 0
    largest = reg.max(dim=2).values
    in_range = (largest >= lower[:, None]) & (largest <= upper[:, None])
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    areas = torch.where(inside & in_range, area[None, :].expand_as(largest), torch.full_like(largest, math.inf))
    min_area, best = areas.min(dim=1)       # first index among equal areas
    labels = gt_labels.to(xy.device).long()[best]
    labels[min_area == math.inf] = num_classes
    return labels, reg[torch.arange(xy.shape[0], device=xy.device), best]


def fcos_centerness_target(reg_targets):
    """sqrt(min(l, r)/max(l, r) · min(t, b)/max(t, b)) of (P, 4) (l, t, r, b) targets: (P,)."""
    left_right, top_bottom = reg_targets[:, [0, 2]], reg_targets[:, [1, 3]]
    return torch.sqrt(left_right.min(dim=1).values / left_right.max(dim=1).values
                      * top_bottom.min(dim=1).values / top_bottom.max(dim=1).values)


def fcos_iou_losses(pred, target, loss_type="iou"):
    """Per-location IoU losses of (P, 4) (l, t, r, b) distances from the same points: "iou" -log IoU,
    "linear_iou" 1 - IoU, "giou" 1 - GIoU, with IoU = (I + 1)/(U + 1)."""
    if loss_type not in FCOS_IOU_LOSSES:
        raise ValueError(f"loss_type must be one of {FCOS_IOU_LOSSES}, got {loss_type!r}")
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    low, high = torch.minimum(pred, target), torch.maximum(pred, target)
    intersection = (low[:, 0] + low[:, 2]) * (low[:, 1] + low[:, 3])
    union = pred_area + target_area - intersection
    iou = (intersection + 1.0) / (union + 1.0)
    if loss_type == "iou":
        return -torch.log(iou)
    if loss_type == "linear_iou":
        return 1 - iou
    enclosing = (high[:, 0] + high[:, 2]) * (high[:, 1] + high[:, 3]) + 1e-7
    return 1 - (iou - (enclosing - union) / enclosing)


def fcos_iou_loss(pred, target, weight=None, loss_type="iou"):
    """Σ w·loss / Σ w of ``fcos_iou_losses`` (the mean without weights, or when they sum to 0): 0-dim."""
    losses = fcos_iou_losses(pred, target, loss_type)
    if weight is not None and weight.sum() > 0:
        return (losses * weight).sum() / weight.sum()
    return losses.mean()


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` averaged over the DDP ranks (themselves without DDP), in one all-reduce left on the device:
    FCOS's normalisers. Every rank must call it the same number of times, whatever its batch holds."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    total = values.double()  # the sum of counts over many ranks stays exact
    torch.distributed.all_reduce(total)
    return (total / torch.distributed.get_world_size()).to(values.dtype)


class Scale(nn.Module):
    """A learnable scalar (one per pyramid level) multiplying the shared regressor's output."""

    def __init__(self, init=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(init)]))

    def forward(self, x):
        return x * self.scale


def _gn_tower(channels, depth):
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(32, channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """Shared over levels: cls and bbox towers of 4 × (conv3x3 + GN(32) + ReLU); ``cls_logits`` (K),
    ``centerness`` (1, on the cls tower, or on the bbox tower with ``centerness_on_reg``) and ``bbox_pred``
    (4) convs; the regression is scaled per level, then exp (ReLU, and × stride at test time, with
    ``norm_reg_targets``). Layout and init of the FCOS code: N(0, 0.01) weights, zero biases, the
    classifier's bias at -log((1 - 0.01)/0.01)."""

    def __init__(self, num_classes, channels=256, num_levels=5, stacked_convs=4, prior_prob=0.01,
                 centerness_on_reg=False):
        super().__init__()
        self.cls_tower = _gn_tower(channels, stacked_convs)
        self.bbox_tower = _gn_tower(channels, stacked_convs)
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        self.centerness_on_reg = centerness_on_reg
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                _init_normal(conv, 0.01)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, levels):
        """Per level: class logits (N, K, h, w), raw scaled regression (N, 4, h, w), centerness (N, 1, h, w)."""
        cls_logits, bbox_raw, centerness = [], [], []
        for level, x in enumerate(levels):
            cls_feat, reg_feat = self.cls_tower(x), self.bbox_tower(x)
            cls_logits.append(self.cls_logits(cls_feat))
            centerness.append(self.centerness(reg_feat if self.centerness_on_reg else cls_feat))
            bbox_raw.append(self.scales[level](self.bbox_pred(reg_feat)))
        return cls_logits, bbox_raw, centerness


class FCOSNeck(FPN):
    """FPN on C3-C5 -> P3-P5, then P6 = conv3x3/2(P5) and P7 = conv3x3/2(ReLU(P6)) (FCOS's LastLevelP6P7
    on P5). Every conv kaiming-uniform (a = 1) with zero bias, as maskrcnn-benchmark's
    ``conv_with_kaiming_uniform``; top-down upsampling nearest."""

    def __init__(self, in_channels, out_channels=256):
        super().__init__(in_channels, out_channels, first_level=3, num_outs=3, extra="maxpool")
        self.p6 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        self.names = ("p3", "p4", "p5", "p6", "p7")
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)

    def forward(self, backbone_feats):
        outs = super().forward(backbone_feats)
        outs["p6"] = self.p6(outs["p5"])
        outs["p7"] = self.p7(F.relu(outs["p6"]))
        return outs


class FCOS(_FPNDetector):
    """FCOS with its FPN (P3-P7); see the block comment above. ``backbone`` returns c2..c5 (a ResNet or
    :class:`kd_ref.mobilenet.MobileNetV2Backbone`).

    Options of the FCOS code: ``center_sampling`` radius (0 = off; its "imprv" configs use 1.5),
    ``iou_loss`` ("iou" | "linear_iou" | "giou"), ``centerness_on_reg``, ``norm_reg_targets`` (regress
    distances / stride). ``sizes_of_interest`` are the levels' ranges of max(l, t, r, b).

    Output dict: ``feats`` (c2..c5, p3..p7), per level ``cls_logits`` (N, K, h, w), ``bbox_preds``
    (N, 4, h, w) distances in pixels, ``centerness`` (N, 1, h, w); training with targets adds ``losses``
    {loss_cls, loss_reg, loss_centerness}; eval with ``predict`` adds ``detections``.
    """

    strides = FCOS_STRIDES

    def __init__(self, backbone, num_classes, out_channels=256, center_sampling=0.0, iou_loss="iou",
                 centerness_on_reg=False, norm_reg_targets=False, sizes_of_interest=FCOS_SIZES_OF_INTEREST,
                 score_thr=0.05, nms_iou=0.6, max_dets=100, nms_pre=1000):
        if iou_loss not in FCOS_IOU_LOSSES:
            raise ValueError(f"iou_loss must be one of {FCOS_IOU_LOSSES}, got {iou_loss!r}")
        super().__init__(backbone, num_classes, FCOSNeck(backbone.out_channels, out_channels))
        self.head = FCOSHead(num_classes, out_channels, centerness_on_reg=centerness_on_reg)
        self.center_sampling, self.iou_loss, self.norm_reg_targets = center_sampling, iou_loss, norm_reg_targets
        self.sizes_of_interest = tuple(tuple(bounds) for bounds in sizes_of_interest)
        self.score_thr, self.nms_iou, self.max_dets, self.nms_pre = score_thr, nms_iou, max_dets, nms_pre

    def distances(self, bbox_raw):
        """Per-level (l, t, r, b) in pixels from the head's scaled regression."""
        if self.norm_reg_targets:
            return [F.relu(raw) * stride for raw, stride in zip(bbox_raw, self.strides)]
        return [raw.exp() for raw in bbox_raw]

    def forward(self, images, targets=None, image_sizes=None, predict=True):
        image_sizes = _check_inputs(images, targets, image_sizes, self.num_classes)
        feats = self.extract_feats(images)
        cls_logits, bbox_raw, centerness = self.head(self.pyramid(feats))
        bbox_preds = self.distances(bbox_raw)
        out = {"feats": feats, "cls_logits": cls_logits, "bbox_preds": bbox_preds, "centerness": centerness}
        points = fcos_points([tuple(x.shape[-2:]) for x in cls_logits], self.strides, cls_logits[0].dtype,
                             images.device)
        if self.training and targets is not None:
            out["losses"] = self.loss(cls_logits, bbox_raw, bbox_preds, centerness, points, targets)
        elif not self.training and predict:
            out["detections"] = self.predict(cls_logits, bbox_preds, centerness, points, image_sizes)
        return out

    def loss(self, cls_logits, bbox_raw, bbox_preds, centerness, points, targets):
        labels, reg_targets = [], []
        level_stride = torch.cat([points[0].new_full((len(p),), float(s)) for p, s in zip(points, self.strides)])
        for target in targets:
            image_labels, image_reg = fcos_targets(points, target["boxes"], target["labels"], self.num_classes,
                                                   self.sizes_of_interest, self.center_sampling, self.strides)
            labels.append(image_labels)
            reg_targets.append(image_reg)
        labels, reg_targets = torch.cat(labels), torch.cat(reg_targets)
        flat_cls = flatten_levels(cls_logits, self.num_classes).reshape(-1, self.num_classes)
        # with normalised targets the network regresses distances / stride (ReLU, no exp) in training
        flat_reg = flatten_levels(bbox_raw if self.norm_reg_targets else bbox_preds, 4).reshape(-1, 4)
        flat_ctr = flatten_levels(centerness, 1).reshape(-1)
        if self.norm_reg_targets:
            flat_reg = F.relu(flat_reg)
            reg_targets = reg_targets / level_stride.repeat(len(targets))[:, None]
        positive = torch.nonzero(labels < self.num_classes).flatten()
        pos_targets = reg_targets[positive]
        weight = fcos_centerness_target(pos_targets)
        # both normalisers in one all-reduce that a rank without positives joins too (maskrcnn-benchmark
        # reduces on every rank), so the ranks' collectives stay in step
        counts = torch.stack([weight.new_tensor(float(positive.numel())), weight.sum()])
        num_pos, weight_sum = _mean_over_ranks(counts).unbind()
        num_pos, weight_sum = num_pos.clamp_min(1.0), weight_sum.clamp_min(1e-12)
        onehot = torch.zeros_like(flat_cls)
        onehot[positive, labels[positive]] = 1.0
        losses = {"loss_cls": focal_loss(flat_cls, onehot, num_pos)}
        if positive.numel() == 0:
            losses["loss_reg"] = flat_reg.sum() * 0.0
            losses["loss_centerness"] = flat_ctr.sum() * 0.0
            return losses
        losses["loss_reg"] = (fcos_iou_losses(flat_reg[positive], pos_targets, self.iou_loss) * weight).sum() / weight_sum
        losses["loss_centerness"] = F.binary_cross_entropy_with_logits(flat_ctr[positive], weight,
                                                                       reduction="sum") / num_pos
        return losses

    @torch.no_grad()
    def predict(self, cls_logits, bbox_preds, centerness, points, image_sizes):
        detections = []
        for i, size in enumerate(image_sizes):
            boxes, scores, labels = [], [], []
            for level_cls, level_reg, level_ctr, level_points in zip(cls_logits, bbox_preds, centerness, points):
                probs = flatten_levels([level_cls[i:i + 1]], self.num_classes)[0].sigmoid()
                ctr = flatten_levels([level_ctr[i:i + 1]], 1)[0].sigmoid()
                dist = flatten_levels([level_reg[i:i + 1]], 4)[0]
                candidates = probs > self.score_thr
                combined = torch.where(candidates, probs * ctr, torch.zeros_like(probs))
                # rank by the combined score, among the locations above the threshold on p alone
                top_scores, rows, top_labels = topk_above_threshold(combined, 0.0, self.nms_pre)
                xy, d = level_points[rows], dist[rows]
                decoded = torch.stack([xy[:, 0] - d[:, 0], xy[:, 1] - d[:, 1], xy[:, 0] + d[:, 2], xy[:, 1] + d[:, 3]],
                                      dim=1)
                height, width = size
                boxes.append(torch.stack([decoded[:, 0].clamp(0, width), decoded[:, 1].clamp(0, height),
                                          decoded[:, 2].clamp(0, width), decoded[:, 3].clamp(0, height)], dim=1))
                scores.append(top_scores)
                labels.append(top_labels)
            detections.append(nms_detections(torch.cat(boxes), torch.cat(scores), torch.cat(labels),
                                             self.nms_iou, self.max_dets))
        return detections


# name -> (backbone, FPN/head channels); "c128" / "c64": the narrow heads of FCOS's MNV2 configs and of
# our synthetic student
FCOS_DETECTORS = {"fcos_r18": ("r18", 256), "fcos_r50": ("r50", 256), "fcos_r101": ("r101", 256),
                  "fcos_mv2": ("mv2", 256), "fcos_mv2_c128": ("mv2", 128), "fcos_mv2_c64": ("mv2", 64)}
FCOS_OPTION_NAMES = ("center_sampling", "iou_loss", "centerness_on_reg", "norm_reg_targets", "sizes_of_interest",
                     "stride_in_1x1")


def build_fcos(name, num_classes, pretrained_backbone=None, stride_in_1x1=False, **options):
    """``name`` in FCOS_DETECTORS. ResNets: torchvision layout, stem + stage 1 frozen, BN frozen (the FCOS
    R-50 config: FREEZE_CONV_BODY_AT 2, FrozenBatchNorm); MobileNetV2: every layer and BN trains
    (FREEZE_CONV_BODY_AT 0). ``options``: FCOS's keyword options (FCOS_OPTION_NAMES). ``stride_in_1x1``:
    the ResNet-50/101 bottlenecks of the FCOS code (MSRA weights), so that its released files load; it
    concerns ResNet trunks only (a MobileNetV2 student next to such a teacher shares the recipe's options)."""
    unknown = sorted(set(options) - set(FCOS_OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown FCOS options {unknown}; expected some of {list(FCOS_OPTION_NAMES)}")
    trunk, channels = FCOS_DETECTORS[name]
    if trunk == "mv2":
        backbone = build_mobilenet_v2(pretrained_backbone)
    else:
        depth = int(trunk[1:])
        backbone = build_backbone(depth, "torchvision", output_stride=32, pretrained=pretrained_backbone,
                                  frozen_stages=1, norm_eval=True, stride_in_1x1=stride_in_1x1 and depth >= 50)
    return FCOS(backbone, num_classes, out_channels=channels, **options)


SUPPORTED_DETECTORS = SUPPORTED_DETECTORS + tuple(FCOS_DETECTORS)


def is_two_stage(name: str) -> bool:
    """Whether detector ``name`` is a Faster R-CNN (RoI head: the methods distil its sampled RoIs)."""
    return name.startswith("faster_rcnn")


def is_fcos(name: str | None) -> bool:
    """Whether detector ``name`` is an FCOS (locations, not anchors)."""
    return name is not None and name.startswith("fcos")
