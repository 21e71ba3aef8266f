"""Helpers shared by the model tests."""
import torch
import torch.nn as nn


def count_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def randomise_(module: nn.Module) -> nn.Module:
    """Random weights and BN statistics so that eval-mode comparisons exercise every tensor."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.dtype.is_floating_point:
                continue
            if name.endswith("running_var") or (name.endswith("weight") and tensor.dim() == 1):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return module


def force_sub_policy(policy, pair, switches=(1.0, 1.0), levels=(0.75, 0.25)):
    """Make the current sample of a SoKD ``AugmentPolicy`` the sub-policy ``pair`` with the given op switches
    and magnitudes; returns its index."""
    k = policy.sub_policies.index(pair)
    with torch.no_grad():
        policy.op_switches.copy_(torch.tensor(switches).expand(len(policy.sub_policies), 2))
        policy.sub_policy_index.fill_(k)
        policy.magnitude[k] = torch.tensor(levels)
    return k
