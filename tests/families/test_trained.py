"""Families besides Idefics2 through docvlm's one collator and training path, each on its tiny fixture (the
family's real config class, processor and prompt format: a chat template, or PaliGemma's prefix and suffix; random
weights) and its shipped recipe: masking, training, generation and merge."""

from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from docvlm.cli import main as cli
from docvlm.families import GEMMA3, IDEFICS3, LLAVA, PALIGEMMA, QWEN_VL, Family, family_at, family_of_processor
from docvlm.prompts import Prompt
from docvlm.training.collator import IGNORE_INDEX, DocVQACollator
from tests.test_inference import held_out
from tests.training.test_collator import ANSWERS, label_tokens, rows_for


@dataclass(frozen=True)
class Case:
    fixture: str
    recipe: str
    family: Family
    processor: str
    end: str  # what closes a trained answer
    image_tokens: int  # per 300 x 400 page
    non_label_tokens: tuple[str, ...]  # image markers that must never be labels
    adapted: tuple[str, ...]  # module name parts that get LoRA layers
    frozen: str  # and the one that must not
    overrides: tuple[str, ...] = ()  # recipe flags the tiny model needs


CASES = {
    "idefics3": Case(
        "docvlm:tiny-idefics3",
        "smolvlm_docvqa_qlora",
        IDEFICS3,
        "Idefics3Processor",
        "<end_of_utterance>",
        16,
        ("<image>", "<global-img>", "<fake_token_around_image>"),
        ("text_model", "modality_projection"),
        "vision_model",
    ),
    "llava": Case(
        "docvlm:tiny-llava",
        "llava_docvqa_qlora",
        LLAVA,
        "LlavaProcessor",
        "</s>",  # LLaVA-1.5's template writes none: docvlm appends the end of sequence
        64,
        ("<image>",),
        ("language_model", "multi_modal_projector"),
        "vision_tower",
    ),
    "paligemma": Case(
        "docvlm:tiny-paligemma",
        "paligemma_docvqa_qlora",
        PALIGEMMA,
        "PaliGemmaProcessor",
        "</s>",  # the processor appends the end of sequence to the suffix
        64,
        ("<image>",),
        ("language_model", "multi_modal_projector"),
        "vision_tower",
    ),
}
# the recipes' 1,003,520 px would give a tiny page its full ~300 tokens; the fixture's own budget is 64
TINY_PAGE_BUDGET = ("--image_max_pixels", "50176")
QWEN_IMAGE_MARKERS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>")
for name, processor_class in (("qwen2-vl", "Qwen2VLProcessor"), ("qwen2.5-vl", "Qwen2_5_VLProcessor")):
    CASES[name] = Case(
        f"docvlm:tiny-{name}",
        f"{name.replace('-', '_').replace('.', '_')}_docvqa_qlora",
        QWEN_VL,
        processor_class,
        "<|im_end|>",
        54,  # a 300 x 400 page within the fixture's 64-token budget: 9 x 6 tokens of 28 x 28 px
        QWEN_IMAGE_MARKERS,
        ("language_model",),
        "visual",
        TINY_PAGE_BUDGET,
    )
CASES["qwen3-vl"] = Case(
    "docvlm:tiny-qwen3-vl",
    "qwen3_vl_docvqa_qlora",
    QWEN_VL,
    "Qwen3VLProcessor",
    "<|im_end|>",
    54,
    QWEN_IMAGE_MARKERS,
    ("language_model",),
    "visual",
    TINY_PAGE_BUDGET,
)
CASES["granite-docling"] = Case(
    "docvlm:tiny-granite-docling",
    "granite_docling_docvqa_lora",
    IDEFICS3,
    "Idefics3Processor",
    "<|end_of_text|>",  # Granite's end of turn, which its chat template writes (SmolVLM's is <end_of_utterance>)
    16,
    ("<image>", "<global-img>", "<fake_token_around_image>"),
    ("text_model", "modality_projection"),
    "vision_model",
)
CASES["gemma3"] = Case(
    "docvlm:tiny-gemma3",
    "gemma3_docvqa_qlora",
    GEMMA3,
    "Gemma3Processor",
    "<end_of_turn>",
    1,  # the processor's placeholder, <start_of_image>, once a page (then 16 soft tokens and <end_of_image>)
    ("<start_of_image>", "<image_soft_token>", "<end_of_image>"),
    ("language_model",),
    "vision_tower",
)


def processor_at(path: str):
    """The fixture's processor as docvlm loads it (the image-only twin where torchvision does not import)."""
    from docvlm.recipe.schema import ModelArguments
    from docvlm.training.modeling import load_processor, model_type_at

    return load_processor(ModelArguments(), path, model_type_at(path))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    from docvlm.fixtures import resolve

    spec = CASES[request.param]
    path = resolve(spec.fixture)
    return spec, path, processor_at(path)


