import re
from pathlib import Path

import pytest

from docvlm.errors import UserError
from docvlm.recipe.parse import load_recipe_yaml, parse_recipe
from docvlm.recipe.schema import resolve_precision

RECIPES = sorted(Path(__file__).resolve().parents[2].joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_parse_and_say_how_to_launch(recipe):
    data_args, model_args, training_args, eval_args = parse_recipe(["--config", str(recipe), "--precision", "fp32"])
    assert model_args.model_name_or_path and data_args.dataset_name
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    assert model_args.use_peft and (quantized or recipe.stem.endswith("_lora"))  # only a *_lora recipe is unquantized
    assert training_args.remove_unused_columns is False
    head = recipe.read_text().splitlines()[:6]
    assert any("Launch" in line for line in head) and any(
        "docvlm.train" in line or "make train" in line for line in head
    )


def test_seed_recipe_keeps_the_notebook_hyperparameters():
    data_args, model_args, t, _ = parse_recipe(["--config", "recipes/docvqa_qlora.yaml", "--precision", "fp32"])
    assert model_args.model_name_or_path == "HuggingFaceM4/idefics2-8b"
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout, model_args.lora_init) == (
        8,
        8,
        0.1,
        "gaussian",
    )
    assert model_args.bnb_4bit_quant_type == "nf4" and model_args.do_image_splitting is False
    assert "perceiver_resampler" in model_args.lora_target_regex
    assert (data_args.dataset_name, data_args.question_column, data_args.answers_column) == (
        "nielsr/docvqa_1200_examples",
        "query.en",
        "answers",
    )
    assert data_args.instruction == "Answer briefly."
    # the notebook's effective batch 16 (it ran 2 x 8; 16 x 1 is the same batch in one micro-batch)
    assert (t.num_train_epochs, t.per_device_train_batch_size * t.gradient_accumulation_steps) == (2, 16)
    assert (t.learning_rate, t.warmup_steps, t.weight_decay) == (1e-4, 50, 0.01)


def test_every_docvqa_recipe_keeps_the_notebook_hyperparameters():
    for name in ("docvqa_qlora", "docvqa_qlora_lowmem", "docvqa_qlora_fast"):
        _, model_args, t, _ = parse_recipe(["--config", f"recipes/{name}.yaml", "--precision", "fp32"])
        assert t.per_device_train_batch_size * t.gradient_accumulation_steps == 16, name
        assert (t.num_train_epochs, t.learning_rate, model_args.lora_r, model_args.lora_dropout) == (2, 1e-4, 8, 0.1)


def test_cli_overrides_the_yaml(tmp_path):
    data_args, model_args, t, _ = parse_recipe(
        [
            "--config",
            "recipes/tiny_docvqa.yaml",
            "--learning_rate",
            "0.5",
            "--lora_r",
            "4",
            "--question_column",
            "q",
            "--output_dir",
            str(tmp_path),
            "--max_train_samples",
            "3",
        ]
    )
    assert t.learning_rate == 0.5 and model_args.lora_r == 4 and data_args.question_column == "q"
    assert t.output_dir == str(tmp_path) and data_args.max_train_samples == 3
    # untouched keys keep the YAML's values
    assert t.num_train_epochs == parse_recipe(["--config", "recipes/tiny_docvqa.yaml"])[2].num_train_epochs


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name_or_path: x\nlearning_rat: 0.1\n")
    with pytest.raises(UserError, match=r"Unknown key 'learning_rat' in recipe .*typo\.yaml.*'learning_rate'"):
        parse_recipe(["--config", str(recipe)])


def test_unknown_cli_flag_is_an_error():
    with pytest.raises(UserError, match="--not_a_field"):
        parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--not_a_field", "1"])


