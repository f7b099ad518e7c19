"""Load a document-QA dataset and map its columns onto (image, question, answers).

The mapping is done with Arrow-level column operations (flatten, select, rename), so no image is decoded or
re-encoded here: pages are decoded lazily, batch by batch, in the collator.
"""

from __future__ import annotations

import os
from pathlib import Path

from docvlm import tiny
from docvlm.config import DataArguments, UserError
from docvlm.hub import check_source, looks_local

# The columns every mapped dataset has; `row` is the index in the original split, for error messages. A recipe
# with a group_column also gets `group`, to break evaluation scores down by.
CANONICAL = ("image", "question", "answers", "row")
_DATA_FILE_TYPES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}


def load_raw(name: str, config: str | None = None):
    """A DatasetDict from a Hub id, a `save_to_disk` folder, a data file, or a folder of data files/images."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if path.is_file():
        kind = _DATA_FILE_TYPES.get(path.suffix)
        if kind is None:
            raise UserError(f"Cannot read {path}: use one of {sorted(_DATA_FILE_TYPES)} or a folder.")
        return load_dataset(kind, data_files={"train": str(path)})
    # A folder of split-named files (train.parquet, test.jsonl...), an image folder, or a Hub id.
    return load_dataset(str(path) if path.is_dir() else name, config)


def column_names(dataset) -> list[str]:
    """All column names, with dotted paths into struct columns (query.en), as the recipe may name them."""
    names = []

    def walk(prefix, feature):
        names.append(prefix)
        if isinstance(feature, dict):
            for key, sub in feature.items():
                walk(f"{prefix}.{key}", sub)

    for name, feature in dataset.features.items():
        walk(name, feature)
    return names


def map_columns(dataset, args: DataArguments, split: str, source: str, base_dir: Path | None = None):
    """Select the recipe's image/question/answers columns and rename them to the canonical ones."""
    from datasets import Image

    wanted = {"image": args.image_column, "question": args.question_column, "answers": args.answers_column}
    if args.group_column:
        wanted["group"] = args.group_column
    present = column_names(dataset)
    for role, column in wanted.items():
        if column not in present:
            raise UserError(
                f"Column '{column}' ({role}_column) not found in split '{split}' of {source}. "
                f"Columns present: {', '.join(present)}. Set {role}_column in the recipe."
            )
    if "row" in present:
        dataset = dataset.rename_column("row", "_row")
    dataset = dataset.add_column("row", list(range(len(dataset))))
    if any("." in column for column in wanted.values()):
        dataset = dataset.flatten()
    dataset = dataset.select_columns([*wanted.values(), "row"])
    dataset = dataset.rename_columns({column: role for role, column in wanted.items() if column != role})
    if not isinstance(dataset.features["image"], Image):
        dataset = _cast_image_paths(dataset, args.image_column, source, base_dir)
    return dataset


def _cast_image_paths(dataset, column: str, source: str, base_dir: Path | None):
    """A jsonl/csv with image *paths*: resolve them against the data file's folder and decode them as images."""
    from datasets import Image, Value

    if dataset.features["image"] != Value("string"):
        raise UserError(f"Column '{column}' of {source} holds {dataset.features['image']}, not images or image paths.")
    base = base_dir or Path(".")

    def absolute(batch):
        return {"image": [p if p is None or os.path.isabs(p) else str(base / p) for p in batch["image"]]}

    dataset = dataset.map(absolute, batched=True, desc="Resolving image paths")
    for row, image_path in enumerate(dataset["image"]):
        if image_path is None or not Path(image_path).is_file():
            raise UserError(f"Row {row} of {source}: image file '{image_path}' ({column}) not found.")
    return dataset.cast_column("image", Image())


def _check_not_null(dataset, source: str, split: str, args: DataArguments) -> None:
    """Reject rows whose question or answers are missing, before training starts rather than mid-epoch."""
    for role, column in (("question", args.question_column), ("answers", args.answers_column)):
        values = dataset.data.column(role)
        if values.null_count:
            row = values.to_pylist().index(None)
            raise UserError(
                f"Row {row} of split '{split}' in {source} has no {column} ({role}_column). "
                "Drop or fill such rows before training."
            )


def load_splits(args: DataArguments, need_eval: bool = True):
    """(train, eval) datasets with the canonical columns; eval is None when the split is absent and not needed."""
    source = tiny.resolve(args.dataset_name)
    if not source:
        raise UserError("No dataset: set dataset_name in the recipe (a Hub id or a local path).")
    check_source(source, "dataset", "dataset_name")
    raw = load_raw(source, args.dataset_config)
    base_dir = Path(source).expanduser()
    base_dir = base_dir.parent if base_dir.is_file() else base_dir if looks_local(source) else None

    def split(name: str, limit: int | None):
        dataset = map_columns(raw[name], args, name, source, base_dir)
        _check_not_null(dataset, source, name, args)
        return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset

    if args.dataset_train_split not in raw:
        raise UserError(
            f"Split '{args.dataset_train_split}' (dataset_train_split) not in {source}; it has {list(raw)}."
        )
    train = split(args.dataset_train_split, args.max_train_samples)
    if args.dataset_test_split in raw:
        return train, split(args.dataset_test_split, args.max_eval_samples)
    if need_eval:
        raise UserError(
            f"Split '{args.dataset_test_split}' (dataset_test_split) not in {source}; it has {list(raw)}. "
            "Set dataset_test_split, or eval_strategy: 'no' and eval_after_training: false."
        )
    return train, None
