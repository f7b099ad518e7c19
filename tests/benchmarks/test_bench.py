"""The benchmark's parts on the CPU: the 8B architecture's size, the notebook's collator as it was, a tiny run."""

import json
import math

import pytest
import torch

from benchmarks import bench
from docvlm.families.idefics2 import IDEFICS2_8B


def test_idefics2_8b_architecture_has_8_4b_parameters():
    from transformers import Idefics2ForConditionalGeneration

    from docvlm.fixtures.models import idefics2_config

    config = idefics2_config(IDEFICS2_8B)
    with torch.device("meta"):
        model = Idefics2ForConditionalGeneration(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 3) == 8.403  # facts.md


def test_seed_collator_trains_on_prompt_and_padding_as_image_tokens(processor):
    from PIL import Image

    rows = [
        {"image": Image.new("L", (300, 400), 255), "query": {"en": "What is the date?"}, "answers": ["1996"]},
        {"image": Image.new("L", (300, 400), 255), "query": {"en": "Who signed the long letter?"}, "answers": ["A"]},
    ]
    batch = bench.SeedCollator(processor)(rows)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    pad = batch["attention_mask"] == 0
    assert pad.any(), "rows of different lengths should pad"
    assert (batch["labels"][pad] == image_id).all()  # the notebook's defect, kept on purpose
    assert (batch["labels"][~pad] == batch["input_ids"][~pad]).all()  # prompt and image tokens are trained on


# the notebook's batch layout (2 x 8, no workers, no checkpointing), so that its masked variant sees the same batches
RECIPE = (
    "docvqa_qlora --per_device_train_batch_size 2 --gradient_accumulation_steps 8 --dataloader_num_workers 0 "
    "--gradient_checkpointing false --connector_checkpointing false --connector_perceiver_pages null"
)


@pytest.mark.integration
def test_bench_times_the_baselines_and_a_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCVLM_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    # tiny_docvqa as shipped: its report groups questions by a column that the bench's pages do not have
    setups = ["baseline", "baseline-masked", RECIPE, "tiny_docvqa"]
    code = bench.main(
        ["--model", "tiny", "--setups", *setups, "--steps", "1", "--warmup", "1", "--pages", "40", "--out", str(out)]
    )
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    results = report["results"]
    assert list(results) == setups
    for result in results.values():
        assert result["samples_per_s"] > 0 and result["steps_timed"] == 1
        assert len(result["losses"]) == 2 and all(math.isfinite(loss) for loss in result["losses"])
        # What each step waited for, step by step, to explain a slow one: its batch is fetched inside the step.
        assert len(result["data_wait_s"]) == len(result["gc_pause_s"]) == len(result["step_times"]) == 2
        assert all(0 <= wait < step for wait, step in zip(result["data_wait_s"], result["step_times"], strict=True))
        assert all(pause >= 0 for pause in result["gc_pause_s"])
        assert result["tflop_per_step"] > 0 and result["achieved_tflops"] > 0  # counted from the tiny architecture
    assert results["baseline"]["trainable_params"] > 0
    # Same batches, same answer-only labels, LoRA starting at zero, same precision on the CPU: our recipe and the
    # masked notebook setup follow the same loss curve (the notebook's own labels give another).
    for ours, masked in zip(results[RECIPE]["losses"], results["baseline-masked"]["losses"], strict=True):
        assert abs(ours - masked) < 0.01
    text = (out / "bench.md").read_text()
    assert "| baseline |" in text and "1.00x" in text and "Loss by step" in text and report["versions"]["torch"]


