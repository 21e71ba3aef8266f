"""--task depth end to end (synthetic scenes and an exported NYUDv2 tree: train, resume, evaluate) and FCOS
trained through --task det with SKD, DIST and GDD."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import evaluate
import train
from kd_ref import datasets, export, methods
from train_helpers import train_crashing_in_step
from kd_ref.presets import PRESETS
from kd_ref.runtime import load_checkpoint

TINY_DEPTH = ["--task", "depth", "--set", "synthetic_size=(64, 64)", "--set", "crop=(64, 64)",
              "--set", "synthetic_train=4", "--set", "synthetic_val=2", "--batch-size", "2", "--quiet"]
TINY_FCOS = ["--task", "det", "--set", "synthetic_size=(64, 64)", "--set", "image_scale=(64, 64)",
             "--set", "synthetic_train=4", "--set", "synthetic_val=2", "--batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def depth_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("depth_teacher")
    train.main([*TINY_DEPTH, "--method", "none", "--student", "depth_r18", "--iters", "1", "--out", str(out)])
    return str(out / "last.pt")


@pytest.mark.parametrize("method", ["none", "skd"])
def test_depth_trains_resumes_exactly_and_evaluates(tmp_path, monkeypatch, depth_teacher, method):
    flags = [*TINY_DEPTH, "--method", method, "--iters", "3", "--ckpt-every", "1"]
    if method == "skd":
        flags += ["--teacher", "depth_r18", "--teacher-ckpt", depth_teacher]
    metrics = train.main([*flags, "--out", str(tmp_path / "straight")])
    assert set(metrics) == {"rel", "sq_rel", "rms", "log10", "delta1", "delta2", "delta3", "pixels"}
    steps = [json.loads(line) for line in (tmp_path / "straight/log.jsonl").read_text().splitlines()]
    expected = {"loss_wce", "loss_vn"} | ({"loss_skd_pi", "loss_skd_pa"} if method == "skd" else set())
    assert expected <= set(steps[0]) and all(np.isfinite(step[key]) for step in steps[:3] for key in expected)

    train_crashing_in_step(monkeypatch, 2, [*flags, "--out", str(tmp_path / "resumed")])
    train.main([*flags, "--out", str(tmp_path / "resumed"), "--resume"])
    straight = load_checkpoint(str(tmp_path / "straight/last.pt"))
    resumed = load_checkpoint(str(tmp_path / "resumed/last.pt"))
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])

    scores = evaluate.main(["--task", "depth", "--ckpt", str(tmp_path / "straight/last.pt"), "--quiet"])
    written = json.loads((tmp_path / "straight/eval_synthetic.json").read_text())
    assert {"rel", "log10", "rms", "delta1", "delta2", "delta3"} <= set(written)
    assert scores["rel"] == pytest.approx(metrics["rel"])


def test_nyu_tree_trains_evaluates_and_saves_predictions(tmp_path):
    tree = tmp_path / "nyu"
    command = export.export("nyu", str(tree), num_train=2, num_val=2, size=(64, 96))
    assert "--task depth --data nyu" in command
    assert (tree / "train.txt").read_text().split() == ["train_000000", "train_000001"]
    run = tmp_path / "run"
    train.main(["--task", "depth", "--data", "nyu", "--data-root", str(tree), "--set", "crop=(64, 64)",
                "--set", "epochs=1", "--batch-size", "2", "--student", "depth_r18", "--pretrained", "none",
                "--set", "method_options={}", "--method", "none", "--out", str(run), "--quiet"])
    scores = evaluate.main(["--ckpt", str(run / "last.pt"), "--data-root", str(tree), "--save-pred",
                            str(tmp_path / "pred"), "--quiet"])
    assert scores["pixels"] > 0.9 * 2 * 64 * 96
    saved = datasets.read_depth_png(str(tmp_path / "pred" / "val_000000.png"))
    assert saved.shape == (64, 96) and saved.max() > 0


def test_nyu_tree_without_split_list_is_one_line_error(tmp_path, capsys):
    (tmp_path / "rgb").mkdir()
    status = train.run(["--task", "depth", "--data", "nyu", "--data-root", str(tmp_path), "--set", "epochs=1",
                        "--out", str(tmp_path / "run"), "--pretrained", "none", "--method", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "train.txt" in err[0] and err[0].startswith("error: ")


def test_depth_recipe_errors_name_the_field():
    recipe = PRESETS["synthetic_depth_none"]
    with pytest.raises(ValueError, match="--student pspnet_r18: --task depth supports"):
        methods.check_recipe(dataclasses.replace(recipe, student="pspnet_r18"))
    with pytest.raises(ValueError, match=r"model_options \['bins'\]"):
        methods.check_recipe(dataclasses.replace(recipe, model_options={"bins": 3}))
    with pytest.raises(ValueError, match="skd on detection distils FCOS"):
        methods.check_recipe(dataclasses.replace(PRESETS["synthetic_det_fcos_skd"],
                                                         teacher="retinanet_r18"))
    with pytest.raises(ValueError, match="gkd: fcos_mv2_c64 is an FCOS"):
        methods.check_recipe(dataclasses.replace(PRESETS["synthetic_det_fcos_none"], method="gkd"))


@pytest.fixture(scope="module")
def fcos_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("fcos_teacher")
    train.main([*TINY_FCOS, "--method", "none", "--student", "fcos_mv2_c64", "--iters", "1", "--out", str(out)])
    return str(out / "last.pt")


@pytest.mark.parametrize("method,terms", [("skd", {"loss_skd_pi", "loss_skd_pa"}), ("dist", None), ("gdd", None)])
def test_fcos_student_distils_through_task_det(tmp_path, fcos_teacher, method, terms):
    metrics = train.main([*TINY_FCOS, "--method", method, "--student", "fcos_mv2_c64", "--teacher", "fcos_mv2_c64",
                          "--teacher-ckpt", fcos_teacher, "--iters", "2", "--out", str(tmp_path)])
    assert "mAP" in metrics
    step = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    distill = {key for key in step if key.startswith("loss_") and key not in ("loss_cls", "loss_reg", "loss_centerness")}
    assert {"loss_cls", "loss_reg", "loss_centerness"} <= set(step) and distill
    if terms is not None:
        assert terms <= distill
    assert all(np.isfinite(step[key]) for key in distill)


def test_nyu_row_has_vnls_loss_weight_weight_decay_and_square_crop():
    # YvanYin/VNL_Monocular_Depth_Prediction lib/core/config.py:73 (DIFF_LOSS_WEIGHT 6),
    # lib/models/metric_depth_model.py:98 (weight decay 5e-4), lib/configs/*nyudv2*.yaml CROP_SIZE (385, 385)
    recipe = PRESETS["skd_depth_mv2_nyu"]
    assert recipe.model_options["lambda_vn"] == 6.0 and recipe.weight_decay == 5e-4 and recipe.crop == (385, 385)
    with pytest.raises(ValueError, match=r"^--crop 385 512: NYUDv2 runs VNL's square crops \(H = W\)$"):
        methods.check_recipe(dataclasses.replace(recipe, crop=(385, 512)))
