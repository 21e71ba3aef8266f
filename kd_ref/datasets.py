"""Data sets of the real benchmarks and the per-task torch wrappers and collates over any base data set
(these loaders or :mod:`kd_ref.synthetic`'s scenes); :func:`build_dataset` and :func:`build_depth_dataset`
pick one by task and ``--data``.

Base data sets return plain numpy samples (``dataset[i] -> dict``):

* seg:   ``image`` uint8 HxWx3 RGB, ``semantic`` uint8 HxW (class ids, 255 = ignore), ``name``; or
         ``semantic`` the ids that ``label_map`` (uint8, 256 entries) maps to class ids, which the transform
         applies to the label pixels it keeps (Cityscapes: labelIds to train ids)
* det:   ``image``, ``boxes`` float32 (K,4) xyxy, ``labels`` int64 (K,) 0-based, ``difficult`` bool (K,)
         (VOC difficult / COCO crowd: kept for evaluation, dropped from training targets), ``image_id``;
         ins adds ``masks`` bool (K,H,W)
* cls:   ``image``, ``image_label`` int
* depth: ``image``, ``depth`` float32 HxW metres (0 = invalid), ``name``

The task wrappers (:class:`SegmentationSet`, :class:`DetectionSet`, :class:`ClassificationSet`,
:class:`DepthSet`) apply a transform of :mod:`kd_ref.transforms` with a per-sample
``numpy.random.Generator`` (``get(index, rng)``; the engine seeds it by (seed, epoch, index)), their collates
build the batches a DataLoader worker hands over, and ``prepare_batch(batch)``, run on the batch once it is on
its device (the engine calls it right after the transfer), turns them into the batches of the contract:

    seg:   {"images": (B,3,H,W), "targets": int64 (B,H,W) 255 = ignore, "names": [str]}
    det:   {"images": (B,3,Hp,Wp) zero-padded to a multiple of 32, "image_sizes": [(h, w)],
            "targets": [{"boxes", "labels", "difficult", "image_id", "scale_factor", "orig_size", "size",
                         "flipped" (, "masks"; "sampling_seed" in training)}]}
    cls:   {"images": (B,3,H,W), "targets": int64 (B,)}
    depth: {"images": (B,3,Hp,Wp) zero-padded to a multiple of 32, "image_sizes": [(h, w)],
            "targets": float32 (B,Hp,Wp) metres, 0 = invalid (also the padding), "names": [str]}
           and under VNL's test geometry "restores": [``transforms.vnl_restore``'s dicts], "targets" then
           being the original maps, zero-padded to the batch's largest

Depth batches are float from the worker on and ``prepare_batch`` returns them as they are. Detection and
classification batches leave the worker as uint8 pixels (each decoded image or crop at the top left of a
zero canvas; cls batches also carry each crop's ``"geometry"``, det targets theirs) and ``prepare_batch``
runs the device half of their transforms (``transforms.device_inputs``). Segmentation batches leave it with
uint8 labels (padding 255) and, per sample, ``"geometry"`` (window size, flip, photometric parameters);
their images are the resampled crop windows in float, undistorted, unflipped and unnormalised (training),
or the uint8 pixels (evaluation); ``prepare_batch`` distorts, flips, normalises, zero-pads and makes the
targets int64 (``transforms.seg_device_inputs``).

The sections follow the tasks: shared tables, image I/O and the wrapper base, then per task its loaders,
wrapper and collate, then the factories.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import pickle
import xml.etree.ElementTree as ET

import numpy as np
import torch
import torchvision.io as tv_io
from PIL import Image

from kd_ref import cli
from kd_ref import transforms as T
from kd_ref.synthetic import SyntheticDepthScenes, SyntheticInstances, SyntheticScenes, box_targets_of

# ------------------------------------------------------------------------------------------ tables
# Official cityscapesScripts labels.py: (labelId, trainId) of the 19 evaluated classes; all other
# labelIds (void, rectification border, license plate, parking, rail track, tunnel, ...) -> 255.
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                      "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
                      "bus", "train", "motorcycle", "bicycle")
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], np.uint8)
LABEL_ID_TO_TRAIN_ID = np.full(256, T.IGNORE_INDEX, np.uint8)
LABEL_ID_TO_TRAIN_ID[list(CITYSCAPES_LABEL_IDS)] = np.arange(len(CITYSCAPES_LABEL_IDS))

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")

CITYSCAPES_LAYOUT = ("leftImg8bit/{split}/<city>/*_leftImg8bit.png and "
                     "gtFine/{split}/<city>/*_gtFine_labelIds.png")
VOC_LAYOUT = "VOCdevkit/VOC<year>/{JPEGImages,Annotations,ImageSets/Main/<set>.txt}"
COCO_LAYOUT = "annotations/instances_<split>.json and <split>/<file_name>"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


# --------------------------------------------------------------------------------------- image I/O
def _decode(path: str, what: str, mode: str | None = None) -> tuple:
    """(array, original PIL mode) of an image file, converted to ``mode`` if given; a clear error naming
    the file if it is missing or cannot be decoded."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode) if mode else image), image.mode
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises all three for broken files
        raise ValueError(f"cannot read {what} {path}: {err}") from err


