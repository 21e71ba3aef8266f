"""Tests for kd_ref/skd.py: golden vectors of the reference codes, Gram-form exactness, invariances,
discriminator architecture, adversarial losses, distiller wiring and the engine hook."""
import functools
import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from kd_ref import skd
from kd_ref.presets_seg import SKD_ORIGINAL_OPTIONS

DATA = Path(__file__).parent / "data" / "skd"
CASES = json.loads((DATA / "cases.json").read_text())["cases"]


# ---------------------------------------------------------------------------------------------
# golden vectors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_case(case):
    tensors = torch.load(DATA / case["file"])
    function = getattr(skd, case["call"].rsplit(".", 1)[1])
    inputs = {name: tensors[name].clone().requires_grad_(True) for name in case["args"]}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in case["kwargs"].items()}

    loss = function(*inputs.values(), **kwargs)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert torch.allclose(loss, tensors[case["expect"]["loss"]], rtol=case["rtol"],
                          atol=case["atol"])
    loss.backward()
    for name, grad_key in case["expect"]["grad"].items():
        assert torch.allclose(inputs[name].grad, tensors[grad_key], rtol=case["grad_rtol"],
                              atol=case["grad_atol"])
    teacher = case["args"][1]
    assert inputs[teacher].grad is None


def test_golden_kernel_note_matches_pool_kernel_from_scale():
    assert skd.pool_kernel_from_scale(13, 13, 0.5) == (6, 6)


# ---------------------------------------------------------------------------------------------
# pixel-wise
# ---------------------------------------------------------------------------------------------

def test_pixel_wise_matches_direct_kl_both_normalisations():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(3, 4, 2, 5), torch.randn(3, 4, 2, 5)
    p_t = torch.softmax(z_t / 2.0, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(z_s / 2.0, 1))).sum()
    assert torch.allclose(skd.pixel_wise_kd(z_s, z_t, 2.0, "pixels"), 4.0 * kl / 30, rtol=1e-5)
    assert torch.allclose(skd.pixel_wise_kd(z_s, z_t, 2.0, "spatial"), 4.0 * kl / 10, rtol=1e-5)


def _data_parallel_gradient(z_s, z_t, normalize, processes):
    """The gradient DDP leaves on the student logits when ``processes`` processes each take an equal share of
    the batch and average their gradients: each share's own gradient divided by the process count."""
    shares = []
    for share_s, share_t in zip(z_s.chunk(processes), z_t.chunk(processes)):
        share_s = share_s.clone().requires_grad_(True)
        skd.pixel_wise_kd(share_s, share_t, normalize=normalize, processes=processes).backward()
        shares.append(share_s.grad / processes)
    return torch.cat(shares)


