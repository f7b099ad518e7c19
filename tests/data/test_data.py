import json

import pytest
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage

from docvlm.data import CANONICAL, column_names, load_splits
from docvlm.errors import UserError
from docvlm.recipe.schema import DataArguments


def args(name, **overrides):
    return DataArguments(dataset_name=str(name), **overrides)


def docvqa_like(n=4):
    rows = [
        {
            "id": str(i),
            "image": PILImage.new("L", (40, 50), 255 - i),  # a page of its own
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


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def two_jsonl_splits(tmp_path, train_extra: dict, test_extra: dict):
    PILImage.new("RGB", (20, 20), "white").save(tmp_path / "page.png")
    write_jsonl(
        tmp_path / "train.jsonl", [{"image": "page.png", "q": f"q{i}", "a": f"a{i}", **train_extra} for i in range(4)]
    )
    write_jsonl(
        tmp_path / "test.jsonl", [{"image": "page.png", "q": f"t{i}", "a": f"b{i}", **test_extra} for i in range(2)]
    )
    return args(tmp_path, question_column="q", answers_column="a")


def test_splits_whose_unused_nested_columns_differ_still_load(tmp_path):
    """datasets reads a folder's splits into one schema and failed here; only the recipe's columns must agree."""
    data = two_jsonl_splits(tmp_path, {"meta": {"scanner": 1}}, {"meta": {"source": "fax"}})
    train, test = load_splits(data)
    assert list(train["question"]) == ["q0", "q1", "q2", "q3"] and list(test["answers"]) == ["b0", "b1"]


def test_a_mapped_column_of_the_wrong_type_names_the_split_file_and_column(tmp_path):
    data = two_jsonl_splits(tmp_path, {}, {})
    write_jsonl(tmp_path / "test.jsonl", [{"image": "page.png", "q": {"en": "x"}, "a": "b"}])
    with pytest.raises(UserError, match=r"Row 0 of split 'test' of .* \(test.jsonl\): q \(question_column\) holds"):
        load_splits(data)


def test_one_column_in_two_roles_is_refused_naming_both(parquet_dir):
    with pytest.raises(UserError, match="Column 'query.en' is both question_column and answers_column"):
        load_splits(args(parquet_dir, answers_column="query.en"))


def test_eval_split_size_holds_out_a_seeded_disjoint_split_numbered_as_in_the_file(tmp_path):
    docvqa_like(20).to_parquet(str(tmp_path / "only.parquet"))
    source = tmp_path / "only.parquet"
    with pytest.raises(UserError, match="Set eval_split_size"):
        load_splits(args(source))  # one file, no held-out split: the error says how to carve one
    train, held_out = load_splits(args(source, eval_split_size=0.25))
    assert len(train) == 15 and len(held_out) == 5
    rows = list(held_out["row"])
    assert sorted(list(train["row"]) + rows) == list(range(20))  # disjoint, nothing lost
    assert list(held_out["question"]) == [f"q{row}" for row in rows]  # `row` is the row in the file
    again = load_splits(args(source, eval_split_size=0.25))[1]
    other_seed = load_splits(args(source, eval_split_size=0.25, eval_split_seed=7))[1]
    assert list(again["row"]) == rows and list(other_seed["row"]) != rows
    assert len(load_splits(args(source, eval_split_size=3))[1]) == 3  # a count
    for bad in (0, 1.5, 20):
        with pytest.raises(UserError, match=f"eval_split_size {bad:g} cannot hold pages out of the 20 pages"):
            load_splits(args(source, eval_split_size=bad))


def test_eval_split_size_refuses_a_dataset_that_has_the_test_split(parquet_dir):
    with pytest.raises(UserError, match="eval_split_size is set, but .* already has a 'test' split"):
        load_splits(args(parquet_dir, eval_split_size=0.5))


def trained_labels(processor, rows) -> list[str]:
    """What the collator trains on for each row: the unmasked label tokens, decoded."""
    from docvlm.training.collator import DocVQACollator

    batch = DocVQACollator(processor, "Answer briefly.", None, "first")([rows[i] for i in range(len(rows))])
    return [processor.tokenizer.decode(labels[labels != -100]) for labels in batch["labels"]]


def test_key_value_rows_become_one_question_per_non_empty_field(tmp_path, processor, capsys):
    page = PILImage.new("RGB", (60, 40), "white")
    rows = [
        {"image": page, "company": "ACME Ltd", "date": "2026-01-02", "address": "", "total": 12.5},
        {"image": page, "company": "Bolt & Co", "date": None, "address": "1 Main St", "total": 7.0},
    ]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "receipts.parquet"))
    questions = {
        "company": "What is the company name?",
        "date": "What is the date?",
        "address": "What is the address?",
        "total": "What is the total amount?",
    }
    data = args(tmp_path / "receipts.parquet", field_questions=questions)
    train, _ = load_splits(data, need_eval=False)
    assert "2 rows became 6 questions (field_questions); skipped: address 1, date 1." in capsys.readouterr().err
    assert list(train["row"]) == [0, 0, 0, 1, 1, 1]  # each question keeps the row it came from
    assert list(train["group"]) == ["company", "date", "total", "company", "address", "total"]  # ANLS by field
    assert list(train["question"])[:3] == [questions["company"], questions["date"], questions["total"]]
    expected = ["ACME Ltd", "2026-01-02", "12.5", "Bolt & Co", "1 Main St", "7"]  # numbers as text
    assert trained_labels(processor, train) == [f"{answer}<end_of_utterance>" for answer in expected]


