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
    if path.is_dir():
        return _load_folder(path, config)
    return load_dataset(name, config)  # a Hub id


def _load_folder(path: Path, config: str | None):
    """A folder of split-named data files (train.jsonl, test.parquet...) or an image folder.

    datasets reads every split of a folder into one schema, so two jsonl splits whose *unused* nested columns differ
    fail to load at all. Data files are read split by split instead: only the columns the recipe maps must agree.
    """
    from datasets import DatasetDict, load_dataset, load_dataset_builder

    builder = load_dataset_builder(str(path), config)
    if builder.name not in ("json", "csv", "parquet"):
        return load_dataset(str(path), config)  # an image folder (with metadata.jsonl / .csv) reads its own way
    files = {str(split): list(names) for split, names in builder.config.data_files.items()}
    return DatasetDict(
        {split: load_dataset(builder.name, data_files={split: names})[split] for split, names in files.items()}
    )


def split_files(source: str) -> dict[str, str]:
    """For error messages: the data files behind each split of a local folder ({'test': 'test.jsonl'})."""
    from datasets import load_dataset_builder

    path = Path(source).expanduser()
    if path.is_file():
        return {"train": path.name}
    if not path.is_dir() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return {}
    try:
        data_files = load_dataset_builder(str(path)).config.data_files or {}
    except Exception:  # only a message depends on it
        return {}
    return {str(split): ", ".join(Path(name).name for name in names) for split, names in data_files.items()}


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
    check_distinct_roles(wanted)
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
    _check_text_columns(dataset, args, split, source)
    if not isinstance(dataset.features["image"], Image):
        dataset = _cast_image_paths(dataset, args.image_column, source, base_dir)
    return dataset


def check_distinct_roles(wanted: dict[str, str]) -> None:
    """One column in two roles (a question that is its own answer) would train nothing useful."""
    seen = {}
    for role, column in wanted.items():
        if column in seen:
            raise UserError(
                f"Column '{column}' is both {seen[column]}_column and {role}_column in the recipe: each role needs "
                "its own column."
            )
        seen[column] = role


def _check_text_columns(dataset, args: DataArguments, split: str, source: str) -> None:
    """Questions must be text and answers text or lists of text: say which file and column hold something else."""
    from datasets import LargeList, List, Value

    def is_text(feature) -> bool:
        return isinstance(feature, Value) and feature.dtype in ("string", "large_string")

    answers = dataset.features["answers"]
    checks = (
        ("question", args.question_column, is_text(dataset.features["question"]), "text"),
        (
            "answers",
            args.answers_column,
            is_text(answers) or (isinstance(answers, List | LargeList) and is_text(answers.feature)),
            "text or a list of texts",
        ),
    )
    for role, column, ok, expected in checks:
        if not ok:
            files = split_files(source).get(split)
            where = f"split '{split}' of {source}" + (f" ({files})" if files else "")
            raise UserError(
                f"Column '{column}' ({role}_column) in {where} holds {dataset.features[role]}, but {role} must be "
                f"{expected}. Convert that column, or point {role}_column at another."
            )


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

    def mapped(name: str):
        dataset = map_columns(raw[name], args, name, source, base_dir)
        _check_not_null(dataset, source, name, args)
        return dataset

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
        train, held_out = carve_eval_split(
            mapped(args.dataset_train_split), args.eval_split_size, args.eval_split_seed, source
        )
        return first(train, args.max_train_samples), first(held_out, args.max_eval_samples)
    train = first(mapped(args.dataset_train_split), args.max_train_samples)
    if args.dataset_test_split in raw:
        return train, first(mapped(args.dataset_test_split), args.max_eval_samples)
    if need_eval:
        raise UserError(
            f"Split '{args.dataset_test_split}' (dataset_test_split) not in {source}; it has {list(raw)}. "
            "Set eval_split_size (e.g. 0.1) to hold out part of the training rows, or dataset_test_split, or "
            "eval_strategy: 'no' and eval_after_training: false."
        )
    return train, None


def carve_eval_split(rows, size: float, seed: int, source: str):
    """(train, held-out) from one split: a seeded draw of `size` rows (a fraction below 1, else a count), so the
    same recipe always holds out the same rows and no row is in both."""
    count = round(size * len(rows)) if 0 < size < 1 else int(size)
    if size <= 0 or (size > 1 and size != int(size)) or not 1 <= count < len(rows):
        raise UserError(
            f"eval_split_size {size} cannot hold rows out of the {len(rows)} rows of {source}: use a fraction "
            "between 0 and 1 (0.1) or a whole number of rows below the total."
        )
    parts = rows.train_test_split(test_size=count, seed=seed, shuffle=True)
    return parts["train"].sort("row"), parts["test"].sort("row")  # in file order: max_*_samples keep the first
