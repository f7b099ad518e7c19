"""`make bench`: the seed notebook's training setup against our recipes, on one GPU, on the Idefics2-8B
architecture with random weights and DocVQA-sized synthetic pages.

    python -m benchmarks.bench                                   # the notebook (as is, and masked) and our 3 recipes
    python -m benchmarks.bench --setups baseline docvqa_qlora --steps 6 --warmup 2
    python -m benchmarks.bench --setups "docvqa_qlora --precision fp16" --steps 12
    python -m benchmarks.bench --model tiny --steps 2 --warmup 1  # a CPU smoke run of the same code

Speed and memory do not depend on the weight values, so the 8B model is built from its config (facts.md), saved
once as safetensors and then loaded by path with 4-bit quantization, as users load the Hub checkpoint. Each setup
runs in its own child process, one after another, so that peak-memory figures and allocator state never mix.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import architectures
from benchmarks import memory as bench_memory
from benchmarks import profile as bench_profile
from docvlm.families.idefics2 import IDEFICS2_8B
from docvlm.fixtures import TINY_MODEL, build_atomically, resolve
from docvlm.fixtures.documents import font
from docvlm.fixtures.models import build_processor, idefics2_config
from docvlm.runtime import cache_root

SEED_INSTRUCTION = "Answer briefly."
SEED_LORA_TARGETS = ".*(text_model|modality_projection|perceiver_resampler).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$"  # noqa: E501
# DocVQA-like questions and answers: ~9-word questions, answers of one to a few words.
_QUESTIONS = [
    "What is the date mentioned in this letter?",
    "What is the total amount due on the invoice?",
    "Who is the sender of this memo?",
    "What is the name of the company at the top?",
    "What is the page number at the bottom of the document?",
    "To whom is this fax addressed?",
    "What is the title of the report?",
    "Which year is mentioned in the table heading?",
]
_ANSWERS = [
    "March 14, 1996",
    "$1,250.00",
    "J. R. Smith",
    "ITC Limited",
    "12",
    "Dr. Alan Brooks",
    "Annual Report",
    "1989",
    "Tobacco Institute",
    "0.45",
]


def cache_dir() -> Path:
    return Path(os.environ.get("DOCVLM_BENCH_CACHE", Path(cache_root()) / "bench"))


# --------------------------------------------------------------------------------------------------------------
# Fixtures: the model and the pages
# --------------------------------------------------------------------------------------------------------------


def build_idefics2_8b(out_dir: Path) -> None:
    """Idefics2-8B's architecture with random weights (bf16 safetensors) and Idefics2's processor."""
    import torch
    from transformers import GenerationConfig, Idefics2ForConditionalGeneration

    config = idefics2_config(IDEFICS2_8B)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # initialising 8.4 B weights takes minutes on a CPU
    with torch.device(device):
        model = Idefics2ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    torch.nn.init.normal_(model.model.connector.perceiver_resampler.latents, std=1.0)  # see build_tiny_model
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 32002], pad_token_id=0)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="5GB")
    build_processor(image_seq_len=64, shortest_edge=378, longest_edge=980).save_pretrained(out_dir)


def render_page(rng: random.Random, size: tuple[int, int]):
    """A scanned-looking page: grey paper, a heading and lines of small print."""
    from PIL import Image, ImageDraw

    width, height = size
    page = Image.new("L", size, color=rng.randint(215, 250))
    draw = ImageDraw.Draw(page)
    draw.text((120, 100), rng.choice(_ANSWERS).upper(), fill=10, font=font(56))
    words = [w for q in _QUESTIONS for w in q.split()] + _ANSWERS
    y = 260
    while y < height - 150:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
        draw.text((120, y), line, fill=rng.randint(0, 60), font=font(26))
        y += rng.randint(34, 48)
    return page


def build_pages(out_dir: Path, n: int, size: tuple[int, int] = (1700, 2200), seed: int = 0) -> None:
    """DocVQA-shaped rows (image as JPEG, query.en, answers) in a parquet file, as `nielsr/docvqa_1200_examples`."""
    import io

    from datasets import Dataset, Features, Image, List, Value
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    rows = []
    for i in tqdm(range(n), desc="rendering pages"):
        buffer = io.BytesIO()
        render_page(rng, size).save(buffer, format="JPEG", quality=85)
        rows.append(
            {
                "id": str(i),
                "image": {"bytes": buffer.getvalue(), "path": None},
                "query": {"en": rng.choice(_QUESTIONS)},
                "answers": [rng.choice(_ANSWERS)],
            }
        )
    features = Features(
        {"id": Value("string"), "image": Image(), "query": {"en": Value("string")}, "answers": List(Value("string"))}
    )
    Dataset.from_list(rows, features=features).to_parquet(str(out_dir / "train.parquet"))


def fixtures(model: str, pages: int) -> tuple[str, str]:
    """Paths of the benchmark model and pages, built on first use."""
    if model == "tiny":
        model_dir, size = resolve(TINY_MODEL), (440, 560)
    elif model in architectures.ARCHITECTURES:
        model_dir, size = str(cache_dir() / f"{model}-random"), (1700, 2200)
        if not (Path(model_dir) / "COMPLETE").exists():
            build_atomically(lambda out: architectures.build(model, out), Path(model_dir))
    else:
        model_dir, size = str(cache_dir() / "idefics2-8b-random"), (1700, 2200)
        if not (Path(model_dir) / "COMPLETE").exists():
            build_atomically(build_idefics2_8b, Path(model_dir))
    data_dir = cache_dir() / f"pages-{size[0]}x{size[1]}-{pages}"
    if not (data_dir / "COMPLETE").exists():
        build_atomically(lambda out: build_pages(out, pages, size), data_dir)
    return model_dir, str(data_dir)


# --------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------


PROFILED_STEPS = 2  # run after the timed steps: the profiler slows the steps it records


def steps_to_run(warmup: int, steps: int, profile: bool) -> int:
    return warmup + steps + (PROFILED_STEPS if profile else 0)


def step_timer(warmup: int, steps: int, profile: bool = False, memory_profile: bool = False):
    """A TrainerCallback that times optimizer steps after `warmup`, records the loss at every step, and, to explain
    a slow step, what each one spent waiting: for its batch (the Trainer fetches a step's batches before
    `on_step_begin`), in Python's garbage collector, and in CUDA allocator calls (segments created or freed,
    allocations retried after freeing the cache, pinned host memory allocated). It also records what is allocated
    when training starts (the weights and state a mode keeps on each GPU) and, with `memory_profile`, what the
    first timed step's peak is made of (benchmarks.memory)."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    def allocator_counts() -> dict:
        if not cuda:
            return {}
        stats = torch.cuda.memory_stats()
        counts = {key: stats.get(key, 0) for key in ("num_device_alloc", "num_device_free", "num_alloc_retries")}
        host = getattr(torch.cuda, "host_memory_stats", None)  # pinned memory for the DataLoader's pin thread
        if host is not None:
            counts["num_host_alloc"] = host().get("num_host_alloc", 0)
        return counts

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.losses, self.profiler, self.profile = [], [], None, None
            self.timed = slice(warmup, warmup + steps)
            self.data_wait, self.gc_pause, self.allocator = [], [], []
            self.gc_started, self.gc_in_step = None, 0.0
            self.resident, self.allocated_before, self.memory_sites = None, None, None
            self.flops, self.shapes_in_step, self.flops_of = [], [], None

        def count_flops(self, model, tower_runs: bool):
            """Record each model call's real sizes (docvlm.flops.batch_shapes) to count the step's model FLOPs."""
            from docvlm.families import family_of
            from docvlm.flops import batch_shapes

            family = family_of(model.config.model_type)
            config = model.config
            self.flops_of = lambda shapes: family.training_flops(config, shapes, tower_runs)
            patch = config.vision_config.patch_size

            def record(module, args, kwargs):
                if module.training and ("attention_mask" in kwargs or "position_ids" in kwargs):  # packed rows
                    self.shapes_in_step.append(batch_shapes(kwargs, patch))

            model.register_forward_pre_hook(record, with_kwargs=True)

        def on_gc(self, phase, info):
            if phase == "start":
                self.gc_started = time.perf_counter()
            elif self.gc_started is not None:
                self.gc_in_step += time.perf_counter() - self.gc_started

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.count_flops(model, getattr(args, "vision_feature_cache", "off") == "off")
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()  # what loading left cached is not training memory
                torch.cuda.reset_peak_memory_stats()
                self.resident = torch.cuda.memory_allocated()
            gc.callbacks.append(self.on_gc)
            self.counts = allocator_counts()
            self.last = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.data_wait.append(time.perf_counter() - self.last)
            if memory_profile and cuda and state.global_step == warmup:
                self.allocated_before = bench_memory.start_recording()
            if profile and state.global_step == warmup + steps and self.profiler is None:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self.profiler = torch.profiler.profile(activities=activities, with_stack=True)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now
            self.gc_pause.append(self.gc_in_step)
            if self.flops_of is not None:
                from docvlm.flops import as_shapes

                self.flops.append(sum(self.flops_of(as_shapes(s.tolist())) for s in self.shapes_in_step))
                self.shapes_in_step = []
            self.gc_in_step = 0.0
            counts = allocator_counts()
            self.allocator.append({key: counts[key] - self.counts.get(key, 0) for key in counts})
            self.counts = counts
            if self.allocated_before is not None and self.memory_sites is None:
                peak, live = bench_memory.live_at_peak(
                    bench_memory.stop_recording(), self.allocated_before, torch.cuda.current_device()
                )
                self.memory_sites = {"peak_gib": peak / 2**30, "sites": bench_memory.top_sites(live)}
                rank = os.environ.get("RANK", "0")
                print(f"[rank {rank}] " + bench_memory.format_sites(peak / 2**30, self.memory_sites["sites"]))
            if self.profiler is not None and state.global_step == warmup + steps + PROFILED_STEPS:
                self.profiler.__exit__(None, None, None)
                sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
                print(self.profiler.key_averages().table(sort_by=sort, row_limit=30), flush=True)
                self.profile = bench_profile.summarize(self.profiler.events(), steps=PROFILED_STEPS)
                print(bench_profile.format_summary(self.profile), flush=True)
                self.profiler = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_train_end(self, args, state, control, **kwargs):
            if self.on_gc in gc.callbacks:
                gc.callbacks.remove(self.on_gc)

    return StepTimer()


