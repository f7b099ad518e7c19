"""The run folder across restarts: one run per output_dir, resuming only from a complete checkpoint of that same
run, and a stop asked by the machine (SIGTERM, SIGINT) that leaves a resumable checkpoint and a failing exit.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
from pathlib import Path

from docvlm.errors import UserError

RUN_MARKERS = ("recipe.yaml", "trainer_state.json", "adapter_config.json", "report.json")
# What a resumed run must share with the run that wrote the checkpoint: another dataset or model would silently
# train something else on top of it.
SAME_RUN_FIELDS = (
    "model_name_or_path",
    "dataset_name",
    "dataset_config",
    "dataset_train_split",
    "data_files",
    "json_field",
    "eval_split_size",
    "eval_split_seed",
    "eval_split_by",
    "qa_question_key",
    "qa_answers_key",
    "image_column",
    "question_column",
    "answers_column",
    "field_questions",
    "qa_pairs_column",
    "messages_column",
    "max_train_samples",
    "lora_r",
    "lora_target_regex",
    "lora_target_modules",
    "load_in_4bit",
)


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest (highest N) first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def incomplete_because(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a kill during its save), or None when it is whole. The Trainer
    writes the weights, then the optimizer, scheduler and RNG state, then trainer_state.json: a readable
    trainer_state.json beside weights and optimizer state means the save finished."""
    if not any((checkpoint / name).is_file() for name in ("adapter_model.safetensors", "model.safetensors")) and not (
        any(checkpoint.glob("model-*.safetensors")) or any(checkpoint.glob("global_step*"))
    ):
        return "no weights"
    if not (checkpoint / "optimizer.pt").is_file() and not any(checkpoint.glob("global_step*")):
        return "no optimizer state"
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "no readable trainer_state.json"
    return None


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """`resume_from_checkpoint`: a checkpoint path, or true/latest for the newest complete one in output_dir;
    incomplete ones (a kill during a save) are passed over, and said so."""
    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("true", "latest"):
        for checkpoint in checkpoints(Path(output_dir)):
            why = incomplete_because(checkpoint)
            if why is None:
                return str(checkpoint)
            print(f"Not resuming from {checkpoint}: it is incomplete ({why}), probably cut off while saving.")
        raise UserError(f"resume_from_checkpoint is {value}, but {output_dir} holds no complete checkpoint-* folder.")
    if not Path(value).is_dir():
        raise UserError(f"resume_from_checkpoint: {value} is not a checkpoint folder.")
    why = incomplete_because(Path(value))
    if why is not None:
        raise UserError(f"resume_from_checkpoint: {value} is incomplete ({why}); pick an earlier checkpoint.")
    return value


def finished_at(checkpoint: str | None, training_args) -> int | None:
    """The step at which a checkpoint to resume from ended its run, when nothing is left to train (its step is
    its run's last, and the recipe asks for no more steps or epochs), else None. Resuming it would train an extra
    step when max_steps is not a multiple of the steps an epoch, and overwrite the run's results."""
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    step, last = state.get("global_step", 0), state.get("max_steps", 0)
    if not last or step < last:
        return None
    if training_args.max_steps > 0:
        return step if training_args.max_steps <= step else None
    return step if math.ceil(training_args.num_train_epochs) <= state.get("num_train_epochs", 0) else None


def check_output_dir(output_dir: str, resuming: bool, overwrite: bool, current: dict) -> None:
    """Refuse to mix runs in one folder: a folder holding another run is resumed (same run only), started over
    (overwrite_output_dir, docvlm run folders only) or refused. `current`: this run's resolved fields."""
    from accelerate import PartialState

    folder = Path(output_dir)
    held = [name for name in RUN_MARKERS if (folder / name).exists()] + [p.name for p in checkpoints(folder)][:3]
    if not held:
        return
    if resuming:
        _check_same_run(folder, current)
        return
    if overwrite:
        if not (folder / "recipe.yaml").is_file():
            raise UserError(
                f"overwrite_output_dir is true, but {folder} was not written by docvlm (no recipe.yaml): docvlm "
                "removes only its own run folders. Choose another output_dir."
            )
        state = PartialState()
        if state.is_main_process:
            print(f"overwrite_output_dir: removing the earlier run in {folder}/ ({', '.join(held)}).")
            shutil.rmtree(folder)
        state.wait_for_everyone()
        return
    raise UserError(
        f"output_dir {folder} already holds a run ({', '.join(held)}). Continue it with --resume_from_checkpoint "
        "latest, start over there with --overwrite_output_dir true (removes it), or set another --output_dir."
    )


def _check_same_run(folder: Path, current: dict) -> None:
    import yaml

    recipe = folder / "recipe.yaml"
    if not recipe.is_file():
        return
    earlier = yaml.safe_load(recipe.read_text()) or {}
    differ = [
        f"{name}: {earlier.get(name)!r} there, {current.get(name)!r} now"
        for name in SAME_RUN_FIELDS
        if name in earlier and _plain(earlier.get(name)) != _plain(current.get(name))
    ]
    if differ:
        raise UserError(
            f"resume_from_checkpoint would continue the run in {folder}, but it trained something else ("
            + "; ".join(differ)
            + "). Set another --output_dir for this run, or --overwrite_output_dir true to replace that one."
        )


