"""Engine-facing method drivers: what a method needs from the training engine, written against the
engine's documented hooks (``kd_ref.engine``: ``before_epoch``, ``after_step``, ``extra_parameters``,
``get_extra_state``), so that the method files hold only their paper's equations, modules and distiller.

GKD (``kd_ref.gkd``): the PGM pass before every epoch. :func:`pgm_annotations` reads a detection data
set's GT boxes, :func:`select_pgm_instances` picks the PGM instances once, :class:`ScheduledGKDDistiller`
pools them on the student and the teacher (sharded over the DDP processes, gathered in selection order)
and sets the epoch's prototypes and the attenuation's epoch position; :func:`anchor_level_features` gives
RetinaNet's per-anchor soft-label inputs to the registry's binding.

SoKD (``kd_ref.sokd``): :class:`SoKDPlugin` taps one feature of the model outputs, adds the base method's
loss (:class:`BoundBase`, ``loss_sokd_base_*``) to SoKD's own terms and runs the bi-level policy search
(:class:`SoKDSearch`) in the engine's ``after_step`` hook.
"""
from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from kd_ref.gkd import (GKDDistiller, Prototypes, build_prototypes, map_boxes_to_levels, pool_box_features,
                        pool_instance_features)
from kd_ref.sokd import SoKDDistiller


# -------------------------------------------------------------------------------- GKD: PGM instances
def select_pgm_instances(annotations: Iterable[Mapping], num_classes: int, min_size: float = 30,
                         max_images: int = 800, seed: int = 1) -> dict[int, list[tuple[int, int]]]:
    """PGM instances per class: ``{c: [(image_id, box_idx), ...]}``, computed once, reused every epoch.

    ``annotations``: one mapping per training image with ``image_id``, ``boxes`` (K, 4) xyxy in
    original-image pixels and 0-based ``labels`` (K,). A box qualifies if its width and height exceed
    ``min_size``. Classes are visited in order with one ``numpy.random.RandomState(seed)``; a class with
    more than ``max_images`` qualifying images shuffles their annotation order and keeps the first
    ``max_images`` (the reference seeds numpy once and only shuffles in that case).
    """
    if num_classes < 1 or max_images < 1:
        raise ValueError(f"select_pgm_instances: num_classes and max_images must be >= 1, got "
                         f"{num_classes} and {max_images}")
    boxes_by_class_and_image: list[dict[int, list[int]]] = [{} for _ in range(num_classes)]
    for ann in annotations:
        if not isinstance(ann, Mapping) or not {"image_id", "boxes", "labels"} <= set(ann):
            raise ValueError("select_pgm_instances: every annotation must be a mapping with keys "
                             "'image_id', 'boxes' and 'labels'")
        boxes = np.asarray(ann["boxes"], dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(ann["labels"], dtype=np.int64).reshape(-1)
        if len(boxes) != len(labels):
            raise ValueError(f"select_pgm_instances: image {ann['image_id']} has {len(boxes)} boxes but "
                             f"{len(labels)} labels")
        wide = np.abs(boxes[:, 2] - boxes[:, 0]) > min_size
        tall = np.abs(boxes[:, 3] - boxes[:, 1]) > min_size
        for box_idx in np.flatnonzero(wide & tall):
            cls = int(labels[box_idx])
            if not 0 <= cls < num_classes:
                raise ValueError(f"select_pgm_instances: label {cls} of image {ann['image_id']} is "
                                 f"outside [0, {num_classes})")
            boxes_by_class_and_image[cls].setdefault(int(ann["image_id"]), []).append(int(box_idx))
    rng = np.random.RandomState(seed)
    selection = {}
    for cls, per_image in enumerate(boxes_by_class_and_image):
        image_ids = list(per_image)
        if len(image_ids) > max_images:
            order = np.arange(len(image_ids))
            rng.shuffle(order)
            image_ids = [image_ids[i] for i in order[:max_images]]
        selection[cls] = [(image_id, box_idx) for image_id in image_ids for box_idx in per_image[image_id]]
    return selection


def group_by_image(selection: Mapping[int, Sequence[tuple[int, int]]]) -> dict[int, list[int]]:
    """``{image_id: [box_idx, ...]}`` of a :func:`select_pgm_instances` result, so each image is run once."""
    per_image: dict[int, list[int]] = {}
    for pairs in selection.values():
        for image_id, box_idx in pairs:
            if box_idx not in per_image.setdefault(image_id, []):
                per_image[image_id].append(box_idx)
    return {image_id: sorted(boxes) for image_id, boxes in per_image.items()}


@torch.no_grad()
def extract_instance_features(fpn_fn: Callable[[torch.Tensor], Sequence[torch.Tensor]], image: torch.Tensor,
                              boxes: torch.Tensor) -> list[torch.Tensor]:
    """Pooled PGM features (L tensors (n, C)) of ``boxes`` (padded-image pixels) on ``fpn_fn(image)``."""
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"extract_instance_features: image must be (1, 3, H, W), got {tuple(image.shape)}")
    return pool_instance_features(list(fpn_fn(image)), boxes, tuple(image.shape[-2:]))