def test_a_list_of_question_answer_pairs_becomes_one_sample_per_pair(tmp_path, processor):
    PILImage.new("RGB", (60, 40), "white").save(tmp_path / "page.png")
    pairs = [
        {"question": "Who signed it?", "answers": ["J. Smith", "John Smith"]},
        {"question": "When?", "answer": "1996"},
        {"question": "Empty?", "answers": []},  # nothing to learn: skipped and counted
    ]
    write_jsonl(tmp_path / "train.jsonl", [{"image": "page.png", "qa": pairs}, {"image": "page.png", "qa": pairs[1:2]}])
    train, _ = load_splits(args(tmp_path / "train.jsonl", qa_pairs_column="qa"), need_eval=False)
    assert list(train["question"]) == ["Who signed it?", "When?", "When?"] and list(train["row"]) == [0, 0, 1]
    assert list(train["answers"])[0] == ["J. Smith", "John Smith"]
    expected = ["J. Smith<end_of_utterance>", "1996<end_of_utterance>", "1996<end_of_utterance>"]
    assert trained_labels(processor, train) == expected  # answer_choice first: the first accepted answer


def test_field_questions_name_a_missing_column_and_refuse_bad_settings(parquet_dir):
    with pytest.raises(UserError, match="Column 'total' \\(field_questions\\) not found in split 'train'"):
        load_splits(args(parquet_dir, field_questions={"total": "What is the total?"}))
    with pytest.raises(ValueError, match="the question for 'total' is empty"):
        args(parquet_dir, field_questions={"total": " "})
    with pytest.raises(ValueError, match="Set one of field_questions and qa_pairs_column"):
        args(parquet_dir, field_questions={"total": "What?"}, qa_pairs_column="qa")


def test_a_carved_held_out_split_holds_out_whole_receipts_with_all_their_questions(tmp_path, capsys):
    rows = [
        {"image": PILImage.new("RGB", (20, 20), (i, 0, 0)), "total": f"{i}.00", "date": f"{i}/01"} for i in range(10)
    ]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    questions = {"total": "What is the total?", "date": "What is the date?"}
    train, held_out = load_splits(args(tmp_path / "r.parquet", field_questions=questions, eval_split_size=0.2))
    assert len(set(held_out["row"])) == 2 and len(held_out) == 4  # 2 of 10 receipts, both their questions
    assert not set(train["row"]) & set(held_out["row"])
    assert not {image.getpixel((0, 0)) for image in train["image"]} & {i.getpixel((0, 0)) for i in held_out["image"]}
    assert "Held out 2 of 10 pages (4 questions)" in capsys.readouterr().err


def test_a_folder_of_scans_with_a_metadata_csv_and_a_carved_held_out_split(tmp_path):
    """The most common own-data layout: images in one folder, a CSV of file_name, question, answer beside them."""
    lines = ["file_name,question,answer,notes"]
    for i in range(10):
        PILImage.new("RGB", (20, 20), (i, 0, 0)).save(tmp_path / f"scan-{i}.png")
        lines.append(f'scan-{i}.png,"What is on page {i}?",value {i},{"" if i % 2 else "smudged"}')
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    data = args(tmp_path, question_column="question", answers_column="answer", eval_split_size=2)
    train, held_out = load_splits(data)
    assert len(train) == 8 and len(held_out) == 2
    row = held_out[0]["row"]
    assert held_out[0]["answers"] == f"value {row}" and held_out[0]["image"].getpixel((0, 0)) == (row, 0, 0)


