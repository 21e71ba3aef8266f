"""Train a student, alone (``--method none``) or distilled from a teacher.

    python train.py --task seg --method gdd                      # synthetic demo: teacher, then student
    python train.py --preset dist_deeplabv3_r18_cityscapes --data-root DIR --teacher-ckpt T.pt
    torchrun --nproc_per_node=G train.py --preset ...           # G: the row's gpus (--print-recipe); --amp optional
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train.py --preset ...
        (every node: the same command, and --out and the teacher file on storage all nodes share)
    python train.py --list-presets

A preset gives the whole recipe; explicit flags override it (a flag left out keeps the preset's value).
Outputs go to ``--out`` (default ``runs/<preset>``): ``last.pt`` (full checkpoint), ``log.jsonl`` (one line
per iteration and per evaluation) and ``metrics.json`` (final scores). A folder that holds a run is
continued with ``--resume`` or replaced with ``--overwrite``, never silently.
"""
from __future__ import annotations

import argparse
import os
import sys

from kd_ref import cli

def build_parser() -> argparse.ArgumentParser:
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default=None, choices=cli.TASKS,
                        help="the task (default: the preset's, else seg)")
    parser.add_argument("--method", default=None, choices=cli.METHODS,
                        help="distillation method; none trains the student alone (default: the preset's, else none)")
    parser.add_argument("--sokd-base", default=None, choices=("none", "kd", "dist", "gdd"),
                        help="--method sokd: the base method SoKD is plugged into, with the preset's options for "
                             "it (default: the preset's base; kd/dist on cls, kd/dist/gdd on det; the task-loss "
                             "weight stays the preset's)")
    parser.add_argument("--preset", default=None,
                        help="named recipe, see --list-presets (default: the one --task/--method/--data imply)")
    parser.add_argument("--list-presets", action="store_true",
                        help="list the presets grouped by paper row, one line each, and exit")
    parser.add_argument("--data", default=None, choices=cli.ALL_DATA,
                        help="data set; synthetic is built in, the others are read from --data-root "
                             "(default: the preset's, else synthetic)")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="folder of a real data set (required for every --data but synthetic)")
    parser.add_argument("--student", default=None, metavar="ARCH", help="student architecture (default: the preset's)")
    parser.add_argument("--teacher", default=None, metavar="ARCH", help="teacher architecture (default: the preset's)")
    parser.add_argument("--teacher-ckpt", default=None, metavar="PATH",
                        help="teacher weights, a train.py last.pt (default on synthetic data: train the preset's "
                             "teacher once and cache it in <parent of --out>/teachers; required on real data)")
    parser.add_argument("--pretrained", default=None, metavar="PATH|none",
                        help="ImageNet weights for the student backbone (default: the file the preset names, none "
                             "for synthetic presets; a real-data run stops if it is missing); none: train the "
                             "student from random weights")
    parser.add_argument("--student-init", default=None, metavar="PATH",
                        help="start the whole student from this trained checkpoint, a train.py last.pt or a state "
                             "dict (default: the preset's, usually none; not applied on --resume)")
    parser.add_argument("--iters", type=cli.positive_int, default=None, metavar="N",
                        help="training iterations of the student (default: the preset's; a teacher trained first "
                             "keeps its preset's; presets that count epochs take --set epochs=N instead)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=None, metavar="N",
                        help="total batch over all processes (default: the preset's)")
    parser.add_argument("--lr", type=cli.non_negative_float, default=None, metavar="F",
                        help="base learning rate (default: the preset's)")
    parser.add_argument("--crop", type=cli.positive_int, nargs=2, metavar=("H", "W"), default=None,
                        help="training crop of seg and input size of cls, in pixels (default: the preset's)")
    cli.add_amp_argument(parser)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/<preset>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in an --out that holds a run: its last.pt, log.jsonl, metrics.json and "
                             "best.pt are replaced once the new run has started (default: refuse)")
    parser.add_argument("--keep-best", action="store_true",
                        help="evaluate every eval_every and keep best.pt by the task's main metric; metrics.json "
                             "names its iteration (default: the preset's, on where the reference reports the best)")
    parser.add_argument("--print-recipe", action="store_true",
                        help="print the resolved recipe (every field, and source) as one JSON object and exit "
                             "without reading data")
    parser.add_argument("--eval-every", type=cli.non_negative_int, default=None, metavar="N",
                        help="evaluate every N iterations (epochs, for presets that count epochs), 0 = only at the "
                             "end (default: the preset's)")
    parser.add_argument("--ckpt-every", type=cli.non_negative_int, default=None, metavar="N",
                        help="write last.pt every N iterations, 0 = only at the end (default: the preset's)")
    parser.add_argument("--seed", type=cli.non_negative_int, default=None, metavar="N",
                        help="seed of initialisation, data order and augmentation (default: the preset's, 0)")
    parser.add_argument("--workers", type=cli.non_negative_int, default=None, metavar="N",
                        help="data loader workers per process (default: 4 on CUDA; 0 on CPU, where worker "
                             "processes would compete with the compute threads for the few cores)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any other recipe field, e.g. --set synthetic_val=20 --set "
                             "\"method_options={'alpha': 100.0}\" (Python literals; repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite: pass one (continue the run in --out, or start it again)")
    return args


