"""End to end on the offline fixtures: train a few steps, save, reload the adapter, resume."""

import json

import pytest
import torch

from docvlm.train import main, run
from docvlm.training.collator import DocVQACollator
from tests.helpers import mark_for_resume, quick


def test_outputs_are_saved(trained):
    out, trainer, metrics = trained
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "recipe.yaml",
        "trainer_state.json",
        "train_results.json",
    ):
        assert (out / name).is_file(), name
    assert list(out.rglob("events.out.tfevents*")), "no TensorBoard logs"
    assert (out / "checkpoint-4").is_dir()
    assert trainer.state.global_step == 4
    assert "eval_loss" not in metrics  # the tiny recipe's eval_strategy is 'no': no loss evaluation was asked for
    resolved = (out / "recipe.yaml").read_text()
    assert "max_train_samples: 16" in resolved and "hub_token" not in resolved
    assert "do_train: true" in resolved  # the run as it was: it trained
    if not torch.cuda.is_available():
        assert "cudnn_attention: false" in resolved  # nothing of cuDNN was in effect on the CPU
    mode = (out / "report.json").stat().st_mode & 0o777  # as the user's umask makes files
    assert [(p.name, p.stat().st_mode & 0o777) for p in out.rglob("*.safetensors")] == [
        (p.name, mode) for p in out.rglob("*.safetensors")
    ]


def test_loss_is_finite_and_logged(trained):
    out, _, _ = trained
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert not [h for h in history if "eval_loss" in h]  # eval_strategy 'no': no loss-evaluation pass


def test_trainable_weights_stayed_fp32(trained):
    _, trainer, _ = trained
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


def test_saved_adapter_reloads_with_peft_and_gives_the_same_logits(trained, tiny_dataset_path):
    from peft import PeftModel

    from docvlm.data import load_splits
    from docvlm.recipe.parse import parse_recipe
    from docvlm.training.modeling import load_model, load_processor, model_path, model_type_at
    from docvlm.training.precision import autocast_for, training_dtype

    out, trainer, _ = trained
    data_args, model_args, training_args, _ = parse_recipe(quick(out))
    path = model_path(model_args)
    processor = load_processor(model_args, path, model_type_at(path))
    _, eval_rows = load_splits(data_args)
    batch = DocVQACollator(processor, data_args.instruction, 256, "first")([eval_rows[i] for i in range(3)])
    batch.pop("labels")

    reloaded = PeftModel.from_pretrained(load_model(model_args, training_dtype(training_args), path), str(out)).eval()
    trained_model = trainer.model.eval()
    batch = batch.to(next(reloaded.parameters()).device)
    with torch.no_grad(), autocast_for(reloaded):
        expected = trained_model(**batch).logits
        got = reloaded(**batch).logits
        base = reloaded.get_base_model()
        with reloaded.disable_adapter():
            untrained = base(**batch).logits
    # fp32 on a CPU is exact to rounding; bf16 autocast on a GPU rounds each matmul to 8 bits of mantissa.
    tolerance = 1e-4 if got.dtype == torch.float32 and got.device.type == "cpu" else 3e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tolerance, atol=tolerance)
    assert not torch.allclose(untrained.float(), expected.float(), atol=1e-1)  # the adapter does change the model


def test_resume_from_latest_checkpoint(trained, tmp_path):
    import shutil

    out, _, _ = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    mark_for_resume(resumed / "checkpoint-2")

    trainer, _ = run(
        quick(
            resumed,
            "--max_steps",
            "4",
            "--save_steps",
            "100",
            "--resume_from_checkpoint",
            "latest",
            "--eval_strategy",
            "no",
            "--eval_after_training",
            "false",
            "--dataset_test_split",
            "none",
        )
    )
    assert trainer.state.global_step == 4
    history = json.loads((resumed / "trainer_state.json").read_text())["log_history"]
    steps = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert sorted(steps) == [1, 2, 3, 4] and steps[1] == 123.0


def loaders_that_must_not_run(monkeypatch) -> None:
    """The data and model loaders, made to fail the test if anything calls them."""
    from docvlm import prepare
    from docvlm.training import modeling

    def loaded(*args, **kwargs):
        raise AssertionError("something was loaded before the error")

    for module, name in ((prepare, "load_splits"), (modeling, "load_model"), (modeling, "load_processor")):
        monkeypatch.setattr(module, name, loaded)


