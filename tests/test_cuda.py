"""The CUDA paths, run on a GPU: skipped where CUDA is absent (every CPU run of the suite).

    python -m pytest -q tests/test_cuda.py          # on a GPU machine; .ci/gpu_checks.sh runs it with the rest

Every synthetic preset that trains a student (each task x method x model family) trains three iterations
on CUDA in float32 with a randomly initialised teacher, is stopped in its third iteration and resumed from
its checkpoint, and evaluates; the losses are finite and the checkpoint holds a GradScaler state exactly
under fp16. ``--amp bf16`` and ``--amp fp16`` run on one preset per model family (AMP_PRESETS, a
distilling one where the family has it): 47 train-resume-evaluate cases instead of 93. Then: SKD's
discriminator steps (its own optimizer and scaler; segmentation with the holistic term on, at a crop that
gives the critic its 64 x 64 logit maps), a DDP run over NCCL with SyncBatchNorm, every task's device step
(``prepare_batch``) against the CPU's, and the host-device synchronisations of one iteration per preset as
``torch.cuda.set_sync_debug_mode("warn")`` reports them.

Device step tolerance: where the device step resizes (the detection probe at an ``image_scale`` under the
scenes' 128 pixels; at the presets' own sizes nothing is resized), the CPU resizes uint8 pixels with torch's
fixed-point uint8 kernel and CUDA in float32, rounded back to uint8 (kd_ref/transforms.py ``resize_pixels``):
a pixel may differ by one intensity level, so the images of a batch prepared on CUDA equal the CPU's within
one level in normalised units (1 / min(std) of the recipe's normalisation, + 1e-6). Integer tensors (labels,
sizes) are equal exactly, other floating-point ones (boxes) within float32 rounding.
"""
import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from kd_ref import engine, presets, presets_seg, syncs, tasks, transforms
from kd_ref.recipe import Recipe
from kd_ref.runtime import load_checkpoint, setup_runtime
from kd_ref.samplers import EpochAugmentation
from train_helpers import train_crashing_in_step

# every test but the coverage check of AMP_PRESETS, which runs wherever the suite does
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is absent: run on a GPU machine (.ci/gpu_checks.sh)")

ROOT = Path(__file__).resolve().parents[1]
PRESETS = syncs.default_presets()
PRECISIONS = {"fp32": [], "bf16": ["--amp", "bf16"], "fp16": ["--amp", "fp16"]}
# the mixed precisions on one preset per model family (the student's architecture): a distilling one, so the
# teacher's forward and the distiller's loss run under autocast too
AMP_PRESETS = ["synthetic_seg_kd", "synthetic_cls_kd", "synthetic_det_retinanet_gdd", "synthetic_det_frcnn_gdd",
               "synthetic_det_fcos_skd", "synthetic_ins_solo_gdd", "synthetic_ins_maskrcnn_gdd",
               "synthetic_depth_skd"]
TRAIN_CASES = ([pytest.param(preset, "fp32", id=f"{preset}-fp32") for preset in PRESETS]
               + [pytest.param(preset, precision, id=f"{preset}-{precision}")
                  for precision in ("bf16", "fp16") for preset in AMP_PRESETS])
TINY = ["--batch-size", "2", "--set", "synthetic_train=4", "--set", "synthetic_val=1", "--workers", "0", "--quiet",
        "--device", "cuda"]
CUDA = "cuda"


def test_amp_presets_cover_every_model_family_once():
    family = {name: presets.PRESETS[name].student for name in PRESETS}
    assert set(AMP_PRESETS) <= set(PRESETS)
    assert sorted(family[name] for name in AMP_PRESETS) == sorted(set(family.values()))


@pytest.fixture(scope="module")
def teacher_for(tmp_path_factory):
    """``teacher_for(preset)``: the path of a randomly initialised teacher of the preset (None without one);
    a teacher's weights do not change which CUDA paths a step takes."""
    root = tmp_path_factory.mktemp("random_teachers")

    def make(preset):
        path = root / f"{preset}.pt"
        if path.exists():
            return str(path)
        return syncs.random_teacher_file(syncs.probe_recipe(preset), str(path))
    return make


def _flags(preset, precision, teacher_ckpt):
    teacher = [] if teacher_ckpt is None else ["--teacher-ckpt", teacher_ckpt]
    return ["--preset", preset, *TINY, *PRECISIONS[precision], *teacher]


def _logged_losses(out):
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [step for step in steps if "eval" not in step and "best" not in step]


@needs_cuda
@pytest.mark.parametrize("preset, precision", TRAIN_CASES)
def test_every_preset_trains_resumes_and_evaluates_on_cuda(preset, precision, tmp_path, monkeypatch, teacher_for):
    argv = [*_flags(preset, precision, teacher_for(preset)), "--iters", "3", "--ckpt-every", "1",
            "--out", str(tmp_path)]
    train_crashing_in_step(monkeypatch, 2, argv)
    stopped = load_checkpoint(str(tmp_path / "last.pt"))
    assert stopped["iteration"] == 2
    assert bool(stopped["scaler"]) == (precision == "fp16"), "GradScaler state exactly under fp16"
    metrics = train.main([*argv, "--resume"])
    steps = _logged_losses(tmp_path)
    assert [step["iteration"] for step in steps] == [1, 2, 3]   # log.jsonl numbers the steps from 1
    assert all(math.isfinite(value) for step in steps for key, value in step.items() if key.startswith("loss"))
    main_metric = tasks.TASKS[syncs.probe_recipe(preset).task].main_metric
    assert metrics[main_metric] is not None