def flag_overrides(args: argparse.Namespace) -> dict:
    """The recipe fields that the dedicated flags set (``--set``, ``--pretrained`` and ``--sokd-base`` aside)."""
    overrides = {"method": args.method, "data": args.data, "student": args.student, "teacher": args.teacher,
                 "student_init": args.student_init, "iters": args.iters, "batch_size": args.batch_size,
                 "lr": args.lr, "crop": tuple(args.crop) if args.crop else None,
                 "eval_every": args.eval_every, "ckpt_every": args.ckpt_every, "seed": args.seed,
                 "keep_best": args.keep_best or None}
    return {name: value for name, value in overrides.items() if value is not None}


def explicit_fields(args: argparse.Namespace) -> frozenset:
    """Every recipe field this command line sets: a resumed run keeps them as given (engine.TrainingRun)."""
    from kd_ref import recipe as recipe_module

    names = set(flag_overrides(args)) | set(recipe_module.parse_overrides(args.overrides))
    names |= {"pretrained"} if args.pretrained is not None else set()
    return frozenset(names | ({"method_options"} if args.sokd_base is not None else set()))


def build_recipe(args: argparse.Namespace) -> tuple:
    """The preset named (or implied) by the flags, with the explicit flags applied on top; every check
    that needs no file or data set is done here."""
    import dataclasses

    from kd_ref import presets
    from kd_ref import recipe as recipe_module

    if args.preset is not None and args.preset not in presets.PRESETS:  # answered before torch is imported
        raise ValueError(f"--preset {args.preset}: unknown; python train.py --list-presets lists them")
    from kd_ref import methods, tasks

    task = args.task or (presets.PRESETS[args.preset].task if args.preset is not None else "seg")
    if args.method is not None and args.method not in methods.supported_methods(task):
        raise ValueError(f"--method {args.method}: methods for --task {task} are "
                         f"{methods.supported_methods(task)}")
    name = args.preset or presets.default_preset(task, args.method or "none", args.data or "synthetic")
    recipe = presets.PRESETS[name]
    if task != recipe.task:
        raise ValueError(f"--task {task} contradicts --preset {name} (a {recipe.task} recipe)")
    if args.iters is not None and recipe.epochs is not None:
        raise ValueError(f"--iters {args.iters}: preset {name} counts epochs (epochs={recipe.epochs}, lr_steps "
                         f"{recipe.lr_steps} in epochs); pass --set epochs=N instead")
    recipe = dataclasses.replace(recipe, **flag_overrides(args))
    if args.pretrained is not None:
        recipe = dataclasses.replace(recipe, pretrained=None if args.pretrained == "none" else args.pretrained)
    recipe = dataclasses.replace(recipe, **recipe_module.parse_overrides(args.overrides))
    if args.sokd_base is not None:
        if recipe.method != "sokd":
            raise ValueError(f"--sokd-base {args.sokd_base}: only for --method sokd (the recipe's method is "
                             f"{recipe.method})")
        recipe = dataclasses.replace(recipe, method_options={**recipe.method_options, "base": args.sokd_base})
    if recipe.method not in methods.supported_methods(recipe.task):
        raise ValueError(f"--method {recipe.method} does not support --task {recipe.task}; supported: "
                         f"{methods.supported_methods(recipe.task)}")
    if args.crop is not None and tasks.TASKS[recipe.task].size_field == "image_scale":
        raise ValueError(f"--crop {' '.join(map(str, args.crop))}: --task {recipe.task} resizes whole images to "
                         f"image_scale {tuple(recipe.image_scale)} (long side, short side); pass "
                         "--set \"image_scale=(L, S)\"")
    methods.check_recipe(recipe)
    recipe_module.check_schedule(recipe)
    if methods.METHODS[recipe.method].needs_teacher and recipe.teacher is None:
        raise ValueError(f"--method {recipe.method} needs a teacher: pass --teacher ARCH (and --teacher-ckpt)")
    return name, recipe


