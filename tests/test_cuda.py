"""The CUDA paths, run on a GPU: skipped where CUDA is absent (every CPU run of the suite).

    python -m pytest -q tests/test_cuda.py          # on a GPU machine; .ci/gpu_checks.sh runs it with the rest

Every synthetic preset that trains a student (each task x method x model family) trains three iterations
on CUDA in float32, ``--amp bf16`` and ``--amp fp16`` with a randomly initialised teacher, is stopped in
its third iteration and resumed from its checkpoint, and evaluates; the losses are finite and the
checkpoint holds a GradScaler state exactly under fp16. Then: SKD's discriminator steps (its own
optimizer and scaler), a DDP run over NCCL with SyncBatchNorm, every task's device step (``prepare_batch``)
against the CPU's, and the host-device synchronisations of one iteration per preset as
``torch.cuda.set_sync_debug_mode("warn")`` reports them.

Device step tolerance: the images of a batch prepared on CUDA equal the CPU's within 1e-4 absolute (in
normalised units; resizing and normalisation are float32 on both, in a different order of operations),
everything else (targets, boxes, sizes) exactly.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from kd_ref import configs, engine, syncs
from train_helpers import train_crashing_in_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is absent: run on a GPU machine (.ci/gpu_checks.sh)")

ROOT = Path(__file__).resolve().parents[1]
PRESETS = syncs.default_presets()
PRECISIONS = {"fp32": [], "bf16": ["--amp", "bf16"], "fp16": ["--amp", "fp16"]}
TINY = ["--batch-size", "2", "--set", "synthetic_train=4", "--set", "synthetic_val=1", "--workers", "0", "--quiet",
        "--device", "cuda"]
IMAGE_ATOL = 1e-4


@pytest.fixture(scope="module")
def teacher_for(tmp_path_factory):
    """``teacher_for(preset)``: the path of a randomly initialised teacher of the preset (None without one);
    a teacher's weights do not change which CUDA paths a step takes."""
    root = tmp_path_factory.mktemp("random_teachers")

    def make(preset):
        recipe = syncs.probe_recipe(preset)
        if not configs.METHODS[recipe.method].needs_teacher:
            return None
        path = root / f"{preset}.pt"
        if not path.exists():
            torch.manual_seed(0)
            teacher = configs.TASKS[recipe.task].build_model(recipe, recipe.teacher, pretrained=None)
            torch.save(teacher.state_dict(), path)
        return str(path)
    return make


def _flags(preset, precision, teacher_ckpt):
    teacher = [] if teacher_ckpt is None else ["--teacher-ckpt", teacher_ckpt]
    return ["--preset", preset, *TINY, *PRECISIONS[precision], *teacher]


def _logged_losses(out):
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [step for step in steps if "eval" not in step and "best" not in step]


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_resumes_and_evaluates_on_cuda(preset, precision, tmp_path, monkeypatch, teacher_for):
    argv = [*_flags(preset, precision, teacher_for(preset)), "--iters", "3", "--ckpt-every", "1",
            "--out", str(tmp_path)]
    train_crashing_in_step(monkeypatch, 2, argv)
    stopped = engine.load_checkpoint(str(tmp_path / "last.pt"))
    assert stopped["iteration"] == 2
    assert bool(stopped["scaler"]) == (precision == "fp16"), "GradScaler state exactly under fp16"
    metrics = train.main([*argv, "--resume"])
    steps = _logged_losses(tmp_path)
    assert [step["iteration"] for step in steps] == [0, 1, 2]
    assert all(math.isfinite(value) for step in steps for key, value in step.items() if key.startswith("loss"))
    main_metric = configs.TASKS[syncs.probe_recipe(preset).task].main_metric
    assert metrics[main_metric] is not None


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("preset", [name for name in PRESETS if syncs.probe_recipe(name).method == "skd"])
def test_skd_discriminator_steps_with_its_own_optimizer_and_scaler(preset, precision, tmp_path, teacher_for):
    train.main([*_flags(preset, precision, teacher_for(preset)), "--iters", "2", "--out", str(tmp_path)])
    ckpt = engine.load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["extra_optimizer"] is not None and ckpt["extra_optimizer"]["state"], "the discriminator stepped"
    assert bool(ckpt["extra_scaler"]) == (precision == "fp16")
    steps = _logged_losses(tmp_path)
    adversarial = [key for key in steps[0] if key.startswith("loss_") and "skd" in key]
    assert adversarial and all(math.isfinite(step[key]) for step in steps for key in adversarial)


