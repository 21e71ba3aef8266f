import dataclasses
import json
import os
import sys

import pytest
import torch
import torch.nn as nn

import train
from kd_ref import engine, kd, methods, tasks
from kd_ref.distiller import Distiller, Method
from kd_ref.engine import check_teacher_outputs, lr_factor, synchronise_batchnorm, weighted_task_losses
from kd_ref.presets import PRESETS
from kd_ref.presets_seg import SKD_ORIGINAL_OPTIONS
from kd_ref.recipe import Recipe, check_schedule, resumed_recipe
from kd_ref.runtime import Runtime, atomic_save, load_checkpoint
from kd_ref.skd import SKDDistiller


def test_poly_schedule_with_floor_and_warmup():
    recipe = Recipe(iters=100, lr=0.02, min_lr=1e-4, poly_power=0.9)
    assert lr_factor(0, recipe) == pytest.approx(1.0)
    expected = (1e-4 + (0.02 - 1e-4) * (1 - 50 / 100) ** 0.9) / 0.02
    assert lr_factor(50, recipe) == pytest.approx(expected)
    warm = Recipe(iters=100, lr=0.02, warmup_iters=10, warmup_ratio=0.001)
    assert lr_factor(0, warm) == pytest.approx(0.001)
    assert lr_factor(5, warm) == pytest.approx((0.001 + 0.999 * 0.5) * (1 - 0.05) ** 0.9)


def test_step_schedule():
    recipe = Recipe(iters=100, schedule="step", lr_steps=(60, 80))
    assert [lr_factor(i, recipe) for i in (0, 59, 60, 80, 99)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, Recipe(schedule="cosine"))


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


# ------------------------------------------------------------------ epoch-based schedules and keep-best
class EpochRecorder(Distiller):
    """A distiller that adds no loss and records the engine's epoch counter."""

    def __init__(self):
        super().__init__()
        self.passes = []

    def before_epoch(self, context):
        self.passes.append((context.epoch, context.epochs, len(context.dataset)))

    def forward(self):
        return {}


def tiny_cls_recipe(**fields):
    from kd_ref import tasks
    return Recipe(task="cls", data="synthetic", num_classes=tasks.SYNTHETIC_NUM_IMAGE_CLASSES, crop=(8, 8),
                          normalization="cifar100", synthetic_size=(32, 32), synthetic_train=2, synthetic_val=1,
                          student="resnet8", batch_size=2, lr=0.1, schedule="step", **{"ckpt_every": 0, **fields})


def run_recorded(tmp_path, monkeypatch, recipe):
    from kd_ref import engine
    recorder = EpochRecorder()
    monkeypatch.setitem(methods.METHODS, "recorder", Method(lambda *models: recorder,
                                                                     {"cls": lambda s, t, b: {}}))
    teacher_ckpt = tmp_path / "teacher.pt"
    torch.save({"model": tasks.TASKS["cls"].build_model(recipe, "resnet8").state_dict()}, teacher_ckpt)
    recipe = dataclasses.replace(recipe, method="recorder", teacher="resnet8")
    engine.train(recipe, str(tmp_path / "run"), Runtime(torch.device("cpu")), teacher_ckpt=str(teacher_ckpt),
                 workers=0, quiet=True)
    with open(tmp_path / "run" / "log.jsonl") as handle:
        steps = [line for line in map(json.loads, handle) if "lr" in line]
    return recorder.passes, steps


