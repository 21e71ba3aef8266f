import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn

import train
from kd_ref import configs, engine
from kd_ref.engine import (BatchNormWatch, ResumableSampler, Runtime, atomic_save, check_teacher_outputs,
                           load_checkpoint, load_model_weights, lr_factor, optimizer_step, read_model_weights,
                           synchronise_batchnorm, weighted_task_losses)
from kd_ref.skd import SKDDistiller


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


def test_load_model_weights_lists_mismatched_keys():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(3), "1.weight": torch.zeros(1, 4),
             "2.weight": torch.zeros(1)}
    with pytest.raises(ValueError) as info:
        load_model_weights(model, state, "--teacher-ckpt t.pt")
    message = str(info.value)
    assert "missing 1.bias" in message and "unexpected 2.weight" in message and "1.weight: (1, 4) vs (1, 3)" in message


def test_read_model_weights_takes_a_checkpoint_or_a_state_dict(tmp_path):
    weights = {"w": torch.arange(3.0)}
    torch.save({"model": weights, "iteration": 7}, tmp_path / "last.pt")
    torch.save(weights, tmp_path / "plain.pt")
    for name in ("last.pt", "plain.pt"):
        assert torch.equal(read_model_weights(str(tmp_path / name), "student_init s.pt")["w"], weights["w"])
    torch.save({"w": [1.0]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="student_init s.pt: expected a train.py checkpoint or a state dict"):
        read_model_weights(str(tmp_path / "odd.pt"), "student_init s.pt")


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


# ------------------------------------------------------------------------ SyncBN, non-finite, teacher
def test_syncbn_conversion_covers_the_student_and_the_skd_discriminator():
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    distiller = SKDDistiller(num_classes=4)
    cuda_ddp = Runtime(torch.device("cuda", 0), rank=0, world_size=2)
    converted = synchronise_batchnorm(student, distiller, cuda_ddp)
    assert isinstance(converted[1], nn.SyncBatchNorm)
    assert isinstance(distiller.discriminator.input_norm, nn.SyncBatchNorm)
    assert distiller.discriminator.input_norm.weight in set(distiller.extra_parameters())
    for runtime in (Runtime(torch.device("cuda", 0)), Runtime(torch.device("cpu"), rank=0, world_size=2)):
        plain = SKDDistiller(num_classes=4)
        assert not isinstance(synchronise_batchnorm(nn.BatchNorm2d(3), plain, runtime), nn.SyncBatchNorm)
        assert type(plain.discriminator.input_norm) is nn.BatchNorm2d


def _finite_loss_with_infinite_gradient():
    weight = nn.Parameter(torch.ones(2))
    loss = torch.sqrt(weight - 1).sum()     # value 0, gradient 1 / (2 sqrt(0)) = inf
    return weight, torch.optim.SGD([weight], lr=0.5), loss


def test_optimizer_step_with_grad_scaler_skips_non_finite_gradients():
    weight, optimizer, loss = _finite_loss_with_infinite_gradient()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    optimizer_step(optimizer, scaler, loss, 0, "student")
    assert torch.equal(weight.detach(), torch.ones(2)), "the overflowing step is skipped"
    assert scaler.get_scale() == 4.0, "and the scale lowered"


def test_optimizer_step_without_scaler_stops_on_non_finite_gradients():
    weight, optimizer, loss = _finite_loss_with_infinite_gradient()
    with pytest.raises(FloatingPointError, match="non-finite gradient of the extra loss at iteration 3"):
        optimizer_step(optimizer, torch.amp.GradScaler("cpu", enabled=False), loss, 3, "extra")
    assert torch.equal(weight.detach(), torch.ones(2))
    finite_weight, finite_optimizer, _ = _finite_loss_with_infinite_gradient()
    optimizer_step(finite_optimizer, torch.amp.GradScaler("cpu", enabled=False), finite_weight.sum(), 0, "student")
    assert torch.allclose(finite_weight.detach(), torch.full((2,), 0.5))


TINY_CLS = dataclasses.replace(configs.PRESETS["synthetic_cls_kd"], synthetic_size=(48, 48), crop=(16, 16),
                               synthetic_train=4, synthetic_val=1, batch_size=4, iters=1, student="resnet8",
                               teacher="resnet8", teacher_preset=None, ckpt_every=1)
CPU = Runtime(torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_cls_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls_teacher")
    engine.train(dataclasses.replace(TINY_CLS, method="none", method_options={}), str(out), CPU, workers=0, quiet=True)
    return str(out / "last.pt")


class InfiniteCritic(nn.Module):
    """An adversary whose own (extra) loss overflows while the student's losses are finite."""

    def __init__(self):
        super().__init__()
        self.critic = nn.Linear(1, 1)

    def forward(self, logits_s, logits_t):
        return {"loss_probe": (logits_s - logits_t).pow(2).mean()}

    def extra_parameters(self):
        return list(self.critic.parameters())

    def extra_optimizer(self, total_iters):
        return torch.optim.Adam(self.extra_parameters()), None

    def extra_losses(self, logits_s, logits_t):
        return {"loss_critic": self.critic.weight.sum() * float("inf")}


def test_non_finite_extra_loss_stops_before_the_student_steps(tmp_path, tiny_cls_teacher, monkeypatch):
    monkeypatch.setitem(configs.METHODS, "critic", configs.Method(lambda *_: InfiniteCritic(), {"cls": configs._logits}))
    sgd_steps = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: sgd_steps.append(1) or real_step(self, *a, **k))
    recipe = dataclasses.replace(TINY_CLS, method="critic", method_options={})
    with pytest.raises(FloatingPointError, match="non-finite loss at iteration 0.*loss_critic"):
        engine.train(recipe, str(tmp_path), CPU, teacher_ckpt=tiny_cls_teacher, workers=0, quiet=True)
    assert sgd_steps == [], "the student optimizer stepped before the adversary's loss was checked"
    assert not os.path.exists(tmp_path / "last.pt")


def test_a_diverged_teacher_is_named_on_the_first_batch(tmp_path, tiny_cls_teacher, capsys):
    ckpt = torch.load(tiny_cls_teacher, weights_only=False)
    fc = next(k for k in ckpt["model"] if k.endswith("weight") and ckpt["model"][k].dim() == 2)
    ckpt["model"][fc] = ckpt["model"][fc] * 1e8       # logits of ~1e8: the teacher of a diverged run
    diverged = str(tmp_path / "diverged.pt")
    torch.save(ckpt, diverged)
    argv = ["--task", "cls", "--method", "kd", "--student", "resnet8", "--teacher", "resnet8", "--teacher-ckpt",
            diverged, "--set", "synthetic_size=(48, 48)", "--crop", "16", "16", "--set", "synthetic_train=4",
            "--set", "synthetic_val=1", "--batch-size", "4", "--iters", "1", "--quiet", "--out", str(tmp_path / "run")]
    assert train.run(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: --teacher-ckpt {diverged}: the teacher's output logits")
    assert not os.path.exists(tmp_path / "run" / "last.pt")
    with pytest.raises(ValueError, match=r"feats.c4\[1\] reaches \|x\| = inf"):
        check_teacher_outputs({"logits": torch.zeros(2), "feats": {"c4": [torch.ones(1), torch.tensor([float("inf")])]}},
                              "t.pt")


def test_batchnorm_over_fewer_than_four_values_per_channel_warns():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.BatchNorm2d(4))
    for size, should_warn in ((4, True), (8, False)):   # batch 2 x 1 x 1 = 2 values; 2 x 2 x 2 = 8
        watch = BatchNormWatch([model, None], world_size=1)
        model(torch.randn(2, 3, size, size))
        if should_warn:
            with pytest.warns(UserWarning, match="BatchNorm 1 normalises over 2 values per channel"):
                watch.close()
        else:
            watch.close()
            assert watch.fewest == 8
    model.eval()
    watch = BatchNormWatch([model], world_size=1)
    model(torch.randn(2, 3, 4, 4))
    watch.close()
    assert watch.fewest is None, "eval-mode BatchNorm uses its running statistics"
    assert not model[1]._forward_pre_hooks