def _decode_fast(path: str, what: str, mode) -> torch.Tensor | None:
    """``(C, H, W)`` uint8 tensor of a PNG / JPEG / WebP / GIF file by ``torchvision.io`` (libpng and
    libjpeg-turbo without PIL's per-image overhead, ``docs/design/data.md``), or None for other formats and
    broken files, which PIL then reads or reports."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        return tv_io.decode_image(tv_io.read_file(path), mode=mode)
    except RuntimeError:
        return None


def read_image(path: str) -> np.ndarray:
    """uint8 HxWx3 RGB array of an image file (a view of the decoded ``(3, H, W)`` tensor)."""
    decoded = _decode_fast(path, "image", tv_io.ImageReadMode.RGB)
    return _decode(path, "image", "RGB")[0] if decoded is None else decoded.permute(1, 2, 0).numpy()


def read_label(path: str) -> np.ndarray:
    """uint8 HxW array of a single-channel 8-bit label PNG (grey or palette indices)."""
    decoded = _decode_fast(path, "label", tv_io.ImageReadMode.UNCHANGED)
    if decoded is not None and decoded.dtype == torch.uint8 and decoded.shape[0] == 1:
        return decoded[0].numpy()
    label, mode = _decode(path, "label")
    if mode not in ("L", "P"):
        raise ValueError(f"label {path}: expected a single-channel 8-bit PNG, got mode {mode}")
    return label


def read_cityscapes_train_ids(path: str) -> np.ndarray:
    """The train ids (255: ignored) of a Cityscapes ``*_gtFine_labelIds.png``, the targets the loader's samples
    map to (``label_map``) in training and evaluation."""
    # np.take: the same table look-up as LABEL_ID_TO_TRAIN_ID[label], faster (docs/design/data.md)
    return np.take(LABEL_ID_TO_TRAIN_ID, read_label(path))


def save_prediction(prediction: np.ndarray, path: str, palette: np.ndarray = CITYSCAPES_PALETTE) -> None:
    """Write a train-id prediction as ``path`` (8-bit PNG) and its colour rendering as
    ``<path stem>_color.png`` (``palette[k]`` for class k; 255 = black)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    prediction = np.asarray(prediction, dtype=np.uint8)
    Image.fromarray(prediction).save(path)
    colours = np.zeros((256, 3), np.uint8)
    colours[:len(palette)] = palette
    Image.fromarray(colours[prediction]).save(os.path.splitext(path)[0] + "_color.png")


def write_legend(folder: str, classes: tuple, palette: np.ndarray) -> None:
    """``folder/legend.json``: the class name and colour of every label value in the colour PNGs."""
    os.makedirs(folder, exist_ok=True)
    legend = [{"label": k, "name": name, "color": [int(c) for c in palette[k]]} for k, name in enumerate(classes)]
    with open(os.path.join(folder, "legend.json"), "w") as handle:
        json.dump({"classes": legend, "ignored": {"label": T.IGNORE_INDEX, "color": [0, 0, 0]}}, handle, indent=1)


# ---------------------------------------------------------------------------------- task wrappers
class TaskSet(torch.utils.data.Dataset):
    """A base data set plus a transform. ``get(index, rng)`` draws the augmentation from ``rng``;
    ``dataset[index]`` uses a fixed generator per index (evaluation transforms draw nothing)."""

    def __init__(self, base, transform):
        self.base, self.transform = base, transform
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return self.get(index, np.random.default_rng(index))

    def prepare_batch(self, batch: dict) -> dict:
        """The device half of the pipeline on a collated batch already on its device; this wrapper's
        transform returns model inputs, so the batch is returned as it is."""
        return batch


def _pad_stack(tensors: list, size: tuple, value: float) -> torch.Tensor:
    return torch.stack([T.pad_bottom_right(t, size, value) for t in tensors])


