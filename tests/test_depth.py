"""kd_ref.depth: golden case 3 (bins, weighted CE, decoding), the virtual-normal loss, the pooled metrics
and DepthNet's outputs, losses and parameter counts."""
import math
import os

import pytest
import torch

from kd_ref import depth as D
from model_helpers import count_parameters

DATA = os.path.join(os.path.dirname(__file__), "data", "depth_fcos")


def golden():
    return torch.load(os.path.join(DATA, "case3_vnl_bins_wce.pt"))


def test_bins_weights_ce_and_decoding_match_golden():
    case = golden()
    bins = D.depth_to_bins(case["depth"], d_min=0.1, d_max=1.7, num_bins=12)
    assert torch.equal(bins, case["expected_bins"])
    assert (bins == 13).any() and (bins == 11).any()            # holes and clamped far pixels are in the case
    torch.testing.assert_close(D.bin_weight_matrix(12, alpha=0.2), case["expected_wce_weight"], rtol=1e-6, atol=1e-9)
    wce = D.weighted_bin_ce(case["logits"], bins, case["depth"] > 0, num_bins=12, alpha=0.2)
    torch.testing.assert_close(wce, case["expected_wce"], rtol=1e-6, atol=1e-9)
    decoded = D.bins_to_depth(case["logits"].softmax(1), d_min=0.1, d_max=1.7)
    torch.testing.assert_close(decoded, case["expected_decoded"], rtol=1e-6, atol=1e-9)


def test_one_hot_decoding_is_within_half_a_bin():
    depth = torch.linspace(0.5, 10.0, 97, dtype=torch.float64).reshape(1, 1, 1, 97)
    bins = D.depth_to_bins(depth, 0.5, 10.0, 32)
    one_hot = torch.nn.functional.one_hot(bins[:, 0], 32).permute(0, 3, 1, 2).double()
    half_bin = (math.log10(10.0) - math.log10(0.5)) / 32 / 2
    error = (torch.log10(D.bins_to_depth(one_hot, 0.5, 10.0)) - torch.log10(depth)).abs()
    assert error.max() <= half_bin + 1e-12


def _plane(height=24, width=32, tilt=0.0, base=3.0):
    v = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width)
    return (base + tilt * (v / height - 0.5)).reshape(1, 1, height, width)


