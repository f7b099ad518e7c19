"""eval_split_size holds whole pages (and documents) out: no held-out page is ever trained on (docvlm.data.splits)."""

import hashlib
import json

import pytest
from datasets import Dataset
from PIL import Image

from docvlm.data import DataReport, load_splits
from docvlm.data.splits import document_units
from docvlm.errors import UserError
from docvlm.recipe.schema import DataArguments


def scan(i: int, size=(40, 30)) -> Image.Image:
    """A page of its own: no two values of i give the same pixels."""
    return Image.new("RGB", size, (i % 256, (i // 256) % 256, 7))


def pixels(image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def scans_with_metadata(folder, pages: int, questions: int, rename_every: int | None = None):
    """A folder of `pages` scans with a metadata.csv of `questions` lines per page (the layout
    docs/new_dataset.md asks for); with rename_every, every such page is also saved under a second name, as a
    copy a user keeps, and its questions are split between the two names."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["file_name,question,answer"]
    for page in range(pages):
        scan(page).save(folder / f"scan-{page:02d}.png")
        names = [f"scan-{page:02d}.png"]
        if rename_every and page % rename_every == 0:
            scan(page).save(folder / f"copy-of-{page:02d}.png")
            names.append(f"copy-of-{page:02d}.png")
        for q in range(questions):
            lines.append(f"{names[q % len(names)]},Question {q} about page {page}?,answer {page}.{q}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def data_args(folder, **overrides) -> DataArguments:
    return DataArguments(dataset_name=str(folder), question_column="question", answers_column="answer", **overrides)


def test_twenty_pages_of_four_questions_hold_out_four_whole_pages(tmp_path, capsys):
    folder = scans_with_metadata(tmp_path / "scans", pages=20, questions=4)
    report = DataReport(str(folder))
    train, held_out = load_splits(data_args(folder, eval_split_size=0.2), report=report)
    held_pages = {pixels(image) for image in held_out["image"]}
    train_pages = {pixels(image) for image in train["image"]}
    assert len(held_pages) == 4 and len(held_out) == 16 and len(train) == 64
    assert not held_pages & train_pages  # not one held-out page has a question in training
    assert "Held out 4 of 20 pages (16 questions)" in capsys.readouterr().err
    listed = report.held_out.as_json()["held_out_pages"]
    assert sorted(listed) == sorted({f"scan-{row // 4:02d}.png" for row in held_out["row"]})  # named by file


def test_a_page_saved_under_two_names_is_held_out_under_both(tmp_path):
    folder = scans_with_metadata(tmp_path / "scans", pages=12, questions=4, rename_every=3)
    for seed in range(6):  # whichever pages the draw takes
        train, held_out = load_splits(data_args(folder, eval_split_size=0.25, eval_split_seed=seed))
        assert not {pixels(i) for i in held_out["image"]} & {pixels(i) for i in train["image"]}
        assert len(held_out) == 12  # 3 of 12 pages, 4 questions each, whichever name they were asked under


def test_documents_that_share_a_page_and_rows_that_share_an_id_stay_together():
    # rows 0 and 1 share page B; rows 2 and 3 share nothing but their document id; row 4 is alone
    pages = [["A", "B"], ["B", "C"], ["D"], ["E"], ["F"]]
    assert document_units(pages) == [0, 0, 1, 2, 3]
    assert document_units(pages, keys=[None, None, "doc-7", "doc-7", ""]) == [0, 0, 1, 1, 2]


def test_eval_split_by_holds_out_every_page_of_a_document(tmp_path, capsys):
    rows = [{"image": scan(i), "q": f"q{i}", "a": f"a{i}", "doc": f"doc-{i // 3}"} for i in range(30)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "docs.parquet"))
    data = DataArguments(
        dataset_name=str(tmp_path / "docs.parquet"),
        question_column="q",
        answers_column="a",
        eval_split_size=2,
        eval_split_by="doc",
    )
    train, held_out = load_splits(data)
    assert len(held_out) == 6 and len(set(held_out["split_key"])) == 2  # two documents of three pages
    assert not set(held_out["split_key"]) & set(train["split_key"])
    assert "Held out 2 of 10 documents (6 pages, 6 questions)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval_split_by is set, but eval_split_size is not"):
        DataArguments(dataset_name="x", eval_split_by="doc")


def test_the_same_seed_holds_out_the_same_pages_and_another_seed_others(tmp_path):
    folder = scans_with_metadata(tmp_path / "scans", pages=20, questions=2)
    first = list(load_splits(data_args(folder, eval_split_size=0.2))[1]["row"])
    again = list(load_splits(data_args(folder, eval_split_size=0.2))[1]["row"])
    other = list(load_splits(data_args(folder, eval_split_size=0.2, eval_split_seed=7))[1]["row"])
    assert first == again and first != other


def test_a_split_that_would_leave_no_training_page_is_refused(tmp_path):
    folder = scans_with_metadata(tmp_path / "scans", pages=3, questions=5)
    for size in (3, 0.99, 5):
        with pytest.raises(UserError, match=r"cannot hold pages out of the 3 pages .* leave some to train on"):
            load_splits(data_args(folder, eval_split_size=size))
    one_page = tmp_path / "one"
    one_page.mkdir()
    scan(0).save(one_page / "a.png")
    (one_page / "metadata.csv").write_text("file_name,question,answer\na.png,Q1?,x\na.png,Q2?,y\n")
    with pytest.raises(UserError, match="of the 1 pages"):
        load_splits(data_args(one_page, eval_split_size=0.5))


def test_the_held_out_pages_are_listed_in_the_data_report(tmp_path):
    folder = scans_with_metadata(tmp_path / "scans", pages=10, questions=3)
    report = DataReport(str(folder))
    load_splits(data_args(folder, eval_split_size=0.3), report=report)
    written = json.loads(report.write(tmp_path / "run").read_text())
    held = written["held_out"]
    assert held["unit"] == "pages" and held["units"] == 10 and held["held_out_units"] == 3
    assert held["held_out_questions"] == 9 and held["train_questions"] == 21 and len(held["held_out_pages"]) == 3
    assert written["splits"]["train"] == {"rows": 30, "questions": 30}
