"""DetTask (kd_ref/tasks.py): detection data, COCO and VOC evaluation on exported trees, and a few
training iterations of each detector through train.py with resume."""
import contextlib
import io
import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
import torch.nn as nn
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import evaluate
import train
from kd_ref import datasets, engine, export, synthetic, tasks
from train_helpers import train_crashing_in_step
from kd_ref.presets import PRESETS
from kd_ref.recipe import Recipe
from kd_ref.runtime import Runtime, load_checkpoint

SIZE = (96, 128)    # exported images (H, W)
SCALE = (160, 100)  # keep-ratio resize to 100 x 133: the two axes scale differently (100/96, 133/128)
CPU = Runtime(torch.device("cpu"))
TINY_TRAIN = ["--task", "det", "--method", "none", "--set", "synthetic_size=(64, 64)", "--set", "image_scale=(64, 64)",
              "--set", "synthetic_train=4", "--set", "synthetic_val=2", "--batch-size", "2", "--quiet"]


def det_recipe(data, **fields):
    defaults = {"num_classes": 8, "image_scale": SCALE, "normalization": "imagenet_rgb", "synthetic_size": SIZE,
                "synthetic_val": 4}
    return Recipe(task="det", data=data, **{**defaults, **fields})


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    export.export("coco", str(root), num_train=2, num_val=4, size=SIZE)
    return root


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory):
    """An exported VOC tree whose shapes carry VOC class names, so the default 20-class loader reads it."""
    root = tmp_path_factory.mktemp("voc")
    export.export("voc", str(root), num_train=2, num_val=4, size=SIZE)
    voc_name = dict(zip(synthetic.SyntheticScenes.CLASSES[1:], datasets.VOC_CLASSES))
    for xml_file in (root / "VOCdevkit/VOC2007/Annotations").iterdir():
        tree = ET.parse(xml_file)
        for name in tree.getroot().iter("name"):
            name.text = voc_name[name.text]
        tree.write(xml_file)
    return root


class Replay(nn.Module):
    """Stands in for a detector in engine.evaluate: returns the given detections (input-image pixels),
    one image per call, in loader order."""

    def __init__(self, detections):
        super().__init__()
        self.detections = list(detections)

    def forward(self, images, targets=None, image_sizes=None, predict=True):
        return {"detections": [self.detections.pop(0) for _ in range(images.shape[0])]}


def score(task, recipe, dataset, collate, detections):
    """Run the task's evaluation protocol by hand: (state, metrics)."""
    state = task.new_eval_state(recipe)
    for index, found in enumerate(detections):
        task.update_eval_state(state, {"detections": [found]}, collate([dataset[index]]), None)
    return state, task.finish_eval_state(state, CPU)


def ground_truth_as_detections(dataset):
    return [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
            for t in (dataset[i]["target"] for i in range(len(dataset)))]


