"""Evaluation metrics with the semantics of the official evaluators.

* Semantic segmentation: a confusion matrix (rows = ground truth, columns = prediction) and the
  Cityscapes scores derived from it. A class absent from both ground truth and prediction has IoU NaN
  and is left out of the mean, as ``cityscapesscripts`` does.
* PASCAL VOC detection: ``voc_map`` follows the official devkit (``+1`` pixel convention, greedy
  matching by score, ``difficult`` boxes ignored, 11-point or area AP).
* COCO detection: pycocotools ``COCOeval`` on results in COCO JSON format.
* Classification: top-k accuracy counts.

Everything that is accumulated over a data set is a plain tensor of counts, so that summing it
across DDP ranks (``all_reduce_sum``) gives exactly the single-process result.
"""
from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import torch
import torch.distributed as dist

from kd_ref.precision import at_least_float32


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts, rows = ground truth, columns = prediction.

    ``pred`` and ``target`` are integer tensors of any equal shape (on any device); pixels whose target
    equals ``ignore_index`` are dropped whatever their prediction.

    One joint histogram of ``target * side + pred`` over every value pair in ``[0, side)``, ``side`` covering
    the classes and the ignore index, counts each pixel once; the ignore row and the
    out-of-range bins are then read off the small histogram instead of masking the pixels (a boolean mask
    of a 1024x2048 label and the copies it makes cost several times the histogram). Values outside
    ``[0, side)`` (or a negative ``ignore_index``) take the general path, which masks ignored pixels first.
    """
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    side = max(num_classes, ignore_index + 1)
    extremes = torch.stack([torch.stack(values.aminmax()).long() for values in (target, pred)]).tolist()
    if ignore_index < 0 or min(low for low, _ in extremes) < 0 or max(high for _, high in extremes) >= side:
        return _masked_confusion_matrix(pred, target, num_classes, ignore_index)
    # int32 halves the memory traffic of the joint index (int64 only where side ** 2 does not fit), and the
    # in-place multiply-add spares a converted copy of pred and a temporary
    index_dtype = torch.int32 if side * side < 2 ** 31 else torch.int64
    joint_index = target.reshape(-1).to(index_dtype, copy=True).mul_(side)
    pred = pred.reshape(-1)
    joint_index.add_(pred if torch.can_cast(pred.dtype, index_dtype) else pred.to(index_dtype))
    joint = torch.bincount(joint_index, minlength=side * side).reshape(side, side)
    joint[ignore_index] = 0
    counts = joint[:num_classes, :num_classes]
    total, counted = torch.stack([joint.sum(), counts.sum()]).tolist()
    if total != counted:
        _raise_out_of_range(joint, num_classes, ignore_index)
    return counts.contiguous()


def _masked_confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                             ignore_index: int) -> torch.Tensor:
    """:func:`confusion_matrix` for values beyond its joint histogram: ignored pixels are masked out first,
    in int64 so that no value can overflow."""
    target = target.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = target != ignore_index
    target, pred = target[keep], pred[keep]
    out_of_range = (target < 0) | (target >= num_classes) | (pred < 0) | (pred >= num_classes)
    if out_of_range.any():
        _raise_values(torch.cat([target[out_of_range], pred[out_of_range]]), num_classes, ignore_index)
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _raise_out_of_range(joint: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """The error for the values a (row-ignored) joint histogram counts outside ``[0, num_classes)``."""
    values = torch.arange(len(joint), device=joint.device)
    seen = torch.cat([values[joint.sum(1) > 0], values[joint.sum(0) > 0]])
    _raise_values(seen[(seen < 0) | (seen >= num_classes)], num_classes, ignore_index)


def _raise_values(values: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    raise ValueError(f"confusion_matrix: values {values.unique()[:8].tolist()} outside [0, {num_classes}) "
                     f"(and not the ignore index {ignore_index})")


def segmentation_scores(cm: torch.Tensor) -> dict:
    """``{"mIoU", "IoU", "aAcc"}`` in percent from a confusion matrix (float64 arithmetic).

    ``IoU[k] = cm[k,k] / (row_k + col_k - cm[k,k])``; NaN for a class seen on neither side, which is
    excluded from ``mIoU``; 0 for a class present on one side only.
    """
    cm = cm.to(torch.float64)
    true_positive = cm.diagonal()
    union = cm.sum(1) + cm.sum(0) - true_positive
    iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
    seen = ~iou.isnan()
    miou = iou[seen].mean().item() * 100 if seen.any() else float("nan")
    total = cm.sum().item()
    return {
        "mIoU": miou,
        "IoU": [v * 100 for v in iou.tolist()],
        "aAcc": true_positive.sum().item() / total * 100 if total > 0 else float("nan"),
    }


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Counts ``[number of samples, correct@k for k in ks]`` as an int64 tensor (summable across ranks)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hits = top == target[:, None]
    return torch.tensor([target.numel()] + [int(hits[:, :k].any(1).sum()) for k in ks], dtype=torch.int64)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a count tensor over all DDP ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        reduced = tensor.to(backend_device).clone()
        dist.all_reduce(reduced)
        return reduced.to(tensor.device)
    return tensor


# ----------------------------------------------------------------------------------------- VOC mAP
def _box_area_plus_one(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)


def _iou_plus_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box against many, with the devkit's ``+1`` pixel convention."""
    ix1 = np.maximum(boxes[:, 0], box[0])
    iy1 = np.maximum(boxes[:, 1], box[1])
    ix2 = np.minimum(boxes[:, 2], box[2])
    iy2 = np.minimum(boxes[:, 3], box[3])
    inter = np.maximum(ix2 - ix1 + 1, 0) * np.maximum(iy2 - iy1 + 1, 0)
    union = _box_area_plus_one(box[None])[0] + _box_area_plus_one(boxes) - inter
    return inter / union


