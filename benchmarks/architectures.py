"""Real model architectures besides Idefics2-8B for `make bench`, with random weights (speed and memory do not depend
on the weight values), and each family's usual setup without docvlm as its baseline, as the notebook is Idefics2's.

    python -m benchmarks.bench --model qwen2.5-vl-7b --pages 32 --setups baseline qwen2_5_vl_docvqa_qlora

The configs are written out here because the GPU machines cannot reach the Hub; their sizes are those of the
models' published config.json files. The tokenizer is the tiny fixtures' (Mistral's with the family's special
tokens, docvlm.fixtures): it changes what the words cost, not what a page costs, and the embedding is sized to the
real vocabulary."""

from __future__ import annotations

import tempfile
from pathlib import Path

# Qwen2.5-VL-7B-Instruct's config.json
QWEN2_5_VL_7B = {
    "text": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    ),
    "vision": dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
}
ARCHITECTURES = {"qwen2.5-vl-7b": ("qwen2_5_vl", QWEN2_5_VL_7B)}
# The processor's own page budget (Qwen2-VL's image processor defaults), which recipes lower
QWEN_DEFAULT_MAX_PIXELS = 12845056


def build_qwen(model_type: str, spec: dict, out_dir: Path) -> None:
    """A Qwen-VL model of `spec`'s sizes with random bf16 weights and the family's processor (stock or image-only)."""
    import torch
    import transformers

    from docvlm.families.qwen_vl import PROCESSOR_OF
    from docvlm.families.qwen_vl.processor import image_only, torchvision_imports
    from docvlm.fixtures.models import image_processor_class
    from docvlm.fixtures.qwen_vl import QWEN2_VL_CHAT_TEMPLATE, qwen_tokenizer, token_ids

    tokenizer = qwen_tokenizer()
    names = {"qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}[model_type]
    config_class, model_class = (getattr(transformers, name) for name in names)
    text = {**spec["text"], "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = config_class(text_config=text, vision_config=spec["vision"], **token_ids(tokenizer))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = model_class._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="5GB")
    stock = PROCESSOR_OF[model_type]
    pages = image_processor_class("Qwen2VLImageProcessor")(min_pixels=3136, max_pixels=QWEN_DEFAULT_MAX_PIXELS)
    if torchvision_imports():
        processor = getattr(transformers, stock)(
            image_processor=pages,
            tokenizer=tokenizer,
            video_processor=transformers.Qwen2VLVideoProcessor(),
            chat_template=QWEN2_VL_CHAT_TEMPLATE,
        )
    else:
        processor = image_only(stock)(image_processor=pages, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)


def build(name: str, out_dir: Path) -> None:
    model_type, spec = ARCHITECTURES[name]
    build_qwen(model_type, spec, out_dir)


class TrlStyleCollator:
    """What TRL's VLM example trains on: the whole chat (prompt and answer) with padding and image tokens masked."""

    def __init__(self, processor, instruction: str):
        self.processor, self.instruction = processor, instruction
        tokenizer = processor.tokenizer
        self.masked = [tokenizer.pad_token_id, processor.image_token_id]

    def __call__(self, examples):
        texts, images = [], []
        for example in examples:
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": f"{self.instruction} {example['query']['en']}"},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": example["answers"][0]}]},
            ]
            texts.append(self.processor.apply_chat_template(messages))
            images.append([example["image"]])
        batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        for token in self.masked:
            labels[labels == token] = -100
        batch["labels"] = labels
        return batch


def run_trl_style(model_dir: str, data_dir: str, steps: int, warmup: int, timer, max_pixels: int = 1003520) -> dict:
    """The usual TRL-style QLoRA setup: NF4 with double quantization, LoRA r=8 on the language model's projections,
    `prepare_model_for_kbit_training` with gradient checkpointing, batch 2, the page budget `max_pixels`."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig, Trainer, TrainingArguments

    from docvlm.recipe.schema import ModelArguments
    from docvlm.training.modeling import load_processor, model_type_at

    model_type = model_type_at(model_dir)
    processor = load_processor(ModelArguments(image_max_pixels=max_pixels), model_dir, model_type)
    processor.tokenizer.padding_side = "right"
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.bfloat16, quantization_config=quantization, device_map={"": 0}
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    targets = r".*language_model.*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-style-"),
        max_steps=warmup + steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        learning_rate=2e-4,
        bf16=True,
        gradient_checkpointing=True,
        remove_unused_columns=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=TrlStyleCollator(processor, "Answer briefly."),
        train_dataset=load_dataset(data_dir, split="train"),
        callbacks=[timer],
    )
    trainer.train()
    return {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
