"""Bad-input sweep: train.py and evaluate.py, given broken data, checkpoints or flags, must stop with one
line ``error: ...`` that names the culprit, exit non-zero, and leave every existing checkpoint as it was.

The tools run in-process through their ``run(argv)`` (the command-line entry point: exit status and the
stderr line); one case goes through a real ``python train.py`` process for the exit code itself.
"""
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train
from kd_ref import convert, export, segmentors
from kd_ref.tasks import SYNTHETIC_NUM_IMAGE_CLASSES as NUM_IMAGE_CLASSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", "synthetic_size=(64, 64)", "--crop", "64", "64", "--set", "synthetic_train=8",
        "--set", "synthetic_val=3", "--batch-size", "2", "--quiet"]


def cityscapes_tree(root, image_size=(32, 64), label_size=None):
    """Two train and two val images of one city in the Cityscapes layout (label id 7 = road)."""
    for split in ("train", "val"):
        images = root / "leftImg8bit" / split / "aachen"
        labels = root / "gtFine" / split / "aachen"
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((*image_size, 3), np.uint8)).save(images / f"aachen_{i:06d}_000019_leftImg8bit.png")
            Image.fromarray(np.full(label_size or image_size, 7, np.uint8)).save(
                labels / f"aachen_{i:06d}_000019_gtFine_labelIds.png")
    return root


