"""The evaluation report: predictions.jsonl, report.json, report.md with the loss plot, and the terminal summary."""

from __future__ import annotations

import json
from pathlib import Path

from docvlm.conversations import as_answers
from docvlm.evaluation.card import held_out_units, small_held_out_note


def loss_figure(log_history: list[dict]):
    """Train (and eval) loss against step, or None when nothing was logged.

    The loss falls by orders of magnitude from a random model's, so the y axis is logarithmic: on a linear one the
    whole second half of a run is a flat line at the bottom."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o", label="eval loss", markersize=5)
    if all(loss > 0 for _, loss in train + evals):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)" if ax.get_yscale() == "log" else "loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_loss(trainer_state: Path, out_png: Path) -> bool:
    """loss.png from trainer_state.json; False when there is nothing to plot."""
    if not trainer_state.is_file():
        return False
    fig = loss_figure(json.loads(trainer_state.read_text()).get("log_history", []))
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(out_png)
    plt.close(fig)
    return True


SYSTEM_TITLES = {
    "blind": "question-only guess (no image)",
    "before": "before (base model)",
    "after": "after (base + adapter)",
}


def write_report(out_dir: Path, items: list[dict], summary: dict, meta: dict) -> str:
    """predictions.jsonl, report.json and report.md (with the loss plot when there is a trainer_state.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.jsonl", "w") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    report = {**meta, **summary}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))

    lines = [
        f"# Evaluation: {meta.get('recipe', '')}",
        "",
        f"{summary['count']} held-out questions from `{meta.get('dataset')}` (split `{meta.get('split')}`), "
        f"model `{meta.get('model')}`, adapter `{meta.get('adapter')}`{adapter_step_text(meta)}.",
        *data_lines(meta, summary["count"]),
        "",
        "| system | ANLS | exact match | stopped at end of answer |",
        "|---|---|---|---|",
    ]
    for system, scores in summary["systems"].items():
        stopped = f"{scores['stopped']:.0%}" if "stopped" in scores else "-"
        lines.append(
            f"| {SYSTEM_TITLES.get(system, system)} | {scores['anls']:.3f} | {scores['exact_match']:.3f} | {stopped} |"
        )
    systems = summary["systems"]
    if "after" in systems and ({"before", "blind"} & set(systems)):
        gains = [
            f"**{systems['after']['anls'] - systems[other]['anls']:+.3f}** over {title}"
            for other, title in (("before", "the base model"), ("blind", "the question-only guess"))
            if other in systems
        ]
        lines += ["", f"ANLS gain: {'; '.join(gains)}."]
    grouped = [s for s in systems if "anls_by_group" in systems[s]]
    if grouped:
        groups = sorted(systems[grouped[0]]["anls_by_group"])
        lines += ["", "ANLS by group:", "", "| group | " + " | ".join(grouped) + " |", "|---|" + "---|" * len(grouped)]
        for g in groups:
            lines.append(
                f"| {g} | " + " | ".join(f"{systems[s]['anls_by_group'].get(g, 0):.3f}" for s in grouped) + " |"
            )
    lines += [
        "",
        f"Generation: {meta['seconds']:.1f} s for {meta['generated']} answers "
        f"({meta['generated'] / max(meta['seconds'], 1e-9):.2f} examples/s) on {meta['device']}.",
    ]
    if plot_loss(out_dir / "trainer_state.json", out_dir / "loss.png"):
        lines += ["", "![training loss](loss.png)"]
    examples = items[:5]
    if examples:
        lines += [
            "",
            "Examples:",
            "",
            "| question | gold | " + " | ".join(summary["systems"]) + " |",
            "|---|---|" + "---|" * len(summary["systems"]),
        ]
        for item in examples:
            cells = [item["question"], " / ".join(as_answers(item["answers"]))] + [
                str(item.get(s, "")) for s in summary["systems"]
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(text)
    return text


def adapter_step_text(meta: dict) -> str:
    """' (step 100, the best eval_anls 0.62)' when the adapter is a best checkpoint's, else ' (step N)'."""
    if "adapter_step" not in meta:
        return ""
    best = meta.get("best_metric")
    if best:
        ((metric, value),) = best.items()
        return f" (step {meta['adapter_step']}: the best evaluation by {metric}, {value:.3f})"
    return f" (step {meta['adapter_step']})"


def data_lines(meta: dict, count: int) -> list[str]:
    """What report.md says of the held-out pages and the skipped rows (from data_report.json's counts)."""
    lines = []
    held = (meta.get("data") or {}).get("held_out")
    if held:
        lines += [
            "",
            f"Held out by eval_split_size: {held_out_units(held)} of {held['units']}, with their "
            f"{held['held_out_questions']} questions, none of them trained on; data_report.json lists them.",
        ]
    skipped = (meta.get("skipped") or {}).get("by_reason") or {}
    if skipped:
        listed = ", ".join(f"{entry['count']} {reason}" for reason, entry in skipped.items())
        lines += ["", f"Skipped before training: {listed} (data_report.json lists every row)."]
    note = small_held_out_note(count)
    return lines + (["", f"**{note}**"] if note else [])


def terminal_summary(summary: dict, meta: dict, out_dir: Path) -> str:
    """The report's headline for the terminal: plain aligned text, with the full report's path."""
    lines = [
        f"Evaluation: {summary['count']} held-out questions from {meta.get('dataset')} (split {meta.get('split')})"
    ]
    for system, scores in summary["systems"].items():
        stopped = f"  stopped {scores['stopped']:.0%}" if "stopped" in scores else ""
        title = SYSTEM_TITLES.get(system, system)
        lines.append(f"  {title:<32} ANLS {scores['anls']:.3f}  exact match {scores['exact_match']:.3f}{stopped}")
    lines.append(f"Full report: {Path(out_dir) / 'report.md'}")
    return "\n".join(lines)


def report_meta(data_args, model_args, adapter_dir: Path, recipe: str) -> dict:
    """What the report says it evaluated; `recipe` is the recipe the command was given."""
    return {
        "recipe": recipe,
        "model": model_args.model_name_or_path,
        "dataset": data_args.dataset_name,
        "split": data_args.dataset_test_split,
        "adapter": Path(adapter_dir).as_posix(),
    }
