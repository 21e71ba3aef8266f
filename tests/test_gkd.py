import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd_ref import gkd
from kd_ref.gkd import (GKDDistiller, build_prototypes, density_candidates, generate_prototypes,
                        global_alignment_loss, instance_mask, local_feature_loss, map_boxes_to_levels,
                        pool_box_features, pool_instance_features, prototype_similarity, robust_weights,
                        soft_label_loss)

DATA = Path(__file__).parent / "data" / "gkd"
CASES = {c["name"]: c for c in json.loads((DATA / "cases.json").read_text())["cases"]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _load(name):
    return torch.load(DATA / CASES[name]["file"])


def _close(actual, expected, case):
    torch.testing.assert_close(actual, expected, atol=case["atol"], rtol=case["rtol"])


# ---------------------------------------------------------------------------------- golden cases

def test_every_golden_case_is_exercised():
    assert set(CASES) == {"pgm_case1", "pgm_case2", "rdm_level", "local_level", "soft_label",
                          "distiller_two_stage"}


@pytest.mark.parametrize("name", ["pgm_case1", "pgm_case2"])
def test_golden_prototype_generation(name):
    case, blob = CASES[name], _load(name)
    protos_s, protos_t, index = generate_prototypes(blob["feats_s"], blob["feats_t"], **case["kwargs"])
    assert torch.equal(index, blob["expected_index"])
    _close(protos_s, blob["expected_protos_s"], case)
    _close(protos_t, blob["expected_protos_t"], case)
    candidates = density_candidates(blob["feats_s"], blob["feats_t"], **case["also"]["kwargs"])
    assert torch.equal(candidates, blob["expected_candidates"])


def test_golden_pgm_case1_repeats_picks():
    index = _load("pgm_case1")["expected_index"]
    assert index.unique().numel() < index.numel()


def test_golden_rdm_level():
    case, blob = CASES["rdm_level"], _load("rdm_level")
    _close(pool_box_features(blob["feat_s"], blob["boxes"], blob["batch_idx"], stride=8),
           blob["expected_pooled_s"], case)
    _close(pool_box_features(blob["feat_t"], blob["boxes"], blob["batch_idx"], stride=8),
           blob["expected_pooled_t"], case)
    weights = robust_weights(blob["expected_pooled_s"], blob["expected_pooled_t"], blob["labels"],
                             blob["protos_s"], blob["protos_t"], blob["cls_start"])
    _close(weights, blob["expected_weights"], case)
    _close(global_alignment_loss(blob["expected_pooled_s"], blob["expected_pooled_t"], blob["protos_s"],
                                 blob["protos_t"], blob["expected_weights"]), blob["expected_global"], case)


def _masks(boxes, weights, batch_idx, keep):
    return torch.stack([instance_mask(boxes[(batch_idx == b) & keep],
                                      None if weights is None else weights[(batch_idx == b) & keep],
                                      (32, 32), 16) for b in range(2)])


def test_golden_local_level():
    case, blob = CASES["local_level"], _load("local_level")
    levels = map_boxes_to_levels(blob["boxes"], num_levels=3, finest_scale=56.0)
    assert torch.equal(levels, blob["expected_levels"])
    weighted = _masks(blob["boxes"], blob["weights"], blob["batch_idx"], levels == 1)
    binary = _masks(blob["boxes"], None, blob["batch_idx"], levels == 1)
    everything = _masks(blob["boxes_all"], blob["weights_all"], blob["batch_idx"],
                        torch.ones(6, dtype=torch.bool))
    _close(weighted, blob["expected_mask_weighted"], case)
    _close(binary, blob["expected_mask_binary"], case)
    _close(everything, blob["expected_mask_all"], case)
    for kind in ("weighted", "binary"):
        fg, bg = local_feature_loss(blob["feat_s_adapt"], blob["feat_t"], blob[f"expected_mask_{kind}"],
                                    fg_weight=1.0, bg_weight=4.0)
        _close(fg, blob[f"expected_fg_{kind}"], case)
        _close(bg, blob[f"expected_bg_{kind}"], case)


def test_golden_soft_label():
    case, blob = CASES["soft_label"], _load("soft_label")
    _close(soft_label_loss(blob["logits_s"], blob["logits_t"], temperature=2.0, weights=blob["weights"]),
           blob["expected_weighted"], case)
    _close(soft_label_loss(blob["logits_s"], blob["logits_t"], temperature=2.0, weights=None),
           blob["expected_unweighted"], case)


def _golden_distiller(blob, **override):
    kwargs = {**CASES["distiller_two_stage"]["construct"]["kwargs"], **override}
    distiller = GKDDistiller(**kwargs)
    distiller.load_state_dict(blob["adapter_state"], strict=False)
    distiller.set_prototypes(blob["protos_s"], blob["protos_t"], blob["cls_start"])
    return distiller


def _golden_call(distiller, blob, **extra):
    roi = {k: blob[k] for k in ("roi_logits_s", "roi_logits_t", "roi_feats_s", "roi_feats_t", "roi_levels",
                                "roi_labels")}
    return distiller(blob["feats_s"], blob["feats_t"], blob["inst_boxes"], blob["inst_labels"], **roi,
                     **{"epoch": 3, "max_epochs": 24, **extra})


def test_golden_distiller_two_stage_and_global_variant():
    case, blob = CASES["distiller_two_stage"], _load("distiller_two_stage")
    losses = _golden_call(_golden_distiller(blob), blob)
    for key, value in blob["expected"].items():
        _close(losses[key], value, case)
    assert float(losses["loss_gkd_global"]) == 0.0
    variant = _golden_call(_golden_distiller(blob, global_weight=5.0), blob)
    _close(variant["loss_gkd_global"], blob["expected_global_w5"], case)
    for key, value in blob["expected"].items():
        _close(variant[key], value, case)


# ------------------------------------------------------------------------------------ PGM properties

def test_prototypes_are_raw_rows_with_exact_count_and_depend_on_directions_only():
    feats_s, feats_t = torch.randn(30, 6), torch.randn(30, 5)
    protos_s, protos_t, index = generate_prototypes(feats_s, feats_t, num_prototypes=7)
    assert index.shape == (7,) and torch.equal(protos_s, feats_s[index]) and torch.equal(protos_t, feats_t[index])
    scale = torch.rand(30, 1) + 0.5
    assert torch.equal(generate_prototypes(feats_s * scale, feats_t * 3.0, num_prototypes=7)[2], index)
    assert set(index.tolist()) <= set(density_candidates(feats_s, feats_t).tolist())


def test_density_candidates_need_strictly_higher_density_in_both_spaces():
    # Three near-identical rows form a dense cluster; the two others are isolated.
    base = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [1.0, 0.0, 0.01], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert density_candidates(base, base, quantile=0.2).tolist() == [0, 1, 2]    # threshold: 2nd lowest
    teacher = base.clone()
    teacher[2] = torch.tensor([0.0, -1.0, 0.0])       # row 2 isolated for the teacher only
    assert density_candidates(base, teacher, quantile=0.2).tolist() == [0, 1]
    assert density_candidates(base, base, quantile=0.4).tolist() == [0]   # rows 1, 2 tie the threshold
    assert density_candidates(torch.ones(4, 3), torch.ones(4, 3)).numel() == 0  # equal densities: none


def test_prototype_generation_returns_empty_for_too_few_instances_or_no_candidate():
    for feats in (torch.randn(1, 4), torch.ones(5, 4)):
        protos_s, protos_t, index = generate_prototypes(feats, feats)
        assert protos_s.shape == (0, 4) and protos_t.shape == (0, 4) and index.numel() == 0


def _class_feats(num_levels, counts, channels):
    return [None if n == 0 else [torch.randn(n, channels) for _ in range(num_levels)] for n in counts]


def test_build_prototypes_concatenates_classes_and_falls_back_to_previous_epoch():
    feats_s, feats_t = _class_feats(2, [20, 15, 12], 6), _class_feats(2, [20, 15, 12], 5)
    protos_s, protos_t, cls_start = build_prototypes(feats_s, feats_t, num_prototypes=4, alpha=10.0)
    assert [p.shape for p in protos_s] == [(12, 6)] * 2 and [p.shape for p in protos_t] == [(12, 5)] * 2
    assert all(s.tolist() == [0, 4, 8, 12] for s in cls_start)
    assert torch.equal(protos_s[1][4:8], generate_prototypes(feats_s[1][1], feats_t[1][1], 4, 10.0)[0])

    missing_s, missing_t = list(feats_s), list(feats_t)
    missing_s[1] = missing_t[1] = None
    fallback = build_prototypes(missing_s, missing_t, 4, prev=(protos_s, protos_t, cls_start))
    assert torch.equal(fallback[0][0][4:8], protos_s[0][4:8]) and fallback[2][0].tolist() == [0, 4, 8, 12]
    dropped = build_prototypes(missing_s, missing_t, 4)
    assert dropped[2][0].tolist() == [0, 4, 4, 8] and dropped[0][0].shape == (8, 6)


def test_pool_instance_features_uses_inclusive_scaled_corners():
    feat = torch.arange(64.0).reshape(1, 1, 8, 8)
    pooled = pool_instance_features([feat], torch.tensor([[8.0, 0.0, 23.0, 15.0]]), image_size=(32, 32))
    # scale 8/32 -> corners (2, 0, 5, 3) -> rows 0..3, cols 2..5 inclusive
    assert pooled[0].item() == pytest.approx(feat[0, 0, 0:4, 2:6].mean().item())


# ------------------------------------------------------------------------------------ RDM properties

def test_pool_box_features_crop_rule_clamp_and_gradient():
    feat = torch.arange(2 * 16.0).reshape(2, 1, 4, 4).requires_grad_(True)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 0.0], [40.0, 40.0, 50.0, 50.0], [-4.0, 9.0, 15.0, 15.0]])
    pooled = pool_box_features(feat, boxes, torch.tensor([0, 1, 1]), stride=8)
    assert pooled[0].item() == pytest.approx(feat[0, 0, 0:1, 0:2].mean().item())   # end is +1
    assert pooled[1].item() == feat[1, 0, 3, 3].item()                               # start clamped
    assert pooled[2].item() == pytest.approx(feat[1, 0, 1:2, 0:2].mean().item())    # |x1| used
    pooled.sum().backward()
    assert feat.grad.abs().sum() > 0


