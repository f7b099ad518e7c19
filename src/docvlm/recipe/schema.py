"""The recipe's schema.

A recipe is one YAML file read by TRL's `TrlParser` into four dataclasses: `DataArguments` (what to train on,
docvlm.recipe.data_arguments), `ModelArguments` (what to load and adapt), `TrainConfig` (how to train, with the
memory and speed switches each declared in docvlm.speedups) and `EvalArguments` (how to evaluate). Any field can be
overridden on the command line with `--field value`. We only add what TRL lacks: document-QA data fields, a few
loading knobs, an automatic precision switch, and errors that name the recipe file and the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, make_dataclass
from typing import Literal

from trl import ModelConfig, SFTConfig

from docvlm import speedups
from docvlm.recipe.data_arguments import DataArguments


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
    image_min_pixels: int | None = field(
        default=None,
        metadata={"help": "Least page area in pixels, for processors that size pages by area (None: theirs)."},
    )
    image_max_pixels: int | None = field(
        default=None,
        metadata={"help": "Most page area in pixels, for processors that size pages by area (None: theirs)."},
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
        metadata={"help": "PEFT's init_lora_weights: gaussian, true (Kaiming-uniform), pissa..."},
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


# The memory and speed switches' fields, each declared in its switch's module (docvlm.speedups).
SpeedupFields = make_dataclass("SpeedupFields", speedups.fields())


@dataclass
class TrainConfig(SFTConfig, SpeedupFields):
    """TRL's SFTConfig, with defaults suited to document QA, one switch for mixed precision, and the speed switches
    of docvlm.speedups."""

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
    eval_sort_by_length: bool = field(
        default=True,
        metadata={"help": "Batch questions of similar length together. Same answers."},
    )
    eval_anls_samples: int = field(
        default=64,
        metadata={
            "help": "Held-out questions answered at each evaluation, their ANLS logged as eval_anls "
            "(metric_for_best_model: anls keeps the best adapter); 0: the loss only."
        },
    )
    adapter: str | None = field(
        default=None,
        metadata={"help": "docvlm eval: the adapter folder to evaluate (unset: the recipe's output_dir)."},
    )
    eval_output_dir: str | None = field(
        default=None,
        metadata={"help": "docvlm eval: the folder for its report (unset: <adapter>/eval)."},
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
