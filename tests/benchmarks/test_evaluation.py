"""The evaluation benchmark: the notebook's one-question loop against docvlm eval, before and with its speed-ups."""

import json

import pytest

from benchmarks import evaluation


def test_the_table_compares_with_docvlm_eval_before_its_speed_ups_and_counts_equal_answers():
    results = {
        "notebook": {"questions_per_s": 1.0, "answers": ["a", "x", "c"]},
        "before": {"questions_per_s": 4.0, "batch_size": 8, "answers": ["a", "b", "c"], "peak_reserved_gib": 7.5},
        "recipe": {"questions_per_s": 20.0, "batch_size": 16, "answers": ["a", "b", "c"], "tower_pages_computed": 3,
                   "tower_pages_read": 3},
    }  # fmt: skip
    rows = {line.split("|")[1].strip(): line for line in evaluation.table(results).splitlines()[2:]}
    assert "| 0.25x |" in rows["notebook"] and "| 2 of 3 |" in rows["notebook"]
    assert "| 5.00x |" in rows["recipe"] and "| 3 of 3 |" in rows["recipe"] and "| 3 / 3 |" in rows["recipe"]
    assert "| 7.50 |" in rows["before"] and "failed" not in evaluation.table(results)
    assert "failed: exit status 1" in evaluation.table({**results, "recipe": {"error": "exit status 1"}})


def test_a_training_bench_report_adds_the_whole_run(tmp_path):
    answers = {"notebook": {"questions_per_s": 1.0}, "recipe": {"questions_per_s": 10.0}}
    assert evaluation.whole_run_lines(answers, tmp_path / "none.json", "docvqa_qlora") == ""  # nothing to add
    report = tmp_path / "bench.json"
    speeds = {"baseline": {"samples_per_s": 4.0}, "docvqa_qlora": {"samples_per_s": 24.0}}
    report.write_text(json.dumps({"results": speeds}))
    lines = evaluation.whole_run_lines(answers, report, "docvqa_qlora")
    notebook = 2 * 39_463 / 4.0 / 3600 + 2 * 5_349 / 1.0 / 3600
    assert f"- notebook: a whole DocVQA fine-tune ~{notebook:.1f} h" in lines
    assert "- docvqa_qlora: a whole DocVQA fine-tune" in lines and "38 h of training alone" in lines


@pytest.mark.integration
def test_the_evaluation_bench_runs_every_setup_on_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCVLM_BENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["--model", "tiny", "--recipe", "tiny_docvqa", "--pages", "8", "--out", str(out)]
    assert evaluation.main([*argv, "--overrides", "--per_device_eval_batch_size 3", "--training-bench", "none"]) == 0
    results = json.loads((out / "evaluation.json").read_text())
    assert list(results) == ["notebook", "before", "recipe"]
    assert all(r["questions_per_s"] > 0 for r in results.values())
    assert results["notebook"]["generated"] == 8 and results["before"]["generated"] == 16  # before and after
    assert results["before"]["batch_size"] == 8 and results["recipe"]["batch_size"] == 3
    assert results["recipe"]["answers"] == results["before"]["answers"]  # the speed-ups change no answer
    assert "| recipe |" in (out / "evaluation.md").read_text()


def test_the_8b_evaluation_bench_without_a_gpu_says_what_to_do(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluation.main(["--model", "8b"]) == 2
    assert "python -m benchmarks.evaluation --model tiny" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["docvqa_qlora", "docvqa_qlora_fast", "docvqa_qlora_lowmem", "docvqa_qlora_hires"])
def test_every_8b_recipes_adapter_step_and_before_setup_are_accepted(recipe, tmp_path):
    """The bench's own overrides must pass each recipe's checks (a recipe whose tower waits in CPU memory needs the
    cache the 'before' setup turns off), so that a GPU call never stops on them."""
    import shlex

    from docvlm.recipe.parse import parse_recipe

    train_argv = evaluation.adapter_training_argv(recipe, "some-model", "some-pages", tmp_path)
    _, _, training_args, _ = parse_recipe(train_argv)
    assert training_args.max_steps == 1 and training_args.vision_feature_cache == "off"
    before = parse_recipe(["--config", f"recipes/{recipe}.yaml", *shlex.split(evaluation.BEFORE_SPEEDUPS)])
    assert before[2].per_device_eval_batch_size == 8 and not before[3].eval_sort_by_length
