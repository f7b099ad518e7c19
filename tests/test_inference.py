"""Using a trained adapter: the eval report, predict, merge, push, and no token in any output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from docvlm.cli import main as cli
from docvlm.errors import UserError
from tests.helpers import quick


def held_out(n):
    from docvlm.data import load_splits
    from docvlm.recipe.schema import DataArguments

    _, test = load_splits(DataArguments(dataset_name="docvlm:tiny-docs"))
    return [test[i] for i in range(n)]


@pytest.mark.integration
def test_training_ends_with_a_before_after_report(trained):
    out, _, metrics = trained
    report = json.loads((out / "report.json").read_text())
    assert set(report["systems"]) == {"blind", "before", "after"} and report["count"] == 8
    assert "generation_anls" in metrics
    md = (out / "report.md").read_text()
    assert md.startswith("# Evaluation: recipes/tiny_docvqa.yaml\n")  # the recipe that was run
    assert "before (base model)" in md and "after (base + adapter)" in md and "![training loss](loss.png)" in md
    after, blind = report["systems"]["after"]["anls"], report["systems"]["blind"]["anls"]
    assert f"**{after - blind:+.3f}** over the question-only guess" in md  # not only over a random base
    assert (out / "loss.png").is_file()
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and {"question", "answers", "before", "after", "after_anls"} <= set(json.loads(lines[0]))


def test_docvlm_eval_writes_its_own_report_beside_the_training_one(trained, tmp_path):
    from docvlm.evaluation.evaluate import run_eval

    out, _, _ = trained
    training_report = (out / "report.md").read_bytes()
    recipe = tmp_path / "my-recipe.yaml"
    recipe.write_text(open("recipes/tiny_docvqa.yaml").read())
    argv = quick(out, "--adapter", str(out), "--eval_compare_base", "false")
    argv[argv.index("--config") + 1] = str(recipe)
    report = run_eval(argv)
    assert (out / "report.md").read_bytes() == training_report  # never overwritten
    assert (out / "eval" / "report.md").read_text().startswith(f"# Evaluation: {recipe}\n")
    assert report["count"] == 8 and json.loads((out / "eval" / "report.json").read_text())["recipe"] == str(recipe)
    with pytest.raises(UserError, match="eval_output_dir is the adapter folder"):
        run_eval([*argv, "--eval_output_dir", str(out)])


@pytest.mark.integration
def test_merged_model_gives_the_same_greedy_answers_as_the_adapter_on_its_4bit_base(trained, tmp_path):
    """The default merge folds the adapter into the dequantized 4-bit weights it was trained on, so the merged
    model answers as the trained adapter does, and its card may carry the adapter's numbers."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from docvlm.evaluation.generation import generate
    from docvlm.inference import load_for_inference

    out, _, _ = trained
    merged_dir = tmp_path / "merged"
    assert cli(["merge", "--adapter", str(out), "--out", str(merged_dir), "--dtype", "float32"]) == 0
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    mode = (merged_dir / "config.json").stat().st_mode & 0o777
    assert (merged_dir / "model.safetensors").stat().st_mode & 0o777 == mode  # not safetensors' 0600
    assert (merged_dir / "adapter_report.json").is_file() and not (merged_dir / "report.json").exists()
    card = (merged_dir / "README.md").read_text()
    assert "docvlm:tiny-idefics2" in card and "docvlm:tiny-docs" in card and "ANLS" in card
    assert "dequantization of the 4-bit base" in card and "not on this folder's weights" in card

    rows = held_out(10)
    processor = AutoProcessor.from_pretrained(merged_dir)
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32)  # no peft, no 4-bit
    adapted, adapter_processor, prompt, _ = load_for_inference(adapter=str(out))  # 4-bit base + adapter
    want = generate(adapted, adapter_processor, rows, prompt, 12, 4)
    got = generate(merged, processor, rows, prompt, 12, 4)
    assert [a["answer"] for a in got] == [a["answer"] for a in want]
    with adapted.disable_adapter():  # the control: a merge that dropped the adapter would answer as the base does
        base = generate(adapted, adapter_processor, rows, prompt, 12, 4)
    assert [a["answer"] for a in base] != [a["answer"] for a in want]


def test_merge_into_the_original_weights_says_so(trained, tmp_path):
    out, _, _ = trained
    merged_dir = tmp_path / "merged-original"
    assert cli(["merge", "--adapter", str(out), "--out", str(merged_dir), "--base", "original"]) == 0
    card = (merged_dir / "README.md").read_text()
    assert "original float32 weights" in card and "its answers differ from the adapter's" in card


@pytest.mark.integration
def test_predict_prints_only_the_answer(trained, tmp_path):
    out, _, _ = trained
    page = tmp_path / "page.png"
    held_out(1)[0]["image"].save(page)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "docvlm",
            "predict",
            "--adapter",
            str(out),
            "--image",
            str(page),
            "--question",
            "What is the total?",
            "--max_new_tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 1 and "<end_of_utterance>" not in lines[0] and "Assistant" not in lines[0]


