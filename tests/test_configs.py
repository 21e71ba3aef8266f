"""Presets of kd_ref/configs.py: the baseline twins of ``register`` and the task-loss weights of the KD rows."""
import dataclasses

import pytest

from kd_ref import configs


def test_register_twin_drops_the_distillation_fields_or_takes_the_extended_recipe(monkeypatch):
    monkeypatch.setattr(configs, "PRESETS", {})
    plain = configs.Recipe(iters=10, grad_clip=1.0)
    distilled = dataclasses.replace(plain, method="kd", teacher="pspnet_r101", method_options={"tau": 2.0},
                                    student_init="trained.pt", task_loss_weight=0.5)
    configs.register("kd_row", distilled)
    assert configs.PRESETS["kd_row_baseline"] == dataclasses.replace(plain, teacher="pspnet_r101")
    # a distillation config that also changes the optimisation names the recipe it extends
    configs.register("clipped_row", dataclasses.replace(distilled, grad_clip=35.0), baseline=configs.Recipe(iters=10))
    assert configs.PRESETS["clipped_row_baseline"] == configs.Recipe(iters=10, teacher="pspnet_r101")
    configs.register("demo", distilled, baseline=False)
    assert "demo_baseline" not in configs.PRESETS


def test_every_baseline_twin_trains_the_student_alone_with_the_teacher_kept():
    defaults = configs.Recipe()
    twins = {name[:-len("_baseline")]: twin for name, twin in configs.PRESETS.items() if name.endswith("_baseline")}
    assert len(twins) > 30
    for name, twin in twins.items():
        assert all(getattr(twin, key) == getattr(defaults, key) for key in configs.DISTILLATION_FIELDS), name
        assert twin.teacher == configs.PRESETS[name].teacher and twin.student == configs.PRESETS[name].student
    # GDD's detection config adds gradient clipping 35; the baseline (gdd.md §6) has none
    assert configs.PRESETS["gdd_faster_rcnn_r50_fpn_2x_coco"].grad_clip == 35.0
    assert configs.PRESETS["gdd_faster_rcnn_r50_fpn_2x_coco_baseline"].grad_clip is None


def test_cifar_kd_rows_weight_the_task_loss_as_mdistiller():
    for student in ("resnet8x4", "wrn_40_1", "wrn_16_2", "resnet20", "resnet32"):
        kd = configs.PRESETS[f"kd_{student}_cifar100"]
        assert (kd.task_loss_weight, kd.method_options) == (0.1, {"tau": 4.0, "loss_weight": 0.9})
        over_kd = configs.PRESETS[f"sokd_kd_{student}_cifar100"]
        assert over_kd.task_loss_weight == 0.1 and over_kd.method_options["base"] == "kd"
        assert over_kd.method_options["base_options"]["kd"] == kd.method_options
        # the final code's SoKD row (no base) and DIST keep CE at weight 1 (sokd.md §5, dist.md §4)
        assert configs.PRESETS[f"sokd_{student}_cifar100"].task_loss_weight == 1.0
    assert configs.PRESETS["dist_resnet8x4_cifar100"].task_loss_weight == 1.0
    assert configs.default_preset("cls", "kd", "cifar100") == "kd_resnet8x4_cifar100"


# ------------------------------------------------------------------------ pinning against the references
CIRKD = {"crop": (512, 1024), "scales": (0.5, 2.0), "scale_step": 0.1, "photometric_distortion": False,
         "normalization": "bgr_mean", "batch_size": 16, "iters": 40000, "lr": 0.02, "momentum": 0.9,
         "weight_decay": 1e-4, "schedule": "poly", "poly_power": 0.9, "min_lr": 0.0, "eval_every": 800,
         "keep_best": True, "grad_clip": None}
MMSEG = {"crop": (512, 512), "scales": (0.5, 2.0), "scale_step": None, "cat_max_ratio": 0.75,
         "photometric_distortion": True, "normalization": "imagenet_rgb", "batch_size": 16, "iters": 40000,
         "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "poly", "poly_power": 0.9, "min_lr": 1e-4,
         "eval_every": 4000, "keep_best": False, "grad_clip": None}
MMDET = {"image_scale": (1333, 800), "normalization": "imagenet_rgb", "batch_size": 16, "iters": None,
         "momentum": 0.9, "weight_decay": 1e-4, "schedule": "step", "warmup_iters": 500, "warmup_ratio": 0.001,
         "grad_clip": None, "eval_every": 1, "keep_best": False, "dataset_repeat": 1}