def _pixel_canvas(images: list) -> torch.Tensor:
    """uint8 (3, h, w) images at the top left of a zero (B, 3, H, W) canvas of the largest; channels-last,
    the layout of decoded images and the one torch's uint8 resize kernel is vectorised for."""
    canvas = torch.empty(len(images), max(i.shape[1] for i in images), max(i.shape[2] for i in images), 3,
                         dtype=torch.uint8)
    for slot, image in zip(canvas, images):
        height, width = image.shape[1:]
        slot[:height, :width] = image.permute(1, 2, 0)
        slot[height:], slot[:height, width:] = 0, 0  # only the margin: a zeroed canvas would be written twice
    return canvas.permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------ segmentation
class Cityscapes:
    """Cityscapes fine annotations (``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/*_gtFine_labelIds.png``); labelIds are mapped to the 19 train ids, all other
    ids to 255. Samples: ``image``, ``semantic`` (the labelIds), ``label_map`` (``LABEL_ID_TO_TRAIN_ID``,
    to the train ids: the seg transforms map the crop windows they keep, a quarter of the pixels), ``name``
    (``<city>/<stem>.png``)."""
    classes = CITYSCAPES_CLASSES
    num_semantic_classes = len(CITYSCAPES_CLASSES)

    def __init__(self, root: str, split: str = "train"):
        layout = CITYSCAPES_LAYOUT.format(split=split)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Cityscapes root {root}: no such directory; expected {layout}")
        image_dir = os.path.join(root, "leftImg8bit", split)
        label_dir = os.path.join(root, "gtFine", split)
        for folder in (image_dir, label_dir):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"Cityscapes root {root}: missing {folder}; expected {layout}")
        images = sorted(glob.glob(os.path.join(image_dir, "*", "*_leftImg8bit.png")))
        if not images:
            raise ValueError(f"Cityscapes split {split!r}: no <city>/*_leftImg8bit.png under {image_dir}")
        self.items = []
        for image in images:
            city, stem = os.path.basename(os.path.dirname(image)), os.path.basename(image)[:-len("_leftImg8bit.png")]
            label = os.path.join(label_dir, city, f"{stem}_gtFine_labelIds.png")
            if not os.path.isfile(label):
                raise FileNotFoundError(f"Cityscapes: image {image} has no label file {label}")
            self.items.append((image, label, f"{city}/{stem}.png"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        image_path, label_path, name = self.items[index]
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise ValueError(f"label {label_path} is {label.shape[1]}x{label.shape[0]} but its image "
                             f"{image_path} is {image.shape[1]}x{image.shape[0]} (W x H)")
        return {"image": image, "semantic": label, "label_map": LABEL_ID_TO_TRAIN_ID, "name": name}


class SegmentationSet(TaskSet):
    """``{"image": float window or uint8 pixels (3,h,w), "target": uint8 (h,w), "geometry", "name"}`` from a
    seg base data set (the CPU half of ``SegTrainTransform`` / ``SegEvalTransform``)."""

    def get(self, index: int, rng: np.random.Generator) -> dict:
        sample = self.base[index]
        image, target, geometry = self.transform(sample["image"], sample["semantic"], rng, sample.get("label_map"))
        return {"image": image, "target": target, "geometry": geometry, "name": sample["name"]}

    @staticmethod
    def collate(samples: list) -> dict:
        return collate_seg(samples)

    def prepare_batch(self, batch: dict) -> dict:
        """Flip, normalise and zero-pad the images and make the targets int64 on their device
        (``seg_device_inputs``); the prepared batch is ``{"images", "targets", "names"}``."""
        images, targets = T.seg_device_inputs(batch["images"], batch["targets"], batch["geometry"],
                                              self.transform.normalization)
        return {"images": images, "targets": targets, "names": batch["names"]}


def collate_seg(samples: list) -> dict:
    """Stack seg samples (padding to the largest, image 0 / label 255, if sizes differ), labels in uint8."""
    size = (max(s["image"].shape[1] for s in samples), max(s["image"].shape[2] for s in samples))
    return {"images": _pad_stack([s["image"] for s in samples], size, 0),
            "targets": _pad_stack([s["target"] for s in samples], size, T.IGNORE_INDEX),
            "geometry": [s["geometry"] for s in samples], "names": [s["name"] for s in samples]}


# ------------------------------------------------------------------ detection, instance segmentation
class VOCDetection:
    """PASCAL VOC detection (``VOCdevkit/VOC<year>/...``; ``root`` is VOCdevkit or its parent).

    ``image_sets`` lists ``"<year>/<set>"`` entries, e.g. ``("2007/trainval", "2012/trainval")`` (07+12)
    or ``("2007/test",)``. Boxes follow mmdet 2.x ``XMLDataset``: the 1-based inclusive VOC corners minus
    1, so widths are ``x2 - x1 + 1`` as in the VOC evaluation. ``difficult`` objects are kept with their
    flag. ``classes`` defaults to the 20 VOC classes; pass the list of a custom tree (e.g.
    ``SyntheticScenes.CLASSES[1:]`` for an exported synthetic tree). ``filter_empty`` drops images
    without a non-difficult object (mmdet ``filter_empty_gt``, used for training)."""

    def __init__(self, root: str, image_sets=("2007/trainval", "2012/trainval"), classes=VOC_CLASSES,
                 filter_empty: bool = False):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"VOC root {root}: no such directory; expected {VOC_LAYOUT}")
        devkit = os.path.join(root, "VOCdevkit") if os.path.isdir(os.path.join(root, "VOCdevkit")) else root
        self.classes = tuple(classes)
        self._label_of = {name: i for i, name in enumerate(self.classes)}
        self.records = []
        for entry in image_sets:
            year, _, image_set = str(entry).partition("/")
            folder = os.path.join(devkit, f"VOC{year}")
            list_file = os.path.join(folder, "ImageSets", "Main", f"{image_set}.txt")
            if not image_set or not os.path.isfile(list_file):
                raise FileNotFoundError(f"VOC image set {entry!r}: missing {list_file}; expected {VOC_LAYOUT} "
                                        "and image sets written as '<year>/<set>'")
            with open(list_file) as handle:
                ids = [line.split()[0] for line in handle if line.strip()]
            if not ids:
                raise ValueError(f"VOC image set {entry!r}: {list_file} lists no images")
            for image_id in ids:
                record = self._parse(os.path.join(folder, "Annotations", f"{image_id}.xml"))
                record.update(path=os.path.join(folder, "JPEGImages", f"{image_id}.jpg"),
                              name=f"VOC{year}/{image_id}")
                if not filter_empty or (~record["difficult"]).any():
                    self.records.append(record)

    def _parse(self, xml_path: str) -> dict:
        try:
            annotation = ET.parse(xml_path).getroot()
            objects = annotation.findall("object")
            size = annotation.find("size")
            image_size = None if size is None else (int(size.findtext("height")), int(size.findtext("width")))
            names = [obj.find("name").text.strip() for obj in objects]
            difficult = [int(obj.findtext("difficult", "0")) == 1 for obj in objects]
            corners = [[float(obj.find("bndbox").find(key).text) for key in ("xmin", "ymin", "xmax", "ymax")]
                       for obj in objects]
        except FileNotFoundError:
            raise FileNotFoundError(f"VOC annotation {xml_path}: no such file") from None
        except (ET.ParseError, AttributeError, ValueError, TypeError) as err:
            raise ValueError(f"VOC annotation {xml_path} is malformed: {err}") from err
        unknown = sorted(set(names) - set(self._label_of))
        if unknown:
            raise ValueError(f"VOC annotation {xml_path}: classes {unknown} are not in classes={list(self.classes)}; "
                             "pass classes= with the tree's class names")
        return {"boxes": np.array(corners, np.float32).reshape(-1, 4) - 1,
                "labels": np.array([self._label_of[n] for n in names], np.int64),
                "difficult": np.array(difficult, bool), "size": image_size}

    def __len__(self) -> int:
        return len(self.records)

    def image_sizes(self) -> list:
        """``(h, w)`` per image from its annotation's ``<size>``, or from the image where that is missing
        (as mmdet's XMLDataset)."""
        return [record["size"] or read_image(record["path"]).shape[:2] for record in self.records]

    def box_targets(self, index: int) -> dict:
        """The ``boxes``, ``labels`` and ``difficult`` flags of image ``index``, without decoding it."""
        return box_targets_of(self.records[index])

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {"image": read_image(record["path"]), "boxes": record["boxes"], "labels": record["labels"],
                "difficult": record["difficult"], "image_id": index, "name": record["name"]}


class COCODetection:
    """COCO instances (``annotations/instances_<split>.json``, images in ``<split>/``) via pycocotools.

    Category ids are mapped to contiguous 0-based labels in increasing id order; ``category_ids[label]``
    maps back (for results files). Boxes follow mmdet 2.x ``CocoDataset``: ``[x, y, x + w, y + h]``,
    annotations with ``w < 1``, ``h < 1`` or ``area <= 0`` skipped; crowd boxes are kept with
    ``difficult=True`` (ignored in training). ``filter_empty`` drops images without a non-crowd box;
    ``with_masks`` adds the instance ``masks`` (bool (K,H,W), decoded by pycocotools)."""

    def __init__(self, root: str, split: str = "train2017", filter_empty: bool = False, with_masks: bool = False):
        from pycocotools.coco import COCO

        ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
        self.image_dir, self.with_masks = os.path.join(root, split), with_masks
        for path in (ann_file, self.image_dir):
            if not os.path.exists(path):
                raise FileNotFoundError(f"COCO root {root}: missing {path}; expected {COCO_LAYOUT}")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                self.coco = COCO(ann_file)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as err:
            raise ValueError(f"COCO annotation file {ann_file} is malformed: {err!r}") from err
        self.category_ids = sorted(self.coco.getCatIds())
        self.classes = tuple(self.coco.cats[c]["name"] for c in self.category_ids)
        self._label_of = {c: i for i, c in enumerate(self.category_ids)}
        # the targets of every image parsed once here rather than in every worker's every epoch
        targets = {image_id: self._targets(image_id) for image_id in sorted(self.coco.getImgIds())}
        self.image_ids = [i for i, target in targets.items() if not filter_empty or (~target["difficult"]).any()]
        if not self.image_ids:
            raise ValueError(f"COCO annotation file {ann_file} lists no usable images")
        self.targets = [targets[image_id] for image_id in self.image_ids]

    def _annotations(self, image_id: int) -> list:
        return [a for a in self.coco.imgToAnns[image_id]
                if a["category_id"] in self._label_of and a["bbox"][2] >= 1 and a["bbox"][3] >= 1 and a["area"] > 0]

    def _targets(self, image_id: int) -> dict:
        """The image's boxes, labels and crowd flags as arrays (class docstring)."""
        annotations = self._annotations(image_id)
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)], np.float32)
        return {"boxes": boxes.reshape(-1, 4),
                "labels": np.array([self._label_of[a["category_id"]] for a in annotations], np.int64),
                "difficult": np.array([bool(a.get("iscrowd", 0)) for a in annotations], bool)}

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_sizes(self) -> list:
        return [(self.coco.imgs[i]["height"], self.coco.imgs[i]["width"]) for i in self.image_ids]

    def box_targets(self, index: int) -> dict:
        """The ``boxes``, ``labels`` and ``difficult`` (crowd) flags of image ``index``, without decoding it."""
        return self.targets[index]

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        sample = {"image": read_image(os.path.join(self.image_dir, info["file_name"])), **self.targets[index],
                  "image_id": int(image_id), "name": info["file_name"]}
        if self.with_masks:
            masks = [self.coco.annToMask(a).astype(bool) for a in self._annotations(image_id)]
            sample["masks"] = np.stack(masks) if masks else np.zeros((0, info["height"], info["width"]), bool)
        return sample


