"""One way to prepare a run (docvlm.prepare): training, `docvlm eval` and `docvlm plan` all go through it, and what
it hands them is the recipe's family, processor, screened splits and collator."""

import pytest

from docvlm.recipe.parse import parse_recipe


class Prepared(Exception):
    """Raised by a stand-in for prepare(), to show who called it with what."""


@pytest.mark.parametrize("command", ["train", "eval", "plan"])
def test_train_eval_and_plan_prepare_their_run_through_prepare(command, tmp_path, monkeypatch):
    from docvlm import prepare
    from docvlm.evaluation.evaluate import run_eval
    from docvlm.plan import plan
    from docvlm.train import run

    def stand_in(recipe, **options):
        raise Prepared(recipe.source, options)

    monkeypatch.setattr(prepare, "prepare", stand_in)
    argv = ["--config", "recipes/tiny_docvqa.yaml", "--output_dir", str(tmp_path / "run")]
    if command == "eval":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "adapter_config.json").write_text("{}")
    calls = {"train": lambda: run(argv), "eval": lambda: run_eval(argv), "plan": lambda: plan(argv[:2])}
    with pytest.raises(Prepared) as prepared:
        calls[command]()
    source, options = prepared.value.args
    assert source == "recipes/tiny_docvqa.yaml"
    assert options.get("need_eval", True) is (command != "plan")  # plan reads the training rows alone
    assert options.get("screen_train", True) is (command == "train")  # eval and plan screen what they use
    assert ("processor_path" in options) is (command == "eval")  # eval's processor is the adapter's


def test_a_prepared_run_holds_the_family_the_screened_splits_and_the_recipes_collator(tmp_path):
    from docvlm.families import IDEFICS2
    from docvlm.prepare import prepare

    recipe = parse_recipe(
        ["--config", "recipes/tiny_docvqa.yaml", "--max_train_samples", "12", "--max_eval_samples", "4"]
        + ["--image_longest_edge", "196", "--output_dir", str(tmp_path)]
    )
    prepared = prepare(recipe)
    assert prepared.family is IDEFICS2 and prepared.config.model_type == "idefics2"
    assert len(prepared.train_rows) == 12 and len(prepared.eval_rows) == 4
    assert prepared.processor.image_processor.size["longest_edge"] == 196  # the family set the recipe's option
    assert prepared.data_report.splits["train"]["used"] == 12 and prepared.data_report.splits["test"]["used"] == 4
    collator = prepared.collator()
    assert collator.max_length == recipe.training.max_length and collator.answer_choice == recipe.data.answer_choice
    batch = collator([prepared.train_rows[0]])
    assert batch["input_ids"].shape[0] == 1 and (batch["labels"] != -100).any()
    assert prepared.skeleton is not None  # its lora_target_regex was checked on the meta-device model


def test_an_option_the_family_does_not_have_stops_before_the_data_loads(monkeypatch):
    from docvlm import prepare
    from docvlm.errors import UserError

    def no_loading(*args, **kwargs):
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(prepare, "load_splits", no_loading)
    off = ["--vision_tower_no_grad", "false", "--connector_lean_activations", "false"]
    off += ["--image_longest_edge", "null", "--image_shortest_edge", "null"]
    recipe = parse_recipe(["--config", "recipes/tiny_docvqa.yaml", "--connector_checkpointing", "true", *off])
    monkeypatch.setattr(prepare, "family_of", lambda model_type: prepare.Family("Plain", (model_type,)))
    with pytest.raises(UserError, match="connector_checkpointing is on in the recipe, but it does not apply to Plain"):
        prepare.prepare(recipe)