def test_bad_recipes(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_recipe_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe_yaml(tmp_path / "bad.yaml")


def test_hub_token_is_refused_in_recipes():
    with pytest.raises(UserError, match="HF_TOKEN"):
        parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--hub_token", "hf_secret"])


def test_precision_resolution(monkeypatch):
    import torch

    assert resolve_precision("bf16") == (True, False)
    assert resolve_precision("fp16") == (False, True)
    assert resolve_precision("fp32") == (False, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto") == (False, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # a T4 / V100
    assert resolve_precision("auto") == (False, True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto") == (True, False)


def test_zero_workers_turns_persistent_workers_off():
    _, _, training, _ = parse_recipe(["--config", "recipes/docvqa_qlora.yaml", "--dataloader_num_workers", "0"])
    assert training.dataloader_num_workers == 0 and not training.dataloader_persistent_workers
    _, _, training, _ = parse_recipe(["--config", "recipes/docvqa_qlora.yaml"])
    assert training.dataloader_num_workers == 8 and training.dataloader_persistent_workers


def test_pinned_memory_only_with_a_gpu(monkeypatch):
    from docvlm.recipe import schema as config

    monkeypatch.setattr(config, "_cuda_available", lambda use_cpu: False)
    _, _, training, _ = parse_recipe(["--config", "recipes/docvqa_qlora.yaml", "--precision", "fp32"])
    assert training.dataloader_pin_memory is False  # torch warns that pinning does nothing without a GPU
    monkeypatch.setattr(config, "_cuda_available", lambda use_cpu: not use_cpu)
    _, _, training, _ = parse_recipe(["--config", "recipes/docvqa_qlora.yaml", "--precision", "fp32"])
    assert training.dataloader_pin_memory is True


def test_gradient_checkpointing_keys_parse_without_deprecation_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, _, training, _ = parse_recipe(["--config", "recipes/docvqa_qlora.yaml", "--precision", "fp32"])
    assert training.gradient_checkpointing is True
    assert training.gradient_checkpointing_kwargs == {"use_reentrant": True}
    if hasattr(training, "activation_checkpointing"):  # the newer name, where transformers has it
        assert training.activation_checkpointing is True


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--learning_rate", "-1e-4", "learning_rate is -0.0001: it must be a positive number"),
        ("--learning_rate", "0", "learning_rate is 0.0: it must be a positive number"),
        ("--lora_r", "0", "lora_r is 0: it must be 1 or more"),
        ("--lora_alpha", "0", "lora_alpha is 0: it must be more than 0"),
        ("--lora_dropout", "1.5", "lora_dropout is 1.5: it must be at least 0 and below 1"),
        ("--lora_dropout", "-0.1", "lora_dropout is -0.1: it must be at least 0 and below 1"),
        ("--per_device_train_batch_size", "0", "per_device_train_batch_size is 0: it must be 1 or more"),
        ("--gradient_accumulation_steps", "0", "gradient_accumulation_steps is 0: it must be 1 or more"),
        ("--weight_decay", "-1", "weight_decay is -1.0: it must be 0 or more"),
        ("--lora_target_regex", "((", "lora_target_regex is not a valid regular expression"),
    ],
)
def test_out_of_range_values_are_refused_when_the_recipe_is_read(flag, value, message):
    with pytest.raises(UserError, match=re.escape(message)):
        parse_recipe(["--config", "recipes/tiny_docvqa.yaml", f"{flag}={value}"])


def test_lora_targets_that_match_no_layer_are_refused_before_the_data_or_weights_load(monkeypatch, capsys, tmp_path):
    from docvlm import prepare, train

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(prepare, "load_splits", no_loading)
    argv = ["--config", "recipes/tiny_docvqa.yaml", "--lora_target_regex", ".*text_model.*qkv_proj$"]
    argv += ["--output_dir", str(tmp_path)]  # never the checkout's outputs/, which a user's `make train` fills
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "lora_target_regex matches no linear layer" in err and "model.text_model.layers.0.self_attn" in err


def test_lora_target_modules_that_match_no_layer_are_refused(tiny_model_path):
    from docvlm.recipe.schema import ModelArguments
    from docvlm.training.modeling import check_lora_targets

    with pytest.raises(UserError, match=r"lora_target_modules matches no linear layer .*\['qkv', 'dense'\]"):
        check_lora_targets(ModelArguments(use_peft=True, lora_target_modules=["qkv", "dense"]), tiny_model_path)
    check_lora_targets(ModelArguments(use_peft=True, lora_target_modules=["q_proj", "v_proj"]), tiny_model_path)


def test_lora_targets_are_checked_under_zero3_without_partitioning_the_skeleton(tiny_model_path):
    """Under a ZeRO-3 launch transformers builds every model inside deepspeed.zero.Init, which cannot place the
    meta-device skeleton ("Cannot copy out of meta tensor"); the check builds it outside, so it needs no DeepSpeed
    at all (a partitioning build would import it)."""
    from docvlm.recipe.schema import ModelArguments
    from docvlm.training.modeling import check_lora_targets
    from tests.helpers import zero3_registered

    with zero3_registered() as hf_deepspeed:
        with pytest.raises(UserError, match="lora_target_modules matches no linear layer"):
            check_lora_targets(ModelArguments(use_peft=True, lora_target_modules=["qkv"]), tiny_model_path)
        check_lora_targets(ModelArguments(use_peft=True, lora_target_modules=["q_proj", "v_proj"]), tiny_model_path)
        assert hf_deepspeed.is_deepspeed_zero3_enabled()


def test_conflicting_precision_flags_and_bf16_on_a_gpu_without_it_are_refused(monkeypatch):
    base = ["--config", "recipes/tiny_docvqa.yaml"]
    with pytest.raises(UserError, match="bf16 and fp16 are both true"):
        parse_recipe([*base, "--bf16", "true", "--fp16", "true"])
    with pytest.raises(UserError, match="precision is fp32, but bf16 is true: set only `precision`"):
        parse_recipe([*base, "--precision", "fp32", "--bf16", "true"])
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(ValueError, match="precision is bf16, but Tesla T4 has no bf16"):
        resolve_precision("bf16")
    assert resolve_precision("auto") == (False, True)  # fp16 there


def test_null_on_the_command_line_means_none_as_in_a_recipe():
    from docvlm.recipe.parse import parse_recipe

    argv = ["--config", "recipes/docvqa_qlora.yaml", "--vision_feature_cache_dir", "null", "--group_column", "null"]
    data_args, _, training_args, _ = parse_recipe([*argv, "--connector_perceiver_pages", "null"])
    assert data_args.group_column is None  # not a column named 'null'
    assert training_args.vision_feature_cache_dir is None  # not a cache folder named 'null'
    assert training_args.connector_perceiver_pages is None
    assert parse_recipe(["--config", "recipes/docvqa_qlora.yaml"])[2].connector_perceiver_pages == 8  # the recipe's


def test_vision_tower_offload_needs_the_cache_and_is_turned_off_on_the_cpu(tmp_path, capsys):
    """Offloading the tower is refused without the cache (the tower runs every step), and turned off, with a line
    that says so, where training runs on the CPU (the weights are already there)."""
    from docvlm.train import run
    from tests.helpers import quick

    with pytest.raises(UserError, match="vision_tower_offload is true but vision_feature_cache is off"):
        parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--vision_tower_offload", "true"])
    switches = ["--vision_feature_cache", "memory", "--vision_tower_offload", "true", "--max_steps", "1"]
    switches += ["--eval_after_training", "false", "--save_strategy", "no", "--report_to", "none"]
    trainer, _ = run(quick(tmp_path, *switches))
    assert (
        "set for one process: vision_tower_offload: false (on the cpu it has nothing to move)"
        in capsys.readouterr().out
    )
    assert not trainer.args.vision_tower_offload and trainer.state.global_step == 1


def test_a_mistyped_flag_is_refused_as_a_mistyped_key_is():
    """argparse took --max_st for --max_steps and --learning_rat for --learning_rate; --learnig_rate got
    HfArgumentParser's own message. The command line now says what a recipe's unknown key gets."""
    base = ["--config", "recipes/tiny_docvqa.yaml"]
    for flag, closest in (
        ("--max_st", "--max_steps"),
        ("--learning_rat", "--learning_rate"),
        ("--learnig_rate", "--learning_rate"),
    ):
        with pytest.raises(UserError, match=f"Unknown flag '{flag}' on the command line. Did you mean '{closest}'"):
            parse_recipe([*base, flag, "3"])
    assert parse_recipe([*base, "--max-steps", "3", "--no_eval_compare_base"])[2].max_steps == 3  # real spellings
    with pytest.raises(
        UserError, match=r"Recipe recipes/tiny_docvq.yaml not found. Did you mean recipes/tiny_docvqa.yaml"
    ):
        parse_recipe(["--config", "recipes/tiny_docvq.yaml"])