def test_ddp_over_nccl_with_syncbatchnorm_trains_and_resumes(tmp_path):
    """torchrun over every visible GPU (NCCL), trained then resumed: with two GPUs or more the student's
    BatchNorm becomes SyncBatchNorm, synchronised across the processes. With one GPU torchrun's single
    process trains without DDP, so the SyncBatchNorm + DDP wrapper is run in a one-process NCCL group
    (SyncBatchNorm at world size 1 normalises locally: its cross-process reduction needs two GPUs)."""
    processes = torch.cuda.device_count()
    torchrun = shutil.which("torchrun") or "torchrun"
    command = [torchrun, f"--nproc_per_node={processes}", "--master_port=29531", "train.py", "--task", "seg",
               "--method", "none", "--batch-size", str(2 * processes), "--set", "synthetic_train=8", "--set",
               "synthetic_val=2", "--workers", "0", "--quiet", "--device", "cuda", "--iters", "2",
               "--ckpt-every", "1", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    # the finished run resumed: every process loads last.pt into its (SyncBatchNorm, DDP) student and evaluates
    resumed = subprocess.run([*command, "--resume"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert engine.load_checkpoint(str(tmp_path / "last.pt"))["iteration"] == 2
    if processes == 1:
        # torchrun with one process trains without DDP; the SyncBatchNorm + DDP wrapper path in one NCCL group
        torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                             world_size=1)
        try:
            recipe = syncs.probe_recipe("synthetic_seg_none")
            model = configs.TASKS["seg"].build_model(recipe, recipe.student).cuda()
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
            dataset, collate = configs.TASKS["seg"].build_data(recipe, "train", None)
            first_epoch = engine.EpochAugmentation(dataset, recipe.seed)
            batch = dataset.prepare_batch(engine.move_to(collate([first_epoch[i] for i in range(2)]), "cuda"))
            losses = ddp(batch["images"], batch["targets"])["losses"]
            sum(losses.values()).backward()
            assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        finally:
            torch.distributed.destroy_process_group()


TASK_PRESETS = sorted({syncs.probe_recipe(name).task: name for name in PRESETS if name.endswith("_none")}.items())


def _assert_batches_match(cuda, cpu, where="batch"):
    if torch.is_tensor(cpu):
        assert cuda.device.type == "cuda", f"{where} was left on {cuda.device}"
        if cpu.is_floating_point() and cpu.dim() == 4:
            torch.testing.assert_close(cuda.cpu(), cpu, atol=IMAGE_ATOL, rtol=0, msg=f"{where} differs")
        else:
            assert torch.equal(cuda.cpu(), cpu), f"{where} differs"
    elif isinstance(cpu, dict):
        assert cuda.keys() == cpu.keys()
        for key in cpu:
            _assert_batches_match(cuda[key], cpu[key], f"{where}.{key}")
    elif isinstance(cpu, (list, tuple)):
        assert len(cuda) == len(cpu)
        for index, (a, b) in enumerate(zip(cuda, cpu)):
            _assert_batches_match(a, b, f"{where}[{index}]")
    elif isinstance(cpu, np.ndarray):
        assert np.array_equal(cuda, cpu)
    else:
        assert cuda == cpu, f"{where} differs"


@pytest.mark.parametrize("task, preset", TASK_PRESETS)
def test_device_step_on_cuda_equals_the_cpus(task, preset):
    recipe = syncs.probe_recipe(preset)
    for split in ("train", "val"):
        dataset, collate = configs.TASKS[task].build_data(recipe, split, None)
        samples = (engine.EpochAugmentation(dataset, recipe.seed) if split == "train" else dataset)
        def collated():   # a fresh batch for each device: a device step may work in place
            return collate([samples[i] for i in range(2 if split == "train" else 1)])
        on_cpu = dataset.prepare_batch(engine.move_to(collated(), torch.device("cpu")))
        on_cuda = dataset.prepare_batch(engine.move_to(collated(), torch.device("cuda")))
        _assert_batches_match(on_cuda, on_cpu, f"{preset} {split}")


def test_synchronisations_per_iteration_as_cuda_reports_them(capsys):
    runtime = engine.setup_runtime("cuda")
    measured = {}
    for preset in PRESETS:
        measured[preset] = syncs.count_iteration(syncs.probe_recipe(preset), runtime, syncs.CudaSyncWarnings).total
    with capsys.disabled():
        print("\nhost-device synchronisations per training iteration (set_sync_debug_mode):")
        for preset, count in measured.items():
            print(f"  {preset:<32} {count}")
    assert all(count >= 1 for count in measured.values()), "the engine's one read per iteration is not seen"
    # the engine's claim: a plain classification step reads the device once
    assert measured["synthetic_cls_none"] == 1
