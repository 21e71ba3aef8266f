"""Benchmarks that print figures measured side by side in one run.

    python -m kd_ref.bench effect --task seg [--methods none kd dist gdd skd] [--seeds 0 1 2] [--iters N]

``effect`` trains one teacher per seed on the synthetic data (the preset's teacher recipe), then the
student with every method from the same initialisation seed and data order, and prints the mean and
standard deviation of the main metric per method, so one can see whether distillation helps at small
scale. Runs are kept under ``--out`` (default ``runs/bench_effect_<task>``) and reused when complete.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics

from kd_ref import configs, engine


def _train_or_reuse(recipe, out: str, runtime, teacher_ckpt: str | None = None) -> dict:
    metrics_file = os.path.join(out, "metrics.json")
    if os.path.isfile(metrics_file):
        with open(metrics_file) as handle:
            return json.load(handle)
    resume = os.path.isfile(os.path.join(out, "last.pt"))
    return engine.train(recipe, out, runtime, resume=resume, teacher_ckpt=teacher_ckpt, workers=0, quiet=True)


def effect(task: str, methods: list, seeds: list, iters: int | None, teacher_iters: int | None, out: str,
           device: str | None = None, overrides: dict | None = None) -> dict:
    """``{method: [metric per seed]}`` for the synthetic presets of ``task``; prints a summary table.
    ``overrides`` are recipe fields applied to teacher and students alike (e.g. a smaller image size)."""
    overrides = overrides or {}
    runtime = engine.setup_runtime(device)
    key = configs.TASKS[task].main_metric
    results = {method: [] for method in methods}
    for seed in seeds:
        student_presets = {m: configs.default_preset(task, m, "synthetic") for m in methods}
        teacher_name = next((configs.PRESETS[p].teacher_preset for p in student_presets.values()
                             if configs.PRESETS[p].teacher_preset), None)
        teacher_ckpt = None
        if teacher_name is not None:
            teacher = dataclasses.replace(configs.PRESETS[teacher_name], seed=seed,
                                          iters=teacher_iters or configs.PRESETS[teacher_name].iters, **overrides)
            teacher_dir = os.path.join(out, f"seed{seed}", "teacher")
            teacher_metrics = _train_or_reuse(teacher, teacher_dir, runtime)
            teacher_ckpt = os.path.join(teacher_dir, "last.pt")
            results.setdefault("teacher", []).append(teacher_metrics[key])
        for method, preset in student_presets.items():
            recipe = dataclasses.replace(configs.PRESETS[preset], seed=seed,
                                         iters=iters or configs.PRESETS[preset].iters, **overrides)
            needs_teacher = configs.METHODS[method].needs_teacher
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
    parser = argparse.ArgumentParser(prog="python -m kd_ref.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    effect_parser = commands.add_parser("effect", help="does distillation help? (mean ± std over seeds)")
    effect_parser.add_argument("--task", default="seg")
    effect_parser.add_argument("--methods", nargs="+", default=None,
                               help="default: every method with a synthetic preset for the task")
    effect_parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    effect_parser.add_argument("--iters", type=int, default=None, help="student iterations (default: preset)")
    effect_parser.add_argument("--teacher-iters", type=int, default=None)
    effect_parser.add_argument("--out", default=None)
    effect_parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    effect_parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                               help="recipe override for every run, as in train.py")
    args = parser.parse_args(argv)
    methods = args.methods or sorted(m for (t, m, d) in configs.DEFAULT_PRESETS if t == args.task and d == "synthetic")
    effect(args.task, methods, args.seeds, args.iters, args.teacher_iters,
           args.out or os.path.join("runs", f"bench_effect_{args.task}"), args.device,
           configs.parse_overrides(args.overrides))


if __name__ == "__main__":
    main()