def test_spatial_whole_batch_makes_processes_of_shares_equal_one_process_of_the_batch():
    """The original code sums the pixel-wise term over a batch of 8 on one GPU; split over N processes,
    "spatial" weighs it 1/N as much, "spatial_whole_batch" as one process of the whole batch."""
    torch.manual_seed(0)
    z_s, z_t = torch.randn(8, 5, 3, 4), torch.randn(8, 5, 3, 4)
    whole = z_s.clone().requires_grad_(True)
    skd.pixel_wise_kd(whole, z_t, normalize="spatial").backward()
    for processes in (2, 8):
        split = _data_parallel_gradient(z_s, z_t, "spatial_whole_batch", processes)
        torch.testing.assert_close(split, whole.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(_data_parallel_gradient(z_s, z_t, "spatial", processes), whole.grad / processes,
                                   rtol=1e-5, atol=1e-7)
        # the averaged loss values agree too
        values = [skd.pixel_wise_kd(s, t, normalize="spatial_whole_batch", processes=processes)
                  for s, t in zip(z_s.chunk(processes), z_t.chunk(processes))]
        torch.testing.assert_close(sum(values) / processes, skd.pixel_wise_kd(z_s, z_t, normalize="spatial"))
    # outside a process group the count is 1: the original scaling
    spatial = skd.pixel_wise_kd(z_s, z_t, normalize="spatial")
    assert skd.pixel_wise_kd(z_s, z_t, normalize="spatial_whole_batch") == spatial


def test_pixel_wise_zero_for_identical_inputs():
    z = torch.randn(2, 5, 3, 4)
    assert skd.pixel_wise_kd(z, z.clone()) == 0


def test_pixel_wise_errors():
    z = torch.randn(2, 5, 3, 4)
    with pytest.raises(ValueError, match="same shape"):
        skd.pixel_wise_kd(z, torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="normalize"):
        skd.pixel_wise_kd(z, z, normalize="batch")
    with pytest.raises(ValueError, match="tau"):
        skd.pixel_wise_kd(z, z, tau=0.0)


def test_losses_are_float32_under_autocast():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    f_s, f_t = torch.randn(2, 4, 10, 12), torch.randn(2, 6, 10, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pixel = skd.pixel_wise_kd(z_s, z_t)
        pair = skd.pair_wise_kd(f_s, f_t, kernel=1, impl="gram")
    assert pixel.dtype == pair.dtype == torch.float32
    assert pixel == skd.pixel_wise_kd(z_s, z_t)
    assert pair == skd.pair_wise_kd(f_s, f_t, kernel=1, impl="gram")


# ---------------------------------------------------------------------------------------------
# pair-wise
# ---------------------------------------------------------------------------------------------

def _relu_features(batch, channels_s, channels_t, height, width, zero_block=False):
    f_s = torch.randn(batch, channels_s, height, width).relu()
    f_t = torch.randn(batch, channels_t, height, width).relu()
    if zero_block:  # all-zero nodes after pooling, on both sides
        f_s[:, :, :2, :2] = 0
        f_t[:, :, -3:, :] = 0
    return f_s, f_t


def test_pool_kernel_from_scale():
    assert skd.pool_kernel_from_scale(65, 65, 0.5) == (32, 32)
    assert skd.pool_kernel_from_scale(64, 128, 0.5) == (32, 64)
    assert skd.pool_kernel_from_scale(1, 3, 0.5) == (1, 1)
    with pytest.raises(ValueError, match="scale"):
        skd.pool_kernel_from_scale(8, 8, 0.0)


@pytest.mark.parametrize("shape, kernel", [
    ((2, 3, 5, 9, 11), 2),            # odd sizes, ceil-mode border nodes, C_s != C_t
    ((1, 4, 4, 7, 9), None),          # no pooling
    ((2, 6, 3, 5, 5), (5, 5)),        # N = 1
    ((1, 2, 2, 1, 1), 2),             # N = 1 from a kernel larger than the map
    ((2, 5, 8, 13, 13), (6, 6)),      # original pooling rule, 1-pixel-wide last window
])
@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("zero_block", [False, True])
def test_gram_equals_dense(shape, kernel, detach_norm, zero_block):
    torch.manual_seed(sum(shape))
    f_s, f_t = _relu_features(*shape, zero_block=zero_block and shape[3] > 3)
    results = {}
    for impl in ("dense", "gram"):
        x = f_s.clone().requires_grad_(True)
        loss = skd.pair_wise_kd(x, f_t, kernel=kernel, detach_norm=detach_norm, impl=impl)
        loss.backward()
        results[impl] = (loss, x.grad)
    assert torch.allclose(results["gram"][0], results["dense"][0], rtol=1e-5, atol=1e-9)
    # atol covers N = 1, where the loss is identically 0 and both gradients are round-off
    assert torch.allclose(results["gram"][1], results["dense"][1], rtol=1e-4, atol=1e-7)


def test_auto_picks_gram_only_when_nodes_outnumber_channels():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)
    many_nodes = dict(kernel=1)  # N = 64 > 7
    few_nodes = dict(kernel=4)   # N = 4 <= 7
    assert torch.equal(skd.pair_wise_kd(f_s, f_t, impl="auto", **many_nodes),
                       skd.pair_wise_kd(f_s, f_t, impl="gram", **many_nodes))
    assert torch.equal(skd.pair_wise_kd(f_s, f_t, impl="auto", **few_nodes),
                       skd.pair_wise_kd(f_s, f_t, impl="dense", **few_nodes))


def test_pair_wise_matches_explicit_graph_loop():
    torch.manual_seed(1)
    f_s, f_t = torch.randn(2, 3, 4, 6), torch.randn(2, 5, 4, 6)
    expected = 0.0
    for b in range(2):
        a = torch.nn.functional.normalize(f_s[b].flatten(1), dim=0)
        t = torch.nn.functional.normalize(f_t[b].flatten(1), dim=0)
        expected += ((a.T @ a - t.T @ t) ** 2).sum() / 24 ** 2
    for impl in ("dense", "gram"):
        assert torch.allclose(skd.pair_wise_kd(f_s, f_t, kernel=None, impl=impl), expected / 2,
                              rtol=1e-5)


def test_gram_form_keeps_precision_when_graphs_nearly_agree():
    # The three Gram terms cancel to ~1e-5 of their size here; float32 accumulation would be off
    # by ~1e-4 relative, the float64 path stays at round-off of the float32 inputs.
    torch.manual_seed(0)
    f_s = torch.randn(2, 32, 32, 32).relu()
    f_t = f_s + 1e-2 * torch.randn_like(f_s)
    exact = skd.pair_wise_kd(f_s.double(), f_t.double(), kernel=1, impl="dense")
    gram = skd.pair_wise_kd(f_s, f_t, kernel=1, impl="gram")
    assert gram.dtype == torch.float32
    assert abs(gram.double().item() / exact.item() - 1) < 1e-5


@pytest.mark.parametrize("impl", ["dense", "gram"])
def test_pair_wise_zero_for_identical_inputs(impl):
    f = torch.randn(2, 6, 9, 11).relu()
    assert skd.pair_wise_kd(f, f.clone(), impl=impl) == 0


@pytest.mark.parametrize("impl", ["dense", "gram"])
@pytest.mark.parametrize("detach_norm", [False, True])
def test_pair_wise_invariant_to_positive_scaling(impl, detach_norm):
    torch.manual_seed(2)
    f_s, f_t = torch.randn(2, 4, 9, 11), torch.randn(2, 7, 9, 11)
    reference = skd.pair_wise_kd(f_s, f_t, detach_norm=detach_norm, impl=impl)
    assert torch.allclose(skd.pair_wise_kd(3.5 * f_s, f_t, detach_norm=detach_norm, impl=impl),
                          reference, rtol=1e-5)
    assert torch.allclose(skd.pair_wise_kd(f_s, 0.25 * f_t, detach_norm=detach_norm, impl=impl),
                          reference, rtol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "gram"])
