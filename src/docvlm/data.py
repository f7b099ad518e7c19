"""Load a document-QA dataset and map its columns onto (image, question, answers).

The mapping is done with Arrow-level column operations (flatten, select, rename), so no image is decoded or
re-encoded here: pages are decoded lazily, batch by batch, in the collator.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from docvlm import tiny
from docvlm.config import DataArguments, UserError
from docvlm.hub import check_source, looks_local

# The columns every mapped dataset has; `row` is the index in the original split, for error messages. `image` holds
# a page or a list of pages. A recipe with a group_column also gets `group`, to break evaluation scores down by, and
# one with a messages_column gets `messages` (the conversation as JSON; question and answers are its last exchange).
CANONICAL = ("image", "question", "answers", "row")
_DATA_FILE_TYPES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}


def load_raw(name: str, config: str | None = None):
    """A DatasetDict from a Hub id, a `save_to_disk` folder, a data file, or a folder of data files/images."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(name).expanduser()
    if _saved_with_save_to_disk(path):
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if path.is_file():
        kind = _DATA_FILE_TYPES.get(path.suffix)
        if kind is None:
            raise UserError(f"Cannot read {path}: use one of {sorted(_DATA_FILE_TYPES)} or a folder.")
        check_text_file(path)
        return load_dataset(kind, data_files={"train": str(path)})
    if path.is_dir():
        return _load_folder(path, config)
    return load_dataset(name, config)  # a Hub id