def summarize(timer, samples_per_step: int) -> dict:
    import torch

    steady = timer.times[timer.timed] or timer.times
    s_per_step = sum(steady) / len(steady)
    result = {
        "steps_timed": len(steady),
        "s_per_step": s_per_step,
        # Every step, the warm-up included, to show stalls, and what each step waited for (see step_timer).
        "step_times": timer.times,
        "data_wait_s": timer.data_wait,
        "gc_pause_s": timer.gc_pause,
        "allocator_events": timer.allocator,
        "samples_per_s": samples_per_step / s_per_step,
        "first_loss": timer.losses[0] if timer.losses else None,
        "last_loss": timer.losses[-1] if timer.losses else None,
        "losses": timer.losses,
    }
    if timer.memory_sites:
        result["memory_at_peak"] = timer.memory_sites
    if timer.profile:
        result["profile"] = timer.profile
    if timer.flops:
        from docvlm.flops import card_of

        steady_flops = timer.flops[timer.timed] if timer.times[timer.timed] else timer.flops
        result["tflop_per_step"] = sum(steady_flops) / len(steady_flops) / 1e12
        result["achieved_tflops"] = sum(steady_flops) / sum(steady) / 1e12
        card = card_of(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        if card is not None:
            result["mfu"] = result["achieved_tflops"] / card.peak_tflops
    if torch.cuda.is_available():
        result.update(
            gpu=torch.cuda.get_device_name(),
            allocated_at_start_gib=timer.resident / 2**30,
            peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
        )
    return result


class SeedCollator:
    """The notebook's collator, as it was: labels are the input ids with padding set to the image token id, so
    padding, prompt and image tokens are all trained on (facts.md)."""

    def __init__(self, processor):
        self.processor = processor
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")

    def __call__(self, examples):
        texts, images = [], []
        for example in examples:
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": SEED_INSTRUCTION},
                        {"type": "image"},
                        {"type": "text", "text": example["query"]["en"]},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": random.choice(example["answers"])}]},
            ]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=False).strip())
            images.append([example["image"]])
        batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        labels[labels == self.processor.tokenizer.pad_token_id] = self.image_token_id
        batch["labels"] = labels
        return batch


