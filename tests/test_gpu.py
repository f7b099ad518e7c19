"""On a CUDA GPU: 4-bit loading and training, the collator's batches, and generation. Run there with
`pytest -m gpu`; without CUDA every test here is skipped, with the reason printed (pytest -ra)."""

import json
import math

import pytest
import torch

from tests.helpers import quick

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here; run `pytest -m gpu` on a GPU machine"),
    # a single process refuses to run beside idle GPUs (docvlm.train.check_one_gpu_per_process)
    pytest.mark.skipif(
        torch.cuda.device_count() > 1,
        reason=f"{torch.cuda.device_count()} GPUs visible to one process: run `CUDA_VISIBLE_DEVICES=0 pytest -m gpu`",
    ),
]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """Three optimizer steps of the tiny recipe on the GPU, with the generation eval on 8 held-out pages."""
    from docvlm.train import run

    out = tmp_path_factory.mktemp("gpu-run")
    # with the 8B recipes' memory switches, so that their CUDA path is exercised too
    switches = [
        *("--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", '{"use_reentrant": true}'),
        *("--connector_checkpointing", "true", "--connector_checkpoint_pages", "2"),
        *("--cuda_expandable_segments", "true", "--cudnn_attention", "false"),
        *("--connector_lean_activations", "true", "--fused_rms_norms", "true"),
    ]
    trainer, metrics = run(quick(out, "--max_steps", "3", "--save_strategy", "no", *switches))
    return out, trainer, metrics


def test_4bit_model_trains_on_cuda(gpu_run):
    import bitsandbytes as bnb

    _, trainer, _ = gpu_run
    model = trainer.model
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    assert quantized[0].weight.quant_state is not None  # really NF4 on the GPU, not a float copy
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.device.type == "cuda" and p.dtype == torch.float32 for p in trainable)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert trainer.args.bf16 or trainer.args.fp16  # precision auto picks half precision on a GPU
    # lora_B starts at zero: one still at zero got no gradient (reentrant checkpointing gives none to a layer whose
    # input does not require grad)
    still = [n for n, p in model.named_parameters() if "lora_B" in n and p.abs().sum() == 0]
    assert not still, f"{len(still)} LoRA weights never moved, e.g. {still[:3]}"


def test_recipe_switches_expandable_segments_on(gpu_run):
    segments = torch.cuda.memory_snapshot()
    assert segments and any(segment["is_expandable"] for segment in segments)


def test_recipe_switches_cudnn_attention_off(gpu_run):
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


def test_collator_batches_run_on_cuda(gpu_run):
    from docvlm.data import load_splits
    from docvlm.recipe.parse import parse_recipe
    from docvlm.training.collator import DocVQACollator
    from docvlm.training.precision import autocast_for

    out, trainer, _ = gpu_run
    data_args, _, training_args, _ = parse_recipe(quick(out))
    _, eval_rows = load_splits(data_args)
    collator = DocVQACollator(trainer.processing_class, data_args.instruction, training_args.max_length, "first")
    rows = [eval_rows[i] for i in range(4)]
    batch = collator(rows).to("cuda")
    assert batch["input_ids"].is_cuda and batch["pixel_values"].is_cuda
    torch.testing.assert_close(collator(rows)["labels"].cuda(), batch["labels"])  # same labels, same masking
    model = trainer.model.eval()
    with torch.no_grad(), autocast_for(model):
        loss = model(**batch).loss
    assert loss.is_cuda and torch.isfinite(loss)


def test_generation_eval_ran_on_cuda(gpu_run):
    out, _, metrics = gpu_run
    report = json.loads((out / "report.json").read_text())
    assert report["device"].startswith("cuda")
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and all(isinstance(p["after"], str) for p in predictions)
    assert 0.0 <= metrics["generation_anls"] <= 1.0