@pytest.mark.integration
def test_profiled_steps_run_after_the_timed_ones_and_say_where_the_host_waited(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCVLM_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    argv = ["--model", "tiny", "--setups", RECIPE, "--steps", "1", "--warmup", "1", "--pages", "40", "--profile"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    (result,) = json.loads((out / "bench.json").read_text())["results"].values()
    assert len(result["step_times"]) == 1 + 1 + bench.PROFILED_STEPS  # warm-up, timed, profiled
    assert result["steps_timed"] == 1  # the profiler's slower steps are not timed
    profile = result["profile"]
    assert profile["steps"] == bench.PROFILED_STEPS and profile["window_s"] > 0 and profile["host_waits"] > 0
    assert any("docvlm/" in site["site"] or "transformers/" in site["site"] for site in profile["wait_sites"])


def test_8b_bench_without_a_gpu_says_what_to_do(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--setups", "baseline"]) == 2
    assert "--model tiny" in capsys.readouterr().err


def test_a_setup_can_name_its_launch():
    import sys

    from benchmarks.bench import launcher

    assert launcher("docvqa_qlora --precision fp16") == ([sys.executable], "docvqa_qlora --precision fp16")
    prefix, recipe = launcher("multi_gpux2:docvqa_qlora --precision fp16")
    assert recipe == "docvqa_qlora --precision fp16"
    assert prefix[1:] == ["-m", "docvlm", "launch", "--config_file", "accelerate_configs/multi_gpu.yaml"] + [
        "--num_processes",
        "2",
        "--main_process_port",
        "29555",
    ]
    with pytest.raises(SystemExit, match="multi_gpux2:docvqa_qlora"):
        launcher("nosuchconfigx2:docvqa_qlora")


def test_the_table_compares_with_the_first_setup_and_shows_the_reload_check():
    from benchmarks.bench import table

    run = {"s_per_step": 1.0, "first_loss": 11.0, "last_loss": 10.5, "peak_reserved_gib": 11.0}
    run["allocated_at_start_gib"] = 5.25
    results = {
        "docvqa_qlora": {**run, "samples_per_s": 10.0, "processes": 1},
        "deepspeed_zero3x2:docvqa_qlora": {
            **run,
            "samples_per_s": 7.0,
            "processes": 2,
            "reload_max_logit_diff": 0.0,
            "reload_base_max_logit_diff": 1.5,
        },
        "deepspeed_zero2x2:docvqa_qlora": {"error": "exit status 1"},
    }
    lines = table(results).splitlines()
    assert "vs docvqa_qlora" in lines[0] and lines[0].endswith("max logit diff | (base model, the control) |")
    assert lines[1].count("|---") == lines[0].count("|") - 1
    cells = [cell.strip() for cell in lines[3].split("|")[1:-1]]
    header = [cell.strip() for cell in lines[0].split("|")[1:-1]]
    row = dict(zip(header, cells, strict=True))
    assert row["processes"] == "2" and row["samples/s"] == "7.00" and row["vs docvqa_qlora"] == "0.70x"
    assert row["allocated at start GiB / GPU"] == "5.25" and row["peak reserved GiB / GPU"] == "11.00"
    assert row["reloaded adapter: max logit diff"] == "0.0000" and row["(base model, the control)"] == "1.5000"
    assert lines[2].endswith("| - | - |")
    assert "failed: exit status 1" in lines[4] and lines[4].count("|") == lines[3].count("|")


def test_the_whole_run_projection_pays_for_filling_the_cache_and_the_table_shows_mfu():
    from benchmarks.bench import PROJECTED_EPOCHS, PROJECTED_PAGES, projected_minutes, table

    plain = {"samples_per_s": 4.0, "s_per_step": 4.0, "first_loss": None}
    cached = {"samples_per_s": 20.0, "s_per_step": 0.8, "first_loss": None, "achieved_tflops": 123.4, "mfu": 0.1248}
    cached.update(cache_fill_s=10.0, cache_fill_pages=200, cache_fill_rows=200)  # 0.05 s a page
    steps_s = PROJECTED_EPOCHS * PROJECTED_PAGES / 20.0
    assert projected_minutes(cached) * 60 == pytest.approx(steps_s + 0.05 * PROJECTED_PAGES)
    assert projected_minutes(plain) * 60 == pytest.approx(PROJECTED_EPOCHS * PROJECTED_PAGES / 4.0)
    lines = table({"baseline": plain, "docvqa_qlora": cached}).splitlines()
    row = dict(zip(lines[0].split("|")[1:-1], lines[3].split("|")[1:-1], strict=True))
    row = {key.strip(): value.strip() for key, value in row.items()}
    whole = [key for key in row if key.startswith("whole run vs")][0]
    assert row["vs baseline"] == "5.00x" and row[whole] == f"{(500 / (100 + 50)):.2f}x"  # 500 s against 150 s
    assert row["TFLOP/s"] == "123.4" and row["MFU"] == "12.5" and row["cache fill s / page"] == "0.050"
    # a whole DocVQA training at this speed: its questions over 2 epochs, and its 10,194 pages through the fill
    assert float(row["DocVQA training h (with fill)"]) == pytest.approx(
        (2 * 39_463 / 20 + 10_194 * 0.05) / 3600, abs=0.05
    )
    projections = bench.projection_lines({"baseline": plain, "docvqa_qlora": cached})
    assert "- docvqa_qlora: a whole DocVQA fine-tune" in projections and "38 h of training alone" in projections
    # the workers' start-up is paid once a fill, not once for every 200 pages
    cached["cache_fill_startup_s"] = 4.0  # of the 10 s: 6 s for 200 pages
    assert projected_minutes(cached) * 60 == pytest.approx(steps_s + 4.0 + 0.03 * PROJECTED_PAGES)
    assert "| 0.030 |" in table({"baseline": plain, "docvqa_qlora": cached})
    # hires: 5 crops a page, each a tower page of the cache; a whole run fills 5,000 of them for its 1,000 pages
    cached.update(cache_fill_pages=1000)  # the same 200 rows
    assert projected_minutes(cached) * 60 == pytest.approx(steps_s + 4.0 + 0.03 * PROJECTED_PAGES)
    assert "| 0.030 |" in table({"baseline": plain, "docvqa_qlora_hires": cached})