def generate_epoch_prototypes(samples: Iterable, num_classes: int, num_prototypes: int = 10,
                              alpha: float = 10.0, sigma: float = 0.1, quantile: float = 0.4,
                              prev: Prototypes | None = None, finest_stride: int = 4,
                              progress: Callable[[int], object] | None = None) -> Prototypes:
    """The PGM pass of one epoch from per-image features already computed by the caller.

    ``samples`` yields ``(student_feats, teacher_feats, boxes, labels)`` per PGM image: boxes (n, 4) in
    padded test-transform pixels and 0-based labels (n,) of that image's selected instances; each
    ``*_feats`` is a list of L entries, either the FPN map (1, C, H_l, W_l) -- pooled here with the PGM
    crop, the padded image size being ``finest map size * finest_stride`` (exact: images are padded to
    a multiple of 32) -- or the already pooled (n, C) vectors (e.g. teacher features cached after the
    first epoch). ``progress(1)`` is called after each image (``tqdm.update`` fits). Instances keep
    the order of ``samples``; returns ``build_prototypes(...)``.
    """
    feats_s_per_class: list[list[list[torch.Tensor]] | None] = [None] * num_classes
    feats_t_per_class: list[list[list[torch.Tensor]] | None] = [None] * num_classes

    def pooled(feats, boxes, role):
        if all(f.dim() == 2 for f in feats):
            return [f.detach() for f in feats]
        finest = feats[0]
        if finest.dim() != 4:
            raise ValueError(f"generate_epoch_prototypes: {role} features must be all (1, C, H, W) maps "
                             f"or all (n, C) pooled vectors")
        size = (finest.shape[2] * finest_stride, finest.shape[3] * finest_stride)
        return pool_instance_features(feats, boxes, size)

    for student_feats, teacher_feats, boxes, labels in samples:
        if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"generate_epoch_prototypes: labels must be ({boxes.shape[0]},), got "
                             f"{tuple(labels.shape)}")
        if len(student_feats) != len(teacher_feats):
            raise ValueError("generate_epoch_prototypes: student and teacher give different level counts")
        with torch.no_grad():
            per_level_s = pooled(student_feats, boxes, "student")
            per_level_t = pooled(teacher_feats, boxes, "teacher")
        for level, (level_s, level_t) in enumerate(zip(per_level_s, per_level_t)):
            if level_s.shape[0] != boxes.shape[0] or level_t.shape[0] != boxes.shape[0]:
                raise ValueError(f"generate_epoch_prototypes: level {level} pooled features must have one "
                                 f"row per box ({boxes.shape[0]})")
        for cls in labels.unique().tolist():
            if not 0 <= cls < num_classes:
                raise ValueError(f"generate_epoch_prototypes: label {cls} outside [0, {num_classes})")
            rows = (labels == cls).nonzero().flatten()
            for per_class, per_level in ((feats_s_per_class, per_level_s), (feats_t_per_class, per_level_t)):
                if per_class[cls] is None:
                    per_class[cls] = [[] for _ in per_level]
                for level, level_feats in enumerate(per_level):
                    per_class[cls][level].append(level_feats.float().cpu()[rows.cpu()])
        if progress is not None:
            progress(1)

    def stacked(per_class):
        return [None if levels is None else [torch.cat(chunks) for chunks in levels] for levels in per_class]

    return build_prototypes(stacked(feats_s_per_class), stacked(feats_t_per_class), num_prototypes, alpha,
                            prev, sigma, quantile)


