"""One run per output_dir, resuming only from a complete checkpoint of the same run, and stops on a signal or a
kill that lose no step (docvlm.training.runs)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from docvlm.errors import UserError
from docvlm.training.runs import check_output_dir, checkpoints, incomplete_because, resolve_checkpoint
from tests.helpers import mark_for_resume, quick


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
    from docvlm import prepare, train

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(prepare, "load_splits", no_loading)
    fake_run(tmp_path / "run")
    assert train.main(quick(tmp_path / "run", "--max_steps", "1")) == 2
    assert "already holds a run" in capsys.readouterr().err


def train_command(out: Path, *extra, launcher: bool = False) -> list[str]:
    """A 12-step run of the tiny recipe, as `python -m docvlm.train` or under `docvlm launch` (as `make train`)."""
    prefix = (sys.executable, "-m", "docvlm.train")
    if launcher:
        prefix = (sys.executable, "-m", "docvlm", "launch", "--config_file", "accelerate_configs/cpu.yaml")
        prefix += ("-m", "docvlm.train")
    return [
        *prefix,
        *quick(out, "--max_steps", "12", "--save_steps", "100", "--eval_after_training", "false"),
        *("--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--report_to", "none"),
        *extra,
    ]


def losses_of(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def logged_steps(out: Path) -> list[int]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["step"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("whole")
    done = subprocess.run(train_command(out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return losses_of(out)


def send(process: subprocess.Popen, how: str) -> None:
    if how == "Ctrl-C to the process group":
        os.killpg(process.pid, signal.SIGINT)
    elif how == "SIGINT to the launcher alone":
        os.kill(process.pid, signal.SIGINT)
    elif how == "SIGTERM to the launcher alone":
        os.kill(process.pid, signal.SIGTERM)
    elif how == "Ctrl-C twice, 50 ms apart":
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)


@pytest.mark.slow
@pytest.mark.parametrize(
    "how",
    [
        "Ctrl-C to the process group",
        "SIGINT to the launcher alone",
        "SIGTERM to the launcher alone",
        "Ctrl-C twice, 50 ms apart",
    ],
)
def test_a_stop_request_saves_a_checkpoint_at_its_step_and_the_resumed_run_matches_an_uninterrupted_one(
    how, tmp_path, uninterrupted
):
    """Under `docvlm launch` (as `make train` runs), in its own process group as a terminal's job is."""
    out = tmp_path / "stopped"
    process = subprocess.Popen(
        train_command(out, launcher=True),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in process.stdout:  # signal once the run has logged its third step
        seen.append(line)
        if sum("'loss'" in line for line in seen) >= 3:
            break
    send(process, how)
    output = "".join(seen) + process.stdout.read()
    process.wait(timeout=300)
    expected = 128 + (signal.SIGTERM if "SIGTERM" in how else signal.SIGINT)
    assert process.returncode == expected, output[-3000:]
    assert "Traceback" not in output
    stopped_at = int(re.search(r"stopped by a signal at step (\d+); checkpoint-\1 in", output).group(1))
    assert [p.name for p in checkpoints(out)] == [f"checkpoint-{stopped_at}"]  # the stop's own, and the latest
    assert incomplete_because(out / f"checkpoint-{stopped_at}") is None and 3 <= stopped_at < 12
    assert (
        json.loads((out / f"checkpoint-{stopped_at}" / "trainer_state.json").read_text())["global_step"] == stopped_at
    )
    mark_for_resume(out / f"checkpoint-{stopped_at}")
    resumed = subprocess.run(train_command(out, "--resume_from_checkpoint", "latest"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = losses_of(out)
    assert sorted(losses) == list(range(1, 13)) and losses[1] == 123.0  # resumed, not restarted
    assert {step: loss for step, loss in losses.items() if step > 1} == pytest.approx(
        {step: loss for step, loss in uninterrupted.items() if step > 1}, rel=1e-6
    )


def test_one_request_twice_is_one_stop_and_a_later_second_stops_at_once():
    from docvlm.training.runs import StopNow, StopRequests

    now = [100.0]
    requests = StopRequests(clock=lambda: now[0])
    requests._note(signal.SIGINT, None)
    now[0] += 0.05
    requests._note(signal.SIGTERM, None)  # the launcher's forward of the same Ctrl-C: the same request
    assert requests.received == signal.SIGINT
    now[0] += 2
    with pytest.raises(StopNow):
        requests._note(signal.SIGINT, None)


def test_once_stopping_a_late_signal_is_ignored():
    from docvlm.training.runs import StopRequests

    before = signal.getsignal(signal.SIGINT)
    try:
        with StopRequests() as requests:
            requests._note(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # never a KeyboardInterrupt while it exits
        with StopRequests():
            pass
    finally:
        signal.signal(signal.SIGINT, before)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_a_stop_at_once_says_which_checkpoint_is_whole_and_removes_the_one_cut_off(tmp_path, capsys, monkeypatch):
    from docvlm import train
    from docvlm.training.runs import Stopped

    run = fake_run(tmp_path / "run", steps=(3, 6))
    (run / "checkpoint-6" / "trainer_state.json").unlink()  # the second signal came during its save

    def stopped_at_once(argv):
        raise Stopped(signal.SIGINT, 7, run, at_once=True)

    monkeypatch.setattr(train, "run", stopped_at_once)
    assert train.main([]) == 130
    err = capsys.readouterr().err
    assert "stopped at once by a second signal at step 7, without a stop checkpoint" in err
    assert f"the last complete checkpoint is checkpoint-3 in {run} (checkpoint-6, cut off, was removed)" in err
    assert [p.name for p in checkpoints(run)] == ["checkpoint-3"] and "Traceback" not in err


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_complete_checkpoint_with_no_gap_or_repeat(tmp_path, uninterrupted):
    out = tmp_path / "kill"
    process = subprocess.Popen(
        train_command(out, "--save_steps", "3"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-3" / "trainer_state.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "training ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL
    latest = resolve_checkpoint("latest", str(out))
    mark_for_resume(Path(latest))
    resumed = subprocess.run(train_command(out, "--resume_from_checkpoint", "latest"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = losses_of(out)
    assert sorted(losses) == list(range(1, 13)) and losses[1] == 123.0  # resumed, not restarted
    assert {s: v for s, v in losses.items() if s > 1} == pytest.approx(
        {s: v for s, v in uninterrupted.items() if s > 1}, rel=1e-6
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 200 MB tmpfs to fill: mounted as root (CI's case), or skipped, saying so."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill ({mounted.stderr.decode().strip()}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def filling_the_disk_after(step: int, out: Path, leave):
    """A callback that, once checkpoint-`step` is saved, fills the disk but for leave(checkpoint) bytes."""
    from transformers import TrainerCallback

    class Filler(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                checkpoint = out / f"checkpoint-{step}"
                free = shutil.disk_usage(out).free - leave(checkpoint)
                with open(out.parent / "filler", "wb") as handle:
                    handle.truncate(0)
                    handle.write(b"\0" * max(0, free))

    return Filler()


def sizes(checkpoint: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in checkpoint.iterdir() if p.is_file()}


ALL_BUT_OPTIMIZER = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


@pytest.mark.integration
@pytest.mark.parametrize(
    "where, leave",
    [
        ("in the adapter write", lambda c: sizes(c)["adapter_model.safetensors"] // 2),
        (
            "in the optimizer write",
            lambda c: sum(v for k, v in sizes(c).items() if k not in ALL_BUT_OPTIMIZER) + sizes(c)["optimizer.pt"] // 2,
        ),
    ],
)
def test_a_disk_that_fills_during_a_save_leaves_no_half_checkpoint_and_the_resume_is_exact(
    where, leave, small_disk, tmp_path, capsys, monkeypatch
):
    from docvlm import train

    argv = ["--max_steps", "4", "--save_steps", "2", "--eval_after_training", "false", "--report_to", "none"]
    reference = tmp_path / "whole"
    train.run(quick(reference, *argv))
    out = small_disk / "run"
    original_run = train.run
    monkeypatch.setattr(train, "run", lambda a: original_run(a, callbacks=[filling_the_disk_after(2, out, leave)]))
    assert train.main(quick(out, *argv)) == 2
    err = capsys.readouterr().err
    assert "docvlm: error: the disk is full" in err and "checkpoint-4, cut off by it, was removed" in err, where
    assert "Traceback" not in err and [p.name for p in checkpoints(out)] == ["checkpoint-2"]
    (small_disk / "filler").unlink()
    mark_for_resume(out / "checkpoint-2")
    monkeypatch.setattr(train, "run", original_run)
    assert train.main(quick(out, *argv, "--resume_from_checkpoint", "latest")) == 0
    losses, expected = losses_of(out), losses_of(reference)
    assert losses[1] == 123.0 and {s: losses[s] for s in (3, 4)} == pytest.approx({s: expected[s] for s in (3, 4)})
