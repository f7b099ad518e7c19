"""Every family recipe on its real architecture (random weights), a few steps each on one GPU: samples/s, MFU and
peak reserved memory against the 16 GB card the recipes promise (`make bench FAMILIES=1`).

    python -m benchmarks.families                                  # every architecture, smallest first
    python -m benchmarks.families --models smolvlm-2b llava-1.5-7b --steps 3

Each model is built, measured through `benchmarks.bench` (its recipe exactly as users run it) and deleted before
the next, so that the largest, not the sum, has to fit on the machine's disk."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from benchmarks import architectures, bench

SIXTEEN_GB_CARD_GIB = 15.0  # what a recipe for one 16 GB card may reserve at its peak, with a margin


def smallest_first() -> list[str]:
    return sorted(architectures.ARCHITECTURES, key=lambda name: architectures.ARCHITECTURES[name].parameters)


def fits(result: dict) -> str:
    if "peak_reserved_gib" not in result:
        return "-"
    return "yes" if result["peak_reserved_gib"] <= SIXTEEN_GB_CARD_GIB else "no"


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| model | recipe | samples/s | s/step | MFU | peak reserved GiB | fits 15 GiB | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in rows.items():
        recipe = architectures.ARCHITECTURES[name].recipe
        if "error" in result:
            lines.append(f"| {name} | {recipe} | {result['error']} | | | | | |")
            continue
        mfu = f"{100 * result['mfu']:.1f}%" if "mfu" in result else "-"
        loss = f"{result['first_loss']:.3f} → {result['last_loss']:.3f}" if result.get("first_loss") else "-"
        lines.append(
            f"| {name} | {recipe} | {result['samples_per_s']:.2f} | {result['s_per_step']:.2f} | {mfu} | "
            f"{result.get('peak_reserved_gib', float('nan')):.2f} | {fits(result)} | {loss} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.families",
        description="Train every family recipe for a few steps on its real architecture (random weights) on one "
        "GPU and report samples/s, MFU and peak reserved memory (docs/benchmarks.md).",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(architectures.ARCHITECTURES),
        default=smallest_first(),
        metavar="MODEL",
        help=f"architectures to run, in this order (default: all, smallest first: {' '.join(smallest_first())})",
    )
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps timed after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps run before timing starts")
    parser.add_argument("--pages", type=int, default=24, help="synthetic 1700 x 2200 pages to render")
    parser.add_argument("--out", default="outputs/bench-families", help="folder for families.json and families.md")
    parser.add_argument("--keep-models", action="store_true", help="keep each built model in the bench cache")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    for name in args.models:
        recipe = architectures.ARCHITECTURES[name].recipe
        started = time.perf_counter()
        common = ["--model", name, "--pages", str(args.pages), "--steps", str(args.steps)]
        code = bench.main([*common, "--warmup", str(args.warmup), "--out", str(out / name), "--setups", recipe])
        report = out / name / "bench.json"
        if code == 2 or not report.exists():
            return code or 1  # bench refused (no GPU): it said why
        rows[name] = json.loads(report.read_text())["results"][recipe]
        rows[name]["total_s"] = time.perf_counter() - started
        if not args.keep_models:
            shutil.rmtree(bench.cache_dir() / f"{name}-random", ignore_errors=True)
        (out / "families.json").write_text(json.dumps(rows, indent=2))
        print("\n" + table(rows), flush=True)
    gpu = next((r["gpu"] for r in rows.values() if "gpu" in r), "CPU")
    (out / "families.md").write_text(f"{gpu}, {time.strftime('%Y-%m-%d')}\n\n{table(rows)}\n")
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
