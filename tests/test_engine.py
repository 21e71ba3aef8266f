import json
import os

import pytest
import torch
import torch.nn as nn

import train
from kd_ref import configs
from kd_ref.engine import ResumableSampler, Runtime, atomic_save, load_checkpoint, lr_factor, weighted_task_losses


def test_poly_schedule_with_floor_and_warmup():
    recipe = configs.Recipe(iters=100, lr=0.02, min_lr=1e-4, poly_power=0.9)
    assert lr_factor(0, recipe) == pytest.approx(1.0)
    expected = (1e-4 + (0.02 - 1e-4) * (1 - 50 / 100) ** 0.9) / 0.02
    assert lr_factor(50, recipe) == pytest.approx(expected)
    warm = configs.Recipe(iters=100, lr=0.02, warmup_iters=10, warmup_ratio=0.001)
    assert lr_factor(0, warm) == pytest.approx(0.001)
    assert lr_factor(5, warm) == pytest.approx((0.001 + 0.999 * 0.5) * (1 - 0.05) ** 0.9)


def test_step_schedule():
    recipe = configs.Recipe(iters=100, schedule="step", lr_steps=(60, 80))
    assert [lr_factor(i, recipe) for i in (0, 59, 60, 80, 99)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, configs.Recipe(schedule="cosine"))


def test_resumable_sampler_continues_the_same_order():
    data = list(range(23))
    runtime = Runtime(torch.device("cpu"))
    full = ResumableSampler(data, runtime, seed=3)
    full.set_position(epoch=2, start=0)
    order = list(full)
    part = ResumableSampler(data, runtime, seed=3)
    part.set_position(epoch=2, start=7)
    assert len(part) == len(order) - 7
    assert list(part) == order[7:]
    assert list(part) == order, "the start offset applies to one pass only"
    other = ResumableSampler(data, runtime, seed=3)
    other.set_position(epoch=3, start=0)
    assert list(other) != order


def test_atomic_save_keeps_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    atomic_save({"model": {"w": torch.ones(1)}}, path)

    def broken_save(obj, target):
        with open(target, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"model": {"w": torch.zeros(1)}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["model"]["w"].item() == 1.0


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(str(bad))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="expected a kd_ref checkpoint"):
        load_checkpoint(str(foreign))


def test_task_loss_weight_scales_every_task_loss(tmp_path):
    tiny = ["--task", "cls", "--method", "none", "--set", "synthetic_size=(48, 48)", "--crop", "16", "16",
            "--set", "synthetic_train=4", "--set", "synthetic_val=1", "--batch-size", "4", "--iters", "1", "--quiet"]
    first_step = {}
    for weight in (1.0, 0.1):
        train.main([*tiny, "--set", f"task_loss_weight={weight}", "--out", str(tmp_path / str(weight))])
        first_step[weight] = json.loads((tmp_path / str(weight) / "log.jsonl").read_text().splitlines()[0])
    assert first_step[0.1]["loss_cls"] == pytest.approx(0.1 * first_step[1.0]["loss_cls"], rel=1e-5)
    assert first_step[0.1]["loss"] == pytest.approx(0.1 * first_step[1.0]["loss"], rel=1e-5)
    outputs = {"losses": {"loss_seg": torch.tensor(2.0), "loss_seg_aux": torch.tensor(0.5)}}
    weighted = weighted_task_losses(outputs, 0.1)
    assert weighted == {"loss_seg": pytest.approx(0.2), "loss_seg_aux": pytest.approx(0.05)}
