"""Classification presets (CIFAR-100 and ImageNet rows of DIST, KD and SoKD; the synthetic CPU demo).
Data only: each row is a :class:`~kd_ref.recipe.Recipe` with its ``source``, and every distillation row
has a ``<row>_baseline`` twin (:func:`~kd_ref.recipe.register`)."""
from __future__ import annotations

import dataclasses

from kd_ref.recipe import Recipe, register, register_demo

PRESETS: dict[str, Recipe] = {}
# Which preset a bare "--task T --method M [--data D]" means.
DEFAULT_PRESETS: dict[tuple, str] = {}


# --- CIFAR-100 (CRD / RepDistiller protocol, docs/specs/dist.md §4, docs/specs/sokd.md §2.5): 240 epochs of 50,000 images at
# batch 64 on one process (DIST_KD's README launches dist_train.sh 1; mdistiller's train.py is one process,
# nn.DataParallel), SGD lr 0.05, x0.1 at epochs 150 / 180 / 210, wd 5e-4; both codes validate after every
# epoch and report the best accuracy (image_classification_sota tools/train.py, mdistiller trainer.py
# best_acc), so the rows evaluate every epoch and keep best.pt. The
# schedule counts epochs as the references do; the iterations follow from the training set at run time
# (recipe.resolve_schedule; the engine drops the last partial batch: 781 per epoch of the full set).
# DIST: CE 1 + 2 x DIST at tau 4. SoKD: the final code's CIFAR row is DAM + DAFA alone (its masked feature
# loss replaces FitNet's hint), searching over the first 50 epochs of 240.
# DIST_KD's classification folder is a submodule: hunto/image_classification_sota at d9662f7
DIST_CLS_CONFIGS = "hunto/DIST_KD classification (hunto/image_classification_sota@d9662f7) configs/strategies/distill"
MDISTILLER_KD = "megvii-research/mdistiller configs/cifar100/kd.yaml + mdistiller/engine/cfg.py"
SOKD_CIFAR = "FabienCode/mdistiller configs/DFKD/cifar/res324_84.yaml (docs/specs/sokd.md §2.5)"
CIFAR100 = Recipe(task="cls", data="cifar100", num_classes=100, crop=(32, 32), normalization="cifar100",
                  sync_bn=False,  # per-GPU BatchNorm under DDP, as the classification references
                  batch_size=64, iters=None, epochs=240, lr=0.05, weight_decay=5e-4, schedule="step",
                  lr_steps=(150, 180, 210), eval_every=1, keep_best=True, gpus=1,
                  ckpt_every=781)  # iterations, as in every recipe: once an epoch of the full set (50,000 // 64)
CIFAR_DIST_OPTIONS = {"tau": 4.0, "loss_weight": 2.0}
CIFAR_KD_OPTIONS = {"tau": 4.0}
# KD as mdistiller, SoKD's code base, trains it on CIFAR (its cfg.py KD defaults): 0.1 CE + 0.9 KD at tau 4.
# kd_<student>_cifar100 is that base row; sokd_kd_<student>_cifar100 plugs SoKD into it.
MDISTILLER_KD_OPTIONS = {"tau": 4.0, "loss_weight": 0.9}
MDISTILLER_KD_TASK_WEIGHT = 0.1
for _teacher in ("resnet32x4", "resnet56", "resnet110", "wrn_40_2"):
    register(PRESETS, f"teacher_{_teacher}_cifar100", dataclasses.replace(
        CIFAR100, student=_teacher, source="unknown teacher config: the CIFAR-100 protocol of docs/specs/dist.md §4; hunto/DIST_KD's README "
               "releases trained teachers (cifar_ckpts.zip)"))