@pytest.mark.parametrize("preset", ["gkd_faster_rcnn_r50_fpn_2x_coco", "gkd_retinanet_r50_fpn_voc0712"])
def test_epoch_recipes_derive_iterations_from_the_set_and_count_the_presets_epochs(tmp_path, monkeypatch, preset):
    """The GKD presets' schedules on a 2-image set at batch 2: COCO 2x = 24 passes of 1 iteration, steps
    after epochs 16 and 22; VOC = 4 passes over the set repeated 3 times (3 iterations each), step after 3."""
    reference = PRESETS[preset]
    recipe = tiny_cls_recipe(iters=None, epochs=reference.epochs, lr_steps=reference.lr_steps,
                             dataset_repeat=reference.dataset_repeat)
    passes, steps = run_recorded(tmp_path, monkeypatch, recipe)
    epochs, per_epoch = reference.epochs, reference.dataset_repeat
    assert passes == [(epoch, epochs, 2) for epoch in range(epochs)]  # the hook sees the set without repetition
    assert [step["epoch"] for step in steps] == [epoch for epoch in range(epochs) for _ in range(per_epoch)]
    lrs = [step["lr"] for step in steps]
    expected = [0.1 * 0.1 ** sum(epoch >= s for s in reference.lr_steps)
                for epoch in range(epochs) for _ in range(per_epoch)]
    assert lrs == pytest.approx(expected)
    stored = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert stored["recipe"]["epochs"] == epochs and stored["recipe"]["iters"] is None  # the units as given


def test_iteration_recipes_count_epochs_from_the_set_length(tmp_path, monkeypatch):
    passes, steps = run_recorded(tmp_path, monkeypatch, tiny_cls_recipe(iters=3, dataset_repeat=2))
    assert passes == [(0, 2, 2), (1, 2, 2)] and len(steps) == 3  # 2 iterations per repeated epoch


def test_keep_best_keeps_the_best_evaluation_and_names_its_iteration(tmp_path, monkeypatch):
    from kd_ref import engine
    scores = iter([50.0, 70.0, 60.0])
    monkeypatch.setattr(engine, "evaluate", lambda *args, **kwargs: {"top1": next(scores)})
    recipe = tiny_cls_recipe(iters=3, eval_every=1, keep_best=True)
    metrics = engine.train(recipe, str(tmp_path), Runtime(torch.device("cpu")), workers=0, quiet=True)
    assert metrics == {"top1": 60.0, "best": {"iteration": 2, "top1": 70.0}}
    with open(tmp_path / "metrics.json") as handle:
        assert json.load(handle) == metrics
    assert load_checkpoint(str(tmp_path / "best.pt"))["iteration"] == 2
    assert load_checkpoint(str(tmp_path / "last.pt"))["iteration"] == 3


def test_eval_at_scores_fixed_snapshots_and_only_they_compete_for_best(tmp_path, monkeypatch):
    """SKD's code: evaluations at fixed iterations (here 2 and 3 of 5, plus every 2), the best of the fixed
    ones kept; the periodic and the final evaluations are logged but do not compete."""
    from kd_ref import engine
    scores = iter([90.0, 50.0, 70.0, 95.0])  # at iterations 2, 3, 4 (eval_every) and 5 (final)

    def fake_evaluate(*args, **kwargs):
        return {"top1": next(scores)}
    monkeypatch.setattr(engine, "evaluate", fake_evaluate)
    recipe = tiny_cls_recipe(iters=5, eval_every=2, eval_at=(2, 3), keep_best=True)
    metrics = engine.train(recipe, str(tmp_path), Runtime(torch.device("cpu")), workers=0, quiet=True)
    assert metrics == {"top1": 95.0, "best": {"iteration": 2, "top1": 90.0}}
    with open(tmp_path / "log.jsonl") as handle:
        evaluated = [line["iteration"] for line in map(json.loads, handle) if "eval" in line]
    assert evaluated == [2, 3, 4, 5]
    assert load_checkpoint(str(tmp_path / "best.pt"))["iteration"] == 2
    # eval_at alone satisfies --keep-best; iterations outside the run are refused
    check_schedule(tiny_cls_recipe(iters=5, eval_at=(5,), keep_best=True))
    with pytest.raises(ValueError, match=r"eval_at \(0, 6\): expected iterations in 1..5"):
        check_schedule(tiny_cls_recipe(iters=5, eval_at=(0, 6)))
    with pytest.raises(ValueError, match="needs --eval-every N > 0 or --set eval_at"):
        check_schedule(tiny_cls_recipe(iters=5, keep_best=True))