@pytest.fixture(scope="module")
def trained_run(case, tmp_path_factory):
    """Eight steps of the family's recipe as shipped, on its tiny model and the tiny documents (DocVQA's schema, so
    the recipe's Data section applies unchanged), with the evaluation at the end."""
    from docvlm.train import run

    spec, _, _ = case
    out = tmp_path_factory.mktemp(f"{spec.recipe}-run")
    argv = ["--config", f"recipes/{spec.recipe}.yaml", "--model_name_or_path", spec.fixture, "--output_dir", str(out)]
    argv += ["--dataset_name", "docvlm:tiny-docs", "--max_train_samples", "32", "--max_eval_samples", "8"]
    argv += ["--max_steps", "8", "--gradient_accumulation_steps", "1", "--learning_rate", "2e-3", "--warmup_steps"]
    argv += ["0", "--logging_steps", "1", "--save_strategy", "no", "--eval_compare_base", "false"]
    argv += ["--dataloader_num_workers", "0", "--dataloader_persistent_workers", "false", "--report_to", "none"]
    trainer, metrics = run([*argv, *spec.overrides])
    return out, trainer, metrics


def test_the_fixture_is_a_model_of_its_family(case):
    spec, path, processor = case
    assert family_at(path) is spec.family and family_of_processor(processor) is spec.family
    assert type(processor).__name__ == spec.processor


def test_only_each_answer_and_the_token_that_closes_it_are_labels(case):
    spec, _, processor = case
    tok = processor.tokenizer
    collator = DocVQACollator(processor, "Answer briefly.", max_length=512, answer_choice="first")
    batch = collator(rows_for(ANSWERS, Image.new("RGB", (300, 400), "white")))
    forbidden = {tok.pad_token_id, tok.bos_token_id, *tok.convert_tokens_to_ids(list(spec.non_label_tokens))}
    image_token = tok.convert_tokens_to_ids(str(processor.image_token))
    for i, answer in enumerate(ANSWERS):
        assert tok.decode(label_tokens(batch, i)).strip() == f"{answer}{spec.end}"
        assert batch["input_ids"][i][:2].tolist().count(tok.bos_token_id) <= 1  # a template's own BOS is not doubled
        assert not forbidden & set(label_tokens(batch, i))
        # every image token of the expanded page is in the batch, and none is a label
        image_positions = batch["input_ids"][i] == image_token
        assert image_positions.sum() == spec.image_tokens
        assert (batch["labels"][i][image_positions] == IGNORE_INDEX).all()


@pytest.mark.integration
def test_the_recipe_trains_the_tiny_model_and_lowers_its_loss(case, trained_run):
    spec, _, _ = case
    out, trainer, metrics = trained_run
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), losses
    assert (out / "adapter_model.safetensors").is_file() and "generation_anls" in metrics
    adapted = {name for name, _ in trainer.model.named_modules() if name.endswith("lora_A")}
    assert all(any(part in name for name in adapted) for part in spec.adapted), sorted(adapted)[:5]
    assert not any(spec.frozen in name for name in adapted)


@pytest.mark.parametrize("stops", [True, False])
def test_generation_stops_at_the_familys_end_of_turn(case, stops):
    """A model made to say only the family's end of turn stops at once; made to say an ordinary token, it runs to
    max_new_tokens: the stop ids come from the family."""
    from transformers import AutoModelForImageTextToText

    from docvlm.evaluation.generation import generate

    spec, path, processor = case
    model = AutoModelForImageTextToText.from_pretrained(path)
    token = processor.tokenizer.convert_tokens_to_ids(spec.end if stops else "▁total")

    def say_only(module, inputs, logits):
        return logits.index_fill(-1, torch.tensor([token]), 1e4)

    model.lm_head.register_forward_hook(say_only)
    rows = [{"image": Image.new("RGB", (200, 260), "white"), "question": "What is the total?"}]
    [result] = generate(model, processor, rows, Prompt("Answer briefly."), max_new_tokens=5, batch_size=1)
    assert result["stopped"] is stops
    assert result["answer"] == ("" if stops else "total total total total total")


@pytest.mark.integration
def test_an_adapter_merges_and_answers_as_before(case, trained_run, tmp_path):
    from transformers import AutoModelForImageTextToText

    from docvlm.evaluation.generation import generate
    from docvlm.inference import load_for_inference

    spec, _, _ = case
    out, _, _ = trained_run
    merged_dir = tmp_path / "merged"
    assert cli(["merge", "--adapter", str(out), "--out", str(merged_dir), "--dtype", "float32"]) == 0
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32)
    assert family_at(str(merged_dir)) is spec.family
    rows = held_out(6)
    adapted, adapter_processor, prompt, _ = load_for_inference(adapter=str(out))
    want = generate(adapted, adapter_processor, rows, prompt, 8, 3)
    got = generate(merged, processor_at(str(merged_dir)), rows, prompt, 8, 3)
    assert [a["answer"] for a in got] == [a["answer"] for a in want]


