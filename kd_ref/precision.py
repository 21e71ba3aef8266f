"""Numerical precision shared by the method files: losses are computed in at least float32.

Lifting the inputs to float32 is not enough under ``torch.autocast``: matrix products (``@``, ``bmm``,
``linear``, convolutions) are re-cast to the autocast dtype whatever their inputs, so a loss that the
specs require in float32 runs its products inside :func:`autocast_disabled`."""
from __future__ import annotations

import torch


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Lift half-precision tensors (autocast) to float32; keep float64, so golden checks stay exact."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def autocast_disabled(tensor: torch.Tensor):
    """Context in which autocast is off on ``tensor``'s device: operations run in their inputs' dtype."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)
