"""Semantic segmentation presets (Cityscapes rows of CIRKD/KD/SKD, DIST, GDD and the SKD authors' recipe;
the synthetic CPU demo). Data only: each row is a :class:`~kd_ref.recipe.Recipe` with its ``source``, and
every distillation row has a ``<row>_baseline`` twin (:func:`~kd_ref.recipe.register`)."""
from __future__ import annotations

import dataclasses

from kd_ref.recipe import Recipe, register, register_demo

PRESETS: dict[str, Recipe] = {}
# Which preset a bare "--task T --method M [--data D]" means.
DEFAULT_PRESETS: dict[tuple, str] = {}


# --- CIRKD protocol (winycg/CIRKD 2022, train_baseline.py / train_kd.py at 05a2753; seg_models.md §5):
# DeepLabV3-R101 teacher; batch 16 over 8 processes (its train_scripts: --nproc_per_node=8), 40k iterations,
# lr 0.02, wd 1e-4, poly to 0, validation every 800 iterations with the best checkpoint reported (its *_best_model.pth); students from CIRKD's
# deep-stem ImageNet ResNets (--pretrained-base resnet18-imagenet.pth).
CIRKD_SOURCE = "winycg/CIRKD@05a2753 train_baseline.py"
CIRKD_CITYSCAPES = Recipe(data="cityscapes", flavour="cirkd", crop=(512, 1024), scales=(0.5, 2.0),
                          normalization="bgr_mean", batch_size=16, iters=40000, lr=0.02, weight_decay=1e-4,
                          eval_every=800, keep_best=True, ckpt_every=1000, pretrained="resnet18-imagenet.pth",
                          gpus=8)


def cirkd_baseline(student: str, script: str) -> Recipe:
    return dataclasses.replace(CIRKD_CITYSCAPES, student=student,
                               source=f"{CIRKD_SOURCE} + train_scripts/train_baseline/citys/{script}")


register(PRESETS, "teacher_deeplabv3_r101_cityscapes", dataclasses.replace(
    cirkd_baseline("deeplabv3_r101", "deeplabv3_res101.sh"), pretrained="resnet101-imagenet.pth"))
# KD and SKD (CIRKD's train_kd.py: the baseline's optimisation, so the baseline twin is train_baseline.py).
# CIRKD's plain-KD launch script (train_kd/deeplabv3_res18.sh, 8 processes) is in the repository until
# 50fb43c; 05a2753 has only the per-method scripts (train_skd.sh, ...), which launch train_kd.py alike.
register(PRESETS, "kd_deeplabv3_r18_cityscapes", dataclasses.replace(
    CIRKD_CITYSCAPES, method="kd", student="deeplabv3_r18", teacher="deeplabv3_r101",
    source="winycg/CIRKD@05a2753 train_kd.py + winycg/CIRKD@50fb43c train_scripts/train_kd/deeplabv3_res18.sh"),
    baseline=cirkd_baseline("deeplabv3_r18", "deeplabv3_res18.sh"))
register(PRESETS, "skd_deeplabv3_r18_cityscapes", dataclasses.replace(
    CIRKD_CITYSCAPES, method="skd", student="deeplabv3_r18", teacher="deeplabv3_r101",
    method_options={},  # SKDDistiller's defaults are CIRKD's
    source="winycg/CIRKD@05a2753 train_kd.py + train_scripts/train_kd/train_skd.sh"),
    baseline=cirkd_baseline("deeplabv3_r18", "deeplabv3_res18.sh"))
# DIST (hunto/DIST_KD segmentation/train_kd.py, dist.md §4): CIRKD models, wd 5e-4, poly floor 1e-4,
# validation every 400 iterations, best reported. Its baselines (74.21 / 72.55) are CIRKD train_baseline.py
# runs (wd 1e-4, poly to 0, validation every 800): the twins are those recipes, not DIST's minus the loss.
DIST_CITYSCAPES = dataclasses.replace(CIRKD_CITYSCAPES, method="dist", teacher="deeplabv3_r101",
                                      weight_decay=5e-4, min_lr=1e-4, eval_every=400)
for _student, _script in (("deeplabv3_r18", "deeplabv3_res18.sh"), ("pspnet_r18", "pspnet_res18.sh")):
    register(PRESETS, f"dist_{_student}_cityscapes", dataclasses.replace(
        DIST_CITYSCAPES, student=_student,
        source=f"hunto/DIST_KD segmentation/train_kd.py + segmentation/train_scripts/train_kd/{_script}"),
        baseline=cirkd_baseline(_student, _script))

