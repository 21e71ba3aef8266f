import dataclasses

import numpy as np
import pytest

from kd_ref import bench_constant_depth, synthetic
from kd_ref.presets import PRESETS


def test_constant_depth_predicts_the_median_training_depth_everywhere(monkeypatch, capsys):
    # a run seed other than the scenes' seed: the floor is scored on the preset's scenes (synthetic_seed)
    recipe = dataclasses.replace(PRESETS["synthetic_depth_none"], synthetic_train=3, synthetic_val=2, seed=1)
    monkeypatch.setitem(PRESETS, "synthetic_depth_none", recipe)
    scores = bench_constant_depth.constant_depth("synthetic_depth_none")
    train = synthetic.SyntheticDepthScenes(synthetic.SyntheticScenes("train", recipe.synthetic_seed,
                                                                   recipe.synthetic_size, 3,
                                                                   style=recipe.synthetic_style))
    depths = np.concatenate([train[i]["depth"][train[i]["depth"] > 0] for i in range(3)])
    assert scores["median"] == pytest.approx(float(np.median(depths)))
    assert scores["rel"] > 0 and 0 < scores["delta1"] < 1
    assert "constant depth" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--preset synthetic_seg_gdd: expected a synthetic depth preset"):
        bench_constant_depth.constant_depth("synthetic_seg_gdd")
