"""Fine-tune a VLM on document QA: parse -> data -> model -> trainer -> train -> save -> evaluate.

    python -m docvlm.train --config recipes/tiny_docvqa.yaml
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m docvlm.train \
        --config recipes/docvqa_qlora.yaml [--field value ...]
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from docvlm.errors import UserError


def save_resolved_recipe(path: Path, *arg_groups) -> None:
    """Write every field that was in effect, so a run can be reproduced; secrets are never written."""
    import yaml

    resolved = {}
    for group in arg_groups:
        resolved.update(asdict(group))
    for secret in ("hub_token", "push_to_hub_token"):
        resolved.pop(secret, None)
    resolved = json.loads(json.dumps(resolved, default=str))  # enums, dtypes and paths as plain strings
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# The recipe as resolved for this run (YAML + command-line overrides + defaults).\n"
        + yaml.safe_dump(resolved, sort_keys=True)
    )


def check_one_gpu_per_process() -> None:
    """One process that sees several GPUs makes Trainer fall back to nn.DataParallel, which TRL refuses only once the
    model has loaded (minutes, for an 8B model); say what to do before anything loads."""
    import torch
    from accelerate import PartialState

    gpus = torch.cuda.device_count()
    if gpus > 1 and PartialState().num_processes == 1:
        raise UserError(
            f"{gpus} GPUs are visible to this single process. Train on all of them with `accelerate launch "
            f"--config_file accelerate_configs/multi_gpu.yaml --num_processes {gpus} -m docvlm.train ...` (or `make "
            f"train ACCELERATE_CONFIG=multi_gpu NUM_GPUS={gpus}`), or on one with CUDA_VISIBLE_DEVICES=0."
        )


def check_push(training_args) -> None:
    """Fail before training, not after, when a Hub push is asked for but cannot happen."""
    if not training_args.push_to_hub:
        return
    from huggingface_hub import get_token

    if not training_args.hub_model_id:
        raise UserError("push_to_hub is true but hub_model_id is not set: name the repo, e.g. you/docvqa-adapter.")
    if get_token() is None:
        raise UserError("push_to_hub is true but no Hub token was found: set HF_TOKEN or run `hf auth login`.")


def run(argv: list[str] | None = None, callbacks: list | None = None):
    """Train from a recipe; returns the trainer and the final metrics. `callbacks`: extra TrainerCallbacks."""
    from accelerate import PartialState
    from transformers import set_seed

    from docvlm import tiny
    from docvlm.card import adapter_card
    from docvlm.collator import DocVQACollator, Prompt
    from docvlm.config import parse_recipe, recipe_argument
    from docvlm.data import DataReport, dataset_folder, load_splits
    from docvlm.distributed import (
        WEIGHT_SHARDING,
        launch_mode,
        prepare_recipe_for,
        refuse_unsupported_switches,
        whole_model_loading,
    )
    from docvlm.evaluate import HeldOutScores, evaluate_model, load_trained, report_meta
    from docvlm.families import apply_switches, family_at, refuse_what_does_not_apply
    from docvlm.hub import check_recipe_sources
    from docvlm.lora_forward import lean_lora_forward
    from docvlm.modeling import (
        check_lora_targets,
        keep_trainable_fp32,
        load_model,
        load_processor,
        lora_config,
        model_path,
        training_dtype,
    )
    from docvlm.pages import undecoded_pages
    from docvlm.runs import StopNow, StopRequests, check_output_dir, finished_at, resolve_checkpoint
    from docvlm.runtime import disable_cudnn_attention, freeze_garbage_after_first_step, use_expandable_segments
    from docvlm.trainer import DocVLMTrainer
    from docvlm.vision_tower import offload_tower_while_cached

    data_args, model_args, training_args, eval_args = parse_recipe(argv)
    set_seed(training_args.seed)

    mode = launch_mode()
    mode_changes = prepare_recipe_for(mode, model_args, training_args)
    refuse_unsupported_switches(mode, training_args)
    check_one_gpu_per_process()
    check_recipe_sources(model_args, data_args)
    check_push(training_args)
    training_args.do_train = True  # recipe.yaml records the run as it is: transformers' flag is never read here
    if training_args.device.type != "cuda":
        training_args.cudnn_attention = False  # no cuDNN off a GPU: recipe.yaml says what was in effect
    if training_args.vision_tower_offload and training_args.device.type != "cuda":
        training_args.vision_tower_offload = False  # the 8B recipes' switch, on a GPU-less test or laptop run
        mode_changes.append(f"vision_tower_offload: false (on the {training_args.device.type} it has nothing to move)")
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)  # before loading
    current = {**asdict(data_args), **asdict(model_args), **asdict(training_args)}
    check_output_dir(training_args.output_dir, checkpoint is not None, training_args.overwrite_output_dir, current)
    finished = finished_at(checkpoint, training_args)
    if finished is not None:
        print(
            f"{checkpoint} is the last step of its run ({finished}): nothing is left to train, and nothing was "
            "changed. To train longer, raise max_steps or num_train_epochs; to start over, "
            "--overwrite_output_dir true."
        )
        return None, {}
    path = model_path(model_args)
    family = family_at(path, model_args.model_revision, training_args.trust_remote_code)
    refuse_what_does_not_apply(family, model_args, training_args)
    check_lora_targets(model_args, path, training_args.trust_remote_code)  # before the data and the weights
    refuse_scores_without_whole_model(mode, training_args, eval_args)
    needs_eval = training_args.eval_strategy != "no" or eval_args.eval_after_training
    data_report = DataReport(data_args.dataset_name)
    train_dataset, eval_dataset = load_splits(data_args, need_eval=needs_eval, report=data_report)
    processor = load_processor(model_args, path)
    train_dataset, eval_dataset = check_data_against_recipe(
        processor, train_dataset, eval_dataset, data_args, training_args, eval_args, data_report
    )
    output_dir = Path(training_args.output_dir)
    if PartialState().is_main_process:
        data_report.write(output_dir)  # before the model loads: every run says what became of every row
    train_dataset = undecoded_pages(train_dataset)  # decoded by the collator: a page that breaks later is skipped
    if training_args.cuda_expandable_segments:
        use_expandable_segments()  # before the model takes its memory
    if not training_args.cudnn_attention:
        disable_cudnn_attention()
    sharded = mode in WEIGHT_SHARDING
    model = load_model(
        model_args, training_dtype(training_args), path, training_args.trust_remote_code, place=not sharded
    )
    feature_cache = apply_switches(family, model, training_args)
    # made here, so that a tower it cannot move is refused before the cache fill; it moves when training starts
    offload = offload_tower_while_cached(model, feature_cache) if training_args.vision_tower_offload else None

    answer_scores = None
    if eval_dataset is not None and training_args.eval_strategy != "no" and eval_args.eval_anls_samples > 0:
        answer_scores = HeldOutScores(
            eval_dataset,
            processor,
            Prompt.of(data_args),
            eval_args.eval_max_new_tokens,
            training_args.per_device_eval_batch_size,
            eval_args.eval_anls_samples,
        )
    trainer = DocVLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=DocVQACollator(
            processor,
            Prompt.of(data_args),
            training_args.max_length,
            data_args.answer_choice,
            seed=training_args.seed,
            page_keys=feature_cache.page_keys(model.config.vision_config.patch_size) if feature_cache else None,
        ),
        peft_config=lora_config(model_args),
        callbacks=callbacks,
        model_card=lambda: adapter_card(model_args, data_args, output_dir),
        answer_scores=answer_scores,
    )
    keep_trainable_fp32(trainer.model)
    if training_args.lora_lean_forward and not lean_lora_forward(trainer.model):
        raise UserError("lora_lean_forward is true, but the model has no LoRA linear layers to make leaner.")
    trainer.feature_cache = feature_cache  # its counts and fill time, for the summary and `make bench`
    if feature_cache is not None:
        fill_vision_cache(trainer, feature_cache, processor)
    if offload is not None:
        trainer.add_callback(offload)
    if trainer.accelerator.is_main_process:
        print(f"Launch: {mode}" + "".join(f"\n  set for {mode}: {change}" for change in mode_changes))
        print(training_args.batch_summary())
        save_resolved_recipe(output_dir / "recipe.yaml", data_args, model_args, training_args, eval_args)

    if training_args.compile_text_layers:
        trainer.add_callback(freeze_garbage_after_first_step())
    stops = StopRequests()
    trainer.add_callback(stops.callback())
    with stops:
        try:
            result = trainer.train(resume_from_checkpoint=checkpoint)
        except StopNow as stop:
            raise Stopped(stop.args[0], trainer.state.global_step, output_dir, at_once=True) from None
    if stops.received is not None:
        # a preempted machine: the checkpoint just written is the result; no final adapter, no evaluation
        raise Stopped(stops.received, trainer.state.global_step, output_dir)
    if feature_cache is not None and trainer.accelerator.is_main_process:
        print(feature_cache.summary())  # the main process's pages; each process keeps its own count
    trainer.save_model()  # the adapter (or full weights) and the processor
    # the main process writes the files: the others must not look for them (the evaluation reloads them) before
    trainer.accelerator.wait_for_everyone()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    metrics = dict(result.metrics)
    if eval_dataset is not None and training_args.eval_strategy != "no":
        # the loss on the held-out split, once more at the end; a recipe without eval_strategy asked for none
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        trainer.save_state()  # again, so that trainer_state.json (and the loss plot) has the final eval loss
        metrics.update(eval_metrics)
    if eval_dataset is not None and eval_args.eval_after_training:
        # Each process answers a shard of the questions and the main process writes the report. Under ZeRO-3 and
        # FSDP no process holds the whole model, so each loads the adapter just saved, whole, on its own GPU.
        if sharded:
            evaluated = load_trained(model_args, training_args, path, output_dir)
        else:
            evaluated = trainer.accelerator.unwrap_model(trainer.model)
        with whole_model_loading():  # a whole model: generate() must not wait for the other processes each token
            report = evaluate_model(
                evaluated,
                processor,
                eval_dataset,
                Prompt.of(data_args),
                eval_args.eval_max_new_tokens,
                training_args.per_device_eval_batch_size,
                output_dir,
                meta={
                    **report_meta(data_args, model_args, output_dir, recipe_argument(argv)),
                    **data_report.report_meta(),
                    **adapter_step(trainer),
                },
                compare_base=eval_args.eval_compare_base,
                train_rows=train_dataset,
                page_base=dataset_folder(tiny.resolve(data_args.dataset_name)),
            )
        metrics.update({f"generation_{k}": v for k, v in report["systems"]["after"].items()})
        del evaluated
    trainer.create_model_card()  # again, now with the evaluation numbers
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="docvlm: adapter, processor and evaluation report")
    if trainer.accelerator.is_main_process:
        fixture = data_args.dataset_name == tiny.TINY_DATASET
        listed = f" {output_dir / 'data_report.json'} lists them by reason." if data_report.skipped else ""
        print(data_report.summary() + listed)
        print(where_things_are(output_dir, training_args.report_to, page_hint=fixture))
    return trainer, metrics


def fill_vision_cache(trainer, cache, processor) -> None:
    """Every training page's frozen-tower features, computed in batches before the first step (each process its
    share of the rows; in a disk cache, the others' shares are read from it as training goes)."""
    from docvlm.vision_cache import fill_feature_cache

    args, accelerator = trainer.args, trainer.accelerator
    rows = trainer.train_dataset.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
    model = accelerator.unwrap_model(trainer.model)
    batch = args.per_device_train_batch_size
    fill_feature_cache(
        model, cache, rows, processor.image_processor, batch, args.dataloader_num_workers, accelerator.autocast()
    )
    accelerator.wait_for_everyone()


