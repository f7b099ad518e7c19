"""Every command in the bash blocks of README.md and docs/new_dataset.md, run as written and in the order written,
in a copy of the repository.

A command that needs the Hub is run with the Hub unreachable and must fail fast with its documented message; a
server must start and keep serving; the rest must exit 0. `make train` must print no warning."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NEW_DATASET = ROOT / "docs" / "new_dataset.md"

# Commands that cannot simply exit 0 here, with what each must do instead. Every entry must match a README command.
SKIP, FAILS_FAST, SERVES = "skip", "fails fast", "serves"
SPECIAL = [
    (r"^git clone <this repo>", SKIP, "a placeholder for the reader's clone: this test runs in a copy of the repo"),
    (r"^make test\b", SKIP, "the command that runs this test"),
    (
        r"^make bench(-multi)?( FAMILIES=1| EVAL=1)?$",
        SKIP,
        "needs a GPU: test_every_documented_gpu_command_... checks it stops at once here",
    ),
    (
        r"^make bench-cpu$",
        SKIP,
        "a CPU benchmark of several minutes: tests/benchmarks/test_bench_cpu.py runs one short run",
    ),
    (r"^pytest -m (multi)?gpu\b", SKIP, "needs a GPU: on a CPU every test it selects is skipped"),
    (r"^tensorboard ", SERVES, r"TensorBoard .* at http://localhost:6006"),
    (r"^make train RECIPE=docvqa_qlora$", FAILS_FAST, r"Could not reach the Hugging Face Hub.*model_name_or_path"),
    (r"--model_name_or_path /data/idefics2-8b", FAILS_FAST, r"The model path '/data/idefics2-8b'.*does not exist"),
    (r"^hf download ", FAILS_FAST, r"(?i)error|connect"),
    (r"recipes/docvqa_qlora\.yaml", FAILS_FAST, r"Could not reach the Hugging Face Hub"),
    (r"^docvlm push ", FAILS_FAST, r"No Hub token: set HF_TOKEN"),
]
# The same for docs/new_dataset.md.
NEW_DATASET_SPECIAL = [
    (r"^git clone <this repo>", SKIP, "a placeholder for the reader's clone: this test runs in a copy of the repo"),
    (r'^make train RECIPE=local_folder_qlora ARGS="--dataset_name my_scans"$', FAILS_FAST, r"Could not reach the Hug"),
]
SERVE_SECONDS = 20
FAIL_FAST_SECONDS = 60


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks, in order; a line ending in a backslash continues on the next."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def without_comment(command: str) -> str:
    return re.sub(r"\s+#\s.*$", "", command).strip()


def special(command: str, exceptions=SPECIAL):
    for pattern, kind, detail in exceptions:
        if re.search(pattern, without_comment(command)):
            return kind, detail
    return None, None


def test_readme_commands_are_parsed_with_their_continuations():
    text = "```bash\nmake a   # note\nrun x \\\n    --y z\n```\n```text\nnot a command\n```\n"
    assert readme_commands(text) == ["make a   # note", "run x      --y z"]
    assert without_comment("make a   # note") == "make a"


@pytest.mark.parametrize("doc, exceptions", [(README, SPECIAL), (NEW_DATASET, NEW_DATASET_SPECIAL)])
def test_every_exception_matches_a_documented_command(doc, exceptions):
    commands = readme_commands(doc.read_text())
    for pattern, _, _ in exceptions:
        assert any(re.search(pattern, without_comment(c)) for c in commands), f"no {doc.name} command matches {pattern}"


def copy_of_the_repository(dest: Path) -> Path:
    """The tracked and untracked-but-not-ignored files, as a fresh clone of this working tree would have them,
    with the test run's .venv linked in so that `make` finds it installed."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


def run_documented_commands(doc: Path, exceptions, tmp_path: Path) -> Path:
    """Run every command of doc's bash blocks in one shell, in a copy of the repository, with the Hub unreachable;
    fail on any that does not do what it should. Returns the copy."""
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip(f"needs the tests to run from a virtual environment (`make test`); {sys.prefix} is not one")
    repo = copy_of_the_repository(tmp_path / "repo")
    (Path(sys.prefix) / ".installed").touch()  # `make` checks this stamp against pyproject.toml
    logs = tmp_path / "logs"
    logs.mkdir()
    commands = readme_commands(doc.read_text())
    script = ["set -u"]
    plan = []
    for index, command in enumerate(commands):
        kind, detail = special(command, exceptions)
        plan.append((index, command, kind, detail))
        if kind == SKIP:
            continue
        limit = SERVE_SECONDS if kind == SERVES else FAIL_FAST_SECONDS if kind == FAILS_FAST else 1200
        # A brace group runs in this shell, so `source .venv/bin/activate` holds for the commands after it.
        wrapped = f"timeout {limit} {without_comment(command)}" if kind else f"{{ {command}\n}}"
        script += [
            "start=$(date +%s)",
            f"{wrapped} > {logs}/{index}.log 2>&1 < /dev/null",
            f"echo $? $(( $(date +%s) - start )) > {logs}/{index}.rc",
        ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VIRTUAL_ENV", "PYTEST"))}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",  # a closed local port: the Hub is unreachable, whatever the network
        HF_HOME=str(tmp_path / "hf-home"),  # no stored token
        PATH=os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(sys.prefix)),
    )
    started = time.monotonic()
    subprocess.run(["bash", "-c", "\n".join(script)], cwd=repo, env=env, timeout=3000, check=False)
    print(f"{doc.name} commands: {time.monotonic() - started:.0f} s")

    failures = []
    for index, command, kind, detail in plan:
        if kind == SKIP:
            print(f"skipped `{command}`: {detail}")
            continue
        rc_file = logs / f"{index}.rc"
        if not rc_file.is_file():
            failures.append(f"`{command}` never ran")
            continue
        code, seconds = map(int, rc_file.read_text().split())
        output = (logs / f"{index}.log").read_text(errors="replace")
        tail = output[-1500:]
        if kind == SERVES:
            if code != 124 or not re.search(detail, output):
                failures.append(f"`{command}` did not keep serving for {SERVE_SECONDS} s (exit {code}):\n{tail}")
        elif kind == FAILS_FAST:
            if code in (0, 124) or not re.search(detail, output, flags=re.S) or "Traceback" in output:
                failures.append(f"`{command}` should fail fast with /{detail}/, got exit {code}:\n{tail}")
        elif code != 0:
            failures.append(f"`{command}` exited {code}:\n{tail}")
        if without_comment(command) == "make train":
            warnings = [line for line in output.splitlines() if re.search(r"(?i)warn", line)]
            if warnings:
                failures.append("`make train` printed warnings:\n" + "\n".join(warnings))
    assert not failures, "\n\n".join(failures)
    return repo


