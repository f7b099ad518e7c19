"""The recipe's data fields: where the documents come from and how a row maps onto (image, question, answers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from trl import ScriptArguments


@dataclass
class DataArguments(ScriptArguments):
    """Where the documents come from and how a row maps onto (image, question, answers)."""

    # `dataset_name` (TRL) is a Hub id, a local path (parquet / jsonl / csv file or folder, a folder saved with
    # `save_to_disk`, an image folder with metadata.jsonl) or the offline fixture `docvlm:tiny-docs`.
    image_column: str = field(
        default="image",
        metadata={"help": "The page image or its path, or a list of them (one a page)."},
    )
    question_column: str = field(
        default="query.en", metadata={"help": "Column holding the question; dots reach into dicts (query.en)."}
    )
    answers_column: str = field(
        default="answers", metadata={"help": "Column holding the answer: a string or a list of accepted answers."}
    )
    answer_choice: Literal["first", "random"] = field(
        default="random",
        metadata={"help": "Train on the first gold answer, or a random one each time."},
    )
    instruction: str = field(
        default="Answer briefly.",
        metadata={"help": "Text before the page(s) in each question's (a conversation's first) user turn."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "Optional system turn put first in every sample, in training and inference."}
    )
    data_files: dict | str | None = field(
        default=None,
        metadata={
            "help": "Tables in dataset_name's folder to read: a file (the train split) or {split: file}; "
            "image paths are relative to each table's folder."
        },
    )
    json_field: str | None = field(
        default=None,
        metadata={"help": "The key of a JSON document's list of rows (data, in DocVQA's official json)."},
    )
    field_questions: dict | str | None = field(
        default=None,
        metadata={
            "help": "Key-value rows: {column: question}, each non-empty field a sample answered by its value; a "
            "question may name {field} and any {column}: 'What is the {field} of {vendor}?'."
        },
    )
    qa_pairs_column: str | None = field(
        default=None,
        metadata={"help": "A column of {question, answers} pairs a page, each pair a sample."},
    )
    qa_question_key: str = field(default="question", metadata={"help": "The question key of qa_pairs_column's pairs."})
    qa_answers_key: str | None = field(
        default=None,
        metadata={"help": "The answer key of qa_pairs_column's pairs (null: answers, else answer)."},
    )
    messages_column: str | None = field(
        default=None,
        metadata={
            "help": "A column of chat conversations ([{role, content}], one {type: image} part a page of "
            "image_column): every assistant turn is trained, the last one evaluated."
        },
    )
    group_column: str | None = field(
        default=None, metadata={"help": "Optional column (e.g. question type) to break evaluation scores down by."}
    )
    eval_split_size: float | None = field(
        default=None,
        metadata={
            "help": "No dataset_test_split: hold this many pages out, a fraction (0.1) or a count (200), "
            "with all their questions (eval_split_seed); none of them is trained on."
        },
    )
    eval_split_seed: int = field(default=42, metadata={"help": "Seed of the eval_split_size draw (reproducible)."})
    eval_split_by: str | None = field(
        default=None,
        metadata={"help": "A column (a document id) whose rows eval_split_size holds out together."},
    )
    on_bad_example: Literal["skip", "error"] = field(
        default="skip",
        metadata={
            "help": "A row that cannot be used (undecodable page, empty question or answer, too "
            "long): skip it, counted in data_report.json, or stop before training."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation rows."})

    def __post_init__(self):
        if isinstance(self.field_questions, str):  # from the command line, as JSON
            try:
                self.field_questions = json.loads(self.field_questions)
            except json.JSONDecodeError:
                raise ValueError(
                    "field_questions must map columns to questions, e.g. --field_questions "
                    '\'{"total": "What is the total amount?"}\''
                ) from None
        if self.field_questions is not None:
            if not isinstance(self.field_questions, dict) or not self.field_questions:
                raise ValueError("field_questions must map at least one column to its question.")
            for column, question in self.field_questions.items():
                if not isinstance(question, str) or not question.strip():
                    raise ValueError(f"field_questions: the question for '{column}' is empty or not text.")
                check_question_template(column, question)
        if isinstance(self.data_files, str) and self.data_files.lstrip().startswith("{"):  # from the command line
            try:
                self.data_files = json.loads(self.data_files)
            except json.JSONDecodeError:
                raise ValueError(
                    'data_files must be a file name or {split: file}, e.g. --data_files \'{"train": "labels.csv"}\''
                ) from None
        if self.eval_split_by and self.eval_split_size is None:
            raise ValueError(
                "eval_split_by is set, but eval_split_size is not: eval_split_by says which rows eval_split_size "
                "holds out together. Set eval_split_size (e.g. 0.1), or remove eval_split_by."
            )
        shapes = [name for name in ("field_questions", "qa_pairs_column", "messages_column") if getattr(self, name)]
        if len(shapes) > 1:
            raise ValueError(f"Set one of {' and '.join(shapes)}: they describe different rows.")


def check_question_template(column: str, question: str) -> None:
    """A field_questions question may name {field} and {column}s; anything else str.format would read is refused."""
    import string

    try:
        parsed = list(string.Formatter().parse(question))
    except ValueError as error:
        raise ValueError(
            f"field_questions: the question for '{column}' ({question!r}) has an unmatched brace ({error}); write "
            "{{ and }} for literal braces."
        ) from None
    for _, name, spec, conversion in parsed:
        if name is not None and (not name.strip() or spec or conversion or "[" in name):
            raise ValueError(
                f"field_questions: the question for '{column}' ({question!r}) has a placeholder {{{name}}} that names "
                "no column: use {field} or {<column>}, nothing else inside the braces."
            )
