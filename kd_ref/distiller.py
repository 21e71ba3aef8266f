"""The contract between a method and the engine.

A method is one file of ``kd_ref/`` and one line of ``kd_ref.methods.METHODS``. The file ends with its
:class:`Method` record: how to build its distiller, which model outputs the distiller reads on each task
(``bind``), which ``method_options`` it takes (``options``) and which recipes it refuses (``check``). The
distiller subclasses :class:`Distiller`: ``forward`` returns the method's weighted losses, and the other
methods are the engine's hooks, no-ops here, which the engine calls on every distiller at the moments their
docstrings name.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kd_ref.recipe import EPOCH_OPTIONS


@dataclass
class EpochContext:
    """What :meth:`Distiller.before_epoch` may use: the models, the training data (without the recipe's
    repetition, with its collate) and the epoch, ``epoch`` (0-based) of ``epochs``."""
    epoch: int
    student: nn.Module
    teacher: nn.Module
    dataset: object
    collate: Callable
    runtime: object
    epochs: int = 1


@dataclass
class StepContext:
    """What :meth:`Distiller.after_step` may use: the iteration's batch, the updated student, the teacher,
    and ``loss_fn(batch)``, the training loss at the student's current parameters (float32)."""
    iteration: int
    batch: dict
    student: nn.Module
    teacher: nn.Module
    loss_fn: Callable[[dict], torch.Tensor]
    runtime: object


class Distiller(nn.Module):
    """A method's losses and learnable parts. A subclass defines ``forward(**inputs)``: the method's losses,
    weighted, named ``loss_*``, from the keyword arguments its ``Method.bind`` returns for the task; the engine
    adds them to the student's task losses. Its parameters are trained with the student, by the student's
    optimizer, except :meth:`extra_parameters`. State beyond parameters and buffers goes through
    ``nn.Module.get_extra_state`` / ``set_extra_state``, so checkpoints carry it."""

    def before_epoch(self, context: EpochContext) -> None:
        """Called before the first batch of every epoch (and not when a run resumes inside an epoch)."""

    def after_step(self, context: StepContext) -> None:
        """Called after every iteration's updates (student, then :meth:`extra_parameters`)."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters the student's optimizer leaves alone: an adversary's (trained by :meth:`extra_optimizer`
        on :meth:`extra_losses`) or a searched policy's (updated by the distiller in :meth:`after_step`)."""
        return []

    def extra_optimizer(self, total_iters: int) -> tuple[torch.optim.Optimizer, Callable[[int], float] | None] | None:
        """``(optimizer, lr_factor(iteration) or None)`` over :meth:`extra_parameters`, which the engine steps
        on :meth:`extra_losses` after the student's update; called once, when the run is built, if there are
        such parameters. None (the default): the distiller updates them itself."""
        return None

    def extra_losses(self, **inputs) -> dict[str, torch.Tensor]:
        """The losses of :meth:`extra_optimizer`'s parameters, from the same inputs as ``forward``; called every
        iteration after ``forward`` when there is such an optimizer. Their backward reaches no student
        parameter."""
        return {}

    def sync_batchnorm_modules(self) -> list[nn.Module]:
        """Modules whose BatchNorm layers become SyncBatchNorm in a multi-GPU run; none by default."""
        return []


@dataclass(frozen=True)
class Method:
    """A method as the engine and the command line see it. ``build(recipe, student, teacher)`` returns its
    :class:`Distiller` (None: no distillation, no teacher); ``bind[task](student_out, teacher_out, batch)``
    returns the keyword arguments of the distiller's ``forward`` on that task; ``check(recipe)``, if given,
    refuses with one line a recipe the method cannot train, before any model is built or teacher trained
    (``build`` calls it too); ``options(recipe)`` names the ``method_options`` the build reads on the recipe's
    task."""
    build: Callable[..., Distiller] | None
    bind: dict[str, Callable[[dict, dict, dict], dict]] = field(default_factory=dict)
    check: Callable | None = None
    # options(recipe): the names recipe.method_options may hold on the recipe's task (kd_ref.methods.check_recipe
    # refuses any other with one line before a teacher trains); None: not checked
    options: Callable | None = None

    @property
    def needs_teacher(self) -> bool:
        return self.build is not None


def keyword_options(target: Callable, supplied: tuple = ()) -> set:
    """The keyword parameters of ``target`` (a class or a function) that ``method_options`` may set: all but
    ``supplied`` (given by the method's build) and ``*args`` / ``**kwargs``."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name for name, spec in inspect.signature(target).parameters.items() if spec.kind in kinds} - set(supplied)


def no_options(recipe) -> set:
    """``Method.options`` of a method that takes none."""
    return set()


def check_options(options: dict, accepted: set, where: str) -> None:
    """Refuse with one line the keys of ``options`` outside ``accepted``; ``where`` names the options for the
    user (e.g. ``method_options`` of ``--method kd``)."""
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; expected "
                         f"some of {', '.join(sorted(accepted)) or '(none)'}")


def check_method(method: Method, recipe, where: str) -> None:
    """Refuse with one line a recipe ``method`` cannot train: a ``method_options`` key outside
    ``method.options(recipe)`` (an epoch-based recipe may count an option in epochs, resolved to iterations
    when the run starts; ``where`` names the options for the user), then ``method.check``."""
    if method.options is not None:
        accepted = method.options(recipe)
        accepted |= {epochs for epochs, iters in EPOCH_OPTIONS.items() if iters in accepted}
        check_options(recipe.method_options, accepted, where)
    if method.check is not None:
        method.check(recipe)


HOOKS = ("extra_parameters", "extra_optimizer", "extra_losses", "before_epoch", "after_step", "sync_batchnorm_modules")


def uses_hook(distiller: Distiller | None, hook: str) -> bool:
    """Whether ``distiller`` does something in the engine hook ``hook`` (its class replaces the no-op; a module
    that is not a :class:`Distiller` has no hooks): for what accounts for a hook apart, e.g. a benchmark's
    per-part cost or a plug-in that takes plain losses."""
    if hook not in HOOKS:
        raise ValueError(f"uses_hook: {hook} is not an engine hook; expected one of {HOOKS}")
    return isinstance(distiller, Distiller) and getattr(type(distiller), hook) is not getattr(Distiller, hook)
