"""The `docvlm` command: one entry point for the package's jobs.

Only the standard library is imported at the top: torch, transformers and TRL take seconds to import, and `--help`
or a usage error should answer at once. Each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from docvlm.errors import UserError

USAGE = """docvlm <command> [args]

commands:
  train     fine-tune from a recipe (same as python -m docvlm.train); `docvlm train --help` lists every field
  eval      ANLS / exact match before and after fine-tuning: docvlm eval --config <recipe> [--adapter DIR]
  predict   answer questions about pages: docvlm predict --adapter DIR --image page.png --question "..."
  merge     fold an adapter into 16-bit base weights: docvlm merge --adapter DIR --out DIR
  push      upload a run or merged folder to the Hub: docvlm push --folder DIR --repo_id you/name
  launch    `accelerate launch` with the same arguments, exiting with the job's status and no launcher traceback
  plan      without a GPU: check a recipe and a sample of its data, predict peak memory and step time on a
            card: docvlm plan --config <recipe> [--gpu t4-16gb]
  fixtures  build the offline tiny model and synthetic documents and print where they are;
            --export-pages DIR writes a few held-out pages as PNG files to try `predict` on

`docvlm <command> --help` says more about each.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from docvlm.runtime import quiet_third_party_noise

    quiet_third_party_noise()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from docvlm.train import main as train_main

        return train_main(rest)
    commands = {
        "launch": launch,
        "eval": evaluate,
        "predict": predict,
        "merge": merge,
        "push": push,
        "fixtures": fixtures,
    }
    if command == "plan":
        from docvlm.plan import main as plan_main

        return plan_main(rest)
    if command not in commands:
        print(f"docvlm: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return commands[command](rest)
    except UserError as err:
        print(f"docvlm {command}: error: {err}", file=sys.stderr)
        return 2


def launch(argv: list[str]) -> int:
    """Run `accelerate launch ARGS`. When the job fails, accelerate raises CalledProcessError (one process) or
    torchrun's ChildFailedError (several) with a traceback that buries the job's own error message; here the job's
    message stays last and the job's own exit status is returned.

    SIGINT and SIGTERM sent to this process are forwarded to the training processes, which save a checkpoint and
    stop (docvlm.training.runs.StopRequests). accelerate's and torchrun's own handlers are kept out for the launch: they
    turn a signal into SIGTERM for the job and a SIGKILL a few seconds later, which can cut the stop checkpoint
    off, or, with SIGINT ignored (a job started in the background), do nothing at all."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    check_launch_config(args)
    if args.num_cpu_threads_per_process is None and "OMP_NUM_THREADS" not in os.environ:
        args.num_cpu_threads_per_process = _cpu_threads_per_process(args)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        with forwarded_stop_signals():
            launch_command(args)
    except subprocess.CalledProcessError as err:  # one process; killed by a signal: 128 + its number, as a shell
        return err.returncode if err.returncode > 0 else 128 - err.returncode
    except ChildFailedError as err:  # several processes: torchrun has already listed which failed, and how
        codes = [failure.exitcode for failure in err.failures.values()]
        return next((c if c > 0 else 128 - c for c in codes if c), 1)
    return 0


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def forwarded_stop_signals():
    """From here on, SIGINT and SIGTERM go to this process's children (the training processes, or torchrun's
    workers, which the launch runs in this process) and nothing else happens here: the launch waits for them to
    stop. Handlers the launch would install for these signals are left out."""
    import psutil

    def forward(signum, frame):
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signum)

    install = signal.signal
    for sig in STOP_SIGNALS:
        install(sig, forward)  # kept after the launch too: a late signal finds no child, and does nothing

    def keep_forwarding(sig, handler):
        return forward if sig in STOP_SIGNALS else install(sig, handler)

    signal.signal = keep_forwarding
    try:
        yield
    finally:
        signal.signal = install


def check_launch_config(args) -> None:
    """What accelerate finds out only with a traceback, said before the launch: a missing config file, or a
    DeepSpeed config without DeepSpeed installed."""
    import importlib.util

    import yaml

    config = {}
    if args.config_file:
        path = Path(args.config_file)
        if not path.is_file():
            shipped = ", ".join(sorted(p.stem for p in Path("accelerate_configs").glob("*.yaml")))
            raise UserError(f"--config_file {path} not found." + (f" Shipped: {shipped}." if shipped else ""))
        config = yaml.safe_load(path.read_text()) or {}
    deepspeed = args.use_deepspeed or config.get("distributed_type") == "DEEPSPEED"
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        where = f"{args.config_file} launches" if args.config_file else "--use_deepspeed launches"
        raise UserError(
            f"{where} with DeepSpeed, which is not installed: pip install -e '.[deepspeed]' (or launch with "
            "accelerate_configs/multi_gpu.yaml, which needs nothing more)."
        )


def _cpu_threads_per_process(args) -> int | None:
    """For a CPU launch, the thread count accelerate would pick (physical cores / processes per machine), given
    explicitly so that accelerate does not warn that it picked it. None for GPU launches (accelerate's own)."""
    import psutil
    import yaml

    config = {}
    if args.config_file and Path(args.config_file).is_file():
        config = yaml.safe_load(Path(args.config_file).read_text()) or {}
    if not (args.cpu or config.get("use_cpu")):
        return None
    processes = args.num_processes or config.get("num_processes") or 1
    machines = args.num_machines or config.get("num_machines") or 1
    return max(1, (psutil.cpu_count(logical=False) or 1) // max(1, processes // machines))


EVAL_PREFACE = """usage: docvlm eval --config recipes/<recipe>.yaml [--adapter DIR] [--<field> <value> ...]

Answer the recipe's held-out split with the base model and with base + adapter, and write predictions.jsonl,
report.json and report.md into <adapter>/eval (--eval_output_dir to choose), beside the report training wrote in
the adapter folder (--adapter, default: the recipe's output_dir)."""


def evaluate(argv: list[str]) -> int:
    from docvlm.recipe.help import exit_on_help

    exit_on_help(argv, EVAL_PREFACE)
    from docvlm.evaluation.evaluate import run_eval

    run_eval(argv)
    return 0


def _predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="docvlm predict",
        description="Answer questions about document images with a fine-tuned model. Prints only the answer.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="a training output folder: the 4-bit base + the adapter, as trained")
    source.add_argument("--model", help="a folder written by `docvlm merge`")
    parser.add_argument("--image", help="a page image (png, jpg, ...)")
    parser.add_argument("--question", help="the question about the page")
    parser.add_argument(
        "--input",
        help='a jsonl file of {"image": path, "question": ...} lines; relative paths are read from the file\'s folder',
    )
    parser.add_argument("--output", help="with --input: where to write the answers as jsonl (default: stdout)")
    parser.add_argument("--max_new_tokens", type=int, help="longest answer (default: the recipe's)")
    parser.add_argument("--batch_size", type=int, default=8)
    return parser


def _open_image(path: Path, where: str):
    """A page to answer about, read and checked as training reads and checks its pages (docvlm.pages): a page
    training would skip (undecodable, a decompression bomb, a 1x1 placeholder, a strip) is refused here."""
    from docvlm.pages import PageProblem, open_page

    try:
        return open_page({"bytes": None, "path": str(path)}, where)
    except PageProblem as problem:
        raise UserError(f"{where}: {problem}; it is not a page docvlm can answer about.") from None


def _read_requests(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"--input {path} not found.")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            request = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not JSON ({err}).") from None
        if not isinstance(request, dict) or not request.get("image") or not request.get("question"):
            raise UserError(f'{where}: needs "image" and "question" keys.')
        image = Path(request["image"])
        request["_image"] = _open_image(image if image.is_absolute() else path.parent / image, where)
        requests.append(request)
    if not requests:
        raise UserError(f"--input {path} has no requests.")
    return requests


def predict(argv: list[str]) -> int:
    parser = _predict_parser()
    args = parser.parse_args(argv)
    if args.input:
        if args.image or args.question:
            parser.error("give either --input or --image with --question")
        requests = _read_requests(Path(args.input))
    elif args.image and args.question:
        requests = [
            {"image": args.image, "question": args.question, "_image": _open_image(Path(args.image), "--image")}
        ]
    else:
        parser.error("give --image and --question, or --input FILE.jsonl")

    from docvlm.evaluation.generation import generate
    from docvlm.inference import load_for_inference

    model, processor, prompt, max_new_tokens = load_for_inference(args.adapter, args.model)
    answers = generate(
        model,
        processor,
        [{"image": r["_image"], "question": r["question"]} for r in requests],
        prompt,
        args.max_new_tokens or max_new_tokens,
        args.batch_size,
        desc="answering",
    )
    if not args.input:
        print(answers[0]["answer"])
        return 0
    if args.output:  # each image path relative to the answers' own folder, so that the file feeds predict again
        for request in requests:
            image = Path(request["image"])
            image = image if image.is_absolute() else Path(args.input).parent / image
            request["image"] = os.path.relpath(image, Path(args.output).parent)
    lines = [
        json.dumps({**{k: v for k, v in r.items() if k != "_image"}, "answer": a["answer"]}, ensure_ascii=False)
        for r, a in zip(requests, answers, strict=True)
    ]
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} answers written to {args.output}", file=sys.stderr)
    else:
        print("\n".join(lines))
    return 0


def merge(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="docvlm merge",
        description="Merge the adapter into 16/32-bit base weights (not 4-bit) and save one standalone model: "
        "safetensors, the processor, the recipe and a model card.",
    )
    parser.add_argument("--adapter", required=True, help="a training output folder")
    parser.add_argument("--out", required=True, help="the folder to write the merged model to")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weights dtype (auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU)",
    )
    parser.add_argument(
        "--base",
        default="dequantized",
        choices=["dequantized", "original"],
        help="dequantized: merge into the 4-bit weights the adapter was trained on, dequantized, so the merged model "
        "answers as base + adapter did. original: into the base's own 16-bit weights, which the adapter never saw "
        "(answers differ). A base trained unquantized is always merged as is.",
    )
    args = parser.parse_args(argv)
    from docvlm.inference import merge as merge_adapter

    print(f"merged model written to {merge_adapter(args.adapter, args.out, args.dtype, args.base)}")
    return 0


