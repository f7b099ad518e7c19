"""Helpers shared by the tests."""

from contextlib import contextmanager


def quick(output_dir, *extra):
    """Arguments for a few-step run of the tiny recipe."""
    return [
        "--config",
        "recipes/tiny_docvqa.yaml",
        "--output_dir",
        str(output_dir),
        "--max_train_samples",
        "16",
        "--max_eval_samples",
        "8",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        *extra,
    ]


def mark_for_resume(checkpoint) -> None:
    """Step 1's logged loss set to 123 in a checkpoint: a resume carries the history on, a restart from scratch
    (which, with the same seed, would log the very same losses) logs step 1 anew."""
    import json
    from pathlib import Path

    state_file = Path(checkpoint) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    next(h for h in state["log_history"] if h.get("step") == 1 and "loss" in h)["loss"] = 123.0
    state_file.write_text(json.dumps(state))


def peft_tiny_model_and_batch(size=4, recipe="recipes/tiny_docvqa.yaml", *overrides):
    """A LoRA model of a recipe (the tiny one by default; overrides as on the command line, e.g. another fixture)
    in fp32 on the CPU, in training mode, and a batch of `size` tiny-docs rows from the recipe's collator."""
    import torch
    from peft import get_peft_model

    from docvlm.data import load_splits
    from docvlm.recipe.parse import parse_recipe
    from docvlm.training.collator import DocVQACollator
    from docvlm.training.modeling import (
        keep_trainable_fp32,
        load_model,
        load_processor,
        lora_config,
        model_path,
        model_type_at,
    )

    data_args, model_args, _, _ = parse_recipe(["--config", recipe, *overrides])
    path = model_path(model_args)
    model = get_peft_model(load_model(model_args, torch.float32, path), lora_config(model_args))
    keep_trainable_fp32(model)
    train_rows, _ = load_splits(data_args, need_eval=False)
    collator = DocVQACollator(
        load_processor(model_args, path, model_type_at(path)), data_args.instruction, 256, "first"
    )
    model.train()
    return model, collator([train_rows[i] for i in range(size)])


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(first, second):
    import torch

    (loss_a, grads_a), (loss_b, grads_b) = first, second
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


@contextmanager
def zero3_registered():
    """A ZeRO-3 config registered with transformers, as a ZeRO-3 launch registers one (no DeepSpeed needed);
    yields transformers' deepspeed integration module."""
    from transformers.integrations import deepspeed as hf_deepspeed

    class Zero3Config:
        def is_zero3(self):
            return True

    config = Zero3Config()  # transformers keeps a weak reference: hold it for the duration
    hf_deepspeed.set_hf_deepspeed_config(config)
    try:
        yield hf_deepspeed
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
