"""Monocular depth presets (SKD's NYUDv2 row, the synthetic demo). Data only: each row is a
:class:`~kd_ref.recipe.Recipe` with its ``source``, and every distillation row has a ``<row>_baseline``
twin (:func:`~kd_ref.recipe.register`)."""
from __future__ import annotations

import dataclasses

from kd_ref.recipe import Recipe, register, register_demo

PRESETS: dict[str, Recipe] = {}
# Which preset a bare "--task T --method M [--data D]" means.
DEFAULT_PRESETS: dict[tuple, str] = {}


# --- Synthetic depth demo (depth_fcos.md §7) on the depth mode of the synthetic scenes
# (synthetic.SyntheticDepthScenes), 32 bins in [0.5, 10] m, no Eigen crop. Tuned on the demo: 64x80 instead of
# the spec's 128x160 (a quarter of the CPU step; the focal, 50 px, is the renderer's at 80 px wide), and the
# teacher is the student's ResNet-18 (D 64) trained twice as long, as in the seg demo (a ResNet-50 (D 256)
# from scratch costs several times the step on CPU). The discriminator needs maps of 64x64 or more and the
# stride-4 log depth here is 16x20, so the demo runs the pixel-wise and pair-wise terms (the holistic term is
# exercised at 256 pixels in the tests).
SYNTHETIC_DEPTH_MODEL = {"num_bins": 32, "d_min": 0.5, "d_max": 10.0, "focal": 50.0}
SYNTHETIC_DEPTH = Recipe(task="depth", data="synthetic", synthetic_style="easy", synthetic_size=(64, 80),
                         synthetic_seed=0,
                         sync_bn=False,  # per-GPU BatchNorm under DDP, as the NYUDv2 row
                         crop=(64, 80), normalization="imagenet_rgb", model_options=SYNTHETIC_DEPTH_MODEL,
                         batch_size=8, iters=300, lr=0.01, weight_decay=1e-4, eval_every=0, ckpt_every=100,
                         synthetic_val=50, student="depth_r18", teacher="depth_r18",
                         teacher_preset="synthetic_depth_teacher")
register(PRESETS, "synthetic_depth_teacher", dataclasses.replace(SYNTHETIC_DEPTH, teacher=None, teacher_preset=None,
                                                                 iters=600))
SYNTHETIC_DEPTH_METHOD_OPTIONS = {"none": {}, "skd": {"use_ho": False}}
register_demo(PRESETS, "synthetic_depth", SYNTHETIC_DEPTH, SYNTHETIC_DEPTH_METHOD_OPTIONS, defaults=DEFAULT_PRESETS)

# --- NYUDv2 row (depth_fcos.md §3, all [paper?], to verify against the PDF): MobileNetV2 VNL student,
# ResNeXt-101 teacher (--teacher-ckpt; VNL's released checkpoint layout is not mapped here), SGD batch 12,
# lr 0.001, poly 0.9, 200 epochs; 150 bins in 0.1-17 m, focal 519 px (VNL code). VNL's code (YvanYin/
# VNL_Monocular_Depth_Prediction @10dd987): square windows of 385-640 px resized to the 385x385 crop and tested
# on the image padded to 640x640 (data/nyudv2_dataset.py:96-112, --data nyu runs transforms.VNLDepthTransform),
# virtual-normal weight 6 (lib/core/config.py:73 DIFF_LOSS_WEIGHT), weight decay 5e-4
# and momentum 0.9 (lib/models/metric_depth_model.py:98, 108); evaluation every 10 epochs [ours].
NYU_DEPTH_MODEL = {"num_bins": 150, "d_min": 0.1, "d_max": 17.0, "focal": 519.0, "lambda_vn": 6.0}
register(PRESETS, "skd_depth_mv2_nyu", Recipe(
    task="depth", data="nyu", method="skd", student="depth_mv2", teacher="depth_x101", crop=(385, 385),
    sync_bn=False,  # per-GPU BatchNorm: VNL trains with nn.DataParallel (tools/train_nyu_metric.py)
    normalization="imagenet_rgb", model_options=NYU_DEPTH_MODEL, batch_size=12, iters=None, epochs=200,
    lr=0.001, momentum=0.9, weight_decay=5e-4, schedule="poly", poly_power=0.9, eval_every=10, ckpt_every=1000,
    pretrained="mobilenet_v2-b0353104.pth", method_options={},
    gpus=1,  # VNL's README trains with one process (python tools/train_nyu_metric.py)
    source="[paper?] SKD TPAMI depth schedule (to verify) on YvanYin/VNL_Monocular_Depth_Prediction "
           "(bins, focal, crop); SKD weights ours"))
DEFAULT_PRESETS[("depth", "none", "nyu")] = "skd_depth_mv2_nyu_baseline"
DEFAULT_PRESETS[("depth", "skd", "nyu")] = "skd_depth_mv2_nyu"