def test_old_checkpoint_without_the_new_recipe_fields_resumes(tmp_path, capsys):
    """A checkpoint written before photometric_distortion/epochs/dataset_repeat/keep_best/source/eval_at/
    group_by_aspect existed resumes with those fields at their defaults, as it was trained, even where the
    recipe now sets one otherwise (a preset that changed since), and says so; a field it stored is still
    compared."""
    from kd_ref import engine
    recipe = tiny_cls_recipe(iters=2, ckpt_every=1)
    engine.train(dataclasses.replace(recipe, iters=1), str(tmp_path), Runtime(torch.device("cpu")), workers=0,
                 quiet=True)
    path = str(tmp_path / "last.pt")
    ckpt = load_checkpoint(path)
    new_fields = ("photometric_distortion", "epochs", "dataset_repeat", "keep_best", "source", "eval_at",
                  "group_by_aspect")
    ckpt["recipe"] = {k: v for k, v in ckpt["recipe"].items() if k not in new_fields}
    ckpt["recipe"]["iters"] = 2
    atomic_save(ckpt, path)
    with pytest.raises(ValueError, match=r"differs .* in \['lr'\]"):
        engine.train(dataclasses.replace(recipe, lr=recipe.lr / 2), str(tmp_path), Runtime(torch.device("cpu")),
                     resume=True, workers=0, quiet=True)
    with pytest.raises(ValueError, match=r"differs .* in \['dataset_repeat'\]"):  # --set dataset_repeat=2
        engine.train(dataclasses.replace(recipe, dataset_repeat=2), str(tmp_path), Runtime(torch.device("cpu")),
                     resume=True, workers=0, quiet=True, explicit_fields=frozenset({"dataset_repeat"}))
    engine.train(dataclasses.replace(recipe, dataset_repeat=2, source="documentation only"), str(tmp_path),
                 Runtime(torch.device("cpu")), resume=True, workers=0, quiet=True)
    assert "predates the recipe fields ['dataset_repeat']; the run continues with their defaults" in (
        capsys.readouterr().out)
    resumed = load_checkpoint(path)
    assert resumed["iteration"] == 2 and resumed["recipe"]["dataset_repeat"] == 1
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


# Which BatchNorm each reference synchronises under multi-GPU training: (the student's, the distiller's own).
# Classification: per-GPU BN in DIST_KD's and mdistiller's code; SoKD's adapter BN: per-GPU in mdistiller
# (nn.DataParallel) and in its detectron2 code (plain BatchNorm2d under DDP); SKD's critic: SyncBatchNorm in
# CIRKD (utils/sagan.py), which the depth preset's holistic settings follow, but not under WGAN-GP (its double
# backward does not exist for SyncBatchNorm); depth student: per-GPU BN (VNL trains with nn.DataParallel).
BATCHNORM_SYNCED_UNDER_DDP = {
    "synthetic_cls_sokd": (False, False),
    "dist_resnet18_imagenet": (False, None),
    "skd_deeplabv3_r18_cityscapes": (True, True),
    "skd_pspnet_r18_cityscapes_original": (True, False),
    "skd_depth_mv2_nyu": (False, True),
    "synthetic_det_frcnn_sokd": (True, False),
}


