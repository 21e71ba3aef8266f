"""The methods' registry: one line per method, each the ``METHOD`` record (``kd_ref.distiller.Method``) at the
end of the method's file; adding a method is that file, one line here and its presets. ``none`` trains the
student alone (no distiller, no teacher). :func:`check_recipe` refuses, before anything is built, a recipe
its task (``kd_ref.tasks.TASKS``) or its method cannot train."""
from __future__ import annotations

from kd_ref import dist, gdd, gkd, kd, skd, sokd
from kd_ref.distiller import Method, check_method, no_options
from kd_ref.recipe import Recipe
from kd_ref.tasks import TASKS

METHODS: dict[str, Method] = {
    "none": Method(None, options=no_options),
    "kd": kd.METHOD,
    "dist": dist.METHOD,
    "gdd": gdd.METHOD,
    "skd": skd.METHOD,
    "gkd": gkd.METHOD,
    "sokd": sokd.METHOD,
}


def supported_methods(task: str) -> list:
    """The methods with a binding for ``task`` (and ``none``), sorted."""
    return sorted(name for name, method in METHODS.items() if method.build is None or task in method.bind)


def check_recipe(recipe: Recipe) -> None:
    """Refuse, with one line, a recipe its task or method cannot train (its method options included); needs
    no file, model or data."""
    task = TASKS[recipe.task]
    task.check_recipe(recipe)
    if recipe.group_by_aspect and task.size_field != "image_scale":
        raise ValueError(f"group_by_aspect: --task {recipe.task} crops its inputs to one size; only the tasks that "
                         "resize whole images (det, ins) group them by aspect ratio")
    check_method(METHODS[recipe.method], recipe, f"method_options of --method {recipe.method} on --task {recipe.task}")
