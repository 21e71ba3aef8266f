"""The float32 parts of every method's loss stay float32 under autocast (CPU bf16 here): a loss computed
inside ``torch.autocast`` equals the one computed outside it, bit for bit."""
import pytest
import torch

from kd_ref import dist, gdd, gkd, kd, skd, sokd
from kd_ref.precision import at_least_float32, autocast_disabled


def _inputs(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in shapes]


def _robust_weights(a, b, protos_a, protos_b):
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    return gkd.robust_weights(a, b, labels, protos_a, protos_b, torch.tensor([0, 2, 4]))


def _global_alignment(a, b, protos_a, protos_b):
    return gkd.global_alignment_loss(a, b, protos_a, protos_b, torch.linspace(0.2, 1.0, 6))


def _masked_mse(f_s, f_t):
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, 1:3] = 1
    return sokd.masked_feature_mse(f_s, f_t, masks)


LOSSES = {
    "gkd.prototype_similarity": (lambda a, protos: gkd.prototype_similarity(a, protos), [(6, 64), (4, 64)]),
    "gkd.robust_weights": (_robust_weights, [(6, 64), (6, 64), (4, 64), (4, 64)]),
    "gkd.global_alignment_loss": (_global_alignment, [(6, 64), (6, 64), (4, 64), (4, 64)]),
    "gkd.density_candidates": (lambda a, b: gkd.density_candidates(a, b, sigma=0.5).float(), [(12, 64), (12, 64)]),
    "gkd.soft_label_loss": (gkd.soft_label_loss, [(6, 5), (6, 5)]),
    "skd.pair_wise_kd": (lambda a, b: skd.pair_wise_kd(a, b, kernel=1, impl="dense"), [(2, 16, 4, 4), (2, 8, 4, 4)]),
    "skd.pixel_wise_kd": (skd.pixel_wise_kd, [(2, 5, 4, 4), (2, 5, 4, 4)]),
    "dist.dist_loss": (dist.dist_loss, [(6, 5), (6, 5)]),
    "kd.kd_loss": (lambda a, b: kd.kd_loss(a, b, tau=4.0), [(6, 5), (6, 5)]),
    "gdd.channel_kl_loss": (gdd.channel_kl_loss, [(2, 3, 4, 4), (2, 3, 4, 4)]),
    "sokd.masked_feature_mse": (_masked_mse, [(2, 3, 4, 4), (2, 3, 4, 4)]),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float32_losses_ignore_cpu_bf16_autocast(name):
    loss, shapes = LOSSES[name]
    inputs = _inputs(*shapes)
    expected = loss(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(*inputs)
    assert under_autocast.dtype == expected.dtype == torch.float32
    assert torch.equal(under_autocast, expected), f"{name}: max error {(under_autocast - expected).abs().max()}"


def test_autocast_disabled_keeps_products_in_the_input_dtype():
    a, b = _inputs((8, 8), (8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with autocast_disabled(a):
            assert (a @ b).dtype == torch.float32
    assert at_least_float32(a.bfloat16()).dtype == torch.float32
    assert at_least_float32(a.double()).dtype == torch.float64