def check_data_against_recipe(processor, train_rows, eval_rows, data_args, training_args, eval_args, report):
    """Before the model loads: every row is checked (docvlm.screen) and the bad ones skipped or reported, as
    on_bad_example says, into `report`; held-out answers too long for eval_max_new_tokens are announced, not
    discovered in the report. Returns the rows to use. The optimizer steps are counted from the rows kept."""
    from docvlm.preflight import warn_long_answers
    from docvlm.screen import screen_split

    max_length = training_args.max_length
    train_rows, _ = screen_split(train_rows, processor, data_args, max_length, data_args.dataset_train_split, report)
    if len(train_rows) == 0:
        raise UserError(f"Every training row of {data_args.dataset_name} was skipped: see the problems above.")
    if eval_rows is not None:
        eval_rows, _ = screen_split(eval_rows, processor, data_args, max_length, data_args.dataset_test_split, report)
    if eval_rows is not None and eval_args.eval_after_training:
        warn_long_answers(processor.tokenizer, eval_rows, eval_args.eval_max_new_tokens)
    return train_rows, eval_rows


def refuse_scores_without_whole_model(mode: str, training_args, eval_args) -> None:
    """Answering held-out questions during training needs the whole model on each process, which ZeRO-3 and FSDP
    shard; the evaluation after training reloads it whole instead."""
    from docvlm.distributed import WEIGHT_SHARDING

    if mode in WEIGHT_SHARDING and training_args.eval_strategy != "no" and eval_args.eval_anls_samples > 0:
        raise UserError(
            f"eval_anls_samples is {eval_args.eval_anls_samples} with eval_strategy {training_args.eval_strategy}, "
            f"but under {mode} no process holds the whole model to answer with during training. Set "
            "eval_anls_samples: 0 (the held-out loss only; the evaluation after training still reports ANLS), or "
            "launch with accelerate_configs/multi_gpu.yaml."
        )


