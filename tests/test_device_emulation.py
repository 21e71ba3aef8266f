"""Device placement on a CPU: the device half of every task's pipeline, every model of the synthetic presets
and every distiller the registry binds, run on tensors of an emulated accelerator.

CUDA refuses an operation whose tensors sit on different devices, except a 0-dim CPU tensor (a scalar)
meeting device tensors, CPU indices of advanced indexing and cross-device copies. A CPU run cannot see a
constant built without ``device=`` (``torch.tensor(mean)`` in the normalisation) meeting a device batch,
which stops a CUDA run at its first batch. The emulated device makes the CPU apply CUDA's rule:

* its tensors (:class:`EmulatedTensor`) report the ``meta`` device and hold their values in a CPU tensor, so
  data-dependent code (target assignment, sampling, NMS, ``.item()``, ``.tolist()``) runs as on a GPU; the
  meta device stands in for CUDA because this torch is a CUDA build without a driver: a tensor reporting
  ``cuda`` initialises CUDA in autograd and in every factory call, and aborts;
* :class:`EmulatedDevice` (a dispatch mode) sees every aten operation: it refuses one where a CPU tensor
  CUDA would refuse meets an emulated one (:class:`DeviceMismatch`, naming the operation), runs the rest on
  the held CPU values and places the results on the emulated device; factories and ``.to()`` with
  ``device=meta`` (``move_to(batch, device)``, ``model.to(device)``, ``torch.zeros(..., device=x.device)``)
  make emulated tensors, as they would make CUDA ones;
* generators follow CUDA's rule too: a random op on the device takes a generator made for the device
  (``torch.Generator(device)``, emulated here by a CPU generator that reports the device,
  :class:`DeviceGenerator`) and a CPU op a CPU one.

Covered: ``prepare_batch`` of the seg (training with flips and photometric distortion, evaluation), det
(with a resize on the device, training and evaluation), cls, ins and depth data sets of the synthetic
presets, compared with the CPU's values; for each model of the synthetic presets and one of each other
head or trunk family (DeepLabV3, the ImageNet ResNet, the wide ResNet, Faster R-CNN and depth on
MobileNetV2, FCOS on a ResNet, the regression depth head): the training forward (target assignment and
sampling included, and for detectors and instance models an image without objects) and the evaluation
(``engine.evaluate``: device step, inference forward, metric updates); for every task x method pair the
registry binds, at the synthetic presets' options: the teacher's forward (``engine.teacher_forward``, which
scores a two-stage student's RoIs), the binding, the distiller, GKD's prototype pass (``before_epoch``)
and SoKD's policy search step (``after_step``, whose objective is ``engine.forward_losses``); and SKD's
holistic term with its critic's losses (the adversary's), under both presets (the synthetic presets turn
it off: it needs 64x64 maps).

Not covered: the engine's own loop (optimizer steps, gradient clipping, the loss read-back, the
GradScaler, DDP and SyncBatchNorm, channels-last); backward passes other than the gradients SoKD's search
and SKD's gradient penalty take (autograd's formulas follow the devices of the forward, which is checked);
autocast (``--amp``: ``torch.autocast`` of the meta device is patched to the CPU's, and the code only ever
disables it there); the data loader's worker half (CPU by design); branches the synthetic data does not
reach (e.g. a GKD class without prototypes, SoKD ops other than the sampled ones); and what only real
CUDA shows: kernels, streams, synchronisations and the device's own resize values (the CPU's float resize
stands in, on the code path a GPU takes). Models with a ResNet-50/101 or ResNeXt trunk are not built, to
keep this module fast: their trunks are convolutions, BatchNorm and sums, as the R18's.
"""
from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing

from kd_ref import engine, methods, tasks, transforms
from kd_ref.distiller import EpochContext, StepContext, uses_hook
from kd_ref.skd import DepthSKDDistiller, SKDDistiller
from kd_ref.presets import PRESETS
from kd_ref.presets_seg import SKD_ORIGINAL_OPTIONS
from kd_ref.recipe import Recipe
from kd_ref.runtime import Runtime

DEVICE = torch.device("meta")
CPU = torch.device("cpu")
ATEN = torch.ops.aten
# CUDA accepts CPU index tensors in advanced indexing (it moves them), and copies across devices
INDEX_OPS = {ATEN.index.Tensor, ATEN.index_put.default, ATEN.index_put_.default, ATEN._index_put_impl_.default,
             ATEN._unsafe_index.Tensor}
CROSS_DEVICE_OPS = {ATEN.copy_.default, ATEN._to_copy.default}
# a CPU scalar joins device tensors in elementwise ops only; concatenating it is refused
TENSOR_LIST_OPS = {ATEN.cat.default, ATEN.stack.default}


