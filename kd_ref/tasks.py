"""Tasks: what the engine needs to know about a task (models, data, evaluation), and nothing about
distillation. Each task object provides::

    build_model(recipe, name, pretrained) -> nn.Module
    build_data(recipe, split, root) -> (dataset with get(index, rng), collate)
    check_recipe(recipe)                    # clear errors for unsupported models/data
    new_eval_state(recipe); update_eval_state(state, outputs, batch, save_pred); finish_eval_state(state, runtime)
    main_metric                             # the number train.py prints
    size_field                              # the recipe field of the training input size: crop (H, W), or
                                            # image_scale (long side, short side) for whole-image resizing
"""
from __future__ import annotations

import json
import os
from itertools import repeat

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from kd_ref import datasets, detectors, segmentors, synthetic, transforms
from kd_ref.metrics import all_reduce_sum, confusion_matrix, segmentation_scores
from kd_ref.metrics import coco_box_ap, coco_results, voc_map
from kd_ref.metrics import coco_mask_results, coco_segm_eval
from kd_ref import classifiers, convert, depth, instance_seg
from kd_ref.metrics import topk_correct

SYNTHETIC_NUM_CLASSES = synthetic.SyntheticScenes.num_semantic_classes


def synthetic_options(recipe, split: str) -> dict:
    """Options of the built-in synthetic scenes for ``split`` (none for real data sets)."""
    if recipe.data != "synthetic":
        return {}
    seed = recipe.seed if recipe.synthetic_seed is None else recipe.synthetic_seed
    return {"seed": seed, "size": tuple(recipe.synthetic_size), "style": recipe.synthetic_style,
            "length": recipe.synthetic_train if split == "train" else recipe.synthetic_val}


class SegTask:
    """Semantic segmentation: segmentors of ``kd_ref.segmentors``, Cityscapes or synthetic scenes,
    mIoU by whole-image single-scale inference (logits upsampled bilinearly to the label size)."""
    main_metric = "mIoU"
    size_field = "crop"
    find_unused_parameters = False
    data_sets = ("synthetic", "cityscapes")
    MIN_CROP = 32

    def check_recipe(self, recipe) -> None:
        if recipe.data not in self.data_sets:
            raise ValueError(f"--data {recipe.data}: --task seg supports {list(self.data_sets)}")
        if recipe.data == "synthetic" and not 2 <= recipe.num_classes <= SYNTHETIC_NUM_CLASSES:
            raise ValueError(f"num_classes {recipe.num_classes}: synthetic scenes have background + 1.."
                             f"{SYNTHETIC_NUM_CLASSES - 1} shapes (2..{SYNTHETIC_NUM_CLASSES} classes)")
        for role, name in (("--student", recipe.student), ("--teacher", recipe.teacher)):
            if name is not None and name not in segmentors.SEGMENTOR_NAMES:
                raise ValueError(f"{role} {name}: --task seg supports {sorted(segmentors.SEGMENTOR_NAMES)}")
        if len(recipe.crop) != 2 or min(recipe.crop) < self.MIN_CROP:
            raise ValueError(f"--crop {' '.join(map(str, recipe.crop))}: expected H W of at least {self.MIN_CROP} pixels "
                             f"(the segmentors predict at stride 8; their heads need a map of 4x4 or more)")

    def build_model(self, recipe, name: str, pretrained: str | None = None):
        return segmentors.build_segmentor(name, num_classes=recipe.num_classes, flavour=recipe.flavour,
                                          pretrained_backbone=pretrained)

    def build_data(self, recipe, split: str, root: str | None):
        if split == "train":
            transform = transforms.SegTrainTransform(recipe.crop, recipe.scales, recipe.normalization,
                                                     scale_step=recipe.scale_step,
                                                     cat_max_ratio=recipe.cat_max_ratio,
                                                     photometric=recipe.photometric_distortion)
        else:
            transform = transforms.SegEvalTransform(recipe.normalization)
        options = synthetic_options(recipe, split)
        if recipe.data == "synthetic":
            options["num_classes"] = recipe.num_classes - 1  # the loader counts shapes, without background
        dataset = datasets.build_dataset("seg", recipe.data, root, split, transform, **options)
        return dataset, dataset.collate

    def new_eval_state(self, recipe) -> dict:
        # the references upsample as they trained: align_corners=True (CIRKD, SKD), False (mmseg)
        is_synthetic = recipe.data == "synthetic"
        classes = synthetic.SyntheticScenes.CLASSES if is_synthetic else datasets.CITYSCAPES_CLASSES
        return {"cm": torch.zeros(recipe.num_classes, recipe.num_classes, dtype=torch.int64),
                "num_classes": recipe.num_classes, "align_corners": recipe.flavour != "mmseg", "data": recipe.data,
                "classes": classes[:recipe.num_classes],
                "palette": synthetic.SYNTHETIC_PALETTE if is_synthetic else datasets.CITYSCAPES_PALETTE,
                "legend_written": False}

    def update_eval_state(self, state: dict, outputs: dict, batch: dict, save_pred: str | None) -> None:
        target = batch["targets"]
        logits = F.interpolate(outputs["logits"].float(), size=target.shape[-2:], mode="bilinear",
                               align_corners=state["align_corners"])
        pred = logits.argmax(1)
        try:  # on the device of the predictions: only the small matrix travels, not the label maps
            state["cm"] += confusion_matrix(pred, target, state["num_classes"], transforms.IGNORE_INDEX).cpu()
        except ValueError as error:  # predictions are argmax indices, so what is out of range is a label
            raise ValueError(f"--data {state['data']}: {', '.join(batch['names'])} has labels the model cannot predict "
                             f"({error}): the model predicts {state['num_classes']} classes; evaluate it on data of "
                             "its own classes") from None
        if save_pred:
            if not state["legend_written"]:
                datasets.write_legend(save_pred, state["classes"], state["palette"])
                state["legend_written"] = True
            for prediction, name in zip(pred.cpu(), batch["names"]):
                datasets.save_prediction(prediction.numpy().astype(np.uint8), os.path.join(save_pred, name),
                                         state["palette"])

    def finish_eval_state(self, state: dict, runtime) -> dict:
        return segmentation_scores(all_reduce_sum(state["cm"]))


