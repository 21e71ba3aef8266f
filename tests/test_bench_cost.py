import math

import pytest

from kd_ref import bench_cost


def test_cost_rows_relate_every_case_to_the_student_step_and_the_distillation_floor():
    rows = {r.name: r for r in bench_cost.cost_rows({"none": 2.0, "teacher forward": 1.0, "kd": 3.3},
                                                    {"none": 2 ** 20, "teacher forward": 2 ** 21, "kd": 3 * 2 ** 20})}
    assert rows["kd"].x_student == pytest.approx(1.65) and rows["kd"].x_floor == pytest.approx(1.1)
    assert rows["kd"].extra_percent == pytest.approx(15.0) and rows["kd"].peak_mb == 3
    assert math.isnan(rows["none"].extra_percent) and rows["teacher forward"].x_student == 0.5


def test_size_overrides_per_task():
    assert bench_cost.size_overrides("seg", (64, 96)) == {"synthetic_size": (64, 96), "crop": (64, 96)}
    assert bench_cost.size_overrides("det", (64, 96))["image_scale"] == (96, 64)
    with pytest.raises(ValueError, match="square"):
        bench_cost.size_overrides("cls", (32, 48))


def test_cost_smoke_prints_a_row_per_case_with_sane_figures(capsys):
    tables = bench_cost.cost(["cls"], ["kd", "sokd"], {"batch_size": 2, "synthetic_size": (32, 32)}, warmup=0, rounds=1)
    rows = tables["cls"]
    assert [r.name for r in rows] == ["none", "teacher forward", "kd", "sokd", "sokd, search over"]
    for row in rows:
        assert all(math.isfinite(v) and v > 0 for v in (row.seconds, row.x_student, row.x_floor, row.peak_mb))
    printed = capsys.readouterr().out
    assert "| case | s/step | x student | x (student + teacher fwd) |" in printed and "| sokd |" in printed


def test_cost_times_each_method_against_its_own_pair_and_names_what_it_skips(capsys):
    small = {"batch_size": 1, "synthetic_size": (64, 64), "image_scale": (64, 64)}
    tables = bench_cost.cost(["det"], ["kd"], small, warmup=0, rounds=1)
    assert [r.name for r in tables["det"]] == ["none", "teacher forward"]
    assert [r.name for r in tables["det: faster_rcnn_r18 <- faster_rcnn_r18"]] == ["none", "teacher forward", "kd"]
    forced = {**small, "student": "retinanet_r18", "teacher": "retinanet_r18"}
    forced_rows = bench_cost.cost(["det"], ["kd"], forced, warmup=0, rounds=1)["det"]
    assert [r.name for r in forced_rows] == ["none", "teacher forward"]
    assert "skipped kd for retinanet_r18 <- retinanet_r18: --method kd on detection" in capsys.readouterr().out
