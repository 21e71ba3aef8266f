"""Presets (kd_ref/presets*.py) and the recipe helpers (kd_ref/recipe.py): the baseline twins of
``register``, the task-loss weights of the KD rows, the pinning against the reference recipes."""
import dataclasses

import pytest
import torch

from kd_ref import presets, presets_cls, presets_depth, tasks
from kd_ref.presets_det import TORCHVISION_WEIGHTS
from kd_ref.recipe import (DISTILLATION_FIELDS, Recipe, check_pretrained, check_schedule, recipe_changes, register,
                           resolve_schedule, resumed_recipe)


def test_register_twin_drops_the_distillation_fields_or_takes_the_extended_recipe():
    table = {}
    plain = Recipe(iters=10, grad_clip=1.0)
    distilled = dataclasses.replace(plain, method="kd", teacher="pspnet_r101", method_options={"tau": 2.0},
                                    student_init="trained.pt", task_loss_weight=0.5)
    register(table, "kd_row", distilled)
    assert table["kd_row_baseline"] == dataclasses.replace(plain, teacher="pspnet_r101")
    # a distillation config that also changes the optimisation names the recipe it extends
    register(table, "clipped_row", dataclasses.replace(distilled, grad_clip=35.0), baseline=Recipe(iters=10))
    assert table["clipped_row_baseline"] == Recipe(iters=10, teacher="pspnet_r101")
    register(table, "demo", distilled, baseline=False)
    assert "demo_baseline" not in table


def test_every_baseline_twin_trains_the_student_alone_with_the_teacher_kept():
    defaults = Recipe()
    twins = {name[:-len("_baseline")]: twin for name, twin in presets.PRESETS.items() if name.endswith("_baseline")}
    assert len(twins) > 30
    for name, twin in twins.items():
        assert all(getattr(twin, key) == getattr(defaults, key) for key in DISTILLATION_FIELDS), name
        assert twin.teacher == presets.PRESETS[name].teacher and twin.student == presets.PRESETS[name].student
    # GDD's detection config adds gradient clipping 35; the baseline (gdd.md §6) has none
    assert presets.PRESETS["gdd_faster_rcnn_r50_fpn_2x_coco"].grad_clip == 35.0
    assert presets.PRESETS["gdd_faster_rcnn_r50_fpn_2x_coco_baseline"].grad_clip is None


def test_preset_modules_are_merged_and_a_name_defined_twice_is_refused():
    assert len(presets.PRESETS) == sum(len(module.PRESETS) for module in presets.PRESET_MODULES)
    assert presets.PRESETS["synthetic_depth_skd"] is presets_depth.PRESETS["synthetic_depth_skd"]
    with pytest.raises(ValueError, match=r"presets defined twice: \['kd_row'\]"):
        presets._merge([{"kd_row": Recipe(), "a": Recipe()}, {"kd_row": Recipe()}])


def test_synthetic_classification_presets_count_the_image_classes_of_the_task():
    assert presets_cls.SYNTHETIC_NUM_IMAGE_CLASSES == tasks.SYNTHETIC_NUM_IMAGE_CLASSES
    assert presets.PRESETS["synthetic_cls_kd"].num_classes == tasks.SYNTHETIC_NUM_IMAGE_CLASSES


