"""What the command-line tools share, kept free of torch so that ``--help`` and argument errors answer at
once (importing torch and torchvision takes seconds): the names the tools offer and a parser whose errors
are one line.

The registries (``kd_ref.tasks.TASKS`` with their ``size_field``, ``kd_ref.methods.METHODS``) and the loaders
(``kd_ref.datasets``) are the truth; ``tests/test_cli.py`` checks that these names equal theirs.
"""
from __future__ import annotations

import argparse
import os
import sys

TASKS = ("seg", "det", "cls", "ins", "depth")
METHODS = ("none", "kd", "dist", "gdd", "skd", "gkd", "sokd")
# the data sets of each task; "synthetic" is built in, the others are read from --data-root
DATA = {"seg": ("synthetic", "cityscapes"), "det": ("synthetic", "voc", "coco"),
        "cls": ("synthetic", "cifar100", "imagenet"), "ins": ("synthetic", "coco"), "depth": ("synthetic", "nyu")}
ALL_DATA = tuple(dict.fromkeys(name for names in DATA.values() for name in names))
# the recipe field of each task's training input size (the task objects' ``size_field``): a crop (H, W),
# or the keep-ratio resize bounds of whole images (long side, short side)
INPUT_SIZE_FIELD = {"seg": "crop", "det": "image_scale", "cls": "crop", "ins": "image_scale", "depth": "crop"}


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are the one line ``error: <flag>: <what was expected>`` on stderr
    (exit status 2), without the usage block argparse prints before it."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value


# argparse names the type in its message ("invalid positive_int value"): say what is expected instead
positive_int.__name__ = "positive integer"
non_negative_int.__name__ = "non-negative integer"
non_negative_float.__name__ = "non-negative number"


def add_amp_argument(parser: argparse.ArgumentParser) -> None:
    """``--amp [bf16|fp16]``: the training precision request that ``kd_ref.precision.resolve_precision`` turns
    into fp32 (flag absent: None), bf16 or fp16 on the run's device (a bare ``--amp``: "auto")."""
    parser.add_argument("--amp", nargs="?", const="auto", default=None, choices=("auto", "bf16", "fp16"),
                        help="mixed precision (default: off, float32 as the references train). A bare --amp "
                             "(= auto) picks bf16 autocast where the device computes bf16 natively (CPU; CUDA "
                             "cards with native bf16, compute capability 8.0 and later), else fp16 autocast "
                             "with a GradScaler; --amp bf16 or --amp fp16 forces one (bf16 is refused on a "
                             "CUDA card without native bf16)")


def check_data_root(task: str, data: str, root: str | None) -> None:
    """``--data-root`` is given exactly for real data sets, and is a folder."""
    if data == "synthetic" and root is not None:
        real = " or ".join(name for name in DATA[task] if name != "synthetic")
        raise ValueError(f"--data-root {root}: --data synthetic is built in and reads no folder; pass --data {real} "
                         "to use the data set there")
    if data != "synthetic" and root is None:
        raise ValueError(f"--data {data} needs --data-root DIR (the folder of the data set)")
    if root is not None and not os.path.isdir(root):
        raise FileNotFoundError(f"--data-root {root}: no such directory")