def _pooled_box_by_box(feat, boxes, batch_idx, stride):
    # the crop rule sliced one box at a time (the implementation before the batched roi_align)
    height, width = feat.shape[-2:]
    rows = []
    for (x1, y1, x2, y2), b in zip((boxes.abs().float() / stride).tolist(), batch_idx.tolist()):
        top, left = min(int(y1), height - 1), min(int(x1), width - 1)
        rows.append(feat[b, :, top:int(y2) + 1, left:int(x2) + 1].mean(dim=(1, 2)))
    return torch.stack(rows)


def test_batched_box_pooling_equals_box_by_box_slices_in_values_and_gradients():
    generator = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 5, 13, 17, generator=generator, requires_grad=True)
    corner = torch.rand(40, 2, generator=generator) * torch.tensor([17 * 8.0, 13 * 8.0])
    boxes = torch.cat([corner, corner + torch.rand(40, 2, generator=generator) * 60], dim=1)
    boxes[::7, :2] *= -1                                         # |x1| and starts beyond the map included
    batch_idx = torch.randint(0, 2, (40,), generator=generator)
    batched = pool_box_features(feat, boxes, batch_idx, stride=8)
    grad_batched, = torch.autograd.grad((batched ** 2).sum(), feat)
    sliced = _pooled_box_by_box(feat, boxes, batch_idx, stride=8)
    grad_sliced, = torch.autograd.grad((sliced ** 2).sum(), feat)
    torch.testing.assert_close(batched, sliced, rtol=1e-6, atol=1e-6)     # equal up to summation order
    torch.testing.assert_close(grad_batched, grad_sliced, rtol=1e-6, atol=1e-6)
    on_level = batch_idx == 1
    kept = pool_box_features(feat, boxes, batch_idx, stride=8, keep=on_level)
    torch.testing.assert_close(kept[on_level], sliced[on_level], rtol=1e-6, atol=1e-6)
    assert torch.equal(kept[~on_level], torch.zeros_like(kept[~on_level]))
    inclusive = pool_instance_features([feat[:1]], boxes[:10].abs(), image_size=(13 * 8, 17 * 8))[0]
    corners = (boxes[:10].abs() / 8).long().tolist()
    torch.testing.assert_close(inclusive, torch.stack([feat[0, :, y1:y2 + 1, x1:x2 + 1].mean(dim=(1, 2))
                                                       for x1, y1, x2, y2 in corners]), rtol=1e-6, atol=1e-6)