# ------------------------------------------------------------------------------------------------ COCO
def test_coco_evaluation_equals_pycocotools_on_the_written_results_file(coco_tree, tmp_path):
    recipe = det_recipe("coco")
    task = tasks.DetTask()
    val_set, collate = task.build_data(recipe, "val", str(coco_tree))
    rng = np.random.default_rng(0)
    fed = []
    for found in ground_truth_as_detections(val_set):
        boxes = found["boxes"] + torch.from_numpy(rng.normal(0, 2.0, found["boxes"].shape)).float()
        labels = found["labels"].clone()
        labels[::3] = (labels[::3] + 1) % 8  # a few wrong classes
        spurious = torch.tensor([[5.0, 5.0, 40.0, 30.0], [60.0, 20.0, 90.0, 80.0]])
        scores = torch.from_numpy(rng.random(len(boxes) + 2)).float()
        fed.append({"boxes": torch.cat([boxes, spurious]), "scores": scores,
                    "labels": torch.cat([labels, torch.tensor([0, 5])])})
    metrics = engine.evaluate(task, Replay(fed), val_set, collate, CPU, recipe, workers=0, quiet=True,
                              save_pred=str(tmp_path))

    coco_gt = COCO(str(coco_tree / "annotations/instances_val2017.json"))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "detections.json")), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    for index, name in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
        assert metrics[name] == pytest.approx(evaluator.stats[index] * 100, abs=1e-9), name
    assert metrics["mAP"] == metrics["AP"] and 5 < metrics["AP"] < metrics["AP50"] < 100

    # the results file holds original-image pixels [x, y, w, h] and the tree's own category ids
    first = [r for r in json.load(open(tmp_path / "detections.json")) if r["image_id"] == 1]
    target = val_set[0]["target"]
    (height, width), (new_h, new_w) = target["orig_size"], target["size"]
    x1, y1, x2, y2 = (fed[0]["boxes"][0].double() / torch.tensor([new_w / width, new_h / height] * 2)).tolist()
    assert first[0]["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert first[0]["category_id"] == 2 * int(fed[0]["labels"][0]) + 1


def test_coco_perfect_detections_score_100(coco_tree):
    recipe = det_recipe("coco")
    task = tasks.DetTask()
    val_set, collate = task.build_data(recipe, "val", str(coco_tree))
    _, metrics = score(task, recipe, val_set, collate, ground_truth_as_detections(val_set))
    assert metrics["mAP"] == pytest.approx(100.0) and metrics["AP75"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------ VOC / synthetic
def one_false_positive_after_the_first_hit(detections, dataset, cls):
    """Detections equal to the ground truth, except that class ``cls`` gets a false positive ranked
    between its first non-difficult hit and the others. Returns (detections, n non-difficult boxes of cls)."""
    hits = 0
    for found, target in zip(detections, (dataset[i]["target"] for i in range(len(dataset)))):
        mine = (target["labels"] == cls) & ~target["difficult"]
        for index in torch.nonzero(mine).flatten():
            found["scores"][index] = 3.0 if hits == 0 else 1.0
            hits += 1
    far_away = {"boxes": torch.tensor([[-50.0, -50.0, -40.0, -40.0]]), "scores": torch.tensor([2.0]),
                "labels": torch.tensor([cls])}
    detections[0] = {key: torch.cat([detections[0][key], far_away[key]]) for key in far_away}
    return detections, hits


def busiest_class(dataset):
    counts = np.zeros(8, int)
    for i in range(len(dataset)):
        target = dataset[i]["target"]
        np.add.at(counts, target["labels"][~target["difficult"]].numpy(), 1)
    return int(np.argmax(counts)), counts


def test_voc_map_on_an_exported_tree_uses_11_points_and_original_pixels(voc_tree):
    recipe = det_recipe("voc", num_classes=20)
    task = tasks.DetTask()
    val_set, collate = task.build_data(recipe, "val", str(voc_tree))
    state, metrics = score(task, recipe, val_set, collate, ground_truth_as_detections(val_set))
    cls, counts = busiest_class(val_set)
    present = [k for k in range(20) if k < 8 and counts[k] > 0]
    assert metrics["mAP"] == pytest.approx(100.0)
    assert [k for k, ap in enumerate(metrics["AP"]) if not math.isnan(ap)] == present
    originals = datasets.VOCDetection(str(voc_tree), ("2007/test",))
    for index, record in enumerate(state["records"]):
        np.testing.assert_allclose(record["ground_truth"]["boxes"], originals[index]["boxes"], atol=1e-3)

    detections, n = one_false_positive_after_the_first_hit(ground_truth_as_detections(val_set), val_set, cls)
    _, metrics = score(task, recipe, val_set, collate, detections)
    # 11-point AP: precision 1 up to recall 1/n, then n/(n+1) (the false positive costs one rank)
    points = np.arange(0.0, 1.1, 0.1)
    expected = ((points <= 1 / n).sum() + (points > 1 / n).sum() * n / (n + 1)) / 11 * 100
    assert metrics["AP"][cls] == pytest.approx(expected)
    assert metrics["mAP"] == pytest.approx((100 * (len(present) - 1) + expected) / len(present))


def test_synthetic_map_uses_the_area_under_the_curve():
    recipe = det_recipe("synthetic")
    task = tasks.DetTask()
    val_set, collate = task.build_data(recipe, "val", None)
    cls, counts = busiest_class(val_set)
    detections, n = one_false_positive_after_the_first_hit(ground_truth_as_detections(val_set), val_set, cls)
    _, metrics = score(task, recipe, val_set, collate, detections)
    assert n >= 2 and metrics["AP"][cls] == pytest.approx((1 / n + (n - 1) / (n + 1)) * 100)


# -------------------------------------------------------------------------------------- recipe checks
def test_recipe_errors_list_what_is_supported(coco_tree):
    task = tasks.TASKS["det"]
    with pytest.raises(ValueError, match="--student yolo_r18: --task det supports retinanet_r18, .*faster_rcnn_r101"):
        task.check_recipe(det_recipe("synthetic", student="yolo_r18"))
    with pytest.raises(ValueError, match=r"--data cityscapes: --task det supports \['synthetic', 'voc', 'coco'\]"):
        task.check_recipe(det_recipe("cityscapes"))
    with pytest.raises(ValueError, match="num_classes 80 does not match the 8 classes .*--set num_classes=8"):
        task.build_data(det_recipe("coco", num_classes=80), "val", str(coco_tree))
    name, recipe = train.build_recipe(train.parse_args(["--task", "det", "--method", "none"]))
    assert name == "synthetic_det_retinanet_none" and recipe.task == "det" and recipe.student == "retinanet_r18"


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("student", ["retinanet_r18", "faster_rcnn_r18"])
def test_each_detector_trains_and_resumes_exactly(tmp_path, monkeypatch, student):
    flags = [*TINY_TRAIN, "--student", student, "--iters", "3", "--ckpt-every", "1"]
    metrics = train.main([*flags, "--out", str(tmp_path / "straight")])
    assert set(metrics) == {"mAP", "AP"} and len(metrics["AP"]) == PRESETS["synthetic_det_retinanet_none"].num_classes
    steps = [json.loads(line) for line in (tmp_path / "straight/log.jsonl").read_text().splitlines()]
    losses = [key for key in steps[0] if key.startswith("loss_")]
    assert {"loss_cls", "loss_bbox"} <= set(losses) and all(np.isfinite(s[k]) for s in steps[:3] for k in losses)

    train_crashing_in_step(monkeypatch, 2, [*flags, "--out", str(tmp_path / "resumed")])
    assert load_checkpoint(str(tmp_path / "resumed/last.pt"))["iteration"] == 2
    train.main([*flags, "--out", str(tmp_path / "resumed"), "--resume"])
    straight = load_checkpoint(str(tmp_path / "straight/last.pt"))
    resumed = load_checkpoint(str(tmp_path / "resumed/last.pt"))
    assert resumed["iteration"] == 3
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])


