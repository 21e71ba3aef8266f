"""SoKD's bi-level policy search and plug-in (kd_ref/sokd.py SoKDSearch, BoundBase, SoKDPlugin): the search
against the spec's finite difference, and the base method's loss next to SoKD's own terms."""

import pytest
import torch
import torch.nn as nn

from kd_ref import engine
from kd_ref.kd import KDDistiller, kd_loss
from kd_ref.recipe import Recipe
from kd_ref.sokd import BoundBase, SoKDDistiller, SoKDPlugin, SoKDSearch
from model_helpers import force_sub_policy


# ------------------------------------------------------------------------------------- SoKD: search
class TinyStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, images):
        return torch.tanh(self.bn(self.conv(images)))


def _search_setup(search_mode, **search_kwargs):
    torch.manual_seed(0)
    student = TinyStudent()
    distiller = SoKDDistiller((2, 6, 8, 8), (2, 4, 4, 4), num_heat=2, k=2, w_feat=1.0, w_dam=1.0,
                              search_mode=search_mode)
    force_sub_policy(distiller.policy, ("ShearX", "Rotate"), levels=(0.625, 0.25))
    batch = {"images": torch.randn(2, 3, 8, 8), "teacher": torch.randn(2, 4, 4, 4)}
    calls = []

    def loss_fn(b):
        calls.append(1)
        return sum(distiller(student(b["images"]), b["teacher"]).values())

    return student, distiller, batch, loss_fn, calls, SoKDSearch(distiller, student, **search_kwargs)


def _magnitude_grad(loss_fn, batch, distiller):
    return torch.autograd.grad(loss_fn(batch), distiller.policy.magnitude)[0]


def test_unrolled_gradient_is_the_finite_difference_of_the_spec():
    student, distiller, batch, loss_fn, calls, search = _search_setup("unrolled")
    params = search.inner_params
    before = [p.detach().clone() for p in params] + [b.clone() for b in search.buffers]

    grads = search.policy_gradients(batch, loss_fn)
    assert len(calls) == 4 and [g.shape for g in grads] == [p.shape for p in distiller.policy_parameters()]
    after = [p.detach() for p in params] + list(search.buffers)
    assert all(torch.equal(a, b) for a, b in zip(before, after))     # theta and BN statistics restored

    # independent recomputation: theta' -> v -> central difference of dL/dmagnitude at theta +/- eps v
    theta = [p.detach().clone() for p in params]
    g = torch.autograd.grad(loss_fn(batch), params)
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.sub_(0.01 * (gi + 1e-4 * p))
    v = torch.autograd.grad(loss_fn(batch), params)
    eps = 0.01 / torch.sqrt(sum((vi ** 2).sum() for vi in v))

    def grad_at(sign):
        with torch.no_grad():
            for p, t, vi in zip(params, theta, v):
                p.copy_(t + sign * eps * vi)
        return _magnitude_grad(loss_fn, batch, distiller)

    expected = -(grad_at(1) - grad_at(-1)) / (2 * eps)
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
    torch.testing.assert_close(grads[2], expected, rtol=1e-3, atol=1e-4)

    # with a radius small enough to keep the DAM's (piecewise constant) boxes fixed, the estimate is the
    # mixed second derivative -(d^2 L / d magnitude d theta) v of the spec
    loss = loss_fn(batch)
    d_theta = torch.autograd.grad(loss, params, create_graph=True)
    hvp = torch.autograd.grad(sum((dt * vi).sum() for dt, vi in zip(d_theta, v)), distiller.policy.magnitude)[0]
    small_radius = SoKDSearch(distiller, student, fd_radius=1e-4).policy_gradients(batch, loss_fn)[2]
    torch.testing.assert_close(small_radius, -hvp, rtol=2e-2, atol=1e-3)
    assert hvp.abs().sum() > 0


