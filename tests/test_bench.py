import math

from kd_ref import bench

TINY = {"synthetic_size": (64, 64), "crop": (64, 64), "synthetic_train": 4, "synthetic_val": 2, "batch_size": 2}


def test_effect_trains_teacher_once_and_reports_every_method(tmp_path, capsys):
    results = bench.effect("seg", ["none", "kd"], seeds=[0], iters=1, teacher_iters=1, out=str(tmp_path),
                           overrides=TINY)
    assert set(results) == {"none", "kd", "teacher"}
    assert all(len(values) == 1 and not math.isnan(values[0]) for values in results.values())
    printed = capsys.readouterr().out
    assert "mIoU mean ± std" in printed and "kd" in printed
    # a second call reuses the finished runs instead of training again
    assert bench.effect("seg", ["none", "kd"], [0], 1, 1, str(tmp_path), overrides=TINY) == results
