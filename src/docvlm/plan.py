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


def measure_sample(rows, processor, data_args, patch_size: int | None, config=None) -> SampleStats:
    """Token, page and patch counts of each row, as a training batch of that row holds them. Image tokens are the
    processor's placeholder and the model's image token (which the placeholder may expand into)."""
    import torch

    from docvlm.flops import as_shapes, batch_shapes, largest_page_patches
    from docvlm.prompts import Prompt
    from docvlm.training.collator import DocVQACollator

    collator = DocVQACollator(processor, Prompt.of(data_args), None, "first")
    model_image_token = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    image_ids = torch.tensor(sorted(collator.image_token_ids | ({model_image_token} - {None})))
    stats = SampleStats(len(rows), [], [], [], [], [], 0)
    for row in rows:
        batch = collator([row])
        ids = batch["input_ids"][0]
        images = int(torch.isin(ids, image_ids).sum())
        answer = int((batch["labels"][0] != -100).sum())
        stats.image_tokens.append(images)
        stats.answer_tokens.append(answer)
        stats.prompt_tokens.append(len(ids) - images - answer)
        if patch_size and "pixel_values" in batch:
            shapes = as_shapes(batch_shapes(batch, patch_size))
            stats.pages.append(int(shapes["pages"]))
            stats.patches.append(int(shapes["patches"]))
            stats.largest_page_patches = max(stats.largest_page_patches, largest_page_patches(batch, patch_size))
    return stats


def weight_bytes(skeleton, model_args, dtype_bytes: int = 2, leave_out: tuple[str, ...] = ()) -> tuple[int, int]:
    """(bytes of the weights on the GPU as loaded, parameters): Linear layers in 4-bit NF4 (half a byte a weight,
    plus a 4-byte scale a block of 64, or with nested quantization an 8-bit scale and a 4-byte one a 256 blocks)
    except the skipped modules and the output head, which stay in the compute dtype like every other parameter.
    The modules named in `leave_out` (tower_modules) count as parameters, not as bytes."""
    import torch

    skip = tuple(model_args.bnb_4bit_skip_modules or ()) + ("lm_head",)
    scale = (1 + 4 / 256) / 64 if model_args.use_bnb_nested_quant else 4 / 64
    total = params = 0
    seen = set()  # a tied output head shares the embedding's parameter: counted once
    for name, module in skeleton.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
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

    from docvlm.training.modeling import lora_config

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
    notes: list[str]


def plan_terms(training_args, stats: SampleStats, nested: bool, calibration: dict, config=None, rows: int = 0):
    """The terms of a micro-batch of the recipe's size made of rows like the sample's (p95 length, largest pages),
    as the switches that are on leave them (docvlm.speedups.PlanTerms)."""
    from docvlm import speedups

    tokens = [i + p + a for i, p, a in zip(stats.image_tokens, stats.prompt_tokens, stats.answer_tokens, strict=True)]
    terms = speedups.PlanTerms(
        args=training_args,
        batch=training_args.per_device_train_batch_size,
        pages_a_row=max(stats.pages) if stats.pages else 0,
        largest_page_patches=stats.largest_page_patches,
        tokens=tokens,
        answer_tokens=stats.answer_tokens,
        patches=stats.patches,
        p95_tokens=_p95(tokens),
        p95_answer_tokens=_p95(stats.answer_tokens),
        nested_quant=nested,
        calibration=calibration,
        config=config,
        rows=rows,
    )
    speedups.plan_terms(terms)
    return terms


def predict(config, terms, weights: int, trainable: int, card, memory_model) -> Prediction:
    """Peak memory and step time: the weights as loaded and the adapter, its gradients and AdamW's state, and the
    activations and step time of the family's memory model (`Family.memory_model`, calibrated with `make bench`)."""
    activations, reserved_activations = memory_model.activation_bytes(config, terms)
    adapter = trainable * 4  # fp32 adapter weights, counted with the weights
    optimizer = trainable * 12  # fp32 gradients and AdamW's two moments
    start = weights + adapter
    allocated = start + optimizer + activations
    reserved = start + optimizer + reserved_activations
    seconds = memory_model.step_seconds(config, terms, card.peak_tflops)
    return Prediction(
        start / GIB,
        optimizer / GIB,
        activations / GIB,
        allocated / GIB,
        reserved / GIB,
        seconds,
        memory_model.notes(terms),
    )


