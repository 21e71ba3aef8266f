"""Object detection presets: the mmdet 2.x baselines and teachers, the COCO/VOC rows of GKD, GDD, DIST and
SoKD, SKD's FCOS row, and the synthetic CPU demos. Data only: each row is a :class:`~kd_ref.recipe.Recipe`
with its ``source``, and every distillation row has a ``<row>_baseline`` twin
(:func:`~kd_ref.recipe.register`)."""
from __future__ import annotations

import dataclasses

from kd_ref.recipe import Recipe, register, register_demo

PRESETS: dict[str, Recipe] = {}
# Which preset a bare "--task T --method M [--data D]" means.
DEFAULT_PRESETS: dict[tuple, str] = {}


# --- mmdet 2.x baselines the detection papers start from (configs faster_rcnn_r50_fpn_{1x,2x}_coco,
# retinanet_r50_fpn_{1x,2x}_coco, pascal_voc/{faster_rcnn,retinanet}_r50_fpn_1x_voc0712): batch 16 (8 GPUs
# x 2), SGD momentum 0.9, wd 1e-4, flip 0.5, ImageNet mean/std, torchvision ResNet with stage 1 frozen and
# BN in eval mode, from torchvision's ImageNet weights. Schedules in epochs, as mmdet's EpochBasedRunner
# counts them (the iterations follow from the training set's length at run time): COCO 1x = 12 epochs,
# x0.1 at 8 and 11; 2x = 24, x0.1 at 16 and 22 (_base_/schedules/schedule_{1x,2x}.py); linear warm-up over
# 500 iterations from 0.001; lr 0.02 (Faster R-CNN) / 0.01 (RetinaNet); evaluation after every epoch, the
# final one reported; no gradient clipping (the distillation configs that add it say so in their preset).
# Batches as mmdet's (Distributed)GroupSampler: per-GPU batches of one aspect group, every group padded to
# whole batches (group_by_aspect); so do the distillation codes built on mmdet (GKD's DAVAR-Lab mmdetection,
# GDD, MasKD/mmrazor). SoKD's detectron2 rows and FCOS's maskrcnn-benchmark rows group by aspect in their own
# ways, which are not reproduced: they shuffle plainly.
MMDET_CONFIGS = "open-mmlab/mmdetection v2.x configs"
COCO_DET = Recipe(task="det", data="coco", num_classes=80, image_scale=(1333, 800), normalization="imagenet_rgb",
                  batch_size=16, weight_decay=1e-4, schedule="step", warmup_iters=500, warmup_ratio=0.001,
                  iters=None, eval_every=1, ckpt_every=1000, group_by_aspect=True, gpus=8)
COCO_SCHEDULES = {"1x": (12, (8, 11)), "2x": (24, (16, 22))}
DETECTOR_LR = {"faster_rcnn": 0.02, "retinanet": 0.01}
TORCHVISION_WEIGHTS = {18: "resnet18-f37072fd.pth", 50: "resnet50-0676ba61.pth", 101: "resnet101-63fe2227.pth"}
# VOC 07+12 (mmdet pascal_voc/*_voc0712.py): 16,551 trainval images repeated 3 times per epoch (RepeatDataset
# times=3), 4 epochs with x0.1 after 3; 1000x600; lr 0.01 for both detectors, no warm-up and no clipping
# (those configs do not include mmdet's schedule_1x); VOC07 test.
VOC_DET = dataclasses.replace(COCO_DET, data="voc", num_classes=20, image_scale=(1000, 600), lr=0.01,
                              epochs=4, lr_steps=(3,), dataset_repeat=3, warmup_iters=0)
