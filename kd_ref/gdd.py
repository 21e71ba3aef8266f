"""GDD: "Generative Denoise Distillation: Simple Stochastic Noises Induce Efficient Knowledge Transfer
for Dense Prediction" (Liu, Xu, Cao, Shen, Knowledge-Based Systems; arXiv:2401.08332).

The student's feature is turned into a "concept feature" in the teacher's channel space, perturbed by
Gaussian noise, and a small generation network denoises it into an "instance feature" that must match
the teacher's feature channel by channel. For student ``S`` (N, Cs, H, W) and teacher ``T`` (N, Ct, H, W):

    A   = align(S)                      1x1 conv Cs -> Ct with bias; identity (no layer) if Cs == Ct
    Z   ~ N(0, 1)^(N x 1 x H x W)       one value per (sample, position), broadcast over channels
    G   = conv3x3(ReLU(conv3x3(A + Z)))  Ct -> Ct, padding 1, bias, no normalisation
    p_{n,c} = softmax_hw(T_{n,c} / tau)  (teacher, constant),   q_{n,c} = softmax_hw(G_{n,c} / tau)
    L_GDD = alpha * tau^2 / (N * Ct) * sum_{n,c,hw} p (log p - log q)

The align and generation convs are trained with the student (same optimiser) and dropped at test time.

Where the paper and the public code (ZhgLiu/GDD) differ, the code is followed (docs/specs/gdd.md; the
reasons are in docs/design/gdd.md): the loss is the channel-wise spatial-softmax KL above, without an MSE
term; the noise is one value per (sample, position), added after the alignment; the KL is divided by
``N * Ct``, not by ``H * W`` (the reference alphas rely on it); a fresh noise is drawn on every call unless
one is given; losses are computed in float32 at least.

The file ends with GDD's wiring: the levels it distils per task and its ``METHOD`` record.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kd_ref.detectors import is_two_stage
from kd_ref.distiller import Distiller, Method, keyword_options
from kd_ref.instance_seg import copy_non_backbone_weights
from kd_ref.precision import at_least_float32


def channel_kl_loss(pred: torch.Tensor, target: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """``tau^2 / (N*C) * sum_{n,c} KL(softmax_hw(target_nc / tau) || softmax_hw(pred_nc / tau))``.

    ``pred`` and ``target`` are ``(N, C, H, W)``; ``target`` is detached. No alpha is applied.
    """
    if pred.dim() != 4:
        raise ValueError(f"channel_kl_loss: pred must be (N, C, H, W), got shape {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"channel_kl_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                         "must have the same shape")
    n, c = pred.shape[:2]
    log_q = F.log_softmax(at_least_float32(pred).flatten(2) / tau, dim=2)
    log_p = F.log_softmax(at_least_float32(target.detach()).flatten(2) / tau, dim=2)
    return tau ** 2 * (log_p.exp() * (log_p - log_q)).sum() / (n * c)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


class GDDLoss(nn.Module):
    """GDD on one feature level: align, add noise, generate, channel-wise KL; returns ``alpha * L``."""

    def __init__(self, student_channels: int, teacher_channels: int, alpha: float = 145.0,
                 tau: float = 4.0, noise_std: float = 1.0):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"GDDLoss: tau must be positive, got {tau}")
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.alpha = alpha
        self.tau = tau
        self.noise_std = noise_std
        self.align = (nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0,
                                bias=True)
                      if student_channels != teacher_channels else None)
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_channels, teacher_channels, kernel_size=3, padding=1),
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, tau={self.tau}, noise_std={self.noise_std}"

    def sample_noise(self, concept: torch.Tensor) -> torch.Tensor:
        """A fresh ``(N, 1, H, W)`` Gaussian draw, shared by all channels of ``concept``."""
        n, _, h, w = concept.shape
        return torch.randn(n, 1, h, w, device=concept.device, dtype=concept.dtype) * self.noise_std

    def _check_features(self, feat_s: torch.Tensor, feat_t: torch.Tensor) -> None:
        if feat_s.dim() != 4 or feat_t.dim() != 4:
            raise ValueError(f"GDDLoss: feat_s and feat_t must be (N, C, H, W), got "
                             f"{tuple(feat_s.shape)} and {tuple(feat_t.shape)}")
        if feat_s.shape[-2:] != feat_t.shape[-2:] or feat_s.shape[0] != feat_t.shape[0]:
            raise ValueError(f"GDDLoss: feat_s {tuple(feat_s.shape)} and feat_t {tuple(feat_t.shape)} "
                             "must have the same batch size and spatial size (N, ., H, W)")
        if feat_s.shape[1] != self.student_channels:
            raise ValueError(f"GDDLoss: feat_s has {feat_s.shape[1]} channels, expected "
                             f"student_channels={self.student_channels}")
        if feat_t.shape[1] != self.teacher_channels:
            raise ValueError(f"GDDLoss: feat_t has {feat_t.shape[1]} channels, expected "
                             f"teacher_channels={self.teacher_channels}")

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        self._check_features(feat_s, feat_t)
        concept = feat_s if self.align is None else self.align(feat_s)
        if noise is None:
            noise = self.sample_noise(concept)
        elif not _broadcasts_to(noise.shape, concept.shape):
            raise ValueError(f"GDDLoss: noise of shape {tuple(noise.shape)} does not broadcast to the "
                             f"concept feature {tuple(concept.shape)}; expected (N, 1, H, W)")
        generated = self.generation(concept + noise)
        return self.alpha * channel_kl_loss(generated, feat_t, self.tau)


def _per_level(name: str, value, num_levels: int) -> list:
    """Broadcast an int channel count to every level, or check a per-level list has the right length."""
    if isinstance(value, int):
        return [value] * num_levels
    if len(value) != num_levels:
        raise ValueError(f"GDDDistiller: {name} has {len(value)} entries, expected one per level "
                         f"({num_levels})")
    return list(value)


class GDDDistiller(Distiller):
    """One independent :class:`GDDLoss` per tapped level; returns ``{"loss_gdd_<level>": alpha * L}``.

    ``feats_s[i]``/``feats_t[i]`` (and ``noises[i]`` if given) belong to ``level_names[i]``; the teacher
    features are constants. ``targets`` is accepted for the engine's uniform call and ignored: GDD uses
    no labels or boxes.
    """

    def __init__(self, level_names: list[str], student_channels: int | list[int],
                 teacher_channels: int | list[int], alpha: float, tau: float = 4.0):
        super().__init__()
        if not level_names or len(set(level_names)) != len(level_names):
            raise ValueError(f"GDDDistiller: level_names must be non-empty and unique, got {level_names}")
        self.level_names = list(level_names)
        channels_s = _per_level("student_channels", student_channels, len(level_names))
        channels_t = _per_level("teacher_channels", teacher_channels, len(level_names))
        self.losses = nn.ModuleDict({name: GDDLoss(cs, ct, alpha, tau)
                                     for name, cs, ct in zip(level_names, channels_s, channels_t)})

    def _check_levels(self, name: str, values) -> None:
        if isinstance(values, (torch.Tensor, Mapping)) or not isinstance(values, Sequence):
            raise ValueError(f"GDDDistiller: {name} must be a list with one entry per level "
                             f"{self.level_names}, got {type(values).__name__}")
        if len(values) != len(self.level_names):
            raise ValueError(f"GDDDistiller: {name} has {len(values)} entries, expected "
                             f"{len(self.level_names)} for levels {self.level_names}")

    def forward(self, feats_s: Sequence[torch.Tensor], feats_t: Sequence[torch.Tensor], targets=None,
                noises: Sequence[torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
        self._check_levels("feats_s", feats_s)
        self._check_levels("feats_t", feats_t)
        if noises is None:
            noises = [None] * len(self.level_names)
        self._check_levels("noises", noises)
        return {f"loss_gdd_{name}": self.losses[name](feat_s, feat_t, noise)
                for name, feat_s, feat_t, noise in zip(self.level_names, feats_s, feats_t, noises)}


# ------------------------------------------------------------------------------------------ wiring
# Taps (docs/specs/gdd.md §3): the last backbone stage for segmentation; the FPN outputs for detection (Faster
# R-CNN P2-P5, without the max-pooled P6; one-stage RetinaNet P3-P7) and instance segmentation (P2-P5, before
# SOLO's resize of P2; the max-pooled P6 is not distilled).
SEG_LEVELS = ["c5"]
TWO_STAGE_LEVELS = ["p2", "p3", "p4", "p5"]
ONE_STAGE_LEVELS = ["p3", "p4", "p5", "p6", "p7"]
INS_LEVELS = ["p2", "p3", "p4", "p5"]


def levels_of(task: str, detector: str | None = None) -> list:
    """The levels GDD distils on ``task`` (on detection, for the student ``detector``)."""
    if task == "seg":
        return SEG_LEVELS
    if task == "ins":
        return INS_LEVELS
    return TWO_STAGE_LEVELS if is_two_stage(detector) else ONE_STAGE_LEVELS


def _build(recipe, student, teacher):
    """``method_options``: GDDDistiller's (alpha, tau) and ``init_student`` (GDD's instance-segmentation
    config: before training, the teacher's neck and head weights replace the student's)."""
    options = dict(recipe.method_options)
    if options.pop("init_student", False):
        copy_non_backbone_weights(teacher, student)
    levels = levels_of(recipe.task, recipe.student)
    return GDDDistiller(levels, [student.out_channels[name] for name in levels],
                        [teacher.out_channels[name] for name in levels], **options)


def _bind_feats(levels):
    def bind(student_out, teacher_out, batch):
        return {"feats_s": [student_out["feats"][name] for name in levels],
                "feats_t": [teacher_out["feats"][name] for name in levels]}
    return bind


_BIND_TWO_STAGE, _BIND_ONE_STAGE = _bind_feats(TWO_STAGE_LEVELS), _bind_feats(ONE_STAGE_LEVELS)


def _bind_det(student_out, teacher_out, batch):
    return (_BIND_TWO_STAGE if "rois" in student_out else _BIND_ONE_STAGE)(student_out, teacher_out, batch)


def _options(recipe) -> set:
    distiller = keyword_options(GDDDistiller, supplied=("level_names", "student_channels", "teacher_channels"))
    return distiller | {"init_student"}


METHOD = Method(build=_build, bind={"seg": _bind_feats(SEG_LEVELS), "det": _bind_det, "ins": _bind_feats(INS_LEVELS)},
                options=_options)