class DeviceMismatch(RuntimeError):
    """What CUDA raises as 'Expected all tensors to be on the same device'."""


class EmulatedTensor(torch.Tensor):
    """A tensor on the emulated device: reports ``DEVICE``, holds its values in the CPU tensor ``held``."""

    @staticmethod
    def __new__(cls, held: torch.Tensor):
        # autograd tracks the wrapper (it sets requires_grad); the held tensor never has a graph
        tensor = torch.Tensor._make_wrapper_subclass(cls, held.shape, strides=held.stride(),
                                                     storage_offset=held.storage_offset(), dtype=held.dtype,
                                                     layout=held.layout, device=DEVICE)
        tensor.held = held
        return tensor

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"EmulatedTensor({self.held!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return run_on_emulated_device(func, args, kwargs or {})


REAL_GENERATOR, REAL_AUTOCAST = torch.Generator, torch.autocast


class DeviceGenerator(torch.Generator):
    """A generator made for the emulated device: it draws as a CPU one and reports the device."""

    @property
    def device(self) -> torch.device:
        return DEVICE


def device_generator(device=CPU) -> torch.Generator:
    """``torch.Generator(device)``, with a :class:`DeviceGenerator` for the emulated device."""
    return DeviceGenerator(CPU) if torch.device(device) == DEVICE else REAL_GENERATOR(device)


def device_autocast(device_type: str, *args, **kwargs):
    """``torch.autocast`` has no meta device; the code only disables autocast per device, as on the CPU."""
    return REAL_AUTOCAST("cpu" if device_type == DEVICE.type else device_type, *args, **kwargs)


def check_devices(func, args, kwargs) -> None:
    """Raise :class:`DeviceMismatch` where CUDA would refuse ``func`` on these tensors."""
    leaves = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
    if func in CROSS_DEVICE_OPS or not any(isinstance(leaf, EmulatedTensor) for leaf in leaves):
        return
    indices = {id(leaf) for leaf in pytree.tree_leaves(args[1])} if func in INDEX_OPS else set()
    for leaf in leaves:
        if isinstance(leaf, EmulatedTensor) or id(leaf) in indices:
            continue
        if leaf.device == CPU and leaf.dim() == 0 and func not in TENSOR_LIST_OPS:
            continue
        raise DeviceMismatch(f"{func}: a {leaf.device.type} tensor of shape {tuple(leaf.shape)} meets a "
                             "tensor on the device")


def run_on_emulated_device(func, args, kwargs):
    """Run ``func`` on the held CPU values, its results on the emulated device if it has an emulated input or
    is asked for that device (``device=``), after :func:`check_devices`."""
    target = kwargs.get("device")
    if target is not None:
        on_device = torch.device(target) == DEVICE
        kwargs = {**kwargs, "device": CPU if on_device else target}
    else:
        on_device = any(isinstance(leaf, EmulatedTensor) for leaf in pytree.tree_leaves((args, kwargs)))
    check_devices(func, args, kwargs)
    held_args, held_kwargs = pytree.tree_map_only(EmulatedTensor, lambda tensor: tensor.held, (args, kwargs))
    out = func(*held_args, **held_kwargs)
    if not on_device:
        return out
    return return_and_correct_aliasing(func, args, kwargs, pytree.tree_map_only(torch.Tensor, EmulatedTensor, out))


