import math

import numpy as np
import pytest
import torch

from kd_ref.metrics import average_precision, coco_results, confusion_matrix, segmentation_scores, topk_correct, voc_map


def test_confusion_matrix_rows_are_ground_truth_and_ignore_is_dropped():
    target = torch.tensor([[0, 0, 1], [2, 255, 1]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    cm = confusion_matrix(pred, target, num_classes=3)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def test_confusion_matrix_uint8_does_not_overflow():
    target = torch.full((300,), 200, dtype=torch.uint8)
    pred = torch.full((300,), 201, dtype=torch.uint8)
    cm = confusion_matrix(pred, target, num_classes=250)
    assert cm[200, 201] == 300 and cm.sum() == 300


def test_confusion_matrix_rejects_out_of_range_and_shape_mismatch():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([5]), torch.tensor([0]), num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(4), num_classes=3)


def test_scores_hand_computed_and_absent_class_is_nan():
    cm = torch.tensor([[3, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    scores = segmentation_scores(cm)
    assert scores["IoU"][0] == pytest.approx(100 * 3 / 5)
    assert scores["IoU"][1] == pytest.approx(100 * 2 / 3)
    assert math.isnan(scores["IoU"][2])          # on neither side
    assert scores["IoU"][3] == 0.0               # ground truth only
    assert scores["mIoU"] == pytest.approx((60 + 200 / 3 + 0) / 3)
    assert scores["aAcc"] == pytest.approx(100 * 5 / 7)


def _official_cityscapes_miou(pred_train, gt_train):
    """Independent re-statement of cityscapesscripts' evalPixelLevelSemanticLabeling on label ids."""
    train_to_label = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    lut = np.zeros(256, np.int64)
    lut[:19] = train_to_label
    lut[255] = 0                                      # "unlabeled", ignoreInEval
    pred, gt = lut[pred_train], lut[gt_train]
    conf = np.zeros((34, 34), np.int64)
    np.add.at(conf, (gt.ravel(), pred.ravel()), 1)
    ious = []
    for label in train_to_label:
        tp = conf[label, label]
        fn = conf[label, :].sum() - tp
        fp = conf[[l for l in train_to_label if l != label], label].sum()
        ious.append(np.nan if tp + fp + fn == 0 else tp / (tp + fp + fn))
    return 100 * np.nanmean(ious), np.array(ious) * 100


def test_scores_equal_official_cityscapes_evaluation():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 15, size=(2, 40, 50))        # classes 15..18 absent from ground truth
    gt[:, :5] = 255
    pred = np.where(rng.random(gt.shape) < 0.7, np.where(gt == 255, 3, gt), rng.integers(0, 17, gt.shape))
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt).to(torch.uint8), 19)
    ours = segmentation_scores(cm)
    miou, ious = _official_cityscapes_miou(pred, gt)
    assert ours["mIoU"] == pytest.approx(miou, abs=1e-9)
    np.testing.assert_allclose(np.array(ours["IoU"]), ious, atol=1e-9)


def test_topk_correct_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.15], [0.2, 0.3, 0.5]])
    counts = topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2))
    assert counts.tolist() == [3, 1, 2]