# ------------------------------------------------------------------------------------------ detection
SYNTHETIC_NUM_OBJECT_CLASSES = len(synthetic.SHAPES)  # det labels: the shapes, no background


def _to_original_pixels(boxes: torch.Tensor, target: dict) -> np.ndarray:
    """xyxy boxes on the transformed input (float64 numpy) in the original image's pixels."""
    boxes = boxes.detach().cpu().double()
    if target["flipped"]:
        boxes = transforms.flip_boxes(boxes, target["size"][1])
    return transforms.boxes_to_original(boxes, target).numpy()


class DetTask:
    """Object detection: RetinaNet / Faster R-CNN of ``kd_ref.detectors`` on synthetic scenes, PASCAL VOC or
    COCO, with mmdet 2.x data handling (keep-ratio resize to ``recipe.image_scale``, flip 0.5 in training,
    zero padding to a multiple of 32 in the collate).

    Evaluation maps every image's detections back to original-image pixels, gathers them from all DDP
    ranks and scores them once, in image-id order:

    * voc, synthetic: VOC mAP@0.5 (``voc_map``; ``difficult`` boxes neither count nor hurt) ->
      ``{"mAP", "AP": [per class]}``. VOC uses 11-point AP (its evaluation set is VOC2007 test, for which
      mmdet's VOC config and the devkit use 11 points); synthetic data uses the area under the curve,
      mmdet's rule for every other set.
    * coco: pycocotools COCOeval against the loader's annotation file -> ``"mAP"`` = AP@[.5:.95] plus
      ``AP, AP50, AP75, APs, APm, APl``.

    The engine hands ``new_eval_state`` only the recipe, so the task remembers the data set of its last
    ``build_data`` call for an evaluation split (the engine and evaluate.py build it just before they
    evaluate); COCO scoring reads the ground truth from it. ``save_pred=DIR`` writes ``DIR/detections.json``
    in COCO results format (original pixels; the data set's category ids for COCO, 0-based labels otherwise).
    """
    main_metric = "mAP"
    size_field = "image_scale"
    # Every trainable parameter reaches the losses in every iteration (images without boxes still give
    # all-negative targets), so DDP needs no search for unused parameters, as in mmdet.
    find_unused_parameters = False
    data_sets = ("synthetic", "voc", "coco")

    def __init__(self):
        self.eval_base = None

    name = "det"
    models = detectors.SUPPORTED_DETECTORS
    min_image_scale = 32  # one cell of the stride-32 level (C5)

    def check_recipe(self, recipe) -> None:
        if recipe.data not in self.data_sets:
            raise ValueError(f"--data {recipe.data}: --task {self.name} supports {list(self.data_sets)}")
        for role, name in (("--student", recipe.student), ("--teacher", recipe.teacher)):
            if name is not None and name not in self.models:
                raise ValueError(f"{role} {name}: --task {self.name} supports {', '.join(self.models)}")
        named = [("image_scale", recipe.image_scale)] + [("train_image_scales", s) for s in recipe.train_image_scales]
        for field, scale in named:
            if len(scale) != 2 or min(scale) < self.min_image_scale:
                raise ValueError(f"{field} {scale}: expected (long side, short side) bounds >= {self.min_image_scale}")
        transforms.check_multiscale(tuple(recipe.train_image_scales), recipe.multiscale_mode)
        if recipe.data == "synthetic" and not 1 <= recipe.num_classes <= SYNTHETIC_NUM_OBJECT_CLASSES:
            raise ValueError(f"num_classes {recipe.num_classes}: synthetic scenes have "
                             f"1..{SYNTHETIC_NUM_OBJECT_CLASSES} object classes")

    def build_model(self, recipe, name: str, pretrained: str | None = None):
        return detectors.build_detector(name, recipe.num_classes, pretrained_backbone=pretrained,
                                        rcnn_rois_per_image=recipe.rcnn_rois_per_image,
                                        fcos_options=recipe.model_options if name in detectors.FCOS_DETECTORS else None)

    def build_data(self, recipe, split: str, root: str | None):
        train = split == "train"
        transform = transforms.DetTransform(recipe.image_scale, flip_prob=0.5 if train else 0.0,
                                            normalization=recipe.normalization,
                                            scales=recipe.train_image_scales if train else (),
                                            multiscale_mode=recipe.multiscale_mode)
        options = synthetic_options(recipe, split)
        if recipe.data == "synthetic":
            options["num_classes"] = recipe.num_classes
        if recipe.data == "voc" and recipe.classes is not None:
            options["classes"] = tuple(recipe.classes)
        dataset = datasets.build_dataset(self.name, recipe.data, root, split, transform, **options)
        classes = dataset.base.object_classes if recipe.data == "synthetic" else dataset.classes
        if len(classes) != recipe.num_classes:
            raise ValueError(f"num_classes {recipe.num_classes} does not match the {len(classes)} classes of "
                             f"--data {recipe.data} at {root} ({', '.join(classes[:4])}, ...); pass "
                             f"--set num_classes={len(classes)}")
        if not train:
            self.eval_base = dataset.base
        return dataset, dataset.collate

    def new_eval_state(self, recipe) -> dict:
        coco = None
        if recipe.data == "coco":
            if not isinstance(self.eval_base, datasets.COCODetection):
                raise ValueError("COCO evaluation needs the evaluation set: call build_data(recipe, 'val', root) "
                                 "before new_eval_state(recipe)")
            coco = self.eval_base
        return {"records": [], "num_classes": recipe.num_classes, "use_07_metric": recipe.data == "voc",
                "coco": coco, "save_pred": None}

    def update_eval_state(self, state: dict, outputs: dict, batch: dict, save_pred: str | None) -> None:
        state["save_pred"] = save_pred
        for found, target in zip(outputs["detections"], batch["targets"]):
            record = {"image_id": int(target["image_id"]),
                      "detections": {"boxes": _to_original_pixels(found["boxes"], target),
                                     "scores": found["scores"].detach().cpu().double().numpy(),
                                     "labels": found["labels"].cpu().numpy()}}
            if state["coco"] is None:
                record["ground_truth"] = {"boxes": _to_original_pixels(target["boxes"], target),
                                          "labels": target["labels"].cpu().numpy(),
                                          "difficult": target["difficult"].cpu().numpy()}
            state["records"].append(record)

    def finish_eval_state(self, state: dict, runtime) -> dict:
        records = state["records"]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shards = [None] * dist.get_world_size()
            dist.all_gather_object(shards, records)
            records = [record for shard in shards for record in shard]
        records = sorted(records, key=lambda record: record["image_id"])
        image_ids = [record["image_id"] for record in records]
        found = [record["detections"] for record in records]
        category_ids = state["coco"].category_ids if state["coco"] else list(range(state["num_classes"]))
        results = coco_results(found, image_ids, category_ids)
        if state["coco"] is not None:
            scores = coco_box_ap(state["coco"].coco, results)
            metrics = {"mAP": scores["AP"], **scores}
        else:
            metrics = voc_map(found, [record["ground_truth"] for record in records], state["num_classes"],
                              use_07_metric=state["use_07_metric"])
        if state["save_pred"] and runtime.is_main:
            os.makedirs(state["save_pred"], exist_ok=True)
            with open(os.path.join(state["save_pred"], "detections.json"), "w") as handle:
                json.dump(results, handle)
        return metrics

    def probe_data(self, recipe, image_size: tuple, num_objects: int, num_images: int = 1):
        """``(dataset, collate)`` of ``num_images`` made-up training samples of ``image_size`` (H, W), each with
        ``num_objects`` boxes (:class:`synthetic.ProbeScenes`), through this task's training pipeline at the recipe's
        ``image_scale`` (keep-ratio resize, normalisation; no flip, so the sample is deterministic; the
        collate pads to a multiple of 32): real tensors with the layout of real targets, for counting a
        training step whose sizes depend on values (``kd_ref.bench_flops``)."""
        transform = transforms.DetTransform(recipe.image_scale, flip_prob=0.0, normalization=recipe.normalization)
        scenes = synthetic.ProbeScenes(image_size, num_objects, recipe.num_classes, num_images, with_masks=self.name == "ins")
        dataset = datasets.DetectionSet(scenes, transform, train=True, with_masks=self.name == "ins")
        return dataset, dataset.collate


