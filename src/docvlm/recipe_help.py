"""The recipe's `--help`: the recipe first, then its fields section by section, then a count of the rest.

HfArgumentParser's own help lists ~840 lines, TRL's and transformers' fields first and docvlm's last, with a `--no_`
twin (carrying the wrong help) for every true-by-default bool. Rendering needs the recipe's dataclasses, i.e.
importing TRL (~10 s on a 2-core CPU), so the rendered text is cached per installed version of docvlm's recipe
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

TRAIN_PREFACE = """usage: python -m docvlm.train --config recipes/<recipe>.yaml [--<field> <value> ...]

Fine-tune a vision-language model on document question answering, e.g.
  accelerate launch -m docvlm.train --config recipes/docvqa_qlora.yaml --learning_rate 2e-4 --output_dir out"""

CONFIG_HELP = (
    (
        "--config recipes/<recipe>.yaml",
        "The recipe: a YAML file of `field: value` lines, for any field below. Flags on the command line override "
        "it: --<field> <value>.",
    ),
    ("-h, --help, --help-all", "This help; --help-all also lists every other field."),
)

# The fields a recipe usually sets, by section, in the order they are shown. Names must be fields of
# RECIPE_DATACLASSES (tests/test_recipe_help.py checks it); every other field is listed by --help-all.
HELP_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Model",
        (
            "model_name_or_path",
            "model_revision",
            "dtype",
            "do_image_splitting",
            "image_longest_edge",
            "image_shortest_edge",
            "attn_implementation",
            "trust_remote_code",
        ),
    ),
    (
        "Quantization",
        (
            "load_in_4bit",
            "bnb_4bit_quant_type",
            "use_bnb_nested_quant",
            "bnb_4bit_compute_dtype",
            "bnb_4bit_skip_modules",
            "bnb_4bit_quant_storage",
        ),
    ),
    (
        "LoRA",
        (
            "use_peft",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_init",
            "lora_target_regex",
            "lora_target_modules",
            "lora_modules_to_save",
        ),
    ),
    (
        "Data",
        (
            "dataset_name",
            "dataset_config",
            "dataset_train_split",
            "dataset_test_split",
            "data_files",
            "json_field",
            "eval_split_size",
            "eval_split_seed",
            "eval_split_by",
            "image_column",
            "question_column",
            "answers_column",
            "field_questions",
            "qa_pairs_column",
            "messages_column",
            "answer_choice",
            "instruction",
            "system_prompt",
            "group_column",
            "on_bad_example",
            "max_train_samples",
            "max_eval_samples",
        ),
    ),
    (
        "Training",
        (
            # docvlm's own
            "precision",
            "loss_logits",
            "vision_tower_no_grad",
            "vision_tower_pages",
            "vision_feature_cache",
            "connector_checkpointing",
            "connector_checkpoint_pages",
            "connector_lean_activations",
            "cudnn_attention",
            "cuda_expandable_segments",
            # TRL's / transformers' most used
            "output_dir",
            "num_train_epochs",
            "max_steps",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "effective_batch_size",
            "learning_rate",
            "lr_scheduler_type",
            "warmup_steps",
            "weight_decay",
            "max_length",
            "gradient_checkpointing",
            "dataloader_num_workers",
            "logging_steps",
            "save_strategy",
            "save_steps",
            "save_total_limit",
            "eval_strategy",
            "eval_steps",
            "metric_for_best_model",
            "load_best_model_at_end",
            "resume_from_checkpoint",
            "seed",
            "report_to",
            "push_to_hub",
            "hub_model_id",
        ),
    ),
    (
        "Evaluation",
        (
            "eval_after_training",
            "eval_compare_base",
            "eval_max_new_tokens",
            "eval_anls_samples",
            "adapter",
            "eval_output_dir",
        ),
    ),
)

# Fields that --help never lists, not even --help-all: what docvlm refuses or never reads.
HIDDEN_FIELDS = frozenset(
    {
        # refused by parse_recipe: a secret on the command line or in a recipe ends up in logs and recipe.yaml
        "hub_token",
        # TRL's text-SFT dataset preparation and default collator. docvlm loads its data itself (docvlm.data), its
        # rows have an image, so TRL skips preparation, and docvlm.collator.DocVQACollator replaces TRL's collator;
        # packing, padding_free and assistant_only_loss are even refused by TRL for such data.
        "dataset_text_field",
        "dataset_kwargs",
        "dataset_num_proc",
        "shuffle_dataset",
        "packing",
        "packing_strategy",
        "eval_packing",
        "padding_free",
        "pad_to_multiple_of",
        "pad_token",
        "completion_only_loss",
        "assistant_only_loss",
        "truncation_mode",
        # read by TRL only when the model is given by name; docvlm hands SFTTrainer a loaded model
        "model_init_kwargs",
        # TRL-script fields that docvlm never reads (see docvlm.data and docvlm.modeling.lora_config)
        "dataset_streaming",
        "ignore_bias_buffers",
        "lora_target_parameters",
    }
)

# docvlm's wording for inherited fields whose TRL / transformers help is wrong or misleading here.
HELP_OVERRIDES = {
    "model_name_or_path": "The base model: a Hub id or a local folder.",
    "model_revision": "The base model's branch, tag or commit.",
    "attn_implementation": "The attention kernel: eager, sdpa, flash_attention_2 (pip install flash-attn).",
    "trust_remote_code": "Allow models and processors that ship custom code on the Hub.",
    "load_in_4bit": "Load the base model in 4 bit (QLoRA); works only with LoRA.",
    "bnb_4bit_quant_storage": "The dtype that stores the 4-bit weights (unset: uint8; under DeepSpeed ZeRO-3, the "
    "training dtype, set by docvlm).",
    "use_peft": "Train a LoRA adapter; false fine-tunes all the weights.",
    "dataset_name": "A Hub id, a local table file or folder (of tables, or of pages with a metadata.csv), or "
    "docvlm:tiny-docs.",
    "dataset_config": "The dataset configuration name (the `name` argument of datasets.load_dataset).",
    "dataset_train_split": "The split to train on.",
    "dataset_test_split": "The held-out split, for evaluation.",
    "max_steps": "Total optimizer steps; when positive, overrides num_train_epochs.",
    "gradient_accumulation_steps": "Micro-batches per optimizer step; the batch is per-GPU batch x GPUs x this.",
    "warmup_steps": "Linear warmup steps (a float below 1: that fraction of all steps).",
    "max_length": "Longest sample in tokens (image tokens included). A longer sample is an error: image tokens "
    "cannot be truncated.",
    "gradient_checkpointing": "Recompute the decoder's activations in the backward pass: less memory, slower steps.",
    "weight_decay": "Weight decay of the optimizer (biases and norm weights excluded).",
    "dataloader_num_workers": "Processes that load and decode the pages (0: the training process does it).",
    "logging_steps": "Log every N steps (a float below 1: that fraction of all steps).",
    "save_steps": "Checkpoint every N steps (a float below 1: that fraction of all steps).",
    "save_total_limit": "Keep at most N checkpoints in output_dir, deleting the oldest.",
    "eval_steps": "Evaluate every N steps (a float below 1: that fraction of all steps; unset: logging_steps).",
    "metric_for_best_model": "What load_best_model_at_end picks by: loss, or anls / exact_match (eval_anls_samples).",
    "load_best_model_at_end": "Keep the best evaluation's checkpoint as the run's adapter (saves with evaluations).",
    "resume_from_checkpoint": "Resume from this checkpoint folder, or true / latest: the newest in output_dir.",
    "report_to": "Where to log: none, all (installed integrations), tensorboard, wandb...",
    "push_to_hub": "Push checkpoints, then the adapter and evaluation report, to hub_model_id (needs HF_TOKEN or "
    "`hf auth login`).",
}

HELP_WIDTH = 120
NAME_COLUMN = 34  # where the help column starts


def format_help(all_fields: bool = False, preface: str = TRAIN_PREFACE) -> str:
    """The recipe's --help: `preface` (usage and what the command does), --config, then the sections.

    `all_fields` (--help-all) appends every other field, one line each."""
    from docvlm.config import TrainConfig

    listed = {name for _, names in HELP_SECTIONS for name in names}
    others = [name for name in _field_index() if name not in listed and name not in HIDDEN_FIELDS]
    blocks = [
        preface.strip("\n"),
        "\n".join(line for flags, text in CONFIG_HELP for line in _format_entry(flags, text)),
    ]
    blocks += [_format_section(title, names) for title, names in HELP_SECTIONS]
    if all_fields:
        blocks += _format_other_fields(others)
    else:
        trainer = sum(_field_index()[name][0] is TrainConfig for name in others)
        blocks.append(
            f"{len(others)} more fields, {trainer} of them trainer fields (TRL's SFTConfig, transformers' "
            "TrainingArguments): see --help-all."
        )
    return "\n\n".join(blocks)


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
        for module in ("docvlm.config", "docvlm.recipe_help"):
            key.update(Path(util.find_spec(module).origin).read_bytes())
        for package in ("trl", "transformers", "peft"):
            key.update(f"{package}=={metadata.version(package)}".encode())
    except (OSError, AttributeError, metadata.PackageNotFoundError):
        return None
    key.update(f"{all_fields}|{preface}|{sys.version_info[:2]}".encode())
    from docvlm.tiny import cache_root

    return cache_root() / "help" / f"{key.hexdigest()[:24]}.txt"


@cache
def _field_index() -> dict[str, tuple[type, Field, object]]:
    """Every command-line field of the recipe: name -> (its dataclass, the Field, its resolved type)."""
    from docvlm.config import RECIPE_DATACLASSES

    index = {}
    for cls in RECIPE_DATACLASSES:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.init and f.name not in index:  # HfArgumentParser skips init=False fields too
                index[f.name] = (cls, f, hints[f.name])
    return index


def _format_section(title: str, names: tuple[str, ...]) -> str:
    """A titled block: for each field its flag, then type, default and help wrapped in the help column."""
    lines = [f"{title}:"]
    for name in names:
        text = " ".join(filter(None, (_field_spec(name), _field_default(name)))) + "  " + _field_help(name)
        lines += _format_entry(f"--{name}", text)
    return "\n".join(lines)


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
    from docvlm.config import DataArguments, EvalArguments, ModelArguments, TrainConfig

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
            flag = f"  --{name}"
            flag = flag.ljust(NAME_COLUMN) if len(flag) + 2 <= NAME_COLUMN else flag + "  "
            head = flag + " ".join(filter(None, (_field_spec(name, short=True), _field_default(name)))) + "  "
            sentence = _first_sentence(_field_help(name))
            room = max(HELP_WIDTH - len(head), 20)
            lines.append(
                head + (textwrap.shorten(sentence, room, placeholder=" ...") if len(sentence) > room else sentence)
            )
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
