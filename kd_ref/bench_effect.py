"""Does distillation help at small scale? The main metric per method over seeds, side by side.

    python -m kd_ref.bench_effect [--task seg] [--methods none kd dist gdd skd] [--seeds 0 1 2] [--iters N]
                                  [--teacher-iters N] [--out DIR] [--device cuda] [--set FIELD=VALUE ...]

Trains one teacher per seed on the synthetic data (the preset's teacher recipe), then the student with
every method from the same initialisation seed and data order (:func:`effect`). ``--methods`` takes
methods (their synthetic preset for the task) or preset names, all training against one teacher
(:func:`effect_presets`); the default is every method whose synthetic preset shares the ``none`` preset's
teacher. Runs are kept under ``--out`` (default ``runs/bench_effect_<task>``) and reused when complete, so
an interrupted bench resumes and a second call only prints.

Reading the output: one line per finished run (seed, method, metric), then the task's main metric as
mean ± standard deviation over the seeds per method, the teacher included; compare each method's mean
with ``none`` (the student trained alone) in the light of the spread. Nothing is timed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics

from kd_ref import engine
from kd_ref.methods import METHODS
from kd_ref.presets import DEFAULT_PRESETS, PRESETS, default_preset
from kd_ref.recipe import parse_overrides
from kd_ref.runtime import setup_runtime
from kd_ref.tasks import TASKS


def _train_or_reuse(recipe, out: str, runtime, teacher_ckpt: str | None = None) -> dict:
    """The metrics of the run in ``out``: read when it has finished, else trained (resumed from its
    ``last.pt`` when there is one)."""
    metrics_file = os.path.join(out, "metrics.json")
    if os.path.isfile(metrics_file):
        with open(metrics_file) as handle:
            return json.load(handle)
    resume = os.path.isfile(os.path.join(out, "last.pt"))
    return engine.train(recipe, out, runtime, resume=resume, teacher_ckpt=teacher_ckpt, workers=0, quiet=True)


def effect_presets(task: str, entries: list) -> dict:
    """``{method: preset}`` for ``entries``, each a method (its synthetic preset for ``task``) or a preset
    name (e.g. ``synthetic_det_frcnn_none``); all must train against one teacher preset."""
    presets = {}
    for entry in entries:
        preset = entry if entry in PRESETS else default_preset(task, entry, "synthetic")
        presets[PRESETS[preset].method] = preset
    teachers = {PRESETS[p].teacher_preset for p in presets.values()} - {None}
    if len(teachers) > 1:
        raise ValueError(f"--methods {' '.join(entries)}: their presets ({', '.join(presets.values())}) train "
                         f"against different teachers ({', '.join(sorted(teachers))}); compare the methods of "
                         "one student/teacher pair at a time, naming presets where needed")
    return presets


def default_effect_methods(task: str) -> list:
    """The methods whose synthetic preset for ``task`` shares the ``none`` preset's teacher."""
    teacher = PRESETS[default_preset(task, "none", "synthetic")].teacher_preset
    return sorted(m for (t, m, d), preset in DEFAULT_PRESETS.items()
                  if t == task and d == "synthetic" and PRESETS[preset].teacher_preset in (teacher, None))


def effect(task: str, methods: list, seeds: list, iters: int | None, teacher_iters: int | None, out: str,
           device: str | None = None, overrides: dict | None = None) -> dict:
    """``{method: [metric per seed]}`` for ``methods`` (see :func:`effect_presets`); prints a summary table.
    ``overrides`` are recipe fields applied to teacher and students alike (e.g. a smaller image size)."""
    overrides = overrides or {}
    runtime = setup_runtime(device)
    key = TASKS[task].main_metric
    student_presets = effect_presets(task, methods)
    results = {method: [] for method in student_presets}
    for seed in seeds:
        teacher_name = next((PRESETS[p].teacher_preset for p in student_presets.values()
                             if PRESETS[p].teacher_preset), None)
        teacher_ckpt = None
        if teacher_name is not None:
            teacher = dataclasses.replace(PRESETS[teacher_name], seed=seed,
                                          iters=teacher_iters or PRESETS[teacher_name].iters, **overrides)
            teacher_dir = os.path.join(out, f"seed{seed}", "teacher")
            teacher_metrics = _train_or_reuse(teacher, teacher_dir, runtime)
            teacher_ckpt = os.path.join(teacher_dir, "last.pt")
            results.setdefault("teacher", []).append(teacher_metrics[key])
        for method, preset in student_presets.items():
            recipe = dataclasses.replace(PRESETS[preset], seed=seed,
                                         iters=iters or PRESETS[preset].iters, **overrides)
            needs_teacher = METHODS[method].needs_teacher
            metrics = _train_or_reuse(recipe, os.path.join(out, f"seed{seed}", method), runtime,
                                      teacher_ckpt if needs_teacher else None)
            results[method].append(metrics[key])
            if runtime.is_main:
                print(f"seed {seed} {method:>8}: {key} {metrics[key]:.2f}", flush=True)
    if runtime.is_main:
        print(f"\n{task} on synthetic scenes, {len(seeds)} seed(s): {key} mean ± std")
        for method, values in results.items():
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"  {method:>8}  {statistics.mean(values):6.2f} ± {spread:.2f}")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_ref.bench_effect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="seg")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="methods (their synthetic presets) or preset names, one teacher for all "
                             "(default: every method whose synthetic preset shares the none preset's teacher)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=None, help="student iterations (default: preset)")
    parser.add_argument("--teacher-iters", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe override for every run, as in train.py")
    args = parser.parse_args(argv)
    methods = args.methods or default_effect_methods(args.task)
    effect(args.task, methods, args.seeds, args.iters, args.teacher_iters,
           args.out or os.path.join("runs", f"bench_effect_{args.task}"), args.device,
           parse_overrides(args.overrides))


if __name__ == "__main__":
    main()
