"""The `docvlm` command: one entry point for the package's jobs."""

from __future__ import annotations

import argparse
import subprocess
import sys

USAGE = """docvlm <command> [args]

commands:
  train     fine-tune from a recipe (same as python -m docvlm.train); `docvlm train --help` lists every field
  launch    `accelerate launch` with the same arguments, exiting with the job's status and no launcher traceback
  fixtures  build the offline tiny model and synthetic documents now, and print where they are
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from docvlm.train import main as train_main

        return train_main(rest)
    if command == "launch":
        return launch(rest)
    if command == "fixtures":
        argparse.ArgumentParser(prog="docvlm fixtures", description="Build the offline fixtures.").parse_args(rest)
        from docvlm import tiny

        for name in (tiny.TINY_MODEL, tiny.TINY_DATASET):
            print(f"{name}: {tiny.resolve(name)}")
        return 0
    print(f"docvlm: unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


def launch(argv: list[str]) -> int:
    """Run `accelerate launch ARGS`. When the job fails, accelerate raises CalledProcessError with a traceback that
    buries the job's own error message; here the job's message stays last and its exit status is returned."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:
        return err.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