def test_no_gradient_into_teacher(impl):
    f_s = torch.randn(2, 3, 6, 6, requires_grad=True)
    f_t = torch.randn(2, 5, 6, 6, requires_grad=True)
    z_s = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_t = torch.randn(2, 4, 3, 3, requires_grad=True)
    (skd.pair_wise_kd(f_s, f_t, impl=impl) + skd.pixel_wise_kd(z_s, z_t)).backward()
    assert f_s.grad is not None and z_s.grad is not None
    assert f_t.grad is None and z_t.grad is None


def test_pair_wise_errors():
    f = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match="spatial size"):
        skd.pair_wise_kd(f, torch.randn(2, 3, 6, 5))
    with pytest.raises(ValueError, match="4-D"):
        skd.pair_wise_kd(f.flatten(2), f.flatten(2))
    with pytest.raises(ValueError, match="impl"):
        skd.pair_wise_kd(f, f, impl="fast")
    with pytest.raises(ValueError, match="kernel"):
        skd.pair_wise_kd(f, f, kernel=0)


# ---------------------------------------------------------------------------------------------
# discriminator
# ---------------------------------------------------------------------------------------------

def test_discriminator_parameter_count_and_spectral_norm():
    disc = skd.SKDDiscriminator(19)
    assert sum(p.numel() for p in disc.parameters() if p.requires_grad) == 3_191_721
    for name in ("conv1", "conv2", "conv3", "conv4"):
        assert torch.nn.utils.parametrize.is_parametrized(getattr(disc, name), "weight")
        assert getattr(disc, name).parametrizations.weight[0].n_power_iterations == 1
    assert not torch.nn.utils.parametrize.is_parametrized(disc.score)
    assert "input_norm.weight" in disc.state_dict()


@pytest.mark.parametrize("size, out", [((65, 65), (1, 1)), ((64, 128), (1, 5)), ((64, 64), (1, 1))])
def test_discriminator_output_shapes(size, out):
    disc = skd.SKDDiscriminator(19)
    assert disc(torch.randn(2, 19, *size)).shape == (2, 1, *out)


def test_discriminator_rejects_small_or_wrong_inputs():
    disc = skd.SKDDiscriminator(3)
    with pytest.raises(ValueError, match="at least 64x64"):
        disc(torch.randn(2, 3, 63, 128))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        disc(torch.randn(2, 4, 64, 64))