def test_average_precision_forms():
    recall = np.array([0.5, 0.5, 1.0])
    precision = np.array([1.0, 0.5, 2 / 3])
    assert average_precision(recall, precision, use_07_metric=False) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision(recall, precision, use_07_metric=True) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_voc_map_hand_made_with_difficult_and_duplicates():
    gts = [{"boxes": torch.tensor([[0., 0, 9, 9], [20, 20, 29, 29]]), "labels": torch.tensor([0, 0]),
            "difficult": torch.tensor([False, True])},
           {"boxes": torch.tensor([[0., 0, 9, 9]]), "labels": torch.tensor([0]), "difficult": torch.tensor([False])}]
    dets = [{"boxes": torch.tensor([[0., 0, 9, 9], [0, 0, 9, 9], [20, 20, 29, 29]]),
             "scores": torch.tensor([0.9, 0.8, 0.95]), "labels": torch.tensor([0, 0, 0])},
            {"boxes": torch.tensor([[50., 50, 60, 60], [0, 0, 9, 9]]), "scores": torch.tensor([0.7, 0.6]),
             "labels": torch.tensor([0, 0])}]
    # ranked: 0.95 difficult (ignored), 0.9 TP, 0.8 duplicate FP, 0.7 FP, 0.6 TP -> 2 positives
    # recall 0.5, 0.5, 0.5, 1.0 ; precision 1, 1/2, 1/3, 1/2
    result = voc_map(dets, gts, num_classes=2, use_07_metric=False)
    assert result["AP"][0] == pytest.approx(100 * (0.5 * 1 + 0.5 * 0.5))
    assert math.isnan(result["AP"][1]) and result["mAP"] == pytest.approx(result["AP"][0])
    eleven = voc_map(dets, gts, num_classes=1, use_07_metric=True)["mAP"]
    assert eleven == pytest.approx(100 * (6 * 1 + 5 * 0.5) / 11)


def test_voc_map_uses_plus_one_box_convention_and_inclusive_threshold():
    gts = [{"boxes": torch.tensor([[0., 0, 1, 1]]), "labels": torch.tensor([0])}]
    # with +1: intersection 2x2 = 4, union 4 + 8 - 4 = 8 -> IoU exactly 0.5, a match (IoU >= thr);
    # without +1 it would be 1 / 3, a miss.
    det = [{"boxes": torch.tensor([[0., 0, 1, 3]]), "scores": torch.tensor([1.0]), "labels": torch.tensor([0])}]
    assert voc_map(det, gts, 1)["mAP"] == pytest.approx(100.0)
    assert voc_map(det, gts, 1, iou_thr=0.51)["mAP"] == 0.0


def test_confusion_matrix_joint_histogram_equals_masked_counting_on_every_path():
    rng = np.random.default_rng(1)
    target = torch.from_numpy(rng.integers(0, 6, (3, 17, 23))).to(torch.int32)
    target[0, :4] = 255
    pred = torch.from_numpy(rng.integers(0, 5, target.shape))                     # int64, as argmax gives
    with pytest.raises(ValueError, match=r"values \[5\] outside \[0, 5\)"):
        confusion_matrix(pred, target, num_classes=5)                             # label 5 of 5 classes
    target[target == 5] = 255
    keep = target != 255
    expected = torch.bincount((target[keep] * 5 + pred[keep]).long(), minlength=25).reshape(5, 5)
    given = target.clone()
    assert torch.equal(confusion_matrix(pred, target, num_classes=5), expected)
    assert torch.equal(target, given), "an int32 target is not turned into the joint index in place"
    assert torch.equal(confusion_matrix(pred.to(torch.uint8), target.to(torch.uint8), 5), expected)
    beyond = pred.clone()
    beyond[~keep] = 1000                                                          # beyond the histogram, ignored
    assert torch.equal(confusion_matrix(beyond, target, num_classes=5), expected)
    minus_one = torch.where(keep, target, torch.full_like(target, -1))
    assert torch.equal(confusion_matrix(pred, minus_one, num_classes=5, ignore_index=-1), expected)


def test_coco_results_convert_whole_columns_to_the_per_box_form():
    detections = [{"boxes": torch.tensor([[1.5, 2.0, 11.25, 4.0], [0.0, 0.0, 3.0, 3.0]]),
                   "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([1, 0])},
                  {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}]
    results = coco_results(detections, [np.int64(42), 7], category_ids=[3, 9])
    assert results == [{"image_id": 42, "category_id": 9, "bbox": [1.5, 2.0, 9.75, 2.0], "score": pytest.approx(0.9)},
                       {"image_id": 42, "category_id": 3, "bbox": [0.0, 0.0, 3.0, 3.0], "score": 0.25}]
    assert all(type(value) in (int, float, list) for result in results for value in result.values())
    assert results[0]["score"] == float(torch.tensor(0.9, dtype=torch.float32))  # the float32 score, as before
