"""InsTask (kd_ref/tasks.py): COCO mask AP equal to pycocotools on one results file, and train.py /
evaluate.py end to end on synthetic instances and an exported COCO tree, with exact resume."""
import contextlib
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import evaluate
import train
from kd_ref import datasets, export, methods, metrics, synthetic, tasks
from train_helpers import train_crashing_in_step
from kd_ref.presets import PRESETS, default_preset, teacher_recipe
from kd_ref.recipe import Recipe
from kd_ref.runtime import load_checkpoint

TINY = ["--task", "ins", "--set", "synthetic_size=(64, 64)", "--set", "image_scale=(64, 64)", "--set",
        "synthetic_train=4", "--set", "synthetic_val=2", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco_ins")
    export.export("coco", str(root), num_train=2, num_val=4, size=(64, 64))
    return root


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' mask decoding under numpy 2
def test_coco_segm_eval_equals_pycocotools_on_a_written_results_file(coco_tree, tmp_path):
    ann_file = str(coco_tree / "annotations/instances_val2017.json")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(ann_file)
    rng = np.random.default_rng(0)
    results = []
    for image_id in sorted(coco.getImgIds())[:-1]:  # the last image gets no prediction
        for annotation in coco.imgToAnns[image_id]:
            mask = coco.annToMask(annotation).astype(bool)
            mask[:, : rng.integers(0, 4)] = False  # shave a few columns: IoUs below 1
            results.append({"image_id": image_id, "category_id": annotation["category_id"],
                            "segmentation": metrics.encode_mask(mask), "score": float(rng.random())})
    results.append({**results[0], "category_id": 3 if results[0]["category_id"] != 3 else 5, "score": 0.99})
    path = tmp_path / "segmentations.json"
    path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(str(path)), iouType="segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    ours = metrics.coco_segm_eval(json.loads(path.read_text()), coco)
    assert list(ours) == ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert [ours[name] for name in ours] == pytest.approx([100 * v for v in evaluator.stats[:6]], abs=1e-12)
    assert 0 < ours["AP"] < 100
    assert metrics.coco_segm_eval([], coco)["AP"] == 0.0


def test_synthetic_instances_drop_small_fragments_and_ground_truth_scores_itself():
    scenes = synthetic.SyntheticScenes("val", size=(64, 64), length=3)
    instances = synthetic.SyntheticInstances(scenes)
    for index in range(3):
        sample, scene = instances[index], scenes[index]
        assert (sample["masks"].sum((1, 2)) >= synthetic.MIN_INSTANCE_AREA).all() and not sample["difficult"].any()
        assert len(sample["labels"]) == int((scene["masks"].sum((1, 2)) >= synthetic.MIN_INSTANCE_AREA).sum())
    coco = datasets.coco_ground_truth(instances, [1, 2, 3, 4, 5, 6, 7, 8])
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": a["segmentation"],
                "score": 1.0} for a in coco.dataset["annotations"]]
    assert metrics.coco_segm_eval(perfect, coco)["AP50"] == pytest.approx(100.0)
    rle = coco.dataset["annotations"][0]["segmentation"]
    assert np.array_equal(mask_utils.decode({**rle, "counts": rle["counts"].encode()}).astype(bool),
                          instances[0]["masks"][0])


@pytest.mark.parametrize("student", ["solo_synth_r18", "maskrcnn_r18"])
def test_ins_trains_resumes_exactly_and_evaluates(tmp_path, monkeypatch, student):
    flags = [*TINY, "--method", "none", "--student", student, "--iters", "3", "--ckpt-every", "1"]
    scores = train.main([*flags, "--out", str(tmp_path / "straight")])
    assert {"segm_AP", "segm_AP50", "segm_APl"} <= set(scores)
    assert ("bbox_AP" in scores) == student.startswith("maskrcnn")
    step = json.loads((tmp_path / "straight/log.jsonl").read_text().splitlines()[0])
    assert np.isfinite(step["loss_mask"]) and np.isfinite(step["loss_cls"])
    train_crashing_in_step(monkeypatch, 2, [*flags, "--out", str(tmp_path / "resumed")])
    train.main([*flags, "--out", str(tmp_path / "resumed"), "--resume"])
    straight = load_checkpoint(str(tmp_path / "straight/last.pt"))
    resumed = load_checkpoint(str(tmp_path / "resumed/last.pt"))
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    evaluated = evaluate.main(["--ckpt", str(tmp_path / "straight/last.pt"), "--task", "ins", "--quiet",
                               "--save-pred", str(tmp_path / "pred")])
    assert evaluated["segm_AP"] == pytest.approx(scores["segm_AP"])


@pytest.fixture(scope="module")
def solo_teacher(tmp_path_factory):
    """A SOLO trained for one iteration: a teacher checkpoint of the student's architecture."""
    folder = tmp_path_factory.mktemp("solo_teacher")
    train.main([*TINY, "--method", "none", "--iters", "1", "--out", str(folder)])
    return folder


def test_gdd_distils_solo_on_p2_to_p5(tmp_path, solo_teacher):
    teacher = solo_teacher
    scores = train.main([*TINY, "--method", "gdd", "--teacher", "solo_synth_r18", "--teacher-ckpt", str(teacher / "last.pt"),
                "--iters", "2", "--out", str(tmp_path / "gdd")])
    step = json.loads((tmp_path / "gdd/log.jsonl").read_text().splitlines()[0])
    assert {f"loss_gdd_p{i}" for i in range(2, 6)} <= set(step) and "loss_gdd_p6" not in step
    assert "segm_AP" in scores