# SKD's critic on segmentation logits: the synthetic presets leave the holistic term off (their 64-pixel crops
# give 8 x 8 logits, under the critic's 64 x 64), so it is switched on at a 512 x 512 crop (stride 8: 64 x 64);
# "cirkd" is the hinge critic with Adam, "original" WGAN-GP (a double backward) with SGD and a poly schedule
SKD_CASES = [("cirkd", "fp32"), ("cirkd", "bf16"), ("cirkd", "fp16"), ("original", "fp32")]
SKD_CRITIC_KEYS = {"cirkd": {"loss_skd_d"}, "original": {"loss_skd_d", "loss_skd_gp"}}


@needs_cuda
@pytest.mark.parametrize("skd_preset, precision", SKD_CASES)
def test_skd_discriminator_steps_with_its_own_optimizer_and_scaler(skd_preset, precision, tmp_path, teacher_for):
    preset = "synthetic_seg_skd"
    protocol = presets_seg.SKD_ORIGINAL_OPTIONS if skd_preset == "original" else {}
    options = {**presets.PRESETS[preset].method_options, **protocol, "use_ho": True}
    train.main([*_flags(preset, precision, teacher_for(preset)), "--crop", "512", "512",
                "--set", f"method_options={options!r}", "--iters", "2", "--out", str(tmp_path)])
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["extra_optimizer"] is not None and ckpt["extra_optimizer"]["state"], "the discriminator stepped"
    assert bool(ckpt["extra_scaler"]) == (precision == "fp16")
    steps = _logged_losses(tmp_path)
    assert len(steps) == 2
    expected = {"loss_skd_pi", "loss_skd_pa", "loss_skd_ho"} | SKD_CRITIC_KEYS[skd_preset]
    for step in steps:
        logged = {key for key in step if key.startswith("loss_skd")}
        assert logged == expected, f"iteration {step['iteration']}: logged {sorted(logged)}"
        assert all(math.isfinite(step[key]) for key in expected)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# train.py under torchrun, with engine.synchronise_batchnorm watched: each process writes how many
# SyncBatchNorm layers its student has after the conversion to sync_bn/rank<RANK>.txt
WATCHED_TRAIN = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import train
from kd_ref import engine
real = engine.synchronise_batchnorm
def watched(*args, **kwargs):
    student = real(*args, **kwargs)
    count = sum(isinstance(module, torch.nn.SyncBatchNorm) for module in student.modules())
    os.makedirs({marks!r}, exist_ok=True)
    with open(os.path.join({marks!r}, "rank" + os.environ["RANK"] + ".txt"), "w") as file:
        file.write(str(count))
    return student
