"""Numerical precision shared by the method files: losses are computed in at least float32."""
from __future__ import annotations

import torch


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Lift half-precision tensors (autocast) to float32; keep float64, so golden checks stay exact."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
