"""Our evaluation next to the official evaluators on the same files: images/s and identical results.

    python -m kd_ref.bench_evaluation [--seg-root DIR] [--coco-root DIR] [--rounds N]

Scores the same files with kd_ref's evaluation and with the official evaluators, interleaved round by
round on one thread (:func:`evaluation_rates`): mIoU of Cityscapes label PNGs by our path
(``evaluate.py --task seg``) and by cityscapesscripts (when installed; it is no dependency), COCO box AP
of made-up detections by DetTask's evaluation and by pycocotools' ``loadRes`` + ``COCOeval`` alone on the
results file that evaluation writes. Without either root it runs on exported trees of the real
resolution: 8 Cityscapes val images at 1024x2048 and 100 COCO val images at 480x640.

Reading the output: per metric a Markdown table of images/s for ours and the official evaluator and our
rate divided by theirs (the figure to compare between machines), then ``identical results: yes`` when
both give the same confusion matrix and mIoU, or the same COCO AP ... APl (``NO`` otherwise).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import math
import os
import statistics
import tempfile
from types import SimpleNamespace

import numpy as np
import torch

from kd_ref import datasets, export, tasks, transforms
from kd_ref.bench_common import TimedCase, measure, one_thread, print_table
from kd_ref.metrics import COCO_STAT_NAMES, confusion_matrix, segmentation_scores
from kd_ref.runtime import Runtime


def _cityscapes_pairs(root: str, images: int, out: str) -> list:
    """``(prediction file, ground-truth file, prediction)`` of the first ``images`` labels of ``root``'s val split.

    The prediction is the ground truth's train ids shifted 8 pixels to the right (ignored pixels become road):
    mostly right, with errors along every edge. It is kept in memory as train ids, as a model's argmax is, and
    written as labelIds in ``out``, the format the official evaluator reads."""
    from PIL import Image

    labels = sorted(glob.glob(os.path.join(root, "gtFine", "val", "*", "*_gtFine_labelIds.png")))[:images]
    if not labels:
        raise FileNotFoundError(f"Cityscapes root {root}: no gtFine/val/<city>/*_gtFine_labelIds.png "
                                "(python -m kd_ref.export --format cityscapes --size 1024 2048 DIR)")
    train_to_label_id = np.array(datasets.CITYSCAPES_LABEL_IDS, np.uint8)
    pairs = []
    for label in labels:
        shifted = np.roll(datasets.read_cityscapes_train_ids(label), 8, axis=1)
        shifted[shifted == transforms.IGNORE_INDEX] = 0
        prediction = os.path.join(out, os.path.basename(label).replace("_gtFine_labelIds", "_pred_labelIds"))
        Image.fromarray(train_to_label_id[shifted]).save(prediction)
        pairs.append((prediction, label, torch.from_numpy(shifted)))
    return pairs


def kd_ref_cityscapes_scores(pairs: list) -> tuple:
    """``(confusion matrix, scores)`` by the path of ``evaluate.py --task seg``: the ground truth read as the
    Cityscapes loader reads it (``datasets.read_cityscapes_train_ids``), ``confusion_matrix`` against the
    prediction's train ids, ``segmentation_scores``."""
    num_classes = len(datasets.CITYSCAPES_CLASSES)
    counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for _, label, prediction in pairs:
        target = torch.from_numpy(datasets.read_cityscapes_train_ids(label))
        counts += confusion_matrix(prediction, target, num_classes, transforms.IGNORE_INDEX)
    return counts, segmentation_scores(counts)


def official_cityscapes_scores(pairs: list):
    """``(confusion matrix over the 19 classes, mIoU in percent)`` by cityscapesscripts'
    ``evaluateImgLists`` (pixel level only, quiet, no result file), or None when it is not installed."""
    try:
        from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official
    except ImportError:
        return None
    official.args.quiet, official.args.JSONOutput, official.args.evalInstLevelScore = True, False, False
    result = official.evaluateImgLists([p for p, _, _ in pairs], [g for _, g, _ in pairs], official.args)
    ids = list(datasets.CITYSCAPES_LABEL_IDS)
    return torch.tensor(result["confMatrix"], dtype=torch.int64)[ids][:, ids], result["averageScoreClasses"] * 100


