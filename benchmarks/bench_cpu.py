"""`make bench-cpu`: the embedded default on the CPU, alone and beside one busy process, under each OpenMP wait policy.

    python -m benchmarks.bench_cpu [--steps 40] [--eval_samples 40] [--out outputs/bench_cpu.json]

Each run is a fresh `python -m docvlm.train` of recipes/tiny_docvqa.yaml for a few steps, then the generation
evaluation on a few held-out pages; the figures are the trainer's train_runtime and the report's generation time.
"default" is OpenMP's own policy (threads spin a while at every barrier), "passive" what docvlm sets on machines
without a GPU (docvlm.runtime). Timings are only meaningful on an otherwise idle machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# An empty OMP_WAIT_POLICY is one docvlm leaves alone and OpenMP ignores: OpenMP's default policy.
POLICIES = {"default": "", "passive": "PASSIVE"}
BUSY_LOOP = "while True: pass"


def run_once(policy: str, busy: bool, steps: int, eval_samples: int, workdir: Path) -> dict:
    out = workdir / f"{policy}-{'busy' if busy else 'idle'}"
    command = [sys.executable, "-m", "docvlm.train", "--config", "recipes/tiny_docvqa.yaml", "--output_dir", str(out)]
    command += ["--max_steps", str(steps), "--save_strategy", "no", "--report_to", "none"]
    command += ["--max_eval_samples", str(eval_samples), "--eval_compare_base", "false"]
    env = {**os.environ, "OMP_WAIT_POLICY": POLICIES[policy]}
    hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    train = json.loads((out / "train_results.json").read_text())
    report = json.loads((out / "report.json").read_text())
    return {
        "policy": policy,
        "load": "busy" if busy else "idle",
        "train_s": round(train["train_runtime"], 2),
        "generation_s": round(report["seconds"], 2),
        "process_s": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps a run (default: 40)")
    parser.add_argument("--eval_samples", type=int, default=40, help="held-out pages answered a run (default: 40)")
    parser.add_argument("--out", default="outputs/bench_cpu.json", help="where the figures are written as JSON")
    args = parser.parse_args(argv)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs (busy machines give noisy figures)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in POLICIES:
            for busy in (False, True):
                rows.append(run_once(policy, busy, args.steps, args.eval_samples, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| policy | train idle s | train busy s | slowdown | generation idle s | generation busy s | slowdown |")
    print("|---|---|---|---|---|---|---|")
    for policy in POLICIES:
        idle, busy = (next(r for r in rows if r["policy"] == policy and r["load"] == load) for load in ("idle", "busy"))
        print(
            f"| {policy} | {idle['train_s']} | {busy['train_s']} | {busy['train_s'] / idle['train_s']:.2f}x "
            f"| {idle['generation_s']} | {busy['generation_s']} | {busy['generation_s'] / idle['generation_s']:.2f}x |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "eval_samples": args.eval_samples, "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
