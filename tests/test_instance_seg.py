"""kd_ref/instance_seg.py: golden cases of the pure functions, hand-made cases, SOLO and Mask R-CNN shapes,
parameter counts, losses, inference and the mmdet key maps."""
import json
import math
import os

import numpy as np
import pytest
import torch

from kd_ref import convert
from kd_ref import instance_seg as I
from model_helpers import ReferenceFile, count_parameters, place_resnet_by_hand, put

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "instance_seg")
CASES = {case["name"]: case for case in json.load(open(os.path.join(GOLDEN, "cases.json")))["cases"]}


def golden(name):
    return torch.load(os.path.join(GOLDEN, CASES[name]["file"]))


# ------------------------------------------------------------------------------------ golden cases
def test_dice_loss_matches_golden_case_with_an_empty_target():
    blob = golden("case1_dice")
    assert blob["target"][3].sum() == 0
    assert torch.allclose(I.dice_loss(blob["pred"], blob["target"], eps=1e-3), blob["expected"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("variant", ["a", "b", "c"])
def test_mask_matrix_nms_matches_golden_case(variant):
    blob = golden("case2_matrix_nms")
    scores, labels, keep = I.mask_matrix_nms(blob["masks"], blob["labels"], blob["scores"],
                                             **CASES["case2_matrix_nms"]["kwargs"][f"kw_{variant}"])
    assert torch.allclose(scores, blob[f"expected_scores_{variant}"], rtol=1e-6, atol=1e-9)
    assert torch.equal(labels, blob[f"expected_labels_{variant}"])
    assert torch.equal(keep, blob[f"expected_keep_{variant}"])


def test_solo_targets_and_center_of_mass_match_golden_case():
    blob = golden("case3_solo_targets")
    sizes = [(64, 64), (64, 64), (32, 32), (16, 16), (16, 16)]
    mask_targets, labels, positives = I.solo_targets(blob["gt_bboxes"], blob["gt_labels"], blob["gt_masks"], sizes)
    for level, size in enumerate(sizes):
        assert torch.equal(labels[level], blob[f"expected_labels_{level}"])
        assert torch.equal(positives[level], blob[f"expected_pos_{level}"])
        assert mask_targets[level].shape == (int(positives[level].sum()), *size)
        assert mask_targets[level].dtype == torch.uint8
    centres = torch.stack([torch.stack(I.center_of_mass(mask.double())) for mask in blob["gt_masks"]])
    assert torch.allclose(centres, blob["expected_center_of_mass"], rtol=1e-9, atol=0)


# --------------------------------------------------------------------------------- hand-made cases
def test_coord_features_are_x_then_y_from_minus_one_to_one():
    coords = I.coord_features(2, 3, 5)
    assert coords.shape == (2, 2, 3, 5)
    assert coords[0, 0, 0].tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]  # x varies along the width
    assert coords[0, 1, :, 0].tolist() == [-1.0, 0.0, 1.0]        # y along the height
    assert torch.equal(coords[0], coords[1])


def test_point_nms_keeps_exactly_the_local_maxima_of_2x2_windows_ties_included():
    prob = torch.tensor([[0.1, 0.9, 0.2],
                         [0.3, 0.4, 0.2],
                         [0.8, 0.5, 0.5]])[None, None]
    kept = I.point_nms(prob)[0, 0]
    # window of (i, j): rows i-1..i, cols j-1..j
    expected = torch.tensor([[0.1, 0.9, 0.0],
                             [0.3, 0.0, 0.0],
                             [0.8, 0.0, 0.5]])
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("factor", [4, 8, 16])
def test_downsample_mask_is_half_pixel_bilinear_rounded(factor):
    rng = np.random.default_rng(factor)
    mask = (rng.random((4 * factor, 3 * factor)) < 0.5).astype(np.uint8)
    # half-pixel sampling at an integer factor reads the mean of the 2x2 pixels around each block's centre
    a, b = factor // 2 - 1, factor // 2
    centre = (mask[a::factor, a::factor].astype(float) + mask[a::factor, b::factor] + mask[b::factor, a::factor]
              + mask[b::factor, b::factor]) / 4
    small = I.downsample_mask(torch.from_numpy(mask), factor)
    assert small.dtype == torch.uint8 and small.shape == (4, 3)
    assert np.array_equal(small.numpy(), (centre >= 0.5).astype(np.uint8))


def test_dice_loss_is_zero_for_a_perfect_prediction_and_differentiable():
    target = torch.zeros(1, 8, 8, dtype=torch.uint8)
    target[0, 2:6, 2:6] = 1
    perfect = (target.double() * 2 - 1) * 50
    assert I.dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-3)
    logits = torch.zeros(1, 8, 8, dtype=torch.float64, requires_grad=True)
    I.dice_loss(logits, target).sum().backward()
    assert (logits.grad[0, 2:6, 2:6] < 0).all() and (logits.grad[0, :2] > 0).all()


