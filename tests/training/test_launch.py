"""Several processes: two processes (gloo on a CPU, NCCL on GPUs) train the tiny recipe, save one adapter that
reloads, and write one evaluation report with every held-out question answered once; on two GPUs, DDP and
DeepSpeed ZeRO-2/3 with QLoRA train like one GPU (`pytest -m multigpu`); and what each launch mode sets or refuses
(docvlm.modes, docvlm.training.launch and each switch's own modes in docvlm.speedups), from the variables accelerate
exports."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import mark_for_resume, quick


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

    from docvlm.recipe.parse import parse_recipe
    from docvlm.training.modeling import load_model, model_path

    _, model_args, _, _ = parse_recipe(quick(out))
    reloaded = PeftModel.from_pretrained(load_model(model_args, torch.float32, model_path(model_args)), out)
    lora_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: these are the trained weights


def test_effective_batch_size_sets_the_accumulation_and_refuses_what_does_not_divide():
    from docvlm.errors import UserError
    from docvlm.recipe.parse import parse_recipe

    base = ["--config", "recipes/docvqa_qlora.yaml", "--precision", "fp32", "--per_device_train_batch_size", "4"]
    _, _, training, _ = parse_recipe([*base, "--effective_batch_size", "16"])
    assert training.gradient_accumulation_steps == 4
    assert "1 process x 4 per device x 4 accumulation = 16 samples" in training.batch_summary()
    with pytest.raises(UserError, match="effective_batch_size 10 is not a multiple"):
        parse_recipe([*base, "--effective_batch_size", "10"])


def train_as_two_machines(out: Path, port: int, gpus: bool) -> list[str]:
    """Two launches of accelerate_configs/multi_node.yaml as machine_rank 0 and 1 on this host, one process each
    (on its own GPU when `gpus`); the outputs of both."""
    launches = []
    for rank in (0, 1):
        env = {**clean_env(), **({"CUDA_VISIBLE_DEVICES": str(rank)} if gpus else {})}
        machine = ["--machine_rank", str(rank), "--num_machines", "2", "--main_process_ip", "127.0.0.1"]
        command = launch_command("multi_node", port, *machine, "--num_processes", "2")
        command += quick(out, "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no")
        command += ["--precision", "bf16"] if gpus else []
        launches.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = [launch.communicate(timeout=600)[0] for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "Batch: 2 processes" in outputs[0] and "Full report:" in outputs[0] and "Full report:" not in outputs[1]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "adapter_model.safetensors").is_file() and json.loads((out / "report.json").read_text())["count"] == 8
    return outputs


@pytest.mark.slow
def test_the_multi_node_config_trains_as_two_machines_on_one_host(tmp_path):
    """Two gloo CPU "machines": machine_rank 0 and 1 of accelerate_configs/multi_node.yaml."""
    train_as_two_machines(tmp_path / "two-machines", 29519, gpus=False)


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
    mark_for_resume(out / "checkpoint-2")
    launch("--max_steps", "4", "--save_steps", "4", "--resume_from_checkpoint", "latest")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert sorted(losses) == [1, 2, 3, 4]  # no step lost or repeated
    assert losses[1] == 123.0  # carried on from the checkpoint's history: a restart would have logged step 1 anew
    assert losses[2] == next(h["loss"] for h in first if h.get("step") == 2 and "loss" in h)


@pytest.mark.integration
def test_a_failing_multi_process_launch_ends_without_the_launchers_traceback(tmp_path):
    command = launch_command("multi_gpu", 29523, "--num_processes", "2")
    command += ["--config", str(tmp_path / "missing.yaml")]
    env = clean_env()
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 2  # the job's own status, as one process gives it
    assert run.stderr.count("missing.yaml not found") == 1  # the job's own message, said by one process
    assert "Traceback" not in run.stderr and "ChildFailedError" not in run.stderr


# --------------------------------------------------------------------------------------------------------------
# Two GPUs: DeepSpeed ZeRO-2/3 and FSDP with QLoRA (run with `pytest -m multigpu` on a 2-GPU machine)
# --------------------------------------------------------------------------------------------------------------

GPUS = torch.cuda.device_count()
needs_two_gpus = pytest.mark.skipif(
    GPUS < 2, reason=f"needs 2 CUDA GPUs ({GPUS} here): run `pytest -m multigpu` on a 2-GPU machine"
)
# every docvlm memory/speed switch on (with the chunk sizes that split the tiny batches), then every one off
SWITCHES_ON = [
    *("--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", '{"use_reentrant": false}'),
    *("--vision_tower_no_grad", "true", "--vision_tower_pages", "1"),
    *("--connector_checkpointing", "true", "--connector_checkpoint_pages", "1"),
    *("--connector_lean_activations", "true", "--loss_logits", "answer"),
]
SWITCHES_OFF = [
    *("--gradient_checkpointing", "false", "--vision_tower_no_grad", "false", "--connector_checkpointing", "false"),
    *("--connector_perceiver_pages", "null", "--connector_lean_activations", "false", "--loss_logits", "all"),
]
# 3 steps on the same 4 samples (one global batch), so that the loss must fall and one GPU sees what two do
GPU_RUN = [
    *("--precision", "bf16", "--max_steps", "3", "--max_train_samples", "4", "--warmup_steps", "0"),
    "--per_device_train_batch_size",
]


def losses_of(out) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


@pytest.fixture(scope="module")
def one_gpu_losses(tmp_path_factory):
    """The reference: the same 3 steps on one GPU, with the two processes' batch (2 x 2) in one."""
    out = tmp_path_factory.mktemp("one-gpu")
    env = {**clean_env(), "CUDA_VISIBLE_DEVICES": "0"}
    command = [sys.executable, "-m", "docvlm.train", *quick(out, *GPU_RUN, "4", "--save_strategy", "no")]
    command += [*SWITCHES_ON, "--eval_after_training", "false"]
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return losses_of(out)


