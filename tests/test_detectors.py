import math

import pytest
import torch

from kd_ref.detectors import (FPN, RCNN_STDS, SUPPORTED_DETECTORS, UNIT_STDS, AnchorGenerator, assign_by_iou,
                              base_anchors, build_detector, decode_boxes, encode_boxes, flatten_levels, focal_loss,
                              l1_loss, multilevel_roi_align, nms_detections, roi_levels, sample_indices,
                              sampling_generators,
                              topk_above_threshold)

IMAGE_SIZES = [(64, 96), (56, 80)]


def _targets():
    return [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[5.0, 5.0, 60.0, 30.0], [40.0, 20.0, 78.0, 54.0]]),
             "labels": torch.tensor([0, 2])}]


@pytest.fixture(scope="module")
def retinanet():
    torch.manual_seed(0)
    return build_detector("retinanet_r18", num_classes=3)


@pytest.fixture(scope="module")
def faster_rcnn():
    torch.manual_seed(0)
    return build_detector("faster_rcnn_r18", num_classes=3)


# ---------------------------------------------------------------------------------------- anchors / boxes
def test_base_anchors_follow_mmdet_v2():
    s = math.sqrt(0.5)
    expected = torch.tensor([[-64 / s, -64 * s, 64 / s, 64 * s],
                             [-64.0, -64.0, 64.0, 64.0],
                             [-64 * s, -64 / s, 64 * s, 64 / s]])
    assert torch.allclose(base_anchors(16, [8], [0.5, 1.0, 2.0]), expected)
    retina = AnchorGenerator((8,), [4 * 2 ** (i / 3) for i in range(3)])
    cell = retina.cell_anchors[0]
    assert cell.shape == (9, 4)
    # ratio-major: rows 0..2 share ratio 0.5 with scales 4, 4*2^(1/3), 4*2^(2/3).
    assert torch.allclose(cell[1], torch.tensor([-16 * 2 ** (1 / 3) / s, -16 * 2 ** (1 / 3) * s,
                                                 16 * 2 ** (1 / 3) / s, 16 * 2 ** (1 / 3) * s]))
    assert torch.allclose(cell[4], torch.tensor([-16 * 2 ** (1 / 3)] * 2 + [16 * 2 ** (1 / 3)] * 2))


def test_anchor_grid_has_zero_centre_offset_and_row_major_order():
    generator = AnchorGenerator((8, 16), [1.0], [1.0])
    level0, level1 = generator.grid([(2, 2), (1, 1)], torch.device("cpu"))
    assert torch.equal(level0, torch.tensor([[-4.0, -4, 4, 4], [4, -4, 12, 4], [-4, 4, 4, 12], [4, 4, 12, 12]]))
    assert torch.equal(level1, torch.tensor([[-8.0, -8, 8, 8]]))


def test_valid_flags_use_the_image_padded_to_32():
    generator = AnchorGenerator((8, 16), [1.0], [1.0, 2.0])
    # A 40x70 image pads to 64x96: 8x12 valid cells at stride 8, 4x6 at stride 16.
    flags = generator.valid_flags([(10, 14), (5, 7)], (40, 70), torch.device("cpu"))
    level0 = flags[:10 * 14 * 2].view(10, 14, 2)
    level1 = flags[10 * 14 * 2:].view(5, 7, 2)
    assert level0[:8, :12].all() and not level0[8:].any() and not level0[:, 12:].any()
    assert level1[:4, :6].all() and not level1[4:].any() and not level1[:, 6:].any()


def test_box_coding_hand_values_and_round_trip():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[5.0, 5.0, 15.0, 25.0]])
    assert torch.allclose(encode_boxes(boxes, gt, UNIT_STDS), torch.tensor([[0.5, 1.0, 0.0, math.log(2)]]))
    assert torch.allclose(encode_boxes(boxes, gt, RCNN_STDS), torch.tensor([[5.0, 10.0, 0.0, math.log(2) / 0.2]]))
    torch.manual_seed(0)
    refs = torch.rand(20, 2) * 50
    refs = torch.cat([refs, refs + 1 + torch.rand(20, 2) * 40], dim=1)
    targets = torch.rand(20, 2) * 50
    targets = torch.cat([targets, targets + 1 + torch.rand(20, 2) * 40], dim=1)
    for stds in (UNIT_STDS, RCNN_STDS):
        assert torch.allclose(decode_boxes(refs, encode_boxes(refs, targets, stds), stds), targets, atol=1e-4)