def test_resume_without_checkpoint_is_a_clear_error_before_anything_loads(tmp_path, capsys, monkeypatch):
    loaders_that_must_not_run(monkeypatch)
    assert main(quick(tmp_path, "--resume_from_checkpoint", "latest", "--max_steps", "1")) == 2
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_run_folder_and_checkpoints_carry_docvlms_card_with_the_evaluation(trained):
    out, _, _ = trained
    card = (out / "README.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert "# LoRA adapter for `docvlm:tiny-idefics2`" in card
    assert f"| base + this adapter | {report['systems']['after']['anls']:.3f} |" in card
    for boilerplate in ("[None]", "licence", "text-generation", "Model Card for Model ID"):
        assert boilerplate not in card
    # peft writes a blank template into each checkpoint; the run's card replaces it
    assert "Model Card for Model ID" not in (out / "checkpoint-4" / "README.md").read_text()


def test_the_run_ends_by_saying_where_everything_is(trained):
    from docvlm.training.outputs import where_things_are

    out, _, _ = trained
    text = where_things_are(out, ["tensorboard"], page_hint=True)
    assert text.startswith(f"Done. Everything is in {out}/")
    assert "adapter_model.safetensors" in text and "report.md" in text
    assert f"tensorboard --logdir {out / 'runs'}" in text and f"docvlm predict --adapter {out}" in text
    assert "--export-pages" in text and "--export-pages" not in where_things_are(out, [], page_hint=False)


def test_the_last_lines_list_only_the_files_the_run_wrote(tmp_path):
    from docvlm.training.outputs import where_things_are

    for name in ("adapter_model.safetensors", "adapter_config.json", "report.md", "report.json", "predictions.jsonl"):
        (tmp_path / name).write_text("x")  # a run too short for a loss plot
    text = where_things_are(tmp_path, [])
    assert "report       report.md, report.json, predictions.jsonl\n" in text + "\n" and "loss.png" not in text


def test_one_process_with_several_gpus_is_refused():
    """run() calls this before any model loads. (Called directly: a whole run() here would parse a recipe, which
    resets accelerate's process-wide state under the session's shared trainer.)"""
    import pytest

    from docvlm.errors import UserError
    from docvlm.training.launch import check_one_gpu_per_process

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "device_count", lambda: 1)
        check_one_gpu_per_process()
        patch.setattr(torch.cuda, "device_count", lambda: 2)
        with pytest.raises(UserError, match="2 GPUs are visible to this single process.*multi_gpu.yaml"):
            check_one_gpu_per_process()


def test_the_loss_evaluation_runs_when_the_recipe_asks_for_it(tmp_path):
    out = tmp_path / "with-eval-loss"
    _, metrics = run(
        quick(
            out,
            "--max_steps",
            "2",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            "2",
            "--eval_after_training",
            "false",
            "--save_strategy",
            "no",
        )
    )
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert "eval_loss" in metrics and 2 in [h["step"] for h in history if "eval_loss" in h]


@pytest.mark.integration
def test_the_receipts_recipe_trains_on_key_value_rows_with_no_code(tmp_path, capsys):
    """recipes/receipts_kie_qlora.yaml as shipped (synthetic receipts, one row per receipt and a column per field,
    no held-out split), smoke-trained on the tiny model through overrides."""
    out = tmp_path / "receipts"
    _, metrics = run(
        [
            *("--config", "recipes/receipts_kie_qlora.yaml", "--model_name_or_path", "docvlm:tiny-idefics2"),
            *("--output_dir", str(out), "--max_steps", "8", "--per_device_train_batch_size", "8"),
            *("--learning_rate", "2e-3", "--warmup_steps", "0", "--lora_modules_to_save", "lm_head"),
            *("--dataloader_num_workers", "0", "--save_strategy", "no", "--logging_steps", "1"),
            *("--max_eval_samples", "12", "--eval_compare_base", "false"),
        ]
    )
    err = capsys.readouterr().err
    assert "Split 'train': 400 rows became" in err and "skipped: address" in err
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0]
    report = json.loads((out / "report.json").read_text())
    assert report["count"] == 12 and set(report["systems"]["after"]["anls_by_group"]) <= {
        "company",
        "date",
        "address",
        "total",
    }


