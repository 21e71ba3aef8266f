import math

import pytest

from kd_ref import bench_data, export


@pytest.mark.parametrize("task,export_format,size", [("seg", "cityscapes", (32, 64)), ("det", "coco", (48, 64)),
                                                     ("cls", "imagefolder", (48, 64))])
def test_data_prints_every_pipeline_of_a_tree_and_the_loader_settings(task, export_format, size, tmp_path, capsys):
    export.export(export_format, str(tmp_path), num_train=2, num_val=1, size=size)
    rates = bench_data.data([task], root=str(tmp_path), rounds=1, gpu_images_per_second=1e6)[task]
    assert set(rates) == {"training (ours)", "evaluation (ours)", "decode alone", "plain reference",
                          "training device step, CPU", "evaluation device step, CPU"}
    assert all(math.isfinite(rate) and rate > 0 for rate in rates.values())
    printed = capsys.readouterr().out
    assert f"{task}: images/s per worker thread, 1 interleaved rounds over {tmp_path}" in printed
    assert "| decode alone |" in printed and "| 1.00x |" in printed
    workers = math.ceil(1e6 / rates["training (ours)"])
    assert f"a GPU consuming 1e+06 images/s needs {workers} DataLoader workers" in printed


def test_data_cli_wants_the_task_of_a_given_tree(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_data.main(["--root", str(tmp_path)])
    assert "--root: name the tree's task with --task seg|det|cls" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_data.main(["--task", "seg", "--root", str(tmp_path / "absent")])
    assert f"Cityscapes root {tmp_path / 'absent'}: no such directory" in capsys.readouterr().err
