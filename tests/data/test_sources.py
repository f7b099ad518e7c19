"""Datasets in the layouts users keep them in, read by YAML alone (docvlm.data.sources): csv and tsv tables of image
paths, any table in a folder, image folders' metadata tables read as text, and DocVQA's official json."""

import json

import pytest
from PIL import Image

from docvlm.data import load_splits
from docvlm.errors import UserError
from docvlm.recipe.schema import DataArguments


def page(path, shade=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (shade, 0, 0)).save(path)


def args(name, **overrides) -> DataArguments:
    return DataArguments(dataset_name=str(name), **overrides)


def test_a_csv_of_relative_image_paths_loads_with_every_answer_as_written(tmp_path):
    """The installed datasets reads csv text as large_string, which was refused as 'not images or image paths'; and
    a number-like answer is text, never 7.0."""
    for i in range(3):
        page(tmp_path / "scans" / f"{i}.png", i)
    (tmp_path / "labels.csv").write_text(
        "file,question,answer\nscans/0.png,Invoice number?,007\nscans/1.png,Total?,9.00\nscans/2.png,Paid?,NA\n"
    )
    train, _ = load_splits(
        args(tmp_path / "labels.csv", image_column="file", question_column="question", answers_column="answer"),
        need_eval=False,
    )
    assert list(train["answers"]) == ["007", "9.00", "NA"]
    assert [image.getpixel((0, 0)) for image in train["image"]] == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]


def test_a_tsv_reads_like_a_csv(tmp_path):
    page(tmp_path / "a.png")
    (tmp_path / "rows.tsv").write_text("image\tquestion\tanswer\na.png\tWho, exactly?\t1,204.50\n")
    train, _ = load_splits(args(tmp_path / "rows.tsv", question_column="question", answers_column="answer"), False)
    assert train[0]["question"] == "Who, exactly?" and train[0]["answers"] == "1,204.50"


def test_an_image_folders_metadata_csv_is_read_as_text(tmp_path):
    """datasets' image-folder reader parses metadata.csv's '007' as the number 7.0 and '9.00' as 9.0."""
    for i in range(2):
        page(tmp_path / f"s{i}.png", i)
    (tmp_path / "metadata.csv").write_text("file_name,question,answer\ns0.png,No.?,007\ns1.png,Total?,9.00\n")
    train, _ = load_splits(args(tmp_path, question_column="question", answers_column="answer"), need_eval=False)
    assert list(train["answers"]) == ["007", "9.00"] and train[1]["image"].getpixel((0, 0)) == (1, 0, 0)


def test_a_folder_whose_table_is_not_named_metadata_says_so_or_reads_it_by_data_files(tmp_path):
    for i in range(3):
        page(tmp_path / f"s{i}.png", i)
    (tmp_path / "labels.csv").write_text("file_name,question,answer\ns0.png,Q?,a\ns2.png,R?,b\n")
    data = args(tmp_path, question_column="question", answers_column="answer", image_column="file_name")
    with pytest.raises(UserError, match=r"holds page images and labels.csv.*ignored.*data_files: labels.csv"):
        load_splits(data, need_eval=False)
    data.data_files = "labels.csv"
    train, _ = load_splits(data, need_eval=False)
    assert list(train["question"]) == ["Q?", "R?"] and train[1]["image"].getpixel((0, 0)) == (2, 0, 0)


def test_data_files_name_each_split_and_a_missing_one_lists_the_tables(tmp_path):
    for split in ("train", "val"):
        page(tmp_path / split / "p.png", 3)
        (tmp_path / split / f"{split}.jsonl").write_text(json.dumps({"image": "p.png", "q": split, "a": "x"}) + "\n")
    data = args(
        tmp_path,
        question_column="q",
        answers_column="a",
        data_files={"train": "train/train.jsonl", "test": "val/val.jsonl"},
    )
    train, test = load_splits(data)
    assert train[0]["question"] == "train" and test[0]["question"] == "val"  # paths relative to each table
    data.data_files = {"train": "train/nope.jsonl"}
    with pytest.raises(UserError, match=r"data_files: .*nope.jsonl \(split 'train'\) not found"):
        load_splits(data, need_eval=False)


def docvqa_json(folder, records: int = 4):
    """DocVQA's official layout: train_v1.0.json with its records under "data", pages in documents/."""
    data = []
    for i in range(records):
        page(folder / "documents" / f"doc{i}.png", i)
        data.append(
            {
                "questionId": 100 + i,
                "question": f"What is item {i}?",
                "question_types": ["form"],
                "image": f"documents/doc{i}.png",
                "docId": 7 + i // 2,
                "ucsf_document_id": "txpp0227",
                "ucsf_document_page_no": str(i),
                "answers": [f"item {i}", f"Item {i}"],
                "data_split": "train",
            }
        )
    path = folder / "train_v1.0.json"
    path.write_text(
        json.dumps(
            {"dataset_name": "docvqa", "dataset_version": "1.0", "dataset_split": "train", "data": data}, indent=1
        )
    )
    return path


def test_the_official_docvqa_json_reads_by_naming_its_records(tmp_path):
    path = docvqa_json(tmp_path)
    data = args(path, question_column="question", answers_column="answers")
    with pytest.raises(UserError, match=r"one JSON document whose rows are the list under 'data'.*json_field: data"):
        load_splits(data, need_eval=False)
    data.json_field = "data"
    train, _ = load_splits(data, need_eval=False)
    assert len(train) == 4 and train[2]["answers"] == ["item 2", "Item 2"]
    assert train[3]["image"].getpixel((0, 0)) == (3, 0, 0)
    data.json_field = "records"
    with pytest.raises(UserError, match=r"json_field is 'records'.*Its records are under 'data'"):
        load_splits(data, need_eval=False)