def test_gdd_init_student_copies_the_teacher_neck_and_head(solo_teacher):
    teacher = solo_teacher
    recipe = Recipe(**{**load_checkpoint(str(teacher / "last.pt"))["recipe"], "method": "gdd",
                               "teacher": "solo_synth_r18",
                               "method_options": {"alpha": 200.0, "tau": 4.0, "init_student": True}})
    task = tasks.TASKS["ins"]
    student, teacher_model = task.build_model(recipe, recipe.student), task.build_model(recipe, recipe.teacher)
    teacher_model.load_state_dict(load_checkpoint(str(teacher / "last.pt"))["model"])
    methods.METHODS["gdd"].build(recipe, student, teacher_model)
    assert torch.equal(student.head.conv_cls.weight, teacher_model.head.conv_cls.weight)
    assert not torch.equal(student.backbone.stem[0].weight, teacher_model.backbone.stem[0].weight)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_coco_tree_trains_and_evaluates_segm_ap(coco_tree, tmp_path):
    run = tmp_path / "run"
    train.main(["--task", "ins", "--data", "coco", "--data-root", str(coco_tree), "--set", "num_classes=8",
                "--set", "image_scale=(64, 64)", "--set", "epochs=1", "--batch-size", "2", "--pretrained", "none",
                "--student", "solo_synth_r18", "--out", str(run), "--quiet"])
    scores = evaluate.main(["--ckpt", str(run / "last.pt"), "--data-root", str(coco_tree), "--save-pred",
                            str(tmp_path / "pred"), "--quiet"])
    assert set(scores) == {f"segm_{name}" for name in metrics.COCO_STAT_NAMES}


def test_ins_presets_have_sources_and_baseline_twins():
    for name in ("solo_r50_fpn_1x_coco", "gdd_solo_r50_fpn_1x_coco", "gdd_maskrcnn_r50_fpn_2x_coco",
                 "maskrcnn_r50_fpn_2x_coco"):
        assert PRESETS[name].task == "ins" and PRESETS[name].source
    gdd = PRESETS["gdd_solo_r50_fpn_1x_coco"]
    assert gdd.method_options == {"alpha": 200.0, "tau": 4.0, "init_student": True} and gdd.grad_clip == 35.0
    assert gdd.epochs == 12 and gdd.lr_steps == (8, 11)
    twin = PRESETS["gdd_solo_r50_fpn_1x_coco_baseline"]
    assert twin.method == "none" and twin.grad_clip is None and twin.student == "solo_r50"
    assert default_preset("ins", "gdd", "synthetic") == "synthetic_ins_solo_gdd"
    assert methods.supported_methods("ins") == ["gdd", "none"]


def test_synthetic_demo_teachers_are_the_students_architecture_trained_three_times_as_long():
    for family in ("solo", "maskrcnn"):
        student = PRESETS[f"synthetic_ins_{family}_gdd"]
        teacher = teacher_recipe(student)
        assert teacher == PRESETS[f"synthetic_ins_{family}_teacher"] and teacher.student == student.teacher
        assert (teacher.iters, teacher.lr_steps) == (3 * student.iters, (3 * student.lr_steps[0],))
        assert teacher.method == "none" and teacher.teacher_preset is None
        scenes = ("synthetic_size", "synthetic_style", "synthetic_train", "synthetic_val", "num_classes", "image_scale")
        for other in (teacher, PRESETS[f"synthetic_ins_{family}_none"]):
            assert all(getattr(other, field) == getattr(PRESETS["synthetic_ins_solo_none"], field)
                       for field in scenes)


def _batch_norms(model):
    return [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_synthetic_presets_train_the_whole_backbone_with_batch_statistics():
    task = tasks.TASKS["ins"]
    for name in ("synthetic_ins_solo_none", "synthetic_ins_solo_teacher", "synthetic_ins_maskrcnn_gdd"):
        recipe = PRESETS[name]
        assert recipe.model_options == {"frozen_stages": -1, "norm_eval": False}
        model = task.build_model(recipe, recipe.student).train()
        assert all(p.requires_grad for p in model.backbone.parameters())
        assert all(bn.training for bn in _batch_norms(model))


def test_instance_models_default_to_mmdet_frozen_stem_and_eval_batch_norms():
    recipe = dataclasses.replace(PRESETS["solo_r50_fpn_1x_coco"], student="solo_r18")
    assert recipe.model_options == {} and PRESETS["gdd_maskrcnn_r50_fpn_2x_coco"].model_options == {}
    model = tasks.TASKS["ins"].build_model(recipe, recipe.student).train()
    backbone = model.backbone
    assert not any(p.requires_grad for p in [*backbone.stem.parameters(), *backbone.layer1.parameters()])
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    assert not any(bn.training for bn in _batch_norms(model)) and model.head.training


def test_unknown_instance_model_option_is_refused():
    recipe = PRESETS["synthetic_ins_solo_none"]
    with pytest.raises(ValueError, match=r"model_options \['frozen'\]: --task ins takes \['frozen_stages', 'norm_eval'\]"):
        methods.check_recipe(dataclasses.replace(recipe, model_options={"frozen": 0}))
    with pytest.raises(ValueError, match="norm_eval must be True or False, got 0"):
        tasks.TASKS["ins"].build_model(dataclasses.replace(recipe, model_options={"norm_eval": 0}), recipe.student)