def test_decode_clamps_log_ratio_and_clips_to_image():
    box = torch.tensor([[100.0, 100.0, 110.0, 110.0]])
    huge = decode_boxes(box, torch.tensor([[0.0, 0.0, 50.0, 0.0]]), UNIT_STDS)
    assert torch.allclose(huge[0, 2] - huge[0, 0], torch.tensor(10 * 1000 / 16))
    clipped = decode_boxes(box, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), UNIT_STDS, max_shape=(120, 150))
    assert torch.equal(clipped, torch.tensor([[0.0, 0.0, 150.0, 120.0]]))
    # class-specific deltas broadcast against one box per row
    per_class = decode_boxes(box[:, None], torch.zeros(1, 3, 4), RCNN_STDS)
    assert per_class.shape == (1, 3, 4) and torch.equal(per_class[0, 2], box[0])


def test_flatten_levels_matches_anchor_order():
    # channel a*K + k at (y, x) must land at row (y*W + x)*A + a, column k.
    num_anchors, num_classes, height, width = 2, 3, 2, 3
    values = torch.arange(num_anchors * num_classes * height * width, dtype=torch.float32)
    level = values.view(1, num_anchors * num_classes, height, width)
    flat = flatten_levels([level, level + 1000], num_classes)
    assert flat.shape == (1, 2 * height * width * num_anchors, num_classes)
    y, x, a, k = 1, 2, 1, 2
    assert flat[0, (y * width + x) * num_anchors + a, k] == level[0, a * num_classes + k, y, x]
    assert flat[0, height * width * num_anchors, 0] == 1000


# ---------------------------------------------------------------------------------------- assignment / losses
def test_max_iou_assigner_hand_case():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 130.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],      # IoU 1 -> gt 0
                          [0.0, 0.0, 10.0, 5.0],       # IoU 0.5 -> gt 0
                          [0.0, 0.0, 10.0, 4.5],       # IoU 0.45 -> ignored
                          [20.0, 20.0, 30.0, 30.0],    # IoU 0 -> background
                          [100.0, 100.0, 110.0, 110.0]])  # IoU 1/3: best box of gt 1 -> low-quality match
    with_lq = assign_by_iou(boxes, gts, 0.5, 0.4, 0.0, match_low_quality=True)
    without = assign_by_iou(boxes, gts, 0.5, 0.4, 0.0, match_low_quality=False)
    assert with_lq.tolist() == [1, 1, -1, 0, 2]
    assert without.tolist() == [1, 1, -1, 0, 0]
    assert assign_by_iou(boxes, gts[:0], 0.5, 0.4, 0.0, True).tolist() == [0] * 5
    # a degenerate GT (zero IoU everywhere) must not claim every box
    degenerate = torch.tensor([[50.0, 50.0, 50.0, 60.0]])
    assert assign_by_iou(boxes, degenerate, 0.5, 0.4, 0.0, True).tolist() == [0] * 5


def test_random_sampler_respects_counts():
    assigned = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    pos, neg = sample_indices(assigned, 16, 0.25)
    assert pos.numel() == 4 and neg.numel() == 12
    assert (assigned[pos] > 0).all() and (assigned[neg] == 0).all()
    pos, neg = sample_indices(torch.tensor([2, 0, 0, -1]), 16, 0.25)
    assert pos.tolist() == [0] and sorted(neg.tolist()) == [1, 2]


def test_seeded_sampler_draws_uniform_subsets_that_depend_on_the_seed_alone():
    assigned = torch.tensor([1] * 6 + [0] * 30)
    draws = [sample_indices(assigned, 8, 0.25, torch.Generator().manual_seed(seed)) for seed in (3, 3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))  # the same seed, the same subset
    assert not all(torch.equal(a, b) for a, b in zip(draws[0], draws[2]))
    # uniform over the positives (mmdet RandomSampler): each is picked with probability 2/6
    counts = torch.zeros(6)
    for seed in range(1000):
        counts[sample_indices(assigned, 8, 0.25, torch.Generator().manual_seed(seed))[0]] += 1
    assert torch.allclose(counts / 1000, torch.full((6,), 2 / 6), atol=0.05)  # 3 standard deviations
    unseeded = sampling_generators([{"boxes": torch.zeros(0, 4)}, {"sampling_seed": 5}], torch.device("cpu"))
    assert unseeded[0] is None and unseeded[1].initial_seed() == 5