def adapter_step(trainer) -> dict:
    """Which step's adapter was evaluated: the best evaluation's (load_best_model_at_end) or the last step's."""
    state, args = trainer.state, trainer.args
    if args.load_best_model_at_end and state.best_model_checkpoint:
        step = int(Path(state.best_model_checkpoint).name.split("-")[-1])
        return {"adapter_step": step, "best_metric": {args.metric_for_best_model: state.best_metric}}
    return {"adapter_step": state.global_step}


def where_things_are(output_dir: Path, report_to, page_hint: bool = False) -> str:
    """The last lines of a run: what was written where, and what to run next."""
    lines = [f"Done. Everything is in {output_dir}/:"]
    rows = [  # each file listed only where the run wrote it
        ("adapter", ["adapter_model.safetensors", "adapter_config.json"], ""),
        ("report", ["report.md", "report.json", "predictions.jsonl", "loss.png"], ""),
        ("model card", ["README.md"], ""),
        ("recipe", ["recipe.yaml"], " (as resolved for this run)"),
        ("data", ["data_report.json"], " (rows read, questions made, skipped, held out)"),
    ]
    for title, names, note in rows:
        present = [name for name in names if (output_dir / name).is_file()]
        if present:
            lines.append(f"  {title:<12} {', '.join(present)}{note}")
    if "tensorboard" in (report_to or []) and (output_dir / "runs").is_dir():
        lines.append(f"  {'TensorBoard':<12} tensorboard --logdir {output_dir / 'runs'}")
    if (output_dir / "adapter_config.json").is_file():
        lines.append(f'Next: docvlm predict --adapter {output_dir} --image <page.png> --question "..."')
        if page_hint:
            lines.append("      (`docvlm fixtures --export-pages pages/` writes held-out pages of this dataset to try)")
    return "\n".join(lines)


