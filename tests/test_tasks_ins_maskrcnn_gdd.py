"""GDD on Mask R-CNN end to end: train.py --task ins with a Mask R-CNN teacher and student on synthetic
instances, an exact resume, and evaluate.py printing mask and box AP."""
import json

import torch

import evaluate
from kd_ref import instance_seg
from train_helpers import straight_and_resumed

TINY = ["--task", "ins", "--set", "synthetic_size=(64, 64)", "--set", "image_scale=(64, 64)", "--set",
        "synthetic_train=4", "--set", "synthetic_val=1", "--batch-size", "2", "--set", "rcnn_rois_per_image=32",
        "--quiet", "--device", "cpu"]


def test_gdd_distils_mask_rcnn_resumes_exactly_and_evaluates_segm_and_bbox_ap(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)  # a plain state dict of the teacher's architecture loads as --teacher-ckpt
    teacher = tmp_path / "teacher.pt"
    torch.save(instance_seg.build_instance_model("maskrcnn_r18", 3).state_dict(), teacher)
    flags = [*TINY, "--preset", "synthetic_ins_maskrcnn_gdd", "--teacher-ckpt", str(teacher),
             "--iters", "2", "--ckpt-every", "1"]
    straight, resumed = straight_and_resumed(tmp_path, monkeypatch, flags, crash_at=1)
    scores = json.loads((tmp_path / "straight/metrics.json").read_text())
    step = json.loads((tmp_path / "straight/log.jsonl").read_text().splitlines()[0])
    assert {f"loss_gdd_p{i}" for i in range(2, 6)} <= set(step) and "loss_gdd_p6" not in step
    assert all(step[f"loss_gdd_p{i}"] > 0 for i in range(2, 6)) and step["loss_mask"] > 0
    assert all(torch.equal(value, resumed["model"][key]) for key, value in straight["model"].items())
    capsys.readouterr()
    evaluated = evaluate.main(["--ckpt", str(tmp_path / "straight/last.pt"), "--quiet", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "maskrcnn_r18 segm_AP " in printed and "maskrcnn_r18 bbox_AP " in printed
    assert evaluated["segm_AP"] == scores["segm_AP"] and evaluated["bbox_AP"] == scores["bbox_AP"]
