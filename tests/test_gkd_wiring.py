"""Detection distillation wiring: the GKD registry entry and its per-epoch prototype schedule
(kd_ref/gkd.py ScheduledGKDDistiller and its wiring), and a few iterations of GKD,
GDD and DIST on both detectors through train.py, with a prototype regeneration and an exact resume."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import train
from kd_ref import engine, gkd, methods
from kd_ref.presets import PRESETS, default_preset
from kd_ref.recipe import Recipe
from kd_ref.runtime import load_checkpoint

TINY = ["--task", "det", "--set", "synthetic_size=(64, 64)", "--set", "image_scale=(64, 64)",
        "--set", "synthetic_train=4", "--set", "synthetic_val=2", "--batch-size", "2", "--quiet"]
FAMILY = {"retinanet_r18": "retinanet", "faster_rcnn_r18": "frcnn"}
# 64-pixel scenes hold few boxes wider than the 8-pixel PGM minimum of the 128-pixel demo presets
TINY_GKD = ["--set", "method_options={'pgm_min_size': 4.0, 'pgm_max_images': 4}"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A one-iteration checkpoint of each r18 detector, the teacher of every run below."""
    root = tmp_path_factory.mktemp("teachers")
    for student in FAMILY:
        train.main([*TINY, "--method", "none", "--student", student, "--iters", "1", "--out", str(root / student)])
    return {student: str(root / student / "last.pt") for student in FAMILY}


def run(teachers, student, method, out, *extra):
    return train.main([*TINY, "--preset", f"synthetic_det_{FAMILY[student]}_{method}", "--student", student,
                       "--teacher", student, "--teacher-ckpt", teachers[student], "--out", str(out), *extra])


def logged_steps(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "eval" not in line]


@pytest.mark.parametrize("student", list(FAMILY))
@pytest.mark.parametrize("method, loss_prefix", [("gdd", "loss_gdd_p"), ("dist", "loss_dist_")])
def test_gdd_and_dist_train_on_each_detector(teachers, tmp_path, student, method, loss_prefix):
    run(teachers, student, method, tmp_path, "--iters", "2")
    steps = logged_steps(tmp_path)
    kd_terms = [key for key in steps[0] if key.startswith(loss_prefix)]
    expected = {"gdd": 4 if student.startswith("faster") else 5, "dist": 1 if student.startswith("faster") else 5}
    assert len(kd_terms) == expected[method]
    assert len(steps) == 2 and all(np.isfinite(step[key]) for step in steps for key in kd_terms)



def test_kd_distils_faster_rcnn_roi_logits_and_refuses_a_one_stage_detector(teachers, tmp_path, capsys):
    run(teachers, "faster_rcnn_r18", "kd", tmp_path, "--iters", "2")
    steps = logged_steps(tmp_path)
    assert len(steps) == 2 and all(np.isfinite(step["loss_kd"]) and step["loss_kd"] >= 0 for step in steps)
    refused = train.run([*TINY, "--preset", "synthetic_det_frcnn_kd", "--student", "retinanet_r18", "--teacher",
                         "retinanet_r18", "--teacher-ckpt", teachers["retinanet_r18"], "--out", str(tmp_path / "r")])
    assert refused != 0 and "RoI class logits; retinanet_r18 has none" in capsys.readouterr().err

