import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd_ref.sokd import (
    OP_RANGES, SUB_POLICIES, AreaDetection, AugmentPolicy, FeatureAdapter, SoKDDistiller,
    apply_feature_op, decode_regions, local_maximum, masked_feature_mse, region_masks,
    relaxed_bernoulli_sample, relaxed_categorical_sample,
)
from model_helpers import force_sub_policy

DATA = Path(__file__).parent / "data" / "sokd"
CASES = {case["name"]: case for case in json.loads((DATA / "cases.json").read_text())["cases"]}


# ------------------------------------------------------------------------------------ golden cases
@pytest.mark.parametrize("name", ["dam_regions_a", "dam_regions_b"])
def test_golden_dam_regions(name):
    case = CASES[name]
    data = torch.load(DATA / case["file"])
    checks = {check["function"].rsplit(".", 1)[1]: check for check in case["checks"]}

    kernel = checks["local_maximum"]["kwargs"]["kernel"]
    torch.testing.assert_close(local_maximum(data["heatmap"], kernel=kernel), data["local_max"], rtol=0, atol=0)

    boxes, scores = decode_regions(data["heatmap"], data["wh"], data["offset"], **checks["decode_regions"]["kwargs"])
    assert boxes.dtype == torch.int64 and torch.equal(boxes, data["boxes"])
    torch.testing.assert_close(scores, data["scores"], rtol=0, atol=1e-7)

    masks = region_masks(data["boxes"], **checks["region_masks"]["kwargs"])
    assert masks.dtype == torch.float32
    torch.testing.assert_close(masks, data["masks"], rtol=0, atol=0)

    loss = masked_feature_mse(data["f_s"], data["f_t"], data["masks"])
    torch.testing.assert_close(loss, data["loss"], rtol=1e-5, atol=1e-7)


def test_golden_feature_affine_ops():
    case = CASES["feature_affine_ops"]
    data = torch.load(DATA / case["file"])
    for check in case["checks"]:
        out = apply_feature_op(data["feat"], **check["kwargs"])
        torch.testing.assert_close(out, data[check["expected"]], **case["tolerance"])


# --------------------------------------------------------------------------------------- feature ops
def test_sub_policies_are_all_36_pairs_in_table_order():
    ops = list(OP_RANGES)
    assert len(ops) == 9 and len(SUB_POLICIES) == 36 and len(set(SUB_POLICIES)) == 36
    assert SUB_POLICIES[0] == ("ShearX", "ShearY") and SUB_POLICIES[-1] == ("ChannelShuffle", "ChannelDrop")
    assert all(ops.index(a) < ops.index(b) for a, b in SUB_POLICIES)


