"""`docvlm plan`: before renting a GPU, what a recipe will train on, whether it fits the card and what a step costs.

    docvlm plan --config recipes/docvqa_qlora.yaml [--gpu t4-16gb] [--sample 64] [--field value ...]
    make plan RECIPE=docvqa_qlora GPU=l4-24gb

No GPU and no weights: the recipe is checked as training checks it, a sample of the training rows is screened and
measured (tokens, pages, patches), the model is built on the meta device from its config (the parameters, and
which of them 4-bit quantization shrinks), and peak memory and step time come from a model calibrated on
`make bench` measurements (docs/benchmarks.md says which).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass

from docvlm.errors import UserError
from docvlm.flops import CARDS

GIB = 2**30


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="docvlm plan",
        description="Check a recipe and a sample of its data without a GPU, then predict peak GPU memory and step "
        "time on a card. Recipe fields can be overridden as in training (--field value).",
        epilog="Example: docvlm plan --config recipes/docvqa_qlora.yaml --gpu t4-16gb",
    )
    parser.add_argument("--config", required=True, help="the recipe YAML")
    parser.add_argument("--gpu", choices=sorted(CARDS), default="h100-80gb", help="the card to predict for")
    parser.add_argument("--sample", type=int, default=32, help="training rows to screen and measure")
    return parser


@dataclass
class SampleStats:
    rows: int
    image_tokens: list[int]
    prompt_tokens: list[int]
    answer_tokens: list[int]
    pages: list[int]  # tower images a row (crops count)
    patches: list[int]  # real patches a row
    largest_page_patches: int  # the largest page's patch grid (pages are padded to it in a batch)


def _p95(values: list[int]) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def _describe(values: list[int]) -> str:
    return f"mean {statistics.fmean(values):7.1f} | p95 {_p95(values):6d} | max {max(values):6d}"


def measure_sample(rows, processor, data_args, patch_size: int | None) -> SampleStats:
    """Token, page and patch counts of each row, as a training batch of that row holds them."""
    import torch

    from docvlm.collator import DocVQACollator, Prompt
    from docvlm.flops import as_shapes, batch_shapes

    collator = DocVQACollator(processor, Prompt.of(data_args), None, "first")
    image_ids = torch.tensor(sorted(collator.image_token_ids))
    stats = SampleStats(len(rows), [], [], [], [], [], 0)
    for row in rows:
        batch = collator([row])
        ids = batch["input_ids"][0]
        images = int(torch.isin(ids, image_ids).sum())
        answer = int((batch["labels"][0] != -100).sum())
        stats.image_tokens.append(images)
        stats.answer_tokens.append(answer)
        stats.prompt_tokens.append(len(ids) - images - answer)
        if patch_size and "pixel_attention_mask" in batch:
            shapes = as_shapes(batch_shapes(batch, patch_size))
            stats.pages.append(int(shapes["pages"]))
            stats.patches.append(int(shapes["patches"]))
            grid = batch["pixel_values"].shape[-2] // patch_size * (batch["pixel_values"].shape[-1] // patch_size)
            stats.largest_page_patches = max(stats.largest_page_patches, grid)
    return stats


def offloaded_modules(skeleton, training_args) -> tuple[str, ...]:
    """The modules whose weights wait in CPU memory while training runs (vision_tower_offload)."""
    from docvlm.vision_tower import vision_tower

    if not training_args.vision_tower_offload:
        return ()
    tower = vision_tower(skeleton)
    return tuple(name for name, module in skeleton.named_modules() if module is tower)


def weight_bytes(skeleton, model_args, dtype_bytes: int = 2, leave_out: tuple[str, ...] = ()) -> tuple[int, int]:
    """(bytes of the weights on the GPU as loaded, parameters): Linear layers in 4-bit NF4 (half a byte a weight,
    plus a 4-byte scale a block of 64, or with nested quantization an 8-bit scale and a 4-byte one a 256 blocks)
    except the skipped modules and the output head, which stay in the compute dtype like every other parameter.
    The modules named in `leave_out` (offloaded_modules) count as parameters, not as bytes."""
    import torch

    skip = tuple(model_args.bnb_4bit_skip_modules or ()) + ("lm_head",)
    scale = (1 + 4 / 256) / 64 if model_args.use_bnb_nested_quant else 4 / 64
    total = params = 0
    for name, module in skeleton.named_modules():
        for param in module.parameters(recurse=False):
            count = param.numel()
            params += count
            if any(name == out or name.startswith(f"{out}.") for out in leave_out):
                continue
            quantized = (
                model_args.load_in_4bit
                and isinstance(module, torch.nn.Linear)
                and param is module.weight
                and not any(name == s or name.startswith(f"{s}.") or name.endswith(s) for s in skip)
            )
            total += count * (0.5 + scale) if quantized else count * dtype_bytes
    return int(total), params


def trainable_parameters(skeleton, model_args) -> int:
    """The adapter's parameters, counted on the meta-device model (peft builds its layers there too)."""
    from peft import get_peft_model

    from docvlm.modeling import lora_config

    config = lora_config(model_args)
    if config is None:
        return sum(p.numel() for p in skeleton.parameters())
    return sum(p.numel() for p in get_peft_model(skeleton, config).parameters() if p.requires_grad)


