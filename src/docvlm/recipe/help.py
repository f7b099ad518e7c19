"""The recipe's `--help`: the recipe first, then its fields section by section, then a count of the rest.

HfArgumentParser's own help lists hundreds of lines, TRL's and transformers' fields first and docvlm's last, with a
`--no_` twin (carrying the wrong help) for every true-by-default bool. Rendering needs the recipe's dataclasses, i.e.
importing TRL (seconds on a small CPU), so the rendered text is cached per installed version of docvlm's recipe
schema, TRL, transformers and peft: a later `--help` answers without importing them.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import textwrap
import types
import typing
from dataclasses import MISSING, Field, fields
from enum import Enum
from functools import cache
from importlib import metadata, util
from pathlib import Path
from typing import Literal

from docvlm.recipe.help_sections import CONFIG_HELP, HELP_OVERRIDES, HELP_SECTIONS, HIDDEN_FIELDS

TRAIN_PREFACE = """usage: python -m docvlm.train --config recipes/<recipe>.yaml [--<field> <value> ...]

Fine-tune a vision-language model on document question answering, e.g.
  accelerate launch -m docvlm.train --config recipes/docvqa_qlora.yaml --learning_rate 2e-4 --output_dir out"""

HELP_WIDTH = 120
NAME_COLUMN = 34  # where the help column starts


def format_help(all_fields: bool = False, preface: str = TRAIN_PREFACE) -> str:
    """The recipe's --help: `preface` (usage and what the command does), --config, then the sections.

    `all_fields` (--help-all) appends every other field, one line each."""
    from docvlm.recipe.schema import TrainConfig

    listed = {name for _, names in sections() for name in names}
    others = [name for name in _field_index() if name not in listed and name not in HIDDEN_FIELDS]
    blocks = [
        preface.strip("\n"),
        "\n".join(line for flags, text in CONFIG_HELP for line in _format_entry(flags, text)),
    ]
    # the switches' section a line a field, their whole help with --help-all
    blocks += [
        _format_section(title, names, brief=title == SWITCHES_TITLE and not all_fields) for title, names in sections()
    ]
    if all_fields:
        blocks += _format_other_fields(others)
    else:
        trainer = sum(_field_index()[name][0] is TrainConfig for name in others)
        blocks.append(
            f"{len(others)} more fields, {trainer} of them trainer fields (TRL's SFTConfig, transformers' "
            "TrainingArguments): see --help-all."
        )
    return "\n\n".join(blocks)


SWITCHES_TITLE = "Memory and speed"


def sections() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """HELP_SECTIONS, with the memory and speed switches' fields after Training, in their registry's order."""
    from docvlm.speedups import SWITCHES

    switches = (SWITCHES_TITLE, tuple(setting.name for switch in SWITCHES for setting in switch.settings))
    position = next(i for i, (title, _) in enumerate(HELP_SECTIONS) if title == "Training") + 1
    return (*HELP_SECTIONS[:position], switches, *HELP_SECTIONS[position:])


def exit_on_help(argv: list[str], preface: str = TRAIN_PREFACE) -> None:
    """Print the help and exit 0, as argparse does, when argv asks for it (-h, --help or --help-all)."""
    if "--help-all" in argv:
        print(cached_help(all_fields=True, preface=preface))
        raise SystemExit(0)
    if "-h" in argv or "--help" in argv:
        print(cached_help(preface=preface))
        raise SystemExit(0)


def cached_help(all_fields: bool = False, preface: str = TRAIN_PREFACE) -> str:
    """format_help's text, from the cache when it was rendered for exactly the installed schema and libraries."""
    path = _cache_path(all_fields, preface)
    if path is not None and path.is_file():
        return path.read_text()
    text = format_help(all_fields, preface)
    if path is not None:
        try:  # a read-only cache only costs speed
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError:
            pass
    return text


def _cache_path(all_fields: bool, preface: str) -> Path | None:
    """A file named by a hash of everything the help text is made of; None when a source can't be read."""
    key = hashlib.sha256()
    try:
        for package in ("docvlm.recipe", "docvlm.speedups"):  # the schema, the help, and the switches' fields
            for source in sorted(Path(util.find_spec(package).origin).parent.glob("*.py")):
                key.update(source.read_bytes())
        for package in ("trl", "transformers", "peft"):
            key.update(f"{package}=={metadata.version(package)}".encode())
    except (OSError, AttributeError, metadata.PackageNotFoundError):
        return None
    key.update(f"{all_fields}|{preface}|{sys.version_info[:2]}".encode())
    from docvlm.runtime import cache_root

    return cache_root() / "help" / f"{key.hexdigest()[:24]}.txt"


@cache
def _field_index() -> dict[str, tuple[type, Field, object]]:
    """Every command-line field of the recipe: name -> (its dataclass, the Field, its resolved type)."""
    from docvlm.recipe.schema import RECIPE_DATACLASSES

    index = {}
    for cls in RECIPE_DATACLASSES:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.init and f.name not in index:  # HfArgumentParser skips init=False fields too
                index[f.name] = (cls, f, hints[f.name])
    return index


