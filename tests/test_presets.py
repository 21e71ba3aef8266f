"""Presets (kd_ref/presets*.py) and the recipe helpers (kd_ref/recipe.py): the baseline twins of
``register``, the task-loss weights of the KD rows, the pinning against the reference recipes."""
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import torch

from kd_ref import presets, presets_cls, presets_depth, tasks
from kd_ref.presets_det import TORCHVISION_WEIGHTS
from kd_ref.recipe import (DISTILLATION_FIELDS, PER_PROCESS_TERMS, Recipe, check_pretrained, check_schedule,
                           per_process_terms, process_count_note, recipe_changes, reference_launch, register,
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


def test_every_synthetic_preset_draws_one_data_set_whatever_its_seed():
    # seeds then vary the initial weights, data order and augmentation, as on a real data set: the spread of
    # bench_effect over seeds is the training's, not the scenes'
    synthetic = {name: recipe for name, recipe in presets.PRESETS.items() if recipe.data == "synthetic"}
    assert synthetic and {recipe.synthetic_seed for recipe in synthetic.values()} == {0}


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
# Every field of every real-data preset, at the value of the reference config it names, or at the value of
# a deviation listed below with its reason and the reference's file:line. The tables are literal (no value
# is read from kd_ref), so a changed preset or Recipe default fails here until the change is re-checked.
# Fields the reference does not set for its task (synthetic-data fields, the other tasks' input fields, the
# seed, how often last.pt is written) are pinned at the values the presets give them.
INERT = {"teacher": None, "synthetic_size": (128, 128), "synthetic_train": 2000, "synthetic_val": 100,
         "synthetic_style": "standard", "synthetic_seed": None, "teacher_preset": None, "seed": 0, "classes": None,
         "model_options": {},
         "student_init": None,
         "task_loss_weight": 1.0, "eval_at": (), "method": "none", "method_options": {}, "ckpt_every": 1000,
         "nesterov": False, "norm_weight_decay": None, "bias_weight_decay": None, "bias_lr_factor": 1.0,
         "grad_clip": None, "dataset_repeat": 1, "momentum": 0.9, "poly_power": 0.9, "warmup_ratio": 0.001}
SEG_FIELDS = {"flavour": "cirkd", "crop": (512, 1024), "scales": (0.5, 2.0), "scale_step": 0.1, "cat_max_ratio": None,
              "photometric_distortion": False}
DET_FIELDS = {"image_scale": (1333, 800), "train_image_scales": (), "multiscale_mode": "value",
              "rcnn_rois_per_image": 512, "group_by_aspect": False}
SEG = {**INERT, **DET_FIELDS, "task": "seg", "data": "cityscapes", "num_classes": 19, "epochs": None,
       "schedule": "poly", "lr_steps": (), "warmup_iters": 0, "sync_bn": True}
# winycg/CIRKD@05a2753 train_baseline.py / train_kd.py argparse defaults + the train_scripts (--nproc_per_node=8)
CIRKD = {**SEG, **SEG_FIELDS, "normalization": "bgr_mean", "batch_size": 16, "iters": 40000, "lr": 0.02,
         "weight_decay": 1e-4, "min_lr": 0.0, "eval_every": 800, "keep_best": True, "gpus": 8,
         "pretrained": "resnet18-imagenet.pth", "student": "deeplabv3_r18", "teacher": "deeplabv3_r101"}
# ZhgLiu/GDD semanticSeg configs: cityscapes_512x512.py + schedule_40k.py, 2 images per process
MMSEG = {**SEG, **SEG_FIELDS, "flavour": "mmseg", "crop": (512, 512), "scale_step": None, "cat_max_ratio": 0.75,
         "photometric_distortion": True, "normalization": "imagenet_rgb", "batch_size": 16, "iters": 40000,
         "lr": 0.01, "weight_decay": 5e-4, "min_lr": 1e-4, "eval_every": 4000, "keep_best": False, "gpus": 8,
         "pretrained": "resnet18_v1c.pth", "teacher": "pspnet_r101"}
# irfanICMLL/structure_knowledge_distillation run_train_val.sh (one GPU, batch 8), train_options.py, CSDataSet
SKD_ORIGINAL = {**SEG, **SEG_FIELDS, "flavour": "skd", "crop": (512, 512), "scales": (0.7, 2.1), "batch_size": 8,
                "normalization": "bgr_mean", "iters": 40000, "lr": 0.01, "weight_decay": 5e-4, "min_lr": 0.0,
                "eval_every": 0, "keep_best": True, "eval_at": (39_326, 39_697, 39_999), "gpus": 1,
                "pretrained": "resnet18-imagenet.pth", "student": "pspnet_r18", "teacher": "pspnet_r101"}
# SKDDistiller's options for that code (its defaults are CIRKD's); irfanICMLL/structure_knowledge_distillation:
SKD_ORIGINAL_METHOD = {
    "tau": 1.0, "pi_normalize": "spatial",  # utils/criterion.py:225 (no temperature; sum / W / H)
    "lambda_pi": 10.0,                      # run_train_val.sh:4
    "pa_kernel": None, "pa_scale": 0.5,     # run_train_val.sh:23, utils/criterion.py:242
    "pa_detach_norm": True,                 # utils/utils.py:175
    "lambda_pa": 0.5,                       # run_train_val.sh:22
    "adv_type": "wgan", "lambda_gp": 10.0,  # utils/train_options.py:52, 55
    "lambda_adv": 0.1, "lambda_d": 0.1,     # networks/kd_model.py:149, 158 (both are lambda_d), run_train_val.sh:5
    "d_optimizer": "sgd", "d_momentum": 0.9, "d_weight_decay": 5e-4,  # networks/kd_model.py:75, run_train_val.sh:13
    "d_lr": 4e-4, "d_poly_power": 0.9,      # utils/train_options.py:62, 38; train_and_eval.py:23
    "d_sync_batchnorm": False}              # networks/sagan_models.py:148 (BatchNorm2d, one GPU)
CLS = {**INERT, **DET_FIELDS, **SEG_FIELDS, "task": "cls", "iters": None, "schedule": "step", "min_lr": 0.0,
       "warmup_iters": 0, "eval_every": 1, "keep_best": True, "pretrained": None, "sync_bn": False}
# CRD protocol: hunto/image_classification_sota@d9662f7 configs/strategies/distill/dist_cifar.yaml (dist_train.sh 1),
# megvii-research/mdistiller configs/cifar100/kd.yaml, FabienCode/mdistiller configs/DFKD/cifar/*.yaml
CIFAR = {**CLS, "data": "cifar100", "num_classes": 100, "crop": (32, 32), "normalization": "cifar100",
         "batch_size": 64, "epochs": 240, "lr": 0.05, "weight_decay": 5e-4, "lr_steps": (150, 180, 210),
         "ckpt_every": 781, "gpus": 1}
# image_classification_sota configs/strategies/distill/resnet_dist.yaml: 32 images x 8 processes, Nesterov,
# no decay on 1-D parameters (lib/utils/optim.py)
IMAGENET = {**CLS, "data": "imagenet", "num_classes": 1000, "crop": (224, 224), "normalization": "imagenet_rgb",
            "batch_size": 256, "epochs": 100, "lr": 0.1, "weight_decay": 1e-4, "lr_steps": (30, 60, 90), "gpus": 8,
            "nesterov": True, "norm_weight_decay": 0.0, "bias_weight_decay": 0.0, "student": "resnet18",
            "teacher": "resnet34"}
# mmdetection 2.x coco_detection.py, schedule_{1x,2x}.py, 8 processes x 2 images, GroupSampler
MMDET = {**INERT, **SEG_FIELDS, **DET_FIELDS, "task": "det", "data": "coco", "num_classes": 80,
         "normalization": "imagenet_rgb", "batch_size": 16, "iters": None, "epochs": 24, "lr_steps": (16, 22),
         "weight_decay": 1e-4, "schedule": "step", "min_lr": 0.0, "warmup_iters": 500, "eval_every": 1,
         "keep_best": False, "group_by_aspect": True, "gpus": 8, "sync_bn": True}
# mmdetection 2.x pascal_voc/*_voc0712.py: RepeatDataset times 3, 4 epochs, step 3, lr 0.01, 1000x600, no warm-up
VOC = {**MMDET, "data": "voc", "num_classes": 20, "image_scale": (1000, 600), "lr": 0.01, "epochs": 4,
       "lr_steps": (3,), "dataset_repeat": 3, "warmup_iters": 0}
# FabienCode/mdistiller detection/configs/RegKD/*.yaml on Base-Distillation.yaml and detectron2's defaults
SOKD_DET_OPTIONS = {"k": 8, "num_heat": 2, "w_feat": 2.0, "w_dam": 1.0, "search_mode": "first_order", "base": "kd",
                    "base_options": {"kd": {"tau": 4.0}, "dist": {}, "gdd": {"alpha": 4.0, "tau": 4.0}},
                    "search_iters": 36_000}
SOKD_COCO = {**MMDET, "method": "sokd", "iters": 180_000, "epochs": None, "lr": 0.01,
             "lr_steps": (120_000, 160_000), "warmup_iters": 1000, "norm_weight_decay": 0.0,
             "train_image_scales": tuple((1333, side) for side in (640, 672, 704, 736, 768, 800)),
             "group_by_aspect": False, "method_options": SOKD_DET_OPTIONS, "teacher": "faster_rcnn_r101"}
# tianzhi0549/FCOS configs/fcos/fcos_syncbn_bs32_c128_MNV2_FPN_1x.yaml + fcos_core/config/defaults.py
FCOS = {**MMDET, "student": "fcos_mv2_c128", "teacher": "fcos_r101", "batch_size": 32, "lr": 0.01, "epochs": None,
        "iters": 90_000, "lr_steps": (60_000, 80_000), "warmup_ratio": 1 / 3, "eval_every": 0,
        "group_by_aspect": False, "bias_lr_factor": 2.0, "bias_weight_decay": 0.0,
        "normalization": "caffe2_bgr", "pretrained": "mobilenet_v2-b0353104.pth"}
INS = {**MMDET, "task": "ins"}
# mmdetection 2.x solo/solo_r50_fpn_1x_coco.py
SOLO = {**INS, "lr": 0.01, "epochs": 12, "lr_steps": (8, 11), "student": "solo_r50",
        "pretrained": TORCHVISION_WEIGHTS[50]}


def _twin(row: dict) -> dict:
    """The baseline twin of a distillation row's expectation: the distillation-only fields at their defaults."""
    return {**row, "method": "none", "method_options": {}, "student_init": None, "task_loss_weight": 1.0}


def _with_twin(name: str, row: dict, twin: dict | None = None) -> dict:
    return {name: row, f"{name}_baseline": _twin(row) if twin is None else twin}


CIFAR_PAIRS = {"resnet8x4": "resnet32x4", "wrn_40_1": "wrn_40_2", "wrn_16_2": "wrn_40_2", "resnet20": "resnet56",
               "resnet32": "resnet110"}
MDISTILLER_KD = {"tau": 4.0, "loss_weight": 0.9}  # megvii-research/mdistiller mdistiller/engine/cfg.py KD defaults
REFERENCE = {
    # --- segmentation
    "teacher_deeplabv3_r101_cityscapes": {**CIRKD, "student": "deeplabv3_r101", "teacher": None,
                                          "pretrained": "resnet101-imagenet.pth"},
    **_with_twin("kd_deeplabv3_r18_cityscapes", {**CIRKD, "method": "kd"}),
    **_with_twin("skd_deeplabv3_r18_cityscapes", {**CIRKD, "method": "skd", "method_options": {}}),  # SKDDistiller's defaults
    # hunto/DIST_KD segmentation/train_kd.py: wd 5e-4, lr = 1e-4 + (0.02 - 1e-4)(1 - it/max)^0.9, val 400; its
    # quoted baselines are CIRKD train_baseline.py runs
    **{name: row for student in ("deeplabv3_r18", "pspnet_r18") for name, row in _with_twin(
        f"dist_{student}_cityscapes", {**CIRKD, "method": "dist", "student": student, "weight_decay": 5e-4,
                                       "min_lr": 1e-4, "eval_every": 400},
        {**CIRKD, "student": student}).items()},
    # ZhgLiu/GDD semanticSeg/configs/distillers/gdd/*.py: alpha 145 / 175, temperature 4
    **_with_twin("gdd_pspnet_r18_cityscapes", {**MMSEG, "method": "gdd", "student": "pspnet_r18",
                                               "method_options": {"alpha": 145.0, "tau": 4.0}}),
    **_with_twin("gdd_deeplabv3_r18_cityscapes", {**MMSEG, "method": "gdd", "student": "deeplabv3_r18",
                                                  "method_options": {"alpha": 175.0, "tau": 4.0}}),
    # mmseg pspnet_r101-d8_512x1024_40k_cityscapes.py (cityscapes.py: 512x1024 crops, 2 per GPU; model zoo: 4 GPUs)
    "teacher_pspnet_r101_cityscapes_mmseg": {**MMSEG, "crop": (512, 1024), "pretrained": "resnet101_v1c.pth",
                                             "student": "pspnet_r101", "teacher": None, "batch_size": 8, "gpus": 4},
    **_with_twin("skd_pspnet_r18_cityscapes_original", {**SKD_ORIGINAL, "method": "skd",
                                                        "method_options": SKD_ORIGINAL_METHOD}),
    # not released: the student's recipe (DEVIATIONS)
    "teacher_pspnet_r101_cityscapes_skd": {**SKD_ORIGINAL, "student": "pspnet_r101", "teacher": None,
                                           "pretrained": "resnet101-imagenet.pth", "eval_every": 4000,
                                           "keep_best": False, "eval_at": ()},
    # --- classification
    **{f"teacher_{teacher}_cifar100": {**CIFAR, "student": teacher, "teacher": None}
       for teacher in ("resnet32x4", "resnet56", "resnet110", "wrn_40_2")},
    **{name: row for student in ("resnet8x4", "wrn_40_1", "resnet20") for name, row in _with_twin(
        f"dist_{student}_cifar100", {**CIFAR, "method": "dist", "student": student, "teacher": CIFAR_PAIRS[student],
                                     "method_options": {"tau": 4.0, "loss_weight": 2.0}}).items()},
    # FabienCode/mdistiller configs/DFKD/cifar/res324_84.yaml: SERACH_EPOCH 50, AUG_FEAT / DAM_AREA weights 1000
    **{name: row for student, teacher in CIFAR_PAIRS.items() for name, row in {
        **_with_twin(f"sokd_{student}_cifar100", {
            **CIFAR, "method": "sokd", "student": student, "teacher": teacher, "method_options": {
                "base": "none", "base_options": {"kd": {"tau": 4.0}, "dist": {"tau": 4.0, "loss_weight": 2.0}},
                "search_epochs": 50}}),
        **_with_twin(f"kd_{student}_cifar100", {**CIFAR, "method": "kd", "student": student, "teacher": teacher,
                                                "method_options": MDISTILLER_KD, "task_loss_weight": 0.1}),
        **_with_twin(f"sokd_kd_{student}_cifar100", {
            **CIFAR, "method": "sokd", "student": student, "teacher": teacher, "task_loss_weight": 0.1,
            "method_options": {"base": "kd", "base_options": {"kd": MDISTILLER_KD}, "search_epochs": 50}})}.items()},
    # resnet_kdt4.yaml: ori_loss_weight 0.9, kd_loss_weight 1, T 4; resnet_dist.yaml: 1 + 2 x DIST at tau 1
    "kd_resnet18_imagenet": {**IMAGENET, "method": "kd", "method_options": {"tau": 4.0}, "task_loss_weight": 0.9},
    "kd_resnet18_imagenet_baseline": IMAGENET,
    "dist_resnet18_imagenet": {**IMAGENET, "method": "dist", "method_options": {"tau": 1.0, "loss_weight": 2.0}},
    "dist_resnet18_imagenet_baseline": IMAGENET,
    # FabienCode/mdistiller configs/DFKD/imagenet/reviewkdDFKD_r34_18.yaml: one process, plain SGD on every
    # parameter, SERACH_EPOCH 5, weights 1
    **_with_twin("sokd_resnet18_imagenet", {
        **IMAGENET, "method": "sokd", "gpus": 1, "nesterov": False, "norm_weight_decay": None,
        "bias_weight_decay": None, "method_options": {
            "base": "kd", "base_options": {"kd": {"tau": 4.0}, "dist": {"tau": 1.0, "loss_weight": 2.0}},
            "w_feat": 1.0, "w_dam": 1.0, "search_epochs": 5}}),
    # --- detection: the mmdet baselines and teachers
    **{f"{arch}_r{depth}_fpn_{schedule}_coco": {
        **MMDET, "student": f"{arch}_r{depth}", "lr": lr, "epochs": epochs, "lr_steps": steps,
        "pretrained": TORCHVISION_WEIGHTS[depth]}
       for arch, lr in (("faster_rcnn", 0.02), ("retinanet", 0.01)) for depth in (50, 101)
       for schedule, epochs, steps in (("1x", 12, (8, 11)), ("2x", 24, (16, 22)))},
    **{f"{arch}_r{depth}_fpn_voc0712": {**VOC, "student": f"{arch}_r{depth}", "pretrained": TORCHVISION_WEIGHTS[depth]}
       for arch in ("faster_rcnn", "retinanet") for depth in (50, 101)},
    # GKD (DAVAR-Lab-ML ECCV22_.../configs/faster_rcnn_coco_kd_config.py: the 2x student from its trained
    # checkpoint, 8 GPUs x 2), DIST (hunto/MasKD mmrazor configs), GDD (objectDet config: + clipping 35)
    **{name: row for arch, lr in (("faster_rcnn", 0.02), ("retinanet", 0.01)) for name, row in {
        **_with_twin(f"gkd_{arch}_r50_fpn_2x_coco", {
            **MMDET, "method": "gkd", "student": f"{arch}_r50", "teacher": f"{arch}_r101", "lr": lr,
            "pretrained": TORCHVISION_WEIGHTS[50], "student_init": f"runs/{arch}_r50_fpn_2x_coco/last.pt"}),
        **_with_twin(f"gkd_{arch}_r50_fpn_voc0712", {
            **VOC, "method": "gkd", "student": f"{arch}_r50", "teacher": f"{arch}_r101",
            "pretrained": TORCHVISION_WEIGHTS[50]}),
        **_with_twin(f"dist_{arch}_r50_fpn_2x_coco", {
            **MMDET, "method": "dist", "student": f"{arch}_r50", "teacher": f"{arch}_r101", "lr": lr,
            "pretrained": TORCHVISION_WEIGHTS[50]})}.items()},
    **_with_twin("gdd_faster_rcnn_r50_fpn_2x_coco", {
        **MMDET, "method": "gdd", "student": "faster_rcnn_r50", "teacher": "faster_rcnn_r101", "lr": 0.02,
        "grad_clip": 35.0, "method_options": {"alpha": 4.0, "tau": 4.0}, "pretrained": TORCHVISION_WEIGHTS[50]},
        {**MMDET, "student": "faster_rcnn_r50", "teacher": "faster_rcnn_r101", "lr": 0.02,
         "pretrained": TORCHVISION_WEIGHTS[50]}),
    # SoKD: RegKD-R50-R101.yaml IMS_PER_BATCH 8 (4 processes, detection/README.md), RegKD-R18-R101.yaml and
    # RegKD-MV2-R50.yaml IMS_PER_BATCH 1 (one process)
    **_with_twin("sokd_faster_rcnn_r50_fpn_coco", {**SOKD_COCO, "student": "faster_rcnn_r50", "batch_size": 8,
                                                   "gpus": 4, "eval_every": 14_658,
                                                   "pretrained": TORCHVISION_WEIGHTS[50]}),
    **_with_twin("sokd_faster_rcnn_r18_fpn_coco", {**SOKD_COCO, "student": "faster_rcnn_r18", "batch_size": 1,
                                                   "gpus": 1, "eval_every": 117_266,
                                                   "pretrained": TORCHVISION_WEIGHTS[18]}),
    **_with_twin("sokd_faster_rcnn_mv2_fpn_coco", {**SOKD_COCO, "student": "faster_rcnn_mv2",
                                                   "teacher": "faster_rcnn_r50", "batch_size": 1, "gpus": 1,
                                                   "eval_every": 117_266, "pretrained": "mobilenet_v2-b0353104.pth"}),
    **_with_twin("skd_fcos_mv2_c128_coco", {**FCOS, "method": "skd"}),
    "dist_fcos_mv2_c128_coco": {**FCOS, "method": "dist"},
    "gdd_fcos_mv2_c128_coco": {**FCOS, "method": "gdd", "method_options": {"alpha": 65.0, "tau": 4.0}},
    # --- instance segmentation
    "solo_r50_fpn_1x_coco": SOLO,
    # WXinlong/SOLO configs/solo/solo_r101_fpn_8gpu_3x.py: multi-scale 'value', 36 epochs, steps 27/33, warm-up from
    # 1/3, grad_clip max_norm 35
    "solo_r101_fpn_3x_coco": {**SOLO, "student": "solo_r101", "pretrained": TORCHVISION_WEIGHTS[101], "epochs": 36,
                              "lr_steps": (27, 33), "warmup_ratio": 1 / 3, "grad_clip": 35.0,
                              "train_image_scales": tuple((1333, side) for side in (800, 768, 736, 704, 672, 640))},
    **_with_twin("gdd_solo_r50_fpn_1x_coco", {**SOLO, "method": "gdd", "teacher": "solo_r101", "grad_clip": 35.0,
                                              "method_options": {"alpha": 200.0, "tau": 4.0, "init_student": True}},
                 {**SOLO, "teacher": "solo_r101"}),
    **{f"maskrcnn_r{depth}_fpn_{schedule}_coco": {
        **INS, "student": f"maskrcnn_r{depth}", "lr": 0.02, "epochs": epochs, "lr_steps": steps,
        "pretrained": TORCHVISION_WEIGHTS[depth]}
       for depth in (50, 101) for schedule, epochs, steps in (("1x", 12, (8, 11)), ("2x", 24, (16, 22)))},
    **_with_twin("gdd_maskrcnn_r50_fpn_2x_coco", {
        **INS, "method": "gdd", "student": "maskrcnn_r50", "teacher": "maskrcnn_r101", "lr": 0.02, "grad_clip": 35.0,
        "method_options": {"alpha": 4.0, "tau": 4.0}, "pretrained": TORCHVISION_WEIGHTS[50]},
        {**INS, "student": "maskrcnn_r50", "teacher": "maskrcnn_r101", "lr": 0.02,
         "pretrained": TORCHVISION_WEIGHTS[50]}),
    # --- depth: VNL's one-process launch (nn.DataParallel: per-GPU BN), virtual-normal weight 6 (lib/core/config.py:73)
    # and weight decay 5e-4 (metric_depth_model.py:98); the rest [paper?] (DEVIATIONS)
    **_with_twin("skd_depth_mv2_nyu", {
        **INERT, **DET_FIELDS, **SEG_FIELDS, "task": "depth", "data": "nyu", "method": "skd", "num_classes": 19,
        "student": "depth_mv2", "teacher": "depth_x101", "crop": (385, 385), "normalization": "imagenet_rgb",
        "model_options": {"num_bins": 150, "d_min": 0.1, "d_max": 17.0, "focal": 519.0, "lambda_vn": 6.0},
        "batch_size": 12, "iters": None, "epochs": 200, "lr": 0.001, "weight_decay": 5e-4, "schedule": "poly",
        "min_lr": 0.0, "lr_steps": (), "warmup_iters": 0, "eval_every": 10, "keep_best": False, "gpus": 1,
        "sync_bn": False,
        "pretrained": "mobilenet_v2-b0353104.pth"}),
}
# Where a preset keeps a value other than its reference's (or the reference gives none): preset -> field ->
# {"reference": the reference's (None: not given), "reason", "where": the
# reference's file:line}. A preset whose whole recipe is unknown lists its source instead ("*").
GDD_BATCH = {"reference": 2, "reason": "processes: 8 x 2 images (the first README's and MGD's launch, "
             "whose setting the paper's baselines come from, gdd.md §9.5) where the current README launches "
             "2 (or 1) processes", "where": "ZhgLiu/GDD semanticSeg/README.md:46 (objectDet/README.md:41; "
                                            "90d0497 README.md:17 launches 8)"}
DEVIATIONS = {
    **{name: {"gpus": GDD_BATCH} for name in (
        "gdd_pspnet_r18_cityscapes", "gdd_pspnet_r18_cityscapes_baseline", "gdd_deeplabv3_r18_cityscapes",
        "gdd_deeplabv3_r18_cityscapes_baseline", "gdd_faster_rcnn_r50_fpn_2x_coco", "gdd_solo_r50_fpn_1x_coco")},
    "skd_pspnet_r18_cityscapes_original": {"keep_best": {
        "reference": None, "reason": "best of the three snapshots the code scores: it names each file "
        "with its mIoU and does not say which one the paper reports",
        "where": "irfanICMLL/structure_knowledge_distillation networks/kd_model.py:193"}},
    "teacher_pspnet_r101_cityscapes_skd": {"*": "unknown: only the checkpoint is released; the student's recipe"},
    **{f"teacher_{teacher}_cifar100": {"*": "unknown teacher config; DIST_KD releases trained teachers"}
       for teacher in ("resnet32x4", "resnet56", "resnet110", "wrn_40_2")},
    **{name: {"*": "ours: DIST's recipe without KD; DIST's 69.76 is torchvision's ResNet-18 (its own recipe), "
               "hunto/DIST_KD README.md:46"}
       for name in ("kd_resnet18_imagenet_baseline", "dist_resnet18_imagenet_baseline")},
    "sokd_resnet18_imagenet": {"method_options": {
        "reference": "base ReviewKD (hcl loss of ABF fusions)",
        "reason": "kd_ref builds no ReviewKD",
        "where": "FabienCode/mdistiller mdistiller/distillers/DFKD_ReviewKD.py:123"}},
    "gkd_retinanet_r50_fpn_2x_coco": {"*": "unknown: no released RetinaNet config; the Faster R-CNN config's settings"},
    **{f"gkd_{arch}_r50_fpn_voc0712": {"*": "unknown: no released VOC config; the COCO KD settings on mmdet's VOC "
                                            "schedule"} for arch in ("faster_rcnn", "retinanet")},
    **{f"{arch}_r101_fpn_voc0712": {"student": {
        "reference": f"{arch}_r50", "reason": "the VOC teachers: the R50 config with R101",
        "where": f"open-mmlab/mmdetection v2.x configs/pascal_voc/{arch}_r50_fpn_1x_voc0712.py:1"}}
       for arch in ("faster_rcnn", "retinanet")},
    "dist_retinanet_r50_fpn_2x_coco": {"teacher": {
        "reference": "RetinaNet X101-64x4d", "reason": "no X101 backbone in kd_ref",
        "where": "hunto/MasKD mmrazor/configs/distill/dist/dist_retinanet_x101-retinanet-r50_coco.py:69"}},
    "dist_faster_rcnn_r50_fpn_2x_coco": {"teacher": {
        "reference": "Cascade Mask R-CNN X101-64x4d", "reason": "no X101 or cascade in kd_ref",
        "where": "hunto/MasKD mmrazor/configs/distill/dist/dist_cascade_mask_rcnn_x101-fpn_x50_coco.py:117"}},
    **{f"sokd_faster_rcnn_{student}_fpn_coco": {
        "pretrained": {"reference": f"pretrained/{pair}.pth",
                       "reason": "the configs' student-and-teacher files are not public",
                       "where": f"FabienCode/mdistiller detection/configs/RegKD/RegKD-{pair.upper()}.yaml:{line}"},
        "eval_every": {"reference": 0, "reason": "detectron2 evaluates only at the end",
                       "where": "detectron2/config/defaults.py _C.TEST.EVAL_PERIOD = 0"},
        "group_by_aspect": {"reference": True, "reason": "detectron2's aspect grouping is not reproduced",
                            "where": "detectron2/config/defaults.py _C.DATALOADER.ASPECT_RATIO_GROUPING = True"},
        **({"gpus": {"reference": 4, "reason": "IMS_PER_BATCH 1 cannot be split over the README's 4 processes",
                     "where": "FabienCode/mdistiller detection/README.md:25"}} if student != "r50" else {})}
       for student, pair, line in (("r50", "r50-r101", 6), ("r18", "r18-r101", 9), ("mv2", "mv2-r50", 7))},
    **{name: {
        "warmup_ratio": {"reference": "constant 1/3", "reason": "the engine's warm-up is linear",
                         "where": "tianzhi0549/FCOS configs/fcos/fcos_syncbn_bs32_c128_MNV2_FPN_1x.yaml:30"},
        "group_by_aspect": {"reference": True, "reason": "maskrcnn-benchmark's aspect grouping is not "
                            "reproduced", "where": "tianzhi0549/FCOS fcos_core/config/defaults.py:83"},
        "teacher": {"reference": None, "reason": "the paper's teacher is not known here",
                    "where": "depth_fcos.md §5"}}
       for name in ("skd_fcos_mv2_c128_coco", "skd_fcos_mv2_c128_coco_baseline", "dist_fcos_mv2_c128_coco",
                    "gdd_fcos_mv2_c128_coco")},
    "gdd_maskrcnn_r50_fpn_2x_coco": {"*": "ours: no paper or config distils Mask R-CNN with GDD"},
    "skd_depth_mv2_nyu": {"*": "[paper?]: the SKD depth schedule is unverified; VNL's bins, focal and crop"},
}
DEVIATIONS["gdd_faster_rcnn_r50_fpn_2x_coco"]["teacher"] = {
    "reference": "Cascade Mask R-CNN X101-32x4d-DCN", "reason": "no X101, DCN or cascade in kd_ref",
    "where": "ZhgLiu/GDD objectDet/configs/distillers/gdd/cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_"
             "2x_coco.py:63"}
DEVIATIONS["skd_depth_mv2_nyu_baseline"] = DEVIATIONS["skd_depth_mv2_nyu"]
REAL_DATA_PRESETS = sorted(name for name, recipe in presets.PRESETS.items() if recipe.data != "synthetic")
PINNED_FIELDS = {spec.name for spec in dataclasses.fields(Recipe)} - {"source"}


def test_the_pins_cover_every_real_data_preset_and_every_recipe_field():
    assert sorted(REFERENCE) == REAL_DATA_PRESETS
    for name, expected in REFERENCE.items():
        assert set(expected) == PINNED_FIELDS, (name, sorted(set(expected) ^ PINNED_FIELDS))


@pytest.mark.parametrize("name", REAL_DATA_PRESETS)
def test_preset_equals_its_reference_config_field_by_field(name):
    actual = {key: value for key, value in dataclasses.asdict(presets.PRESETS[name]).items() if key != "source"}
    assert actual == REFERENCE[name], {key: (actual[key], REFERENCE[name][key]) for key in PINNED_FIELDS
                                       if actual[key] != REFERENCE[name][key]}


def test_every_deviation_says_why_and_where_the_reference_differs():
    for name, entries in DEVIATIONS.items():
        assert name in REFERENCE, name
        for field, entry in entries.items():
            if field == "*":  # the whole recipe is ours or unknown, and its source says so
                assert entry and presets.PRESETS[name].source.startswith(("unknown", "ours", "[paper?]")), name
            else:
                assert field in PINNED_FIELDS and set(entry) == {"reference", "reason", "where"}, (name, field)
                assert entry["reason"] and entry["where"], (name, field)
    for name in REAL_DATA_PRESETS:  # a recipe its source calls ours or unknown is listed as such
        if presets.PRESETS[name].source.startswith(("unknown", "ours", "[paper?]")):
            assert "*" in DEVIATIONS.get(name, {}), name


# Every file a preset's source cites must exist in the repository revision it names: the source's tokens
# "owner/name[@commit]" (and "v2.x" after it) open a repository, and each file path after it belongs to
# it (no revision named: the newest snapshot, whose commit the record keeps). tests/data/reference_sources.json
# holds, per repository revision, the files of each cited folder, recorded with fetch + git ls-tree (or
# find_files for the open-mmlab repositories, too large to fetch; the commit of the version seen per file).
REFERENCE_SOURCES = json.loads((Path(__file__).parent / "data" / "reference_sources.json").read_text())
SOURCE_FILE = re.compile(r"^[\w./-]+\.(py|yaml|sh)$|^[\w.-]+/[\w./-]+\.md$")
SOURCE_REPOSITORY = re.compile(r"^([A-Za-z0-9][\w-]*/[\w.-]+?)(?:@([0-9a-f]{7,40}))?$")
SOURCE_VERSION = re.compile(r"^v\d+\.x$")


OWN_DOCS = "docs/"  # a citation of this repository's own documents, not of a reference repository


def cited_files(source: str) -> list:
    """(repository revision key of REFERENCE_SOURCES, path) of every file ``source`` cites."""
    known = {key.split("@")[0] for key in REFERENCE_SOURCES}
    pairs, current = [], None
    tokens = [token.strip("(),;") for token in source.split()]
    for i, token in enumerate(tokens):
        repository = SOURCE_REPOSITORY.match(token)
        if repository and not SOURCE_FILE.match(token) and repository.group(1) in known:
            following = tokens[i + 1] if i + 1 < len(tokens) else ""
            revision = repository.group(2) or (following if SOURCE_VERSION.match(following) else "HEAD")
            current = f"{repository.group(1)}@{revision}"
        elif SOURCE_FILE.match(token) and current is not None and not token.startswith(OWN_DOCS):
            pairs.append((current, token))
    return pairs


def test_every_source_path_exists_in_the_named_repository_revision():
    assert cited_files("winycg/CIRKD@05a2753 train_kd.py + winycg/CIRKD@50fb43c train_scripts/train_kd/a.sh "
                       "(sokd.md §5); open-mmlab/mmdetection v2.x configs/b.py") == [
        ("winycg/CIRKD@05a2753", "train_kd.py"), ("winycg/CIRKD@50fb43c", "train_scripts/train_kd/a.sh"),
        ("open-mmlab/mmdetection@v2.x", "configs/b.py")]
    for name in REAL_DATA_PRESETS:
        source = presets.PRESETS[name].source
        cited = cited_files(source)
        assert cited or source.startswith(("unknown teacher", "[paper?]")), (name, source)
        for key, path in cited:
            assert path in REFERENCE_SOURCES[key]["paths"], (name, key, path)
    own_documents = {token.strip("(),;") for name in REAL_DATA_PRESETS for token in presets.PRESETS[name].source.split()
                     if token.startswith(OWN_DOCS)}
    assert own_documents, "no preset cites docs/: the check below would test nothing"
    for path in own_documents:
        assert os.path.isfile(os.path.join(os.path.dirname(__file__), os.pardir, path)), path
    # the records tell a missing file: CIRKD's plain-KD launch script is not in 05a2753, which the KD row cited
    assert "train_scripts/train_kd/train_skd.sh" in REFERENCE_SOURCES["winycg/CIRKD@05a2753"]["paths"]
    assert "train_scripts/train_kd/deeplabv3_res18.sh" not in REFERENCE_SOURCES["winycg/CIRKD@05a2753"]["paths"]


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
    assert (sokd.epochs, sokd.iters, sokd.lr_steps, sokd.eval_every) == (240, None, (150, 180, 210), 1)
    resolved = resolve_schedule(sokd, 50_000 // 64)
    assert (resolved.iters, resolved.lr_steps, resolved.eval_every) == (187_440, (117_150, 140_580, 164_010), 781)
    assert resolved.method_options == {"base": "none", "base_options": sokd.method_options["base_options"],
                                       "search_iters": 39_050}  # SoKD searches over the first 50 epochs
    imagenet = resolve_schedule(presets.PRESETS["sokd_resnet18_imagenet"], 1_281_167 // 256)
    assert (imagenet.iters, imagenet.lr_steps, imagenet.method_options["search_iters"]) == (
        500_400, (150_120, 300_240, 450_360), 25_020)
    for name, recipe in presets.PRESETS.items():
        if recipe.task == "cls" and recipe.data != "synthetic":
            assert recipe.epochs is not None and "search_iters" not in recipe.method_options, name


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
    from kd_ref import engine, segmentors, tasks
    from kd_ref.runtime import Runtime
    assert segmentors.AUX_LOSS_WEIGHT == 0.4
    cuda_ddp = Runtime(torch.device("cuda", 0), rank=0, world_size=8)
    rows = [r for r in presets.PRESETS.values() if r.task == "seg" and r.data != "synthetic"]
    assert len(rows) >= 13
    for recipe in rows:
        for arch in {recipe.student, recipe.teacher} - {None}:
            with torch.device("meta"):
                model = tasks.TASKS["seg"].build_model(recipe, arch)
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


def test_each_row_launches_with_its_references_process_count():
    original = presets.PRESETS["skd_pspnet_r18_cityscapes_original"]
    assert reference_launch("skd_pspnet_r18_cityscapes_original", original) == (
        "torchrun --nproc_per_node=1 train.py --preset skd_pspnet_r18_cityscapes_original")
    assert reference_launch("gdd_pspnet_r18_cityscapes", presets.PRESETS["gdd_pspnet_r18_cityscapes"]).startswith(
        "torchrun --nproc_per_node=8 ")
    assert reference_launch("synthetic_seg_none", presets.PRESETS["synthetic_seg_none"]) == (
        "python train.py --preset synthetic_seg_none")


def test_a_process_count_other_than_the_references_names_the_per_process_terms_it_changes():
    original = presets.PRESETS["skd_pspnet_r18_cityscapes_original"]
    assert process_count_note(original, 1) is None
    note = process_count_note(original, 8)
    assert "\n" not in note and note.startswith("note: 8 process(es) where the reference ran 1 (total batch 8: 1 per "
                                                 "process instead of 8)")
    assert "SKD's pixel-wise term" in note and "pi_normalize='spatial_whole_batch'" in note
    exact = dataclasses.replace(original, method_options={**original.method_options,
                                                          "pi_normalize": "spatial_whole_batch"})
    assert "SKD" not in process_count_note(exact, 8)
    # CIRKD's SKD averages over pixels: nothing per process besides the batch
    assert process_count_note(presets.PRESETS["skd_deeplabv3_r18_cityscapes"], 8) is None
    assert process_count_note(presets.PRESETS["skd_deeplabv3_r18_cityscapes"], 2).endswith(
        "none known besides the batch per process")
    cifar = process_count_note(presets.PRESETS["dist_resnet8x4_cifar100"], 8)
    assert "DIST's intra-class relation" in cifar and "BatchNorm" in cifar
    assert "RetinaNet's focal" in process_count_note(presets.PRESETS["retinanet_r50_fpn_2x_coco"], 4)
    assert "SOLO's mask" in process_count_note(presets.PRESETS["gdd_solo_r50_fpn_1x_coco"], 16)
    assert "Mask R-CNN's mask loss" in process_count_note(presets.PRESETS["maskrcnn_r50_fpn_2x_coco"], 4)
    depth = process_count_note(presets.PRESETS["skd_depth_mv2_nyu"], 2)
    assert "virtual-normal" in depth and "BatchNorm" in depth
    assert "BatchNorm" not in process_count_note(presets.PRESETS["gdd_pspnet_r18_cityscapes"], 4)
    assert process_count_note(presets.PRESETS["synthetic_seg_skd"], 4) is None  # no reference launch


@pytest.mark.parametrize("field, value, message", [
    ("gpus", 0, "gpus 0: expected the reference's process count, >= 1 (or None)"),
    ("nesterov", True, "nesterov: Nesterov SGD needs momentum > 0"),
    ("bias_lr_factor", 0.0, "bias_lr_factor 0.0: expected > 0")])
def test_check_schedule_refuses_launch_and_optimiser_fields_out_of_range(field, value, message):
    recipe = dataclasses.replace(Recipe(iters=10, batch_size=16, gpus=8), **{field: value})
    if field == "nesterov":
        recipe = dataclasses.replace(recipe, momentum=0.0)
    with pytest.raises(ValueError, match=re.escape(message)):
        check_schedule(recipe)
    check_schedule(dataclasses.replace(recipe, **{field: getattr(Recipe(gpus=8), field)}, momentum=0.9))


def test_the_skd_term_is_listed_exactly_for_the_skd_options_that_sum_over_images():
    from kd_ref.skd import SKDDistiller
    skd_rows = [r.method_options for r in presets.PRESETS.values() if r.method == "skd" and r.task == "seg"]
    for options in [*skd_rows, {"pi_normalize": "spatial"}, {"pi_normalize": "spatial_whole_batch"}]:
        listed = PER_PROCESS_TERMS["method"]["skd"] in per_process_terms(Recipe(method="skd", method_options=options))
        assert listed == (SKDDistiller(1, **options).pi_normalize == "spatial"), options
