"""Instance segmentation presets (mmdet SOLO and Mask R-CNN recipes, GDD's SOLO row, the synthetic demo).
Data only: each row is a :class:`~kd_ref.recipe.Recipe` with its ``source``, and every distillation row
has a ``<row>_baseline`` twin (:func:`~kd_ref.recipe.register`)."""
from __future__ import annotations

import dataclasses

from kd_ref.presets_det import COCO_DET, COCO_SCHEDULES, MMDET_CONFIGS, TORCHVISION_WEIGHTS
from kd_ref.recipe import Recipe, register, register_demo

PRESETS: dict[str, Recipe] = {}
# Which preset a bare "--task T --method M [--data D]" means.
DEFAULT_PRESETS: dict[tuple, str] = {}


# --- COCO (docs/specs/instance_seg.md §5-§7). mmdet 2.x data handling as the detectors (keep-ratio 1333x800, flip 0.5,
# ImageNet mean/std, pad 32), torchvision ResNets with stage 1 frozen and BN in eval mode, epochs as mmdet's
# EpochBasedRunner counts them. SOLO R50 1x (configs/solo/solo_r50_fpn_1x_coco.py on schedule_1x): lr 0.01,
# 12 epochs, x0.1 at 8 and 11, warm-up 500 iterations from 0.001. Mask R-CNN: mmdet's mask_rcnn configs (lr
# 0.02, schedule 1x / 2x). SOLO R50 3x (35.9) is no preset; the R101 3x multi-scale teacher (37.1) is below.
COCO_INS = dataclasses.replace(COCO_DET, task="ins")
register(PRESETS, "solo_r50_fpn_1x_coco", dataclasses.replace(
    COCO_INS, student="solo_r50", lr=0.01, epochs=12, lr_steps=(8, 11), pretrained=TORCHVISION_WEIGHTS[50],
    source=f"{MMDET_CONFIGS}/solo/solo_r50_fpn_1x_coco.py (mask AP 33.1, mmdet SOLO README)"))
for _depth in (50, 101):
    for _schedule, (_epochs, _steps) in COCO_SCHEDULES.items():
        register(PRESETS, f"maskrcnn_r{_depth}_fpn_{_schedule}_coco", dataclasses.replace(
            COCO_INS, student=f"maskrcnn_r{_depth}", lr=0.02, epochs=_epochs, lr_steps=_steps,
            pretrained=TORCHVISION_WEIGHTS[_depth],
            source=f"{MMDET_CONFIGS}/mask_rcnn/mask_rcnn_r{_depth}_fpn_{_schedule}_coco.py" + (
                " (box 38.2 / mask 34.7 at 1x, 39.2 / 35.4 at 2x, mmdet model zoo)" if _depth == 50 else "")))
# SOLO R101 3x multi-scale, the GDD SOLO row's teacher (docs/specs/instance_seg.md §5-§7). mmdet's SOLO 3x config on
# R101: short side one of 800, 768, ..., 640 per image (multiscale_mode 'value', long side <= 1333), 36 epochs,
# x0.1 at 27 and 33, warm-up 500 iterations from 1/3, gradient clipping at norm 35. mmdet publishes no R101 3x
# SOLO; the number is WXinlong/SOLO's SOLO_R101_3x (37.1 mask AP, COCO minival), trained by its
# configs/solo/solo_r101_fpn_8gpu_3x.py: the same data and schedule, and optimizer_config grad_clip max_norm 35.
SOLO_MULTISCALE_SHORT_SIDES = (800, 768, 736, 704, 672, 640)
register(PRESETS, "solo_r101_fpn_3x_coco", dataclasses.replace(
    PRESETS["solo_r50_fpn_1x_coco"], student="solo_r101", pretrained=TORCHVISION_WEIGHTS[101], epochs=36,
    lr_steps=(27, 33), warmup_ratio=1.0 / 3, train_image_scales=tuple((1333, s) for s in SOLO_MULTISCALE_SHORT_SIDES),
    multiscale_mode="value", grad_clip=35.0,
    source="WXinlong/SOLO configs/solo/solo_r101_fpn_8gpu_3x.py (mask AP 37.1, its README; = "
           f"{MMDET_CONFIGS}/solo/solo_r50_fpn_3x_coco.py with ResNet-101 and clipping)"))
