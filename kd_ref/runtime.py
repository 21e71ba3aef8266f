"""What surrounds a training run without being its training: the process, its files, its signals.

* The process: :class:`Runtime` (device, rank, world size, precision), built by :func:`setup_runtime` from
  torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; NCCL on CUDA, gloo on CPU), and the
  multi-process helpers :func:`unwrap` (the module inside DDP), :func:`decided_by_main` (a choice made once,
  on the global rank 0, for every rank) and :func:`check_on_every_rank` (an input check that stops every
  rank when one fails, so that none waits alone in its next collective).
* Preemption: :class:`PreemptionGuard` turns the first SIGTERM/SIGINT into a request to stop after the
  current iteration, agreed over the ranks; the engine then checkpoints and raises
  :class:`TrainingInterrupted`.
* Checkpoint files: every RNG state (:func:`rng_state`), :func:`atomic_save` (a temporary file renamed over
  the target, so a crash never leaves a half-written ``last.pt``), :func:`load_checkpoint` (one line for
  anything that is not a kd_ref checkpoint) and :func:`precision_change_note`.
* Outputs: strict JSON (a non-finite float is written as null), the ``log.jsonl`` writer :class:`JsonlLog`,
  and :func:`print_table`.
* Memory: :func:`peak_memory_mb`, :func:`estimate_training_memory` (what train.py checks before a run), and
  :class:`BatchNormWatch`, which warns when the first step's BatchNorm normalises over too few values.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import resource
import signal
import sys
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from kd_ref import convert, methods, tasks
from kd_ref.backbones import read_torch_file
from kd_ref.precision import PRECISION_DTYPES, resolve_precision
from kd_ref.recipe import Recipe


# ------------------------------------------------------------------------------------ distributed
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    precision: str = "fp32"  # a key of precision.PRECISION_DTYPES, chosen by resolve_precision from --amp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def amp(self) -> bool:
        return self.precision != "fp32"

    @property
    def uses_grad_scaler(self) -> bool:
        return self.precision == "fp16"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=PRECISION_DTYPES[self.precision], enabled=self.amp)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled under fp16 only (a disabled one passes every call through)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.uses_grad_scaler)


def setup_runtime(device: str | None = None, amp: str | None = None) -> Runtime:
    """Device and process group from torchrun's environment (single process when absent), and the precision
    that ``--amp amp`` (None: no --amp, "auto", "bf16" or "fp16") resolves to on that device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
        torch.backends.cudnn.benchmark = True
    else:
        torch_device = torch.device("cpu")
        # subnormal floats (e.g. in the tails of the GDD generator's weights after a few updates) take
        # a slow microcode path on x86 CPUs: one step became several times slower without this
        torch.set_flush_denormal(True)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    native_cuda_bf16 = device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    precision = resolve_precision(amp, torch_device.type, native_cuda_bf16)
    return Runtime(torch_device, rank, world_size, precision)


def close_runtime(runtime: Runtime) -> None:
    """End a finished run's process group (torchrun): every rank destroys it before exiting, as PyTorch
    asks, rather than leaving the connections to its peers to the interpreter's shutdown."""
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


SHARED_FILES_HINT = ("every node must see the same --out folder and teacher file (a file system shared by the "
                     "nodes) and the same input files")


def decided_by_main(runtime: Runtime, decide):
    """``decide()`` on the global rank 0, sent to every rank: a choice made once for the whole run (e.g. train the
    synthetic teacher or reuse it), so that ranks whose nodes see different files still take the same path."""
    if runtime.world_size == 1:
        return decide()
    choice = [decide() if runtime.is_main else None]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def check_on_every_rank(runtime: Runtime, check, hint: str = SHARED_FILES_HINT) -> None:
    """``check()`` (which raises on a bad input, e.g. ValueError or FileNotFoundError) on every rank; under DDP
    every rank raises if it failed on any, naming that rank and ``hint`` when some ranks passed: a rank that
    stopped alone would leave the others waiting in their next collective."""
    if runtime.world_size == 1:
        check()
        return
    try:
        check()
        failure = None
    except Exception as error:  # whatever stops one rank must stop all of them
        failure = (type(error) is FileNotFoundError, str(error))
    failures = [None] * runtime.world_size
    dist.all_gather_object(failures, failure)
    failed = [(rank, found) for rank, found in enumerate(failures) if found is not None]
    if not failed:
        return
    rank, (missing, message) = failed[0]
    error = FileNotFoundError if missing else ValueError
    if len(failed) == runtime.world_size and all(found == failed[0][1] for _, found in failed):
        raise error(message)  # the same on every rank: a plain bad input
    raise error(f"rank {rank}: {message}; {len(failed)} of {runtime.world_size} ranks failed this check: {hint}")