def test_mask_matrix_nms_decays_an_overlapping_same_class_mask_only():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2] = True
    masks[1, :2] = True
    masks[1, 2, 0] = True   # IoU 8/9 with mask 0
    masks[2, :2] = True     # same pixels as mask 0, other class
    scores = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    out_scores, out_labels, keep = I.mask_matrix_nms(masks, labels, scores, nms_pre=-1, max_num=-1, filter_thr=-1)
    assert keep.tolist() == [0, 2, 1]
    assert out_scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * np.exp(-2.0 * (8 / 9) ** 2)])
    assert [len(t) for t in I.mask_matrix_nms(masks[:0], labels[:0], scores[:0])] == [0, 0, 0]


# ------------------------------------------------------------------------------------------ models
def test_parameter_counts_match_the_spec():
    solo = I.build_instance_model("solo_r50", 80)
    assert count_parameters(solo.head) == 9_448_816 and count_parameters(solo.neck) == 3_344_384
    assert count_parameters(solo) == 36_301_232
    assert count_parameters(I.build_instance_model("solo_r101", 80)) == 55_293_360
    assert count_parameters(I.MaskHead(80)) == 2_643_280


def test_solo_r50_head_outputs_every_level_at_its_stride_and_grid():
    model = I.build_instance_model("solo_r50", 80).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 256, 320), predict=False)
    assert [tuple(m.shape) for m in out["mask_preds"]] == [(1, 1600, 64, 80), (1, 1296, 64, 80), (1, 576, 32, 40),
                                                          (1, 256, 16, 20), (1, 144, 16, 20)]
    assert [tuple(c.shape) for c in out["cls_preds"]] == [(1, 80, s, s) for s in I.COCO_GRIDS]
    assert out["feats"]["p2"].shape == (1, 256, 64, 80) and out["feats"]["p6"].shape == (1, 256, 4, 5)
    assert torch.allclose(model.head.conv_cls.bias, torch.full((80,), -4.59512), atol=1e-5)


def synthetic_targets(size=(64, 64)):
    masks = torch.zeros(2, *size, dtype=torch.bool)
    masks[0, 8:40, 8:30] = True
    masks[1, 30:60, 34:62] = True
    boxes = torch.tensor([[8.0, 8.0, 30.0, 40.0], [34.0, 30.0, 62.0, 60.0]])
    return [{"boxes": boxes, "labels": torch.tensor([0, 2]), "masks": masks}]


def test_solo_losses_have_gradients_and_no_positives_give_zero_mask_loss():
    torch.manual_seed(0)
    model = I.build_instance_model("solo_synth_r18", 3).train()
    out = model(torch.randn(1, 3, 64, 64), synthetic_targets())
    assert set(out["losses"]) == {"loss_mask", "loss_cls"}
    sum(out["losses"].values()).backward()
    # the levels whose scale range holds an instance get mask gradients (SYNTHETIC_SOLO's ranges)
    assert any(conv.weight.grad.abs().sum() > 0 for conv in model.head.conv_mask_list)
    assert model.head.conv_cls.weight.grad.abs().sum() > 0
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
              "masks": torch.zeros(0, 64, 64, dtype=torch.bool)}]
    losses = model(torch.randn(1, 3, 64, 64), empty)["losses"]
    assert losses["loss_mask"].item() == 0 and losses["loss_mask"].requires_grad
    with pytest.raises(ValueError, match="needs masks"):
        model(torch.randn(1, 3, 64, 64), [{k: v for k, v in synthetic_targets()[0].items() if k != "masks"}])