# ----------------------------------------------------------------- GKD: one-stage soft-label inputs
def anchor_level_features(feats: Sequence[torch.Tensor], boxes: torch.Tensor, batch_idx: torch.Tensor,
                          strides: Sequence[float], finest_scale: float = 56.0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """RetinaNet's per-anchor inputs of the soft-label robust weights (gkd.md §4): every box pooled
    (:func:`pool_box_features`) on its :func:`map_boxes_to_levels` level of ``feats`` (L maps of strides
    ``strides``). Returns ``(pooled (M, C, 1, 1), levels (M,))`` in the order of ``boxes``, detached."""
    if len(feats) != len(strides):
        raise ValueError(f"anchor_level_features: {len(feats)} feature maps but {len(strides)} strides")
    levels = map_boxes_to_levels(boxes, len(feats), finest_scale)
    pooled = feats[0].new_zeros(boxes.shape[0], feats[0].shape[1])
    with torch.no_grad():
        # each level pools only its own boxes (the others are zero rows at no cost): no host read of levels
        for level, (feat, stride) in enumerate(zip(feats, strides)):
            pooled += pool_box_features(feat, boxes, batch_idx, stride, keep=levels == level).to(pooled.dtype)
    return pooled[:, :, None, None], levels


# ------------------------------------------------------------------------- GKD: the epoch pass
def pgm_annotations(base) -> list[dict]:
    """``{"image_id": index, "boxes", "labels"}`` (original pixels) of every image of a detection base data
    set, without difficult / crowd boxes (training ignores them, so they are no GT instances).

    COCO and VOC keep their boxes in memory (pycocotools index, parsed XML records): decoding all of
    train2017 only to read its boxes would take longer than a PGM pass. Other sets are read sample by sample.
    """
    def kept(index, boxes, labels, difficult):
        keep = ~np.asarray(difficult, dtype=bool)
        return {"image_id": index, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4)[keep],
                "labels": np.asarray(labels, np.int64)[keep]}

    label_of = {category: label for label, category in enumerate(getattr(base, "category_ids", []))}
    annotations = []
    for index in range(len(base)):
        if hasattr(base, "coco"):
            found = base._annotations(base.image_ids[index])
            record = {"boxes": [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in found)],
                      "labels": [label_of[a["category_id"]] for a in found],
                      "difficult": [bool(a.get("iscrowd", 0)) for a in found]}
        elif hasattr(base, "records"):
            record = base.records[index]
        else:
            record = base[index]
        annotations.append(kept(index, record["boxes"], record["labels"], record["difficult"]))
    return annotations


def _evaluation_transform(transform):
    # The training transform without its random flip is the test pipeline of gkd.md §1 (same keep-ratio
    # resize and normalisation).
    if not hasattr(transform, "flip_prob"):
        raise ValueError(f"GKD prototypes: the training set's transform {type(transform).__name__} has no "
                         "flip_prob; expected a detection transform (kd_ref.transforms.DetTransform)")
    evaluation = copy.copy(transform)
    evaluation.flip_prob = 0.0
    return evaluation


