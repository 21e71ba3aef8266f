import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import SIZE, exported, scenes  # noqa: F401 (exported: a fixture)
from kd_ref import datasets as D
from kd_ref import export, synthetic
from kd_ref import transforms as T
from kd_ref.presets import PRESETS, default_preset


# ----------------------------------------------------------------------------------------- loaders
def test_cityscapes_label_id_table():
    table = D.LABEL_ID_TO_TRAIN_ID
    assert table[7] == 0 and table[26] == 13 and table[33] == 18 and table[24] == 11
    assert all(table[i] == 255 for i in (0, 1, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255))
    assert (table != 255).sum() == 19


def test_coco_crowd_boxes_are_ignored_in_training(exported, tmp_path):
    tree = tmp_path / "coco"
    (tree / "annotations").mkdir(parents=True)
    os.symlink(exported / "coco/train2017", tree / "train2017")
    content = json.loads((exported / "coco/annotations/instances_train2017.json").read_text())
    first_image = content["images"][0]["id"]
    for annotation in content["annotations"]:
        annotation["iscrowd"] = int(annotation["image_id"] == first_image)
    content["annotations"].append({**content["annotations"][-1], "id": 999, "bbox": [0, 0, 0.5, 4]})  # w < 1
    (tree / "annotations/instances_train2017.json").write_text(json.dumps(content))
    loaded = D.COCODetection(str(tree), "train2017")
    assert loaded[0]["difficult"].all() and not loaded[1]["difficult"].any()
    last_instances = synthetic.SyntheticInstances(scenes(length=4))[3]
    assert len(loaded[len(loaded) - 1]["labels"]) == len(last_instances["labels"])  # w < 1 skipped
    filtered = D.COCODetection(str(tree), "train2017", filter_empty=True)  # targets parsed once, of the kept images
    assert len(filtered) == len(loaded) - 1 and filtered.image_ids == loaded.image_ids[1:]
    assert all(np.array_equal(filtered[0][key], loaded[1][key]) for key in ("boxes", "labels", "difficult"))
    train_set = D.DetectionSet(loaded, T.DetTransform(SIZE[::-1], flip_prob=0.0), train=True)
    assert len(train_set[0]["target"]["boxes"]) == 0
    eval_set = D.DetectionSet(loaded, T.DetTransform(SIZE[::-1], flip_prob=0.0), train=False)
    assert eval_set[0]["target"]["difficult"].all()


# ---------------------------------------------------------------------------------- bad input
def test_cityscapes_errors_name_the_files(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such directory; expected leftImg8bit/train"):
        D.Cityscapes(str(tmp_path / "nowhere"), "train")
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="missing .*leftImg8bit/train; expected"):
        D.Cityscapes(str(tmp_path / "flat"), "train")
    empty = tmp_path / "empty"
    (empty / "leftImg8bit/train").mkdir(parents=True)
    (empty / "gtFine/train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no <city>/\\*_leftImg8bit.png under"):
        D.Cityscapes(str(empty), "train")

    tree = tmp_path / "tree"
    image_dir, label_dir = tree / "leftImg8bit/val/city", tree / "gtFine/val/city"
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(image_dir / "a_leftImg8bit.png")
    with pytest.raises(FileNotFoundError, match="a_leftImg8bit.png has no label file .*a_gtFine_labelIds.png"):
        D.Cityscapes(str(tree), "val")
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(label_dir / "a_gtFine_labelIds.png")
    with pytest.raises(ValueError, match="a_gtFine_labelIds.png is 12x8 but its image .*a_leftImg8bit.png is 10x8"):
        D.Cityscapes(str(tree), "val")[0]
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(label_dir / "a_gtFine_labelIds.png")
    with pytest.raises(ValueError, match="a_gtFine_labelIds.png: expected a single-channel 8-bit PNG, got mode RGB"):
        D.Cityscapes(str(tree), "val")[0]
    (image_dir / "a_leftImg8bit.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*a_leftImg8bit.png"):
        D.Cityscapes(str(tree), "val")[0]


