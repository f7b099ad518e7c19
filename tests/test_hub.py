"""The Hub is unreachable in CI: loading by Hub id must fail fast and say how to use local copies."""

import os
import re
import subprocess
import sys
import time

import pytest

from docvlm.errors import UserError
from docvlm.hub import check_source, looks_local


def test_local_and_hub_names():
    assert looks_local("./data") and looks_local("/abs/path") and looks_local("a/b/c") and looks_local("x.parquet")
    assert not looks_local("HuggingFaceM4/idefics2-8b")


def test_unreachable_hub_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    from huggingface_hub import HfApi

    def refuse(*args, **kwargs):
        raise ConnectionError("Could not resolve host")

    monkeypatch.setattr(HfApi, "repo_info", refuse)
    with pytest.raises(UserError) as err:
        check_source("someone/some-model", "model", "model_name_or_path")
    message = str(err.value)
    assert "someone/some-model" in message and "model_name_or_path: <dir>" in message and "hf download" in message


def test_offline_mode_without_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE.*nielsr/docvqa_1200_examples.*dataset_name"):
        check_source("nielsr/docvqa_1200_examples", "dataset", "dataset_name")


@pytest.mark.integration
def test_train_on_hub_recipe_fails_fast_without_a_traceback(tmp_path):
    """What `make train RECIPE=docvqa_qlora` runs, with the Hub unreachable."""
    # Point the Hub at a closed local port: unreachable for sure, whatever the machine's network.
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "docvlm",
            "launch",
            "--config_file",
            "accelerate_configs/cpu.yaml",
            "-m",
            "docvlm.train",
            "--config",
            "recipes/docvqa_qlora.yaml",
            "--output_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stderr[-2000:]
    assert elapsed < 60
    assert "Traceback" not in out.stderr
    for name, key in (
        ("HuggingFaceM4/idefics2-8b", "model_name_or_path"),
        ("nielsr/docvqa_1200_examples", "dataset_name"),
    ):
        assert name in out.stderr and f"{key}: <dir>" in out.stderr


def test_a_mistyped_local_folder_is_named_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    """`--dataset_name my_scan` beside a `my_scans` folder said the Hub could not be reached."""
    import pytest

    from docvlm.errors import UserError
    from docvlm.hub import check_source

    (tmp_path / "my_scans").mkdir()
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    for name, near in (("my_scan", "my_scans"), ("./my_scan", "my_scans"), ("data/my_scans", None)):
        check_source.cache_clear()
        hint = f" Did you mean '{near}'" if near else ""
        expected = rf"The dataset path '{re.escape(name)}' \(dataset_name\) does not exist\.{hint}"
        with pytest.raises(UserError, match=expected):
            check_source(name, "dataset", "dataset_name")