for _arch, _lr in DETECTOR_LR.items():
    for _depth in (50, 101):
        for _schedule, (_epochs, _steps) in COCO_SCHEDULES.items():
            register(PRESETS, f"{_arch}_r{_depth}_fpn_{_schedule}_coco", dataclasses.replace(
                COCO_DET, student=f"{_arch}_r{_depth}", lr=_lr, epochs=_epochs, lr_steps=_steps,
                pretrained=TORCHVISION_WEIGHTS[_depth],
                source=f"{MMDET_CONFIGS}/{_arch}/{_arch}_r{_depth}_fpn_{_schedule}_coco.py"))
        register(PRESETS, f"{_arch}_r{_depth}_fpn_voc0712", dataclasses.replace(
            VOC_DET, student=f"{_arch}_r{_depth}", pretrained=TORCHVISION_WEIGHTS[_depth],
            source=f"{MMDET_CONFIGS}/pascal_voc/{_arch}_r50_fpn_1x_voc0712.py" + ("" if _depth == 50 else
                                                                              f" with the R{_depth} backbone (ours)")))

# --- Built-in synthetic scenes: from scratch on a CPU (no pretrained weights, so the whole backbone trains).
# Easy-style scenes with three shapes: RetinaNet-R18 reaches VOC mAP 0.0 / 4.0 / 19.3 after 200 / 400 / 600
# iterations (one seed), Faster R-CNN-R18 61.7 after 600; on the standard scenes, and with all eight shapes,
# RetinaNet-R18 is still at 0.0 after 300.
# Faster R-CNN samples 128 RoIs per image (ours, mmdet 512): scenes hold 1-3 objects, and a CPU step is 3x
# cheaper (the 2 x fc1024 box head on 4096 RoIs dominates it).
SYNTHETIC_DET = Recipe(task="det", data="synthetic", num_classes=3, synthetic_style="easy", synthetic_seed=0,
                       synthetic_size=(128, 128), image_scale=(128, 128), normalization="imagenet_rgb",
                       rcnn_rois_per_image=128,
                       batch_size=8, iters=600, lr=0.01, weight_decay=1e-4, schedule="step", lr_steps=(500,),
                       warmup_iters=100, grad_clip=35.0, eval_every=0, ckpt_every=100)
# As in the seg demo, the teacher is the student's architecture trained three times as long (RetinaNet-R18,
# 1,800 iterations: mAP 69.8 against the student's 19.3 at 600; one seed, 36 min on one thread).
SYNTHETIC_DETECTORS = {"retinanet": "retinanet_r18", "frcnn": "faster_rcnn_r18"}
for _family, _arch in SYNTHETIC_DETECTORS.items():
    register(PRESETS, f"synthetic_det_{_family}_teacher", dataclasses.replace(SYNTHETIC_DET, student=_arch,
                                                                              iters=1800, lr_steps=(1500,)))
    register(PRESETS, f"synthetic_det_{_family}_none", dataclasses.replace(
        SYNTHETIC_DET, student=_arch, teacher=_arch, teacher_preset=f"synthetic_det_{_family}_teacher"))

DEFAULT_PRESETS.update({
    ("det", "none", "synthetic"): "synthetic_det_retinanet_none",
    ("det", "none", "coco"): "retinanet_r50_fpn_2x_coco",
    ("det", "none", "voc"): "retinanet_r50_fpn_voc0712",
})


# --- COCO 2x rows, R101-FPN 2x teacher (8 processes x 2 images, as the mmdet baselines: GKD's and GDD's mmdet
# launches, DIST's `dist_train_mmdet.sh ... 8` in the DIST_KD README; GDD's choice of 8 is explained in
# presets_seg.py) (--teacher-ckpt) -> R50-FPN 2x student, on the mmdet baselines above.
# GKD (gkd.md §6): fg 1, bg 4, soft 1, T 2, global 0, attenuation over the epochs, PGM M=10, alpha 10, boxes
# wider and taller than 30 px, <= 800 images per class, every epoch: GKDDistiller's and
# ScheduledGKDDistiller's defaults. The released config starts the student from the trained R50 2x
# checkpoint (all of it): student_init is where train.py writes that baseline preset's run; the baseline
# twin, without student_init (DISTILLATION_FIELDS), is the plain R50 2x recipe.
GKD_SOURCE = ("hikvision-research/DAVAR-Lab-ML ECCV22_Distilling_Object_Detectors_with_Global_Knowledge/configs/"
              "faster_rcnn_coco_kd_config.py (the released COCO Faster R-CNN R101->R50 config, gkd.md §6)")
