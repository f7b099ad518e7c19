"""make bench-cpu's plumbing: one short run yields its training and generation times (the figures come from make)."""

import pytest

from benchmarks.bench_cpu import run_once


@pytest.mark.slow
def test_one_run_reports_training_and_generation_time(tmp_path):
    row = run_once("passive", busy=False, steps=2, eval_samples=2, workdir=tmp_path)
    assert row["policy"] == "passive" and row["load"] == "idle"
    assert 0 < row["train_s"] < row["process_s"] and row["generation_s"] > 0
