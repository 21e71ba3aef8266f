"""End-to-end tests of train.py / evaluate.py on tiny synthetic segmentation data."""
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train
from kd_ref import convert, export, segmentors, synthetic, tasks
from kd_ref.recipe import reference_launch
from train_helpers import train_crashing_in_step
from kd_ref.presets import PRESETS
from kd_ref.runtime import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "synthetic_size=(64, 64)", "--crop", "64", "64", "--set", "synthetic_train=8",
        "--set", "synthetic_val=3", "--batch-size", "2", "--quiet"]


def strict_json(text):
    """json.loads that refuses NaN and Infinity, which Python's json writes and reads but JSON has not."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def run(out, *flags):
    return train.main(["--task", "seg", "--out", str(out), *TINY, *flags])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run(out, "--method", "none", "--student", "deeplabv3_r18", "--iters", "2")
    return str(out / "last.pt")


def test_train_writes_checkpoint_log_and_metrics_then_evaluates(tmp_path):
    metrics = run(tmp_path, "--method", "none", "--iters", "3", "--ckpt-every", "2")
    assert set(metrics) == {"mIoU", "IoU", "aAcc"} and len(metrics["IoU"]) == PRESETS["synthetic_seg_none"].num_classes
    written = strict_json((tmp_path / "metrics.json").read_text())
    assert written["mIoU"] == metrics["mIoU"]
    # a class absent from the tiny val set has IoU NaN, written as null
    assert written["IoU"] == [None if np.isnan(value) else value for value in metrics["IoU"]]
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "eval" not in line]
    assert [line["iteration"] for line in steps] == [1, 2, 3]
    for key in ("lr", "loss_seg", "loss_seg_aux", "loss", "seconds", "data_seconds", "peak_memory_mb"):
        assert key in steps[0] and np.isfinite(steps[0][key])
    assert load_checkpoint(str(tmp_path / "last.pt"))["iteration"] == 3

    pred_dir = tmp_path / "pred"
    scores = evaluate.main(["--ckpt", str(tmp_path / "last.pt"), "--save-pred", str(pred_dir), "--quiet"])
    assert scores["mIoU"] == pytest.approx(metrics["mIoU"])
    saved = sorted(os.listdir(pred_dir))
    assert len(saved) == 2 * 3 + 1, "one train-id and one colour PNG per val image, and the legend"
    legend = strict_json((pred_dir / "legend.json").read_text())["classes"]
    assert [entry["name"] for entry in legend] == list(synthetic.SyntheticScenes.CLASSES[:len(metrics["IoU"])])
    colour = np.asarray(Image.open(pred_dir / "val_000000_color.png"))
    label = np.asarray(Image.open(pred_dir / "val_000000.png"))
    np.testing.assert_array_equal(colour, np.array([entry["color"] for entry in legend], np.uint8)[label])


@pytest.mark.parametrize("method", ["kd", "dist", "gdd"])
def test_each_method_trains_and_resumes(tmp_path, teacher_ckpt, method):
    common = ["--method", method, "--teacher", "deeplabv3_r18", "--teacher-ckpt", teacher_ckpt, "--ckpt-every", "1"]
    flags = [*common, "--iters", "2"]
    run(tmp_path, *flags)
    losses = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][0]
    kd_keys = [k for k in losses if k.startswith("loss_") and not k.startswith("loss_seg")]
    assert kd_keys and all(np.isfinite(losses[k]) for k in kd_keys)
    # resume a finished run with more iterations is refused (the schedule would change) ...
    with pytest.raises(ValueError, match="recipe differs"):
        run(tmp_path, *common, "--iters", "3", "--resume")
    # ... while resuming the same recipe continues from the checkpoint and changes nothing
    before = load_checkpoint(str(tmp_path / "last.pt"))["model"]
    run(tmp_path, *flags, "--resume")
    after = load_checkpoint(str(tmp_path / "last.pt"))["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_autocast_on_cpu_trains_with_float32_losses(tmp_path, teacher_ckpt):
    run(tmp_path, "--method", "gdd", "--teacher", "deeplabv3_r18", "--teacher-ckpt", teacher_ckpt, "--iters", "1",
        "--amp")
    first = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert np.isfinite(first["loss_gdd_c5"]) and np.isfinite(first["loss_seg"])


def test_skd_all_three_terms_with_discriminator_step(tmp_path):
    # the discriminator needs logit maps of at least 64x64, i.e. 512x512 inputs
    flags = ["--task", "seg", "--out", str(tmp_path / "t"), "--set", "synthetic_size=(512, 512)", "--crop", "512",
             "512", "--set", "synthetic_train=2", "--set", "synthetic_val=1", "--batch-size", "2", "--quiet",
             "--set", "scales=(1.0, 1.0)"]
    train.main([*flags, "--method", "none", "--student", "pspnet_r18", "--iters", "1"])
    flags[3] = str(tmp_path / "s")
    train.main([*flags, "--method", "skd", "--set", "method_options={}", "--teacher", "pspnet_r18", "--teacher-ckpt",
                str(tmp_path / "t" / "last.pt"), "--iters", "2", "--ckpt-every", "1"])
    first = json.loads((tmp_path / "s" / "log.jsonl").read_text().splitlines()[0])
    for key in ("loss_skd_pi", "loss_skd_pa", "loss_skd_ho", "loss_skd_d"):
        assert np.isfinite(first[key])
    ckpt = load_checkpoint(str(tmp_path / "s" / "last.pt"))
    assert ckpt["extra_optimizer"]["state"], "the discriminator optimizer state is checkpointed"
    assert any(k.startswith("discriminator.") for k in ckpt["distiller"])


def test_resume_after_interruption_ends_with_identical_weights(tmp_path, monkeypatch):
    flags = ["--method", "none", "--iters", "4", "--ckpt-every", "2", "--seed", "3"]
    run(tmp_path / "straight", *flags)

    # killed in iteration 4 (0-based 3): the log holds iterations 1-3, the checkpoint iteration 2
    train_crashing_in_step(monkeypatch, 3, ["--task", "seg", "--out", str(tmp_path / "interrupted"), *TINY, *flags])
    assert load_checkpoint(str(tmp_path / "interrupted" / "last.pt"))["iteration"] == 2
    assert logged_iterations(tmp_path / "interrupted") == [1, 2, 3]
    run(tmp_path / "interrupted", *flags, "--resume")
    straight = load_checkpoint(str(tmp_path / "straight" / "last.pt"))["model"]
    resumed = load_checkpoint(str(tmp_path / "interrupted" / "last.pt"))["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # the replayed iteration 3 is logged once: one clean history, as the uninterrupted run's
    assert logged_iterations(tmp_path / "interrupted") == logged_iterations(tmp_path / "straight") == [1, 2, 3, 4]


def logged_iterations(folder):
    return [record["iteration"] for record in map(json.loads, (folder / "log.jsonl").read_text().splitlines())
            if "eval" not in record]


def test_a_folder_holding_a_run_is_resumed_or_overwritten_never_reused_silently(tmp_path, capsys):
    run(tmp_path, "--method", "none", "--iters", "2")
    first = (tmp_path / "last.pt").read_bytes()
    assert train.run(["--task", "seg", "--out", str(tmp_path), *TINY, "--method", "none", "--iters", "2"]) == 2
    assert "holds a run" in capsys.readouterr().err and (tmp_path / "last.pt").read_bytes() == first
    run(tmp_path, "--method", "none", "--iters", "3", "--overwrite")
    assert logged_iterations(tmp_path) == [1, 2, 3], "the overwritten run's log is gone"
    assert load_checkpoint(str(tmp_path / "last.pt"))["iteration"] == 3


def test_synthetic_teachers_are_cached_once_per_teacher_recipe(tmp_path, monkeypatch, capsys):
    tiny_teacher = dataclasses.replace(PRESETS["synthetic_seg_teacher"], iters=2, synthetic_size=(64, 64),
                                       synthetic_train=8, synthetic_val=3, crop=(64, 64), batch_size=2)
    monkeypatch.setitem(PRESETS, "synthetic_seg_teacher", tiny_teacher)
    for method in ("kd", "dist"):
        run(tmp_path / method, "--method", method, "--iters", "1")
    said = capsys.readouterr().out
    cached = list((tmp_path / "teachers").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("synthetic_seg_teacher-")
    assert said.count("is trained first: 2 iterations") == 1 and f"teacher: reusing {cached[0]}" in said
    # another teacher recipe is another teacher
    monkeypatch.setitem(PRESETS, "synthetic_seg_teacher", dataclasses.replace(tiny_teacher, iters=3))
    run(tmp_path / "gdd", "--method", "gdd", "--iters", "1")
    assert len(list((tmp_path / "teachers").iterdir())) == 2


def test_every_checkpoint_records_its_format_version_and_a_cached_teacher_of_another_is_refused(
        tmp_path, monkeypatch, capsys):
    tiny_teacher = dataclasses.replace(PRESETS["synthetic_seg_teacher"], iters=2, synthetic_size=(64, 64),
                                       synthetic_train=8, synthetic_val=3, crop=(64, 64), batch_size=2)
    monkeypatch.setitem(PRESETS, "synthetic_seg_teacher", tiny_teacher)
    run(tmp_path / "kd", "--method", "kd", "--iters", "1", "--keep-best", "--eval-every", "1")
    (teacher,) = (tmp_path / "teachers").iterdir()
    written = [teacher / "last.pt", tmp_path / "kd" / "last.pt", tmp_path / "kd" / "best.pt"]
    assert [torch.load(path, weights_only=False)["format_version"] for path in written] == [1, 1, 1]
    assert convert.CHECKPOINT_FORMAT_VERSION == 1
    assert set(evaluate.main(["--ckpt", str(tmp_path / "kd" / "best.pt"), "--quiet"])) == {"mIoU", "IoU", "aAcc"}
    ckpt = torch.load(teacher / "last.pt", weights_only=False)
    del ckpt["format_version"]
    torch.save(ckpt, teacher / "last.pt")
    capsys.readouterr()
    assert train.run(["--task", "seg", "--out", str(tmp_path / "dist"), *TINY, "--method", "dist", "--iters", "1"]) == 2
    assert capsys.readouterr().err == (f"error: cached teacher {teacher / 'last.pt'}: checkpoint format 0 (written "
                                       "before format versions), this kd_ref reads format 1\n")
    assert not (tmp_path / "dist").exists()


def test_sigterm_checkpoints_the_current_iteration_and_says_how_to_resume(tmp_path):
    args = ["train.py", "--task", "seg", "--method", "none", "--out", str(tmp_path), *TINY, "--iters", "200",
            "--ckpt-every", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM
    assert "SIGTERM" in stderr and "--resume" in stderr
    stopped_at = load_checkpoint(str(tmp_path / "last.pt"))["iteration"]
    assert 1 <= stopped_at < 200
    logged = [json.loads(line)["iteration"] for line in log.read_text().splitlines()]
    assert logged[-1] == stopped_at, "the checkpoint holds the last finished iteration"


def test_cityscapes_tree_trains_and_evaluates(tmp_path):
    root = tmp_path / "export"
    export.main(["--format", "cityscapes", str(root), "--num-train", "2", "--num-val", "1", "--size", "64", "64"])
    metrics = train.main(["--task", "seg", "--data", "cityscapes", "--data-root", str(root), "--out",
                          str(tmp_path / "run"), "--iters", "1", "--batch-size", "2", "--crop", "64", "64", "--pretrained", "none",
                          "--quiet"])
    assert len(metrics["IoU"]) == 19


def test_torchrun_two_process_gloo_ddp(tmp_path):
    torchrun = shutil.which("torchrun") or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29517", "train.py", "--task", "seg",
                             "--method", "none", "--out", str(tmp_path), *TINY, "--batch-size", "4", "--iters", "2",
                             "--set", "gpus=1"],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # a recipe whose reference ran one process says, once, what two processes change
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: ")]
    assert notes == ["note: 2 process(es) where the reference ran 1 (total batch 4: 2 per process instead of 4); "
                     "per-process terms this changes: none known besides the batch per process"]
    assert (tmp_path / "metrics.json").exists()
    assert load_checkpoint(str(tmp_path / "last.pt"))["iteration"] == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun_node(node_rank: int, port: int, argv: list, cwd=ROOT) -> subprocess.Popen:
    """One node of a 2-node torchrun launch on this machine (one process per node, gloo)."""
    torchrun = shutil.which("torchrun") or "torchrun"
    return subprocess.Popen([torchrun, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node_rank}",
                             "--master_addr=127.0.0.1", f"--master_port={port}", os.path.join(ROOT, "train.py"),
                             *argv], cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(nodes: list, timeout: float) -> list:
    """``(stdout, stderr)`` of every node; a node still running after ``timeout`` seconds fails the test with
    every node's output, and no node is left running."""
    deadline = time.time() + timeout
    try:
        return [node.communicate(timeout=max(1.0, deadline - time.time())) for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            os.killpg(node.pid, signal.SIGKILL)  # the agent and its workers
        tails = [f"node {rank} (exit {node.wait()}):\n" + "".join(node.communicate())[-3000:]
                 for rank, node in enumerate(nodes)]
        pytest.fail(f"a node still ran after {timeout} s\n" + "\n".join(tails))


def _cache_untrained_teacher(argv: list, out) -> None:
    """The cached synthetic teacher of ``argv``'s run as an earlier run leaves it (untrained weights here)."""
    recipe = train.build_recipe(train.parse_args(argv))[1]
    teacher = Path(train.teacher_folder(recipe, str(out)))
    teacher.mkdir(parents=True)
    torch.save({"model": tasks.TASKS["cls"].build_model(recipe, recipe.teacher).state_dict()}, teacher / "last.pt")
    (teacher / "metrics.json").write_text("{}")


def _logged_iterations(out) -> list:
    return [json.loads(line)["iteration"] for line in (out / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_two_nodes_reuse_the_teacher_stop_together_on_one_nodes_sigterm_and_resume(tmp_path):
    out = tmp_path / "run"
    argv = ["--task", "cls", "--method", "kd", "--out", str(out), "--set", "synthetic_train=16", "--set",
            "synthetic_val=4", "--batch-size", "4", "--iters", "100", "--ckpt-every", "1000", "--quiet"]
    _cache_untrained_teacher(argv, out)  # in the folder both nodes share
    port = _free_port()
    nodes = [_torchrun_node(rank, port, argv) for rank in range(2)]
    deadline = time.time() + 120
    while not ((out / "log.jsonl").exists() and _logged_iterations(out)) and time.time() < deadline:
        time.sleep(0.05)  # the signal must land before the 100 short iterations are done
    nodes[1].send_signal(signal.SIGTERM)  # one node preempted: both stop after the same iteration
    outputs = _finish(nodes, timeout=240)
    assert all(node.returncode != 0 for node in nodes), [o[1][-2000:] for o in outputs]
    assert "SIGTERM received" in outputs[0][1], outputs[0][1][-3000:]
    assert "teacher: reusing" in outputs[0][0], "rank 0 found the cached teacher and every rank loaded it"
    stopped_at = load_checkpoint(str(out / "last.pt"))["iteration"]
    assert 1 <= stopped_at < 100 and _logged_iterations(out)[-1] == stopped_at
    port = _free_port()
    nodes = [_torchrun_node(rank, port, [*argv, "--resume"]) for rank in range(2)]
    outputs = _finish(nodes, timeout=240)
    assert all(node.returncode == 0 for node in nodes), [o[1][-3000:] for o in outputs]
    assert load_checkpoint(str(out / "last.pt"))["iteration"] == 100
    assert _logged_iterations(out) == list(range(1, 101)) and (out / "metrics.json").exists()


def test_two_nodes_that_do_not_share_the_output_folder_stop_together_naming_the_rank(tmp_path):
    # a relative --out in two working folders: each node sees its own folder, and only node 0 the cached teacher
    # (before, node 1 trained a teacher while node 0 trained the student: DDP found different models)
    argv = ["--task", "cls", "--method", "kd", "--out", "run", "--set", "synthetic_train=16", "--set",
            "synthetic_val=4", "--batch-size", "4", "--iters", "2", "--quiet"]
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir()
    _cache_untrained_teacher(argv, tmp_path / "node0" / "run")
    port = _free_port()
    nodes = [_torchrun_node(rank, port, argv, cwd=tmp_path / f"node{rank}") for rank in range(2)]
    errors = [stderr for _, stderr in _finish(nodes, timeout=180)]
    for error in errors:
        assert "error: rank 1: teacher checkpoint" in error and "shared by the nodes" in error, error[-2000:]


def test_student_init_starts_from_a_trained_checkpoint_or_state_dict(tmp_path, teacher_ckpt):
    trained = torch.load(teacher_ckpt, weights_only=False)["model"]
    plain = tmp_path / "weights.pt"
    torch.save(trained, plain)
    for source in (teacher_ckpt, str(plain)):
        out = tmp_path / os.path.basename(source).replace(".pt", "")
        # lr 0: the step changes no parameter, so the result shows where the student started
        run(out, "--method", "none", "--student", "deeplabv3_r18", "--student-init", source, "--iters", "1",
            "--lr", "0")
        started = torch.load(out / "last.pt", weights_only=False)
        assert started["recipe"]["student_init"] == source
        student = segmentors.build_segmentor("deeplabv3_r18", num_classes=started["recipe"]["num_classes"])
        for name, _ in student.named_parameters():
            torch.testing.assert_close(started["model"][name], trained[name], rtol=0, atol=0)
    # --resume restores the run's own weights and never reads the starting checkpoint again
    plain.unlink()
    run(out, "--method", "none", "--student", "deeplabv3_r18", "--student-init", str(plain), "--iters", "1",
        "--lr", "0", "--resume")


def test_student_init_of_another_architecture_names_both_models(tmp_path, teacher_ckpt):
    with pytest.raises(ValueError, match=r"student_init .*: a kd_ref segmentor file holding deeplabv3 on a "
                                         r"ResNet-18 .*; the recipe expects pspnet on a ResNet-18"):
        run(tmp_path, "--method", "none", "--student", "pspnet_r18", "--student-init", teacher_ckpt, "--iters", "1")
    with pytest.raises(FileNotFoundError, match=r"--student-init .*absent.pt: no such file \(the preset starts the student"):
        run(tmp_path, "--method", "none", "--student-init", str(tmp_path / "absent.pt"), "--iters", "1")


def test_gkd_presets_start_from_the_trained_baseline_detector():
    for arch in ("faster_rcnn", "retinanet"):
        recipe = PRESETS[f"gkd_{arch}_r50_fpn_2x_coco"]
        assert recipe.student_init == f"runs/{arch}_r50_fpn_2x_coco/last.pt"
        assert PRESETS[f"gkd_{arch}_r50_fpn_2x_coco_baseline"].student_init is None


def test_print_recipe_prints_every_preset_as_json_without_reading_data(capsys, tmp_path):
    for name, recipe in PRESETS.items():
        assert train.run(["--preset", name, "--print-recipe", "--data-root", str(tmp_path / "absent")]) == 0, name
        captured = capsys.readouterr()
        printed = json.loads(captured.out)
        assert printed == json.loads(json.dumps(dataclasses.asdict(recipe))), name
        # the launch goes to stderr, so that stdout stays one JSON object
        assert captured.err == f"reference launch: {reference_launch(name, recipe)}\n", name
    assert printed["source"] is not None and not (tmp_path / "absent").exists()
    train.run(["--preset", "gkd_faster_rcnn_r50_fpn_voc0712", "--print-recipe"])
    voc = json.loads(capsys.readouterr().out)
    assert (voc["epochs"], voc["lr_steps"], voc["dataset_repeat"], voc["iters"]) == (4, [3], 3, None)


def test_explicit_fields_name_every_recipe_field_the_command_line_sets():
    args = train.parse_args(["--task", "det", "--lr", "0.1", "--set", "group_by_aspect=True", "--pretrained", "none",
                             "--keep-best"])
    assert train.explicit_fields(args) == {"lr", "group_by_aspect", "pretrained", "keep_best"}
    sokd = train.parse_args(["--task", "cls", "--method", "sokd", "--sokd-base", "kd"])
    assert train.explicit_fields(sokd) == {"method", "method_options"}
    assert train.explicit_fields(train.parse_args([])) == frozenset()
