"""SoKD on detection (kd_ref/sokd.py, its wiring): the registry's det wiring (tap on
the last FPN level, the COCO row's DAM settings and bases, feature base GDD), the presets, and a few
iterations of Faster R-CNN through train.py with the policy search and an exact resume."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import train
from kd_ref import methods, presets_det, sokd
from kd_ref.gdd import GDDDistiller
from train_helpers import train_crashing_in_step
from kd_ref.presets import PRESETS, default_preset
from kd_ref.runtime import load_checkpoint

TINY = ["--task", "det", "--set", "synthetic_size=(32, 32)", "--set", "image_scale=(32, 32)",
        "--set", "synthetic_train=4", "--set", "synthetic_val=2", "--batch-size", "2", "--quiet"]
# 32-pixel inputs give a 1x1 P6, whose K_h x H x W = 2 cells hold at most k = 2 regions; the search runs in
# the first of 2 iterations, so the resumed second one starts from the searched policy
TINY_SOKD = {**PRESETS["synthetic_det_frcnn_sokd"].method_options, "k": 2, "search_iters": 1}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train.main([*TINY, "--method", "none", "--student", "faster_rcnn_r18", "--iters", "1", "--out", str(out)])
    return str(out / "last.pt")


class Pyramid(nn.Module):
    """Stands in for a detector at build time (SoKD and GDD read only ``out_channels``; the search reads
    the parameters)."""

    def __init__(self, channels: int):
        super().__init__()
        self.out_channels = {f"p{level}": channels for level in range(2, 8)}
        self.scale = nn.Parameter(torch.ones(()))


def test_coco_presets_follow_the_spec_row():
    recipe = PRESETS["sokd_faster_rcnn_r50_fpn_coco"]
    assert (recipe.student, recipe.teacher, recipe.batch_size, recipe.lr) == ("faster_rcnn_r50", "faster_rcnn_r101", 8, 0.01)
    assert recipe.iters == 180_000 and recipe.lr_steps == (120_000, 160_000)
    options = recipe.method_options
    assert (options["k"], options["num_heat"], options["w_feat"], options["w_dam"]) == (8, 2, 2.0, 1.0)
    assert options["base"] == "kd" and options["base_options"]["kd"] == {"tau": 4.0}
    assert PRESETS["sokd_faster_rcnn_r18_fpn_coco"].student == "faster_rcnn_r18"
    assert PRESETS["sokd_faster_rcnn_r50_fpn_coco_baseline"] == dataclasses.replace(
        recipe, method="none", method_options={})
    assert default_preset("det", "sokd", "synthetic") == "synthetic_det_frcnn_sokd"
    assert default_preset("det", "sokd", "coco") == "sokd_faster_rcnn_r50_fpn_coco"


def test_plugin_taps_the_last_fpn_level_over_the_feature_base_gdd():
    recipe = dataclasses.replace(PRESETS["synthetic_det_frcnn_sokd"],
                                 method_options={**TINY_SOKD, "base": "gdd"})
    student, teacher = Pyramid(8), Pyramid(16)
    plugin = methods.METHODS["sokd"].build(recipe, student, teacher)
    assert plugin.tap == "p6" and sokd.default_tap(dataclasses.replace(recipe, student="retinanet_r18")) == "p7"
    assert plugin.sokd.adapter.conv.kernel_size == (1, 1) and plugin.sokd.adapter.conv.out_channels == 16
    assert plugin.sokd.dam.heatmap_head[2].out_channels == 2 and plugin.sokd.k == 2
    assert isinstance(plugin.base.distiller, GDDDistiller)

    # Faster R-CNN outputs at a 64-pixel input: P2 16x16 ... P6 1x1; "rois" marks a two-stage detector
    feats_s = {f"p{level}": torch.randn(2, 8, 64 >> level, 64 >> level, requires_grad=True) for level in range(2, 7)}
    feats_t = {f"p{level}": torch.randn(2, 16, 64 >> level, 64 >> level) for level in range(2, 7)}
    losses = plugin({"feats": feats_s, "rois": torch.zeros(0, 5)}, {"feats": feats_t}, {})
    assert set(losses) == {"loss_sokd_feat", "loss_sokd_dam", *(f"loss_sokd_base_gdd_p{level}" for level in range(2, 6))}
    sum(losses.values()).backward()
    assert all(feats_s[name].grad.abs().sum() > 0 for name in ("p2", "p6"))


def test_bases_are_checked_against_the_task_and_detector():
    retinanet = dataclasses.replace(PRESETS["synthetic_det_frcnn_sokd"], student="retinanet_r18",
                                    teacher="retinanet_r18")
    with pytest.raises(ValueError, match="RoI class logits; retinanet_r18 has none"):
        methods.METHODS["sokd"].build(retinanet, Pyramid(8), Pyramid(8))
    cls = dataclasses.replace(PRESETS["synthetic_cls_sokd"], method_options={"base": "gdd"})
    with pytest.raises(ValueError, match=r"--sokd-base gdd: for --task cls expected one of \['none', 'kd', 'dist'\]"):
        methods.METHODS["sokd"].build(cls, None, None)


def test_sokd_trains_faster_rcnn_with_the_search_and_resumes_exactly(tmp_path, monkeypatch, teacher_ckpt):
    flags = [*TINY, "--method", "sokd", "--student", "faster_rcnn_r18", "--teacher", "faster_rcnn_r18",
             "--teacher-ckpt", teacher_ckpt, "--set", f"method_options={TINY_SOKD!r}", "--iters", "2",
             "--ckpt-every", "1"]
    train.main([*flags, "--out", str(tmp_path / "straight")])
    steps = [json.loads(line) for line in (tmp_path / "straight/log.jsonl").read_text().splitlines()][:2]
    assert {"loss_sokd_feat", "loss_sokd_dam", "loss_sokd_base_kd", "loss_cls", "loss_rpn_cls"} <= set(steps[0])
    assert all(np.isfinite(step[key]) for step in steps for key in step if key.startswith("loss"))

    train_crashing_in_step(monkeypatch, 1, [*flags, "--out", str(tmp_path / "resumed")])
    train.main([*flags, "--out", str(tmp_path / "resumed"), "--resume"])
    straight = load_checkpoint(str(tmp_path / "straight/last.pt"))
    resumed = load_checkpoint(str(tmp_path / "resumed/last.pt"))
    assert straight["distiller"]["_extra_state"]["search"]["steps"] == 2
    # the searched step moved the policy away from its initial 0.5 (the teacher scored the RoIs that the
    # search's own forward sampled)
    assert not torch.equal(straight["distiller"]["sokd.policy.prob"], torch.full((36, 2), 0.5))
    for part in ("model", "distiller"):
        keys = [key for key in straight[part] if key != "_extra_state"]
        assert all(torch.equal(straight[part][key], resumed[part][key]) for key in keys)


def test_retinanet_demo_plugs_sokd_into_gdd_at_p6():
    recipe = PRESETS["synthetic_det_retinanet_sokd"]
    assert recipe.method_options["base"] == "gdd" and recipe.method_options["search_iters"] == recipe.iters // 5
    assert recipe.method_options["base_options"]["gdd"] == presets_det.SYNTHETIC_DET_METHOD_OPTIONS["gdd"]["retinanet"]
    plugin = methods.METHODS["sokd"].build(recipe, Pyramid(8), Pyramid(8))
    assert plugin.tap == "p6" and isinstance(plugin.base.distiller, GDDDistiller)
    assert all(loss.alpha == 65.0 for loss in plugin.base.distiller.losses.values())
    assert default_preset("det", "kd", "synthetic") == "synthetic_det_frcnn_kd"
