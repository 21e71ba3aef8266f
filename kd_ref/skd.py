"""Structured knowledge distillation (SKD) for dense prediction.

Papers: Liu, Chen, Liu, Qin, Luo, Wang, "Structured Knowledge Distillation for Semantic
Segmentation" (CVPR 2019) and Liu, Shu, Wang, Shen, "Structured Knowledge Distillation for Dense
Prediction" (TPAMI 2020), arXiv:1903.04197. Spec: docs/specs/skd.md; depth and FCOS:
docs/specs/depth_fcos.md. Decisions and their reasons: docs/design/skd.md.

Three terms join the student's task loss. z: logits (B, K, h, w) at output stride 8, never
upsampled; f: features (B, C, h, w) with C_s possibly != C_t; teacher tensors are constants;
ignore-label pixels are not masked (both references distil every pixel).

Pixel-wise (docs/specs/skd.md §2; the teacher's class distribution per pixel is the target)::

    p_t = softmax(z_t / tau),  log p_s = log_softmax(z_s / tau)
    KL_{b,i} = sum_k p_t[k] (log p_t[k] - log p_s[k])
    L_pi = tau^2 * sum_{b,i} KL_{b,i} / (B h w)    normalize="pixels"   (CIRKD)
    L_pi = tau^2 * sum_{b,i} KL_{b,i} / (h w)      normalize="spatial"  (authors' code: batch summed)
    "spatial_whole_batch": "spatial" times the process count (one process of the whole batch)

Pair-wise (docs/specs/skd.md §3; global similarity graph of a feature map)::

    nodes = max_pool2d(f, kernel, stride=kernel, ceil_mode=True)      N = h' w' nodes
    a_hat = a / max(||a||_2, eps) per node (norm detached if detach_norm)
    S = A^T A, A = (C x N) normalised node columns, per image
    L_pa = 1 / (B N^2) * sum_b ||S_s,b - S_t,b||_F^2

Exact Gram form (impl="gram"), O(N C^2) time and O(C^2) memory instead of O(N^2 C) / O(N^2)::

    ||A^T A - B^T B||_F^2 = ||A A^T||_F^2 + ||B B^T||_F^2 - 2 ||A B^T||_F^2

Holistic (docs/specs/skd.md §4; adversarial, teacher logits "real", student logits "fake")::

    student:  L_ho = -mean D(z_s)
    critic:   hinge  mean relu(1 - D(z_t)) + mean relu(1 + D(z_s))
              wgan   mean D(z_s) - mean D(z_t)  +  lambda_gp * GP
    GP = mean_b (||grad_x sum D(x)||_2 - 1)^2,  x = alpha z_t + (1 - alpha) z_s, alpha ~ U(0, 1)

D is a SAGAN-style critic: input BatchNorm, four spectral-norm stride-2 4x4 convolutions with
LeakyReLU(0.1), self-attention after the third and fourth, a plain 4x4 score convolution. It sees the
raw logits only, as both codes do (the paper conditions it on the image too).

Weighted losses (docs/specs/skd.md §5): loss_skd_pi = lambda_pi L_pi, loss_skd_pa = lambda_pa L_pa,
loss_skd_ho = lambda_adv L_ho (student side); loss_skd_d = lambda_d L_D and, under "wgan",
loss_skd_gp = lambda_d lambda_gp GP (critic side, one D step after each student step on that
iteration's detached logits). Keys of disabled terms are omitted.

SKDDistiller's defaults are winycg/CIRKD's protocol; the authors' code
(irfanICMLL/structure_knowledge_distillation) is ``kd_ref.presets_seg.SKD_ORIGINAL_OPTIONS``::

    setting                         default (CIRKD)              SKD_ORIGINAL_OPTIONS
    tau / pi_normalize / lambda_pi  1.0 / "pixels" / 1.0         1.0 / "spatial" / 10.0
    pa_kernel / pa_scale            2 / None                     None / 0.5 (int(0.5 h) x int(0.5 w))
    pa_detach_norm / lambda_pa      False / 10.0                 True / 0.5 (code; the paper says 10)
    adv_type / lambda_adv           "hinge" / 0.001              "wgan" / 0.1
    lambda_d / lambda_gp            0.1 / None (no GP)           0.1 / 10.0 (GP weight 1.0)
    D optimizer                     Adam 4e-4, betas (0.9, 0.99) SGD 4e-4, momentum 0.9,
                                    constant lr                  wd 5e-4, poly 0.9 over the run
    d_sync_batchnorm (CUDA DDP)     True: SyncBatchNorm          False: per-GPU (one GPU in the code)

Choices:
- The pixel-wise value is the KL; the authors' code returns the cross-entropy, which differs by the
  teacher entropy (a constant): the same gradients, and zero loss for identical inputs.
- All-zero nodes map to the zero vector (the norm is clamped at eps).
- The Gram terms are accumulated in float64 outside autocast; impl="auto" uses them when
  N > C_s + C_t. Everything else is float32 (half-precision inputs are cast up).
- D scores student, teacher and interpolated batches in separate calls, so its input BatchNorm uses
  each batch's own statistics, as both codes do. No D warm-up.
- A critic with the gradient penalty never gets SyncBatchNorm (its double backward is not implemented
  there), whatever d_sync_batchnorm says.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from kd_ref.detectors import is_fcos
from kd_ref.distiller import Distiller, Method, keyword_options
from kd_ref.precision import at_least_float32, autocast_disabled

KernelSize = Union[int, Sequence[int]]

# "spatial_whole_batch": "spatial" times the number of processes, so that N processes of B/N images, whose
# gradients DDP averages, weigh the term as one process of B does (the original code's single GPU).
PIXEL_NORMALIZATIONS = ("pixels", "spatial", "spatial_whole_batch")
PAIR_IMPLS = ("dense", "gram", "auto")
ADV_TYPES = ("hinge", "wgan")
D_OPTIMIZERS = ("adam", "sgd")
D_MIN_INPUT_SIZE = 64  # four stride-2 convolutions and a 4x4 valid convolution


# --------------------------------------------------------------------------------------------
# Pixel-wise distillation
# --------------------------------------------------------------------------------------------

def pixel_wise_kd(logits_s: torch.Tensor, logits_t: torch.Tensor, tau: float = 1.0,
                  normalize: str = "pixels", processes: Optional[int] = None) -> torch.Tensor:
    """``tau^2`` times the summed per-pixel KL(p_t || p_s), divided by B*h*w ("pixels"), h*w ("spatial",
    the original code's batch-summed scaling) or h*w / processes ("spatial_whole_batch"; ``processes``
    defaults to the torch.distributed world size, 1 outside a process group)."""
    if logits_s.dim() != 4 or logits_s.shape != logits_t.shape:
        raise ValueError(f"pixel_wise_kd: logits_s {tuple(logits_s.shape)} and logits_t "
                         f"{tuple(logits_t.shape)} must both be (B, K, h, w) of the same shape")
    if not tau > 0:
        raise ValueError(f"pixel_wise_kd: tau must be > 0, got {tau}")
    if normalize not in PIXEL_NORMALIZATIONS:
        raise ValueError(f"pixel_wise_kd: normalize must be one of {PIXEL_NORMALIZATIONS}, "
                         f"got {normalize!r}")
    batch, _, height, width = logits_s.shape
    with autocast_disabled(logits_s):
        log_p_s = F.log_softmax(at_least_float32(logits_s) / tau, dim=1)
        log_p_t = F.log_softmax(at_least_float32(logits_t.detach()) / tau, dim=1)
        kl_sum = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
        denominator = batch * height * width if normalize == "pixels" else height * width
        if normalize == "spatial_whole_batch":
            if processes is None:
                distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
                processes = torch.distributed.get_world_size() if distributed else 1
            denominator /= processes
        return tau ** 2 * kl_sum / denominator


# --------------------------------------------------------------------------------------------
# Pair-wise distillation
# --------------------------------------------------------------------------------------------

def pool_kernel_from_scale(h: int, w: int, scale: float) -> tuple[int, int]:
    """The original code's node granularity: kernel = stride = int(scale * size) per side, >= 1."""
    if not scale > 0:
        raise ValueError(f"pool_kernel_from_scale: scale must be > 0, got {scale}")
    return max(1, int(h * scale)), max(1, int(w * scale))


