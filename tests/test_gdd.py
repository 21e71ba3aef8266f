import json
import math
from pathlib import Path

import pytest
import torch

from kd_ref.gdd import GDDDistiller, GDDLoss, channel_kl_loss

DATA = Path(__file__).parent / "data" / "gdd"
CASES = {c["name"]: c for c in json.loads((DATA / "cases.json").read_text())["cases"]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _load(name):
    case = CASES[name]
    return case, torch.load(DATA / case["file"]), {"rtol": case["rtol"], "atol": case["atol"]}


def _state_dict(blob):
    prefix = "state_dict."
    return {k[len(prefix):]: v for k, v in blob.items() if k.startswith(prefix)}


def _close(actual, expected, tol):
    assert actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, **tol), (actual, expected)


# ---------------------------------------------------------------- golden cases

def test_every_golden_case_is_exercised():
    assert set(CASES) == {"case1_kl_tau4", "case2_kl_tau1", "case3_loss_align_noise",
                          "case4_loss_noalign_zero_noise", "case5_distiller_two_levels"}


@pytest.mark.parametrize("name", ["case1_kl_tau4", "case2_kl_tau1"])
def test_golden_channel_kl_loss(name):
    case, blob, tol = _load(name)
    out = channel_kl_loss(blob[case["inputs"]["pred"]], blob[case["inputs"]["target"]], **case["kwargs"])
    assert out.shape == ()
    _close(out, blob["expected"], tol)


def test_golden_loss_with_align_and_noise_including_gradients():
    case, blob, tol = _load("case3_loss_align_noise")
    module = GDDLoss(student_channels=4, teacher_channels=6, alpha=145.0, tau=4.0).double()
    module.load_state_dict(_state_dict(blob))
    feat_s = blob["feat_s"].clone().requires_grad_(True)
    loss = module(feat_s, blob["feat_t"], noise=blob["noise"])
    loss.backward()
    _close(loss.detach(), blob["expected_loss"], tol)
    _close(feat_s.grad, blob["expected_grad_feat_s"], tol)
    _close(module.align.weight.grad, blob["expected_grad_align_weight"], tol)
    _close(module.generation[2].bias.grad, blob["expected_grad_generation_2_bias"], tol)


def test_golden_loss_without_align_zero_noise():
    case, blob, tol = _load("case4_loss_noalign_zero_noise")
    module = GDDLoss(student_channels=5, teacher_channels=5, alpha=4.0, tau=4.0).double()
    module.load_state_dict(_state_dict(blob))
    assert module.align is None
    _close(module(blob["feat_s"], blob["feat_t"], noise=blob["noise"]), blob["expected_loss"], tol)


def test_golden_distiller_two_levels():
    case, blob, tol = _load("case5_distiller_two_levels")
    distiller = GDDDistiller(level_names=["p3", "p4"], student_channels=8, teacher_channels=8,
                             alpha=65.0, tau=4.0).double()
    distiller.load_state_dict(_state_dict(blob))
    inputs = case["inputs"]
    losses = distiller([blob[k] for k in inputs["feats_s"]], [blob[k] for k in inputs["feats_t"]],
                       noises=[blob[k] for k in inputs["noises"]])
    assert set(losses) == {"loss_gdd_p3", "loss_gdd_p4"}
    for key, expected in case["outputs"].items():
        _close(losses[key[len("expected_"):]], blob[key], tol)


# ---------------------------------------------------------------- channel_kl_loss

def test_channel_kl_hand_value():
    # one channel, two positions: p = (1/4, 3/4), q uniform -> KL = 1/4 ln(1/2) + 3/4 ln(3/2)
    target = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64).reshape(1, 1, 1, 2)
    pred = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert channel_kl_loss(pred, target, tau=1.0).item() == pytest.approx(expected, rel=1e-12)
    # divided by N*C, summed over positions: two identical channels give the same value
    assert channel_kl_loss(pred.repeat(1, 2, 1, 1), target.repeat(1, 2, 1, 1), tau=1.0).item() == \
        pytest.approx(expected, rel=1e-12)