@dataclass
class Prediction:
    weights_gib: float
    optimizer_gib: float
    activations_gib: float
    peak_allocated_gib: float
    peak_reserved_gib: float
    step_seconds: float | None


def size_ratios(config, fitted_on: dict) -> dict[str, float]:
    """How much each memory term of the calibration grows from the model it was fitted on to `config`'s, by the
    dimensions that set it: the decoder's activations with its width and depth (a checkpointed decoder keeps each
    layer's input; an unchecked one its attention and MLP activations too), the connector's a patch with the
    widths its projection passes through (the perceiver's with the text width), and the step's workspace with its
    largest layer (a dequantized 4-bit weight). 1.0 for every term on the model it was fitted on."""
    text, vision = config.text_config, config.vision_config
    hidden, inner, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    ref = fitted_on
    return {
        "checkpointed_decoder": hidden * layers / (ref["text_hidden"] * ref["text_layers"]),
        "decoder": (hidden + inner) * layers / ((ref["text_hidden"] + ref["text_intermediate"]) * ref["text_layers"]),
        "connector": (vision.hidden_size + inner + hidden)
        / (ref["vision_hidden"] + ref["text_intermediate"] + ref["text_hidden"]),
        "perceiver": hidden / ref["text_hidden"],
        "workspace": hidden * inner / (ref["text_hidden"] * ref["text_intermediate"]),
    }


def perceiver_unmodelled(training_args, stats: SampleStats) -> bool:
    """Whether the recipe recomputes the perceiver in its own chunks (which the recipe allows with connector
    checkpointing only) for rows of several images: the memory model's perceiver term is fitted on one page a row."""
    return bool(training_args.connector_perceiver_pages) and max(stats.pages, default=1) > 1