def coco_ground_truth(base, category_ids: list):
    """A pycocotools ``COCO`` of a base data set with instance masks (e.g. :class:`SyntheticInstances`), so
    that data without an annotation file is scored exactly as COCO is: RLE segmentations, ``area`` = mask
    pixels, ``iscrowd`` = ``difficult``, ``category_ids[label]`` as category."""
    from pycocotools.coco import COCO

    from kd_ref.metrics import encode_mask

    images, annotations = [], []
    for index in range(len(base)):
        sample = base[index]
        height, width = sample["image"].shape[:2]
        images.append({"id": sample["image_id"], "height": height, "width": width, "file_name": sample["name"]})
        for box, label, mask, crowd in zip(sample["boxes"], sample["labels"], sample["masks"], sample["difficult"]):
            x1, y1, x2, y2 = (float(c) for c in box)
            annotations.append({"id": len(annotations) + 1, "image_id": sample["image_id"],
                                "category_id": int(category_ids[label]), "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": float(mask.sum()), "iscrowd": int(crowd), "segmentation": encode_mask(mask)})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": int(c), "name": str(c)} for c in category_ids]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class DetectionSet(TaskSet):
    """``{"image", "target"}`` from a det base data set. ``train=True`` drops difficult / crowd boxes from
    the targets; otherwise they stay, flagged in ``difficult``. ``with_masks`` carries instance masks."""

    def __init__(self, base, transform, train: bool = True, with_masks: bool = False):
        super().__init__(base, transform)
        self.train, self.with_masks = train, with_masks

    def aspect_groups(self) -> np.ndarray:
        """mmdet's group flag per image: 1 if its width exceeds its height, else 0 (read from the
        annotations, no image is decoded)."""
        return np.array([int(w / h > 1) for h, w in self.base.image_sizes()], np.int64)

    def get(self, index: int, rng: np.random.Generator) -> dict:
        sample = self.base[index]
        keep = ~sample["difficult"] if self.train else np.ones(len(sample["labels"]), bool)
        masks = sample["masks"][keep] if self.with_masks else None
        image, boxes, masks, meta = self.transform(sample["image"], sample["boxes"][keep], rng, masks)
        target = {"boxes": boxes, "labels": torch.as_tensor(sample["labels"][keep]),
                  "difficult": torch.as_tensor(sample["difficult"][keep]), "image_id": sample["image_id"], **meta}
        if masks is not None:
            target["masks"] = masks
        if self.train:  # drawn last, so the augmentation draws are unchanged (detectors.sampling_generators)
            target["sampling_seed"] = int(rng.integers(2 ** 63))
        return {"image": image, "target": target}

    @staticmethod
    def collate(samples: list) -> dict:
        return collate_det(samples)

    def prepare_batch(self, batch: dict) -> dict:
        """Resize, flip, normalise and pad (to 32) the batch's uint8 pixels on their device (``device_inputs``,
        from the targets' geometry)."""
        images = T.device_inputs(batch["images"], batch["targets"], self.transform.normalization, size_divisor=32)
        return {**batch, "images": images}