# preset -> (reference values, where they come from). Fields we set differently from the reference are
# not listed here but in DIFFERENCES below, with the reason.
REFERENCE = {
    # winycg/CIRKD@05a2753 train_baseline.py / train_kd.py argparse defaults + the train_scripts
    "teacher_deeplabv3_r101_cityscapes": {**CIRKD, "pretrained": "resnet101-imagenet.pth"},
    "kd_deeplabv3_r18_cityscapes": {**CIRKD, "pretrained": "resnet18-imagenet.pth"},
    "skd_deeplabv3_r18_cityscapes": {**CIRKD, "pretrained": "resnet18-imagenet.pth",
                                     "method_options": {"preset": "cirkd"}},
    **{f"{m}_deeplabv3_r18_cityscapes_baseline": {**CIRKD, "pretrained": "resnet18-imagenet.pth"}
       for m in ("kd", "skd")},
    # hunto/DIST_KD segmentation/train_kd.py: wd 5e-4, lr = 1e-4 + (0.02 - 1e-4)(1 - it/max)^0.9, val 400
    **{f"dist_{s}_cityscapes": {**CIRKD, "weight_decay": 5e-4, "min_lr": 1e-4, "eval_every": 400,
                                "pretrained": "resnet18-imagenet.pth"} for s in ("deeplabv3_r18", "pspnet_r18")},
    # ... whose quoted baselines are CIRKD train_baseline.py runs
    **{f"dist_{s}_cityscapes_baseline": {**CIRKD, "pretrained": "resnet18-imagenet.pth"}
       for s in ("deeplabv3_r18", "pspnet_r18")},
    # ZhgLiu/GDD semanticSeg configs: cityscapes_512x512.py + schedule_40k.py; alpha 145 / 175, temp 4
    "gdd_pspnet_r18_cityscapes": {**MMSEG, "pretrained": "resnet18_v1c.pth",
                                  "method_options": {"alpha": 145.0, "tau": 4.0}},
    "gdd_deeplabv3_r18_cityscapes": {**MMSEG, "pretrained": "resnet18_v1c.pth",
                                     "method_options": {"alpha": 175.0, "tau": 4.0}},
    **{f"gdd_{s}_cityscapes_baseline": {**MMSEG, "pretrained": "resnet18_v1c.pth"}
       for s in ("pspnet_r18", "deeplabv3_r18")},
    # mmseg pspnet_r101-d8_512x1024_40k_cityscapes.py (cityscapes.py: 512x1024 crops)
    "teacher_pspnet_r101_cityscapes_mmseg": {**MMSEG, "crop": (512, 1024), "pretrained": "resnet101_v1c.pth"},
    # irfanICMLL/structure_knowledge_distillation run_train_val.sh, train_options.py, CSDataSet
    "skd_pspnet_r18_cityscapes_original": {
        "crop": (512, 512), "scales": (0.7, 2.1), "scale_step": 0.1, "normalization": "bgr_mean", "batch_size": 8,
        "iters": 40000, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "poly_power": 0.9, "min_lr": 0.0,
        "pretrained": "resnet18-imagenet.pth", "method_options": {"preset": "original"}, "keep_best": False},
    "skd_pspnet_r18_cityscapes_original_baseline": {"scales": (0.7, 2.1), "batch_size": 8, "lr": 0.01,
                                                    "weight_decay": 5e-4, "pretrained": "resnet18-imagenet.pth"},
    # mmdetection 2.x coco_detection.py, schedule_2x.py (24 epochs, steps 16/22), faster_rcnn lr 0.02,
    # retinanet lr 0.01, torchvision ImageNet weights; GKD/DIST/GDD on the 2x baselines
    **{f"{arch}_r{depth}_fpn_{sched}_coco": {**MMDET, "lr": lr, "epochs": epochs, "lr_steps": steps,
                                             "pretrained": configs.TORCHVISION_WEIGHTS[depth]}
       for arch, lr in (("faster_rcnn", 0.02), ("retinanet", 0.01)) for depth in (50, 101)
       for sched, epochs, steps in (("1x", 12, (8, 11)), ("2x", 24, (16, 22)))},
    # mmdetection 2.x pascal_voc/*_voc0712.py: RepeatDataset times 3, 4 epochs, step 3, lr 0.01, 1000x600
    **{f"{arch}_r{depth}_fpn_voc0712": {**MMDET, "image_scale": (1000, 600), "lr": 0.01, "epochs": 4,
                                         "lr_steps": (3,), "dataset_repeat": 3, "warmup_iters": 0,
                                         "pretrained": configs.TORCHVISION_WEIGHTS[depth]}
       for arch in ("faster_rcnn", "retinanet") for depth in (50, 101)},
    "gkd_faster_rcnn_r50_fpn_2x_coco": {**MMDET, "lr": 0.02, "epochs": 24, "lr_steps": (16, 22),
                                        "student_init": "runs/faster_rcnn_r50_fpn_2x_coco/last.pt"},
    "gdd_faster_rcnn_r50_fpn_2x_coco": {**MMDET, "lr": 0.02, "epochs": 24, "lr_steps": (16, 22), "grad_clip": 35.0,
                                        "method_options": {"alpha": 4.0, "tau": 4.0}},
    "dist_retinanet_r50_fpn_2x_coco": {**MMDET, "lr": 0.01, "epochs": 24, "lr_steps": (16, 22)},
    "dist_faster_rcnn_r50_fpn_2x_coco": {**MMDET, "lr": 0.02, "epochs": 24, "lr_steps": (16, 22)},
    # mmdetection solo/solo_r50_fpn_3x_coco.py (R101 backbone): Resize img_scale (1333, 800) ... (1333, 640),
    # multiscale_mode 'value'; 36 epochs, steps 27/33, warm-up 500 from 1/3; SOLO lr 0.01
    "solo_r101_fpn_3x_coco": {**MMDET, "lr": 0.01, "epochs": 36, "lr_steps": (27, 33), "warmup_ratio": 1.0 / 3,
                              "train_image_scales": ((1333, 800), (1333, 768), (1333, 736), (1333, 704),
                                                     (1333, 672), (1333, 640)),
                              "multiscale_mode": "value", "pretrained": configs.TORCHVISION_WEIGHTS[101]},
}
# Fields set differently from (or not given by) the reference, and why.
DIFFERENCES = {
    "teacher_pspnet_r101_cityscapes_skd": "unknown: the SKD teacher's recipe is not released (only its checkpoint); "
                                          "the preset trains it with the student's recipe",
    "skd_pspnet_r18_cityscapes_original": "eval_every 4000: the code evaluates the snapshots after iteration "
                                          "39,000; we report the last",
    "gkd_retinanet_r50_fpn_2x_coco": "unknown: no released RetinaNet config; the Faster R-CNN config's settings",
    "gkd_faster_rcnn_r50_fpn_voc0712": "unknown: no released VOC config; the COCO KD settings on mmdet's VOC schedule",
    "gkd_retinanet_r50_fpn_voc0712": "unknown: as the Faster R-CNN VOC row",
    "gdd_faster_rcnn_r50_fpn_2x_coco": "teacher Faster R-CNN R101 instead of Cascade Mask R-CNN X101-32x4d-DCN",
    "dist_retinanet_r50_fpn_2x_coco": "teacher RetinaNet R101 instead of X101",
    "dist_faster_rcnn_r50_fpn_2x_coco": "teacher Faster R-CNN R101 instead of Cascade Mask R-CNN X101",
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_preset_equals_its_reference_config(name):
    recipe = configs.PRESETS[name]
    assert {field: getattr(recipe, field) for field in REFERENCE[name]} == REFERENCE[name]
    assert recipe.source


def test_every_real_data_preset_names_its_source_and_the_row_presets_are_pinned():
    for name, recipe in configs.PRESETS.items():
        if recipe.data != "synthetic":
            assert recipe.source, name
    rows = {"seg": [n for n, r in configs.PRESETS.items() if r.task == "seg" and r.data != "synthetic"]}
    assert set(rows["seg"]) <= set(REFERENCE) | set(DIFFERENCES), set(rows["seg"]) - set(REFERENCE) - set(DIFFERENCES)
    for name in DIFFERENCES:
        assert name in configs.PRESETS and name.rsplit("_baseline", 1)[0] in configs.PRESETS
    for name in ("teacher_pspnet_r101_cityscapes_skd", "gkd_retinanet_r50_fpn_2x_coco"):
        assert configs.PRESETS[name].source.startswith("unknown")


def test_recipe_changes_count_missing_fields_as_defaults_and_ignore_the_source():
    stored = {k: v for k, v in dataclasses.asdict(configs.Recipe()).items() if k not in ("epochs", "source")}
    assert configs.recipe_changes(stored, configs.Recipe(source="a config")) == []
    assert configs.recipe_changes(stored, configs.Recipe(iters=None, epochs=2)) == ["iters", "epochs"]


def test_resolve_schedule_multiplies_epochs_by_the_iterations_per_epoch():
    voc = configs.PRESETS["gkd_faster_rcnn_r50_fpn_voc0712"]
    resolved = configs.resolve_schedule(voc, 3104)  # 16,551 x 3 images at batch 16
    assert (resolved.iters, resolved.lr_steps, resolved.eval_every, resolved.epochs) == (12416, (9312,), 3104, None)
    cirkd = configs.PRESETS["kd_deeplabv3_r18_cityscapes"]
    assert configs.resolve_schedule(cirkd, 185) is cirkd
    with pytest.raises(ValueError, match="exactly one of iters"):
        configs.check_schedule(dataclasses.replace(voc, iters=10))


def test_check_pretrained_names_file_layout_and_origin(tmp_path):
    recipe = configs.PRESETS["retinanet_r50_fpn_2x_coco"]
    with pytest.raises(FileNotFoundError, match=r"resnet50-0676ba61.pth \(torchvision layout; .*IMAGENET1K_V1"):
        configs.check_pretrained(recipe)
    weights = tmp_path / "r50.pth"
    weights.write_bytes(b"")
    configs.check_pretrained(dataclasses.replace(recipe, pretrained=str(weights)))
    configs.check_pretrained(dataclasses.replace(recipe, pretrained=None))
