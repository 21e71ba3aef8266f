"""GKD: "Distilling Object Detectors with Global Knowledge" (Tang, Zhang, Cheng, Lu, Xu, Niu, He,
ECCV 2022, arXiv:2210.09022).

Local feature imitation alone transfers whatever the teacher's features contain, including the
teacher's mistakes. GKD describes every instance by its *global knowledge*: its similarities to a small
set of prototypes shared by the student and the teacher, and trusts an instance only as far as the two
descriptions agree.

PGM (prototype generation, once per epoch, no gradients). For one class and one FPN level, N instances
with pooled student/teacher features, unit rows ``a_n``, ``b_n``:

    density_n = sum_j exp(-((1 - <u_n, u_j>) / sigma)^2)            in each space separately
    candidates = {k : density_k > sorted(density)[int(N * quantile)] in both spaces}
    residuals r_a,n = a_n, r_b,n = b_n; repeat M times (joint, regularised matching pursuit):
        i_a = <a_k, r_a,n>,  i_b = <b_k, r_b,n>
        w_a = (alpha (i_a + i_b) + i_a) / (1 + 2 alpha),  w_b = (alpha (i_a + i_b) + i_b) / (1 + 2 alpha)
              (the minimisers of ||r_a - w_a a_k||^2 + ||r_b - w_b b_k||^2 + alpha (w_a - w_b)^2)
        Cost(k) = sum_n ||w_a a_k - r_a,n||^2 + ||w_b b_k - r_b,n||^2 + alpha (w_a - w_b)^2
        k* = argmin Cost;  r_a,n -= w_a(k*, n) a_k*,  r_b,n -= w_b(k*, n) b_k*
    prototypes = the raw pooled features of the picked instances (Pi_s, Pi_t).

RDM (robust distillation, every iteration). With cos(x, Pi) = unit(x) @ unit(Pi)^T (the instance's
global-knowledge representation) and Pi_c the prototypes of the instance's class c:

    w_n = 1 - | max_k cos(f_s,n, Pi_c,s[k]) - max_k cos(f_t,n, Pi_c,t[k]) |     in [0, 1], detached
    L_fg = sum (A(S) - T)^2 M / max(1, 2 sum M) * fg_weight                     M = robust-weighted box mask
    L_bg = sum (A(S) - T)^2 (1 - 1[M>0]) / max(1, 2 sum (1 - 1[M>0])) * bg_weight
    L_soft = T^2 * mean_n w_n * mean_k p_t,k (log p_t,k - log p_s,k),   p = softmax(logits / T)
    L_global = smooth_l1(w * cos(f_s, Pi_s), w * cos(f_t, Pi_t))          (all prototypes of the level)
    loss = att * (R_l L_fg + R_l L_bg + global_weight * sum_l L_global) + soft_weight * L_soft,
    att = 1 - epoch / max_epochs (attenuation), R = mean (two-stage) or sum (one-stage) over levels

``A`` is a per-level 3x3 conv adapter, the only learnable part. Where the released code and config
(hikvision-research/DAVAR-Lab-ML) differ from the paper text, they are followed (docs/specs/gkd.md; the
reasons and our own implementation choices are in docs/design/gkd.md):

1. the global alignment loss is off by default (``global_weight=0``, the released config; 5.0 is the
   paper's variant);
2. the robust weight uses the maximum cosine to the same-class prototypes only;
3. instances are the detector's positive samples with their matched GT's class, not the GT boxes;
4. fg/bg are averaged over levels for Faster R-CNN and summed for RetinaNet, the global term summed in both;
5. the soft-label KD is not attenuated, fg/bg/global are;
6. both detectors use the two-stage adapter (3x3, padding 1, no activation);
7. one-stage robust weights are aligned per anchor with the logits;
8. PGM runs in float32, its matching-pursuit cost in float64;
9. a class/level without a qualifying instance reuses the previous epoch's prototypes, else its instances
   get weight 1 and no global term.

The file holds, in order: the PGM and RDM math and :class:`GKDDistiller` (prototypes kept in its
``state_dict``); the PGM pass over the training set (:func:`select_pgm_instances`,
:func:`generate_epoch_prototypes`, :func:`pgm_annotations`) and :class:`ScheduledGKDDistiller`, the
distiller the engine trains, which runs that pass in ``before_epoch`` and feeds the attenuation its epoch;
GKD's wiring: the FPN levels it reads per detector, the binding of positive samples, and ``METHOD``.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align
from tqdm import tqdm

from kd_ref.detectors import flatten_levels, is_fcos, is_two_stage
from kd_ref.distiller import Distiller, EpochContext, Method, keyword_options
from kd_ref.precision import at_least_float32, autocast_disabled

Prototypes = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1, eps=1e-12)


def _check_matrix(name: str, x, rows: int | None = None, cols: int | None = None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor (N, C), got {got}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(x.shape)}")


def _check_boxes(name: str, boxes) -> None:
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"{name} must be a (N, 4) tensor of xyxy boxes, got {got}")


def _check_cls_start(name: str, cls_start, num_rows: int) -> None:
    if not isinstance(cls_start, torch.Tensor) or cls_start.dim() != 1 or cls_start.numel() < 1:
        raise ValueError(f"{name} must be a 1-D int64 tensor of num_classes + 1 offsets")
    if int(cls_start[0]) != 0 or int(cls_start[-1]) != num_rows or bool((cls_start.diff() < 0).any()):
        raise ValueError(f"{name} must rise from 0 to the number of prototype rows ({num_rows}), "
                         f"got {cls_start.tolist()}")


# ------------------------------------------------------------------------ PGM: prototype generation
def density_candidates(feats_s: torch.Tensor, feats_t: torch.Tensor, sigma: float = 0.1,
                       quantile: float = 0.4) -> torch.Tensor:
    """Indices (ascending, int64) of instances denser than the ``quantile`` density in both spaces."""
    _check_matrix("density_candidates: feats_s", feats_s)
    _check_matrix("density_candidates: feats_t", feats_t, rows=feats_s.shape[0])
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"density_candidates: quantile must lie in [0, 1), got {quantile}")
    num = feats_s.shape[0]
    keep = torch.ones(num, dtype=torch.bool, device=feats_s.device)
    if num == 0:
        return keep.nonzero().flatten()
    for feats in (feats_s, feats_t):
        unit = _unit_rows(at_least_float32(feats.detach()))
        with autocast_disabled(unit):
            distance = 1.0 - unit @ unit.T
        density = torch.exp(-(distance / sigma) ** 2).sum(dim=1)
        threshold = density.sort().values[int(num * quantile)]
        keep &= density > threshold
    return keep.nonzero().flatten()


def generate_prototypes(feats_s: torch.Tensor, feats_t: torch.Tensor, num_prototypes: int = 10,
                        alpha: float = 10.0, sigma: float = 0.1, quantile: float = 0.4
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint regularised matching pursuit for one class on one level.

    Returns the raw rows ``(feats_s[index], feats_t[index], index)``; ``index`` has exactly
    ``num_prototypes`` entries (repeats allowed), or none when N < 2 or no instance is a candidate.
    """
    _check_matrix("generate_prototypes: feats_s", feats_s)
    _check_matrix("generate_prototypes: feats_t", feats_t, rows=feats_s.shape[0])
    if num_prototypes < 1:
        raise ValueError(f"generate_prototypes: num_prototypes must be >= 1, got {num_prototypes}")
    feats_s, feats_t = feats_s.detach(), feats_t.detach()
    candidates = density_candidates(feats_s, feats_t, sigma, quantile)
    if feats_s.shape[0] < 2 or candidates.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=feats_s.device)
        return feats_s[empty], feats_t[empty], empty

    residual_a = _unit_rows(at_least_float32(feats_s)).double()      # (N, C_s)
    residual_b = _unit_rows(at_least_float32(feats_t)).double()      # (N, C_t)
    atoms_a, atoms_b = residual_a[candidates], residual_b[candidates]  # (K, C)
    atom_sq_a = (atoms_a ** 2).sum(dim=1, keepdim=True)                # (K, 1), ~1
    atom_sq_b = (atoms_b ** 2).sum(dim=1, keepdim=True)
    picked = []
    for _ in range(num_prototypes):
        inner_a = atoms_a @ residual_a.T                               # (K, N)
        inner_b = atoms_b @ residual_b.T
        w_a = (alpha * (inner_a + inner_b) + inner_a) / (1 + 2 * alpha)
        w_b = (alpha * (inner_a + inner_b) + inner_b) / (1 + 2 * alpha)
        residual_sq = (residual_a ** 2).sum(dim=1) + (residual_b ** 2).sum(dim=1)   # (N,)
        cost = (w_a ** 2 * atom_sq_a - 2 * w_a * inner_a + w_b ** 2 * atom_sq_b - 2 * w_b * inner_b
                + alpha * (w_a - w_b) ** 2 + residual_sq).sum(dim=1)
        best = int(torch.argmin(cost))
        picked.append(best)
        residual_a = residual_a - w_a[best].unsqueeze(1) * atoms_a[best]
        residual_b = residual_b - w_b[best].unsqueeze(1) * atoms_b[best]
    index = candidates[torch.tensor(picked, device=candidates.device)]
    return feats_s[index], feats_t[index], index