def test_translate_shifts_by_the_fraction_v_of_the_map():
    feat = torch.randn(1, 2, 5, 10)
    v = 0.2                                              # 2 of 10 columns / 1 of 5 rows
    level = (v + 0.45) / 0.9
    shifted_x = apply_feature_op(feat, "TranslateX", level)
    torch.testing.assert_close(shifted_x[..., :-2], feat[..., 2:], rtol=1e-4, atol=1e-5)
    assert shifted_x[..., -2:].abs().max() < 1e-5        # zero padding enters from the border
    shifted_y = apply_feature_op(feat, "TranslateY", level)
    torch.testing.assert_close(shifted_y[:, :, :-1], feat[:, :, 1:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(apply_feature_op(feat, "TranslateX", 0.5), feat)   # v = 0


def test_random_ops_statistics_and_batch_sharing():
    gen = torch.Generator().manual_seed(0)
    feat = torch.ones(4, 400, 20, 20)
    noise = apply_feature_op(feat, "Noise", 0.5, generator=gen) - feat        # v = 0.05
    assert noise.mean().abs() < 2e-3 and abs(noise.std().item() - 0.05) < 1e-3

    dropped = apply_feature_op(feat, "ChannelDrop", 0.8, generator=gen)       # v = 0.4, no rescaling
    kept = dropped[0, :, 0, 0]
    assert set(dropped.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(dropped, kept.view(1, -1, 1, 1).expand_as(dropped))     # one mask for the batch
    assert abs((1 - kept.mean()).item() - 0.4) < 4 * math.sqrt(0.24 / 400)

    ramp = torch.arange(6.0).view(1, 6, 1, 1).expand(3, 6, 2, 2)
    shuffled = apply_feature_op(ramp, "ChannelShuffle", 0.3, generator=gen)
    order = shuffled[0, :, 0, 0]
    assert sorted(order.tolist()) == list(range(6)) and torch.equal(shuffled, order.view(1, 6, 1, 1).expand(3, 6, 2, 2))

    cut = apply_feature_op(torch.ones(2, 3, 20, 30), "Cutout", 1.0, generator=gen)   # v = 0.2: 4 x 6 box
    hole = cut[0, 0] == 0
    rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
    assert len(rows) <= 4 and len(cols) <= 6 and hole.sum() == len(rows) * len(cols)
    assert torch.equal(cut, cut[:1, :1].expand_as(cut))                       # same box everywhere


def test_ops_are_pure_and_reproducible_with_a_generator():
    feat = torch.randn(2, 3, 6, 7)
    copy = feat.clone()
    for name in OP_RANGES:
        a = apply_feature_op(feat, name, 0.75, generator=torch.Generator().manual_seed(3))
        b = apply_feature_op(feat, name, torch.tensor(0.75), generator=torch.Generator().manual_seed(3))
        assert a.shape == feat.shape and torch.equal(a, b), name
    assert torch.equal(feat, copy)


def test_feature_op_errors_are_clear():
    feat = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="name must be one of"):
        apply_feature_op(feat, "Solarize", 0.5)
    with pytest.raises(ValueError, match=r"level must be in \[0, 1\]"):
        apply_feature_op(feat, "Rotate", 1.5)
    with pytest.raises(ValueError, match="0-dim"):
        apply_feature_op(feat, "Rotate", torch.tensor([0.5]))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        apply_feature_op(feat[0], "Noise", 0.5)


# -------------------------------------------------------------------------------- policy sampling
def _policy_with(prob, weights, sub_policies=SUB_POLICIES):
    policy = AugmentPolicy(sub_policies=sub_policies)
    with torch.no_grad():
        policy.prob.copy_(prob)
        policy.op_weights.copy_(weights)
    return policy


def test_op_firing_rates_match_probabilities():
    gen = torch.Generator().manual_seed(0)
    prob = torch.rand(36, 2, generator=gen) * 0.9 + 0.05
    policy = _policy_with(prob, torch.zeros(36))
    n = 3000
    fired = torch.zeros(36, 2)
    for _ in range(n):
        policy.sample(gen)
        fired += policy.op_switches
    tolerance = 4.5 * torch.sqrt(prob * (1 - prob) / n)
    assert ((fired / n - prob).abs() <= tolerance).all()


def test_sub_policy_frequencies_match_softmax_of_op_weights():
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(36, generator=gen)
    policy = _policy_with(torch.full((36, 2), 0.5), weights)
    n = 4000
    counts = torch.zeros(36)
    for _ in range(n):
        policy.sample(gen)
        counts[policy.sub_policy_index] += 1
    p = torch.softmax(weights, 0)
    assert ((counts / n - p).abs() <= 4.5 * torch.sqrt(p * (1 - p) / n) + 1e-3).all()


def test_conditional_relaxations_agree_with_the_discrete_sample():
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        logits = torch.randn(36, 2, generator=gen) * 3
        u, v = torch.rand(2, 36, 2, generator=gen).clamp(1e-6, 1)
        b, relaxed, relaxed_tilde = relaxed_bernoulli_sample(logits, u, v, 0.5)
        assert torch.equal(relaxed > 0.5, b.bool()) and torch.equal(relaxed_tilde > 0.5, b.bool())

        log_probs = F.log_softmax(torch.randn(36, generator=gen), 0)
        u, v = torch.rand(2, 36, generator=gen).clamp(1e-6, 1)
        k, relaxed, relaxed_tilde = relaxed_categorical_sample(log_probs, u, v, 0.5)
        assert relaxed.argmax() == k and relaxed_tilde.argmax() == k


def test_relax_estimator_is_unbiased():
    # f(b, k) = sum c (b - 1/2) + c_w[k]:  dE/dprob = c,  dE/dw = softmax(w) * (c_w - E[c_w])
    torch.manual_seed(0)
    policy = _policy_with(torch.tensor([[0.2, 0.7], [0.5, 0.9], [0.4, 0.3]]), torch.tensor([0.3, -0.5, 0.8]),
                          sub_policies=SUB_POLICIES[:3])
    c, c_w = torch.tensor([[1.0, -2.0], [0.5, 1.5], [-1.0, 2.0]]), torch.tensor([2.0, -1.0, 0.5])
    gen = torch.Generator().manual_seed(0)
    grads_prob, grads_w = [], []
    for _ in range(400):
        policy.sample(gen)
        f = (c * (policy.op_switches - 0.5)).sum() + c_w[policy.sub_policy_index]
        grads = policy.relax_grads(f)
        grads_prob.append(grads[0])
        grads_w.append(grads[1])
    w = torch.softmax(policy.op_weights.detach(), 0)
    for samples, expected in ((torch.stack(grads_prob), c), (torch.stack(grads_w), w * (c_w - (w * c_w).sum()))):
        standard_error = samples.std(0) / math.sqrt(len(samples))
        assert ((samples.mean(0) - expected).abs() <= 4.5 * standard_error).all()


def test_relax_grads_are_aligned_with_policy_parameters():
    policy = AugmentPolicy()
    grads = policy.relax_grads(torch.tensor(3.0))
    params = policy.policy_parameters()
    assert [g.shape for g in grads] == [p.shape for p in params]
    assert sum(p.numel() for p in policy.q_func.parameters()) == 11001
    assert torch.equal(grads[2], torch.zeros(36, 2))          # f_b without a graph: no magnitude gradient
    assert any(g.abs().sum() > 0 for g in grads[3:])          # Q is fitted to the estimator's variance
    with pytest.raises(ValueError, match="scalar"):
        policy.relax_grads(torch.ones(2))


# --------------------------------------------------------------------------------- straight-through
def test_straight_through_keeps_values_and_routes_gradients_to_magnitudes():
    policy = AugmentPolicy()
    k = force_sub_policy(policy, ("Rotate", "Noise"))
    f_t = torch.randn(2, 3, 5, 6, requires_grad=True)
    g_t = policy.apply(f_t)
    generator = torch.Generator().manual_seed(int(policy.op_seed))
    expected = apply_feature_op(apply_feature_op(f_t.detach(), "Rotate", 0.75, generator), "Noise", 0.25, generator)
    assert torch.equal(g_t, expected)
    assert torch.equal(policy.apply(f_t), g_t)               # fixed until the next sample()

    weight = torch.randn_like(g_t)
    (g_t * weight).sum().backward()
    expected_grad = torch.zeros(36, 2)
    expected_grad[k] = weight.sum()                           # sum of dL/dg_t over all elements
    torch.testing.assert_close(policy.magnitude.grad, expected_grad)
    assert f_t.grad is None and policy.prob.grad is None and policy.op_weights.grad is None


def test_only_switched_on_ops_run_and_magnitudes_are_clamped():
    policy = AugmentPolicy()
    feat = torch.randn(1, 2, 4, 5)
    force_sub_policy(policy, ("ShearX", "Rotate"), switches=(0.0, 1.0), levels=(0.9, 1.7))
    assert policy.active_ops() == [(1, "Rotate", 1.0)]
    torch.testing.assert_close(policy.apply(feat), apply_feature_op(feat, "Rotate", 1.0))
    force_sub_policy(policy, ("ShearX", "Rotate"), switches=(0.0, 0.0))
    out = policy.apply(feat)
    assert torch.equal(out, feat) and not out.requires_grad


# ---------------------------------------------------------------------------------------------- DAM
def test_area_detection_shapes_ranges_and_parameter_count():
    dam = AreaDetection(16, 16, 5)
    heat, wh, offset = dam(torch.randn(2, 16, 6, 7))
    assert heat.shape == (2, 5, 6, 7) and wh.shape == offset.shape == (2, 2, 6, 7)
    assert heat.min() >= 0.5 and wh.min() >= 0 and offset.min() >= 0
    big = AreaDetection(128, 128, 100)
    assert sum(p.numel() for p in big.parameters()) == 3 * (9 * 128 ** 2 + 128) + 128 * 104 + 104 == 456168


def test_decode_regions_hand_computed_and_masks_inclusive_or_empty():
    heat = torch.zeros(1, 1, 4, 5)
    heat[0, 0, 1, 2], heat[0, 0, 3, 4] = 0.9, 0.7
    wh = torch.zeros(1, 2, 4, 5)
    wh[0, :, 1, 2] = torch.tensor([3.0, 2.0])
    offset = torch.zeros(1, 2, 4, 5)
    offset[0, :, 3, 4] = torch.tensor([1.5, 0.0])         # centre pushed past the right border
    boxes, scores = decode_regions(heat, wh, offset, k=2)
    # centre (2, 1), size (3, 2): x 0.5..3.5 -> 0..3, y 0..2;  centre (5.5, 3): x1 = 5 > x2 = 4
    assert boxes.tolist() == [[[0, 0, 3, 2], [5, 3, 4, 3]]]
    torch.testing.assert_close(scores, torch.tensor([[0.9, 0.7]]))
    masks = region_masks(boxes, 4, 5)
    assert masks[0, 0].sum() == 4 * 3 and masks[0, 0, :3, :4].all() and masks[0, 1].sum() == 0


def test_masked_mse_counts_overlaps_squared():
    f_s, f_t = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, :, 0, 0] = 1                                      # two boxes on the same cell: M = 2
    assert masked_feature_mse(f_s, f_t, masks).item() == pytest.approx(2 * 4 / 8)


def test_dam_errors_are_clear():
    heat, two = torch.rand(1, 2, 3, 3), torch.rand(1, 2, 3, 3)
    with pytest.raises(ValueError, match="k must be in"):
        decode_regions(heat, two, two, k=19)
    with pytest.raises(ValueError, match="odd"):
        decode_regions(heat, two, two, k=2, kernel=2)
    with pytest.raises(ValueError, match="wh must be"):
        decode_regions(heat, two[:, :1], two, k=2)
    with pytest.raises(ValueError, match="integer"):
        region_masks(torch.zeros(1, 2, 4), 3, 3)
    with pytest.raises(ValueError, match="masks must be"):
        masked_feature_mse(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 4, 4))


