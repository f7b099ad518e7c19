"""The `docvlm` command: fast help and usage errors, the launcher's thread count, exporting pages to try."""

import argparse
import json
import subprocess
import sys
import time

import pytest

from docvlm.cli import _cpu_threads_per_process, main


def _docvlm(*args):
    started = time.monotonic()
    probe = (  # argparse exits through SystemExit, so the loaded modules are listed at exit
        "import atexit, sys\n"
        "atexit.register(lambda: print('HEAVY', [m for m in ('torch', 'transformers', 'trl') if m in sys.modules], "
        "file=sys.stderr))\n"
        "from docvlm.cli import main\nsys.exit(main(sys.argv[1:]))"
    )
    run = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
    return run, time.monotonic() - started


@pytest.mark.parametrize(
    "args, code",
    [
        (["--help"], 0),
        ([], 2),
        (["frobnicate"], 2),
        (["predict", "--help"], 0),
        (["predict"], 2),
        (["merge", "--help"], 0),
        (["merge", "--adapter", "x"], 2),
        (["push", "--help"], 0),
        (["fixtures", "--help"], 0),
        (["fixtures", "--count", "0", "--export-pages", "x"], 2),
        (["fixtures", "--metadata-csv"], 2),
    ],
)
def test_help_and_usage_errors_answer_without_importing_the_ml_stack(args, code):
    run, seconds = _docvlm(*args)
    assert run.returncode == code, run.stderr
    assert "HEAVY []" in run.stderr  # torch alone takes seconds to import
    assert seconds < 10  # generous for a loaded CI machine; typically ~0.1 s (the import check is the real test)
    assert "Traceback" not in run.stderr and (run.stdout + run.stderr).strip()


def test_cpu_launch_names_its_thread_count_so_accelerate_does_not_warn(tmp_path):
    import psutil

    physical = psutil.cpu_count(logical=False)
    config = tmp_path / "cpu.yaml"
    config.write_text("use_cpu: true\nnum_processes: 1\nnum_machines: 1\n")

    def args(**kw):
        return argparse.Namespace(
            **{"config_file": str(config), "cpu": False, "num_processes": None, "num_machines": None, **kw}
        )

    assert _cpu_threads_per_process(args()) == physical
    assert _cpu_threads_per_process(args(num_processes=2)) == max(1, physical // 2)
    config.write_text("use_cpu: false\nnum_processes: 1\n")
    assert _cpu_threads_per_process(args()) is None  # GPU launches keep accelerate's own choice
    assert _cpu_threads_per_process(args(cpu=True)) == physical


def test_export_pages_writes_held_out_pages_and_their_questions(tmp_path, capsys):
    from PIL import Image

    from docvlm.data import load_splits
    from docvlm.recipe.schema import DataArguments

    assert main(["fixtures", "--export-pages", str(tmp_path / "pages"), "--count", "3"]) == 0
    assert "3 held-out pages" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "pages" / "questions.jsonl").read_text().splitlines()]
    _, test = load_splits(DataArguments(dataset_name="docvlm:tiny-docs"))
    assert [line["question"] for line in lines] == test["question"][:3]
    assert [line["answers"] for line in lines] == test["answers"][:3]
    for index, line in enumerate(lines):
        assert line["image"] == f"page-{index:03d}.png"
        with Image.open(tmp_path / "pages" / line["image"]) as page:
            assert page.size == test[index]["image"].size


def test_readme_example_question_matches_the_first_exported_page(tmp_path):
    """The README asks `page-000.png` a question; it must be that page's own question."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    asked = set(re.findall(r"--image pages/page-000\.png --question \"([^\"]+)\"", readme))
    assert asked, "the README no longer asks page-000.png anything"
    assert main(["fixtures", "--export-pages", str(tmp_path), "--count", "1"]) == 0
    assert asked == {json.loads((tmp_path / "questions.jsonl").read_text())["question"]}


def test_make_with_a_mistyped_recipe_fails_at_once_naming_the_closest_and_takes_a_path():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    started = time.monotonic()
    run = subprocess.run(["make", "train", "RECIPE=tiny_docvq"], cwd=root, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and time.monotonic() - started < 5  # before installing or importing anything
    assert "recipe recipes/tiny_docvq.yaml not found. Did you mean RECIPE=tiny_docvqa?" in run.stderr
    assert "pip" not in run.stdout + run.stderr and "docvlm launch" not in run.stdout
    dry = subprocess.run(
        ["make", "-n", "train", "RECIPE=recipes/tiny_docvqa.yaml"], cwd=root, capture_output=True, text=True
    )
    assert "--config recipes/tiny_docvqa.yaml" in dry.stdout and "recipes/recipes" not in dry.stdout


def test_a_deepspeed_launch_without_deepspeed_says_what_to_install(capsys):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here: nothing to refuse")
    argv = ["launch", "--config_file", "accelerate_configs/deepspeed_zero2.yaml", "-m", "docvlm.train"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "deepspeed_zero2.yaml launches with DeepSpeed, which is not installed: pip install -e '.[deepspeed]'" in err
    assert main(["launch", "--config_file", "accelerate_configs/nope.yaml", "-m", "docvlm.train"]) == 2
    assert (
        "--config_file accelerate_configs/nope.yaml not found. Shipped: cpu, deepspeed_zero2" in capsys.readouterr().err
    )


def test_docvlm_train_without_a_recipe_asks_for_one(capsys):
    assert main(["train"]) == 2
    assert "No recipe: give one with --config recipes/<recipe>.yaml (chartqa_qlora" in capsys.readouterr().err
