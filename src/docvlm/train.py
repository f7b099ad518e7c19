"""Fine-tune a VLM on document QA: parse -> data -> model -> trainer -> train -> save -> evaluate.

    python -m docvlm.train --config recipes/tiny_docvqa.yaml
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m docvlm.train \
        --config recipes/docvqa_qlora.yaml [--field value ...]
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from docvlm.errors import UserError


def run(argv: list[str] | None = None, callbacks: list | None = None):
    """Train from a recipe; returns the trainer and the final metrics. `callbacks`: extra TrainerCallbacks."""
    from accelerate import PartialState
    from transformers import set_seed

    from docvlm import speedups
    from docvlm.modes import WEIGHT_SHARDING, launch_mode
    from docvlm.prepare import prepare
    from docvlm.recipe.parse import parse_recipe
    from docvlm.training.launch import settle_for_launch
    from docvlm.training.modeling import keep_trainable_fp32, load_model
    from docvlm.training.outputs import save_resolved_recipe
    from docvlm.training.precision import training_dtype
    from docvlm.training.runs import check_output_dir, finished_at, resolve_checkpoint, train_or_stop

    recipe = parse_recipe(argv)
    data_args, model_args, training_args, eval_args = recipe
    set_seed(training_args.seed)
    mode = launch_mode()
    changes = settle_for_launch(mode, recipe)
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)  # before loading
    current = {**asdict(data_args), **asdict(model_args), **asdict(training_args)}
    check_output_dir(training_args.output_dir, checkpoint is not None, training_args.overwrite_output_dir, current)
    finished = finished_at(checkpoint, training_args)
    if finished is not None:
        print(nothing_left_to_train(checkpoint, finished))
        return None, {}
    needs_eval = training_args.eval_strategy != "no" or eval_args.eval_after_training
    prepared = prepare(recipe, need_eval=needs_eval)
    output_dir = Path(training_args.output_dir)
    if PartialState().is_main_process:
        prepared.data_report.write(output_dir)  # before the model loads: every run says what became of every row
    switches = speedups.apply(
        speedups.BEFORE_LOADING, speedups.SwitchContext(training_args, prepared.family, processor=prepared.processor)
    )
    sharded = mode in WEIGHT_SHARDING
    switches.model = load_model(
        model_args, training_dtype(training_args), prepared.path, training_args.trust_remote_code, place=not sharded
    )
    speedups.apply(speedups.LOADED, switches)
    trainer = build_trainer(prepared, switches.model, callbacks)
    keep_trainable_fp32(trainer.model)
    switches.trainer = trainer
    for callback in speedups.apply(speedups.WITH_TRAINER, switches).callbacks:
        trainer.add_callback(callback)
    if trainer.accelerator.is_main_process:
        print(f"Launch: {mode}" + "".join(f"\n  set for {mode}: {change}" for change in changes))
        print(training_args.batch_summary())
        save_resolved_recipe(output_dir / "recipe.yaml", *recipe)

    result = train_or_stop(trainer, checkpoint, output_dir)
    metrics = save_trained(trainer, result)
    metrics.update(evaluate_held_out(trainer, prepared, sharded))
    trainer.create_model_card()  # again, now with the evaluation numbers
    if training_args.push_to_hub:
        trainer.push_to_hub(commit_message="docvlm: adapter, processor and evaluation report")
    if trainer.accelerator.is_main_process:
        print(closing_lines(prepared, output_dir))
    return trainer, metrics


def nothing_left_to_train(checkpoint: str, finished: int) -> str:
    return (
        f"{checkpoint} is the last step of its run ({finished}): nothing is left to train, and nothing was "
        "changed. To train longer, raise max_steps or num_train_epochs; to start over, --overwrite_output_dir true."
    )


def build_trainer(prepared, model, callbacks):
    """The trainer of a prepared run: pages decoded by the collator (a page that breaks later is skipped), held-out
    answers scored at each evaluation where the recipe asks (eval_anls_samples), docvlm's model card."""
    from docvlm.evaluation.card import adapter_card
    from docvlm.evaluation.evaluate import HeldOutScores, generation_options
    from docvlm.pages import undecoded_pages
    from docvlm.training.modeling import lora_config
    from docvlm.training.trainer import DocVLMTrainer

    data_args, model_args, training_args, eval_args = prepared.recipe
    answer_scores = None
    if prepared.eval_rows is not None and training_args.eval_strategy != "no" and eval_args.eval_anls_samples > 0:
        answer_scores = HeldOutScores(
            prepared.eval_rows,
            prepared.processor,
            prepared.prompt,
            eval_args.eval_max_new_tokens,
            training_args.per_device_eval_batch_size,
            eval_args.eval_anls_samples,
            **generation_options(training_args, eval_args),
        )
    output_dir = Path(training_args.output_dir)
    return DocVLMTrainer(
        model=model,
        args=training_args,
        train_dataset=undecoded_pages(prepared.train_rows),
        eval_dataset=prepared.eval_rows,
        processing_class=prepared.processor,
        data_collator=prepared.collator(),
        peft_config=lora_config(model_args),
        callbacks=callbacks,
        model_card=lambda: adapter_card(model_args, data_args, output_dir),
        answer_scores=answer_scores,
    )