def conversation(*turns):
    """[user, assistant, user, assistant...] texts; a user text starting with '#' gets a page before it."""
    messages = []
    for n, text in enumerate(turns):
        if n % 2:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        elif text.startswith("#"):
            messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text[1:]}]})
        else:
            messages.append({"role": "user", "content": text})  # plain-string content, as many files have
    return messages


def test_multi_turn_conversations_train_every_assistant_turn_and_evaluate_the_last(tmp_path, processor):
    page = PILImage.new("RGB", (60, 40), "white")
    lines = [
        {"images": ["a.png"], "messages": conversation("#What is the total?", "$12.50", "And the tax?", "$1.05")},
        {
            "images": ["a.png", "b.png"],
            "messages": conversation("#Total of page 1?", "3", "#And of page 2?", "4 200,00 €", "Sum?", "4 203"),
        },
    ]
    for name in ("a.png", "b.png"):
        page.save(tmp_path / name)
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    train, _ = load_splits(args(tmp_path / "chat.jsonl", image_column="images", messages_column="messages"), False)
    assert [len(pages) for pages in train["image"]] == [1, 2]  # paths resolved into pages, several a row
    assert list(train["question"]) == ["And the tax?", "Sum?"] and list(train["answers"]) == [["$1.05"], ["4 203"]]
    assert trained_labels(processor, train) == [
        "$12.50<end_of_utterance> $1.05<end_of_utterance>",
        "3<end_of_utterance> 4 200,00 €<end_of_utterance> 4 203<end_of_utterance>",
    ]


def test_a_conversation_whose_image_parts_and_pages_disagree_names_the_row(tmp_path):
    PILImage.new("RGB", (60, 40), "white").save(tmp_path / "a.png")
    lines = [
        {"images": ["a.png"], "messages": conversation("#Total?", "3")},
        {"images": ["a.png"], "messages": conversation("#Total?", "3", "#Again?", "3")},
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(UserError, match=r"Row 1 of split 'train' .*messages_column.*2 image part\(s\) .* 1 page"):
        load_splits(args(tmp_path / "chat.jsonl", image_column="images", messages_column="messages"), False)
    for bad, message in (
        (conversation("#Total?", "3", "And?"), "ends with a user turn"),
        ([{"role": "robot", "content": "hi"}], "role one of system, user, assistant"),
        (conversation("#Total?", " "), "empty assistant turn"),
    ):
        (tmp_path / "chat.jsonl").write_text(json.dumps({"images": ["a.png"], "messages": bad}))
        with pytest.raises(UserError, match=message):
            load_splits(args(tmp_path / "chat.jsonl", image_column="images", messages_column="messages"), False)


def test_several_pages_per_question_are_all_given_and_counted_into_max_length(processor):
    from docvlm.training.collator import DocVQACollator

    page = PILImage.new("RGB", (60, 40), "white")
    one = {"row": 0, "image": page, "question": "Total?", "answers": ["7"]}
    three = {"row": 1, "image": [page, page, page], "question": "Total?", "answers": ["7"]}
    collator = DocVQACollator(processor, "Answer briefly.", None, "first")
    batch = collator([one, three])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    per_row = (batch["input_ids"] == image_id).sum(dim=1).tolist()
    assert per_row[1] == 3 * per_row[0] > 0 and batch["pixel_values"].shape[1] == 3  # three pages, padded
    assert [processor.tokenizer.decode(row[row != -100]) for row in batch["labels"]] == ["7<end_of_utterance>"] * 2
    one_long, three_long = collator.lengths([one, three])
    assert three_long - one_long == 2 * (per_row[0] + 1)  # each extra page: its image tokens and one separator
    with pytest.raises(UserError, match=f"Row 1 is {three_long} tokens, over max_length={three_long - 1}"):
        DocVQACollator(processor, "Answer briefly.", three_long - 1, "first")([three])


def test_a_system_prompt_comes_first_in_training_and_generation_and_is_never_trained(processor):
    from docvlm.families import prompt_text
    from docvlm.prompts import Prompt
    from docvlm.training.collator import DocVQACollator

    prompt = Prompt("Answer briefly.", "You read invoices.")
    row = {"row": 0, "image": PILImage.new("RGB", (60, 40), "white"), "question": "Total?", "answers": ["7"]}
    batch = DocVQACollator(processor, prompt, None, "first")([row])
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert text.startswith("<s> System: You read invoices.<end_of_utterance>\nUser: Answer briefly.")
    assert processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100]) == "7<end_of_utterance>"
    assert prompt_text(processor, prompt, "Total?").startswith("System: You read invoices.<end_of_utterance>")
    assert "System" not in prompt_text(processor, Prompt("Answer briefly."), "Total?")