def _instances_of_class(feats_per_class, cls: int, level: int):
    per_level = feats_per_class[cls]
    if per_level is None or len(per_level) == 0:
        return None
    return per_level[level]


def _layout(feats_s_per_class, feats_t_per_class, prev: Prototypes | None) -> tuple[int, int, int]:
    # Levels and channel counts come from any class that has features, else from the previous epoch.
    for per_s, per_t in zip(feats_s_per_class, feats_t_per_class):
        if per_s is not None and len(per_s) > 0:
            if per_t is None or len(per_t) != len(per_s):
                raise ValueError("build_prototypes: student and teacher features must list the same "
                                 "number of levels for every class")
            return len(per_s), per_s[0].shape[1], per_t[0].shape[1]
    if prev is not None:
        return len(prev[0]), prev[0][0].shape[1], prev[1][0].shape[1]
    raise ValueError("build_prototypes: no class has instance features and no previous prototypes "
                     "(prev) were given, so the prototype layout is unknown")


def build_prototypes(feats_s_per_class: Sequence, feats_t_per_class: Sequence, num_prototypes: int = 10,
                     alpha: float = 10.0, prev: Prototypes | None = None, sigma: float = 0.1,
                     quantile: float = 0.4) -> Prototypes:
    """Prototypes of every class on every level, concatenated in class order.

    ``feats_*_per_class[c][l]`` is the (N_c, C) pooled features of class c on level l (None or an empty
    list for a class without instances). A class/level without prototypes reuses its rows of ``prev``
    = ``(protos_s, protos_t, cls_start)`` of the previous epoch when given, else gets none.
    Returns per-level lists ``protos_s`` (P_l, C_s), ``protos_t`` (P_l, C_t), ``cls_start`` (K+1,).
    """
    if len(feats_s_per_class) != len(feats_t_per_class):
        raise ValueError(f"build_prototypes: {len(feats_s_per_class)} student classes but "
                         f"{len(feats_t_per_class)} teacher classes")
    num_classes = len(feats_s_per_class)
    num_levels, channels_s, channels_t = _layout(feats_s_per_class, feats_t_per_class, prev)
    if prev is not None and any(len(cls_start) != num_classes + 1 for cls_start in prev[2]):
        raise ValueError(f"build_prototypes: prev cls_start must have num_classes + 1 = {num_classes + 1} "
                         "entries per level")
    protos_s, protos_t, cls_starts = [], [], []
    for level in range(num_levels):
        rows_s, rows_t, counts = [], [], [0]
        for cls in range(num_classes):
            feats_s = _instances_of_class(feats_s_per_class, cls, level)
            feats_t = _instances_of_class(feats_t_per_class, cls, level)
            if feats_s is None:
                proto_s, proto_t = torch.zeros(0, channels_s), torch.zeros(0, channels_t)
            else:
                proto_s, proto_t, _ = generate_prototypes(feats_s, feats_t, num_prototypes, alpha, sigma,
                                                          quantile)
            if proto_s.shape[0] == 0 and prev is not None:
                start, end = int(prev[2][level][cls]), int(prev[2][level][cls + 1])
                proto_s, proto_t = prev[0][level][start:end], prev[1][level][start:end]
            rows_s.append(proto_s.detach().float().cpu())
            rows_t.append(proto_t.detach().float().cpu())
            counts.append(counts[-1] + proto_s.shape[0])
        protos_s.append(torch.cat(rows_s))
        protos_t.append(torch.cat(rows_t))
        cls_starts.append(torch.tensor(counts, dtype=torch.long))
    return protos_s, protos_t, cls_starts


