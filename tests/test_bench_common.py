import os
import subprocess
import sys

import torch

from kd_ref import bench_common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_training_and_evaluation_import_no_benchmark():
    """The benchmarks are tools beside the code they measure: train.py, evaluate.py and the engine run
    without any of them."""
    probe = ("import sys, train, evaluate, kd_ref.engine; "
             "print(sorted(m for m in sys.modules if m.startswith('kd_ref.bench')))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_measure_rotates_the_order_of_the_cases_every_round():
    order = []
    cases = [bench_common.TimedCase(name, lambda name=name: order.append(name)) for name in "abc"]
    results = bench_common.measure(cases, warmup=1, rounds=2, device=torch.device("cpu"))
    assert order[:9] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # 1 warm-up and 2 timed rounds
    assert order[9:] == ["a", "b", "c"]                                  # the untimed memory round
    assert all(len(results[name].seconds) == 2 for name in "abc")


def test_print_table_writes_markdown_under_its_title(capsys):
    bench_common.print_table("title", ["case", "s"], [["a", "1.0"]])
    assert capsys.readouterr().out == "\ntitle\n\n| case | s |\n|---|---|\n| a | 1.0 |\n\n"