def test_gkd_regenerates_prototypes_every_epoch_and_resumes_exactly(teachers, tmp_path, monkeypatch):
    """RetinaNet, 3 iterations of 2 per epoch: PGM before epochs 0 and 1; a run stopped mid-epoch 0 keeps
    its prototypes and schedule through last.pt and ends with the same weights and prototypes."""
    calls = []
    real_set = gkd.ScheduledGKDDistiller.set_prototypes
    monkeypatch.setattr(gkd.ScheduledGKDDistiller, "set_prototypes",
                        lambda self, *parts: calls.append(self.epoch) or real_set(self, *parts))
    flags = ["--iters", "3", "--ckpt-every", "1", *TINY_GKD]
    run(teachers, "retinanet_r18", "gkd", tmp_path / "straight", *flags)
    assert calls[-2:] == [0, 1]          # the checkpoint's state_dict load also calls it, so look at the last two
    steps = logged_steps(tmp_path / "straight")
    assert {"loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft", "loss_gkd_global"} <= set(steps[0])
    assert all(np.isfinite(step["loss_gkd_fg"]) and step["loss_gkd_fg"] > 0 for step in steps)

    real_check = engine._check_finite

    def crash_in_second_step(losses, iteration):
        if iteration == 1:
            raise KeyboardInterrupt
        real_check(losses, iteration)

    monkeypatch.setattr(engine, "_check_finite", crash_in_second_step)
    with pytest.raises(KeyboardInterrupt):
        run(teachers, "retinanet_r18", "gkd", tmp_path / "resumed", *flags)
    monkeypatch.setattr(engine, "_check_finite", real_check)
    stopped = load_checkpoint(str(tmp_path / "resumed/last.pt"))
    assert stopped["iteration"] == 1 and stopped["distiller"]["_extra_state"] == {"epoch": 0, "max_epochs": 2}
    assert stopped["distiller"]["protos_s.0"].shape[0] > 0
    run(teachers, "retinanet_r18", "gkd", tmp_path / "resumed", *flags, "--resume")

    straight = load_checkpoint(str(tmp_path / "straight/last.pt"))
    resumed = load_checkpoint(str(tmp_path / "resumed/last.pt"))
    assert resumed["distiller"]["_extra_state"] == {"epoch": 1, "max_epochs": 2}
    prototype_keys = [key for key in straight["distiller"] if key.startswith(("protos_", "cls_start"))]
    assert len(prototype_keys) == 15 and int(straight["distiller"]["cls_start.0"][-1]) > 0
    for part in ("model", "distiller"):
        keys = [key for key in straight[part] if key != "_extra_state"]
        assert all(torch.equal(straight[part][key], resumed[part][key]) for key in keys)