@pytest.mark.integration
def test_the_local_folder_recipe_trains_on_a_folder_of_scans_and_a_csv(tmp_path):
    """recipes/local_folder_qlora.yaml as documented: page images and a metadata.csv, no held-out split."""
    import csv

    from docvlm.fixtures.documents import export_pages

    scans = tmp_path / "my_scans"
    export_pages(scans, 40, metadata_csv=True)  # held-out tiny pages stand in for the user's scans
    with open(scans / "metadata.csv", newline="") as handle:
        lines = list(csv.reader(handle))
    assert lines[0] == ["file_name", "question", "answer"] and len(lines) == 41 and (scans / lines[1][0]).is_file()
    assert sorted(path.name for path in scans.iterdir()) == sorted([line[0] for line in lines[1:]] + ["metadata.csv"])
    out = tmp_path / "run"
    run(
        [
            *("--config", "recipes/local_folder_qlora.yaml", "--model_name_or_path", "docvlm:tiny-idefics2"),
            *("--dataset_name", str(scans), "--output_dir", str(out), "--max_steps", "6"),
            *("--per_device_train_batch_size", "6", "--learning_rate", "2e-3", "--warmup_steps", "0"),
            *("--lora_modules_to_save", "lm_head", "--dataloader_num_workers", "0", "--save_strategy", "no"),
            *("--logging_steps", "1", "--eval_compare_base", "false"),
        ]
    )
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert json.loads((out / "report.json").read_text())["count"] == 4  # 10% of the 40 pages held out
    card, report_md = (out / "README.md").read_text(), (out / "report.md").read_text()
    assert "about 4 pages drawn from the training data (eval_split_size 0.1), none of them trained on" in card
    assert "Only 4 held-out questions" in card and "Only 4 held-out questions" in report_md
    assert "Held out by eval_split_size: 4 pages of 40, with their 4 questions" in report_md


@pytest.mark.integration
def test_the_chartqa_recipe_trains_on_rendered_charts_and_reports_by_question_source(tmp_path):
    """recipes/chartqa_qlora.yaml with the offline overrides its header names: ChartQA's schema (query, label list,
    human_or_machine class label) on bar charts rendered with matplotlib."""
    out = tmp_path / "charts"
    run(
        [
            *("--config", "recipes/chartqa_qlora.yaml", "--model_name_or_path", "docvlm:tiny-idefics2"),
            *("--dataset_name", "docvlm:tiny-charts", "--output_dir", str(out), "--max_steps", "8"),
            *("--per_device_train_batch_size", "8", "--learning_rate", "2e-3", "--warmup_steps", "0"),
            *("--lora_modules_to_save", "lm_head", "--dataloader_num_workers", "0", "--save_strategy", "no"),
            *("--logging_steps", "1", "--max_eval_samples", "16", "--eval_compare_base", "false"),
        ]
    )
    losses = [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0]
    report = json.loads((out / "report.json").read_text())
    assert report["count"] == 16 and set(report["systems"]["after"]["anls_by_group"]) == {"human", "machine"}


@pytest.mark.integration
def test_bad_rows_are_skipped_before_training_and_listed_in_the_report(tmp_path, capsys):
    """A folder of scans with a missing page, a truncated page and an empty answer trains on the rest; the skips are
    printed at the start and the end and recorded in report.json."""
    from docvlm.fixtures.documents import export_pages

    scans = tmp_path / "scans"
    metadata = export_pages(scans, 20, metadata_csv=True)
    (scans / "page-003.png").write_bytes((scans / "page-003.png").read_bytes()[:100])  # truncated
    (scans / "page-005.png").unlink()  # missing
    lines = metadata.read_text().splitlines()
    lines[8] = lines[8].rsplit(",", 1)[0] + ","  # page-007: empty answer
    metadata.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    run(
        [
            *("--config", "recipes/local_folder_qlora.yaml", "--model_name_or_path", "docvlm:tiny-idefics2"),
            *("--dataset_name", str(scans), "--output_dir", str(out), "--max_steps", "2", "--eval_split_size", "4"),
            *("--per_device_train_batch_size", "4", "--dataloader_num_workers", "0", "--save_strategy", "no"),
            *("--eval_compare_base", "false"),
        ]
    )
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    skipped = report["skipped"]
    assert report["count"] == 2  # the 4 held-out questions less the 2 that cannot be scored: never scored as 0
    assert skipped["count"] == 3 and {row["row"] for row in skipped["rows"]} == {3, 5, 7}
    assert "3 skipped (" in captured.out and "data_report.json lists them by reason" in captured.out
    assert "Split 'train': skipped 1 of 16 rows" in captured.err and "Split 'test': skipped 2 of 4 rows" in captured.err


