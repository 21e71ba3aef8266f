"""Exporter: writes :class:`kd_ref.synthetic.SyntheticScenes` in the on-disk layout of a real data set, so that
the real-data loaders of :mod:`kd_ref.datasets`, the presets and ``train.py`` run end to end on a small tree
without a download, and prints the ``train.py`` command that trains on it.

Formats (``EXPORTERS``): ``cityscapes`` (labelIds PNGs), ``voc`` (the 07+12 layout), ``coco`` (instances with
RLE masks), ``cifar100`` (the Python 2 pickles), ``imagefolder`` (ImageNet-style folders) and ``nyu``
(RGB and uint16 millimetre depth PNGs).

CLI: ``python -m kd_ref.export --format cityscapes|voc|coco|cifar100|imagefolder|nyu [--style easy] DIR``.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import sys

import numpy as np
from PIL import Image

from kd_ref.datasets import CITYSCAPES_LABEL_IDS
from kd_ref.presets import PRESETS, default_preset
from kd_ref.synthetic import SyntheticDepthScenes, SyntheticInstances, SyntheticScenes


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


EXPORTERS = {"cityscapes": _export_cityscapes, "voc": _export_voc, "coco": _export_coco,
             "cifar100": _export_cifar100, "imagefolder": _export_imagefolder, "nyu": _export_nyu}


def export(format: str, out: str, num_train: int = 20, num_val: int = 10, size: tuple = (128, 128),
           seed: int = 0, style: str = "standard") -> str:
    """Write SyntheticScenes (splits ``train`` and ``val``) to ``out`` in a real data set's layout:
    cityscapes (labelIds PNGs), voc (VOC2007 + VOC2012 ``trainval`` = synthetic train, VOC2007 ``test`` = val),
    coco (``train2017``/``val2017``; the instances of :class:`SyntheticInstances`), cifar100 (32x32 pickles of
    ``image_label``), imagefolder or nyu (the depth mode, :class:`SyntheticDepthScenes`).
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
    preset = PRESETS[default_preset(flags[1], "none", flags[3])]
    length = [] if preset.epochs else ["--iters", "100"]
    words = ["python", "train.py", *flags, "--data-root", root, "--batch-size", str(batch), *length,
             "--pretrained", "none"]
    return " ".join(shlex.quote(word) for word in words)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kd_ref.export",
        description="Write the built-in synthetic scenes in a real data set's on-disk layout, then print the "
                    "train.py command that trains on the written tree.")
    parser.add_argument("--format", required=True, choices=sorted(EXPORTERS), help="the layout to write (required)")
    parser.add_argument("out", metavar="DIR", help="folder to write the tree into")
    parser.add_argument("--num-train", type=int, default=20, help="training scenes (default: 20)")
    parser.add_argument("--num-val", type=int, default=10, help="validation scenes (default: 10)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=(128, 128),
                        help="scene size in pixels (default: 128 128)")
    parser.add_argument("--seed", type=int, default=0, help="scene seed (default: 0)")
    parser.add_argument("--style", default="standard", choices=sorted(SyntheticScenes.STYLES),
                        help="scene style, see SyntheticScenes (default: standard)")
    args = parser.parse_args(argv)
    try:
        command = export(args.format, args.out, args.num_train, args.num_val, tuple(args.size), args.seed, args.style)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(f"wrote {args.num_train} train + {args.num_val} val synthetic scenes as {args.format} to {args.out}; "
          f"train on them with:\n{command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