def predict(
    config, training_args, stats: SampleStats, weights: int, trainable: int, card, nested: bool, family
) -> Prediction:
    """Peak memory and step time of a micro-batch of the recipe's size made of rows like the sample's (p95 length,
    largest pages), by the family's calibration (`Family.plan_calibration`, measured with `make bench`)."""
    batch = training_args.per_device_train_batch_size
    pages_a_row = max(stats.pages) if stats.pages else 0
    pages = batch * pages_a_row
    chunk = min(pages, training_args.connector_checkpoint_pages) if training_args.connector_checkpointing else pages
    # the recipe allows perceiver chunks with connector checkpointing only, and no smaller than the projection's
    perceiver = min(pages, training_args.connector_perceiver_pages or chunk)
    tokens = [i + p + a for i, p, a in zip(stats.image_tokens, stats.prompt_tokens, stats.answer_tokens, strict=True)]
    p95_tokens = _p95(tokens)
    calibrated = family.plan_calibration
    size = size_ratios(config, calibrated["fitted_on"])
    connector = calibrated["connector_bytes_per_patch"] * size["connector"] * chunk * stats.largest_page_patches
    perceiver_bytes = calibrated["perceiver_bytes_per_patch"] * size["perceiver"]
    connector += perceiver_bytes * (perceiver - chunk) * stats.largest_page_patches
    if training_args.connector_in_compute_dtype and training_args.precision != "fp32":
        connector *= calibrated["connector_in_compute_dtype_share"]
    if training_args.gradient_checkpointing:
        decoder = calibrated["decoder_bytes_per_token"] * size["checkpointed_decoder"] * batch * p95_tokens
        activations = connector + decoder
    else:
        decoder = calibrated["unchecked_decoder_bytes_per_token"] * size["decoder"] * batch * p95_tokens
        # a recomputed connector peaks after the decoder's backward pass has freed the decoder's activations
        activations = max(connector, decoder) if training_args.connector_checkpointing else connector + decoder
    activations += calibrated["step_workspace_bytes"] * size["workspace"]
    # loss_logits auto means all on a GPU, which is what plan predicts for
    logit_rows = p95_tokens if training_args.loss_logits != "answer" else _p95(stats.answer_tokens)
    vocab = config.text_config.vocab_size
    activations += calibrated["logit_bytes_per_vocab_entry"] * batch * logit_rows * vocab
    # the batch's pages on the GPU, padded to the largest: fp32 pixels and their half-precision copy, and the
    # tower's (or the cache's) half-precision features of every patch
    vision = config.vision_config
    pixels_a_patch = 3 * vision.patch_size**2 * (4 + 2)
    activations += pages * stats.largest_page_patches * (pixels_a_patch + 2 * vision.hidden_size)
    adapter = trainable * 4  # fp32 adapter weights, counted with the weights
    optimizer = trainable * 12  # fp32 gradients and AdamW's two moments
    start = weights + adapter
    allocated = start + optimizer + activations
    reserved = start + optimizer + calibrated["reserved_over_activations"] * activations
    seconds = None
    if family.training_flops is not None:
        mean = {
            "tokens": batch * statistics.fmean(tokens),
            "causal_pairs": batch * statistics.fmean(t * (t + 1) / 2 for t in tokens),
            "pages": pages,
            "patches": batch * statistics.fmean(stats.patches),
            "patch_pairs": batch * statistics.fmean(p * p / max(1, pages_a_row) for p in stats.patches),
        }
        tower_runs = training_args.vision_feature_cache == "off"
        flops = family.training_flops(config, mean, tower_runs)
        rate = calibrated["achieved_fraction_of_peak"] * card.peak_tflops * 1e12
        seconds = training_args.gradient_accumulation_steps * (calibrated["seconds_per_micro_batch"] + flops / rate)
        seconds *= calibrated["nested_quant_slowdown"] if nested else 1.0
    return Prediction(start / GIB, optimizer / GIB, activations / GIB, allocated / GIB, reserved / GIB, seconds)