class MaskedSeedCollator:
    """The notebook's setup with our answer-only labels (docvlm.training.collator), for comparing loss curves with ours:
    the notebook's own labels train on prompt, image and padding tokens, so its loss is not comparable."""

    def __init__(self, processor):
        from docvlm.training.collator import DocVQACollator

        self.collator = DocVQACollator(processor, SEED_INSTRUCTION, None, "random", seed=42)

    def __call__(self, examples):
        rows = [
            {"image": e["image"], "question": e["query"]["en"], "answers": e["answers"], "row": e["id"]}
            for e in examples
        ]
        return self.collator(rows)


def run_baseline(
    model_dir: str,
    data_dir: str,
    steps: int,
    warmup: int,
    profile: bool,
    masked: bool = False,
    memory_profile: bool = False,
) -> dict:
    """The seed notebook's setup, changed only so that it starts on current transformers: the fp16 adapter it
    creates is refused by the fp16 GradScaler, so trainable parameters are upcast to fp32 (facts.md).
    `masked`: with our answer-only labels instead of its collator."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import (
        AutoProcessor,
        BitsAndBytesConfig,
        Idefics2ForConditionalGeneration,
        Trainer,
        TrainingArguments,
    )

    cuda = torch.cuda.is_available()
    processor = AutoProcessor.from_pretrained(model_dir, do_image_splitting=False)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float16,
    )
    model = Idefics2ForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float16, quantization_config=quantization, device_map={"": 0} if cuda else None
    )
    lora = LoraConfig(
        r=8, lora_alpha=8, lora_dropout=0.1, target_modules=SEED_LORA_TARGETS, init_lora_weights="gaussian"
    )
    try:
        model.add_adapter(lora)
    except ValueError:  # newer transformers' add_adapter asks for a newer peft; inject the same LoRA layers
        from peft import inject_adapter_in_model

        inject_adapter_in_model(lora, model)
        model._hf_peft_config_loaded = True  # what add_adapter sets; the Trainer checks it
    for name, param in model.named_parameters():
        # LoRA weights only (23.3 M on the 8B, as in the notebook), upcast to fp32: the one fix it needs to start
        # on current transformers, whose fp16 GradScaler refuses fp16 trainable parameters.
        param.requires_grad = "lora_" in name
        if param.requires_grad:
            param.data = param.data.float()
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-baseline-"),
        max_steps=steps_to_run(warmup, steps, profile),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        learning_rate=1e-4,
        warmup_steps=50,
        weight_decay=0.01,
        fp16=cuda,
        use_cpu=not cuda,
        remove_unused_columns=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    timer = step_timer(warmup, steps, profile, memory_profile)
    train = load_dataset(data_dir, split="train")
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=(MaskedSeedCollator if masked else SeedCollator)(processor),
        train_dataset=train,
        callbacks=[timer],
    )
    trainer.train()
    result = summarize(timer, 16)
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


def run_recipe(
    recipe: str,
    model_dir: str,
    data_dir: str,
    steps: int,
    warmup: int,
    profile: bool,
    check_reload: bool = False,
    memory_profile: bool = False,
) -> dict:
    """A shipped recipe through `docvlm.train`, exactly as users run it, on the benchmark model and pages;
    `check_reload`: also compare the trained model's logits with its saved adapter's, reloaded whole."""
    from docvlm import train

    name, *overrides = shlex.split(recipe)
    features = tempfile.mkdtemp(prefix="bench-features-")
    argv = [
        "--config",
        f"recipes/{name}.yaml",
        "--model_name_or_path",
        model_dir,
        "--dataset_name",
        data_dir,
        "--output_dir",
        tempfile.mkdtemp(prefix=f"bench-{name}-"),
        "--max_steps",
        str(steps_to_run(warmup, steps, profile)),
        "--eval_after_training",
        "false",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--vision_feature_cache_dir",  # a fresh cache: every setup that uses one pays for filling it
        features,
        "--group_column",  # the bench's pages have no question groups (the tiny recipe's report reads some)
        "null",
        *overrides,
    ]
    timer = step_timer(warmup, steps, profile, memory_profile)
    try:
        trainer, _ = train.run(argv, callbacks=[timer])
    finally:
        shutil.rmtree(features, ignore_errors=True)  # ~9 MB a page: not left behind by every bench run
    args = trainer.args
    samples = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    result = summarize(timer, samples)
    from docvlm.speedups.feature_cache import cache_of

    cache = cache_of(trainer)
    if cache is not None and cache.fill_seconds is not None:
        result["cache_fill_s"], result["cache_fill_pages"] = cache.fill_seconds, cache.fill_pages
        result["cache_fill_rows"] = cache.fill_rows  # what the projection counts: hires has 5 tower pages a row
        result["cache_fill_startup_s"] = cache.fill_startup_seconds
        result["cache_fill_page_wait_s"] = cache.fill_page_wait_seconds
        result["cache_fill_disk_wait_s"] = cache.fill_disk_wait_seconds
    if check_reload:
        result.update(reload_logit_difference(trainer, trainer.train_dataset) or {})
    return result


def reload_logit_difference(trainer, rows, samples: int = 2) -> dict | None:
    """Largest |logit| difference on `samples` rows between the trained model as it sits in the launch (sharded
    under ZeRO-3 / FSDP: every process takes part in its forward) and the adapter just saved in output_dir,
    reloaded whole on the main process as `docvlm predict --adapter` loads it (reload_max_logit_diff), and, as the
    control, the reloaded base model without the adapter (reload_base_max_logit_diff): a reload that lost the
    adapter would be as far off as that. None on the other processes."""
    import torch
    from accelerate import PartialState

    from docvlm.inference import load_for_inference
    from docvlm.modes import whole_model_loading
    from docvlm.speedups.feature_cache import PAGE_DIGESTS, PAGE_FEATURES
    from docvlm.training.precision import autocast_for

    state = PartialState()
    batch = trainer.data_collator([rows[i] for i in range(samples)])
    for key in ("labels", PAGE_DIGESTS, PAGE_FEATURES):  # the model takes none of them
        batch.pop(key, None)
    model = trainer.model.eval()
    with torch.no_grad(), autocast_for(model):
        before = model(**{k: v.to(state.device) for k, v in batch.items()}).logits.float()
    difference = None
    if state.is_main_process:
        with whole_model_loading():
            reloaded = load_for_inference(adapter=trainer.args.output_dir)[0]
            device = next(reloaded.parameters()).device
            inputs = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad(), autocast_for(reloaded):
                after = reloaded(**inputs).logits.float()
                with reloaded.disable_adapter():
                    base = reloaded(**inputs).logits.float()
        difference = {
            "reload_max_logit_diff": (before.to(after.device) - after).abs().max().item(),
            "reload_base_max_logit_diff": (before.to(base.device) - base).abs().max().item(),
        }
        del reloaded
    state.wait_for_everyone()
    return difference


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate")}


# The whole run the projection is for: the notebook's DocVQA subset, 1,000 training pages, 2 epochs.
PROJECTED_PAGES, PROJECTED_EPOCHS = 1000, 2


def projected_minutes(result: dict) -> float:
    """Wall time of a whole run (PROJECTED_EPOCHS over PROJECTED_PAGES) at the measured speed, filling the feature
    cache first where the setup uses one: its start-up (the DataLoader's workers) once, then each page at the
    measured seconds a page. Start-up and evaluation of the training itself are left out."""
    seconds = PROJECTED_EPOCHS * PROJECTED_PAGES / result["samples_per_s"]
    if result.get("cache_fill_pages"):
        seconds += result.get("cache_fill_startup_s") or 0.0
        seconds += PROJECTED_PAGES * fill_seconds_a_page(result)
    return seconds / 60


def fill_seconds_a_page(result: dict) -> float:
    """The fill's seconds a document page (a training row) once its first batch was ready (all of it where the
    start-up was not recorded). A row is one tower page, or 5 crops with do_image_splitting (hires)."""
    startup = result.get("cache_fill_startup_s") or 0.0
    return (result["cache_fill_s"] - startup) / result["cache_fill_rows"]


def docvqa_projection(result: dict, questions_per_s: float | None = None):
    """A whole DocVQA fine-tune at the setup's measured speed (docvlm.projection): training, the cache's fill where
    the setup has one, and with `questions_per_s` (benchmarks.evaluation) the before/after evaluation."""
    from docvlm.projection import project

    fill = fill_seconds_a_page(result) if result.get("cache_fill_pages") else 0.0
    return project(result["samples_per_s"], fill, questions_per_s)


def projection_lines(results: dict[str, dict]) -> str:
    """Each setup's whole DocVQA training on this card, beside the published anchor."""
    from docvlm.families.idefics2 import IDEFICS2

    lines = [f"- {name}: {docvqa_projection(r).line()}" for name, r in results.items() if "samples_per_s" in r]
    return "\n".join([*lines, f"- for comparison, {IDEFICS2.published_docvqa_run}"]) if lines else ""