def crop_means(feat: torch.Tensor, batch_idx: torch.Tensor, left: torch.Tensor, top: torch.Tensor,
               right: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    """Mean of ``feat[batch_idx[n], :, top[n]:bottom[n], left[n]:right[n]]`` for every n, in ONE
    ``roi_align`` call, (N, C) in at least float32. Cell indices are int64, ends exclusive and within the
    map; an empty crop gives zeros.

    Why roi_align computes a plain crop mean: with ``aligned=True`` the value of cell i sits at coordinate i,
    so the box of edges ``(left - 0.5, ..., right - 0.5)`` is exactly the crop; with one output bin and
    ``sampling_ratio=0`` the sampling grid is ceil(crop size / 1) = one sample per cell, placed at the
    cell's own coordinate, where the bilinear weights are 1 and 0. The result is the crop mean up to the
    order of summation (and 0, not NaN, for an empty crop), and the gradient reaches each cell of the crop
    with 1 / area, as the sliced mean's does. All boxes of a level take one kernel and no host read.
    """
    feat = at_least_float32(feat)
    rois = torch.stack([batch_idx.to(feat.dtype), left.to(feat.dtype), top.to(feat.dtype),
                        right.to(feat.dtype), bottom.to(feat.dtype)], dim=1)
    with autocast_disabled(feat):
        pooled = roi_align(feat, rois, output_size=1, spatial_scale=1.0, sampling_ratio=0,
                           aligned=True)
    return pooled.flatten(1)


def pool_instance_features(feats: Sequence[torch.Tensor], boxes: torch.Tensor,
                           image_size: tuple[int, int]) -> list[torch.Tensor]:
    """PGM pooling: per level, scale boxes by (feat / padded image) size, truncate to int and average the
    crop ``y1..y2, x1..x2`` (inclusive). ``feats``: L maps (1, C, H_l, W_l); returns L tensors (n, C).
    All boxes of a level are pooled at once (:func:`crop_means`)."""
    _check_boxes("pool_instance_features: boxes", boxes)
    pad_h, pad_w = image_size
    pooled = []
    for level, feat in enumerate(feats):
        if feat.dim() != 4 or feat.shape[0] != 1:
            raise ValueError(f"pool_instance_features: level {level} must be a (1, C, H, W) map, got "
                             f"{tuple(feat.shape)}")
        height, width = feat.shape[-2:]
        # float32 scaling then truncation, as the reference does on its float32 boxes
        ratio = torch.tensor([width / pad_w, height / pad_h] * 2, dtype=torch.float32, device=boxes.device)
        corners = (boxes.detach().float() * ratio).long().to(feat.device)
        left, top = corners[:, 0], corners[:, 1]
        right, bottom = (corners[:, 2] + 1).clamp(max=width), (corners[:, 3] + 1).clamp(max=height)
        pooled.append(crop_means(feat, torch.zeros_like(left), left, top, right, bottom).to(feat.dtype))
    return pooled


# -------------------------------------------------------------------------- RDM: robust distillation
def pool_box_features(feat: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor,
                      stride: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``feat[b, :, int(|y1|/s):int(|y2|/s)+1, int(|x1|/s):int(|x2|/s)+1]`` per box, (N, C).

    The crop start is clamped into the map so that the crop is never empty; gradients reach ``feat``.
    All boxes are pooled in one kernel on ``feat``'s device (:func:`crop_means`), with no host read.
    ``keep`` (bool (N,)): rows not kept are zeros and cost nothing (their crop is made empty), so that
    boxes can be pooled level by level without indexing out a data-dependent subset.
    """
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4:
        raise ValueError(f"pool_box_features: feat must be (B, C, H, W), got "
                         f"{tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__}")
    _check_boxes("pool_box_features: boxes", boxes)
    if batch_idx.shape != (boxes.shape[0],):
        raise ValueError(f"pool_box_features: batch_idx must be ({boxes.shape[0]},), got {tuple(batch_idx.shape)}")
    if keep is not None and keep.shape != (boxes.shape[0],):
        raise ValueError(f"pool_box_features: keep must be ({boxes.shape[0]},), got {tuple(keep.shape)}")
    height, width = feat.shape[-2:]
    # float32 division before truncation, as the reference computes cell indices
    cells = (boxes.detach().abs().float() / stride).long().to(feat.device)
    left, top = cells[:, 0].clamp(max=width - 1), cells[:, 1].clamp(max=height - 1)
    right, bottom = (cells[:, 2] + 1).clamp(max=width), (cells[:, 3] + 1).clamp(max=height)
    if keep is not None:
        right = torch.where(keep.to(feat.device), right, left)
    return crop_means(feat, batch_idx.to(feat.device), left, top, right, bottom).to(feat.dtype)


def map_boxes_to_levels(boxes: torch.Tensor, num_levels: int, finest_scale: float = 56.0) -> torch.Tensor:
    """``clamp(floor(log2(sqrt((x2-x1+1)(y2-y1+1)) / finest_scale + 1e-6)), 0, L-1)`` (int64)."""
    _check_boxes("map_boxes_to_levels: boxes", boxes)
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


def prototype_similarity(x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Global-knowledge representation: cosine of each row of ``x`` to each prototype, (N, P)."""
    _check_matrix("prototype_similarity: x", x)
    _check_matrix("prototype_similarity: protos", protos, cols=x.shape[1])
    x = at_least_float32(x)
    with autocast_disabled(x):
        return _unit_rows(x) @ _unit_rows(protos.to(device=x.device, dtype=x.dtype)).T


def robust_weights(pooled_s: torch.Tensor, pooled_t: torch.Tensor, labels: torch.Tensor,
                   protos_s: torch.Tensor, protos_t: torch.Tensor, cls_start: torch.Tensor) -> torch.Tensor:
    """``w_n = 1 - |max cos(f_s,n, Pi_c,s) - max cos(f_t,n, Pi_c,t)|`` over the prototypes of class
    ``labels[n]``; 1 for a class without prototypes. Detached, (N,)."""
    _check_matrix("robust_weights: pooled_s", pooled_s)
    _check_matrix("robust_weights: pooled_t", pooled_t, rows=pooled_s.shape[0])
    _check_matrix("robust_weights: protos_s", protos_s, cols=pooled_s.shape[1])
    _check_matrix("robust_weights: protos_t", protos_t, rows=protos_s.shape[0], cols=pooled_t.shape[1])
    _check_cls_start("robust_weights: cls_start", cls_start, protos_s.shape[0])
    if labels.shape != (pooled_s.shape[0],):
        raise ValueError(f"robust_weights: labels must be ({pooled_s.shape[0]},), got {tuple(labels.shape)}")
    num_classes = cls_start.numel() - 1
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"robust_weights: labels must lie in [0, {num_classes}) (cls_start has "
                         f"{num_classes + 1} offsets), got {labels.unique().tolist()}")
    return _robust_weights(pooled_s, pooled_t, labels, protos_s, protos_t, cls_start)


def _robust_weights(pooled_s, pooled_t, labels, protos_s, protos_t, cls_start) -> torch.Tensor:
    # robust_weights without its checks, which read the labels and offsets on the host: the distiller calls
    # this every step with prototypes checked by set_prototypes and the detector's own class labels
    with torch.no_grad():
        sim_s = prototype_similarity(pooled_s.detach(), protos_s)
        sim_t = prototype_similarity(pooled_t.detach(), protos_t)
        if protos_s.shape[0] == 0:
            return sim_s.new_ones(sim_s.shape[0])
        cls_start = cls_start.to(sim_s.device)
        labels = labels.to(sim_s.device)
        column = torch.arange(protos_s.shape[0], device=sim_s.device)
        own_class = (column >= cls_start[labels].unsqueeze(1)) & (column < cls_start[labels + 1].unsqueeze(1))
        has_prototypes = own_class.any(dim=1)
        # rows without prototypes of their class reduce over -inf only; where() replaces them by 1
        best_s = sim_s.masked_fill(~own_class, float("-inf")).amax(dim=1)
        best_t = sim_t.masked_fill(~own_class, float("-inf")).amax(dim=1)
        return torch.where(has_prototypes, 1.0 - (best_s - best_t).abs(), torch.ones_like(best_s))


def global_alignment_loss(pooled_s: torch.Tensor, pooled_t: torch.Tensor, protos_s: torch.Tensor,
                          protos_t: torch.Tensor, weights: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``smooth_l1(w * cos(f_s, Pi_s), w * cos(f_t, Pi_t))``, mean over N * P; 0 if N or P is 0."""
    _check_matrix("global_alignment_loss: pooled_s", pooled_s)
    _check_matrix("global_alignment_loss: pooled_t", pooled_t, rows=pooled_s.shape[0])
    _check_matrix("global_alignment_loss: protos_t", protos_t)
    _check_matrix("global_alignment_loss: protos_s", protos_s, rows=protos_t.shape[0])
    if weights.shape != (pooled_s.shape[0],):
        raise ValueError(f"global_alignment_loss: weights must be ({pooled_s.shape[0]},), got "
                         f"{tuple(weights.shape)}")
    if pooled_s.shape[0] == 0 or protos_s.shape[0] == 0:
        return at_least_float32(pooled_s).new_zeros(())
    row_weight = at_least_float32(weights.detach()).unsqueeze(1)
    rep_s = row_weight * prototype_similarity(pooled_s, protos_s)
    rep_t = row_weight * prototype_similarity(pooled_t.detach(), protos_t)
    return F.smooth_l1_loss(rep_s, rep_t, beta=beta, reduction="mean")


def instance_masks(boxes: torch.Tensor, weights: torch.Tensor | None, batch_idx: torch.Tensor, num_images: int,
                   size: tuple[int, int], stride: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Foreground masks (B, H, W) float32 of the boxes of each image on a map of stride ``stride``, built on
    the boxes' device without reading any box on the host.

    Per image, in box order: cells ``[int(y1/s):int(y2/s), int(x1/s):int(x2/s)]`` (clipped to the map) get
    the box's weight, later boxes overwriting earlier ones; a box thinner than a cell marks its single cell
    with the max of the current value and its weight. Without weights every marked cell is 1. Boxes with
    ``keep`` False (bool (N,)) are left out. Sequential rule, evaluated at once: a cell holds the weight of
    the last box filling it (0 if none), raised to the largest weight of the thin boxes on it that come after
    that box (earlier ones were overwritten).
    """
    _check_boxes("instance_masks: boxes", boxes)
    count = boxes.shape[0]
    if weights is not None and weights.shape != (count,):
        raise ValueError(f"instance_masks: weights must be ({count},), got {tuple(weights.shape)}")
    if batch_idx.shape != (count,) or (keep is not None and keep.shape != (count,)):
        raise ValueError(f"instance_masks: batch_idx and keep must be ({count},), got {tuple(batch_idx.shape)} "
                         f"and {None if keep is None else tuple(keep.shape)}")
    height, width = size
    device = boxes.device
    if count == 0:
        return torch.zeros(num_images, height, width, device=device)
    keep = torch.ones(count, dtype=torch.bool, device=device) if keep is None else keep.to(device)
    # float32 division then truncation toward zero, as int() of the reference's float32 cells
    cells = (boxes.detach().float() / stride).long()
    left, right = cells[:, 0].clamp(min=0), cells[:, 2].clamp(max=width)
    top, bottom = cells[:, 1].clamp(min=0), cells[:, 3].clamp(max=height)
    thin = (left == right) | (top == bottom)
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    in_rows = (rows >= top[:, None]) & (rows < bottom[:, None])                        # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < right[:, None])                        # (N, W)
    thin_cell = top.clamp(max=height - 1) * width + left.clamp(max=width - 1)          # (N,) flat index
    order = torch.arange(count, device=device)
    box_weights = None if weights is None else weights.detach().to(device=device, dtype=torch.float32)
    masks = []
    for image in range(num_images):
        on_image = keep & (batch_idx.to(device) == image)
        fills = (on_image & ~thin)[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]   # (N, H, W)
        filled = fills.any(dim=0).flatten()
        thin_here = on_image & thin
        if box_weights is None:
            mask = filled.float().index_put((thin_cell,), thin_here.float(), accumulate=True).clamp(max=1.0)
        else:
            # argmax returns the first maximum: over the reversed boxes, the last box filling each cell
            last = (count - 1 - fills.flip(0).to(torch.uint8).argmax(dim=0)).flatten()
            mask = torch.where(filled, box_weights[last], 0.0)
            after_last = ~filled[thin_cell] | (order > last[thin_cell])
            raise_to = torch.where(thin_here & after_last, box_weights, float("-inf"))
            mask = mask.scatter_reduce(0, thin_cell, raise_to, "amax", include_self=True)
        masks.append(mask.view(height, width))
    return torch.stack(masks)


def instance_mask(boxes: torch.Tensor, weights: torch.Tensor | None, size: tuple[int, int],
                  stride: float) -> torch.Tensor:
    """Foreground mask (H, W) float32 of the boxes of one image: :func:`instance_masks` of one image."""
    _check_boxes("instance_mask: boxes", boxes)
    image_of_box = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    return instance_masks(boxes, weights, image_of_box, 1, size, stride)[0]


def local_feature_loss(feat_s_adapt: torch.Tensor, feat_t: torch.Tensor, mask: torch.Tensor,
                       fg_weight: float = 1.0, bg_weight: float = 4.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled imitation: ``(sum D M / max(1, 2 sum M) * fg_weight, sum D (1-B) / max(1, 2 sum (1-B))
    * bg_weight)`` with D = (S - T)^2, B = 1[M > 0]; mask sums run over channels too."""
    if feat_s_adapt.dim() != 4 or feat_s_adapt.shape != feat_t.shape:
        raise ValueError(f"local_feature_loss: feat_s_adapt {tuple(feat_s_adapt.shape)} and feat_t "
                         f"{tuple(feat_t.shape)} must be equal (B, C, H, W) shapes")
    batch, channels, height, width = feat_s_adapt.shape
    if mask.shape != (batch, height, width):
        raise ValueError(f"local_feature_loss: mask must be {(batch, height, width)}, got {tuple(mask.shape)}")
    feat_s_adapt = at_least_float32(feat_s_adapt)
    squared_error = (feat_s_adapt - feat_t.detach().to(feat_s_adapt.dtype)).pow(2).sum(dim=1, dtype=torch.float64)
    mask = mask.detach().to(device=squared_error.device, dtype=torch.float64)
    background = 1.0 - (mask > 0).double()
    # normalisers clamped on the device: max(1, .) of a host float would read the mask every level and step
    fg = (squared_error * mask).sum() / (2.0 * channels * mask.sum()).clamp(min=1.0) * fg_weight
    bg = (squared_error * background).sum() / (2.0 * channels * background.sum()).clamp(min=1.0) * bg_weight
    return fg.to(feat_s_adapt.dtype), bg.to(feat_s_adapt.dtype)


def soft_label_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 2.0,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_n w_n * T^2 * mean_k p_t (log p_t - log p_s)``, p = softmax(logits / T); 0 if N = 0."""
    _check_matrix("soft_label_loss: logits_s", logits_s)
    _check_matrix("soft_label_loss: logits_t", logits_t, rows=logits_s.shape[0], cols=logits_s.shape[1])
    if weights is not None and weights.shape != (logits_s.shape[0],):
        raise ValueError(f"soft_label_loss: weights must be ({logits_s.shape[0]},), got {tuple(weights.shape)}")
    logits_s = at_least_float32(logits_s)
    if logits_s.shape[0] == 0:
        return logits_s.new_zeros(())
    log_p_s = F.log_softmax(logits_s / temperature, dim=1)
    p_t = F.softmax(logits_t.detach().to(logits_s.dtype) / temperature, dim=1)
    per_row = F.kl_div(log_p_s, p_t, reduction="none").mean(dim=1) * temperature ** 2
    if weights is not None:
        per_row = per_row * weights.detach().to(per_row.dtype)
    return per_row.mean()


# ---------------------------------------------------------------------------------------- distiller
class GKDDistiller(Distiller):
    """GKD on FPN maps, positive-sample instances and RoI (or positive-anchor) logits.

    ``forward(feats_s, feats_t, inst_boxes, inst_labels, roi_logits_s=None, roi_logits_t=None,
    roi_feats_s=None, roi_feats_t=None, roi_levels=None, roi_labels=None, epoch=0, max_epochs=1)``
    returns ``loss_gkd_fg``, ``loss_gkd_bg``, ``loss_gkd_soft`` and ``loss_gkd_global``, all weighted.
    Prototypes come from :meth:`set_prototypes` (the PGM pass before each epoch); until then masks are
    binary, the soft-label KD is unweighted and there is no global term.
    """

    def __init__(self, channels_s: int = 256, channels_t: int = 256, num_levels: int = 5,
                 strides: Sequence[float] = (4, 8, 16, 32, 64), fg_weight: float = 1.0, bg_weight: float = 4.0,
                 soft_weight: float = 1.0, temperature: float = 2.0, global_weight: float = 0.0,
                 level_reduction: str = "mean", attenuation: bool = True, finest_scale: float = 56.0):
        super().__init__()
        if len(strides) != num_levels:
            raise ValueError(f"GKDDistiller: strides must give one stride per level ({num_levels}), got {strides}")
        if level_reduction not in ("mean", "sum"):
            raise ValueError(f"GKDDistiller: level_reduction must be 'mean' or 'sum', got {level_reduction!r}")
        if temperature <= 0:
            raise ValueError(f"GKDDistiller: temperature must be positive, got {temperature}")
        self.channels_s, self.channels_t, self.num_levels = channels_s, channels_t, num_levels
        self.strides = tuple(strides)
        self.fg_weight, self.bg_weight = fg_weight, bg_weight
        self.soft_weight, self.temperature, self.global_weight = soft_weight, temperature, global_weight
        self.level_reduction, self.attenuation, self.finest_scale = level_reduction, attenuation, finest_scale
        self.adapters = nn.ModuleList([nn.Conv2d(channels_s, channels_t, 3, padding=1, bias=True)
                                       for _ in range(num_levels)])
        self._prototypes: Prototypes | None = None

    def extra_repr(self) -> str:
        return (f"strides={self.strides}, fg_weight={self.fg_weight}, bg_weight={self.bg_weight}, "
                f"soft_weight={self.soft_weight}, temperature={self.temperature}, "
                f"global_weight={self.global_weight}, level_reduction={self.level_reduction!r}, "
                f"attenuation={self.attenuation}, finest_scale={self.finest_scale}")

    # ---------------------------------------------------------------------------- prototypes
    @property
    def prototypes(self) -> Prototypes | None:
        """``(protos_s, protos_t, cls_start)`` per level, or None before the first PGM pass."""
        return self._prototypes

    def set_prototypes(self, protos_s: Sequence[torch.Tensor], protos_t: Sequence[torch.Tensor],
                       cls_start: Sequence[torch.Tensor]) -> None:
        if not len(protos_s) == len(protos_t) == len(cls_start) == self.num_levels:
            raise ValueError(f"set_prototypes: protos_s, protos_t and cls_start must each list "
                             f"{self.num_levels} levels, got {len(protos_s)}, {len(protos_t)}, {len(cls_start)}")
        for level, (proto_s, proto_t, start) in enumerate(zip(protos_s, protos_t, cls_start)):
            _check_matrix(f"set_prototypes: protos_s[{level}]", proto_s, cols=self.channels_s)
            _check_matrix(f"set_prototypes: protos_t[{level}]", proto_t, rows=proto_s.shape[0], cols=self.channels_t)
            _check_cls_start(f"set_prototypes: cls_start[{level}]", start, proto_s.shape[0])
        if len({start.numel() for start in cls_start}) != 1:
            raise ValueError("set_prototypes: cls_start must cover the same classes on every level")
        self._prototypes = ([p.detach().float().clone() for p in protos_s],
                            [p.detach().float().clone() for p in protos_t],
                            [s.detach().long().clone() for s in cls_start])

    def _prototypes_on(self, device: torch.device) -> Prototypes | None:
        # Moved once and kept there: the prototypes change only between epochs.
        if self._prototypes is not None and self._prototypes[0][0].device != device:
            self._prototypes = tuple([t.to(device) for t in part] for part in self._prototypes)
        return self._prototypes

    _PROTOTYPE_KEYS = ("protos_s", "protos_t", "cls_start")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._prototypes is not None:
            for key, part in zip(self._PROTOTYPE_KEYS, self._prototypes):
                for level, tensor in enumerate(part):
                    destination[f"{prefix}{key}.{level}"] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        names = [f"{prefix}{key}.{level}" for key in self._PROTOTYPE_KEYS for level in range(self.num_levels)]
        present = [name for name in names if name in state_dict]
        unexpected_keys[:] = [k for k in unexpected_keys if k not in names]
        if not present:
            return
        if len(present) != len(names):
            error_msgs.append(f"GKDDistiller: incomplete prototype state, missing "
                              f"{sorted(set(names) - set(present))}")
            return
        parts = [[state_dict[f"{prefix}{key}.{level}"] for level in range(self.num_levels)]
                 for key in self._PROTOTYPE_KEYS]
        try:
            self.set_prototypes(*parts)
        except ValueError as err:
            error_msgs.append(str(err))

    # ------------------------------------------------------------------------------- forward
    def _check_inputs(self, feats_s, feats_t, inst_boxes, inst_labels) -> None:
        if len(feats_s) != self.num_levels or len(feats_t) != self.num_levels:
            raise ValueError(f"GKDDistiller: feats_s and feats_t must list {self.num_levels} FPN levels, got "
                             f"{len(feats_s)} and {len(feats_t)}")
        for level, (feat_s, feat_t) in enumerate(zip(feats_s, feats_t)):
            if feat_s.dim() != 4 or feat_s.shape[1] != self.channels_s:
                raise ValueError(f"GKDDistiller: feats_s[{level}] must be (B, {self.channels_s}, H, W), got "
                                 f"{tuple(feat_s.shape)}")
            expected = (feat_s.shape[0], self.channels_t, *feat_s.shape[2:])
            if tuple(feat_t.shape) != expected:
                raise ValueError(f"GKDDistiller: feats_t[{level}] must be {expected}, got {tuple(feat_t.shape)}")
        batch = feats_s[0].shape[0]
        if len(inst_boxes) != batch or len(inst_labels) != batch:
            raise ValueError(f"GKDDistiller: inst_boxes and inst_labels must have one entry per image ({batch}), "
                             f"got {len(inst_boxes)} and {len(inst_labels)}")
        for image, (boxes, labels) in enumerate(zip(inst_boxes, inst_labels)):
            _check_boxes(f"GKDDistiller: inst_boxes[{image}]", boxes)
            if labels.shape != (boxes.shape[0],):
                raise ValueError(f"GKDDistiller: inst_labels[{image}] must be ({boxes.shape[0]},), got "
                                 f"{tuple(labels.shape)}")

    def _local_and_global(self, feats_s, feats_t, boxes, labels, batch_idx, prototypes):
        fg_levels, bg_levels, global_levels = [], [], []
        levels_of_boxes = map_boxes_to_levels(boxes, self.num_levels, self.finest_scale)
        for level, (feat_s, feat_t, stride) in enumerate(zip(feats_s, feats_t, self.strides)):
            feat_t = feat_t.detach()
            weights = None
            if prototypes is not None:
                pooled_s = pool_box_features(feat_s, boxes, batch_idx, stride)
                pooled_t = pool_box_features(feat_t, boxes, batch_idx, stride)
                protos_s, protos_t, cls_start = (part[level] for part in prototypes)
                weights = _robust_weights(pooled_s, pooled_t, labels, protos_s, protos_t, cls_start)
                if self.global_weight > 0:
                    global_levels.append(global_alignment_loss(pooled_s, pooled_t, protos_s, protos_t, weights))
            mask = instance_masks(boxes, weights, batch_idx, feat_s.shape[0], tuple(feat_s.shape[-2:]), stride,
                                  keep=levels_of_boxes == level)
            fg, bg = local_feature_loss(self.adapters[level](feat_s), feat_t, mask, self.fg_weight, self.bg_weight)
            fg_levels.append(fg)
            bg_levels.append(bg)
        return fg_levels, bg_levels, global_levels

    def _roi_weights(self, roi_feats_s, roi_feats_t, roi_levels, roi_labels, prototypes):
        count = roi_feats_s.shape[0]
        if roi_feats_s.dim() != 4 or roi_feats_t.dim() != 4 or roi_feats_t.shape[0] != count:
            raise ValueError(f"GKDDistiller: roi_feats_s/roi_feats_t must be (M, C, h, w) with the same M, got "
                             f"{tuple(roi_feats_s.shape)} and {tuple(roi_feats_t.shape)}")
        if roi_levels.shape != (count,) or roi_labels.shape != (count,):
            raise ValueError(f"GKDDistiller: roi_levels and roi_labels must be ({count},), got "
                             f"{tuple(roi_levels.shape)} and {tuple(roi_labels.shape)}")
        # roi_levels are not range-checked: that would read them on the host every step; they come from
        # map_boxes_to_levels, clamped to the levels, and a level outside them would only keep weight 1
        pooled_s = roi_feats_s.detach().mean(dim=(2, 3))
        pooled_t = roi_feats_t.detach().mean(dim=(2, 3))
        weights = torch.ones(count, device=roi_feats_s.device)
        # every level's weights for all rows, each row keeping its own level's: no data-dependent row subset
        for level in range(self.num_levels):
            protos_s, protos_t, cls_start = (part[level] for part in prototypes)
            level_weights = _robust_weights(pooled_s, pooled_t, roi_labels, protos_s, protos_t, cls_start)
            weights = torch.where(roi_levels == level, level_weights.to(weights.dtype), weights)
        return weights

    def forward(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor],
                inst_boxes: Sequence[torch.Tensor], inst_labels: Sequence[torch.Tensor],
                roi_logits_s: torch.Tensor | None = None, roi_logits_t: torch.Tensor | None = None,
                roi_feats_s: torch.Tensor | None = None, roi_feats_t: torch.Tensor | None = None,
                roi_levels: torch.Tensor | None = None, roi_labels: torch.Tensor | None = None,
                epoch: int = 0, max_epochs: int = 1) -> dict[str, torch.Tensor]:
        self._check_inputs(feats_s, feats_t, inst_boxes, inst_labels)
        if max_epochs <= 0:
            raise ValueError(f"GKDDistiller: max_epochs must be positive, got {max_epochs}")
        device = feats_s[0].device
        prototypes = self._prototypes_on(device)
        attenuation = 1.0 - epoch / max_epochs if self.attenuation else 1.0
        boxes = torch.cat([b.to(device=device, dtype=torch.float32) for b in inst_boxes])
        labels = torch.cat([lab.to(device=device, dtype=torch.long) for lab in inst_labels])
        batch_idx = torch.cat([torch.full((len(b),), i, dtype=torch.long, device=device)
                               for i, b in enumerate(inst_boxes)])

        fg_levels, bg_levels, global_levels = self._local_and_global(feats_s, feats_t, boxes, labels, batch_idx,
                                                                     prototypes)
        reduce = torch.mean if self.level_reduction == "mean" else torch.sum
        fg, bg = reduce(torch.stack(fg_levels)), reduce(torch.stack(bg_levels))
        losses = {"loss_gkd_fg": attenuation * fg, "loss_gkd_bg": attenuation * bg}

        if roi_logits_s is not None:
            if roi_logits_t is None:
                raise ValueError("GKDDistiller: roi_logits_t is required with roi_logits_s")
            weights = None
            if prototypes is not None:
                if any(x is None for x in (roi_feats_s, roi_feats_t, roi_levels, roi_labels)):
                    raise ValueError("GKDDistiller: with prototypes set, roi_feats_s, roi_feats_t, roi_levels and "
                                     "roi_labels are needed to weight the soft-label loss")
                if roi_feats_s.shape[0] != roi_logits_s.shape[0]:
                    raise ValueError(f"GKDDistiller: {roi_feats_s.shape[0]} roi_feats_s rows but "
                                     f"{roi_logits_s.shape[0]} roi_logits_s rows")
                weights = self._roi_weights(roi_feats_s, roi_feats_t, roi_levels.to(device),
                                            roi_labels.to(device), prototypes)
            soft = soft_label_loss(roi_logits_s, roi_logits_t, self.temperature, weights)
        else:
            soft = fg.new_zeros(())
        losses["loss_gkd_soft"] = self.soft_weight * soft
        global_term = torch.stack(global_levels).sum() if global_levels else fg.new_zeros(())
        losses["loss_gkd_global"] = self.global_weight * attenuation * global_term
        return losses


# -------------------------------------------------------------------------------- GKD: PGM instances
def select_pgm_instances(annotations: Iterable[Mapping], num_classes: int, min_size: float = 30,
                         max_images: int = 800, seed: int = 1) -> dict[int, list[tuple[int, int]]]:
    """PGM instances per class: ``{c: [(image_id, box_idx), ...]}``, computed once, reused every epoch.

    ``annotations``: one mapping per training image with ``image_id``, ``boxes`` (K, 4) xyxy in
    original-image pixels and 0-based ``labels`` (K,). A box qualifies if its width and height exceed
    ``min_size``. Classes are visited in order with one ``numpy.random.RandomState(seed)``; a class with
    more than ``max_images`` qualifying images shuffles their annotation order and keeps the first
    ``max_images`` (the reference seeds numpy once and only shuffles in that case).
    """
    if num_classes < 1 or max_images < 1:
        raise ValueError(f"select_pgm_instances: num_classes and max_images must be >= 1, got "
                         f"{num_classes} and {max_images}")
    boxes_by_class_and_image: list[dict[int, list[int]]] = [{} for _ in range(num_classes)]
    for ann in annotations:
        if not isinstance(ann, Mapping) or not {"image_id", "boxes", "labels"} <= set(ann):
            raise ValueError("select_pgm_instances: every annotation must be a mapping with keys "
                             "'image_id', 'boxes' and 'labels'")
        boxes = np.asarray(ann["boxes"], dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(ann["labels"], dtype=np.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise ValueError(f"select_pgm_instances: image {ann['image_id']} has {len(boxes)} boxes but "
                             f"{len(labels)} labels")
        wide = np.abs(boxes[:, 2] - boxes[:, 0]) > min_size
        tall = np.abs(boxes[:, 3] - boxes[:, 1]) > min_size
        for box_idx in np.flatnonzero(wide & tall):
            cls = int(labels[box_idx])
            if not 0 <= cls < num_classes:
                raise ValueError(f"select_pgm_instances: label {cls} of image {ann['image_id']} is "
                                 f"outside [0, {num_classes})")
            boxes_by_class_and_image[cls].setdefault(int(ann["image_id"]), []).append(int(box_idx))
    rng = np.random.RandomState(seed)
    selection = {}
    for cls, per_image in enumerate(boxes_by_class_and_image):
        image_ids = list(per_image)
        if len(image_ids) > max_images:
            order = np.arange(len(image_ids))
            rng.shuffle(order)
            image_ids = [image_ids[i] for i in order[:max_images]]
        selection[cls] = [(image_id, box_idx) for image_id in image_ids for box_idx in per_image[image_id]]
    return selection


def group_by_image(selection: Mapping[int, Sequence[tuple[int, int]]]) -> dict[int, list[int]]:
    """``{image_id: [box_idx, ...]}`` of a :func:`select_pgm_instances` result, so each image is run once."""
    per_image: dict[int, list[int]] = {}
    for pairs in selection.values():
        for image_id, box_idx in pairs:
            if box_idx not in per_image.setdefault(image_id, []):
                per_image[image_id].append(box_idx)
    return {image_id: sorted(boxes) for image_id, boxes in per_image.items()}


@torch.no_grad()
def extract_instance_features(fpn_fn: Callable[[torch.Tensor], Sequence[torch.Tensor]], image: torch.Tensor,
                              boxes: torch.Tensor) -> list[torch.Tensor]:
    """Pooled PGM features (L tensors (n, C)) of ``boxes`` (padded-image pixels) on ``fpn_fn(image)``."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"extract_instance_features: image must be (1, 3, H, W), got {tuple(image.shape)}")
    return pool_instance_features(list(fpn_fn(image)), boxes, tuple(image.shape[-2:]))


def generate_epoch_prototypes(samples: Iterable, num_classes: int, num_prototypes: int = 10,
                              alpha: float = 10.0, sigma: float = 0.1, quantile: float = 0.4,
                              prev: Prototypes | None = None, finest_stride: int = 4,
                              progress: Callable[[int], object] | None = None) -> Prototypes:
    """The PGM pass of one epoch from per-image features already computed by the caller.

    ``samples`` yields ``(student_feats, teacher_feats, boxes, labels)`` per PGM image: boxes (n, 4) in
    padded test-transform pixels and 0-based labels (n,) of that image's selected instances; each
    ``*_feats`` is a list of L entries, either the FPN map (1, C, H_l, W_l) -- pooled here with the PGM
    crop, the padded image size being ``finest map size * finest_stride`` (exact: images are padded to
    a multiple of 32) -- or the already pooled (n, C) vectors (e.g. teacher features cached after the
    first epoch). ``progress(1)`` is called after each image (``tqdm.update`` fits). Instances keep
    the order of ``samples``; returns ``build_prototypes(...)``.
    """
    feats_s_per_class: list[list[list[torch.Tensor]] | None] = [None] * num_classes
    feats_t_per_class: list[list[list[torch.Tensor]] | None] = [None] * num_classes

    def pooled(feats, boxes, role):
        if all(f.dim() == 2 for f in feats):
            return [f.detach() for f in feats]
        finest = feats[0]
        if finest.dim() != 4:
            raise ValueError(f"generate_epoch_prototypes: {role} features must be all (1, C, H, W) maps "
                             f"or all (n, C) pooled vectors")
        size = (finest.shape[2] * finest_stride, finest.shape[3] * finest_stride)
        return pool_instance_features(feats, boxes, size)

    for student_feats, teacher_feats, boxes, labels in samples:
        if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"generate_epoch_prototypes: labels must be ({boxes.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        if len(student_feats) != len(teacher_feats):
            raise ValueError("generate_epoch_prototypes: student and teacher give different level counts")
        with torch.no_grad():
            per_level_s = pooled(student_feats, boxes, "student")
            per_level_t = pooled(teacher_feats, boxes, "teacher")
        for level, (level_s, level_t) in enumerate(zip(per_level_s, per_level_t)):
            if level_s.shape[0] != boxes.shape[0] or level_t.shape[0] != boxes.shape[0]:
                raise ValueError(f"generate_epoch_prototypes: level {level} pooled features must have one "
                                 f"row per box ({boxes.shape[0]})")
        for cls in labels.unique().tolist():
            if not 0 <= cls < num_classes:
                raise ValueError(f"generate_epoch_prototypes: label {cls} outside [0, {num_classes})")
            rows = (labels == cls).nonzero().flatten()
            for per_class, per_level in ((feats_s_per_class, per_level_s), (feats_t_per_class, per_level_t)):
                if per_class[cls] is None:
                    per_class[cls] = [[] for _ in per_level]
                for level, level_feats in enumerate(per_level):
                    per_class[cls][level].append(level_feats.float().cpu()[rows.cpu()])
        if progress is not None:
            progress(1)

    def stacked(per_class):
        return [None if levels is None else [torch.cat(chunks) for chunks in levels] for levels in per_class]

    return build_prototypes(stacked(feats_s_per_class), stacked(feats_t_per_class), num_prototypes, alpha,
                            prev, sigma, quantile)


# ----------------------------------------------------------------- GKD: one-stage soft-label inputs
def anchor_level_features(feats: Sequence[torch.Tensor], boxes: torch.Tensor, batch_idx: torch.Tensor,
                          strides: Sequence[float], finest_scale: float = 56.0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """RetinaNet's per-anchor inputs of the soft-label robust weights (docs/specs/gkd.md §4): every box pooled
    (:func:`pool_box_features`) on its :func:`map_boxes_to_levels` level of ``feats`` (L maps of strides
    ``strides``). Returns ``(pooled (M, C, 1, 1), levels (M,))`` in the order of ``boxes``, detached."""
    if len(feats) != len(strides):
        raise ValueError(f"anchor_level_features: {len(feats)} feature maps but {len(strides)} strides")
    levels = map_boxes_to_levels(boxes, len(feats), finest_scale)
    pooled = feats[0].new_zeros(boxes.shape[0], feats[0].shape[1])
    with torch.no_grad():
        # each level pools only its own boxes (the others are zero rows at no cost): no host read of levels
        for level, (feat, stride) in enumerate(zip(feats, strides)):
            pooled += pool_box_features(feat, boxes, batch_idx, stride, keep=levels == level).to(pooled.dtype)
    return pooled[:, :, None, None], levels


# ------------------------------------------------------------------------- GKD: the epoch pass
def pgm_annotations(base) -> list[dict]:
    """``{"image_id": index, "boxes", "labels"}`` (original pixels) of every image of a detection base data
    set, without difficult / crowd boxes (training ignores them, so they are no GT instances). The base's
    ``box_targets(index)`` reads them without decoding the image (COCO and VOC keep them in memory: decoding
    all of train2017 only to read its boxes would take longer than a PGM pass)."""
    annotations = []
    for index in range(len(base)):
        record = base.box_targets(index)
        keep = ~np.asarray(record["difficult"], dtype=bool)
        annotations.append({"image_id": index, "boxes": np.asarray(record["boxes"], np.float32).reshape(-1, 4)[keep],
                            "labels": np.asarray(record["labels"], np.int64)[keep]})
    return annotations


def _evaluation_transform(transform):
    # The training transform without its random flip is the test pipeline of docs/specs/gkd.md §1 (same keep-ratio
    # resize and normalisation).
    if not hasattr(transform, "flip_prob"):
        raise ValueError(f"GKD prototypes: the training set's transform {type(transform).__name__} has no "
                         "flip_prob; expected a detection transform (kd_ref.transforms.DetTransform)")
    evaluation = copy.copy(transform)
    evaluation.flip_prob = 0.0
    return evaluation


class ScheduledGKDDistiller(GKDDistiller):
    """:class:`GKDDistiller` as the training engine drives it (docs/specs/gkd.md §5, §6).

    ``before_epoch(context)``, called by the engine before every epoch:

    * sets the schedule position for the attenuation ``1 - epoch / max_epochs`` (the registry's bind sees
      model outputs only) from the engine's epoch counter: ``context.epoch`` of ``context.epochs``, the
      recipe's epochs (an epoch-based recipe's own count, e.g. COCO 2x: 24), not a count of our own;
    * regenerates the prototypes: PGM instances are selected once (:func:`select_pgm_instances`, fixed
      seed) from the training set's GT boxes; each selected image goes alone through the evaluation
      transform, the collate and the data set's device step (resize, normalise, pad to 32); the teacher's
      pooled features are computed once and cached, the current student's every epoch (eval mode, no
      grad); :func:`generate_epoch_prototypes` then :meth:`set_prototypes`.

    ``level_names`` are the FPN outputs (keys of a detector's ``feats``) the distiller works on. Under DDP
    every rank pools the features of every ``world_size``-th selected image; the pooled vectors are
    all-gathered in selection order and every rank builds the same prototypes on the CPU, so no rank idles
    through a whole pass of another. The schedule position is extra state in ``state_dict``, so a run
    resumed mid-epoch attenuates like an uninterrupted one (the prototypes travel in the parent's keys).
    """

    def __init__(self, level_names: Sequence[str], num_classes: int, pgm_max_images: int = 800, pgm_min_size: float = 30.0, pgm_seed: int = 1,
                 num_prototypes: int = 10, pgm_alpha: float = 10.0, **distiller_options):
        super().__init__(num_levels=len(level_names), **distiller_options)
        self.level_names, self.num_classes = list(level_names), num_classes
        self.pgm_max_images, self.pgm_min_size, self.pgm_seed = pgm_max_images, pgm_min_size, pgm_seed
        self.num_prototypes, self.pgm_alpha = num_prototypes, pgm_alpha
        self.epoch, self.max_epochs = 0, 1
        self._pgm_images: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None
        self._teacher_cache: dict[int, list[torch.Tensor]] = {}

    def get_extra_state(self) -> dict:
        return {"epoch": self.epoch, "max_epochs": self.max_epochs}

    def set_extra_state(self, state: dict) -> None:
        self.epoch, self.max_epochs = int(state["epoch"]), int(state["max_epochs"])

    def forward(self, *inputs, **bound_inputs) -> dict[str, torch.Tensor]:
        return super().forward(*inputs, epoch=self.epoch, max_epochs=self.max_epochs, **bound_inputs)

    def _select_images(self, base) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        annotations = pgm_annotations(base)
        selection = select_pgm_instances(annotations, self.num_classes, self.pgm_min_size, self.pgm_max_images,
                                         self.pgm_seed)
        return [(index, torch.from_numpy(annotations[index]["boxes"][box_ids]),
                 torch.from_numpy(annotations[index]["labels"][box_ids]))
                for index, box_ids in group_by_image(selection).items()]

    def _pooled(self, model, batch: dict, boxes: torch.Tensor) -> list[torch.Tensor]:
        def fpn(images):
            feats = model(images, image_sizes=batch["image_sizes"], predict=False)["feats"]
            return [feats[name] for name in self.level_names]
        return [level.float().cpu() for level in extract_instance_features(fpn, batch["images"], boxes)]

    @torch.no_grad()
    def before_epoch(self, context: EpochContext) -> None:
        runtime, base = context.runtime, context.dataset.base
        self.epoch, self.max_epochs = context.epoch, context.epochs
        if self._pgm_images is None:
            self._pgm_images = self._select_images(base)
        if not self._pgm_images:
            warnings.warn(f"GKD: no training box of width and height > {self.pgm_min_size} px; prototypes are "
                          "not generated (binary masks, unweighted soft labels). Lower method option "
                          "pgm_min_size for small images.")
            return
        transform = _evaluation_transform(context.dataset.transform)
        was_training = context.student.training
        context.student.eval()
        positions = range(runtime.rank, len(self._pgm_images), runtime.world_size)
        records = []
        for position in tqdm(positions, desc=f"GKD prototypes, epoch {context.epoch}", disable=not runtime.is_main,
                             leave=False, dynamic_ncols=True):
            index, boxes, labels = self._pgm_images[position]
            image, input_boxes, _, meta = transform(base[index]["image"], boxes.numpy(), None)
            batch = context.collate([{"image": image, "target": meta}])
            batch = context.dataset.prepare_batch({**batch, "images": batch["images"].to(runtime.device)})
            if position not in self._teacher_cache:
                self._teacher_cache[position] = self._pooled(context.teacher, batch, input_boxes)
            records.append((position, self._pooled(context.student, batch, input_boxes),
                            self._teacher_cache[position], input_boxes, labels))
        context.student.train(was_training)
        if runtime.world_size > 1:
            shards = [None] * runtime.world_size
            dist.all_gather_object(shards, records)
            records = sorted((record for shard in shards for record in shard), key=lambda record: record[0])
        self.set_prototypes(*generate_epoch_prototypes(
            [(student, teacher, boxes, labels) for _, student, teacher, boxes, labels in records],
            self.num_classes, self.num_prototypes, self.pgm_alpha, prev=self.prototypes))


# ------------------------------------------------------------------------------------------ wiring
# Levels (docs/specs/gkd.md §4): all five FPN outputs of each detector, Faster R-CNN P2-P6 (fg/bg averaged over
# levels) and RetinaNet P3-P7 (summed). Instances: the student's positive training samples with their GT class.
TWO_STAGE_LEVELS = ["p2", "p3", "p4", "p5", "p6"]
ONE_STAGE_LEVELS = ["p3", "p4", "p5", "p6", "p7"]


def _fpn_strides(levels) -> tuple:
    return tuple(2 ** int(name[1:]) for name in levels)


def _check(recipe):
    if recipe.task != "det":
        raise ValueError(f"--method gkd distils object detectors: --task det, not {recipe.task}")
    if is_fcos(recipe.student) or is_fcos(recipe.teacher):
        # the one-stage path reads anchor assignments; FCOS has locations, not anchors
        raise ValueError(f"--method gkd: {recipe.student if is_fcos(recipe.student) else recipe.teacher} is an FCOS "
                         "detector; GKD here distils RetinaNet and Faster R-CNN")
    if is_two_stage(recipe.teacher) != is_two_stage(recipe.student):
        raise ValueError(f"--method gkd: student {recipe.student} and teacher {recipe.teacher} must be the same "
                         "kind of detector (the teacher scores the student's positive samples)")


def _build(recipe, student, teacher):
    """``method_options``: GKDDistiller's loss options and the PGM options of ScheduledGKDDistiller
    (pgm_max_images, pgm_min_size, pgm_seed, num_prototypes, pgm_alpha)."""
    _check(recipe)
    two_stage = is_two_stage(recipe.student)
    levels = TWO_STAGE_LEVELS if two_stage else ONE_STAGE_LEVELS
    options = {"level_reduction": "mean" if two_stage else "sum", **recipe.method_options}
    return ScheduledGKDDistiller(levels, recipe.num_classes, channels_s=student.out_channels[levels[0]],
                                 channels_t=teacher.out_channels[levels[0]], strides=_fpn_strides(levels), **options)


def _bind_det(student_out, teacher_out, batch):
    """Faster R-CNN: positive sampled RoIs (background is the last class) with their logits and RoIAlign
    features in both heads. RetinaNet: positive anchors; the soft labels are both heads' class logits at
    those anchors, each anchor's robust weight from its box pooled on its own level (docs/specs/gkd.md §4)."""
    if "rois" in student_out:
        levels = TWO_STAGE_LEVELS
        # the positive rows as integer indices: one host read for all the tensors indexed with them
        positive = (student_out["roi_labels"] < student_out["roi_cls_logits"].shape[1] - 1).nonzero().squeeze(1)
        boxes, image_of = student_out["rois"][positive, 1:], student_out["rois"][positive, 0].long()
        labels = student_out["roi_labels"][positive]
        soft = {"roi_logits_s": student_out["roi_cls_logits"][positive],
                "roi_logits_t": teacher_out["roi_cls_logits"][positive],
                "roi_feats_s": student_out["roi_feats"][positive], "roi_feats_t": teacher_out["roi_feats"][positive],
                "roi_levels": student_out["roi_levels"][positive]}
    else:
        levels = ONE_STAGE_LEVELS
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


def _options(recipe) -> set:
    return (keyword_options(ScheduledGKDDistiller, supplied=("level_names", "num_classes"))
            | keyword_options(GKDDistiller, supplied=("channels_s", "channels_t", "num_levels", "strides")))


METHOD = Method(build=_build, bind={"det": _bind_det}, check=_check, options=_options)
