"""Data sets: the built-in ``SyntheticScenes``, loaders for Cityscapes, PASCAL VOC, COCO, CIFAR-100 and
ImageNet-style folders, the per-task torch wrappers and collates, and an exporter that writes
SyntheticScenes in each real on-disk format.

Base data sets return plain numpy samples (``dataset[i] -> dict``):

* seg:  ``image`` uint8 HxWx3 RGB, ``semantic`` uint8 HxW (class ids, 255 = ignore), ``name``; or
        ``semantic`` the ids that ``label_map`` (uint8, 256 entries) maps to class ids, which the transform
        applies to the label pixels it keeps (Cityscapes: labelIds to train ids)
* det:  ``image``, ``boxes`` float32 (K,4) xyxy, ``labels`` int64 (K,) 0-based, ``difficult`` bool (K,)
        (VOC difficult / COCO crowd: kept for evaluation, dropped from training targets), ``image_id``
* cls:  ``image``, ``image_label`` int

The task wrappers (:class:`SegmentationSet`, :class:`DetectionSet`, :class:`ClassificationSet`) apply a
transform of :mod:`kd_ref.transforms` with a per-sample ``numpy.random.Generator`` (``get(index, rng)``;
the engine seeds it by (seed, epoch, index)), their collates build the batches a DataLoader worker
hands over, and ``prepare_batch(batch)``, run on the batch once it is on its device (the engine calls it
right after the transfer), turns them into the batches of the contract:

    seg: {"images": (B,3,H,W), "targets": int64 (B,H,W) 255 = ignore, "names": [str]}
    det: {"images": (B,3,Hp,Wp) zero-padded to a multiple of 32, "image_sizes": [(h, w)],
          "targets": [{"boxes", "labels", "difficult", "image_id", "scale_factor", "orig_size", "size",
                       "flipped" (, "masks"; "sampling_seed" in training)}]}
    cls: {"images": (B,3,H,W), "targets": int64 (B,)}

Depth batches are float from the worker on and ``prepare_batch`` returns them as they are. Detection and
classification batches leave the worker as uint8 pixels (each decoded image or crop at the top left of a
zero canvas; cls batches also carry each crop's ``"geometry"``, det targets theirs) and ``prepare_batch``
runs the device half of their transforms (``transforms.device_inputs``). Segmentation batches leave it with
uint8 labels (padding 255) and, per sample, ``"geometry"`` (window size, flip, photometric parameters);
their images are the resampled crop windows in float, undistorted, unflipped and unnormalised (training),
or the uint8 pixels (evaluation); ``prepare_batch`` distorts, flips, normalises, zero-pads and makes the
targets int64 (``transforms.seg_device_inputs``).

CLI: ``python -m kd_ref.datasets export --format cityscapes|voc|coco|cifar100|imagefolder DIR``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import io
import json
import math
import os
import pickle
import shlex
import sys
import xml.etree.ElementTree as ET
import zlib

import numpy as np
import torch
import torchvision.io as tv_io
from PIL import Image

from kd_ref import cli
from kd_ref import transforms as T

IGNORE_INDEX = T.IGNORE_INDEX

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
# Synthetic scenes: background grey, then one saturated hue per shape (SyntheticScenes.CLASSES order)
SYNTHETIC_PALETTE = np.array([
    (96, 96, 96), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230)], np.uint8)
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, np.uint8)
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
    libjpeg-turbo without PIL's per-image overhead: about 1.5x faster on 1024x2048 PNGs, see ``python -m
    kd_ref.bench data``), or None for other formats and broken files, which PIL then reads or reports."""
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
    # np.take: the same table look-up as LABEL_ID_TO_TRAIN_ID[label], twice as fast on 2 Mpixel labels
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
        json.dump({"classes": legend, "ignored": {"label": IGNORE_INDEX, "color": [0, 0, 0]}}, handle, indent=1)


# -------------------------------------------------------------------------------- synthetic scenes
def _star(u, v, r, p):
    # radius piecewise-linear in angle between the 5 tips (r) and the notches (0.42 r)
    sector = 2 * math.pi / 5
    frac = np.mod(np.arctan2(v, u), sector) / sector
    return np.hypot(u, v) <= r * (0.42 + 0.58 * np.abs(2 * frac - 1))


_TRIANGLE_NORMALS = [(math.cos(a), math.sin(a)) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]

# shape name -> membership test in object coordinates (u, v) for outer radius r and shape parameter p
# (ring: inner radius ratio; rectangle, ellipse: aspect ratio). Every shape fits in a disc of 1.15 r.
SHAPES = {
    "disc": lambda u, v, r, p: u * u + v * v <= r * r,
    "ring": lambda u, v, r, p: (u * u + v * v <= r * r) & (u * u + v * v >= (p * r) ** 2),
    "square": lambda u, v, r, p: np.maximum(np.abs(u), np.abs(v)) <= 0.72 * r,
    "rectangle": lambda u, v, r, p: (np.abs(u) <= 0.95 * r) & (np.abs(v) <= 0.95 * p * r),
    "triangle": lambda u, v, r, p: functools.reduce(np.logical_and, [u * cx + v * cy <= 0.5 * r
                                                                     for cx, cy in _TRIANGLE_NORMALS]),
    "cross": lambda u, v, r, p: (((np.abs(u) <= 0.95 * r) & (np.abs(v) <= 0.3 * r))
                                 | ((np.abs(v) <= 0.95 * r) & (np.abs(u) <= 0.3 * r))),
    "star": _star,
    "ellipse": lambda u, v, r, p: (u / r) ** 2 + (v / (p * r)) ** 2 <= 1,
}
# look-alike pairs share a parameter range that keeps them apart but close: ring vs disc (hole of
# 45-65 % of the radius), rectangle / ellipse vs square / disc (aspect 0.45-0.75)
SHAPE_PARAMETER = {"ring": (0.45, 0.65), "rectangle": (0.45, 0.75), "ellipse": (0.45, 0.75)}