def collate_det(samples: list) -> dict:
    """The decoded uint8 pixels of det samples on one canvas (``prepare_batch`` resizes each from its
    ``orig_size``); ``image_sizes`` are the sizes of the model inputs."""
    return {"images": _pixel_canvas([s["image"] for s in samples]),
            "image_sizes": [tuple(s["target"]["size"]) for s in samples],
            "targets": [s["target"] for s in samples]}


# ---------------------------------------------------------------------------------- classification
class CIFAR100:
    """CIFAR-100 python pickles (``cifar-100-python/{train,test,meta}``; ``root`` is that folder or its
    parent), fine labels. ``split``: ``"train"`` or ``"test"`` (``"val"`` means test)."""

    def __init__(self, root: str, split: str = "train"):
        folder = os.path.join(root, "cifar-100-python")
        folder = folder if os.path.isdir(folder) else root
        split = "test" if split == "val" else split
        if split not in ("train", "test"):
            raise ValueError(f"CIFAR-100 split {split!r}: expected 'train' or 'test'")
        batch = self._load(os.path.join(folder, split))
        meta = self._load(os.path.join(folder, "meta"))
        try:
            self.images = np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            self.labels = np.asarray(batch["fine_labels"], np.int64)
            self.classes = tuple(name.decode() if isinstance(name, bytes) else name
                                 for name in meta["fine_label_names"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"CIFAR-100 files in {folder} are malformed: {err!r}") from err
        if len(self.images) != len(self.labels):
            raise ValueError(f"CIFAR-100 {split} batch in {folder}: {len(self.images)} images but "
                             f"{len(self.labels)} labels")
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(self.classes):
            raise ValueError(f"CIFAR-100 {split} batch in {folder}: fine labels span {self.labels.min()}.."
                             f"{self.labels.max()}, expected 0..{len(self.classes) - 1} (the meta file's classes)")

    @staticmethod
    def _load(path: str) -> dict:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CIFAR-100 file {path}: no such file; expected cifar-100-python/{{train,test,meta}}")
        try:
            with open(path, "rb") as handle:
                content = pickle.load(handle, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ValueError(f"CIFAR-100 file {path} is not a python pickle batch: {err}") from err
        # the official files were pickled by Python 2: keys come back as bytes
        return {key.decode() if isinstance(key, bytes) else key: value for key, value in content.items()}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "image_label": int(self.labels[index])}


class ImageFolder:
    """ImageNet-style folders ``<root>/<split>/<class>/<image>``. The class list is the sorted folder
    names of ``train`` (also for ``val``, so labels agree between splits)."""

    def __init__(self, root: str, split: str = "train"):
        train_dir, split_dir = os.path.join(root, "train"), os.path.join(root, split)
        for folder in (train_dir, split_dir):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"image folder root {root}: missing {folder}; expected "
                                        "train/<class>/*.JPEG and val/<class>/*")
        self.classes = tuple(sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d))))
        label_of = {name: i for i, name in enumerate(self.classes)}
        self.items = []
        for name in sorted(os.listdir(split_dir)):
            if not os.path.isdir(os.path.join(split_dir, name)):
                continue
            if name not in label_of:
                raise ValueError(f"image folder {split_dir}/{name}: class not present in {train_dir}")
            files = sorted(f for f in os.listdir(os.path.join(split_dir, name)) if f.lower().endswith(IMAGE_EXTENSIONS))
            self.items += [(os.path.join(split_dir, name, f), label_of[name]) for f in files]
        if not self.items:
            raise ValueError(f"image folder {split_dir}: no images (extensions {IMAGE_EXTENSIONS})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, label = self.items[index]
        return {"image": read_image(path), "image_label": label}


class ClassificationSet(TaskSet):
    """``{"image": uint8 (3,h,w), "geometry", "target": int}`` from a cls base data set."""

    def get(self, index: int, rng: np.random.Generator) -> dict:
        sample = self.base[index]
        image, geometry = self.transform(sample["image"], rng)
        return {"image": image, "geometry": geometry, "target": sample["image_label"]}

    @staticmethod
    def collate(samples: list) -> dict:
        return collate_cls(samples)

    def prepare_batch(self, batch: dict) -> dict:
        """Resize (antialiased), flip and normalise the batch's uint8 pixels on their device
        (``device_inputs``); the prepared batch is ``{"images", "targets"}``."""
        images = T.device_inputs(batch["images"], batch["geometry"], self.transform.normalization, antialias=True)
        return {"images": images, "targets": batch["targets"]}


def collate_cls(samples: list) -> dict:
    return {"images": _pixel_canvas([s["image"] for s in samples]), "geometry": [s["geometry"] for s in samples],
            "targets": torch.tensor([s["target"] for s in samples], dtype=torch.int64)}


# ------------------------------------------------------------------------------------------- depth
NYU_LAYOUT = "rgb/<name>.png, depth/<name>.png (uint16 millimetres, 0 = invalid) and train.txt / test.txt"


def read_depth_png(path: str) -> np.ndarray:
    """float32 HxW metres of a uint16 millimetre PNG (NYUDv2 toolbox / VNL layout); 0 stays invalid."""
    depth, mode = _decode(path, "depth map")
    if depth.dtype != np.uint16 and mode not in ("I;16", "I"):
        raise ValueError(f"depth map {path}: expected a 16-bit PNG of millimetres, got mode {mode}")
    return depth.astype(np.float32) / 1000.0


class NYUDepth:
    """NYUDv2 in the layout ``NYU_LAYOUT`` under ``root``: the split list (``train.txt`` for ``train``,
    ``test.txt`` otherwise) names one ``<name>`` per line (Eigen split: 795 / 654 images of 480x640)."""

    def __init__(self, root: str, split: str = "train"):
        listing = os.path.join(root, "train.txt" if split == "train" else "test.txt")
        if not os.path.isfile(listing):
            raise FileNotFoundError(f"--data-root {root}: no split list {os.path.basename(listing)} (expected {NYU_LAYOUT})")
        with open(listing) as handle:
            self.names = [line.strip() for line in handle if line.strip()]
        if not self.names:
            raise ValueError(f"{listing}: lists no image")
        self.root = root
        for name in self.names[:1]:
            for folder in ("rgb", "depth"):
                path = os.path.join(root, folder, f"{name}.png")
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path}: listed in {listing} but missing (expected {NYU_LAYOUT})")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict:
        name = self.names[index]
        image = read_image(os.path.join(self.root, "rgb", f"{name}.png"))
        depth = read_depth_png(os.path.join(self.root, "depth", f"{name}.png"))
        if depth.shape != image.shape[:2]:
            raise ValueError(f"{name}: depth map {depth.shape} and image {image.shape[:2]} differ in size")
        return {"image": image, "depth": depth, "name": f"{name}.png"}


