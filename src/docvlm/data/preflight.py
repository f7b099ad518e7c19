"""A check on a sample of the held-out answers before the model loads: answers that cannot be generated whole are
announced with counts and the setting that fits, not discovered in the final report. (Every row is checked for
problems that would stop training by docvlm.data.checks.)"""

from __future__ import annotations

import sys

from docvlm.conversations import as_answers

ANSWER_SAMPLE = 2000  # answers are text only: cheap to tokenize


def _spread(count: int, total: int) -> list[int]:
    """`count` row indices spread evenly over `total` rows (the first rows are often alike)."""
    if total <= count:
        return list(range(total))
    return [i * total // count for i in range(count)]


def long_answers(tokenizer, rows, max_new_tokens: int, sample: int = ANSWER_SAMPLE) -> str | None:
    """A warning when held-out answers cannot be generated whole within `eval_max_new_tokens`: they are cut, score
    lower and never count as stopped. None when all fit. The end-of-answer token counts as one."""
    indices = _spread(sample, len(rows))
    answers = rows.select_columns(["answers"]).select(indices)["answers"]
    too_long, longest = 0, 0
    for accepted in answers:
        texts = as_answers(accepted)
        if not texts:
            continue
        shortest = min(len(tokenizer(text.strip(), add_special_tokens=False)["input_ids"]) + 1 for text in texts)
        longest = max(longest, shortest)
        too_long += shortest > max_new_tokens
    if not too_long:
        return None
    checked = "" if len(indices) == len(rows) else f" (of {len(indices)} checked)"
    return (
        f"{too_long} of {len(rows)} held-out answers{checked} are longer than eval_max_new_tokens "
        f"({max_new_tokens} tokens): they will be cut in the evaluation, score lower, and never count as stopped. "
        f"The longest needs {longest} tokens: set eval_max_new_tokens: {longest} to generate them whole."
    )


def warn_long_answers(tokenizer, rows, max_new_tokens: int) -> None:
    """Print long_answers' warning, once under a multi-process launch."""
    from accelerate import PartialState

    warning = long_answers(tokenizer, rows, max_new_tokens)
    if warning and PartialState().is_main_process:
        print(f"docvlm: warning: {warning}", file=sys.stderr)
