import hashlib
import math

import numpy as np
import pytest

from data_helpers import SIZE, scenes
from kd_ref import synthetic


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
    data = synthetic.SyntheticScenes("train", size=SIZE, length=60)
    assert data.CLASSES == ("background", "disc", "ring", "square", "rectangle", "triangle", "cross", "star",
                            "ellipse")
    assert synthetic.SyntheticScenes.num_semantic_classes == 9 and len(data) == 60
    seen = set()
    for index in range(len(data)):
        sample = data[index]
        assert sample["image"].shape == SIZE + (3,) and sample["image"].dtype == np.uint8
        assert sample["semantic"].dtype == np.uint8 and set(np.unique(sample["semantic"])) <= set(range(9)) | {255}
        assert sample["boxes"].dtype == np.float32 and sample["labels"].dtype == np.int64
        assert sample["masks"].dtype == bool and sample["masks"].shape == (len(sample["labels"]),) + SIZE
        seen |= set(sample["labels"].tolist())
    assert seen == set(range(8))
    fewer = synthetic.SyntheticScenes("train", size=SIZE, length=30, num_classes=3)
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
            assert mask.sum() >= synthetic.SyntheticScenes.MIN_VISIBLE and (semantic[mask] == label + 1).all()
        background = ~masks.any(0)
        assert set(np.unique(semantic[background])) <= {0, 255}
        assert sample["image_label"] == sample["labels"][np.argmax(masks.sum((1, 2)))]


def test_scene_without_a_visible_object_is_drawn_again():
    # at 32 px, train scene 464 and val scene 165 first come out with no object of MIN_VISIBLE pixels
    for split, index in (("train", 464), ("val", 165)):
        sample = synthetic.SyntheticScenes(split, size=(32, 32), length=500)[index]
        assert len(sample["labels"]) >= 1 and sample["image_label"] in sample["labels"].tolist()
    # the other scenes are exactly as before the redraw existed
    neighbour = synthetic.SyntheticScenes("train", size=(32, 32), length=500)[463]["image"]
    assert hashlib.md5(neighbour.tobytes()).hexdigest() == "9ed7ac899d5b87ca5069a9516133c649"


def test_easy_style_has_few_large_objects_on_a_grainy_background():
    standard = synthetic.SyntheticScenes("train", size=SIZE, length=30)
    easy = synthetic.SyntheticScenes("train", size=SIZE, length=30, style="easy")
    assert easy.OBJECTS == (1, 3) and synthetic.SyntheticScenes.OBJECTS == (3, 10)  # per instance, class untouched

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
        synthetic.SyntheticScenes(size=(8, 8))
    with pytest.raises(ValueError, match="num_classes"):
        synthetic.SyntheticScenes(num_classes=9)
    with pytest.raises(IndexError, match="out of range"):
        scenes(length=2)[2]
    with pytest.raises(ValueError, match="style: expected one of"):
        synthetic.SyntheticScenes(style="hardest")


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
    scene_set = synthetic.SyntheticScenes("train", seed=seed, size=size, length=4, style=style)
    synthetic.SyntheticDepthScenes(scene_set)[1]    # rendering a depth scene draws nothing from the scene's generator
    assert scene_digest(scene_set) == SCENE_DIGESTS_BEFORE_THE_DEPTH_MODE[(style, size, seed)]


def depth_scenes(objects=(1, 3), radius=None, num_classes=8, length=4, seed=0):
    scene_set = synthetic.SyntheticScenes("train", seed=seed, size=SIZE, length=length, num_classes=num_classes, style="easy")
    scene_set.OBJECTS = objects
    if radius is not None:
        scene_set.RADIUS = radius
    return synthetic.SyntheticDepthScenes(scene_set)


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
            radius = 0.15 * min(SIZE) * synthetic.SyntheticDepthScenes.REFERENCE_DEPTH / object_depth
            assert disc.sum() / (math.pi * radius ** 2) == pytest.approx(1, abs=0.1), index
            measured += 1
    assert measured >= 3


def test_depth_objects_occlude_in_depth_order(monkeypatch):
    placed, painted = [], []
    place, paint = synthetic.SyntheticDepthScenes._place_object, synthetic.SyntheticDepthScenes._object_paint
    monkeypatch.setattr(synthetic.SyntheticDepthScenes, "_place_object",
                        lambda self, *args: placed.append(place(self, *args)) or placed[-1])
    monkeypatch.setattr(synthetic.SyntheticDepthScenes, "_object_paint",
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