def coco_detections(base, image_ids: list, per_image: int, seed: int = 0) -> tuple:
    """Detector-like outputs on the inputs DetTask evaluates: for every image, ``per_image`` boxes (its ground
    truth boxes jittered, the rest random) with random scores and labels, on the image resized to
    1333x800 (mmdet's COCO scale), and the matching targets."""
    generator = torch.Generator().manual_seed(seed)
    outputs, targets = [], []
    for image_id in image_ids:
        info = base.coco.imgs[image_id]
        height, width = info["height"], info["width"]
        scale = min(1333 / max(height, width), 800 / min(height, width))
        size = (round(height * scale), round(width * scale))
        truth = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in
                              (a["bbox"] for a in base.coco.imgToAnns[image_id])], dtype=torch.float32)
        truth = truth.reshape(-1, 4)[torch.randint(max(len(truth), 1), (per_image,), generator=generator)
                                     % max(len(truth), 1)] if len(truth) else torch.zeros(0, 4)
        corners = torch.rand(per_image, 2, generator=generator) * torch.tensor([width, height]) * 0.8
        sides = torch.rand(per_image, 2, generator=generator) * torch.tensor([width, height]) * 0.2 + 4
        boxes = torch.cat([corners, corners + sides], 1)
        boxes[:len(truth)] = truth + torch.randn(len(truth), 4, generator=generator) * 3
        outputs.append({"boxes": boxes * scale, "scores": torch.rand(per_image, generator=generator),
                        "labels": torch.randint(len(base.category_ids), (per_image,), generator=generator)})
        targets.append({"image_id": image_id, "flipped": False, "size": size, "orig_size": (height, width)})
    return outputs, targets


def kd_ref_coco_scores(base, outputs: list, targets: list, save_pred: str | None = None) -> dict:
    """COCO box AP of detector outputs by kd_ref's evaluation path: ``DetTask``'s eval state (boxes to original
    pixels, results, pycocotools ``COCOeval``); ``save_pred=DIR`` also writes the results file."""
    task = tasks.DetTask()
    task.eval_base = base
    state = task.new_eval_state(SimpleNamespace(data="coco", num_classes=len(base.category_ids)))
    for found, target in zip(outputs, targets):
        task.update_eval_state(state, {"detections": [found]}, {"targets": [target]}, save_pred)
    return task.finish_eval_state(state, Runtime(torch.device("cpu")))


