import json

import pytest
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from docvlm.config import DataArguments, UserError
from docvlm.data import CANONICAL, column_names, load_splits


def args(name, **overrides):
    return DataArguments(dataset_name=str(name), **overrides)


def docvqa_like(n=4):
    rows = [
        {
            "id": str(i),
            "image": PILImage.new("L", (40, 50), 255),
            "query": {"en": f"q{i}", "de": f"f{i}"},
            "answers": [f"a{i}", f"b{i}"],
        }
        for i in range(n)
    ]
    features = Features(
        {
            "id": Value("string"),
            "image": Image(),
            "query": {"en": Value("string"), "de": Value("string")},
            "answers": List(Value("string")),
        }
    )
    return Dataset.from_list(rows, features=features)


@pytest.fixture
def parquet_dir(tmp_path):
    docvqa_like(6).to_parquet(str(tmp_path / "train.parquet"))
    docvqa_like(3).to_parquet(str(tmp_path / "test.parquet"))
    return tmp_path


def test_dotted_column_mapping_on_a_parquet_folder(parquet_dir):
    train, test = load_splits(args(parquet_dir))
    assert set(train.column_names) == set(CANONICAL) and len(train) == 6 and len(test) == 3
    row = train[2]
    assert row["question"] == "q2" and row["answers"] == ["a2", "b2"] and row["row"] == 2
    assert isinstance(row["image"], PILImage.Image)


def test_max_samples(parquet_dir):
    train, test = load_splits(args(parquet_dir, max_train_samples=2, max_eval_samples=1))
    assert (len(train), len(test)) == (2, 1)


def test_missing_column_names_it_and_lists_the_present_ones(parquet_dir):
    with pytest.raises(UserError) as err:
        load_splits(args(parquet_dir, question_column="query.fr"))
    message = str(err.value)
    assert "'query.fr'" in message and "question_column" in message
    assert "query.en" in message and "answers" in message and "image" in message


def test_missing_split(parquet_dir):
    with pytest.raises(UserError, match="Split 'validation'.*'train', 'test'|Split 'validation'.*\\['t"):
        load_splits(args(parquet_dir, dataset_test_split="validation"))
    train, test = load_splits(args(parquet_dir, dataset_test_split="validation"), need_eval=False)
    assert test is None and len(train) == 6


def test_null_answers_are_rejected_up_front(tmp_path):
    ds = docvqa_like(3).map(lambda r, i: {"answers": None if i == 1 else r["answers"]}, with_indices=True)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(UserError, match="Row 1 .*answers"):
        load_splits(args(tmp_path), need_eval=False)


def test_jsonl_with_an_image_folder(tmp_path):
    (tmp_path / "pages").mkdir()
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(3):
            PILImage.new("RGB", (30, 30), (i, 0, 0)).save(tmp_path / "pages" / f"{i}.png")
            f.write(json.dumps({"file": f"pages/{i}.png", "question": f"q{i}", "answer": f"a{i}"}) + "\n")
    data = args(tmp_path / "train.jsonl", image_column="file", question_column="question", answers_column="answer")
    train, _ = load_splits(data, need_eval=False)
    assert train[1]["image"].getpixel((0, 0)) == (1, 0, 0)
    assert train[1]["answers"] == "a1"


def test_jsonl_with_a_missing_image_file(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"file": "nope.png", "q": "q", "a": "a"}) + "\n")
    data = args(tmp_path / "train.jsonl", image_column="file", question_column="q", answers_column="a")
    with pytest.raises(UserError, match="Row 0 .*nope.png"):
        load_splits(data, need_eval=False)


def test_imagefolder_with_metadata(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        with open(tmp_path / split / "metadata.jsonl", "w") as f:
            for i in range(2):
                PILImage.new("L", (20, 20)).save(tmp_path / split / f"{i}.png")
                f.write(json.dumps({"file_name": f"{i}.png", "query": {"en": f"q{i}"}, "answers": [f"a{i}"]}) + "\n")
    train, test = load_splits(args(tmp_path))
    assert len(train) == 2 and len(test) == 2 and train[0]["question"] == "q0"


def test_save_to_disk_folder(tmp_path):
    from datasets import DatasetDict

    DatasetDict({"train": docvqa_like(2), "test": docvqa_like(1)}).save_to_disk(str(tmp_path / "saved"))
    train, test = load_splits(args(tmp_path / "saved"))
    assert (len(train), len(test)) == (2, 1)


def test_tiny_fixture_has_docvqa_columns(tiny_dataset_path):
    train, test = load_splits(args("docvlm:tiny-docs"))
    assert len(train) > len(test) > 0
    raw = Dataset.from_parquet(f"{tiny_dataset_path}/train.parquet")
    assert {"image", "query.en", "answers"} <= set(column_names(raw))


def test_missing_local_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_splits(args(tmp_path / "nowhere"))