def test_merge_on_cuda_keeps_the_adapters_change_to_the_logits(gpu_run, tmp_path):
    """The default merge (into the dequantized 4-bit base) in the GPU's half precision gives the adapter's logits.

    Judged on the logits, not on greedy answers: after 3 steps on a random tiny model the adapter moves the logits
    by little, so half-precision rounding of W + BA flips near-ties between answers whether or not the merge is
    right. A merge that lost or doubled the update would be as far from the adapter as the base model is."""
    from docvlm.cli import main as cli
    from docvlm.data import load_splits
    from docvlm.inference import load_for_inference
    from docvlm.recipe.parse import parse_recipe
    from docvlm.training.collator import DocVQACollator
    from docvlm.training.precision import autocast_for

    out, _, _ = gpu_run
    assert cli(["merge", "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    assert "dequantization of the 4-bit base" in (tmp_path / "merged" / "README.md").read_text()
    data_args, _, training_args, _ = parse_recipe(quick(out))
    _, eval_rows = load_splits(data_args)
    logits = {}
    for name, source in (("adapter", {"adapter": str(out)}), ("merged", {"model": str(tmp_path / "merged")})):
        model, processor, _, _ = load_for_inference(**source)
        assert next(model.parameters()).is_cuda
        collator = DocVQACollator(processor, data_args.instruction, training_args.max_length, "first")
        batch = collator([eval_rows[i] for i in range(8)]).to("cuda")
        with torch.no_grad(), autocast_for(model):
            logits[name] = model(**batch).logits.float()
            if name == "adapter":
                with model.disable_adapter():
                    logits["base"] = model(**batch).logits.float()
    answer = batch["labels"] != -100  # the positions training scored
    merge_error = (logits["merged"] - logits["adapter"])[answer].abs().mean().item()
    adapter_change = (logits["base"] - logits["adapter"])[answer].abs().mean().item()
    print(f"mean |merged - adapter| {merge_error:.2e}, mean |base - adapter| {adapter_change:.2e} on answer logits")
    assert adapter_change > 0 and merge_error < 0.25 * adapter_change


@pytest.mark.parametrize(
    "recipe, fixture",
    [("smolvlm_docvqa_qlora", "idefics3"), ("llava_docvqa_qlora", "llava"), ("paligemma_docvqa_qlora", "paligemma")],
)
def test_each_familys_tiny_model_trains_in_4bit_on_cuda(recipe, fixture, tmp_path):
    """Every family besides Idefics2 trains with its shipped recipe, in 4-bit on the GPU, with the recipe's
    switches as they are (gradient checkpointing, the frozen tower without grad, expandable segments)."""
    import bitsandbytes as bnb

    from docvlm.train import run

    argv = ["--config", f"recipes/{recipe}.yaml", "--model_name_or_path", f"docvlm:tiny-{fixture}"]
    argv += ["--dataset_name", "docvlm:tiny-docs", "--max_train_samples", "16", "--max_eval_samples", "4"]
    argv += ["--max_steps", "3", "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_strategy"]
    argv += ["no", "--eval_compare_base", "false", "--dataloader_num_workers", "0"]
    argv += ["--dataloader_persistent_workers", "false", "--report_to", "none", "--output_dir", str(tmp_path)]
    trainer, metrics = run(argv)
    quantized = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "adapter_model.safetensors").is_file() and "generation_anls" in metrics


def test_an_offloaded_vision_tower_trains_the_same_and_is_back_for_the_evaluation(tmp_path):
    """vision_tower_offload: while every page comes from the cache the tower's weights are in CPU memory, the
    losses are those of the same run with the tower on the GPU, and the evaluation after training (pages the cache
    never saw) finds the tower back on the GPU."""
    from transformers import TrainerCallback

    from docvlm.speedups.model_parts import vision_tower
    from docvlm.train import run

    where = []

    class TowerDevice(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            where.append(next(vision_tower(model.get_base_model()).parameters()).device.type)

    switches = ["--max_steps", "3", "--save_strategy", "no", "--bnb_4bit_skip_modules", "model.vision_model"]
    switches += ["--vision_feature_cache", "memory", "--eval_compare_base", "false"]
    _, plain = run(quick(tmp_path / "plain", *switches), callbacks=[TowerDevice()])
    assert where == ["cuda"] * 3
    where.clear()
    trainer, offloaded = run(quick(tmp_path / "offload", *switches, "--vision_tower_offload", "true"), [TowerDevice()])
    assert where == ["cpu"] * 3
    assert next(vision_tower(trainer.model.get_base_model()).parameters()).is_cuda
    assert offloaded["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-3)
    assert 0.0 <= offloaded["generation_anls"] <= 1.0  # generated with the tower back on the GPU


def test_fused_rms_norm_runs_one_kernel_each_way_on_cuda_and_matches_the_cpu_math():
    """On CUDA the fused norm is torch's fused kernel: one launch forward, at most two backward (the module:
    eight and sixteen), the same output as the op-by-op math the CPU tests check, and the same gradients."""
    from torch.profiler import ProfilerActivity, profile
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    from docvlm.families.idefics2.connector import _fused_rms_norm

    torch.manual_seed(0)
    norm = MistralRMSNorm(4096, eps=1e-5).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.3)
    norm.weight.requires_grad_(False)  # frozen, as in training
    fused = _fused_rms_norm(norm)
    hidden = torch.randn(16, 99, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(hidden)

    def kernels(forward):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            (out,) = torch.autograd.grad(forward(hidden), [hidden], grad)
            torch.cuda.synchronize()
        return out, sum(1 for e in prof.events() if e.device_type.name == "CUDA")

    with torch.autocast("cuda", dtype=torch.bfloat16):  # as in training
        got, fused_kernels = kernels(fused)
        expected, module_kernels = kernels(norm)
        out = fused(hidden)
    assert out.dtype == torch.bfloat16
    assert fused_kernels <= 4 < 20 <= module_kernels, (fused_kernels, module_kernels)
    reference = torch.nn.functional.rms_norm(hidden.float(), (4096,), norm.weight.float(), 1e-5)
    torch.testing.assert_close(out.float(), reference, rtol=2**-8, atol=1e-6)  # rounded once
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_a_disk_cache_filled_on_cuda_stores_what_copying_page_by_page_stores(tmp_path):
    """The fill copies each tower call's features to CPU memory without waiting and writes them once the copy
    completes (FeatureCache.host_copy); a memory cache copies page by page, waiting for each. Filled on the GPU
    under the training's autocast, with pages of four sizes (views that are not contiguous), both hold the same
    features bit for bit."""
    from safetensors.torch import load_file

    from docvlm.speedups.feature_cache import fill_feature_cache
    from docvlm.speedups.feature_store import FeatureCache, tower_identity
    from tests.speedups.test_feature_cache import SIZES, load_tiny_model_and_processor, noisy_page, patched

    model, processor = load_tiny_model_and_processor()
    model.to("cuda")
    tower = patched(model, None)
    rows = [{"row": i, "image": noisy_page(size, i)} for i, size in enumerate(SIZES * 2)]  # 8 pages, batches of 3
    identity = tower_identity(tower)
    caches = {
        "memory": FeatureCache("memory", None, identity, 2**30),
        "disk": FeatureCache("disk", tmp_path, identity, 2**30),
    }
    for cache in caches.values():
        patched(model, cache)
        context = torch.autocast("cuda", dtype=torch.bfloat16)
        fill_feature_cache(model.get_base_model(), cache, rows, processor.image_processor, 3, 0, context)
    entries = {path.stem: load_file(path)["features"] for path in tmp_path.rglob("*.safetensors")}
    assert len(entries) == len(rows) == len(caches["memory"].memory)
    for key, features in caches["memory"].memory.items():
        assert torch.equal(entries[key], features), key
    assert not any(torch.equal(entries[key], torch.zeros_like(entries[key])) for key in entries)
    patched(model, None)
