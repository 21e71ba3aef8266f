"""Every preset, by name: the rows of the per-task preset modules (``kd_ref/presets_<task>.py``, grouped
there by paper, each row with its ``source``), which bare ``--task/--method/--data`` flags mean, and the
listing of ``train.py --list-presets``. Torch-free, as the modules it reads: listing presets and refusing
an unknown name need no model code. Adding a preset is an edit of one preset module; the registries of
``kd_ref.tasks`` and ``kd_ref.methods`` never change for it."""
from __future__ import annotations

import dataclasses

from kd_ref import cli, presets_cls, presets_depth, presets_det, presets_ins, presets_seg
from kd_ref.recipe import Recipe, reference_launch

PRESET_MODULES = (presets_seg, presets_cls, presets_det, presets_ins, presets_depth)


def _merge(tables: list) -> dict:
    """One dict of the modules' tables; a name (or flag combination) two modules define is an error."""
    merged = {}
    for table in tables:
        repeated = sorted(map(str, merged.keys() & table.keys()))
        if repeated:
            raise ValueError(f"presets defined twice: {repeated}")
        merged.update(table)
    return merged


PRESETS: dict[str, Recipe] = _merge([module.PRESETS for module in PRESET_MODULES])
# Which preset a bare "--task T --method M [--data D]" means.
DEFAULT_PRESETS: dict[tuple, str] = _merge([module.DEFAULT_PRESETS for module in PRESET_MODULES])


def teacher_recipe(recipe: Recipe) -> Recipe:
    """The recipe that trains ``recipe``'s synthetic teacher: its ``teacher_preset`` at the run's seed."""
    teacher = dataclasses.replace(PRESETS[recipe.teacher_preset], seed=recipe.seed)
    if teacher.student != recipe.teacher:
        raise ValueError(f"--teacher {recipe.teacher} differs from the architecture of the teacher preset "
                         f"{recipe.teacher_preset} ({teacher.student}); pass --teacher-ckpt")
    return teacher


def default_preset(task: str, method: str, data: str) -> str:
    key = (task, method, data)
    if key not in DEFAULT_PRESETS:
        combos = ", ".join(f"--task {t} --method {m} --data {d}" for t, m, d in sorted(DEFAULT_PRESETS))
        raise ValueError(f"no default preset for --task {task} --method {method} --data {data}; pass "
                         f"--preset NAME, or use one of: {combos}")
    return DEFAULT_PRESETS[key]


# ---------------------------------------------------------------------------------------- listing
PRESET_GROUPS = {
    "gdd": "GDD, Generative Denoise Distillation (arXiv:2401.08332)",
    "dist": "DIST, Knowledge Distillation from A Stronger Teacher (arXiv:2205.10536)",
    "skd": "SKD, Structured Knowledge Distillation for Dense Prediction (arXiv:1903.04197)",
    "gkd": "GKD, Distilling Object Detectors with Global Knowledge (arXiv:2210.09022)",
    "sokd": "SoKD, Student-Oriented Teacher Knowledge Refinement",
    "kd": "KD, logit distillation (Hinton et al.)",
    "teacher": "Teachers of the paper rows",
    "faster": "mmdetection 2.x detector recipes (baselines, and the teachers of the detection rows)",
    "retinanet": "mmdetection 2.x detector recipes (baselines, and the teachers of the detection rows)",
    "synthetic": "Synthetic CPU demos (built-in data, from scratch)",
    "solo": "mmdetection 2.x instance segmentation recipes (SOLO, Mask R-CNN baselines and teachers)",
    "maskrcnn": "mmdetection 2.x instance segmentation recipes (SOLO, Mask R-CNN baselines and teachers)",
}


def describe_preset(name: str, recipe: Recipe) -> str:
    """One line: what a preset trains, on what, how long, and the reference's launch of it."""
    pair = recipe.student if recipe.method == "none" else f"{recipe.student} <- {recipe.teacher}"
    size = "x".join(map(str, getattr(recipe, cli.INPUT_SIZE_FIELD[recipe.task])))
    length = f"{recipe.epochs} epochs" if recipe.epochs else f"{recipe.iters} it."
    return (f"{recipe.task} {recipe.method}: {pair}, {recipe.data} {size}, {length} x batch {recipe.batch_size}; "
            f"{reference_launch(name, recipe)}")


def preset_listing() -> str:
    """Every preset, grouped by the paper (or role) of its row, one line each; a ``<row>_baseline`` twin
    follows its row."""
    groups: dict[str, list] = {}
    for name in sorted(PRESETS, key=lambda n: (n.removesuffix("_baseline"), n.endswith("_baseline"))):
        heading = PRESET_GROUPS[name.split("_")[0]]
        groups.setdefault(heading, []).append(name)
    width = max(map(len, PRESETS))
    lines = []
    for heading, names in groups.items():
        lines += ["", heading] + [f"  {name:<{width}}  {describe_preset(name, PRESETS[name])}" for name in names]
    return "\n".join(lines[1:])
