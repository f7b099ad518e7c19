"""The recipe's --help: the recipe and its sections first, every name a real field, cached for a fast answer."""

import re
import subprocess
import sys
import time
from dataclasses import fields

import pytest

from docvlm.recipe.help import HELP_OVERRIDES, HIDDEN_FIELDS, cached_help, format_help, sections
from docvlm.recipe.parse import parse_recipe
from docvlm.recipe.schema import RECIPE_DATACLASSES


@pytest.mark.integration
def test_help_lists_the_recipe_fields_and_says_nothing_else_when_rendered_anew(tmp_path):
    import os

    fresh = {**os.environ, "DOCVLM_CACHE": str(tmp_path)}  # no rendered help: the ML libraries are imported for it
    argv = [sys.executable, "-m", "docvlm.train", "--help"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=fresh)
    assert out.returncode == 0 and out.stderr == "", out.stderr  # no library's import-time message
    assert out.stdout == format_help() + "\n"
    for name in (
        "--config",
        "--question_column",
        "--answers_column",
        "--lora_target_regex",
        "--load_in_4bit",
        "--precision",
        "--learning_rate",
        "--max_train_samples",
    ):
        assert name in out.stdout, name


def _field_names() -> set[str]:
    return {f.name for cls in RECIPE_DATACLASSES for f in fields(cls) if f.init}


def _entry(help_text: str, name: str) -> str:
    """The help of one flag: its line and the continuation lines in the help column."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  --{name} "))
    end = start + 1
    while end < len(lines) and lines[end].startswith(" " * 10):
        end += 1
    return "\n".join(lines[start:end])


def test_help_starts_with_the_recipe_and_stays_short():
    lines = format_help().splitlines()
    assert "--config recipes/<recipe>.yaml" in lines[0]
    config = next(i for i, line in enumerate(lines) if line.lstrip().startswith("--config"))
    assert config < 8 and "override" in _entry(format_help(), "config recipes/<recipe>.yaml")
    assert len(lines) < 150


def test_help_puts_docvlm_fields_before_trainer_fields():
    lines = format_help().splitlines()
    precision = next(i for i, line in enumerate(lines) if line.startswith("  --precision "))
    learning_rate = next(i for i, line in enumerate(lines) if line.startswith("  --learning_rate "))
    assert precision < learning_rate  # Training opens with docvlm's fields, then the trainer's
    assert "--adam_beta1" not in format_help()
    every = format_help(all_fields=True)
    assert every.index("--precision ") < every.index("--adam_beta1 ")
    assert "see --help-all" in lines[-1]


def test_help_never_lists_refused_or_unused_fields():
    for text in (format_help(), format_help(all_fields=True)):
        assert "--hub_token" not in text and "--dataset_text_field" not in text
        for name in HIDDEN_FIELDS:
            assert not re.search(rf"--{name}\b", text), name


def test_help_shows_one_form_of_each_bool():
    for text in (format_help(), format_help(all_fields=True)):
        assert not [line for line in text.splitlines() if line.lstrip().startswith("--no_")]
    entry = _entry(format_help(), "eval_after_training")
    assert "{true,false} = true" in entry and "Run the generation evaluation" in entry


def test_help_shows_choices_and_each_default_once():
    text = format_help()
    assert "{auto,bf16,fp16,fp32} = auto" in _entry(text, "precision")
    assert "{first,random} = random" in _entry(text, "answer_choice")
    adapter = _entry(text, "adapter")
    assert adapter.count("default") + adapter.count("= ") <= 1 and "output_dir" in adapter
    assert all(len(line) <= 120 for line in text.splitlines())


def test_help_sections_name_real_fields():
    known = _field_names()
    listed = [name for _, names in sections() for name in names]
    assert len(listed) == len(set(listed))
    assert set(listed) <= known, set(listed) - known
    assert HIDDEN_FIELDS <= known, HIDDEN_FIELDS - known
    assert set(HELP_OVERRIDES) <= known, set(HELP_OVERRIDES) - known
    assert not set(listed) & HIDDEN_FIELDS
    text = format_help()
    for name in listed:
        assert f"  --{name} " in text, name


def test_help_lists_every_field_docvlm_declares_and_each_switch_in_its_own_section():
    """docvlm's own fields (those TRL and transformers do not declare), the switches' included, are all in --help."""
    import dataclasses

    from trl import ModelConfig, ScriptArguments, SFTConfig

    from docvlm import speedups
    from docvlm.recipe.schema import RECIPE_DATACLASSES

    inherited = {f.name for cls in (ScriptArguments, ModelConfig, SFTConfig) for f in dataclasses.fields(cls)}
    own = {f.name for cls in RECIPE_DATACLASSES for f in dataclasses.fields(cls)} - inherited
    text = format_help()
    assert [name for name in sorted(own) if f"  --{name} " not in text] == []
    section = dict(sections())["Memory and speed"]
    assert list(section) == [setting.name for switch in speedups.SWITCHES for setting in switch.settings]


def test_help_all_lists_every_other_field():
    text = format_help(all_fields=True)
    for name in _field_names() - HIDDEN_FIELDS:
        assert re.search(rf"^  --{name} ", text, flags=re.M), name
    assert all(len(line) <= 120 for line in text.splitlines())


def test_help_takes_a_preface():
    text = format_help(preface="usage: docvlm eval --config recipes/<recipe>.yaml [--adapter DIR]")
    assert text.startswith("usage: docvlm eval") and "--adapter" in text


@pytest.mark.parametrize("flag", ["-h", "--help", "--help-all"])
def test_parse_recipe_prints_the_help_and_exits_0(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_recipe(["--config", "recipes/tiny_docvqa.yaml", flag])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == format_help(all_fields=flag == "--help-all") + "\n"


def test_help_is_cached_per_installed_version_and_answers_without_importing_trl(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCVLM_CACHE", str(tmp_path))
    assert cached_help() == format_help()
    cached = list((tmp_path / "help").glob("*.txt"))
    assert len(cached) == 1 and cached[0].read_text() == format_help()
    assert cached_help(all_fields=True) == format_help(all_fields=True)
    assert len(list((tmp_path / "help").glob("*.txt"))) == 2  # one entry per text, never one for both
    probe = "import sys\nfrom docvlm.train import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
    probe += "print('TRL' if 'trl' in sys.modules else 'NO TRL', file=sys.stderr)"
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert run.stdout == format_help() + "\n" and "NO TRL" in run.stderr, run.stderr
    assert time.monotonic() - started < 10  # ~0.2 s; TRL alone takes ~10 s to import on a 2-core CPU