def test_the_process_group_is_destroyed_when_training_returns(tmp_path):
    """A launch's process group left to interpreter shutdown can abort a finished process; main() destroys it,
    whether training ended or failed (here: a recipe that does not exist)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def first_step_gradients(out, reentrant: bool) -> dict:
    """Every trainable weight's gradient at the first optimizer step of a tiny run with the flagship's memory
    switches and decoder gradient checkpointing, reentrant or not."""
    from transformers import TrainerCallback

    grads = {}

    class Record(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if not grads:
                grads.update(
                    {
                        n: None if p.grad is None else p.grad.clone()
                        for n, p in model.named_parameters()
                        if p.requires_grad
                    }
                )

    argv = quick(out, "--max_steps", "1", "--max_train_samples", "4", "--eval_after_training", "false")
    argv += ["--save_strategy", "no", "--report_to", "none", "--gradient_checkpointing", "true"]
    argv += ["--gradient_checkpointing_kwargs", json.dumps({"use_reentrant": reentrant})]
    argv += ["--connector_checkpointing", "true", "--connector_checkpoint_pages", "1"]
    argv += ["--connector_perceiver_pages", "2", "--connector_lean_activations", "true"]
    argv += ["--vision_tower_no_grad", "true", "--vision_feature_cache", "memory", "--lora_lean_forward", "true"]
    run(argv, callbacks=[Record()])
    return grads


@pytest.mark.integration
def test_reentrant_decoder_checkpointing_gives_every_lora_weight_the_same_gradient(tmp_path):
    """The 8B recipes recompute the decoder with reentrant checkpointing (fewer hooks a step, docs/benchmarks.md).
    That form passes gradients only through inputs that require them: if the decoder's input did not, its LoRA
    weights would silently get none."""
    plain = first_step_gradients(tmp_path / "hooks", reentrant=False)
    reentrant = first_step_gradients(tmp_path / "reentrant", reentrant=True)
    assert plain.keys() == reentrant.keys()
    decoder = [name for name in plain if ".text_model.layers." in name and "lora_" in name]
    assert decoder, "the tiny recipe adapts no decoder layer"
    for name, grad in reentrant.items():
        assert grad is not None, f"{name} got no gradient"
        if "lora_B" in name:  # lora_A's first gradient is zero either way: lora_B starts at zero
            assert grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(grad, plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.integration
def test_anls_is_logged_at_each_evaluation_and_the_best_adapter_is_kept(tmp_path):
    """eval_strategy steps with metric_for_best_model anls: each evaluation answers held-out questions, logs
    eval_anls beside eval_loss, and the adapter saved at the end is the best evaluation's checkpoint."""
    from safetensors.torch import load_file

    out = tmp_path / "best"
    trainer, _ = run(
        quick(
            out,
            *("--max_steps", "6", "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2"),
            *("--save_total_limit", "3", "--metric_for_best_model", "anls", "--load_best_model_at_end", "true"),
            *("--eval_anls_samples", "4", "--eval_compare_base", "false", "--learning_rate", "5e-3"),
        )
    )
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    scored = [(h["step"], h["eval_anls"]) for h in history if "eval_anls" in h]
    assert [step for step, _ in scored][:3] == [2, 4, 6]  # then the final evaluation, of the best adapter
    assert all(0 <= anls <= 1 for _, anls in scored) and all(
        "eval_exact_match" in h for h in history if "eval_anls" in h
    )
    best_step, best = max(scored[:3], key=lambda pair: pair[1])  # the first of equal scores, as the Trainer keeps
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert trainer.state.best_metric == best
    saved = load_file(out / "adapter_model.safetensors")
    kept = load_file(out / f"checkpoint-{best_step}" / "adapter_model.safetensors")
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    if best_step != 6:  # the negative control: the last step's adapter is another one
        last = load_file(out / "checkpoint-6" / "adapter_model.safetensors")
        assert any(not torch.equal(saved[k], last[k]) for k in saved)
    report = json.loads((out / "report.json").read_text())
    assert report["adapter_step"] == best_step and report["best_metric"] == {"anls": best}
    assert f"(step {best_step}: the best evaluation by anls" in (out / "report.md").read_text()