def test_solo_inference_caps_at_100_masks_at_the_requested_size_and_is_empty_without_candidates():
    model = I.build_instance_model("solo_synth_r18", 3).eval()
    with torch.no_grad():
        for conv in list(model.head.conv_mask_list) + [model.head.conv_cls]:
            conv.bias.fill_(5.0)  # every cell and class a candidate with a full mask
        images = torch.randn(1, 3, 64, 96)
        out = model(images, image_sizes=[(60, 90)])
        found = model.predict(out["mask_preds"], out["cls_preds"], [(60, 90)], output_sizes=[(120, 180)])[0]
        assert 0 < len(found["scores"]) <= 100 and found["masks"].shape[1:] == (120, 180)
        assert out["instances"][0]["mask_probs"].shape[1:] == (60, 90)
        assert (found["scores"][:-1] >= found["scores"][1:]).all()
        model.head.conv_cls.bias.fill_(-20.0)
        none = model(images, image_sizes=[(60, 90)])["instances"][0]
    assert none["masks"].shape == (0, 60, 90) and none["masks"].dtype == torch.bool
    assert none["labels"].shape == (0,) and none["scores"].shape == (0,)


def test_mask_rcnn_trains_its_mask_head_and_predicts_pasted_masks():
    torch.manual_seed(0)
    model = I.build_instance_model("maskrcnn_r18", 3, rcnn_rois_per_image=32).train()
    out = model(torch.randn(1, 3, 64, 64), synthetic_targets())
    assert {"loss_mask", "loss_cls", "loss_bbox", "loss_rpn_cls"} <= set(out["losses"])
    out["losses"]["loss_mask"].backward()
    assert model.mask_head.logits.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        found = model(torch.randn(1, 3, 64, 64), image_sizes=[(60, 64)])["instances"][0]
    assert found["mask_probs"].shape == (len(found["boxes"]), 60, 64) and len(found["boxes"]) <= 100


def test_mask_rcnn_mask_target_of_a_gt_box_is_its_mask_resampled():
    model = I.build_instance_model("maskrcnn_r18", 3)
    targets = synthetic_targets()
    rois = torch.tensor([[0.0, 8.0, 8.0, 30.0, 40.0], [0.0, 34.0, 30.0, 62.0, 46.0]])  # GT 0; top half of GT 1
    out = model.mask_targets(rois, torch.tensor([0, 1]), targets)
    assert out.shape == (2, 28, 28) and out.min() == 1  # both RoIs lie inside their rectangle masks
    shifted = torch.tensor([[0.0, 0.0, 8.0, 22.0, 40.0]])  # left 8 px outside GT 0 (8 of 22 px wide)
    left = model.mask_targets(shifted, torch.tensor([0]), targets)[0]
    assert left[:, :9].max() == 0 and left[:, 12:].min() == 1


def test_solo_post_processes_at_stride_4_as_mmdet():
    # one candidate: level 2 (8x8 masks for a 64x64 input, stride 8), cell 10, class 1 at probability 0.8;
    # its mask logit map is 1 on its top-left 4x4 block, 0 elsewhere (+-30: sigmoid 1 and 1e-13)
    model = I.build_instance_model("solo_synth_r18", 3).eval()
    mask_preds = [torch.full((1, grid ** 2, side, side), -30.0)
                  for grid, side in zip(model.num_grids, (16, 16, 8, 4, 4))]
    cls_preds = [torch.full((1, 3, grid, grid), -30.0) for grid in model.num_grids]
    mask_preds[2][0, 10, :4, :4] = 30.0
    cls_preds[2][0, 1, 1, 2] = math.log(0.8 / 0.2)  # cell 10 = row 1, column 2 of the 8x8 grid
    found = model.predict(mask_preds, cls_preds, [(64, 64)])[0]
    # at stride 4 (16x16) the map upsampled x2 is 1 on rows/columns 0-6, 0.75 on row/column 7 (0.5625 at
    # their corner), 0.25 on row/column 8: 8x8 pixels above 0.5, summing 49 + 14 * 0.75 + 0.5625
    assert found["labels"].tolist() == [1]
    assert found["scores"].item() == pytest.approx(0.8 * (49 + 14 * 0.75 + 0.5625) / 64, rel=1e-6)
    # the soft mask: stride 4, then x4 to the padded input
    stride4 = torch.nn.functional.interpolate(torch.sigmoid(mask_preds[2][:, 10:11]), size=(16, 16),
                                              mode="bilinear", align_corners=False)
    expected = torch.nn.functional.interpolate(stride4, size=(64, 64), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(found["mask_probs"], expected, atol=1e-6)
    assert found["masks"][0].any(1).sum() == 32  # the stride-4 map is above 0.5 up to row 7.5: input row 31.5


def test_mask_rcnn_rcnn_assigner_matches_low_quality_proposals_and_faster_rcnn_does_not():
    from kd_ref import detectors
    # the proposal overlaps GT 0 by IoU 0.905 and GT 1 by 0.739, and is GT 1's best proposal: max-IoU gives it
    # to GT 0, mmdet's low-quality match (Mask R-CNN's R-CNN stage) to GT 1
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]]), "labels": torch.tensor([0, 2])}
    proposals = [torch.tensor([[0.5, 0.0, 10.5, 10.0]])]
    mask_rcnn = I.build_instance_model("maskrcnn_r18", 3)
    faster_rcnn = detectors.build_detector("faster_rcnn_r18", 3)
    # the RoIs: both GT boxes, then the proposal (every positive is kept, in order)
    assert mask_rcnn.sample_rois(proposals, [target], [None])[1].tolist() == [0, 2, 2]
    assert faster_rcnn.sample_rois(proposals, [target], [None])[1].tolist() == [0, 2, 0]


