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

    from docvlm.config import DataArguments
    from docvlm.data import load_splits

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