# --- GDD (ZhgLiu/GDD semanticSeg, mmseg 0.20; gdd.md §6): mmseg models, PSPNet-R101-D8 teacher. Batch 16 =
# 8 processes x 2 (samples_per_gpu=2, semanticSeg/configs/_base_/datasets/cityscapes.py:35), a choice the
# repository leaves open (gdd.md §9.5): its README at a0fa7ca launches `dist_train.sh ... 2` (semanticSeg/
# README.md:46-47, and a single-GPU `python tools/train.py`), total 4 or 2, while its first README (90d0497
# README.md:17) launches 8 processes, as the MGD code it derives from does, and the paper's baselines are
# those of that 8-process setting; the paper's own GPU count was not read here (gdd.md §9.5). Pipeline
# of configs/_base_/datasets/cityscapes_512x512.py: Resize ratio 0.5-2.0 -> RandomCrop (cat_max_ratio 0.75)
# -> flip -> PhotoMetricDistortion -> Normalize -> Pad; schedule_40k.py: lr 0.01, wd 5e-4, poly to 1e-4,
# evaluation every 4000 iterations, the final checkpoint reported; students from open-mmlab://resnet18_v1c.
GDD_CONFIGS = "ZhgLiu/GDD semanticSeg/configs"
MMSEG_CITYSCAPES = Recipe(data="cityscapes", flavour="mmseg", crop=(512, 512), scales=(0.5, 2.0),
                          scale_step=None, cat_max_ratio=0.75, photometric_distortion=True,
                          normalization="imagenet_rgb", batch_size=16, iters=40000, lr=0.01, weight_decay=5e-4,
                          min_lr=1e-4, eval_every=4000, ckpt_every=1000, pretrained="resnet18_v1c.pth", gpus=8)
# The released teacher (pspnet_r101-d8_512x1024_40k_cityscapes, 78.34): the same schedule on 512x1024 crops,
# trained by mmseg on 4 GPUs x 2 images (its model zoo's Cityscapes setting, samples_per_gpu=2): batch 8.
register(PRESETS, "teacher_pspnet_r101_cityscapes_mmseg", dataclasses.replace(
    MMSEG_CITYSCAPES, student="pspnet_r101", crop=(512, 1024), pretrained="resnet101_v1c.pth", batch_size=8, gpus=4,
    source=f"{GDD_CONFIGS}/pspnet/pspnet_r101-d8_512x1024_40k_cityscapes.py (= open-mmlab/mmsegmentation "
           "v0.x configs/pspnet/pspnet_r101-d8_512x1024_40k_cityscapes.py)"))
for _student, _config, _alpha in (("pspnet_r18", "psp_r101_distill_psp_r18_40k_512x512_city.py", 145.0),
                                  ("deeplabv3_r18", "psp_r101_distill_deepv3_r18_40k_512x512_city.py", 175.0)):
    _family = _student.split("_")[0]
    register(PRESETS, f"gdd_{_student}_cityscapes", dataclasses.replace(
        MMSEG_CITYSCAPES, method="gdd", student=_student, teacher="pspnet_r101",
        method_options={"alpha": _alpha, "tau": 4.0}, source=f"{GDD_CONFIGS}/distillers/gdd/{_config}"),
        baseline=dataclasses.replace(MMSEG_CITYSCAPES, student=_student,
                                     source=f"{GDD_CONFIGS}/{_family}/{_family}_r18-d8_512x512_40k_cityscapes.py"))

# --- SKD authors' recipe (irfanICMLL/structure_knowledge_distillation master, run_train_val.sh +
# utils/train_options.py + dataset/datasets.py CSDataSet; skd.md §7): PSPNet-R101 -> PSPNet-R18, 512x512,
# scales 0.7 + k/10 (k <= 14), batch 8 on one GPU, lr 0.01, wd 5e-4, poly to 0. Which snapshots it scores:
# SKD_SNAPSHOTS below.
SKD_SOURCE = "irfanICMLL/structure_knowledge_distillation run_train_val.sh + train_and_eval.py"
SKD_ORIGINAL_CITYSCAPES = Recipe(data="cityscapes", flavour="skd", crop=(512, 512), scales=(0.7, 2.1),
                                 normalization="bgr_mean", batch_size=8, iters=40000, lr=0.01,
                                 weight_decay=5e-4, eval_every=4000, ckpt_every=1000,
                                 pretrained="resnet18-imagenet.pth", gpus=1)
# The SKD teacher's training recipe is not released (only its checkpoint, CS_scenes_38413_0.7832...pth):
# this preset trains it with the student's recipe, ours.
register(PRESETS, "teacher_pspnet_r101_cityscapes_skd", dataclasses.replace(
    SKD_ORIGINAL_CITYSCAPES, student="pspnet_r101", pretrained="resnet101-imagenet.pth",
    source="unknown: the SKD teacher's recipe is not released; the student's recipe of " + SKD_SOURCE))