for _arch in DETECTOR_LR:
    register(PRESETS, f"gkd_{_arch}_r50_fpn_2x_coco", dataclasses.replace(
        PRESETS[f"{_arch}_r50_fpn_2x_coco"], method="gkd", teacher=f"{_arch}_r101",
        student_init=f"runs/{_arch}_r50_fpn_2x_coco/last.pt",
        source=GKD_SOURCE if _arch == "faster_rcnn" else f"unknown (no released RetinaNet config): {GKD_SOURCE} on "
                                                       f"{PRESETS[f'{_arch}_r50_fpn_2x_coco'].source}, ours"),
        baseline=PRESETS[f"{_arch}_r50_fpn_2x_coco"])
    # VOC 07+12 (gkd.md §6): no released config or numbers; same KD settings on our VOC schedule (our choice).
    register(PRESETS, f"gkd_{_arch}_r50_fpn_voc0712", dataclasses.replace(
        PRESETS[f"{_arch}_r50_fpn_voc0712"], method="gkd", teacher=f"{_arch}_r101",
        source=f"unknown (no released VOC config): GKD's COCO KD settings on "
               f"{PRESETS[f'{_arch}_r50_fpn_voc0712'].source}, ours"), baseline=PRESETS[f"{_arch}_r50_fpn_voc0712"])
# GDD (gdd.md §5/§6, row 3): alpha 4, tau 4 on P2-P5, gradient clipping 35 added by the distillation config.
# The paper's teacher is a Cascade Mask R-CNN X101-32x4d-FPN-DCN (47.3); ours is Faster R-CNN R101-FPN 2x.
register(PRESETS, "gdd_faster_rcnn_r50_fpn_2x_coco", dataclasses.replace(
    PRESETS["faster_rcnn_r50_fpn_2x_coco"], method="gdd", teacher="faster_rcnn_r101", grad_clip=35.0,
    method_options={"alpha": 4.0, "tau": 4.0},
    source="ZhgLiu/GDD objectDet/configs/distillers/gdd/cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x_coco.py"),
    baseline=PRESETS["faster_rcnn_r50_fpn_2x_coco"])
# DIST (dist.md §3/§4): beta = gamma = 1, tau 1, weight 1; RetinaNet sigmoid per level, Faster R-CNN softmax
# RoI logits. The paper's teachers are RetinaNet X101 (41.0) and Cascade Mask R-CNN X101-64x4d (45.6);
# ours are the R101-FPN 2x of the same detector.
DIST_DET_CONFIGS = {"retinanet": "dist_retinanet_x101-retinanet-r50_coco.py",
                    "faster_rcnn": "dist_cascade_mask_rcnn_x101-fpn_x50_coco.py"}
for _arch in DETECTOR_LR:
    register(PRESETS, f"dist_{_arch}_r50_fpn_2x_coco", dataclasses.replace(
        PRESETS[f"{_arch}_r50_fpn_2x_coco"], method="dist", teacher=f"{_arch}_r101",
        source=f"hunto/MasKD mmrazor/configs/distill/dist/{DIST_DET_CONFIGS[_arch]} (DIST_KD README)"),
        baseline=PRESETS[f"{_arch}_r50_fpn_2x_coco"])

# ------------------------------------------------------------------------------ SoKD on detection
# sokd.md §5, COCO row ([code], the RegKD branch on detectron2): DAM on the last FPN output, the student's
# through a 256 -> 256 adapter; k 8 regions, K_h 2 heatmap channels; region (masked feature) loss weight 2,
# area (DAM) loss weight 1; base: KD at T 4 on the RoI class logits. DAFA on, with the first-order search
# over the first fifth of the run (ours, as CIFAR's 50 of 240 epochs; whether the paper's COCO runs used
# DAFA is unknown). --sokd-base also takes dist (RoI logits) or gdd (the FPN features, row 3's alpha).
SOKD_DET_OPTIONS = {"k": 8, "num_heat": 2, "w_feat": 2.0, "w_dam": 1.0, "search_mode": "first_order", "base": "kd",
                    "base_options": {"kd": {"tau": 4.0}, "dist": {}, "gdd": {"alpha": 4.0, "tau": 4.0}}}
