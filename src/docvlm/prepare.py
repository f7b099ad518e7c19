"""One way to prepare a run, for training, `docvlm eval`, `docvlm plan` and `make bench` (which trains through
docvlm.train): recipe -> family -> processor -> data -> splits -> collator. The recipe's sources are checked, the
model's family refuses what it does not offer, the splits are read and every row is screened before any weight
loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docvlm.data import DataReport, dataset_folder, load_splits
from docvlm.errors import UserError
from docvlm.families import Family, family_of, refuse_processor_options
from docvlm.fixtures import resolve
from docvlm.prompts import Prompt
from docvlm.recipe.parse import Recipe
from docvlm.training.collator import DocVQACollator


@dataclass
class Prepared:
    """A run ready for its model: the recipe, the base model's path, config and family, the processor, the screened
    splits (eval is None where none was needed), what became of every row, and the model built on the meta device
    when the LoRA targets were checked (None otherwise)."""

    recipe: Recipe
    path: str
    config: Any
    family: Family
    processor: Any
    train_rows: Any
    eval_rows: Any
    data_report: DataReport
    skeleton: Any = None

    @property
    def prompt(self) -> Prompt:
        return Prompt.of(self.recipe.data)

    def collator(self) -> DocVQACollator:
        """The training collator: the recipe's prompt, length bound and answer choice, seeded."""
        data, training = self.recipe.data, self.recipe.training
        return DocVQACollator(self.processor, self.prompt, training.max_length, data.answer_choice, seed=training.seed)

    def page_base(self) -> Path | None:
        """The folder the report names pages relative to (the dataset's), None for a Hub dataset."""
        return dataset_folder(resolve(self.recipe.data.dataset_name))


def prepare(
    recipe: Recipe,
    *,
    need_eval: bool = True,
    screen_train: bool = True,
    processor_path: str | None = None,
    check_targets: bool = True,
    warn_answers: bool = True,
) -> Prepared:
    """Everything before the weights load. `need_eval`: a held-out split must exist; `screen_train`: check the
    training rows too (`docvlm eval` reads them only for the blind-guess baseline, `docvlm plan` screens a sample);
    `processor_path`: load the processor from there (a trained
    adapter's folder) instead of the base model's; `check_targets`: check the LoRA targets on the meta-device
    model; `warn_answers`: announce held-out answers longer than eval_max_new_tokens."""
    from transformers import AutoConfig

    from docvlm import speedups
    from docvlm.hub import check_recipe_sources
    from docvlm.training.modeling import check_lora_targets, load_processor, model_path

    data_args, model_args, training_args, eval_args = recipe
    check_recipe_sources(model_args, data_args)
    path = model_path(model_args)
    trust = training_args.trust_remote_code
    config = AutoConfig.from_pretrained(path, revision=model_args.model_revision, trust_remote_code=trust)
    family = family_of(config.model_type)
    refuse_processor_options(family, model_args)
    speedups.refuse_what_does_not_apply(family, training_args)
    skeleton = check_lora_targets(model_args, path, trust, config=config) if check_targets else None
    report = DataReport(data_args.dataset_name)
    train_rows, eval_rows = load_splits(data_args, need_eval=need_eval, report=report)
    processor = load_processor(model_args, processor_path or path, config.model_type)
    if screen_train:
        train_rows, _ = screen_split(train_rows, processor, recipe, data_args.dataset_train_split, report)
        if len(train_rows) == 0:
            raise UserError(f"Every training row of {data_args.dataset_name} was skipped: see the problems above.")
    if eval_rows is not None:
        eval_rows, _ = screen_split(eval_rows, processor, recipe, data_args.dataset_test_split, report)
        if warn_answers:
            from docvlm.data.preflight import warn_long_answers

            warn_long_answers(processor.tokenizer, eval_rows, eval_args.eval_max_new_tokens)
    return Prepared(recipe, path, config, family, processor, train_rows, eval_rows, report, skeleton)


def screen_split(rows, processor, recipe: Recipe, split: str, report: DataReport | None = None):
    """Check every row of a split as a training batch would hold it (docvlm.data.checks.screen), with the recipe's
    prompt, columns, length bound and on_bad_example; `report` gets the skipped rows and the count kept. Its own
    collator: "first" draws nothing from the training collator's seeded answer choice."""
    from docvlm.data import role_columns
    from docvlm.data.checks import screen

    data_args = recipe.data
    checker = DocVQACollator(processor, Prompt.of(data_args), recipe.training.max_length, "first")
    kept, found = screen(
        rows, checker, role_columns(data_args), split, data_args.dataset_name, data_args.on_bad_example
    )
    if report is not None:
        for problem in found:
            report.skip(split, problem["row"], problem["field"], problem["reason"], problem["problem"])
        report.used(split, len(kept))
    return kept, found
