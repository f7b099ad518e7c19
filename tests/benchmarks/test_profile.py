"""Where a profiled step's time went (benchmarks.profile): the GPU's busy time as a union of kernel intervals,
and each place the host waited for the GPU, by the code that waited."""

import torch

from benchmarks import profile as bench_profile


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
    assert site["count"] == 2 and site["site"].endswith("reads_back") and "test_profile.py" in site["site"]
    text = bench_profile.format_summary(summary)
    assert "waited for the GPU 2 times" in text and "reads_back" in text


class Event:
    """What summarize reads of a profiler event (torch.autograd.profiler_util.FunctionEvent)."""

    def __init__(self, name, start, end, thread=1, parent=None, device="CPU"):
        from types import SimpleNamespace

        from torch.autograd import DeviceType

        self.name, self.thread, self.cpu_parent = name, thread, parent
        self.device_type = getattr(DeviceType, device)
        self.time_range = SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start)


def test_a_gpu_wait_is_put_on_the_frame_above_it_or_the_frame_around_it_in_time():
    # as a GPU profile records them: the runtime's synchronize under the operator that read a value, itself under
    # the Python frames that called it; or, under another thread id, with no parent at all
    frame = Event("/venv/site-packages/transformers/masking_utils.py(354): _ignore_bidirectional_mask_sdpa", 0, 100)
    builtin = Event("<built-in method all of Tensor object at 0x1>", 10, 40, parent=frame)
    read = Event("aten::_local_scalar_dense", 12, 38, parent=builtin)
    linked = Event("cudaStreamSynchronize", 20, 30, parent=read)
    elsewhere = Event("/work/src/docvlm/vision_cache.py(80): read", 200, 300)
    unlinked = Event("cudaStreamSynchronize", 250, 260, thread=99)
    alone = Event("cudaStreamSynchronize", 400, 410, thread=99)
    kernel = Event("some_kernel", 25, 35, device="CUDA")
    events = [frame, builtin, read, linked, elsewhere, unlinked, alone, kernel]
    summary = bench_profile.summarize(events, steps=1)
    sites = {site["site"]: site["count"] for site in summary["wait_sites"]}
    assert sites == {
        "transformers/masking_utils.py(354): _ignore_bidirectional_mask_sdpa": 1,
        "docvlm/vision_cache.py(80): read": 1,
        "cudaStreamSynchronize (no Python stack recorded)": 1,
    }
    assert summary["host_waits"] == 3 and summary["gpu_busy_s"] == 10 / 1e6