def plan(argv: list[str]) -> int:
    started = time.perf_counter()
    args, rest = _parser().parse_known_args(argv)
    if args.sample < 1:
        raise UserError(f"--sample must be at least 1, got {args.sample}.")
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    from docvlm.config import parse_recipe
    from docvlm.data import load_splits
    from docvlm.families import family_of, refuse_what_does_not_apply
    from docvlm.hub import check_recipe_sources
    from docvlm.modeling import check_lora_targets, load_processor, model_path
    from docvlm.screen import screen_split

    data_args, model_args, training_args, _ = parse_recipe(["--config", args.config, *rest])
    check_recipe_sources(model_args, data_args)
    path = model_path(model_args)
    trust = training_args.trust_remote_code
    config = AutoConfig.from_pretrained(path, revision=model_args.model_revision, trust_remote_code=trust)
    family = family_of(config.model_type)
    refuse_what_does_not_apply(family, model_args, training_args)
    skeleton = check_lora_targets(model_args, path, trust, config=config)  # the meta-device model, when built
    train_rows, _ = load_splits(data_args, need_eval=False)
    processor = load_processor(model_args, path)
    every = max(1, len(train_rows) // args.sample)
    sample = train_rows.select(range(0, len(train_rows), every)[: args.sample])
    kept, skipped = screen_split(sample, processor, data_args, training_args.max_length, data_args.dataset_train_split)
    if len(kept) == 0:
        raise UserError(f"Every sampled training row of {data_args.dataset_name} was skipped: see the problems above.")

    vision = getattr(config, "vision_config", None)
    stats = measure_sample(kept, processor, data_args, getattr(vision, "patch_size", None))
    if skeleton is None:
        with init_empty_weights():
            skeleton = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust)
    weights, params = weight_bytes(skeleton, model_args, leave_out=offloaded_modules(skeleton, training_args))
    trainable = trainable_parameters(skeleton, model_args)

    rows = len(train_rows)  # max_train_samples applied
    per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    per_step *= training_args.world_size
    steps = (
        training_args.max_steps
        if training_args.max_steps > 0
        else math.ceil(rows / per_step) * math.ceil(training_args.num_train_epochs)
    )
    card = CARDS[args.gpu]
    lines = [
        f"Plan for {args.config} on {card.name} ({training_args.world_size} process(es); no GPU used)",
        f"  model      {path} ({family.name}): {params / 1e9:.2f} B parameters, {trainable / 1e6:.1f} M trained",
        f"  data       {rows} training rows; {len(kept)} of {len(sample)} sampled rows kept"
        + (f" ({len(skipped)} skipped: see above)" if skipped else ""),
        f"  steps      {steps} optimizer steps of {per_step} samples"
        f" ({training_args.per_device_train_batch_size} x {training_args.gradient_accumulation_steps} accumulation"
        f" x {training_args.world_size} process(es))",
        "  tokens a row (sampled):",
        f"    image    {_describe(stats.image_tokens)}",
        f"    prompt   {_describe(stats.prompt_tokens)}",
        f"    answer   {_describe(stats.answer_tokens)}",
    ]
    if stats.patches:
        lines.append(f"    patches  {_describe(stats.patches)} (the vision tower's input, {max(stats.pages)} page(s))")
    if training_args.vision_feature_cache != "off" and stats.patches:
        # 4 bytes a value: the tower's last LayerNorm runs in fp32 under autocast, and the cache keeps its
        # output as the connector receives it
        feature_bytes = 4 * vision.hidden_size * statistics.fmean(stats.patches) * rows
        limit = training_args.vision_feature_cache_max_gb
        size = f"{feature_bytes / GIB:.1f} GiB" if feature_bytes >= GIB else f"{feature_bytes / 2**20:.2f} MiB"
        lines.append(
            f"  cache      {size} of vision features ({training_args.vision_feature_cache}; "
            f"at most {limit:g} GB)"
            + ("  WARNING: over the bound, some pages are recomputed" if feature_bytes / 1e9 > limit else "")
        )
    if family.plan_calibration is None or not stats.patches:
        from docvlm.families import FAMILIES

        calibrated = ", ".join(f.name for f in FAMILIES if f.plan_calibration is not None)
        lines.append(
            f"  memory     not predicted: the memory model is calibrated for {calibrated} (this is {family.name})."
        )
    else:
        nested = bool(model_args.load_in_4bit and model_args.use_bnb_nested_quant)
        guess = predict(config, training_args, stats, weights, trainable, card, nested, family)
        fits = guess.peak_reserved_gib <= card.memory_gib
        lines += [
            f"  memory     weights {guess.weights_gib:.2f} GiB + gradients and optimizer {guess.optimizer_gib:.2f}"
            f" + activations {guess.activations_gib:.2f} at the peak",
            f"             peak allocated ~{guess.peak_allocated_gib:.1f} GiB, peak reserved "
            f"~{guess.peak_reserved_gib:.1f} GiB of {card.memory_gib:.0f} GiB: " + ("fits" if fits else "WILL NOT FIT"),
        ]
        if not fits:
            lines.append(
                "             lower per_device_train_batch_size (raise gradient_accumulation_steps), turn on "
                "connector_checkpointing with fewer connector_checkpoint_pages, or pick a larger card."
            )
        if perceiver_unmodelled(training_args, stats):
            lines.append(
                "             not modelled: connector_perceiver_pages with several images a row (measured on the 8B "
                "model with 5 crops a page, 8 x 2: 4 crops +8 GiB; docs/benchmarks.md, run U)"
            )
        if guess.step_seconds is not None:
            hours = guess.step_seconds * steps / 3600
            lines.append(f"  time       ~{guess.step_seconds:.1f} s a step, ~{hours:.2f} h for {steps} steps")
        if not card.bf16 and training_args.precision in ("bf16",):
            lines.append(f"  WARNING    {card.name} has no bf16: use precision: auto or fp16.")
    lines.append(f"(planned in {time.perf_counter() - started:.1f} s)")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return plan(argv)
    except UserError as err:
        print(f"docvlm plan: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