def test_self_attention_identity_at_init_and_formula():
    torch.manual_seed(0)
    attn = skd.SelfAttention2d(16)
    x = torch.randn(2, 16, 3, 4)
    assert torch.equal(attn(x), x)
    with torch.no_grad():
        attn.gamma.fill_(0.5)
    q, k, v = (conv(x).flatten(2) for conv in (attn.query_conv, attn.key_conv, attn.value_conv))
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k), dim=-1)
    expected = 0.5 * torch.einsum("bcj,bij->bci", v, weights).view_as(x) + x
    assert torch.allclose(attn(x), expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# adversarial losses
# ---------------------------------------------------------------------------------------------

def test_adversarial_losses_hand_values():
    d_s = torch.tensor([[-2.0, 0.5]])
    d_t = torch.tensor([[0.5, 3.0]])
    assert skd.adv_g_loss(d_s) == 0.75
    # hinge: mean(relu(1 - [0.5, 3])) + mean(relu(1 + [-2, 0.5])) = 0.25 + 0.75
    assert skd.adv_d_loss(d_s, d_t, "hinge") == 1.0
    assert skd.adv_d_loss(d_s, d_t, "wgan") == -0.75 - 1.75
    with pytest.raises(ValueError, match="kind"):
        skd.adv_d_loss(d_s, d_t, "lsgan")


def test_gradient_penalty_linear_critic():
    torch.manual_seed(0)
    w = torch.randn(1, 2, 3, 3, requires_grad=True)

    def critic(x):
        return (w * x).flatten(1).sum(1)

    real, fake = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    w_norm = w.detach().norm()
    penalty = skd.gradient_penalty(critic, real, fake)
    assert torch.allclose(penalty, (w_norm - 1) ** 2, rtol=1e-5)
    fixed_alpha = torch.full((4, 1, 1, 1), 0.3)
    assert torch.allclose(skd.gradient_penalty(critic, real, fake, alpha=fixed_alpha),
                          (w_norm - 1) ** 2, rtol=1e-5)
    penalty.backward()  # create_graph: the penalty trains the critic
    assert torch.allclose(w.grad, 2 * (w_norm - 1) * w.detach() / w_norm, rtol=1e-4)


def test_gradient_penalty_runs_in_float32_under_half_precision_autocast():
    # under fp16 autocast the critic's input gradients would carry 11 bits (here 1.6e-3 relative error on the
    # penalty); the penalty is taken in float32 with autocast off and equals the float32 one
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 1, 3, padding=1)

    def critic(x):
        return conv(x).flatten(1).sum(1)

    real, fake = torch.randn(4, 2, 8, 8), torch.randn(4, 2, 8, 8)
    alpha = torch.full((4, 1, 1, 1), 0.5)
    reference = skd.gradient_penalty(critic, real, fake, alpha=alpha)
    with torch.autocast("cpu", dtype=torch.float16):
        half = skd.gradient_penalty(critic, real.half(), fake.half(), alpha=alpha)
    assert half.dtype == torch.float32
    assert torch.allclose(half, reference, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# distiller
# ---------------------------------------------------------------------------------------------

K = 4


def _inputs(size=(64, 64), feat_size=(9, 11), requires_grad=True):
    torch.manual_seed(0)
    return dict(logits_s=torch.randn(2, K, *size, requires_grad=requires_grad),
                logits_t=torch.randn(2, K, *size),
                feat_s=torch.randn(2, 6, *feat_size, requires_grad=requires_grad),
                feat_t=torch.randn(2, 8, *feat_size),
                targets=torch.zeros(2, *size, dtype=torch.long))


def test_forward_values_cirkd():
    distiller = skd.SKDDistiller(K).eval()
    x = _inputs()
    losses = distiller(**x)
    assert set(losses) == {"loss_skd_pi", "loss_skd_pa", "loss_skd_ho"}
    assert torch.allclose(losses["loss_skd_pi"], skd.pixel_wise_kd(x["logits_s"], x["logits_t"]))
    assert torch.allclose(losses["loss_skd_pa"],
                          10.0 * skd.pair_wise_kd(x["feat_s"], x["feat_t"], kernel=2))
    with torch.no_grad():
        d_out = distiller.discriminator(x["logits_s"])
    assert torch.allclose(losses["loss_skd_ho"], -0.001 * d_out.mean())


def test_forward_values_original():
    distiller = skd.SKDDistiller(K, **SKD_ORIGINAL_OPTIONS).eval()
    x = _inputs(feat_size=(13, 13))
    losses = distiller(**x)
    assert torch.allclose(losses["loss_skd_pi"], 10.0 * skd.pixel_wise_kd(
        x["logits_s"], x["logits_t"], normalize="spatial"))
    assert torch.allclose(losses["loss_skd_pa"], 0.5 * skd.pair_wise_kd(
        x["feat_s"], x["feat_t"], kernel=(6, 6), detach_norm=True))
    with torch.no_grad():
        d_out = distiller.discriminator(x["logits_s"])
    assert torch.allclose(losses["loss_skd_ho"], -0.1 * d_out.mean())


def test_forward_gives_no_gradient_to_discriminator():
    distiller = skd.SKDDistiller(K).train()
    x = _inputs()
    sum(distiller(**x).values()).backward()
    assert all(p.grad is None for p in distiller.discriminator.parameters())
    assert all(p.requires_grad for p in distiller.discriminator.parameters())
    assert x["logits_s"].grad is not None and x["feat_s"].grad is not None
    assert x["logits_t"].grad is None and x["feat_t"].grad is None


@pytest.mark.parametrize("options, keys", [({}, {"loss_skd_d"}),
                                           (SKD_ORIGINAL_OPTIONS, {"loss_skd_d", "loss_skd_gp"})],
                         ids=["cirkd", "original"])
def test_d_step_losses(options, keys):
    distiller = skd.SKDDistiller(K, **options).eval()  # eval: BN and SN state stay fixed
    x = _inputs()
    torch.manual_seed(5)
    losses = distiller.d_step_losses(x["logits_s"], x["logits_t"])
    assert set(losses) == keys
    disc = distiller.discriminator
    with torch.no_grad():
        d_s, d_t = disc(x["logits_s"]), disc(x["logits_t"])
    assert torch.allclose(losses["loss_skd_d"], 0.1 * skd.adv_d_loss(d_s, d_t, distiller.adv_type))
    if "loss_skd_gp" in keys:
        torch.manual_seed(5)
        penalty = skd.gradient_penalty(disc, x["logits_t"], x["logits_s"])
        assert torch.allclose(losses["loss_skd_gp"], 1.0 * penalty, rtol=1e-5)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert x["logits_s"].grad is None


def test_extra_losses_takes_forward_inputs():
    distiller = skd.SKDDistiller(K).train()
    x = _inputs()
    losses = distiller.extra_losses(**x)
    assert set(losses) == {"loss_skd_d"} and torch.isfinite(losses["loss_skd_d"])


def test_extra_losses_pass_a_non_finite_value_on_to_the_engine():
    """No read of its own: the engine checks the D loss with the student's (test_engine's non-finite tests)."""
    distiller = skd.SKDDistiller(K).train()
    x = _inputs(requires_grad=False)
    x["logits_s"][0, 0, 0, 0] = float("nan")
    assert torch.isnan(distiller.extra_losses(**x)["loss_skd_d"])


def test_extra_optimizer_cirkd():
    distiller = skd.SKDDistiller(K)
    optimizer, lr_lambda = distiller.extra_optimizer(total_iters=100)
    assert type(optimizer) is torch.optim.Adam and lr_lambda is None
    group = optimizer.param_groups[0]
    assert group["lr"] == 4e-4 and group["betas"] == (0.9, 0.99) and group["weight_decay"] == 0
    assert {id(p) for p in group["params"]} == {id(p) for p in distiller.extra_parameters()}
    assert len(distiller.extra_parameters()) == len(list(distiller.discriminator.parameters()))


def test_extra_optimizer_original():
    distiller = skd.SKDDistiller(K, **SKD_ORIGINAL_OPTIONS)
    optimizer, lr_lambda = distiller.extra_optimizer(total_iters=100)
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert group["lr"] == 4e-4 and group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
    assert lr_lambda(0) == 1.0
    assert math.isclose(lr_lambda(50), 0.5 ** 0.9)
    assert lr_lambda(100) == 0.0
    assert pickle.loads(pickle.dumps(lr_lambda))(50) == lr_lambda(50)
    with pytest.raises(ValueError, match="total_iters"):
        distiller.extra_optimizer(0)


@pytest.mark.parametrize("flag, missing", [("use_pi", "loss_skd_pi"), ("use_pa", "loss_skd_pa"),
                                           ("use_ho", "loss_skd_ho")])
def test_disabled_terms_omit_keys(flag, missing):
    distiller = skd.SKDDistiller(K, **{flag: False})
    losses = distiller(**_inputs())
    assert missing not in losses and len(losses) == 2


def test_without_holistic_term_there_is_no_discriminator():
    distiller = skd.SKDDistiller(K, use_ho=False)
    x = _inputs()
    assert distiller.discriminator is None
    assert distiller.extra_parameters() == []
    assert distiller.extra_optimizer(10) is None
    assert distiller.extra_losses(**x) == {}
    assert distiller.d_step_losses(x["logits_s"], x["logits_t"]) == {}


def test_pair_wise_term_requires_features():
    distiller = skd.SKDDistiller(K, use_ho=False)
    logits = torch.randn(2, K, 3, 3), torch.randn(2, K, 3, 3)  # no D, so any logit size works
    assert set(distiller(*logits, torch.randn(2, 6, 5, 5), torch.randn(2, 8, 5, 5))) == {
        "loss_skd_pi", "loss_skd_pa"}
    with pytest.raises(ValueError, match="feat_s and feat_t"):
        distiller(*logits)


def test_overrides():
    distiller = skd.SKDDistiller(
        K, lambda_pi=2.0, lambda_pa=3.0, lambda_adv=0.5, lambda_d=0.7, tau=4.0,
        pi_normalize="spatial", pa_kernel=None, pa_scale=0.25, pa_detach_norm=True, adv_type="wgan", lambda_gp=5.0)
    assert (distiller.lambda_pi, distiller.lambda_pa, distiller.lambda_adv, distiller.lambda_d,
            distiller.lambda_gp, distiller.tau) == (2.0, 3.0, 0.5, 0.7, 5.0, 4.0)
    assert (distiller.pi_normalize, distiller.pa_kernel, distiller.pa_scale,
            distiller.pa_detach_norm, distiller.adv_type) == ("spatial", None, 0.25, True, "wgan")
    x = _inputs(feat_size=(12, 12))
    losses = distiller.eval()(**x)
    assert torch.allclose(losses["loss_skd_pi"], 2.0 * skd.pixel_wise_kd(
        x["logits_s"], x["logits_t"], tau=4.0, normalize="spatial"))
    assert torch.allclose(losses["loss_skd_pa"], 3.0 * skd.pair_wise_kd(
        x["feat_s"], x["feat_t"], kernel=(3, 3), detach_norm=True))
    d_losses = distiller.d_step_losses(x["logits_s"], x["logits_t"])
    assert set(d_losses) == {"loss_skd_d", "loss_skd_gp"}
    assert skd.SKDDistiller(K, **{**SKD_ORIGINAL_OPTIONS, "pa_kernel": 4, "pa_scale": None}).pa_kernel == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(pa_kernel=2, pa_scale=0.5), "not both"),
    (dict(pa_kernel=None), "give pa_kernel or pa_scale"),
    (dict(adv_type="wgan"), "needs lambda_gp"),
    (dict(lambda_gp=10.0), "only applies"),
    (dict(adv_type="lsgan"), "adv_type"),
    (dict(pi_normalize="batch"), "pi_normalize"),
    (dict(d_optimizer="rmsprop"), "d_optimizer"),
    (dict(pa_kernel=0), "kernel"),
])
def test_bad_configuration_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        skd.SKDDistiller(K, **kwargs)


