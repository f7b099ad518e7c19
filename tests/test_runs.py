"""One run per output_dir, resuming only from a complete checkpoint of the same run, and stops on a signal or a
kill that lose no step (docvlm.runs)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from docvlm.errors import UserError
from docvlm.runs import check_output_dir, resolve_checkpoint
from tests.helpers import quick


def fake_run(folder: Path, steps=(2, 4), **recipe) -> Path:
    """A run folder as training leaves it: recipe.yaml and complete checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"dataset_name": "a", "model_name_or_path": "m", **recipe}))
    for step in steps:
        checkpoint = folder / f"checkpoint-{step}"
        checkpoint.mkdir()
        (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
        (checkpoint / "optimizer.pt").write_bytes(b"state")
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    run = fake_run(tmp_path / "run")
    with pytest.raises(UserError, match=r"already holds a run \(recipe.yaml, checkpoint-4, checkpoint-2\).*latest"):
        check_output_dir(str(run), resuming=False, overwrite=False, current={"dataset_name": "b"})
    check_output_dir(str(tmp_path / "new"), resuming=False, overwrite=False, current={})  # nothing there: fine
    (tmp_path / "empty").mkdir()
    check_output_dir(str(tmp_path / "empty"), resuming=False, overwrite=False, current={})
    check_output_dir(str(run), resuming=False, overwrite=True, current={})
    assert not run.exists()  # started over: nothing of the old run is left beside the new one


def test_resuming_another_runs_checkpoint_is_refused(tmp_path):
    run = fake_run(tmp_path / "run", max_train_samples=16)
    same = {"dataset_name": "a", "model_name_or_path": "m", "max_train_samples": 16}
    check_output_dir(str(run), resuming=True, overwrite=False, current=same)
    with pytest.raises(UserError, match=r"trained something else \(dataset_name: 'a' there, 'b' now\)"):
        check_output_dir(str(run), resuming=True, overwrite=False, current={**same, "dataset_name": "b"})


def test_overwrite_removes_only_docvlm_run_folders(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.json").write_text("{}")  # a run marker, but no recipe.yaml: not docvlm's
    with pytest.raises(UserError, match="was not written by docvlm"):
        check_output_dir(str(tmp_path / "mine"), resuming=False, overwrite=True, current={})
    assert (tmp_path / "mine" / "report.json").exists()


def test_latest_passes_over_a_checkpoint_cut_off_while_saving(tmp_path, capsys):
    run = fake_run(tmp_path / "run", steps=(2, 4, 6))
    (run / "checkpoint-6" / "trainer_state.json").unlink()  # killed before its last file
    (run / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')  # killed while writing it
    assert resolve_checkpoint("latest", str(run)) == str(run / "checkpoint-2")
    out = capsys.readouterr().out
    assert "Not resuming from" in out and "checkpoint-6: it is incomplete (no readable trainer_state.json)" in out
    with pytest.raises(UserError, match="checkpoint-6 is incomplete"):
        resolve_checkpoint(str(run / "checkpoint-6"), str(run))
    (run / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(UserError, match="holds no complete checkpoint"):
        resolve_checkpoint("latest", str(run))


def test_a_second_run_into_a_used_folder_stops_before_the_data_or_model_loads(tmp_path, capsys, monkeypatch):
    from docvlm import data, train

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(data, "load_splits", no_loading)
    fake_run(tmp_path / "run")
    assert train.main(quick(tmp_path / "run", "--max_steps", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err


def train_command(out: Path, *extra) -> list[str]:
    return [
        *(sys.executable, "-m", "docvlm.train"),
        *quick(out, "--max_steps", "12", "--save_steps", "3", "--eval_after_training", "false"),
        *("--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--report_to", "none"),
        *extra,
    ]


def start_and_signal_after_a_checkpoint(out: Path, sig: int) -> subprocess.CompletedProcess:
    process = subprocess.Popen(train_command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-3" / "trainer_state.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "training ended before it could be signalled"
    os.kill(process.pid, sig)
    output, _ = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def logged_steps(out: Path) -> list[int]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["step"] for h in history if "loss" in h]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_finishes_with_no_step_lost(tmp_path):
    out = tmp_path / "term"
    stopped = start_and_signal_after_a_checkpoint(out, signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-3000:]
    assert "SIGTERM received: saving a checkpoint after this step" in stopped.stdout
    assert "--resume_from_checkpoint latest" in stopped.stdout
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert (out / f"checkpoint-{last}" / "adapter_model.safetensors").is_file()
    assert not (out / "report.json").exists()  # a stopped run is not a finished one
    resumed = subprocess.run(train_command(out, "--resume_from_checkpoint", "latest"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged_steps(out) == list(range(1, 13))  # every step once


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_complete_checkpoint_with_no_gap_or_repeat(tmp_path):
    out = tmp_path / "kill"
    killed = start_and_signal_after_a_checkpoint(out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    uninterrupted = tmp_path / "whole"
    whole = subprocess.run(train_command(uninterrupted), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    resumed = subprocess.run(train_command(out, "--resume_from_checkpoint", "latest"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and logged_steps(out) == list(range(1, 13))
    losses = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    reference = json.loads((uninterrupted / "trainer_state.json").read_text())["log_history"]
    assert losses == pytest.approx({h["step"]: h["loss"] for h in reference if "loss" in h}, rel=1e-4)


def test_a_full_disk_during_a_save_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path, capsys, monkeypatch):
    import errno

    from transformers import Trainer

    from docvlm.train import main

    saves = []
    original = Trainer._save_optimizer_and_scheduler

    def fills_the_disk(self, output_dir):
        saves.append(output_dir)
        if len(saves) == 2:  # the second checkpoint: its weights are written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", f"{output_dir}/optimizer.pt")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", fills_the_disk)
    out = tmp_path / "run"
    assert main(quick(out, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "1")) == 2
    assert "the disk is full" in capsys.readouterr().err
    assert (out / "checkpoint-4").is_dir()  # cut off, so passed over; the one before is whole and kept
    assert resolve_checkpoint("latest", str(out)) == str(out / "checkpoint-2")
