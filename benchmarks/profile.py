"""Where a profiled training step's time went (`benchmarks.bench --profile`): how long the GPU was busy, how many
kernels the host launched, and every point where the host waited for the GPU, by the line of code that waited.

torch's profiler table ranks operators by their time; it does not say how much of a step the GPU sat idle, nor
which Python line made the host read a value back from the GPU (a `.item()`, a `.tolist()`, a boolean index, an
`if tensor.all()`). Each such read drains the GPU's queue of work, and the GPU then waits for the host to queue
more. This reads the profiler's events for both.
"""

from __future__ import annotations

from collections import defaultdict

# Host calls that wait for the GPU to finish what was queued (CUDA runtime and driver names).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize")
# The operators that read a tensor's values on the host: on a GPU each one ends in one of the calls above. They
# are what a CPU profile shows, where nothing is launched and nothing waits.
HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
# Frames in these files say how a value was read, not which of our or the libraries' code read it.
PLUMBING = (
    "torch/nn/modules/module.py",
    "torch/_tensor.py",
    "torch/overrides.py",
    "torch/utils/_contextlib.py",
    "torch/_compile.py",
    "torch/_dynamo/",
    "<built-in",
    "threading.py",
)


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals, in the intervals' unit: concurrent kernels count once."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total


class CallSites:
    """The innermost Python frame outside torch's plumbing around a host event. With profile(with_stack=True)
    each Python call is an event ('file.py(line): function') on its thread. The event's parents are searched
    first; where none is a frame (a CUDA runtime call recorded under another thread id has no parents), frames
    are matched by time: the latest-starting frame that encloses the event, on its thread where one does."""

    def __init__(self, cpu_events):
        import numpy as np

        frames = [e for e in cpu_events if is_frame(e.name)]
        self.names = [shorten(e.name) for e in frames]
        self.thread_ids: dict[int, int] = {}  # thread ids can exceed int64: numbered here instead
        self.threads = np.array([self._thread(e) for e in frames], dtype=np.int64)
        self.starts = np.array([e.time_range.start for e in frames], dtype=np.float64)
        self.ends = np.array([e.time_range.end for e in frames], dtype=np.float64)

    def _thread(self, event) -> int:
        return self.thread_ids.setdefault(event.thread, len(self.thread_ids))

    def __call__(self, event) -> str:
        import numpy as np

        operator = None  # the innermost operator around the event, named when no Python frame is found
        parent = event.cpu_parent
        while parent is not None:  # torch links events of one thread by time: the frames above, where they are
            if is_frame(parent.name):
                return shorten(parent.name)
            operator = operator or (parent.name if parent.name.startswith("aten::") else None)
            parent = parent.cpu_parent
        start, end = event.time_range.start, event.time_range.end
        around = (self.starts <= start) & (self.ends >= end)
        if (around & (self.threads == self._thread(event))).any():
            around &= self.threads == self._thread(event)
        elif not around.any():  # the CUDA runtime's thread ids may not be Python's: then any thread's frame
            return f"{operator or event.name} (no Python stack recorded)"
        return self.names[int(np.argmax(np.where(around, self.starts, -np.inf)))]


def is_frame(name: str) -> bool:
    """Whether a profiler event is a Python frame of our or the libraries' code (not torch's plumbing)."""
    return ".py(" in name and not any(part in name for part in PLUMBING)


def shorten(frame: str) -> str:
    """'/…/site-packages/transformers/models/x.py(12): f' -> 'transformers/models/x.py(12): f'."""
    for marker in ("/site-packages/", "/src/"):
        if marker in frame:
            return frame.split(marker, 1)[1]
    return frame


def summarize(events, steps: int) -> dict:
    """Per-step figures of a profile's events (`torch.profiler.profile(...).events()`) covering `steps` steps."""
    from torch.autograd import DeviceType

    device, launches, waits = [], 0, []
    cpu = [event for event in events if event.device_type == DeviceType.CPU]
    for event in events:
        if event.device_type == DeviceType.CUDA:
            device.append((event.time_range.start, event.time_range.end))
    for event in cpu:
        if event.name in LAUNCHES:
            launches += 1
    # On a GPU the waits are the synchronizing calls; on a CPU (no runtime calls at all) the host reads stand in.
    sync_names = SYNC_CALLS if any(event.name in SYNC_CALLS for event in cpu) else HOST_READS
    for event in cpu:
        if event.name in sync_names:
            waits.append(event)
    sites, call_site = defaultdict(lambda: [0, 0.0]), CallSites(cpu)
    for event in waits:
        site = sites[call_site(event)]
        site[0] += 1
        site[1] += event.time_range.elapsed_us() / 1e6
    window = 0.0
    if cpu:
        window = (max(e.time_range.end for e in cpu) - min(e.time_range.start for e in cpu)) / 1e6
    ranked = sorted(sites.items(), key=lambda item: (-item[1][1], -item[1][0]))
    return {
        "steps": steps,
        "window_s": window / steps,
        "gpu_busy_s": busy_seconds(device) / 1e6 / steps,
        "kernel_launches": launches / steps,
        "host_waits": len(waits) / steps,
        "host_wait_s": sum(event.time_range.elapsed_us() for event in waits) / 1e6 / steps,
        "wait_sites": [
            {"site": site, "count": count / steps, "seconds": seconds / steps} for site, (count, seconds) in ranked
        ],
    }


def format_summary(summary: dict, top: int = 12) -> str:
    """A few lines for a benchmark log."""
    window, busy = summary["window_s"], summary["gpu_busy_s"]
    share = f" ({busy / window:.0%} of it)" if window else ""
    lines = [
        f"Profile, a step on average over {summary['steps']}: {window:.3f} s on the host; GPU busy {busy:.3f} s"
        f"{share}; {summary['kernel_launches']:.0f} kernel launches; the host waited for the GPU "
        f"{summary['host_waits']:.0f} times, {summary['host_wait_s']:.3f} s in all:"
    ]
    for site in summary["wait_sites"][:top]:
        lines.append(f"  {site['count']:6.1f} x  {site['seconds']:.4f} s  {site['site']}")
    left = len(summary["wait_sites"]) - top
    if left > 0:
        lines.append(f"  ... and {left} more sites")
    return "\n".join(lines)
