"""Shared fixtures: the real Idefics2 processor (Mistral tokenizer from mistral-common) and tiny fixtures."""

import os

import pytest

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