def test_channel_kl_zero_on_equal_inputs_and_non_negative():
    x = torch.randn(2, 3, 4, 5)
    assert channel_kl_loss(x, x).item() == 0.0
    for _ in range(5):
        assert channel_kl_loss(3 * torch.randn(2, 3, 4, 5), 3 * torch.randn(2, 3, 4, 5)).item() >= 0.0


def test_channel_kl_invariant_to_per_channel_constants():
    pred, target = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    reference = channel_kl_loss(pred, target)
    shift = 10 * torch.randn(2, 3, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(channel_kl_loss(pred + shift, target), reference)
    torch.testing.assert_close(channel_kl_loss(pred, target - shift), reference)


def test_channel_kl_tau_squared_scaling():
    pred, target = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    for tau in (1.0, 2.0, 4.0):
        torch.testing.assert_close(channel_kl_loss(pred, target, tau=tau),
                                   tau ** 2 * channel_kl_loss(pred / tau, target / tau, tau=1.0))


def test_channel_kl_no_gradient_into_target_and_no_mutation():
    pred = torch.randn(1, 2, 3, 3, requires_grad=True)
    target = torch.randn(1, 2, 3, 3, requires_grad=True)
    before = target.detach().clone()
    channel_kl_loss(pred, target).backward()
    assert target.grad is None and pred.grad is not None
    assert torch.equal(target.detach(), before)


# ---------------------------------------------------------------- GDDLoss

def test_parameter_counts_and_state_dict_keys():
    with torch.device("meta"):
        seg, fpn = GDDLoss(512, 2048), GDDLoss(256, 256)
    assert sum(p.numel() for p in seg.parameters()) == 76_552_192
    assert sum(p.numel() for p in seg.align.parameters()) == 1_050_624
    assert sum(p.numel() for p in fpn.parameters()) == 1_180_160
    assert fpn.align is None
    assert list(GDDLoss(4, 6).state_dict()) == ["align.weight", "align.bias", "generation.0.weight",
                                                "generation.0.bias", "generation.2.weight",
                                                "generation.2.bias"]
    assert list(GDDLoss(6, 6).state_dict()) == ["generation.0.weight", "generation.0.bias",
                                                "generation.2.weight", "generation.2.bias"]


def test_noise_is_fresh_and_per_position():
    module = GDDLoss(4, 6)
    feat_s, feat_t = torch.randn(2, 4, 5, 6), torch.randn(2, 6, 5, 6)
    assert module(feat_s, feat_t).item() != module(feat_s, feat_t).item()

    drawn = []
    sample_noise = module.sample_noise
    module.sample_noise = lambda concept: drawn.append(sample_noise(concept)) or drawn[-1]
    module(feat_s, feat_t)
    assert drawn[0].shape == (2, 1, 5, 6)

    # the implicit draw is exactly torch.randn(N, 1, H, W) * noise_std, added to every channel
    module = GDDLoss(4, 6, noise_std=0.5)
    torch.manual_seed(7)
    implicit = module(feat_s, feat_t)
    torch.manual_seed(7)
    explicit_noise = torch.randn(2, 1, 5, 6) * 0.5
    torch.testing.assert_close(implicit, module(feat_s, feat_t, noise=explicit_noise))
    torch.testing.assert_close(module(feat_s, feat_t, noise=explicit_noise),
                               module(feat_s, feat_t, noise=explicit_noise.expand(2, 6, 5, 6)))


def test_noise_drawn_through_torch_randn_with_shape_n1hw(monkeypatch):
    shapes = []
    randn = torch.randn

    def recording_randn(*size, **kwargs):
        out = randn(*size, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "randn", recording_randn)
    GDDLoss(3, 3)(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    assert shapes[-1] == (2, 1, 4, 4)


def test_gradients_reach_student_and_modules_not_teacher():
    module = GDDLoss(4, 6, alpha=2.0)
    feat_s = torch.randn(2, 4, 5, 6, requires_grad=True)
    feat_t = torch.randn(2, 6, 5, 6, requires_grad=True)
    module(feat_s, feat_t).backward()
    assert feat_t.grad is None
    assert feat_s.grad is not None and feat_s.grad.abs().sum() > 0
    assert all(p.grad is not None for p in module.parameters())


def test_alpha_and_zero_noise_match_manual_pipeline():
    module = GDDLoss(4, 6, alpha=3.0, tau=2.0)
    feat_s, feat_t = torch.randn(1, 4, 3, 3), torch.randn(1, 6, 3, 3)
    generated = module.generation(module.align(feat_s))
    torch.testing.assert_close(module(feat_s, feat_t, noise=torch.zeros(1, 1, 3, 3)),
                               3.0 * channel_kl_loss(generated, feat_t, tau=2.0))


def test_loss_is_float32_under_autocast():
    module = GDDLoss(4, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module(torch.randn(1, 4, 3, 3), torch.randn(1, 6, 3, 3).bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_gdd_loss_input_errors():
    module = GDDLoss(4, 6)
    with pytest.raises(ValueError, match="same batch size and spatial size"):
        module(torch.randn(1, 4, 5, 6), torch.randn(1, 6, 5, 5))
    with pytest.raises(ValueError, match="feat_s has 3 channels, expected student_channels=4"):
        module(torch.randn(1, 3, 5, 6), torch.randn(1, 6, 5, 6))
    with pytest.raises(ValueError, match="feat_t has 4 channels, expected teacher_channels=6"):
        module(torch.randn(1, 4, 5, 6), torch.randn(1, 4, 5, 6))
    with pytest.raises(ValueError, match=r"noise of shape \(1, 1, 4, 4\) does not broadcast"):
        module(torch.randn(1, 4, 5, 6), torch.randn(1, 6, 5, 6), noise=torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"must be \(N, C, H, W\)"):
        module(torch.randn(4, 5, 6), torch.randn(6, 5, 6))
    with pytest.raises(ValueError, match=r"channel_kl_loss: pred \(1, 2, 3, 3\) and target \(1, 2, 3, 4\)"):
        channel_kl_loss(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 4))


# ---------------------------------------------------------------- GDDDistiller

def test_distiller_levels_channels_and_keys():
    distiller = GDDDistiller(["c4", "c5"], [8, 16], 32, alpha=145.0)
    assert list(distiller.losses) == ["c4", "c5"]
    assert distiller.losses["c4"].align.in_channels == 8
    assert distiller.losses["c5"].align.in_channels == 16
    assert distiller.losses["c5"].align.out_channels == 32
    assert "losses.c5.generation.0.weight" in distiller.state_dict()

    distiller = GDDDistiller(["p3", "p4"], 4, 4, alpha=2.0)
    assert distiller.losses["p3"].align is None
    assert distiller.losses["p3"].generation[0].weight is not distiller.losses["p4"].generation[0].weight
    feats_s = [torch.randn(2, 4, 6, 6), torch.randn(2, 4, 3, 3)]
    feats_t = [torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(2, 4, 3, 3, requires_grad=True)]
    noises = [torch.zeros(2, 1, 6, 6), None]
    losses = distiller(feats_s, feats_t, targets=[{"boxes": torch.zeros(0, 4)}], noises=noises)
    assert list(losses) == ["loss_gdd_p3", "loss_gdd_p4"]
    torch.testing.assert_close(losses["loss_gdd_p3"],
                               distiller.losses["p3"](feats_s[0], feats_t[0], noises[0]))
    sum(losses.values()).backward()
    assert all(t.grad is None for t in feats_t)


def test_distiller_input_errors():
    with pytest.raises(ValueError, match="student_channels has 1 entries, expected one per level"):
        GDDDistiller(["p3", "p4"], [4], 4, alpha=1.0)
    with pytest.raises(ValueError, match="non-empty and unique"):
        GDDDistiller(["p3", "p3"], 4, 4, alpha=1.0)
    distiller = GDDDistiller(["p3", "p4"], 4, 4, alpha=1.0)
    feats = [torch.randn(1, 4, 2, 2)] * 2
    with pytest.raises(ValueError, match=r"feats_t has 1 entries, expected 2 for levels \['p3', 'p4'\]"):
        distiller(feats, feats[:1])
    with pytest.raises(ValueError, match="noises has 3 entries"):
        distiller(feats, feats, noises=[None] * 3)
    with pytest.raises(ValueError, match="feats_s must be a list with one entry per level"):
        distiller(torch.randn(2, 4, 2, 2), feats)
