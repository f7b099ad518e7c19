"""Greedy answers, batched with left padding, stopping where the model's family closes a turn: the pages decoded and
processed in DataLoader workers while the GPU generates, rows of similar length batched together, and, with a
feature cache, each page's frozen-tower features computed once for every question and pass that reads it."""

from __future__ import annotations

import torch

from docvlm.families import family_of_processor, prompt_text
from docvlm.pages import pages_of
from docvlm.prompts import Prompt, special_tokens_for
from docvlm.training.precision import autocast_for

ROW_INDICES = "row_indices"  # where each answer of a batch goes, in the rows' order


class AnswerBatches:
    """A DataLoader's collate function for generation: (index, row) pairs to the processor's left-padded batch, with
    each row's index and, for a feature cache, each page's digest (docvlm.speedups.feature_store.PageKeys), made in
    the workers so that the generating process neither decodes pages nor hashes pixels."""

    def __init__(self, processor, prompt: Prompt, page_keys=None):
        self.processor, self.prompt, self.page_keys = processor, prompt, page_keys

    def __call__(self, indexed_rows: list[tuple[int, dict]]) -> dict:
        pages = [pages_of(row, f"Item {index}") for index, row in indexed_rows]
        prompts = [
            prompt_text(self.processor, self.prompt, row, len(row_pages))
            for (_, row), row_pages in zip(indexed_rows, pages, strict=True)
        ]
        extra = special_tokens_for(self.processor.tokenizer, prompts)
        batch = dict(
            self.processor(text=prompts, images=pages, padding=True, padding_side="left", return_tensors="pt", **extra)
        )
        if self.page_keys is not None and "pixel_values" in batch:
            batch.update(self.page_keys(batch))
        batch[ROW_INDICES] = [index for index, _ in indexed_rows]
        return batch


class _InOrder(torch.utils.data.Dataset):
    """`rows` in `order`, each with its index in `rows`."""

    def __init__(self, rows, order: list[int]):
        self.rows, self.order = rows, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, position):
        index = self.order[position]
        return index, self.rows[index]


def length_order(rows, processor, prompt: Prompt, texts=None) -> list[int]:
    """Row indices, longest prompt first (in tokens, pages counted as one placeholder each), ties in row order: a
    batch of similar lengths pads little, and the longest batch, the one most likely not to fit, comes first.
    `texts`: each row's question (or messages), where reading the rows would decode their pages."""
    tokenizer = processor.tokenizer
    texts = texts if texts is not None else [_text_only(rows[i]) for i in range(len(rows))]
    lengths = [len(tokenizer(prompt_text(processor, prompt, row), add_special_tokens=False).input_ids) for row in texts]
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def _text_only(row: dict) -> dict:
    return {key: value for key, value in row.items() if key != "image"}


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
    workers: int = 0,
    sort_by_length: bool = False,
    texts=None,
    features=None,
) -> list[dict]:
    """Greedy answers to rows (dicts with `image` and `question`, or `messages`: answered after its last user turn),
    batched with left padding; generation stops where the model's family closes a turn, or at the end of sequence.

    `workers`: DataLoader workers that decode and process the next batches while this one generates (0: here).
    `sort_by_length`: batch rows of similar prompt length together (length_order; `texts` spares reading pages for
    it). `features`: a vision feature cache (docvlm.speedups.feature_store.FeatureCache) that the model's frozen tower
    reads pages from and stores them in (docvlm.speedups.frozen_tower), so that a page asked about again, by another
    question or another pass, is not run through the tower again. Answers do not depend on any of these.

    Returns one dict per row, in the rows' order: the answer text and whether the model stopped by itself.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from docvlm.speedups.feature_store import PAGE_DIGESTS, PAGE_FEATURES

    tokenizer = processor.tokenizer
    stop_ids = family_of_processor(processor).stop_ids(tokenizer, processor.chat_template)
    device = next(p for p in model.parameters()).device
    order = length_order(rows, processor, prompt, texts) if sort_by_length else list(range(len(rows)))
    # each batch's page digests, and a disk cache's features of pages it holds, read in the workers
    page_keys = features.page_keys(model.config.vision_config.patch_size) if features is not None else None
    loader = torch.utils.data.DataLoader(
        _InOrder(rows, order),
        batch_size=batch_size,
        collate_fn=AnswerBatches(processor, prompt, page_keys),
        num_workers=workers,
    )
    was_training = model.training
    model.eval()
    answers: list[dict | None] = [None] * len(rows)
    quiet = not PartialState().is_local_main_process  # one progress bar a machine under multi-process launches
    if features is not None:
        features.serving = True
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", disable=quiet, leave=leave):
            indices = batch.pop(ROW_INDICES)
            if features is not None:
                features.expect(batch.pop(PAGE_DIGESTS, None), batch.pop(PAGE_FEATURES, None))
            inputs = {k: v.to(device) for k, v in batch.items()}
            with autocast_for(model):
                generated = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop_ids,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
            for index, row in zip(indices, generated[:, inputs["input_ids"].shape[1] :].tolist(), strict=True):
                answers[index] = _answer(row, stop_ids, tokenizer)
    finally:
        if features is not None:
            features.serving = False
        model.train(was_training)
    return answers


def _answer(tokens: list[int], stop_ids: list[int], tokenizer) -> dict:
    """A row's generated tokens as its answer, cut at the first stop token."""
    stopped = any(t in stop_ids for t in tokens)
    if stopped:
        tokens = tokens[: min(tokens.index(t) for t in stop_ids if t in tokens)]
    return {"answer": tokenizer.decode(tokens, skip_special_tokens=True).strip(), "stopped": stopped}


class _Rows:
    """The eval split's rows, their pages decoded batch by batch (a decoded scan is large: never all at once)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]