class DepthSet(TaskSet):
    """``{"image": float (3,h,w), "target": float32 (h,w) metres, "name", "restore"}`` from a depth base data
    set; the transform makes the model inputs, so ``prepare_batch`` returns batches as they are."""

    def get(self, index: int, rng: np.random.Generator) -> dict:
        sample = self.base[index]
        image, target, restore = self.transform(sample["image"], sample["depth"], rng)
        return {"image": image, "target": target, "name": sample["name"], "restore": restore}

    @staticmethod
    def collate(samples: list) -> dict:
        return collate_depth(samples)


def collate_depth(samples: list, size_divisor: int = 32) -> dict:
    """Zero-pad images and depth (0 = invalid) bottom/right to a common multiple of ``size_divisor``."""
    height = max(s["image"].shape[1] for s in samples)
    width = max(s["image"].shape[2] for s in samples)
    size = (math.ceil(height / size_divisor) * size_divisor, math.ceil(width / size_divisor) * size_divisor)
    restores = [s.get("restore") for s in samples]
    batch = {"images": _pad_stack([s["image"] for s in samples], size, 0.0),
             "image_sizes": [tuple(s["image"].shape[1:]) for s in samples],
             "names": [s["name"] for s in samples]}
    if not any(restores):
        return {**batch, "targets": _pad_stack([s["target"] for s in samples], size, 0.0)}
    # VNL's test geometry: the targets are the original maps, padded to the largest of them
    size_of_targets = (max(s["target"].shape[0] for s in samples), max(s["target"].shape[1] for s in samples))
    return {**batch, "targets": _pad_stack([s["target"] for s in samples], size_of_targets, 0.0),
            "restores": restores}


