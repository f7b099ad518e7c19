"""Every row is checked before the model loads (docvlm.data.checks): each kind of bad row is skipped and counted, or
stops the run with the dataset, split, row and field named (on_bad_example: error); pages in unusual modes train.
"""

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from docvlm import pages
from docvlm.conversations import as_answers
from docvlm.data import DataReport, checks, load_splits, role_columns
from docvlm.data.checks import screen
from docvlm.errors import UserError
from docvlm.recipe.schema import DataArguments
from docvlm.training.collator import DocVQACollator


def png(mode="RGB", size=(60, 40), color="white") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "gray").save(buffer, format="JPEG")
    return buffer.getvalue()


def folder_with(tmp_path, cases: dict[str, tuple]) -> tuple[DataArguments, list[str]]:
    """A jsonl of one row per case (image file bytes or a path, question, answers) and the case names in order."""
    names, lines = [], []
    for name, (image, question, answers) in cases.items():
        if isinstance(image, bytes):
            path = tmp_path / f"{name}.img"
            path.write_bytes(image)
            image = path.name
        names.append(name)
        lines.append(json.dumps({"file": image, "q": question, "a": answers}))
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    data = DataArguments(
        dataset_name=str(tmp_path / "rows.jsonl"), image_column="file", question_column="q", answers_column="a"
    )
    return data, names


GOOD = (png(), "What is the total?", ["12"])
# case name -> (image, question, answers, field the problem names, words of the message)
BAD = {
    "truncated_png": (png()[:60], "Q?", ["a"], "file", "cannot be decoded"),
    "truncated_jpeg": (jpeg_bytes()[:200], "Q?", ["a"], "file", "cannot be decoded"),
    "zero_bytes": (b"", "Q?", ["a"], "file", r"empty \(0 bytes\)"),
    "random_bytes": (bytes(range(256)) * 8, "Q?", ["a"], "file", "cannot be decoded"),
    "text_as_png": (b"this is not an image\n" * 20, "Q?", ["a"], "file", "cannot be decoded"),
    "missing_file": ("nope.png", "Q?", ["a"], "file", "'.*nope.png' not found"),
    "one_pixel": (png(size=(1, 1)), "Q?", ["a"], "file", "1x1 pixels, below 8"),
    "strip": (png(size=(2000, 20)), "Q?", ["a"], "file", "2000x20 pixels, more than 30:1"),
    "empty_question": (png(), "", ["a"], "q", "the question is empty"),
    "blank_question": (png(), "   \t", ["a"], "q", "the question is empty"),
    "null_question": (png(), None, ["a"], "q", "no question"),
    "empty_answer_list": (png(), "Q?", [], "a", "no non-empty answer"),
    "blank_answers": (png(), "Q?", ["", "  "], "a", "no non-empty answer"),
    "null_answers": (png(), "Q?", None, "a", "no non-empty answer"),
}


# case name -> the reason data_report.json groups it under
REASONS = {
    **dict.fromkeys(["truncated_png", "truncated_jpeg", "random_bytes", "text_as_png"], pages.IMAGE_UNREADABLE),
    **dict.fromkeys(["zero_bytes", "missing_file"], pages.IMAGE_MISSING),
    **dict.fromkeys(["one_pixel", "strip"], pages.IMAGE_SHAPE),
    **dict.fromkeys(["empty_question", "blank_question", "null_question"], checks.NO_QUESTION),
    **dict.fromkeys(["empty_answer_list", "blank_answers", "null_answers"], checks.NO_ANSWER),
}


@pytest.fixture(scope="module")
def screened(tmp_path_factory, processor):
    tmp_path = tmp_path_factory.mktemp("bad-rows")
    cases = {"good_0": GOOD, **{name: case[:3] for name, case in BAD.items()}, "good_1": GOOD}
    data, names = folder_with(tmp_path, cases)
    train, _ = load_splits(data, need_eval=False)
    collator = DocVQACollator(processor, "Answer briefly.", 512, "first")
    kept, problems = screen(train, collator, role_columns(data), "train", data.dataset_name)
    return data, names, train, kept, problems, collator


def test_each_bad_row_is_skipped_and_named_with_its_field_and_what_is_wrong(screened):
    data, names, train, kept, problems, _ = screened
    by_row = {problem["row"]: problem for problem in problems}
    for name, (_, _, _, field, words) in BAD.items():
        problem = by_row.get(names.index(name))
        assert problem is not None, f"{name} was not found"
        assert problem["field"].startswith(f"{field} (") and problem["split"] == "train", (name, problem)
        assert re.search(words, problem["problem"]), (name, problem["problem"])
    assert list(kept["row"]) == [0, len(names) - 1]  # the two good rows, nothing else
    assert len(problems) == len(BAD)


