import dataclasses
from math import ceil

import numpy as np
import pytest
import torch

from kd_ref import methods
from kd_ref.recipe import Recipe
from kd_ref.runtime import Runtime
from kd_ref.samplers import AspectGroupSampler, EpochAugmentation, ResumableSampler, build_train_sampler


def test_resumable_sampler_continues_the_same_order():
    data = list(range(23))
    runtime = Runtime(torch.device("cpu"))
    full = ResumableSampler(data, runtime, seed=3)
    full.set_position(epoch=2, start=0)
    order = list(full)
    part = ResumableSampler(data, runtime, seed=3)
    part.set_position(epoch=2, start=7)
    assert len(part) == len(order) - 7
    assert list(part) == order[7:]
    assert list(part) == order, "the start offset applies to one pass only"
    other = ResumableSampler(data, runtime, seed=3)
    other.set_position(epoch=3, start=0)
    assert list(other) != order


# mmdet's DistributedGroupSampler, by hand: 7 images, group 0 = {0, 3} (w <= h), group 1 = {1, 2, 4, 5, 6}
HAND_GROUPS = [0, 1, 1, 0, 1, 1, 1]


def _batches(indices: list, batch: int) -> list:
    return [indices[i:i + batch] for i in range(0, len(indices), batch)]


def test_aspect_group_sampler_pads_each_group_to_whole_batches_of_one_group():
    runtime = Runtime(torch.device("cpu"))
    sampler = AspectGroupSampler(list(range(7)), HAND_GROUPS, runtime, seed=0, batch=2)
    # ceil(2 / 2) + ceil(5 / 2) = 4 batches per epoch, where dropping the last partial batch gives 7 // 2 = 3
    assert len(sampler) == 8 and len(ResumableSampler(list(range(7)), runtime, seed=0)) // 2 == 3
    for epoch in range(3):
        sampler.set_position(epoch, 0)
        order = list(sampler)
        assert sorted(set(order)) == list(range(7))  # nothing dropped; one group-1 image twice
        assert sorted(order.count(i) for i in range(7)) == [1] * 6 + [2]
        assert all(len({HAND_GROUPS[i] for i in batch}) == 1 for batch in _batches(order, 2))
    # two processes at batch 2 (a global batch of 4): ceil(2 / 4) + ceil(5 / 4) = 3 batches per process
    shares = [AspectGroupSampler(list(range(7)), HAND_GROUPS, Runtime(torch.device("cpu"), rank, 2), seed=0, batch=2)
              for rank in (0, 1)]
    orders = [list(share) for share in shares]
    assert [len(order) for order in orders] == [6, 6] and set(orders[0] + orders[1]) == set(range(7))
    assert all(len({HAND_GROUPS[i] for i in batch}) == 1 for order in orders for batch in _batches(order, 2))
    # group 0 (2 images) fills a global batch of 4 by repeating its shuffled order: each image twice
    group0 = [i for order in orders for i in order if HAND_GROUPS[i] == 0]
    assert sorted(group0) == [0, 0, 3, 3]


def test_aspect_group_sampler_resumes_mid_epoch_and_follows_the_repeated_set():
    runtime = Runtime(torch.device("cpu"))
    full = AspectGroupSampler(list(range(7)), HAND_GROUPS, runtime, seed=5, batch=2)
    full.set_position(epoch=1, start=0)
    order = list(full)
    part = AspectGroupSampler(list(range(7)), HAND_GROUPS, runtime, seed=5, batch=2)
    part.set_position(epoch=1, start=4)
    assert len(part) == 4 and list(part) == order[4:]
    assert list(part) == order, "the start offset applies to one pass only"
    part.set_position(epoch=2, start=0)
    assert list(part) != order
    recipe = Recipe(task="det", group_by_aspect=True, dataset_repeat=2)

    class Flagged(list):
        def aspect_groups(self):
            return np.array(HAND_GROUPS)
    repeated = build_train_sampler(recipe, EpochAugmentation(Flagged(range(7)), seed=0, repeat=2), runtime, batch=2)
    assert list(repeated.groups) == HAND_GROUPS * 2 and len(repeated) == 2 * (ceil(4 / 2) + ceil(10 / 2))
    plain = build_train_sampler(dataclasses.replace(recipe, group_by_aspect=False),
                                EpochAugmentation(Flagged(range(7)), seed=0), runtime, batch=2)
    assert type(plain) is ResumableSampler
    with pytest.raises(ValueError, match=r"^group_by_aspect: --task seg crops its inputs to one size; only the tasks "
                                         r"that resize whole images \(det, ins\)"):
        methods.check_recipe(dataclasses.replace(recipe, task="seg", num_classes=4))  # before any data is read