def worker_free(message: str) -> str:
    """A dataloader worker's error as its own message: torch re-raises it as "Caught UserError in DataLoader worker
    process 1. Original Traceback ..." followed by the worker's traceback, burying what went wrong."""
    if message.startswith("Caught ") and "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(("docvlm.errors.UserError", "UserError")) else last
    return message


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
        from docvlm.runs import drop_incomplete_checkpoints

        dropped, last = drop_incomplete_checkpoints(self.output_dir) if is_main_rank() else ([], None)
        cut = f" ({', '.join(dropped)}, cut off, was removed)" if dropped else ""
        kept = (
            f"the last complete checkpoint is {last} in {self.output_dir}{cut}" if last else "no checkpoint was saved"
        )
        return f"stopped at once by a second signal at step {self.step}, without a stop checkpoint: {kept}. {resume}"


def is_main_rank() -> bool:
    """The launch's first process (or the only one), from the launcher's environment: errors are said once."""
    return int(os.environ.get("RANK", "0")) == 0


def release_process_group() -> None:
    """Destroy the launch's torch.distributed process group before the interpreter exits. Neither the Trainer nor
    accelerate does; left to interpreter shutdown, its communication threads can abort a process that has
    finished its work ("terminate called without an active exception"), and the other processes then wait at
    the launcher's exit barrier."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from docvlm.recipe_help import exit_on_help
    from docvlm.runtime import quiet_third_party_noise

    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv)  # before the ML libraries are imported: the rendered help is cached
    quiet_third_party_noise()
    try:
        run(argv)
    except UserError as err:
        if is_main_rank():  # every process meets the same error in the recipe or the data: say it once
            print(f"docvlm: error: {worker_free(str(err))}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"docvlm: {stop.message()}", file=sys.stderr)
        return 128 + stop.signum
    except Exception as err:
        from docvlm.runs import DiskFull, disk_full

        if not disk_full(err):
            raise
        removed = f" {err.removed}, cut off by it, was removed;" if isinstance(err, DiskFull) and err.removed else ""
        print(
            f"docvlm: error: the disk is full ({getattr(err, 'filename', None) or err}).{removed} Free some space: "
            "the checkpoints saved before are intact, and the same command with --resume_from_checkpoint latest "
            "resumes from the last complete one.",
            file=sys.stderr,
        )
        return 2
    finally:
        release_process_group()  # whether training ended, failed or was stopped
    return 0


if __name__ == "__main__":
    sys.exit(main())
