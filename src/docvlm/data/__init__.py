"""Load a document-QA dataset in whatever layout it is stored and map it onto docvlm's rows.

- `sources`: read the splits (Hub, files, folders of tables or images), tables as text where their format cannot
  tell text from numbers;
- `layouts`: map columns onto (image, question, answers, row) or a conversation;
- `questions`: rows holding several questions (field questions, question/answer pairs, parallel lists), one row each;
- `columns`: a split's column names as a recipe gives them;
- `text`: numbers, booleans and mixed-type JSON cells as text;
- `splits`: hold pages or documents out for evaluation, never sharing a page with training;
- `report`: data_report.json, what became of every row;
- `checks`: every row checked before the model loads; `preflight`: held-out answers against eval_max_new_tokens.
"""

from __future__ import annotations

from pathlib import Path

from docvlm.data.columns import column_names
from docvlm.data.layouts import CANONICAL, map_columns, role_columns
from docvlm.data.report import DataReport
from docvlm.data.sources import check_text_file, load_raw, split_files
from docvlm.data.splits import carve_eval_split, page_names
from docvlm.errors import UserError
from docvlm.fixtures import resolve
from docvlm.hub import check_source, looks_local
from docvlm.recipe.schema import DataArguments

__all__ = [
    "CANONICAL",
    "DataReport",
    "check_text_file",
    "column_names",
    "dataset_folder",
    "load_splits",
    "page_names",
    "role_columns",
    "split_files",
]


def dataset_folder(source: str) -> Path | None:
    """The local folder a dataset's pages are named relative to (a table file's folder), None for a Hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.parent
    return path if looks_local(source) else None


def load_splits(args: DataArguments, need_eval: bool = True, report: DataReport | None = None):
    """(train, eval) datasets with the canonical columns; eval is None when the split is absent and not needed.
    `report` (a DataReport) gets the rows read, questions made, conversions, skips and what was held out."""
    source = resolve(args.dataset_name)
    if not source:
        raise UserError("No dataset: set dataset_name in the recipe (a Hub id or a local path).")
    check_source(source, "dataset", "dataset_name")
    report = report if report is not None else DataReport(args.dataset_name)
    raw = load_raw(source, args.dataset_config, args.data_files, args.json_field)

    def mapped(name: str):
        return map_columns(raw[name], args, name, source, report, raw.image_dirs.get(name, ()))

    def first(dataset, limit: int | None):
        return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset

    if args.dataset_train_split not in raw:
        raise UserError(
            f"Split '{args.dataset_train_split}' (dataset_train_split) not in {source}; it has {list(raw)}."
        )
    if args.eval_split_size is not None:
        if args.dataset_test_split in raw:
            raise UserError(
                f"eval_split_size is set, but {source} already has a '{args.dataset_test_split}' split "
                "(dataset_test_split): remove eval_split_size, or name a split that does not exist."
            )
        # carved after mapping, so that `row` still numbers the rows of the file the user has
        train, held_out, report.held_out = carve_eval_split(
            mapped(args.dataset_train_split),
            args.eval_split_size,
            args.eval_split_seed,
            source,
            by=args.eval_split_by,
            base=dataset_folder(source),
        )
        return first(train, args.max_train_samples), first(held_out, args.max_eval_samples)
    train = first(mapped(args.dataset_train_split), args.max_train_samples)
    if args.dataset_test_split in raw:
        return train, first(mapped(args.dataset_test_split), args.max_eval_samples)
    if need_eval:
        raise UserError(
            f"Split '{args.dataset_test_split}' (dataset_test_split) not in {source}; it has {list(raw)}. "
            "Set eval_split_size (e.g. 0.1) to hold out part of the training pages, or dataset_test_split, or "
            "eval_strategy: 'no' and eval_after_training: false."
        )
    return train, None
