import shlex

import numpy as np
import pytest
from PIL import Image

from data_helpers import exported, scenes  # noqa: F401 (exported: a fixture)
from kd_ref import datasets as D
from kd_ref import export, synthetic


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


def test_voc_round_trip(exported):
    classes = synthetic.SyntheticScenes.CLASSES[1:]
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
        original = synthetic.SyntheticInstances(scenes(split, length))
        assert loaded.category_ids == [1, 3, 5, 7, 9, 11, 13, 15] and loaded.classes == synthetic.SyntheticScenes.CLASSES[1:]
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
        assert loaded["masks"].sum((1, 2)).min() >= synthetic.MIN_INSTANCE_AREA > scene["masks"].sum((1, 2)).min()


def test_cifar100_round_trip(exported):
    for split, length in (("train", 4), ("test", 2)):
        loaded = D.CIFAR100(str(exported / "cifar100"), split)
        original = scenes("train" if split == "train" else "val", length)
        assert len(loaded) == length and loaded.classes == synthetic.SyntheticScenes.CLASSES[1:]
        assert [loaded[i]["image_label"] for i in range(length)] == [original[i]["image_label"] for i in range(length)]
        assert loaded[0]["image"].shape == (32, 32, 3) and loaded[0]["image"].dtype == np.uint8


def test_imagefolder_round_trip(exported):
    for split, length in (("train", 4), ("val", 2)):
        loaded, original = D.ImageFolder(str(exported / "imagefolder"), split), scenes(split, length)
        assert len(loaded.classes) == 8 and loaded.classes[0] == "000_disc"
        assert sorted(loaded[i]["image_label"] for i in range(length)) == \
            sorted(original[i]["image_label"] for i in range(length))


# ------------------------------------------------------------------------------------------- CLI
def test_export_cli(tmp_path, capsys):
    assert export.main(["--format", "cityscapes", str(tmp_path / "cs"), "--num-train", "1", "--num-val", "1",
                   "--size", "32", "48"]) == 0
    assert len(D.Cityscapes(str(tmp_path / "cs"), "val")) == 1
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--format", "kitti", str(tmp_path / "k")])
    assert exit_info.value.code != 0 and "invalid choice: 'kitti'" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", sorted(export.EXPORTERS))
def test_each_export_prints_the_train_command_that_trains_on_it(fmt, tmp_path, capsys):
    import train

    root = tmp_path / fmt
    assert export.main(["--format", fmt, str(root), "--num-train", "4", "--num-val", "2", "--size", "64", "64"]) == 0
    words = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert words[:2] == ["python", "train.py"] and words[words.index("--data-root") + 1] == str(root)
    # the same command, one iteration (one epoch of the tiny tree for the presets that count epochs) long
    shorter = ["--iters", "1"] if "--iters" in words else ["--set", "epochs=1"]
    assert train.run([*words[2:], *shorter, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert (tmp_path / "run" / "metrics.json").is_file()
