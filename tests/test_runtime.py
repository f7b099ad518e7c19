"""Process-wide settings: how idle CPU threads wait, and the third-party messages the entry points mute."""

import logging
import os
import subprocess
import sys
import warnings

import pytest

from docvlm.runtime import quiet_third_party_noise


def _omp_wait_policy(env: dict) -> str:
    probe = "import os, docvlm, torch; print(os.environ.get('OMP_WAIT_POLICY', '-'))"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="GPU machines keep OpenMP's default wait policy")
def test_cpu_machines_get_passive_openmp_threads_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _omp_wait_policy(env).strip() == "PASSIVE"
    assert _omp_wait_policy({**env, "OMP_WAIT_POLICY": "ACTIVE"}).strip() == "ACTIVE"
    assert _omp_wait_policy({**env, "OMP_WAIT_POLICY": ""}) == "\n"  # how make bench-cpu asks for OpenMP's default


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_only_the_named_messages_are_muted():
    quiet_third_party_noise()
    for name, muted in (
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: no module"),
        ("transformers.integrations.bitsandbytes", "The modules are dequantized in torch.float32."),
    ):
        logger, seen = logging.getLogger(name), _Collect()
        logger.addHandler(seen)  # on the logger itself: transformers' loggers do not propagate to the root
        try:
            logger.warning(muted)
            logger.warning("some other problem")
        finally:
            logger.removeHandler(seen)
        assert seen.messages == ["some other problem"], name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party_noise()
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=2
        )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=2)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_expandable_segments_are_set_at_run_time_unless_the_environment_says(monkeypatch):
    import torch

    from docvlm import runtime

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


def test_cudnn_attention_switch_turns_cudnn_sdpa_off_on_a_gpu_only(monkeypatch):
    import torch

    from docvlm import runtime

    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert runtime.disable_cudnn_attention() is False and torch.backends.cuda.cudnn_sdp_enabled()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert runtime.disable_cudnn_attention() is True and not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def test_garbage_alive_after_the_first_step_is_frozen_once():
    import gc

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from docvlm.runtime import freeze_garbage_after_first_step

    callback, state = freeze_garbage_after_first_step(), TrainerState()
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    gc.unfreeze()
    try:
        state.global_step = 1
        callback.on_step_end(args, state, TrainerControl())
        frozen = gc.get_freeze_count()
        assert frozen > 0  # what the first step left alive is out of the collector's reach
        garbage = [object() for _ in range(1000)]
        state.global_step = 2
        callback.on_step_end(args, state, TrainerControl())
        assert gc.get_freeze_count() == frozen  # later steps' objects are collected as usual
        del garbage
    finally:
        gc.unfreeze()