def test_the_skips_are_printed_counted_and_grouped_by_reason_for_the_reports(screened, capsys, processor):
    data, names, train, _, problems, collator = screened
    report = DataReport(data.dataset_name)
    from types import SimpleNamespace

    from docvlm.prepare import screen_split

    recipe = SimpleNamespace(data=data, training=SimpleNamespace(max_length=512))
    kept, _ = screen_split(train, processor, recipe, "train", report)  # again: from the cache
    assert f"checked before, {len(BAD)} bad row(s) (cached in" in capsys.readouterr().err
    grouped = report.by_reason()
    assert {reason: entry["count"] for reason, entry in grouped.items()} == {
        reason: list(REASONS.values()).count(reason) for reason in set(REASONS.values())
    }
    for name, reason in REASONS.items():
        assert names.index(name) in [row["row"] for row in grouped[reason]["rows"]], (name, reason)
    assert report.splits["train"]["used"] == len(kept) == 2
    assert report.counts()["skipped"]["count"] == len(BAD)


def test_on_bad_example_error_stops_with_the_list(screened):
    data, _, train, _, _, collator = screened
    with pytest.raises(UserError, match=rf"{len(BAD)} of the {len(BAD) + 2} rows of split 'train' cannot be used"):
        screen(train, collator, role_columns(data), "train", data.dataset_name, policy="error")
    with pytest.raises(UserError, match=r"rows.jsonl, split 'train', row 1, file \(image_column\): image cannot"):
        screen(train, collator, role_columns(data), "train", data.dataset_name, policy="error")


def test_a_large_split_is_checked_in_threads_and_never_forks(tmp_path, processor, monkeypatch):
    """From 512 rows on the check runs in several threads, and finds each bad row at its place. It never forks: by
    then a GPU run holds a CUDA context, and processes forked from it stalled (a 1,000-row split on an H200)."""
    import os
    import threading

    import docvlm.data.checks as screen_module

    bad_at = {3: BAD["truncated_png"], 300: BAD["empty_question"], 599: BAD["one_pixel"]}
    cases = {f"row_{i}": bad_at[i][:3] if i in bad_at else GOOD for i in range(600)}
    data, _ = folder_with(tmp_path, cases)
    train, _ = load_splits(data, need_eval=False)
    collator = DocVQACollator(processor, "Answer briefly.", 512, "first")

    def no_fork(*args, **kwargs):
        raise AssertionError("the row check forked a process")

    monkeypatch.setattr(os, "fork", no_fork)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # several threads even on a 2-core machine
    threads = set()
    check_batch = screen_module._check_batch

    def recording(batch, checker, columns):
        threads.add((threading.current_thread().name, id(checker)))
        return check_batch(batch, checker, columns)

    monkeypatch.setattr(screen_module, "_check_batch", recording)
    monkeypatch.setattr(screen_module, "_cache_file", lambda *args: None)  # checked here, not read from a cache
    kept, problems = screen(train, collator, role_columns(data), "train", data.dataset_name)
    assert [(p["row"], p["field"].split()[0]) for p in problems] == [(3, "file"), (300, "q"), (599, "file")]
    assert len(kept) == 597
    names = {name for name, _ in threads}
    assert len(names) > 1 and all(name.startswith("check-rows") for name in names)
    checkers = {checker for _, checker in threads}
    assert len(checkers) == len(names) and id(collator) not in checkers  # each thread its own copy


def test_a_sample_longer_than_max_length_is_skipped_whole_with_its_length(tmp_path, processor):
    data, _ = folder_with(tmp_path, {"short": GOOD, "long": (png(), "Q? " + "word " * 400, ["a"])})
    train, _ = load_splits(data, need_eval=False)
    collator = DocVQACollator(processor, "Answer briefly.", 128, "first")
    kept, problems = screen(train, collator, role_columns(data), "train", data.dataset_name)
    assert list(kept["row"]) == [0] and problems[0]["row"] == 1
    assert re.search(r"\d+ tokens \(image tokens included\), over max_length=128", problems[0]["problem"])