def plan(argv: list[str]) -> int:
    started = time.perf_counter()
    args, rest = _parser().parse_known_args(argv)
    if args.sample < 1:
        raise UserError(f"--sample must be at least 1, got {args.sample}.")
    from docvlm.prepare import prepare, screen_split
    from docvlm.recipe.parse import parse_recipe

    recipe = parse_recipe(["--config", args.config, *rest])
    data_args, model_args, training_args, eval_args = recipe
    prepared = prepare(recipe, need_eval=False, screen_train=False, warn_answers=False)
    train_rows, config, family = prepared.train_rows, prepared.config, prepared.family
    every = max(1, len(train_rows) // args.sample)
    sample = train_rows.select(range(0, len(train_rows), every)[: args.sample])
    kept, skipped = screen_split(sample, prepared.processor, recipe, data_args.dataset_train_split)
    if len(kept) == 0:
        raise UserError(f"Every sampled training row of {data_args.dataset_name} was skipped: see the problems above.")
    vision = getattr(config, "vision_config", None)
    stats = measure_sample(kept, prepared.processor, data_args, getattr(vision, "patch_size", None), config)
    nested = bool(model_args.load_in_4bit and model_args.use_bnb_nested_quant)
    memory_model = family.memory_model
    calibration = memory_model.calibration if memory_model else {}
    terms = plan_terms(training_args, stats, nested, calibration, config, rows=len(train_rows))  # max_train_samples
    skeleton = prepared.skeleton or meta_model(config, training_args.trust_remote_code)
    leave_out = () if terms.tower_on_gpu else tower_modules(skeleton)
    weights, params = weight_bytes(skeleton, model_args, leave_out=leave_out)
    trainable = trainable_parameters(skeleton, model_args)

    per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    per_step *= training_args.world_size
    steps = (
        training_args.max_steps
        if training_args.max_steps > 0
        else math.ceil(terms.rows / per_step) * math.ceil(training_args.num_train_epochs)
    )
    card = CARDS[args.gpu]
    lines = [
        f"Plan for {args.config} on {card.name} ({training_args.world_size} process(es); no GPU used)",
        f"  model      {prepared.path} ({family.name}): {params / 1e9:.2f} B parameters, {trainable / 1e6:.1f} M "
        "trained",
        f"  data       {terms.rows} training rows; {len(kept)} of {len(sample)} sampled rows kept"
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
        lines += terms.lines  # what the switches that are on have to say (the feature cache's size)
    if memory_model is None or not stats.patches:
        lines.append(f"  memory     not predicted: {not_calibrated(family)}")
    else:
        guess = predict(config, terms, weights, trainable, card, memory_model)
        lines += prediction_lines(guess, card, steps)
        lines += whole_run_lines(guess, terms, eval_args, weights, card, config, per_step, family.published_docvqa_run)
        if not card.bf16 and training_args.precision in ("bf16",):
            lines.append(f"  WARNING    {card.name} has no bf16: use precision: auto or fp16.")
    lines.append(f"(planned in {time.perf_counter() - started:.1f} s)")
    print("\n".join(lines))
    return 0


def meta_model(config, trust_remote_code: bool):
    """The model built on the meta device from its config: its parameters, without weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():
        skeleton = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    skeleton.tie_weights()  # built on empty weights, tied embeddings are two tensors (counted twice) until tied
    return skeleton


def tower_modules(skeleton) -> tuple[str, ...]:
    """The vision tower's module name, for a recipe that keeps its weights in CPU memory."""
    from docvlm.speedups.model_parts import vision_tower

    tower = vision_tower(skeleton)
    return tuple(name for name, module in skeleton.named_modules() if module is tower)


def memory_advice() -> list[str]:
    """What the switches that save memory advise, when a run will not fit (Switch.memory_advice)."""
    from docvlm import speedups

    return [switch.memory_advice for switch in speedups.SWITCHES if switch.memory_advice]


def not_calibrated(family) -> str:
    from docvlm.families import FAMILIES

    calibrated = ", ".join(f.name for f in FAMILIES if f.memory_model is not None)
    return f"the memory model is calibrated for {calibrated} (this is {family.name})."


def prediction_lines(guess: Prediction, card, steps: int) -> list[str]:
    fits = guess.peak_reserved_gib <= card.memory_gib
    lines = [
        f"  memory     weights {guess.weights_gib:.2f} GiB + gradients and optimizer {guess.optimizer_gib:.2f}"
        f" + activations {guess.activations_gib:.2f} at the peak",
        f"             peak allocated ~{guess.peak_allocated_gib:.1f} GiB, peak reserved "
        f"~{guess.peak_reserved_gib:.1f} GiB of {card.memory_gib:.0f} GiB: " + ("fits" if fits else "WILL NOT FIT"),
    ]
    if not fits:
        switches = "".join(f", {advice}" for advice in memory_advice())
        lines.append(
            f"             lower per_device_train_batch_size (raise gradient_accumulation_steps){switches}, or pick "
            "a larger card."
        )
    lines += [f"             {note}" for note in guess.notes]
    if guess.step_seconds is not None:
        hours = guess.step_seconds * steps / 3600
        lines.append(f"  time       ~{guess.step_seconds:.1f} s a step, ~{hours:.2f} h for {steps} steps")
    return lines


def whole_run_lines(
    guess: Prediction, terms, eval_args, weights: int, card, config, per_step: int, published: str | None
) -> list[str]:
    """A whole DocVQA fine-tune with this recipe on this card (docvlm.projection): training at the predicted step
    time, the feature cache's fill where it is on, and the before/after evaluation at the recipe's batch, beside
    the family's `published` one where it has one."""
    import statistics

    from docvlm.projection import project, questions_per_second, tower_seconds_a_page

    if guess.step_seconds is None:
        return []
    args, calibrated = terms.args, terms.calibration
    fill = 0.0
    if not terms.tower_runs and terms.patches:  # a feature cache fills before training
        fill = tower_seconds_a_page(config, statistics.fmean(terms.patches), card, calibrated)
    batch, longest = args.per_device_eval_batch_size, eval_args.eval_max_new_tokens
    speed = questions_per_second(weights, batch, longest, card, calibrated)
    projection = project(per_step / guess.step_seconds, fill, speed, compare_base=eval_args.eval_compare_base)
    return [
        f"  DocVQA     a whole fine-tune with this recipe ~{projection.total_hours:.1f} h on {card.name}:",
        *(f"             {part}" for part in projection.parts()),
        f"             (answers counted at their longest, {longest} tokens: {speed:.1f} questions/s at batch {batch})",
    ] + ([f"             for comparison, {published}"] if published else [])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return plan(argv)
    except UserError as err:
        print(f"docvlm plan: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
