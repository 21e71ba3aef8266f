import math

import pytest
import torch

from kd_ref.kd import KDDistiller, kd_loss


def test_kd_loss_hand_computed_two_classes():
    logits_s = torch.tensor([[0.0, 0.0]])
    logits_t = torch.tensor([[math.log(3.0), 0.0]])      # p_t = (3/4, 1/4), q = (1/2, 1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(logits_s, logits_t).item() == pytest.approx(expected, rel=1e-6)
    # tau scales the logits and multiplies by tau^2
    assert kd_loss(logits_s * 2, logits_t * 2, tau=2.0).item() == pytest.approx(4 * expected, rel=1e-6)


def test_kd_loss_dense_is_mean_over_pixels_and_zero_on_identical():
    logits = torch.randn(2, 5, 3, 4)
    assert kd_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    s, t = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    flat = kd_loss(s.permute(0, 2, 3, 1).reshape(-1, 5), t.permute(0, 2, 3, 1).reshape(-1, 5))
    assert kd_loss(s, t).item() == pytest.approx(flat.item(), rel=1e-6)


def test_kd_distiller_weights_and_detaches_teacher():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    losses = KDDistiller(tau=2.0, loss_weight=0.5)(s, t)
    assert set(losses) == {"loss_kd"}
    assert losses["loss_kd"].item() == pytest.approx(0.5 * kd_loss(s, t, 2.0).item())
    losses["loss_kd"].backward()
    assert s.grad is not None and t.grad is None


def test_kd_loss_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4))
