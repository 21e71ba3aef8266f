"""The order of the training samples and their augmentation draws.

Both are functions of the seed, the epoch and the position in it, never of the worker that loads a sample or
of where a run was resumed, which is what makes ``--resume`` exact: :class:`ResumableSampler` (a
DistributedSampler that starts part-way through an epoch), :class:`AspectGroupSampler` (mmdet's aspect-grouped
batches, resumable the same way), :func:`build_train_sampler` (the one a recipe asks for) and
:class:`EpochAugmentation` (one generator per sample, seeded by seed, epoch and index).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from kd_ref.recipe import Recipe
from kd_ref.runtime import Runtime


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch, so a resumed run sees exactly
    the samples an uninterrupted run would have seen. The order of epoch ``e`` depends only on
    ``(seed, e)``, as in DistributedSampler."""

    def __init__(self, dataset, runtime: Runtime, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=runtime.world_size, rank=runtime.rank,
                         shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def epoch_indices(self) -> list:
        """This rank's indices of the current epoch, from its start."""
        return list(super().__iter__())

    def __iter__(self):
        indices = self.epoch_indices()[self.start:]
        self.start = 0
        return iter(indices)

    def __len__(self):
        return self.num_samples - self.start


class AspectGroupSampler(ResumableSampler):
    """mmdet 2.x DistributedGroupSampler (``mmdet/datasets/samplers/group_sampler.py``), resumable as
    :class:`ResumableSampler`: every per-process batch holds images of one aspect group (``groups[i]``, 1
    for w/h > 1), so that padding the batch to its largest image wastes little.

    Each epoch, from a generator seeded ``seed + epoch``: the members of every group in random order,
    padded by repeating that order from its start to a whole number of global batches (``batch`` per
    process x processes), all groups' indices cut into per-process batches, the batches shuffled, and
    process ``r`` takes the ``r``-th contiguous share. So no image is dropped: an epoch has
    ``sum_g ceil(|g| / (batch x processes))`` iterations, where a plain sampler drops the last partial
    batch."""

    def __init__(self, dataset, groups, runtime: Runtime, seed: int, batch: int):
        super().__init__(dataset, runtime, seed)
        self.groups, self.batch = np.asarray(groups, np.int64), batch
        if len(self.groups) != len(dataset):
            raise ValueError(f"AspectGroupSampler: {len(self.groups)} group flags for {len(dataset)} samples")
        self.group_sizes = np.bincount(self.groups)
        global_batch = batch * self.num_replicas
        self.num_samples = int(sum(math.ceil(size / global_batch) for size in self.group_sizes)) * batch
        self.total_size = self.num_samples * self.num_replicas

    def epoch_indices(self) -> list:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        global_batch = self.batch * self.num_replicas
        padded = []
        for group, size in enumerate(self.group_sizes):
            if size == 0:
                continue
            members = np.flatnonzero(self.groups == group)[torch.randperm(int(size), generator=generator).numpy()]
            padded.append(np.resize(members, math.ceil(size / global_batch) * global_batch))  # cyclic repeat
        batches = np.concatenate(padded).reshape(-1, self.batch)
        order = torch.randperm(len(batches), generator=generator).numpy()
        shuffled = batches[order].reshape(-1)
        return shuffled[self.rank * self.num_samples:(self.rank + 1) * self.num_samples].tolist()


def build_train_sampler(recipe: "Recipe", augmented: "EpochAugmentation", runtime: Runtime,
                        batch: int) -> ResumableSampler:
    """The training sampler of ``recipe``: aspect-grouped batches (``group_by_aspect``, mmdet's
    GroupSampler) over the data set repeated ``dataset_repeat`` times, or plain shuffling."""
    if not recipe.group_by_aspect:
        return ResumableSampler(augmented, runtime, recipe.seed)
    groups = np.tile(augmented.dataset.aspect_groups(), augmented.repeat)  # as mmdet's RepeatDataset.flag
    return AspectGroupSampler(augmented, groups, runtime, recipe.seed, batch)


class EpochAugmentation(torch.utils.data.Dataset):
    """Gives every sample's random augmentation its own generator seeded by (seed, epoch, index).

    Augmentations then do not depend on which worker loads a sample or on where a run was resumed,
    which is what makes ``--resume`` exact.

    An epoch passes ``repeat`` times over the data set (mmdet RepeatDataset: index i reads sample
    i mod len); each pass draws its own augmentations."""

    def __init__(self, dataset, seed: int, repeat: int = 1):
        self.dataset = dataset
        self.seed, self.repeat = seed, repeat
        self.epoch = 0

    def __len__(self):
        return self.repeat * len(self.dataset)

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return self.dataset.get(index % len(self.dataset), rng)