# GDD on SOLO, the paper row (docs/specs/instance_seg.md §6): SOLO R101-FPN 3x teacher (--teacher-ckpt, e.g. GDD's
# Solo_r101_3x.pth, provenance unknown) -> SOLO R50 1x; alpha 200, tau 4, neck and head initialised from
# the teacher, gradient clipping 35 added by the distillation config. The twin is the plain R50 1x.
register(PRESETS, "gdd_solo_r50_fpn_1x_coco", dataclasses.replace(
    PRESETS["solo_r50_fpn_1x_coco"], method="gdd", teacher="solo_r101", grad_clip=35.0,
    method_options={"alpha": 200.0, "tau": 4.0, "init_student": True},
    source="ZhgLiu/GDD instanceSeg/configs/distillers/gdd/solo_r101_ms_distill_solo_r50_coco.py"),
    baseline=PRESETS["solo_r50_fpn_1x_coco"])
# GDD on Mask R-CNN: ours, the Faster R-CNN row (alpha 4, tau 4 on P2-P5, clipping 35) moved to Mask R-CNN
# R101 2x -> R50 2x; no paper or config distils Mask R-CNN with GDD.
register(PRESETS, "gdd_maskrcnn_r50_fpn_2x_coco", dataclasses.replace(
    PRESETS["maskrcnn_r50_fpn_2x_coco"], method="gdd", teacher="maskrcnn_r101", grad_clip=35.0,
    method_options={"alpha": 4.0, "tau": 4.0},
    source="unknown (ours): the Faster R-CNN row ZhgLiu/GDD objectDet/configs/distillers/gdd/"
           "cascade_mask_rcnn_rx101_32x4d_distill_faster_rcnn_r50_fpn_2x_coco.py extrapolated to Mask R-CNN"),
    baseline=PRESETS["maskrcnn_r50_fpn_2x_coco"])

