"""GDD on Mask R-CNN end to end: train.py --task ins with a Mask R-CNN teacher and student on synthetic
instances, an exact resume, and evaluate.py printing mask and box AP."""
import json

import torch

import evaluate
import train
from kd_ref import engine, instance_seg
from train_helpers import train_crashing_in_step

TINY = ["--task", "ins", "--set", "synthetic_size=(64, 64)", "--set", "image_scale=(64, 64)", "--set",
        "synthetic_train=4", "--set", "synthetic_val=2", "--batch-size", "2", "--set", "rcnn_rois_per_image=32",
        "--quiet", "--device", "cpu"]


def test_gdd_distils_mask_rcnn_resumes_exactly_and_evaluates_segm_and_bbox_ap(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)  # a plain state dict of the teacher's architecture loads as --teacher-ckpt
    teacher = tmp_path / "teacher.pt"
    torch.save(instance_seg.build_instance_model("maskrcnn_r18", 3).state_dict(), teacher)
    flags = [*TINY, "--preset", "synthetic_ins_maskrcnn_gdd", "--teacher-ckpt", str(teacher),
             "--iters", "3", "--ckpt-every", "1"]
    scores = train.main([*flags, "--out", str(tmp_path / "straight")])
    step = json.loads((tmp_path / "straight/log.jsonl").read_text().splitlines()[0])
    assert {f"loss_gdd_p{i}" for i in range(2, 6)} <= set(step) and "loss_gdd_p6" not in step
    assert all(step[f"loss_gdd_p{i}"] > 0 for i in range(2, 6)) and step["loss_mask"] > 0
    train_crashing_in_step(monkeypatch, 2, [*flags, "--out", str(tmp_path / "resumed")])
    train.main([*flags, "--out", str(tmp_path / "resumed"), "--resume"])
    straight = engine.load_checkpoint(str(tmp_path / "straight/last.pt"))
    resumed = engine.load_checkpoint(str(tmp_path / "resumed/last.pt"))
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
    capsys.readouterr()
    evaluated = evaluate.main(["--ckpt", str(tmp_path / "straight/last.pt"), "--quiet", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "maskrcnn_r18 segm_AP " in printed and "maskrcnn_r18 bbox_AP " in printed
    assert evaluated["segm_AP"] == scores["segm_AP"] and evaluated["bbox_AP"] == scores["bbox_AP"]
