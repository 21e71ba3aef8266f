"""Vanilla knowledge distillation: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network",
arXiv:1503.02531. For the logits ``z_s, z_t`` of one instance (an image, or one pixel of dense logits):

    p_t = softmax(z_t / tau),   log q_s = log_softmax(z_s / tau)
    L_kd = tau^2 * mean over instances of sum_k p_t[k] (log p_t[k] - log q_s[k])

Dense logits ``(N, K, H, W)`` make every pixel one instance (normalised by the pixel count, as CIRKD);
``tau^2`` keeps gradient magnitudes independent of the temperature. The file ends with KD's wiring.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kd_ref.detectors import is_two_stage
from kd_ref.distiller import Distiller, Method, keyword_options


def kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``tau^2`` times the mean over instances of KL(p_t || p_s); ``(B, K)`` or ``(N, K, H, W)``."""
    if logits_s.shape != logits_t.shape:
        raise ValueError(f"kd_loss: student logits {tuple(logits_s.shape)} and teacher logits "
                         f"{tuple(logits_t.shape)} must have the same shape")
    log_q = F.log_softmax(logits_s.float() / tau, dim=1)
    log_p = F.log_softmax(logits_t.detach().float() / tau, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return tau ** 2 * kl.mean()


class KDDistiller(Distiller):
    """Logit KD on the main head: ``{"loss_kd": loss_weight * kd_loss(z_s, z_t, tau)}``."""

    def __init__(self, tau: float = 1.0, loss_weight: float = 1.0):
        super().__init__()
        self.tau = tau
        self.loss_weight = loss_weight

    def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor, targets=None) -> dict:
        return {"loss_kd": self.loss_weight * kd_loss(logits_s, logits_t, self.tau)}


# ------------------------------------------------------------------------------------------ wiring
def _check(recipe):
    if recipe.task == "det" and not is_two_stage(recipe.student):
        raise ValueError(f"--method kd on detection distils Faster R-CNN's RoI class logits; {recipe.student} "
                         "has none (a one-stage detector's per-anchor sigmoid scores are not a softmax)")


def _build(recipe, student, teacher):
    _check(recipe)
    return KDDistiller(**recipe.method_options)


def _bind_logits(student_out, teacher_out, batch):
    return {"logits_s": student_out["logits"], "logits_t": teacher_out["logits"]}


def _bind_det(student_out, teacher_out, batch):
    """Softmax KD on the RoI class logits (K + 1, with background) of the student's sampled RoIs, which the
    teacher's RoI head scores too (engine.teacher_inputs): the logit base of SoKD's COCO code
    (docs/specs/sokd.md §5; its per-RoI class mask is not reproduced, ours)."""
    return {"logits_s": student_out["roi_cls_logits"], "logits_t": teacher_out["roi_cls_logits"]}


METHOD = Method(build=_build, bind={"seg": _bind_logits, "cls": _bind_logits, "det": _bind_det}, check=_check,
                options=lambda recipe: keyword_options(KDDistiller))