class ScheduledGKDDistiller(GKDDistiller):
    """:class:`GKDDistiller` as the training engine drives it (gkd.md §5, §6).

    ``before_epoch(context)``, called by the engine before every epoch:

    * sets the schedule position for the attenuation ``1 - epoch / max_epochs`` (the registry's bind sees
      model outputs only) from the engine's epoch counter: ``context.epoch`` of ``context.epochs``, the
      recipe's epochs (an epoch-based recipe's own count, e.g. COCO 2x: 24), not a count of our own;
    * regenerates the prototypes: PGM instances are selected once (:func:`select_pgm_instances`, fixed
      seed) from the training set's GT boxes; each selected image goes alone through the evaluation
      transform, the collate and the data set's device step (resize, normalise, pad to 32); the teacher's
      pooled features are computed once and cached, the current student's every epoch (eval mode, no
      grad); :func:`generate_epoch_prototypes` then :meth:`set_prototypes`.

    ``level_names`` are the FPN outputs (keys of a detector's ``feats``) the distiller works on. Under DDP
    every rank pools the features of every ``world_size``-th selected image; the pooled vectors are
    all-gathered in selection order and every rank builds the same prototypes on the CPU, so no rank idles
    through a whole pass of another. The schedule position is extra state in ``state_dict``, so a run
    resumed mid-epoch attenuates like an uninterrupted one (the prototypes travel in the parent's keys).
    """

    def __init__(self, level_names: Sequence[str], num_classes: int, pgm_max_images: int = 800, pgm_min_size: float = 30.0, pgm_seed: int = 1,
                 num_prototypes: int = 10, pgm_alpha: float = 10.0, **distiller_options):
        super().__init__(num_levels=len(level_names), **distiller_options)
        self.level_names, self.num_classes = list(level_names), num_classes
        self.pgm_max_images, self.pgm_min_size, self.pgm_seed = pgm_max_images, pgm_min_size, pgm_seed
        self.num_prototypes, self.pgm_alpha = num_prototypes, pgm_alpha
        self.epoch, self.max_epochs = 0, 1
        self._pgm_images: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None
        self._teacher_cache: dict[int, list[torch.Tensor]] = {}

    def get_extra_state(self) -> dict:
        return {"epoch": self.epoch, "max_epochs": self.max_epochs}

    def set_extra_state(self, state: dict) -> None:
        self.epoch, self.max_epochs = int(state["epoch"]), int(state["max_epochs"])

    def forward(self, *inputs, **bound_inputs) -> dict[str, torch.Tensor]:
        return super().forward(*inputs, epoch=self.epoch, max_epochs=self.max_epochs, **bound_inputs)

    def _select_images(self, base) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        annotations = pgm_annotations(base)
        selection = select_pgm_instances(annotations, self.num_classes, self.pgm_min_size, self.pgm_max_images,
                                         self.pgm_seed)
        return [(index, torch.from_numpy(annotations[index]["boxes"][box_ids]),
                 torch.from_numpy(annotations[index]["labels"][box_ids]))
                for index, box_ids in group_by_image(selection).items()]

    def _pooled(self, model, batch: dict, boxes: torch.Tensor) -> list[torch.Tensor]:
        def fpn(images):
            feats = model(images, image_sizes=batch["image_sizes"], predict=False)["feats"]
            return [feats[name] for name in self.level_names]
        return [level.float().cpu() for level in extract_instance_features(fpn, batch["images"], boxes)]

    @torch.no_grad()
    def before_epoch(self, context) -> None:
        runtime, base = context.runtime, context.dataset.base
        self.epoch, self.max_epochs = context.epoch, context.epochs
        if self._pgm_images is None:
            self._pgm_images = self._select_images(base)
        if not self._pgm_images:
            warnings.warn(f"GKD: no training box of width and height > {self.pgm_min_size} px; prototypes are "
                          "not generated (binary masks, unweighted soft labels). Lower method option "
                          "pgm_min_size for small images.")
            return
        transform = _evaluation_transform(context.dataset.transform)
        was_training = context.student.training
        context.student.eval()
        positions = range(runtime.rank, len(self._pgm_images), runtime.world_size)
        records = []
        for position in tqdm(positions, desc=f"GKD prototypes, epoch {context.epoch}", disable=not runtime.is_main,
                             leave=False, dynamic_ncols=True):
            index, boxes, labels = self._pgm_images[position]
            image, input_boxes, _, meta = transform(base[index]["image"], boxes.numpy(), None)
            batch = context.collate([{"image": image, "target": meta}])
            batch = context.dataset.prepare_batch({**batch, "images": batch["images"].to(runtime.device)})
            if position not in self._teacher_cache:
                self._teacher_cache[position] = self._pooled(context.teacher, batch, input_boxes)
            records.append((position, self._pooled(context.student, batch, input_boxes),
                            self._teacher_cache[position], input_boxes, labels))
        context.student.train(was_training)
        if runtime.world_size > 1:
            shards = [None] * runtime.world_size
            dist.all_gather_object(shards, records)
            records = sorted((record for shard in shards for record in shard), key=lambda record: record[0])
        self.set_prototypes(*generate_epoch_prototypes(
            [(student, teacher, boxes, labels) for _, student, teacher, boxes, labels in records],
            self.num_classes, self.num_prototypes, self.pgm_alpha, prev=self.prototypes))