# ------------------------------------------------------------------------------ classification
SYNTHETIC_NUM_IMAGE_CLASSES = len(synthetic.SyntheticScenes.CLASSES) - 1  # image label = a shape, no background


class SyntheticObjects:
    """Classification view of the synthetic scenes: the square window around a scene's largest visible
    object (``MARGIN`` x its longer box side, so neighbours, occluders and background texture stay in
    view), resampled to ``size`` x ``size``; the label is that object's shape, the scene's ``image_label``.

    Whole cluttered scenes labelled by their largest object are too hard for a CPU demo: CIFAR ResNets
    stay at chance level for thousands of iterations. Centred on the object, the task is CIFAR-like
    (look-alike shapes, random colour, rotation, texture, occlusion) and small networks learn it in
    minutes, with a clear gap between a ResNet-20 and a ResNet-8."""
    MARGIN = 1.25

    def __init__(self, scenes: synthetic.SyntheticScenes, size: int):
        self.scenes, self.size = scenes, size
        self.classes = scenes.object_classes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        sample = self.scenes[index]
        largest = int(np.argmax(sample["masks"].sum((1, 2))))
        x1, y1, x2, y2 = sample["boxes"][largest].tolist()
        half = self.MARGIN * max(x2 - x1, y2 - y1) / 2
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        window = Image.fromarray(sample["image"]).crop(
            tuple(round(v) for v in (cx - half, cy - half, cx + half, cy + half)))  # outside the scene: black
        image = np.asarray(window.resize((self.size, self.size), Image.Resampling.BILINEAR))
        return {"image": image, "image_label": int(sample["labels"][largest])}


