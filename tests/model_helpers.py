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


class ReferenceFile:
    """Random tensors under a reference code's own key names, for layout-faithful checkpoint tests."""

    RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.weights: dict[str, torch.Tensor] = {}

    def randn(self, *shape, std=0.05):
        return torch.randn(*shape, generator=self.generator) * std

    def conv(self, name, out_channels, in_channels, kernel, bias=True):
        # std 1/sqrt(fan-in): activations keep their scale through a deep random trunk
        self.weights[f"{name}.weight"] = self.randn(out_channels, in_channels, kernel, kernel,
                                                    std=(in_channels * kernel * kernel) ** -0.5)
        if bias:
            self.weights[f"{name}.bias"] = self.randn(out_channels)

    def linear(self, name, out_features, in_features):
        self.weights[f"{name}.weight"] = self.randn(out_features, in_features, std=in_features ** -0.5)
        self.weights[f"{name}.bias"] = self.randn(out_features)

    def affine(self, name, width):
        self.weights[f"{name}.weight"] = torch.rand(width, generator=self.generator) + 0.5
        self.weights[f"{name}.bias"] = self.randn(width)

    def batch_norm(self, name, width, counter):
        """``counter``: torch BatchNorm2d's num_batches_tracked (maskrcnn-benchmark's FrozenBatchNorm2d has none)."""
        self.affine(name, width)
        self.weights[f"{name}.running_mean"] = self.randn(width)
        self.weights[f"{name}.running_var"] = torch.rand(width, generator=self.generator) + 0.5
        if counter:
            self.weights[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    def resnet(self, prefix, stem, depth, counter):
        """A Bottleneck ResNet in torchvision's block names (mmdet and maskrcnn-benchmark share them) with the
        7x7 stem conv / BN under ``stem`` + ``conv1`` / ``bn1``."""
        self.conv(stem + "conv1", 64, 3, 7, bias=False)
        self.batch_norm(stem + "bn1", 64, counter)
        in_channels = 64
        for stage, num_blocks in enumerate(self.RESNET_BLOCKS[depth]):
            width, out_channels = 64 * 2 ** stage, 256 * 2 ** stage
            for index in range(num_blocks):
                block = f"{prefix}layer{stage + 1}.{index}."
                self.conv(block + "conv1", width, in_channels if index == 0 else out_channels, 1, bias=False)
                self.conv(block + "conv2", width, width, 3, bias=False)
                self.conv(block + "conv3", out_channels, width, 1, bias=False)
                for k, bn_width in ((1, width), (2, width), (3, out_channels)):
                    self.batch_norm(block + f"bn{k}", bn_width, counter)
                if index == 0:
                    self.conv(block + "downsample.0", out_channels, in_channels, 1, bias=False)
                    self.batch_norm(block + "downsample.1", out_channels, counter)
            in_channels = out_channels


BN_NAMES = ("weight", "bias", "running_mean", "running_var")


def put(module: nn.Module, weights: dict, prefix: str, names=("weight", "bias")) -> None:
    """Copy ``weights[prefix.name]`` into ``module.name`` for each name: placing a reference file by hand."""
    with torch.no_grad():
        for name in names:
            getattr(module, name).copy_(weights[f"{prefix}.{name}"])


def place_resnet_by_hand(backbone: nn.Module, weights: dict, prefix: str, stem: str) -> None:
    """A :meth:`ReferenceFile.resnet` trunk copied into our ResNet module by module (no key map involved)."""
    put(backbone.stem[0], weights, stem + "conv1", ("weight",))
    put(backbone.stem[1], weights, stem + "bn1", BN_NAMES)
    for stage in range(1, 5):
        for index, block in enumerate(getattr(backbone, f"layer{stage}")):
            name = f"{prefix}layer{stage}.{index}."
            for k in (1, 2, 3):
                put(getattr(block, f"conv{k}"), weights, name + f"conv{k}", ("weight",))
                put(getattr(block, f"bn{k}"), weights, name + f"bn{k}", BN_NAMES)
            if block.downsample is not None:
                put(block.downsample[0], weights, name + "downsample.0", ("weight",))
                put(block.downsample[1], weights, name + "downsample.1", BN_NAMES)