# ------------------------------------------------------------------------------- SoKD: the search
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _mean_over_processes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` averaged in place over the torch.distributed processes (unchanged in one process)."""
    if _distributed():
        for tensor in tensors:
            dist.all_reduce(tensor)
            tensor /= dist.get_world_size()
    return tensors


class SoKDSearch:
    """The policy search (section 2.5 of the spec): the engine's per-iteration hook for SoKD.

    Build once: ``SoKDSearch(distiller, student, search_iters)``; it owns the Adam optimizer of
    ``distiller.policy_parameters()``. Inner parameters theta = the student's trainable parameters +
    ``distiller.student_side_parameters()`` + the parameters of the plugged-in ``base`` method, if any.

    Call ``step(batch, loss_fn)`` once per training iteration, right after the student's
    ``optimizer.step()``, with that iteration's batch (never between the student's forward and backward:
    it rewrites theta in place and restores it). While fewer than ``search_iters`` steps have searched
    (None: always) it estimates grad_alpha ("unrolled": 4 calls of ``loss_fn``; "first_order": 1) and
    takes an Adam step; then it always resamples the policy.

    ``loss_fn(batch) -> Tensor``: the full training objective on ``batch`` (task losses + every
    distiller loss, i.e. ``sum(student_out["losses"]) + sum(distiller(**bound))``) evaluated with the
    CURRENT parameters, student in train mode, autograd enabled. The teacher's outputs are constants and
    may be cached from the student step. It must not backprop, step or resample. Dropout/BN randomness
    and BN statistics are isolated: every call starts from the same RNG state and buffers are restored.

    ``state_dict()`` / ``load_state_dict()`` hold the Adam state and the step count (for checkpoints).
    """

    def __init__(self, distiller: SoKDDistiller, student: nn.Module, search_iters: int | None = None, *,
                 base: nn.Module | None = None, lr: float = 3e-4, betas: tuple[float, float] = (0.5, 0.999), weight_decay: float = 1e-3,
                 unroll_lr: float = 0.01, unroll_weight_decay: float = 1e-4, fd_radius: float = 0.01):
        if not isinstance(distiller, SoKDDistiller):
            raise ValueError(f"SoKDSearch: distiller must be a SoKDDistiller, got {type(distiller).__name__}")
        if search_iters is not None and search_iters < 0:
            raise ValueError(f"SoKDSearch: search_iters must be >= 0 or None, got {search_iters}")
        self.distiller, self.search_iters = distiller, search_iters
        self.unroll_lr, self.unroll_weight_decay, self.fd_radius = unroll_lr, unroll_weight_decay, fd_radius
        self.policy_params = distiller.policy_parameters()
        policy_ids = {id(p) for p in self.policy_params}
        inner, seen = [], set()
        side_modules = () if base is None else (base,)
        for p in itertools.chain(student.parameters(), distiller.student_side_parameters(),
                                 *(module.parameters() for module in side_modules)):
            if p.requires_grad and id(p) not in seen:
                inner.append(p)
                seen.add(id(p))
        if policy_ids & seen:
            raise ValueError("SoKDSearch: the student's parameters include the SoKD policy parameters")
        self.inner_params = inner
        # modules, not their buffers: Module.to() on CUDA replaces buffer tensors, so they are looked up
        # when a search step saves and restores them
        self.modules = (student, distiller, *side_modules)
        self.optimizer = torch.optim.Adam(self.policy_params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.steps = 0

    @property
    def buffers(self) -> list[torch.Tensor]:
        """The buffers of the student, the distiller and the base as they are now."""
        return [b for module in self.modules for b in module.buffers()]

    @property
    def searching(self) -> bool:
        return self.search_iters is None or self.steps < self.search_iters

    def _evaluate(self, batch, loss_fn) -> torch.Tensor:
        devices = sorted({p.device.index for p in self.inner_params if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=devices):
            loss = loss_fn(batch)
        if not torch.is_tensor(loss) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError("SoKDSearch: loss_fn(batch) must return a scalar tensor with autograd history")
        if not torch.isfinite(loss).all():
            raise FloatingPointError(f"SoKDSearch: loss_fn(batch) returned a non-finite loss ({loss.item()})")
        return loss.float().reshape(())

    def _theta_grads(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """grad_theta of the whole (global) batch's objective: per-process gradients averaged under DDP."""
        grads = torch.autograd.grad(loss, self.inner_params, allow_unused=True)
        return _mean_over_processes([torch.zeros_like(p) if g is None else g
                                     for p, g in zip(self.inner_params, grads)])

    def _relax_grads(self, batch, loss_fn) -> list[torch.Tensor]:
        loss = self._evaluate(batch, loss_fn)
        value, = _mean_over_processes([loss.detach().clone()])
        return self.distiller.policy.relax_grads(loss, value=value)

    @torch.no_grad()
    def _shift_theta(self, direction: list[torch.Tensor], scale: float) -> None:
        for p, d in zip(self.inner_params, direction):
            p.add_(d, alpha=scale)

    def policy_gradients(self, batch, loss_fn) -> list[torch.Tensor]:
        """grad_alpha aligned with ``distiller.policy_parameters()``; theta and buffers are left as found."""
        saved_params = [p.detach().clone() for p in self.inner_params]
        saved_buffers = [b.detach().clone() for b in self.buffers]
        try:
            if self.distiller.search_mode == "first_order":
                return self._relax_grads(batch, loss_fn)
            return self._unrolled_gradients(batch, loss_fn, saved_params, saved_buffers)
        finally:
            self._restore(saved_params, saved_buffers)

    def _unrolled_gradients(self, batch, loss_fn, saved_params, saved_buffers) -> list[torch.Tensor]:
        # theta', v, ||v|| and eps come from gradients averaged over the processes: every process unrolls
        # and perturbs the same parameters along the same direction, as one process over the global
        # batch does, and all take the same ||v|| == 0 branch
        grads = self._theta_grads(self._evaluate(batch, loss_fn))
        with torch.no_grad():
            for p, g in zip(self.inner_params, grads):
                p.sub_(self.unroll_lr * (g + self.unroll_weight_decay * p))
        v = self._theta_grads(self._evaluate(batch, loss_fn))
        self._restore(saved_params, saved_buffers)
        v_norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in v)))
        if v_norm == 0.0:   # theta' is stationary: no implicit gradient, only Q's fit at theta
            at_theta = self._relax_grads(batch, loss_fn)
            return [torch.zeros_like(g) for g in at_theta[:3]] + at_theta[3:]
        eps = self.fd_radius / v_norm
        self._shift_theta(v, eps)
        plus = self._relax_grads(batch, loss_fn)
        self._shift_theta(v, -2 * eps)
        minus = self._relax_grads(batch, loss_fn)
        implicit = [-(gp - gm) / (2 * eps) for gp, gm in zip(plus[:3], minus[:3])]
        return implicit + [(gp + gm) / 2 for gp, gm in zip(plus[3:], minus[3:])]

    @torch.no_grad()
    def _restore(self, saved_params, saved_buffers) -> None:
        for p, saved in zip(self.inner_params, saved_params):
            p.copy_(saved)
        for b, saved in zip(self.buffers, saved_buffers):
            b.copy_(saved)

    def step(self, batch, loss_fn: Callable) -> None:
        """Search (while ``searching``) and resample. Under torch.distributed every gradient and objective
        value of the search is averaged over the processes before it is used (the search of one process
        over the global batch, given equal per-process batches) and process 0's new sample is used by
        all, so the policy stays shared."""
        if self.searching:
            grads = [g.detach().to(p.dtype) for p, g in zip(self.policy_params, self.policy_gradients(batch, loss_fn))]
            for p, g in zip(self.policy_params, _mean_over_processes(grads)):
                p.grad = g
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.distiller.resample()
        if _distributed():
            for sample_buffer in self.distiller.policy.buffers():
                dist.broadcast(sample_buffer, src=0)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"optimizer", "steps"}:
            raise ValueError(f"SoKDSearch.load_state_dict: expected keys ['optimizer', 'steps'], got {sorted(state)}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])


# ------------------------------------------------------------------------------ SoKD: the plug-in
def _prefixed_base_losses(out) -> dict:
    if torch.is_tensor(out):
        return {"loss_sokd_base": out}
    if not isinstance(out, dict) or not all(isinstance(key, str) and key.startswith("loss_") for key in out):
        raise ValueError(f"SoKDPlugin: the base must return a tensor or a dict with 'loss_*' keys, got "
                         f"{sorted(out) if isinstance(out, dict) else type(out).__name__}")
    return {"loss_sokd_base_" + key[len("loss_"):]: value for key, value in out.items()}


class BoundBase(nn.Module):
    """A base distiller together with its registry bind for one task: called with the engine's model
    outputs and batch, it returns the base's weighted losses (``bind(student_out, teacher_out, batch)``
    gives the base's ``forward`` arguments, as ``kd_ref.configs.METHODS[name].bind[task]`` does)."""

    def __init__(self, distiller: nn.Module, bind: Callable[..., dict]):
        super().__init__()
        for hook in ("extra_parameters", "extra_optimizer", "before_epoch", "after_step"):
            if hasattr(distiller, hook):
                raise ValueError(f"BoundBase: a SoKD base must be a plain loss; {type(distiller).__name__} "
                                 f"has the engine hook {hook}()")
        self.distiller, self.bind = distiller, bind

    def forward(self, student_out: dict, teacher_out: dict, batch: dict):
        return self.distiller(**self.bind(student_out, teacher_out, batch))


class SoKDPlugin(nn.Module):
    """SoKD as the training engine sees it: :class:`~kd_ref.sokd.SoKDDistiller` on the feature ``tap`` of
    the model outputs (``feats[tap]`` of student and teacher), plus an optional base method (a
    :class:`BoundBase`, evaluated in the same forward, its terms returned as ``loss_sokd_base_<name>`` for
    each ``loss_<name>``, or ``loss_sokd_base`` for a tensor), with the policy search of
    :class:`SoKDSearch` run through the engine's hooks:

    - ``extra_parameters()``: the policy parameters, which the student optimizer must leave alone;
    - ``after_step(context)``: one search step (while searching) and a resample, right after the
      student's optimizer step, with the iteration's batch and ``context.loss_fn`` (the full objective);
    - ``get_extra_state()`` / ``set_extra_state()``: the search's Adam state and step count and the current
      policy sample (the non-persistent buffers of ``AugmentPolicy``), so a resumed run continues
      with the same sample and optimizer state as an uninterrupted one.

    ``student`` is the module the engine trains (its parameters are the search's inner theta, with the
    SoKD modules' and the base's); ``search_iters`` (None: the whole run) and ``search_options`` go to
    :class:`SoKDSearch`, the other keyword arguments to ``SoKDDistiller``.
    """

    def __init__(self, student: nn.Module, s_shape, t_shape, num_heat: int, tap: str,
                 base: BoundBase | None = None, search_iters: int | None = None,
                 search_options: dict | None = None, **distiller_options):
        super().__init__()
        self.tap = tap
        self.sokd = SoKDDistiller(s_shape, t_shape, num_heat, **distiller_options)
        self.base = base
        # a plain attribute, not a submodule: the search refers to the student, which is not ours to save
        self.search = SoKDSearch(self.sokd, student, search_iters, base=base, **(search_options or {}))

    def extra_repr(self) -> str:
        return f"tap={self.tap!r}, search_iters={self.search.search_iters}"

    def forward(self, student_out: dict, teacher_out: dict, batch: dict) -> dict:
        for role, out in (("student", student_out), ("teacher", teacher_out)):
            if self.tap not in out.get("feats", {}):
                raise ValueError(f"SoKDPlugin: the {role} outputs have no feature {self.tap!r}; available: "
                                 f"{sorted(out.get('feats', {}))}")
        losses = self.sokd(student_out["feats"][self.tap], teacher_out["feats"][self.tap])
        if self.base is None:
            return losses
        return {**losses, **_prefixed_base_losses(self.base(student_out, teacher_out, batch))}
    def extra_parameters(self) -> list[nn.Parameter]:
        return self.sokd.policy_parameters()

    def after_step(self, context) -> None:
        self.search.step(context.batch, context.loss_fn)

    def get_extra_state(self) -> dict:
        sample = {name: buffer.detach().clone() for name, buffer in self.sokd.policy.named_buffers()}
        return {"search": self.search.state_dict(), "policy_sample": sample}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"search", "policy_sample"}:
            raise ValueError(f"SoKDPlugin: extra state must have keys ['policy_sample', 'search'], got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        self.search.load_state_dict(state["search"])
        buffers = dict(self.sokd.policy.named_buffers())
        if set(state["policy_sample"]) != set(buffers):
            raise ValueError(f"SoKDPlugin: policy sample has buffers {sorted(state['policy_sample'])}, "
                             f"expected {sorted(buffers)}")
        with torch.no_grad():
            for name, value in state["policy_sample"].items():
                buffers[name].copy_(value)
