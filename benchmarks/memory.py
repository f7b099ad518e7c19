"""What fills GPU memory at a training step's peak, by the code that allocated it (`benchmarks.bench --memory-profile`).

torch records every allocation and free with its Python stack (`torch.cuda.memory._record_memory_history`); this
replays that record, finds the moment the most memory was allocated, and sums what was live then by allocation
site. torch's own viewer (pytorch.org/memory_viz) needs a browser and the whole pickle; a table of the top sites
fits in a benchmark log.
"""

from __future__ import annotations

from collections import Counter

# Frames in these files say how an allocation was made, not which of our or the libraries' code asked for it.
PLUMBING = ("/torch/nn/modules/module.py", "/torch/utils/_contextlib.py", "/torch/_tensor.py", "/torch/overrides.py")
MODEL_CODE = ("/transformers/models/", "/docvlm/", "/peft/tuners/")
RECORDED_BEFORE = "(allocated before recording started: weights, optimizer state, buffers)"


def start_recording(max_entries: int = 500_000) -> int:
    """Start recording allocations with Python stacks; returns the bytes already allocated, which the record will
    not show being allocated.

    While recording, a checkpointed region's recomputation runs to its end instead of stopping early: torch 2.11
    fails the early stop of a custom autograd Function under recording ("apply ... returned NULL without setting
    an exception", pytorch/pytorch#179536). The recomputation then keeps what it would have discarded, so the
    profiled step's peak can be slightly above an unrecorded step's."""
    import torch
    from torch.utils import checkpoint

    checkpoint._enable_checkpoint_early_stop = False  # what set_checkpoint_early_stop(False) sets, for a step
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    return torch.cuda.memory_allocated()


def stop_recording() -> dict:
    import torch
    from torch.utils import checkpoint

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    checkpoint._enable_checkpoint_early_stop = None  # back to torch's default
    return snapshot


def short_path(path: str) -> str:
    """A file's path from its package on: what follows site-packages/ or src/."""
    for marker in ("site-packages/", "dist-packages/", "/src/"):
        if marker in path:
            return path.rsplit(marker, 1)[1]
    return path


def site(frames: list[dict], depth: int = 3) -> str:
    """The innermost `depth` frames outside torch's module plumbing, innermost first, and the innermost model
    frame beyond them (a library's allocation, e.g. DeepSpeed gathering a layer, then says for which module)."""
    kept = [f for f in frames if not any(p in f.get("filename", "") for p in PLUMBING)]
    shown = kept[:depth]
    model = next((f for f in kept[depth:] if any(m in f.get("filename", "") for m in MODEL_CODE)), None)
    parts = [f"{short_path(f.get('filename', '?'))}:{f.get('line', '?')} {f.get('name', '?')}" for f in shown]
    if model is not None and not any(any(m in f.get("filename", "") for m in MODEL_CODE) for f in shown):
        parts.append(f"... {short_path(model.get('filename', '?'))}:{model.get('line', '?')} {model.get('name', '?')}")
    return " < ".join(parts) or "(no Python frame)"


def live_at_peak(snapshot: dict, allocated_before: int, device: int = 0) -> tuple[int, Counter]:
    """Replay the device's trace: the peak of allocated bytes, and the bytes live at that peak by site. Memory
    allocated before recording began counts as one site until the trace frees it."""
    trace = snapshot.get("device_traces", [])
    events = trace[device] if device < len(trace) else []
    live: dict[int, tuple[int, str]] = {}
    before = allocated_before
    total = peak = allocated_before
    peak_live: Counter = Counter({RECORDED_BEFORE: allocated_before}) if allocated_before else Counter()
    for event in events:
        action, addr, size = event.get("action"), event.get("addr"), event.get("size", 0)
        if action == "alloc":
            live[addr] = (size, site(event.get("frames", [])))
            total += size
        elif action == "free_completed":
            if addr in live:
                total -= live.pop(addr)[0]
            else:  # freed what was allocated before recording began
                before -= size
                total -= size
        else:
            continue
        if total > peak:
            peak = total
            peak_live = Counter()
            for nbytes, where in live.values():
                peak_live[where] += nbytes
            if before > 0:
                peak_live[RECORDED_BEFORE] += before
    return peak, peak_live


def top_sites(peak_live: Counter, limit: int = 15) -> list[dict]:
    """The largest sites at the peak, in GiB, largest first, and what the rest add up to."""
    peak_live = Counter(peak_live)
    rows = [{"site": where, "gib": nbytes / 2**30} for where, nbytes in peak_live.most_common(limit)]
    rest = sum(peak_live.values()) - sum(n for _, n in peak_live.most_common(limit))
    if rest > 0:
        rows.append({"site": "(every other site)", "gib": rest / 2**30})
    return rows


def format_sites(peak_gib: float, rows: list[dict]) -> str:
    lines = [f"Allocated at the profiled step's peak: {peak_gib:.2f} GiB", "| GiB | allocated at |", "|---|---|"]
    lines += [f"| {row['gib']:.2f} | {row['site']} |" for row in rows]
    return "\n".join(lines)