def test_detection_and_classification_loader_errors(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match="VOC image set '2010/trainval': missing .*VOC2010"):
        D.VOCDetection(str(exported / "voc"), ("2007/trainval", "2010/trainval"), classes=synthetic.SyntheticScenes.CLASSES[1:])
    broken = tmp_path / "VOCdevkit/VOC2007"
    (broken / "ImageSets/Main").mkdir(parents=True)
    (broken / "Annotations").mkdir()
    (broken / "ImageSets/Main/test.txt").write_text("x\n")
    (broken / "Annotations/x.xml").write_text("<annotation><object><name>cat</name></object></annotation>")
    with pytest.raises(ValueError, match="x.xml is malformed"):
        D.VOCDetection(str(tmp_path), ("2007/test",))
    with pytest.raises(FileNotFoundError, match="instances_val2017.json; expected annotations/"):
        D.COCODetection(str(tmp_path), "val2017")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        D.CIFAR100(str(tmp_path), "train")
    (tmp_path / "train").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is not a python pickle batch"):
        D.CIFAR100(str(tmp_path), "train")
    with pytest.raises(FileNotFoundError, match="expected train/<class>"):
        D.ImageFolder(str(tmp_path / "none"), "train")


def test_build_dataset_rejects_unknown_combinations():
    with pytest.raises(ValueError, match="'seg'/'coco'; supported: seg: synthetic, cityscapes; det: synthetic, voc"):
        D.build_dataset("seg", "coco", "/data")
    with pytest.raises(ValueError, match="'cityscapes' needs a root"):
        D.build_dataset("seg", "cityscapes")
    with pytest.raises(ValueError, match="with_masks: data 'voc' has no instance masks"):
        D.build_dataset("det", "voc", "/data", with_masks=True)


# ------------------------------------------------------------------------- wrappers and batches
def test_seg_batches():
    dataset = D.build_dataset("seg", "synthetic", split="train", size=SIZE, length=3)
    batch = dataset.collate([dataset.get(i, np.random.default_rng(i)) for i in range(3)])
    assert batch["images"].shape == (3, 3) + SIZE and batch["images"].dtype == torch.float32
    assert batch["targets"].shape == (3,) + SIZE and batch["targets"].dtype == torch.uint8  # int64 on the device
    assert batch["names"] == ["train_000000.png", "train_000001.png", "train_000002.png"]
    prepared = dataset.prepare_batch(batch)
    assert set(prepared) == {"images", "targets", "names"} and prepared["targets"].dtype == torch.int64
    assert torch.equal(prepared["targets"], torch.stack([
        target.flip(-1) if geometry["flipped"] else target for target, geometry in zip(batch["targets"].long(), batch["geometry"])]))
    samples = [{"image": torch.zeros(3, 4, 5, dtype=torch.uint8), "target": torch.zeros(4, 5, dtype=torch.uint8),
                "geometry": {"size": (4, 5), "flipped": False}, "name": "a"},
               {"image": torch.zeros(3, 6, 3, dtype=torch.uint8), "target": torch.zeros(6, 3, dtype=torch.uint8),
                "geometry": {"size": (6, 3), "flipped": False}, "name": "b"}]
    uneven = D.SegmentationSet(None, T.SegEvalTransform("imagenet_rgb")).prepare_batch(D.collate_seg(samples))
    assert uneven["images"].shape == (2, 3, 6, 5) and (uneven["targets"][0, 4:] == 255).all()
    assert (uneven["images"][0, :, 4:] == 0).all() and (uneven["images"][1, :, :, 3:] == 0).all()  # 0 after normalising