class EmulatedDevice(TorchDispatchMode):
    """Every aten operation through :func:`run_on_emulated_device`, so that factories see ``device=meta``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return run_on_emulated_device(func, args, kwargs or {})


# they copy Python data to the device below the dispatcher, where no mode sees it: a real meta tensor
FROM_DATA = {torch.tensor, torch.as_tensor, torch.Tensor.new_tensor}


class DeviceFunctions(torch.overrides.TorchFunctionMode):
    """What the dispatcher does not see: ``.tolist()`` of a device tensor reads its values (tensor subclasses
    have no ``tolist``), tensors from Python data on the device (``FROM_DATA``) are made on the CPU and moved,
    and a generator draws for its own device (checked here, where the generator is still the caller's
    object: the dispatcher hands :class:`EmulatedDevice` a plain one)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], EmulatedTensor):
            return args[0].held.tolist()
        if func in FROM_DATA:
            default = args[0].device if func is torch.Tensor.new_tensor else CPU
            if torch.device(kwargs.get("device") or default) == DEVICE:
                return func(*args, **{**kwargs, "device": CPU}).to(DEVICE)
        generator = kwargs.get("generator")
        if generator is not None:
            device = kwargs.get("device")
            for_device = torch.device(device) == DEVICE if device is not None else \
                any(isinstance(leaf, EmulatedTensor) for leaf in pytree.tree_leaves(args))
            if for_device != isinstance(generator, DeviceGenerator):
                raise DeviceMismatch(f"{func.__name__}: a {'CPU' if for_device else 'device'} generator draws "
                                     f"for the {'device' if for_device else 'CPU'}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def emulated_device():
    """The emulated device's rules in force. ``Module.to(device)`` keeps each parameter's Python object, as it
    does on CUDA (where it assigns ``.data``; a tensor subclass swaps the object's contents instead), so that
    what holds parameters from before the move (SoKD's search, optimizers) sees the moved ones."""
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with mock.patch.object(torch, "Generator", device_generator), \
                mock.patch.object(torch, "autocast", device_autocast), EmulatedDevice(), DeviceFunctions():
            yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny and the operations many: one thread runs them about as fast as two, and
    never waits on a second one descheduled on a busy machine (several times slower there)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def on_device(value) -> bool:
    """Every tensor in ``value`` (nested) is on the emulated device."""
    tensors = [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]
    return bool(tensors) and all(isinstance(tensor, EmulatedTensor) for tensor in tensors)


def held(value):
    return pytree.tree_map_only(EmulatedTensor, lambda tensor: tensor.held, value)


# ----------------------------------------------------------------------------------- the emulator
def test_the_emulated_device_refuses_what_cuda_refuses():
    with emulated_device():
        images = torch.rand(2, 3, 4, 4).to(DEVICE)
        with pytest.raises(DeviceMismatch, match="aten.sub.Tensor: a cpu tensor of shape \\(3, 1, 1\\)"):
            images - torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1)
        with pytest.raises(DeviceMismatch, match="aten.cat"):
            torch.cat([images.flatten(), torch.zeros(1)])
        with pytest.raises(DeviceMismatch, match="CPU generator"):
            torch.randperm(4, generator=torch.Generator().manual_seed(0), device=images.device)
        with pytest.raises(RuntimeError, match="numpy"):  # CUDA: can't convert cuda:0 device type tensor
            images.numpy()


def test_the_emulated_device_allows_what_cuda_allows():
    with emulated_device():
        images = torch.rand(2, 3, 4, 4).to(DEVICE)
        shifted = images - torch.tensor(1.0)                                 # a CPU scalar
        picked = images[torch.tensor([1, 0])]                                # CPU indices
        images[0, 0] = torch.ones(4, 4)                                      # a copy from the CPU
        made = [torch.zeros(3, device=images.device), torch.tensor([1.0], device=images.device),
                torch.as_tensor([1.0], device=images.device), images.new_tensor([1.0])]
        order = torch.randperm(4, generator=torch.Generator(images.device).manual_seed(0), device=images.device)
        assert all(map(on_device, (shifted, picked, *made, order)))
        assert images.held[0, 0].eq(1).all() and images.cpu().device == CPU and images.tolist()[0][0][0] == [1.0] * 4
        assert (images > 2).nonzero().numel() == 0 and isinstance(images.sum().item(), float)


# ----------------------------------------------------------------------------------- device steps
def preset(name: str, **changes) -> Recipe:
    return dataclasses.replace(PRESETS[name], **changes)


# A few synthetic scenes (GKD's prototype pass reads every training box; evaluation, every validation one),
# det at 96 of the 128-pixel scenes (a resize on the device, and still the 2x2 P6 map SoKD's 8 regions need)
# and 16 RoIs per image (the presets' 128 make the fc RoI head most of a two-stage step)
SMALL_DATA = {"synthetic_train": 8, "synthetic_val": 2}
TASK_SIZES = {"det": {"image_scale": (96, 96), "rcnn_rois_per_image": 16},
              "ins": {"rcnn_rois_per_image": 16}}


def small(recipe: Recipe, **changes) -> Recipe:
    return dataclasses.replace(recipe, **SMALL_DATA, **TASK_SIZES.get(recipe.task, {}), **changes)


DEVICE_STEP_RECIPES = {
    "seg": small(preset("synthetic_seg_none", photometric_distortion=True)),
    "det": small(preset("synthetic_det_retinanet_none")),
    "cls": small(preset("synthetic_cls_none")),
    "ins": small(preset("synthetic_ins_solo_none")),
    "depth": small(preset("synthetic_depth_none")),
}
BATCH = 2


