"""Greedy answers, batched with left padding, stopping where the model's family closes a turn."""

from __future__ import annotations

import torch

from docvlm.families import family_of_processor, prompt_text
from docvlm.pages import pages_of
from docvlm.prompts import Prompt, special_tokens_for
from docvlm.training.precision import autocast_for


@torch.no_grad()
def generate(
    model,
    processor,
    rows,
    prompt: Prompt,
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generating",
    leave: bool = True,
) -> list[dict]:
    """Greedy answers to rows (dicts with `image` and `question`, or `messages`: answered after its last user turn),
    batched with left padding; generation stops where the model's family closes a turn, or at the end of sequence.

    Returns one dict per row: the answer text and whether the model stopped by itself.
    """
    from tqdm.auto import tqdm

    tokenizer = processor.tokenizer
    stop_ids = family_of_processor(processor).stop_ids(tokenizer, processor.chat_template)
    device = next(p for p in model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    from accelerate import PartialState

    quiet = not PartialState().is_local_main_process  # one progress bar a machine under multi-process launches
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", disable=quiet, leave=leave):
        batch_rows = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        ims = [pages_of(row, f"Item {start + i}") for i, row in enumerate(batch_rows)]
        prompts = [prompt_text(processor, prompt, row, len(pages)) for row, pages in zip(batch_rows, ims, strict=True)]
        extra = special_tokens_for(tokenizer, prompts)
        batch = processor(text=prompts, images=ims, padding=True, padding_side="left", return_tensors="pt", **extra)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_for(model):
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        for row in generated[:, batch["input_ids"].shape[1] :].tolist():
            stopped = any(t in stop_ids for t in row)
            if stopped:
                row = row[: min(row.index(t) for t in stop_ids if t in row)]
            outputs.append({"answer": tokenizer.decode(row, skip_special_tokens=True).strip(), "stopped": stopped})
    model.train(was_training)
    return outputs


class _Rows:
    """The eval split's rows, their pages decoded batch by batch (a decoded scan is large: never all at once)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]