def check_out_folder(out: str, args: argparse.Namespace) -> None:
    """A folder that holds a run is continued (--resume) or replaced (--overwrite), never silently reused."""
    from kd_ref import engine
    from kd_ref.runtime import load_checkpoint

    found = [name for name in ("last.pt", *engine.RUN_OUTPUTS) if os.path.exists(os.path.join(out, name))]
    if args.resume and "last.pt" not in found:
        raise FileNotFoundError(f"--resume: {os.path.join(out, 'last.pt')}: no such file (nothing to continue "
                                "in --out; leave out --resume to start)")
    if found and not (args.resume or args.overwrite):
        raise ValueError(f"--out {out} holds a run ({', '.join(found)}); pass --resume to continue it or "
                         "--overwrite to start it again")
    if args.resume:  # a checkpoint of another format version is refused before a teacher is trained or data read
        path = os.path.join(out, "last.pt")
        load_checkpoint(path, f"--resume {path}")


def check_inputs(recipe, args: argparse.Namespace) -> None:
    """The run's data and weights are where the recipe and flags say, before a teacher or a data set is
    touched: the data root, every weight file, a teacher (given, or trainable on synthetic data)."""
    from kd_ref import convert, methods, presets
    from kd_ref import recipe as recipe_module

    cli.check_data_root(recipe.task, recipe.data, args.data_root)
    files = {"--teacher-ckpt": args.teacher_ckpt}
    if not args.resume:  # a resumed run has its own weights
        files["--student-init"] = recipe.student_init
        if recipe.student_init is None:  # otherwise the student's weights come from that checkpoint
            recipe_module.check_pretrained(recipe)
    for flag, path in files.items():
        if path is not None and not os.path.isfile(path):
            hint = (" (the preset starts the student from a trained checkpoint of it: train one with train.py "
                    "and pass its last.pt)" if flag == "--student-init" else "")
            raise FileNotFoundError(f"{flag} {path}: no such file{hint}")
    # a kd_ref checkpoint of another format version is refused before a teacher is trained or data read
    if files.get("--student-init") is not None:
        convert.read_file(files["--student-init"], f"--student-init {files['--student-init']}")
    if methods.METHODS[recipe.method].needs_teacher and args.teacher_ckpt is None:
        if recipe.data != "synthetic" or recipe.teacher_preset is None:
            raise ValueError(f"--method {recipe.method} on --data {recipe.data} needs --teacher-ckpt PATH "
                             f"(a trained {recipe.teacher}; train one with train.py and pass its last.pt)")
        teacher = presets.teacher_recipe(recipe)  # the teacher it would train must be the recipe's teacher
        if teacher.normalization != recipe.normalization:
            raise ValueError(f"normalization={recipe.normalization}: the synthetic teacher ({recipe.teacher_preset}) "
                             f"trains on {teacher.normalization} inputs and sees the student's; pass --teacher-ckpt")
    elif methods.METHODS[recipe.method].needs_teacher:
        source = f"--teacher-ckpt {args.teacher_ckpt}"
        convert.check_teacher_normalization(recipe, convert.read_file(args.teacher_ckpt, source), source)


def teacher_folder(recipe, out: str) -> str:
    """Where the synthetic teacher of ``recipe`` is cached: ``<parent of out>/teachers/<teacher preset>-<digest of
    its recipe>``, shared by every method and task that trains against the same teacher recipe; a changed
    teacher recipe gets a new folder and is trained again."""
    from kd_ref import presets
    from kd_ref.recipe import recipe_digest

    teacher_recipe = presets.teacher_recipe(recipe)
    return os.path.join(os.path.dirname(os.path.normpath(out)) or ".", "teachers",
                        f"{recipe.teacher_preset}-{recipe_digest(teacher_recipe)}")


def ensure_teacher(recipe, out: str, args, runtime) -> str:
    """The teacher checkpoint: ``--teacher-ckpt``, or on synthetic data the cached teacher of the preset,
    trained first (and said so, with its length) when the cache has none."""
    from kd_ref import engine, presets
    from kd_ref.runtime import check_on_every_rank, decided_by_main

    if args.teacher_ckpt is not None:
        return args.teacher_ckpt
    teacher_recipe = presets.teacher_recipe(recipe)
    folder = teacher_folder(recipe, out)
    ckpt = os.path.join(folder, "last.pt")

    def cache_state() -> str:
        if os.path.isfile(os.path.join(folder, "metrics.json")):
            return "trained"
        return "started" if os.path.isfile(ckpt) else "absent"

    # decided once, by the global rank 0: every rank then reuses the teacher, or trains it with the others
    state = decided_by_main(runtime, cache_state)
    if state == "trained":
        if runtime.is_main:
            print(f"teacher: reusing {ckpt}")
    else:
        if runtime.is_main:
            print(f"teacher: no --teacher-ckpt given, so {teacher_recipe.student} ({recipe.teacher_preset}) is "
                  f"trained first: {teacher_recipe.iters} iterations at batch {teacher_recipe.batch_size}, into "
                  f"{folder} (reused by every later run with this teacher)")
        if state == "started":  # every rank resumes from that checkpoint
            check_on_every_rank(runtime, lambda: require_file(ckpt, "teacher checkpoint"))
        engine.train(teacher_recipe, folder, runtime, resume=state == "started", workers=args.workers,
                     quiet=args.quiet)
    check_on_every_rank(runtime, lambda: require_file(ckpt, "teacher checkpoint"))
    if state == "trained":  # a cached teacher of another checkpoint format version is refused before the run is built
        from kd_ref import convert

        check_on_every_rank(runtime, lambda: convert.read_file(ckpt, f"cached teacher {ckpt}"))
    return ckpt


