"""Images/s of the input pipelines per worker thread, next to decoding alone and a plain PIL pipeline.

    python -m kd_ref.bench_data [--task seg|det|cls] [--root DIR] [--rounds N] [--num-images N]
                                [--gpu-images-per-second N]

For each task's real-data recipe (seg: the Cityscapes default preset, det: the COCO one, cls: ImageNet),
on the same files: our training sample (decode + augmentation, as the task builds it, then the collate:
what a DataLoader worker runs, and what a GPU waits for), our evaluation sample (decode + evaluation
transform + collate), decode alone (image, and label for seg), and a plain PIL / torchvision.transforms
pipeline doing the same augmentation. Every task hands unfinished batches to the device (uint8 pixels;
seg: unflipped, unnormalised crop windows and uint8 labels), where the data set's ``prepare_batch``
finishes them (kd_ref.datasets); its cost on the CPU, where it runs in the training process, is timed
per image in the same rounds (the "device step" rows, on batches of one collated beforehand). The
pipelines run round-robin on one torch thread, one pass over the files each per round, so machine load
affects all alike (:func:`data_rates`). Without ``--root`` it exports a small tree of the real resolution
into a temporary folder (Cityscapes 1024x2048 PNGs, COCO-size 480x640 JPEGs, ImageNet-size 375x500 JPEGs).

Reading the output: per task a Markdown table of images/s per pipeline and its ratio to decode alone
(``/ decode``); the ratio training / decode is the figure to compare between machines, and ours next to
the plain reference says what our pipeline costs beyond a textbook one. The last line turns the training
rate into the DataLoader workers one GPU needs at ``--gpu-images-per-second``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms as tv
from PIL import Image

from kd_ref import datasets, export, transforms
from kd_ref.bench_common import one_thread, print_table
from kd_ref.presets import PRESETS, default_preset
from kd_ref.tasks import TASKS


DATA_TREES = {  # task: (export format, data, the real resolution (H, W) of its images)
    "seg": ("cityscapes", "cityscapes", (1024, 2048)),
    "det": ("coco", "coco", (480, 640)),
    "cls": ("imagefolder", "imagenet", (375, 500)),
}


def _pil_rgb(path: str):
    with Image.open(path) as image:
        return image.convert("RGB")


def _plain_normalise(array, normalization: str):
    """numpy (H, W, 3) uint8 -> float32 (3, H, W) normalised, as a plain pipeline writes it."""
    spec = transforms.NORMALIZATIONS[normalization]
    array = array[..., ::-1] if spec["bgr"] else array
    return ((array.astype(np.float32) - np.float32(spec["mean"][::-1] if spec["bgr"] else spec["mean"]))
            / np.float32(spec["std"])).transpose(2, 0, 1)


def _plain_seg(recipe, image_path: str, label_path: str, rng) -> tuple:
    """Decode with PIL, resize the whole image and label, crop, flip, normalise (numpy)."""
    image, label = _pil_rgb(image_path), Image.open(label_path)
    scale = transforms.draw_scale(rng, recipe.scales, recipe.scale_step)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = np.asarray(image.resize(size, Image.Resampling.BILINEAR))
    label = datasets.LABEL_ID_TO_TRAIN_ID[np.asarray(label.resize(size, Image.Resampling.NEAREST))]
    top = int(rng.integers(max(size[1] - recipe.crop[0], 0) + 1))
    left = int(rng.integers(max(size[0] - recipe.crop[1], 0) + 1))
    window = (slice(top, top + recipe.crop[0]), slice(left, left + recipe.crop[1]))
    image, label = image[window], label[window]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return _plain_normalise(image, recipe.normalization), label.astype(np.int64)


def _plain_det(recipe, image_path: str, rng):
    """Decode with PIL, keep-ratio resize (PIL bilinear), flip, normalise (numpy)."""
    image = _pil_rgb(image_path)
    (height, width), _ = transforms.rescale_size(image.height, image.width, recipe.image_scale)
    image = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return _plain_normalise(image[:, ::-1] if rng.random() < 0.5 else image, recipe.normalization)


def _data_pipelines(task: str, root: str) -> tuple:
    """(recipe, the files' count, {pipeline name: callable(index, rng)}) of ``task`` on the tree at ``root``."""
    export_format, data, _ = DATA_TREES[task]
    recipe = PRESETS[default_preset(task, "none", data)]
    if task == "det":
        recipe = dataclasses.replace(recipe, num_classes=len(datasets.COCODetection(root, "train2017").classes))
    if task == "cls":
        recipe = dataclasses.replace(recipe, num_classes=len(datasets.ImageFolder(root, "train").classes))
    task_object = TASKS[task]
    train_set, _ = task_object.build_data(recipe, "train", root)
    base = train_set.base
    if task == "seg":
        files = [(image, label) for image, label, _ in base.items]
        eval_set = datasets.SegmentationSet(base, transforms.SegEvalTransform(recipe.normalization))
        decode = lambda i, rng: (datasets.read_image(files[i][0]), datasets.read_label(files[i][1]))
        plain = lambda i, rng: _plain_seg(recipe, *files[i], rng)
    elif task == "det":
        files = [os.path.join(base.image_dir, base.coco.imgs[image_id]["file_name"]) for image_id in base.image_ids]
        eval_set = datasets.DetectionSet(base, transforms.DetTransform(recipe.image_scale, 0.0, recipe.normalization),
                                         train=False)
        decode = lambda i, rng: datasets.read_image(files[i])
        plain = lambda i, rng: _plain_det(recipe, files[i], rng)
    else:
        files = [path for path, _ in base.items]
        eval_set = datasets.ClassificationSet(base, task_object._transform(recipe, train=False))
        spec = transforms.NORMALIZATIONS[recipe.normalization]
        reference = tv.Compose([tv.RandomResizedCrop(recipe.crop[0]), tv.RandomHorizontalFlip(), tv.PILToTensor(),
                                tv.ConvertImageDtype(torch.float32),
                                tv.Normalize([m / 255 for m in spec["mean"]], [s / 255 for s in spec["std"]])])
        decode = lambda i, rng: datasets.read_image(files[i])
        plain = lambda i, rng: reference(_pil_rgb(files[i]))
    training = lambda i, rng: train_set.collate([train_set.get(i, rng)])
    evaluation = lambda i, rng: eval_set.collate([eval_set[i]])
    pipelines = {"training (ours)": training, "evaluation (ours)": evaluation, "decode alone": decode,
                 "plain reference": plain}
    collated = {name: [pipeline(i, np.random.default_rng(i)) for i in range(len(files))]
                for name, pipeline in (("training", training), ("evaluation", evaluation))}
    pipelines["training device step, CPU"] = lambda i, rng: train_set.prepare_batch(collated["training"][i])
    pipelines["evaluation device step, CPU"] = lambda i, rng: eval_set.prepare_batch(collated["evaluation"][i])
    return recipe, len(files), pipelines


def data_rates(pipelines: dict, count: int, rounds: int) -> dict:
    """Images/s of every pipeline, one pass over ``count`` files per pipeline and round, round-robin. Each
    pass starts with an untimed call, so that it runs warm as a worker's loop does rather than in the caches
    the previous pipeline left (the device steps move tens of MB)."""
    seconds = dict.fromkeys(pipelines, 0.0)
    for round_index in range(rounds):
        for name, pipeline in pipelines.items():
            pipeline(count - 1, np.random.default_rng([round_index, count]))
            started = time.perf_counter()
            for index in range(count):
                pipeline(index, np.random.default_rng([round_index, index]))
            seconds[name] += time.perf_counter() - started
    return {name: rounds * count / total for name, total in seconds.items()}


@one_thread()  # rates per worker thread: a DataLoader worker runs one
def data(tasks: list, root: str | None = None, rounds: int = 3, gpu_images_per_second: float = 200.0,
         num_images: int = 4) -> dict:
    """Print the table of every task (module docstring); returns ``{task: {pipeline: images/s}}``."""
    results = {}
    for task in tasks:
        export_format, _, size = DATA_TREES[task]
        with tempfile.TemporaryDirectory(prefix=f"kd_ref_bench_data_{task}_") as scratch:
            tree = root
            if tree is None:
                tree = scratch
                export.export(export_format, tree, num_train=num_images, num_val=1, size=size)
            _, count, pipelines = _data_pipelines(task, tree)
            rates = data_rates(pipelines, count, rounds)
        results[task] = rates
        where = root or f"an exported {export_format} tree of {count} {size[0]}x{size[1]} images"
        print_table(f"{task}: images/s per worker thread, {rounds} interleaved rounds over {where}",
                    ["pipeline", "images/s", "/ decode"],
                    [[name, f"{rate:.1f}", f"{rate / rates['decode alone']:.2f}x"] for name, rate in rates.items()])
        workers = math.ceil(gpu_images_per_second / rates["training (ours)"])
        print(f"  a GPU consuming {gpu_images_per_second:g} images/s needs {workers} DataLoader workers "
              f"of this speed (num_workers={workers}; prefetch_factor=2, two batches queued per worker, "
              "covers a slow sample)")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_ref.bench_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(DATA_TREES), default=None, help="default: all three")
    parser.add_argument("--root", default=None, help="a tree of the task's real data set (default: export "
                                                     "a small one of the real resolution into a temp folder)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-images", type=int, default=4, help="images of an exported tree")
    parser.add_argument("--gpu-images-per-second", type=float, default=200.0,
                        help="what one GPU consumes, for the implied loader settings (default: 200)")
    args = parser.parse_args(argv)
    if args.root is not None and args.task is None:
        parser.error("--root: name the tree's task with --task seg|det|cls")
    try:
        data([args.task] if args.task else list(DATA_TREES), args.root, args.rounds, args.gpu_images_per_second,
             args.num_images)
    except (ValueError, OSError) as err:  # a tree that is missing or not of the task's layout
        parser.error(str(err))


if __name__ == "__main__":
    main()
