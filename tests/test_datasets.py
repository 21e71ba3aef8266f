import hashlib
import json
import math
import os
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from kd_ref import datasets as D
from kd_ref import transforms as T
from kd_ref.presets import PRESETS, default_preset

SIZE = (64, 80)


def scenes(split="train", length=4, seed=0):
    return D.SyntheticScenes(split, seed=seed, size=SIZE, length=length)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every export format of the same 4 train + 2 val scenes."""
    root = tmp_path_factory.mktemp("exported")
    for name in D.EXPORTERS:
        D.export(name, str(root / name), num_train=4, num_val=2, size=SIZE, seed=0)
    return root


# ----------------------------------------------------------------------------- SyntheticScenes
def test_scenes_are_deterministic_per_seed_split_index():
    first, again = scenes()[2], scenes()[2]
    for key in ("image", "semantic", "boxes", "labels", "masks", "difficult"):
        assert np.array_equal(first[key], again[key]), key
    assert first["image_label"] == again["image_label"]
    assert not np.array_equal(first["image"], scenes()[3]["image"])
    assert not np.array_equal(first["image"], scenes("val")[2]["image"])
    assert not np.array_equal(first["image"], scenes(seed=1)[2]["image"])


def test_scene_sample_types_and_class_set():
    data = D.SyntheticScenes("train", size=SIZE, length=60)
    assert data.CLASSES == ("background", "disc", "ring", "square", "rectangle", "triangle", "cross", "star",
                            "ellipse")
    assert D.SyntheticScenes.num_semantic_classes == 9 and len(data) == 60
    seen = set()
    for index in range(len(data)):
        sample = data[index]
        assert sample["image"].shape == SIZE + (3,) and sample["image"].dtype == np.uint8
        assert sample["semantic"].dtype == np.uint8 and set(np.unique(sample["semantic"])) <= set(range(9)) | {255}
        assert sample["boxes"].dtype == np.float32 and sample["labels"].dtype == np.int64
        assert sample["masks"].dtype == bool and sample["masks"].shape == (len(sample["labels"]),) + SIZE
        seen |= set(sample["labels"].tolist())
    assert seen == set(range(8))
    fewer = D.SyntheticScenes("train", size=SIZE, length=30, num_classes=3)
    assert fewer.num_semantic_classes == 4 and fewer.classes == ("background", "disc", "ring", "square")
    assert all(fewer[i]["labels"].max() < 3 for i in range(30))


def test_boxes_masks_semantic_and_image_label_agree():
    data = scenes(length=40)
    for index in range(len(data)):
        sample = data[index]
        masks, semantic = sample["masks"], sample["semantic"]
        assert masks.sum(0).max() <= 1  # occlusion leaves visible masks disjoint
        for box, label, mask in zip(sample["boxes"], sample["labels"], masks):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert box.tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]  # tight, x2/y2 exclusive
            assert mask.sum() >= D.SyntheticScenes.MIN_VISIBLE and (semantic[mask] == label + 1).all()
        background = ~masks.any(0)
        assert set(np.unique(semantic[background])) <= {0, 255}
        assert sample["image_label"] == sample["labels"][np.argmax(masks.sum((1, 2)))]


def test_scene_without_a_visible_object_is_drawn_again():
    # at 32 px, train scene 464 and val scene 165 first come out with no object of MIN_VISIBLE pixels
    for split, index in (("train", 464), ("val", 165)):
        sample = D.SyntheticScenes(split, size=(32, 32), length=500)[index]
        assert len(sample["labels"]) >= 1 and sample["image_label"] in sample["labels"].tolist()
    # the other scenes are exactly as before the redraw existed
    neighbour = D.SyntheticScenes("train", size=(32, 32), length=500)[463]["image"]
    assert hashlib.md5(neighbour.tobytes()).hexdigest() == "9ed7ac899d5b87ca5069a9516133c649"


def test_easy_style_has_few_large_objects_on_a_grainy_background():
    standard = D.SyntheticScenes("train", size=SIZE, length=30)
    easy = D.SyntheticScenes("train", size=SIZE, length=30, style="easy")
    assert easy.OBJECTS == (1, 3) and D.SyntheticScenes.OBJECTS == (3, 10)  # per instance, class untouched

    def local_spread(sample, where):
        image = sample["image"].astype(np.float32)
        return np.abs(np.diff(image, axis=1)).mean(-1)[where[:, 1:]].mean()

    grain, paint = [], []
    for index in range(30):
        sample = easy[index]
        assert 1 <= len(sample["labels"]) <= 3
        grain.append(local_spread(sample, sample["semantic"] == 0))
        paint.append(local_spread(sample, (sample["semantic"] > 0) & (sample["semantic"] < 255)))
    assert np.mean(grain) > 2 * np.mean(paint)  # figure/ground is a local cue
    mean_area = lambda data: np.mean([(data[i]["semantic"] > 0).mean() for i in range(30)])
    assert mean_area(easy) > mean_area(standard) / 2  # fewer but larger objects


def test_scene_argument_errors():
    with pytest.raises(ValueError, match="size"):
        D.SyntheticScenes(size=(8, 8))
    with pytest.raises(ValueError, match="num_classes"):
        D.SyntheticScenes(num_classes=9)
    with pytest.raises(IndexError, match="out of range"):
        scenes(length=2)[2]
    with pytest.raises(ValueError, match="style: expected one of"):
        D.SyntheticScenes(style="hardest")


# ------------------------------------------------------------------------------- round trips
def test_cityscapes_round_trip(exported):
    for split, length in (("train", 4), ("val", 2)):
        loaded, original = D.Cityscapes(str(exported / "cityscapes"), split), scenes(split, length)
        assert len(loaded) == length
        for index in range(length):
            sample = loaded[index]
            assert np.array_equal(sample["label_map"][sample["semantic"]], original[index]["semantic"])  # -> train ids
            assert np.array_equal(sample["image"], original[index]["image"])
            assert sample["name"] == f"synthetic/synthetic_{index:06d}_000019.png"
    label_file = exported / "cityscapes/gtFine/train/synthetic/synthetic_000000_000019_gtFine_labelIds.png"
    label_ids = set(np.unique(np.asarray(Image.open(label_file))))
    assert label_ids <= set(D.CITYSCAPES_LABEL_IDS[:9]) | {0}


def test_cityscapes_label_id_table():
    table = D.LABEL_ID_TO_TRAIN_ID
    assert table[7] == 0 and table[26] == 13 and table[33] == 18 and table[24] == 11
    assert all(table[i] == 255 for i in (0, 1, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255))
    assert (table != 255).sum() == 19


def test_voc_round_trip(exported):
    classes = D.SyntheticScenes.CLASSES[1:]
    # the 07+12 layout: the train scenes are VOC2007 trainval (first half) then VOC2012 trainval
    assert len(D.VOCDetection(str(exported / "voc"), ("2012/trainval",), classes=classes)) == 2
    for image_sets, split, length in ((("2007/trainval", "2012/trainval"), "train", 4), (("2007/test",), "val", 2)):
        loaded = D.VOCDetection(str(exported / "voc"), image_sets, classes=classes)
        original = scenes(split, length)
        assert len(loaded) == length
        for index in range(length):
            sample, source = loaded[index], original[index]
            # mmdet XMLDataset: inclusive 1-based corners minus 1 -> x2, y2 one less than the exclusive edge
            assert np.array_equal(sample["boxes"], source["boxes"] - np.array([0, 0, 1, 1], np.float32))
            assert np.array_equal(sample["labels"], source["labels"])
            assert np.array_equal(sample["difficult"], source["difficult"])
    with pytest.raises(ValueError, match="not in classes=.*pass classes="):
        D.VOCDetection(str(exported / "voc"), ("2007/trainval",))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' mask decoding under numpy 2
def test_coco_round_trip_and_category_map(exported):
    for split, length in (("train", 4), ("val", 2)):
        loaded = D.COCODetection(str(exported / "coco"), f"{split}2017", with_masks=True)
        original = D.SyntheticInstances(scenes(split, length))
        assert loaded.category_ids == [1, 3, 5, 7, 9, 11, 13, 15] and loaded.classes == D.SyntheticScenes.CLASSES[1:]
        for index in range(length):
            sample, source = loaded[index], original[index]
            assert sample["image_id"] == index + 1
            for key in ("boxes", "labels", "masks"):
                assert np.array_equal(sample[key], source[key]), key


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' mask decoding under numpy 2
def test_coco_export_drops_fragments_below_the_instance_area(exported):
    # train scene 3 holds a 13-pixel fragment, val scene 0 two of 12 and 13 pixels: instances need 16
    for split, length, index, fragments in (("train", 4, 3, 1), ("val", 2, 0, 2)):
        scene = scenes(split, length)[index]
        loaded = D.COCODetection(str(exported / "coco"), f"{split}2017", with_masks=True)[index]
        assert len(loaded["labels"]) == len(scene["labels"]) - fragments
        assert loaded["masks"].sum((1, 2)).min() >= D.MIN_INSTANCE_AREA > scene["masks"].sum((1, 2)).min()


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
    last_instances = D.SyntheticInstances(scenes(length=4))[3]
    assert len(loaded[len(loaded) - 1]["labels"]) == len(last_instances["labels"])  # w < 1 skipped
    filtered = D.COCODetection(str(tree), "train2017", filter_empty=True)  # targets parsed once, of the kept images
    assert len(filtered) == len(loaded) - 1 and filtered.image_ids == loaded.image_ids[1:]
    assert all(np.array_equal(filtered[0][key], loaded[1][key]) for key in ("boxes", "labels", "difficult"))
    train_set = D.DetectionSet(loaded, T.DetTransform(SIZE[::-1], flip_prob=0.0), train=True)
    assert len(train_set[0]["target"]["boxes"]) == 0
    eval_set = D.DetectionSet(loaded, T.DetTransform(SIZE[::-1], flip_prob=0.0), train=False)
    assert eval_set[0]["target"]["difficult"].all()


def test_cifar100_round_trip(exported):
    for split, length in (("train", 4), ("test", 2)):
        loaded = D.CIFAR100(str(exported / "cifar100"), split)
        original = scenes("train" if split == "train" else "val", length)
        assert len(loaded) == length and loaded.classes == D.SyntheticScenes.CLASSES[1:]
        assert [loaded[i]["image_label"] for i in range(length)] == [original[i]["image_label"] for i in range(length)]
        assert loaded[0]["image"].shape == (32, 32, 3) and loaded[0]["image"].dtype == np.uint8


def test_imagefolder_round_trip(exported):
    for split, length in (("train", 4), ("val", 2)):
        loaded, original = D.ImageFolder(str(exported / "imagefolder"), split), scenes(split, length)
        assert len(loaded.classes) == 8 and loaded.classes[0] == "000_disc"
        assert sorted(loaded[i]["image_label"] for i in range(length)) == \
            sorted(original[i]["image_label"] for i in range(length))


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
        D.VOCDetection(str(exported / "voc"), ("2007/trainval", "2010/trainval"), classes=D.SyntheticScenes.CLASSES[1:])
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
    base = D.SyntheticScenes("train", size=(50, 70), length=40)
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

    from kd_ref import configs
    from kd_ref.samplers import EpochAugmentation

    recipe = PRESETS[default_preset(task, "none", "synthetic")]
    recipe = dataclasses.replace(recipe, synthetic_train=3, synthetic_val=2)
    for split in ("train", "val"):
        dataset, collate = configs.TASKS[task].build_data(recipe, split, None)
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

    from kd_ref import configs
    from kd_ref.samplers import EpochAugmentation

    D.export("cityscapes", str(tmp_path), num_train=4, num_val=1, size=(48, 64), seed=0)
    recipe = dataclasses.replace(PRESETS[preset], crop=(40, 56), num_classes=9)
    digests, geometry = [], []
    for split in ("train", "val"):
        dataset, collate = configs.TASKS["seg"].build_data(recipe, split, str(tmp_path))
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


def test_export_cli(tmp_path, capsys):
    assert D.main(["export", "--format", "cityscapes", str(tmp_path / "cs"), "--num-train", "1", "--num-val", "1",
                   "--size", "32", "48"]) == 0
    assert len(D.Cityscapes(str(tmp_path / "cs"), "val")) == 1
    with pytest.raises(SystemExit) as exit_info:
        D.main(["export", "--format", "kitti", str(tmp_path / "k")])
    assert exit_info.value.code != 0 and "invalid choice: 'kitti'" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", sorted(D.EXPORTERS))
def test_each_export_prints_the_train_command_that_trains_on_it(fmt, tmp_path, capsys):
    import train

    root = tmp_path / fmt
    assert D.main(["export", "--format", fmt, str(root), "--num-train", "4", "--num-val", "2", "--size", "64", "64"]) == 0
    words = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert words[:2] == ["python", "train.py"] and words[words.index("--data-root") + 1] == str(root)
    # the same command, one iteration (one epoch of the tiny tree for the presets that count epochs) long
    shorter = ["--iters", "1"] if "--iters" in words else ["--set", "epochs=1"]
    assert train.run([*words[2:], *shorter, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_a_scene_is_drawn_once_and_returned_as_a_fresh_dict():
    data = scenes(length=3)
    first = data[1]
    first["image"] = None  # a caller's edit of its dict reaches neither the cache nor later callers
    again, drawn = data[1], data.sample(1)
    assert all(np.array_equal(again[key], drawn[key]) for key in drawn if isinstance(drawn[key], np.ndarray))
    assert data._cached_bytes > 0 and again is not data[1]


# ------------------------------------------------------------------------- synthetic depth mode
# sha256 (first 16 hex digits) over sample(0..3) of each scene set, every key in sorted order, made with the
# code of main at d56938b, before the depth mode existed: the seg/det/cls demos' measured figures rest on them
SCENE_DIGESTS_BEFORE_THE_DEPTH_MODE = {("standard", (64, 80), 0): "d8f2d55bd66f893b",
                                       ("easy", (128, 160), 0): "37819444a313a194",
                                       ("easy", (128, 128), 1): "87a7072cd87409ec"}


def scene_digest(scene_set) -> str:
    digest = hashlib.sha256()
    for index in range(len(scene_set)):
        sample = scene_set.sample(index)
        for key in sorted(sample):
            value = sample[key]
            digest.update(key.encode())
            data = np.ascontiguousarray(value).tobytes() if isinstance(value, np.ndarray) else repr(value).encode()
            digest.update(data)
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("style,size,seed", list(SCENE_DIGESTS_BEFORE_THE_DEPTH_MODE))
def test_the_depth_mode_leaves_the_scenes_of_every_other_task_bit_identical(style, size, seed):
    scene_set = D.SyntheticScenes("train", seed=seed, size=size, length=4, style=style)
    D.SyntheticDepthScenes(scene_set)[1]    # rendering a depth scene draws nothing from the scene's generator
    assert scene_digest(scene_set) == SCENE_DIGESTS_BEFORE_THE_DEPTH_MODE[(style, size, seed)]


def depth_scenes(objects=(1, 3), radius=None, num_classes=8, length=4, seed=0):
    scene_set = D.SyntheticScenes("train", seed=seed, size=SIZE, length=length, num_classes=num_classes, style="easy")
    scene_set.OBJECTS = objects
    if radius is not None:
        scene_set.RADIUS = radius
    return D.SyntheticDepthScenes(scene_set)


def test_depth_scenes_are_deterministic_valid_and_not_the_other_tasks_images():
    first, again = depth_scenes()[2], depth_scenes()[2]
    assert np.array_equal(first["image"], again["image"]) and np.array_equal(first["depth"], again["depth"])
    assert first["image"].shape == (*SIZE, 3) and first["image"].dtype == np.uint8
    assert first["depth"].shape == SIZE and first["depth"].dtype == np.float32 and first["name"] == "train_000002.png"
    assert not np.array_equal(first["depth"], depth_scenes(seed=1)[2]["depth"])
    for index in range(4):
        depth = depth_scenes()[index]["depth"]
        valid = depth[depth > 0]
        assert valid.min() >= 0.5 and valid.max() <= 10.0 and (depth == 0).mean() <= 0.03
    with pytest.raises(IndexError, match="index 4 out of range for 4 train scenes"):
        depth_scenes().render(4)


def test_depth_background_is_a_floor_farther_towards_the_top_with_finer_texture():
    for index in range(4):
        scene = depth_scenes(objects=(0, 0))[index]
        depth, grey = scene["depth"], scene["image"].astype(np.float64).mean(2)
        rows = np.array([row[row > 0].mean() for row in depth])
        assert rows[0] > rows[-1] + 0.5    # c >= 1 m over the height
        # the checker's cells shrink with depth (CELL * focal / d pixels): more level changes per row far away
        changes = (np.abs(np.diff(grey, axis=1)) > 12).sum(1)
        top, bottom = changes[: SIZE[0] // 4].mean(), changes[-SIZE[0] // 4:].mean()
        assert top > bottom, (index, top, bottom)


def test_depth_objects_are_sized_by_perspective():
    # one disc a scene, of one reference radius: drawn at radius * REFERENCE_DEPTH / depth pixels
    measured = 0
    for index in range(12):
        depth = depth_scenes(objects=(1, 1), radius=(0.15, 0.15), num_classes=1, length=12)[index]["depth"]
        values, counts = np.unique(depth[depth > 0], return_counts=True)
        object_depth = values[np.argmax(counts)]                       # the disc's one depth
        disc = depth == object_depth
        rows, cols = np.flatnonzero(disc.any(1)), np.flatnonzero(disc.any(0))
        if rows[0] > 0 and cols[0] > 0 and cols[-1] < SIZE[1] - 1:     # not cut by the image border
            radius = 0.15 * min(SIZE) * D.SyntheticDepthScenes.REFERENCE_DEPTH / object_depth
            assert disc.sum() / (math.pi * radius ** 2) == pytest.approx(1, abs=0.1), index
            measured += 1
    assert measured >= 3


def test_depth_objects_occlude_in_depth_order(monkeypatch):
    placed, painted = [], []
    place, paint = D.SyntheticDepthScenes._place_object, D.SyntheticDepthScenes._object_paint
    monkeypatch.setattr(D.SyntheticDepthScenes, "_place_object",
                        lambda self, *args: placed.append(place(self, *args)) or placed[-1])
    monkeypatch.setattr(D.SyntheticDepthScenes, "_object_paint",
                        lambda self, *args: painted.append(paint(self, *args)) or painted[-1])
    scene_set = depth_scenes(objects=(5, 6))
    for index in range(3):
        placed.clear(), painted.clear()
        depth = scene_set[index]["depth"]
        order = [object_depth for object_depth, _ in sorted(placed, key=lambda item: -item[0])]
        covering = np.full(SIZE, np.inf)
        for object_depth, (mask, _) in zip(order, painted):
            covering[mask] = np.minimum(covering[mask], object_depth)
        seen = np.isfinite(covering) & (depth > 0)
        assert len(placed) >= 5 and seen.sum() > 100
        np.testing.assert_allclose(depth[seen], covering[seen], rtol=1e-6)   # the nearest object is the one seen


# ------------------------------------------------------------------------- VNL's NYUDv2 protocol
class ScriptedDraws:
    """A generator stand-in that returns the given integer draws in order (each checked against its bound)
    and a fixed ``random()``: the flip is drawn when it is below 0.5."""

    def __init__(self, integers, random=0.9):
        self.integers_left, self.random_value = list(integers), random

    def integers(self, *bounds):
        value = self.integers_left.pop(0)
        assert 0 <= value < bounds[-1] and (len(bounds) == 1 or value >= bounds[0])
        return value

    def random(self):
        return self.random_value


def nyu_like_sample():
    """A 480x640 image whose red channel is the row and green the column (mod 256), and a depth map that
    grows by 1 mm per row and 0.1 mm per column from 2 m."""
    rows, cols = np.meshgrid(np.arange(480), np.arange(640), indexing="ij")
    image = np.stack([rows % 256, cols % 256, np.zeros_like(rows)], -1).astype(np.uint8)
    return image, (2.0 + rows / 1000 + cols / 10000).astype(np.float32)


def test_vnl_training_windows_are_squares_of_385_to_640_resized_to_385_with_depth_scaled():
    assert D.vnl_crop_sides(385, 640) == (385, 416, 448, 480, 512, 544, 576, 608, 640)  # VNL's raw_size
    image, depth = nyu_like_sample()
    transform = D.VNLDepthTransform(385, train=True, normalization="imagenet_rgb")
    # side 385 (draw 0) at row 50, column 100: the window itself, depth unscaled, no flip
    pixels, target, restore = transform(image, depth, ScriptedDraws([0, 50, 100]))
    assert restore is None and pixels.shape == (3, 385, 385)
    assert torch.equal(target, torch.from_numpy(depth[50:435, 100:485]))
    assert torch.equal(pixels, T.normalize(T.to_tensor(image[50:435, 100:485]), "imagenet_rgb"))
    # side 640 (draw 8): taller than the image, so padded by 160 rows at the top and taken from row 0 (no row
    # draw); resized x385/640 and the depth multiplied by 640/385; flipped (random 0.1)
    pixels, target, _ = transform(image, depth, ScriptedDraws([8, 0], random=0.1))
    assert pixels.shape == (3, 385, 385) and target.shape == (385, 385)
    # output row i samples padded row (i + 0.5) * 640/385 - 0.5: rows 0-96 touch the padding (row 96: 159.9)
    assert target[:97].max() == 0 and target[97:].min() > 0
    last = 384.5 * 640 / 385 - 0.5  # where the last row and column sample: padded row 638.7 is image row 478.7
    assert target[384, 0].item() == pytest.approx((2.0 + (last - 160) / 1000 + last / 10000) * 640 / 385, rel=1e-6)
    assert target[200, 0].item() > target[200, -1].item()  # flipped: the far columns on the left
    gray = (128 - 123.675) / 58.395  # the padding is 128 on the 0-255 scale
    assert pixels[0, :96].sub(gray).abs().max() < 1e-5
    # side 480 (draw 3): as tall as the image, so the row draw has a single value, 0; column 160
    _, target, _ = transform(image, depth, ScriptedDraws([3, 0, 160]))
    first = 0.5 * 480 / 385 - 0.5
    assert target[0, 0].item() == pytest.approx((2.0 + first / 1000 + (160 + first) / 10000) * 480 / 385, rel=1e-6)


def test_vnl_test_geometry_pads_to_640_runs_at_385_and_maps_the_prediction_back():
    image, depth = nyu_like_sample()
    pixels, target, restore = D.VNLDepthTransform(385, train=False)(image, depth, ScriptedDraws([]))
    assert pixels.shape == (3, 385, 385) and torch.equal(target, torch.from_numpy(depth))
    assert restore == {"pad_top": 160, "side": 640, "size": (480, 640)}
    # a prediction of its row index: VNL drops int(160 * 385/640) = 96 rows, multiplies by r = 385/640 and
    # resizes the 289 rows left to 480; the first and last rows read rows 96 and 384 of the prediction
    prediction = torch.arange(385.0)[:, None].expand(385, 385)
    restored = D.vnl_restore(prediction, restore)
    assert restored.shape == (480, 640)
    assert restored[0, 0].item() == pytest.approx(96 * 385 / 640)
    assert restored[-1, 0].item() == pytest.approx(384 * 385 / 640)
    # the round trip of a constant map: the training-style target of the test window maps back to it
    window = torch.nn.functional.pad(torch.full((1, 1, 480, 640), 2.0), (0, 0, 160, 0))
    predicted = torch.nn.functional.interpolate(window, size=(385, 385), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(D.vnl_restore(predicted * 640 / 385, restore)[2:], torch.full((478, 640), 2.0))
    with pytest.raises(ValueError, match=r"^--crop 385 385: VNL's protocol crops squares of 385 px up to the image "
                                         r"width, which is 320 px here$"):
        D.VNLDepthTransform(385, train=True)(image[:240, :320], depth[:240, :320], ScriptedDraws([]))
