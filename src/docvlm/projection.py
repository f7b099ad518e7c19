"""The time of a whole DocVQA fine-tune at given speeds: training over its questions for the recipe's epochs, the
feature cache's fill over its pages, and the before/after evaluation over the validation questions. `make bench`
projects it from measured speeds, `docvlm plan` from predicted ones."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WholeRun:
    """A dataset's sizes, as a whole fine-tune and its evaluation meet them."""

    name: str
    train_questions: int
    train_pages: int
    eval_questions: int
    eval_pages: int
    epochs: int = 2


# DocVQA's train and validation splits (Mathew et al., 2021): several questions a page
DOCVQA = WholeRun("DocVQA", train_questions=39_463, train_pages=10_194, eval_questions=5_349, eval_pages=1_286)


@dataclass(frozen=True)
class Projection:
    """Hours of each part of a whole run; `evaluation_hours` is None where no generation speed was given."""

    run: WholeRun
    training_hours: float
    fill_hours: float
    evaluation_hours: float | None

    @property
    def total_hours(self) -> float:
        return self.training_hours + self.fill_hours + (self.evaluation_hours or 0.0)

    def parts(self) -> list[str]:
        """Each part's hours, with what it goes over."""
        run = self.run
        parts = [f"training {self.training_hours:.2f} h ({run.epochs} x {run.train_questions:,} questions)"]
        if self.fill_hours:
            parts.append(f"feature cache fill {self.fill_hours:.2f} h ({run.train_pages:,} pages)")
        if self.evaluation_hours is not None:
            parts.append(
                f"evaluation {self.evaluation_hours:.2f} h ({run.eval_questions:,} questions, before and after)"
            )
        return parts

    def line(self) -> str:
        """One line: the total and its parts."""
        return f"a whole {self.run.name} fine-tune ~{self.total_hours:.1f} h: {', '.join(self.parts())}"


def project(
    samples_per_s: float,
    fill_seconds_a_page: float = 0.0,
    questions_per_s: float | None = None,
    run: WholeRun = DOCVQA,
    compare_base: bool = True,
) -> Projection:
    """A whole run at `samples_per_s` training samples a second, `fill_seconds_a_page` for each training page's
    features (0: no cache), and `questions_per_s` answers generated a second (each pass counted); `compare_base`:
    the evaluation answers every question twice, with the adapter and without it."""
    training = run.epochs * run.train_questions / samples_per_s
    fill = run.train_pages * fill_seconds_a_page
    evaluation = None
    if questions_per_s:
        evaluation = (2 if compare_base else 1) * run.eval_questions / questions_per_s / 3600
    return Projection(run, training / 3600, fill / 3600, evaluation)


def tower_seconds_a_page(config, patches: float, card, calibration: dict) -> float:
    """The feature cache's fill, a page: the tower's forward FLOPs at the calibrated share of the card's peak."""
    from docvlm.flops import counted_training_flops

    shapes = {"tokens": 0, "causal_pairs": 0, "pages": 1, "patches": patches, "patch_pairs": patches * patches}
    flops = counted_training_flops(config, shapes, tower_runs=True)
    return flops / (calibration["fill_fraction_of_peak"] * card.peak_tflops * 1e12)


def questions_per_second(weight_bytes: float, batch: int, new_tokens: int, card, calibration: dict) -> float:
    """Answers a second of greedy decoding `batch` questions at a time for `new_tokens` tokens each (an answer that
    never stops: the slowest case): each token step costs a fixed host time plus the weights' memory traffic at the
    card's bandwidth (a 4-bit weight is dequantized, written and read again), whatever the batch. Prefill and the
    tower are left out: one step each, beside `new_tokens`."""
    traffic = calibration["decode_traffic_over_weights"] * weight_bytes / (card.bandwidth_gb_s * 1e9)
    return batch / (new_tokens * (calibration["decode_step_seconds"] + traffic))