def collated(recipe: Recipe, split: str, count: int = BATCH) -> tuple:
    """The data set of ``split`` and a collated batch of its first ``count`` samples, or all of a smaller set
    (CPU, as a worker makes it)."""
    dataset, collate = tasks.TASKS[recipe.task].build_data(recipe, split, None)
    samples = range(min(count, len(dataset)))
    return dataset, collate([dataset.get(index, np.random.default_rng(index)) for index in samples])


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("task", sorted(DEVICE_STEP_RECIPES))
def test_device_step(task, split):
    # four training samples: seeds 0-3 flip two of them (seg, det, cls) and distort them (seg)
    dataset, batch = collated(DEVICE_STEP_RECIPES[task], split, count=4)
    expected = dataset.prepare_batch(batch)
    with emulated_device():
        prepared = dataset.prepare_batch(engine.move_to(batch, DEVICE))
    assert on_device(prepared["images"])
    # the device resizes in float, rounded: within one intensity level of the CPU's uint8 kernel, in the
    # normalised units of the images (1 / min(std): about 0.0175 under the ImageNet statistics)
    level = 1.0 / min(transforms.NORMALIZATIONS[DEVICE_STEP_RECIPES[task].normalization]["std"]) + 1e-6
    torch.testing.assert_close(held(prepared["images"]), expected["images"], atol=level, rtol=0)
    torch.testing.assert_close(held(prepared["targets"]), expected["targets"])


# -------------------------------------------------------------------------------- models, distillers
MAX_DETECTIONS = 10  # per image in evaluation (the models' 100): Mask R-CNN's mask head runs once per detection
SYNTHETIC = sorted(name for name in PRESETS if name.startswith("synthetic_") and not name.endswith("_teacher"))
# every model of the synthetic presets (their teachers are the same architectures) ...
MODEL_RECIPES = {PRESETS[name].student: small(PRESETS[name])
                 for name in SYNTHETIC if name.endswith("_none")}
MODEL_RECIPES["resnet20"] = dataclasses.replace(MODEL_RECIPES["resnet8"], student="resnet20")
# ... and one of each other head or trunk family, on the same data
MODEL_RECIPES.update({
    "deeplabv3_r18": dataclasses.replace(MODEL_RECIPES["pspnet_r18"], student="deeplabv3_r18"),
    "resnet18": dataclasses.replace(MODEL_RECIPES["resnet8"], student="resnet18"),
    "wrn_16_1": dataclasses.replace(MODEL_RECIPES["resnet8"], student="wrn_16_1"),
    "faster_rcnn_mv2": dataclasses.replace(MODEL_RECIPES["faster_rcnn_r18"], student="faster_rcnn_mv2"),
    "fcos_r18": dataclasses.replace(MODEL_RECIPES["fcos_mv2_c64"], student="fcos_r18"),
    "depth_mv2": dataclasses.replace(MODEL_RECIPES["depth_r18"], student="depth_mv2"),
    "depth_r18 regression": dataclasses.replace(MODEL_RECIPES["depth_r18"], model_options={
        **MODEL_RECIPES["depth_r18"].model_options, "prediction": "regression"}),
})
# every task x method pair the registry binds, at the synthetic presets' options
DISTILLATION_PRESETS = [name for name in SYNTHETIC if PRESETS[name].method != "none"]


@pytest.fixture(scope="module")
def built():
    """``built(recipe)``: the recipe's student (training mode) and teacher (as the engine holds one) on the
    emulated device, a prepared training batch there, the student's training outputs on it and the teacher's
    (``engine.teacher_forward``, which scores a two-stage student's RoIs); each made once per module, as the
    models and data of the synthetic presets repeat across methods. Call it inside :func:`emulated_device`."""
    cache = {}

    def get(recipe: Recipe) -> dict:
        task = tasks.TASKS[recipe.task]
        key = (recipe.task, recipe.student, recipe.teacher, tuple(sorted(recipe.model_options.items())))
        if key not in cache:
            torch.manual_seed(0)
            dataset, batch = collated(recipe, "train")
            batch = dataset.prepare_batch(engine.move_to(batch, DEVICE))
            student = task.build_model(recipe, recipe.student).to(DEVICE).train()
            for module in student.modules():
                if hasattr(module, "max_dets"):
                    module.max_dets = MAX_DETECTIONS
            student_out = student(batch["images"], batch["targets"], batch.get("image_sizes"))
            cache[key] = {"student": student, "batch": batch, "student_out": student_out}
        entry = cache[key]
        if recipe.method != "none" and "teacher" not in entry:
            entry["teacher"] = task.build_model(recipe, recipe.teacher).to(DEVICE).eval().requires_grad_(False)
            entry["teacher_out"] = engine.teacher_forward(entry["teacher"], entry["batch"], entry["student_out"])
        return entry
    return get