@pytest.mark.parametrize("s_hw, t_hw", [((8, 8), (4, 4)), ((4, 4), (8, 8)), ((7, 9), (5, 6)), ((4, 4), (4, 4))])
def test_feature_adapter_matches_teacher_shape(s_hw, t_hw):
    adapter = FeatureAdapter((2, 3, *s_hw), (2, 5, *t_hw))
    assert adapter(torch.randn(2, 3, *s_hw)).shape == (2, 5, *t_hw)


def test_feature_adapter_rejects_unmatchable_shapes():
    with pytest.raises(ValueError, match="cannot map student"):
        FeatureAdapter((3, 4, 4), (5, 7, 7))
    with pytest.raises(ValueError, match="s_shape must be"):
        FeatureAdapter((3, 4), (5, 4, 4))


# ---------------------------------------------------------------------------------------- distiller
def _distiller(**kwargs):
    return SoKDDistiller((2, 6, 8, 8), (2, 4, 4, 4), num_heat=3, k=3, **kwargs)


def test_distiller_losses_are_weighted_terms_of_the_spec():
    torch.manual_seed(0)
    distiller = _distiller(w_feat=10.0, w_dam=3.0).eval()        # eval: no augmentation
    f_s, f_t = torch.randn(2, 6, 8, 8), torch.randn(2, 4, 4, 4)
    losses = distiller(f_s, f_t)
    assert set(losses) == {"loss_sokd_feat", "loss_sokd_dam"}
    g_s = distiller.adapter(f_s)
    dam_s, dam_t = distiller.dam(g_s), distiller.dam(f_t)
    boxes, _ = decode_regions(*dam_s, k=3)
    feat = masked_feature_mse(g_s, f_t, region_masks(boxes, 4, 4))
    dam = F.mse_loss(torch.cat(dam_s, 1), torch.cat(dam_t, 1))
    torch.testing.assert_close(losses["loss_sokd_feat"], 10.0 * feat)
    torch.testing.assert_close(losses["loss_sokd_dam"], 3.0 * dam)