def average_precision(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = True) -> float:
    """VOC AP: 11-point interpolation (VOC07) or area under the monotone precision envelope."""
    if use_07_metric:
        points = []
        for threshold in np.arange(0.0, 1.1, 0.1):
            above = precision[recall >= threshold]
            points.append(above.max() if above.size else 0.0)
        return float(np.mean(points))
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.where(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def _as_numpy(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        # numpy has no bfloat16: scores computed under --amp are lifted to float32 before they leave torch
        value = value.detach().cpu()
        value = (at_least_float32(value) if value.is_floating_point() else value).numpy()
    return np.asarray(value, dtype=dtype)


def voc_map(detections: list, ground_truths: list, num_classes: int, iou_thr: float = 0.5,
            use_07_metric: bool = True) -> dict:
    """PASCAL VOC mean average precision, equal to the official devkit on the same detections.

    ``detections[i]``: dict of ``boxes`` (K, 4) xyxy, ``scores`` (K,), ``labels`` (K,) for image i.
    ``ground_truths[i]``: dict of ``boxes``, ``labels`` and optional ``difficult`` (bool) for image i.
    Returns ``{"mAP": ..., "AP": [...]}`` in percent; a class without non-difficult ground truth has
    AP NaN and is left out of the mean.
    """
    if len(detections) != len(ground_truths):
        raise ValueError(f"voc_map: {len(detections)} detection entries for {len(ground_truths)} images")
    aps = []
    for cls in range(num_classes):
        gt_boxes, gt_difficult, taken = [], [], []
        for gt in ground_truths:
            labels = _as_numpy(gt["labels"], np.int64).reshape(-1)
            boxes = _as_numpy(gt["boxes"], np.float64).reshape(-1, 4)[labels == cls]
            difficult = gt.get("difficult")
            difficult = (np.zeros(len(labels), bool) if difficult is None
                         else _as_numpy(difficult, bool).reshape(-1))[labels == cls]
            gt_boxes.append(boxes)
            gt_difficult.append(difficult)
            taken.append(np.zeros(len(boxes), bool))
        num_positives = int(sum((~d).sum() for d in gt_difficult))

        image_ids, scores, boxes = [], [], []
        for image_id, det in enumerate(detections):
            labels = _as_numpy(det["labels"], np.int64).reshape(-1)
            keep = labels == cls
            image_ids.append(np.full(int(keep.sum()), image_id))
            scores.append(_as_numpy(det["scores"], np.float64).reshape(-1)[keep])
            boxes.append(_as_numpy(det["boxes"], np.float64).reshape(-1, 4)[keep])
        image_ids, scores, boxes = np.concatenate(image_ids), np.concatenate(scores), np.concatenate(boxes)
        order = np.argsort(-scores, kind="stable")

        true_pos = np.zeros(len(order))
        false_pos = np.zeros(len(order))
        for rank, index in enumerate(order):
            image_id = image_ids[index]
            candidates = gt_boxes[image_id]
            if len(candidates) == 0:
                false_pos[rank] = 1
                continue
            overlaps = _iou_plus_one(boxes[index], candidates)
            best = int(np.argmax(overlaps))
            if overlaps[best] < iou_thr:
                false_pos[rank] = 1
            elif gt_difficult[image_id][best]:
                continue
            elif taken[image_id][best]:
                false_pos[rank] = 1
            else:
                taken[image_id][best] = True
                true_pos[rank] = 1

        if num_positives == 0:
            aps.append(float("nan"))
            continue
        true_pos, false_pos = np.cumsum(true_pos), np.cumsum(false_pos)
        recall = true_pos / num_positives
        precision = true_pos / np.maximum(true_pos + false_pos, np.finfo(np.float64).eps)
        aps.append(average_precision(recall, precision, use_07_metric) * 100)
    valid = [ap for ap in aps if not math.isnan(ap)]
    return {"mAP": float(np.mean(valid)) if valid else float("nan"), "AP": aps}


# ---------------------------------------------------------------------------------------- COCO eval
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_results(detections: list, image_ids: list, category_ids: list) -> list:
    """COCO JSON results from per-image detections (xyxy in original-image pixels, 0-based labels).

    ``category_ids[label]`` maps a contiguous label back to the data set's own category id. Boxes are
    converted to ``[x, y, w, h]`` without the ``+1`` convention, as COCO expects.
    """
    results = []
    for det, image_id in zip(detections, image_ids):
        # whole columns to Python numbers at once: per-box numpy scalars would cost as much as COCOeval
        boxes = _as_numpy(det["boxes"], np.float64).reshape(-1, 4)
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
        scores = _as_numpy(det["scores"], np.float64).reshape(-1).tolist()
        labels = _as_numpy(det["labels"], np.int64).reshape(-1).tolist()
        image_id = int(image_id)
        results.extend({"image_id": image_id, "category_id": int(category_ids[label]), "bbox": box, "score": score}
                       for box, score, label in zip(xywh, scores, labels))
    return results


def coco_box_ap(coco_gt, results: list) -> dict:
    """Box AP / AP50 / AP75 / APs / APm / APl in percent through pycocotools ``COCOeval``."""
    return coco_eval_stats(coco_gt, results, "bbox")


def coco_eval_stats(coco_gt, results: list, iou_type: str) -> dict:
    """AP / AP50 / AP75 / APs / APm / APl in percent of ``results`` through pycocotools ``COCOeval`` with
    ``iou_type`` ("bbox" or "segm"), maxDets 100; no results score 0."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in COCO_STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(evaluator.stats[i]) * 100 for i, name in enumerate(COCO_STAT_NAMES)}


# ------------------------------------------------------------------- COCO mask AP (instance segmentation)
def encode_mask(mask) -> dict:
    """COCO RLE of one bool (H, W) mask, ``counts`` as ``str`` so that the result is JSON."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(_as_numpy(mask, np.uint8)))
    return {"size": [int(side) for side in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_mask_results(instances: list, image_ids: list, category_ids: list) -> list:
    """COCO segmentation results from per-image ``{"masks" bool (K, H, W) in original pixels, "scores",
    "labels" (0-based)}``; ``category_ids[label]`` is the data set's category id."""
    results = []
    for found, image_id in zip(instances, image_ids):
        for mask, score, label in zip(found["masks"], _as_numpy(found["scores"], np.float64).reshape(-1),
                                      _as_numpy(found["labels"], np.int64).reshape(-1)):
            results.append({"image_id": int(image_id), "category_id": int(category_ids[label]),
                            "segmentation": encode_mask(mask), "score": float(score)})
    return results


def coco_segm_eval(results: list, coco_gt) -> dict:
    """Mask AP / AP50 / AP75 / APs / APm / APl in percent: pycocotools ``COCOeval(iouType="segm")`` of
    ``results`` (``{"image_id", "category_id", "segmentation": RLE, "score"}``) against ``coco_gt``."""
    return coco_eval_stats(coco_gt, results, "segm")
