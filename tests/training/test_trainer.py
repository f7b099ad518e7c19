"""The answer-span loss: the same loss and gradients as TRL's full-sequence loss, from fewer logits."""

import torch

from docvlm.training.trainer import IGNORE_INDEX, answer_span_loss, answer_window


def test_answer_window_starts_one_before_the_first_labelled_token():
    labels = torch.full((2, 10), IGNORE_INDEX)
    labels[0, 7:9] = 5  # answer at 7-8
    labels[1, 6:8] = 4  # answer at 6-7: the batch needs logits from position 5 on
    assert answer_window(labels) == 5
    assert answer_window(torch.full((2, 4), IGNORE_INDEX)) == 1


def test_answer_span_loss_matches_cross_entropy_over_the_whole_sequence():
    torch.manual_seed(0)
    logits = torch.randn(3, 12, 50)
    labels = torch.full((3, 12), IGNORE_INDEX)
    labels[0, 9:12] = torch.tensor([1, 2, 3])
    labels[1, 7:10] = torch.tensor([4, 5, 6])
    labels[2, 10:12] = torch.tensor([7, 8])
    full = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    keep = answer_window(labels)
    loss, count, _, correct = answer_span_loss(logits[:, -keep:], labels, None)
    torch.testing.assert_close(loss, full)
    assert count == 8 and 0 <= correct <= 8
    # With gradient accumulation the Trainer passes the token count of the whole accumulated batch.
    summed, _, _, _ = answer_span_loss(logits[:, -keep:], labels, 16)
    torch.testing.assert_close(summed, full * 8 / 16)


def test_trainer_loss_and_gradients_match_trl(trained):
    """On a real batch of the tiny model: our path and TRL's give the same loss and LoRA gradients."""
    _, trainer, _ = trained
    # Any TrainingArguments built since (`docvlm eval` parses a recipe) resets accelerate's process-wide state under
    # this run's trainer: give it a live accelerator again, so that the test does not depend on which tests ran first.
    trainer.create_accelerator_and_postprocess()
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    saved = trainer.args.loss_logits

    def loss_and_grads(setting):
        trainer.args.loss_logits = setting
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        model.zero_grad()
        return loss.detach(), grads

    try:
        model.train()
        ours, our_grads = loss_and_grads("answer")
        theirs, their_grads = loss_and_grads("all")
    finally:
        trainer.args.loss_logits = saved
    assert ours.dtype == torch.float32 and torch.isfinite(ours)
    # fp32 on a CPU agrees to rounding; under bf16 autocast on a GPU each matmul keeps 8 bits of mantissa.
    exact = batch["input_ids"].device.type == "cpu"
    tolerance = 2e-3 if exact else 3e-2
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)
    assert our_grads.keys() == their_grads.keys() and len(our_grads) > 10
    for name, grad in our_grads.items():
        rtol, atol = (2e-2, 1e-4) if exact else (1e-1, 1e-2)
        torch.testing.assert_close(grad, their_grads[name], rtol=rtol, atol=atol, msg=name)