def _batchnorm_kinds(module: nn.Module) -> set:
    return {type(m) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("name", sorted(BATCHNORM_SYNCED_UNDER_DDP))
def test_cuda_ddp_synchronises_the_batchnorm_each_reference_synchronises(name):
    from kd_ref import presets
    recipe = presets.PRESETS[name]
    task = tasks.TASKS[recipe.task]
    # SoKD's policy samples on construction, which the meta device cannot; its presets here are small on the CPU
    with torch.device("cpu" if recipe.method == "sokd" else "meta"):
        student = task.build_model(recipe, recipe.student, pretrained=None)
        teacher = task.build_model(recipe, recipe.teacher, pretrained=None)
        distiller = methods.METHODS[recipe.method].build(recipe, student, teacher)
    student = synchronise_batchnorm(student, distiller, Runtime(torch.device("cuda", 0), rank=0, world_size=8),
                                    recipe.sync_bn)
    student_synced, distiller_synced = BATCHNORM_SYNCED_UNDER_DDP[name]
    assert _batchnorm_kinds(student) == {nn.SyncBatchNorm if student_synced else nn.BatchNorm2d}
    assert _batchnorm_kinds(distiller) == (set() if distiller_synced is None else
                                           {nn.SyncBatchNorm if distiller_synced else nn.BatchNorm2d})


def test_every_classification_and_depth_preset_keeps_per_gpu_batchnorm_and_old_checkpoints_keep_syncbn():
    from kd_ref import presets
    for name, recipe in presets.PRESETS.items():
        assert recipe.sync_bn == (recipe.task not in ("cls", "depth")), name
    recipe = presets.PRESETS["dist_resnet8x4_cifar100"]
    stored = {k: v for k, v in dataclasses.asdict(recipe).items() if k != "sync_bn"}
    resumed, reset = resumed_recipe(stored, recipe)
    assert resumed.sync_bn and reset == ["sync_bn"], "a run trained before the field continues as it was trained"


@pytest.mark.parametrize("options", [SKD_ORIGINAL_OPTIONS, {"adv_type": "wgan", "lambda_gp": 1.0}],
                         ids=["original", "cirkd_wgan"])
def test_a_gradient_penalty_critic_never_gets_syncbatchnorm(options):
    distiller = SKDDistiller(num_classes=4, **options)
    synchronise_batchnorm(nn.BatchNorm2d(3), distiller, Runtime(torch.device("cuda", 0), rank=0, world_size=2))
    assert distiller.sync_batchnorm_modules() == []
    assert type(distiller.discriminator.input_norm) is nn.BatchNorm2d


def _finite_loss_with_infinite_gradient():
    weight = nn.Parameter(torch.ones(2))
    loss = torch.sqrt(weight - 1).sum()     # value 0, gradient 1 / (2 sqrt(0)) = inf
    return weight, torch.optim.SGD([weight], lr=0.5), loss


def optimizer_step(optimizer, scaler, loss, iteration: int, name: str) -> None:
    """One optimizer's step from the engine's pieces, as TrainingRun.train_step runs them."""
    norm = engine.backward(optimizer, scaler, loss).item()
    engine.check_gradient(scaler, norm, iteration, name)
    engine.update(optimizer, scaler, norm)


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


TINY_CLS = dataclasses.replace(PRESETS["synthetic_cls_kd"], synthetic_size=(48, 48), crop=(16, 16),
                               synthetic_train=4, synthetic_val=1, batch_size=4, iters=1, student="resnet8",
                               teacher="resnet8", teacher_preset=None, ckpt_every=1)
CPU = Runtime(torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_cls_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls_teacher")
    engine.train(dataclasses.replace(TINY_CLS, method="none", method_options={}), str(out), CPU, workers=0, quiet=True)
    return str(out / "last.pt")


class InfiniteCritic(Distiller):
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
    monkeypatch.setitem(methods.METHODS, "critic", Method(lambda *_: InfiniteCritic(), {"cls": kd.METHOD.bind["cls"]}))
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


# ------------------------------------------------------------------------- host-device reads per iteration
DEVICE_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class DeviceReads:
    """Counts calls of the tensor methods that copy a value to the host (on a GPU each waits for all queued
    work), made while a TrainingRun step of an iteration runs: ``per_iteration[i]`` lists the kd_ref file that
    made each call of iteration i (the nearest kd_ref frame, so a torch helper counts for its caller); the run's
    first-batch teacher check, before the first iteration, gets a list of its own."""

    STEPS = ("check_teacher", "train_step", "extra_step", "step_hooks", "log")

    def __init__(self, monkeypatch):
        self.per_iteration, self.active = [], False
        for name in DEVICE_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))
        for name in self.STEPS:
            monkeypatch.setattr(engine.TrainingRun, name, self._active_during(getattr(engine.TrainingRun, name), name))

    def _counting(self, method):
        def counted(tensor, *args, **kwargs):
            if self.active:
                frame = sys._getframe(1)
                while frame is not None and f"{os.sep}kd_ref{os.sep}" not in frame.f_code.co_filename:
                    frame = frame.f_back
                self.per_iteration[-1].append(os.path.basename(frame.f_code.co_filename) if frame else "torch")
            return method(tensor, *args, **kwargs)
        return counted

    def _active_during(self, step, name):
        def run(*args, **kwargs):
            if name in ("check_teacher", "train_step"):
                self.per_iteration.append([])
            self.active = True
            try:
                return step(*args, **kwargs)
            finally:
                self.active = False
        return run


