"""The student optimizer's parameter groups (engine.parameter_groups): which parameters get which learning
rate and weight decay under the recipe fields nesterov, norm_weight_decay, bias_weight_decay and
bias_lr_factor, and that a recipe at their defaults keeps the layout of earlier checkpoints."""
import dataclasses

import pytest
import torch
from torch import nn

from kd_ref import engine, presets
from kd_ref.recipe import Recipe


class TinyStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


class TinyDistiller(nn.Module):
    """An adapter the student optimizer trains and a critic with its own optimizer (as SKD's discriminator)."""

    def __init__(self):
        super().__init__()
        self.adapter = nn.Conv2d(4, 4, 1)
        self.critic = nn.Linear(4, 1)

    def extra_parameters(self):
        return list(self.critic.parameters())

    def extra_optimizer(self, total_iters):
        return torch.optim.SGD(self.extra_parameters(), lr=0.1), None


def _groups_by_parameter(optimizer) -> dict:
    """id(parameter) -> (weight decay, lr multiplier) of the group holding it."""
    return {id(param): (group["weight_decay"], group["lr_mult"]) for group in optimizer.param_groups
            for param in group["params"]}


def test_defaults_keep_one_group_for_the_student_and_one_for_the_distiller():
    student, distiller = TinyStudent(), TinyDistiller()
    optimizers = engine.build_optimizers(Recipe(weight_decay=1e-4), student, distiller)
    groups = optimizers.student.param_groups
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert [len(g["params"]) for g in groups] == [len(trainable), 2]  # adapter weight and bias; not the critic
    assert all(g["weight_decay"] == 1e-4 and g["lr_mult"] == 1.0 and not g["nesterov"] for g in groups)
    # the layout of a checkpoint written before the fields existed: two groups of the same sizes
    earlier = torch.optim.SGD([{"params": trainable}, {"params": list(distiller.adapter.parameters())}], lr=0.1,
                              momentum=0.9, weight_decay=1e-4)
    optimizers.student.load_state_dict(earlier.state_dict())
    # no distiller: its group is still there, empty, as before
    assert [len(g["params"]) for g in engine.build_optimizers(Recipe(), student, None).student.param_groups] == [
        len(trainable), 0]


def test_dist_imagenet_recipe_takes_norm_and_bias_parameters_out_of_weight_decay_with_nesterov():
    recipe = presets.PRESETS["dist_resnet18_imagenet"]
    assert (recipe.nesterov, recipe.norm_weight_decay, recipe.bias_weight_decay) == (True, 0.0, 0.0)
    student, distiller = TinyStudent(), TinyDistiller()
    optimizer = engine.build_optimizers(recipe, student, distiller).student
    assert optimizer.defaults["nesterov"] and all(g["nesterov"] for g in optimizer.param_groups)
    settings = _groups_by_parameter(optimizer)
    decayed = (recipe.weight_decay, 1.0)
    assert settings[id(student.conv.weight)] == decayed and settings[id(student.fc.weight)] == decayed
    for norm_or_bias in (student.bn.weight, student.bn.bias, student.gn.weight, student.gn.bias, student.fc.bias,
                         distiller.adapter.bias):
        assert settings[id(norm_or_bias)] == (0.0, 1.0)
    assert settings[id(distiller.adapter.weight)] == decayed
    assert id(student.frozen.weight) not in settings and id(distiller.critic.weight) not in settings


def test_fcos_biases_learn_twice_as_fast_without_weight_decay():
    recipe = presets.PRESETS["skd_fcos_mv2_c128_coco"]
    student = TinyStudent()
    optimizer = engine.build_optimizers(recipe, student, None).student
    settings = _groups_by_parameter(optimizer)
    assert settings[id(student.fc.bias)] == settings[id(student.bn.bias)] == (0.0, 2.0)
    assert settings[id(student.bn.weight)] == settings[id(student.conv.weight)] == (1e-4, 1.0)
    engine.set_lr(optimizer, recipe.lr, 0.5)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(student.fc.bias)] == pytest.approx(2 * lrs[id(student.fc.weight)]) == pytest.approx(recipe.lr)


def test_weight_decay_and_nesterov_reach_the_update():
    """One SGD step of a bias and a weight from the same gradient: the bias without decay, the weight with it,
    and Nesterov's look-ahead on both (torch.optim.SGD with nesterov=True: d = g + momentum * buf)."""
    recipe = dataclasses.replace(Recipe(), lr=0.1, weight_decay=0.5, bias_weight_decay=0.0, nesterov=True)
    layer = nn.Linear(1, 1)
    with torch.no_grad():
        layer.weight.fill_(2.0)
        layer.bias.fill_(2.0)
    optimizer = engine.build_optimizers(recipe, layer, None).student
    for param in layer.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    # weight: g = 1 + 0.5 * 2 = 2, buf = 2, d = 2 + 0.9 * 2 = 3.8; bias: g = 1, d = 1.9
    assert layer.weight.item() == pytest.approx(2.0 - 0.1 * 3.8)
    assert layer.bias.item() == pytest.approx(2.0 - 0.1 * 1.9)
