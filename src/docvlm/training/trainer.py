"""TRL's SFTTrainer, scoring only the answer span where TRL's compacting loss kernel is not available."""

from __future__ import annotations

import functools
import inspect
import shutil
from pathlib import Path

import torch
from trl import SFTTrainer

IGNORE_INDEX = -100


def answer_window(labels: torch.Tensor) -> int:
    """How many trailing positions need logits: from the one that predicts the batch's first answer token on."""
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if labelled.numel() == 0:
        return 1
    return labels.shape[1] - int(labelled[0]) + 1


def answer_span_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor | None):
    """Next-token loss of `logits` (the last positions of the batch) against `labels` (the whole sequence).

    Returns (loss, number of labelled tokens, summed entropy of their predictions, how many were top-1)."""
    keep = logits.shape[1]
    logits = logits[:, :-1].float()
    targets = labels[:, labels.shape[1] - keep + 1 :]
    mask = targets != IGNORE_INDEX
    logprobs = logits.log_softmax(dim=-1)
    token_logprobs = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    count = mask.sum()
    denominator = torch.as_tensor(count if num_items is None else num_items, device=logits.device).clamp(min=1)
    loss = -(token_logprobs * mask).sum() / denominator
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        entropy_sum = (entropy * mask).sum()
        correct = ((logits.argmax(-1) == targets) & mask).sum()
    return loss, count, entropy_sum, correct


def readable_weights(folder: Path) -> None:
    """Give the *.safetensors files in `folder` the mode the user's umask gives new files (0644 for the usual 022):
    safetensors writes them 0600, unlike the processor, the card and the reports beside them."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).glob("*.safetensors"):
        path.chmod(0o666 & ~mask)


class DocVLMTrainer(SFTTrainer):
    """SFTTrainer with one change, `loss_logits: answer`: compute logits only from the first answer token on.

    A document-QA sample is mostly image and prompt tokens, and only a few answer tokens carry loss. TRL's loss
    projects every position onto the vocabulary and computes an entropy for each; it skips unlabelled positions
    only in its Triton kernel, i.e. on GPUs, so on a CPU most of a step's loss work goes to positions without a
    label. The loss is the same; the logged entropy and token accuracy cover the labelled positions, as TRL's do.
    """

    def __init__(self, *args, model_card=None, answer_scores=None, **kwargs):
        """`model_card`: a function returning the run's README.md text, written instead of TRL's template card.
        `answer_scores`: a function of the model returning scores of held-out questions answered by generation
        ({"anls": ..., "exact_match": ...}, docvlm.evaluation.evaluate.HeldOutScores), logged with each evaluation's
        loss."""
        self._model_card = model_card
        self._answer_scores = answer_scores
        self.input_hooks: list = []  # functions of each batch before its forward (_prepare_inputs)
        super().__init__(*args, **kwargs)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, **kwargs):
        """The held-out loss, and with `answer_scores` the generation scores beside it (eval_anls,
        eval_exact_match), where the Trainer logs them and metric_for_best_model can pick them."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        if self._answer_scores is not None and prefix == "eval":
            for hook in self.input_hooks:
                hook({})  # an empty batch: nothing the last loss batch left outlives it into generation
            scores = self._answer_scores(self.accelerator.unwrap_model(self.model))
            output.metrics.update({f"{prefix}_{name}": value for name, value in scores.items()})
        return output

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """Called by TRL at every checkpoint and by `push_to_hub`: write docvlm's card, not TRL's text-model
        template ("fine-tuned version of [None]", a text-generation pipeline, `licence: license`)."""
        if self._model_card is None:
            return super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if self.is_world_process_zero():
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(self.args.output_dir) / "README.md").write_text(self._model_card())

    def save_model(self, output_dir=None, _internal_call=False):
        """The weights, readable like every other file the run writes (safetensors writes them 0600)."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.is_world_process_zero():
            readable_weights(Path(output_dir or self.args.output_dir))

    def _save_checkpoint(self, model, trial):
        """A checkpoint the disk cannot hold is removed (a half-written folder is never left for a resume to
        meet) and raised as DiskFull; peft writes its blank template card into every checkpoint folder, replaced
        with the run's card."""
        from docvlm.training.runs import DiskFull, disk_full

        checkpoint = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            if not disk_full(error, Path(self.args.output_dir)):
                raise
            if self.is_world_process_zero():
                shutil.rmtree(checkpoint, ignore_errors=True)
            raise DiskFull(checkpoint, removed=checkpoint.name) from None
        card = Path(self.args.output_dir) / "README.md"
        if self._model_card is not None and self.is_world_process_zero() and card.is_file() and checkpoint.is_dir():
            shutil.copy(card, checkpoint / "README.md")

    def _answer_logits_only(self, inputs) -> bool:
        setting = getattr(self.args, "loss_logits", "auto")
        if setting == "all" or "labels" not in inputs:
            return False
        if setting == "auto" and inputs["labels"].device.type == "cuda":
            return False  # TRL's Triton kernel already scores only the labelled rows
        return self._takes_logits_to_keep

    @functools.cached_property
    def _takes_logits_to_keep(self) -> bool:
        """Whether the model's forward can return logits for the last positions only; read once, not each step."""
        base = self.accelerator.unwrap_model(self.model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        return "logits_to_keep" in inspect.signature(base.forward).parameters

    def _prepare_inputs(self, inputs):
        """Give each of `input_hooks` the batch right before the forward: a speed switch takes out what its
        collator added for it (docvlm.speedups.feature_cache), which the model would not accept."""
        for hook in self.input_hooks:
            hook(inputs)
        return super()._prepare_inputs(inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self._answer_logits_only(inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        logits = model(**model_inputs, use_cache=False, logits_to_keep=answer_window(labels)).logits
        loss, count, entropy_sum, correct = answer_span_loss(logits, labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer: DDP averages what was a global sum
        self._log_token_metrics(count, entropy_sum, correct, inputs)
        return loss

    def _log_token_metrics(self, count, entropy_sum, correct, inputs) -> None:
        """The entropy / mean_token_accuracy / num_tokens that SFTTrainer logs, where this TRL version keeps them."""
        metrics = getattr(self, "_metrics", None)
        if metrics is None:
            return
        mode = "train" if self.model.training else "eval"
        count = self.accelerator.gather_for_metrics(count).sum()
        entropy_sum = self.accelerator.gather_for_metrics(entropy_sum).sum()
        correct = self.accelerator.gather_for_metrics(correct).sum()
        metrics[mode]["entropy"].append((entropy_sum / count).item() if count > 0 else 0.0)
        metrics[mode]["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)
        if mode == "train" and hasattr(self, "_total_train_tokens"):
            # real tokens: the attention mask's, or every position of rows packed without padding
            mask = inputs.get("attention_mask", inputs.get("position_ids"))
            real = mask.sum() if "attention_mask" in inputs else torch.tensor(mask.numel(), device=mask.device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(real).sum().item()
            metrics[mode]["num_tokens"] = [self._total_train_tokens]