class FiniteCritic(InfiniteCritic):
    """An adversary with a finite loss and SGD (whose state holds no step counter to read)."""

    def extra_optimizer(self, total_iters):
        return torch.optim.SGD(self.extra_parameters(), lr=0.1), None

    def extra_losses(self, logits_s, logits_t):
        return {"loss_critic": self.critic(logits_s.detach().mean(1, keepdim=True)).pow(2).mean()}


def test_kd_reads_the_device_once_per_iteration_and_the_teacher_range_once(tmp_path, tiny_cls_teacher, monkeypatch):
    reads = DeviceReads(monkeypatch)
    engine.train(dataclasses.replace(TINY_CLS, iters=3, ckpt_every=0), str(tmp_path), CPU,
                 teacher_ckpt=tiny_cls_teacher, workers=0, quiet=True)
    # the teacher check (the sampler's CPU permutation, then the teacher's range), then one read per iteration
    assert reads.per_iteration == [["samplers.py", "engine.py"]] + [["engine.py"]] * 3
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"lr"' in line]
    assert [step["iteration"] for step in logged] == [1, 2, 3]
    assert all(abs(step["loss"] - step["loss_cls"] - step["loss_kd"]) < 1e-5 for step in logged), "logged from the read"


def test_both_optimizers_under_grad_scalers_share_the_one_read(tmp_path, tiny_cls_teacher, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "critic", Method(lambda *_: FiniteCritic(), {"cls": kd.METHOD.bind["cls"]}))
    scalers = []
    real_scaler = torch.amp.GradScaler

    def enabled_cpu_scaler(device, enabled):  # fp16's GradScaler, on the CPU so that the test runs anywhere
        scalers.append(real_scaler("cpu", init_scale=2.0 ** 10, growth_interval=1))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", enabled_cpu_scaler)
    steps = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    reads = DeviceReads(monkeypatch)
    engine.train(dataclasses.replace(TINY_CLS, method="critic", method_options={}, iters=3, ckpt_every=0),
                 str(tmp_path), CPU, teacher_ckpt=tiny_cls_teacher, workers=0, quiet=True)
    assert reads.per_iteration == [["samplers.py", "engine.py"]] + [["engine.py"]] * 3
    assert len(steps) == 6, "student and critic stepped in every iteration"
    assert [scaler.get_scale() for scaler in scalers] == [2.0 ** 13] * 2, "no overflow: each scale grew 3 times"
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"lr"' in line]
    assert all(step["loss_critic"] >= 0 and "loss_probe" in step for step in logged)


def test_a_scaler_skips_the_overflowing_step_from_the_read_norm():
    weight, optimizer, loss = _finite_loss_with_infinite_gradient()
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    norm = engine.backward(optimizer, scaler, loss)
    assert norm.item() == float("inf")
    engine.check_gradient(scaler, norm.item(), 0, "student")  # fp16 dynamics: no error
    engine.update(optimizer, scaler, norm.item())
    assert torch.equal(weight.detach(), torch.ones(2)) and scaler.get_scale() == 4.0


def test_sokd_search_step_adds_no_read_of_the_engine(tmp_path, tiny_cls_teacher, monkeypatch):
    reads = DeviceReads(monkeypatch)
    recipe = dataclasses.replace(TINY_CLS, method="sokd", method_options={"base": "kd"}, iters=2, ckpt_every=0)
    engine.train(recipe, str(tmp_path), CPU, teacher_ckpt=tiny_cls_teacher, workers=0, quiet=True)
    # the teacher check's read of the teacher's range (its other read is the sampler's permutation, in
    # samplers.py), then the engine's one read in each iteration
    assert [callers.count("engine.py") for callers in reads.per_iteration] == [1, 1, 1]