def test_virtual_normal_loss_is_zero_on_itself_and_scale_invariant():
    gt = _plane(tilt=2.0) + 0.3 * torch.rand(1, 1, 24, 32, generator=torch.Generator().manual_seed(0),
                                              dtype=torch.float64)
    pred = gt * (1 + 0.2 * torch.rand(gt.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    triplets = torch.randint(24 * 32, (3, 200), generator=torch.Generator().manual_seed(2))
    assert D.virtual_normal_loss(gt, gt, focal=50.0, triplets=triplets) == 0
    loss = D.virtual_normal_loss(pred, gt, focal=50.0, triplets=triplets)
    assert loss > 0
    torch.testing.assert_close(D.virtual_normal_loss(3 * pred, gt, focal=50.0, triplets=triplets), loss)


def test_virtual_normal_loss_hand_computed_tilted_plane():
    # gt: a fronto-parallel plane at 2 m, normal (0, 0, 1). pred: the same pixels on a plane tilted about
    # the x axis, z = 2 + 0.5 * y. One triplet of three non-collinear pixels.
    focal, height, width = 10.0, 8, 8
    gt = torch.full((1, 1, height, width), 2.0, dtype=torch.float64)
    v = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width)
    y_over_z = (v - height // 2) / focal
    pred = (2.0 / (1 - 0.5 * y_over_z)).reshape(1, 1, height, width)   # solves z = 2 + 0.5 * y with y = z·v'/f
    triplet = torch.tensor([[0 * width + 0], [2 * width + 6], [6 * width + 2]])
    normal_pred = torch.tensor([0.0, -0.5, 1.0], dtype=torch.float64)
    normal_pred = normal_pred / normal_pred.norm()
    expected = (normal_pred - torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)).abs().sum()
    loss = D.virtual_normal_loss(pred, gt, focal, triplets=triplet, drop_ratio=0.0)
    # both cross products (p2 - p1) x (p3 - p1) have a positive z component for this pixel order
    torch.testing.assert_close(loss, expected)


def test_virtual_normal_loss_drops_degenerate_triplets():
    gt = _plane()
    same_pixel = torch.tensor([[5], [5], [5]])
    collinear = torch.tensor([[0], [1], [2]])                 # one image row of a fronto-parallel plane
    for triplets in (same_pixel, collinear):
        loss = D.virtual_normal_loss(gt * 2, gt, focal=50.0, triplets=triplets)
        assert loss == 0


def test_depth_metrics_hand_made_and_pooled():
    pred = torch.tensor([[1.0, 2.0, 3.0, 8.0]])
    gt = torch.tensor([[1.0, 1.0, 4.0, 0.0]])
    sums = D.depth_metrics(pred, gt, gt > 0)
    metrics = D.finish_depth_metrics(sums)
    assert metrics["pixels"] == 3
    assert metrics["rel"] == pytest.approx((0 + 1 + 0.25) / 3)
    assert metrics["sq_rel"] == pytest.approx((0 + 1 + 0.25) / 3)
    assert metrics["rms"] == pytest.approx(math.sqrt(2 / 3))
    assert metrics["log10"] == pytest.approx((math.log10(2) + math.log10(4 / 3)) / 3)
    assert (metrics["delta1"], metrics["delta2"], metrics["delta3"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))
    # a second "image" with four times the valid pixels: pooling weights pixels, not images
    second = D.depth_metrics(torch.ones(1, 12), torch.ones(1, 12), torch.ones(1, 12, dtype=torch.bool))
    pooled = D.finish_depth_metrics(D.merge_depth_metrics(sums, second))
    assert pooled["rel"] == pytest.approx(1.25 / 15)
    assert pooled["rel"] != pytest.approx((metrics["rel"] + 0.0) / 2)


def test_eigen_crop():
    valid = torch.ones(1, 480, 640, dtype=torch.bool)
    cropped = D.eigen_crop(valid)
    assert cropped.sum() == (471 - 45) * (601 - 41) and not cropped[0, 44].any() and cropped[0, 45, 41]
    with pytest.raises(ValueError, match="480x640"):
        D.eigen_crop(torch.ones(1, 64, 64, dtype=torch.bool))


def test_scale_invariant_log_loss():
    gt = torch.tensor([1.0, 2.0, 4.0])
    valid = torch.ones(3, dtype=torch.bool)
    assert D.scale_invariant_log_loss(2 * gt, gt, valid, lam=1.0) == pytest.approx(0.0, abs=1e-7)
    g = torch.log(torch.tensor([2.0, 1.0, 1.0]))
    expected = (g ** 2).mean() - 0.85 * g.mean() ** 2
    torch.testing.assert_close(D.scale_invariant_log_loss(torch.tensor([2.0, 2.0, 4.0]), gt, valid), expected)


@pytest.mark.parametrize("backbone,channels,c5", [("resnet18", 64, 512), ("mobilenet_v2", 64, 320),
                                                  ("resnet50", 256, 2048)])
def test_depthnet_outputs_losses_and_gradients(backbone, channels, c5):
    torch.manual_seed(0)
    model = D.DepthNet(backbone, num_bins=16, d_min=0.5, d_max=10.0, dec_channels=channels, focal=50.0).train()
    gt = torch.rand(2, 64, 96) * 5 + 1
    gt[:, :4] = 0
    out = model(torch.randn(2, 3, 64, 96), gt)
    assert out["logits"].shape == (2, 16, 16, 24) and out["log_depth"].shape == (2, 1, 16, 24)
    assert out["depth"].shape == (2, 1, 64, 96) and out["feats"]["head"].shape[1] == channels
    assert out["feats"]["c5"].shape[1] == c5 and set(out["losses"]) == {"loss_wce", "loss_vn"}
    sum(out["losses"].values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_depthnet_regression_head_and_parameter_counts():
    model = D.DepthNet("mobilenet_v2", dec_channels=64, prediction="regression").train()
    out = model(torch.randn(1, 3, 64, 64), torch.full((1, 64, 64), 2.0))
    assert set(out["losses"]) == {"loss_silog"} and "logits" not in out
    # decoder: 4 laterals (1x1, no bias, + BN), 3 smoothing and the head 3x3 (+ BN), classifier (bias)
    lateral = sum(c * 64 + 2 * 64 for c in (24, 32, 96, 320))
    expected = 1_811_712 + lateral + 4 * (64 * 64 * 9 + 2 * 64) + (64 + 1)
    assert count_parameters(model) == expected
    with pytest.raises(ValueError, match="prediction"):
        D.DepthNet("resnet18", prediction="ordinal")


def test_depth_skd_terms_holistic_on_log_depth_and_its_optimizer():
    from kd_ref.skd import DepthSKDDistiller
    torch.manual_seed(0)
    distiller = DepthSKDDistiller(16)
    logits_s = torch.randn(2, 16, 64, 64, requires_grad=True)
    log_depth_s = torch.randn(2, 1, 64, 64, requires_grad=True)
    inputs = (logits_s, torch.randn(2, 16, 64, 64), torch.randn(2, 8, 64, 64), torch.randn(2, 32, 64, 64),
              log_depth_s, torch.randn(2, 1, 64, 64))
    losses = distiller(*inputs)
    assert set(losses) == {"loss_skd_pi", "loss_skd_pa", "loss_skd_ho"}
    sum(losses.values()).backward()
    assert log_depth_s.grad.abs().sum() > 0
    assert all(p.grad is None for p in distiller.extra_parameters())   # the student step leaves D alone
    assert distiller.holistic.discriminator.conv1.weight.shape[1] == 1        # D reads the 1-channel log depth
    optimizer, _ = distiller.extra_optimizer(10)
    assert isinstance(optimizer, torch.optim.Adam)
    assert set(distiller.extra_losses(*inputs)) == {"loss_skd_d"}
    regression = DepthSKDDistiller(16, use_pi=False, use_ho=False)
    assert set(regression(None, None, *inputs[2:])) == {"loss_skd_pa"}
    assert regression.extra_optimizer(10) is None