# train_and_eval.py counts steps from 1 and, with save_steps = int(2975 / 8) = 371, evaluates and saves the
# student after step s when s > 39,000 and s % 371 == 0, or s == num_steps - 1: after 39,326, 39,697 and
# 39,999 of its 40,000 updates (never after the last one), each file named with its mIoU. No periodic
# validation otherwise. We keep the best of those three.
SKD_SNAPSHOTS = (39_326, 39_697, 39_999)
# SKDDistiller's options for the authors' code (its defaults are CIRKD's), from irfanICMLL/
# structure_knowledge_distillation@ce208e1 (docs/specs/skd.md §5):
SKD_ORIGINAL_OPTIONS = {
    "tau": 1.0, "pi_normalize": "spatial",  # utils/criterion.py:225 (no temperature; sum / W / H)
    "lambda_pi": 10.0,                      # run_train_val.sh:4
    "pa_kernel": None, "pa_scale": 0.5,     # run_train_val.sh:23, utils/criterion.py:242
    "pa_detach_norm": True,                 # utils/utils.py:175
    "lambda_pa": 0.5,                       # run_train_val.sh:22
    "adv_type": "wgan", "lambda_gp": 10.0,  # utils/train_options.py:52, 55
    "lambda_adv": 0.1, "lambda_d": 0.1,     # networks/kd_model.py:149, 158 (both are lambda_d), run_train_val.sh:5
    "d_optimizer": "sgd", "d_momentum": 0.9, "d_weight_decay": 5e-4,  # networks/kd_model.py:75, run_train_val.sh:13
    "d_lr": 4e-4, "d_poly_power": 0.9,      # utils/train_options.py:62, 38; train_and_eval.py:23
    "d_sync_batchnorm": False,              # networks/sagan_models.py:148 (BatchNorm2d, one GPU)
}
register(PRESETS, "skd_pspnet_r18_cityscapes_original", dataclasses.replace(
    SKD_ORIGINAL_CITYSCAPES, method="skd", student="pspnet_r18", teacher="pspnet_r101",
    method_options=SKD_ORIGINAL_OPTIONS, source=SKD_SOURCE, eval_every=0, eval_at=SKD_SNAPSHOTS, keep_best=True))

# --- Built-in synthetic scenes, the CPU demo (how its lengths and weights were chosen, with the per-seed
# results: docs/design/demo.md). Everything trains from scratch: the "easy" style at 64 px with three shapes
# (disc, ring, square: two look-alike pairs), no random rescaling (it smears the background grain that makes
# figure/ground a local cue). The teacher is the student's architecture trained twice as long: within
# minutes on a CPU, a larger ResNet trained from scratch is a worse teacher, not a better one.
SYNTHETIC_SEG = Recipe(data="synthetic", flavour="cirkd", num_classes=4, crop=(64, 64), scales=(1.0, 1.0),
                       normalization="imagenet_rgb", batch_size=8, iters=300, lr=0.02, weight_decay=1e-4,
                       eval_every=0, ckpt_every=100, synthetic_size=(64, 64), synthetic_style="easy",
                       synthetic_seed=0,
                       student="pspnet_r18", teacher="pspnet_r18", teacher_preset="synthetic_seg_teacher")
# GDD alpha 20 and DIST weight 0.25 (the Cityscapes alpha 145 and DIST weight 1 swamp the task loss of a
# model trained from scratch); KD and SKD at their defaults. SKD's discriminator needs logit maps of at least
# 64x64 (512-pixel inputs), so the 64-pixel demo runs the pixel-wise and pair-wise terms only; the holistic
# term is exercised at 512 pixels in the tests.
SYNTHETIC_METHOD_OPTIONS = {"none": {}, "kd": {}, "dist": {"loss_weight": 0.25}, "gdd": {"alpha": 20.0, "tau": 4.0},
                            "skd": {"use_ho": False}}
register(PRESETS, "synthetic_seg_teacher", dataclasses.replace(SYNTHETIC_SEG, teacher=None, teacher_preset=None,
                                                               iters=600))
register_demo(PRESETS, "synthetic_seg", SYNTHETIC_SEG, SYNTHETIC_METHOD_OPTIONS, defaults=DEFAULT_PRESETS)

DEFAULT_PRESETS.update({
    ("seg", "none", "cityscapes"): "dist_deeplabv3_r18_cityscapes_baseline",
    ("seg", "kd", "cityscapes"): "kd_deeplabv3_r18_cityscapes",
    ("seg", "dist", "cityscapes"): "dist_deeplabv3_r18_cityscapes",
    ("seg", "gdd", "cityscapes"): "gdd_pspnet_r18_cityscapes",
    ("seg", "skd", "cityscapes"): "skd_deeplabv3_r18_cityscapes",
})