def test_mask_rcnn_mask_targets_follow_the_assignment_not_the_best_same_class_overlap():
    # both GTs of class 2: the low-quality match gives the proposal to GT 1 (its box target), and its mask target
    # must be GT 1's mask too, although it overlaps GT 0 more (mmdet indexes masks by pos_assigned_gt_inds)
    masks = torch.zeros(2, 12, 12)
    masks[0, :, :6] = 1.0   # GT 0: left half
    masks[1] = 1.0          # GT 1: all
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0]]), "labels": torch.tensor([2, 2]),
              "masks": masks}
    proposals = [torch.tensor([[0.5, 0.0, 10.5, 10.0]])]
    mask_rcnn = I.build_instance_model("maskrcnn_r18", 3)
    rois, labels, _, gt_indices = mask_rcnn.sample_rois(proposals, [target], [None])
    assert gt_indices.tolist() == [0, 1, 1] and labels.tolist() == [2, 2, 2]
    targets = mask_rcnn.mask_targets(rois, gt_indices, [target])
    assert targets[2].eq(1).all()          # GT 1's mask, all ones inside the proposal
    assert not targets[0].eq(1).all()      # GT 0's own RoI keeps GT 0's half mask


def test_mask_rcnn_masks_are_pasted_on_the_original_image_and_thresholded_inclusively():
    # a 28x28 mask rising linearly from left to right, boxed at x 2-7, y 2-8 of a 10x12 original shown at 1.5x;
    # pasted there pixel column x samples (x + 0.5 - 2) / 5: columns 4 (exactly 0.5), 5 and 6 reach 0.5
    ramp = ((torch.arange(28) + 0.5) / 28).expand(1, 28, 28)
    found = {"roi_mask_probs": ramp, "boxes": torch.tensor([[3.0, 3.0, 10.5, 12.0]]),
             "mask_probs": I.paste_masks(ramp, torch.tensor([[3.0, 3.0, 10.5, 12.0]]), (15, 18))}
    target = {"orig_size": (10, 12), "size": (15, 18), "flipped": False}
    expected = torch.zeros(10, 12, dtype=torch.bool)
    expected[2:8, 4:7] = True
    assert torch.equal(I.masks_at_original_size(found, target)[0], expected)
    # a flipped input: the same object mirrored, in the mirrored box
    flipped = {**found, "roi_mask_probs": ramp.flip(-1), "boxes": torch.tensor([[18 - 10.5, 3.0, 18 - 3.0, 12.0]])}
    assert torch.equal(I.masks_at_original_size(flipped, {**target, "flipped": True})[0], expected)
    # SOLO's soft masks on the input are resized and thresholded strictly, as mmdet's SOLO head
    assert torch.equal(I.masks_at_original_size({"mask_probs": torch.full((1, 15, 18), 0.5)}, target),
                       torch.zeros(1, 10, 12, dtype=torch.bool))


def test_paste_masks_fills_the_box_and_nothing_else():
    pasted = I.paste_masks(torch.ones(1, 28, 28), torch.tensor([[4.0, 2.0, 12.0, 10.0]]), (16, 16))[0]
    assert pasted[2:10, 4:12].min() == 1 and pasted.sum() == 64


