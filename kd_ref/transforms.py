"""Data transforms for segmentation, detection, classification and depth, in torch/numpy only.

Every random transform takes an explicit ``numpy.random.Generator``: the engine gives each sample its
own generator seeded by (seed, epoch, index), so augmentation never depends on which worker loads a
sample and never touches the global RNGs. Images enter as uint8 ``H x W x 3`` RGB arrays; resizing follows
``torch.nn.functional.interpolate`` (bilinear for images, nearest for labels and masks). The depth transform
returns normalised float ``(3, H, W)`` tensors (:class:`DepthTransform`; NYUDv2 under VNL's protocol:
:class:`VNLDepthTransform`, whose predictions :func:`vnl_restore` maps back to the original map). The
segmentation crop resamples only the window it keeps (:func:`resized_window`, :func:`resized_label_window`),
equal to resize-then-crop (labels exactly, images to 1e-2 of a level); the segmentation transforms return that
float window (evaluation: the uint8 pixels) and the label in uint8, and :func:`seg_device_inputs` flips,
normalises and pads them on the device, with the values of doing it all in the worker bit for bit.

Detection and classification split their pipeline in two halves, so that a DataLoader worker does little
more than decode: the transform (the CPU half, in the worker) makes every random draw, maps the targets and
returns uint8 pixels (the decoded image, or a crop of it) with their geometry (the size to resize them to,
whether to flip them), and the collate stacks them on a uint8 zero canvas; the device half,
:func:`device_inputs`, runs on the batch after its transfer, in the training process (tensor ops on a GPU):
resize, flip, normalise, zero padding (detection: to a multiple of 32). Evaluation crops of ImageNet
(resize, then a centre crop) are resized in the worker, in uint8 (:func:`resize_uint8`). On the CPU the
batches are those of the former all-in-worker pipeline bit for bit (the same operations per pixel); another
device has no uint8 resize kernel and resizes in float, rounded: within one intensity level
(:func:`resize_pixels`).

Normalisations (pixel values on the 0..255 scale throughout):

* ``"bgr_mean"``     -- CIRKD / SKD (caffe style; the references read images with cv2, i.e. BGR):
  channels reordered to B, G, R, minus (104.00698793, 116.66876762, 122.67891434), no std.
* ``"imagenet_rgb"`` -- mmseg / mmdet / torchvision: RGB, (x - mean) / std with ImageNet mean
  (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375), i.e. 255 x (0.485, 0.456, 0.406) etc.
* ``"cifar100"``     -- the CIFAR-100 statistics of the CRD code base most CIFAR KD papers build on,
  mean 255 x (0.5071, 0.4867, 0.4408), std 255 x (0.2675, 0.2565, 0.2761).
* ``"caffe2_bgr"``   -- maskrcnn-benchmark and tianzhi0549/FCOS (``INPUT.PIXEL_MEAN``, ``PIXEL_STD`` 1,
  ``TO_BGR255``; every FCOS config keeps these defaults): B, G, R minus (102.9801, 115.9465, 122.7717).

Segmentation training: random scale from the discrete set ``lo, lo + 0.1, ..., hi`` (CIRKD / SKD
``generate_scale_label``; ``scale_step=None`` draws it uniformly from ``[lo, hi]`` as mmseg does), random
crop, horizontal flip with p = 0.5, optional mmseg photometric distortion, normalisation, then padding
at the bottom/right to the crop size (image 0 *after* normalisation, label 255). A crop window larger
than the scaled image starts at 0, so this equals CIRKD's pad-then-crop. ``cat_max_ratio`` re-draws
the crop up to 10 times while one class covers more than that fraction of its labelled pixels (mmseg
``RandomCrop``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255

NORMALIZATIONS = {
    "bgr_mean": {"bgr": True, "mean": (104.00698793, 116.66876762, 122.67891434), "std": (1.0, 1.0, 1.0)},
    "imagenet_rgb": {"bgr": False, "mean": (123.675, 116.28, 103.53), "std": (58.395, 57.12, 57.375)},
    "cifar100": {"bgr": False, "mean": (129.3105, 124.1085, 112.404), "std": (68.2125, 65.4075, 70.4055)},
    "caffe2_bgr": {"bgr": True, "mean": (102.9801, 115.9465, 122.7717), "std": (1.0, 1.0, 1.0)},
}


# ------------------------------------------------------------------------------------- functional
def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``H x W x 3`` RGB array -> float32 ``(3, H, W)`` tensor on the 0..255 scale."""
    return torch.from_numpy(np.ascontiguousarray(check_image(image).transpose(2, 0, 1))).float()


def check_image(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected a uint8 H x W x 3 array, got {image.dtype} {image.shape}")
    return image


def check_normalization(normalization: str) -> str:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r}: expected one of {sorted(NORMALIZATIONS)}")
    return normalization