def test_det_batches_pad_to_32_and_drop_difficult_in_training():
    base = synthetic.SyntheticScenes("train", size=(50, 70), length=40)
    index = next(i for i in range(40) if base[i]["difficult"].any())
    transform = T.DetTransform((70, 50), flip_prob=0.0)
    train = D.DetectionSet(base, transform, train=True, with_masks=True)
    sample = train.get(index, np.random.default_rng(0))
    assert len(sample["target"]["boxes"]) == (~base[index]["difficult"]).sum()
    assert sample["target"]["masks"].shape == (len(sample["target"]["boxes"]), 50, 70)
    full = D.DetectionSet(base, transform, train=False)[index]["target"]
    assert torch.equal(full["difficult"], torch.from_numpy(base[index]["difficult"]))
    assert "sampling_seed" not in full
    # training targets carry the samplers' seed, drawn from the sample's generator after its augmentation
    flipping = D.DetectionSet(base, T.DetTransform((70, 50), flip_prob=0.5), train=True)
    draws = [flipping.get(index, np.random.default_rng(seed)) for seed in (0, 0, 1)]
    assert draws[0]["target"]["sampling_seed"] == draws[1]["target"]["sampling_seed"]
    assert draws[0]["target"]["sampling_seed"] != draws[2]["target"]["sampling_seed"]
    unseeded = T.DetTransform((70, 50), flip_prob=0.5)(base[index]["image"], base[index]["boxes"][~base[index][
        "difficult"]], np.random.default_rng(0))
    assert torch.equal(unseeded[0], draws[0]["image"]) and torch.equal(unseeded[1], draws[0]["target"]["boxes"])
    small = D.DetectionSet(base, T.DetTransform((40, 20), flip_prob=0.0))[0]
    batch = D.collate_det([sample, small])  # the decoded 50 x 70 pixels of both, resized on the device
    assert batch["images"].shape == (2, 3, 50, 70) and batch["images"].dtype == torch.uint8
    assert batch["image_sizes"] == [(50, 70), (20, 28)]
    prepared = train.prepare_batch(batch)
    assert prepared["images"].shape == (2, 3, 64, 96) and prepared["images"].dtype == torch.float32
    assert prepared["images"][1, :, 20:].abs().sum() == 0 and prepared["images"][1, :, :, 28:].abs().sum() == 0
    assert prepared["targets"][0]["image_id"] == index and prepared["image_sizes"] == batch["image_sizes"]
    assert batch["targets"][1]["scale_factor"] == pytest.approx(0.4)


def test_cls_batches():
    dataset = D.build_dataset("cls", "synthetic", split="train", size=SIZE, length=2)
    batch = dataset.collate([dataset[0], dataset[1]])
    assert batch["images"].shape == (2, 3) + SIZE and batch["images"].dtype == torch.uint8
    assert batch["targets"].dtype == torch.int64
    assert batch["targets"].tolist() == [dataset.base[0]["image_label"], dataset.base[1]["image_label"]]
    prepared = dataset.prepare_batch(batch)  # the flip drawn in the worker is made on the device
    assert set(prepared) == {"images", "targets"} and prepared["targets"] is batch["targets"]
    for image, pixels, geometry in zip(prepared["images"], batch["images"], batch["geometry"]):
        assert torch.equal(image, T.normalize((pixels.flip(-1) if geometry["flipped"] else pixels).float(), "imagenet_rgb"))


def _digest(value, digest) -> None:
    if torch.is_tensor(value):
        digest.update(str(value.dtype).encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.contiguous().numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value):
            digest.update(key.encode())
            _digest(value[key], digest)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _digest(item, digest)
    else:
        digest.update(repr(value).encode())


# sha256 (first 16 hex digits) of one collated and device-prepared batch of each task's synthetic demo data:
# three training samples of epoch 1 and the evaluation sample 1, as produced before detection and
# classification moved their normalisation (and detection its resize) to the device
SYNTHETIC_BATCH_DIGESTS = {
    ("seg", "train"): "e0b884eb7db61885", ("seg", "val"): "59b1e4eefa0eb198",
    ("det", "train"): "8b8c53c9f76befb3", ("det", "val"): "5fcf10453e726d55",
    ("cls", "train"): "4a6d323711640f6b", ("cls", "val"): "cca42e4ee502901f",
    ("ins", "train"): "fadd76e33c6d014c", ("ins", "val"): "bbde364ffaddf39b",
    ("depth", "train"): "0078a3914379f957", ("depth", "val"): "eacf5767053e3934",
}