def _mask_box_by_box(boxes, weights, size, stride):
    # the sequential rule of instance_mask, box after box on the host (the implementation before the batched one)
    height, width = size
    mask = torch.zeros(height, width, dtype=torch.float64)
    box_weights = [1.0] * boxes.shape[0] if weights is None else weights.double().tolist()
    for (x1, y1, x2, y2), weight in zip((boxes.float() / stride).tolist(), box_weights):
        left, right, top, bottom = max(int(x1), 0), min(int(x2), width), max(int(y1), 0), min(int(y2), height)
        if left == right or top == bottom:
            cell = min(top, height - 1), min(left, width - 1)
            mask[cell] = mask[cell] + 1 if weights is None else max(float(mask[cell]), weight)
        elif weights is None:
            mask[top:bottom, left:right] += 1
        else:
            mask[top:bottom, left:right] = weight
    return ((mask > 0).double() if weights is None else mask).float()


def test_instance_masks_of_a_batch_equal_the_box_by_box_rule_with_boxes_left_out():
    generator = torch.Generator().manual_seed(4)
    corner = torch.rand(30, 2, generator=generator) * 120
    boxes = torch.cat([corner, corner + torch.rand(30, 2, generator=generator) * 50], dim=1)
    boxes[::4, 2] = boxes[::4, 0] + 3                            # thinner than a cell: the max rule
    weights = torch.rand(30, generator=generator) * 2 - 1        # robust weights lie in [-1, 1]
    batch_idx = torch.randint(0, 3, (30,), generator=generator)
    keep = torch.rand(30, generator=generator) > 0.3
    for box_weights in (weights, None):
        batched = gkd.instance_masks(boxes, box_weights, batch_idx, 3, (9, 11), stride=16, keep=keep)
        for image in range(3):
            rows = keep & (batch_idx == image)
            expected = _mask_box_by_box(boxes[rows], None if box_weights is None else box_weights[rows], (9, 11), 16)
            assert torch.equal(batched[image], expected)


