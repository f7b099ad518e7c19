"""Real model architectures besides Idefics2-8B for `make bench`, with random weights (speed and memory do not depend
on the weight values), and each family's usual setup without docvlm as its baseline, as the notebook is Idefics2's.

    python -m benchmarks.bench --model qwen2.5-vl-7b --pages 32 --setups baseline qwen2_5_vl_docvqa_qlora
    python -m benchmarks.families                    # every family recipe on its real architecture, a few steps each

The configs are written out here because the GPU machines cannot reach the Hub; their sizes are those of the
models' published config.json files. Each is built over its family's tiny fixture (docvlm.fixtures): its tokenizer
(Mistral's with the family's special tokens), chat template and processor class, with the real page sizes. The
tokenizer changes what the words cost, not what a page costs, and the embedding is sized to the real vocabulary."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Architecture:
    """A published model's sizes over the tiny fixture of its family, and the recipe that trains it."""

    fixture: str  # the tiny fixture whose tokenizer, chat template and processor the model reuses
    recipe: str  # the shipped recipe for this model
    parameters: float  # the published parameter count in billions, which the CPU tests check the sizes against
    text: dict  # the decoder's sizes (config.json's text_config)
    vision: dict  # the vision tower's (vision_config)
    top: dict = field(default_factory=dict)  # the connector's and other top-level keys
    pages: dict = field(default_factory=dict)  # the image processor's page sizes
    processor: dict = field(default_factory=dict)  # the processor's (image tokens a page)
    budget: dict = field(default_factory=dict)  # the processor's default page budget, as recipe options


# The processor's own page budget (Qwen2-VL's image processor defaults), which recipes lower
QWEN_DEFAULT_MAX_PIXELS = 12845056
QWEN_BUDGET = {"image_min_pixels": 3136, "image_max_pixels": QWEN_DEFAULT_MAX_PIXELS}
SIGLIP_SO400M = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14
)
IDEFICS3_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

