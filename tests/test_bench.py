import dataclasses
import math

import pytest
import torch

from kd_ref import bench, engine, tasks
from kd_ref.presets import PRESETS
from kd_ref.recipe import Recipe

TINY = {"synthetic_size": (64, 64), "crop": (64, 64), "synthetic_train": 4, "synthetic_val": 2, "batch_size": 2}


def test_effect_trains_teacher_once_and_reports_every_method(tmp_path, capsys):
    results = bench.effect("seg", ["none", "kd"], seeds=[0], iters=1, teacher_iters=1, out=str(tmp_path),
                           overrides=TINY)
    assert set(results) == {"none", "kd", "teacher"}
    assert all(len(values) == 1 and not math.isnan(values[0]) for values in results.values())
    printed = capsys.readouterr().out
    assert "mIoU mean ± std" in printed and "kd" in printed
    # a second call reuses the finished runs instead of training again
    assert bench.effect("seg", ["none", "kd"], [0], 1, 1, str(tmp_path), overrides=TINY) == results


def test_effect_on_detection_reports_map_per_method(tmp_path, capsys):
    tiny_det = {"synthetic_size": (64, 64), "image_scale": (64, 64), "synthetic_train": 4, "synthetic_val": 2,
                "batch_size": 2}
    results = bench.effect("det", ["none", "dist"], seeds=[0], iters=1, teacher_iters=1, out=str(tmp_path),
                           overrides=tiny_det)
    assert set(results) == {"none", "dist", "teacher"}
    assert all(len(values) == 1 and 0.0 <= values[0] <= 100.0 for values in results.values())
    assert "mAP mean ± std" in capsys.readouterr().out



def test_effect_compares_methods_of_one_teacher_and_takes_preset_names():
    assert bench.default_effect_methods("det") == ["dist", "gdd", "gkd", "none"]  # the RetinaNet pair
    assert bench.effect_presets("det", ["synthetic_det_frcnn_none", "kd", "sokd"]) == {
        "none": "synthetic_det_frcnn_none", "kd": "synthetic_det_frcnn_kd", "sokd": "synthetic_det_frcnn_sokd"}
    with pytest.raises(ValueError, match="train against different teachers"):
        bench.effect_presets("det", ["none", "kd"])

def test_cost_rows_relate_every_case_to_the_student_step_and_the_distillation_floor():
    rows = {r.name: r for r in bench.cost_rows({"none": 2.0, "teacher forward": 1.0, "kd": 3.3},
                                               {"none": 2 ** 20, "teacher forward": 2 ** 21, "kd": 3 * 2 ** 20})}
    assert rows["kd"].x_student == pytest.approx(1.65) and rows["kd"].x_floor == pytest.approx(1.1)
    assert rows["kd"].extra_percent == pytest.approx(15.0) and rows["kd"].peak_mb == 3
    assert math.isnan(rows["none"].extra_percent) and rows["teacher forward"].x_student == 0.5


def test_size_overrides_per_task():
    assert bench.size_overrides("seg", (64, 96)) == {"synthetic_size": (64, 96), "crop": (64, 96)}
    assert bench.size_overrides("det", (64, 96))["image_scale"] == (96, 64)
    with pytest.raises(ValueError, match="square"):
        bench.size_overrides("cls", (32, 48))


def test_cost_smoke_prints_a_row_per_case_with_sane_figures(capsys):
    tables = bench.cost(["cls"], ["kd", "sokd"], {"batch_size": 2, "synthetic_size": (32, 32)}, warmup=0, rounds=1)
    rows = tables["cls"]
    assert [r.name for r in rows] == ["none", "teacher forward", "kd", "sokd", "sokd, search over"]
    for row in rows:
        assert all(math.isfinite(v) and v > 0 for v in (row.seconds, row.x_student, row.x_floor, row.peak_mb))
    printed = capsys.readouterr().out
    assert "| case | s/step | x student | x (student + teacher fwd) |" in printed and "| sokd |" in printed


