"""Rows that hold several questions, one row per question: key-value rows (`field_questions`, a question for each
field, `{field}` and `{column}` filled in), a list of question/answer pairs (`qa_pairs_column`), or parallel lists of
questions and answers (a `question_column` holding a list). What could not become a question is skipped and counted
by reason."""

from __future__ import annotations

import string
import sys

from docvlm.data.columns import EXPANDED, column_names, missing_column
from docvlm.data.report import DataReport
from docvlm.data.text import as_text_or_texts, cell_text, is_converted, json_cells
from docvlm.errors import UserError
from docvlm.recipe.schema import DataArguments

FIELD_PLACEHOLDER = "field"  # {field} in a field_questions template: the field's label


def template_columns(template: str) -> list[str]:
    """The placeholders of a field_questions template ('What is the {field} of {vendor}?' -> field, vendor)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def fill_template(template: str, values: dict[str, str]) -> str:
    """The template with each {name} replaced by values[name]; {{ and }} are literal braces."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(values[name])
    return "".join(out)


def field_label(column: str) -> str:
    """How a field's column reads in a question: total_amount -> total amount, fields.total -> total."""
    return column.split(".")[-1].replace("_", " ").strip()


def one_row_per_question(dataset, args: DataArguments, split: str, source: str, report: DataReport):
    """Rows that hold several questions about one page become one row per question, each keeping its page and the
    number of the row it came from. Pages are carried undecoded; what cannot become a question is counted in
    `report` with its row and reason."""
    from datasets import Image

    present = column_names(dataset)
    if args.field_questions:
        mode, key = "fields", "field_questions"
        placeholders = {c for q in args.field_questions.values() for c in template_columns(q)} - {FIELD_PLACEHOLDER}
        sources = list(dict.fromkeys([*args.field_questions, *sorted(placeholders)]))
    elif args.qa_pairs_column:
        mode, key, sources = "pairs", "qa_pairs_column", [args.qa_pairs_column]
    else:
        mode, key, sources = "lists", "question_column", [args.question_column, args.answers_column]
    carried = [args.image_column, *[c for c in (args.group_column, args.eval_split_by) if c]]
    roles = {args.image_column: "image_column", args.group_column: "group_column", args.eval_split_by: "eval_split_by"}
    for column in dict.fromkeys([*carried, *sources]):
        if column not in present:
            role = roles.get(column, key)
            hint = ""
            if mode == "fields" and column not in args.field_questions:
                hint = f" A field_questions question names {{{column}}}; placeholders name columns, or {{field}}."
            raise missing_column(column, role, split, source, present, hint)
    if any("." in column for column in [*carried, *sources]):
        dataset = dataset.flatten()
    dataset = dataset.select_columns(list(dict.fromkeys([*carried, *sources])))
    features = dataset.features
    if isinstance(features[args.image_column], Image):
        dataset = dataset.cast_column(args.image_column, Image(decode=False))
    skips: list[tuple[int, str, str, str]] = []  # (row, field, reason, detail), taken while mapping
    converted = [0]

    def text(value) -> str:
        return cell_text(value) or ""

    def expand(batch, indices):
        out = {column: [] for column in carried} | {EXPANDED[k]: [] for k in ("question", "answers", "row", "field")}

        def add(i, index, question, answers, field):
            for column in carried:
                out[column].append(batch[column][i])
            out[EXPANDED["question"]].append(question)
            out[EXPANDED["answers"]].append(answers)
            out[EXPANDED["row"]].append(index)
            out[EXPANDED["field"]].append(field)

        for i, index in enumerate(indices):
            cells = {column: json_cells(batch[column][i], features[column]) for column in sources}
            if mode == "fields":
                _expand_fields(args.field_questions, cells, i, index, add, skips, converted)
            elif mode == "pairs":
                _expand_pairs(args, cells[args.qa_pairs_column], split, source, i, index, add, skips, converted)
            else:
                _expand_lists(args, cells, i, index, add, skips, converted)
        return out

    expanded = dataset.map(
        expand,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        load_from_cache_file=False,  # the skips are taken while mapping
        desc=f"One row per question ({split})",
    )
    if isinstance(features[args.image_column], Image):
        expanded = expanded.cast_column(args.image_column, Image())
    for row, field, reason, detail in skips:
        report.skip(split, row, field, reason, detail)
    report.convert(key, converted[0])
    if mode == "lists" and args.on_bad_example == "error":
        bad = [(row, detail) for row, _, reason, detail in skips if reason == LISTS_DIFFER]
        if bad:
            raise UserError(
                f"{len(bad)} row(s) of split '{split}' in {source} cannot be used (on_bad_example: error): "
                + "; ".join(f"row {row}: {detail}" for row, detail in bad[:5])
            )
    _say_what_expanded(len(dataset), len(expanded), skips, split, key)
    return expanded


