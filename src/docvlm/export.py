"""Use a trained adapter: load it for inference, merge it into the base weights, push a folder to the Hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from docvlm.config import DataArguments, EvalArguments, ModelArguments, UserError

RECIPE_FILE = "recipe.yaml"


def read_run_recipe(folder: Path) -> tuple[ModelArguments, DataArguments, EvalArguments]:
    """The model/data/eval fields of the recipe saved with a run (train writes it; merge copies it)."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: point at a folder written by `docvlm train` or `docvlm merge`.")
    values = yaml.safe_load(path.read_text()) or {}

    def build(cls):
        from dataclasses import fields

        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in values.items() if k in names})

    return build(ModelArguments), build(DataArguments), build(EvalArguments)


def load_for_inference(adapter: str | None = None, model: str | None = None):
    """(model, processor, instruction, max_new_tokens) from an adapter folder (4-bit base + adapter, as trained)
    or from a merged model folder."""
    from transformers import AutoProcessor

    from docvlm.modeling import inference_dtype, load_model, load_processor, model_path

    if bool(adapter) == bool(model):
        raise UserError("Give exactly one of --adapter (a training output folder) and --model (a merged folder).")
    folder = Path(adapter or model)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder.")
    model_args, data_args, eval_args = read_run_recipe(folder)
    if adapter:
        from peft import PeftModel

        base = model_path(model_args)
        processor = load_processor(model_args, str(folder))
        network = PeftModel.from_pretrained(load_model(model_args, inference_dtype(), base), str(folder))
    else:
        processor = AutoProcessor.from_pretrained(str(folder))
        merged = ModelArguments(dtype="auto", attn_implementation=model_args.attn_implementation)
        network = load_model(merged, inference_dtype(), str(folder), quantize=False)
    return network.eval(), processor, data_args.instruction, eval_args.eval_max_new_tokens


def merge(adapter: str, out: str, dtype: str = "auto") -> Path:
    """Reload the base in 16/32-bit (not 4-bit), fold the adapter in, save safetensors + processor + model card."""
    from peft import PeftModel

    from docvlm.modeling import inference_dtype, load_model, load_processor, model_path, resolve_dtype

    adapter_dir, out_dir = Path(adapter), Path(out)
    if out_dir.resolve() == adapter_dir.resolve():
        raise UserError("--out must be a new folder, not the adapter folder.")
    model_args, data_args, _ = read_run_recipe(adapter_dir)
    base = model_path(model_args)
    weights_dtype = resolve_dtype(dtype, inference_dtype())
    plain = ModelArguments(
        model_revision=model_args.model_revision, dtype="auto", attn_implementation=model_args.attn_implementation
    )
    network = load_model(plain, weights_dtype, base, quantize=False)
    merged = PeftModel.from_pretrained(network, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    load_processor(model_args, str(adapter_dir)).save_pretrained(out_dir)
    shutil.copy(adapter_dir / RECIPE_FILE, out_dir / RECIPE_FILE)
    report = adapter_dir / "report.json"
    if report.is_file():
        shutil.copy(report, out_dir / "report.json")
    (out_dir / "README.md").write_text(model_card(model_args, data_args, adapter_dir, weights_dtype))
    return out_dir


def model_card(model_args: ModelArguments, data_args: DataArguments, adapter_dir: Path, dtype: torch.dtype) -> str:
    base = model_args.model_name_or_path
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        *([f"base_model: {base}"] if base and "/" in base and not base.startswith(("/", ".", "docvlm:")) else []),
        "tags: [docvlm, document-question-answering, lora, merged]",
        "---",
        "",
        f"# {base} fine-tuned for document question answering",
        "",
        f"- Base model: `{base}`",
        f"- Fine-tuned with docvlm: QLoRA r={model_args.lora_r}, alpha={model_args.lora_alpha}; "
        f"the adapter was merged into {str(dtype).removeprefix('torch.')} weights.",
        f"- Data: `{data_args.dataset_name}` (train split `{data_args.dataset_train_split}`, "
        f"question `{data_args.question_column}`, answers `{data_args.answers_column}`).",
        f"- Prompt: user turn `{data_args.instruction}` + page + question; the answer ends with <end_of_utterance>.",
        f"- The full recipe is in `{RECIPE_FILE}`.",
    ]
    report = adapter_dir / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        lines += [
            "",
            f"## Evaluation ({data.get('count')} held-out questions, split `{data.get('split')}`)",
            "",
            "| system | ANLS | exact match |",
            "|---|---|---|",
        ]
        for system, scores in data.get("systems", {}).items():
            lines.append(f"| {system} | {scores['anls']:.3f} | {scores['exact_match']:.3f} |")
        lines += [
            "",
            "The adapter was trained on a 4-bit base; merged into unquantized weights, answers can differ "
            "slightly from the adapter's.",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        'docvlm predict --model <this folder> --image page.png --question "What is the total?"',
        "```",
    ]
    return "\n".join(lines) + "\n"


def push(folder: str, repo_id: str, private: bool = True) -> str:
    """Upload a run or merged folder. The token comes from HF_TOKEN or the `hf auth login` store, never from
    arguments, so it is never written into the folder, the logs or the shell history."""
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise UserError("No Hub token: set HF_TOKEN or run `hf auth login` first.")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=folder, repo_id=repo_id, ignore_patterns=["checkpoint-*", "*.bin"], commit_message="docvlm: upload"
    )
    return getattr(commit, "commit_url", str(commit))
