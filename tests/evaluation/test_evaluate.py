import json

import pytest

from docvlm.evaluation.metrics import anls, exact_match, levenshtein, normalize, question_only_baseline, summarize
from docvlm.evaluation.report import loss_figure, plot_loss, terminal_summary


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("$56.78", ["$56.78"], 1.0),  # exact match
        ("TOTAL DUE", ["total due"], 1.0),  # case only
        ("  Hugo   Müller ", ["hugo müller"], 1.0),  # whitespace is collapsed
        ("12/08/2026", ["12/03/2026"], 0.9),  # near miss: 1 edit in 10 -> 1 - 0.1
        ("$12.5", ["$12.50"], 1 - 1 / 6),  # near miss: 1 edit in 6
        ("17", ["42"], 0.0),  # miss: NL = 1
        ("abxy", ["abcd"], 0.0),  # NL = 0.5 exactly is not < 0.5
        ("abcy", ["abcd"], 0.75),  # NL = 0.25
        ("12.50", ["$12.50", "12.50"], 1.0),  # several gold answers: the best one counts
        ("$12.5", ["nope", "$12.50"], 1 - 1 / 6),
        ("", ["abc"], 0.0),  # empty prediction
        ("abc", "abc", 1.0),  # a single gold string
    ],
)
def test_anls_hand_worked(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected)


def test_exact_match_and_helpers():
    assert exact_match(" hugo MÜLLER", ["Hugo Müller"]) == 1.0
    assert exact_match("Hugo", ["Hugo Müller"]) == 0.0
    assert normalize("  A \t b\nC ") == "a b c"
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3


def test_question_only_baseline_uses_no_image():
    guess = question_only_baseline(["What is the date?", "What is the date?", "Who?"], [["1 JAN"], ["1 JAN"], "Bo"])
    assert guess("what is the  date?") == "1 JAN" and guess("Who?") == "Bo" and guess("unseen") == "1 JAN"


def test_summary_by_system_and_group():
    items = [
        {
            "before_anls": 0.0,
            "before_em": 0.0,
            "after_anls": 1.0,
            "after_em": 1.0,
            "after_stopped": True,
            "group": "date",
        },
        {
            "before_anls": 0.5,
            "before_em": 0.0,
            "after_anls": 0.5,
            "after_em": 0.0,
            "after_stopped": False,
            "group": "name",
        },
    ]
    summary = summarize(items, ["before", "after"])
    assert summary["count"] == 2
    assert summary["systems"]["before"]["anls"] == 0.25 and summary["systems"]["after"]["anls"] == 0.75
    assert summary["systems"]["after"]["stopped"] == 0.5
    assert summary["systems"]["after"]["anls_by_group"] == {"date": 1.0, "name": 0.5}


def test_loss_plot(tmp_path):
    state = tmp_path / "trainer_state.json"
    assert not plot_loss(state, tmp_path / "loss.png")
    state.write_text(
        json.dumps({"log_history": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5}]})
    )
    assert plot_loss(state, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_figure_is_log_scaled_and_shows_eval_points():
    history = [{"step": s, "loss": 10.0 / s} for s in range(1, 101)] + [{"step": 50, "eval_loss": 0.3}]
    fig = loss_figure(history)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"  # a fall from 10 to 0.1 stays readable over the whole run
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["train loss", "eval loss"]
    assert list(ax.get_lines()[1].get_xdata()) == [50]
    assert loss_figure([{"step": 1, "eval_loss": 1.0}]) is None


def test_terminal_summary_is_plain_text_with_the_report_path(tmp_path):
    summary = summarize(
        [{"before_anls": 0.0, "before_em": 0.0, "after_anls": 1.0, "after_em": 1.0, "after_stopped": True}],
        ["before", "after"],
    )
    text = terminal_summary(summary, {"dataset": "d", "split": "test"}, tmp_path)
    assert "![" not in text and "|" not in text
    assert "after (base + adapter)" in text and "ANLS 1.000" in text and "stopped 100%" in text
    assert text.splitlines()[-1] == f"Full report: {tmp_path / 'report.md'}"
