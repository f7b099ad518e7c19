"""Data parallelism: two processes (gloo on a CPU, NCCL on GPUs) train the tiny recipe, save one adapter that
reloads, and write one evaluation report with every held-out question answered once."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import quick


def launch_command(config: str, port: int, *launch_args: str) -> list[str]:
    """`docvlm launch` of docvlm.train under accelerate_configs/<config>.yaml; the train arguments follow."""
    command = [sys.executable, "-m", "docvlm", "launch", "--config_file", f"accelerate_configs/{config}.yaml"]
    return [*command, *launch_args, "--main_process_port", str(port), "-m", "docvlm.train"]


def clean_env() -> dict:
    """This environment without a surrounding launch's rank variables, so the launcher sets its own."""
    return {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}


@pytest.mark.slow
def test_two_process_ddp_saves_one_adapter_and_one_report(tmp_path):
    out = tmp_path / "ddp"
    command = launch_command("multi_gpu", 29517, "--num_processes", "2")
    command += quick(out, "--max_steps", "3", "--per_device_train_batch_size", "2", "--save_steps", "3")
    env = clean_env()
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    assert "Batch: 2 processes x 2 per device x 1 accumulation = 4 samples per optimizer step." in output
    assert "Set effective_batch_size: 2 to keep the recipe's" in output
    assert output.count("Full report:") == 1 and output.count("Done. Everything is in") == 1  # the main process
    assert "find_unused_parameters=True" not in output

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["train_batch_size"] == 2
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["count"] == 8
    rows = [json.loads(line)["row"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows == list(range(8))  # each held-out question answered once, in order, gathered from both shards

    from peft import PeftModel

    from docvlm.config import parse_recipe
    from docvlm.modeling import load_model, model_path

    _, model_args, _, _ = parse_recipe(quick(out))
    reloaded = PeftModel.from_pretrained(load_model(model_args, torch.float32, model_path(model_args)), out)
    lora_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: these are the trained weights


def test_effective_batch_size_sets_the_accumulation_and_refuses_what_does_not_divide():
    from docvlm.config import parse_recipe
    from docvlm.errors import UserError

    base = ["--config", "recipes/docvqa_qlora.yaml", "--precision", "fp32", "--per_device_train_batch_size", "4"]
    _, _, training, _ = parse_recipe([*base, "--effective_batch_size", "16"])
    assert training.gradient_accumulation_steps == 4
    assert "1 process x 4 per device x 4 accumulation = 16 samples" in training.batch_summary()
    with pytest.raises(UserError, match="effective_batch_size 10 is not a multiple"):
        parse_recipe([*base, "--effective_batch_size", "10"])


@pytest.mark.slow
def test_the_multi_node_config_trains_as_two_machines_on_one_host(tmp_path):
    """Two launches as machine_rank 0 and 1 of accelerate_configs/multi_node.yaml, one CPU process each."""
    out = tmp_path / "two-machines"
    env = clean_env()
    launches = []
    for rank in (0, 1):
        machine = ["--machine_rank", str(rank), "--num_machines", "2", "--main_process_ip", "127.0.0.1"]
        command = launch_command("multi_node", 29519, *machine, "--num_processes", "2")
        command += quick(out, "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no")
        launches.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = [launch.communicate(timeout=600)[0] for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "Batch: 2 processes" in outputs[0] and "Full report:" in outputs[0] and "Full report:" not in outputs[1]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "adapter_model.safetensors").is_file() and json.loads((out / "report.json").read_text())["count"] == 8


@pytest.mark.slow
def test_a_ddp_run_resumes_from_its_checkpoint_with_the_same_world_size(tmp_path):
    out = tmp_path / "ddp-resume"
    env = clean_env()

    def launch(*extra):
        command = launch_command("multi_gpu", 29521, "--num_processes", "2")
        command += quick(out, "--per_device_train_batch_size", "2", "--eval_after_training", "false", *extra)
        run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0, run.stderr[-3000:]

    launch("--max_steps", "2", "--save_steps", "2")
    first = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    launch("--max_steps", "4", "--save_steps", "4", "--resume_from_checkpoint", "latest")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert sorted(losses) == [1, 2, 3, 4]  # no step lost or repeated
    assert [losses[1], losses[2]] == [h["loss"] for h in first if "loss" in h]  # carried on, not retrained


def test_a_failing_multi_process_launch_ends_without_the_launchers_traceback(tmp_path):
    command = launch_command("multi_gpu", 29523, "--num_processes", "2")
    command += ["--config", str(tmp_path / "missing.yaml")]
    env = clean_env()
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 1
    assert "missing.yaml not found" in run.stderr  # the job's own message
    assert "Traceback" not in run.stderr and "ChildFailedError" not in run.stderr