def save_trained(trainer, result) -> dict:
    """The adapter (or full weights), the processor, the training metrics and state; returns the metrics."""
    trainer.save_model()
    # the main process writes the files: the others must not look for them (the evaluation reloads them) before
    trainer.accelerator.wait_for_everyone()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    return dict(result.metrics)


def evaluate_held_out(trainer, prepared, sharded: bool) -> dict:
    """The held-out loss once more (where the recipe evaluates during training), then the generation report
    (eval_after_training); returns their metrics."""
    from docvlm.evaluation.evaluate import evaluate_model, generation_options, load_trained
    from docvlm.evaluation.report import report_meta
    from docvlm.modes import whole_model_loading
    from docvlm.training.outputs import adapter_step

    data_args, model_args, training_args, eval_args = prepared.recipe
    output_dir, metrics = Path(training_args.output_dir), {}
    if prepared.eval_rows is not None and training_args.eval_strategy != "no":
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        trainer.save_state()  # again, so that trainer_state.json (and the loss plot) has the final eval loss
        metrics.update(eval_metrics)
    if prepared.eval_rows is None or not eval_args.eval_after_training:
        return metrics
    # Each process answers a shard of the questions and the main process writes the report. Under ZeRO-3 and FSDP
    # no process holds the whole model, so each loads the adapter just saved, whole, on its own GPU.
    features = None
    if sharded:
        evaluated = load_trained(model_args, training_args, prepared.path, output_dir)
    else:
        from docvlm.speedups.feature_cache import cache_of

        evaluated = trainer.accelerator.unwrap_model(trainer.model)
        features = cache_of(trainer)  # the training's feature cache serves the evaluation's pages too
    with whole_model_loading():  # a whole model: generate() must not wait for the other processes each token
        report = evaluate_model(
            evaluated,
            prepared.processor,
            prepared.eval_rows,
            prepared.prompt,
            eval_args.eval_max_new_tokens,
            training_args.per_device_eval_batch_size,
            output_dir,
            meta={
                **report_meta(data_args, model_args, output_dir, prepared.recipe.source),
                **prepared.data_report.report_meta(),
                **adapter_step(trainer),
            },
            compare_base=eval_args.eval_compare_base,
            train_rows=prepared.train_rows,
            page_base=prepared.page_base(),
            **generation_options(training_args, eval_args, features),
        )
    metrics.update({f"generation_{k}": v for k, v in report["systems"]["after"].items()})
    return metrics


def closing_lines(prepared, output_dir: Path) -> str:
    """What became of the rows, what was written where, and what to run next."""
    from docvlm.fixtures import TINY_DATASET
    from docvlm.training.outputs import where_things_are

    report, data_args = prepared.data_report, prepared.recipe.data
    listed = f" {output_dir / 'data_report.json'} lists them by reason." if report.skipped else ""
    fixture = data_args.dataset_name == TINY_DATASET
    return report.summary() + listed + "\n" + where_things_are(output_dir, prepared.recipe.training.report_to, fixture)


def worker_free(message: str) -> str:
    """A dataloader worker's error as its own message: torch re-raises it as "Caught UserError in DataLoader worker
    process 1. Original Traceback ..." followed by the worker's traceback, burying what went wrong."""
    if message.startswith("Caught ") and "Original Traceback" in message:
        last = message.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(("docvlm.errors.UserError", "UserError")) else last
    return message


def release_process_group() -> None:
    """Destroy the launch's torch.distributed process group before the interpreter exits. Neither the Trainer nor
    accelerate does; left to interpreter shutdown, its communication threads can abort a process that has
    finished its work ("terminate called without an active exception"), and the other processes then wait at
    the launcher's exit barrier."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from docvlm.recipe.help import exit_on_help
    from docvlm.runtime import quiet_third_party_noise
    from docvlm.training.runs import Stopped, is_main_rank

    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party_noise()  # before the help too: rendering it anew imports the ML libraries
    exit_on_help(argv)  # before the ML libraries are imported: the rendered help is cached
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
        from docvlm.training.runs import DiskFull, disk_full

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