engine.synchronise_batchnorm = watched
train.main(sys.argv[1:])
"""


@needs_cuda
def test_ddp_over_nccl_with_syncbatchnorm_trains_and_resumes(tmp_path):
    """torchrun over every visible GPU (NCCL), trained then resumed: with two GPUs or more the student's
    BatchNorm becomes SyncBatchNorm, synchronised across the processes (each process reports its count of
    SyncBatchNorm layers). With one GPU torchrun's single process trains without DDP, so the SyncBatchNorm +
    DDP wrapper is run in a one-process NCCL group (SyncBatchNorm at world size 1 normalises locally: its
    cross-process reduction needs two GPUs)."""
    processes = torch.cuda.device_count()
    torchrun = shutil.which("torchrun") or "torchrun"
    script = tmp_path / "watched_train.py"
    marks = tmp_path / "sync_bn"
    script.write_text(WATCHED_TRAIN.format(root=str(ROOT), marks=str(marks)))
    # two samples per process and batch: every rank's batches are full (DistributedSampler splits the set)
    flags = ["--task", "seg", "--method", "none", "--batch-size", str(2 * processes), "--set",
             f"synthetic_train={4 * processes}", "--set", "synthetic_val=2", "--workers", "0", "--quiet",
             "--device", "cuda", "--iters", "2", "--ckpt-every", "1", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(*extra):   # a free port per launch: the first run's may still be in TIME_WAIT
        command = [torchrun, f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
                   f"--master_port={_free_port()}", str(script), *flags, *extra]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)

    first = launch()
    assert first.returncode == 0, first.stderr[-3000:]
    counts = {path.name: int(path.read_text()) for path in marks.glob("rank*.txt")}
    assert len(counts) == processes, counts
    if processes > 1:
        assert all(count > 0 for count in counts.values()), f"SyncBatchNorm layers per process: {counts}"
    # the finished run resumed: every process loads last.pt into its (SyncBatchNorm, DDP) student and evaluates
    resumed = launch("--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(str(tmp_path / "run" / "last.pt"))["iteration"] == 2
    if processes == 1:
        # torchrun with one process trains without DDP; the SyncBatchNorm + DDP wrapper path in one NCCL group
        torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                             world_size=1)
        try:
            recipe = syncs.probe_recipe("synthetic_seg_none")
            model = tasks.TASKS["seg"].build_model(recipe, recipe.student).to(CUDA)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0] if CUDA == "cuda" else None)
            dataset, collate = tasks.TASKS["seg"].build_data(recipe, "train", None)
            first_epoch = EpochAugmentation(dataset, recipe.seed)
            batch = dataset.prepare_batch(engine.move_to(collate([first_epoch[i] for i in range(2)]), CUDA))
            losses = ddp(batch["images"], batch["targets"])["losses"]
            sum(losses.values()).backward()
            assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
            assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        finally:
            torch.distributed.destroy_process_group()


# each task's "_none" preset at its own sizes, and detection at an image_scale under the 128-pixel scenes
# (the device step resizes, in uint8 on the CPU and in float32 rounded to uint8 on CUDA)
DEVICE_STEP_PROBES = {name: syncs.probe_recipe(name) for name in sorted(
    {presets.PRESETS[name].task: name for name in PRESETS if name.endswith("_none")}.values())}
DEVICE_STEP_PROBES["synthetic_det_retinanet_none-at-96x96"] = dataclasses.replace(
    syncs.probe_recipe("synthetic_det_retinanet_none"), image_scale=(96, 96))


def one_intensity_level(recipe: Recipe) -> float:
    """One uint8 intensity level in the normalised units of ``recipe``'s images (+ 1e-6 for float32
    rounding): 1 / min(std), about 0.0175 under the ImageNet statistics, 1 without a std."""
    return 1.0 / min(transforms.NORMALIZATIONS[recipe.normalization]["std"]) + 1e-6


def _assert_batches_match(cuda, cpu, image_atol, where="batch"):
    if torch.is_tensor(cpu):
        assert cuda.device.type == CUDA, f"{where} was left on {cuda.device}"
        if cpu.is_floating_point() and cpu.dim() == 4:
            torch.testing.assert_close(cuda.cpu(), cpu, atol=image_atol, rtol=0, msg=lambda msg: f"{where}: {msg}")
        elif cpu.is_floating_point():   # boxes: the same float32 arithmetic, which CUDA may fuse differently
            torch.testing.assert_close(cuda.cpu(), cpu, msg=lambda msg: f"{where}: {msg}")
        else:
            assert torch.equal(cuda.cpu(), cpu), f"{where} differs"
    elif isinstance(cpu, dict):
        assert cuda.keys() == cpu.keys()
        for key in cpu:
            _assert_batches_match(cuda[key], cpu[key], image_atol, f"{where}.{key}")
    elif isinstance(cpu, (list, tuple)):
        assert len(cuda) == len(cpu)
        for index, (a, b) in enumerate(zip(cuda, cpu)):
            _assert_batches_match(a, b, image_atol, f"{where}[{index}]")
    elif isinstance(cpu, np.ndarray):
        assert np.array_equal(cuda, cpu)
    else:
        assert cuda == cpu, f"{where} differs"


@needs_cuda
@pytest.mark.parametrize("probe", DEVICE_STEP_PROBES)
def test_device_step_on_cuda_equals_the_cpus(probe):
    recipe = DEVICE_STEP_PROBES[probe]
    for split in ("train", "val"):
        dataset, collate = tasks.TASKS[recipe.task].build_data(recipe, split, None)
        samples = (EpochAugmentation(dataset, recipe.seed) if split == "train" else dataset)
        def collated():   # a fresh batch for each device: a device step may work in place
            return collate([samples[i] for i in range(2 if split == "train" else 1)])
        on_cpu = dataset.prepare_batch(engine.move_to(collated(), torch.device("cpu")))
        on_cuda = dataset.prepare_batch(engine.move_to(collated(), torch.device(CUDA)))
        _assert_batches_match(on_cuda, on_cpu, one_intensity_level(recipe), f"{probe} {split}")


@needs_cuda
def test_synchronisations_per_iteration_as_cuda_reports_them(capsys):
    runtime = setup_runtime("cuda")
    measured = {}
    for preset in PRESETS:
        measured[preset] = syncs.count_iteration(syncs.probe_recipe(preset), runtime, syncs.CudaSyncWarnings).total
    table = "host-device synchronisations per training iteration (set_sync_debug_mode):\n" + "\n".join(
        f"  {preset:<32} {count}" for preset, count in measured.items())
    with capsys.disabled():
        print("\n" + table)
    assert all(count >= 1 for count in measured.values()), \
        f"the engine's one read per iteration is not seen\n{table}"
    # the engine's claim: a plain classification step reads the device once
    assert measured["synthetic_cls_none"] == 1, f"synthetic_cls_none: {measured['synthetic_cls_none']}\n{table}"
