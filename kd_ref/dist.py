"""DIST: "Knowledge Distillation from A Stronger Teacher" (Huang, You, Wang, Qian, Xu, NeurIPS 2022,
arXiv:2205.10536).

DIST replaces the exact match of KL-based KD by a match of *relations*, measured with the Pearson
correlation, so that a student only has to preserve the teacher's preferences, not its values.
For student/teacher logits ``z_s, z_t`` of shape ``(B, C)`` (rows = instances, columns = classes):

    P_s = softmax(z_s / tau, dim=1),  P_t = softmax(z_t / tau, dim=1)   (sigmoid heads: sigmoid(z / tau))
    rho(u, v) = <u - mean(u), v - mean(v)> / (||u - mean(u)|| * ||v - mean(v)|| + eps),  eps = 1e-8
    L_inter = tau^2 * (1 - 1/B * sum_i rho(P_s[i, :], P_t[i, :]))      (inter-class: rows)
    L_intra = tau^2 * (1 - 1/C * sum_j rho(P_s[:, j], P_t[:, j]))      (intra-class: columns)
    L_DIST  = beta * L_inter + gamma * L_intra
    L       = alpha * L_task + L_DIST

The public code is followed where it differs from the paper (docs/specs/dist.md; the reasons are in
docs/design/dist.md): ``tau^2`` scales both terms (``tau = 1``, the default, is the segmentation and
detection code); ``eps`` is added once, to the product of the norms; dense logits ``(N, C, H, W)`` flatten
to one instance per pixel of the local batch, unmasked; sigmoid heads (RetinaNet) take a level's ``A*K``
channels as the class axis, one loss per level; Faster R-CNN distils both RoI heads' class logits on the
student's RoIs; segmentation also distils the auxiliary logits (weight 0.4); losses are float32.

The file ends with DIST's wiring: what it reads per task and its ``METHOD`` record.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from kd_ref.detectors import is_two_stage
from kd_ref.distiller import Distiller, Method, keyword_options
from kd_ref.precision import at_least_float32

TASKS = ("seg", "cls", "det_retina", "det_frcnn")


def _check_same_shape(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "must have the same shape")


def pearson_correlation(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of the rows of ``a`` and ``b`` (both ``(R, L)``), shape ``(R,)``."""
    if a.dim() != 2:
        raise ValueError(f"pearson_correlation: a must be 2-D (R, L), got shape {tuple(a.shape)}")
    _check_same_shape("pearson_correlation", a, b)
    a_centred = a - a.mean(dim=1, keepdim=True)
    b_centred = b - b.mean(dim=1, keepdim=True)
    covariance = (a_centred * b_centred).sum(dim=1)
    return covariance / (a_centred.norm(dim=1) * b_centred.norm(dim=1) + eps)


def inter_class_relation(y_s: torch.Tensor, y_t: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 - mean_i rho(y_s[i, :], y_t[i, :])`` for ``(B, C)`` probabilities; teacher detached."""
    return 1.0 - pearson_correlation(y_s, y_t.detach(), eps).mean()


def intra_class_relation(y_s: torch.Tensor, y_t: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1 - mean_j rho(y_s[:, j], y_t[:, j])``: the inter-class relation of the transposes."""
    return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1), eps)


def flatten_dense(z: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W) -> (N*H*W, C)`` with C moved last; ``(B, C)`` is returned unchanged."""
    if z.dim() == 2:
        return z
    if z.dim() == 4:
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    raise ValueError(f"flatten_dense: expected logits of shape (B, C) or (N, C, H, W), "
                     f"got shape {tuple(z.shape)}")


def dist_loss_terms(logits_s: torch.Tensor, logits_t: torch.Tensor, tau: float = 1.0,
                    use_sigmoid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau^2 * inter, tau^2 * intra)`` for ``(B, C)`` or ``(N, C, H, W)`` logits; teacher detached."""
    _check_same_shape("dist_loss_terms: logits", logits_s, logits_t)
    rows_s = flatten_dense(at_least_float32(logits_s)) / tau
    rows_t = flatten_dense(at_least_float32(logits_t.detach())) / tau
    if use_sigmoid:
        y_s, y_t = rows_s.sigmoid(), rows_t.sigmoid()
    else:
        y_s, y_t = rows_s.softmax(dim=1), rows_t.softmax(dim=1)
    return tau ** 2 * inter_class_relation(y_s, y_t), tau ** 2 * intra_class_relation(y_s, y_t)


def dist_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              tau: float = 1.0, use_sigmoid: bool = False) -> torch.Tensor:
    """``L_DIST = beta * tau^2 * L_inter + gamma * tau^2 * L_intra`` (0-dim tensor)."""
    inter, intra = dist_loss_terms(logits_s, logits_t, tau, use_sigmoid)
    return beta * inter + gamma * intra


