"""`packed_rows`: each training batch's rows packed into one sequence without padding, each row's positions starting
at 0 again and its pages listed in order. transformers' attention then keeps each row to itself (a block-diagonal
causal mask found from the positions, or flash attention's varlen kernel), so the loss and the gradients are the
padded batch's while the decoder computes no padding token. TRL packs text rows only and refuses images (its own
`padding_free`), hence this module."""

from __future__ import annotations

import torch

from docvlm.speedups.base import WITH_TRAINER, Setting, Switch

PAGE_KEYS = ("pixel_values", "pixel_attention_mask")  # (rows, pages, ...): listed as one row's pages
ROW_KEYS = ("input_ids", "labels")  # (rows, tokens): the real tokens of each row, one after another


def pack_rows(batch: dict) -> dict:
    """The batch as one packed row: input_ids, labels and position_ids of shape (1, real tokens), and the pages of
    every row as one row's. A key this does not know how to pack is refused rather than passed on unpacked."""
    unknown = set(batch) - {*PAGE_KEYS, *ROW_KEYS, "attention_mask"}
    if unknown:
        raise RuntimeError(f"packed_rows cannot pack the batch's {', '.join(sorted(unknown))}.")
    real = batch["attention_mask"].bool()
    lengths = real.sum(dim=1)
    if not bool((real == (torch.arange(real.shape[1]) < lengths[:, None])).all()):
        raise RuntimeError("packed_rows needs right-padded rows: padding after each row's tokens.")
    lengths = lengths.tolist()
    packed = {key: batch[key][real][None] for key in ROW_KEYS}
    packed["position_ids"] = torch.cat([torch.arange(length) for length in lengths])[None]
    for key in PAGE_KEYS:
        if key in batch:
            packed[key] = batch[key].flatten(0, 1)[None]
    return packed


def without_cache_by_default(model) -> None:
    """Let the model build no KV cache unless asked (generation asks): transformers finds packed rows from the
    positions only where no cache is passed, and a model whose config says `use_cache` makes one even in
    training, whose attention then spans the packed rows."""
    model.config.use_cache = False


class PackedRows:
    """A collator whose batches are packed (pack_rows), made in the DataLoader's workers."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, rows):
        return pack_rows(self.collate(rows))

    def __getattr__(self, name):  # the wrapped collator's attributes (never its own, while unpickling in a worker)
        if name == "collate":
            raise AttributeError(name)
        return getattr(self.collate, name)


def _apply(run) -> bool:
    without_cache_by_default(run.trainer.model)
    run.trainer.data_collator = PackedRows(run.trainer.data_collator)
    return True


SWITCH = Switch(
    settings=(
        Setting(
            "packed_rows",
            bool,
            False,
            "Pack each batch's rows into one sequence without padding (positions restart at each row, attention stays "
            "within it). Same loss; refused by families whose batches cannot be packed.",
        ),
    ),
    is_on=lambda args: bool(args.packed_rows),
    lacks="batch layout to pack",
    family_hook="packs_rows",
    apply={WITH_TRAINER: _apply},
)