@pytest.mark.parametrize(
    "config, port", [("multi_gpu", 29531), ("deepspeed_zero2", 29533), ("deepspeed_zero3", 29535)]
)  # FSDP with a 4-bit model is refused (see test_fsdp_refuses_a_4bit_model_... below)
@pytest.mark.multigpu
@needs_two_gpus
def test_qlora_on_two_gpus_trains_like_one_saves_a_whole_adapter_and_one_report(tmp_path, config, port, one_gpu_losses):
    out = tmp_path / config
    result = tmp_path / "probe.json"
    command = [sys.executable, "-m", "docvlm", "launch", "--config_file", f"accelerate_configs/{config}.yaml"]
    command += ["--num_processes", "2", "--main_process_port", str(port), "tests/launch_probe.py", str(result)]
    command += quick(out, *GPU_RUN, "2", "--save_strategy", "no", *SWITCHES_ON)
    run = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=400)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    if config == "deepspeed_zero3":
        assert "bnb_4bit_quant_storage: bfloat16" in output  # set for the user, and said
    assert output.count("Full report:") == 1  # the generation eval ran, once, never skipped
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["count"] == 8

    losses = losses_of(out)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    # the same first loss as one GPU with the same 4 samples, and a trajectory close to it
    assert losses == pytest.approx(one_gpu_losses, rel=2e-2), (losses, one_gpu_losses)
    # the saved adapter is whole: reloaded on one GPU it gives the trained model's logits
    reload = json.loads(result.read_text())
    assert reload["reload_max_logit_diff"] < 0.1
    # the control: a reload that dropped the adapter would be as far off as the base model is
    assert reload["reload_base_max_logit_diff"] > max(5 * reload["reload_max_logit_diff"], 0.1)

    # the switches change memory and speed, never the losses, under this mode too
    off = tmp_path / f"{config}-off"
    command = [sys.executable, "-m", "docvlm", "launch", "--config_file", f"accelerate_configs/{config}.yaml"]
    command += ["--num_processes", "2", "--main_process_port", str(port + 1), "-m", "docvlm.train"]
    command += quick(off, *GPU_RUN, "2", "--save_strategy", "no", "--eval_after_training", "false", *SWITCHES_OFF)
    run = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=400)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert losses_of(off) == pytest.approx(losses, rel=1e-2), (losses_of(off), losses)


@pytest.mark.multigpu
@needs_two_gpus
def test_the_multi_node_config_trains_as_two_machines_with_one_gpu_each(tmp_path):
    """machine_rank 0 and 1 of accelerate_configs/multi_node.yaml on one host, each launch seeing one GPU: NCCL
    across the two "machines", one adapter and one report."""
    outputs = train_as_two_machines(tmp_path / "two-gpu-machines", 29541, gpus=True)
    assert "Launch: DDP" in outputs[0]


