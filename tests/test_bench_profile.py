"""Where a profiled step's time went (docvlm.bench_profile): the GPU's busy time as a union of kernel intervals,
and each place the host waited for the GPU, by the code that waited."""

import torch

from docvlm import bench_profile


def test_busy_time_counts_overlapping_kernels_once():
    assert bench_profile.busy_seconds([(5, 6), (0, 2), (1, 3), (2.5, 2.7)]) == 4
    assert bench_profile.busy_seconds([]) == 0


def reads_back(x):
    count = int((x > 0).sum())  # .item(): the host waits for the value
    positive = x[x > 0]  # a boolean index: the host waits for the count of selected values
    return positive.sum() + count


def test_each_read_of_a_device_value_is_counted_per_step_with_the_function_that_made_it():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as profile:
        for _ in range(3):
            reads_back(torch.randn(64))
            torch.randn(64).sum()  # reads nothing back
    summary = bench_profile.summarize(profile.events(), steps=3)
    assert summary["host_waits"] == 2 and summary["kernel_launches"] == 0 and summary["gpu_busy_s"] == 0
    (site,) = summary["wait_sites"]
    assert site["count"] == 2 and site["site"].endswith("reads_back") and "test_bench_profile.py" in site["site"]
    text = bench_profile.format_summary(summary)
    assert "waited for the GPU 2 times" in text and "reads_back" in text