def normalize(image: torch.Tensor, normalization: str) -> torch.Tensor:
    """Normalise a float ``(..., 3, H, W)`` RGB tensor on the 0..255 scale (see the module docstring)."""
    spec = NORMALIZATIONS[check_normalization(normalization)]
    if spec["bgr"]:
        image = image.flip(-3)
    # float32 constants on the image's device: a CPU (3, 1, 1) tensor cannot meet a CUDA batch, and in the
    # image's dtype a half-precision mean would be rounded (bf16: 123.675 -> 124)
    image = image - torch.tensor(spec["mean"], device=image.device).view(3, 1, 1)
    if spec["std"] == (1.0, 1.0, 1.0):  # caffe style has no std: one pass less over the image, same values
        return image
    return image / torch.tensor(spec["std"], device=image.device).view(3, 1, 1)


def resize_image(image: torch.Tensor, size: tuple, antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of a ``(C, H, W)`` float tensor to ``size = (h, w)`` (half-pixel centres, as cv2)."""
    return F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=antialias)[0]


def resize_label(label: torch.Tensor, size: tuple) -> torch.Tensor:
    """Nearest resize of an integer/bool ``(..., H, W)`` tensor (cv2 INTER_NEAREST index rule): values
    are only ever copied, never mixed."""
    flat = label.reshape(-1, 1, *label.shape[-2:]).float()
    out = F.interpolate(flat, size=tuple(size), mode="nearest")
    return out.to(label.dtype).reshape(*label.shape[:-2], *size)


def pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 ``H x W x 3`` RGB array -> uint8 ``(3, H, W)`` tensor sharing its memory (channels-last strides);
    a read-only array (``np.asarray`` of a PIL image) is copied, as torch tensors are writable."""
    return torch.from_numpy(np.require(check_image(image), requirements="W")).permute(2, 0, 1)


def check_pixel_batch(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a collated uint8 (B, 3, H, W) batch, got {images.dtype} "
                         f"{tuple(images.shape)}")
    return images


def resize_pixels(images: torch.Tensor, size: tuple, antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of uint8 ``(N, 3, H, W)`` pixels to ``size = (h, w)``, in uint8; the same size is
    returned unchanged. On the CPU, torch's uint8 kernel (vectorised for channels-last input: about 3x
    faster than resizing in float, within one intensity level of it); other devices have no uint8 bilinear
    kernel, so there the float resize is rounded (:func:`rounded_float_resize`)."""
    if tuple(size) == tuple(images.shape[-2:]):
        return images
    if images.device.type != "cpu":
        return rounded_float_resize(images, size, antialias)
    return F.interpolate(images, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias)


def rounded_float_resize(images: torch.Tensor, size: tuple, antialias: bool = False) -> torch.Tensor:
    """The float bilinear resize of uint8 pixels, rounded back to uint8: within one level of the CPU's
    uint8 kernel, whose fixed-point weights round differently."""
    resized = F.interpolate(images.float(), size=tuple(size), mode="bilinear", align_corners=False,
                            antialias=antialias)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def resize_uint8(image: np.ndarray, size: tuple, antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of a uint8 ``H x W x 3`` array to ``size = (h, w)`` in uint8 (:func:`resize_pixels`),
    as a uint8 ``(3, h, w)`` tensor (channels-last strides)."""
    return resize_pixels(pixels(image)[None], size, antialias)[0]


def _source_positions(first: int, count: int, in_size: int, out_size: int) -> torch.Tensor:
    """Source coordinates of output positions ``first .. first + count - 1`` of a bilinear resize from
    ``in_size`` to ``out_size`` as ``F.interpolate`` (``align_corners=False``) computes them: half-pixel
    centres, in float32, clamped at 0."""
    scale = torch.tensor(float(in_size), dtype=torch.float32) / out_size
    return ((torch.arange(first, first + count, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)


def resized_window(image: torch.Tensor, size: tuple, window: tuple) -> torch.Tensor:
    """``window = (top, left, h, w)`` of the bilinear resize of a uint8 ``(C, H, W)`` image to ``size``, as
    float, from the source pixels that window needs only: ``grid_sample`` at the source coordinates of
    ``F.interpolate``, so it equals ``resize_image(image.float(), size)`` then cropping up to the rounding of
    the normalised grid (a few 1e-3 of an intensity level). Gathering rows and columns by index costs more
    than the resampling at 1024x2048; ``grid_sample`` reads the bounding slice in any memory layout."""
    top, left, height, width = window
    rows = _source_positions(top, height, image.shape[-2], size[0])
    cols = _source_positions(left, width, image.shape[-1], size[1])
    first_row, first_col = int(rows[0]), int(cols[0])
    end_row, end_col = min(int(rows[-1]) + 2, image.shape[-2]), min(int(cols[-1]) + 2, image.shape[-1])
    source = image[:, first_row:end_row, first_col:end_col][None].float()
    # grid_sample's unit: -1 and 1 are the outer edges of the slice's first and last pixels
    grid_y = (2 * (rows - first_row) + 1) / (end_row - first_row) - 1
    grid_x = (2 * (cols - first_col) + 1) / (end_col - first_col) - 1
    grid = torch.stack(torch.broadcast_tensors(grid_x[None, :], grid_y[:, None]), dim=-1)[None]
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def resized_label_window(label: torch.Tensor, size: tuple, window: tuple) -> torch.Tensor:
    """``window = (top, left, h, w)`` of the nearest resize of an ``(H, W)`` CPU label to ``size``, reading
    the needed source pixels only; equal to ``resize_label(label, size)`` then cropping (same index rule:
    source = floor(destination x in / out), in float32 as ``F.interpolate``)."""
    top, left, height, width = window

    def taps(first: int, count: int, in_size: int, out_size: int) -> np.ndarray:
        scale = torch.tensor(float(in_size), dtype=torch.float32) / out_size
        positions = torch.arange(first, first + count, dtype=torch.float32)
        return (positions * scale).floor().long().clamp(max=in_size - 1).numpy()

    # numpy's take gathers a uint8 window about 5x faster than torch's index_select along the columns
    rows = np.take(label.numpy(), taps(top, height, label.shape[0], size[0]), axis=0)
    return torch.from_numpy(np.take(rows, taps(left, width, label.shape[1], size[1]), axis=1))


def pad_bottom_right(tensor: torch.Tensor, size: tuple, value: float) -> torch.Tensor:
    """Pad the last two dims of ``tensor`` at the bottom/right up to at least ``size = (h, w)``."""
    pad_h, pad_w = max(size[0] - tensor.shape[-2], 0), max(size[1] - tensor.shape[-1], 0)
    if pad_h == 0 and pad_w == 0:
        return tensor
    return F.pad(tensor, (0, pad_w, 0, pad_h), value=value)


def flip_boxes(boxes, width: int):
    """Mirror xyxy boxes (a tensor or an array) horizontally in an image of ``width`` pixels (mmdet:
    x' = w - x)."""
    flipped = boxes[:, [2, 1, 0, 3]]
    flipped[:, [0, 2]] = width - flipped[:, [0, 2]]
    return flipped


def draw_scale(rng: np.random.Generator, scales: tuple, step: float | None = 0.1) -> float:
    """A scale from ``[lo, hi]``: uniform over ``lo + k * step`` (``step=None``: continuous)."""
    low, high = scales
    if not 0 < low <= high:
        raise ValueError(f"scales: expected 0 < low <= high, got {scales}")
    if step is None:
        return float(rng.uniform(low, high))
    count = int(round((high - low) / step)) + 1
    return low + step * int(rng.integers(count))


# ------------------------------------------------------------------------------------ segmentation
def rgb_to_hsv(image: torch.Tensor) -> tuple:
    """``(3, H, W)`` RGB in 0..255 -> hue in degrees [0, 360), saturation in [0, 1], value in 0..255."""
    red, green, blue = image
    value, chroma = image.max(0).values, image.max(0).values - image.min(0).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == red, ((green - blue) / safe) % 6,
                      torch.where(value == green, (blue - red) / safe + 2, (red - green) / safe + 4)) * 60
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), 0.0)
    return torch.where(chroma > 0, hue, 0.0), saturation, value


def hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hsv`: channel n in (R, G, B) = V - V S clamp(min(k, 4 - k), 0, 1) with
    k = (n' + H / 60) mod 6, n' = 5, 3, 1."""
    k = (hue.new_tensor([5.0, 3.0, 1.0]).view(3, 1, 1) + hue / 60) % 6
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion`` on a float ``(3, H, W)`` RGB tensor in 0..255; each step with
    p = 0.5: brightness + U(-32, 32); contrast x U(0.5, 1.5), either first or last (p = 0.5);
    saturation x U(0.5, 1.5); hue + 2k degrees, k in [-18, 17] (cv2's 180-step hue). Values are clipped
    to 0..255 after each step; mmseg also rounds to uint8 between steps, which we skip.

    :meth:`draw` makes the random draws (in mmseg's order; they do not depend on the image), so that the
    worker draws and :meth:`apply` runs on the device; ``__call__(image, rng)`` does both."""

    def __init__(self, brightness_delta: float = 32, contrast_range: tuple = (0.5, 1.5),
                 saturation_range: tuple = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta, self.contrast_range = brightness_delta, contrast_range
        self.saturation_range, self.hue_delta = saturation_range, hue_delta

    def _draw_contrast(self, rng: np.random.Generator) -> float | None:
        return float(rng.uniform(*self.contrast_range)) if rng.integers(2) else None

    def draw(self, rng: np.random.Generator) -> dict:
        """The parameters of one distortion; a step that is skipped is None."""
        params = {"brightness": float(rng.uniform(-self.brightness_delta, self.brightness_delta))
                  if rng.integers(2) else None}
        params["contrast_first"] = bool(rng.integers(2))
        params["contrast"] = self._draw_contrast(rng) if params["contrast_first"] else None
        params["saturation"] = float(rng.uniform(*self.saturation_range)) if rng.integers(2) else None
        params["hue"] = 2 * int(rng.integers(-self.hue_delta, self.hue_delta)) if rng.integers(2) else None
        if not params["contrast_first"]:
            params["contrast"] = self._draw_contrast(rng)
        return params

    @staticmethod
    def apply(image: torch.Tensor, params: dict) -> torch.Tensor:
        """The distortion of :meth:`draw`'s ``params`` on ``image`` (any device)."""
        contrast = None if params["contrast"] is None else (lambda x: (x * params["contrast"]).clamp(0, 255))
        if params["brightness"] is not None:
            image = (image + params["brightness"]).clamp(0, 255)
        if params["contrast_first"] and contrast is not None:
            image = contrast(image)
        if params["saturation"] is not None:
            hue, saturation, value = rgb_to_hsv(image)
            image = hsv_to_rgb(hue, (saturation * params["saturation"]).clamp(0, 1), value)
        if params["hue"] is not None:
            hue, saturation, value = rgb_to_hsv(image)
            image = hsv_to_rgb((hue + params["hue"]) % 360, saturation, value)
        if not params["contrast_first"] and contrast is not None:
            image = contrast(image)
        return image

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return self.apply(image, self.draw(rng))


def map_labels(label: torch.Tensor, label_map: np.ndarray | None) -> torch.Tensor:
    """A CPU uint8 label's values through ``label_map``, a table of 256 uint8 entries (None: unchanged).
    Nearest resampling only copies values, so mapping a window equals windowing the mapped label, at the
    cost of the window (a quarter of a Cityscapes label at scale 1)."""
    if label_map is None:
        return label
    return torch.from_numpy(np.take(label_map, label.numpy()))


class SegTrainTransform:
    """Random scale -> random crop -> flip -> (photometric) -> normalise -> pad (module docstring), the CPU
    half: ``__call__(image uint8 HxWx3, label uint8 HxW, rng, label_map=None) -> (float (3, h, w), uint8
    (h, w), geometry)`` with ``geometry = {"size": (window h, w), "flipped": bool, "photometric": the
    distortion's parameters or None}`` (``label_map``: see :func:`map_labels`, applied to the windows it
    keeps): the resampled window, neither distorted, flipped nor normalised, at the top left of the crop
    (label padding 255), and the label window in uint8; :func:`seg_device_inputs` distorts, flips, normalises
    and zero-pads it on the device. The draws keep their order (scale, crop, flip, photometric); the
    distortion is pointwise, so distorting before the flip gives the values of distorting after it."""

    def __init__(self, crop: tuple, scales: tuple = (0.5, 2.0), normalization: str = "bgr_mean",
                 scale_step: float | None = 0.1, flip_prob: float = 0.5, cat_max_ratio: float | None = None,
                 photometric: bool = False):
        self.crop = tuple(int(side) for side in crop)
        self.scales, self.scale_step = tuple(scales), scale_step
        self.normalization = check_normalization(normalization)
        self.flip_prob, self.cat_max_ratio = flip_prob, cat_max_ratio
        self.photometric = PhotoMetricDistortion() if photometric else None

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 label_map: np.ndarray | None = None):
        check_image(image)
        label = torch.from_numpy(np.asarray(label))
        scale = draw_scale(rng, self.scales, self.scale_step)
        size = (max(1, round(label.shape[0] * scale)), max(1, round(label.shape[1] * scale)))
        window = self._crop_window(label, size, rng, label_map)
        image = resized_window(torch.from_numpy(image).permute(2, 0, 1), size, window)
        label = map_labels(resized_label_window(label, size, window), label_map)
        flipped = bool(rng.random() < self.flip_prob)
        photometric = None if self.photometric is None else self.photometric.draw(rng)
        geometry = {"size": tuple(label.shape), "flipped": flipped, "photometric": photometric}
        # the image's padding is overwritten with 0 after normalisation, on the device
        return (pad_bottom_right(image, self.crop, 0.0).contiguous(),
                pad_bottom_right(label, self.crop, IGNORE_INDEX).contiguous(), geometry)

    def _crop_window(self, label: torch.Tensor, size: tuple, rng: np.random.Generator,
                     label_map: np.ndarray | None = None) -> tuple:
        """(top, left, height, width) of the crop in the image resized to ``size``; with ``cat_max_ratio``
        each candidate's label window is resampled (and mapped) alone, as cheap as the crop itself."""
        spare_h, spare_w = max(size[0] - self.crop[0], 0), max(size[1] - self.crop[1], 0)
        extent = (min(self.crop[0], size[0]), min(self.crop[1], size[1]))
        for _ in range(10 if self.cat_max_ratio else 1):
            window = (int(rng.integers(spare_h + 1)), int(rng.integers(spare_w + 1)), *extent)
            if not self.cat_max_ratio:
                break
            labels = map_labels(resized_label_window(label, size, window), label_map).long()
            counts = torch.bincount(labels[labels != IGNORE_INDEX].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return window


class SegEvalTransform:
    """Whole-image evaluation: normalise only, on the device. ``__call__(image, label, rng=None,
    label_map=None) -> (uint8 pixels (3, H, W), uint8 label, geometry)``, which :func:`seg_device_inputs`
    normalises."""

    def __init__(self, normalization: str = "bgr_mean"):
        self.normalization = check_normalization(normalization)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator | None = None,
                 label_map: np.ndarray | None = None):
        label = map_labels(torch.from_numpy(np.asarray(label)), label_map)
        return pixels(image), label, {"size": tuple(label.shape), "flipped": False}


def zero_margins(inputs: torch.Tensor, sizes: list) -> torch.Tensor:
    """``inputs`` (B, C, H, W) with 0 outside each sample's ``sizes[i]`` = (h, w) at the top left, in place:
    the padding is 0 after normalisation, as the references pad."""
    for index, (height, width) in enumerate(sizes):
        inputs[index, :, height:] = 0
        inputs[index, :, :, width:] = 0
    return inputs


def seg_device_inputs(images: torch.Tensor, labels: torch.Tensor, geometry: list, normalization: str) -> tuple:
    """The device half of the segmentation pipeline: a collated batch of the seg transforms (``images``
    float windows or uint8 pixels (B, 3, H, W), ``labels`` uint8 (B, H, W) padded with 255, each sample's
    ``geometry``) -> (normalised float images, int64 targets). Sample ``i``'s window of
    ``geometry[i]["size"]`` at the top left is flipped if ``geometry[i]["flipped"]`` (image and label),
    the images photometrically distorted (``geometry[i]["photometric"]``, :meth:`PhotoMetricDistortion.apply`
    on the window), normalised and 0 outside the windows. The inputs are left untouched."""
    distorted = [entry.get("photometric") is not None for entry in geometry]
    inputs = images.to(torch.float32, copy=any(distorted))  # distorted in place: a copy keeps the batch as it was
    for index, entry in enumerate(geometry):
        if distorted[index]:
            height, width = entry["size"]
            inputs[index, :, :height, :width] = PhotoMetricDistortion.apply(inputs[index, :, :height, :width],
                                                                            entry["photometric"])
    inputs = normalize(inputs, normalization)  # pointwise: commutes with the flip below
    targets = labels.to(torch.int64, copy=True)
    for index, entry in enumerate(geometry):
        height, width = entry["size"]
        if entry["flipped"]:
            inputs[index, :, :height, :width] = inputs[index, :, :height, :width].flip(-1)
            targets[index, :height, :width] = targets[index, :height, :width].flip(-1)
    return zero_margins(inputs, [entry["size"] for entry in geometry]), targets


# --------------------------------------------------------------------------------------- detection
def rescale_size(height: int, width: int, scale: tuple) -> tuple:
    """mmcv ``imrescale``: the largest size keeping the aspect ratio whose long side is at most
    ``max(scale)`` and short side at most ``min(scale)``; returns ``((new_h, new_w), factor)``."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return (int(height * factor + 0.5), int(width * factor + 0.5)), factor


MULTISCALE_MODES = ("value", "range")


def check_multiscale(scales: tuple, mode: str) -> None:
    """mmdet 2.x ``Resize(img_scale=[...], multiscale_mode=...)`` arguments: 'value' picks one of the
    (long, short) scales, 'range' takes exactly two bounds."""
    if mode not in MULTISCALE_MODES:
        raise ValueError(f"multiscale_mode {mode!r}: expected one of {list(MULTISCALE_MODES)}")
    if any(len(scale) != 2 for scale in scales):
        raise ValueError(f"train_image_scales {scales}: expected (long side, short side) pairs")
    if mode == "range" and len(scales) != 2:
        raise ValueError(f"train_image_scales {scales}: multiscale_mode 'range' takes two (long, short) bounds")


def draw_image_scale(rng: np.random.Generator, scales: tuple, mode: str) -> tuple:
    """One training scale (mmdet 2.x ``Resize._random_scale``): 'value' one of ``scales`` at random, 'range'
    a long side and then a short side, each uniform over the integers between the two bounds' sides."""
    if mode == "value":
        return tuple(scales[int(rng.integers(len(scales)))])
    longs, shorts = [max(scale) for scale in scales], [min(scale) for scale in scales]
    return int(rng.integers(min(longs), max(longs) + 1)), int(rng.integers(min(shorts), max(shorts) + 1))


class DetTransform:
    """mmdet 2.x pipeline: resize keeping the ratio to fit ``scale`` (default (1333, 800)), random flip
    (``flip_prob``; 0 for evaluation), normalise, zero padding to a multiple of 32. Multi-scale training:
    ``scales`` (more than one (long, short) pair, or two bounds with ``multiscale_mode='range'``) draws the
    scale of every sample first (:func:`draw_image_scale`); a single scale draws nothing, so the generator's
    stream is that of the single-scale pipeline.

    This is the CPU half (module docstring): it makes the draws and maps the targets, and returns the
    decoded pixels; :func:`device_inputs` resizes, flips, normalises and pads them on the device, from
    ``meta``. ``__call__(image, boxes (K,4) xyxy, rng, masks=None) -> (pixels uint8 (3,H,W), boxes, masks,
    meta)`` with ``meta = {"orig_size": (H, W), "size": (h, w), "scale_factor": factor, "flipped": bool}``;
    boxes and masks are those of the model input (h, w), flipped with it. Boxes are scaled per axis by h/H and
    w/W (as mmdet), which :func:`boxes_to_original` undoes.
    """

    def __init__(self, scale: tuple = (1333, 800), flip_prob: float = 0.5, normalization: str = "imagenet_rgb",
                 scales: tuple = (), multiscale_mode: str = "value"):
        check_multiscale(tuple(scales), multiscale_mode)
        self.scale, self.flip_prob = tuple(scale), flip_prob
        self.scales = tuple(tuple(s) for s in scales) or (self.scale,)
        self.multiscale_mode = multiscale_mode
        self.normalization = check_normalization(normalization)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator | None,
                 masks: np.ndarray | None = None):
        height, width = check_image(image).shape[:2]
        scale = self.scales[0] if len(self.scales) == 1 else draw_image_scale(rng, self.scales, self.multiscale_mode)
        size, factor = rescale_size(height, width, scale)
        # the box arithmetic in numpy: on a handful of boxes, torch's per-operation overhead would cost a
        # worker a few percent of its decoding rate (float32 either way, the same values)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.float32([size[1] / width, size[0] / height] * 2)
        masks = None if masks is None else resize_label(torch.from_numpy(np.asarray(masks, dtype=bool)), size)
        flipped = self.flip_prob > 0 and rng.random() < self.flip_prob
        if flipped:
            boxes = flip_boxes(boxes, size[1])
            masks = None if masks is None else masks.flip(-1)
        meta = {"orig_size": (height, width), "size": size, "scale_factor": factor, "flipped": flipped}
        return pixels(image), torch.from_numpy(boxes), masks, meta


def device_inputs(images: torch.Tensor, geometry: list, normalization: str, antialias: bool = False,
                  size_divisor: int = 1) -> torch.Tensor:
    """The device half of the detection and classification pipelines (module docstring): uint8 ``images``
    (B, 3, H, W), each image's pixels at the top left, -> float model inputs (B, 3, Hp, Wp). Image ``i`` of
    ``geometry[i]["orig_size"]`` is resized to ``geometry[i]["size"]`` (:func:`resize_pixels`; the same
    size: untouched), flipped if ``geometry[i]["flipped"]``, normalised, and 0 at the bottom/right (after
    normalisation, as mmdet pads) up to the largest size rounded up to a multiple of ``size_divisor``."""
    check_pixel_batch(images)
    sizes = [tuple(entry["size"]) for entry in geometry]
    padded = tuple(math.ceil(max(side) / size_divisor) * size_divisor for side in zip(*sizes))
    canvas = images.new_zeros(len(geometry), 3, *padded)  # planar: float ops broadcast over channels fastest
    for index, (entry, (height, width)) in enumerate(zip(geometry, sizes)):
        orig_h, orig_w = entry["orig_size"]
        resized = resize_pixels(images[index:index + 1, :, :orig_h, :orig_w], (height, width), antialias)[0]
        canvas[index, :, :height, :width] = resized.flip(-1) if entry["flipped"] else resized
    return zero_margins(normalize(canvas.float(), normalization), sizes)


def boxes_to_original(boxes: torch.Tensor, meta: dict) -> torch.Tensor:
    """Map xyxy boxes predicted on the transformed (unflipped) input back to original image pixels."""
    (height, width), (new_h, new_w) = meta["orig_size"], meta["size"]
    return boxes / boxes.new_tensor([new_w / width, new_h / height] * 2)


# ---------------------------------------------------------------------------------- classification
def _geometry(pixels: torch.Tensor, size: tuple, flipped: bool) -> dict:
    """What :func:`device_inputs` does to a classification sample's ``pixels``: resize to ``size``, flip."""
    return {"orig_size": tuple(pixels.shape[1:]), "size": tuple(size), "flipped": bool(flipped)}


class PadCropFlip:
    """CIFAR training: zero-pad ``padding`` pixels, random ``size`` crop (int or (h, w)), flip p = 0.5
    (torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip). ``__call__(image, rng) -> (uint8
    (3, h, w), geometry)``: the crop, whose flip and normalisation :func:`device_inputs` makes on the
    device (the padding is black, 0 before normalisation, as torchvision pads the PIL image)."""

    def __init__(self, size=32, padding: int = 4, normalization: str = "cifar100"):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.padding, self.normalization = padding, check_normalization(normalization)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple:
        tensor = F.pad(pixels(image), (self.padding,) * 4, value=0)
        tensor = pad_bottom_right(tensor, self.size, 0)
        top = int(rng.integers(tensor.shape[1] - self.size[0] + 1))
        left = int(rng.integers(tensor.shape[2] - self.size[1] + 1))
        tensor = tensor[:, top:top + self.size[0], left:left + self.size[1]]
        return tensor, _geometry(tensor, self.size, rng.random() < 0.5)


class RandomResizedCropFlip:
    """ImageNet training (torchvision RandomResizedCrop(224) + flip): area fraction in ``area`` and
    log-uniform aspect ratio in ``ratio``, 10 tries, then the torchvision centre-crop fallback.
    ``__call__(image, rng) -> (uint8 (3, h, w), geometry)``: the crop window of the decoded pixels, which
    :func:`device_inputs` resizes (antialiased), flips and normalises on the device. A window more than
    ``DEVICE_RESIZE_LIMIT`` times the output on a side is resized here instead (in uint8, the same kernel
    on the CPU): the batch's canvas has the size of its largest window, which a large photo would blow up."""
    DEVICE_RESIZE_LIMIT = 2.5

    def __init__(self, size: int = 224, area: tuple = (0.08, 1.0), ratio: tuple = (3 / 4, 4 / 3),
                 normalization: str = "imagenet_rgb"):
        self.size, self.area, self.ratio = size, area, ratio
        self.normalization = check_normalization(normalization)

    def _window(self, height: int, width: int, rng: np.random.Generator) -> tuple:
        for _ in range(10):
            target_area = height * width * rng.uniform(*self.area)
            aspect = math.exp(rng.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple:
        top, left, h, w = self._window(image.shape[0], image.shape[1], rng)
        window = pixels(image)[:, top:top + h, left:left + w]
        if max(h, w) > self.DEVICE_RESIZE_LIMIT * self.size:
            window = resize_pixels(window[None], (self.size, self.size), antialias=True)[0]
        return window, _geometry(window, (self.size, self.size), rng.random() < 0.5)


class ResizeCenterCrop:
    """ImageNet evaluation: resize the short side to ``resize`` (256), centre crop ``size`` (224), in uint8.
    ``resize=None`` skips the resize (CIFAR / synthetic evaluation: the whole image). ``__call__(image)
    -> (uint8 (3, h, w), geometry)``; :func:`device_inputs` normalises on the device."""

    def __init__(self, size: int | None = 224, resize: int | None = 256, normalization: str = "imagenet_rgb"):
        self.size, self.resize = size, resize
        self.normalization = check_normalization(normalization)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> tuple:
        if self.resize is None:
            tensor = pixels(image)
        else:
            # torchvision Resize(int): short side -> resize, long side truncated
            height, width = image.shape[:2]
            if height <= width:
                size = (self.resize, int(self.resize * width / height))
            else:
                size = (int(self.resize * height / width), self.resize)
            tensor = resize_uint8(image, size, antialias=True)
        if self.size is not None:
            top = int(round((tensor.shape[1] - self.size) / 2))
            left = int(round((tensor.shape[2] - self.size) / 2))
            tensor = tensor[:, top:top + self.size, left:left + self.size]
        return tensor, _geometry(tensor, tensor.shape[1:], False)


# ------------------------------------------------------------------------------------------- depth
class DepthTransform:
    """Training (``crop`` given): a random ``crop`` (zero-padded, depth 0, where the image is smaller) and a
    horizontal flip with probability 0.5 (VNL's augmentation); evaluation (``crop=None``): the whole image.
    Both normalise the image with ``normalization``."""

    def __init__(self, crop: tuple | None, normalization: str = "imagenet_rgb"):
        self.crop, self.normalization = crop, check_normalization(normalization)

    def __call__(self, image: np.ndarray, depth: np.ndarray, rng: np.random.Generator) -> tuple:
        image_t, depth_t = to_tensor(image), torch.from_numpy(np.ascontiguousarray(depth, np.float32))
        if self.crop is not None:
            crop_h, crop_w = self.crop
            height, width = depth_t.shape
            size = (max(height, crop_h), max(width, crop_w))
            image_t, depth_t = pad_bottom_right(image_t, size, 0.0), pad_bottom_right(depth_t, size, 0.0)
            top = int(rng.integers(0, size[0] - crop_h + 1))
            left = int(rng.integers(0, size[1] - crop_w + 1))
            image_t = image_t[:, top:top + crop_h, left:left + crop_w]
            depth_t = depth_t[top:top + crop_h, left:left + crop_w]
            if rng.random() < 0.5:
                image_t, depth_t = image_t.flip(-1), depth_t.flip(-1)
        return normalize(image_t, self.normalization), depth_t.contiguous(), None  # the target is the input's


def vnl_crop_sides(crop_side: int, width: int) -> tuple:
    """The square crop sides VNL draws from: ``crop_side`` and the multiples of 32 above it up to the image
    width (data/nyudv2_dataset.py:96, ``raw_size = [CROP_SIZE[1], 416, 448, ..., 640]`` for 385 on NYUDv2's
    640-pixel width; the largest, the width, is also the test geometry, nyudv2_dataset.py:97)."""
    if width < crop_side:
        raise ValueError(f"--crop {crop_side} {crop_side}: VNL's protocol crops squares of {crop_side} px up to the "
                         f"image width, which is {width} px here")
    larger = range(32 * (crop_side // 32 + 1), width, 32)
    return (crop_side, *larger, width)


class VNLDepthTransform:
    """VNL's NYUDv2 geometry (YvanYin/VNL_Monocular_Depth_Prediction data/nyudv2_dataset.py:65-84, 87-142).

    Training: a square side drawn uniformly from :func:`vnl_crop_sides`; an image shorter than it is padded
    at the top (image 128, depth invalid) and the window starts at row 0, else at a random row; a random
    column; the window is resized bilinearly to ``crop_side`` (cv2 INTER_LINEAR: no antialiasing, the image
    rounded as cv2's uint8 output) and its depth divided by the resize ratio r = crop_side / side
    (``scale_torch(B, resize_ratio)``, :77-78: a window shown larger looks nearer); a flip with probability
    0.5 (:93-94). Depth resized across an invalid pixel is invalid here (VNL's filled NYUDv2 maps have
    no holes; raw maps with 0-valued holes would otherwise give depths mixed with 0).
    Evaluation: the side-``width`` case (tools/test_nyu_metric.py:56-64): the image padded at the top to a
    square, resized to ``crop_side``; the target stays the original map, and :func:`vnl_restore` maps the
    prediction back to it."""

    IMAGE_PAD = 128.0  # nyudv2_dataset.py:67, on the 0-255 scale

    def __init__(self, crop_side: int, train: bool, normalization: str = "imagenet_rgb"):
        self.crop_side, self.train, self.normalization = crop_side, train, check_normalization(normalization)

    def __call__(self, image: np.ndarray, depth: np.ndarray, rng: np.random.Generator) -> tuple:
        image_t, depth_t = to_tensor(image), torch.from_numpy(np.ascontiguousarray(depth, np.float32))
        height, width = depth_t.shape
        if height > width:
            raise ValueError(f"a {height}x{width} image: VNL's protocol pads landscape images (NYUDv2's 480x640) at "
                             "the top to a square")
        sides = vnl_crop_sides(self.crop_side, width)
        side = sides[int(rng.integers(len(sides)))] if self.train else width
        pad_top = max(side - height, 0)
        top = 0 if pad_top or not self.train else int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1)) if self.train else 0
        window = (slice(top, top + side), slice(left, left + side))
        image_t = F.pad(image_t, (0, 0, pad_top, 0), value=self.IMAGE_PAD)[(slice(None), *window)]
        size = (self.crop_side, self.crop_side)
        image_t = resize_image(image_t, size).round()
        restore = {"pad_top": pad_top, "side": side, "size": (height, width)}
        if not self.train:
            return normalize(image_t, self.normalization), depth_t, restore
        depth_t = F.pad(depth_t, (0, 0, pad_top, 0), value=0.0)[window]
        invalid = resize_image((depth_t <= 0).float()[None], size)[0] > 0
        target = torch.where(invalid, 0.0, resize_image(depth_t[None], size)[0] * (side / self.crop_side))
        if rng.random() < 0.5:
            image_t, target = image_t.flip(-1), target.flip(-1)
        return normalize(image_t, self.normalization), target.contiguous(), None


def vnl_restore(prediction: torch.Tensor, restore: dict) -> torch.Tensor:
    """VNL's test-time inverse (tools/test_nyu_metric.py:60-63) of a (crop_side, crop_side) depth map: drop
    the rows of the top padding (``int(pad_top * r)``), multiply by r = crop_side / side (the code divides
    by ``ratio`` = 1 / r) and resize bilinearly to the original ``size``."""
    ratio = prediction.shape[-1] / restore["side"]
    kept = prediction[int(restore["pad_top"] * ratio):] * ratio
    return resize_image(kept[None], tuple(restore["size"]))[0]