def test_a_prefix_prompted_family_refuses_conversations_and_a_system_prompt():
    from transformers import AutoProcessor

    from docvlm.errors import UserError
    from docvlm.families import prompt_text
    from docvlm.fixtures import resolve

    processor = AutoProcessor.from_pretrained(resolve("docvlm:tiny-paligemma"))
    assert prompt_text(processor, Prompt("Answer briefly."), "What is the total?", 2) == (
        "<image><image>Answer briefly. What is the total?"
    )
    messages = [{"role": "user", "content": "Total?"}, {"role": "assistant", "content": "42"}]
    with pytest.raises(UserError, match="PaliGemma models answer a prefix .* not a chat"):
        prompt_text(processor, Prompt("Answer briefly."), {"messages": messages}, 1)
    with pytest.raises(UserError, match="system_prompt do not apply"):
        prompt_text(processor, Prompt("Answer briefly.", system="You read invoices."), "Total?", 1)


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_switch_keeps_loss_and_gradients_or_is_refused(name):
    """The family's contract, for every switch that reaches into the model (a switch with a family capability,
    docvlm.speedups): one the family offers gives the loss and LoRA gradients of the run without it; one it does
    not offer stops the run at start-up."""
    from docvlm import speedups
    from docvlm.errors import UserError
    from docvlm.recipe.parse import parse_recipe
    from docvlm.speedups.model_parts import vision_tower
    from tests.helpers import assert_same, loss_and_grads, peft_tiny_model_and_batch

    spec = CASES[name]
    recipe = f"recipes/{spec.recipe}.yaml"
    data = ["--model_name_or_path", spec.fixture, "--dataset_name", "docvlm:tiny-docs", "--max_train_samples", "8"]
    data += spec.overrides
    off = ["--vision_tower_no_grad", "false", "--vision_tower_pages", "0", "--connector_checkpointing", "false"]
    off += ["--connector_perceiver_pages", "null", "--connector_lean_activations", "false"]
    torch.manual_seed(0)  # the same LoRA initialisation for every model built here
    model, batch = peft_tiny_model_and_batch(4, recipe, *data, *off)
    model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    model.enable_input_require_grads()  # as the Trainer does with gradient checkpointing and PEFT
    plain = loss_and_grads(model, batch)
    on = {"vision_tower_no_grad": "true", "vision_tower_pages": "2", "connector_checkpointing": "true"}
    on.update(connector_lean_activations="true", vision_feature_cache="memory", compile_text_layers="true")
    on.update(fused_rms_norms="true", connector_in_compute_dtype="true", packed_rows="true")
    reaching_in = [switch for switch in speedups.SWITCHES if switch.family_hook]
    assert sorted(switch.name for switch in reaching_in) == sorted(on)  # every such switch is tried here
    for switch in reaching_in:
        argv = ["--config", recipe, *data, *off, f"--{switch.name}", on[switch.name]]
        if switch.name in ("vision_tower_pages", "vision_feature_cache"):  # both work through the frozen tower
            argv += ["--vision_tower_no_grad", "true"]
        _, model_args, training_args, _ = parse_recipe(argv)
        if not getattr(spec.family, switch.family_hook):
            with pytest.raises(UserError, match=f"{switch.name} is on in the recipe, but it does not apply"):
                speedups.refuse_what_does_not_apply(spec.family, training_args)
            continue
        speedups.refuse_what_does_not_apply(spec.family, training_args)
        torch.manual_seed(0)
        switched, batch = peft_tiny_model_and_batch(4, recipe, *data, *off)
        switched.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
        switched.enable_input_require_grads()
        context = speedups.SwitchContext(training_args, spec.family, model=switched.get_base_model())
        speedups.apply(speedups.LOADED, context)
        if switch.name.startswith("vision_"):  # patched, not silently left alone
            assert "forward" in vars(vision_tower(switched.get_base_model()))
        if switch.name == "compile_text_layers":  # every decoder layer runs compiled code
            layers = switched.get_base_model().model.text_model.layers
            assert all(layer._compiled_call_impl is not None for layer in layers)
        if switch.name == "fused_rms_norms":  # every norm of the decoder and the connector
            inner = switched.get_base_model().model
            for part in (inner.text_model, inner.connector):
                norms = [m for m in part.modules() if type(m).__name__.endswith("RMSNorm")]
                assert norms and all("forward" in vars(m) for m in norms)
        assert_same(plain, loss_and_grads(switched, batch))