@functools.lru_cache(maxsize=64)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D linear interpolation with half-pixel centres."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    low = np.floor(pos).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    matrix = np.zeros((n_out, n_in), np.float32)
    np.add.at(matrix, (np.arange(n_out), low), 1 - (pos - low))
    np.add.at(matrix, (np.arange(n_out), high), pos - low)
    return matrix


class SyntheticScenes:
    """Built-in data: cluttered scenes of shapes, generated on the fly and deterministic per
    (seed, split, index). The class of an object is its SHAPE (``CLASSES[1:]``); colour, size,
    rotation and position are random, so only shape tells classes apart.

    A scene: one of four background textures (gradient, stripes, rotated checker board, smooth
    blotches) with a lighting gradient and thin distractor lines, then 3-10 objects of random class,
    radius (log-uniform over 3.5-25 % of the short side: many small objects), rotation, colour,
    internal shading and optional stripes, painted in order so that later objects occlude earlier ones;
    finally optional blur and Gaussian noise. Look-alike classes (square / rectangle, disc / ring /
    ellipse) and the checker-board and stripe textures make it hard for small models but learnable.
    The difficulty knobs are class attributes (``RADIUS``, ``OBJECTS``, ``BACKGROUND_CONTRAST``,
    ``MAX_LINES``, ``BACKGROUND_GRAIN``); ``style`` picks a named set of them from ``STYLES``:

    * ``standard``: the scenes described above.
    * ``easy``: one to three large objects on a grainy background. Figure/ground becomes a local cue
      (grain versus smooth paint), so models trained from scratch separate objects from the background
      within a hundred iterations, and only the class, the shape, needs context. The standard scenes
      take thousands of iterations before a from-scratch segmentor predicts anything but background.

    ``sample(index)`` returns every task's targets at once: ``image`` uint8 HxWx3, ``semantic`` uint8
    HxW (0 = background, k = ``CLASSES[k]``; 255 on visible fragments smaller than ``MIN_VISIBLE``
    pixels, which are not instances), ``boxes`` float32 (K,4) xyxy tightly enclosing the visible masks
    (x2, y2 exclusive pixel edges), ``labels`` int64 (K,) = semantic class - 1, ``masks`` bool (K,H,W)
    (visible parts, disjoint), ``difficult`` bool (K,) (less than 30 % of the object visible),
    ``image_label`` (label of the object with the largest visible area) and ``name``.
    """
    CLASSES = ("background",) + tuple(SHAPES)
    num_semantic_classes = len(CLASSES)
    MIN_VISIBLE = 6
    RADIUS = (0.035, 0.25)        # object radius: log-uniform, as a fraction of the short side
    OBJECTS = (3, 10)             # objects per scene, inclusive
    BACKGROUND_CONTRAST = 1.0     # amplitude of the background texture (1 = full 0..255 range)
    MAX_LINES = 5                 # distractor lines per scene
    BACKGROUND_GRAIN = 0.0        # std of extra pixel noise on the background only (a local figure/ground cue)
    STYLES = {"standard": {},
              "easy": {"RADIUS": (0.15, 0.4), "OBJECTS": (1, 3), "BACKGROUND_CONTRAST": 0.5, "MAX_LINES": 2,
                       "BACKGROUND_GRAIN": 40.0}}
    DEFAULT_LENGTH = {"train": 2000}
    CACHE_BYTES = 256 * 2 ** 20

    def __init__(self, split: str = "train", seed: int = 0, size: tuple = (128, 128), length: int | None = None,
                 num_classes: int = len(SHAPES), style: str = "standard"):
        if not isinstance(split, str) or not split:
            raise ValueError(f"split: expected a non-empty string, got {split!r}")
        if int(seed) < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed}")
        if len(size) != 2 or min(size) < 32:
            raise ValueError(f"size: expected (H, W) with both sides >= 32, got {size}")
        if not 1 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes: expected 1..{len(SHAPES)} object classes, got {num_classes}")
        if style not in self.STYLES:
            raise ValueError(f"style: expected one of {sorted(self.STYLES)}, got {style!r}")
        for knob, value in self.STYLES[style].items():
            setattr(self, knob, value)
        self.style = style
        self.split, self.seed, self.size = split, int(seed), (int(size[0]), int(size[1]))
        self.length = int(length if length is not None else self.DEFAULT_LENGTH.get(split, 200))
        self.classes = self.CLASSES[:num_classes + 1]
        self.object_classes = self.classes[1:]
        self.num_semantic_classes = num_classes + 1
        self._split_code = zlib.crc32(split.encode())
        self._cache, self._cached_bytes = {}, 0
        height, width = self.size
        self._ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
        self._xs = np.arange(width, dtype=np.float32)[None, :] + 0.5

    def __len__(self) -> int:
        return self.length

    def image_sizes(self) -> list:
        return [self.size] * self.length

    def __getitem__(self, index: int) -> dict:
        """``sample(index)``, drawn once: a training run visits every scene once per epoch, and drawing one
        costs about as much as a small model's step on it. Scenes are kept up to ``CACHE_BYTES``; the dict is
        a copy, the arrays are shared and never written by the loaders or transforms."""
        cached = self._cache.get(index)
        if cached is None:
            cached = self.sample(index)
            size = sum(value.nbytes for value in cached.values() if isinstance(value, np.ndarray))
            if self._cached_bytes + size <= self.CACHE_BYTES:
                self._cache[index] = cached
                self._cached_bytes += size
        return dict(cached)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of sample ``index``: SeedSequence hashes (seed, split, index) together."""
        return np.random.default_rng([self.seed, self._split_code, int(index)])

    def sample(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} {self.split} scenes")
        rng = self.rng(index)
        # at small sizes a scene can end with no object of MIN_VISIBLE pixels (about 2 in 1000 at 32 px):
        # it is drawn again from the same generator, so every scene has an image label and the others
        # stay as they were
        while True:
            image, owner, classes, drawn_area = self._compose(rng)
            visible = np.bincount(owner.ravel() + 1, minlength=len(classes) + 1)[1:]
            kept = np.flatnonzero(visible >= self.MIN_VISIBLE)
            if len(kept):
                break
        class_of_owner = np.concatenate([[0], classes]).astype(np.uint8)
        class_of_owner[1:][visible < self.MIN_VISIBLE] = IGNORE_INDEX
        semantic = class_of_owner[owner + 1]
        masks = owner[None] == kept[:, None, None]
        boxes = np.zeros((len(kept), 4), np.float32)
        for k, mask in enumerate(masks):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            boxes[k] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
        labels = classes[kept].astype(np.int64) - 1
        return {"image": image, "semantic": semantic, "boxes": boxes, "labels": labels, "masks": masks,
                "difficult": visible[kept] < 0.3 * drawn_area[kept],
                "image_label": int(labels[np.argmax(visible[kept])]), "image_id": int(index),
                "name": f"{self.split}_{index:06d}.png"}

    def _compose(self, rng: np.random.Generator) -> tuple:
        """One scene: uint8 image, per-pixel object index (-1 = background), classes, drawn areas."""
        canvas = self._background(rng)
        owner = np.full(self.size, -1, np.int16)
        num_objects = int(rng.integers(self.OBJECTS[0], self.OBJECTS[1] + 1))
        classes = rng.integers(1, self.num_semantic_classes, num_objects)
        drawn_area = np.zeros(num_objects)
        for j, cls in enumerate(classes):
            drawn_area[j] = self._draw_object(rng, canvas, owner, j, self.CLASSES[cls])
        if rng.random() < 0.35:
            canvas = self._blur(canvas)
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(3, 15)
        if self.BACKGROUND_GRAIN:
            background = owner < 0
            grain = rng.standard_normal((int(background.sum()), 3), dtype=np.float32)
            canvas[background] += grain * self.BACKGROUND_GRAIN
        return np.clip(canvas, 0, 255).astype(np.uint8), owner, classes, drawn_area

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        height, width = self.size
        ys, xs = self._ys, self._xs
        angle = rng.uniform(0, 2 * math.pi)
        along = xs * math.cos(angle) + ys * math.sin(angle)
        across = ys * math.cos(angle) - xs * math.sin(angle)
        kind = rng.integers(4)
        if kind == 0:
            mix = (along - along.min()) / (along.max() - along.min())
        elif kind == 1:
            mix = 0.5 + 0.5 * np.sin(2 * math.pi * along / rng.uniform(5, 24) + rng.uniform(0, 2 * math.pi))
        elif kind == 2:
            cell = rng.uniform(6, 24)
            mix = (np.floor(along / cell) + np.floor(across / cell)) % 2
        else:
            grid = rng.random((int(rng.integers(3, 10)), int(rng.integers(3, 10))), dtype=np.float32)
            mix = _interp_matrix(height, grid.shape[0]) @ grid @ _interp_matrix(width, grid.shape[1]).T
        low, high = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        canvas = low + mix[..., None].astype(np.float32) * ((high - low) * self.BACKGROUND_CONTRAST)
        lighting = (along - along.mean()) / max(height, width)
        canvas += lighting[..., None] * rng.uniform(-80, 80, 3).astype(np.float32)
        for _ in range(int(rng.integers(0, self.MAX_LINES + 1))):  # thin distractor lines, part of the background
            (x0, x1), (y0, y1) = rng.uniform(0, width, 2), rng.uniform(0, height, 2)
            dx, dy = x1 - x0, y1 - y0
            t = np.clip(((xs - x0) * dx + (ys - y0) * dy) / (dx * dx + dy * dy + 1e-6), 0, 1)
            near = np.hypot(xs - x0 - t * dx, ys - y0 - t * dy) <= rng.uniform(0.5, 1.5)
            canvas[near] = rng.uniform(0, 255, 3)
        return canvas

    def _draw_object(self, rng, canvas, owner, j: int, shape: str) -> int:
        height, width = self.size
        radius = math.exp(rng.uniform(*np.log(self.RADIUS))) * min(height, width)
        # centres at least radius/4 inside the image, so that even the last, smallest object nearly
        # always keeps more than MIN_VISIBLE pixels (``sample`` redraws the rare scene where none does)
        cy, cx = rng.uniform(radius / 4, height - radius / 4), rng.uniform(radius / 4, width - radius / 4)
        extent = math.ceil(1.15 * radius) + 1
        y0, y1 = max(0, int(cy) - extent), min(height, int(cy) + extent + 1)
        x0, x1 = max(0, int(cx) - extent), min(width, int(cx) + extent + 1)
        dy, dx = self._ys[y0:y1] - cy, self._xs[:, x0:x1] - cx
        angle = rng.uniform(0, 2 * math.pi)
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = dy * math.cos(angle) - dx * math.sin(angle)
        parameter = rng.uniform(*SHAPE_PARAMETER.get(shape, (1, 1)))
        mask = SHAPES[shape](u, v, radius, parameter)
        window = canvas[y0:y1, x0:x1]
        # of two random colours, take the one farther from what lies underneath (visible, not trivial)
        candidates = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        underneath = window[mask].mean(0) if mask.any() else window.mean((0, 1))
        colour = candidates[np.argmax(np.abs(candidates - underneath).sum(1))]
        shade = (u / radius)[..., None] * rng.uniform(-50, 50, 3).astype(np.float32)
        if rng.random() < 0.25:
            shade = shade + 40 * np.sin(v * (2 * math.pi / rng.uniform(3, 8)))[..., None]
        window[mask] = (colour + shade)[mask]
        owner[y0:y1, x0:x1][mask] = j
        return int(mask.sum())

    @staticmethod
    def _blur(canvas: np.ndarray) -> np.ndarray:
        """Separable [1, 2, 1] / 4 blur with edge replication."""
        padded = np.pad(canvas, ((1, 1), (0, 0), (0, 0)), mode="edge")
        canvas = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
        padded = np.pad(canvas, ((0, 0), (1, 1), (0, 0)), mode="edge")
        return (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4


# --------------------------------------------------------------------------------------- Cityscapes
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


# ---------------------------------------------------------------------------- probe samples (bench flops)
class ProbeScenes:
    """Made-up detection samples (base data set layout: ``image``, ``boxes``, ``labels``, ``difficult``,
    ``image_id``, ``masks``): a uniform-noise image of ``image_size`` (H, W) and ``num_objects`` boxes whose
    sides spread geometrically from 16 pixels to half the short side (small, medium and large objects
    alike), at positions drawn from a generator seeded by the index; labels cycle through the classes and
    masks fill the boxes. Only their sizes matter: they stand for an image of a real data set."""
    MIN_SIDE = 16

    def __init__(self, image_size: tuple, num_objects: int, num_classes: int, length: int, with_masks: bool):
        self.image_size, self.num_objects, self.num_classes = tuple(image_size), num_objects, num_classes
        self.length, self.with_masks = length, with_masks
        self.classes = tuple(str(label) for label in range(num_classes))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(index)
        height, width = self.image_size
        sides = np.geomspace(self.MIN_SIDE, min(height, width) / 2, self.num_objects)
        corners = rng.uniform(0, 1, (self.num_objects, 2)) * (np.array([width, height]) - sides[:, None])
        boxes = np.concatenate([corners, corners + sides[:, None]], axis=1).astype(np.float32)
        sample = {"image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "boxes": boxes,
                  "labels": np.arange(self.num_objects, dtype=np.int64) % self.num_classes,
                  "difficult": np.zeros(self.num_objects, dtype=bool), "image_id": index}
        if self.with_masks:
            rows, cols = np.arange(height)[None, :, None], np.arange(width)[None, None, :]
            x1, y1, x2, y2 = (boxes[:, k, None, None] for k in range(4))
            sample["masks"] = (cols >= x1) & (cols < x2) & (rows >= y1) & (rows < y2)
        return sample


# ------------------------------------------------------------------------------------- PASCAL VOC
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

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        return {"image": read_image(record["path"]), "boxes": record["boxes"], "labels": record["labels"],
                "difficult": record["difficult"], "image_id": index, "name": record["name"]}


# ------------------------------------------------------------------------------------------- COCO
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

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        sample = {"image": read_image(os.path.join(self.image_dir, info["file_name"])), **self.targets[index],
                  "image_id": int(image_id), "name": info["file_name"]}
        if self.with_masks:
            masks = [self.coco.annToMask(a).astype(bool) for a in self._annotations(image_id)]
            sample["masks"] = np.stack(masks) if masks else np.zeros((0, info["height"], info["width"]), bool)
        return sample


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


def _pad_stack(tensors: list, size: tuple, value: float) -> torch.Tensor:
    return torch.stack([T.pad_bottom_right(t, size, value) for t in tensors])


def collate_seg(samples: list) -> dict:
    """Stack seg samples (padding to the largest, image 0 / label 255, if sizes differ), labels in uint8."""
    size = (max(s["image"].shape[1] for s in samples), max(s["image"].shape[2] for s in samples))
    return {"images": _pad_stack([s["image"] for s in samples], size, 0),
            "targets": _pad_stack([s["target"] for s in samples], size, IGNORE_INDEX),
            "geometry": [s["geometry"] for s in samples], "names": [s["name"] for s in samples]}


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


def collate_det(samples: list) -> dict:
    """The decoded uint8 pixels of det samples on one canvas (``prepare_batch`` resizes each from its
    ``orig_size``); ``image_sizes`` are the sizes of the model inputs."""
    return {"images": _pixel_canvas([s["image"] for s in samples]),
            "image_sizes": [tuple(s["target"]["size"]) for s in samples],
            "targets": [s["target"] for s in samples]}


def collate_cls(samples: list) -> dict:
    return {"images": _pixel_canvas([s["image"] for s in samples]), "geometry": [s["geometry"] for s in samples],
            "targets": torch.tensor([s["target"] for s in samples], dtype=torch.int64)}


# ----------------------------------------------------------------------------------------- factory
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


# ------------------------------------------------------------------------------------------- export
def _save(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **({"quality": 95} if path.lower().endswith((".jpg", ".jpeg")) else {}))


def _export_cityscapes(scenes: dict, out: str) -> None:
    if scenes["train"].num_semantic_classes > len(CITYSCAPES_LABEL_IDS):
        raise ValueError("cityscapes export: at most 19 semantic classes")
    # synthetic class k is written as the labelId of train id k; ignore (255) as labelId 0 (unlabeled)
    to_label_id = np.zeros(256, np.uint8)
    to_label_id[:len(CITYSCAPES_LABEL_IDS)] = CITYSCAPES_LABEL_IDS
    for split, data in scenes.items():
        for index in range(len(data)):
            sample, stem = data[index], f"synthetic_{index:06d}_000019"
            _save(sample["image"], os.path.join(out, "leftImg8bit", split, "synthetic", f"{stem}_leftImg8bit.png"))
            _save(to_label_id[sample["semantic"]], os.path.join(out, "gtFine", split, "synthetic",
                                                                f"{stem}_gtFine_labelIds.png"))


def _voc_xml(sample: dict, image_id: str, classes: tuple) -> str:
    height, width = sample["semantic"].shape
    objects = []
    for box, label, difficult in zip(sample["boxes"], sample["labels"], sample["difficult"]):
        x1, y1, x2, y2 = (int(c) for c in box)
        truncated = int(x1 == 0 or y1 == 0 or x2 == width or y2 == height)
        # VOC corners are 1-based inclusive pixel indices: (x1 + 1, y1 + 1, x2, y2) for exclusive x2, y2
        objects.append(f"<object><name>{classes[label]}</name><pose>Unspecified</pose>"
                       f"<truncated>{truncated}</truncated><difficult>{int(difficult)}</difficult>"
                       f"<bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
                       "</bndbox></object>")
    return (f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{''.join(objects)}</annotation>\n")


def _export_voc(scenes: dict, out: str) -> None:
    # the 07+12 layout the VOC recipes read: the synthetic train split is shared between VOC2007 and VOC2012
    # trainval (first half, second half), the val split is VOC2007 test
    train = scenes["train"]
    if len(train) < 2:
        raise ValueError("--num-train: the voc export needs at least 2 training scenes (VOC2007 and VOC2012 "
                         "trainval each get some)")
    half = (len(train) + 1) // 2
    parts = (("2007", train, range(half), ("train", "trainval")), ("2012", train, range(half, len(train)), ("trainval",)),
             ("2007", scenes["val"], range(len(scenes["val"])), ("test",)))
    for year, data, indices, image_sets in parts:
        folder = os.path.join(out, "VOCdevkit", f"VOC{year}")
        os.makedirs(os.path.join(folder, "Annotations"), exist_ok=True)
        os.makedirs(os.path.join(folder, "ImageSets", "Main"), exist_ok=True)
        ids = []
        for index in indices:
            sample, image_id = data[index], f"{data.split}_{index:06d}"
            _save(sample["image"], os.path.join(folder, "JPEGImages", f"{image_id}.jpg"))
            with open(os.path.join(folder, "Annotations", f"{image_id}.xml"), "w") as handle:
                handle.write(_voc_xml(sample, image_id, data.object_classes))
            ids.append(image_id)
        for image_set in image_sets:
            with open(os.path.join(folder, "ImageSets", "Main", f"{image_set}.txt"), "w") as handle:
                handle.write("".join(f"{i}\n" for i in ids))


def _export_coco(scenes: dict, out: str) -> None:
    """The instances of :class:`SyntheticInstances` (visible masks of at least ``MIN_INSTANCE_AREA``
    pixels), so that a model trained or scored on the written tree sees the built-in instance data."""
    from pycocotools import mask as mask_utils

    for split, data in scenes.items():
        # deliberately non-contiguous category ids, like COCO's own, so the label map is exercised
        categories = [{"id": 2 * k + 1, "name": name, "supercategory": "shape"}
                      for k, name in enumerate(data.object_classes)]
        instances = SyntheticInstances(data)
        images, annotations = [], []
        for index in range(len(instances)):
            sample, image_id = instances[index], index + 1
            file_name = f"{image_id:012d}.jpg"
            _save(sample["image"], os.path.join(out, f"{split}2017", file_name))
            height, width = sample["image"].shape[:2]
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            for box, label, mask in zip(sample["boxes"], sample["labels"], sample["masks"]):
                rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                x1, y1, x2, y2 = (float(c) for c in box)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": 2 * int(label) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "area": float(mask.sum()), "iscrowd": 0,
                                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")}})
        os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
        with open(os.path.join(out, "annotations", f"instances_{split}2017.json"), "w") as handle:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, handle)


def _export_cifar100(scenes: dict, out: str) -> None:
    folder = os.path.join(out, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    names = [name.encode() for name in scenes["train"].object_classes]
    for split, file_name in (("train", "train"), ("val", "test")):
        data = scenes[split]
        samples = [data[i] for i in range(len(data))]
        images = [np.asarray(Image.fromarray(s["image"]).resize((32, 32), Image.Resampling.BOX)) for s in samples]
        labels = [s["image_label"] for s in samples]
        # same layout and bytes keys as the official Python 2 pickles
        batch = {b"data": np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images]),
                 b"fine_labels": labels, b"coarse_labels": labels,
                 b"filenames": [f"{split}_{i:06d}.png".encode() for i in range(len(samples))],
                 b"batch_label": f"synthetic {file_name} batch".encode()}
        with open(os.path.join(folder, file_name), "wb") as handle:
            pickle.dump(batch, handle)
    with open(os.path.join(folder, "meta"), "wb") as handle:
        pickle.dump({b"fine_label_names": names, b"coarse_label_names": names}, handle)


def _export_imagefolder(scenes: dict, out: str) -> None:
    # folder "<label:03d>_<name>" sorts in label order; every class gets a folder even if empty
    folders = [f"{k:03d}_{name}" for k, name in enumerate(scenes["train"].object_classes)]
    for split, data in scenes.items():
        for folder in folders:
            os.makedirs(os.path.join(out, split, folder), exist_ok=True)
        for index in range(len(data)):
            sample = data[index]
            _save(sample["image"], os.path.join(out, split, folders[sample["image_label"]], f"{split}_{index:06d}.JPEG"))


EXPORTERS = {"cityscapes": _export_cityscapes, "voc": _export_voc, "coco": _export_coco,
             "cifar100": _export_cifar100, "imagefolder": _export_imagefolder}


# ------------------------------------------------------------------------------------ depth
# Base depth samples: ``image`` uint8 HxWx3, ``depth`` float32 HxW metres (0 = invalid), ``name``.
# DepthSet batches: {"images": (B,3,Hp,Wp) zero-padded to a multiple of 32, "image_sizes": [(h, w)],
#                    "targets": float32 (B,Hp,Wp) metres, 0 = invalid (also the padding), "names": [str]}
#                    and under VNL's test geometry "restores": [transforms.vnl_restore's dicts], "targets" then being the
#                    original maps, zero-padded to the batch's largest
NYU_LAYOUT = "rgb/<name>.png, depth/<name>.png (uint16 millimetres, 0 = invalid) and train.txt / test.txt"
DEPTH_STREAM = 17   # the synthetic depth draws from its own generator, so every other target stays as it was


class SyntheticDepthScenes:
    """Depth mode of :class:`SyntheticScenes`: a scene drawn with the cues of depth_fcos.md §7, so that depth can
    be read from the image; ``dataset[i] -> {"image" uint8 HxWx3, "depth" float32 HxW metres (0 = hole), "name"}``.

    Scene ``i`` draws from the generator of (seed, split, i) of ``scenes`` with one more word, ``DEPTH_STREAM``,
    and ``scenes`` lends only its size, split, seed, length and object knobs (``OBJECTS``, ``RADIUS``,
    ``object_classes``): the scenes of every other task are not touched. The cues, as a camera of focal
    ``FOCAL_PER_WIDTH`` times the image width would see them:

    * the background is a tilted plane d(u, v) = a + b (u/W - 0.5) + c (0.5 - v/H), a in [3, 6] m, b in [-1, 1],
      c in [1, 3] (farther towards the top, a floor seen from above), clamped to [0.5, 10];
    * the plane carries a checker board of ``CELL`` metres in its own coordinates, so a cell spans
      ``CELL * focal / d`` pixels (finer far away), and it darkens into haze with depth;
    * every object stands on the plane: one depth, the plane's at its foot point minus 0-0.5 m, a drawn radius
      scaled by ``REFERENCE_DEPTH / depth`` (perspective), the same haze; objects are painted far to near
      (z-buffer order), so occlusion agrees with depth;
    * 0-3 % of the pixels are holes (depth 0), the invalid pixels of a real sensor.
    """
    FOCAL_PER_WIDTH = 0.625  # focal length over image width: 100 pixels at 160, 50 at 80 (the presets' focal)
    CELL = 0.8               # metres: checker cell on the plane, 4-40 pixels at 80 wide
    REFERENCE_DEPTH = 3.0    # metres: where an object is drawn at the radius SyntheticScenes would give it
    HAZE_DISTANCE = 6.0      # metres: the object/plane colour keeps exp(-d / HAZE_DISTANCE) of itself
    HAZE_COLOUR = np.array([200.0, 205.0, 215.0], np.float32)

    def __init__(self, scenes: SyntheticScenes):
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        image, depth = self.render(index)
        return {"image": image, "depth": depth, "name": f"{self.scenes.split}_{index:06d}.png"}

    def render(self, index: int) -> tuple:
        """(uint8 HxWx3 image, float32 HxW depth in metres with 0 = hole) of scene ``index``."""
        scenes = self.scenes
        if not 0 <= index < len(scenes):
            raise IndexError(f"index {index} out of range for {len(scenes)} {scenes.split} scenes")
        rng = np.random.default_rng([scenes.seed, scenes._split_code, int(index), DEPTH_STREAM])
        height, width = scenes.size
        xs, ys = scenes._xs, scenes._ys
        a, b, c = rng.uniform(3, 6), rng.uniform(-1, 1), rng.uniform(1, 3)
        plane = np.clip(a + b * (xs / width - 0.5) + c * (0.5 - ys / height), 0.5, 10.0).astype(np.float32)
        plane = np.broadcast_to(plane, (height, width))
        canvas = self._plane_texture(rng, plane)
        depth = plane.copy()
        objects = [self._place_object(rng, plane) for _ in range(int(rng.integers(scenes.OBJECTS[0],
                                                                                  scenes.OBJECTS[1] + 1)))]
        for object_depth, shape_args in sorted(objects, key=lambda item: -item[0]):
            mask, albedo = self._object_paint(rng, *shape_args)
            canvas[mask] = self._haze(albedo, object_depth)[mask]
            depth[mask] = object_depth
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(2, 8)
        depth[rng.random((height, width)) < rng.uniform(0, 0.03)] = 0.0
        return np.clip(canvas, 0, 255).astype(np.uint8), depth

    def _haze(self, colour: np.ndarray, depth) -> np.ndarray:
        kept = np.exp(-np.asarray(depth, np.float32) / self.HAZE_DISTANCE)[..., None]
        return colour * kept + self.HAZE_COLOUR * (1 - kept)

    def _plane_texture(self, rng, plane: np.ndarray) -> np.ndarray:
        # a pixel (x, y) from the centre back-projects to (x d / f, y d / f) on the plane: a checker board of
        # CELL metres there has cells of CELL f / d pixels
        height, width = self.scenes.size
        angle = rng.uniform(0, 2 * math.pi)
        focal = self.FOCAL_PER_WIDTH * width
        x, y = (self.scenes._xs - width / 2) * plane / focal, (self.scenes._ys - height / 2) * plane / focal
        along, across = x * math.cos(angle) + y * math.sin(angle), y * math.cos(angle) - x * math.sin(angle)
        checker = ((np.floor(along / self.CELL) + np.floor(across / self.CELL)) % 2)[..., None]
        low, high = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        return self._haze(low + checker * (high - low), plane)

    def _place_object(self, rng, plane: np.ndarray) -> tuple:
        """(depth, arguments of ``_object_paint``): a foot point on the plane, the object standing on it."""
        scenes = self.scenes
        height, width = scenes.size
        foot_x, foot_y = int(rng.integers(0, width)), int(rng.integers(height // 4, height))
        object_depth = float(max(plane[foot_y, foot_x] - rng.uniform(0, 0.5), 0.5))
        radius = math.exp(rng.uniform(*np.log(scenes.RADIUS))) * min(height, width) * self.REFERENCE_DEPTH / object_depth
        radius = max(radius, 2.0)
        shape = scenes.object_classes[int(rng.integers(len(scenes.object_classes)))]
        return object_depth, (shape, foot_x + 0.5, foot_y + 0.5 - radius, radius)

    def _object_paint(self, rng, shape: str, cx: float, cy: float, radius: float) -> tuple:
        """(mask HxW, albedo HxWx3) of one object centred at (cx, cy), with a random rotation and shading."""
        angle = rng.uniform(0, 2 * math.pi)
        dx, dy = self.scenes._xs - cx, self.scenes._ys - cy
        u, v = dx * math.cos(angle) + dy * math.sin(angle), dy * math.cos(angle) - dx * math.sin(angle)
        mask = SHAPES[shape](u, v, radius, rng.uniform(*SHAPE_PARAMETER.get(shape, (1, 1))))
        shade = (u / radius)[..., None] * rng.uniform(-40, 40, 3).astype(np.float32)
        return mask, rng.uniform(0, 255, 3).astype(np.float32) + shade


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


def _export_nyu(scenes: dict, out: str) -> None:
    """train -> train.txt, val -> test.txt; depth as uint16 millimetres, holes 0."""
    for split, data in scenes.items():
        names = []
        for index in range(len(data)):
            image, depth = SyntheticDepthScenes(data).render(index)
            name = f"{split}_{index:06d}"
            _save(image, os.path.join(out, "rgb", f"{name}.png"))
            millimetres = np.round(depth * 1000).astype(np.uint16)
            _save(millimetres, os.path.join(out, "depth", f"{name}.png"))
            names.append(name)
        with open(os.path.join(out, "train.txt" if split == "train" else "test.txt"), "w") as handle:
            handle.write("".join(f"{name}\n" for name in names))


EXPORTERS["nyu"] = _export_nyu


def export(format: str, out: str, num_train: int = 20, num_val: int = 10, size: tuple = (128, 128),
           seed: int = 0, style: str = "standard") -> str:
    """Write SyntheticScenes (splits ``train`` and ``val``) to ``out`` in a real data set's layout:
    cityscapes (labelIds PNGs), voc (VOC2007 + VOC2012 ``trainval`` = synthetic train, VOC2007 ``test`` = val),
    coco (``train2017``/``val2017``; the instances of :class:`SyntheticInstances`), cifar100 (32x32 pickles of
    ``image_label``) or imagefolder.
    Returns the ``train.py`` command that trains on the written tree (:func:`training_command`)."""
    if format not in EXPORTERS:
        raise ValueError(f"--format {format}: expected one of {sorted(EXPORTERS)}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"--num-train/--num-val: expected positive counts, got {num_train}/{num_val}")
    scenes = {split: SyntheticScenes(split, seed=seed, size=size, length=count, style=style)
              for split, count in (("train", num_train), ("val", num_val))}
    EXPORTERS[format](scenes, out)
    return training_command(format, out, scenes["train"])


def training_command(format: str, root: str, scenes: SyntheticScenes) -> str:
    """The ``train.py`` command that trains the format's default real-data preset on an exported tree: the
    preset's models and optimisation, with the tree's classes, an input size of the tree's images (the
    presets' full sizes would make every CPU step minutes long), a batch the tree can fill, and from random
    weights (the synthetic shapes are no ImageNet task)."""
    height, width = scenes.size
    batch = min(8, len(scenes))
    classes = scenes.object_classes
    flags = {
        "cityscapes": ["--task", "seg", "--data", "cityscapes", "--set", f"num_classes={scenes.num_semantic_classes}",
                       "--crop", str(height), str(width)],
        "voc": ["--task", "det", "--data", "voc", "--set", f"num_classes={len(classes)}",
                "--set", f"classes={tuple(classes)!r}", "--set", f"image_scale={(max(height, width), min(height, width))}"],
        "coco": ["--task", "det", "--data", "coco", "--set", f"num_classes={len(classes)}",
                 "--set", f"image_scale={(max(height, width), min(height, width))}"],
        "cifar100": ["--task", "cls", "--data", "cifar100", "--set", f"num_classes={len(classes)}"],
        "imagefolder": ["--task", "cls", "--data", "imagenet", "--set", f"num_classes={len(classes)}",
                        "--crop", str(min(height, width)), str(min(height, width))],
        "nyu": ["--task", "depth", "--data", "nyu", "--crop", str(min(height, width)), str(min(height, width))],
    }[format]
    # presets that count epochs keep their epochs (a few hundred iterations on a small tree); the others run 100
    from kd_ref.presets import PRESETS, default_preset

    preset = PRESETS[default_preset(flags[1], "none", flags[3])]
    length = [] if preset.epochs else ["--iters", "100"]
    words = ["python", "train.py", *flags, "--data-root", root, "--batch-size", str(batch), *length,
             "--pretrained", "none"]
    return " ".join(shlex.quote(word) for word in words)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_ref.datasets", description="kd_ref data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    export_parser = commands.add_parser(
        "export", help="write SyntheticScenes in a real data set's layout",
        description="Write the built-in synthetic scenes in a real data set's on-disk layout, then print the "
                    "train.py command that trains on the written tree.")
    export_parser.add_argument("--format", required=True, choices=sorted(EXPORTERS),
                               help="the layout to write (required)")
    export_parser.add_argument("out", metavar="DIR", help="folder to write the tree into")
    export_parser.add_argument("--num-train", type=int, default=20, help="training scenes (default: 20)")
    export_parser.add_argument("--num-val", type=int, default=10, help="validation scenes (default: 10)")
    export_parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(128, 128),
                               help="scene size in pixels (default: 128 128)")
    export_parser.add_argument("--seed", type=int, default=0, help="scene seed (default: 0)")
    export_parser.add_argument("--style", default="standard", choices=sorted(SyntheticScenes.STYLES),
                               help="scene style, see SyntheticScenes (default: standard)")
    args = parser.parse_args(argv)
    try:
        command = export(args.format, args.out, args.num_train, args.num_val, tuple(args.size), args.seed, args.style)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(f"wrote {args.num_train} train + {args.num_val} val synthetic scenes as {args.format} to {args.out}; "
          f"train on them with:\n{command}")
    return 0


# ---------------------------------------------------------------------- instance segmentation
MIN_INSTANCE_AREA = 16  # pixels: smaller visible fragments of a synthetic object are no instance


class SyntheticInstances:
    """Instance view of :class:`SyntheticScenes`: every object's visible part (after occlusion) of at least
    ``min_area`` pixels is an instance, with the tight box of that mask; none is ``difficult`` (an occluded
    object is still an instance, with its visible mask). Samples follow the det layout plus ``masks``."""

    def __init__(self, scenes: SyntheticScenes, min_area: int = MIN_INSTANCE_AREA):
        self.scenes, self.min_area = scenes, min_area
        self.classes = self.object_classes = scenes.object_classes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict:
        sample = self.scenes[index]
        keep = sample["masks"].sum((1, 2)) >= self.min_area
        return {"image": sample["image"], "boxes": sample["boxes"][keep], "labels": sample["labels"][keep],
                "masks": sample["masks"][keep], "difficult": np.zeros(int(keep.sum()), bool),
                "image_id": sample["image_id"], "name": sample["name"]}


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


if __name__ == "__main__":
    sys.exit(main())
