import dataclasses
import math

import pytest
import torch

from kd_ref import bench_flops, engine, tasks
from kd_ref.presets import PRESETS
from kd_ref.recipe import Recipe


def test_flop_count_of_a_tiny_model_on_fake_tensors_equals_the_hand_count():
    with bench_flops.fake_tensors():
        conv, linear = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4 * 8 * 8, 5)
        images = torch.zeros(2, 3, 8, 8)
        out, forward = bench_flops.counted(lambda: linear(conv(images).flatten(1)))
        _, backward = bench_flops.counted(lambda: out.sum().backward())
    conv_macs = 2 * 8 * 8 * 4 * 3 * 3 * 3          # batch x output pixels x C_out x C_in x k x k
    linear_macs = 2 * 256 * 5
    assert forward == 2 * (conv_macs + linear_macs)
    # conv: weight gradient only (the images need none); linear: weight and input gradients
    assert backward == 2 * (conv_macs + 2 * linear_macs)
    assert isinstance(conv.weight, torch._subclasses.fake_tensor.FakeTensor)  # nothing was allocated


def test_flop_count_of_a_depthwise_convolution_backward_counts_each_channel_once():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    images = torch.zeros(2, 8, 6, 6, requires_grad=True)
    out, forward = bench_flops.counted(lambda: conv(images))
    _, backward = bench_flops.counted(lambda: out.sum().backward())
    assert forward == 2 * (2 * 6 * 6 * 8 * 3 * 3)      # batch x output pixels x channels x k x k
    assert backward == 2 * forward                       # input and weight gradients, one forward each


def test_iteration_flops_splits_a_kd_step_into_its_parts():
    recipe = Recipe(task="cls", data="synthetic", method="kd", student="resnet8", teacher="resnet8",
                            num_classes=8, crop=(32, 32), batch_size=4, iters=10)
    parts = bench_flops.iteration_flops(recipe).parts
    assert list(parts) == ["student forward", "teacher forward", "distiller forward", "backward"]
    assert parts["teacher forward"] == parts["student forward"] > 0   # the same network, same batch
    assert parts["distiller forward"] == 0                            # softmax KD: no products
    # backward: two products per forward one, but the first convolution needs no input gradient
    assert parts["student forward"] < parts["backward"] < 2 * parts["student forward"]
    doubled = bench_flops.iteration_flops(dataclasses.replace(recipe, batch_size=8)).parts
    assert doubled["backward"] == 2 * parts["backward"]