def test_search_step_moves_the_policy_against_its_gradient_estimate():
    student, distiller, batch, loss_fn, calls, search = _search_setup("unrolled", lr=0.05)
    with torch.random.fork_rng():
        grads = search.policy_gradients(batch, loss_fn)
    params = distiller.policy_parameters()
    before = [p.detach().clone() for p in params]
    seed_before = int(distiller.policy.op_seed)
    search.step(batch, loss_fn)
    for p, p0, g in zip(params, before, grads):
        g = g + 1e-3 * p0                                             # Adam's L2 weight decay
        torch.testing.assert_close(p.detach() - p0, -0.05 * g / (g.abs() + 1e-8), rtol=1e-3, atol=1e-6)
    assert search.steps == 1 and int(distiller.policy.op_seed) != seed_before      # resampled afterwards


def test_first_order_mode_uses_one_evaluation_at_theta():
    student, distiller, batch, loss_fn, calls, search = _search_setup("first_order")
    theta = [p.detach().clone() for p in search.inner_params]
    grads = search.policy_gradients(batch, loss_fn)
    assert len(calls) == 1
    assert all(torch.equal(p, t) for p, t in zip(search.inner_params, theta))
    torch.testing.assert_close(grads[2], _magnitude_grad(loss_fn, batch, distiller))    # + g(theta)
    reference = distiller.policy.relax_grads(loss_fn(batch))
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want)
    prob_before = distiller.policy.prob.detach().clone()
    search.step(batch, loss_fn)
    expected = -3e-4 * torch.sign(grads[0] + 1e-3 * prob_before)
    torch.testing.assert_close(distiller.policy.prob.detach() - prob_before, expected, rtol=1e-3, atol=1e-7)


def test_policy_is_frozen_after_search_iters_but_still_resampled():
    student, distiller, batch, loss_fn, calls, search = _search_setup("first_order", search_iters=1)
    search.step(batch, loss_fn)
    frozen = [p.detach().clone() for p in distiller.policy_parameters()]
    seeds = set()
    for _ in range(3):
        search.step(batch, loss_fn)
        seeds.add(int(distiller.policy.op_seed))
    assert len(calls) == 1 and len(seeds) == 3
    assert all(torch.equal(p, f) for p, f in zip(distiller.policy_parameters(), frozen))
    state = search.state_dict()
    fresh = SoKDSearch(distiller, student, search_iters=1)
    fresh.load_state_dict(state)
    assert fresh.steps == 4 and not fresh.searching


def test_search_errors_are_clear():
    student, distiller, batch, loss_fn, calls, search = _search_setup("first_order")
    with pytest.raises(ValueError, match="scalar tensor"):
        search.step(batch, lambda b: torch.ones(2, requires_grad=True))
    with pytest.raises(FloatingPointError, match="non-finite"):
        search.step(batch, lambda b: loss_fn(b) * float("nan"))
    with pytest.raises(ValueError, match="SoKDDistiller"):
        SoKDSearch(KDDistiller(), student)
    with pytest.raises(ValueError, match="policy parameters"):
        SoKDSearch(distiller, nn.ModuleList([student, distiller.policy]))
    with pytest.raises(ValueError, match="expected keys"):
        search.load_state_dict({"steps": 0})


def test_search_restores_the_buffers_the_modules_hold_after_a_device_move():
    """Module.to(cuda) replaces buffer tensors (parameters keep their identity); ``_apply`` with a copy does
    the same on the CPU. The search must restore the BN statistics the modules hold then, not stale ones."""
    student, distiller, batch, loss_fn, _, search = _search_setup("unrolled")
    for module in (student, distiller):
        module._apply(lambda tensor: tensor.clone())
    running_mean = distiller.adapter.bn.running_mean
    before = {name: b.clone() for name, b in distiller.named_buffers()}
    search.policy_gradients(batch, loss_fn)
    assert distiller.adapter.bn.running_mean is running_mean
    assert all(torch.equal(before[name], b) for name, b in distiller.named_buffers()), \
        "the search's forwards leaked into the BatchNorm statistics"