def _saved_with_save_to_disk(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


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
    for names in files.values():
        for name in names:
            check_text_file(Path(name))
    return DatasetDict(
        {split: load_dataset(builder.name, data_files={split: names})[split] for split, names in files.items()}
    )


def check_text_file(path: Path) -> None:
    """jsonl / json-lines / csv files are read line by line first, so that invalid UTF-8 or a malformed JSON line
    is reported with its file and line number instead of a parser traceback. A JSON document (not lines) is left to
    the parser."""
    if path.suffix not in (".jsonl", ".json", ".csv"):
        return
    json_lines = path.suffix == ".jsonl"
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(
                    f"{path}, line {number}: not valid UTF-8 (byte {error.start + 1} of the line). Save it as UTF-8."
                ) from None
            if path.suffix == ".json" and number == 1:
                try:
                    json_lines = isinstance(json.loads(line), dict)  # one object per line
                except json.JSONDecodeError:
                    json_lines = False  # a JSON document over several lines: the parser reads it
                continue
            if json_lines and line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as error:
                    where = f"{path}, line {number}"
                    raise UserError(f"{where}: not valid JSON ({error.msg}, column {error.colno}).") from None


def split_files(source: str) -> dict[str, str]:
    """For error messages: the data files behind each split of a local folder ({'test': 'test.jsonl'})."""
    from datasets import load_dataset_builder

    path = Path(source).expanduser()
    if path.is_file():
        return {"train": path.name}
    if not path.is_dir() or _saved_with_save_to_disk(path):
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
    """Select the recipe's image/question/answers columns and rename them to the canonical ones; rows of several
    questions (field_questions, qa_pairs_column) first become one row per question."""
    from datasets import ClassLabel

    wanted = {"image": args.image_column, "question": args.question_column, "answers": args.answers_column}
    if args.group_column:
        wanted["group"] = args.group_column
    if args.messages_column:
        dataset = conversation_columns(dataset, args, split, source)
        wanted.update(question=EXPANDED["question"], answers=EXPANDED["answers"], messages=EXPANDED["messages"])
    elif args.field_questions or args.qa_pairs_column:
        dataset = one_row_per_question(dataset, args, split, source)
        wanted.update(question=EXPANDED["question"], answers=EXPANDED["answers"])
        if args.field_questions and not args.group_column:
            wanted["group"] = EXPANDED["field"]  # scores broken down by field, unless the recipe groups otherwise
    check_distinct_roles(wanted)
    present = column_names(dataset)
    for role, column in wanted.items():
        if column not in present:
            raise UserError(
                f"Column '{column}' ({role}_column) not found in split '{split}' of {source}. "
                f"Columns present: {', '.join(present)}. Set {role}_column in the recipe."
            )
    if EXPANDED["row"] not in present:  # expanded rows already carry the row they came from
        if "row" in present:
            dataset = dataset.rename_column("row", "_row")
        dataset = dataset.add_column("row", list(range(len(dataset))))
    else:
        dataset = dataset.rename_column(EXPANDED["row"], "row")
    if any("." in column for column in wanted.values()):
        dataset = dataset.flatten()
    dataset = dataset.select_columns([*wanted.values(), "row"])
    dataset = dataset.rename_columns({column: role for role, column in wanted.items() if column != role})
    dataset = _check_text_columns(dataset, args, split, source)
    if "group" in wanted and isinstance(dataset.features["group"], ClassLabel):  # names in the report, not 0 / 1
        names = dataset.features["group"].names
        groups = [None if g is None else names[g] for g in dataset.data.column("group").to_pylist()]
        dataset = dataset.remove_columns("group").add_column("group", groups)
    if not _holds_images(dataset.features["image"]):
        dataset = _cast_image_paths(dataset, args.image_column, source, base_dir)
    return dataset


def _holds_images(feature) -> bool:
    from datasets import Image, LargeList, List

    return isinstance(feature, Image) or (isinstance(feature, List | LargeList) and isinstance(feature.feature, Image))


def conversation_columns(dataset, args: DataArguments, split: str, source: str):
    """Check every conversation of messages_column up front and add the columns training and evaluation read: the
    conversation as JSON (one schema, whatever mix of text and part-list contents the file has) and its last
    exchange as question and answer. Only the messages column is read; pages stay undecoded."""
    import pyarrow.compute as pc

    from docvlm.collator import last_exchange, normalize_messages

    column = args.messages_column
    present = column_names(dataset)
    for name, role in ((column, "messages_column"), (args.image_column, "image_column")):
        if name not in present:
            raise UserError(
                f"Column '{name}' ({role}) not found in split '{split}' of {source}. "
                f"Columns present: {', '.join(present)}."
            )
    pages = dataset.data.column(args.image_column)
    counts = pc.list_value_length(pages).to_pylist() if hasattr(pages.type, "value_type") else [1] * len(dataset)
    encoded, questions, answers = [], [], []
    for index, (messages, count) in enumerate(zip(dataset[column], counts, strict=True)):
        where = f"Row {index} of split '{split}' in {source} ({column}, messages_column)"
        turns = normalize_messages(messages, where)
        parts = sum(part["type"] == "image" for turn in turns for part in turn["content"])
        if parts != (count or 0):
            raise UserError(
                f"{where}: {parts} image part(s) in the conversation but {count or 0} page(s) in "
                f'\'{args.image_column}\' (image_column); each page needs one {{"type": "image"}} part.'
            )
        question, answer = last_exchange(turns)
        encoded.append(json.dumps(turns, ensure_ascii=False))
        questions.append(question)
        answers.append([answer])
    for name, values in ((EXPANDED["messages"], encoded), (EXPANDED["question"], questions)):
        dataset = dataset.add_column(name, values)
    return dataset.add_column(EXPANDED["answers"], answers)


# The columns one_row_per_question writes; unusual names, so that they never meet a dataset's own.
EXPANDED = {
    "question": "_docvlm_question",
    "answers": "_docvlm_answers",
    "row": "_docvlm_row",
    "field": "_docvlm_field",
    "messages": "_docvlm_messages",
}


def one_row_per_question(dataset, args: DataArguments, split: str, source: str):
    """Rows that hold several questions about one page become one row per question, each keeping its page and the
    number of the row it came from: key-value rows (field_questions: each non-empty field, asked by the recipe's
    question for it) or a list of {question, answers} pairs (qa_pairs_column). Pages are carried undecoded."""
    from datasets import Image

    present = column_names(dataset)
    sources = list(args.field_questions) if args.field_questions else [args.qa_pairs_column]
    key = "field_questions" if args.field_questions else "qa_pairs_column"
    carried = [args.image_column, *([args.group_column] if args.group_column else [])]  # copied to each question
    for column in [*carried, *sources]:
        if column not in present:
            role = {args.image_column: "image_column", args.group_column: "group_column"}.get(column, key)
            raise UserError(
                f"Column '{column}' ({role}) not found in split '{split}' of {source}. "
                f"Columns present: {', '.join(present)}."
            )
    if any("." in column for column in sources):
        dataset = dataset.flatten()
    dataset = dataset.select_columns(list(dict.fromkeys([*carried, *sources])))
    if isinstance(dataset.features[args.image_column], Image):
        dataset = dataset.cast_column(args.image_column, Image(decode=False))
    skipped = dict.fromkeys(sources, 0)

    def text(value) -> str:
        return "" if value is None else str(value).strip()

    def expand(batch, indices):
        out = {
            **{column: [] for column in carried},
            **{EXPANDED[key]: [] for key in ("question", "answers", "row", "field")},
        }

        def add(i, index, question, answers, field):
            for column in carried:
                out[column].append(batch[column][i])
            out[EXPANDED["question"]].append(question)
            out[EXPANDED["answers"]].append(answers)
            out[EXPANDED["row"]].append(index)
            out[EXPANDED["field"]].append(field)

        for i, index in enumerate(indices):
            if args.field_questions:
                for column, question in args.field_questions.items():
                    if text(batch[column][i]):
                        add(i, index, question, [text(batch[column][i])], column)
                    else:
                        skipped[column] += 1
                continue
            for pair in batch[args.qa_pairs_column][i] or []:
                if not isinstance(pair, dict) or "question" not in pair or not ({"answers", "answer"} & set(pair)):
                    raise UserError(
                        f"Row {index} of split '{split}' in {source}: each item of '{args.qa_pairs_column}' "
                        f"(qa_pairs_column) must be {{question, answers}} or {{question, answer}}, got {pair!r}."
                    )
                answers = pair.get("answers") if pair.get("answers") is not None else pair.get("answer")
                answers = [text(a) for a in ([answers] if not isinstance(answers, list) else answers) if text(a)]
                if text(pair["question"]) and answers:
                    add(i, index, text(pair["question"]), answers, "")
                else:
                    skipped[args.qa_pairs_column] += 1
        return out

    expanded = dataset.map(
        expand,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        load_from_cache_file=False,  # the skipped counts are taken while mapping
        desc=f"One row per question ({split})",
    )
    if isinstance(dataset.features[args.image_column], Image):
        expanded = expanded.cast_column(args.image_column, Image())
    _say_what_expanded(len(dataset), len(expanded), skipped, split, key)
    return expanded


def _say_what_expanded(rows: int, samples: int, skipped: dict[str, int], split: str, key: str) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    empty = ", ".join(f"{name} {count}" for name, count in skipped.items() if count)
    print(
        f"Split '{split}': {rows} rows became {samples} questions ({key})"
        + (f"; empty, skipped: {empty}." if empty else "."),
        file=sys.stderr,
    )


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


def _check_text_columns(dataset, args: DataArguments, split: str, source: str):
    """Questions must be text and answers text or lists of text (numbers are read as text): say which file and
    column hold something else."""
    from datasets import LargeList, List, Value

    def is_text(feature) -> bool:
        return isinstance(feature, Value) and feature.dtype in ("string", "large_string")

    answers = dataset.features["answers"]
    numbers = (
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
    if isinstance(answers, Value) and answers.dtype in numbers:  # numeric answers are read as text ("42")
        dataset = dataset.cast_column("answers", Value("string"))
    elif (
        isinstance(answers, List | LargeList)
        and isinstance(answers.feature, Value)
        and answers.feature.dtype in numbers
    ):
        dataset = dataset.cast_column("answers", List(Value("string")))
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
    return dataset


def _cast_image_paths(dataset, column: str, source: str, base_dir: Path | None):
    """A jsonl/csv with image *paths* (or lists of paths, one a page): resolve them against the data file's folder
    and decode them as images."""
    from datasets import Image, LargeList, List, Value

    feature = dataset.features["image"]
    several = isinstance(feature, List | LargeList)
    if (feature.feature if several else feature) != Value("string"):
        raise UserError(f"Column '{column}' of {source} holds {feature}, not images or image paths.")
    base = base_dir or Path(".")

    def resolve(path):
        return path if path is None or os.path.isabs(path) else str(base / path)

    def absolute(batch):
        return {"image": [[resolve(p) for p in (ps or [])] if several else resolve(ps) for ps in batch["image"]]}

    # a missing file is found with every other bad page before training (docvlm.screen), skipped or reported
    dataset = dataset.map(absolute, batched=True, desc="Resolving image paths")
    return dataset.cast_column("image", List(Image()) if several else Image())


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
        return map_columns(raw[name], args, name, source, base_dir)

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


def role_columns(args: DataArguments) -> dict[str, str]:
    """The recipe setting behind each canonical column, for messages about a row's field."""
    if args.messages_column:
        question = answers = f"{args.messages_column} (messages_column)"
    elif args.field_questions or args.qa_pairs_column:
        question = answers = "field_questions" if args.field_questions else f"{args.qa_pairs_column} (qa_pairs_column)"
    else:
        question, answers = f"{args.question_column} (question_column)", f"{args.answers_column} (answers_column)"
    return {"image": f"{args.image_column} (image_column)", "question": question, "answers": answers}


def carve_eval_split(rows, size: float, seed: int, source: str):
    """(train, held-out) from one split: a seeded draw of `size` of its rows (a fraction below 1, else a count), so
    the same recipe always holds out the same rows. The draw is over the dataset's own rows, not its questions: the
    questions of one page (field_questions, qa_pairs_column) stay together, and no page is in both."""
    import random

    ids = sorted(set(rows["row"]))
    count = round(size * len(ids)) if 0 < size < 1 else int(size)
    if size <= 0 or (size > 1 and size != int(size)) or not 1 <= count < len(ids):
        raise UserError(
            f"eval_split_size {size} cannot hold rows out of the {len(ids)} rows of {source}: use a fraction "
            "between 0 and 1 (0.1) or a whole number of rows below the total."
        )
    held = set(random.Random(seed).sample(ids, count))
    train = rows.filter(lambda row: row not in held, input_columns="row", desc="Holding rows out")
    held_out = rows.filter(lambda row: row in held, input_columns="row", desc="Holding rows out")
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(
            f"Held out {count} of the {len(ids)} rows of {source} for evaluation (eval_split_size {size:g}, "
            f"eval_split_seed {seed}): {len(held_out)} questions held out, {len(train)} to train on.",
            file=sys.stderr,
        )
    return train, held_out  # both in file order: max_*_samples keep the first
