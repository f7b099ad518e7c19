"""Idefics3 / SmolVLM through docvlm's one collator and training path, on the tiny Idefics3 fixture (Idefics3's
real config class, processor and chat template, random weights): masking, training, generation and merge."""

import pytest
import torch
from PIL import Image

from docvlm.cli import main as cli
from docvlm.collator import IGNORE_INDEX, DocVQACollator, Prompt
from docvlm.families import IDEFICS3, family_at, family_of_processor
from tests.test_collator import ANSWERS, label_tokens, rows_for
from tests.test_export import held_out

TINY = "docvlm:tiny-idefics3"


@pytest.fixture(scope="module")
def idefics3_path():
    from docvlm import tiny

    return tiny.resolve(TINY)


@pytest.fixture(scope="module")
def idefics3_processor(idefics3_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(idefics3_path)


@pytest.fixture(scope="module")
def idefics3_run(tmp_path_factory):
    """Eight steps of the SmolVLM recipe as shipped, on the tiny Idefics3 and the tiny documents (DocVQA's schema,
    so the recipe's Data section applies unchanged), with the evaluation at the end."""
    from docvlm.train import run

    out = tmp_path_factory.mktemp("idefics3-run")
    argv = ["--config", "recipes/smolvlm_docvqa_qlora.yaml", "--model_name_or_path", TINY, "--output_dir", str(out)]
    argv += ["--dataset_name", "docvlm:tiny-docs", "--max_train_samples", "32", "--max_eval_samples", "8"]
    argv += ["--max_steps", "8", "--gradient_accumulation_steps", "1", "--learning_rate", "2e-3", "--warmup_steps"]
    argv += ["0", "--logging_steps", "1", "--save_strategy", "no", "--eval_compare_base", "false"]
    argv += ["--dataloader_num_workers", "0", "--dataloader_persistent_workers", "false", "--report_to", "none"]
    trainer, metrics = run(argv)
    return out, trainer, metrics


def test_the_fixture_is_an_idefics3_model_of_that_family(idefics3_path, idefics3_processor):
    assert family_at(idefics3_path) is IDEFICS3 and family_of_processor(idefics3_processor) is IDEFICS3
    assert type(idefics3_processor).__name__ == "Idefics3Processor"


def test_only_each_answer_and_its_end_of_utterance_are_labels(idefics3_processor):
    tok = idefics3_processor.tokenizer
    collator = DocVQACollator(idefics3_processor, "Answer briefly.", max_length=512, answer_choice="first")
    batch = collator(rows_for(ANSWERS, Image.new("RGB", (300, 400), "white")))
    forbidden = {tok.pad_token_id, tok.bos_token_id, *tok.convert_tokens_to_ids(["<image>", "<global-img>"])}
    forbidden.add(tok.convert_tokens_to_ids("<fake_token_around_image>"))
    for i, answer in enumerate(ANSWERS):
        assert tok.decode(label_tokens(batch, i)) == f"{answer}<end_of_utterance>"
        assert not forbidden & set(label_tokens(batch, i))
        # every image token of the expanded page is in the batch, and none is a label
        image_positions = batch["input_ids"][i] == tok.convert_tokens_to_ids("<image>")
        assert image_positions.sum() == 16 and (batch["labels"][i][image_positions] == IGNORE_INDEX).all()


def test_the_smolvlm_recipe_trains_the_tiny_idefics3_and_lowers_its_loss(idefics3_run):
    out, trainer, metrics = idefics3_run
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), losses
    assert (out / "adapter_model.safetensors").is_file() and "generation_anls" in metrics
    adapted = {name for name, _ in trainer.model.named_modules() if name.endswith("lora_A")}
    assert any("text_model" in name for name in adapted) and any("modality_projection" in name for name in adapted)
    assert not any("vision_model" in name for name in adapted)


@pytest.mark.parametrize("boosted, stops", [("<end_of_utterance>", True), ("▁total", False)])
def test_generation_stops_at_the_idefics3_end_of_turn(idefics3_path, idefics3_processor, boosted, stops):
    """A model made to say only `boosted` stops at once on Idefics3's end of turn, and runs to max_new_tokens on
    an ordinary token: the stop ids come from the family."""
    from transformers import AutoModelForImageTextToText

    from docvlm.evaluate import generate

    model = AutoModelForImageTextToText.from_pretrained(idefics3_path)
    token = idefics3_processor.tokenizer.convert_tokens_to_ids(boosted)

    def say_only(module, inputs, logits):
        return logits.index_fill(-1, torch.tensor([token]), 1e4)

    model.lm_head.register_forward_hook(say_only)
    rows = [{"image": Image.new("RGB", (200, 260), "white"), "question": "What is the total?"}]
    [result] = generate(model, idefics3_processor, rows, Prompt("Answer briefly."), max_new_tokens=5, batch_size=1)
    assert result["stopped"] is stops
    assert result["answer"] == ("" if stops else "total total total total total")


def test_an_idefics3_adapter_merges_and_answers_as_before(idefics3_run, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from docvlm.evaluate import generate
    from docvlm.export import load_for_inference

    out, _, _ = idefics3_run
    merged_dir = tmp_path / "merged"
    assert cli(["merge", "--adapter", str(out), "--out", str(merged_dir), "--dtype", "float32"]) == 0
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32)
    assert type(merged).__name__ == "Idefics3ForConditionalGeneration"
    rows = held_out(6)
    adapted, adapter_processor, prompt, _ = load_for_inference(adapter=str(out))
    want = generate(adapted, adapter_processor, rows, prompt, 8, 3)
    got = generate(merged, AutoProcessor.from_pretrained(merged_dir), rows, prompt, 8, 3)
    assert [a["answer"] for a in got] == [a["answer"] for a in want]
