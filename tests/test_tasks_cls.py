"""Tests for the classification task (kd_ref/tasks.py ClsTask, its presets and method bindings in
the method files) and for SoKD as a plug-in through the engine: real-format fixture trees, metrics,
and end-to-end ``train.main`` runs with exact resume."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import evaluate
import train
from kd_ref import engine, export, methods, synthetic
from kd_ref.sokd import SoKDPlugin
from kd_ref.tasks import ClsTask, SyntheticObjects
from kd_ref.presets import PRESETS, default_preset
from kd_ref.recipe import Recipe
from kd_ref.runtime import JsonlLog, Runtime, load_checkpoint

TASK = ClsTask()
TINY = ["--task", "cls", "--set", "synthetic_size=(48, 48)", "--crop", "16", "16", "--set", "synthetic_train=8",
        "--set", "synthetic_val=3", "--batch-size", "4", "--quiet"]


def evaluate_untrained(recipe, root):
    dataset, collate = TASK.build_data(recipe, "val", root)
    model = TASK.build_model(recipe, recipe.student)
    return engine.evaluate(TASK, model, dataset, collate, Runtime(torch.device("cpu")), recipe, workers=0,
                           quiet=True)


@pytest.mark.parametrize("fmt, data, crop", [("cifar100", "cifar100", 32), ("imagefolder", "imagenet", 24)])
def test_real_format_fixture_trees_load_and_evaluate(tmp_path, fmt, data, crop):
    export.export(fmt, str(tmp_path), num_train=6, num_val=4, size=(48, 48))
    recipe = Recipe(task="cls", data=data, student="resnet8", num_classes=8, crop=(crop, crop),
                            normalization="cifar100" if data == "cifar100" else "imagenet_rgb")
    TASK.check_recipe(recipe)
    train_set, collate = TASK.build_data(recipe, "train", str(tmp_path))
    batch = train_set.prepare_batch(collate([train_set.get(i, np.random.default_rng(i)) for i in range(3)]))
    assert batch["images"].shape == (3, 3, crop, crop) and batch["targets"].dtype == torch.int64
    assert batch["targets"].tolist() == [train_set.base[i]["image_label"] for i in range(3)]
    metrics = evaluate_untrained(recipe, str(tmp_path))
    assert metrics["images"] == 4 and 0 <= metrics["top1"] <= metrics["top5"] <= 100
    with pytest.raises(ValueError, match="8 classes, but the recipe has num_classes=100"):
        TASK.build_data(dataclasses.replace(recipe, num_classes=100), "val", str(tmp_path))


def test_topk_accuracy_is_reduced_from_counts():
    state = TASK.new_eval_state(None)
    logits = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5], [0, 6, 1, 2, 3, 4]])
    TASK.update_eval_state(state, {"logits": logits}, {"targets": torch.tensor([0, 0, 4])}, None)
    TASK.update_eval_state(state, {"logits": logits[:1]}, {"targets": torch.tensor([5])}, None)
    assert TASK.finish_eval_state(state, None) == {"top1": 25.0, "top5": 50.0, "images": 4}
    with pytest.raises(ValueError, match="--save-pred"):
        TASK.update_eval_state(state, {"logits": logits}, {"targets": torch.tensor([0, 0, 4])}, "preds")


def test_synthetic_objects_are_the_largest_object_of_each_scene():
    scenes = synthetic.SyntheticScenes("val", size=(64, 64), length=5)
    objects = SyntheticObjects(scenes, 24)
    assert objects.classes == scenes.object_classes and len(objects) == 5
    for index in range(5):
        sample = objects[index]
        assert sample["image"].shape == (24, 24, 3) and sample["image"].dtype == np.uint8
        assert sample["image_label"] == scenes[index]["image_label"]
    np.testing.assert_array_equal(objects[2]["image"], SyntheticObjects(scenes, 24)[2]["image"])


def test_recipe_errors_are_clear():
    recipe = PRESETS["synthetic_cls_none"]
    with pytest.raises(ValueError, match="--student pspnet_r18: --task cls supports"):
        TASK.check_recipe(dataclasses.replace(recipe, student="pspnet_r18"))
    with pytest.raises(ValueError, match="--data cityscapes"):
        TASK.check_recipe(dataclasses.replace(recipe, data="cityscapes"))
    with pytest.raises(ValueError, match="square crop"):
        TASK.check_recipe(dataclasses.replace(recipe, crop=(32, 16)))
    with pytest.raises(ValueError, match="--sokd-base kd: only for --method sokd"):
        train.main([*TINY, "--method", "dist", "--sokd-base", "kd", "--teacher-ckpt", "x.pt"])


def test_presets_follow_the_reference_schedules():
    cifar = PRESETS["dist_resnet8x4_cifar100"]
    assert (cifar.teacher, cifar.batch_size, cifar.lr, cifar.weight_decay) == ("resnet32x4", 64, 0.05, 5e-4)
    assert (cifar.epochs, cifar.lr_steps) == (240, (150, 180, 210))  # iterations: 781 an epoch (test_presets)
    assert cifar.method_options == {"tau": 4.0, "loss_weight": 2.0}
    assert PRESETS["dist_resnet8x4_cifar100_baseline"].method == "none"
    imagenet = PRESETS["sokd_resnet18_imagenet"]
    assert (imagenet.teacher, imagenet.batch_size, imagenet.lr, imagenet.weight_decay) == ("resnet34", 256, 0.1, 1e-4)
    assert (imagenet.epochs, imagenet.lr_steps, imagenet.method_options["search_epochs"]) == (100, (30, 60, 90), 5)
    assert PRESETS["sokd_resnet8x4_cifar100"].method_options["search_epochs"] == 50
    for method in ("none", "kd", "dist", "sokd"):
        assert default_preset("cls", method, "synthetic") == f"synthetic_cls_{method}"


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train.main([*TINY, "--method", "none", "--student", "resnet8", "--iters", "2", "--out", str(out)])
    return str(out / "last.pt")


class Interrupt(Exception):
    pass


def interrupted_at(monkeypatch, iteration):
    """Make the JSON-lines log raise when it records ``iteration``: the run stops right after the
    optimizer steps of that iteration, with the checkpoint of the previous iteration on disk."""
    write = JsonlLog.write

    def stop(self, record):
        if record.get("iteration") == iteration and "eval" not in record:
            raise Interrupt
        write(self, record)

    monkeypatch.setattr(JsonlLog, "write", stop)


@pytest.mark.parametrize("method, flags, kd_keys", [
    ("none", [], set()),
    ("kd", [], {"loss_kd"}),
    ("dist", [], {"loss_dist"}),
    ("sokd", ["--sokd-base", "dist"], {"loss_sokd_feat", "loss_sokd_dam", "loss_sokd_base_dist"}),
])
def test_each_method_trains_and_resumes_exactly(tmp_path, monkeypatch, teacher_ckpt, method, flags, kd_keys):
    common = [*TINY, "--method", method, *flags, "--iters", "3", "--ckpt-every", "1"]
    if method == "sokd":   # search in the first 2 of the 3 iterations, so the resumed one is not searched
        options = {**PRESETS["synthetic_cls_sokd"].method_options, "search_iters": 2}
        common += ["--set", f"method_options={options!r}"]
    if method != "none":
        common += ["--teacher", "resnet8", "--teacher-ckpt", teacher_ckpt]
    metrics = train.main([*common, "--out", str(tmp_path / "full")])
    assert set(metrics) == {"top1", "top5", "images"} and metrics["images"] == 3
    steps = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()][:3]
    assert {k for k in steps[0] if k.startswith("loss_") and k != "loss_cls"} == kd_keys
    assert all(np.isfinite(step[k]) for step in steps for k in step if k.startswith("loss"))
    if method == "none":
        scores = evaluate.main(["--ckpt", str(tmp_path / "full" / "last.pt"), "--quiet"])
        assert scores == pytest.approx(metrics)

    with monkeypatch.context() as patch:
        interrupted_at(patch, 3)
        with pytest.raises(Interrupt):
            train.main([*common, "--out", str(tmp_path / "resumed")])
    assert load_checkpoint(str(tmp_path / "resumed" / "last.pt"))["iteration"] == 2
    train.main([*common, "--out", str(tmp_path / "resumed"), "--resume"])
    full = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    resumed = load_checkpoint(str(tmp_path / "resumed" / "last.pt"))
    assert resumed["iteration"] == 3
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    if method == "sokd":
        search_full, search_resumed = (c["distiller"]["_extra_state"]["search"] for c in (full, resumed))
        assert search_full["steps"] == search_resumed["steps"] == 3
        assert all(torch.equal(full["distiller"][k], resumed["distiller"][k])
                   for k in full["distiller"] if k.startswith("sokd.policy.prob"))


def test_sokd_plugin_searches_through_the_engine_hook(tmp_path, teacher_ckpt):
    """After one searched iteration the policy has moved (Adam on the implicit gradient), the student
    optimizer never held the policy parameters, and the checkpoint carries Adam's state."""
    train.main([*TINY, "--method", "sokd", "--teacher", "resnet8", "--teacher-ckpt", teacher_ckpt, "--iters", "1",
                "--out", str(tmp_path)])
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    recipe = Recipe(**ckpt["recipe"])
    student = TASK.build_model(recipe, recipe.student)
    fresh = methods.METHODS["sokd"].build(recipe, student, TASK.build_model(recipe, recipe.teacher))
    assert isinstance(fresh, SoKDPlugin) and fresh.tap == "c4"
    assert not torch.equal(ckpt["distiller"]["sokd.policy.prob"], fresh.sokd.policy.prob.detach())
    adam = ckpt["distiller"]["_extra_state"]["search"]["optimizer"]
    assert len(adam["state"]) == len(fresh.sokd.policy_parameters())
    student_optimizer_params = sum(len(group["params"]) for group in ckpt["optimizer"]["param_groups"])
    assert student_optimizer_params == (len(list(student.parameters()))
                                        + len(fresh.sokd.student_side_parameters()))