def test_map_boxes_to_levels_hand_values():
    boxes = torch.tensor([[0.0, 0.0, 55.0, 55.0], [0.0, 0.0, 111.0, 111.0], [0.0, 0.0, 110.0, 110.0],
                          [0.0, 0.0, 1000.0, 1000.0], [0.0, 0.0, 2.0, 2.0]])
    assert map_boxes_to_levels(boxes, num_levels=3).tolist() == [0, 1, 0, 2, 0]


def test_robust_weights_in_unit_interval_detached_and_one_without_prototypes():
    pooled_s = torch.randn(9, 5, requires_grad=True)
    pooled_t = torch.randn(9, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    protos_s, protos_t = torch.randn(5, 5), torch.randn(5, 4)
    cls_start = torch.tensor([0, 2, 5, 5])                       # class 2 has no prototypes
    weights = robust_weights(pooled_s, pooled_t, labels, protos_s, protos_t, cls_start)
    assert not weights.requires_grad and weights.grad_fn is None
    assert ((weights >= 0) & (weights <= 1)).all()
    assert torch.equal(weights[labels == 2], torch.ones(3))
    n = 0
    expected = 1 - (prototype_similarity(pooled_s, protos_s)[n, 0:2].max()
                    - prototype_similarity(pooled_t, protos_t)[n, 0:2].max()).abs()
    assert weights[n].item() == pytest.approx(expected.item(), abs=1e-6)
    same = torch.randn(3, 4)
    assert torch.allclose(robust_weights(same, same, torch.tensor([0, 0, 1]), protos_t, protos_t,
                                         torch.tensor([0, 3, 5])), torch.ones(3))


def test_global_alignment_loss_zero_cases_and_student_only_gradient():
    pooled_s, pooled_t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    protos = torch.randn(6, 3)
    loss = global_alignment_loss(pooled_s, pooled_t, protos, protos, torch.rand(4))
    loss.backward()
    assert pooled_s.grad is not None and pooled_t.grad is None
    assert global_alignment_loss(pooled_t, pooled_t, protos, protos, torch.rand(4)).item() == 0.0
    assert global_alignment_loss(torch.zeros(0, 3), torch.zeros(0, 3), protos, protos, torch.zeros(0)).item() == 0


def test_instance_mask_overwrite_max_rule_and_binary():
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 16.0, 48.0, 48.0],
                          [40.0, 0.0, 47.0, 20.0], [24.0, 24.0, 31.0, 40.0]])   # last two: one cell wide
    weights = torch.tensor([0.5, 0.8, 0.3, 0.3])
    mask = instance_mask(boxes, weights, (4, 4), stride=16)
    expected = torch.zeros(4, 4)
    expected[0:2, 0:2] = 0.5
    expected[1:3, 1:3] = 0.8                 # the later box overwrites
    expected[0, 2] = 0.3                     # max(0, 0.3); cell (1, 1) keeps max(0.8, 0.3)
    assert torch.equal(mask, expected) and mask.dtype == torch.float32
    assert torch.equal(instance_mask(boxes, None, (4, 4), stride=16), (expected > 0).float())