def _format_section(title: str, names: tuple[str, ...], brief: bool = False) -> str:
    """A titled block: for each field its flag, then type, default and help wrapped in the help column (`brief`: one
    line a field)."""
    lines = [f"{title}:"]
    for name in names:
        if brief:
            lines.append(_one_line(name))
            continue
        text = " ".join(filter(None, (_field_spec(name), _field_default(name)))) + "  " + _field_help(name)
        lines += _format_entry(f"--{name}", text)
    return "\n".join(lines)


def _one_line(name: str) -> str:
    """A field on one line: its flag, type and default, and its help's first sentence, cut to fit."""
    flag = f"  --{name}"
    flag = flag.ljust(NAME_COLUMN) if len(flag) + 2 <= NAME_COLUMN else flag + "  "
    head = flag + " ".join(filter(None, (_field_spec(name, short=True), _field_default(name)))) + "  "
    sentence = _first_sentence(_field_help(name))
    room = max(HELP_WIDTH - len(head), 20)
    return head + (textwrap.shorten(sentence, room, placeholder=" ...") if len(sentence) > room else sentence)


def _format_entry(flags: str, text: str) -> list[str]:
    """argparse's layout: the flags, then `text` wrapped in the help column (on the next line if the flags are long)."""
    flags = f"  {flags}"
    wrapped = textwrap.wrap(text, HELP_WIDTH - NAME_COLUMN, break_long_words=False, break_on_hyphens=False)
    if len(flags) + 2 > NAME_COLUMN:
        lines = [flags]
    else:
        lines = [flags.ljust(NAME_COLUMN) + wrapped.pop(0)]
    return lines + [" " * NAME_COLUMN + line for line in wrapped]


def _format_other_fields(names: list[str]) -> list[str]:
    """--help-all's extra blocks, one per dataclass: one line a field, its help cut to the first sentence."""
    from docvlm.recipe.schema import DataArguments, EvalArguments, ModelArguments, TrainConfig

    titles = {
        DataArguments: "More data fields (TRL's ScriptArguments)",
        ModelArguments: "More model fields (TRL's ModelConfig)",
        TrainConfig: "More training fields (TRL's SFTConfig, transformers' TrainingArguments)",
        EvalArguments: "More evaluation fields",
    }
    blocks = []
    for cls, title in titles.items():
        lines = []
        for name in (n for n in names if _field_index()[n][0] is cls):
            lines.append(_one_line(name))
        if lines:
            blocks.append("\n".join([f"{title}:", *lines]))
    return blocks


def _field_spec(name: str, short: bool = False) -> str:
    """What the flag takes: {choice,...} from Literal, Enum or metadata choices, {true,false}, INT, STR [STR ...].

    A long list of choices is wrapped at ', ' or, `short` (one-line listings), cut to its first few."""
    _, f, hint = _field_index()[name]
    choices = f.metadata.get("choices")
    kind = _unwrap_optional(hint)
    if choices is None and typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
    elif choices is None and isinstance(kind, type) and issubclass(kind, Enum):
        choices = [member.value for member in kind]
    elif kind is bool:
        choices = ("true", "false")
    if choices is not None:
        joined = ",".join(str(choice) for choice in choices)
        if len(joined) > 40 and short:
            joined = joined[: joined.rfind(",", 0, 40)] + ",..."
        elif len(joined) > 40:
            joined = joined.replace(",", ", ")
        return "{" + joined + "}"
    if typing.get_origin(kind) is list:
        item = _unwrap_optional(typing.get_args(kind)[0]) if typing.get_args(kind) else str
        word = getattr(item, "__name__", "value").upper()
        return f"{word} [{word} ...]"
    if kind is dict or typing.get_origin(kind) is dict:
        return "JSON"
    return {int: "INT", float: "FLOAT", str: "STR"}.get(kind, "VALUE")


def _unwrap_optional(hint):
    """The first non-None member of a Union (`int | None` -> int); other hints unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _field_default(name: str) -> str:
    """'= X' for the default X, or '' when the field has none or None (unset), so a help's own default reads alone."""
    _, f, _ = _field_index()[name]
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    if value is MISSING or value is None or value in ("", [], {}):
        return ""
    if isinstance(value, bool):
        value = str(value).lower()
    elif isinstance(value, Enum):
        value = value.value
    elif isinstance(value, list):
        value = " ".join(map(str, value))
    elif isinstance(value, str) and " " in value:
        value = repr(value)
    return f"= {value}"


def _field_help(name: str) -> str:
    """The field's help (docvlm's override first), on one line, with argparse's %% escapes undone.

    Sentences that only list the options ("Options: 'no', 'steps'.", "See `SchedulerType` for all possible values.")
    are dropped: the flag's {choices} already show them."""
    _, f, _ = _field_index()[name]
    text = HELP_OVERRIDES.get(name) or f.metadata.get("help", "")
    if _field_spec(name).startswith("{"):
        text = re.sub(r"\s*(Options: [^.]*|See `\w+` for all possible values)\.", "", text)
    return " ".join(text.replace("%%", "%").split())


def _first_sentence(text: str) -> str:
    """Up to the first '. ' that is followed by a capital letter, so 'e.g. lm_head' stays whole."""
    return re.split(r"(?<=[.!?])\s+(?=[A-Z`'\"(])", text, maxsplit=1)[0]
