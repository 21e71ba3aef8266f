import math

import pytest

from kd_ref import bench_effect

TINY = {"synthetic_size": (64, 64), "crop": (64, 64), "synthetic_train": 4, "synthetic_val": 2, "batch_size": 2}


def test_effect_trains_teacher_once_and_reports_every_method(tmp_path, capsys):
    results = bench_effect.effect("seg", ["none", "kd"], seeds=[0], iters=1, teacher_iters=1, out=str(tmp_path),
                                  overrides=TINY)
    assert set(results) == {"none", "kd", "teacher"}
    assert all(len(values) == 1 and not math.isnan(values[0]) for values in results.values())
    printed = capsys.readouterr().out
    assert "mIoU mean ± std" in printed and "kd" in printed
    # a second call reuses the finished runs instead of training again
    assert bench_effect.effect("seg", ["none", "kd"], [0], 1, 1, str(tmp_path), overrides=TINY) == results


def test_effect_on_detection_reports_map_per_method(tmp_path, capsys):
    tiny_det = {"synthetic_size": (64, 64), "image_scale": (64, 64), "synthetic_train": 4, "synthetic_val": 2,
                "batch_size": 2}
    results = bench_effect.effect("det", ["none", "dist"], seeds=[0], iters=1, teacher_iters=1, out=str(tmp_path),
                                  overrides=tiny_det)
    assert set(results) == {"none", "dist", "teacher"}
    assert all(len(values) == 1 and 0.0 <= values[0] <= 100.0 for values in results.values())
    assert "mAP mean ± std" in capsys.readouterr().out


def test_effect_compares_methods_of_one_teacher_and_takes_preset_names():
    assert bench_effect.default_effect_methods("det") == ["dist", "gdd", "gkd", "none"]  # the RetinaNet pair
    assert bench_effect.effect_presets("det", ["synthetic_det_frcnn_none", "kd", "sokd"]) == {
        "none": "synthetic_det_frcnn_none", "kd": "synthetic_det_frcnn_kd", "sokd": "synthetic_det_frcnn_sokd"}
    with pytest.raises(ValueError, match="train against different teachers"):
        bench_effect.effect_presets("det", ["none", "kd"])