def test_copy_non_backbone_weights_copies_neck_and_head_only():
    student, teacher = I.build_instance_model("solo_synth_r18", 3), I.build_instance_model("solo_synth_r18", 3)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(1.0)
    backbone_before = student.backbone.stem[0].weight.clone()
    I.copy_non_backbone_weights(teacher, student)
    assert torch.equal(student.head.conv_cls.weight, teacher.head.conv_cls.weight)
    assert torch.equal(student.neck.lateral_convs[0].weight, teacher.neck.lateral_convs[0].weight)
    assert torch.equal(student.backbone.stem[0].weight, backbone_before)
    with pytest.raises(ValueError, match="same architecture outside the backbone"):
        I.copy_non_backbone_weights(I.build_instance_model("solo_synth_r50", 3), student)


# ------------------------------------------------------------------------------- released weights
def mmdet_keys(state_dict, mask_rcnn=False):
    """Our keys -> mmdet 2.x names (the inverse of the key maps, written out for the test)."""
    renamed = {}
    for key, value in state_dict.items():
        for ours, theirs in (("neck.output_convs.", "neck.fpn_convs."), ("head.", "mask_head.")):
            if key.startswith(ours) and not mask_rcnn:
                key = theirs + key[len(ours):]
        if key.startswith(("neck.lateral_convs.", "neck.fpn_convs.")):
            parts = key.split(".")
            key = ".".join(parts[:3] + ["conv"] + parts[3:])
        renamed[key] = value
    return renamed


def test_mmdet_solo_checkpoint_loads_through_the_released_weights_path(tmp_path):
    model = I.build_instance_model("solo_synth_r18", 3)
    theirs = mmdet_keys(model.state_dict())
    assert "mask_head.mask_convs.0.gn.weight" in theirs and "neck.fpn_convs.3.conv.bias" in theirs
    path = tmp_path / "solo_mmdet.pth"
    torch.save({"state_dict": theirs, "meta": {}}, path)
    assert set(I.load_mmdet_solo(str(path))) == set(model.state_dict())
    fresh = I.build_instance_model("solo_synth_r18", 3)
    layout = convert.load_weights(fresh, str(path), "--teacher-ckpt solo_mmdet.pth")
    assert layout.name == "mmdet 2.x SOLO"
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="solo .* 3 classes; the recipe expects solo .*128-channel"):
        convert.load_weights(I.build_instance_model("solo_synth_r50", 3), str(path), "--teacher-ckpt x")
    with pytest.raises(ValueError, match="a ins model"):
        convert.load_weights(__import__("kd_ref.detectors").detectors.build_detector("faster_rcnn_r18", 3),
                             str(path), "--teacher-ckpt x")


def mmdet_mask_rcnn_r50_fpn_2x_coco_file():
    """``{"meta", "state_dict"}`` as mmdet 2.x saves mask_rcnn_r50_fpn_2x_coco, from mmdet's module names
    (ResNet conv1/bn1/layerN with BatchNorm2d counters, FPN ConvModules ``lateral_convs.i.conv`` /
    ``fpn_convs.i.conv``, RPNHead rpn_conv/rpn_cls (3 sigmoid anchors)/rpn_reg, Shared2FCBBoxHead
    shared_fcs.0-1/fc_cls (81)/fc_reg (80 x 4), FCNMaskHead convs.i.conv/upsample (deconv)/conv_logits (80)).
    Random values."""
    file = ReferenceFile(50)
    file.resnet("backbone.", "backbone.", 50, counter=True)
    for i, c in enumerate((256, 512, 1024, 2048)):
        file.conv(f"neck.lateral_convs.{i}.conv", 256, c, 1)
        file.conv(f"neck.fpn_convs.{i}.conv", 256, 256, 3)
    file.conv("rpn_head.rpn_conv", 256, 256, 3)
    file.conv("rpn_head.rpn_cls", 3, 256, 1)
    file.conv("rpn_head.rpn_reg", 12, 256, 1)
    file.linear("roi_head.bbox_head.shared_fcs.0", 1024, 256 * 7 * 7)
    file.linear("roi_head.bbox_head.shared_fcs.1", 1024, 1024)
    file.linear("roi_head.bbox_head.fc_cls", 81, 1024)
    file.linear("roi_head.bbox_head.fc_reg", 320, 1024)
    for i in range(4):
        file.conv(f"roi_head.mask_head.convs.{i}.conv", 256, 256, 3)
    file.conv("roi_head.mask_head.upsample", 256, 256, 2)  # ConvTranspose2d: (in, out, k, k), in = out
    file.conv("roi_head.mask_head.conv_logits", 80, 256, 1)
    return {"meta": {"mmdet_version": "2.2.0", "CLASSES": tuple(f"class{i}" for i in range(80))},
            "state_dict": file.weights}