# -------------------------------------------------------------------------------------- preemption
class TrainingInterrupted(Exception):
    """Raised after SIGTERM/SIGINT once the current iteration is finished and checkpointed."""

    def __init__(self, signum: int, iteration: int, ckpt_path: str):
        self.signum, self.iteration, self.ckpt_path = signum, iteration, ckpt_path
        super().__init__(f"{signal.Signals(signum).name} received: stopped after iteration {iteration}, "
                         f"checkpoint {ckpt_path}; continue with the same command plus --resume")


class PreemptionGuard:
    """Turns the first SIGTERM/SIGINT into a request to stop at the end of the current iteration (a
    second one acts as usual). Under DDP the request is agreed over all ranks, so every rank stops
    at the same iteration even if only one was signalled."""

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum])

    def agreed_flag(self, runtime: Runtime) -> torch.Tensor | None:
        """Under DDP, the largest signal number of all ranks (all-reduced, MAX) as a tensor left on the device, to
        travel in the step's one read; None in a single process, whose request is on the host."""
        if runtime.world_size == 1:
            return None
        flag = torch.full((1,), float(self.signum), device=runtime.device)  # a fill: no copy from the host
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag[0]

    def requested(self, agreed: int | None) -> int:
        """The signal number to stop for after a step (0: keep going), the same on every rank: under DDP the
        ``agreed`` flag that step read (:meth:`agreed_flag`), otherwise this process's own (``agreed`` None)."""
        return self.signum if agreed is None else agreed