class ClsTask:
    """Image classification: classifiers of ``kd_ref.classifiers`` on CIFAR-100, ImageNet-style folders or
    the synthetic scenes' image labels (the shape with the largest visible area); top-1 / top-5 accuracy.

    Synthetic data is :class:`SyntheticObjects` (scenes of ``synthetic_size``, object windows of ``crop``).
    Transforms (``recipe.crop`` is the network input, ``recipe.normalization`` the statistics):
    CIFAR-100 and synthetic train = zero-pad crop/8 (4 px for 32x32), random crop, flip (CRD code base);
    ImageNet train = RandomResizedCrop + flip, eval = resize the short side to crop * 256/224 and centre
    crop (torchvision reference); CIFAR-100 and synthetic eval use the whole image."""
    main_metric = "top1"
    size_field = "crop"
    find_unused_parameters = False
    data_sets = datasets.SUPPORTED_DATA["cls"]

    def check_recipe(self, recipe) -> None:
        if recipe.data not in self.data_sets:
            raise ValueError(f"--data {recipe.data}: --task cls supports {list(self.data_sets)}")
        for role, name in (("--student", recipe.student), ("--teacher", recipe.teacher)):
            if name is not None and name not in classifiers.CLASSIFIER_NAMES:
                raise ValueError(f"{role} {name}: --task cls supports {', '.join(classifiers.CLASSIFIER_NAMES)}")
        if len(recipe.crop) != 2 or recipe.crop[0] != recipe.crop[1] or recipe.crop[0] < 8:
            raise ValueError(f"--crop {recipe.crop}: classification expects a square crop of at least 8 pixels")

    def build_model(self, recipe, name: str, pretrained: str | None = None):
        # --pretrained names whole-classifier weights here (torchvision's ImageNet files), not a trunk
        model = classifiers.build_classifier(name, recipe.num_classes)
        if pretrained is not None:
            convert.load_weights(model, pretrained, f"--pretrained {pretrained}")
        return model

    @staticmethod
    def _transform(recipe, train: bool):
        size, normalization = recipe.crop[0], recipe.normalization
        if recipe.data == "imagenet":
            if train:
                return transforms.RandomResizedCropFlip(size, normalization=normalization)
            return transforms.ResizeCenterCrop(size, round(size * 256 / 224), normalization)
        if train:
            return transforms.PadCropFlip(size, size // 8, normalization)
        return transforms.ResizeCenterCrop(None, None, normalization)

    def build_data(self, recipe, split: str, root: str | None):
        transform = self._transform(recipe, split == "train")
        if recipe.data == "synthetic":
            scenes = synthetic.SyntheticScenes(split, **synthetic_options(recipe, split))
            dataset = datasets.ClassificationSet(SyntheticObjects(scenes, recipe.crop[0]), transform)
        else:
            dataset = datasets.build_dataset("cls", recipe.data, root, split, transform)
        found = len(dataset.classes)
        if found != recipe.num_classes:
            raise ValueError(f"--data {recipe.data} ({root or 'built-in'}): {found} classes, but the recipe has "
                             f"num_classes={recipe.num_classes}; pass --set num_classes={found}")
        return dataset, dataset.collate

    def new_eval_state(self, recipe) -> dict:
        return {"counts": torch.zeros(3, dtype=torch.int64)}   # images, top-1 hits, top-5 hits

    def update_eval_state(self, state: dict, outputs: dict, batch: dict, save_pred: str | None) -> None:
        if save_pred:
            raise ValueError("--save-pred: classification writes no prediction files (segmentation and "
                             "detection do)")
        state["counts"] += topk_correct(outputs["logits"].float().cpu(), batch["targets"].cpu(), ks=(1, 5))

    def finish_eval_state(self, state: dict, runtime) -> dict:
        images, top1, top5 = all_reduce_sum(state["counts"]).tolist()
        if images == 0:
            return {"top1": float("nan"), "top5": float("nan"), "images": 0}
        return {"top1": 100.0 * top1 / images, "top5": 100.0 * top5 / images, "images": images}


# ------------------------------------------------------------------------ instance segmentation
class InsTask(DetTask):
    """Instance segmentation: SOLO and Mask R-CNN of ``kd_ref.instance_seg`` on synthetic instances
    (:class:`synthetic.SyntheticInstances`) or COCO with masks; the detection pipeline (keep-ratio resize to
    ``recipe.image_scale``, flip 0.5 in training with the masks, zero padding to a multiple of 32).

    Evaluation takes every image's soft masks to the original image (bilinear, > 0.5), RLE-encodes them
    and scores them once, gathered from all ranks, with pycocotools ``COCOeval(iouType="segm")``
    (``coco_segm_eval``): ``segm_AP`` (the main metric), ``segm_AP50`` ... ``segm_APl``; models that
    predict boxes (Mask R-CNN) add ``bbox_AP`` ... from ``COCOeval(iouType="bbox")``. COCO data is scored
    against the loader's annotation file, synthetic data against a COCO index of the same instances
    (:func:`datasets.coco_ground_truth`). ``save_pred=DIR`` writes ``DIR/segmentations.json`` (and
    ``detections.json`` with boxes) in COCO results format."""
    main_metric = "segm_AP"
    # SOLO's losses read every head parameter in every step; Mask R-CNN's mask loss is 0 * logits without
    # positives, so its mask head stays in the graph as well
    find_unused_parameters = False
    data_sets = datasets.SUPPORTED_DATA["ins"]
    name = "ins"
    models = instance_seg.INSTANCE_MODELS
    min_image_scale = 64  # SOLO's coarsest head level is at stride 32: at least 2x2 cells there

    def check_recipe(self, recipe) -> None:
        super().check_recipe(recipe)
        unknown = sorted(set(recipe.model_options) - set(instance_seg.INSTANCE_OPTION_NAMES))
        if unknown:
            raise ValueError(f"model_options {unknown}: --task ins takes {list(instance_seg.INSTANCE_OPTION_NAMES)}")

    def build_model(self, recipe, name: str, pretrained: str | None = None):
        return instance_seg.build_instance_model(name, recipe.num_classes, pretrained_backbone=pretrained,
                                                 rcnn_rois_per_image=recipe.rcnn_rois_per_image,
                                                 **recipe.model_options)

    def new_eval_state(self, recipe) -> dict:
        if self.eval_base is None:
            raise ValueError("instance evaluation needs the evaluation set: call build_data(recipe, 'val', root) "
                             "before new_eval_state(recipe)")
        if isinstance(self.eval_base, datasets.COCODetection):
            coco, category_ids = self.eval_base.coco, self.eval_base.category_ids
        else:
            category_ids = list(range(1, recipe.num_classes + 1))
            coco = datasets.coco_ground_truth(self.eval_base, category_ids)
        return {"segm": [], "bbox": [], "with_boxes": False, "coco": coco, "category_ids": category_ids,
                "save_pred": None}

    def update_eval_state(self, state: dict, outputs: dict, batch: dict, save_pred: str | None) -> None:
        state["save_pred"] = save_pred
        for found, target in zip(outputs["instances"], batch["targets"]):
            image_id = int(target["image_id"])
            masks = instance_seg.masks_at_original_size(found, target)
            state["segm"] += coco_mask_results([{"masks": masks.cpu().numpy(), "scores": found["scores"].cpu(),
                                                 "labels": found["labels"].cpu()}], [image_id], state["category_ids"])
            if "boxes" in found:
                state["with_boxes"] = True
                boxes = {"boxes": _to_original_pixels(found["boxes"], target), "scores": found["scores"].cpu(),
                         "labels": found["labels"].cpu()}
                state["bbox"] += coco_results([boxes], [image_id], state["category_ids"])

    def finish_eval_state(self, state: dict, runtime) -> dict:
        results = {"segm": state["segm"], "bbox": state["bbox"]}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shards = [None] * dist.get_world_size()
            dist.all_gather_object(shards, results)
            results = {kind: [r for shard in shards for r in shard[kind]] for kind in results}
        for kind in results:
            results[kind].sort(key=lambda result: (result["image_id"], -result["score"]))
        if state["save_pred"] and runtime.is_main:  # before scoring: pycocotools' loadRes adds keys to them
            os.makedirs(state["save_pred"], exist_ok=True)
            for kind, file_name in (("segm", "segmentations.json"), ("bbox", "detections.json")):
                if kind == "segm" or state["with_boxes"]:
                    with open(os.path.join(state["save_pred"], file_name), "w") as handle:
                        json.dump(results[kind], handle)
        metrics = {f"segm_{name}": value for name, value in coco_segm_eval(results["segm"], state["coco"]).items()}
        if state["with_boxes"]:
            metrics.update({f"bbox_{name}": value for name, value in coco_box_ap(state["coco"], results["bbox"]).items()})
        return metrics
# ------------------------------------------------------------------------------ depth
class DepthTask:
    """Monocular depth: :class:`kd_ref.depth.DepthNet` on synthetic scenes (their depth target) or NYUDv2
    (``datasets.NYU_LAYOUT``). Synthetic scenes: training on a random ``recipe.crop`` and a flip, evaluation
    on the whole image, padded to a multiple of 32, the prediction cropped back to it. NYUDv2: VNL's
    protocol (:class:`transforms.VNLDepthTransform`, square ``recipe.crop``): random square windows resized
    to the crop, depth rescaled; evaluation on the image padded at the top to a square and resized to the
    crop, the prediction mapped back to the original map (:func:`transforms.vnl_restore`). Metrics
    (``depth_metrics``) are pooled over every valid pixel of the set, inside the Eigen crop on NYUDv2's
    480x640 maps. ``save_pred=DIR`` writes each prediction as a uint16 millimetre PNG under its image's name.

    The main metric is delta1 (higher is better, as the engine's keep-best rule expects); rel, the
    papers' headline, is reported next to it."""
    main_metric = "delta1"
    size_field = "crop"
    find_unused_parameters = False
    data_sets = datasets.SUPPORTED_DATA["depth"]
    MIN_CROP = 32

    def check_recipe(self, recipe) -> None:
        if recipe.data not in self.data_sets:
            raise ValueError(f"--data {recipe.data}: --task depth supports {list(self.data_sets)}")
        for role, name in (("--student", recipe.student), ("--teacher", recipe.teacher)):
            if name is not None and name not in depth.DEPTH_MODELS:
                raise ValueError(f"{role} {name}: --task depth supports {', '.join(depth.DEPTH_MODELS)}")
        unknown = sorted(set(recipe.model_options) - set(depth.DEPTH_OPTION_NAMES))
        if unknown:
            raise ValueError(f"model_options {unknown}: --task depth takes {list(depth.DEPTH_OPTION_NAMES)}")
        if len(recipe.crop) != 2 or min(recipe.crop) < self.MIN_CROP:
            raise ValueError(f"--crop {' '.join(map(str, recipe.crop))}: expected H W of at least {self.MIN_CROP} "
                             "pixels (the encoders reach stride 32)")
        if recipe.data == "nyu" and recipe.crop[0] != recipe.crop[1]:
            raise ValueError(f"--crop {' '.join(map(str, recipe.crop))}: NYUDv2 runs VNL's square crops (H = W)")

    def build_model(self, recipe, name: str, pretrained: str | None = None):
        return depth.build_depth_model(name, pretrained, **recipe.model_options)

    def build_data(self, recipe, split: str, root: str | None):
        if recipe.data == "nyu":
            transform = transforms.VNLDepthTransform(recipe.crop[0], split == "train", recipe.normalization)
        else:
            transform = transforms.DepthTransform(recipe.crop if split == "train" else None, recipe.normalization)
        dataset = datasets.build_depth_dataset(recipe.data, root, split, transform, **synthetic_options(recipe, split))
        return dataset, dataset.collate

    def new_eval_state(self, recipe) -> dict:
        return {"sums": None, "eigen_crop": recipe.data == "nyu"}

    def update_eval_state(self, state: dict, outputs: dict, batch: dict, save_pred: str | None) -> None:
        for prediction, gt, (height, width), name, restore in zip(outputs["depth"], batch["targets"],
                                                                  batch["image_sizes"], batch["names"],
                                                                  batch.get("restores", repeat(None))):
            prediction = prediction[0, :height, :width].float().cpu()
            if restore is not None:
                prediction = transforms.vnl_restore(prediction, restore)
                height, width = restore["size"]
            gt = gt[:height, :width].float().cpu()
            valid = gt > depth.INVALID_DEPTH
            if state["eigen_crop"] and (height, width) == (480, 640):
                valid = depth.eigen_crop(valid)
            state["sums"] = depth.merge_depth_metrics(state["sums"], depth.depth_metrics(prediction, gt, valid))
            if save_pred:
                millimetres = np.clip(np.round(prediction.numpy() * 1000), 0, 65535).astype(np.uint16)
                os.makedirs(save_pred, exist_ok=True)
                Image.fromarray(millimetres).save(os.path.join(save_pred, os.path.splitext(name)[0] + ".png"))

    def finish_eval_state(self, state: dict, runtime) -> dict:
        sums = state["sums"] or {name: torch.zeros((), dtype=torch.float64) for name in depth.DEPTH_SUM_NAMES}
        names = sorted(sums)
        totals = all_reduce_sum(torch.stack([sums[name].double() for name in names]))
        return depth.finish_depth_metrics(dict(zip(names, totals)))


TASKS = {
    "seg": SegTask(),
    "cls": ClsTask(),
    "det": DetTask(),
    "ins": InsTask(),
    "depth": DepthTask(),
}