def test_iterations_follow_the_reference_set_sizes_and_gpu_hours_the_stated_throughput():
    assert bench_flops.training_iterations(PRESETS["gkd_faster_rcnn_r50_fpn_2x_coco"]) == 24 * (117_266 // 16)
    assert bench_flops.training_iterations(PRESETS["gkd_faster_rcnn_r50_fpn_voc0712"]) == 4 * (3 * 16_551 // 16)
    assert bench_flops.training_iterations(PRESETS["dist_deeplabv3_r18_cityscapes"]) == 40_000
    assert bench_flops.gpu_hours(125e12 * 0.25 * 3600, 125.0, 0.25) == pytest.approx(1.0)
    sokd = PRESETS["sokd_resnet18_imagenet"]
    assert bench_flops.searching_iterations(sokd) == 5 * (1_281_167 // 256)
    assert bench_flops.searching_iterations(PRESETS["dist_resnet18_imagenet"]) == 100 * (1_281_167 // 256)


def test_flops_prints_the_formula_and_refuses_tasks_it_cannot_count(capsys):
    rows = bench_flops.flops(["synthetic_cls_kd"], peak_tflops=100.0, utilisation=0.5, overrides={"batch_size": 2})
    iterations = bench_flops.training_iterations(dataclasses.replace(PRESETS["synthetic_cls_kd"], batch_size=2))
    assert rows[0]["iterations"] == iterations and rows[0]["total"] == rows[0]["per_iteration"] * iterations
    assert rows[0]["gpu_hours"] == pytest.approx(rows[0]["total"] / 50e12 / 3600)
    assert "GPU-hours = FLOPs per iteration x iterations / (peak FLOP/s x utilisation) / 3600" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--task depth is not counted"):
        bench_flops.flops(["synthetic_cls_kd", "synthetic_depth_none"])
    with pytest.raises(ValueError, match="--preset nope: no such preset"):
        bench_flops.flops(["synthetic_cls_kd", "nope"])
    assert "training FLOPs" not in capsys.readouterr().out  # refused before anything was counted


# synthetic detection scenes at 64 pixels: the step runs for real on CPU in a second or two
TINY_DET = {"synthetic_size": (64, 64), "image_scale": (64, 64)}


@pytest.mark.parametrize("preset,overrides", [("synthetic_cls_dist", {"batch_size": 2}),
                                              ("synthetic_seg_skd", {"synthetic_size": (64, 64), "crop": (32, 32),
                                                                     "synthetic_train": 4, "synthetic_val": 2,
                                                                     "batch_size": 2})])
def test_real_probe_of_seg_and_cls_counts_what_fake_tensors_count(preset, overrides):
    recipe = dataclasses.replace(PRESETS[preset], **overrides)
    real, fake = bench_flops.iteration_flops(recipe, probe="real"), bench_flops.iteration_flops(recipe, probe="fake")
    assert real.parts == fake.parts and sum(real.parts.values()) > 0


def test_detection_count_is_per_image_times_the_batch_with_its_epoch_pass(capsys):
    """GKD on Faster R-CNN: RoIs at the recipe's sample, the prototype pass counted per image per epoch."""
    recipe = dataclasses.replace(PRESETS["synthetic_det_frcnn_gkd"], **TINY_DET)
    row, = bench_flops.flops(["synthetic_det_frcnn_gkd"], overrides=TINY_DET)
    assert list(row["parts"]) == ["student forward", "teacher forward", "distiller forward", "backward"]
    assert row["probe"] == "64x64 image, 2 boxes, input 64x64, 128 RoIs"
    two = bench_flops.iteration_flops(recipe, probe_images=2)   # two probe images: the same FLOPs per image
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
    bench_flops.calibrate_batchnorm(detector, batch)
    after = engine.teacher_forward(detector, batch, {})["feats"]["c5"]
    assert before > 1e4 and after.abs().max() < before / 100
    assert not detector.training and not any(m.training for m in detector.modules())  # modes restored


def test_flops_says_what_it_cannot_count_in_one_line():
    recipe = PRESETS["synthetic_det_retinanet_none"]
    with pytest.raises(ValueError, match="^bench flops: --task det cannot run on fake tensors: its training step "
                                         "sizes tensors by their values"):
        bench_flops.iteration_flops(recipe, probe="fake")
    with pytest.raises(ValueError, match=r"^bench flops: --task depth is not counted: counted tasks are seg, cls "
                                         r"\(on fake tensors\) and det, ins \(on a real probe batch\)$"):
        bench_flops.iteration_flops(PRESETS["synthetic_depth_none"])


def test_flops_cli_refuses_what_it_cannot_count_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_flops.main(["--preset", "synthetic_cls_kd", "synthetic_depth_none"])
    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1].endswith("error: bench flops: --task depth is not counted: counted "
                                                          "tasks are seg, cls (on fake tensors) and det, ins (on a "
                                                          "real probe batch)")
    assert "training FLOPs" not in captured.out


def test_flops_resolves_method_options_counted_in_epochs(capsys):
    """SoKD's CIFAR search length is search_epochs; the distiller is built from the resolved recipe."""
    row, = bench_flops.flops(["sokd_resnet8x4_cifar100"])
    assert row["iterations"] == 240 * (50_000 // 64)
    search = row["parts"]["step hook"]
    assert row["total"] == (row["per_iteration"] - search) * row["iterations"] + search * 50 * (50_000 // 64)