def test_local_feature_loss_hand_values_and_gradient():
    student = torch.zeros(1, 2, 2, 2, requires_grad=True)
    teacher = torch.ones(1, 2, 2, 2, requires_grad=True)
    mask = torch.tensor([[[0.5, 0.0], [0.0, 0.0]]])
    fg, bg = local_feature_loss(student, teacher, mask, fg_weight=1.0, bg_weight=4.0)
    assert fg.item() == pytest.approx(2 * 0.5 / max(1, 2 * 2 * 0.5))
    assert bg.item() == pytest.approx(2 * 3 / (2 * 2 * 3) * 4)
    (fg + bg).backward()
    assert student.grad is not None and teacher.grad is None


def test_soft_label_loss_means_over_classes_and_handles_empty():
    logits_s, logits_t = torch.randn(5, 7), torch.randn(5, 7)
    per_row = F.kl_div(F.log_softmax(logits_s / 3, 1), F.softmax(logits_t / 3, 1), reduction="none").sum(1) / 7 * 9
    assert soft_label_loss(logits_s, logits_t, 3.0).item() == pytest.approx(per_row.mean().item(), rel=1e-6)
    weights = torch.rand(5)
    assert soft_label_loss(logits_s, logits_t, 3.0, weights).item() == pytest.approx(
        (per_row * weights).mean().item(), rel=1e-6)
    assert soft_label_loss(logits_s, logits_s, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    assert soft_label_loss(torch.zeros(0, 7), torch.zeros(0, 7)).item() == 0.0


# -------------------------------------------------------------------------------------- distiller

def test_adapter_parameters_and_state_dict_keys():
    distiller = GKDDistiller()
    assert sum(p.numel() for p in distiller.parameters()) == 2_950_400
    assert set(distiller.state_dict()) == {f"adapters.{i}.{p}" for i in range(5) for p in ("weight", "bias")}


def _tiny_inputs(channels=4, teacher_grad=False):
    feats_s = [torch.randn(2, channels, 16, 16, requires_grad=True), torch.randn(2, channels, 8, 8, requires_grad=True)]
    feats_t = [torch.randn(2, channels, 16, 16, requires_grad=teacher_grad),
               torch.randn(2, channels, 8, 8, requires_grad=teacher_grad)]
    # levels (finest_scale 56, +1 rule): 0, 1 in image 0; 0 in image 1
    boxes = [torch.tensor([[0.0, 0.0, 60.0, 60.0], [0.0, 0.0, 127.0, 127.0]]), torch.tensor([[30.0, 30.0, 90.0, 70.0]])]
    labels = [torch.tensor([0, 1]), torch.tensor([1])]
    roi = dict(roi_logits_s=torch.randn(3, 3, requires_grad=True), roi_logits_t=torch.randn(3, 3, requires_grad=teacher_grad),
               roi_feats_s=torch.randn(3, channels, 7, 7, requires_grad=True),
               roi_feats_t=torch.randn(3, channels, 7, 7, requires_grad=teacher_grad),
               roi_levels=torch.tensor([0, 1, 1]), roi_labels=torch.tensor([1, 0, 1]))
    return feats_s, feats_t, boxes, labels, roi


def _tiny_prototypes(channels=4, per_class=(2, 3)):
    total = sum(per_class)
    start = torch.tensor([0, per_class[0], total])
    return [torch.randn(total, channels) for _ in range(2)], [torch.randn(total, channels) for _ in range(2)], [start, start]


def _tiny_distiller(**kwargs):
    return GKDDistiller(channels_s=4, channels_t=4, num_levels=2, strides=(8, 16), **kwargs)


def test_no_gradient_reaches_the_teacher_and_student_gets_all_terms():
    distiller = _tiny_distiller(global_weight=5.0)
    distiller.set_prototypes(*_tiny_prototypes())
    feats_s, feats_t, boxes, labels, roi = _tiny_inputs(teacher_grad=True)
    losses = distiller(feats_s, feats_t, boxes, labels, **roi, epoch=1, max_epochs=4)
    assert set(losses) == {"loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft", "loss_gkd_global"}
    sum(losses.values()).backward()
    assert all(t.grad is None for t in feats_t) and roi["roi_logits_t"].grad is None
    assert roi["roi_feats_t"].grad is None and roi["roi_feats_s"].grad is None   # weights are detached
    assert all(s.grad is not None for s in feats_s) and roi["roi_logits_s"].grad is not None
    assert all(a.weight.grad is not None for a in distiller.adapters)


def test_attenuation_reduction_and_no_prototype_path():
    feats_s, feats_t, boxes, labels, roi = _tiny_inputs()
    distiller = _tiny_distiller(global_weight=5.0)
    plain = distiller(feats_s, feats_t, boxes, labels, **roi)
    assert float(plain["loss_gkd_global"]) == 0.0
    assert plain["loss_gkd_soft"].item() == pytest.approx(soft_label_loss(roi["roi_logits_s"], roi["roi_logits_t"]).item())
    mask = torch.stack([instance_mask(boxes[0][:1], None, (16, 16), 8), instance_mask(boxes[1], None, (16, 16), 8)])
    fg0, bg0 = local_feature_loss(distiller.adapters[0](feats_s[0]), feats_t[0], mask, 1.0, 4.0)
    mask = torch.stack([instance_mask(boxes[0][1:], None, (8, 8), 16), torch.zeros(8, 8)])
    fg1, bg1 = local_feature_loss(distiller.adapters[1](feats_s[1]), feats_t[1], mask, 1.0, 4.0)
    assert plain["loss_gkd_fg"].item() == pytest.approx((fg0 + fg1).item() / 2, rel=1e-5)
    assert plain["loss_gkd_bg"].item() == pytest.approx((bg0 + bg1).item() / 2, rel=1e-5)

    distiller.set_prototypes(*_tiny_prototypes())
    full = distiller(feats_s, feats_t, boxes, labels, **roi, epoch=0, max_epochs=4)
    half = distiller(feats_s, feats_t, boxes, labels, **roi, epoch=2, max_epochs=4)
    for key in ("loss_gkd_fg", "loss_gkd_bg", "loss_gkd_global"):
        assert half[key].item() == pytest.approx(full[key].item() / 2, rel=1e-6)
    assert half["loss_gkd_soft"].item() == full["loss_gkd_soft"].item()
    summed = _tiny_distiller(global_weight=5.0, level_reduction="sum")
    summed.load_state_dict(distiller.state_dict())
    total = summed(feats_s, feats_t, boxes, labels, **roi)
    assert total["loss_gkd_fg"].item() == pytest.approx(2 * full["loss_gkd_fg"].item(), rel=1e-6)
    assert total["loss_gkd_global"].item() == pytest.approx(full["loss_gkd_global"].item(), rel=1e-6)
    without_rois = distiller(feats_s, feats_t, boxes, labels)
    assert float(without_rois["loss_gkd_soft"]) == 0.0


def test_prototypes_survive_state_dict_round_trip_even_when_sizes_change():
    feats_s, feats_t, boxes, labels, roi = _tiny_inputs()
    trained = _tiny_distiller(global_weight=5.0)
    trained.set_prototypes(*_tiny_prototypes(per_class=(2, 3)))
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    resumed = _tiny_distiller(global_weight=5.0)
    resumed.set_prototypes(*_tiny_prototypes(per_class=(4, 4)))       # a different size before loading
    resumed.load_state_dict(torch.load(buffer))                         # strict
    for part_resumed, part_trained in zip(resumed.prototypes, trained.prototypes):
        assert all(torch.equal(a, b) for a, b in zip(part_resumed, part_trained))
    expected = trained(feats_s, feats_t, boxes, labels, **roi)
    fresh = _tiny_distiller(global_weight=5.0)
    fresh.load_state_dict(trained.state_dict())
    for got in (resumed(feats_s, feats_t, boxes, labels, **roi), fresh(feats_s, feats_t, boxes, labels, **roi)):
        for key, value in expected.items():
            assert torch.equal(got[key], value)
    adapters_only = {k: v for k, v in trained.state_dict().items() if k.startswith("adapters.")}
    fresh.load_state_dict(adapters_only)                                 # keeps its prototypes
    assert fresh.prototypes is not None


def test_clear_errors_on_bad_inputs():
    feats_s, feats_t, boxes, labels, roi = _tiny_inputs()
    distiller = _tiny_distiller()
    with pytest.raises(ValueError, match="must list 2 FPN levels"):
        distiller(feats_s[:1], feats_t[:1], boxes, labels)
    with pytest.raises(ValueError, match=r"feats_t\[0\] must be"):
        distiller(feats_s, [feats_t[0][:, :3], feats_t[1]], boxes, labels)
    with pytest.raises(ValueError, match=r"inst_boxes\[0\] must be a \(N, 4\)"):
        distiller(feats_s, feats_t, [boxes[0][:, :3], boxes[1]], labels)
    with pytest.raises(ValueError, match=r"inst_labels\[1\] must be"):
        distiller(feats_s, feats_t, boxes, [labels[0], torch.tensor([0, 1])])
    with pytest.raises(ValueError, match="one entry per image"):
        distiller(feats_s, feats_t, boxes[:1], labels[:1])
    with pytest.raises(ValueError, match="max_epochs"):
        distiller(feats_s, feats_t, boxes, labels, max_epochs=0)
    with pytest.raises(ValueError, match=r"protos_s\[0\] must have 4 columns"):
        distiller.set_prototypes([torch.randn(5, 3)] * 2, [torch.randn(5, 4)] * 2, [torch.tensor([0, 2, 5])] * 2)
    with pytest.raises(ValueError, match=r"cls_start\[0\] must rise from 0"):
        distiller.set_prototypes([torch.randn(5, 4)] * 2, [torch.randn(5, 4)] * 2, [torch.tensor([0, 2, 4])] * 2)
    distiller.set_prototypes(*_tiny_prototypes())
    with pytest.raises(ValueError, match="roi_feats_s, roi_feats_t, roi_levels and roi_labels"):
        distiller(feats_s, feats_t, boxes, labels, roi_logits_s=roi["roi_logits_s"], roi_logits_t=roi["roi_logits_t"])
    with pytest.raises(ValueError, match="labels must lie in"):
        robust_weights(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 2]), torch.randn(5, 4),
                       torch.randn(5, 4), torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="level_reduction"):
        _tiny_distiller(level_reduction="max")
    with pytest.raises(ValueError, match="feats_t must have 3 rows"):
        generate_prototypes(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="mask must be"):
        local_feature_loss(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), torch.zeros(4, 4))
    assert gkd.__doc__ and "2210.09022" in gkd.__doc__