def test_distiller_gradients_reach_student_side_and_magnitudes_but_not_the_teacher():
    torch.manual_seed(0)
    distiller = _distiller().train()
    k = force_sub_policy(distiller.policy, ("ShearX", "Noise"))
    f_s = torch.randn(2, 6, 8, 8, requires_grad=True)
    f_t = torch.randn(2, 4, 4, 4, requires_grad=True)
    sum(distiller(f_s, f_t).values()).backward()
    assert f_t.grad is None and f_s.grad is not None
    assert distiller.dam.heatmap_head[0].weight.grad is not None and distiller.adapter.conv.weight.grad is not None
    assert (distiller.policy.magnitude.grad[k] != 0).all()
    assert distiller.policy.magnitude.grad.abs().sum() == distiller.policy.magnitude.grad[k].abs().sum()
    assert distiller.policy.prob.grad is None and distiller.policy.op_weights.grad is None


def test_distiller_parameter_groups_and_state_dict_keys():
    distiller = _distiller()
    policy = {id(p) for p in distiller.policy_parameters()}
    student_side = {id(p) for p in distiller.student_side_parameters()}
    assert not policy & student_side and policy | student_side == {id(p) for p in distiller.parameters()}
    keys = set(distiller.state_dict())
    assert {"policy.prob", "policy.op_weights", "policy.magnitude", "policy.q_func.h1.weight",
            "policy.q_func.out.bias", "adapter.conv.weight", "adapter.bn3.running_var",
            "dam.heatmap_head.0.weight", "dam.wh_head.2.bias", "dam.offset_head.2.weight"} <= keys
    assert not any(key.split(".")[1] in ("prob_u", "op_switches", "op_seed") for key in keys)


def test_distiller_errors_are_clear():
    f_s = torch.randn(2, 6, 8, 8)
    with pytest.raises(ValueError, match="search_mode"):
        _distiller(search_mode="second_order")
    with pytest.raises(ValueError, match="must match the teacher"):
        _distiller()(f_s, torch.randn(2, 4, 5, 5))