# ------------------------------------------------------------------------------------- checkpoints
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path: str) -> None:
    """Write ``obj`` to ``path`` through a temporary file and an atomic rename."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, source: str | None = None) -> dict:
    """Load a checkpoint written by this engine (to resume), with a clear error for anything else, a
    checkpoint of another format version (``convert.CHECKPOINT_FORMAT_VERSION``) included."""
    ckpt = read_torch_file(path, source or f"checkpoint {path}")
    convert.check_format(ckpt, source or path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{source or f'checkpoint {path}'}: expected a kd_ref checkpoint (a dict with 'model'), "
                         f"found {type(ckpt).__name__} with keys {sorted(ckpt)[:8] if isinstance(ckpt, dict) else '-'}")
    return ckpt


def precision_change_note(trained: str, now: str, path: str) -> str | None:
    """The line a run resumed from ``path`` (trained in ``trained``, the checkpoint's record) says when
    it continues in another precision ``now``; None when nothing changes. A change of
    precision is allowed: the weights and optimizer states are float32 whatever the autocast, and only the
    fp16 GradScaler's state is left behind (or, going to fp16, starts from its initial scale)."""
    if trained == now:
        return None
    consequences = []
    if trained == "fp16":
        consequences.append("its GradScaler state is dropped")
    if now == "fp16":
        consequences.append("the GradScaler starts from its initial scale")
    return (f"--resume: {path} was trained in {trained}, this run continues in {now}"
            + "".join(f"; {item}" for item in consequences))


# ------------------------------------------------------------------------------------------ logging
def strict_json(value):
    """``value`` with every non-finite float replaced by None, so that any JSON parser reads what we write
    (a class absent from the evaluation set has no IoU: null, not Python's bare NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def dumps(value, **options) -> str:
    return json.dumps(strict_json(value), allow_nan=False, **options)


def write_json(path: str, value) -> None:
    with open(path, "w") as handle:
        handle.write(dumps(value, indent=1) + "\n")


class JsonlLog:
    """Append-only JSON-lines log, written by rank 0 only."""

    def __init__(self, path: str, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(dumps(record) + "\n")

    def truncate(self, iteration: int) -> None:
        """Drop the records past ``iteration``: a run resumed from the checkpoint of that iteration replays
        them, and the log stays one history without repeated iterations."""
        if not (self.enabled and os.path.isfile(self.path)):
            return
        with open(self.path) as handle:
            kept = [line for line in handle if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as handle:
            handle.writelines(kept)
        os.replace(tmp, self.path)


def print_table(rows: list, file=None) -> None:
    """Small fixed-width table: ``rows`` is a list of (name, value) pairs; to ``file`` (default: the current
    sys.stdout, looked up at the call)."""
    width = max(len(str(name)) for name, _ in rows)
    for name, value in rows:
        shown = f"{value:.2f}" if isinstance(value, float) and not math.isnan(value) else str(value)
        print(f"  {str(name):<{width}}  {shown}", file=file or sys.stdout)


# ------------------------------------------------------------------------------------------- memory
def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def estimate_training_memory(recipe: "Recipe", per_rank_batch: int, probe_pixels: int = 128 * 128) -> int:
    """Bytes one process needs to train ``recipe`` at ``per_rank_batch``, estimated before any data is read:
    float32 student weights, gradients and momentum, the teacher's weights, and the student's activations
    kept for backward, taken as the outputs of all its leaf modules in one forward of a probe input of at most
    ``probe_pixels`` pixels, scaled to the training input (activations grow with the pixel count)."""
    task = tasks.TASKS[recipe.task]
    height, width = recipe.image_scale[::-1] if task.size_field == "image_scale" else recipe.crop
    scale = min(1.0, math.sqrt(probe_pixels / (height * width)))
    probe_size = (max(32, round(height * scale)), max(32, round(width * scale)))
    student = task.build_model(recipe, recipe.student).eval()
    outputs = {}  # storage -> bytes; kept alive during the probe, so in-place results (ReLU) count once

    def keep(module, inputs, output):
        for tensor in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(tensor, torch.Tensor):
                outputs[tensor.untyped_storage().data_ptr()] = (tensor, tensor.numel() * 4)

    leaves = [module for module in student.modules() if not list(module.children())]
    hooks = [module.register_forward_hook(keep) for module in leaves]
    with torch.no_grad():
        student(torch.zeros(1, 3, *probe_size), predict=False)
    for hook in hooks:
        hook.remove()
    activation_bytes = sum(size for _, size in outputs.values())
    pixel_ratio = height * width / (probe_size[0] * probe_size[1])
    total = 3 * 4 * sum(p.numel() for p in student.parameters()) + activation_bytes * pixel_ratio * per_rank_batch
    if methods.METHODS[recipe.method].needs_teacher and recipe.teacher is not None:
        total += 4 * sum(p.numel() for p in task.build_model(recipe, recipe.teacher).parameters())
    return int(total)


MIN_BATCHNORM_VALUES = 4


class BatchNormWatch:
    """Records, during one forward, the fewest values per channel that any training-mode BatchNorm of
    ``modules`` normalises over (batch x H x W, times the processes for SyncBatchNorm)."""

    def __init__(self, modules, world_size: int):
        self.world_size, self.fewest, self.layer = world_size, None, None
        self.handles = [layer.register_forward_pre_hook(functools.partial(self._record, name))
                        for module in modules if module is not None
                        for name, layer in module.named_modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]

    def _record(self, name, layer, inputs) -> None:
        if not layer.training:
            return
        values = inputs[0].numel() // max(inputs[0].shape[1], 1)
        if isinstance(layer, nn.SyncBatchNorm):
            values *= self.world_size
        if self.fewest is None or values < self.fewest:
            self.fewest, self.layer = values, name

    def close(self, warn: bool = True) -> None:
        for handle in self.handles:
            handle.remove()
        if warn and self.fewest is not None and self.fewest < MIN_BATCHNORM_VALUES:
            warnings.warn(f"BatchNorm {self.layer} normalises over {self.fewest} values per channel (batch x H x W "
                          f"at that stage) < {MIN_BATCHNORM_VALUES}: its batch statistics are mostly noise and its "
                          "running variance can blow up; use a larger --batch-size or input size", stacklevel=2)
