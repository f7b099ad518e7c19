"""Shared fixtures: the real Idefics2 processor (Mistral tokenizer from mistral-common) and tiny fixtures."""

import os
from pathlib import Path

import pytest

from tests.helpers import quick

# Never let a test reach for the Hub: everything here is built locally.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

CHECKOUT_OUTPUTS = Path(__file__).resolve().parents[1] / "outputs"


def _listing(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.is_dir() else {}


@pytest.fixture(scope="session", autouse=True)
def checkout_outputs_untouched():
    """No test may write into the checkout's outputs/, where the user's own `make train` runs live (.ci/run trains
    there first, so that a test that reads or refuses that folder fails in CI too)."""
    before = _listing(CHECKOUT_OUTPUTS)
    yield
    after = _listing(CHECKOUT_OUTPUTS)
    changed = sorted(set(before) ^ set(after) | {p for p in before.keys() & after.keys() if before[p] != after[p]})
    assert not changed, f"tests wrote into the checkout's outputs/: {changed[:5]}"


@pytest.fixture(scope="session")
def processor():
    from docvlm.fixtures.models import build_processor

    return build_processor()


@pytest.fixture(scope="session")
def tiny_model_path():
    from docvlm.fixtures import TINY_MODEL, resolve

    return resolve(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_dataset_path():
    from docvlm.fixtures import TINY_DATASET, resolve

    return resolve(TINY_DATASET)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One short training run (4 steps, checkpoints at 2 and 4, generation eval at the end), shared by tests."""
    from docvlm.train import run

    out = tmp_path_factory.mktemp("run")
    # no warm-up: four steps at the full learning rate move the adapter far enough that a merge or a reload that
    # dropped it would answer differently (the tests of those check that it does)
    argv = quick(out, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "2", "--warmup_steps", "0")
    trainer, metrics = run(argv)
    return out, trainer, metrics