@pytest.mark.parametrize("name", sorted(MODEL_RECIPES))
def test_model_forward(name, built):
    """The training forward (task losses) and the evaluation (``engine.evaluate``: the evaluation split's
    device step, the inference forward, the task's metric updates) on the device."""
    recipe = MODEL_RECIPES[name]
    task = tasks.TASKS[recipe.task]
    with emulated_device():
        entry = built(recipe)
        val_set, collate = task.build_data(recipe, "val", None)
        metrics = engine.evaluate(task, entry["student"], val_set, collate, Runtime(DEVICE), recipe,
                                  workers=0, quiet=True)
        entry["student"].train()
    assert entry["student_out"]["losses"] and on_device(entry["student_out"]["losses"])
    assert task.main_metric in metrics


def without_objects(target: dict) -> dict:
    """A detection or instance target with no object (an image of background only)."""
    return {**target, **{key: target[key][:0] for key in ("boxes", "labels", "difficult", "masks") if key in target}}


@pytest.mark.parametrize("name", [name for name, recipe in MODEL_RECIPES.items() if recipe.task in ("det", "ins")
                                  and name in {PRESETS[preset].student for preset in SYNTHETIC}])
def test_training_forward_on_an_image_without_objects(name, built):
    """Target assignment's branch for an image without ground truth, which the scenes never draw."""
    with emulated_device():
        entry = built(MODEL_RECIPES[name])
        batch = entry["batch"]
        targets = [batch["targets"][0], without_objects(batch["targets"][1])]
        out = entry["student"](batch["images"], targets, batch.get("image_sizes"))
    assert out["losses"] and on_device(out["losses"])


@pytest.mark.parametrize("name", DISTILLATION_PRESETS)
def test_distiller_forward(name, built):
    """The step's distillation (what ``engine.forward_losses`` adds to the task losses: the teacher's forward,
    the binding, the distiller); GKD's prototype pass and SoKD's policy search step, the engine's hooks of
    those two. No synthetic preset has an adversary (SKD's holistic term: :func:`test_skd_holistic_terms`)."""
    options = {"pgm_max_images": 2} if PRESETS[name].method == "gkd" else {}
    recipe = small(PRESETS[name], method_options={**PRESETS[name].method_options, **options})
    method = methods.METHODS[recipe.method]
    runtime = Runtime(DEVICE)
    with emulated_device():
        entry = built(recipe)
        student, teacher, batch = entry["student"], entry["teacher"], entry["batch"]
        distiller = method.build(recipe, student, teacher).to(DEVICE)
        bind = method.bind[recipe.task]
        if uses_hook(distiller, "before_epoch"):
            dataset, collate = tasks.TASKS[recipe.task].build_data(recipe, "train", None)
            distiller.before_epoch(EpochContext(0, student, teacher, dataset, collate, runtime, 1))
            assert recipe.method != "gkd" or distiller.prototypes is not None
        bound = bind(entry["student_out"], entry["teacher_out"], batch)
        losses = distiller(**bound)
        assert losses and on_device(losses)
        objective = engine.search_objective(student, teacher, distiller, bind, entry["teacher_out"],
                                            recipe.task_loss_weight)
        distiller.after_step(StepContext(0, batch, student, teacher, objective, runtime))


@pytest.mark.parametrize("options", [{}, SKD_ORIGINAL_OPTIONS], ids=["cirkd", "original"])
def test_skd_holistic_terms(options):
    """The adversarial term and its critic (with the gradient penalty of the authors' options, a gradient
    taken in the forward), which the synthetic presets leave out (their maps are smaller than the critic's
    64x64), on made-up 64x64 maps; and the depth form's holistic term on the log depth."""
    generator = torch.Generator().manual_seed(0)
    logits_s, logits_t = (torch.randn(2, 3, 64, 64, generator=generator) for _ in range(2))
    feats_s, feats_t = (torch.randn(2, 8, 64, 64, generator=generator) for _ in range(2))
    with emulated_device():
        seg = SKDDistiller(3, **options, use_ho=True).to(DEVICE)
        depth = DepthSKDDistiller(3, use_ho=True).to(DEVICE)
        inputs = [tensor.to(DEVICE) for tensor in (logits_s, logits_t, feats_s, feats_t)]
        log_depth = [tensor[:, :1].to(DEVICE) for tensor in (logits_s, logits_t)]
        for distiller, arguments in ((seg, inputs), (depth, [*inputs, *log_depth])):
            losses, extra = distiller(*arguments), distiller.extra_losses(*arguments)
            assert on_device(losses) and on_device(extra) and extra