def test_a_decompression_bomb_is_skipped_not_decoded(tmp_path, processor, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 60x40 page is then above the guard
    data, _ = folder_with(tmp_path, {"bomb": GOOD, "fine": (png(size=(20, 20)), "Q?", ["a"])})
    train, _ = load_splits(data, need_eval=False)
    collator = DocVQACollator(processor, "Answer briefly.", 512, "first")
    kept, problems = screen(train, collator, role_columns(data), "train", data.dataset_name)
    assert [p["row"] for p in problems] == [0] and "too large to decode safely" in problems[0]["problem"]
    assert list(kept["row"]) == [1]


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "RGBA", "I;16", "L", "1"])
def test_pages_in_every_mode_are_kept_and_converted(tmp_path, processor, mode):
    if mode == "I;16":
        image = Image.fromarray(np.full((40, 60), 30000, dtype=np.uint16))
    else:
        image = Image.new(mode, (60, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
    data, _ = folder_with(tmp_path, {"page": (buffer.getvalue(), "Q?", ["a"])})
    train, _ = load_splits(data, need_eval=False)
    collator = DocVQACollator(processor, "Answer briefly.", 512, "first")
    kept, problems = screen(train, collator, role_columns(data), "train", data.dataset_name)
    assert problems == [] and len(kept) == 1


def test_numbers_are_answers_converted_to_text(tmp_path, processor):
    assert as_answers(42) == ["42"] and as_answers([3.5, "x", None, True, ""]) == ["3.5", "x"]
    assert as_answers([1234567.0, 0.1]) == ["1234567", "0.1"]  # whole, never in exponent notation
    rows = []
    for name, answers in (("int", [42, 3]), ("list", [[7, 8], [9]])):  # a column of numbers, of lists of numbers
        folder = tmp_path / name
        folder.mkdir()
        data, _ = folder_with(folder, {f"r{i}": (png(), "Q?", value) for i, value in enumerate(answers)})
        rows.append(load_splits(data, need_eval=False)[0][0])
    batch = DocVQACollator(processor, "Answer briefly.", 512, "first")(rows)
    labels = [processor.tokenizer.decode(row[row != -100]) for row in batch["labels"]]
    assert labels == ["42<end_of_utterance>", "7<end_of_utterance>"]


def test_only_the_bad_question_of_a_page_is_skipped(tmp_path, processor):
    """Rows expanded from one page (field_questions) share the page's row number: a skip drops one question."""
    from datasets import Dataset

    page = Image.new("RGB", (60, 40), "white")
    Dataset.from_list([{"image": page, "total": "5", "date": "x" * 3000}]).to_parquet(str(tmp_path / "r.parquet"))
    data = DataArguments(dataset_name=str(tmp_path / "r.parquet"), field_questions={"total": "Total?", "date": "Date?"})
    train, _ = load_splits(data, need_eval=False)
    collator = DocVQACollator(processor, "Answer briefly.", 512, "first")
    kept, problems = screen(train, collator, role_columns(data), "train", data.dataset_name)
    assert list(kept["question"]) == ["Total?"] and len(problems) == 1 and problems[0]["row"] == 0


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("rows.jsonl", b'{"q": "a"}\n{"q": "b",\n', r"rows.jsonl, line 2: not valid JSON"),
        ("rows.jsonl", b'{"q": "a"}\n{"q": "caf\xe9"}\n', r"rows.jsonl, line 2: not valid UTF-8 \(byte 11"),
        ("rows.csv", b"file,q,a\np.png,caf\xe9,1\n", r"rows.csv, line 2: not valid UTF-8"),
        ("rows.json", b'{"q": "a"}\n{"q"\n', r"rows.json, line 2: not valid JSON"),
    ],
)
def test_a_malformed_data_file_names_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_splits(DataArguments(dataset_name=str(tmp_path / name)), need_eval=False)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / f"train{Path(name).suffix}").write_bytes(content)  # in a folder of split files too
    with pytest.raises(UserError, match=message.replace("rows", "train")):
        load_splits(DataArguments(dataset_name=str(folder)), need_eval=False)


def test_a_json_document_is_left_to_the_parser(tmp_path):
    from docvlm.data import check_text_file

    (tmp_path / "doc.json").write_text('[\n  {"q": "a"}\n]\n')
    check_text_file(tmp_path / "doc.json")  # not JSON lines: no complaint


def test_a_dataloader_workers_error_is_shown_as_its_own_message():
    from docvlm.train import worker_free

    wrapped = (
        "Caught UserError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 3, in f\n    raise UserError(...)\n'
        "docvlm.errors.UserError: Row 7: the question is empty.\n"
    )
    assert worker_free(wrapped) == "Row 7: the question is empty."
    assert worker_free("plain message") == "plain message"


def test_a_page_changed_after_a_check_is_checked_again(tmp_path, processor, capsys):
    """The check's cache was keyed on the dataset's fingerprint only: a page truncated after a clean check was
    'checked before, 0 bad row(s)', then crashed training."""
    data, names = folder_with(tmp_path, {"good_0": GOOD, "good_1": GOOD})
    collator = DocVQACollator(processor, "Answer briefly.", 512, "first")
    train, _ = load_splits(data, need_eval=False)
    assert screen(train, collator, role_columns(data), "train", data.dataset_name)[1] == []
    page = tmp_path / "good_1.img"
    page.write_bytes(page.read_bytes()[:60])  # truncated after the check
    capsys.readouterr()
    train, _ = load_splits(data, need_eval=False)
    kept, problems = screen(train, collator, role_columns(data), "train", data.dataset_name)
    assert "checked before" not in capsys.readouterr().err
    assert [p["row"] for p in problems] == [1] and "cannot be decoded" in problems[0]["problem"] and len(kept) == 1
