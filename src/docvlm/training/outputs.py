"""What a training run leaves in its folder beside the adapter: the recipe as resolved, which step's adapter it is,
and the closing lines that say what was written where."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

SECRETS = ("hub_token", "push_to_hub_token")


def save_resolved_recipe(path: Path, *arg_groups) -> None:
    """Write every field that was in effect, so a run can be reproduced; secrets are never written."""
    import yaml

    resolved = {}
    for group in arg_groups:
        resolved.update(asdict(group))
    for secret in SECRETS:
        resolved.pop(secret, None)
    resolved = json.loads(json.dumps(resolved, default=str))  # enums, dtypes and paths as plain strings
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# The recipe as resolved for this run (YAML + command-line overrides + defaults).\n"
        + yaml.safe_dump(resolved, sort_keys=True)
    )


def adapter_step(trainer) -> dict:
    """Which step's adapter was evaluated: the best evaluation's (load_best_model_at_end) or the last step's."""
    state, args = trainer.state, trainer.args
    if args.load_best_model_at_end and state.best_model_checkpoint:
        step = int(Path(state.best_model_checkpoint).name.split("-")[-1])
        return {"adapter_step": step, "best_metric": {args.metric_for_best_model: state.best_metric}}
    return {"adapter_step": state.global_step}


def where_things_are(output_dir: Path, report_to, page_hint: bool = False) -> str:
    """The last lines of a run: what was written where, and what to run next."""
    lines = [f"Done. Everything is in {output_dir}/:"]
    rows = [  # each file listed only where the run wrote it
        ("adapter", ["adapter_model.safetensors", "adapter_config.json"], ""),
        ("report", ["report.md", "report.json", "predictions.jsonl", "loss.png"], ""),
        ("model card", ["README.md"], ""),
        ("recipe", ["recipe.yaml"], " (as resolved for this run)"),
        ("data", ["data_report.json"], " (rows read, questions made, skipped, held out)"),
    ]
    for title, names, note in rows:
        present = [name for name in names if (output_dir / name).is_file()]
        if present:
            lines.append(f"  {title:<12} {', '.join(present)}{note}")
    if "tensorboard" in (report_to or []) and (output_dir / "runs").is_dir():
        lines.append(f"  {'TensorBoard':<12} tensorboard --logdir {output_dir / 'runs'}")
    if (output_dir / "adapter_config.json").is_file():
        lines.append(f'Next: docvlm predict --adapter {output_dir} --image <page.png> --question "..."')
        if page_hint:
            lines.append("      (`docvlm fixtures --export-pages pages/` writes held-out pages of this dataset to try)")
    return "\n".join(lines)