def _normalised_nodes(feat: torch.Tensor, kernel: Optional[KernelSize], detach_norm: bool,
                      eps: float) -> torch.Tensor:
    """(B, C, N) unit-norm node columns; all-zero nodes stay zero (the norm is clamped at eps)."""
    feat = at_least_float32(feat)
    if kernel is not None:
        # ceil_mode keeps the border: a 9x11 map with kernel 2 gives 5x6 nodes, as in both codes.
        feat = F.max_pool2d(feat, kernel_size=kernel, stride=kernel, padding=0, ceil_mode=True)
    nodes = feat.flatten(2)
    norm = nodes.norm(p=2, dim=1, keepdim=True)
    if detach_norm:
        norm = norm.detach()
    return nodes / norm.clamp_min(eps)


def _check_kernel(kernel: Optional[KernelSize]) -> None:
    if kernel is None:
        return
    sizes = (kernel,) if isinstance(kernel, int) else tuple(kernel)
    if len(sizes) not in (1, 2) or not all(isinstance(k, int) and k >= 1 for k in sizes):
        raise ValueError(f"pair_wise_kd: kernel must be None, a positive int or a pair of positive "
                         f"ints, got {kernel!r}")


def _similarity_distance_dense(nodes_s: torch.Tensor, nodes_t: torch.Tensor) -> torch.Tensor:
    sim_s = nodes_s.transpose(1, 2) @ nodes_s
    sim_t = nodes_t.transpose(1, 2) @ nodes_t
    return (sim_s - sim_t).pow(2).mean()


