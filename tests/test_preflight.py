"""Checks before the model loads: held-out answers against eval_max_new_tokens, rows against max_length."""

import pytest
from datasets import Dataset

from docvlm.collator import DocVQACollator
from docvlm.config import UserError
from docvlm.preflight import check_row_lengths, long_answers


def test_answers_longer_than_the_generation_budget_are_counted(processor):
    address = "1234 Long Industrial Park Road, Suite 500, Springfield Heights, Illinois 62704, United States"
    rows = Dataset.from_dict({"answers": [[address], ["12"], [address, "short"], [], [address]]})
    warning = long_answers(processor.tokenizer, rows, max_new_tokens=8)
    # the second has a short answer, the third accepts a short one, the fourth has none to generate
    assert warning.startswith("2 of 5 held-out answers are longer than eval_max_new_tokens (8 tokens)")
    needed = len(processor.tokenizer(address, add_special_tokens=False)["input_ids"]) + 1
    assert f"set eval_max_new_tokens: {needed}" in warning
    assert long_answers(processor.tokenizer, rows, max_new_tokens=needed) is None


def test_rows_longer_than_max_length_stop_before_the_model_loads(processor, tiny_dataset_path):
    from docvlm.config import DataArguments
    from docvlm.data import load_splits

    train, _ = load_splits(DataArguments(dataset_name=tiny_dataset_path, max_train_samples=10))
    collator = DocVQACollator(processor, "Answer briefly.", None, "first")
    lengths = collator.lengths([train[i] for i in range(10)])
    check_row_lengths(collator, train, max(lengths), "train")  # every row fits: nothing to say
    limit = sorted(lengths)[4]
    over = sum(n > limit for n in lengths)
    with pytest.raises(
        UserError, match=f"{over} of 10 sampled rows of split 'train' are longer than max_length={limit}"
    ):
        check_row_lengths(collator, train, limit, "train")
