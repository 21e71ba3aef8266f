"""Host-device synchronisations of one training iteration, per task and method.

    python -m kd_ref.syncs [--presets NAME ...] [--device cpu|cuda]

Every call that makes the host wait for the device (a value read on the host, a tensor whose size depends
on its values) stalls a GPU's queue of kernels; the engine reads the device once per iteration by design
(``kd_ref.engine``: the stacked loss values and gradient norms), and this counts what each method adds.
The iteration counted is the engine's own (``TrainingRun.train_step``, ``extra_step``, ``step_hooks``) on
the run's second batch, the first having run uncounted (it alone checks BatchNorm sizes and creates the
optimizer state); per-epoch hooks (GKD's prototype pass) are not in the count.

* On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA call warn, and
  the warnings are counted: the measurement.
* On a CPU nothing waits, so the calls that would wait on a GPU are counted by design
  (:class:`SyncCounter`): a scalar read (``item()``, ``int()``, ``float()``, ``bool()`` of a tensor, the
  ``aten._local_scalar_dense`` they all reach), ``tolist()``, ``numpy()``, ``cpu()`` / ``to("cpu")``
  (not ``to(device)``: the run's device, the CPU here and a GPU there), and the operators whose output
  size depends on values (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing and
  assignment, ``repeat_interleave`` without ``output_size``). Not seen on a CPU: copies of host-built
  tensors to the device (``torch.tensor(list, device=...)``), which CUDA counts unless they are
  ``non_blocking`` from pinned memory; and a ``cpu()`` of a tensor already on the host counts although
  it would not wait.

Each row runs the preset's recipe at its demo sizes with two images per batch, a two-batch training set
and randomly initialised models (a teacher's weights do not change what it synchronises).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import tempfile
import warnings

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from kd_ref import engine, methods, tasks
from kd_ref.presets import PRESETS
from kd_ref.recipe import Recipe
from kd_ref.runtime import Runtime, setup_runtime

# Tensor methods that hand device values to Python; they run no aten operator on a CPU tensor, so only the
# function mode sees them. Scalar reads (item, bool, int, float) are counted once, at _local_scalar_dense.
_HOST_READS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu"}
# aten operators whose output size is read from the device before the output is allocated
_SIZE_FROM_VALUES = {
    torch.ops.aten._local_scalar_dense.default: "item",
    torch.ops.aten.nonzero.default: "nonzero",
    torch.ops.aten.masked_select.default: "masked_select",
    torch.ops.aten._unique2.default: "unique",
    torch.ops.aten.unique_dim.default: "unique",
    torch.ops.aten.unique_consecutive.default: "unique",
    torch.ops.aten.repeat_interleave.Tensor: "repeat_interleave",
}
_BOOLEAN_INDEXING = {torch.ops.aten.index.Tensor: "mask_index", torch.ops.aten.index_put.default: "mask_assign",
                     torch.ops.aten.index_put_.default: "mask_assign",
                     torch.ops.aten._index_put_impl_.default: "mask_assign"}


def _to_host(args, kwargs) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names the host: the string "cpu". A torch.device argument
    is the run's device (``.to(feat.device)``), which is the CPU here and a GPU there, so it is no read."""
    targets = [*args[1:], kwargs.get("device")]
    return any(isinstance(target, str) and torch.device(target).type == "cpu" for target in targets)


class _FunctionCounts(TorchFunctionMode):
    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_READS:
            self.counts[_HOST_READS[func]] += 1
        elif func is torch.Tensor.to and _to_host(args, kwargs):
            self.counts["cpu"] += 1
        return func(*args, **kwargs)


class _DispatchCounts(TorchDispatchMode):
    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SIZE_FROM_VALUES:
            if not (func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None):
                self.counts[_SIZE_FROM_VALUES[func]] += 1
        elif func in _BOOLEAN_INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in indices):
                self.counts[_BOOLEAN_INDEXING[func]] += 1
        return func(*args, **kwargs)


class SyncCounter:
    """Context manager counting, by kind, the calls inside it that synchronise on CUDA (module docstring):
    ``counts`` (a Counter by kind) and ``total``. On CPU tensors it counts by design; on CUDA tensors the
    same calls are counted the same way (use :class:`CudaSyncWarnings` for the measurement)."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._stack = contextlib.ExitStack()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> "SyncCounter":
        self._stack.enter_context(_FunctionCounts(self.counts))
        self._stack.enter_context(_DispatchCounts(self.counts))
        return self

    def __exit__(self, *exc_info) -> None:
        self._stack.close()


class CudaSyncWarnings:
    """Context manager counting the synchronising CUDA calls inside it, as
    ``torch.cuda.set_sync_debug_mode("warn")`` reports them (one warning each): ``total``; ``counts`` holds
    them by the warning's text, which names no operator, so all under "cuda"."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self._caught = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> "CudaSyncWarnings":
        torch.cuda.synchronize()        # work queued before the block is not the block's
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")  # every occurrence, not the first per code location
        self._previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc_info) -> None:
        torch.cuda.set_sync_debug_mode(self._previous)
        self._catcher.__exit__(*exc_info)
        self.counts["cuda"] = sum(self.MESSAGE in str(caught.message) for caught in self._caught)


