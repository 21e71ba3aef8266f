"""faster_rcnn_mv2 (kd_ref/detectors.py), SoKD's MobileNetV2 detection student: its FPN on the m2..m5 taps,
torchvision ImageNet weights through --pretrained, its preset and baseline twin, and SoKD training it a few
iterations on synthetic data with an exact resume."""
import json

import numpy as np
import torch
from torchvision.models import mobilenet_v2

from kd_ref import detectors, tasks
from train_helpers import straight_and_resumed
from kd_ref.presets import PRESETS
from kd_ref.recipe import PRETRAINED_WEIGHTS, Recipe

TINY = ["--task", "det", "--set", "synthetic_size=(32, 32)", "--set", "image_scale=(32, 32)",
        "--set", "synthetic_train=4", "--set", "synthetic_val=2", "--batch-size", "2", "--quiet", "--device", "cpu"]
# a 1x1 P6 at 32 pixels holds at most k = 2 regions; the search runs in the first of 2 iterations
TINY_SOKD = {**PRESETS["synthetic_det_frcnn_sokd"].method_options, "k": 2, "search_iters": 1}


def test_fpn_reads_the_24_32_96_320_channel_stages_and_bn_stays_in_eval(tmp_path):
    path = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.manual_seed(0)
    imagenet = mobilenet_v2(weights=None).state_dict()
    torch.save(imagenet, path)
    recipe = Recipe(task="det", data="synthetic", num_classes=3)
    model = tasks.DetTask().build_model(recipe, "faster_rcnn_mv2", pretrained=str(path)).train()
    assert [conv.in_channels for conv in model.neck.lateral_convs] == [24, 32, 96, 320]
    assert all(torch.equal(value, imagenet[key]) for key, value in model.backbone.state_dict().items())
    assert not any(module.training for module in model.backbone.modules() if isinstance(module, torch.nn.BatchNorm2d))
    assert all(parameter.requires_grad for parameter in model.backbone.parameters())  # FREEZE_AT 0
    with torch.no_grad():
        feats = model.eval().extract_feats(torch.randn(1, 3, 64, 64))
    assert [feats[f"p{level}"].shape[-1] for level in range(2, 7)] == [16, 8, 4, 2, 1]


def test_sokd_row_preset_mirrors_its_config_and_has_a_baseline_twin():
    row = PRESETS["sokd_faster_rcnn_mv2_fpn_coco"]
    assert (row.student, row.teacher, row.method, row.batch_size, row.lr, row.iters, row.lr_steps) == (
        "faster_rcnn_mv2", "faster_rcnn_r50", "sokd", 1, 0.01, 180_000, (120_000, 160_000))
    assert row.source == "FabienCode/mdistiller detection/configs/RegKD/RegKD-MV2-R50.yaml"
    assert row.pretrained in PRETRAINED_WEIGHTS
    twin = PRESETS["sokd_faster_rcnn_mv2_fpn_coco_baseline"]
    assert twin.method == "none" and twin.student == "faster_rcnn_mv2" and twin.iters == row.iters


def test_sokd_trains_the_mobilenet_student_and_resumes_exactly(tmp_path, monkeypatch):
    torch.manual_seed(0)  # a plain state dict of the teacher's architecture loads as --teacher-ckpt
    teacher = tmp_path / "teacher.pt"
    torch.save(detectors.build_detector("faster_rcnn_r18", 3).state_dict(), teacher)
    flags = [*TINY, "--method", "sokd", "--student", "faster_rcnn_mv2", "--teacher", "faster_rcnn_r18",
             "--teacher-ckpt", str(teacher), "--set", f"method_options={TINY_SOKD!r}", "--iters", "2",
             "--ckpt-every", "1"]
    straight, resumed = straight_and_resumed(tmp_path, monkeypatch, flags, crash_at=1)
    first = json.loads((tmp_path / "straight/log.jsonl").read_text().splitlines()[0])
    assert {"loss_sokd_feat", "loss_sokd_dam", "loss_sokd_base_kd", "loss_cls", "loss_rpn_cls"} <= set(first)
    assert all(np.isfinite(value) for key, value in first.items() if key.startswith("loss"))
    assert "backbone.features.17.conv.2.weight" in straight["model"]
    for part in ("model", "distiller"):
        assert all(torch.equal(value, resumed[part][key]) for key, value in straight[part].items()
                   if key != "_extra_state")