@pytest.mark.parametrize("task", ["seg", "det", "cls", "ins", "depth"])
def test_synthetic_demo_batches_are_bit_identical_to_the_former_pipeline(task):
    import dataclasses
    import hashlib

    from kd_ref import tasks
    from kd_ref.samplers import EpochAugmentation

    recipe = PRESETS[default_preset(task, "none", "synthetic")]
    recipe = dataclasses.replace(recipe, synthetic_train=3, synthetic_val=2)
    for split in ("train", "val"):
        dataset, collate = tasks.TASKS[task].build_data(recipe, split, None)
        if split == "train":
            augmented = EpochAugmentation(dataset, recipe.seed)
            augmented.epoch = 1
            batch = collate([augmented[index] for index in range(3)])
        else:
            batch = collate([dataset[1]])
        digest = hashlib.sha256()
        _digest(dataset.prepare_batch(batch), digest)
        assert digest.hexdigest()[:16] == SYNTHETIC_BATCH_DIGESTS[task, split], split


# the same digests of an exported Cityscapes tree (4 train + 1 val scenes of 48x64, crop 40x56) through the
# CIRKD-style default preset and the mmseg-style GDD one (photometric distortion, cat_max_ratio), epochs 0-2,
# as produced before the seg labels stayed uint8 and the flip and normalisation moved to the device
CITYSCAPES_BATCH_DIGESTS = {
    "dist_deeplabv3_r18_cityscapes_baseline": ("03a5b8b9523c46e4", "822a4991200fb55a", "c24a4de9597476cf",
                                               "a3776c30e10760da"),
    "gdd_pspnet_r18_cityscapes": ("5ceb1e01bc5a1829", "6d56fbaf2122b6d4", "adc13e6f231b1c2f", "c361e467a24600e7"),
}


@pytest.mark.parametrize("preset", sorted(CITYSCAPES_BATCH_DIGESTS))
def test_exported_cityscapes_batches_are_bit_identical_to_the_former_pipeline(tmp_path, preset):
    import dataclasses

    from kd_ref import tasks
    from kd_ref.samplers import EpochAugmentation

    export.export("cityscapes", str(tmp_path), num_train=4, num_val=1, size=(48, 64), seed=0)
    recipe = dataclasses.replace(PRESETS[preset], crop=(40, 56), num_classes=9)
    digests, geometry = [], []
    for split in ("train", "val"):
        dataset, collate = tasks.TASKS["seg"].build_data(recipe, split, str(tmp_path))
        for epoch in ((0, 1, 2) if split == "train" else (0,)):
            augmented = EpochAugmentation(dataset, recipe.seed)
            augmented.epoch = epoch
            batch = collate([augmented[index] for index in range(len(dataset))])
            geometry += batch["geometry"] if split == "train" else []
            digest = hashlib.sha256()
            _digest(dataset.prepare_batch(batch), digest)
            digests.append(digest.hexdigest()[:16])
    assert tuple(digests) == CITYSCAPES_BATCH_DIGESTS[preset]
    assert any(entry["flipped"] for entry in geometry) and any(entry["size"] != (40, 56) for entry in geometry)


def test_save_prediction_writes_ids_and_colours(tmp_path):
    prediction = np.array([[0, 1], [18, 255]], np.uint8)
    D.save_prediction(prediction, str(tmp_path / "city/a.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "city/a.png")), prediction)
    colour = np.asarray(Image.open(tmp_path / "city/a_color.png"))
    assert colour[0, 0].tolist() == [128, 64, 128] and colour[1, 1].tolist() == [0, 0, 0]