@pytest.mark.multigpu
@needs_two_gpus
def test_a_zero3_run_resumes_from_its_checkpoint_with_the_same_world_size(tmp_path):
    out = tmp_path / "zero3-resume"

    def launch(port, *extra):
        command = launch_command("deepspeed_zero3", port, "--num_processes", "2")
        command += quick(out, *GPU_RUN, "2", "--eval_after_training", "false", *extra)
        run = subprocess.run(command, capture_output=True, text=True, timeout=400, env=clean_env())
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    launch(29543, "--max_steps", "2", "--save_steps", "2", "--max_train_samples", "16")
    first = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    mark_for_resume(out / "checkpoint-2")
    launch(
        29545,
        "--max_steps",
        "4",
        "--save_steps",
        "4",
        "--max_train_samples",
        "16",
        "--resume_from_checkpoint",
        "latest",
    )
    losses = {
        h["step"]: h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h
    }
    assert sorted(losses) == [1, 2, 3, 4]  # no step lost or repeated
    assert losses[1] == 123.0  # carried on from the checkpoint's history: a restart would have logged step 1 anew
    assert losses[2] == next(h["loss"] for h in first if h.get("step") == 2 and "loss" in h)
    assert (out / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------------------
# What each launch mode needs, from the variables `accelerate launch` exports (no GPU needed)
# --------------------------------------------------------------------------------------------------------------


def recipe_on_a_gpu(precision: str = "bf16", *extra):
    """docvqa_qlora's arguments as a GPU with `precision` resolves them (parsed here on the CPU in fp32)."""
    from docvlm.recipe.parse import parse_recipe

    _, model_args, training_args, _ = parse_recipe(
        ["--config", "recipes/docvqa_qlora.yaml", "--precision", "fp32", *extra]
    )
    training_args.bf16, training_args.fp16 = precision == "bf16", precision == "fp16"
    return model_args, training_args


def test_the_launch_mode_is_read_from_accelerates_variables(monkeypatch):
    from docvlm import modes as distributed

    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.launch_mode() == distributed.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launch_mode() == distributed.DDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed.launch_mode() == distributed.FSDP
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert distributed.launch_mode() == distributed.ZERO2
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert distributed.launch_mode() == distributed.ZERO3


def settled(mode: str, model_args, training_args) -> list[str]:
    """What a launch in `mode` on a GPU changes in the recipe (settle_for_launch, less its machine checks)."""
    from docvlm import speedups
    from docvlm.training.launch import prepare_recipe_for, refuse_unsupported_settings

    changes = prepare_recipe_for(mode, model_args, training_args)
    refuse_unsupported_settings(mode, training_args)
    return changes + speedups.settle(mode, training_args, "cuda")


def test_zero3_stores_the_4bit_weights_in_the_training_dtype_and_says_so(monkeypatch):
    from docvlm.modes import ZERO3
    from docvlm.training.modeling import quantization_config
    from docvlm.training.precision import training_dtype

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true")
    model_args, training_args = recipe_on_a_gpu("bf16")
    assert model_args.bnb_4bit_quant_storage is None  # the recipe does not set it
    changes = settled(ZERO3, model_args, training_args)
    assert changes[:2] == [
        "bnb_4bit_quant_storage: bfloat16 (DeepSpeed ZeRO-3 splits the 4-bit weights in the compute dtype)",
        "vision_feature_cache: off (DeepSpeed ZeRO-3 splits the vision tower's weights across processes)",
    ]
    assert quantization_config(model_args, training_dtype(training_args)).bnb_4bit_quant_storage == torch.bfloat16


def test_zero3_refuses_uint8_storage_and_a_config_that_would_save_no_adapter(monkeypatch):
    from docvlm.errors import UserError
    from docvlm.modes import ZERO3
    from docvlm.training.launch import prepare_recipe_for

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true")
    model_args, training_args = recipe_on_a_gpu("bf16", "--bnb_4bit_quant_storage", "uint8")
    with pytest.raises(UserError, match="bnb_4bit_quant_storage is uint8, but under DeepSpeed ZeRO-3"):
        prepare_recipe_for(ZERO3, model_args, training_args)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false")
    model_args, training_args = recipe_on_a_gpu("bf16")
    with pytest.raises(UserError, match="without zero3_save_16bit_model: true would save no adapter"):
        prepare_recipe_for(ZERO3, model_args, training_args)


def test_a_zero3_deepspeed_json_config_must_gather_the_adapter_when_saving(monkeypatch, tmp_path):
    from docvlm.errors import UserError
    from docvlm.modes import ZERO3, launch_mode
    from docvlm.training.launch import prepare_recipe_for

    recipes = [recipe_on_a_gpu("bf16") for _ in range(2)]  # parsed before the DeepSpeed variables are set
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    assert launch_mode() == ZERO3  # the stage is read from the file
    with pytest.raises(UserError, match='zero3.json runs ZeRO-3 without "stage3_gather_16bit_weights_on_model_save"'):
        prepare_recipe_for(ZERO3, *recipes[0])
    gather = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    config.write_text(json.dumps({"zero_optimization": gather}))
    assert prepare_recipe_for(ZERO3, *recipes[1])  # accepted: it sets the 4-bit storage and says so


def test_fsdp_refuses_a_4bit_model_and_other_modes_refuse_what_was_not_verified_in_them():
    from docvlm import speedups
    from docvlm.errors import UserError
    from docvlm.modes import DDP, FSDP, SINGLE, ZERO2
    from docvlm.training.launch import prepare_recipe_for, refuse_unsupported_settings

    model_args, training_args = recipe_on_a_gpu("bf16")
    with pytest.raises(UserError, match="FSDP with a 4-bit model .* is refused.*deepspeed_zero3.yaml"):
        prepare_recipe_for(FSDP, model_args, training_args)
    _, fp16_args = recipe_on_a_gpu("fp16")
    with pytest.raises(UserError, match="precision is fp16 .* verified DeepSpeed ZeRO-2 with QLoRA in bf16 only"):
        refuse_unsupported_settings(ZERO2, fp16_args)
    refuse_unsupported_settings(ZERO2, training_args)  # bf16: allowed
    training_args.compile_text_layers = True
    for mode in (DDP, ZERO2, FSDP):
        with pytest.raises(UserError, match=f"compile_text_layers is true, but .* not under {mode}"):
            speedups.settle(mode, training_args, "cuda")
    speedups.settle(SINGLE, training_args, "cuda")  # measured there


@pytest.mark.parametrize("mode", ["DDP", "DeepSpeed ZeRO-2", "DeepSpeed ZeRO-3", "FSDP"])
def test_switches_measured_on_one_gpu_are_turned_off_where_they_cannot_apply_and_said(mode, monkeypatch):
    """The shipped recipes offload the vision tower and use the lean LoRA forward and fused norms on one GPU;
    launched on several, the switches their mode cannot take are turned off with a line each, not refused (nor
    silently kept)."""
    from docvlm.modes import FSDP, SINGLE, ZERO3

    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true")
    model_args, training_args = recipe_on_a_gpu("bf16", "--load_in_4bit", str(mode != FSDP).lower())
    assert training_args.vision_tower_offload and training_args.lora_lean_forward  # the recipe's
    changes = settled(mode, model_args, training_args)
    assert f"vision_tower_offload: false ({mode} needs every weight of the model on the GPU)" in changes
    assert not training_args.vision_tower_offload
    sharded = mode in (ZERO3, FSDP)
    assert training_args.lora_lean_forward is not sharded and training_args.fused_rms_norms is not sharded
    assert any(c.startswith("lora_lean_forward: false") for c in changes) is sharded
    assert any(c.startswith("fused_rms_norms: false") for c in changes) is sharded
    model_args, training_args = recipe_on_a_gpu("bf16")
    changes = settled(SINGLE, model_args, training_args)
    assert not any("offload" in c or "lean" in c or "fused" in c for c in changes)
    assert training_args.vision_tower_offload and training_args.lora_lean_forward and training_args.fused_rms_norms


def test_fsdp_refuses_two_kinds_of_activation_checkpointing(monkeypatch):
    from docvlm.errors import UserError
    from docvlm.modes import FSDP
    from docvlm.training.launch import refuse_unsupported_settings

    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    _, training_args = recipe_on_a_gpu("bf16")
    assert training_args.gradient_checkpointing
    with pytest.raises(UserError, match="fsdp_activation_checkpointing: both would recompute the same layers"):
        refuse_unsupported_settings(FSDP, training_args)


def test_a_model_built_under_zero3_is_built_whole(monkeypatch):
    """The tiny fixture and the evaluation model are built as one process builds them, even while a ZeRO-3
    config is registered (transformers would otherwise partition them as they are created)."""
    from docvlm.modes import whole_model_loading
    from tests.helpers import zero3_registered

    with zero3_registered() as hf_deepspeed:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        with whole_model_loading():
            assert not hf_deepspeed.is_deepspeed_zero3_enabled()
        assert hf_deepspeed.is_deepspeed_zero3_enabled()  # restored afterwards
    assert not hf_deepspeed.is_deepspeed_zero3_enabled()


@pytest.mark.parametrize("name", sorted(p.stem for p in Path("accelerate_configs").glob("*.yaml")))
def test_every_accelerate_config_opens_with_how_to_launch_it_and_loads(name):
    from accelerate.commands.config.config_args import load_config_from_file

    text = Path(f"accelerate_configs/{name}.yaml").read_text()
    head = text.split("\ncompute_environment")[0]
    assert head.startswith("# ") and f"--config_file accelerate_configs/{name}.yaml" in head
    config = load_config_from_file(f"accelerate_configs/{name}.yaml")
    assert config.distributed_type is not None