# Faster R-CNN R101 -> R50 / R18, FabienCode/mdistiller detection/configs/RegKD/RegKD-R{50,18}-R101.yaml on
# Base-Distillation.yaml and detectron2's defaults: 180k iterations, lr 0.01, x0.1 at 120k / 160k; training
# short side drawn per image from 640, 672, ..., 800 (MIN_SIZE_TRAIN, sampling "choice"; long side <= 1333),
# test at 800; linear warm-up over 1000 iterations from 0.001 (detectron2 SOLVER.WARMUP_*); no weight decay on
# normalisation layers (WEIGHT_DECAY_NORM 0.0). Batch: IMS_PER_BATCH 8 (R50) and 1 (R18) in total;
# detection/README.md launches every config with --num-gpus 4, which detectron2 refuses for a batch of 1 (the
# total must divide by the processes), so the R18 and MobileNetV2 rows launch one process. detectron2 counts
# iterations, so this recipe does too (evaluation once per epoch: ours, detectron2's EVAL_PERIOD 0 evaluates
# at the end). Pretrained: torchvision's ResNets (ours; the configs start from student-and-teacher files,
# pretrained/r50-r101.pth, not public).
SOKD_SHORT_SIDES = (640, 672, 704, 736, 768, 800)
SOKD_COCO = dataclasses.replace(PRESETS["faster_rcnn_r50_fpn_2x_coco"], batch_size=8, lr=0.01, epochs=None,
                                iters=180_000, lr_steps=(120_000, 160_000), eval_every=117_266 // 8,
                                group_by_aspect=False, warmup_iters=1000, norm_weight_decay=0.0,
                                train_image_scales=tuple((1333, side) for side in SOKD_SHORT_SIDES),
                                multiscale_mode="value", gpus=4, teacher="faster_rcnn_r101", method="sokd",
                                source="FabienCode/mdistiller detection/configs/RegKD/RegKD-R50-R101.yaml")