# ------------------------------------------------------------------------------------ SoKD: plug-in
class Logits(nn.Module):
    """A base with a parameter and a buffer, so that the search and the state dict must see both."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, logits_s, logits_t):
        self.calls += 1
        return {"loss_scaled": self.scale * kd_loss(logits_s, logits_t)}


def _outputs():
    torch.manual_seed(0)
    student_out = {"feats": {"c3": torch.randn(2, 6, 8, 8, requires_grad=True)}, "logits": torch.randn(2, 10)}
    teacher_out = {"feats": {"c3": torch.randn(2, 4, 4, 4)}, "logits": torch.randn(2, 10)}
    return student_out, teacher_out


def _bind_logits(student_out, teacher_out, batch):
    return {"logits_s": student_out["logits"], "logits_t": teacher_out["logits"]}


def _plugin(base=None, **options):
    return SoKDPlugin(nn.Conv2d(1, 1, 1), (6, 8, 8), (4, 4, 4), num_heat=3, tap="c3", k=3, base=base, **options)


def test_plugin_adds_the_base_terms_to_sokds_own():
    student_out, teacher_out = _outputs()
    plugin = _plugin(BoundBase(KDDistiller(tau=4.0, loss_weight=0.5), _bind_logits)).eval()
    losses = plugin(student_out, teacher_out, {})
    assert list(losses) == ["loss_sokd_feat", "loss_sokd_dam", "loss_sokd_base_kd"]
    torch.testing.assert_close(losses["loss_sokd_base_kd"],
                               0.5 * kd_loss(student_out["logits"], teacher_out["logits"], 4.0))
    own = plugin.sokd(student_out["feats"]["c3"], teacher_out["feats"]["c3"])
    assert all(torch.equal(losses[name], own[name]) for name in own)
    tensor_base = _plugin(BoundBase(lambda logits_s, logits_t: kd_loss(logits_s, logits_t), _bind_logits))
    assert "loss_sokd_base" in tensor_base.eval()(student_out, teacher_out, {})
    assert set(_plugin().eval()(student_out, teacher_out, {})) == {"loss_sokd_feat", "loss_sokd_dam"}


def test_plugin_errors_are_clear():
    student_out, teacher_out = _outputs()
    with pytest.raises(ValueError, match=r"'loss_\*' keys"):
        _plugin(BoundBase(lambda logits_s, logits_t: {"kd": logits_s.sum()}, _bind_logits))(student_out, teacher_out, {})
    with pytest.raises(ValueError, match="the teacher outputs have no feature 'c3'"):
        _plugin()(student_out, {"feats": {}}, {})
    with pytest.raises(ValueError, match="engine hook extra_parameters"):
        BoundBase(_plugin(), _bind_logits)


def test_the_search_and_the_student_optimizer_train_the_base_with_the_student_side():
    base = BoundBase(Logits(), _bind_logits)
    plugin = _plugin(base)
    inner = {id(p) for p in plugin.search.inner_params}
    assert id(base.distiller.scale) in inner and not inner & {id(p) for p in plugin.extra_parameters()}
    assert any(b is base.distiller.calls for b in plugin.search.buffers)
    optimizers = engine.build_optimizers(Recipe(), nn.Conv2d(1, 1, 1), plugin)
    expected = [*plugin.sokd.student_side_parameters(), base.distiller.scale]
    assert [id(p) for p in optimizers.distiller_params] == [id(p) for p in expected]


def test_plugin_saves_the_base_under_its_module_keys():
    plugin = _plugin(BoundBase(Logits(), _bind_logits))
    keys = list(plugin.state_dict())
    assert keys[0] == "_extra_state" and keys[-2:] == ["base.distiller.scale", "base.distiller.calls"]
    assert not any(key.startswith("sokd.base.") for key in keys)
    other = _plugin(BoundBase(Logits(), _bind_logits))
    with torch.no_grad():
        plugin.base.distiller.scale.fill_(5.0)
    other.load_state_dict(plugin.state_dict())
    assert other.base.distiller.scale.item() == 5.0