def _plain(value):
    return json.loads(json.dumps(value, default=str))


class StopNow(KeyboardInterrupt):
    """A second stop request, after the first was noted: stop at once, without the stop checkpoint."""


class StopRequests:
    """SIGTERM and SIGINT (a preempted or shut-down machine, Ctrl-C) ask training to stop after the current step
    with a checkpoint, instead of killing it between checkpoints.

    One request often arrives as two signals: a terminal's Ctrl-C reaches every process of the group, so the
    training process gets it from the terminal and again from its launcher, which forwards it. Signals within
    SAME_REQUEST_S of the first are that one request. A later one stops at once (StopNow), leaving the last
    complete checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    SAME_REQUEST_S = 1.0

    def __init__(self, clock=None):
        import time

        self.received: int | None = None
        self.first_at: float | None = None
        self._clock = clock or time.monotonic
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            # once stopping, the process only says where its checkpoint is and exits: a late signal is ignored,
            # never a KeyboardInterrupt in the middle of that
            signal.signal(sig, signal.SIG_IGN if self.received is not None else handler)

    def _note(self, signum, frame):
        now = self._clock()
        if self.received is not None:
            if now - self.first_at < self.SAME_REQUEST_S:
                return  # the same request, delivered twice
            raise StopNow(signum)
        self.received, self.first_at = signum, now
        print(
            f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then stopping "
            "(a second signal stops at once, without it).",
            file=sys.stderr,
            flush=True,
        )

    def callback(self):
        """A TrainerCallback that turns a noted signal into save-and-stop at the end of the step, on every process
        together (each must join the checkpoint's collective save)."""
        from transformers import TrainerCallback

        requests = self

        class SaveAndStopOnSignal(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if _any_process(requests.received is not None, args):
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return SaveAndStopOnSignal()


def disk_full(error: BaseException, folder: Path | None = None) -> bool:
    """Whether an error means a full disk, whichever library was writing: an OSError ENOSPC, safetensors' "No space
    left on device (os error 28)", or torch's zip writer failing ("unexpected pos") with no space left in `folder`."""
    import errno

    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    if "No space left on device" in text or "os error 28" in text:
        return True
    if folder is not None and ("unexpected pos" in text or "PytorchStreamWriter failed" in text):
        try:
            return shutil.disk_usage(folder).free < 64 * 2**20
        except OSError:
            return False
    return False


class DiskFull(OSError):
    """A save that the disk could not hold; `removed`: the checkpoint folder it had begun, now removed."""

    def __init__(self, folder: Path, removed: str | None = None):
        import errno

        super().__init__(errno.ENOSPC, "No space left on device", str(folder))
        self.removed = removed


def drop_incomplete_checkpoints(output_dir: Path) -> tuple[list[str], str | None]:
    """After a hard stop: remove the checkpoint folders newer than the last complete one (a save cut off), and
    return their names and the last complete checkpoint's."""
    dropped = []
    for checkpoint in checkpoints(output_dir):
        if incomplete_because(checkpoint) is None:
            return dropped, checkpoint.name
        shutil.rmtree(checkpoint, ignore_errors=True)
        dropped.append(checkpoint.name)
    return dropped, None


def _any_process(flag: bool, args) -> bool:
    """Whether any process has the flag: the processes receive a signal at slightly different steps."""
    if args.world_size <= 1:
        return flag
    import torch
    import torch.distributed as dist

    device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def is_main_rank() -> bool:
    """The launch's first process (or the only one), from the launcher's environment: errors are said once."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


class Stopped(Exception):
    """Training stopped on a signal, after saving a checkpoint (or at once, on a second signal: `at_once`); the
    process exits with 128 + the signal's number."""

    def __init__(self, signum: int, step: int, output_dir: Path, at_once: bool = False):
        super().__init__(f"stopped at step {step} on signal {signum}")
        self.signum, self.step, self.output_dir, self.at_once = signum, step, output_dir, at_once

    def message(self) -> str:
        resume = "Run the same command with --resume_from_checkpoint latest to go on."
        if not self.at_once:
            return (
                f"stopped by a signal at step {self.step}; checkpoint-{self.step} in {self.output_dir} holds the "
                f"adapter and the optimizer state. {resume}"
            )
        dropped, last = drop_incomplete_checkpoints(self.output_dir) if is_main_rank() else ([], None)
        cut = f" ({', '.join(dropped)}, cut off, was removed)" if dropped else ""
        kept = (
            f"the last complete checkpoint is {last} in {self.output_dir}{cut}" if last else "no checkpoint was saved"
        )
        return f"stopped at once by a second signal at step {self.step}, without a stop checkpoint: {kept}. {resume}"


def train_or_stop(trainer, checkpoint: str | None, output_dir: Path):
    """trainer.train(), resumed from `checkpoint`; a stop signal saves a checkpoint and raises Stopped (a second one
    raises it at once), so that a preempted machine's last checkpoint is the result."""
    stops = StopRequests()
    trainer.add_callback(stops.callback())
    with stops:
        try:
            result = trainer.train(resume_from_checkpoint=checkpoint)
        except StopNow as stop:
            raise Stopped(stop.args[0], trainer.state.global_step, output_dir, at_once=True) from None
    if stops.received is not None:
        raise Stopped(stops.received, trainer.state.global_step, output_dir)
    return result