SOKD_COCO_BATCH = {50: (8, 4), 18: (1, 1)}  # depth: (IMS_PER_BATCH, processes)
for _depth, (_batch, _gpus) in SOKD_COCO_BATCH.items():
    register(PRESETS, f"sokd_faster_rcnn_r{_depth}_fpn_coco", dataclasses.replace(
        SOKD_COCO, student=f"faster_rcnn_r{_depth}", pretrained=TORCHVISION_WEIGHTS[_depth], batch_size=_batch,
        gpus=_gpus, eval_every=117_266 // _batch,
        method_options={**SOKD_DET_OPTIONS, "search_iters": SOKD_COCO.iters // 5},
        source=f"FabienCode/mdistiller detection/configs/RegKD/RegKD-R{_depth}-R101.yaml"))
# SoKD's MobileNetV2 row: FabienCode/mdistiller detection/configs/RegKD/RegKD-MV2-R50.yaml (the R50 -> MV2 row
# of sokd.md §7, the RegKD branch as the rows above; DKD/DKD-MV2-R50.yaml of the other branch says 8): Faster
# R-CNN MobileNetV2-FPN student (build_mobilenetv2_fpn_backbone, FPN on the 24/32/96/
# 320-channel stages, FrozenBN, FREEZE_AT 0) of a Faster R-CNN R50-FPN teacher, 180k iterations, lr 0.01, x0.1
# at 120k / 160k, IMS_PER_BATCH 1 on one process. Ours: the student starts from
# torchvision's ImageNet MobileNetV2 (the config's WEIGHTS, pretrained/mv2-r50.pth, a student-and-teacher
# file, is not public), evaluation once per epoch at batch 1, the SoKD options and search length of the
# R50/R18 rows.
register(PRESETS, "sokd_faster_rcnn_mv2_fpn_coco", dataclasses.replace(
    SOKD_COCO, student="faster_rcnn_mv2", teacher="faster_rcnn_r50", batch_size=1, gpus=1, eval_every=117_266,
    pretrained="mobilenet_v2-b0353104.pth", method_options={**SOKD_DET_OPTIONS, "search_iters": SOKD_COCO.iters // 5},
    source="FabienCode/mdistiller detection/configs/RegKD/RegKD-MV2-R50.yaml"))
DEFAULT_PRESETS[("det", "sokd", "coco")] = "sokd_faster_rcnn_r50_fpn_coco"

# --- Synthetic demos: the synthetic_det_<family>_none recipe with a method. PGM uses smaller boxes (8 px
# of 128, as 30 px of a ~500-px COCO image) and at most 20 images per class (~150 images, under a minute
# on a CPU) to keep the pass short;
# GDD alpha 4 on Faster R-CNN (row 3) and 65 on RetinaNet (gdd.md §5, the one-stage analogue).
SYNTHETIC_DET_METHOD_OPTIONS = {
    "gkd": {"retinanet": {"pgm_min_size": 8.0, "pgm_max_images": 20},
            "frcnn": {"pgm_min_size": 8.0, "pgm_max_images": 20}},
    "gdd": {"retinanet": {"alpha": 65.0, "tau": 4.0}, "frcnn": {"alpha": 4.0, "tau": 4.0}},
    "dist": {"retinanet": {}, "frcnn": {}},
    "kd": {"frcnn": {"tau": 4.0}},  # softmax KD needs RoI class logits: Faster R-CNN only (SoKD's base, T 4)
}
# SoKD with the COCO row's settings, searching over the first fifth of the run. Faster R-CNN: over KD; its
# 128-pixel inputs give a 2x2 P6, K_h x H x W = 8 = k cells. RetinaNet: over feature distillation (GDD
# with the demo's options) at P6, as P7 is 1x1 at 128 pixels (2 cells cannot hold k = 8 regions).
_sokd_demo = {**SOKD_DET_OPTIONS, "search_iters": SYNTHETIC_DET.iters // 5}
SYNTHETIC_DET_METHOD_OPTIONS["sokd"] = {
    "frcnn": _sokd_demo,
    "retinanet": {**_sokd_demo, "base": "gdd", "tap": "p6", "base_options": {
        **SOKD_DET_OPTIONS["base_options"], "gdd": SYNTHETIC_DET_METHOD_OPTIONS["gdd"]["retinanet"]}}}
for _method, _per_family in SYNTHETIC_DET_METHOD_OPTIONS.items():
    for _family, _options in _per_family.items():
        register(PRESETS, f"synthetic_det_{_family}_{_method}", dataclasses.replace(
            PRESETS[f"synthetic_det_{_family}_none"], method=_method, method_options=_options), baseline=False)
    DEFAULT_PRESETS[("det", _method, "synthetic")] = f"synthetic_det_{next(iter(_per_family))}_{_method}"
DEFAULT_PRESETS.update({
    ("det", "gkd", "coco"): "gkd_retinanet_r50_fpn_2x_coco",
    ("det", "gkd", "voc"): "gkd_retinanet_r50_fpn_voc0712",
    ("det", "gdd", "coco"): "gdd_faster_rcnn_r50_fpn_2x_coco",
    ("det", "dist", "coco"): "dist_retinanet_r50_fpn_2x_coco",
})


# --- FCOS-MV2-C128 on COCO (depth_fcos.md §5, config fcos_syncbn_bs32_c128_MNV2_FPN_1x of tianzhi0549/FCOS):
# batch 32, SGD lr 0.01, momentum 0.9, wd 1e-4, 90k iterations, x0.1 at 60k and 80k, warm-up 500 iterations
# at 1/3 (FCOS: constant factor; ours is the engine's linear ramp from 1/3), 1333x800, flip 0.5; centre
# sampling, GIoU, normalised targets and centerness-on-reg off; biases at 2x the learning rate and without
# weight decay (fcos_core/config/defaults.py SOLVER.BIAS_LR_FACTOR 2, WEIGHT_DECAY_BIAS 0); 8 processes (the
# README's --nproc_per_node=8 launch; "we use 8 Nvidia V100 GPUs"). Teacher [ours]: FCOS R-101-FPN
# (--teacher-ckpt); the paper's teacher is unknown here. Inputs: every FCOS config keeps maskrcnn-benchmark's
# defaults (maskrcnn_benchmark/config/defaults.py INPUT.PIXEL_MEAN [102.9801, 115.9465, 122.7717], PIXEL_STD
# [1, 1, 1], TO_BGR255 True), the MobileNetV2 one included, and the released R-101 teacher expects them.
FCOS_COCO = dataclasses.replace(COCO_DET, student="fcos_mv2_c128", teacher="fcos_r101", batch_size=32, lr=0.01,
                                normalization="caffe2_bgr",
                                epochs=None, iters=90_000, lr_steps=(60_000, 80_000), warmup_iters=500,
                                warmup_ratio=1 / 3, eval_every=0, group_by_aspect=False, bias_lr_factor=2.0,
                                bias_weight_decay=0.0,
                                pretrained="mobilenet_v2-b0353104.pth",
                                source="tianzhi0549/FCOS configs/fcos/fcos_syncbn_bs32_c128_MNV2_FPN_1x.yaml")
register(PRESETS, "skd_fcos_mv2_c128_coco", dataclasses.replace(FCOS_COCO, method="skd"))
for _method in ("dist", "gdd"):
    register(PRESETS, f"{_method}_fcos_mv2_c128_coco", dataclasses.replace(
        FCOS_COCO, method=_method, method_options={"alpha": 65.0, "tau": 4.0} if _method == "gdd" else {},
        source=FCOS_COCO.source + f"; {_method.upper()} on FCOS and its weights ours"), baseline=False)
DEFAULT_PRESETS[("det", "skd", "coco")] = "skd_fcos_mv2_c128_coco"

# --- Synthetic FCOS demo: the det demo's 128x128 easy scenes (ours; the spec's 256x320 is 4x the CPU time),
# sizes of interest divided by 4, MobileNetV2-c64 student. Tuned on the demo: the teacher is the student's
# architecture trained three times as long, as in the det demos, not the spec's ResNet-50: with 256-channel
# GN towers a ResNet-18 or -50 FCOS step at batch 8 costs about 6 or 7 times the c64 student's on CPU.
SYNTHETIC_FCOS_MODEL = {"sizes_of_interest": ((-1, 16), (16, 32), (32, 64), (64, 128), (128, 1e8))}
SYNTHETIC_FCOS = dataclasses.replace(SYNTHETIC_DET, student="fcos_mv2_c64", teacher="fcos_mv2_c64",
                                     model_options=SYNTHETIC_FCOS_MODEL, teacher_preset="synthetic_det_fcos_teacher")
register(PRESETS, "synthetic_det_fcos_teacher", dataclasses.replace(SYNTHETIC_FCOS, teacher=None, teacher_preset=None,
                                                                    iters=1800, lr_steps=(1500,)))
# GDD at the RetinaNet demo's alpha on the same five levels; DIST at its defaults on the sigmoid maps.
SYNTHETIC_FCOS_METHOD_OPTIONS = {"none": {}, "skd": {}, "dist": {}, "gdd": {"alpha": 65.0, "tau": 4.0}}
register_demo(PRESETS, "synthetic_det_fcos", SYNTHETIC_FCOS, SYNTHETIC_FCOS_METHOD_OPTIONS)
DEFAULT_PRESETS[("det", "skd", "synthetic")] = "synthetic_det_fcos_skd"