def _number(key: str, digits: int = 2, scale: float = 1.0):
    return lambda r, base: f"{r[key] * scale:.{digits}f}" if r.get(key) is not None else "-"


def table(results: dict[str, dict]) -> str:
    """One row a setup. Speed is compared with the notebook's setup when it ran, else with the first setup (for
    bench-multi: one GPU), per step and over a projected whole run. Memory is the largest over the setup's GPUs."""
    reference = "baseline" if "baseline" in results else next(iter(results), "")
    base = results.get(reference, {})

    def ratio(r, _):
        return f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base.get("samples_per_s") else "-"

    def fill(r, _):
        return f"{fill_seconds_a_page(r):.3f}" if r.get("cache_fill_pages") else "-"

    def run_ratio(r, _):
        if not base.get("samples_per_s"):
            return "-"
        return f"{projected_minutes(base) / projected_minutes(r):.2f}x"

    def loss(r, _):
        return f"{r['first_loss']:.3f} → {r['last_loss']:.3f}" if r.get("first_loss") is not None else "-"

    columns = [
        ("processes", lambda r, _: str(r.get("processes", 1))),
        ("samples/s", _number("samples_per_s")),
        ("s/step", _number("s_per_step")),
        (f"vs {reference}", ratio),
        ("TFLOP/s", _number("achieved_tflops", 1)),
        ("MFU", _number("mfu", 1, 100.0)),
        ("allocated at start GiB / GPU", _number("allocated_at_start_gib")),
        ("peak allocated GiB / GPU", _number("peak_allocated_gib")),
        ("peak reserved GiB / GPU", _number("peak_reserved_gib")),
        ("cache fill s / page", fill),
        (f"whole run min ({PROJECTED_EPOCHS} x {PROJECTED_PAGES} pages)", lambda r, _: f"{projected_minutes(r):.1f}"),
        (f"whole run vs {reference}", run_ratio),
        ("DocVQA training h (with fill)", lambda r, _: f"{docvqa_projection(r).total_hours:.1f}"),
        ("loss first → last", loss),
    ]
    if any("reload_max_logit_diff" in r for r in results.values()):
        columns.append(("reloaded adapter: max logit diff", _number("reload_max_logit_diff", 4)))
        columns.append(("(base model, the control)", _number("reload_base_max_logit_diff", 4)))
    lines = ["| setup | " + " | ".join(title for title, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, r in results.items():
        if "error" in r:
            cells = [f"failed: {r['error']}"] + [""] * (len(columns) - 1)
        else:
            cells = [cell(r, base) for _, cell in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_curves(results: dict[str, dict]) -> str:
    """Loss at each optimizer step, setup by setup: where setups train the same labels (baseline-masked and our
    recipes), the first steps should agree."""
    runs = {name: r["losses"] for name, r in results.items() if r.get("losses")}
    if not runs:
        return ""
    lines = ["| step | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for step in range(max(len(losses) for losses in runs.values())):
        cells = [f"{losses[step]:.3f}" if step < len(losses) else "" for losses in runs.values()]
        lines.append(f"| {step + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def child(args) -> None:
    from accelerate import PartialState

    model_dir, data_dir = fixtures(args.model, args.pages)
    if args.model in architectures.ARCHITECTURES and args.child.split()[0] == "baseline":
        # the family's usual setup without docvlm: "baseline" or "baseline <max_pixels>"
        _, *budget = args.child.split()
        timer = step_timer(args.warmup, args.steps)
        extra = architectures.run_trl_style(model_dir, data_dir, args.steps, args.warmup, timer, *map(int, budget))
        result = {**summarize(timer, 16), **extra}
    elif args.child in ("baseline", "baseline-masked"):
        masked = args.child == "baseline-masked"
        result = run_baseline(model_dir, data_dir, args.steps, args.warmup, args.profile, masked, args.memory_profile)
    else:
        from docvlm.modes import WEIGHT_SHARDING, launch_mode

        check = args.check_reload and launch_mode() in WEIGHT_SHARDING
        result = run_recipe(
            args.child, model_dir, data_dir, args.steps, args.warmup, args.profile, check, args.memory_profile
        )
    state = PartialState()
    if state.num_processes > 1:  # memory is per GPU: report the largest; the other figures are the main process's
        from accelerate.utils import gather_object

        for key in ("peak_allocated_gib", "peak_reserved_gib", "allocated_at_start_gib"):
            if key in result:
                result[key] = max(gather_object([result[key]]))
    if state.is_main_process:
        Path(args.result).write_text(json.dumps({**result, "processes": state.num_processes}))


def launcher(setup: str) -> tuple[list[str], str]:
    """The command prefix that runs a setup, and the setup without its launch prefix. 'multi_gpux2:docvqa_qlora'
    runs the recipe under accelerate_configs/multi_gpu.yaml with 2 processes; a plain setup runs in one process."""
    head, _, rest = setup.partition(" ")
    if ":" not in head:
        return [sys.executable], setup
    launch, recipe = head.split(":", 1)
    config, _, processes = launch.rpartition("x")
    if not config or not processes.isdigit() or not Path(f"accelerate_configs/{config}.yaml").is_file():
        raise SystemExit(
            f"docvlm bench: cannot read the launch of '{setup}': write <accelerate config>x<processes>:<recipe>, "
            "e.g. multi_gpux2:docvqa_qlora, with the config in accelerate_configs/."
        )
    command = [sys.executable, "-m", "docvlm", "launch", "--config_file", f"accelerate_configs/{config}.yaml"]
    return [*command, "--num_processes", processes, "--main_process_port", "29555"], f"{recipe} {rest}".strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Time the original notebook's setup against our recipes on one GPU (samples/s, s/step, peak "
        "memory, first/last loss) and print a table. Each setup runs in its own child process.",
    )
    parser.add_argument(
        "--model",
        choices=["8b", "tiny", *architectures.ARCHITECTURES],
        default="8b",
        help="8b: Idefics2-8B's architecture, random weights (GPU); tiny: the CPU fixture; the others: those "
        "architectures, random weights (GPU), whose 'baseline' is the family's usual TRL-style setup "
        "(benchmarks/architectures.py; 'baseline 2007040': at that page budget in pixels)",
    )
    parser.add_argument(
        "--setups",
        nargs="+",
        default=[
            "baseline",
            "baseline-masked",
            "docvqa_qlora",
            "docvqa_qlora_lowmem",
            "docvqa_qlora_fast",
            "docvqa_qlora_hires",
        ],
        help="'baseline' (the seed notebook), 'baseline-masked' (the same with our answer-only labels, whose "
        "loss curve is comparable with ours) or a recipe name, optionally with overrides in quotes, "
        'e.g. "docvqa_qlora --precision fp16", and optionally launched on several GPUs: '
        "<accelerate config>x<processes>:<recipe>, e.g. multi_gpux2:docvqa_qlora",
    )
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps timed after the warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps run before timing starts")
    parser.add_argument("--pages", type=int, default=200, help="synthetic pages to render (each sample is one)")
    parser.add_argument("--out", default="outputs/bench", help="folder for bench.json and bench.md")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile two steps after the timed ones: print torch's operator table, how long the GPU was busy, the "
        "kernel launches, and each place the host waited for the GPU (also in bench.json)",
    )
    parser.add_argument(
        "--memory-profile",
        action="store_true",
        help="record the first timed step's allocations and print, per process, what was allocated at its peak "
        "by the code that allocated it (also in bench.json)",
    )
    parser.add_argument(
        "--check-reload",
        action="store_true",
        help="for ZeRO-3 and FSDP setups: reload the saved adapter whole on one GPU and report the largest logit "
        "difference from the trained (sharded) model on two pages",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import torch

    if args.model != "tiny" and not torch.cuda.is_available():
        print(
            f"docvlm bench: the {args.model} benchmark needs a CUDA GPU (it builds and trains the model at its real "
            "size, with random weights). "
            "For a CPU smoke run of the same code: python -m benchmarks.bench --model tiny --steps 1 --warmup 1",
            file=sys.stderr,
        )
        return 2
    if args.model in architectures.ARCHITECTURES and any(s.split()[0] == "baseline-masked" for s in args.setups):
        print(
            f"docvlm bench: 'baseline-masked' is the Idefics2 notebook's; {args.model}'s baseline is 'baseline' (its "
            "family's TRL-style setup, benchmarks/architectures.py).",
            file=sys.stderr,
        )
        return 2
    fixtures(args.model, args.pages)  # build once, before any timing
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for setup in args.setups:
        result_file = out / f"result-{len(results)}.json"
        prefix, recipe = launcher(setup)
        command = [
            *prefix,
            "-m",
            "benchmarks.bench",
            "--child",
            recipe,
            "--result",
            str(result_file),
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--pages",
            str(args.pages),
            *(["--profile"] if args.profile else []),
            *(["--memory-profile"] if args.memory_profile else []),
            *(["--check-reload"] if args.check_reload else []),
        ]
        print(f"\n=== {setup} ===", flush=True)
        env = dict(os.environ)
        if len(prefix) == 1 and torch.cuda.device_count() > 1 and "CUDA_VISIBLE_DEVICES" not in env:
            env["CUDA_VISIBLE_DEVICES"] = "0"  # a one-process setup runs on one GPU, as users run it
        started = time.perf_counter()
        code = subprocess.call(command, env=env)
        if code != 0 or not result_file.exists():
            results[setup] = {"error": f"exit status {code}"}
        else:
            results[setup] = json.loads(result_file.read_text())
            results[setup]["wall_s"] = time.perf_counter() - started
        print(table({setup: results[setup]}), flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "model": args.model,
        "steps": args.steps,
        "warmup": args.warmup,
        "versions": versions(),
        "results": results,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    gpu = next((r["gpu"] for r in results.values() if "gpu" in r), "CPU")
    text = f"{gpu}, {report['date']}, {json.dumps(report['versions'])}\n\n{table(results)}\n\nLoss by step:\n\n"
    text += loss_curves(results) + "\n"
    projections = projection_lines(results)
    if projections:
        text += "\nA whole DocVQA fine-tune on this card, training and fill (make bench EVAL=1 adds evaluation):\n\n"
        text += projections + "\n"
    (out / "bench.md").write_text(text)
    print("\n" + text)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