def test_pairwise_smoke_agrees_and_skips_dense_sizes_over_the_budget(capsys):
    budget_gib = 1.5 * bench.dense_pairwise_bytes(1, 64) / 2 ** 30
    rows = bench.pairwise([64, 256], channels=(16, 32), repeats=1, memory_budget_gib=budget_gib)
    assert [r["nodes"] for r in rows] == [64, 256]
    assert rows[0]["loss_rel_diff"] < 1e-5 and rows[0]["grad_rel_diff"] < 1e-4
    assert rows[0]["dense_seconds"] > 0 and rows[1]["gram_seconds"] > 0
    assert rows[1]["dense_skipped"].startswith("skipped: needs")
    assert "| 256 | skipped: needs" in capsys.readouterr().out


def test_cost_times_each_method_against_its_own_pair_and_names_what_it_skips(capsys):
    small = {"batch_size": 1, "synthetic_size": (64, 64), "image_scale": (64, 64)}
    tables = bench.cost(["det"], ["kd"], small, warmup=0, rounds=1)
    assert [r.name for r in tables["det"]] == ["none", "teacher forward"]
    assert [r.name for r in tables["det: faster_rcnn_r18 <- faster_rcnn_r18"]] == ["none", "teacher forward", "kd"]
    forced = {**small, "student": "retinanet_r18", "teacher": "retinanet_r18"}
    assert [r.name for r in bench.cost(["det"], ["kd"], forced, warmup=0, rounds=1)["det"]] == ["none", "teacher forward"]
    assert "skipped kd for retinanet_r18 <- retinanet_r18: --method kd on detection" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- flops
def test_flop_count_of_a_tiny_model_on_fake_tensors_equals_the_hand_count():
    with bench.fake_tensors():
        conv, linear = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4 * 8 * 8, 5)
        images = torch.zeros(2, 3, 8, 8)
        out, forward = bench.counted(lambda: linear(conv(images).flatten(1)))
        _, backward = bench.counted(lambda: out.sum().backward())
    conv_macs = 2 * 8 * 8 * 4 * 3 * 3 * 3          # batch x output pixels x C_out x C_in x k x k
    linear_macs = 2 * 256 * 5
    assert forward == 2 * (conv_macs + linear_macs)
    # conv: weight gradient only (the images need none); linear: weight and input gradients
    assert backward == 2 * (conv_macs + 2 * linear_macs)
    assert isinstance(conv.weight, torch._subclasses.fake_tensor.FakeTensor)  # nothing was allocated


def test_flop_count_of_a_depthwise_convolution_backward_counts_each_channel_once():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    images = torch.zeros(2, 8, 6, 6, requires_grad=True)
    out, forward = bench.counted(lambda: conv(images))
    _, backward = bench.counted(lambda: out.sum().backward())
    assert forward == 2 * (2 * 6 * 6 * 8 * 3 * 3)      # batch x output pixels x channels x k x k
    assert backward == 2 * forward                       # input and weight gradients, one forward each


def test_iteration_flops_splits_a_kd_step_into_its_parts():
    recipe = Recipe(task="cls", data="synthetic", method="kd", student="resnet8", teacher="resnet8",
                            num_classes=8, crop=(32, 32), batch_size=4, iters=10)
    parts = bench.iteration_flops(recipe).parts
    assert list(parts) == ["student forward", "teacher forward", "distiller forward", "backward"]
    assert parts["teacher forward"] == parts["student forward"] > 0   # the same network, same batch
    assert parts["distiller forward"] == 0                            # softmax KD: no products
    # backward: two products per forward one, but the first convolution needs no input gradient
    assert parts["student forward"] < parts["backward"] < 2 * parts["student forward"]
    assert bench.iteration_flops(dataclasses.replace(recipe, batch_size=8)).parts["backward"] == 2 * parts["backward"]