def truncate(path, keep=40):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (``run/last.pt``), used as checkpoint, teacher and resume source."""
    root = tmp_path_factory.mktemp("bad_inputs")
    assert train.run(["--task", "seg", "--method", "none", "--student", "deeplabv3_r18", "--out", str(root / "run"),
                      *TINY, "--iters", "1"]) == 0
    return root / "run" / "last.pt"


def copy_checkpoint(trained, folder):
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained, folder / "last.pt")
    return folder


def cityscapes_train(root, *flags):
    return (train, ["--task", "seg", "--data", "cityscapes", "--data-root", str(root), "--iters", "1",
                    "--batch-size", "2", "--crop", "32", "32", "--pretrained", "none", "--quiet", *flags])


def synthetic_train(out, *flags):
    return (train, ["--task", "seg", "--out", str(out), *TINY, "--iters", "1", *flags])


def exported(tmp_path, fmt, size=(32, 32)):
    root = tmp_path / fmt
    export.main(["--format", fmt, str(root), "--num-train", "2", "--num-val", "1",
                 "--size", str(size[0]), str(size[1])])
    return root


def cifar100_with_label_out_of_range(tmp_path):
    """A CIFAR-100 export whose first training label equals the number of classes."""
    root = exported(tmp_path, "cifar100")
    train_file = root / "cifar-100-python" / "train"
    batch = pickle.loads(train_file.read_bytes(), encoding="bytes")
    batch[b"fine_labels"][0] = NUM_IMAGE_CLASSES
    train_file.write_bytes(pickle.dumps(batch))
    return root


def imagefolder_with_truncated_jpegs(tmp_path):
    root = exported(tmp_path, "imagefolder", size=(64, 64))
    for path in (root / "train").rglob("*.JPEG"):
        truncate(path, keep=200)
    return root


def truncated_copy(source, path):
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    return path


def corrupted_in_place(folder):
    truncate(folder / "last.pt", keep=(folder / "last.pt").stat().st_size // 2)
    return folder


def saved(obj, path):
    torch.save(obj, path)
    return path


def with_recipe(source, path, **fields):
    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    ckpt["recipe"].update(fields)
    return saved(ckpt, path)


def with_format(source, path, version):
    """``source`` saved with format version ``version`` (None: without one, as before format versions)."""
    ckpt = torch.load(source, map_location="cpu", weights_only=False)
    ckpt.pop("format_version", None)
    return saved(ckpt if version is None else {**ckpt, "format_version": version}, path)


def format_cases(version):
    """Every reader of a kd_ref checkpoint refuses one of another format ``version`` (None: none) with one
    line naming the file and that version, before any work."""
    said = ("checkpoint format 2, this kd_ref reads format 1" if version is not None else
            "checkpoint format 0 (written before format versions), this kd_ref reads format 1")
    name = f"format_{version or 'none'}"

    def file(c):
        return with_format(c.trained, c.tmp / f"{name}.pt", version)

    def resume(c):
        out = c.tmp / "out"
        out.mkdir()
        with_format(c.trained, out / "last.pt", version)
        return (*synthetic_train(out, "--resume"), f"--resume {out / 'last.pt'}: {said}")

    return {
        f"resume_from_a_checkpoint_of_{name}": resume,
        f"teacher_checkpoint_of_{name}": lambda c: (
            *synthetic_train(c.tmp / "out", "--method", "kd", "--teacher", "deeplabv3_r18", "--teacher-ckpt",
                             str(file(c))), f"--teacher-ckpt {c.tmp / f'{name}.pt'}: {said}"),
        f"student_init_of_{name}": lambda c: (
            *synthetic_train(c.tmp / "out", "--student", "deeplabv3_r18", "--student-init", str(file(c))),
            f"--student-init {c.tmp / f'{name}.pt'}: {said}"),
        f"checkpoint_to_evaluate_of_{name}": lambda c: (
            evaluate, ["--ckpt", str(file(c)), "--quiet"], f"--ckpt {c.tmp / f'{name}.pt'}: {said}"),
        f"checkpoint_to_convert_of_{name}": lambda c: (
            SimpleNamespace(run=convert.main), ["--task", "seg", "--arch", "deeplabv3_r18", str(file(c)),
                                                str(c.tmp / "converted.pt")], f"SRC {c.tmp / f'{name}.pt'}: {said}"),
    }


def first(root, pattern):
    return sorted(root.rglob(pattern))[0]


def nan_losses(monkeypatch):
    real_losses = segmentors.Segmentor.losses

    def losses(self, out, targets):
        values = real_losses(self, out, targets)
        return {**values, "loss_seg": values["loss_seg"] * float("nan")}
    monkeypatch.setattr(segmentors.Segmentor, "losses", losses)


def cityscapes_case(expected, *flags, edit=lambda root: None, **tree):
    """A Cityscapes tree (edited by ``edit``) trained, with --overwrite, into a folder that already holds a
    checkpoint: the refused run must leave it as it was."""
    def setup(c):
        root = cityscapes_tree(c.tmp / "cs", **tree)
        edit(root)
        return (*cityscapes_train(root, "--out", str(copy_checkpoint(c.trained, c.tmp / "out")), "--overwrite", *flags),
                expected)
    return setup


def relabelled(label_id):
    """Edit of a Cityscapes tree: every label pixel becomes ``label_id``."""
    def edit(root):
        for path in (root / "gtFine").rglob("*.png"):
            Image.fromarray(np.full_like(np.asarray(Image.open(path)), label_id)).save(path)
    return edit


def evaluate_on_cityscapes(c):
    root = cityscapes_tree(c.tmp / "cs")
    relabelled(26)(root)  # car: train id 13, beyond the 4 classes of the synthetic model
    return (evaluate, ["--ckpt", str(c.trained), "--data", "cityscapes", "--data-root", str(root), "--quiet"],
            "model predicts 4 classes")


def cls_case(data, make_root, expected):
    def setup(c):
        return (train, ["--task", "cls", "--data", data, "--data-root", str(make_root(c.tmp)), "--student", "resnet8",
                        "--set", f"num_classes={NUM_IMAGE_CLASSES}", "--crop", "32", "32", "--set", "epochs=1",
                        "--batch-size", "2", "--out", str(c.tmp / "out"), "--quiet"], expected)
    return setup


def nan_in_the_loss(c):
    nan_losses(c.monkeypatch)
    return (*synthetic_train(copy_checkpoint(c.trained, c.tmp / "out"), "--method", "none", "--overwrite"),
            "non-finite loss at iteration 0")


# name -> setup(c) -> (tool, argv, text the error line must contain); c has tmp, trained, monkeypatch
CASES = {
    "data_root_not_given": lambda c: (train, ["--task", "seg", "--data", "cityscapes", "--pretrained", "none",
                                              "--quiet"], "--data-root"),
    "pretrained_weights_missing": lambda c: (train, ["--task", "seg", "--data", "cityscapes", "--data-root",
                                                     str(c.tmp), "--out", str(c.tmp / "run"), "--quiet"],
                                             "resnet18-imagenet.pth (CIRKD deep-stem ResNetV1b layout"),
    "data_root_missing": lambda c: (*cityscapes_train(c.tmp / "does-not-exist"), "does-not-exist"),
    "data_root_without_layout": lambda c: (*cityscapes_train(c.tmp), "leftImg8bit"),
    "empty_val_split": cityscapes_case(
        "split 'val'", edit=lambda root: [p.unlink() for p in (root / "leftImg8bit" / "val").rglob("*.png")]),
    "label_size_differs_from_image": cityscapes_case("gtFine", label_size=(16, 64)),
    "truncated_png_image": cityscapes_case(
        "_leftImg8bit.png", edit=lambda root: truncate(first(root / "leftImg8bit" / "train", "*.png"))),
    "truncated_png_label": cityscapes_case(
        "_gtFine_labelIds.png", edit=lambda root: truncate(first(root / "gtFine" / "train", "*.png"))),
    "truncated_jpeg": cls_case("imagenet", imagefolder_with_truncated_jpegs, ".JPEG"),
    "label_out_of_range": cls_case("cifar100", cifar100_with_label_out_of_range, "fine labels"),
    "corrupted_teacher_checkpoint": lambda c: (
        *synthetic_train(c.tmp / "out", "--method", "kd", "--teacher", "deeplabv3_r18", "--teacher-ckpt",
                         str(truncated_copy(c.trained, c.tmp / "teacher.pt"))), "cannot be read"),
    "corrupted_checkpoint_on_resume": lambda c: (
        *synthetic_train(corrupted_in_place(copy_checkpoint(c.trained, c.tmp / "out")), "--resume"),
        "cannot be read"),
    "corrupted_checkpoint_to_evaluate": lambda c: (
        evaluate, ["--ckpt", str(truncated_copy(c.trained, c.tmp / "broken.pt")), "--quiet"], "cannot be read"),
    "not_a_checkpoint": lambda c: (
        evaluate, ["--ckpt", str(saved(torch.zeros(3), c.tmp / "tensor.pt")), "--quiet"],
        "expected weights (a state dict of tensors"),
    "teacher_checkpoint_of_another_architecture": lambda c: (
        *synthetic_train(c.tmp / "out", "--method", "kd", "--teacher", "pspnet_r18", "--teacher-ckpt",
                         str(c.trained)), "; the recipe expects pspnet on a ResNet-18"),
    "checkpoint_weights_of_another_architecture": lambda c: (
        evaluate, ["--ckpt", str(with_recipe(c.trained, c.tmp / "relabelled.pt", student="pspnet_r18")), "--quiet"],
        "holding deeplabv3 on a ResNet-18"),
    "teacher_checkpoint_in_an_unknown_layout": lambda c: (
        *synthetic_train(c.tmp / "out", "--method", "kd", "--teacher", "pspnet_r18", "--teacher-ckpt",
                         str(saved({"encoder.conv.weight": torch.zeros(1)}, c.tmp / "other.pth"))),
        "a key layout kd_ref does not know"),
    "teacher_checkpoint_of_another_class_count": lambda c: (
        *synthetic_train(c.tmp / "out", "--method", "kd", "--teacher", "pspnet_r18", "--teacher-ckpt",
                         str(saved(segmentors.build_segmentor("pspnet_r18", 19).state_dict(), c.tmp / "r18.pth"))),
        "19 classes; the recipe expects pspnet on a ResNet-18 (deep stem 64-64-128), 4 classes"),
    "resume_without_checkpoint": lambda c: (*synthetic_train(c.tmp / "empty", "--resume"), "no such file"),
    "resume_with_another_recipe": lambda c: (
        *synthetic_train(copy_checkpoint(c.trained, c.tmp / "out"), "--resume"), "recipe differs"),
    "unknown_method": lambda c: (*synthetic_train(c.tmp, "--method", "nonsense"), "--method: invalid choice"),
    "method_of_another_task": lambda c: (*synthetic_train(c.tmp, "--method", "gkd"), "methods for --task seg"),
    "unknown_student": lambda c: (*synthetic_train(c.tmp, "--student", "unet_r18"), "--student unet_r18"),
    "task_contradicts_preset": lambda c: (
        *synthetic_train(c.tmp, "--task", "det", "--preset", "synthetic_seg_none"), "contradicts"),
    "sokd_base_without_sokd": lambda c: (*synthetic_train(c.tmp, "--method", "kd", "--sokd-base", "kd"),
                                         "--sokd-base"),
    "batch_size_zero": lambda c: (*synthetic_train(c.tmp, "--batch-size", "0"), "--batch-size: expected a positive"),
    "iters_zero": lambda c: (*synthetic_train(c.tmp, "--iters", "0"), "--iters: expected a positive integer, got 0"),
    "iters_negative": lambda c: (*synthetic_train(c.tmp, "--iters", "-5"), "--iters: expected a positive integer"),
    "crop_zero": lambda c: (*synthetic_train(c.tmp, "--crop", "0", "0"), "--crop: expected a positive integer"),
    "crop_below_the_stride": lambda c: (*synthetic_train(c.tmp, "--crop", "7", "7"), "--crop 7 7: expected H W of at "
                                                                                      "least 32"),
    "negative_lr": lambda c: (*synthetic_train(c.tmp, "--lr", "-1"), "--lr: expected a non-negative number"),
    "data_root_with_synthetic_data": lambda c: (*synthetic_train(c.tmp / "out", "--data-root", str(c.tmp)),
                                                "--data synthetic is built in"),
    "crop_on_detection": lambda c: (train, ["--task", "det", "--crop", "64", "64", "--out", str(c.tmp / "out"),
                                            "--quiet"], "--task det resizes whole images to image_scale"),
    "kd_on_a_one_stage_detector": lambda c: (
        train, ["--task", "det", "--method", "kd", "--student", "retinanet_r18", "--teacher", "retinanet_r18",
                "--out", str(c.tmp / "out"), "--quiet"], "one-stage detector"),
    "out_folder_holds_a_run": lambda c: (*synthetic_train(copy_checkpoint(c.trained, c.tmp / "out")),
                                         "holds a run (last.pt); pass --resume to continue it or --overwrite"),
    "resume_and_overwrite": lambda c: (*synthetic_train(c.tmp / "out", "--resume", "--overwrite"),
                                       "--resume and --overwrite"),
    "evaluate_on_data_of_more_classes": evaluate_on_cityscapes,
    "more_classes_than_synthetic_shapes": lambda c: (*synthetic_train(c.tmp, "--set", "num_classes=12"),
                                                     "num_classes 12: synthetic scenes have"),
    "teacher_checkpoint_not_given_on_real_data": cityscapes_case("--teacher-ckpt", "--method", "kd"),
    "evaluate_with_another_task": lambda c: (
        evaluate, ["--ckpt", str(c.trained), "--task", "det", "--quiet"], "holds a seg model"),
    "nan_in_the_loss": nan_in_the_loss,
    "iters_on_an_epoch_preset": lambda c: (train, ["--preset", "retinanet_r50_fpn_2x_coco", "--iters", "5", "--quiet"],
                                           "counts epochs"),
    "unknown_method_option": lambda c: (
        *synthetic_train(c.tmp / "out", "--method", "gdd", "--set", "method_options={'alpah': 20.0}"),
        "method_options of --method gdd on --task seg: unknown option alpah; expected some of alpha, init_student, "
        "tau"),
    "unknown_option_of_the_sokd_search": lambda c: (
        train, ["--task", "cls", "--method", "sokd", "--set", "method_options={'search_options': {'lr_x': 1}}",
                "--out", str(c.tmp / "out"), "--quiet"], "search_options of --method sokd: unknown option lr_x"),
    "negative_synthetic_seed_before_the_teacher_trains": lambda c: (
        *synthetic_train(c.tmp / "out", "--method", "gdd", "--set", "synthetic_seed=-1"), "synthetic_seed -1"),
    "group_by_aspect_on_cropped_inputs": lambda c: (*synthetic_train(c.tmp, "--set", "group_by_aspect=True"),
                                                    "group_by_aspect: --task seg crops its inputs"),
    "keep_best_without_evaluations": lambda c: (*synthetic_train(c.tmp, "--keep-best", "--eval-every", "0"),
                                                "--keep-best"),
}
CASES.update(format_cases(2))
CASES.update(format_cases(None))
if not torch.cuda.is_available():
    CASES["cuda_without_gpu"] = lambda c: (*synthetic_train(c.tmp, "--device", "cuda"), "no CUDA device")


def file_hashes(*folders) -> dict:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_error_line_nonzero_exit_and_writes_nothing(case, tmp_path, trained, capsys,
                                                                          monkeypatch):
    tool, argv, expected = CASES[case](SimpleNamespace(tmp=tmp_path, trained=trained, monkeypatch=monkeypatch))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # where a run without --out writes (runs/<preset>)
    before = file_hashes(tmp_path, trained.parent)
    status = tool.run(argv)
    stderr = capsys.readouterr().err
    assert status != 0
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], stderr[-2000:]
    assert stderr.rstrip().endswith(errors[0]) and "Traceback" not in stderr
    assert file_hashes(tmp_path, trained.parent) == before, "a file was written or changed"
    assert not list((tmp_path / "cwd").iterdir()), "a default output folder (runs/<preset>) was made"


def test_command_line_exits_with_status_2_and_one_error_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "train.py", "--task", "seg", "--data", "cityscapes", "--data-root",
                             str(tmp_path / "does-not-exist"), "--pretrained", "none"], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error:") and "does-not-exist" in result.stderr


def test_missing_pretrained_weights_stop_before_anything_is_written(tmp_path, capsys):
    assert train.run(["--preset", "gdd_pspnet_r18_cityscapes", "--data-root", str(tmp_path),
                      "--out", str(tmp_path / "run"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --pretrained resnet18_v1c.pth: no such file") and "open-mmlab://resnet18_v1c" in error
    assert "--pretrained none" in error and not (tmp_path / "run").exists()
