"""The methods' registry (kd_ref/methods.py): each entry is the METHOD record at the end of its method's file
and builds a Distiller; adding a method takes one file, one registry line and a preset."""
import dataclasses
import importlib.util
import json

import pytest
import torch

import train
from kd_ref import dist, gdd, gkd, kd, methods, presets, skd, sokd, tasks
from kd_ref.distiller import Distiller, Method, no_options

METHOD_FILES = {"kd": kd, "dist": dist, "gdd": gdd, "skd": skd, "gkd": gkd, "sokd": sokd}

# A whole method: a distiller, its binding on semantic segmentation and its build.
MEAN_MATCH = '''
from kd_ref.distiller import Distiller, Method, keyword_options


class MeanMatchDistiller(Distiller):
    """The squared difference of the student's and the teacher's mean logit."""

    def __init__(self, weight=1.0):
        super().__init__()
        self.weight = weight

    def forward(self, logits_s, logits_t):
        return {"loss_mean_match": self.weight * (logits_s.float().mean() - logits_t.float().mean()) ** 2}


def _bind(student_out, teacher_out, batch):
    return {"logits_s": student_out["logits"], "logits_t": teacher_out["logits"].detach()}


METHOD = Method(build=lambda recipe, student, teacher: MeanMatchDistiller(**recipe.method_options),
                bind={"seg": _bind}, options=lambda recipe: keyword_options(MeanMatchDistiller))
'''


def test_the_registry_holds_each_method_files_record():
    assert methods.METHODS == {"none": Method(None, options=no_options), **{name: module.METHOD for name, module in METHOD_FILES.items()}}
    assert all(methods.METHODS[name] is module.METHOD for name, module in METHOD_FILES.items())


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_every_method_builds_a_distiller_on_every_task_it_binds(task):
    for name in methods.supported_methods(task):
        method = methods.METHODS[name]
        if not method.needs_teacher:
            continue
        recipe = presets.PRESETS[presets.default_preset(task, name, "synthetic")]
        student = tasks.TASKS[task].build_model(recipe, recipe.student)
        teacher = tasks.TASKS[task].build_model(recipe, recipe.teacher)
        distiller = method.build(recipe, student, teacher)
        assert isinstance(distiller, Distiller), (task, name, type(distiller).__name__)


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_every_method_refuses_an_option_it_does_not_take_before_anything_is_built(task):
    for name in methods.supported_methods(task):
        recipe = presets.PRESETS[presets.default_preset(task, name, "synthetic")]
        methods.check_recipe(recipe)  # the preset's own options are taken
        misspelt = dataclasses.replace(recipe, method_options={**recipe.method_options, "not_an_option": 1})
        with pytest.raises(ValueError, match=rf"^method_options of --method {name} on --task {task}: unknown "
                                             r"option not_an_option; expected some of "):
            methods.check_recipe(misspelt)


@pytest.mark.parametrize("options, message", [
    ({"search_options": {"lr_x": 1}}, "method_options search_options of --method sokd: unknown option lr_x"),
    ({"base_options": {"fitnet": {}}}, "method_options base_options of --method sokd: unknown option fitnet"),
    ({"base": "kd", "base_options": {"kd": {"taw": 4.0}}},
     "method_options base_options kd of --method sokd: unknown option taw; expected some of loss_weight, tau"),
])
def test_sokd_checks_the_options_of_its_search_and_of_its_base(options, message):
    recipe = presets.PRESETS[presets.default_preset("cls", "sokd", "synthetic")]
    with pytest.raises(ValueError, match=f"^{message}"):
        methods.check_recipe(dataclasses.replace(recipe, method_options=options))
    methods.check_recipe(dataclasses.replace(recipe, method_options={"base": "kd", "base_options": {"kd": {"tau": 4.0}},
                                                                     "search_options": {"lr": 1e-3}}))


def test_a_new_method_is_one_file_one_registry_line_and_a_preset(tmp_path, monkeypatch):
    (tmp_path / "mean_match.py").write_text(MEAN_MATCH)
    spec = importlib.util.spec_from_file_location("mean_match", tmp_path / "mean_match.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(methods.METHODS, "mean_match", module.METHOD)
    recipe = dataclasses.replace(presets.PRESETS["synthetic_seg_kd"], method="mean_match",
                                 method_options={"weight": 0.5}, synthetic_train=2, synthetic_val=1, batch_size=2)
    monkeypatch.setitem(presets.PRESETS, "synthetic_seg_mean_match", recipe)
    assert "mean_match" in methods.supported_methods("seg") and "mean_match" not in methods.supported_methods("cls")
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": tasks.TASKS["seg"].build_model(recipe, recipe.teacher).state_dict()}, teacher)
    train.main(["--preset", "synthetic_seg_mean_match", "--teacher-ckpt", str(teacher), "--iters", "2",
                "--out", str(tmp_path / "run"), "--quiet"])
    with open(tmp_path / "run" / "log.jsonl") as handle:
        steps = [line for line in map(json.loads, handle) if "lr" in line]
    assert [step["iteration"] for step in steps] == [1, 2] and all("loss_mean_match" in step for step in steps)