def test_iterations_follow_the_reference_set_sizes_and_gpu_hours_the_stated_throughput():
    assert bench.training_iterations(PRESETS["gkd_faster_rcnn_r50_fpn_2x_coco"]) == 24 * (117_266 // 16)
    assert bench.training_iterations(PRESETS["gkd_faster_rcnn_r50_fpn_voc0712"]) == 4 * (3 * 16_551 // 16)
    assert bench.training_iterations(PRESETS["dist_deeplabv3_r18_cityscapes"]) == 40_000
    assert bench.gpu_hours(125e12 * 0.25 * 3600, 125.0, 0.25) == pytest.approx(1.0)
    sokd = PRESETS["sokd_resnet18_imagenet"]
    assert bench.searching_iterations(sokd) == 5 * (1_281_167 // 256)
    assert bench.searching_iterations(PRESETS["dist_resnet18_imagenet"]) == 100 * (1_281_167 // 256)


def test_flops_prints_the_formula_and_refuses_tasks_it_cannot_count(capsys):
    rows = bench.flops(["synthetic_cls_kd"], peak_tflops=100.0, utilisation=0.5, overrides={"batch_size": 2})
    iterations = bench.training_iterations(dataclasses.replace(PRESETS["synthetic_cls_kd"], batch_size=2))
    assert rows[0]["iterations"] == iterations and rows[0]["total"] == rows[0]["per_iteration"] * iterations
    assert rows[0]["gpu_hours"] == pytest.approx(rows[0]["total"] / 50e12 / 3600)
    assert "GPU-hours = FLOPs per iteration x iterations / (peak FLOP/s x utilisation) / 3600" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--task depth is not counted"):
        bench.flops(["synthetic_cls_kd", "synthetic_depth_none"])
    with pytest.raises(ValueError, match="--preset nope: no such preset"):
        bench.flops(["synthetic_cls_kd", "nope"])
    assert "training FLOPs" not in capsys.readouterr().out  # refused before anything was counted


# synthetic detection scenes at 64 pixels: the step runs for real on CPU in a second or two
TINY_DET = {"synthetic_size": (64, 64), "image_scale": (64, 64)}


@pytest.mark.parametrize("preset,overrides", [("synthetic_cls_dist", {"batch_size": 2}),
                                              ("synthetic_seg_skd", {**TINY, "crop": (32, 32)})])
def test_real_probe_of_seg_and_cls_counts_what_fake_tensors_count(preset, overrides):
    recipe = dataclasses.replace(PRESETS[preset], **overrides)
    real, fake = bench.iteration_flops(recipe, probe="real"), bench.iteration_flops(recipe, probe="fake")
    assert real.parts == fake.parts and sum(real.parts.values()) > 0


def test_detection_count_is_per_image_times_the_batch_with_its_epoch_pass(capsys):
    """GKD on Faster R-CNN: RoIs at the recipe's sample, the prototype pass counted per image per epoch."""
    recipe = dataclasses.replace(PRESETS["synthetic_det_frcnn_gkd"], **TINY_DET)
    row, = bench.flops(["synthetic_det_frcnn_gkd"], overrides=TINY_DET)
    assert list(row["parts"]) == ["student forward", "teacher forward", "distiller forward", "backward"]
    assert row["probe"] == "64x64 image, 2 boxes, input 64x64, 128 RoIs"
    two = bench.iteration_flops(recipe, probe_images=2)   # two probe images: the same FLOPs per image
    assert two.parts == row["parts"] and row["parts"]["student forward"] > 0
    # the teacher's pooled features are cached after the first epoch: later epochs run the student alone
    epoch_pass = row["epoch_pass"]
    assert 0 < epoch_pass.later < epoch_pass.first < 3 * epoch_pass.later
    epochs = math.ceil(600 / (2000 // 8))                 # 600 iterations of 250 per epoch
    images = min(2000, 3 * 20)                            # 3 classes x pgm_max_images 20
    assert row["total"] == row["per_iteration"] * 600 + images * (epoch_pass.first + (epochs - 1) * epoch_pass.later)
    printed = capsys.readouterr().out
    assert f"<= {images} images x {epochs} epochs" in printed and "det and ins: computed on one probe image" in printed


def test_probe_batchnorm_statistics_keep_a_random_resnet101_at_a_trained_scale():
    """At running statistics (0, 1) a random R101's C5 grows to ~1e5 and the RPN proposes nothing."""
    recipe = dataclasses.replace(PRESETS["retinanet_r101_fpn_2x_coco"], num_classes=3, **TINY_DET)
    torch.manual_seed(0)
    detector = tasks.TASKS["det"].build_model(recipe, "retinanet_r101").eval()
    dataset, collate = tasks.TASKS["det"].probe_data(recipe, (64, 64), 2)
    batch = dataset.prepare_batch(collate([dataset[0]]))
    assert batch["images"].shape == (1, 3, 64, 64) and batch["targets"][0]["boxes"].shape == (2, 4)
    before = engine.teacher_forward(detector, batch, {})["feats"]["c5"].abs().max()
    bench.calibrate_batchnorm(detector, batch)
    after = engine.teacher_forward(detector, batch, {})["feats"]["c5"]
    assert before > 1e4 and after.abs().max() < before / 100
    assert not detector.training and not any(m.training for m in detector.modules())  # modes restored


def test_flops_says_what_it_cannot_count_in_one_line():
    recipe = PRESETS["synthetic_det_retinanet_none"]
    with pytest.raises(ValueError, match="^bench flops: --task det cannot run on fake tensors: its training step "
                                         "sizes tensors by their values"):
        bench.iteration_flops(recipe, probe="fake")
    with pytest.raises(ValueError, match=r"^bench flops: --task depth is not counted: counted tasks are seg, cls "
                                         r"\(on fake tensors\) and det, ins \(on a real probe batch\)$"):
        bench.iteration_flops(PRESETS["synthetic_depth_none"])


def test_flops_cli_refuses_what_it_cannot_count_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["flops", "--preset", "synthetic_cls_kd", "synthetic_depth_none"])
    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1].endswith("error: bench flops: --task depth is not counted: counted "
                                                          "tasks are seg, cls (on fake tensors) and det, ins (on a "
                                                          "real probe batch)")
    assert "training FLOPs" not in captured.out


@pytest.mark.parametrize("task,export_format,size", [("seg", "cityscapes", (32, 64)), ("det", "coco", (48, 64)),
                                                     ("cls", "imagefolder", (48, 64))])
def test_data_prints_every_pipeline_of_a_tree_and_the_loader_settings(task, export_format, size, tmp_path, capsys):
    from kd_ref import datasets

    datasets.export(export_format, str(tmp_path), num_train=2, num_val=1, size=size)
    rates = bench.data([task], root=str(tmp_path), rounds=1, gpu_images_per_second=1e6)[task]
    assert set(rates) == {"training (ours)", "evaluation (ours)", "decode alone", "plain reference",
                          "training device step, CPU", "evaluation device step, CPU"}
    assert all(math.isfinite(rate) and rate > 0 for rate in rates.values())
    printed = capsys.readouterr().out
    assert f"{task}: images/s per worker thread, 1 interleaved rounds over {tmp_path}" in printed
    assert "| decode alone |" in printed and "| 1.00x |" in printed
    workers = math.ceil(1e6 / rates["training (ours)"])
    assert f"a GPU consuming 1e+06 images/s needs {workers} DataLoader workers" in printed


def test_data_cli_wants_the_task_of_a_given_tree(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["data", "--root", str(tmp_path)])
    assert "--root: name the tree's task with --task seg|det|cls" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["data", "--task", "seg", "--root", str(tmp_path / "absent")])
    assert f"Cityscapes root {tmp_path / 'absent'}: no such directory" in capsys.readouterr().err


def test_flops_resolves_method_options_counted_in_epochs(capsys):
    """SoKD's CIFAR search length is search_epochs; the distiller is built from the resolved recipe."""
    row, = bench.flops(["sokd_resnet8x4_cifar100"])
    assert row["iterations"] == 240 * (50_000 // 64)
    search = row["parts"]["step hook"]
    assert row["total"] == (row["per_iteration"] - search) * row["iterations"] + search * 50 * (50_000 // 64)


def test_constant_depth_predicts_the_median_training_depth_everywhere(monkeypatch, capsys):
    import dataclasses

    import numpy as np

    from kd_ref import datasets
    recipe = dataclasses.replace(PRESETS["synthetic_depth_none"], synthetic_train=3, synthetic_val=2)
    monkeypatch.setitem(PRESETS, "synthetic_depth_none", recipe)
    scores = bench.constant_depth("synthetic_depth_none")
    train = datasets.SyntheticDepthScenes(datasets.SyntheticScenes("train", recipe.seed, recipe.synthetic_size, 3,
                                                                   style=recipe.synthetic_style))
    depths = np.concatenate([train[i]["depth"][train[i]["depth"] > 0] for i in range(3)])
    assert scores["median"] == pytest.approx(float(np.median(depths)))
    assert scores["rel"] > 0 and 0 < scores["delta1"] < 1
    assert "constant depth" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--preset synthetic_seg_gdd: expected a synthetic depth preset"):
        bench.constant_depth("synthetic_seg_gdd")