# --- Synthetic instances (docs/specs/instance_seg.md §9, made smaller to fit the demo's CPU budget): easy-style 64-pixel
# scenes (§9's 256 pixels cost 16 times the pixels), three shapes, from scratch. SOLO: ResNet-18 with a
# 64-channel, 2-conv head, §9's grids with our scale ranges and pos_scale (instance_seg.SYNTHETIC_SOLO). As in
# the seg and det demos, the teacher is the student's architecture trained three times as long (§9's ResNet-50
# teacher costs more per step and learns more slowly from scratch). SOLO's lr 0.05 is tuned on the demo: at
# mmdet's 0.01 the masks, whose logits start at the 0.01 prior, had not left Dice loss 0.98 after 120
# iterations; at 0.05 they do after about 80. Mask R-CNN keeps the det demo's Faster R-CNN lr 0.01 (not
# tuned); its heads keep mmdet's widths (four 256-channel 3x3 convs at 14x14 on every positive RoI, the
# 1024-wide box head on 128 RoIs per image): in a profiled training step at batch 4 the mask head's 3x3
# convolutions took more than half of the time, so the 64-pixel input saves little there. GDD taps P2-P5
# (256-channel FPN in both: no align conv) at alpha 0.1, chosen on the
# demo: against a 100-iteration demo teacher the four GDD terms at alpha 1 summed to about 120 in the first
# step, 30 times the task loss, so the paper's 200 leaves the task loss nothing; 0.1 starts them at about
# three times the task loss.
# SYNTHETIC_INS_MODEL (ours, for from-scratch training): nothing frozen and every BN on batch statistics;
# mmdet's frozen stem + layer1 and eval-mode BN suit an ImageNet backbone, but from scratch they leave a
# random frozen stem and BN at its initial statistics (identity), and the models then learned only a
# position prior (FPN outputs nearly the same for every image; segm AP teacher 0.29, alone 0.32, GDD 0.50).
# The category branch learns slowly, not wrongly: the teacher recipe overfits four fixed scenes in 300
# iterations (focal loss 1.09 -> 0.0004, the top-scored masks of each scene of its classes). Part of what held
# the demo back (segm AP teacher 1.30, student alone 1.09, GDD 1.27 with mmdet's pos_scale and §9's ranges / 4)
# was the level assignment at 64 pixels (instance_seg.SYNTHETIC_SOLO: most objects went to the 4x4 and 2x2
# maps) and too few positive cells. Development runs, one seed, 50 val scenes, student alone (300 it.):
# ranges (1, 32), (16, 64), (64, 128), ... (every object on levels 0-1, on both for scales 16-32) 0.58, with
# pos_scale 0.5 1.44, the preset's ranges (both levels for scales 12-48) 2.40; the teacher (900 it.) with
# the first ranges and pos_scale 0.5: 5.28 (AP50 15.5). The category branch still barely separates the
# shapes: on each of four val scenes the preset's teacher gives its best masks all three labels at scores
# within 0.05 of each other (0.2-0.3), while 44 of the 81 instances of the first 40 val scenes get a mask of
# IoU > 0.5. The masks have learnt, the classes only begin to: the README figures are those of a small
# demo, not of a converged SOLO.
SYNTHETIC_INS_MODEL = {"frozen_stages": -1, "norm_eval": False}
SYNTHETIC_INS = Recipe(task="ins", data="synthetic", num_classes=3, synthetic_style="easy", synthetic_seed=0,
                       synthetic_size=(64, 64), image_scale=(64, 64), normalization="imagenet_rgb",
                       model_options=SYNTHETIC_INS_MODEL,
                       rcnn_rois_per_image=128, batch_size=4, iters=300, lr=0.05, weight_decay=1e-4,
                       schedule="step", lr_steps=(250,), warmup_iters=50, grad_clip=35.0, eval_every=0,
                       ckpt_every=100, synthetic_val=50)
SYNTHETIC_INS_MODELS = {"solo": ("solo_synth_r18", 0.05), "maskrcnn": ("maskrcnn_r18", 0.01)}
SYNTHETIC_INS_METHOD_OPTIONS = {"none": {}, "gdd": {"alpha": 0.1, "tau": 4.0}}
# The SOLO family's source names the head constants its level assignment comes from; being part of the recipe
# digest, it also keeps a teacher cached under the earlier assignment from being reused.
SYNTHETIC_INS_SOURCES = {"solo": "ours: the synthetic demo, instance_seg.SYNTHETIC_SOLO (8x8-level scale ranges, "
                                 "pos_scale 0.5)", "maskrcnn": None}
for _family, (_arch, _lr) in SYNTHETIC_INS_MODELS.items():
    _family_recipe = dataclasses.replace(SYNTHETIC_INS, student=_arch, lr=_lr, source=SYNTHETIC_INS_SOURCES[_family])
    register(PRESETS, f"synthetic_ins_{_family}_teacher", dataclasses.replace(
        _family_recipe, iters=3 * SYNTHETIC_INS.iters, lr_steps=(3 * SYNTHETIC_INS.lr_steps[0],)))
    register_demo(PRESETS, f"synthetic_ins_{_family}", dataclasses.replace(
        _family_recipe, teacher=_arch, teacher_preset=f"synthetic_ins_{_family}_teacher"),
        SYNTHETIC_INS_METHOD_OPTIONS)
DEFAULT_PRESETS.update({
    **{("ins", method, "synthetic"): f"synthetic_ins_solo_{method}" for method in SYNTHETIC_INS_METHOD_OPTIONS},
    ("ins", "none", "coco"): "solo_r50_fpn_1x_coco",
    ("ins", "gdd", "coco"): "gdd_solo_r50_fpn_1x_coco",
})
