import json
from pathlib import Path

import pytest
import torch

from kd_ref import dist
from kd_ref.dist import (DISTDistiller, dist_loss, dist_loss_terms, flatten_dense, inter_class_relation,
                         intra_class_relation, pearson_correlation)

DATA = Path(__file__).parent / "data" / "dist"
CASES = json.loads((DATA / "cases.json").read_text())["cases"]
LOSS_CASES = [c for c in CASES if "tensor_args" in c]
FUNCTION_CASES = [c for c in CASES if "checks" in c]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _function(dotted_name):
    module_name, _, name = dotted_name.rpartition(".")
    assert module_name == "kd_ref.dist"
    return getattr(dist, name)


# ---------------------------------------------------------------- golden cases

def test_every_golden_case_is_exercised():
    assert {c["name"] for c in LOSS_CASES + FUNCTION_CASES} == {c["name"] for c in CASES}
    assert len(LOSS_CASES) == 5 and len(FUNCTION_CASES) == 1


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c["name"])
def test_golden_dist_loss_value_gradient_and_terms(case):
    blob = torch.load(DATA / case["file"])
    tol = case["tolerance"]
    kwargs = case["kwargs"]
    logits_s = blob["logits_s"].clone().requires_grad_(True)
    logits_t = blob["logits_t"]

    loss = _function(case["function"])(logits_s, logits_t, **kwargs)
    loss.backward()
    assert loss.shape == ()
    torch.testing.assert_close(loss.detach(), blob["loss"], **tol)
    torch.testing.assert_close(logits_s.grad, blob["grad_logits_s"], **tol)

    inter, intra = dist_loss_terms(blob["logits_s"], logits_t, tau=kwargs["tau"],
                                   use_sigmoid=kwargs["use_sigmoid"])
    torch.testing.assert_close(inter, blob["inter"], **tol)
    torch.testing.assert_close(intra, blob["intra"], **tol)


@pytest.mark.parametrize("case", FUNCTION_CASES, ids=lambda c: c["name"])
def test_golden_pure_functions(case):
    blob = torch.load(DATA / case["file"])
    for check in case["checks"]:
        out = _function(check["function"])(*(blob[a] for a in check["args"]), **check["kwargs"])
        assert list(out.shape) == check["expected_shape"], check["function"]
        torch.testing.assert_close(out, blob[check["expected"]], **case["tolerance"])
    # The uniform teacher row must give exactly 0, which pins eps to the product of norms.
    assert pearson_correlation(blob["y_s"], blob["y_t"])[2].item() == 0.0


# ---------------------------------------------------------------- hand-computed values