def test_coco_tree_trains_and_evaluates_through_the_clis(coco_tree, tmp_path):
    run = tmp_path / "run"
    train.main(["--task", "det", "--data", "coco", "--data-root", str(coco_tree), "--set", "num_classes=8",
                "--set", "image_scale=(64, 64)", "--set", "epochs=1", "--batch-size", "2", "--pretrained", "none",
                "--out", str(run), "--quiet"])  # one epoch of the 2-image set: 1 iteration
    scores = evaluate.main(["--ckpt", str(run / "last.pt"), "--data-root", str(coco_tree), "--save-pred",
                            str(tmp_path / "pred"), "--quiet"])
    assert set(scores) == {"mAP", "AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (tmp_path / "pred/detections.json").is_file()


def test_aspect_groups_come_from_the_annotations(voc_tree, coco_tree):
    coco, _ = tasks.TASKS["det"].build_data(det_recipe("coco"), "train", str(coco_tree))
    voc = datasets.DetectionSet(datasets.VOCDetection(str(voc_tree), image_sets=("2007/test",)), transform=None)
    for train_set in (coco, voc):
        assert list(train_set.aspect_groups()) == [1] * len(train_set)  # 128 wide, 96 high: w / h > 1
    # an annotation without <size>: the image is read, as mmdet's XMLDataset does
    voc.base.records[0]["size"] = None
    assert voc.base.image_sizes()[0] == SIZE
    synthetic, _ = tasks.TASKS["det"].build_data(det_recipe("synthetic", synthetic_train=3, synthetic_size=(64, 64)),
                                                   "train", None)
    assert list(synthetic.aspect_groups()) == [0, 0, 0]                 # square scenes: w / h = 1


def test_box_targets_are_the_samples_boxes_read_without_decoding_an_image(voc_tree, coco_tree, monkeypatch):
    bases = [datasets.VOCDetection(str(voc_tree), image_sets=("2007/test",)), datasets.COCODetection(str(coco_tree)),
             tasks.TASKS["det"].build_data(det_recipe("synthetic", synthetic_train=2, synthetic_size=(64, 64)),
                                           "train", None)[0].base,
             synthetic.ProbeScenes((32, 48), num_objects=3, num_classes=2, length=2, with_masks=False)]
    samples = [[base[index] for index in range(len(base))] for base in bases]
    monkeypatch.setattr(datasets, "read_image", lambda path: pytest.fail(f"decoded {path}"))
    for base, expected in zip(bases, samples):
        for index, sample in enumerate(expected):
            targets = base.box_targets(index)
            for key in ("boxes", "labels", "difficult"):
                np.testing.assert_array_equal(targets[key], sample[key], err_msg=f"{type(base).__name__} {key}")


def test_group_by_aspect_pads_the_epoch_and_resumes_exactly_mid_epoch(tmp_path, monkeypatch):
    flags = [*TINY_TRAIN, "--set", "synthetic_train=5", "--set", "group_by_aspect=True", "--iters", "4",
             "--ckpt-every", "1"]
    train.main([*flags, "--out", str(tmp_path / "straight")])
    steps = [json.loads(line) for line in (tmp_path / "straight/log.jsonl").read_text().splitlines()]
    # 5 images at batch 2: ceil(5 / 2) = 3 iterations per epoch (plain shuffling: 2)
    assert [s["epoch"] for s in steps if "epoch" in s] == [0, 0, 0, 1]
    train_crashing_in_step(monkeypatch, 2, [*flags, "--out", str(tmp_path / "resumed")])
    train.main([*flags, "--out", str(tmp_path / "resumed"), "--resume"])
    straight = load_checkpoint(str(tmp_path / "straight/last.pt"))
    resumed = load_checkpoint(str(tmp_path / "resumed/last.pt"))
    assert resumed["iteration"] == 4
    assert all(torch.equal(straight["model"][k], resumed["model"][k]) for k in straight["model"])
