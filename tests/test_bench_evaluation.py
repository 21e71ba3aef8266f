import sys

import pytest

from kd_ref import bench_evaluation, export


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("trees")
    export.export("cityscapes", str(root / "cityscapes"), num_train=1, num_val=2, size=(64, 96))
    export.export("coco", str(root / "coco"), num_train=1, num_val=3, size=(64, 96))
    return root


def test_evaluation_rates_match_the_official_evaluators_results(trees, capsys):
    pytest.importorskip("cityscapesscripts")
    rates = bench_evaluation.evaluation_rates(str(trees / "cityscapes"), str(trees / "coco"), images=2,
                                              coco_images=3, detections_per_image=20, warmup=0, rounds=1)
    assert rates["seg identical"] is True and rates["coco identical"] is True
    assert all(rates[name] > 0 for name in ("kd_ref mIoU", "cityscapesscripts", "kd_ref COCO AP",
                                            "pycocotools COCOeval"))
    printed = capsys.readouterr().out
    assert "| kd_ref mIoU |" in printed and "rate / cityscapesscripts's" in printed
    assert printed.count("identical results: yes") == 2


def test_evaluation_rates_without_cityscapesscripts_say_so_in_one_line(trees, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cityscapesscripts.evaluation", None)  # as if not installed
    rates = bench_evaluation.evaluation_rates(str(trees / "cityscapes"), images=2, warmup=0, rounds=1)
    assert set(rates) == {"kd_ref mIoU"}
    lines = [line for line in capsys.readouterr().out.splitlines() if "cityscapesscripts" in line]
    assert lines[0].startswith("cityscapesscripts is not installed: the official mIoU evaluator is skipped")


def test_kd_ref_scores_of_prediction_files_equal_the_official_evaluation(trees):
    evaluation = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    pairs = bench_evaluation._cityscapes_pairs(str(trees / "cityscapes"), 2, str(trees))
    counts, scores = bench_evaluation.kd_ref_cityscapes_scores(pairs)
    official_counts, official_miou = bench_evaluation.official_cityscapes_scores(pairs)
    assert counts.sum() > 0 and (counts.diagonal().sum() < counts.sum()), "the shifted predictions have errors"
    assert counts.tolist() == official_counts.tolist() and scores["mIoU"] == pytest.approx(official_miou, rel=1e-12)
    assert evaluation.args.evalInstLevelScore is False


def test_evaluation_command_scores_the_given_trees_and_names_a_missing_one(trees, capsys):
    bench_evaluation.main(["--coco-root", str(trees / "coco"), "--rounds", "1"])
    printed = capsys.readouterr().out
    assert "| kd_ref COCO AP |" in printed and "identical results: yes" in printed
    with pytest.raises(SystemExit):
        bench_evaluation.main(["--seg-root", str(trees / "absent"), "--rounds", "1"])
    assert str(trees / "absent") in capsys.readouterr().err


def test_evaluation_rates_run_torch_on_one_thread_and_restore_it(trees, monkeypatch):
    import torch
    threads = []
    measure = bench_evaluation.measure
    monkeypatch.setattr(bench_evaluation, "measure",
                        lambda *args: threads.append(torch.get_num_threads()) or measure(*args))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bench_evaluation.evaluation_rates(coco_root=str(trees / "coco"), coco_images=2, detections_per_image=5,
                                          warmup=0, rounds=1)
        assert threads == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