EMPTY_FIELD = "empty field"
EMPTY_PLACEHOLDER = "empty column in the question"
EMPTY_PAIR = "empty question or answer"
LISTS_DIFFER = "questions and answers differ in number"


def _expand_fields(questions: dict, cells: dict, i: int, index: int, add, skips, converted) -> None:
    for column, template in questions.items():
        value = cells[column]
        converted[0] += is_converted(value)
        answer = cell_text(value) or ""
        if not answer:
            skips.append((index, column, EMPTY_FIELD, f"field_questions: '{column}' is empty"))
            continue
        values = {FIELD_PLACEHOLDER: field_label(column)}
        for name in template_columns(template):
            if name != FIELD_PLACEHOLDER:
                values[name] = cell_text(cells[name]) or ""
        empty = [name for name, value in values.items() if not value]
        if empty:
            skips.append((index, column, EMPTY_PLACEHOLDER, f"field_questions: '{column}' asks {{{empty[0]}}}, empty"))
            continue
        add(i, index, fill_template(template, values), [answer], column)


def _expand_pairs(args, pairs, split: str, source: str, i: int, index: int, add, skips, converted) -> None:
    question_key = args.qa_question_key
    answer_keys = [args.qa_answers_key] if args.qa_answers_key else ["answers", "answer"]
    for pair in pairs or []:
        if not isinstance(pair, dict) or question_key not in pair or not set(answer_keys) & set(pair):
            keys = f"{{{question_key}, {' or '.join(answer_keys)}}}"
            got = sorted(pair) if isinstance(pair, dict) else type(pair).__name__
            raise UserError(
                f"Row {index} of split '{split}' in {source}: each item of '{args.qa_pairs_column}' "
                f"(qa_pairs_column) must be {keys}, got {pair!r} (keys: {got}). Set qa_question_key / "
                "qa_answers_key to the keys your pairs use."
            )
        answers = next((pair[k] for k in answer_keys if pair.get(k) is not None), None)
        texts, count, _ = as_text_or_texts(answers if isinstance(answers, list) else [answers])
        converted[0] += count + is_converted(pair[question_key])
        question = cell_text(pair[question_key]) or ""
        texts = [t for t in texts or [] if t]
        if question and texts:
            add(i, index, question, texts, "")
        else:
            skips.append((index, args.qa_pairs_column, EMPTY_PAIR, f"pair {pair!r}"))


def _expand_lists(args, cells: dict, i: int, index: int, add, skips, converted) -> None:
    questions = cells[args.question_column] or []
    answers = cells[args.answers_column] or []
    if not isinstance(answers, list) or len(questions) != len(answers):
        count = len(answers) if isinstance(answers, list) else 1
        detail = f"{len(questions)} question(s) in '{args.question_column}', {count} in '{args.answers_column}'"
        skips.append((index, args.question_column, LISTS_DIFFER, detail))
        return
    for question, accepted in zip(questions, answers, strict=True):
        texts, count, _ = as_text_or_texts(accepted if isinstance(accepted, list) else [accepted])
        converted[0] += count
        add(i, index, cell_text(question) or "", [t for t in texts or [] if t], "")


def _say_what_expanded(rows: int, samples: int, skips: list, split: str, key: str) -> None:
    from collections import Counter

    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    counts = Counter((reason, field) for _, field, reason, _ in skips)
    listed = ", ".join(f"{field} {count}" for (_, field), count in counts.items())
    print(
        f"Split '{split}': {rows} rows became {samples} questions ({key})"
        + (f"; skipped: {listed}." if listed else "."),
        file=sys.stderr,
    )
