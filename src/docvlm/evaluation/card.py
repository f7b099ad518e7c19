"""Model cards (README.md) for a training run's adapter and for a merged model.

TRL's and peft's cards are templates for text models ("fine-tuned version of [None]", a text-generation pipeline,
`licence: license`). These say what was trained on what, how to use it, and which evaluation numbers belong to
exactly the weights in the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

REPORT_FILE = "report.json"
CARD_FILE = "README.md"
SMALL_HELD_OUT = 50  # questions: below it, a few answers move ANLS by several points


def small_held_out_note(count: int) -> str | None:
    """A warning for a held-out split too small for its ANLS to mean much, else None."""
    if count >= SMALL_HELD_OUT:
        return None
    return (
        f"Only {count} held-out questions: each answer moves ANLS by {1 / max(count, 1):.0%}, so treat these figures "
        f"as rough. Hold out more pages (eval_split_size) for a number to act on; {SMALL_HELD_OUT} questions or more."
    )


def hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id (owner/name), else None: local paths and fixtures are not linked."""
    if not name or name.startswith(("/", ".", "~", "docvlm:")) or name.count("/") != 1:
        return None
    return name


def _metadata(model_args, data_args, merged: bool) -> list[str]:
    base, dataset = hub_id(model_args.model_name_or_path), hub_id(data_args.dataset_name)
    tags = ["docvlm", "document-question-answering", "lora", "qlora" if model_args.load_in_4bit else None]
    return [
        "---",
        f"library_name: {'transformers' if merged else 'peft'}",
        "pipeline_tag: image-text-to-text",
        *([f"base_model: {base}"] if base else []),
        *([f"datasets: [{dataset}]"] if dataset else []),
        f"tags: [{', '.join(t for t in tags if t)}{', merged' if merged else ''}]",
        "---",
        "",
    ]


def _row_shape(data_args) -> str:
    if data_args.messages_column:
        return f"conversations in `{data_args.messages_column}`, every assistant turn trained"
    if data_args.field_questions:
        return "fields asked as questions: " + ", ".join(f"`{column}`" for column in data_args.field_questions)
    if data_args.qa_pairs_column:
        return f"question/answer pairs in `{data_args.qa_pairs_column}`"
    return f"question `{data_args.question_column}`, answers `{data_args.answers_column}`"


def _training_lines(model_args, data_args) -> list[str]:
    quant = (
        f"{model_args.bnb_4bit_quant_type.upper()} 4-bit base (QLoRA)" if model_args.load_in_4bit else "16/32-bit base"
    )
    return [
        f"- Base model: `{model_args.model_name_or_path}`.",
        f"- Trained with docvlm: LoRA r={model_args.lora_r}, alpha={model_args.lora_alpha} on a {quant}.",
        f"- Data: `{data_args.dataset_name}`, split `{data_args.dataset_train_split}` ({_row_shape(data_args)}).",
        (f"- System turn: `{data_args.system_prompt}`." if data_args.system_prompt else "- No system turn."),
        f"- Prompt: the user turn is `{data_args.instruction}`, the page(s), then the question; the answer ends with "
        "the model's end-of-turn token.",
        "- `recipe.yaml` holds every setting of the run.",
    ]


def _report_table(report: dict) -> list[str]:
    lines = ["| system | ANLS | exact match |", "|---|---|---|"]
    titles = {"blind": "question-only guess (no image)", "before": "base model", "after": "base + this adapter"}
    for system, scores in report.get("systems", {}).items():
        lines.append(f"| {titles.get(system, system)} | {scores['anls']:.3f} | {scores['exact_match']:.3f} |")
    return lines


def _held_out_lines(report: dict) -> list[str]:
    """Where the held-out questions came from, and a warning when they are too few."""
    lines = []
    held = (report.get("data") or {}).get("held_out")
    if held:
        lines += [
            "",
            f"The held-out questions are about {held_out_units(held)} drawn from the training data (eval_split_size "
            f"{held['eval_split_size']:g}), none of them trained on.",
        ]
    note = small_held_out_note(report.get("count") or 0)
    return lines + (["", f"**{note}**"] if note else [])


def held_out_units(held: dict) -> str:
    """'4 pages', or '3 documents (7 pages)', from report.json's data.held_out."""
    text = f"{held['held_out_units']} {held['unit']}"
    return text if held["unit"] == "pages" else f"{text} ({held['held_out_pages']} pages)"


def read_report(folder: Path) -> dict | None:
    path = Path(folder) / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def adapter_card(model_args, data_args, folder: Path) -> str:
    """The card of a training run's folder: the adapter and the numbers measured with it."""
    report = read_report(folder)
    lines = _metadata(model_args, data_args, merged=False)
    lines += [f"# LoRA adapter for `{model_args.model_name_or_path}`: document question answering", ""]
    lines += _training_lines(model_args, data_args)
    if report:
        lines += [
            "",
            f"## Evaluation: {report.get('count')} held-out questions (split `{report.get('split')}`)",
            "",
            "Measured on these weights: the base model loaded as in training, with and without this adapter; "
            "greedy answers scored with DocVQA's ANLS.",
            *_held_out_lines(report),
            "",
            *_report_table(report),
        ]
    else:
        lines += ["", "## Evaluation", "", "Not evaluated yet: `docvlm eval --config recipe.yaml --adapter <folder>`."]
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        'docvlm predict --adapter <this folder> --image page.png --question "What is the total?"',
        "docvlm merge --adapter <this folder> --out merged/   # one standalone model",
        "```",
    ]
    return "\n".join(lines) + "\n"


def merged_card(model_args, data_args, adapter_dir: Path, dtype: str, base: str) -> str:
    """The card of a merged model. `base`: 'dequantized' (the 4-bit weights the adapter was trained on) or
    'original' (the base's own 16-bit weights), which decides whether the adapter's numbers carry over."""
    report = read_report(adapter_dir)
    lines = _metadata(model_args, data_args, merged=True)
    lines += [f"# `{model_args.model_name_or_path}` fine-tuned for document question answering", ""]
    lines += _training_lines(model_args, data_args)
    if base == "dequantized":
        how = (
            f"the adapter was merged into the {dtype} dequantization of the 4-bit base it was trained on, so this "
            "model computes what base + adapter computed in training, up to rounding"
        )
    else:
        how = (
            f"the adapter was merged into the base model's original {dtype} weights, not the 4-bit ones it was "
            "trained on, so its answers differ from the adapter's"
        )
    lines += [f"- Merged: {how}."]
    if report:
        lines += [
            "",
            f"## Evaluation of the adapter: {report.get('count')} held-out questions (split `{report.get('split')}`)",
            "",
            "These numbers were measured on the 4-bit base + adapter before merging, not on this folder's weights.",
        ]
        if base != "dequantized":
            lines += ["`docvlm merge --base dequantized` (the default) keeps the adapter's behaviour."]
        lines += ["", *_report_table(report)]
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        'docvlm predict --model <this folder> --image page.png --question "What is the total?"',
        "```",
        "",
        "or with transformers alone: `AutoModelForImageTextToText.from_pretrained(<this folder>)` and "
        "`AutoProcessor.from_pretrained(<this folder>)`.",
    ]
    return "\n".join(lines) + "\n"
