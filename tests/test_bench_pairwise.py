from kd_ref import bench_pairwise


def test_pairwise_smoke_agrees_and_skips_dense_sizes_over_the_budget(capsys):
    budget_gib = 1.5 * bench_pairwise.dense_pairwise_bytes(1, 64) / 2 ** 30
    rows = bench_pairwise.pairwise([64, 256], channels=(16, 32), repeats=1, memory_budget_gib=budget_gib)
    assert [r["nodes"] for r in rows] == [64, 256]
    assert rows[0]["loss_rel_diff"] < 1e-5 and rows[0]["grad_rel_diff"] < 1e-4
    assert rows[0]["dense_seconds"] > 0 and rows[1]["gram_seconds"] > 0
    assert rows[1]["dense_skipped"].startswith("skipped: needs")
    assert "| 256 | skipped: needs" in capsys.readouterr().out