def test_predict_many_from_jsonl(trained, tmp_path, capsys):
    out, _, _ = trained
    rows = held_out(3)
    (tmp_path / "pages").mkdir()
    with open(tmp_path / "requests.jsonl", "w") as f:
        for i, row in enumerate(rows):
            row["image"].save(tmp_path / "pages" / f"{i}.png")
            f.write(json.dumps({"image": f"pages/{i}.png", "question": row["question"], "id": i}) + "\n")
    assert (
        cli(
            [
                "predict",
                "--adapter",
                str(out),
                "--input",
                str(tmp_path / "requests.jsonl"),
                "--output",
                str(tmp_path / "outputs" / "answers.jsonl"),
            ]
        )
        == 0
    )
    answers = [json.loads(line) for line in (tmp_path / "outputs" / "answers.jsonl").read_text().splitlines()]
    assert [a["image"] for a in answers] == [f"../pages/{i}.png" for i in range(3)]  # from the answers' folder
    again = tmp_path / "outputs" / "again.jsonl"  # so the answers feed predict again, as the README does
    assert (
        cli(
            ["predict", "--adapter", str(out), "--input", str(again.with_name("answers.jsonl")), "--output", str(again)]
        )
        == 0
    )
    assert [json.loads(line)["answer"] for line in again.read_text().splitlines()] == [a["answer"] for a in answers]
    assert [a["id"] for a in answers] == [0, 1, 2]
    # the adapter reloaded from disk answers as the trained model did in the training's own evaluation, which the
    # base model does not (the control: a predict that lost the adapter would fail here)
    evaluated = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()][:3]
    assert [a["answer"] for a in answers] == [item["after"] for item in evaluated]
    assert [item["before"] for item in evaluated] != [item["after"] for item in evaluated]


def test_predict_checks_its_pages_as_training_does(trained, tmp_path, capsys, monkeypatch):
    """A 1x1 page was answered, and a decompression bomb raised Pillow's own error: predict reads pages through
    the row check's open_page."""
    from PIL import Image

    out, _, _ = trained
    Image.new("L", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (60, 40), "white").save(tmp_path / "page.png")
    assert cli(["predict", "--adapter", str(out), "--image", str(tmp_path / "dot.png"), "--question", "Q?"]) == 2
    assert "--image: image is 1x1 pixels, below 8 on a side" in capsys.readouterr().err
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 60x40 page is then above the guard
    assert cli(["predict", "--adapter", str(out), "--image", str(tmp_path / "page.png"), "--question", "Q?"]) == 2
    err = capsys.readouterr().err
    assert "image too large to decode safely" in err and "DecompressionBomb" not in err.split(":")[0]


def test_predict_input_errors(trained, tmp_path, capsys):
    out, _, _ = trained
    (tmp_path / "bad.jsonl").write_text('{"image": "missing.png", "question": "Q?"}\n')
    assert cli(["predict", "--adapter", str(out), "--input", str(tmp_path / "bad.jsonl")]) == 2
    assert "line 1" in capsys.readouterr().err
    assert cli(["predict", "--adapter", str(tmp_path), "--image", str(tmp_path / "bad.jsonl"), "--question", "Q"]) == 2
    with pytest.raises(SystemExit):
        cli(["predict", "--adapter", str(out)])


@pytest.mark.integration
def test_token_never_reaches_the_outputs(tmp_path, monkeypatch, capfd):
    from docvlm.evaluation.evaluate import run_eval
    from docvlm.inference import merge
    from docvlm.train import run

    token = "hf_docvlmLeakCheck" + "x7Q2" * 8
    monkeypatch.setenv("HF_TOKEN", token)
    out = tmp_path / "run"
    run(
        quick(
            out, "--max_steps", "2", "--save_steps", "1", "--report_to", "tensorboard", "--eval_after_training", "true"
        )
    )
    run_eval(quick(out, "--adapter", str(out)))
    merge(str(out), str(tmp_path / "merged"), "float32")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    # every kind of output is scanned: checkpoints, pickled arguments, TensorBoard events, reports, merged weights
    assert {"training_args.bin", "optimizer.pt", "report.json", "predictions.jsonl", "model.safetensors"} <= names
    assert any(name.startswith("events.out.tfevents") for name in names) and any(out.glob("checkpoint-*"))
    leaks = [str(p) for p in files if token.encode() in p.read_bytes()]
    assert leaks == []
    captured = capfd.readouterr()
    assert token not in captured.out and token not in captured.err


def test_push_uses_the_environment_token_only(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from docvlm import inference as export

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", (repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw) and "ok")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(UserError, match="HF_TOKEN"):
        export.push(str(tmp_path), "me/model")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "a" * 34)
    export.push(str(tmp_path), "me/model")
    assert calls["repo"] == ("me/model", {"private": True, "exist_ok": True})
    assert calls["upload"]["folder_path"] == str(tmp_path) and "checkpoint-*" in calls["upload"]["ignore_patterns"]
    assert "token" not in calls["upload"]


@pytest.mark.integration
def test_push_without_network_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from docvlm import inference as export

    def unreachable(self, *args, **kwargs):
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "b" * 34)
    with pytest.raises(
        UserError, match="Could not reach the Hugging Face Hub.*ConnectionRefusedError.*nothing was pushed"
    ):
        export.push(str(tmp_path), "me/model")
    # the real client in a fresh process, against a closed local port
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    run = subprocess.run(
        [sys.executable, "-m", "docvlm", "push", "--folder", str(tmp_path), "--repo_id", "me/model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr and "Could not reach" in run.stderr, run.stderr


def test_push_to_hub_without_repo_id_fails_before_anything_loads(tmp_path, monkeypatch):
    from docvlm.train import run
    from tests.test_train import loaders_that_must_not_run

    loaders_that_must_not_run(monkeypatch)
    with pytest.raises(UserError, match="hub_model_id"):
        run(quick(tmp_path, "--push_to_hub", "true"))
    assert not Path(tmp_path, "adapter_model.safetensors").exists()