def _squared_frobenius(matrices: torch.Tensor) -> torch.Tensor:
    return matrices.pow(2).sum(dim=(1, 2))


def _similarity_distance_gram(nodes_s: torch.Tensor, nodes_t: torch.Tensor) -> torch.Tensor:
    batch, _, num_nodes = nodes_s.shape
    a = nodes_s.double()
    b = nodes_t.double()
    per_image = (_squared_frobenius(a @ a.transpose(1, 2))
                 + _squared_frobenius(b @ b.transpose(1, 2))
                 - 2.0 * _squared_frobenius(a @ b.transpose(1, 2)))
    return (per_image.sum() / (batch * num_nodes ** 2)).to(nodes_s.dtype)


def pair_wise_kd(feat_s: torch.Tensor, feat_t: torch.Tensor, kernel: Optional[KernelSize] = 2,
                 detach_norm: bool = False, impl: str = "auto", eps: float = 1e-12) -> torch.Tensor:
    """Mean squared difference of the student's and teacher's global cosine-similarity graphs over
    max-pooled nodes; ``impl="gram"`` is the exact float64 Gram evaluation, ``"auto"`` picks it
    when N > C_s + C_t (where it is cheaper than building the N x N graphs)."""
    if feat_s.dim() != 4 or feat_t.dim() != 4:
        raise ValueError(f"pair_wise_kd: feat_s {tuple(feat_s.shape)} and feat_t "
                         f"{tuple(feat_t.shape)} must be 4-D (B, C, h, w)")
    if feat_s.shape[0] != feat_t.shape[0] or feat_s.shape[2:] != feat_t.shape[2:]:
        raise ValueError(f"pair_wise_kd: feat_s {tuple(feat_s.shape)} and feat_t "
                         f"{tuple(feat_t.shape)} must share batch size and spatial size")
    if impl not in PAIR_IMPLS:
        raise ValueError(f"pair_wise_kd: impl must be one of {PAIR_IMPLS}, got {impl!r}")
    if not eps > 0:
        raise ValueError(f"pair_wise_kd: eps must be > 0, got {eps}")
    _check_kernel(kernel)
    with autocast_disabled(feat_s):
        nodes_s = _normalised_nodes(feat_s, kernel, detach_norm, eps)
        nodes_t = _normalised_nodes(feat_t.detach(), kernel, detach_norm, eps)
        channels_s, num_nodes = nodes_s.shape[1:]
        if impl == "auto":
            impl = "gram" if num_nodes > channels_s + nodes_t.shape[1] else "dense"
        if impl == "gram":
            return _similarity_distance_gram(nodes_s, nodes_t)
        return _similarity_distance_dense(nodes_s, nodes_t)


# --------------------------------------------------------------------------------------------
# Holistic distillation: discriminator and adversarial losses
# --------------------------------------------------------------------------------------------

