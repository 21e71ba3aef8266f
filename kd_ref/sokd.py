"""SoKD: Shen, Huang, Zhu, Fan, Zhang, "Student-Oriented Teacher Knowledge Refinement for Knowledge
Distillation", ACM MM 2024, arXiv:2409.18785. Public code: FabienCode/mdistiller (method "DFKD").

SoKD refines the teacher's feature for the student with two parts and plugs into any base KD loss.

DAFA, differentiable automatic feature augmentation. A policy alpha = (prob, op_weights, magnitude)
over S = 36 sub-policies (every pair of the 9 feature ops, ``itertools.combinations`` order)::

    k   ~ Categorical(softmax(op_weights))                 pick one sub-policy
    b_i ~ Bernoulli(prob[k, i]),  i = 0, 1                 switch its two ops on/off
    g_t = op_1(op_0(f_t))  (only the ops with b_i = 1, level clamp(magnitude[k, i], 0, 1))
    g_t <- g_t + (s - sg(s)),  s = sum_{i: b_i=1} magnitude[k, i]        straight-through

so dL/dmagnitude[k, i] = sum over all elements of dL/dg_t, while the forward value is unchanged.
prob and op_weights get RELAX gradients (Grathwohl et al., arXiv:1711.00123) with the control variate
Q (Linear(3S, 100)-Tanh-Linear(100, 1), input 2x - 1 of [sigma(z_prob/T), softmax(z_w/T)])::

    d = (f(b) - Q(z~)) * grad log p(b) + grad Q(z) - grad Q(z~),   Q trained on grad mean(d^2)

where z is the relaxed sample that produced b and z~ ~ p(z | b) the conditional one (REBAR).

Bi-level search (DARTS-style, first ``search_iters`` iterations; then alpha is frozen)::

    theta' = theta - eta (grad_theta L(theta, alpha) + lambda theta)        eta = 0.01, lambda = 1e-4
    v      = grad_theta' L(theta', alpha)
    grad_alpha = -(g(theta + eps v) - g(theta - eps v)) / (2 eps),  eps = 0.01 / ||v||

with g = (RELAX grads of prob, op_weights; autograd grad of magnitude), then an Adam step on alpha
(lr 3e-4, betas (0.5, 0.999), weight decay 1e-3).

DAM, distinctive area detection. One shared CenterNet-like module D (heatmap, wh, offset heads) on both
the adapted student feature g_s = A(f_s) and g_t; the student branch picks top-k regions::

    M      = sum_k region_mask_k(decode(D(g_s)))               (N, 1, H, W), no gradient
    L_feat = mean(((g_s - g_t) * M)^2)
    L_dam  = mean((cat D(g_s) - cat D(g_t))^2)
    L      = L_task + w_feat L_feat + w_dam L_dam + L_base

The public code's op set, ranges, sampling, RELAX estimator, DAM heads, region decoding, adapter and
defaults are followed (docs/specs/sokd.md). Our choices a reader needs (the reasons, and how each differs
from the code, are in docs/design/sokd.md): all 36 sub-policies; the random draws of the ops are fixed per
policy sample, so every evaluation of L within a search step sees the same augmentation;
log p(b) = sum_i log Bernoulli(b_i) + log Categorical(k); Q is fitted on the mean of its variance gradients
at theta +/- eps v; ``search_mode="first_order"`` takes grad_alpha = +g(theta) from one evaluation (dense
tasks); the search runs right after the student's optimizer step, on the same batch and policy sample, then
resamples, restoring the parameters, BatchNorm statistics and RNG state it touches; under torch.distributed
every gradient and objective value of the search is averaged over the processes first.

The file holds, in order: the DAFA ops and :class:`AugmentPolicy`, DAM (:class:`AreaDetection`, region
decoding), :class:`SoKDDistiller` (SoKD's own two terms at one feature tap); the bi-level search
(:class:`SoKDSearch`); the plug-in the engine trains, :class:`SoKDPlugin`, which taps the model outputs, adds
the base method's terms (:class:`BoundBase`, ``loss_sokd_base_*``) and runs the search in ``after_step``, its
state kept in the checkpoint; SoKD's wiring: the tap per task and detector, the bases, and ``METHOD``.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import torch
import torch.distributed as distributed
import torch.nn as nn
import torch.nn.functional as F

from kd_ref import dist, gdd, kd
from kd_ref.detectors import is_two_stage
from kd_ref.distiller import (HOOKS, Distiller, Method, StepContext, check_method, check_options, keyword_options,
                              uses_hook)

# --------------------------------------------------------------------------------------- DAFA ops
OP_RANGES: dict[str, tuple[float, float]] = {
    "ShearX": (-0.3, 0.3),
    "ShearY": (-0.3, 0.3),
    "TranslateX": (-0.45, 0.45),
    "TranslateY": (-0.45, 0.45),
    "Rotate": (-30.0, 30.0),
    "Cutout": (0.0, 0.2),
    "Noise": (0.0, 0.1),
    "ChannelShuffle": (0.0, 1.0),
    "ChannelDrop": (0.0, 0.5),
}
SUB_POLICIES: list[tuple[str, str]] = list(itertools.combinations(OP_RANGES, 2))

_PROB_EPS = 1e-6   # keeps logit(prob) and the uniform noise of the sampler finite


def _affine(feat: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.to(feat.dtype).unsqueeze(0).expand(feat.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(feat.shape), align_corners=False)
    return F.grid_sample(feat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _affine_theta(name: str, v: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if name == "ShearX":
        rows = [[one, v, zero], [zero, one, zero]]
    elif name == "ShearY":
        rows = [[one, zero, zero], [v, one, zero]]
    elif name == "TranslateX":   # normalised coordinates span 2, so 2v shifts by the fraction v
        rows = [[one, zero, 2 * v], [zero, one, zero]]
    elif name == "TranslateY":
        rows = [[one, zero, zero], [zero, one, 2 * v]]
    else:
        angle = v * math.pi / 180.0
        cos, sin = torch.cos(angle), torch.sin(angle)
        rows = [[cos, sin, zero], [-sin, cos, zero]]
    return torch.stack([torch.stack(row) for row in rows])


def apply_feature_op(feat: torch.Tensor, name: str, level, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Apply feature op ``name`` at magnitude ``level`` in [0, 1] (float or 0-dim tensor) to a
    ``(N, C, H, W)`` map; the value is ``v = level * (hi - lo) + lo`` with ``(lo, hi) = OP_RANGES[name]``.
    Random ops draw from ``generator`` (default: the global torch RNG); one draw serves the whole batch.
    Differentiable in ``feat`` (and in a tensor ``level`` for the affine ops and Noise)."""
    if name not in OP_RANGES:
        raise ValueError(f"apply_feature_op: name must be one of {list(OP_RANGES)}, got {name!r}")
    if not torch.is_tensor(feat) or feat.dim() != 4 or not feat.is_floating_point():
        raise ValueError(f"apply_feature_op: feat must be a float (N, C, H, W) tensor, got "
                         f"{tuple(feat.shape) if torch.is_tensor(feat) else type(feat).__name__}")
    if torch.is_tensor(level) and level.dim() != 0:
        raise ValueError(f"apply_feature_op: level must be a float or a 0-dim tensor, got shape "
                         f"{tuple(level.shape)}")
    if not 0.0 <= float(level) <= 1.0:
        raise ValueError(f"apply_feature_op: level must be in [0, 1], got {float(level)}")
    lo, hi = OP_RANGES[name]
    # float64 so that v matches the reference's Python-float arithmetic before the cast to feat's dtype
    v = torch.as_tensor(level, dtype=torch.float64, device=feat.device) * (hi - lo) + lo
    n, c, h, w = feat.shape
    if name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        return _affine(feat, _affine_theta(name, v))
    device = generator.device if generator is not None else feat.device
    if name == "Cutout":
        size_h, size_w = int(float(v) * h), int(float(v) * w)
        cy = int(torch.randint(h, (1,), generator=generator, device=device))
        cx = int(torch.randint(w, (1,), generator=generator, device=device))
        keep = torch.ones(h, w, dtype=feat.dtype, device=feat.device)
        keep[max(cy - size_h // 2, 0):min(cy + size_h // 2, h), max(cx - size_w // 2, 0):min(cx + size_w // 2, w)] = 0
        return feat * keep
    if name == "Noise":
        noise = torch.randn(feat.shape, generator=generator, device=device, dtype=feat.dtype).to(feat.device)
        return feat + noise * v.to(feat.dtype)
    if name == "ChannelShuffle":
        return feat[:, torch.randperm(c, generator=generator, device=device).to(feat.device)]
    keep = (torch.rand(c, generator=generator, device=device) > float(v)).to(feat.device, feat.dtype)
    return feat * keep.view(1, c, 1, 1)


# ------------------------------------------------------------------------------ relaxed sampling
def relaxed_bernoulli_sample(logits: torch.Tensor, u: torch.Tensor, v: torch.Tensor, temperature: float):
    """REBAR sample of Bernoulli(sigmoid(logits)) from uniforms ``u, v`` in (0, 1):
    ``(b, sigmoid(z / T), sigmoid(z~ / T))`` with ``z = logits + log u - log(1 - u)``, ``b = [z > 0]`` and
    ``z~`` drawn from p(z | b) with ``v``. Differentiable in ``logits``."""
    z = logits + torch.log(u) - torch.log1p(-u)
    b = (z > 0).to(logits.dtype)
    theta = torch.sigmoid(logits)
    v_given_b = b * (v * theta + 1 - theta) + (1 - b) * v * (1 - theta)
    z_tilde = logits + torch.log(v_given_b) - torch.log1p(-v_given_b)
    return b, torch.sigmoid(z / temperature), torch.sigmoid(z_tilde / temperature)


def relaxed_categorical_sample(log_probs: torch.Tensor, u: torch.Tensor, v: torch.Tensor, temperature: float):
    """Gumbel-max sample of Categorical(exp(log_probs)) from uniforms ``u, v`` in (0, 1):
    ``(k, softmax(z / T), softmax(z~ / T))`` with ``z = log_probs - log(-log u)``, ``k = argmax z`` and the
    conditional Gumbels ``z~_j = -log(-log v_j / p_j - log v_k)`` (j != k), ``z~_k = -log(-log v_k)``."""
    z = log_probs - torch.log(-torch.log(u))
    k = torch.argmax(z)
    log_v_k = torch.log(v[k])
    z_tilde = -torch.log(-torch.log(v) / log_probs.exp() - log_v_k)
    z_tilde = torch.where(torch.arange(len(v), device=v.device) == k, -torch.log(-log_v_k), z_tilde)
    return k, torch.softmax(z / temperature, dim=-1), torch.softmax(z_tilde / temperature, dim=-1)


class RelaxControlVariate(nn.Module):
    """RELAX's learned control variate Q: ``Linear(3S, hidden) - Tanh - Linear(hidden, 1)`` on the relaxed
    samples ``[sigma_prob (S, 2) | softmax_w (S, 1)]`` flattened row by row and mapped by ``x -> 2x - 1``."""

    def __init__(self, num_inputs: int, hidden: int = 100):
        super().__init__()
        self.h1 = nn.Linear(num_inputs, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, relaxed_prob: torch.Tensor, relaxed_weights: torch.Tensor) -> torch.Tensor:
        x = torch.cat([relaxed_prob, relaxed_weights.unsqueeze(-1)], dim=-1).reshape(-1)
        return self.out(torch.tanh(self.h1(2 * x - 1))).squeeze(0)


class AugmentPolicy(nn.Module):
    """The DAFA policy: ``prob`` (S, 2), ``op_weights`` (S,), ``magnitude`` (S, 2) and the RELAX control
    variate ``q_func``. ``sample()`` draws (k, b) and everything the ops need; ``apply(f_t)`` augments the
    detached teacher feature with that sample (deterministic until the next ``sample()``);
    ``relax_grads(f_b)`` estimates the gradient of ``E[f_b]`` for ``policy_parameters()``."""

    def __init__(self, relax_temperature: float = 0.5, sub_policies: list[tuple[str, ...]] = SUB_POLICIES):
        # every buffer of this module describes the current sample (non-persistent, not in state_dict)
        super().__init__()
        if relax_temperature <= 0:
            raise ValueError(f"AugmentPolicy: relax_temperature must be > 0, got {relax_temperature}")
        unknown = sorted({name for pair in sub_policies for name in pair} - set(OP_RANGES))
        if not sub_policies or unknown or len({len(pair) for pair in sub_policies}) != 1:
            raise ValueError(f"AugmentPolicy: sub_policies must be a non-empty list of equal-length tuples "
                             f"of op names from {list(OP_RANGES)}; unknown: {unknown}")
        self.sub_policies = [tuple(pair) for pair in sub_policies]
        self.relax_temperature = relax_temperature
        num_sub, num_ops = len(self.sub_policies), len(self.sub_policies[0])
        self.prob = nn.Parameter(torch.full((num_sub, num_ops), 0.5))
        self.op_weights = nn.Parameter(torch.full((num_sub,), 1e-3))
        self.magnitude = nn.Parameter(torch.full((num_sub, num_ops), 0.5))
        self.q_func = RelaxControlVariate(num_sub * (num_ops + 1))
        # the current sample: noise of the relaxations, the discrete outcome, the seed of the ops' draws
        for name, shape in (("prob_u", (num_sub, num_ops)), ("prob_v", (num_sub, num_ops)),
                            ("weights_u", (num_sub,)), ("weights_v", (num_sub,))):
            self.register_buffer(name, torch.zeros(shape), persistent=False)
        self.register_buffer("op_switches", torch.zeros(num_sub, num_ops), persistent=False)
        self.register_buffer("sub_policy_index", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("op_seed", torch.zeros((), dtype=torch.long), persistent=False)
        self.sample()

    def policy_parameters(self) -> list[nn.Parameter]:
        return [self.prob, self.op_weights, self.magnitude, *self.q_func.parameters()]

    def _logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        prob = self.prob.clamp(_PROB_EPS, 1 - _PROB_EPS)
        return torch.log(prob) - torch.log1p(-prob), F.log_softmax(self.op_weights, dim=-1)

    def _relaxed(self):
        prob_logits, weight_log_probs = self._logits()
        b, prob_z, prob_z_tilde = relaxed_bernoulli_sample(prob_logits, self.prob_u, self.prob_v,
                                                           self.relax_temperature)
        k, weights_z, weights_z_tilde = relaxed_categorical_sample(weight_log_probs, self.weights_u,
                                                                   self.weights_v, self.relax_temperature)
        return (prob_logits, weight_log_probs, b, k), (prob_z, weights_z), (prob_z_tilde, weights_z_tilde)

    @torch.no_grad()
    def sample(self, generator: torch.Generator | None = None) -> None:
        """Draw a new sub-policy index k, op switches b and the ops' random draws."""
        device = generator.device if generator is not None else self.prob.device
        for noise in (self.prob_u, self.prob_v, self.weights_u, self.weights_v):
            noise.copy_(torch.rand(noise.shape, generator=generator, device=device).clamp_(_PROB_EPS, 1.0))
        (_, _, b, k), _, _ = self._relaxed()
        self.op_switches.copy_(b)
        self.sub_policy_index.copy_(k)
        self.op_seed.fill_(int(torch.randint(2 ** 62, (1,), generator=generator, device=device)))

    def active_ops(self) -> list[tuple[int, str, float]]:
        """``(op position i, op name, level)`` of the ops the current sample switches on, in order."""
        k = int(self.sub_policy_index)
        levels = self.magnitude[k].detach().clamp(0, 1).tolist()
        switches = self.op_switches[k].tolist()
        return [(i, name, levels[i]) for i, name in enumerate(self.sub_policies[k]) if switches[i]]

    def apply(self, f_t: torch.Tensor) -> torch.Tensor:
        """Augment the (detached) teacher feature with the current sample; the magnitudes enter through
        the straight-through term, so the forward value is exactly the augmented feature."""
        g_t = f_t.detach()
        active = self.active_ops()
        if not active:
            return g_t
        generator = torch.Generator(device=g_t.device).manual_seed(int(self.op_seed))
        for _, name, level in active:
            g_t = apply_feature_op(g_t, name, level, generator=generator)
        k = int(self.sub_policy_index)
        straight = sum(self.magnitude[k, i] for i, _, _ in active)
        return g_t + (straight - straight.detach()).to(g_t.dtype)

    def relax_grads(self, f_b, value: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Gradient estimates aligned with ``policy_parameters()`` for the objective value ``f_b`` of the
        current sample: RELAX for ``prob`` and ``op_weights``, autograd through the straight-through term
        for ``magnitude`` (zero when ``f_b`` does not depend on it), and for ``q_func`` the gradient of the
        estimator's variance ``mean(d_prob^2 ++ d_w^2)``. Consumes the autograd graph of ``f_b``.
        ``value`` replaces f_b's value in the RELAX terms (under DDP: the mean over all processes, so that
        the variance fit of Q sees the whole batch's objective, not one shard's)."""
        if not torch.is_tensor(f_b):
            f_b = torch.tensor(float(f_b))
        if f_b.numel() != 1:
            raise ValueError(f"relax_grads: f_b must be a scalar loss, got shape {tuple(f_b.shape)}")
        (prob_logits, weight_log_probs, b, k), relaxed, relaxed_tilde = self._relaxed()
        dist_params = [self.prob, self.op_weights]
        log_prob = (b * F.logsigmoid(prob_logits) + (1 - b) * F.logsigmoid(-prob_logits)).sum() + weight_log_probs[k]
        q_z, q_z_tilde = self.q_func(*relaxed), self.q_func(*relaxed_tilde)
        d_log_prob = torch.autograd.grad(log_prob, dist_params, retain_graph=True)
        d_q_z = torch.autograd.grad(q_z, dist_params, create_graph=True)
        d_q_z_tilde = torch.autograd.grad(q_z_tilde, dist_params, create_graph=True)
        f_value = (f_b if value is None else value).detach().float().reshape(()).to(q_z.device)
        estimates = [(f_value - q_z_tilde) * dl + dz - dzt for dl, dz, dzt in zip(d_log_prob, d_q_z, d_q_z_tilde)]
        variance = torch.cat([e.reshape(-1) ** 2 for e in estimates]).mean()
        d_q = torch.autograd.grad(variance, list(self.q_func.parameters()))
        d_magnitude = None
        if f_b.requires_grad:
            d_magnitude = torch.autograd.grad(f_b, self.magnitude, allow_unused=True)[0]
        if d_magnitude is None:
            d_magnitude = torch.zeros_like(self.magnitude)
        return [estimates[0].detach(), estimates[1].detach(), d_magnitude, *d_q]


# ------------------------------------------------------------------------------------------- DAM
class AreaDetection(nn.Module):
    """DAM: three parallel ``Conv3x3(in, mid) - ReLU - Conv1x1(mid, out) - ReLU`` heads; returns
    ``(sigmoid(heatmap) (N, K_h, H, W), wh (N, 2, H, W), offset (N, 2, H, W))`` in feature cells."""

    def __init__(self, in_ch: int, mid_ch: int, num_heat: int):
        super().__init__()
        if min(in_ch, mid_ch, num_heat) < 1:
            raise ValueError(f"AreaDetection: in_ch, mid_ch and num_heat must be >= 1, got "
                             f"{in_ch}, {mid_ch}, {num_heat}")
        self.heatmap_head = self._head(in_ch, mid_ch, num_heat)
        self.offset_head = self._head(in_ch, mid_ch, 2)
        self.wh_head = self._head(in_ch, mid_ch, 2)

    @staticmethod
    def _head(in_ch: int, mid_ch: int, out_ch: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(in_ch, mid_ch, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(mid_ch, out_ch, 1), nn.ReLU())

    def forward(self, feat: torch.Tensor):
        return self.heatmap_head(feat).sigmoid(), self.wh_head(feat), self.offset_head(feat)


def _check_kernel(kernel: int) -> None:
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd int (the map keeps its size), got {kernel!r}")


def local_maximum(heat: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """``heat`` where it equals the max of its ``kernel x kernel`` neighbourhood (per channel), else 0."""
    _check_kernel(kernel)
    if heat.dim() != 4:
        raise ValueError(f"local_maximum: heat must be (N, K, H, W), got {tuple(heat.shape)}")
    peak = F.max_pool2d(heat, kernel, stride=1, padding=(kernel - 1) // 2)
    return heat * (peak == heat).to(heat.dtype)


def decode_regions(heatmap: torch.Tensor, wh: torch.Tensor, offset: torch.Tensor, k: int = 8, kernel: int = 3):
    """Top-``k`` local maxima over all heatmap channels and cells -> ``(boxes, scores)``: boxes int64
    ``(N, k, 4)`` as inclusive cell indices ``[x1, y1, x2, y2]`` (centre = cell + offset, size = wh,
    clipped to the map, truncated to integers), scores ``(N, k)`` in descending order."""
    if heatmap.dim() != 4:
        raise ValueError(f"decode_regions: heatmap must be (N, K_h, H, W), got {tuple(heatmap.shape)}")
    n, num_heat, height, width = heatmap.shape
    for name, tensor in (("wh", wh), ("offset", offset)):
        if tuple(tensor.shape) != (n, 2, height, width):
            raise ValueError(f"decode_regions: {name} must be {(n, 2, height, width)}, got {tuple(tensor.shape)}")
    if not 1 <= k <= num_heat * height * width:
        raise ValueError(f"decode_regions: k must be in [1, K_h*H*W = {num_heat * height * width}], got {k}")
    scores, index = torch.topk(local_maximum(heatmap, kernel).reshape(n, -1), k)
    cell = index % (height * width)
    ys, xs = torch.div(cell, width, rounding_mode="floor"), cell % width
    gather = cell.unsqueeze(1).expand(n, 2, k)
    size = wh.reshape(n, 2, -1).gather(2, gather)
    shift = offset.reshape(n, 2, -1).gather(2, gather)
    cx, cy = xs.to(size.dtype) + shift[:, 0], ys.to(size.dtype) + shift[:, 1]
    boxes = torch.stack([(cx - size[:, 0] / 2).clamp(min=0), (cy - size[:, 1] / 2).clamp(min=0),
                         (cx + size[:, 0] / 2).clamp(max=width - 1), (cy + size[:, 1] / 2).clamp(max=height - 1)],
                        dim=2)
    return boxes.detach().to(torch.int64), scores


def region_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, k, H, W)`` float32 masks, 1 on rows y1..y2 and columns x1..x2 (inclusive) of each box."""
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.is_floating_point():
        raise ValueError(f"region_masks: boxes must be an integer (N, k, 4) tensor, got "
                         f"{tuple(boxes.shape)} {boxes.dtype}")
    x1, y1, x2, y2 = (boxes[..., i, None, None] for i in range(4))
    rows = torch.arange(height, device=boxes.device).view(1, 1, height, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, 1, width)
    return ((rows >= y1) & (rows <= y2) & (cols >= x1) & (cols <= x2)).float()


def masked_feature_mse(f_s: torch.Tensor, f_t: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``mean(((f_s - f_t) * M)^2)`` over N*C*H*W with ``M = masks.sum(1)``: overlapping regions count
    several times. ``f_t`` is not detached: the augmented teacher feature carries the straight-through
    gradient to the policy magnitudes (the raw teacher feature is detached by ``AugmentPolicy.apply``)."""
    if f_s.shape != f_t.shape or f_s.dim() != 4:
        raise ValueError(f"masked_feature_mse: f_s {tuple(f_s.shape)} and f_t {tuple(f_t.shape)} must be "
                         f"equal (N, C, H, W) shapes")
    n, _, h, w = f_s.shape
    if masks.dim() != 4 or masks.shape[0] != n or tuple(masks.shape[2:]) != (h, w):
        raise ValueError(f"masked_feature_mse: masks must be (N, k, H, W) = ({n}, k, {h}, {w}), "
                         f"got {tuple(masks.shape)}")
    weight = masks.detach().float().sum(1, keepdim=True)
    return ((f_s.float() - f_t.float()) * weight).pow(2).mean()


def dam_consistency_loss(dam_s: tuple, dam_t: tuple) -> torch.Tensor:
    """``mean((cat[h_s, wh_s, o_s] - cat[h_t, wh_t, o_t])^2)``: pulls the two branches' DAM outputs together."""
    return F.mse_loss(torch.cat(dam_s, dim=1).float(), torch.cat(dam_t, dim=1).float())


# --------------------------------------------------------------------------------------- adapter
class FeatureAdapter(nn.Module):
    """[code] ConvReg: a spatial matcher from the student's ``(C_s, H_s, W_s)`` to the teacher's
    ``(C_t, H_t, W_t)`` (stride-2 conv if H_s = 2 H_t, transposed conv if 2 H_s = H_t, else a valid conv
    of kernel ``(1 + H_s - H_t, 1 + W_s - W_t)``), then two 3x3 convs; each conv followed by BN + ReLU."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        (s_c, s_h, s_w), (t_c, t_h, t_w) = _chw(s_shape, "s_shape"), _chw(t_shape, "t_shape")
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"FeatureAdapter: cannot map student {(s_c, s_h, s_w)} to teacher "
                             f"{(t_c, t_h, t_w)}: need H_s = 2 H_t, 2 H_s = H_t, or H_s >= H_t and W_s >= W_t")
        self.bn = nn.BatchNorm2d(t_c)
        self.conv_2 = nn.Conv2d(t_c, t_c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(t_c)
        self.conv_3 = nn.Conv2d(t_c, t_c, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(t_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn2(self.conv_2(x)))
        return F.relu(self.bn3(self.conv_3(x)))


def _chw(shape, name: str) -> tuple[int, int, int]:
    if len(shape) not in (3, 4) or any(int(s) < 1 for s in shape):
        raise ValueError(f"{name} must be (C, H, W) or (N, C, H, W) with positive sizes, got {tuple(shape)}")
    return tuple(int(s) for s in shape[-3:])


# ------------------------------------------------------------------------------------- distiller
class SoKDDistiller(Distiller):
    """SoKD at one feature tap: adapter ``A``, DAFA ``policy`` and DAM ``dam``.

    ``forward(feat_s, feat_t)`` returns SoKD's own weighted losses, ``loss_sokd_feat`` (w_feat L_feat) and
    ``loss_sokd_dam`` (w_dam L_dam); the base method's loss it plugs into is added by
    :class:`SoKDPlugin` (docs/specs/sokd.md §4). Augmentation is applied in training mode only.

    Parameters: ``student_side_parameters()`` (adapter, DAM) go into the student's SGD;
    ``policy_parameters()`` must NOT: they are stepped by the bi-level search (:class:`SoKDSearch`).
    """

    def __init__(self, s_shape, t_shape, num_heat: int, k: int = 8, w_feat: float = 1000.0,
                 w_dam: float = 1000.0, relax_temperature: float = 0.5, search_mode: str = "unrolled"):
        super().__init__()
        if search_mode not in ("unrolled", "first_order"):
            raise ValueError(f"SoKDDistiller: search_mode must be 'unrolled' or 'first_order', got {search_mode!r}")
        if k < 1:
            raise ValueError(f"SoKDDistiller: k (regions per image) must be >= 1, got {k}")
        t_channels = _chw(t_shape, "t_shape")[0]
        self.adapter = FeatureAdapter(s_shape, t_shape)
        self.dam = AreaDetection(t_channels, t_channels, num_heat)
        self.policy = AugmentPolicy(relax_temperature)
        self.k, self.w_feat, self.w_dam, self.search_mode = k, w_feat, w_dam, search_mode

    def policy_parameters(self) -> list[nn.Parameter]:
        return self.policy.policy_parameters()

    def student_side_parameters(self) -> list[nn.Parameter]:
        policy_ids = {id(p) for p in self.policy_parameters()}
        return [p for p in self.parameters() if id(p) not in policy_ids]

    def resample(self, generator: torch.Generator | None = None) -> None:
        self.policy.sample(generator)

    def forward(self, feat_s: torch.Tensor, feat_t: torch.Tensor) -> dict:
        g_s = self.adapter(feat_s)
        if g_s.shape != feat_t.shape:
            raise ValueError(f"SoKDDistiller: adapted student feature {tuple(g_s.shape)} must match the teacher "
                             f"feature {tuple(feat_t.shape)}; check s_shape/t_shape")
        g_t = self.policy.apply(feat_t) if self.training else feat_t.detach()
        dam_s, dam_t = self.dam(g_s), self.dam(g_t)
        with torch.no_grad():
            boxes, _ = decode_regions(*(x.float() for x in dam_s), k=self.k)
            masks = region_masks(boxes, g_s.shape[2], g_s.shape[3])
        return {"loss_sokd_feat": self.w_feat * masked_feature_mse(g_s, g_t, masks),
                "loss_sokd_dam": self.w_dam * dam_consistency_loss(dam_s, dam_t)}


# ------------------------------------------------------------------------------- SoKD: the search
def _distributed() -> bool:
    return distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1


def _mean_over_processes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` averaged in place over the torch.distributed processes (unchanged in one process)."""
    if _distributed():
        for tensor in tensors:
            distributed.all_reduce(tensor)
            tensor /= distributed.get_world_size()
    return tensors


class SoKDSearch:
    """The policy search (docs/specs/sokd.md §2.5): the engine's per-iteration hook for SoKD.

    Build once: ``SoKDSearch(distiller, student, search_iters)``; it owns the Adam optimizer of
    ``distiller.policy_parameters()``. Inner parameters theta = the student's trainable parameters +
    ``distiller.student_side_parameters()`` + the parameters of the plugged-in ``base`` method, if any.

    Call ``step(batch, loss_fn)`` once per training iteration, right after the student's
    ``optimizer.step()``, with that iteration's batch (never between the student's forward and backward:
    it rewrites theta in place and restores it). While fewer than ``search_iters`` steps have searched
    (None: always) it estimates grad_alpha ("unrolled": 4 calls of ``loss_fn``; "first_order": 1) and
    takes an Adam step; then it always resamples the policy.

    ``loss_fn(batch) -> Tensor``: the full training objective on ``batch`` (task losses + every
    distiller loss, i.e. ``sum(student_out["losses"]) + sum(distiller(**bound))``) evaluated with the
    CURRENT parameters, student in train mode, autograd enabled. The teacher's outputs are constants and
    may be cached from the student step. It must not backprop, step or resample. Dropout/BN randomness
    and BN statistics are isolated: every call starts from the same RNG state and buffers are restored.

    ``state_dict()`` / ``load_state_dict()`` hold the Adam state and the step count (for checkpoints).
    """

    def __init__(self, distiller: SoKDDistiller, student: nn.Module, search_iters: int | None = None, *,
                 base: nn.Module | None = None, lr: float = 3e-4, betas: tuple[float, float] = (0.5, 0.999), weight_decay: float = 1e-3,
                 unroll_lr: float = 0.01, unroll_weight_decay: float = 1e-4, fd_radius: float = 0.01):
        if not isinstance(distiller, SoKDDistiller):
            raise ValueError(f"SoKDSearch: distiller must be a SoKDDistiller, got {type(distiller).__name__}")
        if search_iters is not None and search_iters < 0:
            raise ValueError(f"SoKDSearch: search_iters must be >= 0 or None, got {search_iters}")
        self.distiller, self.search_iters = distiller, search_iters
        self.unroll_lr, self.unroll_weight_decay, self.fd_radius = unroll_lr, unroll_weight_decay, fd_radius
        self.policy_params = distiller.policy_parameters()
        policy_ids = {id(p) for p in self.policy_params}
        inner, seen = [], set()
        side_modules = () if base is None else (base,)
        for p in itertools.chain(student.parameters(), distiller.student_side_parameters(),
                                 *(module.parameters() for module in side_modules)):
            if p.requires_grad and id(p) not in seen:
                inner.append(p)
                seen.add(id(p))
        if policy_ids & seen:
            raise ValueError("SoKDSearch: the student's parameters include the SoKD policy parameters")
        self.inner_params = inner
        # modules, not their buffers: Module.to() on CUDA replaces buffer tensors, so they are looked up
        # when a search step saves and restores them
        self.modules = (student, distiller, *side_modules)
        self.optimizer = torch.optim.Adam(self.policy_params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.steps = 0

    @property
    def buffers(self) -> list[torch.Tensor]:
        """The buffers of the student, the distiller and the base as they are now."""
        return [b for module in self.modules for b in module.buffers()]

    @property
    def searching(self) -> bool:
        return self.search_iters is None or self.steps < self.search_iters

    def _evaluate(self, batch, loss_fn) -> torch.Tensor:
        devices = sorted({p.device.index for p in self.inner_params if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            loss = loss_fn(batch)
        if not torch.is_tensor(loss) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError("SoKDSearch: loss_fn(batch) must return a scalar tensor with autograd history")
        if not torch.isfinite(loss).all():
            raise FloatingPointError(f"SoKDSearch: loss_fn(batch) returned a non-finite loss ({loss.item()})")
        return loss.float().reshape(())

    def _theta_grads(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """grad_theta of the whole (global) batch's objective: per-process gradients averaged under DDP."""
        grads = torch.autograd.grad(loss, self.inner_params, allow_unused=True)
        return _mean_over_processes([torch.zeros_like(p) if g is None else g
                                     for p, g in zip(self.inner_params, grads)])

    def _relax_grads(self, batch, loss_fn) -> list[torch.Tensor]:
        loss = self._evaluate(batch, loss_fn)
        value, = _mean_over_processes([loss.detach().clone()])
        return self.distiller.policy.relax_grads(loss, value=value)

    @torch.no_grad()
    def _shift_theta(self, direction: list[torch.Tensor], scale: float) -> None:
        for p, d in zip(self.inner_params, direction):
            p.add_(d, alpha=scale)

    def policy_gradients(self, batch, loss_fn) -> list[torch.Tensor]:
        """grad_alpha aligned with ``distiller.policy_parameters()``; theta and buffers are left as found."""
        saved_params = [p.detach().clone() for p in self.inner_params]
        saved_buffers = [b.detach().clone() for b in self.buffers]
        try:
            if self.distiller.search_mode == "first_order":
                return self._relax_grads(batch, loss_fn)
            return self._unrolled_gradients(batch, loss_fn, saved_params, saved_buffers)
        finally:
            self._restore(saved_params, saved_buffers)

    def _unrolled_gradients(self, batch, loss_fn, saved_params, saved_buffers) -> list[torch.Tensor]:
        # theta', v, ||v|| and eps come from gradients averaged over the processes: every process unrolls
        # and perturbs the same parameters along the same direction, as one process over the global
        # batch does, and all take the same ||v|| == 0 branch
        grads = self._theta_grads(self._evaluate(batch, loss_fn))
        with torch.no_grad():
            for p, g in zip(self.inner_params, grads):
                p.sub_(self.unroll_lr * (g + self.unroll_weight_decay * p))
        v = self._theta_grads(self._evaluate(batch, loss_fn))
        self._restore(saved_params, saved_buffers)
        v_norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in v)))
        if v_norm == 0.0:   # theta' is stationary: no implicit gradient, only Q's fit at theta
            at_theta = self._relax_grads(batch, loss_fn)
            return [torch.zeros_like(g) for g in at_theta[:3]] + at_theta[3:]
        eps = self.fd_radius / v_norm
        self._shift_theta(v, eps)
        plus = self._relax_grads(batch, loss_fn)
        self._shift_theta(v, -2 * eps)
        minus = self._relax_grads(batch, loss_fn)
        implicit = [-(gp - gm) / (2 * eps) for gp, gm in zip(plus[:3], minus[:3])]
        return implicit + [(gp + gm) / 2 for gp, gm in zip(plus[3:], minus[3:])]

    @torch.no_grad()
    def _restore(self, saved_params, saved_buffers) -> None:
        for p, saved in zip(self.inner_params, saved_params):
            p.copy_(saved)
        for b, saved in zip(self.buffers, saved_buffers):
            b.copy_(saved)

    def step(self, batch, loss_fn: Callable) -> None:
        """Search (while ``searching``) and resample. Under torch.distributed every gradient and objective
        value of the search is averaged over the processes before it is used (the search of one process
        over the global batch, given equal per-process batches) and process 0's new sample is used by
        all, so the policy stays shared."""
        if self.searching:
            grads = [g.detach().to(p.dtype) for p, g in zip(self.policy_params, self.policy_gradients(batch, loss_fn))]
            for p, g in zip(self.policy_params, _mean_over_processes(grads)):
                p.grad = g
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.distiller.resample()
        if _distributed():
            for sample_buffer in self.distiller.policy.buffers():
                distributed.broadcast(sample_buffer, src=0)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"optimizer", "steps"}:
            raise ValueError(f"SoKDSearch.load_state_dict: expected keys ['optimizer', 'steps'], got {sorted(state)}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


# ------------------------------------------------------------------------------ SoKD: the plug-in
def _prefixed_base_losses(out) -> dict:
    if torch.is_tensor(out):
        return {"loss_sokd_base": out}
    if not isinstance(out, dict) or not all(isinstance(key, str) and key.startswith("loss_") for key in out):
        raise ValueError(f"SoKDPlugin: the base must return a tensor or a dict with 'loss_*' keys, got "
                         f"{sorted(out) if isinstance(out, dict) else type(out).__name__}")
    return {"loss_sokd_base_" + key[len("loss_"):]: value for key, value in out.items()}


class BoundBase(nn.Module):
    """A base distiller together with its registry bind for one task: called with the engine's model
    outputs and batch, it returns the base's weighted losses (``bind(student_out, teacher_out, batch)``
    gives the base's ``forward`` arguments, as the base's ``METHOD.bind[task]`` does)."""

    def __init__(self, distiller: Distiller, bind: Callable[..., dict]):
        super().__init__()
        for hook in HOOKS:
            if uses_hook(distiller, hook):
                raise ValueError(f"BoundBase: a SoKD base must be a plain loss; {type(distiller).__name__} "
                                 f"has the engine hook {hook}()")
        self.distiller, self.bind = distiller, bind

    def forward(self, student_out: dict, teacher_out: dict, batch: dict):
        return self.distiller(**self.bind(student_out, teacher_out, batch))


class SoKDPlugin(Distiller):
    """SoKD as the training engine sees it: :class:`~kd_ref.sokd.SoKDDistiller` on the feature ``tap`` of
    the model outputs (``feats[tap]`` of student and teacher), plus an optional base method (a
    :class:`BoundBase`, evaluated in the same forward, its terms returned as ``loss_sokd_base_<name>`` for
    each ``loss_<name>``, or ``loss_sokd_base`` for a tensor), with the policy search of
    :class:`SoKDSearch` run through the engine's hooks:

    - ``extra_parameters()``: the policy parameters, which the student optimizer must leave alone;
    - ``after_step(context)``: one search step (while searching) and a resample, right after the
      student's optimizer step, with the iteration's batch and ``context.loss_fn`` (the full objective);
    - ``get_extra_state()`` / ``set_extra_state()``: the search's Adam state and step count and the current
      policy sample (the non-persistent buffers of ``AugmentPolicy``), so a resumed run continues
      with the same sample and optimizer state as an uninterrupted one.

    ``student`` is the module the engine trains (its parameters are the search's inner theta, with the
    SoKD modules' and the base's); ``search_iters`` (None: the whole run) and ``search_options`` go to
    :class:`SoKDSearch`, the other keyword arguments to ``SoKDDistiller``.
    """

    def __init__(self, student: nn.Module, s_shape, t_shape, num_heat: int, tap: str,
                 base: BoundBase | None = None, search_iters: int | None = None,
                 search_options: dict | None = None, **distiller_options):
        super().__init__()
        self.tap = tap
        self.sokd = SoKDDistiller(s_shape, t_shape, num_heat, **distiller_options)
        self.base = base
        # a plain attribute, not a submodule: the search refers to the student, which is not ours to save
        self.search = SoKDSearch(self.sokd, student, search_iters, base=base, **(search_options or {}))

    def extra_repr(self) -> str:
        return f"tap={self.tap!r}, search_iters={self.search.search_iters}"

    def forward(self, student_out: dict, teacher_out: dict, batch: dict) -> dict:
        for role, out in (("student", student_out), ("teacher", teacher_out)):
            if self.tap not in out.get("feats", {}):
                raise ValueError(f"SoKDPlugin: the {role} outputs have no feature {self.tap!r}; available: "
                                 f"{sorted(out.get('feats', {}))}")
        losses = self.sokd(student_out["feats"][self.tap], teacher_out["feats"][self.tap])
        if self.base is None:
            return losses
        return {**losses, **_prefixed_base_losses(self.base(student_out, teacher_out, batch))}

    def extra_parameters(self) -> list[nn.Parameter]:
        return self.sokd.policy_parameters()

    def after_step(self, context: StepContext) -> None:
        self.search.step(context.batch, context.loss_fn)

    def get_extra_state(self) -> dict:
        sample = {name: buffer.detach().clone() for name, buffer in self.sokd.policy.named_buffers()}
        return {"search": self.search.state_dict(), "policy_sample": sample}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"search", "policy_sample"}:
            raise ValueError(f"SoKDPlugin: extra state must have keys ['policy_sample', 'search'], got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        self.search.load_state_dict(state["search"])
        buffers = dict(self.sokd.policy.named_buffers())
        if set(state["policy_sample"]) != set(buffers):
            raise ValueError(f"SoKDPlugin: policy sample has buffers {sorted(state['policy_sample'])}, "
                             f"expected {sorted(buffers)}")
        with torch.no_grad():
            for name, value in state["policy_sample"].items():
                buffers[name].copy_(value)


# ------------------------------------------------------------------------------------------ wiring
# Taps (docs/specs/sokd.md §5): on classification the stage before the last (CIFAR stage 2 of its res32x4
# config, ImageNet stage 3), named c4 in both classifier families; on detection the last FPN output (the COCO
# row's P6 of Faster R-CNN's P2-P6; RetinaNet's P7 by analogy, ours). Bases: methods whose loss SoKD adds in
# the same step, each on the task's own binding of that method ("none": SoKD's terms alone).
TAPS = {"cls": "c4"}
DET_TAPS = {"two_stage": "p6", "one_stage": "p7"}
BASES = {"kd": kd.METHOD, "dist": dist.METHOD, "gdd": gdd.METHOD}


def default_tap(recipe) -> str:
    if recipe.task == "det":
        return DET_TAPS["two_stage" if is_two_stage(recipe.student) else "one_stage"]
    return TAPS[recipe.task]


def feature_shape(model, name: str, image_size: tuple) -> tuple:
    """``(C, H, W)`` of ``model``'s feature ``name`` for one ``image_size`` input (a probe forward in eval
    mode, no gradient, so neither BN statistics nor RNG state change)."""
    was_training = model.training
    parameter = next(model.parameters())
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, *image_size, device=parameter.device, dtype=parameter.dtype))
    model.train(was_training)
    return tuple(out["feats"][name].shape[1:])


def _tap_shapes(recipe, student, teacher, tap: str) -> list:
    """``(C, H, W)`` of the tap in student and teacher, which choose the adapter's spatial matcher.
    Classifiers: a probe at the crop. Detectors: inputs vary in size, but the tap is the same pyramid
    level (same stride) in both, so the maps always have equal sizes (the 1x1 matcher) and only the
    channels are read."""
    if recipe.task == "det":
        return [(model.out_channels[tap], 1, 1) for model in (student, teacher)]
    return [feature_shape(model, tap, recipe.crop) for model in (student, teacher)]


def _check(recipe):
    """The base is "none" or one of BASES with a binding for the task, and passes that method's own checks
    with its entry of ``base_options``; ``search_options`` are SoKDSearch's."""
    base_name = recipe.method_options.get("base", "none")
    bases = ["none"] + [name for name, method in BASES.items() if recipe.task in method.bind]
    if base_name not in bases:
        raise ValueError(f"--sokd-base {base_name}: for --task {recipe.task} expected one of {bases}")
    base_options = recipe.method_options.get("base_options", {})
    check_options(base_options, set(BASES), "method_options base_options of --method sokd")
    check_options(recipe.method_options.get("search_options", {}),
                  keyword_options(SoKDSearch, supplied=("distiller", "student", "search_iters", "base")),
                  "method_options search_options of --method sokd")
    if base_name != "none":
        check_method(BASES[base_name], _base_recipe(recipe),
                     f"method_options base_options {base_name} of --method sokd")


def _base_recipe(recipe):
    """The recipe of the chosen base method: its name, and its entry of ``base_options`` as its options."""
    base_name = recipe.method_options.get("base", "none")
    return dataclasses.replace(recipe, method=base_name,
                               method_options=recipe.method_options.get("base_options", {}).get(base_name, {}))


def _options(recipe) -> set:
    return ({"base", "base_options"} | keyword_options(SoKDPlugin, supplied=("student", "s_shape", "t_shape"))
            | keyword_options(SoKDDistiller, supplied=("s_shape", "t_shape", "num_heat")))


def _build(recipe, student, teacher):
    """``method_options``: ``base`` ("none" or one of BASES with a binding for the task), ``base_options``
    ({base name: keyword arguments}, the entry of the chosen base is used, so ``--sokd-base`` switches base
    and options together), ``tap`` (default :func:`default_tap`), ``num_heat`` (default num_classes),
    ``search_iters``, ``search_options`` and SoKDDistiller's keyword arguments (k, w_feat, w_dam,
    search_mode, ...)."""
    _check(recipe)
    options = dict(recipe.method_options)
    base_name = options.pop("base", "none")
    options.pop("base_options", None)
    tap = options.pop("tap", default_tap(recipe))
    base = None
    if base_name != "none":
        base_method = BASES[base_name]
        base = BoundBase(base_method.build(_base_recipe(recipe), student, teacher), base_method.bind[recipe.task])
    return SoKDPlugin(student, *_tap_shapes(recipe, student, teacher, tap),
                      options.pop("num_heat", recipe.num_classes), tap, base=base, **options)


def _bind(student_out, teacher_out, batch):
    """The whole outputs (the tap, the base's inputs) and the batch (the boxes of a detection base)."""
    return {"student_out": student_out, "teacher_out": teacher_out, "batch": batch}


METHOD = Method(build=_build, bind={"cls": _bind, "det": _bind}, check=_check, options=_options)
