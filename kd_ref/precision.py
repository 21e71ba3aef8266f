"""Numerical precision: the training precision that ``--amp`` selects (:func:`resolve_precision`), and the
rule shared by the method files that losses are computed in at least float32.

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


def tree_at_least_float32(value):
    """:func:`at_least_float32` on every floating tensor of a nested dict/list/tuple (other leaves unchanged)."""
    if torch.is_tensor(value):
        return at_least_float32(value) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: tree_at_least_float32(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(tree_at_least_float32(item) for item in value)
    return value


# ------------------------------------------------------------------------------ training precision
# The training precisions and their compute dtypes. "fp32": no autocast; "bf16": bfloat16 autocast (float32's
# exponent range, so no loss scaling); "fp16": float16 autocast with a GradScaler, which keeps small gradients
# above fp16's underflow
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str | None, device_type: str, native_cuda_bf16: bool = False) -> str:
    """The training precision for ``--amp requested`` on ``device_type``: None (no ``--amp``) is fp32;
    "auto" (a bare ``--amp``) is bf16 where the device computes it natively (the CPU; a CUDA card with
    ``native_cuda_bf16``, i.e. ``torch.cuda.is_bf16_supported(including_emulation=False)``, Ampere and
    later), else fp16; "bf16" and "fp16" are taken as asked, except bf16 on a CUDA card without native
    bf16, which is refused rather than emulated."""
    if requested is None:
        return "fp32"
    if requested not in ("auto", "bf16", "fp16"):
        raise ValueError(f"--amp {requested}: expected bf16, fp16 or no value (auto)")
    bf16_native = device_type != "cuda" or native_cuda_bf16
    if requested == "auto":
        return "bf16" if bf16_native else "fp16"
    if requested == "bf16" and not bf16_native:
        raise ValueError("--amp bf16: this CUDA device has no native bfloat16 (torch.cuda.is_bf16_supported"
                         "(including_emulation=False) is False); use --amp fp16, or a bare --amp to pick it")
    return requested
