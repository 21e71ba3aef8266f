"""Tasks: what the engine needs to know about a task (models, data, evaluation), and nothing about
distillation. Each task object provides::

    build_model(recipe, name, pretrained) -> nn.Module
    build_data(recipe, split, root) -> (dataset with get(index, rng), collate)
    check_recipe(recipe)                    # clear errors for unsupported models/data
    new_eval_state(recipe); update_eval_state(state, outputs, batch, save_pred); finish_eval_state(state, runtime)
    main_metric                             # the number train.py prints
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from kd_ref import datasets, segmentors, transforms
from kd_ref.metrics import all_reduce_sum, confusion_matrix, segmentation_scores

SYNTHETIC_NUM_CLASSES = datasets.SyntheticScenes.num_semantic_classes


def synthetic_options(recipe, split: str) -> dict:
    """Options of the built-in synthetic scenes for ``split`` (none for real data sets)."""
    if recipe.data != "synthetic":
        return {}
    return {"seed": recipe.seed, "size": tuple(recipe.synthetic_size),
            "length": recipe.synthetic_train if split == "train" else recipe.synthetic_val}


class SegTask:
    """Semantic segmentation: segmentors of ``kd_ref.segmentors``, Cityscapes or synthetic scenes,
    mIoU by whole-image single-scale inference (logits upsampled bilinearly to the label size)."""
    main_metric = "mIoU"
    find_unused_parameters = False
    data_sets = ("synthetic", "cityscapes")

    def check_recipe(self, recipe) -> None:
        if recipe.data not in self.data_sets:
            raise ValueError(f"--data {recipe.data}: --task seg supports {list(self.data_sets)}")
        for role, name in (("--student", recipe.student), ("--teacher", recipe.teacher)):
            if name is not None and name not in segmentors.SEGMENTOR_NAMES:
                raise ValueError(f"{role} {name}: --task seg supports {sorted(segmentors.SEGMENTOR_NAMES)}")

    def build_model(self, recipe, name: str, pretrained: str | None = None):
        return segmentors.build_segmentor(name, num_classes=recipe.num_classes, flavour=recipe.flavour,
                                          pretrained_backbone=pretrained)

    def build_data(self, recipe, split: str, root: str | None):
        if split == "train":
            transform = transforms.SegTrainTransform(recipe.crop, recipe.scales, recipe.normalization,
                                                     scale_step=recipe.scale_step,
                                                     cat_max_ratio=recipe.cat_max_ratio)
        else:
            transform = transforms.SegEvalTransform(recipe.normalization)
        dataset = datasets.build_dataset("seg", recipe.data, root, split, transform,
                                         **synthetic_options(recipe, split))
        return dataset, dataset.collate

    def new_eval_state(self, recipe) -> dict:
        # the references upsample as they trained: align_corners=True (CIRKD, SKD), False (mmseg)
        return {"cm": torch.zeros(recipe.num_classes, recipe.num_classes, dtype=torch.int64),
                "num_classes": recipe.num_classes, "align_corners": recipe.flavour != "mmseg"}

    def update_eval_state(self, state: dict, outputs: dict, batch: dict, save_pred: str | None) -> None:
        target = batch["targets"]
        logits = F.interpolate(outputs["logits"].float(), size=target.shape[-2:], mode="bilinear",
                               align_corners=state["align_corners"])
        pred = logits.argmax(1)
        state["cm"] += confusion_matrix(pred.cpu(), target.cpu(), state["num_classes"])
        if save_pred:
            for prediction, name in zip(pred.cpu(), batch["names"]):
                datasets.save_prediction(prediction.numpy().astype(np.uint8), os.path.join(save_pred, name))

    def finish_eval_state(self, state: dict, runtime) -> dict:
        return segmentation_scores(all_reduce_sum(state["cm"]))