def test_faster_rcnn_samples_an_image_alike_in_any_batch():
    """Seeded per image, the RPN and RoI samples of an image do not depend on the batch it is in (what
    makes N DDP processes sample as one process over the global batch)."""
    torch.manual_seed(0)
    model = build_detector("faster_rcnn_r18", num_classes=3, rcnn_rois_per_image=16).train()
    images = torch.randn(2, 3, 64, 96)
    targets = [{**target, "sampling_seed": seed} for target, seed in zip(_targets(), (11, 12))]
    sizes = [(64, 96), (64, 96)]
    pair = model(images, targets, sizes)
    torch.manual_seed(1)  # the global generator plays no part
    alone = model(images[1:], targets[1:], sizes[1:])
    # the same boxes in the same order (up to the batch's float reduction order in the convolutions)
    torch.testing.assert_close(pair["rois"][pair["rois"][:, 0] == 1, 1:], alone["rois"][:, 1:], rtol=0, atol=1e-3)
    assert torch.equal(pair["roi_labels"][pair["rois"][:, 0] == 1], alone["roi_labels"])
    reseeded = model(images[1:], [{**targets[1], "sampling_seed": 13}], sizes[1:])
    assert not torch.allclose(reseeded["rois"], alone["rois"], atol=1e-3)


def test_focal_and_l1_losses_hand_case():
    logits = torch.tensor([[0.0, 2.0]])
    targets = torch.tensor([[1.0, 0.0]])
    p = 1 / (1 + math.exp(-2.0))
    expected = 0.25 * 0.5 ** 2 * math.log(2) + 0.75 * p ** 2 * -math.log(1 - p)
    assert focal_loss(logits, targets, avg_factor=2).item() == pytest.approx(expected / 2, rel=1e-5)
    assert l1_loss(torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 1.0]]), 5).item() == pytest.approx(0.5)


def test_threshold_topk_and_nms():
    scores = torch.tensor([[0.9, 0.01], [0.8, 0.7], [0.04, 0.3]])
    kept, rows, labels = topk_above_threshold(scores, 0.05, topk=3)
    assert kept.tolist() == pytest.approx([0.9, 0.8, 0.7]) and rows.tolist() == [0, 1, 1]
    assert labels.tolist() == [0, 0, 1]
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [1.0, 0.0, 11.0, 10.0]])
    dets = nms_detections(boxes, kept, labels, iou_thr=0.5, max_dets=100)
    assert dets["scores"].tolist() == pytest.approx([0.9, 0.7])  # same-class overlap suppressed
    assert nms_detections(boxes, kept, labels, 0.5, max_dets=1)["labels"].tolist() == [0]


# ---------------------------------------------------------------------------------------- RoI extraction / FPN
def test_roi_levels_use_finest_scale_56():
    rois = torch.tensor([[0, 0, 0, 56, 56], [0, 0, 0, 112, 112], [0, 0, 0, 224, 224],
                         [0, 0, 0, 900, 900], [0, 0, 0, 20, 10], [0, 0, 0, 111, 111]], dtype=torch.float32)
    assert roi_levels(rois).tolist() == [0, 1, 2, 3, 0, 0]