# ------------------------------------------------------------------------------------------ factories
SUPPORTED_DATA = cli.DATA


def _base_dataset(task: str, data: str, root: str | None, split: str, train: bool, options: dict):
    if data == "synthetic":
        scenes = SyntheticScenes(split, **options)
        return SyntheticInstances(scenes) if task == "ins" else scenes
    if root is None:
        raise ValueError(f"data {data!r} needs a root folder (--data-root DIR)")
    if data == "cityscapes":
        return Cityscapes(root, split, **options)
    if data == "voc":
        options.setdefault("image_sets", ("2007/trainval", "2012/trainval") if train else ("2007/test",))
        return VOCDetection(root, filter_empty=train, **options)
    if data == "coco":
        return COCODetection(root, f"{split}2017" if split in ("train", "val") else split, filter_empty=train, **options)
    if data == "cifar100":
        return CIFAR100(root, split, **options)
    return ImageFolder(root, split, **options)


def _default_transform(task: str, data: str, train: bool, base):
    if task == "seg":
        crop = base.size if data == "synthetic" else (512, 1024)
        return T.SegTrainTransform(crop, (0.5, 2.0), "bgr_mean") if train else T.SegEvalTransform("bgr_mean")
    if task in ("det", "ins"):
        scale = {"synthetic": getattr(base, "size", None), "voc": (1000, 600), "coco": (1333, 800)}[data]
        return T.DetTransform(scale, flip_prob=0.5 if train else 0.0)
    if data == "cifar100":
        return T.PadCropFlip(32, 4, "cifar100") if train else T.ResizeCenterCrop(None, None, "cifar100")
    if data == "imagenet":
        return T.RandomResizedCropFlip(224) if train else T.ResizeCenterCrop(224, 256)
    return T.PadCropFlip(base.size, base.size[0] // 8, "imagenet_rgb") if train else T.ResizeCenterCrop(None, None)


def build_dataset(task: str, data: str, root: str | None = None, split: str = "train", transform=None,
                  **options) -> TaskSet:
    """The task wrapper over data set ``data`` (``SUPPORTED_DATA[task]``); ``options`` go to the base
    loader (e.g. ``seed``, ``size``, ``length`` for synthetic data; ``image_sets``, ``classes`` for VOC),
    except ``with_masks`` (det: carry instance masks; synthetic and COCO data; always on for ins, whose
    synthetic instances are :class:`SyntheticInstances`).
    ``transform`` defaults to the reference pipeline of the data set (``split == "train"`` augments).
    The collate function is ``dataset.collate``."""
    if data not in SUPPORTED_DATA.get(task, ()):
        combos = "; ".join(f"{t}: {', '.join(d)}" for t, d in SUPPORTED_DATA.items())
        raise ValueError(f"unsupported task/data combination {task!r}/{data!r}; supported: {combos}")
    train = split == "train"
    with_masks = options.pop("with_masks", False) or task == "ins"  # instances are masks
    if with_masks and data not in ("synthetic", "coco"):
        raise ValueError(f"with_masks: data {data!r} has no instance masks (synthetic and coco have)")
    if with_masks and data == "coco":
        options["with_masks"] = True
    base = _base_dataset(task, data, root, split, train, options)
    transform = transform or _default_transform(task, data, train, base)
    if task == "seg":
        return SegmentationSet(base, transform)
    if task in ("det", "ins"):
        return DetectionSet(base, transform, train=train, with_masks=with_masks)
    return ClassificationSet(base, transform)


def build_depth_dataset(data: str, root: str | None, split: str, transform, **options) -> DepthSet:
    """Depth data: ``synthetic`` (``options`` go to SyntheticScenes) or ``nyu`` (``NYU_LAYOUT`` at ``root``),
    through ``transform`` (``transforms.DepthTransform`` or ``transforms.VNLDepthTransform``)."""
    if data == "synthetic":
        return DepthSet(SyntheticDepthScenes(SyntheticScenes(split, **options)), transform)
    if data == "nyu":
        if root is None:
            raise ValueError("--data nyu needs --data-root DIR (the folder of the data set)")
        return DepthSet(NYUDepth(root, split), transform)
    raise ValueError(f"--data {data}: --task depth supports synthetic, nyu")
