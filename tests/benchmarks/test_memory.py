"""The peak-memory breakdown: replaying a recorded allocation trace (no GPU needed)."""

from benchmarks.memory import RECORDED_BEFORE, format_sites, live_at_peak, site, top_sites


def frame(path, line, name):
    return {"filename": path, "line": line, "name": name}


PACKAGES = "/usr/lib/python3.12/site-packages"
GATHER = [frame(f"{PACKAGES}/torch/nn/modules/module.py", 1, "_call_impl"), frame(f"{PACKAGES}/ds/zero.py", 7, "fetch")]
LOGITS = [frame("/repo/src/docvlm/modeling.py", 12, "lean_logits"), frame("/repo/src/docvlm/trainer.py", 3, "loss")]


def event(action, addr, size, frames=()):
    return {"action": action, "addr": addr, "size": size, "frames": list(frames)}


def test_the_peak_is_found_by_replay_and_split_by_site():
    trace = [
        event("alloc", 1, 100, GATHER),
        event("alloc", 2, 300, LOGITS),
        event("free_completed", 2, 300),  # the logits go: the peak (1,000 + 400) is behind us
        event("free_completed", 99, 200),  # memory from before recording is freed
        event("alloc", 3, 50, GATHER),
        event("segment_alloc", 9, 10_000),  # segments are reserved, not allocated
    ]
    peak, live = live_at_peak({"device_traces": [[], trace]}, allocated_before=1000, device=1)
    assert peak == 1400
    assert live == {RECORDED_BEFORE: 1000, site(GATHER): 100, site(LOGITS): 300}
    assert site(GATHER) == "ds/zero.py:7 fetch"  # torch's module plumbing is skipped
    assert site(LOGITS).startswith("docvlm/modeling.py:12 lean_logits < docvlm/trainer.py:3")


def test_a_library_allocation_names_the_model_code_that_led_to_it():
    deep = [frame(f"{PACKAGES}/ds/zero.py", n, f"f{n}") for n in range(5)]
    frames = [*deep, frame(f"{PACKAGES}/transformers/models/idefics2/modeling_idefics2.py", 296, "forward")]
    assert site(frames) == "ds/zero.py:0 f0 < ds/zero.py:1 f1 < ds/zero.py:2 f2 < ... " + (
        "transformers/models/idefics2/modeling_idefics2.py:296 forward"
    )
    assert "..." not in site(LOGITS)  # model code already shown


def test_a_later_higher_peak_replaces_the_earlier_one_and_memory_freed_from_before_counts():
    trace = [event("free_completed", 99, 600), event("alloc", 1, 100, GATHER), event("alloc", 2, 700, LOGITS)]
    peak, live = live_at_peak({"device_traces": [trace]}, allocated_before=1000)
    assert peak == 1200 and live == {RECORDED_BEFORE: 400, site(GATHER): 100, site(LOGITS): 700}


def test_the_table_lists_the_largest_sites_and_the_rest():
    rows = top_sites({"a": 3 * 2**30, "b": 2**30, "c": 2**29}, limit=2)
    assert [r["site"] for r in rows] == ["a", "b", "(every other site)"] and rows[2]["gib"] == 0.5
    text = format_sites(4.5, rows)
    assert "4.50 GiB" in text and "| 3.00 | a |" in text and "| 0.50 | (every other site) |" in text