def test_pearson_hand_values():
    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    b = torch.tensor([[2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [1.0, 0.0, 1.0]])
    torch.testing.assert_close(pearson_correlation(a, b), torch.tensor([1.0, -1.0, -1.0]))
    # rows: mean of (1, -1, -1) -> 1 - (-1/3)
    torch.testing.assert_close(inter_class_relation(a, b), torch.tensor(4.0 / 3.0))


def test_intra_is_inter_of_transpose():
    y_s, y_t = torch.rand(6, 4), torch.rand(6, 4)
    torch.testing.assert_close(intra_class_relation(y_s, y_t), inter_class_relation(y_s.T, y_t.T))


def test_flatten_dense_moves_channels_last():
    z = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    rows = flatten_dense(z)
    assert rows.shape == (8, 3)
    # row 5 = image 1, position (0, 1): the 3 channel values of that pixel
    torch.testing.assert_close(rows[5], z[1, :, 0, 1])
    plain = torch.rand(4, 7)
    assert flatten_dense(plain) is plain


def test_terms_scale_with_tau_squared_and_weights():
    logits_s, logits_t = torch.randn(5, 6), torch.randn(5, 6)
    inter1, intra1 = dist_loss_terms(logits_s / 3.0, logits_t / 3.0, tau=1.0)
    inter3, intra3 = dist_loss_terms(logits_s, logits_t, tau=3.0)
    torch.testing.assert_close(inter3, 9.0 * inter1)
    torch.testing.assert_close(intra3, 9.0 * intra1)
    torch.testing.assert_close(dist_loss(logits_s, logits_t, beta=0.5, gamma=2.0, tau=3.0),
                               0.5 * inter3 + 2.0 * intra3)


def test_sigmoid_probabilities_are_elementwise():
    logits_s, logits_t = torch.randn(4, 5), torch.randn(4, 5)
    expected = (inter_class_relation(logits_s.sigmoid(), logits_t.sigmoid())
                + intra_class_relation(logits_s.sigmoid(), logits_t.sigmoid()))
    torch.testing.assert_close(dist_loss(logits_s, logits_t, use_sigmoid=True), expected)


# ---------------------------------------------------------------- properties

def test_constant_row_gives_rho_zero_and_finite_gradient():
    y_s = torch.rand(3, 8, requires_grad=True)
    y_t = torch.rand(3, 8)
    y_t[1] = 0.125
    rho = pearson_correlation(y_s, y_t)
    assert rho[1].item() == 0.0
    # a student whose logits are constant gives a uniform row: also rho 0, gradients stay finite
    logits_s = torch.zeros(2, 8, requires_grad=True)
    inter, _ = dist_loss_terms(logits_s, torch.randn(2, 8))
    assert inter.item() == 1.0
    inter.backward()
    assert torch.isfinite(logits_s.grad).all()


def test_dense_row_permutation_invariance():
    logits_s, logits_t = torch.randn(2, 7, 3, 4), torch.randn(2, 7, 3, 4)
    rows_s, rows_t = flatten_dense(logits_s), flatten_dense(logits_t)
    perm = torch.randperm(rows_s.shape[0])
    for tau, use_sigmoid in ((1.0, False), (2.0, False), (1.0, True)):
        dense = dist_loss(logits_s, logits_t, beta=0.7, gamma=1.3, tau=tau, use_sigmoid=use_sigmoid)
        shuffled = dist_loss(rows_s[perm], rows_t[perm], beta=0.7, gamma=1.3, tau=tau,
                             use_sigmoid=use_sigmoid)
        torch.testing.assert_close(dense, shuffled)


@pytest.mark.parametrize("tau,beta,gamma", [(1.0, 1.0, 1.0), (4.0, 2.0, 2.0), (2.0, 0.5, 1.5)])
def test_loss_bounds(tau, beta, gamma):
    upper = 2 * tau ** 2 * (beta + gamma)
    for _ in range(5):
        loss = dist_loss(5 * torch.randn(6, 5), 5 * torch.randn(6, 5), beta, gamma, tau)
        assert 0.0 <= loss.item() <= upper
    logits = torch.randn(6, 5)
    # rho(x, x) = |x|^2 / (|x|^2 + eps): 0 up to the eps of near-uniform (high tau) probabilities
    assert dist_loss(logits, logits, beta, gamma, tau).item() == pytest.approx(0.0, abs=1e-4 * upper)
    # with sigmoid probabilities p(-z) = 1 - p(z): perfectly anti-correlated -> the upper bound
    assert dist_loss(-logits, logits, beta, gamma, tau=1.0, use_sigmoid=True).item() == pytest.approx(
        2 * (beta + gamma), rel=1e-5)


def test_pure_functions_do_not_mutate_or_backprop_into_teacher():
    logits_s = torch.randn(2, 5, 3, 3, requires_grad=True)
    logits_t = torch.randn(2, 5, 3, 3, requires_grad=True)
    before = logits_t.detach().clone()
    dist_loss(logits_s, logits_t, tau=2.0).backward()
    assert logits_t.grad is None
    assert logits_s.grad is not None and logits_s.grad.abs().sum() > 0
    assert torch.equal(logits_t.detach(), before)

    y_t = torch.rand(4, 3, requires_grad=True)
    inter_class_relation(torch.rand(4, 3, requires_grad=True), y_t).backward()
    assert y_t.grad is None


def test_loss_is_float32_under_autocast():
    logits_s = torch.randn(2, 4, 3, 3).bfloat16()
    logits_t = torch.randn(2, 4, 3, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dist_loss(logits_s, logits_t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, dist_loss(logits_s.float(), logits_t.float()))


# ---------------------------------------------------------------- distiller

@pytest.mark.parametrize("task", dist.TASKS)
def test_distiller_has_no_parameters(task):
    assert sum(p.numel() for p in DISTDistiller(task).parameters()) == 0
    assert DISTDistiller(task).state_dict() == {}


def test_seg_distiller_weights_and_aux_only_when_both_have_aux():
    def out(aux):
        d = {"logits": torch.randn(2, 5, 4, 4)}
        if aux:
            d["aux_logits"] = torch.randn(2, 5, 4, 4)
        return d

    distiller = DISTDistiller("seg", beta=1.5, gamma=0.5, loss_weight=3.0, aux_weight=0.4)
    student, teacher = out(True), out(True)
    losses = distiller(student, teacher, targets=torch.zeros(2, 32, 32, dtype=torch.long))
    assert set(losses) == {"loss_dist", "loss_dist_aux"}
    torch.testing.assert_close(losses["loss_dist"],
                               3.0 * dist_loss(student["logits"], teacher["logits"], 1.5, 0.5))
    torch.testing.assert_close(losses["loss_dist_aux"],
                               0.4 * 3.0 * dist_loss(student["aux_logits"], teacher["aux_logits"], 1.5, 0.5))
    assert set(distiller(out(True), out(False))) == {"loss_dist"}
    assert set(distiller(out(False), out(True))) == {"loss_dist"}
    assert set(distiller(out(False), out(False))) == {"loss_dist"}
    assert set(distiller(out(True), {**out(False), "aux_logits": None})) == {"loss_dist"}


def test_seg_distiller_does_not_backprop_into_teacher():
    student = {"logits": torch.randn(2, 5, 4, 4, requires_grad=True),
               "aux_logits": torch.randn(2, 5, 4, 4, requires_grad=True)}
    teacher = {k: torch.randn(2, 5, 4, 4, requires_grad=True) for k in student}
    sum(DISTDistiller("seg")(student, teacher).values()).backward()
    assert all(v.grad is None for v in teacher.values())
    assert all(v.grad is not None for v in student.values())


def test_cls_distiller():
    logits_s, logits_t = torch.randn(8, 10), torch.randn(8, 10)
    losses = DISTDistiller("cls", tau=4.0, loss_weight=2.0)(logits_s, logits_t)
    assert set(losses) == {"loss_dist"}
    torch.testing.assert_close(losses["loss_dist"], 2.0 * dist_loss(logits_s, logits_t, tau=4.0))


def test_det_retina_distiller_one_sigmoid_term_per_level():
    shapes = [(2, 18, 8, 8), (2, 18, 4, 4), (2, 18, 2, 2), (2, 18, 1, 1), (2, 18, 1, 1)]
    levels_s = [torch.randn(s, requires_grad=True) for s in shapes]
    levels_t = [torch.randn(s, requires_grad=True) for s in shapes]
    losses = DISTDistiller("det_retina", use_sigmoid=True, loss_weight=2.0)(levels_s, levels_t)
    assert list(losses) == [f"loss_dist_l{i}" for i in range(5)]
    for i in range(5):
        torch.testing.assert_close(losses[f"loss_dist_l{i}"],
                                   2.0 * dist_loss(levels_s[i], levels_t[i], use_sigmoid=True))
    sum(losses.values()).backward()
    assert all(t.grad is None for t in levels_t)


def test_det_frcnn_distiller():
    rois_s, rois_t = torch.randn(16, 81), torch.randn(16, 81)
    losses = DISTDistiller("det_frcnn")(rois_s, rois_t)
    assert set(losses) == {"loss_dist_roi"}
    torch.testing.assert_close(losses["loss_dist_roi"], dist_loss(rois_s, rois_t))


# ---------------------------------------------------------------- bad input

def test_shape_mismatch_errors():
    with pytest.raises(ValueError, match=r"student \(4, 5\) and teacher \(4, 6\)"):
        dist_loss(torch.randn(4, 5), torch.randn(4, 6))
    with pytest.raises(ValueError, match="pearson_correlation"):
        pearson_correlation(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"flatten_dense: expected logits of shape \(B, C\)"):
        flatten_dense(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="aux_logits"):
        DISTDistiller("seg")({"logits": torch.randn(1, 3, 4, 4), "aux_logits": torch.randn(1, 3, 4, 4)},
                             {"logits": torch.randn(1, 3, 4, 4), "aux_logits": torch.randn(1, 3, 2, 2)})


def test_distiller_input_errors():
    with pytest.raises(ValueError, match="task must be one of"):
        DISTDistiller("depth")
    with pytest.raises(ValueError, match="tau must be positive"):
        DISTDistiller("cls", tau=0.0)
    with pytest.raises(ValueError, match="student_out must be a model output dict with key 'logits'"):
        DISTDistiller("seg")(torch.randn(1, 3, 4, 4), {"logits": torch.randn(1, 3, 4, 4)})
    with pytest.raises(ValueError, match="student has 2 FPN levels, teacher has 3"):
        DISTDistiller("det_retina")([torch.randn(1, 4, 2, 2)] * 2, [torch.randn(1, 4, 2, 2)] * 3)
    with pytest.raises(ValueError, match="must be a non-empty list"):
        DISTDistiller("det_retina")(torch.randn(1, 4, 2, 2), [torch.randn(1, 4, 2, 2)])
    with pytest.raises(ValueError, match="student logits must be a 2-D tensor"):
        DISTDistiller("cls")(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="teacher RoI class logits must be a 2-D tensor"):
        DISTDistiller("det_frcnn")(torch.randn(4, 3), torch.randn(4))

