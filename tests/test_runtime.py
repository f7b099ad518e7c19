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


@pytest.mark.integration
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
