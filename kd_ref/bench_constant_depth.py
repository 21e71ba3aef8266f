"""The floor a synthetic depth demo must beat: a constant depth scored on the validation scenes.

    python -m kd_ref.bench_constant_depth [--preset synthetic_depth_none]

Predicts the median depth of every valid training pixel of the preset's synthetic scenes everywhere on
its validation scenes and scores it with the depth task's pooled ``depth_metrics``: the sanity bar of
docs/specs/depth_fcos.md §7 (the trained student must be clearly better in rel). Nothing is timed; the
figures depend only on the preset's scenes.

Reading the output: one line, the constant in metres, then rel, sq_rel, rms, log10, delta1..3 and the
pixels scored, the metrics ``evaluate.py`` reports for a trained model of the same preset, to be read
next to them (lower rel, sq_rel, rms, log10 and higher deltas are better).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from kd_ref import depth, synthetic
from kd_ref.presets import PRESETS
from kd_ref.tasks import synthetic_options


def constant_depth(preset: str = "synthetic_depth_none") -> dict:
    """The constant-depth scores of a synthetic depth ``preset`` (module docstring); prints and returns
    ``{"median", <metric>: value}``."""
    recipe = PRESETS.get(preset)
    if recipe is None or recipe.task != "depth" or recipe.data != "synthetic":
        raise ValueError(f"--preset {preset}: expected a synthetic depth preset (e.g. synthetic_depth_none)")

    train, val = (synthetic.SyntheticDepthScenes(synthetic.SyntheticScenes(split, **synthetic_options(recipe, split)))
                  for split in ("train", "val"))
    train_depths = [train[index]["depth"] for index in range(len(train))]
    median = float(np.median(np.concatenate([gt[gt > depth.INVALID_DEPTH] for gt in train_depths])))
    sums = None
    for index in range(len(val)):
        gt = torch.from_numpy(val[index]["depth"])
        sums = depth.merge_depth_metrics(sums, depth.depth_metrics(torch.full_like(gt, median), gt,
                                                                   gt > depth.INVALID_DEPTH))
    scores = {"median": median, **depth.finish_depth_metrics(sums)}
    print(f"constant depth {median:.3f} m (median of the {len(train)} training scenes of {preset}) on its "
          f"{len(val)} validation scenes: " + ", ".join(f"{name} {value:.3f}" for name, value in scores.items()
                                                        if name != "median"))
    return scores


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kd_ref.bench_constant_depth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="synthetic_depth_none")
    args = parser.parse_args(argv)
    try:
        constant_depth(args.preset)
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
