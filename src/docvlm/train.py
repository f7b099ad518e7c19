"""Fine-tune a VLM on document QA: parse -> data -> model -> trainer -> train -> save -> evaluate.

    python -m docvlm.train --config recipes/tiny_docvqa.yaml
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m docvlm.train \
        --config recipes/docvqa_qlora.yaml [--field value ...]
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from docvlm.config import UserError, parse_recipe


def resolve_checkpoint(value: str | None, output_dir: str) -> str | None:
    """`resume_from_checkpoint`: a checkpoint path, or true/latest for the newest one in output_dir."""
    from transformers.trainer_utils import get_last_checkpoint

    if value is None or str(value).lower() in ("", "false", "none"):
        return None
    if str(value).lower() in ("true", "latest"):
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise UserError(f"resume_from_checkpoint is {value}, but {output_dir} holds no checkpoint-* folder.")
        return last
    if not Path(value).is_dir():
        raise UserError(f"resume_from_checkpoint: {value} is not a checkpoint folder.")
    return value


def save_resolved_recipe(path: Path, *arg_groups) -> None:
    """Write every field that was in effect, so a run can be reproduced; secrets are never written."""
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


def run(argv: list[str] | None = None):
    """Train from a recipe; returns the trainer and the final metrics."""
    from transformers import set_seed
    from trl import SFTTrainer

    from docvlm import tiny
    from docvlm.collator import DocVQACollator
    from docvlm.data import load_splits
    from docvlm.hub import check_sources
    from docvlm.modeling import keep_trainable_fp32, load_model, load_processor, lora_config, model_path

    data_args, model_args, training_args = parse_recipe(argv)
    set_seed(training_args.seed)

    # Both sources are checked (local, cached or reachable) before anything heavy is loaded.
    check_sources(
        (tiny.resolve(model_args.model_name_or_path), "model", "model_name_or_path", model_args.model_revision),
        (tiny.resolve(data_args.dataset_name), "dataset", "dataset_name", None),
    )
    path = model_path(model_args)
    train_dataset, eval_dataset = load_splits(data_args, need_eval=training_args.eval_strategy != "no")
    processor = load_processor(model_args, path)
    model = load_model(model_args, training_args, path)

    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=DocVQACollator(
            processor,
            data_args.instruction,
            training_args.max_length,
            data_args.answer_choice,
            seed=training_args.seed,
        ),
        peft_config=lora_config(model_args),
    )
    keep_trainable_fp32(trainer.model)
    if trainer.accelerator.is_main_process:
        save_resolved_recipe(Path(training_args.output_dir) / "recipe.yaml", data_args, model_args, training_args)

    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()  # the adapter (or full weights) and the processor
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    metrics = dict(result.metrics)
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return trainer, metrics


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except UserError as err:
        print(f"docvlm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
