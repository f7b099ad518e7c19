"""Recipe schema and parsing.

A recipe is one YAML file read by TRL's `TrlParser` into four dataclasses: `DataArguments` (what to train on),
`ModelArguments` (what to load and adapt), `TrainConfig` (how to train) and `EvalArguments` (how to evaluate).
Any field can be overridden on the command line with `--field value`. We only add what TRL lacks: document-QA
data fields, a few loading knobs, an automatic precision switch, and errors that name the recipe file and the key.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

from docvlm.errors import UserError  # noqa: F401 - re-exported: modules import it from here


@dataclass
class DataArguments(ScriptArguments):
    """Where the documents come from and how a row maps onto (image, question, answers)."""

    # `dataset_name` (TRL) is a Hub id, a local path (parquet / jsonl / csv file or folder, a folder saved with
    # `save_to_disk`, an image folder with metadata.jsonl) or the offline fixture `docvlm:tiny-docs`.
    image_column: str = field(
        default="image",
        metadata={"help": "The page image or its path, or a list of them (one a page)."},
    )
    question_column: str = field(
        default="query.en", metadata={"help": "Column holding the question; dots reach into dicts (query.en)."}
    )
    answers_column: str = field(
        default="answers", metadata={"help": "Column holding the answer: a string or a list of accepted answers."}
    )
    answer_choice: Literal["first", "random"] = field(
        default="random",
        metadata={"help": "Train on the first of several gold answers, or a random one each time."},
    )
    instruction: str = field(
        default="Answer briefly.",
        metadata={"help": "Text placed before the page(s) in every question's (a conversation's first) user turn."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "Optional system turn put first in every sample, in training and inference."}
    )
    data_files: dict | str | None = field(
        default=None,
        metadata={
            "help": "Tables in dataset_name's folder to read: a file (the train split) or {split: file}; "
            "image paths are relative to each table's folder."
        },
    )
    json_field: str | None = field(
        default=None,
        metadata={"help": "The key of a JSON document's list of rows (data, in DocVQA's official json)."},
    )
    field_questions: dict | str | None = field(
        default=None,
        metadata={
            "help": "Key-value rows (a column per field): {column: question}, each non-empty field a sample "
            "with its value as the answer; a question may name {field} (the column) and any {column}: "
            "'What is the {field} of {vendor}?'."
        },
    )
    qa_pairs_column: str | None = field(
        default=None,
        metadata={
            "help": "A column holding a list of {question, answers} pairs per page, each pair a sample "
            "(other key names: qa_question_key, qa_answers_key)."
        },
    )
    qa_question_key: str = field(default="question", metadata={"help": "The question key of qa_pairs_column's pairs."})
    qa_answers_key: str | None = field(
        default=None,
        metadata={"help": "The answer key of qa_pairs_column's pairs (null: answers, else answer)."},
    )
    messages_column: str | None = field(
        default=None,
        metadata={
            "help": "A column of chat conversations ([{role, content}], one {type: image} part a page of "
            "image_column): every assistant turn is trained, the last one evaluated."
        },
    )
    group_column: str | None = field(
        default=None, metadata={"help": "Optional column (e.g. question type) to break evaluation scores down by."}
    )
    eval_split_size: float | None = field(
        default=None,
        metadata={
            "help": "No dataset_test_split: hold this many pages out, a fraction (0.1) or a count (200), "
            "with all their questions (eval_split_seed); none of them is trained on."
        },
    )
    eval_split_seed: int = field(default=42, metadata={"help": "Seed of the eval_split_size draw (reproducible)."})
    eval_split_by: str | None = field(
        default=None,
        metadata={"help": "A column (a document id) whose rows eval_split_size holds out together."},
    )
    on_bad_example: Literal["skip", "error"] = field(
        default="skip",
        metadata={
            "help": "A row that cannot be used (undecodable page, empty question or answer, too "
            "long): skip it, counted in data_report.json, or stop before training."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation rows."})

    def __post_init__(self):
        if isinstance(self.field_questions, str):  # from the command line, as JSON
            try:
                self.field_questions = json.loads(self.field_questions)
            except json.JSONDecodeError:
                raise ValueError(
                    "field_questions must map columns to questions, e.g. --field_questions "
                    '\'{"total": "What is the total amount?"}\''
                ) from None
        if self.field_questions is not None:
            if not isinstance(self.field_questions, dict) or not self.field_questions:
                raise ValueError("field_questions must map at least one column to its question.")
            for column, question in self.field_questions.items():
                if not isinstance(question, str) or not question.strip():
                    raise ValueError(f"field_questions: the question for '{column}' is empty or not text.")
                check_question_template(column, question)
        if isinstance(self.data_files, str) and self.data_files.lstrip().startswith("{"):  # from the command line
            try:
                self.data_files = json.loads(self.data_files)
            except json.JSONDecodeError:
                raise ValueError(
                    'data_files must be a file name or {split: file}, e.g. --data_files \'{"train": "labels.csv"}\''
                ) from None
        if self.eval_split_by and self.eval_split_size is None:
            raise ValueError(
                "eval_split_by is set, but eval_split_size is not: eval_split_by says which rows eval_split_size "
                "holds out together. Set eval_split_size (e.g. 0.1), or remove eval_split_by."
            )
        shapes = [name for name in ("field_questions", "qa_pairs_column", "messages_column") if getattr(self, name)]
        if len(shapes) > 1:
            raise ValueError(f"Set one of {' and '.join(shapes)}: they describe different rows.")


def check_question_template(column: str, question: str) -> None:
    """A field_questions question may name {field} and {column}s; anything else str.format would read is refused."""
    import string

    try:
        parsed = list(string.Formatter().parse(question))
    except ValueError as error:
        raise ValueError(
            f"field_questions: the question for '{column}' ({question!r}) has an unmatched brace ({error}); write "
            "{{ and }} for literal braces."
        ) from None
    for _, name, spec, conversion in parsed:
        if name is not None and (not name.strip() or spec or conversion or "[" in name):
            raise ValueError(
                f"field_questions: the question for '{column}' ({question!r}) has a placeholder {{{name}}} that names "
                "no column: use {field} or {<column>}, nothing else inside the braces."
            )


@dataclass
class ModelArguments(ModelConfig):
    """The base model, its processor, 4-bit quantization and the LoRA adapter."""

    dtype: str = field(
        default="auto",
        metadata={"help": "Dtype of the non-quantized weights; auto follows the training precision."},
    )
    do_image_splitting: bool = field(
        default=False,
        metadata={
            "help": "Also encode crops of every page beside the whole page (several times the image tokens). A "
            "family whose processor does not split pages refuses it."
        },
    )
    image_longest_edge: int | None = field(
        default=None, metadata={"help": "Resize pages so their longest edge is at most this (None: processor's)."}
    )
    image_shortest_edge: int | None = field(
        default=None, metadata={"help": "Resize pages so their shortest edge is at least this (None: processor's)."}
    )
    bnb_4bit_compute_dtype: str = field(
        default="auto", metadata={"help": "Matmul dtype of the 4-bit layers; 'auto' follows the training precision."}
    )
    bnb_4bit_skip_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names to keep out of 4-bit quantization (e.g. lm_head)."}
    )
    lora_target_regex: str | None = field(
        default=None,
        metadata={"help": "A regex over full module names to adapt; replaces lora_target_modules when set."},
    )
    lora_init: str = field(
        default="gaussian",
        metadata={"help": "PEFT's init_lora_weights: gaussian, true (Kaiming-uniform), pissa, olora..."},
    )

    def __post_init__(self):
        super().__post_init__()
        checks = (
            ("lora_r", self.lora_r, self.lora_r >= 1, "1 or more (8 and 16 are common)"),
            ("lora_alpha", self.lora_alpha, self.lora_alpha > 0, "more than 0 (often lora_r or 2 x lora_r)"),
            ("lora_dropout", self.lora_dropout, 0 <= self.lora_dropout < 1, "at least 0 and below 1 (e.g. 0.1)"),
        )
        for name, value, ok, fix in checks:
            if self.use_peft and not ok:  # peft fails on these only once the model has loaded
                raise ValueError(f"{name} is {value}: it must be {fix}.")
        if self.lora_target_regex:
            import re

            try:
                re.compile(self.lora_target_regex)
            except re.error as error:
                raise ValueError(f"lora_target_regex is not a valid regular expression: {error}.") from None


@dataclass
class TrainConfig(SFTConfig):
    """TRL's SFTConfig, with defaults suited to document QA and one switch for mixed precision."""

    precision: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto",
        metadata={
            "help": "auto: bf16 on GPUs that have it, fp16 on older GPUs (T4, V100), fp32 on CPU. "
            "Sets bf16/fp16 for you."
        },
    )
    loss_logits: Literal["auto", "answer", "all"] = field(
        default="auto",
        metadata={
            "help": "answer: logits of the answer span only (same loss, fewer FLOPs); all: TRL's, every "
            "position; auto: answer on the CPU, all on CUDA."
        },
    )
    connector_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute the vision-language connector in the backward pass, a few pages at a "
            "time, so that a larger batch fits. Same math. A family without a perceiver connector refuses it."
        },
    )
    connector_checkpoint_pages: int = field(
        default=1,
        metadata={
            "help": "Pages recomputed together under connector_checkpointing: more is faster (fewer, larger "
            "kernels) but holds more memory in the recompute."
        },
    )
    connector_perceiver_pages: int | None = field(
        default=None,
        metadata={
            "help": "Pages the perceiver resampler runs together, when more than connector_checkpoint_pages (null: "
            "the same chunks as the projection); each of its layers is then recomputed by itself. The perceiver "
            "holds far less memory a page than the projection and launches most of the connector's kernels."
        },
    )
    connector_lean_activations: bool = field(
        default=True,
        metadata={
            "help": "Keep fewer connector activations for the backward pass (no fp32 norm copies, no silu(gate)). "
            "Same outputs and gradients. A family without a perceiver connector refuses it: set it false there."
        },
    )
    connector_in_compute_dtype: bool = field(
        default=False,
        metadata={
            "help": "Round the vision tower's features to the half-precision compute dtype (bf16 / fp16) as the "
            "connector takes them. Under autocast the tower's last norm gives fp32 and 4-bit layers return their "
            "input's dtype, so otherwise the whole connector computes and keeps fp32 activations: half the memory "
            "and faster steps. The 4-bit matmuls see the same input; LoRA's dropout takes the rounded one. Nothing "
            "to round in fp32 training. Refused by families without it."
        },
    )
    compile_text_layers: bool = field(
        default=False,
        metadata={
            "help": "torch.compile each decoder layer: fewer, fused kernels around the 4-bit matmuls, where the "
            "host cannot launch small kernels as fast as the GPU runs them. The first two steps compile (~50 s on an "
            "8B model), so it pays on long runs only. Refused by families without it."
        },
    )
    fused_rms_norms: bool = field(
        default=False,
        metadata={
            "help": "Run the decoder's and the connector's RMSNorms as one fused kernel forward and one backward "
            "(torch's, on CUDA), instead of eight and sixteen: ~2,700 fewer kernel launches a step on the 8B "
            "flagship. The output is rounded once, after the scale, so it can differ from the module's by one "
            "half-precision step. Refused by families without it."
        },
    )
    lora_lean_forward: bool = field(
        default=False,
        metadata={
            "help": "Each LoRA linear layer adds its update in one kernel (base + scaling * B(A(x))) and does not "
            "copy the base output first, as peft's forward does: 3 fewer kernel launches a layer call (forward and "
            "backward), the same math (one rounding fewer). Needs use_peft."
        },
    )
    vision_tower_no_grad: bool = field(
        default=True,
        metadata={
            "help": "Run a frozen vision tower without an autograd graph, which gradient checkpointing would "
            "otherwise recompute and back-propagate through for nothing. Same gradients."
        },
    )
    vision_tower_pages: int = field(
        default=0,
        metadata={
            "help": "With vision_tower_no_grad, run the frozen tower this many pages at a time (0: all at once): "
            "bounds its short-lived activations. Same outputs."
        },
    )
    vision_feature_cache: Literal["off", "memory", "disk"] = field(
        default="off",
        metadata={
            "help": "Compute each page's frozen vision features once, for every epoch (memory) and later run "
            "(disk). Same gradients."
        },
    )
    vision_tower_offload: bool = field(
        default=False,
        metadata={
            "help": "While the vision feature cache holds every training page, keep the frozen tower's weights in "
            "CPU memory (0.78 GiB on the 8B flagship), for the connector's recompute to use; a page the cache misses "
            "brings them back. Needs vision_feature_cache; turned off, with a line that says so, on the CPU and "
            "when several processes train."
        },
    )
    vision_feature_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the disk cache (null: $DOCVLM_CACHE/vision-features, ~/.cache/docvlm/...)."},
    )
    vision_feature_cache_max_gb: float = field(
        default=50.0,
        metadata={"help": "Most the cache may hold, in GB; pages beyond it are recomputed each time, and counted."},
    )
    cuda_expandable_segments: bool = field(
        default=False,
        metadata={
            "help": "Let the CUDA allocator grow memory segments in place, so that batches of varying shapes leave "
            "no reserved-but-unused gaps. Off the GPU: no effect."
        },
    )
    cudnn_attention: bool = field(
        default=True,
        metadata={
            "help": "Let scaled_dot_product_attention use cuDNN, which plans each new sequence length (host "
            "time, with batches of varying length); false: FlashAttention. Same math."
        },
    )
    effective_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Samples per optimizer step, whatever the number of processes (sets gradient_accumulation_steps). "
            "Unset: the recipe's accumulation, so the step grows with the number of processes."
        },
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP: look for parameters without gradients every step. docvlm's adapters use all of theirs, "
            "so false spares a pass over the graph."
        },
    )
    # Our collator reads the mapped question/answers columns, which TRL would otherwise drop.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep false: docvlm's collator reads the question and answers columns."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "output_dir already holds another run: start over there, removing its checkpoints, adapter and "
            "reports first. Without it (or resume_from_checkpoint) such a folder is refused, never mixed."
        },
    )

    def __post_init__(self):
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _cuda_available(False):
            # several processes (torchrun, accelerate launch --num_processes N) on a machine without a GPU: accelerate
            # sets up gloo data parallelism only when told the run is on the CPU; otherwise each process trains alone
            self.use_cpu = True
        for name, value, ok, fix in (
            ("learning_rate", self.learning_rate, self.learning_rate > 0, "a positive number such as 1.0e-4"),
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
                self.per_device_train_batch_size >= 1,
                "1 or more",
            ),
            (
                "per_device_eval_batch_size",
                self.per_device_eval_batch_size,
                self.per_device_eval_batch_size >= 1,
                "1 or more",
            ),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
                self.gradient_accumulation_steps >= 1,
                "1 or more",
            ),
            (
                "num_train_epochs",
                self.num_train_epochs,
                self.num_train_epochs > 0 or self.max_steps > 0,
                "more than 0 (or set max_steps)",
            ),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, "0 or more"),
            ("warmup_steps", self.warmup_steps, self.warmup_steps >= 0, "0 or more"),
        ):
            if not ok:  # transformers accepts these and fails (or trains nothing) only once the model has loaded
                raise ValueError(f"{name} is {value}: it must be {fix}.")
        if self.connector_checkpoint_pages < 1:
            raise ValueError(f"connector_checkpoint_pages must be at least 1, got {self.connector_checkpoint_pages}.")
        perceiver = self.connector_perceiver_pages
        if perceiver is not None and perceiver < 1:
            raise ValueError(f"connector_perceiver_pages must be at least 1 or null, got {perceiver}.")
        if perceiver is not None and not self.connector_checkpointing:
            raise ValueError(
                "connector_perceiver_pages is set, but connector_checkpointing is false: it says how many pages the "
                "perceiver recomputes together. Set connector_checkpointing: true, or connector_perceiver_pages: null."
            )
        if perceiver is not None and perceiver < self.connector_checkpoint_pages:
            raise ValueError(
                f"connector_perceiver_pages ({perceiver}) is below connector_checkpoint_pages "
                f"({self.connector_checkpoint_pages}): the perceiver is recomputed in chunks of at least the "
                "projection's. Raise it, or set it to null."
            )
        if self.vision_feature_cache != "off" and not self.vision_tower_no_grad:
            raise ValueError(
                "vision_feature_cache is on but vision_tower_no_grad is false: the cache replaces the frozen tower's "
                "gradient-free forward. Set vision_tower_no_grad: true, or vision_feature_cache: off."
            )
        if self.vision_tower_offload and self.vision_feature_cache == "off":
            raise ValueError(
                "vision_tower_offload is true but vision_feature_cache is off: the tower can wait in CPU memory only "
                "while the cache gives every page's features. Turn the cache on, or set vision_tower_offload: false."
            )
        if self.vision_feature_cache_max_gb <= 0:
            raise ValueError(f"vision_feature_cache_max_gb must be above 0, got {self.vision_feature_cache_max_gb}.")
        if self.vision_tower_pages < 0:
            raise ValueError(f"vision_tower_pages must be 0 (all at once) or more, got {self.vision_tower_pages}.")
        if self.dataloader_num_workers == 0:
            # a recipe's persistent workers mean nothing once --dataloader_num_workers 0 is asked for; torch would
            # refuse the combination only when the first batch is loaded
            self.dataloader_persistent_workers = False
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both true: set `precision: bf16` or `precision: fp16` instead.")
        if (
            self.precision != "auto"
            and (self.bf16 or self.fp16)
            and ("bf16" if self.bf16 else "fp16") != self.precision
        ):
            raise ValueError(
                f"precision is {self.precision}, but {'bf16' if self.bf16 else 'fp16'} is true: set only `precision`."
            )
        if self.precision != "auto" or not (self.bf16 or self.fp16):
            self.bf16, self.fp16 = resolve_precision(self.precision, use_cpu=self.use_cpu)
        if self.dataloader_pin_memory and not _cuda_available(self.use_cpu):
            self.dataloader_pin_memory = False  # pinned memory only speeds copies to a GPU; torch warns without one
        for old, new in (
            ("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
        ):
            # newer transformers renamed these and warns when only the old name is set, which TRL's SFTConfig
            # always does; recipes keep the old name, which every supported version reads.
            if hasattr(self, new) and getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
        super().__post_init__()
        if self.effective_batch_size is not None:
            per_step = self.per_device_train_batch_size * self.world_size
            if self.effective_batch_size < 1 or self.effective_batch_size % per_step:
                raise ValueError(
                    f"effective_batch_size {self.effective_batch_size} is not a multiple of "
                    f"per_device_train_batch_size {self.per_device_train_batch_size} x {self.world_size} processes: "
                    "change one of them."
                )
            self.gradient_accumulation_steps = self.effective_batch_size // per_step

    def batch_summary(self) -> str:
        """How many samples an optimizer step takes, and where that number comes from."""
        per_step = self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps
        text = (
            f"Batch: {self.world_size} process{'es' if self.world_size > 1 else ''} x "
            f"{self.per_device_train_batch_size} per device x {self.gradient_accumulation_steps} accumulation = "
            f"{per_step} samples per optimizer step."
        )
        if self.world_size > 1 and self.effective_batch_size is None:
            alone = self.per_device_train_batch_size * self.gradient_accumulation_steps
            text += (
                f" On one process this recipe takes {alone}: {self.world_size} processes make each step "
                f"{self.world_size}x larger. Set effective_batch_size: {alone} to keep the recipe's."
            )
        return text


@dataclass
class EvalArguments:
    """Generation-based evaluation (ANLS / exact match) on the held-out split, before and after fine-tuning."""

    eval_after_training: bool = field(
        default=True, metadata={"help": "Run the generation evaluation at the end of training."}
    )
    eval_compare_base: bool = field(
        default=True, metadata={"help": "Also answer with the adapter disabled, to report before vs after."}
    )
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Longest answer generated, in tokens."})
    eval_anls_samples: int = field(
        default=64,
        metadata={
            "help": "Held-out questions answered at each evaluation of eval_strategy: their ANLS is "
            "logged as eval_anls (metric_for_best_model: anls keeps the best adapter). 0: the loss only."
        },
    )
    adapter: str | None = field(
        default=None,
        metadata={"help": "docvlm eval: the adapter folder to evaluate (unset: the recipe's output_dir)."},
    )
    eval_output_dir: str | None = field(
        default=None,
        metadata={"help": "docvlm eval: the folder for its report (unset: <adapter>/eval), never the adapter's."},
    )


def _cuda_available(use_cpu: bool) -> bool:
    import torch

    return not use_cpu and torch.cuda.is_available()


def resolve_precision(precision: str, use_cpu: bool = False) -> tuple[bool, bool]:
    """(bf16, fp16) for a precision setting. 'auto' prefers bf16, falls back to fp16 on CUDA, else fp32."""
    import torch

    if precision == "bf16":
        if not use_cpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError(
                f"precision is bf16, but {torch.cuda.get_device_name()} has no bf16: use precision: auto (fp16 with "
                "fp32 adapter weights there) or fp16."
            )
        return True, False
    if precision == "fp16":
        return False, True
    if precision == "fp32" or use_cpu or not torch.cuda.is_available():
        return False, False
    return (True, False) if torch.cuda.is_bf16_supported() else (False, True)


RECIPE_DATACLASSES = (DataArguments, ModelArguments, TrainConfig, EvalArguments)
USAGE = """python -m docvlm.train --config recipes/<recipe>.yaml [--<field> <value> ...]

Fine-tune a vision-language model on document question answering. Every field below can be set in the recipe
YAML; a flag on the command line overrides the YAML. Example:
  accelerate launch -m docvlm.train --config recipes/docvqa_qlora.yaml --learning_rate 2e-4 --output_dir out"""


def make_parser() -> TrlParser:
    parser = TrlParser(RECIPE_DATACLASSES, usage=USAGE)
    parser.allow_abbrev = False  # --max_st 3 is not --max_steps 3: a typo is refused (check_flags), never guessed
    return parser


def _known_fields() -> set[str]:
    return {f.name for cls in RECIPE_DATACLASSES for f in fields(cls)}


def shipped_recipes() -> list[str]:
    """The recipes in ./recipes, by name."""
    return sorted(path.stem for path in Path("recipes").glob("*.yaml"))


def load_recipe_yaml(path: str | Path) -> dict:
    """Read a recipe and reject unknown keys, naming the file, the key and the closest known key."""
    path = Path(path)
    if not path.is_file():
        close = difflib.get_close_matches(path.stem, shipped_recipes(), n=1)
        hint = f" Did you mean recipes/{close[0]}.yaml?" if close else ""
        raise UserError(f"Recipe {path} not found.{hint} The shipped recipes: {', '.join(shipped_recipes())}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"Recipe {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"Recipe {path} must be a mapping of field: value, got {type(data).__name__}.")
    known = _known_fields() | {"env"}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(
                f"Unknown key '{key}' in recipe {path}.{hint} "
                "Run `python -m docvlm.train --help` for the list of fields."
            )
    return data


def check_flags(argv: list[str]) -> None:
    """Refuse an unknown --flag as a recipe's unknown key is refused, naming the closest field (argparse would take
    a prefix of a field for it, and HfArgumentParser reports the rest in its own words)."""
    bools = {f.name for cls in RECIPE_DATACLASSES for f in fields(cls) if f.type in (bool, "bool")}
    known = _known_fields() | {"config"} | {f"no_{name}" for name in bools}
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean '--{close[0]}'?" if close else ""
            raise UserError(
                f"Unknown flag '--{name}' on the command line.{hint} Run `python -m docvlm.train --help` for the list "
                "of fields."
            )


def recipe_argument(argv: list[str] | None = None) -> str:
    """The recipe a command was given (`--config`), as reports name it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        return argv[argv.index("--config") + 1]
    return "(command-line arguments only)"


def nulls_to_none(arguments) -> None:
    """`--field null` means None on the command line, as `field: null` does in a recipe. HfArgumentParser passes
    'null' through as a string for optional string fields (a cache folder named 'null', a column named 'null')."""
    import typing

    hints = typing.get_type_hints(type(arguments))
    for name, hint in hints.items():
        if getattr(arguments, name, None) == "null" and type(None) in typing.get_args(hint):
            setattr(arguments, name, None)


GENERATION_METRICS = ("anls", "exact_match")  # logged at each evaluation when eval_anls_samples > 0


def check_answer_scores(training_args, eval_args) -> None:
    """metric_for_best_model may name a generation score only where evaluations compute it."""
    if eval_args.eval_anls_samples < 0:
        raise UserError(f"eval_anls_samples must be 0 (loss only) or more, got {eval_args.eval_anls_samples}.")
    metric = (training_args.metric_for_best_model or "").removeprefix("eval_")
    if metric in GENERATION_METRICS and (training_args.eval_strategy == "no" or eval_args.eval_anls_samples == 0):
        raise UserError(
            f"metric_for_best_model is {metric}, but evaluations during training compute it only with eval_strategy "
            f"steps or epoch (now {training_args.eval_strategy}) and eval_anls_samples above 0 (now "
            f"{eval_args.eval_anls_samples}). Set both, or metric_for_best_model: loss."
        )


def parse_recipe(argv: list[str] | None = None):
    """Parse `--config recipe.yaml` plus CLI overrides into (data, model, training, eval) arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from docvlm.recipe_help import exit_on_help

    exit_on_help(argv)  # ours, not HfArgumentParser's 840 lines
    check_flags(argv)
    if "--config" not in argv and not any(token.startswith("--model_name_or_path") for token in argv):
        raise UserError(
            f"No recipe: give one with --config recipes/<recipe>.yaml ({', '.join(shipped_recipes()) or 'recipes/'})."
        )
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UserError("--config needs a path to a recipe YAML, e.g. --config recipes/tiny_docvqa.yaml")
        load_recipe_yaml(argv[index + 1])
    try:
        # TrainConfig.__post_init__ and HfArgumentParser (unknown flags, bad values) raise ValueError.
        data_args, model_args, training_args, eval_args = make_parser().parse_args_and_config(argv)
    except ValueError as err:
        raise UserError(str(err)) from None
    for group in (data_args, model_args, training_args, eval_args):
        nulls_to_none(group)
    if training_args.hub_token:
        raise UserError(
            "Do not pass hub_token in a recipe or on the command line: it would be saved with the run. "
            "Set HF_TOKEN in the environment or run `hf auth login` instead."
        )
    check_answer_scores(training_args, eval_args)
    if training_args.lora_lean_forward and not model_args.use_peft:
        raise UserError("lora_lean_forward is true, but use_peft is false: there is no LoRA layer to make leaner.")
    return data_args, model_args, training_args, eval_args