def place_mask_rcnn_by_hand(model, weights):
    place_resnet_by_hand(model.backbone, weights, "backbone.", "backbone.")
    for i in range(4):
        put(model.neck.lateral_convs[i], weights, f"neck.lateral_convs.{i}.conv")
        put(model.neck.output_convs[i], weights, f"neck.fpn_convs.{i}.conv")
    for ours, theirs in (("conv", "rpn_conv"), ("cls_out", "rpn_cls"), ("reg_out", "rpn_reg")):
        put(getattr(model.rpn_head, ours), weights, f"rpn_head.{theirs}")
    put(model.box_head.shared_fcs[1], weights, "roi_head.bbox_head.shared_fcs.0")
    put(model.box_head.shared_fcs[3], weights, "roi_head.bbox_head.shared_fcs.1")
    put(model.box_head.cls_out, weights, "roi_head.bbox_head.fc_cls")
    put(model.box_head.reg_out, weights, "roi_head.bbox_head.fc_reg")
    for i, conv in enumerate(model.mask_head.convs):
        put(conv, weights, f"roi_head.mask_head.convs.{i}.conv")
    put(model.mask_head.upsample, weights, "roi_head.mask_head.upsample")
    put(model.mask_head.logits, weights, "roi_head.mask_head.conv_logits")


def test_mmdet_mask_rcnn_r50_fpn_2x_coco_loads_strictly_and_predicts_as_placed_by_hand(tmp_path):
    path = tmp_path / "mask_rcnn_r50_fpn_2x_coco.pth"
    released = mmdet_mask_rcnn_r50_fpn_2x_coco_file()
    released["state_dict"]["roi_head.bbox_head.fc_cls.bias"][:3] += 6.0  # scores above 0.05: detections to compare
    torch.save(released, path)
    loaded = I.build_instance_model("maskrcnn_r50", 80).eval()
    layout = convert.load_weights(loaded, str(path), f"--teacher-ckpt {path.name}")
    assert layout.name == "mmdet 2.x Mask R-CNN"
    by_hand = I.build_instance_model("maskrcnn_r50", 80).eval()
    place_mask_rcnn_by_hand(by_hand, torch.load(path)["state_dict"])
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        expected, actual = by_hand(images), loaded(images)
    assert len(expected["detections"][0]["boxes"]) > 0
    for name in ("boxes", "scores", "labels", "mask_probs"):
        assert torch.equal(actual["instances"][0][name], expected["instances"][0][name]), name
    with pytest.raises(ValueError, match=r"holding maskrcnn on a ResNet-50 \(7x7 stem\), 80 classes; the recipe "
                                         r"expects maskrcnn on a ResNet-50 \(7x7 stem\), 3 classes$"):
        convert.load_weights(I.build_instance_model("maskrcnn_r50", 3), str(path), "--teacher-ckpt x")


def test_synthetic_solo_puts_every_demo_object_on_the_8x8_levels_with_several_positive_cells():
    # the demo's 64-pixel easy scenes: P3 is 8x8, P4 4x4, P5 2x2 (SYNTHETIC_SOLO's comment)
    from kd_ref import synthetic
    model = I.build_instance_model("solo_synth_r18", 3)
    scenes = synthetic.SyntheticInstances(synthetic.SyntheticScenes("train", size=(64, 64), num_classes=3, style="easy"))
    featmap_sizes = [(16, 16), (16, 16), (8, 8), (4, 4), (4, 4)]
    cells_per_object = []
    for index in range(20):
        sample = scenes[index]
        for k in range(len(sample["labels"])):
            _, _, positives = I.solo_targets(
                torch.as_tensor(sample["boxes"][k:k + 1]), torch.as_tensor(sample["labels"][k:k + 1]),
                torch.as_tensor(sample["masks"][k:k + 1]).to(torch.uint8), featmap_sizes, model.num_grids,
                model.scale_ranges, model.strides, model.pos_scale, 3)
            counts = [int(p.sum()) for p in positives]
            assert counts[2:] == [0, 0, 0] and sum(counts) > 0, (index, k, counts)
            cells_per_object.append(sum(counts))
    assert len(cells_per_object) > 20 and np.mean(cells_per_object) >= 9