def official_coco_stats(coco_gt, results: list) -> list:
    """AP ... APl in percent of COCO results by pycocotools alone: ``loadRes``, ``COCOeval`` evaluate,
    accumulate, summarize."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(value) * 100 for value in evaluator.stats[:len(COCO_STAT_NAMES)]]


@one_thread()  # as the official evaluators run
def evaluation_rates(seg_root: str | None = None, coco_root: str | None = None, images: int = 8,
                     coco_images: int = 100, detections_per_image: int = 100, warmup: int = 1,
                     rounds: int = 3) -> dict:
    """Images/s of kd_ref's evaluation next to the official evaluators' on the same files, interleaved round
    by round (:func:`measure`, median of ``rounds``), with a check that both give the same results.

    * mIoU (``seg_root``, a Cityscapes-layout tree): ``images`` ground-truth labels of the val split and
      predictions made from them (:func:`_cityscapes_pairs`), scored by :func:`kd_ref_cityscapes_scores` and
      by cityscapesscripts (skipped with one line when it is not installed; it is no dependency).
    * COCO box AP (``coco_root``, a COCO-layout tree): ``detections_per_image`` detections on each of
      ``coco_images`` val2017 images (:func:`coco_detections`), through DetTask's evaluation and through
      pycocotools alone on the results that evaluation writes.

    Returns ``{case: images/s}`` plus ``"seg identical"`` / ``"coco identical"`` (booleans)."""
    cpu = torch.device("cpu")
    rates = {}
    if seg_root is not None:
        with tempfile.TemporaryDirectory() as predictions:
            pairs = _cityscapes_pairs(seg_root, images, predictions)
            cases = [TimedCase("kd_ref mIoU", lambda: kd_ref_cityscapes_scores(pairs))]
            official = official_cityscapes_scores(pairs)
            if official is None:
                print("cityscapesscripts is not installed: the official mIoU evaluator is skipped "
                      "(pip install cityscapesscripts to compare with it)")
            else:
                cases.append(TimedCase("cityscapesscripts", lambda: official_cityscapes_scores(pairs)))
                counts, scores = kd_ref_cityscapes_scores(pairs)
                rates["seg identical"] = bool(torch.equal(counts, official[0])) and math.isclose(
                    scores["mIoU"], official[1], rel_tol=1e-12)
            for name, measured in measure(cases, warmup, rounds, cpu).items():
                rates[name] = len(pairs) / statistics.median(measured.seconds)
        _print_rates(f"mIoU evaluation of {len(pairs)} PNG pairs from {seg_root}, one thread", rates,
                     "kd_ref mIoU", "cityscapesscripts", rates.get("seg identical"))
    if coco_root is not None:
        base = datasets.COCODetection(coco_root, "val2017")
        outputs, targets = coco_detections(base, base.image_ids[:coco_images], detections_per_image)
        with tempfile.TemporaryDirectory() as written:
            ours = kd_ref_coco_scores(base, outputs, targets, save_pred=written)
            with open(os.path.join(written, "detections.json")) as handle:
                results = json.load(handle)
        rates["coco identical"] = [ours[name] for name in COCO_STAT_NAMES] == official_coco_stats(base.coco, results)
        cases = [TimedCase("kd_ref COCO AP", lambda: kd_ref_coco_scores(base, outputs, targets)),
                 TimedCase("pycocotools COCOeval", lambda: official_coco_stats(base.coco, results))]
        for name, measured in measure(cases, warmup, rounds, cpu).items():
            rates[name] = len(targets) / statistics.median(measured.seconds)
        _print_rates(f"COCO box AP of {len(targets)} images x {detections_per_image} detections from {coco_root}, "
                     "one thread", rates, "kd_ref COCO AP", "pycocotools COCOeval", rates["coco identical"])
    return rates


def evaluation(seg_root: str | None, coco_root: str | None, rounds: int = 3) -> dict:
    """The command: :func:`evaluation_rates` on the given trees; without either root, on an
    exported Cityscapes tree of 8 val images at 1024x2048 and a COCO tree of 100 val images at 480x640."""
    if seg_root is not None or coco_root is not None:
        return evaluation_rates(seg_root, coco_root, rounds=rounds)
    with tempfile.TemporaryDirectory(prefix="kd_ref_bench_evaluation_") as scratch:
        seg_root, coco_root = os.path.join(scratch, "cityscapes"), os.path.join(scratch, "coco")
        export.export("cityscapes", seg_root, num_train=1, num_val=8, size=(1024, 2048))
        export.export("coco", coco_root, num_train=1, num_val=100, size=(480, 640))
        return evaluation_rates(seg_root, coco_root, rounds=rounds)


def _print_rates(title: str, rates: dict, ours: str, official: str, identical) -> None:
    rows = [[ours, f"{rates[ours]:.1f}", f"{rates[ours] / rates[official]:.2f}" if official in rates else "-"]]
    if official in rates:
        rows.append([official, f"{rates[official]:.1f}", "1.00"])
    print_table(title, ["evaluator", "images/s", f"rate / {official}'s"], rows)
    if identical is not None:
        print(f"identical results: {'yes' if identical else 'NO'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_ref.bench_evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seg-root", default=None, help="a Cityscapes tree (its val split)")
    parser.add_argument("--coco-root", default=None, help="a COCO tree (its val2017 split)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        evaluation(args.seg_root, args.coco_root, args.rounds)
    except (ValueError, OSError) as err:  # a tree that is missing or not of its layout
        parser.error(str(err))


if __name__ == "__main__":
    main()