def test_a_best_adapter_by_anls_needs_evaluations_that_compute_it(tmp_path):
    from docvlm.errors import UserError
    from docvlm.recipe.parse import parse_recipe

    for extra in (["--eval_strategy", "no"], ["--eval_strategy", "steps", "--eval_anls_samples", "0"]):
        with pytest.raises(UserError, match="metric_for_best_model is anls, but evaluations during training"):
            parse_recipe(quick(tmp_path, "--metric_for_best_model", "anls", *extra))


@pytest.mark.integration
def test_no_held_out_page_reaches_the_trainer(tmp_path, monkeypatch):
    """20 scans of 4 questions each (metadata.csv), eval_split_size 0.2: the rows the trainer's collator builds
    batches from cover every training page and not one of the 4 held-out pages."""
    from docvlm.fixtures.documents import page_digest
    from tests.data.test_splits import scans_with_metadata

    seen = []
    original = DocVQACollator.__call__

    def recording(self, rows):
        from docvlm.pages import pages_of

        seen.extend(page_digest(pages_of(row, "a training row")[0]) for row in rows)
        return original(self, rows)

    monkeypatch.setattr(DocVQACollator, "__call__", recording)
    scans = scans_with_metadata(tmp_path / "scans", pages=20, questions=4)
    out = tmp_path / "run"
    run(
        [
            *("--config", "recipes/local_folder_qlora.yaml", "--model_name_or_path", "docvlm:tiny-idefics2"),
            *("--dataset_name", str(scans), "--output_dir", str(out), "--eval_split_size", "0.2"),
            *("--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0"),
            *("--save_strategy", "no", "--eval_compare_base", "false", "--eval_max_new_tokens", "4"),
        ]
    )
    data = json.loads((out / "data_report.json").read_text())
    held_names = data["held_out"]["held_out_pages"]
    assert len(held_names) == 4 and data["held_out"]["held_out_questions"] == 16
    from PIL import Image

    held = {page_digest(Image.open(scans / name).convert("RGB")) for name in held_names}
    every = {page_digest(Image.open(path).convert("RGB")) for path in scans.glob("*.png")}
    assert len(seen) == 64 and set(seen) == every - held  # one epoch: each training question once
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16 and {p for item in predictions for p in item["pages"]} == set(held_names)


def test_a_run_without_evaluation_still_accounts_for_every_row(tmp_path, capsys):
    """eval_after_training false: no report.json, but data_report.json lists each skipped row by reason, and the
    run's last lines say where."""
    from docvlm.fixtures.documents import export_pages

    scans = tmp_path / "scans"
    metadata = export_pages(scans, 12, metadata_csv=True)
    (scans / "page-003.png").unlink()  # missing
    lines = metadata.read_text().splitlines()
    lines[6] = lines[6].rsplit(",", 1)[0] + ","  # page-005: empty answer
    metadata.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    run(
        [
            *("--config", "recipes/local_folder_qlora.yaml", "--model_name_or_path", "docvlm:tiny-idefics2"),
            *("--dataset_name", str(scans), "--output_dir", str(out), "--max_steps", "1"),
            *("--per_device_train_batch_size", "4", "--dataloader_num_workers", "0", "--save_strategy", "no"),
            *("--eval_after_training", "false", "--eval_split_size", "2"),
        ]
    )
    assert not (out / "report.json").exists()
    data = json.loads((out / "data_report.json").read_text())
    by_reason = data["skipped"]["by_reason"]
    rows = {reason: [row["row"] for row in entry["rows"]] for reason, entry in by_reason.items()}
    assert data["skipped"]["count"] == 2 and rows == {"image missing": [3], "no answer": [5]}
    assert data["splits"]["train"]["rows"] == 12
    captured = capsys.readouterr().out
    assert "2 skipped (1 image missing, 1 no answer)" in captured and "data_report.json lists them" in captured


@pytest.mark.integration
def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    """16 rows of 4 a step is 4 steps an epoch: max_steps 5 is not a multiple, and the Trainer's resume from
    checkpoint-5 trained a sixth step and rewrote the run's results."""
    out = tmp_path / "done"
    argv = quick(out, "--max_steps", "5", "--save_steps", "5", "--eval_after_training", "false")
    run(argv)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    trainer, metrics = run([*argv, "--resume_from_checkpoint", "latest"])
    assert trainer is None and metrics == {}
    assert "checkpoint-5 is the last step of its run (5): nothing is left to train" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    longer, _ = run(
        [*argv[:-2], "--max_steps", "6", "--resume_from_checkpoint", "latest", "--eval_after_training", "false"]
    )
    assert longer.state.global_step == 6  # asked for more: it trains on
