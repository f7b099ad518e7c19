"""Map a split's columns onto docvlm's rows: one question about one or more pages (`image`, `question`, `answers`,
`row`), or a conversation (`messages`).

Rows that hold several questions become one row per question first (docvlm.data.questions). Mapping uses
Arrow-level column operations and reads no page: pages are decoded lazily, batch by batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from docvlm.data.columns import EXPANDED, column_names, missing_column
from docvlm.data.questions import one_row_per_question
from docvlm.data.report import DataReport
from docvlm.data.text import as_text_or_texts, cell_text, has_json, is_converted, json_cells, without_json_decoding
from docvlm.errors import UserError
from docvlm.recipe.schema import DataArguments

# The columns every mapped dataset has; `row` is the index in the original split, for error messages. `image` holds
# a page or a list of pages. A recipe with a group_column also gets `group`, to break evaluation scores down by; one
# with eval_split_by gets `split_key`; one with a messages_column gets `messages` (the conversation as JSON;
# question and answers are its last exchange).
CANONICAL = ("image", "question", "answers", "row")


def map_columns(dataset, args: DataArguments, split: str, source: str, report: DataReport, image_dirs=()):
    """The split with the canonical columns, every cell of them text where text is expected (numbers converted and
    counted in `report`), image paths resolved against `image_dirs` (the first folder where the file exists)."""
    from datasets import ClassLabel

    if has_json(dataset.features):  # mixed-type columns: decoded here, keeping text as text (docvlm.data.text)
        dataset = dataset.cast(without_json_decoding(dataset.features))
    rows_read = len(dataset)
    wanted = {"image": args.image_column, "question": args.question_column, "answers": args.answers_column}
    if args.group_column:
        wanted["group"] = args.group_column
    if args.eval_split_by:
        wanted["split_key"] = args.eval_split_by
    if args.messages_column:
        dataset = conversation_columns(dataset, args, split, source, report)
        wanted.update(question=EXPANDED["question"], answers=EXPANDED["answers"], messages=EXPANDED["messages"])
    elif args.field_questions or args.qa_pairs_column or _holds_question_lists(dataset, args.question_column):
        dataset = one_row_per_question(dataset, args, split, source, report)
        wanted.update(question=EXPANDED["question"], answers=EXPANDED["answers"])
        if args.field_questions and not args.group_column:
            wanted["group"] = EXPANDED["field"]  # scores broken down by field, unless the recipe groups otherwise
    check_distinct_roles(wanted)
    present = column_names(dataset)
    for role, column in wanted.items():
        if column not in present:
            key = "eval_split_by" if role == "split_key" else f"{role}_column"
            raise missing_column(column, key, split, source, present, f" Set {key} in the recipe.")
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
    for role in ("question", "answers"):
        dataset = _as_text(dataset, role, args, split, source, report)
    for role in ("group", "split_key"):
        if role in wanted:
            dataset = _decoded(dataset, role)
    if "group" in wanted and isinstance(dataset.features["group"], ClassLabel):  # names in the report, not 0 / 1
        names = dataset.features["group"].names
        groups = [None if g is None else names[g] for g in dataset.data.column("group").to_pylist()]
        dataset = dataset.remove_columns("group").add_column("group", groups)
    if not _holds_images(dataset.features["image"]):
        dataset = _cast_image_paths(dataset, args.image_column, source, list(image_dirs))
    report.read(split, rows_read, len(dataset))
    return dataset


def _holds_images(feature) -> bool:
    from datasets import Image, LargeList, List

    return isinstance(feature, Image) or (isinstance(feature, List | LargeList) and isinstance(feature.feature, Image))


def _is_text(feature) -> bool:
    from datasets import Value

    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


def _holds_question_lists(dataset, column: str) -> bool:
    """Whether question_column holds a list of questions a row (parallel lists of questions and answers)."""
    from datasets import LargeList, List

    feature = _feature_at(dataset.features, column)
    return isinstance(feature, List | LargeList) and _is_text(feature.feature)


def _feature_at(features, dotted: str):
    feature = features
    for part in dotted.split("."):
        if not isinstance(feature, dict) or part not in feature:
            return None
        feature = feature[part]
    return feature


def _decoded(dataset, role: str):
    """A column read undecoded (Json), decoded; any other column as it is."""
    feature = dataset.features[role]
    if not has_json(feature):
        return dataset
    values = [json_cells(value, feature) for value in dataset[role]]
    values = [cell_text(value) if isinstance(value, str) else value for value in values]  # StoredScalar -> str
    return dataset.remove_columns(role).add_column(role, values)


def _as_text(dataset, role: str, args: DataArguments, split: str, source: str, report: DataReport):
    """Questions as text and answers as text or lists of texts: numbers and booleans are converted (and counted),
    anything else is refused naming the file, row and column."""
    from datasets import LargeList, List

    from docvlm.data.sources import split_files

    feature = dataset.features[role]
    if _is_text(feature) or (role == "answers" and isinstance(feature, List | LargeList) and _is_text(feature.feature)):
        return dataset
    column = role_columns(args)[role]
    values, converted, lists = [], 0, False
    for index, value in enumerate(dataset[role]):
        text, count, bad = as_text_or_texts(json_cells(value, feature))
        if bad or (role == "question" and isinstance(text, list)):
            files = split_files(source, args.data_files).get(split)
            where = f"split '{split}' of {source}" + (f" ({files})" if files else "")
            expected = "text" if role == "question" else "text or a list of texts"
            raise UserError(
                f"Row {dataset[index]['row']} of {where}: {column} holds {json.dumps(value, default=str)[:120]}, but "
                f"{role} must be {expected}. Convert that column, or point {role}_column at another."
            )
        values.append(text)
        converted += count
        lists = lists or isinstance(text, list)
    if lists:  # one type for the column: a single answer becomes a list of one
        values = [value if isinstance(value, list) else ([] if value is None else [value]) for value in values]
    report.convert(column, converted)
    return dataset.remove_columns(role).add_column(role, values)


def conversation_columns(dataset, args: DataArguments, split: str, source: str, report: DataReport):
    """Check every conversation of messages_column up front and add the columns training and evaluation read: the
    conversation as JSON (one schema, whatever mix of text and part-list contents the file has) and its last
    exchange as question and answer. Only the messages column is read; pages stay undecoded."""
    import pyarrow.compute as pc

    from docvlm.conversations import last_exchange, normalize_messages

    column = args.messages_column
    present = column_names(dataset)
    for name, role in ((column, "messages_column"), (args.image_column, "image_column")):
        if name not in present:
            raise missing_column(name, role, split, source, present)
    pages = dataset.data.column(args.image_column)
    counts = pc.list_value_length(pages).to_pylist() if hasattr(pages.type, "value_type") else [1] * len(dataset)
    feature = dataset.features[column]
    encoded, questions, answers, converted = [], [], [], 0
    for index, (messages, count) in enumerate(zip(dataset[column], counts, strict=True)):
        where = f"Row {index} of split '{split}' in {source} ({column}, messages_column)"
        messages, count_converted = _texts_in_turns(json_cells(messages, feature))
        converted += count_converted
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
    report.convert(f"{column} (messages_column)", converted)
    for name, values in ((EXPANDED["messages"], encoded), (EXPANDED["question"], questions)):
        dataset = dataset.add_column(name, values)
    return dataset.add_column(EXPANDED["answers"], answers)


def _texts_in_turns(messages) -> tuple[object, int]:
    """A conversation with number and boolean contents (and text parts) as text, and how many were converted."""
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            return messages, 0  # normalize_messages says what is wrong
    if not isinstance(messages, list):
        return messages, 0
    converted, out = 0, []
    for turn in messages:
        if isinstance(turn, dict) and is_converted(turn.get("content")):
            turn, converted = {**turn, "content": cell_text(turn["content"])}, converted + 1
        elif isinstance(turn, dict) and isinstance(turn.get("content"), list):
            parts = []
            for part in turn["content"]:
                if isinstance(part, dict) and part.get("type") == "text" and is_converted(part.get("text")):
                    part, converted = {**part, "text": cell_text(part["text"])}, converted + 1
                parts.append(part)
            turn = {**turn, "content": parts}
        out.append(turn)
    return out, converted


def check_distinct_roles(wanted: dict[str, str]) -> None:
    """One column in two roles (a question that is its own answer) would train nothing useful."""
    seen = {}
    for role, column in wanted.items():
        if column in seen:
            first, second = (("eval_split_by" if r == "split_key" else f"{r}_column") for r in (seen[column], role))
            raise UserError(
                f"Column '{column}' is both {first} and {second} in the recipe: each role needs its own column."
            )
        seen[column] = role


def role_columns(args: DataArguments) -> dict[str, str]:
    """The recipe setting behind each canonical column, for messages about a row's field."""
    if args.messages_column:
        question = answers = f"{args.messages_column} (messages_column)"
    elif args.field_questions or args.qa_pairs_column:
        question = answers = "field_questions" if args.field_questions else f"{args.qa_pairs_column} (qa_pairs_column)"
    else:
        question, answers = f"{args.question_column} (question_column)", f"{args.answers_column} (answers_column)"
    return {"image": f"{args.image_column} (image_column)", "question": question, "answers": answers}


def _cast_image_paths(dataset, column: str, source: str, folders: list[Path]):
    """A table of image *paths* (or lists of paths, one a page): each resolved against the first of `folders` where
    the file exists (the table's own folder, then the dataset's), and decoded as images."""
    from datasets import Image, LargeList, List

    feature = dataset.features["image"]
    several = isinstance(feature, List | LargeList)
    if not _is_text(feature.feature if several else feature):
        raise UserError(f"Column '{column}' of {source} holds {feature}, not images or image paths.")
    folders = folders or [Path(".")]

    def resolve(path):
        if path is None or os.path.isabs(path):
            return path
        found = next((folder / path for folder in folders if (folder / path).is_file()), folders[0] / path)
        return str(found)

    def absolute(batch):
        return {"image": [[resolve(p) for p in (ps or [])] if several else resolve(ps) for ps in batch["image"]]}

    # a missing file is found with every other bad page before training (docvlm.data.checks), skipped or reported
    dataset = dataset.map(absolute, batched=True, desc="Resolving image paths")
    return dataset.cast_column("image", List(Image()) if several else Image())
