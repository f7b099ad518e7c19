"""`make bench EVAL=1`: questions answered a second by the notebook-style loop (one question at a time, as a user
writes it), by `docvlm eval` as it ran before its speed-ups (batches of 8 in row order, pages processed in the
loop, the tower on every page of both passes) and by `docvlm eval` as a recipe sets it, on the same pages and card.

    python -m benchmarks.evaluation                                      # Idefics2-8B, docvqa_qlora, 64 pages
    python -m benchmarks.evaluation --model tiny --recipe tiny_docvqa --pages 16   # a CPU smoke run

The model is the bench's (random weights: it never stops, so every answer is max_new_tokens long) with an adapter
trained for one step by the recipe. Each setup runs in its own child process, so that peak memory never mixes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import bench

# no feature cache (and so no tower waiting in CPU memory for it, which needs the cache)
WITHOUT_CACHE = ("--vision_feature_cache", "off", "--vision_tower_offload", "false")
# docvlm eval as it ran before its speed-ups: what each override turns back
BEFORE_SPEEDUPS = " ".join(
    ("--per_device_eval_batch_size 8 --dataloader_num_workers 0 --eval_sort_by_length false", *WITHOUT_CACHE)
)


def adapter_training_argv(recipe: str, model_dir: str, data_dir: str, out: Path) -> list[str]:
    """The arguments of one optimizer step of the recipe, saving an adapter folder as `docvlm eval` reads it."""
    return [
        *("--config", f"recipes/{recipe}.yaml", "--model_name_or_path", model_dir, "--dataset_name", data_dir),
        *("--output_dir", str(out), "--max_steps", "1", "--eval_after_training", "false", "--save_strategy", "no"),
        *("--report_to", "none", "--group_column", "null", "--dataset_test_split", "train", *WITHOUT_CACHE),
    ]


def train_adapter(recipe: str, model_dir: str, data_dir: str, out: Path) -> None:
    """One optimizer step of the recipe: an adapter folder (adapter, processor, recipe.yaml) as `docvlm eval` reads."""
    from docvlm import train

    train.run(adapter_training_argv(recipe, model_dir, data_dir, out))


def notebook_loop(adapter: Path, data_dir: str, questions: int, max_new_tokens: int) -> dict:
    """The loop a user writes from the notebook's README: for each question, the chat template, the processor and
    `model.generate`, one at a time, with the adapter loaded as `docvlm predict` loads it."""
    import torch
    from datasets import load_dataset

    from docvlm.inference import load_for_inference

    model, processor, _, _ = load_for_inference(adapter=str(adapter))
    rows = load_dataset(data_dir, split="train").select(range(questions))
    device = next(model.parameters()).device
    answers, started = [], time.perf_counter()
    for row in rows:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": bench.SEED_INSTRUCTION},
                    {"type": "image"},
                    {"type": "text", "text": row["query"]["en"]},
                ],
            }
        ]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=text, images=[row["image"]], return_tensors="pt").to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "generated": len(answers), "answers": answers}


def docvlm_eval(adapter: Path, recipe: str, model_dir: str, data_dir: str, questions: int, overrides: str) -> dict:
    """`docvlm eval` as users run it, on the adapter's base and the bench pages; its report's time and answers."""
    from docvlm.evaluation.evaluate import run_eval

    out = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    argv = [
        *("--config", f"recipes/{recipe}.yaml", "--adapter", str(adapter), "--eval_output_dir", str(out)),
        *("--model_name_or_path", model_dir, "--dataset_name", data_dir, "--dataset_test_split", "train"),
        *("--max_eval_samples", str(questions), "--group_column", "null"),
        *("--vision_feature_cache_dir", str(out / "features")),  # a fresh cache: the setup pays for its pages
        *shlex.split(overrides),
    ]
    report = run_eval(argv)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    keys = ("seconds", "generated", "batch_size", "tower_pages_computed", "tower_pages_read")
    return {
        **{key: report[key] for key in keys if key in report},
        "answers": [p["after"] for p in sorted(predictions, key=lambda p: p["row"])],
    }


def child(args) -> None:
    import torch

    adapter = Path(args.adapter)
    if args.child == "notebook":
        result = notebook_loop(adapter, args.data_dir, args.questions, args.max_new_tokens)
    else:
        overrides = BEFORE_SPEEDUPS if args.child == "before" else args.overrides
        result = docvlm_eval(adapter, args.recipe, args.model_dir, args.data_dir, args.questions, overrides)
    result["questions_per_s"] = result["generated"] / result["seconds"]
    if torch.cuda.is_available():
        result["gpu"] = torch.cuda.get_device_name()
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    Path(args.result).write_text(json.dumps(result))


SETUPS = {
    "notebook": "one question at a time, as the notebook's README generates",
    "before": "docvlm eval before its speed-ups (batches of 8 in row order, no workers, no feature cache)",
    "recipe": "docvlm eval as the recipe sets it",
}


def table(results: dict[str, dict]) -> str:
    """One row a setup: questions a second (each pass's answers counted), against `before`, and how many of its
    adapter answers agree with `before`'s on the same questions."""
    before = results.get("before", {})
    lines = [
        "| setup | questions/s | vs docvlm eval before | peak reserved GiB | batch | tower pages computed / read "
        "| answers as before |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{r['questions_per_s'] / before['questions_per_s']:.2f}x" if before.get("questions_per_s") else "-"
        memory = f"{r['peak_reserved_gib']:.2f}" if "peak_reserved_gib" in r else "-"
        tower = f"{r['tower_pages_computed']} / {r['tower_pages_read']}" if "tower_pages_computed" in r else "-"
        same = "-"
        if before.get("answers") and name != "before":
            agree = sum(a == b for a, b in zip(r["answers"], before["answers"], strict=False))
            same = f"{agree} of {len(before['answers'])}"
        batch = str(r.get("batch_size", 1))
        lines.append(f"| {name} | {r['questions_per_s']:.2f} | {ratio} | {memory} | {batch} | {tower} | {same} |")
    return "\n".join(lines)


def whole_run_lines(results: dict[str, dict], training_bench: Path, recipe: str) -> str:
    """A whole DocVQA fine-tune at the training bench's speed and this evaluation's: the notebook's training with
    its one-at-a-time loop, and the recipe's training with `docvlm eval`; empty without a training bench report."""
    from docvlm.families.idefics2 import IDEFICS2

    if not training_bench.is_file():
        return ""
    trained = json.loads(training_bench.read_text())["results"]
    pairs = {"notebook": ("baseline", "notebook"), recipe: (recipe, "recipe")}
    lines = []
    for name, (training, evaluation) in pairs.items():
        speed, answers = trained.get(training, {}), results.get(evaluation, {})
        if "samples_per_s" in speed and "questions_per_s" in answers:
            projection = bench.docvqa_projection(speed, answers["questions_per_s"])
            lines.append(f"- {name}: {projection.line()}")
    if not lines:
        return ""
    lines.append(f"- for comparison, {IDEFICS2.published_docvqa_run}")
    return (
        f"\nA whole DocVQA fine-tune on this card ({training_bench}'s training speeds):\n\n" + "\n".join(lines) + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.evaluation",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Questions answered a second: "
        + "; ".join(f"'{name}': {what}" for name, what in SETUPS.items())
        + ". Same pages, same card; each setup in its own process.",
    )
    parser.add_argument(
        "--model", choices=["8b", "tiny"], default="8b", help="the bench's model (see benchmarks.bench)"
    )
    parser.add_argument("--recipe", default="docvqa_qlora", help="the recipe whose evaluation settings are measured")
    parser.add_argument(
        "--overrides", default="", help="recipe fields for the 'recipe' setup, e.g. '--per_device_eval_batch_size 32'"
    )
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS), help="setups to run")
    parser.add_argument("--pages", type=int, default=64, help="pages (one question each) answered by every setup")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=32,
        help="the notebook loop's answer length (the recipe's eval_max_new_tokens for docvlm eval)",
    )
    parser.add_argument("--out", default="outputs/bench-eval", help="folder for evaluation.json and evaluation.md")
    parser.add_argument(
        "--training-bench",
        default="outputs/bench/bench.json",
        help="a `make bench` report of the same card: with it, a whole DocVQA fine-tune is projected, training, fill "
        "and this evaluation (the notebook's training with its one-at-a-time loop; the recipe's with docvlm eval)",
    )
    for hidden in ("--child", "--result", "--adapter", "--model-dir", "--data-dir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--questions", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    import torch

    if args.model != "tiny" and not torch.cuda.is_available():
        print(
            f"docvlm bench: the {args.model} evaluation benchmark needs a CUDA GPU. For a CPU smoke run of the same "
            "code: python -m benchmarks.evaluation --model tiny --recipe tiny_docvqa --pages 16",
            file=sys.stderr,
        )
        return 2
    model_dir, data_dir = bench.fixtures(args.model, args.pages)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = Path(tempfile.mkdtemp(prefix="bench-eval-adapter-"))
    print("=== one training step for an adapter ===", flush=True)
    code = subprocess.call(
        [
            sys.executable,
            "-c",
            "import sys; from benchmarks.evaluation import train_adapter; "
            "train_adapter(*sys.argv[1:4], __import__('pathlib').Path(sys.argv[4]))",
            args.recipe,
            model_dir,
            data_dir,
            str(adapter),
        ]
    )
    if code != 0:
        print("docvlm bench: training the adapter failed (above).", file=sys.stderr)
        return 1
    results = {}
    for setup in args.setups:
        result_file = out / f"result-{setup}.json"
        command = [
            sys.executable, "-m", "benchmarks.evaluation", "--child", setup, "--result", str(result_file),
            "--adapter", str(adapter), "--model-dir", model_dir, "--data-dir", data_dir, "--recipe", args.recipe,
            "--overrides", args.overrides, "--questions", str(args.pages), "--max-new-tokens", str(args.max_new_tokens),
        ]  # fmt: skip
        print(f"\n=== {setup}: {SETUPS[setup]} ===", flush=True)
        env = dict(os.environ)
        if torch.cuda.device_count() > 1 and "CUDA_VISIBLE_DEVICES" not in env:
            env["CUDA_VISIBLE_DEVICES"] = "0"
        code = subprocess.call(command, env=env)
        results[setup] = (
            json.loads(result_file.read_text())
            if code == 0 and result_file.exists()
            else {"error": f"exit status {code}"}
        )
    gpu = next((r["gpu"] for r in results.values() if "gpu" in r), "CPU")
    text = f"{gpu}, {time.strftime('%Y-%m-%d')}, {args.model}, {args.recipe} {args.overrides}, {args.pages} pages\n\n"
    text += table(results) + "\n"
    text += whole_run_lines(results, Path(args.training_bench), args.recipe)
    (out / "evaluation.json").write_text(json.dumps(results, indent=2))
    (out / "evaluation.md").write_text(text)
    print("\n" + text)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