class DISTDistiller(Distiller):
    """DIST on the outputs the registry binds for ``task``; returns already-weighted losses.

    - ``seg``: model output dicts with ``logits`` (N, K, h, w) and optional ``aux_logits``
      -> ``loss_dist`` and, when both dicts carry aux logits, ``loss_dist_aux``;
    - ``cls``: logits (B, K) -> ``loss_dist``;
    - ``det_retina``: lists of per-FPN-level cls logits (N, A*K, H_l, W_l) -> ``loss_dist_l{i}``,
      one term per level (the reference presets set ``use_sigmoid=True``);
    - ``det_frcnn``: RoI class logits (R, K+1) of both models on the same RoIs -> ``loss_dist_roi``.

    Every loss is multiplied by ``loss_weight``; the seg auxiliary loss also by ``aux_weight``.
    ``targets`` is accepted for the engine's uniform call and ignored: DIST uses no labels.
    """

    def __init__(self, task: str, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0,
                 loss_weight: float = 1.0, use_sigmoid: bool = False, aux_weight: float = 0.4):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"DISTDistiller: task must be one of {TASKS}, got {task!r}")
        if tau <= 0:
            raise ValueError(f"DISTDistiller: tau must be positive, got {tau}")
        self.task = task
        self.beta = beta
        self.gamma = gamma
        self.tau = tau
        self.loss_weight = loss_weight
        self.use_sigmoid = use_sigmoid
        self.aux_weight = aux_weight

    def extra_repr(self) -> str:
        return (f"task={self.task!r}, beta={self.beta}, gamma={self.gamma}, tau={self.tau}, "
                f"loss_weight={self.loss_weight}, use_sigmoid={self.use_sigmoid}, "
                f"aux_weight={self.aux_weight}")

    def _weighted_loss(self, name: str, logits_s, logits_t, expected_dims: int) -> torch.Tensor:
        for role, logits in (("student", logits_s), ("teacher", logits_t)):
            if not isinstance(logits, torch.Tensor) or logits.dim() != expected_dims:
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"DISTDistiller({self.task!r}): {role} {name} must be a "
                                 f"{expected_dims}-D tensor, got {got}")
        _check_same_shape(f"DISTDistiller({self.task!r}) {name}", logits_s, logits_t)
        loss = dist_loss(logits_s, logits_t, self.beta, self.gamma, self.tau, self.use_sigmoid)
        return self.loss_weight * loss

    def _segmentation_losses(self, student_out, teacher_out) -> dict[str, torch.Tensor]:
        for role, out in (("student_out", student_out), ("teacher_out", teacher_out)):
            if not isinstance(out, Mapping) or "logits" not in out:
                raise ValueError(f"DISTDistiller('seg'): {role} must be a model output dict with "
                                 f"key 'logits', got {type(out).__name__}")
        losses = {"loss_dist": self._weighted_loss("logits", student_out["logits"],
                                                   teacher_out["logits"], 4)}
        aux_s, aux_t = student_out.get("aux_logits"), teacher_out.get("aux_logits")
        if aux_s is not None and aux_t is not None:
            losses["loss_dist_aux"] = self.aux_weight * self._weighted_loss("aux_logits", aux_s, aux_t, 4)
        return losses

    def _per_level_losses(self, levels_s, levels_t) -> dict[str, torch.Tensor]:
        for role, levels in (("student_out", levels_s), ("teacher_out", levels_t)):
            if isinstance(levels, torch.Tensor) or not isinstance(levels, Sequence) or not levels:
                raise ValueError(f"DISTDistiller('det_retina'): {role} must be a non-empty list of "
                                 f"per-level logits, got {type(levels).__name__}")
        if len(levels_s) != len(levels_t):
            raise ValueError(f"DISTDistiller('det_retina'): student has {len(levels_s)} FPN levels, "
                             f"teacher has {len(levels_t)}")
        return {f"loss_dist_l{i}": self._weighted_loss(f"level {i} logits", s, t, 4)
                for i, (s, t) in enumerate(zip(levels_s, levels_t))}

    def forward(self, student_out, teacher_out, targets=None) -> dict[str, torch.Tensor]:
        if self.task == "seg":
            return self._segmentation_losses(student_out, teacher_out)
        if self.task == "det_retina":
            return self._per_level_losses(student_out, teacher_out)
        if self.task == "cls":
            return {"loss_dist": self._weighted_loss("logits", student_out, teacher_out, 2)}
        return {"loss_dist_roi": self._weighted_loss("RoI class logits", student_out, teacher_out, 2)}


# ------------------------------------------------------------------------------------------ wiring
# On detection (docs/specs/dist.md §3): RetinaNet's per-level sigmoid classification maps; Faster R-CNN's RoI
# class logits, the teacher's RoI head run on the student's sampled RoIs (engine.teacher_inputs). On
# classification: the fc logits.
def _build(recipe, student, teacher):
    if recipe.task != "det":
        return DISTDistiller(recipe.task, **recipe.method_options)
    if is_two_stage(recipe.student):
        return DISTDistiller("det_frcnn", **recipe.method_options)
    return DISTDistiller("det_retina", **{"use_sigmoid": True, **recipe.method_options})


def _bind_outputs(student_out, teacher_out, batch):
    return {"student_out": student_out, "teacher_out": teacher_out}


def _bind_logits(student_out, teacher_out, batch):
    return {"student_out": student_out["logits"], "teacher_out": teacher_out["logits"]}


def _bind_det(student_out, teacher_out, batch):
    key = "roi_cls_logits" if "rois" in student_out else "cls_logits"
    return {"student_out": student_out[key], "teacher_out": teacher_out[key]}


METHOD = Method(build=_build, bind={"seg": _bind_outputs, "cls": _bind_logits, "det": _bind_det},
                options=lambda recipe: keyword_options(DISTDistiller, supplied=("task",)))
