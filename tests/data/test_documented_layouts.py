"""Each layout of docs/new_dataset.md, read with its YAML block as written: data in that layout (the tiny held-out
pages), loaded with every page held out whole; then `docvlm plan` and a short training run of the tiny model."""

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from docvlm.fixtures.documents import export_pages, page_digest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "new_dataset.md"
RECIPE = ROOT / "recipes" / "local_folder_qlora.yaml"
# What docs/new_dataset.md says a random tiny model needs in place of Idefics2-8B, plus a short run.
TINY = {
    "model_name_or_path": "docvlm:tiny-idefics2",
    "learning_rate": 2.0e-3,
    "warmup_steps": 0,
    "lora_modules_to_save": ["lm_head"],
    "dataloader_num_workers": 0,
    "save_strategy": "no",
    "max_steps": 2,
    "per_device_train_batch_size": 4,
    "eval_compare_base": False,
    "max_eval_samples": 4,
    "logging_steps": 1,
}


def documented_layouts() -> dict[str, dict]:
    """{layout name: the YAML block under its marker}."""
    blocks = re.findall(r"<!-- layout: ([\w-]+) -->\n```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    return {name: yaml.safe_load(block) for name, block in blocks}


LAYOUTS = documented_layouts()


def pages(folder: Path, count: int) -> list[dict]:
    """`count` held-out tiny pages written into folder: [{image, question, answers}]."""
    listed = export_pages(folder, count)
    return [json.loads(line) for line in listed.read_text().splitlines()]


def write_csv(path: Path, header: list[str], rows: list[list], delimiter=","):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)


def jsonl(path: Path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def build(name: str, here: Path) -> None:
    """Data in layout `name`, where its documented dataset_name points (relative to `here`)."""
    if name == "scans-metadata-csv":
        items = pages(here / "my_scans", 20)
        rows = [[i["image"], q, i["answers"][0]] for i in items for q in (i["question"], "Read the value?")]
        write_csv(here / "my_scans" / "metadata.csv", ["file_name", "question", "answer"], rows)
    elif name == "csv-of-paths":
        items = pages(here / "my_docs" / "scans", 20)
        rows = [[f"scans/{i['image']}", i["question"], i["answers"][0]] for i in items]
        write_csv(here / "my_docs" / "labels.csv", ["file", "question", "answer"], rows)
    elif name == "folder-named-table":
        items = pages(here / "my_docs", 20)
        rows = [[i["image"], i["question"], i["answers"][0]] for i in items]
        write_csv(here / "my_docs" / "annotations.csv", ["file", "question", "answer"], rows)
    elif name == "docvqa-json":
        items = pages(here / "docvqa" / "documents", 20)
        data = [
            {
                "questionId": n,
                "question": i["question"],
                "question_types": ["form"],
                "image": f"documents/{i['image']}",
                "docId": n,
                "ucsf_document_id": f"doc{n // 2}",
                "ucsf_document_page_no": str(n % 2 + 1),
                "answers": i["answers"],
                "data_split": "train",
            }
            for n, i in enumerate(items)
        ]
        document = {"dataset_name": "docvqa", "dataset_version": "1.0", "dataset_split": "train", "data": data}
        (here / "docvqa" / "train_v1.0.json").write_text(json.dumps(document, indent=2))
    elif name == "pages-with-lists":
        items = pages(here / "my_docs", 20)
        rows = [
            {"image": i["image"], "questions": [i["question"], "Read the value?"], "answers": [i["answers"]] * 2}
            for i in items
        ]
        jsonl(here / "my_docs" / "pages.jsonl", rows)
    elif name == "pairs-own-keys":
        items = pages(here / "my_docs", 20)
        rows = [{"image": i["image"], "qa": [{"q": i["question"], "a": i["answers"]}]} for i in items]
        jsonl(here / "my_docs" / "pairs.jsonl", rows)
    elif name == "receipts-csv":
        items = pages(here / "receipts", 20)
        vendors = ["ACME", "Bolt", ""]  # an empty vendor: its total question cannot be asked, and is counted
        rows = [
            [i["image"], vendors[n % 3], i["answers"][0], "2026-01-0" + str(n % 9 + 1)] for n, i in enumerate(items)
        ]
        write_csv(here / "receipts" / "receipts.csv", ["file", "vendor", "total", "date"], rows)
    elif name == "conversations":
        items = pages(here / "my_docs", 20)
        rows = [
            {
                "images": [i["image"]],
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": i["question"]}]},
                    {"role": "assistant", "content": i["answers"][0]},  # TRL's string form beside part lists
                ],
            }
            for i in items
        ]
        jsonl(here / "my_docs" / "chats.jsonl", rows)
    elif name == "multi-page":
        items = pages(here / "my_docs", 20)
        rows = [
            {"pages": [a["image"], b["image"]], "question": a["question"], "answer": a["answers"][0]}
            for a, b in zip(items[::2], items[1::2], strict=True)
        ]
        jsonl(here / "my_docs" / "documents.jsonl", rows)
    else:
        raise AssertionError(f"docs/new_dataset.md documents a layout this test cannot build: {name}")


def recipe_for(name: str, here: Path, **extra) -> Path:
    """recipes/local_folder_qlora.yaml with the layout's Data lines and the tiny-model settings."""
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe.update(LAYOUTS[name], **extra)
    path = here / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_the_doc_documents_every_layout_in_its_table():
    table = re.findall(r"\| \[([\w-]+)\]\(#\1\) \|", DOC.read_text())
    assert table == list(LAYOUTS) and len(LAYOUTS) >= 9


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_documented_layout_loads_with_whole_pages_held_out(name, tmp_path, monkeypatch):
    from docvlm.data import DataReport, load_splits
    from docvlm.recipe.parse import parse_recipe

    monkeypatch.chdir(tmp_path)
    build(name, tmp_path)
    data_args, _, _, _ = parse_recipe(["--config", str(recipe_for(name, tmp_path))])
    report = DataReport(data_args.dataset_name)
    train, held_out = load_splits(data_args, report=report)
    assert len(train) > len(held_out) > 0
    held = report.held_out.as_json()
    assert held["held_out_units"] >= 1 and held["held_out_pages"]
    trained_pages = {name for row in train["image"] for name in _page_names(row)}
    held_pages = {name for row in held_out["image"] for name in _page_names(row)}
    assert not trained_pages & held_pages


def _page_names(pages) -> list[str]:
    pages = pages if isinstance(pages, list) else [pages]
    return [page_digest(page) for page in pages]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_documented_layout_plans_and_trains_the_tiny_model(name, tmp_path, monkeypatch, capsys):
    from docvlm.plan import plan
    from docvlm.train import run

    monkeypatch.chdir(tmp_path)
    build(name, tmp_path)
    out = tmp_path / "run"
    recipe = recipe_for(name, tmp_path, output_dir=str(out), **TINY)
    assert plan(["--config", str(recipe)]) == 0
    assert "would not fit" not in capsys.readouterr().out
    run(["--config", str(recipe)])
    assert (out / "adapter_model.safetensors").is_file()
    data = json.loads((out / "data_report.json").read_text())
    assert data["held_out"]["held_out_pages"] and data["splits"]["train"]["used"] > 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert predictions and all(
        item["pages"] and item["pages"][0] in data["held_out"]["held_out_pages"] for item in predictions
    )
