"""The method contract (kd_ref/distiller.py): the base's hooks are no-ops the engine may call on any distiller,
``extra_optimizer`` decides whether the engine steps the extra parameters, and ``uses_hook`` tells which hooks a
distiller replaces."""
import pytest
import torch
import torch.nn as nn

from kd_ref.distiller import HOOKS, Distiller, check_options, keyword_options, uses_hook
from kd_ref.engine import build_optimizers
from kd_ref.recipe import Recipe


class Plain(Distiller):
    def __init__(self):
        super().__init__()
        self.adapter = nn.Linear(2, 2)

    def forward(self, x):
        return {"loss_plain": self.adapter(x).square().mean()}


class Adversary(Plain):
    def __init__(self):
        super().__init__()
        self.critic = nn.Linear(2, 1)

    def extra_parameters(self):
        return list(self.critic.parameters())

    def extra_optimizer(self, total_iters):
        return torch.optim.SGD(self.critic.parameters(), lr=0.1), None


class SelfUpdating(Adversary):
    """Extra parameters it updates itself (as SoKD's search does): the engine builds no optimizer for them."""

    def extra_optimizer(self, total_iters):
        return None


def test_the_base_hooks_do_nothing_and_the_forward_is_the_methods_to_write():
    distiller = Distiller()
    assert distiller.before_epoch(None) is None and distiller.after_step(None) is None
    assert distiller.extra_parameters() == [] and distiller.extra_losses(x=1) == {}
    assert distiller.extra_optimizer(10) is None and distiller.sync_batchnorm_modules() == []
    with pytest.raises(NotImplementedError, match="forward"):
        distiller(torch.zeros(1))  # nn.Module's own refusal: a method must define forward


def test_uses_hook_names_the_hooks_a_class_replaces():
    assert [hook for hook in HOOKS if uses_hook(Adversary(), hook)] == ["extra_parameters", "extra_optimizer"]
    assert not any(uses_hook(Plain(), hook) for hook in HOOKS)
    assert not uses_hook(None, "after_step") and not uses_hook(nn.Linear(1, 1), "after_step")
    with pytest.raises(ValueError, match="uses_hook: forward is not an engine hook"):
        uses_hook(Plain(), "forward")


@pytest.mark.parametrize("distiller_type,has_extra", [(Plain, False), (Adversary, True), (SelfUpdating, False)])
def test_the_student_optimizer_leaves_the_extra_parameters_and_the_engine_steps_them_only_when_asked(
        distiller_type, has_extra):
    student, distiller = nn.Linear(2, 2), distiller_type()
    optimizers = build_optimizers(Recipe(iters=10), student, distiller)
    in_student = {id(p) for group in optimizers.student.param_groups for p in group["params"]}
    assert {id(p) for p in student.parameters()} | {id(p) for p in distiller.adapter.parameters()} <= in_student
    assert not in_student & {id(p) for p in distiller.extra_parameters()}
    assert (optimizers.extra is not None) == has_extra


def test_keyword_options_are_the_parameters_a_recipe_may_name():
    def build(levels, channels, alpha=1.0, *args, tau=4.0, **kwargs):
        pass

    assert keyword_options(build, supplied=("levels", "channels")) == {"alpha", "tau"}
    assert keyword_options(nn.Conv2d) >= {"in_channels", "kernel_size", "bias"}


def test_check_options_names_every_unknown_key_and_what_is_expected():
    check_options({"tau": 1.0}, {"tau", "alpha"}, "method_options")
    with pytest.raises(ValueError, match=r"^method_options: unknown options beta, gamma; expected some of alpha, tau$"):
        check_options({"tau": 1.0, "gamma": 0, "beta": 0}, {"tau", "alpha"}, "method_options")