for _teacher, _student in (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20")):
    register(PRESETS, f"dist_{_student}_cifar100", dataclasses.replace(
        CIFAR100, method="dist", student=_student, teacher=_teacher, method_options=CIFAR_DIST_OPTIONS,
        source=f"{DIST_CLS_CONFIGS}/dist_cifar.yaml"))
for _teacher, _student in (("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_40_1"), ("wrn_40_2", "wrn_16_2"),
                           ("resnet56", "resnet20"), ("resnet110", "resnet32")):
    _pair = dataclasses.replace(CIFAR100, student=_student, teacher=_teacher, source=SOKD_CIFAR)
    _sokd_search = {"search_epochs": 50}
    register(PRESETS, f"sokd_{_student}_cifar100", dataclasses.replace(_pair, method="sokd", method_options={
        "base": "none", "base_options": {"kd": CIFAR_KD_OPTIONS, "dist": CIFAR_DIST_OPTIONS}, **_sokd_search}))
    register(PRESETS, f"kd_{_student}_cifar100", dataclasses.replace(
        _pair, method="kd", method_options=MDISTILLER_KD_OPTIONS, task_loss_weight=MDISTILLER_KD_TASK_WEIGHT,
        source=MDISTILLER_KD))
    register(PRESETS, f"sokd_kd_{_student}_cifar100", dataclasses.replace(
        _pair, method="sokd", task_loss_weight=MDISTILLER_KD_TASK_WEIGHT,
        method_options={"base": "kd", "base_options": {"kd": MDISTILLER_KD_OPTIONS}, **_sokd_search}))

# --- ImageNet R34 -> R18 (DIST baseline recipe, docs/specs/dist.md §4): 100 epochs of 1,281,167 images at batch 256
# (32 on each of 8 processes: DIST_KD's README launches dist_train.sh 8), SGD lr 0.1 with Nesterov momentum and
# no weight decay on BatchNorm parameters and biases (image_classification_sota lib/utils/optim.py: nesterov
# unless --sgd-no-nesterov, every 1-D parameter out of the decay unless --opt-no-filter; resnet_dist.yaml sets
# neither), x0.1 every 30 epochs, wd 1e-4 on the rest; validation after every epoch, the best reported.
# KD (resnet_kdt4.yaml): 0.9 CE + KD at tau 4. DIST: CE 1 + 2 x DIST at tau 1. The teacher is torchvision's
# ResNet-34 (passed to --teacher-ckpt as released; kd_ref.convert recognises its layout). In epochs, as
# CIFAR's (5,004 iterations per epoch of the full set).
IMAGENET = Recipe(task="cls", data="imagenet", num_classes=1000, crop=(224, 224), normalization="imagenet_rgb",
                  sync_bn=False,
                  batch_size=256, iters=None, epochs=100, lr=0.1, weight_decay=1e-4, schedule="step",
                  lr_steps=(30, 60, 90), eval_every=1, keep_best=True, ckpt_every=1000, student="resnet18",
                  teacher="resnet34", gpus=8, nesterov=True, norm_weight_decay=0.0, bias_weight_decay=0.0,
                  source=f"{DIST_CLS_CONFIGS}/resnet_dist.yaml (its baseline recipe, docs/specs/dist.md §4)")
IMAGENET_KD_OPTIONS = {"tau": 4.0}
IMAGENET_DIST_OPTIONS = {"tau": 1.0, "loss_weight": 2.0}
# The twins train DIST's recipe without KD (ours): the 69.76 DIST's table prints next to ResNet-18 is
# torchvision's released ResNet-18, trained with torchvision's own recipe (references/classification: 90
# epochs, batch 32 x 8, lr 0.1, x0.1 every 30 epochs, plain momentum, wd 1e-4 on every parameter).
IMAGENET_BASELINE = dataclasses.replace(
    IMAGENET, source=f"ours: the DIST recipe without KD ({DIST_CLS_CONFIGS}/resnet_dist.yaml); DIST's 69.76 is "
                     "torchvision's ResNet-18 IMAGENET1K_V1 (pytorch/vision references/classification recipe)")
register(PRESETS, "kd_resnet18_imagenet", dataclasses.replace(
    IMAGENET, method="kd", method_options=IMAGENET_KD_OPTIONS, task_loss_weight=0.9,
    source=f"{DIST_CLS_CONFIGS}/resnet_kdt4.yaml"), baseline=IMAGENET_BASELINE)
register(PRESETS, "dist_resnet18_imagenet", dataclasses.replace(IMAGENET, method="dist",
                                                                method_options=IMAGENET_DIST_OPTIONS),
         baseline=IMAGENET_BASELINE)
# SoKD's own ImageNet config (FabienCode/mdistiller configs/DFKD/imagenet/reviewkdDFKD_r34_18.yaml): batch 256 on
# one process (train.py, nn.DataParallel), SGD lr 0.1, plain momentum 0.9, wd 1e-4 on every parameter
# (trainer.py), x0.1 at 30 / 60 / 90 of 100 epochs, validation every epoch with the best reported; search over
# the first 5 epochs (SERACH_EPOCH); loss weights CE 1, feature 1, KD 1 at T 4 (cfg.py DFKD defaults: area
# 1.0). Its base is ReviewKD (DFKD_ReviewKD.py: the hcl loss of the ABF fusions), which kd_ref does not
# build: the base here is KD at T 4, weight 1. The config's WARMUP_EPOCHS 1 is read by a line the code
# comments out (DFKD_ReviewKD.py), so no warm-up.
register(PRESETS, "sokd_resnet18_imagenet", dataclasses.replace(
    IMAGENET, method="sokd", gpus=1, nesterov=False, norm_weight_decay=None, bias_weight_decay=None,
    method_options={"base": "kd", "base_options": {"kd": IMAGENET_KD_OPTIONS, "dist": IMAGENET_DIST_OPTIONS},
                    "w_feat": 1.0, "w_dam": 1.0, "search_epochs": 5},
    source="FabienCode/mdistiller configs/DFKD/imagenet/reviewkdDFKD_r34_18.yaml"))

# --- Built-in synthetic classification: a CPU demo in which the teacher clearly beats the student.
# An image's label is one of the eight shapes of synthetic.SyntheticScenes (tasks.SYNTHETIC_NUM_IMAGE_CLASSES,
# which imports torch; tests/test_presets.py checks that the two agree).
SYNTHETIC_NUM_IMAGE_CLASSES = 8
SYNTHETIC_CLS = Recipe(task="cls", data="synthetic", num_classes=SYNTHETIC_NUM_IMAGE_CLASSES, crop=(32, 32),
                       sync_bn=False, synthetic_seed=0,
                       synthetic_size=(64, 64), synthetic_train=4000, synthetic_val=500, normalization="cifar100",
                       batch_size=32, iters=1600, lr=0.05, weight_decay=5e-4, schedule="step", lr_steps=(1200,),
                       eval_every=0, ckpt_every=200, student="resnet8", teacher="resnet20",
                       teacher_preset="synthetic_cls_teacher")
# DIST at tau 1 (its ImageNet setting): with 8 classes, CIFAR's tau 4 (x16 on each term) makes SGD diverge;
# weight 2 measured best of (tau, weight) in (1, 2) 62.6, (2, 1) 61.0, (1, 4) 57.8. SoKD's feature and DAM
# weights are re-tuned as docs/specs/sokd.md asks outside CIFAR-100: 1000 gives 62.2, 100 72.6, 10 76.6 (one seed each).
SYNTHETIC_DIST_OPTIONS = {"tau": 1.0, "loss_weight": 2.0}
SYNTHETIC_CLS_METHOD_OPTIONS = {
    "none": {}, "kd": CIFAR_KD_OPTIONS, "dist": SYNTHETIC_DIST_OPTIONS,
    "sokd": {"base": "kd", "base_options": {"kd": CIFAR_KD_OPTIONS, "dist": SYNTHETIC_DIST_OPTIONS},
             "search_iters": 100, "w_feat": 10.0, "w_dam": 10.0}}
# The teacher trains exactly as long as the student: resnet20 84.6 vs resnet8 60.8 top-1 after 1,600 iterations
# (one seed; 48.4 vs 42.2 after 800, before accuracy takes off).
register(PRESETS, "synthetic_cls_teacher", dataclasses.replace(SYNTHETIC_CLS, student=SYNTHETIC_CLS.teacher,
                                                               teacher=None, teacher_preset=None))
register_demo(PRESETS, "synthetic_cls", SYNTHETIC_CLS, SYNTHETIC_CLS_METHOD_OPTIONS, defaults=DEFAULT_PRESETS)

# On the real sets: the resnet8x4 (CIFAR) and resnet18 (ImageNet) rows, and for none a baseline twin.
DEFAULT_PRESETS.update({
    ("cls", "none", "cifar100"): "dist_resnet8x4_cifar100_baseline",
    **{("cls", method, "cifar100"): f"{method}_resnet8x4_cifar100" for method in ("kd", "dist", "sokd")},
    ("cls", "none", "imagenet"): "kd_resnet18_imagenet_baseline",
    **{("cls", method, "imagenet"): f"{method}_resnet18_imagenet" for method in ("kd", "dist", "sokd")},
})
