"""A whole DocVQA fine-tune's time from its speeds: training, the cache's fill, and the before/after evaluation."""

import pytest

from docvlm.flops import CARDS
from docvlm.projection import DOCVQA, project, questions_per_second, tower_seconds_a_page

CALIBRATION = {"decode_step_seconds": 0.05, "decode_traffic_over_weights": 6.0, "fill_fraction_of_peak": 0.2}


def test_each_part_is_its_count_over_its_speed():
    whole = project(samples_per_s=10.0, fill_seconds_a_page=0.03, questions_per_s=4.0)
    assert whole.training_hours == pytest.approx(2 * 39_463 / 10.0 / 3600)
    assert whole.fill_hours == pytest.approx(10_194 * 0.03 / 3600)
    assert whole.evaluation_hours == pytest.approx(2 * 5_349 / 4.0 / 3600)  # before and after
    assert whole.total_hours == pytest.approx(whole.training_hours + whole.fill_hours + whole.evaluation_hours)
    alone = project(10.0, 0.03, 4.0, compare_base=False)
    assert alone.evaluation_hours == pytest.approx(whole.evaluation_hours / 2)
    line = whole.line()
    assert line.startswith(f"a whole DocVQA fine-tune ~{whole.total_hours:.1f} h") and "10,194 pages" in line
    bare = project(10.0)  # no cache, no evaluation measured: neither is counted or named
    assert bare.total_hours == pytest.approx(bare.training_hours) and "fill" not in bare.line()
    assert "evaluation" not in bare.line() and DOCVQA.epochs == 2


def test_decoding_pays_a_step_per_token_whatever_the_batch_and_waits_on_memory():
    h100, t4 = CARDS["h100-80gb"], CARDS["t4-16gb"]
    weights = 5e9
    step = 0.05 + 6.0 * weights / (h100.bandwidth_gb_s * 1e9)
    assert questions_per_second(weights, 8, 32, h100, CALIBRATION) == pytest.approx(8 / (32 * step))
    assert questions_per_second(weights, 16, 32, h100, CALIBRATION) == pytest.approx(
        2 * questions_per_second(weights, 8, 32, h100, CALIBRATION)
    )
    assert questions_per_second(weights, 8, 32, t4, CALIBRATION) < questions_per_second(
        weights, 8, 32, h100, CALIBRATION
    )


def test_the_fill_runs_the_tower_at_a_share_of_the_cards_peak(tiny_model_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_path)
    h100, a100 = CARDS["h100-80gb"], CARDS["a100-80gb"]
    fast = tower_seconds_a_page(config, 256, h100, CALIBRATION)
    assert fast > 0
    assert tower_seconds_a_page(config, 256, a100, CALIBRATION) == pytest.approx(
        fast * h100.peak_tflops / a100.peak_tflops
    )
    assert tower_seconds_a_page(config, 512, h100, CALIBRATION) > 2 * fast  # attention grows with the square
