"""Rows of several questions, conversations and mixed-type cells become docvlm's rows by YAML alone
(docvlm.data.layouts, docvlm.data.text), and every question made or dropped is counted."""

import json

import pytest
from datasets import Dataset
from PIL import Image

from docvlm.data import DataReport, load_splits
from docvlm.data.text import decode_json_text
from docvlm.errors import UserError
from docvlm.recipe.schema import DataArguments


def page(path, shade=0):
    Image.new("RGB", (40, 30), (shade, 0, 0)).save(path)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def trained_labels(processor, rows) -> list[str]:
    from docvlm.training.collator import DocVQACollator

    batch = DocVQACollator(processor, "Answer briefly.", None, "first")([rows[i] for i in range(len(rows))])
    return [processor.tokenizer.decode(labels[labels != -100]) for labels in batch["labels"]]


def test_parallel_lists_of_questions_and_answers_become_one_row_per_question(tmp_path):
    page(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "questions": ["Total?", "Date?"], "answers": [["$5", "5"], ["3 JAN"]]},
        {"image": "a.png", "questions": ["Who?"], "answers": [["Ines"], ["extra"]]},  # two answers for one question
        {"image": "a.png", "questions": ["No.?"], "answers": [["A-19"]]},
    ]
    report = DataReport("lists")
    data = DataArguments(dataset_name=str(jsonl(tmp_path / "t.jsonl", rows)), question_column="questions")
    train, _ = load_splits(data, need_eval=False, report=report)
    assert list(train["question"]) == ["Total?", "Date?", "No.?"] and list(train["row"]) == [0, 0, 2]
    assert list(train["answers"]) == [["$5", "5"], ["3 JAN"], ["A-19"]]
    assert [(s["row"], s["reason"]) for s in report.skipped] == [(1, "questions and answers differ in number")]
    data.on_bad_example = "error"
    with pytest.raises(UserError, match=r"row 1: 1 question\(s\) in 'questions', 2 in 'answers'"):
        load_splits(data, need_eval=False)


def test_question_answer_pairs_with_their_own_key_names(tmp_path):
    page(tmp_path / "a.png")
    rows = [{"image": "a.png", "qa": [{"q": "Total?", "a": "12"}, {"q": "Tax?", "a": ["1", "1.0"]}]}]
    path = jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(
        UserError, match=r"must be \{question, answers or answer\}.*keys: \['a', 'q'\].*qa_question_key"
    ):
        load_splits(DataArguments(dataset_name=str(path), qa_pairs_column="qa"), need_eval=False)
    data = DataArguments(dataset_name=str(path), qa_pairs_column="qa", qa_question_key="q", qa_answers_key="a")
    train, _ = load_splits(data, need_eval=False)
    assert list(train["question"]) == ["Total?", "Tax?"] and list(train["answers"]) == [["12"], ["1", "1.0"]]


def test_conversations_in_trls_string_form_beside_part_lists_keep_their_text(tmp_path, processor):
    """datasets stores this mixed content column as JSON and decoded the answer "9.00" as the number 9.0, which
    was refused ('content must be text or a list of parts')."""
    page(tmp_path / "a.png")
    rows = [
        {
            "images": ["a.png"],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Total?"}]},
                {"role": "assistant", "content": "9.00"},
                {"role": "user", "content": "Paid?"},
                {"role": "assistant", "content": "true"},
            ],
        },
        {
            "images": ["a.png"],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count?"}]},
                {"role": "assistant", "content": 12},
            ],
        },
    ]
    report = DataReport("chat")
    data = DataArguments(
        dataset_name=str(jsonl(tmp_path / "c.jsonl", rows)), image_column="images", messages_column="messages"
    )
    train, _ = load_splits(data, need_eval=False, report=report)
    assert list(train["answers"]) == [["true"], ["12"]]
    assert trained_labels(processor, train) == ["9.00<end_of_utterance> true<end_of_utterance>", "12<end_of_utterance>"]
    assert report.converted["messages (messages_column)"] >= 1  # the number 12 at least


def test_a_bad_turn_names_what_it_holds():
    from docvlm.conversations import normalize_messages

    with pytest.raises(UserError, match=r"turn 1 content must be text or a list of parts, got dict"):
        normalize_messages([{"role": "user", "content": "Q?"}, {"role": "assistant", "content": {"x": 1}}], "Row 3")


def test_numbers_and_booleans_in_text_columns_are_converted_and_counted(tmp_path):
    """A jsonl answers column mixing lists, numbers and text was refused with datasets' List(Json(decode=True))."""
    page(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "q": "Total?", "a": ["9.00", 9]},
        {"image": "a.png", "q": "Count?", "a": 7},
        {"image": "a.png", "q": "Paid?", "a": True},
        {"image": "a.png", "q": 2026, "a": "year"},
    ]
    report = DataReport("mixed")
    data = DataArguments(dataset_name=str(jsonl(tmp_path / "m.jsonl", rows)), question_column="q", answers_column="a")
    train, _ = load_splits(data, need_eval=False, report=report)
    assert list(train["answers"]) == [["9.00", "9"], ["7"], ["true"], ["year"]]
    assert list(train["question"]) == ["Total?", "Count?", "Paid?", "2026"]
    assert report.converted == {"a (answers_column)": 3, "q (question_column)": 1}


def test_a_stored_json_scalar_is_kept_as_the_text_it_was():
    assert decode_json_text("9.00") == "9.00" and decode_json_text("true") == "true"
    assert decode_json_text('"Q?"') == "Q?" and decode_json_text('["9.00", 9]') == ["9.00", 9]
    assert decode_json_text("null") is None


def receipts(tmp_path):
    rows = [
        {"image": Image.new("RGB", (40, 30), (i, 0, 0)), "vendor": v, "total": t, "tax_amount": x}
        for i, (v, t, x) in enumerate([("ACME", "12.50", "1.05"), ("Bolt", "", ""), ("", "7.00", "0.70")])
    ]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    return str(tmp_path / "r.parquet")


def test_field_questions_fill_in_the_field_and_other_columns(tmp_path):
    report = DataReport("receipts")
    questions = {"total": "What is the {field} of {vendor}?", "tax_amount": "What is the {field}?"}
    data = DataArguments(dataset_name=receipts(tmp_path), field_questions=questions)
    train, _ = load_splits(data, need_eval=False, report=report)
    assert list(train["question"]) == [
        "What is the total of ACME?",
        "What is the tax amount?",
        "What is the tax amount?",
    ]
    assert list(train["row"]) == [0, 0, 2]
    skipped = {(s["row"], s["field"], s["reason"]) for s in report.skipped}
    assert skipped == {  # receipt 1 has no field left, and still counts as read
        (1, "total", "empty field"),
        (1, "tax_amount", "empty field"),
        (2, "total", "empty column in the question"),
    }
    assert report.splits["train"] == {"rows": 3, "questions": 3}


def test_a_field_question_naming_no_column_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(UserError, match=r"Column 'shop' \(field_questions\) not found.*names \{shop\}"):
        load_splits(
            DataArguments(dataset_name=receipts(tmp_path), field_questions={"total": "Total at {shop}?"}),
            need_eval=False,
        )
    for bad in ("Total {}?", "Total {vendor!r}?", "Total {vendor:>9}?", "Total {vendor"):
        with pytest.raises(ValueError, match="field_questions: the question for 'total'"):
            DataArguments(dataset_name="x", field_questions={"total": bad})
