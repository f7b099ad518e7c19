"""Process-wide settings of docvlm's entry points: how idle CPU threads wait, which third-party messages that no
user can act on are muted, and where docvlm caches what it builds. Nothing here imports torch at import time (the
thread setting must come before torch loads)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path


def prefer_passive_cpu_threads() -> None:
    """Let OpenMP threads sleep as soon as they are idle, on machines without an NVIDIA GPU.

    By default torch's OpenMP threads spin at every barrier; beside one other busy process on a small machine the
    spinning threads take turns with it and training slows several times over, where sleeping threads cost nothing
    on an idle machine (docs/cpu_threads.md). libgomp reads the variable when it loads, so this must run before
    torch is imported; a value set by the user wins. GPU machines keep the default: their CPU threads feed the GPU
    and should wake without delay."""
    if not os.path.exists("/dev/nvidiactl"):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_third_party_noise() -> None:
    """Mute library messages that say nothing a docvlm user can act on. Called by the entry points only, so that
    importing docvlm as a library changes no one's warnings. Each one is named, never a whole category:
    - bitsandbytes, on CPUs with AVX512-BF16, tries to fetch an optional kernel from the Hub at import and logs
      "Failed to load CPU gemm_4bit_forward from kernels-community" when it can't; it falls back to its own
      kernel, which is what runs anyway on a machine without Hub access.
    - peft reads `model.is_gradient_checkpointing`, which newer transformers deprecates with a FutureWarning;
      the call is inside peft.
    - transformers warns "The modules are dequantized in <dtype>" whenever a 4-bit model is dequantized, which is
      what `docvlm merge` asks for.
    """
    for name, prefix in (
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
        ("transformers.integrations.bitsandbytes", "The modules are dequantized in"),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefix))
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def cache_root() -> Path:
    """Where docvlm builds and caches what it makes once (fixtures, row checks, vision features, the rendered help):
    $DOCVLM_CACHE, else ~/.cache/docvlm."""
    return Path(os.environ.get("DOCVLM_CACHE", Path.home() / ".cache" / "docvlm")).expanduser()