class SelfAttention2d(nn.Module):
    """SAGAN self-attention: ``gamma * (v @ softmax(q^T k)^T) + x`` with gamma initialised to 0,
    so the block starts as the identity."""

    def __init__(self, in_ch: int):
        super().__init__()
        if in_ch < 8:
            raise ValueError(f"SelfAttention2d: in_ch must be >= 8 (queries have in_ch // 8 "
                             f"channels), got {in_ch}")
        self.query_conv = nn.Conv2d(in_ch, in_ch // 8, kernel_size=1)
        self.key_conv = nn.Conv2d(in_ch, in_ch // 8, kernel_size=1)
        self.value_conv = nn.Conv2d(in_ch, in_ch, kernel_size=1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        query = self.query_conv(x).flatten(2)
        key = self.key_conv(x).flatten(2)
        value = self.value_conv(x).flatten(2)
        attention = torch.softmax(query.transpose(1, 2) @ key, dim=-1)
        out = (value @ attention.transpose(1, 2)).view(batch, channels, height, width)
        return self.gamma * out + x


class SKDDiscriminator(nn.Module):
    """Spectral-norm critic scoring logit maps; (B, in_channels, H, W) -> (B, 1, H'', W'') with
    H'' = H/16 - 3 (64 -> 1, 65 -> 1, 128 -> 5). Inputs smaller than 64 px per side are rejected.

    The input BatchNorm is a plain BatchNorm2d; under CUDA DDP the engine converts it to SyncBatchNorm
    where the distiller says so (``SKDDistiller.sync_batchnorm_modules``: CIRKD's hinge critic, not WGAN-GP).
    """

    def __init__(self, in_channels: int, conv_dim: int = 64):
        super().__init__()
        if in_channels < 1 or conv_dim < 1:
            raise ValueError(f"SKDDiscriminator: in_channels and conv_dim must be >= 1, got "
                             f"{in_channels} and {conv_dim}")
        self.in_channels = in_channels
        self.input_norm = nn.BatchNorm2d(in_channels)
        self.conv1 = self._downsample(in_channels, conv_dim)
        self.conv2 = self._downsample(conv_dim, conv_dim * 2)
        self.conv3 = self._downsample(conv_dim * 2, conv_dim * 4)
        self.attn1 = SelfAttention2d(conv_dim * 4)
        self.conv4 = self._downsample(conv_dim * 4, conv_dim * 8)
        self.attn2 = SelfAttention2d(conv_dim * 8)
        self.score = nn.Conv2d(conv_dim * 8, 1, kernel_size=4, stride=1, padding=0)

    @staticmethod
    def _downsample(in_ch: int, out_ch: int) -> nn.Conv2d:
        conv = nn.Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1)
        return spectral_norm(conv, n_power_iterations=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SKDDiscriminator: input must be (B, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        if min(x.shape[2:]) < D_MIN_INPUT_SIZE:
            raise ValueError(f"SKDDiscriminator: input must be at least {D_MIN_INPUT_SIZE}x"
                             f"{D_MIN_INPUT_SIZE} pixels, got {tuple(x.shape[2:])}")
        x = self.input_norm(x)
        x = F.leaky_relu(self.conv1(x), 0.1)
        x = F.leaky_relu(self.conv2(x), 0.1)
        x = self.attn1(F.leaky_relu(self.conv3(x), 0.1))
        x = self.attn2(F.leaky_relu(self.conv4(x), 0.1))
        return self.score(x)


def adv_g_loss(d_out_s: torch.Tensor) -> torch.Tensor:
    """Generator (student) loss, the same for hinge and wgan: ``-mean D(z_s)``."""
    return -d_out_s.float().mean()


def adv_d_loss(d_out_s: torch.Tensor, d_out_t: torch.Tensor, kind: str) -> torch.Tensor:
    """Critic loss with the teacher as "real" and the student as "fake"."""
    if kind == "hinge":
        return F.relu(1.0 - d_out_t.float()).mean() + F.relu(1.0 + d_out_s.float()).mean()
    if kind == "wgan":
        return d_out_s.float().mean() - d_out_t.float().mean()
    raise ValueError(f"adv_d_loss: kind must be one of {ADV_TYPES}, got {kind!r}")


def gradient_penalty(D: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                     fake: torch.Tensor, alpha: Optional[torch.Tensor] = None) -> torch.Tensor:
    """WGAN-GP: ``mean_b (||d sum D(x) / dx_b||_2 - 1)^2`` at x = alpha real + (1 - alpha) fake,
    alpha ~ U(0, 1) per sample unless given (broadcastable to ``real``); differentiable w.r.t.
    D's parameters (create_graph) so the penalty trains the critic. Computed in at least float32 with autocast
    off: under fp16 the unscaled critic gradients would underflow (the GradScaler scales only the loss)."""
    if real.shape != fake.shape:
        raise ValueError(f"gradient_penalty: real {tuple(real.shape)} and fake "
                         f"{tuple(fake.shape)} must have the same shape")
    real, fake = at_least_float32(real.detach()), at_least_float32(fake.detach())
    if alpha is None:
        alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device,
                           dtype=real.dtype)
    mixed = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    with autocast_disabled(mixed):
        (grad,) = torch.autograd.grad(D(mixed).sum(), mixed, create_graph=True)
    grad_norm = grad.flatten(1).norm(p=2, dim=1)
    return (grad_norm - 1.0).pow(2).mean()


# --------------------------------------------------------------------------------------------
# Distiller
# --------------------------------------------------------------------------------------------

def poly_lr_factor(iteration: int, total_iters: int, power: float) -> float:
    """``(1 - iteration / total_iters) ** power``, 0 after the last iteration."""
    return max(0.0, 1.0 - iteration / total_iters) ** power


class SKDDistiller(Distiller):
    """Pixel-wise, pair-wise and holistic distillation with the discriminator and its optimizer.

    The defaults are the CIRKD protocol; ``kd_ref.presets_seg.SKD_ORIGINAL_OPTIONS`` holds the authors'
    code's. The pair-wise node kernel is ``pa_kernel`` (fixed; 1 = every pixel a node) or, with
    ``pa_kernel=None``, ``pool_kernel_from_scale(h, w, pa_scale)`` per input: exactly one of the two is
    given. ``lambda_gp`` is the gradient-penalty weight of ``adv_type="wgan"`` (required there, refused
    with "hinge"). The discriminator's optimizer is ``d_optimizer`` "adam" (``d_betas``) or "sgd"
    (``d_momentum``) at ``d_lr`` and ``d_weight_decay``, its lr scaled by ``poly_lr_factor`` with power
    ``d_poly_power`` over the run (None: constant). ``d_sync_batchnorm``: the engine makes the critic's
    input BatchNorm a SyncBatchNorm under CUDA DDP, except under WGAN-GP (see ``sync_batchnorm_modules``).
    """

    def __init__(self, num_classes: int, *, tau: float = 1.0, pi_normalize: str = "pixels",
                 lambda_pi: float = 1.0, pa_kernel: Optional[KernelSize] = 2, pa_scale: Optional[float] = None,
                 pa_detach_norm: bool = False, lambda_pa: float = 10.0, adv_type: str = "hinge",
                 lambda_adv: float = 0.001, lambda_d: float = 0.1, lambda_gp: Optional[float] = None,
                 d_optimizer: str = "adam", d_lr: float = 4e-4, d_betas: Sequence[float] = (0.9, 0.99),
                 d_momentum: float = 0.0, d_weight_decay: float = 0.0, d_poly_power: Optional[float] = None,
                 d_sync_batchnorm: bool = True, use_pi: bool = True, use_pa: bool = True, use_ho: bool = True):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"SKDDistiller: num_classes must be >= 1, got {num_classes}")
        if pi_normalize not in PIXEL_NORMALIZATIONS:
            raise ValueError(f"SKDDistiller: pi_normalize must be one of {PIXEL_NORMALIZATIONS}, "
                             f"got {pi_normalize!r}")
        if not tau > 0:
            raise ValueError(f"SKDDistiller: tau must be > 0, got {tau}")
        if (pa_kernel is None) == (pa_scale is None):
            raise ValueError(f"SKDDistiller: give pa_kernel or pa_scale (one, not both), got pa_kernel="
                             f"{pa_kernel!r} and pa_scale={pa_scale!r}")
        _check_kernel(pa_kernel)
        if pa_scale is not None and not pa_scale > 0:
            raise ValueError(f"SKDDistiller: pa_scale must be > 0, got {pa_scale}")
        if adv_type not in ADV_TYPES:
            raise ValueError(f"SKDDistiller: adv_type must be one of {ADV_TYPES}, got {adv_type!r}")
        if adv_type == "wgan" and lambda_gp is None:
            raise ValueError("SKDDistiller: adv_type='wgan' needs lambda_gp (the gradient-penalty weight)")
        if adv_type != "wgan" and lambda_gp is not None:
            raise ValueError("SKDDistiller: lambda_gp only applies to adv_type='wgan'")
        if d_optimizer not in D_OPTIMIZERS:
            raise ValueError(f"SKDDistiller: d_optimizer must be one of {D_OPTIMIZERS}, got {d_optimizer!r}")
        self.tau, self.pi_normalize, self.lambda_pi = tau, pi_normalize, lambda_pi
        self.pa_kernel, self.pa_scale, self.pa_detach_norm, self.lambda_pa = pa_kernel, pa_scale, pa_detach_norm, lambda_pa
        self.adv_type, self.lambda_adv, self.lambda_d, self.lambda_gp = adv_type, lambda_adv, lambda_d, lambda_gp
        self.d_optimizer, self.d_lr, self.d_betas, self.d_momentum = d_optimizer, d_lr, tuple(d_betas), d_momentum
        self.d_weight_decay, self.d_poly_power, self.d_sync_batchnorm = d_weight_decay, d_poly_power, d_sync_batchnorm
        self.use_pi, self.use_pa, self.use_ho = use_pi, use_pa, use_ho
        self.discriminator = SKDDiscriminator(num_classes) if use_ho else None

    # ---- student side -----------------------------------------------------------------------

    def _score_with_frozen_discriminator(self, d_in: torch.Tensor) -> torch.Tensor:
        # Autograd records at op time which tensors need gradients: with D's parameters frozen
        # while the graph is built, loss_ho's backward reaches the student's logits only, so D's
        # .grad stays untouched whatever the engine's optimizers do, and no D weight gradients are
        # computed. Simpler than functional_call with detached parameters; the flags are restored
        # at once because the D step needs them.
        params = list(self.discriminator.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            return self.discriminator(d_in)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)

    def forward(self, logits_s, logits_t, feat_s=None, feat_t=None, targets=None) -> dict:
        """Weighted student losses; ``targets`` is accepted for API uniformity and unused."""
        losses = {}
        if self.use_pi:
            losses["loss_skd_pi"] = self.lambda_pi * pixel_wise_kd(
                logits_s, logits_t, tau=self.tau, normalize=self.pi_normalize)
        if self.use_pa:
            if feat_s is None or feat_t is None:
                raise ValueError("SKDDistiller: the pair-wise term needs feat_s and feat_t")
            kernel = self.pa_kernel
            if kernel is None:
                kernel = pool_kernel_from_scale(feat_t.shape[2], feat_t.shape[3], self.pa_scale)
            losses["loss_skd_pa"] = self.lambda_pa * pair_wise_kd(
                feat_s, feat_t, kernel=kernel, detach_norm=self.pa_detach_norm, impl="auto")
        if self.use_ho:
            d_out_s = self._score_with_frozen_discriminator(at_least_float32(logits_s))
            losses["loss_skd_ho"] = self.lambda_adv * adv_g_loss(d_out_s)
        return losses

    # ---- discriminator side -----------------------------------------------------------------

    def d_step_losses(self, logits_s, logits_t) -> dict:
        """Weighted critic losses on detached logits (empty without the holistic term). D is
        called separately on each batch so its input BatchNorm normalises each on its own."""
        if not self.use_ho:
            return {}
        fake = at_least_float32(logits_s.detach())
        real = at_least_float32(logits_t.detach())
        losses = {"loss_skd_d": self.lambda_d * adv_d_loss(
            self.discriminator(fake), self.discriminator(real), self.adv_type)}
        if self.adv_type == "wgan":
            losses["loss_skd_gp"] = self.lambda_d * self.lambda_gp * gradient_penalty(
                self.discriminator, real, fake)
        return losses

    # ---- engine hook (contract: distillers with their own optimizer) -------------------------

    def sync_batchnorm_modules(self) -> list:
        """Modules whose BatchNorm the engine converts to SyncBatchNorm under CUDA DDP: the discriminator's
        input BatchNorm with ``d_sync_batchnorm``, never under the gradient penalty (WGAN-GP), whose double
        backward SyncBatchNorm lacks."""
        if self.discriminator is None or self.adv_type == "wgan" or not self.d_sync_batchnorm:
            return []
        return [self.discriminator]

    def extra_parameters(self) -> list:
        """The discriminator's parameters, which the engine keeps out of the student optimizer."""
        return [] if self.discriminator is None else list(self.discriminator.parameters())

    def extra_optimizer(self, total_iters: int):
        """``(optimizer, lr_lambda | None)`` for the discriminator (the ``d_*`` settings); None when the
        holistic term is disabled (there is nothing to optimise)."""
        if self.discriminator is None:
            return None
        if not total_iters >= 1:
            raise ValueError(f"SKDDistiller.extra_optimizer: total_iters must be >= 1, "
                             f"got {total_iters!r}")
        params = self.extra_parameters()
        if self.d_optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=self.d_lr, betas=self.d_betas,
                                         weight_decay=self.d_weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=self.d_lr, momentum=self.d_momentum,
                                        weight_decay=self.d_weight_decay)
        if self.d_poly_power is None:
            return optimizer, None
        return optimizer, functools.partial(poly_lr_factor, total_iters=total_iters,
                                            power=self.d_poly_power)

    def extra_losses(self, logits_s, logits_t, feat_s=None, feat_t=None, targets=None) -> dict:
        """The D step's losses, called by the engine with the same bound inputs as forward. A non-finite
        one is the engine's to stop on (with the student's, in its one read of the iteration)."""
        return self.d_step_losses(logits_s, logits_t)


# --------------------------------------------------------------------------------------------
# SKD on depth estimation and on FCOS detection (docs/specs/depth_fcos.md §4, §6)
# --------------------------------------------------------------------------------------------
# The SKD paper distils depth and detection too, but the authors' code covers segmentation only and the
# TPAMI paper's depth/detection weights could not be read: every weight below is ours, [ours], and so is
# the binary form of the pixel-wise term. Depth: SKDDistiller's defaults (the CIRKD protocol: hinge critic,
# Adam 4e-4) except pair-wise kernel 4 on the decoder's head feature and lambda_pa 1 [ours]. FCOS: lambda_pi
# 1 and lambda_pa 1 [ours]; its pair-wise kernel is chosen per pyramid level (fcos_pair_kernel), no holistic term.
DEPTH_PA_KERNEL = 4         # [ours]
DEPTH_LAMBDA_PA = 1.0       # [ours]
FCOS_LAMBDA_PI = 1.0        # [ours]
FCOS_LAMBDA_PA = 1.0        # [ours]
FCOS_MAX_NODES = 1024       # pair-wise graph size per level [ours]


def binary_pixel_wise_kd(logits_s, logits_t, tau: float = 1.0) -> torch.Tensor:
    """Pixel-wise distillation for per-class sigmoid classifiers (FCOS): per position and class the KL
    between Bernoulli(σ(z_t/τ)) and Bernoulli(σ(z_s/τ)), summed over classes, averaged over the positions
    of all levels and images, times τ²; the teacher is detached. ``logits_*``: (N, K, h, w) or a list of
    per-level maps of equal shapes on both sides. [ours: the paper's detection form is unknown here]"""
    levels_s = list(logits_s) if isinstance(logits_s, (list, tuple)) else [logits_s]
    levels_t = list(logits_t) if isinstance(logits_t, (list, tuple)) else [logits_t]
    if len(levels_s) != len(levels_t) or any(s.shape != t.shape or s.dim() != 4 for s, t in zip(levels_s, levels_t)):
        raise ValueError(f"binary_pixel_wise_kd: logits_s {[tuple(s.shape) for s in levels_s]} and logits_t "
                         f"{[tuple(t.shape) for t in levels_t]} must be (N, K, h, w) maps of equal shapes")
    if not tau > 0:
        raise ValueError(f"binary_pixel_wise_kd: tau must be > 0, got {tau}")
    total, positions = 0.0, 0
    with autocast_disabled(levels_s[0]):
        for z_s, z_t in zip(levels_s, levels_t):
            z_s, z_t = at_least_float32(z_s) / tau, at_least_float32(z_t.detach()) / tau
            p_t = torch.sigmoid(z_t)
            kl = p_t * (F.logsigmoid(z_t) - F.logsigmoid(z_s)) + (1 - p_t) * (F.logsigmoid(-z_t) - F.logsigmoid(-z_s))
            total = total + kl.sum()
            positions += z_s.shape[0] * z_s.shape[2] * z_s.shape[3]
        return tau ** 2 * total / positions


def fcos_pair_kernel(height: int, width: int, max_nodes: int = FCOS_MAX_NODES) -> int:
    """Pooling kernel ceil(sqrt(h·w / max_nodes)): at most about ``max_nodes`` graph nodes per level."""
    return max(1, math.ceil(math.sqrt(height * width / max_nodes)))


class DepthSKDDistiller(Distiller):
    """SKD on depth (docs/specs/depth_fcos.md §4): pixel-wise on the (N, K, h, w) bin logits and pair-wise
    on the decoder's ``head`` feature (an inner :class:`SKDDistiller` without holistic term), holistic on
    the 1-channel log10 depth maps at stride 4 (a second one whose "logits" are those maps). A regression
    student has no bin logits: pass ``use_pi=False``. ``options`` are SKDDistiller's, given to both; their
    defaults are its own but ``pa_kernel=DEPTH_PA_KERNEL`` and ``lambda_pa=DEPTH_LAMBDA_PA``, all [ours]."""

    def __init__(self, num_bins: int, *, use_pi: bool = True, use_pa: bool = True, use_ho: bool = True,
                 **options):
        super().__init__()
        options = {"pa_kernel": DEPTH_PA_KERNEL, "lambda_pa": DEPTH_LAMBDA_PA, **options}
        self.maps = SKDDistiller(num_bins, **options, use_pi=use_pi, use_pa=use_pa, use_ho=False)
        self.holistic = SKDDistiller(1, **options, use_pi=False, use_pa=False, use_ho=True) if use_ho else None

    def forward(self, logits_s, logits_t, feat_s, feat_t, log_depth_s, log_depth_t) -> dict:
        losses = self.maps(logits_s, logits_t, feat_s, feat_t)
        if self.holistic is not None:
            losses.update(self.holistic(log_depth_s, log_depth_t))
        return losses

    def extra_parameters(self) -> list:
        return [] if self.holistic is None else self.holistic.extra_parameters()

    def sync_batchnorm_modules(self) -> list:
        """The holistic critic's, as its ``d_sync_batchnorm`` says (by default synchronised, as CIRKD's hinge
        critic whose settings it takes)."""
        return [] if self.holistic is None else self.holistic.sync_batchnorm_modules()

    def extra_optimizer(self, total_iters: int):
        return None if self.holistic is None else self.holistic.extra_optimizer(total_iters)

    def extra_losses(self, logits_s, logits_t, feat_s, feat_t, log_depth_s, log_depth_t) -> dict:
        return {} if self.holistic is None else self.holistic.extra_losses(log_depth_s, log_depth_t)


class FCOSSKDDistiller(Distiller):
    """SKD on FCOS (docs/specs/depth_fcos.md §6): ``binary_pixel_wise_kd`` on the per-level class logits and
    ``pair_wise_kd`` on each FPN level with kernel ``fcos_pair_kernel``, averaged over levels; no holistic
    term. Weights [ours]: lambda_pi = lambda_pa = 1."""

    def __init__(self, lambda_pi: float = FCOS_LAMBDA_PI, lambda_pa: float = FCOS_LAMBDA_PA, tau: float = 1.0,
                 max_nodes: int = FCOS_MAX_NODES, use_pi: bool = True, use_pa: bool = True):
        super().__init__()
        if not (use_pi or use_pa):
            raise ValueError("FCOSSKDDistiller: enable the pixel-wise or the pair-wise term")
        self.lambda_pi, self.lambda_pa, self.tau, self.max_nodes = lambda_pi, lambda_pa, tau, max_nodes
        self.use_pi, self.use_pa = use_pi, use_pa

    def forward(self, logits_s, logits_t, feats_s, feats_t) -> dict:
        losses = {}
        if self.use_pi:
            losses["loss_skd_pi"] = self.lambda_pi * binary_pixel_wise_kd(logits_s, logits_t, self.tau)
        if self.use_pa:
            terms = [pair_wise_kd(s, t, kernel=fcos_pair_kernel(*t.shape[-2:], self.max_nodes), impl="auto")
                     for s, t in zip(feats_s, feats_t)]
            losses["loss_skd_pa"] = self.lambda_pa * torch.stack(terms).mean()
        return losses


# ------------------------------------------------------------------------------------------ wiring
# Semantic segmentation: the class logits and the head feature. Depth and FCOS detection
# (docs/specs/depth_fcos.md): the bin logits, the decoder's head feature and the log depth; FCOS's per-level
# classification maps and its five FPN outputs.
FCOS_LEVELS = ["p3", "p4", "p5", "p6", "p7"]


def _check(recipe):
    if recipe.task == "det" and not (is_fcos(recipe.student) and is_fcos(recipe.teacher)):
        raise ValueError(f"--method skd on detection distils FCOS students from FCOS teachers "
                         f"(docs/specs/depth_fcos.md §6); got {recipe.student} <- {recipe.teacher}")
    if recipe.task == "depth" and recipe.model_options.get("prediction") == "regression" \
            and recipe.method_options.get("use_pi", False):
        raise ValueError("method_options use_pi: a regression depth head has no bin logits for pixel-wise KD")


def _build(recipe, student, teacher):
    """seg: SKDDistiller; depth: DepthSKDDistiller (pixel-wise only with the bin head); det: FCOSSKDDistiller."""
    _check(recipe)
    if recipe.task == "depth":
        options = {"use_pi": student.prediction == "bins", **recipe.method_options}
        return DepthSKDDistiller(student.num_bins, **options)
    if recipe.task == "det":
        return FCOSSKDDistiller(**recipe.method_options)
    return SKDDistiller(recipe.num_classes, **recipe.method_options)


def _bind_seg(student_out, teacher_out, batch):
    return {"logits_s": student_out["logits"], "logits_t": teacher_out["logits"],
            "feat_s": student_out["feats"]["head"], "feat_t": teacher_out["feats"]["head"]}


def _bind_depth(student_out, teacher_out, batch):
    """Bin logits (absent from a regression head), the decoder's head feature, the stride-4 log depth."""
    return {"logits_s": student_out.get("logits"), "logits_t": teacher_out.get("logits"),
            "feat_s": student_out["feats"]["head"], "feat_t": teacher_out["feats"]["head"],
            "log_depth_s": student_out["log_depth"], "log_depth_t": teacher_out["log_depth"]}


def _bind_fcos(student_out, teacher_out, batch):
    return {"logits_s": student_out["cls_logits"], "logits_t": teacher_out["cls_logits"],
            "feats_s": [student_out["feats"][name] for name in FCOS_LEVELS],
            "feats_t": [teacher_out["feats"][name] for name in FCOS_LEVELS]}


def _options(recipe) -> set:
    if recipe.task == "det":
        return keyword_options(FCOSSKDDistiller)
    maps = keyword_options(SKDDistiller, supplied=("num_classes",))
    if recipe.task == "depth":
        return maps | keyword_options(DepthSKDDistiller, supplied=("num_bins",))
    return maps


METHOD = Method(build=_build, bind={"seg": _bind_seg, "depth": _bind_depth, "det": _bind_fcos}, check=_check,
                options=_options)