def test_lr_lambda_is_a_partial_of_poly_factor():
    _, lr_lambda = skd.SKDDistiller(K, **SKD_ORIGINAL_OPTIONS).extra_optimizer(8)
    assert isinstance(lr_lambda, functools.partial) and lr_lambda.func is skd.poly_lr_factor


# ---------------------------------------------------------------------------------------------
# the protocols: settings and pinned losses
# ---------------------------------------------------------------------------------------------

# Settings of each protocol, written out from the references (docs/specs/skd.md §5; depth: ours,
# docs/specs/depth_fcos.md §4). The D optimizer is pinned through the built optimizer below.
PROTOCOL_SETTINGS = {
    "cirkd": dict(tau=1.0, pi_normalize="pixels", lambda_pi=1.0, pa_kernel=2, pa_scale=None, pa_detach_norm=False,
                  lambda_pa=10.0, adv_type="hinge", lambda_adv=0.001, lambda_d=0.1, lambda_gp=None),
    "original": dict(tau=1.0, pi_normalize="spatial", lambda_pi=10.0, pa_kernel=None, pa_scale=0.5,
                     pa_detach_norm=True, lambda_pa=0.5, adv_type="wgan", lambda_adv=0.1, lambda_d=0.1,
                     lambda_gp=10.0),
    "depth": dict(tau=1.0, pi_normalize="pixels", lambda_pi=1.0, pa_kernel=4, pa_scale=None, pa_detach_norm=False,
                  lambda_pa=1.0, adv_type="hinge", lambda_adv=0.001, lambda_d=0.1, lambda_gp=None),
}
# (optimizer type, lr, weight decay, betas or momentum, lr factor at 0 / 50 of 100 iterations, synchronised BN)
PROTOCOL_OPTIMIZERS = {
    "cirkd": (torch.optim.Adam, 4e-4, 0.0, (0.9, 0.99), None, True),
    "original": (torch.optim.SGD, 4e-4, 5e-4, 0.9, (1.0, 0.5 ** 0.9), False),
    "depth": (torch.optim.Adam, 4e-4, 0.0, (0.9, 0.99), None, True),
}
# forward and extra_losses on _protocol_inputs(1), the distiller built after torch.manual_seed(0) and the
# D step run after torch.manual_seed(2) (its gradient-penalty draw)
PROTOCOL_LOSSES = {
    "cirkd": ({"loss_skd_pi": 0.6074062585830688, "loss_skd_pa": 0.9667819738388062,
               "loss_skd_ho": 5.011765824747272e-05}, {"loss_skd_d": 0.1978929042816162}),
    "original": ({"loss_skd_pi": 12.148124694824219, "loss_skd_pa": 0.02457541786134243,
                  "loss_skd_ho": 0.005011765751987696},
                 {"loss_skd_d": -0.002107097767293453, "loss_skd_gp": 0.9236916303634644}),
    "depth": ({"loss_skd_pi": 0.6267739534378052, "loss_skd_pa": 0.003439187305048108,
               "loss_skd_ho": -1.4339066183310933e-05}, {"loss_skd_d": 0.19934095442295074}),
}