def require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path}: no such file")


def describe(name: str, recipe, runtime, out: str) -> str:
    """The line said before training: what runs, at which input size and batch, and the memory it needs."""
    from kd_ref import tasks
    from kd_ref.runtime import estimate_training_memory

    per_rank = recipe.batch_size // runtime.world_size
    field = tasks.TASKS[recipe.task].size_field
    size = f"{field} {'x'.join(map(str, getattr(recipe, field)))}"
    length = f"epochs={recipe.epochs}" if recipe.epochs else f"iters={recipe.iters}"
    estimate = estimate_training_memory(recipe, per_rank)
    return (f"preset {name}: {recipe.task} {recipe.student} method={recipe.method} data={recipe.data} "
            f"{length} {size} batch {recipe.batch_size} ({per_rank} per process), "
            f"about {estimate / 2 ** 30:.1f} GiB per process (estimate) -> {out}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.list_presets:
        from kd_ref import presets

        print(presets.preset_listing())
        return {}
    import dataclasses
    import json

    name, recipe = build_recipe(args)  # an unknown preset is refused before torch is imported
    from kd_ref import engine, methods, tasks
    from kd_ref import recipe as recipe_module
    from kd_ref.runtime import check_on_every_rank, close_runtime, dumps, print_table, setup_runtime

    if args.print_recipe:
        print(dumps(dataclasses.asdict(recipe)))
        # stdout stays one JSON object for the tools that read it; the launch is for the reader
        print(f"reference launch: {recipe_module.reference_launch(name, recipe)}", file=sys.stderr)
        return {}
    out = args.out or os.path.join("runs", name)
    runtime = setup_runtime(args.device, args.amp)
    # every rank reads these files (the checkpoint it resumes, the weights it loads): each checks its own view
    # of them, and under DDP all stop together if any rank misses one (kd_ref.runtime.check_on_every_rank)
    check_on_every_rank(runtime, lambda: (check_out_folder(out, args), check_inputs(recipe, args)))
    if args.workers is None:
        args.workers = 4 if runtime.device.type == "cuda" else 0
    teacher_ckpt = None
    teacher_metrics = None
    if methods.METHODS[recipe.method].needs_teacher:
        teacher_ckpt = ensure_teacher(recipe, out, args, runtime)
        metrics_file = os.path.join(os.path.dirname(teacher_ckpt), "metrics.json")
        if os.path.isfile(metrics_file):
            with open(metrics_file) as handle:
                teacher_metrics = json.load(handle)
    if runtime.is_main:
        print(describe(name, recipe, runtime, out))
        note = recipe_module.process_count_note(recipe, runtime.world_size)
        if note is not None:
            print(note)
    metrics = engine.train(recipe, out, runtime, resume=args.resume, teacher_ckpt=teacher_ckpt,
                           workers=args.workers, data_root=args.data_root, quiet=args.quiet,
                           explicit_fields=explicit_fields(args))
    if runtime.is_main:
        key = tasks.TASKS[recipe.task].main_metric
        rows = []
        if teacher_metrics is not None and teacher_metrics.get(key) is not None:
            rows.append((f"teacher {recipe.teacher} {key}", teacher_metrics[key]))
        rows.append((f"student {recipe.student} [{recipe.method}] {key}", metrics[key]))
        print_table(rows)
    close_runtime(runtime)
    return metrics


def run(argv=None) -> int:
    """:func:`main` as the command line runs it; returns the exit status: 0, 2 after a bad input (one line
    ``error: ...`` on stderr) or 128 + the signal number after a preemption (with the resume hint)."""
    try:
        main(argv)
    except SystemExit as done:  # --help, or an argument error the parser reported
        return done.code if isinstance(done.code, int) else 2
    except (ValueError, FileNotFoundError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as stop:
        from kd_ref.runtime import TrainingInterrupted

        if isinstance(stop, TrainingInterrupted):
            print(f"interrupted: {stop}", file=sys.stderr)
            return 128 + stop.signum
        raise
    return 0


if __name__ == "__main__":
    sys.exit(run())
