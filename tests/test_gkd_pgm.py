"""GKD's PGM pass (kd_ref/gkd.py): instance selection, per-image grouping, the pooled features of an FPN
function and the epoch's prototypes from maps or cached vectors."""

import numpy as np
import pytest
import torch

from kd_ref.gkd import (build_prototypes, extract_instance_features, generate_epoch_prototypes, group_by_image,
                        pool_instance_features, select_pgm_instances)


def test_select_pgm_instances_filters_small_boxes_and_caps_images_reproducibly():
    annotations = [{"image_id": 100 + i, "boxes": [[0, 0, 40, 40], [0, 0, 20, 50], [5, 5, 50, 36]],
                    "labels": [0, 0, i % 2]} for i in range(6)]
    full = select_pgm_instances(annotations, num_classes=2, min_size=30, max_images=10)
    assert full[0] == [(100, 0), (100, 2), (101, 0), (102, 0), (102, 2), (103, 0), (104, 0), (104, 2), (105, 0)]
    assert full[1] == [(101, 2), (103, 2), (105, 2)]
    capped = select_pgm_instances(annotations, num_classes=2, max_images=4, seed=1)
    order = np.arange(6)
    np.random.RandomState(1).shuffle(order)
    assert [image for image, _ in capped[0] if _ == 0] == [100 + i for i in order[:4]]
    assert capped == select_pgm_instances(annotations, num_classes=2, max_images=4, seed=1)
    assert group_by_image(capped)[100 + order[0]][0] == 0


def test_generate_epoch_prototypes_from_maps_or_cached_vectors():
    torch.manual_seed(0)
    images = []
    for _ in range(6):
        boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [16.0, 8.0, 60.0, 56.0], [32.0, 32.0, 63.0, 63.0]])
        feats_s = [torch.randn(1, 4, 16, 16), torch.randn(1, 4, 8, 8)]
        feats_t = [torch.randn(1, 3, 16, 16), torch.randn(1, 3, 8, 8)]
        images.append((feats_s, feats_t, boxes, torch.tensor([0, 1, 0])))
    ticks = []
    result = generate_epoch_prototypes(images, num_classes=3, num_prototypes=2, finest_stride=4,
                                       progress=ticks.append)
    assert ticks == [1] * 6
    assert [s.tolist() for s in result[2]] == [[0, 2, 4, 4]] * 2

    pooled_s = [pool_instance_features(s, b, (64, 64)) for s, _, b, _ in images]
    pooled_t = [pool_instance_features(t, b, (64, 64)) for _, t, b, _ in images]
    per_class_s = [[torch.cat([p[level][lab == c] for p, (_, _, _, lab) in zip(pooled_s, images)])
                    for level in range(2)] for c in (0, 1)] + [None]
    per_class_t = [[torch.cat([p[level][lab == c] for p, (_, _, _, lab) in zip(pooled_t, images)])
                    for level in range(2)] for c in (0, 1)] + [None]
    expected = build_prototypes(per_class_s, per_class_t, num_prototypes=2)
    cached = [(s, pt, b, lab) for (s, _, b, lab), pt in zip(images, pooled_t)]
    for got in (result, generate_epoch_prototypes(cached, num_classes=3, num_prototypes=2)):
        for part_got, part_expected in zip(got, expected):
            for a, b in zip(part_got, part_expected):
                torch.testing.assert_close(a, b)


def test_extract_instance_features_pools_the_maps_of_fpn_fn():
    feat = torch.arange(64.0).reshape(1, 1, 8, 8)
    boxes = torch.tensor([[8.0, 0.0, 23.0, 15.0]])
    via_fn = extract_instance_features(lambda img: [feat], torch.zeros(1, 3, 32, 32), boxes)
    assert torch.equal(via_fn[0], pool_instance_features([feat], boxes, image_size=(32, 32))[0])
    with pytest.raises(ValueError, match=r"image must be \(1, 3, H, W\)"):
        extract_instance_features(lambda img: [feat], torch.zeros(2, 3, 32, 32), boxes)


def test_select_pgm_instances_errors_are_clear():
    with pytest.raises(ValueError, match="'image_id', 'boxes' and 'labels'"):
        select_pgm_instances([{"boxes": []}], num_classes=1)
    with pytest.raises(ValueError, match=r"label 3 of image 7 is outside \[0, 2\)"):
        select_pgm_instances([{"image_id": 7, "boxes": [[0, 0, 40, 40]], "labels": [3]}], num_classes=2)