def push(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="docvlm push",
        description="Upload a run or merged folder to the Hub (checkpoints and pickled arguments are left out). "
        "The token is read from HF_TOKEN or the `hf auth login` store; it is never taken as an argument.",
    )
    parser.add_argument("--folder", required=True)
    parser.add_argument("--repo_id", required=True, help="e.g. you/docvqa-adapter")
    parser.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        raise UserError(f"--folder {args.folder} is not a folder.")
    from docvlm.inference import push as push_folder

    print(push_folder(args.folder, args.repo_id, private=not args.public))
    return 0


def fixtures(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="docvlm fixtures",
        description="Build the offline tiny models (one a tested family) and synthetic documents (once; they are "
        "cached) and print where they are.",
    )
    parser.add_argument(
        "--export-pages",
        metavar="DIR",
        help="also write held-out pages as DIR/page-000.png... and DIR/questions.jsonl ({image, question, answers} "
        "lines), ready for `docvlm predict --input DIR/questions.jsonl`",
    )
    parser.add_argument("--count", type=int, default=5, help="how many pages --export-pages writes (default: 5)")
    parser.add_argument(
        "--metadata-csv",
        action="store_true",
        help="with --export-pages: write DIR/metadata.csv (file_name,question,answer) instead of questions.jsonl, "
        "a folder of scans as recipes/local_folder_qlora.yaml reads it",
    )
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    from docvlm.fixtures import FIXTURES, resolve
    from docvlm.fixtures.documents import export_pages

    if args.metadata_csv and not args.export_pages:
        parser.error("--metadata-csv goes with --export-pages DIR")
    for name in FIXTURES:
        print(f"{name}: {resolve(name)}")
    if args.export_pages:
        questions = export_pages(Path(args.export_pages), args.count, args.metadata_csv)
        print(f"{args.count} held-out pages and their questions written to {questions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
