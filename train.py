"""Train a student, alone (``--method none``) or distilled from a teacher.

    python train.py --task seg --method gdd                      # synthetic demo: teacher, then student
    python train.py --preset dist_deeplabv3_r18_cityscapes --data-root DIR --teacher-ckpt T.pt
    torchrun --nproc_per_node=8 train.py --preset ... --amp

A preset gives the whole recipe; explicit flags override it. Outputs go to ``--out`` (default
``runs/<preset>``): ``last.pt`` (full checkpoint), ``log.jsonl`` (one line per iteration and per
evaluation) and ``metrics.json`` (final scores).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from kd_ref import configs, engine


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default=None,
                        help=f"one of {sorted(configs.TASKS)} (default: the preset's, else seg)")
    parser.add_argument("--method", default=None, help="distillation method (default: the preset's, else none)")
    parser.add_argument("--sokd-base", default=None, choices=configs.SOKD_BASES,
                        help="--method sokd: the base method SoKD is plugged into, with the preset's options for "
                             "it (default: the preset's base; kd/dist on cls, kd/dist/gdd on det; the task-loss "
                             "weight stays the preset's)")
    parser.add_argument("--preset", default=None, help="named recipe (see README); default depends on task/method/data")
    parser.add_argument("--data", default=None, help="synthetic (default) or a real data set of the task")
    parser.add_argument("--data-root", default=None, help="folder of a real data set")
    parser.add_argument("--student", default=None, help="student architecture")
    parser.add_argument("--teacher", default=None, help="teacher architecture")
    parser.add_argument("--teacher-ckpt", default=None, help="teacher checkpoint (a train.py last.pt or released weights)")
    parser.add_argument("--pretrained", default=None, metavar="PATH|none",
                        help="ImageNet weights for the student backbone (default: the file the preset names; a "
                             "real-data run stops if it is missing); none: train the student from random weights")
    parser.add_argument("--student-init", default=None,
                        help="start the student from this trained checkpoint (train.py last.pt or a state dict)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="total batch over all processes")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None)
    parser.add_argument("--amp", action="store_true", help="mixed precision: fp16 + GradScaler on CUDA, bf16 on CPU")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    parser.add_argument("--keep-best", action="store_true",
                        help="evaluate every eval_every and keep best.pt by the task's main metric (metrics.json "
                             "names its iteration)")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the resolved recipe as one JSON object and exit (reads no data)")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--ckpt-every", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None,
                        help="data loader workers per process (default: 4 on CUDA; 0 on CPU, where worker "
                             "processes would compete with the compute threads for the few cores)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any recipe field, e.g. --set synthetic_val=20 --set "
                             "\"method_options={'alpha': 100.0}\" (Python literals)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def build_recipe(args: argparse.Namespace) -> tuple[str, configs.Recipe]:
    """The preset named (or implied) by the flags, with the explicit flags applied on top."""
    if args.preset is not None and args.preset not in configs.PRESETS:
        raise ValueError(f"--preset {args.preset}: unknown; known presets: {', '.join(sorted(configs.PRESETS))}")
    task = args.task or (configs.PRESETS[args.preset].task if args.preset is not None else "seg")
    if task not in configs.TASKS:
        raise ValueError(f"--task {task}: supported tasks are {sorted(configs.TASKS)}")
    if args.method is not None and args.method not in configs.supported_methods(task):
        raise ValueError(f"--method {args.method}: methods for --task {task} are "
                         f"{configs.supported_methods(task)}")
    name = args.preset or configs.default_preset(task, args.method or "none", args.data or "synthetic")
    recipe = configs.PRESETS[name]
    if task != recipe.task:
        raise ValueError(f"--task {task} contradicts --preset {name} (a {recipe.task} recipe)")
    overrides = {"method": args.method, "data": args.data, "student": args.student, "teacher": args.teacher,
                 "student_init": args.student_init, "iters": args.iters,
                 "batch_size": args.batch_size,
                 "lr": args.lr, "crop": tuple(args.crop) if args.crop else None,
                 "eval_every": args.eval_every, "ckpt_every": args.ckpt_every, "seed": args.seed}
    if args.iters is not None and recipe.epochs is not None:
        raise ValueError(f"--iters {args.iters}: preset {name} counts epochs (epochs={recipe.epochs}, lr_steps "
                         f"{recipe.lr_steps} in epochs); pass --set epochs=N instead")
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if args.pretrained is not None:
        recipe = dataclasses.replace(recipe, pretrained=None if args.pretrained == "none" else args.pretrained)
    if args.keep_best:
        recipe = dataclasses.replace(recipe, keep_best=True)
    recipe = dataclasses.replace(recipe, **configs.parse_overrides(args.overrides))
    if args.sokd_base is not None:
        if recipe.method != "sokd":
            raise ValueError(f"--sokd-base {args.sokd_base}: only for --method sokd (the recipe's method is "
                             f"{recipe.method})")
        recipe = dataclasses.replace(recipe, method_options={**recipe.method_options, "base": args.sokd_base})
    task = recipe.task
    if recipe.method not in configs.supported_methods(task):
        raise ValueError(f"--method {recipe.method} does not support --task {task}; supported: "
                         f"{configs.supported_methods(task)}")
    configs.TASKS[task].check_recipe(recipe)
    configs.check_schedule(recipe)
    if configs.METHODS[recipe.method].needs_teacher and recipe.teacher is None:
        raise ValueError(f"--method {recipe.method} needs a teacher: pass --teacher ARCH (and --teacher-ckpt)")
    return name, recipe


def ensure_teacher(recipe: configs.Recipe, out: str, args, runtime) -> str:
    """On synthetic data without ``--teacher-ckpt``: train the preset's teacher once, cached in
    ``<out>/teacher``; later runs reuse it. On real data a teacher checkpoint must be given."""
    if args.teacher_ckpt is not None:
        if not os.path.isfile(args.teacher_ckpt):
            raise FileNotFoundError(f"--teacher-ckpt {args.teacher_ckpt}: no such file")
        return args.teacher_ckpt
    if recipe.data != "synthetic" or recipe.teacher_preset is None:
        raise ValueError(f"--method {recipe.method} on --data {recipe.data} needs --teacher-ckpt PATH "
                         f"(a trained {recipe.teacher}; train one with train.py and pass its last.pt)")
    teacher_recipe = dataclasses.replace(configs.PRESETS[recipe.teacher_preset], seed=recipe.seed)
    if teacher_recipe.student != recipe.teacher:
        raise ValueError(f"--teacher {recipe.teacher} differs from the architecture of the teacher preset "
                         f"{recipe.teacher_preset} ({teacher_recipe.student}); pass --teacher-ckpt")
    teacher_dir = os.path.join(out, "teacher")
    ckpt = os.path.join(teacher_dir, "last.pt")
    done = os.path.isfile(os.path.join(teacher_dir, "metrics.json"))
    if done:
        if runtime.is_main:
            print(f"teacher: reusing {ckpt}")
        return ckpt
    if runtime.is_main:
        print(f"teacher: no --teacher-ckpt given, training {teacher_recipe.student} "
              f"({recipe.teacher_preset}) first into {teacher_dir}")
    engine.train(teacher_recipe, teacher_dir, runtime, resume=os.path.isfile(ckpt), workers=args.workers,
                 quiet=args.quiet)
    return ckpt


def main(argv=None) -> dict:
    args = parse_args(argv)
    name, recipe = build_recipe(args)
    if args.print_recipe:
        print(json.dumps(dataclasses.asdict(recipe), allow_nan=False))
        return {}
    if not args.resume and recipe.student_init is None:  # otherwise the student's weights come from a checkpoint
        configs.check_pretrained(recipe)
    runtime = engine.setup_runtime(args.device, args.amp)
    if args.workers is None:
        args.workers = 4 if runtime.device.type == "cuda" else 0
    out = args.out or os.path.join("runs", name)
    teacher_ckpt = None
    teacher_metrics = None
    if configs.METHODS[recipe.method].needs_teacher:
        teacher_ckpt = ensure_teacher(recipe, out, args, runtime)
        metrics_file = os.path.join(os.path.dirname(teacher_ckpt), "metrics.json")
        if os.path.isfile(metrics_file):
            with open(metrics_file) as handle:
                teacher_metrics = json.load(handle)
    if runtime.is_main:
        length = f"epochs={recipe.epochs}" if recipe.epochs else f"iters={recipe.iters}"
        print(f"preset {name}: {recipe.task} {recipe.student} method={recipe.method} data={recipe.data} "
              f"{length} batch={recipe.batch_size} -> {out}")
    metrics = engine.train(recipe, out, runtime, resume=args.resume, teacher_ckpt=teacher_ckpt,
                           workers=args.workers, data_root=args.data_root, quiet=args.quiet)
    if runtime.is_main:
        key = configs.TASKS[recipe.task].main_metric
        rows = []
        if teacher_metrics is not None:
            rows.append((f"teacher {recipe.teacher} {key}", teacher_metrics[key]))
        rows.append((f"student {recipe.student} [{recipe.method}] {key}", metrics[key]))
        engine.print_table(rows)
    return metrics


def run(argv=None) -> int:
    """:func:`main` as the command line runs it; returns the exit status: 0, 2 after a bad input (one line
    ``error: ...`` on stderr) or 128 + the signal number after a preemption (with the resume hint)."""
    try:
        main(argv)
    except engine.TrainingInterrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
