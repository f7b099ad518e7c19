"""Checks before the model loads: held-out answers against eval_max_new_tokens (rows: tests/data/test_checks.py)."""

from datasets import Dataset

from docvlm.data.preflight import long_answers


def test_answers_longer_than_the_generation_budget_are_counted(processor):
    address = "1234 Long Industrial Park Road, Suite 500, Springfield Heights, Illinois 62704, United States"
    rows = Dataset.from_dict({"answers": [[address], ["12"], [address, "short"], [], [address]]})
    warning = long_answers(processor.tokenizer, rows, max_new_tokens=8)
    # the second has a short answer, the third accepts a short one, the fourth has none to generate
    assert warning.startswith("2 of 5 held-out answers are longer than eval_max_new_tokens (8 tokens)")
    needed = len(processor.tokenizer(address, add_special_tokens=False)["input_ids"]) + 1
    assert f"set eval_max_new_tokens: {needed}" in warning
    assert long_answers(processor.tokenizer, rows, max_new_tokens=needed) is None