def test_cifar_kd_rows_weight_the_task_loss_as_mdistiller():
    for student in ("resnet8x4", "wrn_40_1", "wrn_16_2", "resnet20", "resnet32"):
        kd = presets.PRESETS[f"kd_{student}_cifar100"]
        assert (kd.task_loss_weight, kd.method_options) == (0.1, {"tau": 4.0, "loss_weight": 0.9})
        over_kd = presets.PRESETS[f"sokd_kd_{student}_cifar100"]
        assert over_kd.task_loss_weight == 0.1 and over_kd.method_options["base"] == "kd"
        assert over_kd.method_options["base_options"]["kd"] == kd.method_options
        # the final code's SoKD row (no base) and DIST keep CE at weight 1 (sokd.md §5, dist.md §4)
        assert presets.PRESETS[f"sokd_{student}_cifar100"].task_loss_weight == 1.0
    assert presets.PRESETS["dist_resnet8x4_cifar100"].task_loss_weight == 1.0
    assert presets.default_preset("cls", "kd", "cifar100") == "kd_resnet8x4_cifar100"


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
         "grad_clip": None, "eval_every": 1, "keep_best": False, "dataset_repeat": 1,
         "group_by_aspect": True}  # mmdet 2.x (Distributed)GroupSampler
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
        "pretrained": "resnet18-imagenet.pth", "method_options": {"preset": "original"}, "keep_best": True,
        "eval_every": 0, "eval_at": (39_326, 39_697, 39_999)},  # train_and_eval.py's three scored snapshots
    "skd_pspnet_r18_cityscapes_original_baseline": {"scales": (0.7, 2.1), "batch_size": 8, "lr": 0.01,
                                                    "weight_decay": 5e-4, "pretrained": "resnet18-imagenet.pth",
                                                    "keep_best": True, "eval_every": 0,
                                                    "eval_at": (39_326, 39_697, 39_999)},
    # mmdetection 2.x coco_detection.py, schedule_2x.py (24 epochs, steps 16/22), faster_rcnn lr 0.02,
    # retinanet lr 0.01, torchvision ImageNet weights; GKD/DIST/GDD on the 2x baselines
    **{f"{arch}_r{depth}_fpn_{sched}_coco": {**MMDET, "lr": lr, "epochs": epochs, "lr_steps": steps,
                                             "pretrained": TORCHVISION_WEIGHTS[depth]}
       for arch, lr in (("faster_rcnn", 0.02), ("retinanet", 0.01)) for depth in (50, 101)
       for sched, epochs, steps in (("1x", 12, (8, 11)), ("2x", 24, (16, 22)))},
    # mmdetection 2.x pascal_voc/*_voc0712.py: RepeatDataset times 3, 4 epochs, step 3, lr 0.01, 1000x600
    **{f"{arch}_r{depth}_fpn_voc0712": {**MMDET, "image_scale": (1000, 600), "lr": 0.01, "epochs": 4,
                                         "lr_steps": (3,), "dataset_repeat": 3, "warmup_iters": 0,
                                         "pretrained": TORCHVISION_WEIGHTS[depth]}
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
                              "multiscale_mode": "value", "pretrained": TORCHVISION_WEIGHTS[101]},
    # FabienCode/mdistiller detection/configs/RegKD/DKD-MV2-R50.yaml: IMS_PER_BATCH 1, BASE_LR 0.01, MAX_ITER
    # 180000, STEPS (120000, 160000), R50-FPN teacher
    "sokd_faster_rcnn_mv2_fpn_coco": {"batch_size": 1, "lr": 0.01, "iters": 180_000, "lr_steps": (120_000, 160_000),
                                      "student": "faster_rcnn_mv2", "teacher": "faster_rcnn_r50"},
}
# Fields set differently from (or not given by) the reference, and why.
DIFFERENCES = {
    "teacher_pspnet_r101_cityscapes_skd": "unknown: the SKD teacher's recipe is not released (only its checkpoint); "
                                          "the preset trains it with the student's recipe",
    "skd_pspnet_r18_cityscapes_original": "reports the best of the three snapshots the code scores (keep_best "
                                          "over eval_at): the code names each file with its mIoU and does not "
                                          "say which one the paper reports",
    "gkd_retinanet_r50_fpn_2x_coco": "unknown: no released RetinaNet config; the Faster R-CNN config's settings",
    "gkd_faster_rcnn_r50_fpn_voc0712": "unknown: no released VOC config; the COCO KD settings on mmdet's VOC schedule",
    "gkd_retinanet_r50_fpn_voc0712": "unknown: as the Faster R-CNN VOC row",
    "gdd_faster_rcnn_r50_fpn_2x_coco": "teacher Faster R-CNN R101 instead of Cascade Mask R-CNN X101-32x4d-DCN",
    "dist_retinanet_r50_fpn_2x_coco": "teacher RetinaNet R101 instead of X101",
    "dist_faster_rcnn_r50_fpn_2x_coco": "teacher Faster R-CNN R101 instead of Cascade Mask R-CNN X101",
    "sokd_faster_rcnn_mv2_fpn_coco": "pretrained: torchvision's mobilenet_v2-b0353104.pth instead of the config's "
                                     "pretrained/mv2-r50.pth (not public); evaluation once per epoch at batch 1 and "
                                     "the SoKD options and search length of the R50/R18 rows are ours",
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_preset_equals_its_reference_config(name):
    recipe = presets.PRESETS[name]
    assert {field: getattr(recipe, field) for field in REFERENCE[name]} == REFERENCE[name]
    assert recipe.source


def test_every_real_data_preset_names_its_source_and_the_row_presets_are_pinned():
    for name, recipe in presets.PRESETS.items():
        if recipe.data != "synthetic":
            assert recipe.source, name
    rows = {"seg": [n for n, r in presets.PRESETS.items() if r.task == "seg" and r.data != "synthetic"]}
    assert set(rows["seg"]) <= set(REFERENCE) | set(DIFFERENCES), set(rows["seg"]) - set(REFERENCE) - set(DIFFERENCES)
    for name in DIFFERENCES:
        assert name in presets.PRESETS and name.rsplit("_baseline", 1)[0] in presets.PRESETS
    for name in ("teacher_pspnet_r101_cityscapes_skd", "gkd_retinanet_r50_fpn_2x_coco"):
        assert presets.PRESETS[name].source.startswith("unknown")


def test_recipe_changes_count_missing_fields_as_defaults_and_ignore_the_source():
    stored = {k: v for k, v in dataclasses.asdict(Recipe()).items() if k not in ("epochs", "source")}
    assert recipe_changes(stored, Recipe(source="a config")) == []
    assert recipe_changes(stored, Recipe(iters=None, epochs=2)) == ["iters", "epochs"]


def test_resolve_schedule_multiplies_epochs_by_the_iterations_per_epoch():
    voc = presets.PRESETS["gkd_faster_rcnn_r50_fpn_voc0712"]
    resolved = resolve_schedule(voc, 3104)  # 16,551 x 3 images at batch 16
    assert (resolved.iters, resolved.lr_steps, resolved.eval_every, resolved.epochs) == (12416, (9312,), 3104, None)
    cirkd = presets.PRESETS["kd_deeplabv3_r18_cityscapes"]
    assert resolve_schedule(cirkd, 185) is cirkd
    with pytest.raises(ValueError, match="exactly one of iters"):
        check_schedule(dataclasses.replace(voc, iters=10))


def test_cifar_and_imagenet_presets_count_epochs_and_resolve_to_the_reference_iterations():
    # CIFAR-100's 50,000 training images at batch 64, the last partial batch dropped: 781 iterations an epoch
    sokd = presets.PRESETS["sokd_resnet8x4_cifar100"]
    assert (sokd.epochs, sokd.iters, sokd.lr_steps, sokd.eval_every) == (240, None, (150, 180, 210), 10)
    resolved = resolve_schedule(sokd, 50_000 // 64)
    assert (resolved.iters, resolved.lr_steps, resolved.eval_every) == (187_440, (117_150, 140_580, 164_010), 7_810)
    assert resolved.method_options == {"base": "none", "base_options": sokd.method_options["base_options"],
                                       "search_iters": 39_050}  # SoKD searches over the first 50 epochs
    imagenet = resolve_schedule(presets.PRESETS["sokd_resnet18_imagenet"], 1_281_167 // 256)
    assert (imagenet.iters, imagenet.lr_steps, imagenet.method_options["search_iters"]) == (
        500_400, (150_120, 300_240, 450_360), 25_020)
    for name, recipe in presets.PRESETS.items():
        if recipe.task == "cls" and recipe.data != "synthetic":
            assert recipe.epochs is not None and "search_iters" not in recipe.method_options, name


def test_a_checkpoint_of_a_cifar_preset_written_in_iterations_resumes_under_the_epoch_preset():
    dist = presets.PRESETS["dist_resnet8x4_cifar100"]
    stored = dataclasses.asdict(dataclasses.replace(dist, epochs=None, iters=240 * 781, eval_every=7810,
                                                    lr_steps=(150 * 781, 180 * 781, 210 * 781)))
    del stored["epochs"]  # as the preset was, and as a checkpoint before the field was added has it
    assert recipe_changes(stored, dist) == []
    sokd = presets.PRESETS["sokd_resnet8x4_cifar100"]
    stored_sokd = {**stored, "method": "sokd", "method_options": {**sokd.method_options, "search_iters": 50 * 781}}
    del stored_sokd["method_options"]["search_epochs"]
    assert recipe_changes(stored_sokd, sokd) == []
    # a different run stays different: 10 more epochs, or a search over the first 40 epochs
    assert recipe_changes(stored, dataclasses.replace(dist, epochs=250)) == ["iters"]
    stored_sokd["method_options"]["search_iters"] = 40 * 781
    assert recipe_changes(stored_sokd, sokd) == ["method_options"]


def test_a_method_option_in_epochs_needs_an_epoch_based_recipe_and_replaces_the_one_in_iterations():
    sokd = presets.PRESETS["sokd_resnet8x4_cifar100"]
    check_schedule(sokd)
    with pytest.raises(ValueError, match=r"search_epochs: counts epochs .* \(the recipe has epochs=None\)"):
        check_schedule(dataclasses.replace(sokd, epochs=None, iters=100))
    with pytest.raises(ValueError, match="search_epochs: .*epochs=240, and search_iters"):
        check_schedule(dataclasses.replace(sokd, method_options={**sokd.method_options, "search_iters": 5}))


def test_check_pretrained_names_file_layout_and_origin(tmp_path):
    recipe = presets.PRESETS["retinanet_r50_fpn_2x_coco"]
    with pytest.raises(FileNotFoundError, match=r"resnet50-0676ba61.pth \(torchvision layout; .*IMAGENET1K_V1"):
        check_pretrained(recipe)
    weights = tmp_path / "r50.pth"
    weights.write_bytes(b"")
    check_pretrained(dataclasses.replace(recipe, pretrained=str(weights)))
    check_pretrained(dataclasses.replace(recipe, pretrained=None))


def test_mmdet_rows_group_batches_by_aspect_and_the_other_codes_shuffle_plainly():
    for name, recipe in presets.PRESETS.items():
        mmdet_based = (recipe.task in ("det", "ins") and recipe.data in ("coco", "voc")
                       and not name.startswith(("sokd_", "skd_fcos", "dist_fcos", "gdd_fcos")))
        assert recipe.group_by_aspect == mmdet_based, name


def test_skd_original_keeps_the_best_of_the_snapshots_train_and_eval_scores():
    """train_and_eval.py: steps count from 1; it evaluates after step s if (s > 1 and s % save_steps == 0
    and s > num_steps - 1000) or s == num_steps - 1, save_steps = int(2975 / batch)."""
    num_steps, save_steps = 40_000, int(2975 / 8)
    scored = tuple(s for s in range(1, num_steps + 1)
                   if (s > 1 and s % save_steps == 0 and s > num_steps - 1000) or s == num_steps - 1)
    assert scored == (39_326, 39_697, 39_999)
    recipe = presets.PRESETS["skd_pspnet_r18_cityscapes_original"]
    assert (recipe.eval_at, recipe.keep_best, recipe.iters) == (scored, True, num_steps)
    check_schedule(recipe)


# Auxiliary head and BatchNorm of every seg row, re-checked against the model code of each reference:
# - winycg/CIRKD@05a2753 models/{deeplabv3,pspnet}.py: auxlayer = _FCNHead(layer3 channels -> /4) on c3 (their
#   layer3, our c4); train_baseline.py / train_kd.py: CE + 0.4 CE(aux); the student's norm_layer is
#   nn.SyncBatchNorm under distributed training (hunto/DIST_KD segmentation/train_kd.py the same).
# - ZhgLiu/GDD semanticSeg configs/_base_/models/{pspnet,deeplabv3}_r50-d8.py (+ the r18-d8 overrides):
#   FCNHead in_index 2 (layer3), channels 256 (R18: 64), loss_weight 0.4, norm_cfg SyncBN, norm_eval False.
# - irfanICMLL/structure_knowledge_distillation networks/pspnet_combine.py: dsn on layer3, conv 1024 -> 512
#   (R18: 256 -> 128) + InPlaceABNSync; utils/criterion.py CriterionDSN: loss1 + 0.4 loss2; one GPU at
#   batch 8, so its synchronised BN normalises over the batch of 8, as SyncBN over 8 processes of 1 does.
# No difference was found; this table pins (aux input level, aux input channels, aux width).
AUX_HEADS = {("cirkd", 18): ("c4", 256, 64), ("cirkd", 101): ("c4", 1024, 256),
             ("mmseg", 18): ("c4", 256, 64), ("mmseg", 101): ("c4", 1024, 256),
             ("skd", 18): ("c4", 256, 128), ("skd", 101): ("c4", 1024, 512)}


def test_every_seg_row_has_the_references_aux_head_weight_and_syncbn():
    from kd_ref import configs, engine, segmentors
    assert segmentors.AUX_LOSS_WEIGHT == 0.4
    cuda_ddp = engine.Runtime(torch.device("cuda", 0), rank=0, world_size=8)
    rows = [r for r in presets.PRESETS.values() if r.task == "seg" and r.data != "synthetic"]
    assert len(rows) >= 13
    for recipe in rows:
        for arch in {recipe.student, recipe.teacher} - {None}:
            with torch.device("meta"):
                model = configs.TASKS["seg"].build_model(recipe, arch)
            level, in_channels, width = AUX_HEADS[recipe.flavour, int(arch.split("_r")[1])]
            conv = model.aux_head.block[0]
            assert (model.backbone.out_channels[level], conv.in_channels, conv.out_channels) == (
                in_channels, in_channels, width), (recipe.source, arch)
        synced = engine.synchronise_batchnorm(model, None, cuda_ddp)
        assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules()), recipe.source


def test_a_resumed_run_keeps_the_defaults_of_fields_its_checkpoint_predates():
    recipe = presets.PRESETS["faster_rcnn_r50_fpn_2x_coco"]
    stored = {name: value for name, value in dataclasses.asdict(recipe).items() if name != "group_by_aspect"}
    resumed, reset = resumed_recipe(stored, recipe)
    assert recipe.group_by_aspect and not resumed.group_by_aspect and reset == ["group_by_aspect"]
    assert recipe_changes(stored, resumed) == []
    assert resumed_recipe(dataclasses.asdict(recipe), recipe) == (recipe, [])
    # set by a flag of the resuming command: kept as given, and then it differs from the checkpoint's run
    kept, reset = resumed_recipe(stored, recipe, explicit=frozenset({"group_by_aspect"}))
    assert kept == recipe and reset == [] and recipe_changes(stored, kept) == ["group_by_aspect"]
