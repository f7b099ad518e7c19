"""`make bench FAMILIES=1` (benchmarks/families.py) on the CPU: its refusal and its table."""

import torch

from benchmarks import families


def test_without_a_gpu_it_stops_with_the_benchs_reason(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert families.main(["--models", "granite-docling-258m", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_the_table_says_which_recipe_fits_a_16_gb_card_and_which_failed():
    measured = dict(samples_per_s=4.0, s_per_step=4.0, mfu=0.2, first_loss=12.0, last_loss=11.0)
    rows = {
        "smolvlm-2b": {**measured, "peak_reserved_gib": 14.2},
        "llava-1.5-7b": {**measured, "peak_reserved_gib": 17.5},
        "gemma3-4b": {"error": "exit status 1"},
    }
    lines = {line.split(" | ")[0].strip("| "): line for line in families.table(rows).splitlines()[2:]}
    assert "| 20.0% | 14.20 | yes |" in lines["smolvlm-2b"]
    assert "| 17.50 | no |" in lines["llava-1.5-7b"]
    assert "exit status 1" in lines["gemma3-4b"]


def test_the_smallest_model_runs_first():
    order = families.smallest_first()
    assert order[0] == "granite-docling-258m" and order[-1] == "qwen2.5-vl-7b"