def test_a_nan_teacher_stops_the_run_before_the_prototype_pass(teachers, tmp_path, monkeypatch, capsys):
    """The first-batch teacher check runs before the first epoch hook: a teacher giving NaN is named in one
    line and GKD's prototype pass over the training set never starts."""
    ckpt = torch.load(teachers["retinanet_r18"], weights_only=False)
    conv = next(key for key in ckpt["model"] if key.endswith("weight") and ckpt["model"][key].dim() == 4)
    ckpt["model"][conv] = torch.full_like(ckpt["model"][conv], float("nan"))
    broken = str(tmp_path / "nan_teacher.pt")
    torch.save(ckpt, broken)
    passes = []
    monkeypatch.setattr(gkd.ScheduledGKDDistiller, "before_epoch", lambda self, context: passes.append(context))
    code = train.run([*TINY, "--preset", "synthetic_det_retinanet_gkd", "--student", "retinanet_r18", "--teacher",
                      "retinanet_r18", "--teacher-ckpt", broken, "--iters", "1", *TINY_GKD, "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and error[0].startswith(f"error: --teacher-ckpt {broken}: the teacher's output")
    assert "|x| = nan" in error[0] and passes == []


def test_gkd_trains_faster_rcnn_with_positive_rois(teachers, tmp_path):
    run(teachers, "faster_rcnn_r18", "gkd", tmp_path, "--iters", "2", *TINY_GKD)
    steps = logged_steps(tmp_path)
    kd_terms = ["loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft", "loss_gkd_global"]
    assert len(steps) == 2 and all(np.isfinite(step[key]) for step in steps for key in kd_terms)
    distiller = load_checkpoint(str(tmp_path / "last.pt"))["distiller"]
    num_classes = PRESETS["synthetic_det_frcnn_gkd"].num_classes
    assert [distiller[f"cls_start.{level}"].numel() for level in range(5)] == [num_classes + 1] * 5


# ----------------------------------------------------------------------------------------------- bind
def test_faster_rcnn_bind_keeps_the_positive_rois_split_per_image():
    num_classes, channels = 3, 4
    rois = torch.tensor([[0, 0, 0, 10, 10], [0, 5, 5, 40, 40], [1, 2, 2, 30, 30], [1, 0, 0, 8, 8.]])
    roi_labels = torch.tensor([1, num_classes, 2, 0])             # the second RoI is background
    def outputs(offset):
        return {"rois": rois, "roi_labels": roi_labels, "roi_levels": torch.tensor([0, 0, 1, 0]),
                "roi_cls_logits": torch.arange(16.).view(4, 4) + offset,
                "roi_feats": torch.zeros(4, channels, 7, 7),
                "feats": {name: torch.zeros(2, channels, 8, 8) for name in gkd.TWO_STAGE_LEVELS}}
    bound = methods.METHODS["gkd"].bind["det"](outputs(0), outputs(100), {"images": torch.zeros(2, 3, 64, 64)})
    assert [b.tolist() for b in bound["inst_boxes"]] == [[[0, 0, 10, 10]], [[2, 2, 30, 30], [0, 0, 8, 8]]]
    assert [lab.tolist() for lab in bound["inst_labels"]] == [[1], [2, 0]]
    assert bound["roi_labels"].tolist() == [1, 2, 0] and bound["roi_levels"].tolist() == [0, 1, 0]
    assert torch.equal(bound["roi_logits_t"] - bound["roi_logits_s"], torch.full((3, 4), 100.))
    assert bound["roi_logits_s"][:, 0].tolist() == [0, 8, 12] and len(bound["feats_s"]) == 5


def test_anchor_level_features_pool_each_box_on_its_own_level():
    feats = [torch.arange(2 * 16 * 16.).view(1, 2, 16, 16), torch.full((1, 2, 8, 8), -1.)]
    boxes = torch.tensor([[0, 0, 16, 16], [0, 0, 200, 200], [8, 8, 16, 16.]])   # levels 0, 1, 0 (finest_scale 56)
    pooled, levels = gkd.anchor_level_features(feats, boxes, torch.zeros(3, dtype=torch.long), (8, 16))
    assert levels.tolist() == [0, 1, 0] and pooled.shape == (3, 2, 1, 1)
    assert torch.equal(pooled[:, :, 0, 0], torch.stack([
        feats[0][0, :, 0:3, 0:3].mean(dim=(1, 2)), torch.tensor([-1., -1.]), feats[0][0, :, 1:3, 1:3].mean(dim=(1, 2))]))


def test_gkd_build_rejects_mixed_detector_kinds():
    recipe = Recipe(task="det", method="gkd", student="retinanet_r18", teacher="faster_rcnn_r18")
    with pytest.raises(ValueError, match="same kind of detector"):
        methods.METHODS["gkd"].build(recipe, None, None)


# -------------------------------------------------------------------------------------------- presets
def test_paper_rows_have_baselines_and_the_stated_settings():
    for name in ("gkd_faster_rcnn_r50_fpn_2x_coco", "gkd_retinanet_r50_fpn_2x_coco", "gdd_faster_rcnn_r50_fpn_2x_coco",
                 "dist_retinanet_r50_fpn_2x_coco", "dist_faster_rcnn_r50_fpn_2x_coco"):
        recipe = PRESETS[name]
        assert PRESETS[f"{name}_baseline"].method == "none"
        assert recipe.data == "coco" and (recipe.epochs, recipe.lr_steps) == (24, (16, 22)) and recipe.student.endswith("_r50")
        assert recipe.teacher == recipe.student.replace("_r50", "_r101")
    gdd = PRESETS["gdd_faster_rcnn_r50_fpn_2x_coco"]
    assert gdd.grad_clip == 35.0 and gdd.method_options == {"alpha": 4.0, "tau": 4.0}
    # the clipping comes with the distillation config: the baseline is the plain detector recipe
    assert PRESETS["gdd_faster_rcnn_r50_fpn_2x_coco_baseline"] == dataclasses.replace(
        PRESETS["faster_rcnn_r50_fpn_2x_coco"], teacher="faster_rcnn_r101")
    assert PRESETS["gkd_retinanet_r50_fpn_2x_coco_baseline"] == dataclasses.replace(
        PRESETS["retinanet_r50_fpn_2x_coco"], teacher="retinanet_r101")  # no student_init either
    assert PRESETS["dist_retinanet_r50_fpn_2x_coco_baseline"] == dataclasses.replace(
        PRESETS["retinanet_r50_fpn_2x_coco"], teacher="retinanet_r101")
    for method in ("gkd", "gdd", "dist"):
        name = default_preset("det", method, "synthetic")
        assert PRESETS[name].method == method and PRESETS[name].teacher_preset