def test_multilevel_roi_align_reads_the_mapped_level():
    levels = [torch.full((2, 1, 256 // s, 256 // s), float(i)) for i, s in enumerate((4, 8, 16, 32))]
    rois = torch.tensor([[0, 0, 0, 30, 30], [1, 10, 10, 122, 122], [1, 0, 0, 230, 230]], dtype=torch.float32)
    pooled = multilevel_roi_align(levels, rois, (4, 8, 16, 32))
    assert pooled.shape == (3, 1, 7, 7)
    assert [pooled[i].unique().tolist() for i in range(3)] == [[0.0], [1.0], [2.0]]


def test_fpn_levels_and_extra_levels():
    channels = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    feats = {name: torch.randn(1, c, 32 // 2 ** i, 48 // 2 ** i) for i, (name, c) in enumerate(channels.items())}
    two_stage = FPN(channels, 16, first_level=2, num_outs=5)(feats)
    assert list(two_stage) == ["p2", "p3", "p4", "p5", "p6"]
    assert torch.equal(two_stage["p6"], two_stage["p5"][..., ::2, ::2])
    retina_fpn = FPN(channels, 16, first_level=3, num_outs=5, extra="conv_on_input")
    one_stage = retina_fpn(feats)
    assert list(one_stage) == ["p3", "p4", "p5", "p6", "p7"]
    assert [tuple(x.shape[-2:]) for x in one_stage.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert torch.allclose(one_stage["p6"], retina_fpn.extra_convs[0](feats["c5"]))
    assert torch.allclose(one_stage["p7"], retina_fpn.extra_convs[1](one_stage["p6"]))  # no ReLU (mmdet)
    with pytest.raises(ValueError, match="extra"):
        FPN(channels, extra="relu")


# ---------------------------------------------------------------------------------------- detectors
def test_retinanet_training_forward(retinanet):
    retinanet.train()
    retinanet.zero_grad()
    images = torch.randn(2, 3, 64, 96)
    out = retinanet(images, _targets(), IMAGE_SIZES)
    assert set(out["losses"]) == {"loss_cls", "loss_bbox"}
    assert all(torch.isfinite(v) for v in out["losses"].values())
    assert list(out["feats"]) == ["c2", "c3", "c4", "c5", "p3", "p4", "p5", "p6", "p7"]
    assert [tuple(x.shape) for x in out["cls_logits"]] == [(2, 27, 8, 12), (2, 27, 4, 6), (2, 27, 2, 3),
                                                          (2, 27, 1, 2), (2, 27, 1, 1)]
    pos = out["pos_anchors"]
    grid = torch.cat(retinanet.anchor_generator.grid([x.shape[-2:] for x in out["cls_logits"]], "cpu"))
    assert torch.equal(pos["boxes"], grid[pos["index"]])
    assert set(pos["batch_idx"].tolist()) == {0, 1}
    assert set(pos["labels"][pos["batch_idx"] == 1].tolist()) == {0, 2}
    assert (pos["labels"][pos["batch_idx"] == 0] == 1).all()
    gathered = flatten_levels(out["cls_logits"], 3)[pos["batch_idx"], pos["index"]]
    assert gathered.shape == (pos["index"].numel(), 3)
    sum(out["losses"].values()).backward()
    assert retinanet.backbone.layer2[0].conv1.weight.grad.abs().sum() > 0
    assert retinanet.backbone.layer1[0].conv1.weight.grad is None  # frozen stage 1 (mmdet frozen_stages=1)


def test_faster_rcnn_training_forward(faster_rcnn):
    faster_rcnn.train()
    faster_rcnn.zero_grad()
    images = torch.randn(2, 3, 64, 96)
    targets = _targets()
    out = faster_rcnn(images, targets, IMAGE_SIZES)
    assert set(out["losses"]) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"}
    assert all(torch.isfinite(v) for v in out["losses"].values())
    assert list(out["feats"]) == ["c2", "c3", "c4", "c5", "p2", "p3", "p4", "p5", "p6"]
    rois, labels = out["rois"], out["roi_labels"]
    assert rois.shape[1] == 5 and labels.shape == rois.shape[:1] and out["roi_cls_logits"].shape == (len(rois), 4)
    assert out["roi_feats"].shape == (len(rois), 256, 7, 7) and out["roi_targets"].shape == (len(rois), 4)
    # the logits handed to distillers are those of the loss (one RoI-head pass): grad raises if unused
    torch.autograd.grad(out["losses"]["loss_cls"], out["roi_cls_logits"], retain_graph=True)
    assert torch.equal(out["roi_levels"], roi_levels(rois))
    for i, target in enumerate(targets):
        mine = rois[:, 0] == i
        assert mine.sum() <= 512 and (labels[mine] < 3).sum() <= 128
        for box in target["boxes"]:  # GT boxes are always among the positive RoIs
            assert (rois[mine, 1:] == box).all(dim=1).any()
    assert (out["roi_targets"][labels == 3] == 0).all()
    faster_rcnn.eval()  # roi_logits reproduces the training-path logits on the same RoIs
    assert torch.allclose(faster_rcnn.roi_logits(out["feats"], rois), out["roi_cls_logits"], atol=1e-5)
    with torch.no_grad():  # a teacher given the student's RoIs scores exactly those boxes
        teacher_view = faster_rcnn(images, image_sizes=IMAGE_SIZES, predict=False, rois=rois)
    assert "detections" not in teacher_view
    assert torch.allclose(teacher_view["roi_cls_logits"], out["roi_cls_logits"], atol=1e-5)
    assert torch.allclose(teacher_view["roi_feats"], out["roi_feats"], atol=1e-5)
    sum(out["losses"].values()).backward()
    assert faster_rcnn.backbone.layer2[0].conv1.weight.grad.abs().sum() > 0


def _check_detections(detections, num_classes):
    for dets, (height, width) in zip(detections, IMAGE_SIZES):
        boxes, scores, labels = dets["boxes"], dets["scores"], dets["labels"]
        assert len(boxes) <= 100 and (scores >= 0.05).all()
        assert ((labels >= 0) & (labels < num_classes)).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()


def test_retinanet_eval(retinanet):
    retinanet.eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        original_bias = retinanet.head.cls_out.bias.clone()
        retinanet.head.cls_out.bias.zero_()  # scores ~0.5 everywhere so the 100-detection cap is exercised
        out = retinanet(images, image_sizes=IMAGE_SIZES)
        quiet = retinanet(images, image_sizes=IMAGE_SIZES, predict=False)
        retinanet.head.cls_out.bias.copy_(original_bias)
    assert [len(d["boxes"]) for d in out["detections"]] == [100, 100]
    _check_detections(out["detections"], 3)
    assert "detections" not in quiet and len(quiet["cls_logits"]) == 5 and "losses" not in quiet


def test_faster_rcnn_eval(faster_rcnn):
    faster_rcnn.eval()
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = faster_rcnn(images, image_sizes=IMAGE_SIZES)
        quiet = faster_rcnn(images, image_sizes=IMAGE_SIZES, predict=False)
    assert len(out["detections"]) == 2 and len(out["proposals"]) == 2
    _check_detections(out["detections"], 3)
    assert all(len(p) <= 1000 for p in out["proposals"])
    assert "detections" not in quiet and "rpn_cls_logits" in quiet


def test_retinanet_overfits_one_image():
    torch.manual_seed(0)
    model = build_detector("retinanet_r18", num_classes=2).train()
    model.backbone.requires_grad_(False)  # a random, BN-frozen backbone makes full training unstable here
    image = torch.randn(1, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[12.0, 16.0, 44.0, 52.0]]), "labels": torch.tensor([1])}]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.002, momentum=0.9)
    history = []
    for _ in range(30):
        loss = sum(model(image, targets)["losses"].values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert min(history[-5:]) < 0.6 * history[0]


# ---------------------------------------------------------------------------------------- builder / inputs
def test_rcnn_rois_per_image_sets_the_training_sample():
    torch.manual_seed(0)
    small = build_detector("faster_rcnn_r18", num_classes=3, rcnn_rois_per_image=16).train()
    rois = small(torch.randn(2, 3, 64, 96), _targets(), IMAGE_SIZES)["rois"]
    assert [(rois[:, 0] == i).sum().item() for i in range(2)] == [16, 16]  # 2000 proposals: always enough
    assert isinstance(build_detector("retinanet_r18", 3, rcnn_rois_per_image=16), torch.nn.Module)  # ignored


def test_build_detector_rejects_unknown_names_and_bad_classes():
    with pytest.raises(ValueError, match="supported: .*faster_rcnn_r50"):
        build_detector("yolo_r50", 80)
    with pytest.raises(ValueError, match="num_classes"):
        build_detector("retinanet_r18", 0)
    assert "retinanet_r101" in SUPPORTED_DETECTORS and "faster_rcnn_r34" in SUPPORTED_DETECTORS


@pytest.mark.parametrize("name, total, trainable", [("retinanet_r50", 37_968_692, 37_743_348),
                                                    ("faster_rcnn_r50", 41_753_056, 41_527_712)])
def test_parameter_counts_match_mmdet(name, total, trainable):
    # mmdet reports 37.74M / 41.53M: trainable parameters only (stem + layer1 frozen).
    model = build_detector(name, 80)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def test_bad_inputs_raise(retinanet):
    retinanet.train()
    images = torch.randn(2, 3, 64, 96)
    with pytest.raises(ValueError, match="targets must have one dict per image"):
        retinanet(images, _targets()[:1])
    bad = _targets()
    bad[0]["labels"] = torch.tensor([5])
    with pytest.raises(ValueError, match=r"labels'\] must lie in \[0, 3\)"):
        retinanet(images, bad)
    with pytest.raises(ValueError, match="image_sizes"):
        retinanet(images, _targets(), [(64, 96)])
