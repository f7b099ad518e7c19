"""cuda_expandable_segments: set at run time, before the model takes its memory, unless the environment says."""


def test_expandable_segments_are_set_at_run_time_unless_the_environment_says(monkeypatch):
    import torch

    from docvlm.speedups import expandable_segments as runtime

    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.use_expandable_segments() is False and calls == []  # no GPU: nothing to set

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.use_expandable_segments() is True
    assert calls == ["expandable_segments:True"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128,expandable_segments:False")
    assert runtime.use_expandable_segments() is False  # the user's own setting wins
    assert calls == ["expandable_segments:True"]
