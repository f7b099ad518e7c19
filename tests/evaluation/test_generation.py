"""Greedy generation: the faster path (pages processed in workers, rows batched by length, each page through the tower
once) gives today's answers, in the rows' order."""

import pytest
import torch

from docvlm.evaluation.generation import generate, length_order
from docvlm.prompts import Prompt

PROMPT = Prompt("Answer briefly.")


@pytest.fixture(scope="module")
def model_and_rows(tiny_model_path, tiny_dataset_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from docvlm.data import load_splits
    from docvlm.recipe.schema import DataArguments

    _, test = load_splits(DataArguments(dataset_name="docvlm:tiny-docs"))
    rows = [test[i] for i in range(8)]
    rows[3] = {**rows[3], "question": rows[3]["question"] + " Give the full value as written on the page, please."}
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_model_path), rows


def one_at_a_time(model, processor, rows):
    """The answers of the plainest loop: each row alone, no padding."""
    return [generate(model, processor, [row], PROMPT, 8, 1)[0] for row in rows]


def test_length_order_puts_the_longest_prompt_first_and_keeps_ties_in_order(model_and_rows):
    _, processor, rows = model_and_rows
    order = length_order(rows, processor, PROMPT)
    assert order[0] == 3 and sorted(order) == list(range(len(rows)))
    texts = [{"question": row["question"]} for row in rows]
    assert length_order(None, processor, PROMPT, texts=texts) == order  # from the text alone, no page decoded


def test_sorted_batches_in_workers_give_the_same_answers_in_the_rows_order(model_and_rows):
    model, processor, rows = model_and_rows
    want = one_at_a_time(model, processor, rows)
    assert len({a["answer"] for a in want}) > 1  # answers that differ by row: a misplaced one would show
    today = generate(model, processor, rows, PROMPT, 8, 4)
    faster = generate(model, processor, rows, PROMPT, 8, 3, workers=2, sort_by_length=True)
    assert [a["answer"] for a in today] == [a["answer"] for a in want]
    assert faster == today


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_a_feature_cache_runs_each_page_through_the_tower_once(model_and_rows, mode, tmp_path):
    from docvlm.speedups.feature_store import FeatureCache, tower_identity
    from docvlm.speedups.frozen_tower import frozen_vision_without_grad
    from docvlm.speedups.model_parts import vision_tower

    model, processor, rows = model_and_rows
    today = generate(model, processor, rows, PROMPT, 8, 4)
    tower = vision_tower(model)
    unpatched_forward, calls = tower.forward, []

    def counted(pixel_values, **kwargs):  # the tower's own computation, under the patch
        calls.append(pixel_values.shape[0])
        return unpatched_forward(pixel_values=pixel_values, **kwargs)

    cache = FeatureCache(mode, tmp_path, tower_identity(tower), 2**30)
    try:
        tower.forward = counted
        assert frozen_vision_without_grad(model, pages_per_chunk=2, cache=cache)
        first = generate(model, processor, rows, PROMPT, 8, 3, sort_by_length=True, features=cache)
        computed = sum(calls)
        cache.flush()  # on disk: the second pass reads whole batches in the collator
        second = generate(model, processor, rows + rows[:2], PROMPT, 8, 4, features=cache)  # another pass
    finally:
        tower.forward = unpatched_forward
    assert first == today and second == today + today[:2]
    assert computed == len(rows) and cache.misses == len(rows) and max(calls) <= 2  # each page once, 2 at a time
    assert sum(calls) == computed and cache.hits == len(rows) + 2  # the second pass read them all
    assert not cache.serving  # generation's hold on the cache ends with it
