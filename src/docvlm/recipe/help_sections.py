"""What the recipe's --help shows (docvlm.recipe.help): its sections, the fields it never lists, and docvlm's
wording for inherited fields whose own help is wrong or misleading here."""

CONFIG_HELP = (
    (
        "--config recipes/<recipe>.yaml",
        "The recipe: a YAML file of `field: value` lines, for any field below. Flags on the command line override "
        "it: --<field> <value>.",
    ),
    ("-h, --help, --help-all", "This help; --help-all also lists every other field."),
)

# The fields a recipe usually sets, by section, in the order they are shown: every field docvlm declares, and the
# most used of TRL's and transformers'. The memory and speed switches get a section of their own, made from their
# declarations (sections()). Names must be fields of RECIPE_DATACLASSES (tests/recipe/test_help.py checks it, and
# that none of docvlm's own is missing); every other field is listed by --help-all.
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
            "image_min_pixels",
            "image_max_pixels",
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
            "qa_question_key",
            "qa_answers_key",
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
            "overwrite_output_dir",
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
            "eval_sort_by_length",
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
        # rows have an image, so TRL skips preparation, and docvlm's collator (docvlm.training.collator) replaces
        # TRL's; packing, padding_free and assistant_only_loss are even refused by TRL for such data.
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
        # TRL-script fields that docvlm never reads (see docvlm.data and docvlm.training.modeling.lora_config)
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
    "bnb_4bit_quant_storage": "The 4-bit weights' storage dtype (unset: uint8; set for you under ZeRO-3).",
    "use_peft": "Train a LoRA adapter; false fine-tunes all the weights.",
    "dataset_name": "A Hub id, a local file or folder (docs/new_dataset.md), or docvlm:tiny-docs.",
    "dataset_config": "The dataset configuration name (the `name` argument of datasets.load_dataset).",
    "dataset_train_split": "The split to train on.",
    "dataset_test_split": "The held-out split, for evaluation.",
    "max_steps": "Total optimizer steps; when positive, overrides num_train_epochs.",
    "gradient_accumulation_steps": "Micro-batches per optimizer step; the batch is per-GPU batch x GPUs x this.",
    "warmup_steps": "Linear warmup steps (a float below 1: that fraction of all steps).",
    "max_length": "Longest sample in tokens (image tokens included). A longer sample is an error: image tokens "
    "cannot be truncated.",
    "gradient_checkpointing": "Recompute the decoder's activations in backward: less memory.",
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
