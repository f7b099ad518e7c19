"""Use a trained adapter: load it for inference, merge it into the base weights, push a folder to the Hub."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from docvlm.errors import UserError
from docvlm.recipe.schema import DataArguments, EvalArguments, ModelArguments

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
    """(model, processor, prompt, max_new_tokens) from an adapter folder (4-bit base + adapter, as trained)
    or from a merged model folder."""
    from docvlm.training.modeling import load_model, load_processor, model_path, model_type_at
    from docvlm.training.precision import inference_dtype

    if bool(adapter) == bool(model):
        raise UserError("Give exactly one of --adapter (a training output folder) and --model (a merged folder).")
    folder = Path(adapter or model)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder.")
    model_args, data_args, eval_args = read_run_recipe(folder)
    if adapter:
        from peft import PeftModel

        base = model_path(model_args)
        processor = load_processor(model_args, str(folder), model_type_at(base, model_args.model_revision))
        network = PeftModel.from_pretrained(load_model(model_args, inference_dtype(), base), str(folder))
    else:
        merged = ModelArguments(dtype="auto", attn_implementation=model_args.attn_implementation)
        processor = load_processor(merged, str(folder), model_type_at(str(folder)))
        network = load_model(merged, inference_dtype(), str(folder), quantize=False)
    from docvlm.prompts import Prompt

    return network.eval(), processor, Prompt.of(data_args), eval_args.eval_max_new_tokens


MERGE_BASES = ("dequantized", "original")


def merge(adapter: str, out: str, dtype: str = "auto", base: str = "dequantized") -> Path:
    """Fold the adapter into 16/32-bit base weights and save safetensors + processor + recipe + model card.

    base='dequantized' merges into the dequantized 4-bit weights the adapter was trained on, so the merged model
    answers as base + adapter did; 'original' merges into the base's own 16-bit weights, which the adapter never
    saw (QLoRA adapters lose some of what they learned that way)."""
    from peft import PeftModel

    from docvlm.evaluation.card import merged_card
    from docvlm.training.modeling import load_model, load_processor, model_path, model_type_at
    from docvlm.training.precision import inference_dtype, resolve_dtype
    from docvlm.training.trainer import readable_weights

    if base not in MERGE_BASES:
        raise UserError(f"--base must be one of {', '.join(MERGE_BASES)}, got '{base}'.")
    adapter_dir, out_dir = Path(adapter), Path(out)
    if out_dir.resolve() == adapter_dir.resolve():
        raise UserError("--out must be a new folder, not the adapter folder.")
    model_args, data_args, _ = read_run_recipe(adapter_dir)
    base_path = model_path(model_args)
    weights_dtype = resolve_dtype(dtype, inference_dtype())
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if base == "dequantized" and quantized:
        # the same quantization as in training, then back to plain Linear layers holding the rounded weights
        network = load_model(model_args, weights_dtype, base_path).dequantize()
    else:
        plain = ModelArguments(
            model_revision=model_args.model_revision, dtype="auto", attn_implementation=model_args.attn_implementation
        )
        network = load_model(plain, weights_dtype, base_path, quantize=False)
    merged = PeftModel.from_pretrained(network, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    readable_weights(out_dir)
    load_processor(model_args, str(adapter_dir), model_type_at(base_path, model_args.model_revision)).save_pretrained(
        out_dir
    )
    shutil.copy(adapter_dir / RECIPE_FILE, out_dir / RECIPE_FILE)
    report = adapter_dir / "report.json"
    if report.is_file():
        shutil.copy(report, out_dir / "adapter_report.json")  # named for what it measured: the adapter
    dtype_name = str(weights_dtype).removeprefix("torch.")
    merged_base = base if quantized else "original"
    (out_dir / "README.md").write_text(merged_card(model_args, data_args, adapter_dir, dtype_name, merged_base))
    return out_dir


def push(folder: str, repo_id: str, private: bool = True) -> str:
    """Upload a run or merged folder. The token comes from HF_TOKEN or the `hf auth login` store, never from
    arguments, so it is never written into the folder, the logs or the shell history."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    if get_token() is None:
        raise UserError("No Hub token: set HF_TOKEN or run `hf auth login` first.")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            ignore_patterns=["checkpoint-*", "*.bin"],
            commit_message="docvlm: upload",
        )
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        raise UserError(
            f"The Hub refused the upload to {repo_id} (HTTP {status}): check that the token in HF_TOKEN or "
            "`hf auth login` can write to that namespace."
        ) from None
    except Exception as err:  # noqa: BLE001 - a connection or timeout error means the same thing to the user
        raise UserError(
            f"Could not reach the Hugging Face Hub to upload {folder} ({type(err).__name__}); nothing was pushed. "
            "Check the network (or HF_ENDPOINT) and run the same command again."
        ) from None
    return getattr(commit, "commit_url", str(commit))