def _protocol_distiller(protocol):
    torch.manual_seed(0)
    if protocol == "depth":
        return skd.DepthSKDDistiller(K).train()
    return skd.SKDDistiller(K, **(SKD_ORIGINAL_OPTIONS if protocol == "original" else {})).train()


def _protocol_inputs(seed, protocol):
    generator = torch.Generator().manual_seed(seed)
    size, feat_size = ((16, 16), (16, 16)) if protocol == "depth" else ((64, 64), (13, 13))
    x = dict(logits_s=torch.randn(2, K, *size, generator=generator),
             logits_t=torch.randn(2, K, *size, generator=generator),
             feat_s=torch.randn(2, 6, *feat_size, generator=generator),
             feat_t=torch.randn(2, 8, *feat_size, generator=generator))
    if protocol == "depth":
        x.update(log_depth_s=torch.randn(2, 1, 64, 64, generator=generator),
                 log_depth_t=torch.randn(2, 1, 64, 64, generator=generator))
    return x


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_SETTINGS))
def test_each_protocol_has_its_settings_and_pinned_losses(protocol):
    distiller = _protocol_distiller(protocol)
    parts = [distiller] if protocol != "depth" else [distiller.maps, distiller.holistic]
    for part in parts:
        assert {name: getattr(part, name) for name in PROTOCOL_SETTINGS[protocol]} == PROTOCOL_SETTINGS[protocol]
    kind, lr, weight_decay, betas_or_momentum, factors, synchronised = PROTOCOL_OPTIMIZERS[protocol]
    optimizer, lr_lambda = distiller.extra_optimizer(100)
    group = optimizer.param_groups[0]
    assert type(optimizer) is kind and (group["lr"], group["weight_decay"]) == (lr, weight_decay)
    assert group["betas" if kind is torch.optim.Adam else "momentum"] == betas_or_momentum
    assert (lr_lambda is None) if factors is None else (lr_lambda(0), lr_lambda(50)) == pytest.approx(factors)
    assert bool(distiller.sync_batchnorm_modules()) == synchronised

    x = _protocol_inputs(1, protocol)
    student, critic = PROTOCOL_LOSSES[protocol]
    assert {k: v.item() for k, v in distiller(**x).items()} == pytest.approx(student, rel=1e-6)
    torch.manual_seed(2)
    assert {k: v.item() for k, v in distiller.extra_losses(**x).items()} == pytest.approx(critic, rel=1e-6)
