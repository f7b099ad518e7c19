"""Shared fixtures: the real Idefics2 processor (Mistral tokenizer from mistral-common) and tiny fixtures."""

import os

import pytest

from tests.helpers import quick

# Never let a test reach for the Hub: everything here is built locally.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def processor():
    from docvlm import tiny

    return tiny.build_processor()


@pytest.fixture(scope="session")
def tiny_model_path():
    from docvlm import tiny

    return tiny.resolve(tiny.TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_dataset_path():
    from docvlm import tiny

    return tiny.resolve(tiny.TINY_DATASET)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One short training run (4 steps, checkpoints at 2 and 4, generation eval at the end), shared by tests."""
    from docvlm.train import run

    out = tmp_path_factory.mktemp("run")
    trainer, metrics = run(quick(out, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "2"))
    return out, trainer, metrics
