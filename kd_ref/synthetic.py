"""Built-in synthetic data: scenes of shapes for every task, generated on the fly and deterministic per
(seed, split, index), so that every task runs, trains and is tested without a download.

* :class:`SyntheticScenes` -- the scenes; ``sample(index)`` holds the targets of every task at once (semantic
  map, boxes, labels, visible masks, image label), so seg, det and cls read the same base data set.
* :class:`SyntheticInstances` -- the instance view (ins): every visible part of at least
  ``MIN_INSTANCE_AREA`` pixels is an instance.
* :class:`SyntheticDepthScenes` -- the depth mode: the same scene knobs, drawn with the depth cues of
  ``docs/specs/depth_fcos.md §7``, from a generator of its own (``DEPTH_STREAM``), so the scenes of every
  other task stay as they are.
* :class:`ProbeScenes` -- made-up detection samples whose only purpose is their sizes (FLOP probes).

Their samples follow the base-sample layouts of :mod:`kd_ref.datasets`, whose wrappers and collates turn
them into batches; :mod:`kd_ref.export` writes the scenes in each real data set's on-disk layout. Why the
scenes look as they do (shape classes, styles, caching): ``docs/design/data.md``.
"""
from __future__ import annotations

import functools
import math
import zlib

import numpy as np

from kd_ref.transforms import IGNORE_INDEX

# background grey, then one saturated hue per shape (SyntheticScenes.CLASSES order)
SYNTHETIC_PALETTE = np.array([
    (96, 96, 96), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230)], np.uint8)


# -------------------------------------------------------------------------------------------- scenes
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


def box_targets_of(sample: dict) -> dict:
    """The ``boxes``, ``labels`` and ``difficult`` flags of a detection sample (a base data set's
    ``box_targets(index)``: what GKD's prototype pass reads)."""
    return {key: sample[key] for key in ("boxes", "labels", "difficult")}


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
    * ``easy``: one to three large objects on a grainy background: figure/ground becomes a local cue
      (grain versus smooth paint) and only the class, the shape, needs context.

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

    def box_targets(self, index: int) -> dict:
        """The ``boxes``, ``labels`` and ``difficult`` flags of scene ``index`` (drawn, as a sample)."""
        return box_targets_of(self[index])

    def __getitem__(self, index: int) -> dict:
        """``sample(index)``, drawn once: scenes are kept up to ``CACHE_BYTES``; the dict is a copy, the arrays
        are shared and never written by the loaders or transforms."""
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
        # a scene with no object of MIN_VISIBLE pixels (rare, at small sizes) is drawn again from the same
        # generator, so every scene has an image label and the others stay as they were
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


# ------------------------------------------------------------------------------------------ depth
DEPTH_STREAM = 17   # the synthetic depth draws from its own generator, so every other target stays as it was


class SyntheticDepthScenes:
    """Depth mode of :class:`SyntheticScenes`: a scene drawn with the cues of ``docs/specs/depth_fcos.md §7``,
    so that depth can be read from the image;
    ``dataset[i] -> {"image" uint8 HxWx3, "depth" float32 HxW metres (0 = hole), "name"}``.

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


# ---------------------------------------------------------------------------- probe samples (FLOP counts)
class ProbeScenes:
    """Made-up detection samples (base data set layout: ``image``, ``boxes``, ``labels``, ``difficult``,
    ``image_id``, ``masks``): a uniform-noise image of ``image_size`` (H, W) and ``num_objects`` boxes whose
    sides spread geometrically from 16 pixels to half the short side (small, medium and large objects
    alike), at positions drawn from a generator seeded by the index; labels cycle through the classes and
    masks fill the boxes. Only their sizes matter: they stand for an image of a real data set in the FLOP
    counts of ``tasks``' probes."""
    MIN_SIDE = 16

    def __init__(self, image_size: tuple, num_objects: int, num_classes: int, length: int, with_masks: bool):
        self.image_size, self.num_objects, self.num_classes = tuple(image_size), num_objects, num_classes
        self.length, self.with_masks = length, with_masks
        self.classes = tuple(str(label) for label in range(num_classes))

    def __len__(self) -> int:
        return self.length

    def box_targets(self, index: int) -> dict:
        """The ``boxes``, ``labels`` and ``difficult`` flags of sample ``index`` (drawn, as a sample)."""
        return box_targets_of(self[index])

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
