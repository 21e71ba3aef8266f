"""Evaluate a checkpoint written by train.py, or released weights, on a data set's val split.

    python evaluate.py --ckpt runs/synthetic_seg_gdd/last.pt
    python evaluate.py --task seg --ckpt last.pt --data cityscapes --data-root DIR --save-pred preds/
    python evaluate.py --ckpt pspnet_r101-d8_512x1024_80k_cityscapes.pth \
        --preset teacher_pspnet_r101_cityscapes_mmseg --data-root DIR

A train.py checkpoint carries its recipe. A file without one (released weights in a layout
``kd_ref.convert`` knows, a plain state dict, a ``python -m kd_ref.convert`` output) is evaluated with
the recipe of ``--preset`` and the architecture ``--arch`` (default: the preset's student), with the
model options its layout's code fixes (stride-in-1x1 bottlenecks for FCOS-code ResNets;
``kd_ref.convert.recipe_for_file``); a file whose code fixes other input statistics than the preset's
(FCOS files: caffe2 BGR) is refused.

Segmentation is whole-image single-scale inference, as the references evaluate. The scores are
printed and written next to the checkpoint (``<ckpt dir>/eval_<data>.json``) or to ``--out``.
``--save-pred DIR`` writes train-id PNGs, colour PNGs and ``legend.json`` (class names and colours: the
Cityscapes palette for Cityscapes, a palette of the shapes for synthetic scenes); detection writes
``detections.json`` in COCO results format; instance segmentation (``--task ins``, COCO mask AP through
pycocotools, ``segm_AP`` ... ``segm_APl``, plus ``bbox_*`` for Mask R-CNN) writes ``segmentations.json``
(RLE, original pixels) and, for Mask R-CNN, ``detections.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from kd_ref import cli


def build_parser() -> argparse.ArgumentParser:
    parser = cli.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, metavar="PATH",
                        help="checkpoint written by train.py, or released weights (required)")
    parser.add_argument("--preset", default=None,
                        help="recipe for a file that has none, i.e. released weights (default: the checkpoint's "
                             "own recipe); see train.py --list-presets")
    parser.add_argument("--arch", default=None,
                        help="with --preset: the file's architecture (default: the preset's student)")
    parser.add_argument("--task", default=None, choices=cli.TASKS,
                        help="task of the checkpoint, checked against it (default: the checkpoint's)")
    parser.add_argument("--data", default=None, choices=cli.ALL_DATA,
                        help="data set to evaluate on (default: the one the model was trained on)")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="folder of a real data set (required for every --data but synthetic)")
    parser.add_argument("--save-pred", default=None, metavar="DIR",
                        help="also write the predictions there: label and colour PNGs with legend.json (seg), "
                             "detections.json (det), segmentations.json (ins) (default: none)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="JSON file for the scores (default: <checkpoint folder>/eval_<data>.json)")
    cli.add_amp_argument(parser)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--workers", type=cli.non_negative_int, default=0, metavar="N",
                        help="data loader workers (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def recipe_for(args: argparse.Namespace, stored: dict | None):
    """The checkpoint's own recipe, or for a file without one, ``--preset`` with ``--arch`` as the model."""
    from kd_ref.presets import PRESETS
    from kd_ref.recipe import Recipe

    if stored is not None:
        if args.preset is not None or args.arch is not None:
            raise ValueError(f"--preset/--arch: {args.ckpt} is a train.py checkpoint with its own recipe")
        # a field missing from the stored recipe takes its default, which reproduces the run that wrote it
        return Recipe(**stored)
    if args.preset is None:
        raise ValueError(f"--ckpt {args.ckpt}: has no recipe (released weights or a state dict); pass --preset "
                         "NAME for the data and model settings, and --arch ARCH if it is not the preset's student")
    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset}: unknown; python train.py --list-presets lists them")
    preset = PRESETS[args.preset]
    return dataclasses.replace(preset, student=args.arch or preset.student)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from kd_ref import convert, engine, tasks
    from kd_ref.runtime import close_runtime, print_table, setup_runtime, write_json
    from kd_ref.backbones import tensors_of

    source = f"--ckpt {args.ckpt}"
    content = convert.read_file(args.ckpt, source)
    weights = tensors_of(content, source)
    stored = content.get("recipe") if isinstance(content, dict) else None
    recipe = recipe_for(args, stored)
    if stored is None:
        released = convert.recipe_for_file(recipe, weights, source,
                                           content.get("layout") if isinstance(content, dict) else None)
        if released.normalization != recipe.normalization:  # scores on other inputs than the preset's would mislead
            raise ValueError(f"{source}: its code trains on {released.normalization} inputs, --preset {args.preset} "
                             f"feeds normalization={recipe.normalization}; pass a preset on {released.normalization}")
        if released != recipe:
            print(f"{source}: run with the model options {released.model_options} of its code")
        recipe = released
    if args.task is not None and args.task != recipe.task:
        raise ValueError(f"--task {args.task}: the checkpoint {args.ckpt} holds a {recipe.task} model")
    if args.data is not None:
        recipe = dataclasses.replace(recipe, data=args.data)
    cli.check_data_root(recipe.task, recipe.data, args.data_root)
    task = tasks.TASKS[recipe.task]
    task.check_recipe(recipe)
    runtime = setup_runtime(args.device, args.amp)
    model = task.build_model(recipe, recipe.student)
    convert.load_weights(model, weights, source)
    model.to(runtime.device)
    dataset, collate = task.build_data(recipe, "val", args.data_root)
    metrics = engine.evaluate(task, model, dataset, collate, runtime, recipe, args.workers, args.quiet,
                              save_pred=args.save_pred)
    if runtime.is_main:
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"eval_{recipe.data}.json")
        write_json(out, metrics)
        print_table([(f"{recipe.student} {key}", value) for key, value in metrics.items()
                     if isinstance(value, float)])
        print(f"scores written to {out}")
    close_runtime(runtime)
    return metrics


def run(argv=None) -> int:
    """:func:`main` as the command line runs it; returns the exit status: 0, or 2 after a bad input (one
    line ``error: ...`` on stderr)."""
    try:
        main(argv)
    except SystemExit as done:  # --help, or an argument error the parser reported
        return done.code if isinstance(done.code, int) else 2
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