ARCHITECTURES = {
    # Qwen/Qwen2.5-VL-7B-Instruct
    "qwen2.5-vl-7b": Architecture(
        fixture="docvlm:tiny-qwen2.5-vl",
        recipe="qwen2_5_vl_docvqa_qlora",
        parameters=8.29,
        text=dict(
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
        vision=dict(
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
        top={"tie_word_embeddings": False},
        budget=QWEN_BUDGET,
    ),
    # Qwen/Qwen2-VL-2B-Instruct
    "qwen2-vl-2b": Architecture(
        fixture="docvlm:tiny-qwen2-vl",
        recipe="qwen2_vl_docvqa_qlora",
        parameters=2.21,
        text=dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision=dict(
            depth=32,
            embed_dim=1280,
            hidden_size=1536,
            mlp_ratio=4,
            num_heads=16,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        top={"tie_word_embeddings": True},
        budget=QWEN_BUDGET,
    ),
    # Qwen/Qwen3-VL-4B-Instruct
    "qwen3-vl-4b": Architecture(
        fixture="docvlm:tiny-qwen3-vl",
        recipe="qwen3_vl_docvqa_qlora",
        parameters=4.44,
        text=dict(
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=262144,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [24, 20, 20],
                "mrope_interleaved": True,
            },
        ),
        vision=dict(
            depth=24,
            hidden_size=1024,
            intermediate_size=4096,
            num_heads=16,
            out_hidden_size=2560,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[5, 11, 17],
        ),
        top={"tie_word_embeddings": True},
        budget={"image_min_pixels": 4096, "image_max_pixels": 16777216},
    ),
    # google/gemma-3-4b-it: a 896 px page pooled to 256 tokens
    "gemma3-4b": Architecture(
        fixture="docvlm:tiny-gemma3",
        recipe="gemma3_docvqa_qlora",
        parameters=4.30,
        text=dict(
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            vocab_size=262208,
            sliding_window=1024,
            query_pre_attn_scalar=256,
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
        ),
        vision={**SIGLIP_SO400M, "image_size": 896, "vision_use_head": False},
        top={"mm_tokens_per_image": 256, "tie_word_embeddings": True},
        pages={"size": {"height": 896, "width": 896}},
        processor={"image_seq_length": 256},
    ),
    # google/paligemma-3b-pt-448: a 448 px page is 1,024 tokens
    "paligemma-3b-448": Architecture(
        fixture="docvlm:tiny-paligemma",
        recipe="paligemma_docvqa_qlora",
        parameters=2.92,
        text=dict(
            hidden_size=2048,
            intermediate_size=16384,
            num_hidden_layers=18,
            num_attention_heads=8,
            num_key_value_heads=1,
            head_dim=256,
            vocab_size=257216,
            max_position_embeddings=8192,
        ),
        vision={**SIGLIP_SO400M, "image_size": 448, "projection_dim": 2048, "vision_use_head": False},
        top={"projection_dim": 2048, "hidden_size": 2048, "tie_word_embeddings": True},
        pages={"size": {"height": 448, "width": 448}, "image_seq_length": 1024},
        processor={"image_seq_length": 1024},
    ),
    # llava-hf/llava-1.5-7b-hf: a 336 px CLIP crop is 576 tokens
    "llava-1.5-7b": Architecture(
        fixture="docvlm:tiny-llava",
        recipe="llava_docvqa_qlora",
        parameters=7.06,
        text=dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
        ),
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            image_size=336,
            projection_dim=768,
        ),
        top={"tie_word_embeddings": False},
        pages={"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
    ),
    # HuggingFaceTB/SmolVLM-Instruct: a page split into 384 px crops of 81 tokens, and the whole page as one more
    "smolvlm-2b": Architecture(
        fixture="docvlm:tiny-idefics3",
        recipe="smolvlm_docvqa_qlora",
        parameters=2.25,
        text=dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=24,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=49155,
            max_position_embeddings=16384,
            rope_theta=273768.0,
        ),
        vision={**SIGLIP_SO400M, "image_size": 384},
        top={"scale_factor": 3, "tie_word_embeddings": False},
        pages={"do_image_splitting": True, "size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384}},
        processor={"image_seq_len": 81},
    ),
    # ibm-granite/granite-docling-258M: a page split into 512 px crops of 64 tokens, and the whole page as one more
    "granite-docling-258m": Architecture(
        fixture="docvlm:tiny-granite-docling",
        recipe="granite_docling_docvqa_lora",
        parameters=0.258,
        text=dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=100352,
            max_position_embeddings=8192,
            rope_theta=100000.0,
        ),
        vision=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            patch_size=16,
            image_size=512,
        ),
        top={"scale_factor": 4, "tie_word_embeddings": True},
        pages={"do_image_splitting": True, "size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}},
        processor={"image_seq_len": 64},
    ),
}
# The tiny fixtures' keys that follow from their sizes and would be wrong at the real ones (the real sizes set them)
DERIVED_KEYS = ("layer_types", "head_dim", "rope_parameters", "rope_theta", "sliding_window", "rope_scaling")


def real_config(architecture: Architecture):
    """The model config of `architecture`: its family's tiny config with the published sizes."""
    from transformers import AutoConfig

    from docvlm.fixtures import resolve

    config = AutoConfig.from_pretrained(resolve(architecture.fixture))
    values = config.to_dict()
    for part, sizes in (("text_config", architecture.text), ("vision_config", architecture.vision)):
        values[part] = {k: v for k, v in values[part].items() if k not in DERIVED_KEYS} | sizes
    values.update(architecture.top)
    return type(config).from_dict(values)


def real_processor(architecture: Architecture):
    """The family's processor (stock where torchvision imports, docvlm's image-only one where not) with the
    published model's page sizes and image tokens a page."""
    from docvlm.fixtures import resolve
    from docvlm.recipe.schema import ModelArguments
    from docvlm.training.modeling import load_processor, model_type_at

    path = resolve(architecture.fixture)
    processor = load_processor(ModelArguments(**architecture.budget), path, model_type_at(path))
    for key, value in architecture.pages.items():
        setattr(processor.image_processor, key, value)
    for key, value in architecture.processor.items():
        setattr(processor, key, value)
    return processor


def build(name: str, out_dir: Path) -> None:
    """`name`'s architecture with random bf16 weights and its processor, saved like a Hub snapshot."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from docvlm.fixtures import resolve

    architecture = ARCHITECTURES[name]
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(real_config(architecture), dtype=torch.bfloat16)
    model.generation_config = GenerationConfig.from_pretrained(resolve(architecture.fixture))
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="5GB")
    real_processor(architecture).save_pretrained(out_dir)
    del model
    torch.cuda.empty_cache()  # the bench's children measure their own peak; this process holds nothing meanwhile


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