@pytest.mark.slow
def test_every_readme_command_runs_as_written(tmp_path):
    repo = run_documented_commands(README, SPECIAL, tmp_path)
    answers = (repo / "outputs" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 5 and all('"answer"' in line for line in answers)
    # the figures the README quotes for the embedded default are the ones its `make train` gives
    report = json.loads((repo / "outputs" / "tiny_docvqa" / "report.json").read_text())["systems"]
    text = README.read_text()
    low, high = map(float, re.search(r"\| after \(base \+ adapter\) \| ([\d.]+)-([\d.]+),", text).groups())
    blind = float(re.search(r"\| question-only guess \(never sees the page\) \| ([\d.]+) \|", text).group(1))
    shown = float(re.search(r"after \(base \+ adapter\) +ANLS ([\d.]+)", text).group(1))
    assert low <= report["after"]["anls"] <= high and low <= shown <= high
    assert report["blind"]["anls"] == pytest.approx(blind, abs=0.005)


@pytest.mark.slow
def test_the_new_dataset_walkthrough_runs_as_written_and_ends_with_a_report(tmp_path):
    repo = run_documented_commands(NEW_DATASET, NEW_DATASET_SPECIAL, tmp_path)
    report = json.loads((repo / "outputs" / "my_scans" / "report.json").read_text())
    assert report["count"] == 10 and report["systems"]["after"]["stopped"] == 1.0  # 10% of 100 pages held out
    losses = [
        h["loss"]
        for h in json.loads((repo / "outputs" / "my_scans" / "trainer_state.json").read_text())["log_history"]
        if "loss" in h
    ]
    assert losses[-1] < losses[0] / 3


GPU_COMMAND = r"ACCELERATE_CONFIG=|^accelerate launch|^docvlm launch|^make bench(?!-cpu)|^sbatch"


def documented_gpu_commands() -> list[str]:
    """The commands of README.md and docs/ that need a GPU: the launches on several GPUs or machines, `make bench`,
    and the real recipes (text blocks included, which the walkthrough tests do not run)."""
    found = []
    for doc in (README, *sorted((ROOT / "docs").glob("*.md"))):
        for block in re.findall(r"```(?:bash|text)\n(.*?)```", doc.read_text(), flags=re.S):
            for command in readme_commands(f"```bash\n{block}```"):
                gpu = re.search(
                    r"ACCELERATE_CONFIG=|^accelerate launch|^docvlm launch|^make bench(?!-cpu)|^sbatch", command
                )
                if gpu and "<" not in command:
                    found.append(without_comment(command))
    return found


GPU_COMMAND_STOPS = r"Could not reach the Hugging Face Hub|needs a CUDA GPU|DeepSpeed, which is not installed"
SEVERAL_MACHINES = r"--num_machines [2-9]|^sbatch"


@pytest.mark.slow
@pytest.mark.parametrize("command", documented_gpu_commands())
def test_every_documented_gpu_command_passes_its_checks_before_loading_on_a_cpu(command, tmp_path):
    """Run as written with the Hub unreachable: it must stop where a CPU machine must (the Hub, no CUDA GPU,
    DeepSpeed not installed), having passed the recipe's and the launch's own checks, and say so once."""
    if re.search(SEVERAL_MACHINES, command):
        pytest.skip("needs several machines: a second node to meet at --main_process_ip")
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip(f"needs the tests to run from a virtual environment (`make test`); {sys.prefix} is not one")
    repo = copy_of_the_repository(tmp_path / "repo")
    (Path(sys.prefix) / ".installed").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VIRTUAL_ENV", "PYTEST"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"))
    env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env["PATH"]])
    done = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and re.search(GPU_COMMAND_STOPS, output), output[-3000:]
    assert "Traceback" not in output and len(re.findall(r"docvlm[\w ]*: error:", output)) <= 1, output[-3000:]