def default_presets() -> list[str]:
    """Every synthetic preset that trains a student (task x method x model family), teachers aside."""
    return [name for name, recipe in PRESETS.items()
            if recipe.data == "synthetic" and not name.endswith("_teacher")]


def probe_recipe(name: str) -> Recipe:
    """Preset ``name`` shrunk to what one counted iteration needs: two batches of two images."""
    recipe = PRESETS[name]
    return dataclasses.replace(recipe, batch_size=2, synthetic_train=4, synthetic_val=1, iters=2, epochs=None,
                               eval_every=0, eval_at=(), ckpt_every=0, keep_best=False, pretrained=None,
                               student_init=None)


def random_teacher_file(recipe: Recipe, path: str) -> str | None:
    """Save ``recipe``'s teacher with its initial weights (seeded by ``recipe.seed``) at ``path`` and return
    ``path``; None for a method without a teacher. What a step synchronises, or which device and precision
    paths it takes, does not depend on what the teacher knows."""
    if not methods.METHODS[recipe.method].needs_teacher:
        return None
    torch.manual_seed(recipe.seed)
    teacher = tasks.TASKS[recipe.task].build_model(recipe, recipe.teacher, pretrained=None)
    torch.save(teacher.state_dict(), path)
    return path


def count_iteration(recipe: Recipe, runtime: Runtime, counter_factory=SyncCounter):
    """The synchronisations of the second training iteration of ``recipe`` (a ``counter_factory()``
    context, returned after the iteration), with a randomly initialised teacher."""
    with tempfile.TemporaryDirectory(prefix="kd_ref_syncs_") as scratch:
        teacher_ckpt = random_teacher_file(recipe, os.path.join(scratch, "teacher.pt"))
        run = engine.TrainingRun(recipe, os.path.join(scratch, "run"), runtime, resume=False,
                                 teacher_ckpt=teacher_ckpt, workers=0, data_root=None, quiet=True)
        run.restore()
        counter = counter_factory()
        batches = iter(())
        for iteration in range(2):
            if iteration == 0 or run.iteration % run.iters_per_epoch == 0:
                run.begin_epoch()
                batches = iter(run.loader)
            batch = run.train_set.prepare_batch(engine.move_to(next(batches), runtime.device))
            with counter if iteration == 1 else contextlib.nullcontext():
                step = run.train_step(batch, data_seconds=0.0)
                run.extra_step(step)
                run.step_hooks(batch, step)
            run.iteration += 1
    return counter


def table(presets: list[str], runtime: Runtime) -> list[tuple]:
    """``(task, preset, method, total, {kind: count})`` per preset, printed as they come."""
    measured = runtime.device.type == "cuda"
    factory = CudaSyncWarnings if measured else SyncCounter
    how = ("measured: torch.cuda.set_sync_debug_mode('warn') warnings" if measured else
           "counted by design on the CPU (python -m kd_ref.syncs --help)")
    print(f"host-device synchronisations of one training iteration on {runtime.device} ({how}); "
          "the engine's own read is 1 (tolist)")
    print(f"  {'task':<6} {'preset':<30} {'method':<7} {'syncs':>5}  by kind")
    rows = []
    for name in presets:
        recipe = probe_recipe(name)
        counter = count_iteration(recipe, runtime, factory)
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(counter.counts.items()))
        rows.append((recipe.task, name, recipe.method, counter.total, dict(counter.counts)))
        print(f"  {recipe.task:<6} {name:<30} {recipe.method:<7} {counter.total:>5}  {kinds}", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_ref.syncs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=None, metavar="NAME",
                        help="synthetic presets to count (default: every one that trains a student)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available (measured), else cpu (counted by design)")
    args = parser.parse_args(argv)
    presets = args.presets or default_presets()
    unknown = [name for name in presets if name not in PRESETS or PRESETS[name].data != "synthetic"]
    if unknown:
        parser.error(f"--presets {' '.join(unknown)}: not synthetic presets; python train.py --list-presets lists them")
    try:
        runtime = setup_runtime(args.device)
    except ValueError as err:
        parser.error(str(err))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # tiny batches: BatchNorm and GKD's PGM warn by design
        table(presets, runtime)


if __name__ == "__main__":
    main()
