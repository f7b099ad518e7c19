"""Read a recipe: its YAML and the command line's --field value flags into the schema's dataclasses (TRL's TrlParser),
with unknown keys and flags refused naming the closest field, and the checks that span dataclasses.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import yaml
from trl import TrlParser

from docvlm import speedups
from docvlm.errors import UserError
from docvlm.recipe.schema import RECIPE_DATACLASSES, DataArguments, EvalArguments, ModelArguments, TrainConfig


@dataclass
class Recipe:
    """A parsed recipe: its four groups of fields, and the file it was read from (as reports name it). Unpacks as
    (data, model, training, eval)."""

    data: DataArguments
    model: ModelArguments
    training: TrainConfig
    eval: EvalArguments
    source: str

    def __iter__(self):
        return iter((self.data, self.model, self.training, self.eval))

    def __getitem__(self, index):
        return tuple(self)[index]


USAGE = """python -m docvlm.train --config recipes/<recipe>.yaml [--<field> <value> ...]

Fine-tune a vision-language model on document question answering. Every field below can be set in the recipe
YAML; a flag on the command line overrides the YAML. Example:
  accelerate launch -m docvlm.train --config recipes/docvqa_qlora.yaml --learning_rate 2e-4 --output_dir out"""


def make_parser() -> TrlParser:
    parser = TrlParser(RECIPE_DATACLASSES, usage=USAGE)
    parser.allow_abbrev = False  # --max_st 3 is not --max_steps 3: a typo is refused (check_flags), never guessed
    return parser


def _known_fields() -> set[str]:
    return {f.name for cls in RECIPE_DATACLASSES for f in fields(cls)}


def shipped_recipes() -> list[str]:
    """The recipes in ./recipes, by name."""
    return sorted(path.stem for path in Path("recipes").glob("*.yaml"))


def load_recipe_yaml(path: str | Path) -> dict:
    """Read a recipe and reject unknown keys, naming the file, the key and the closest known key."""
    path = Path(path)
    if not path.is_file():
        close = difflib.get_close_matches(path.stem, shipped_recipes(), n=1)
        hint = f" Did you mean recipes/{close[0]}.yaml?" if close else ""
        raise UserError(f"Recipe {path} not found.{hint} The shipped recipes: {', '.join(shipped_recipes())}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"Recipe {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"Recipe {path} must be a mapping of field: value, got {type(data).__name__}.")
    known = _known_fields() | {"env"}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(
                f"Unknown key '{key}' in recipe {path}.{hint} "
                "Run `python -m docvlm.train --help` for the list of fields."
            )
    return data


def check_flags(argv: list[str]) -> None:
    """Refuse an unknown --flag as a recipe's unknown key is refused, naming the closest field (argparse would take
    a prefix of a field for it, and HfArgumentParser reports the rest in its own words)."""
    bools = {f.name for cls in RECIPE_DATACLASSES for f in fields(cls) if f.type in (bool, "bool")}
    known = _known_fields() | {"config"} | {f"no_{name}" for name in bools}
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0].replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean '--{close[0]}'?" if close else ""
            raise UserError(
                f"Unknown flag '--{name}' on the command line.{hint} Run `python -m docvlm.train --help` for the list "
                "of fields."
            )


def recipe_argument(argv: list[str] | None = None) -> str:
    """The recipe a command was given (`--config`), as reports name it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        return argv[argv.index("--config") + 1]
    return "(command-line arguments only)"


def nulls_to_none(arguments) -> None:
    """`--field null` means None on the command line, as `field: null` does in a recipe. HfArgumentParser passes
    'null' through as a string for optional string fields (a cache folder named 'null', a column named 'null')."""
    import typing

    hints = typing.get_type_hints(type(arguments))
    for name, hint in hints.items():
        if getattr(arguments, name, None) == "null" and type(None) in typing.get_args(hint):
            setattr(arguments, name, None)


GENERATION_METRICS = ("anls", "exact_match")  # logged at each evaluation when eval_anls_samples > 0


def check_answer_scores(training_args, eval_args) -> None:
    """metric_for_best_model may name a generation score only where evaluations compute it."""
    if eval_args.eval_anls_samples < 0:
        raise UserError(f"eval_anls_samples must be 0 (loss only) or more, got {eval_args.eval_anls_samples}.")
    metric = (training_args.metric_for_best_model or "").removeprefix("eval_")
    if metric in GENERATION_METRICS and (training_args.eval_strategy == "no" or eval_args.eval_anls_samples == 0):
        raise UserError(
            f"metric_for_best_model is {metric}, but evaluations during training compute it only with eval_strategy "
            f"steps or epoch (now {training_args.eval_strategy}) and eval_anls_samples above 0 (now "
            f"{eval_args.eval_anls_samples}). Set both, or metric_for_best_model: loss."
        )


def parse_recipe(argv: list[str] | None = None):
    """Parse `--config recipe.yaml` plus CLI overrides into (data, model, training, eval) arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from docvlm.recipe.help import exit_on_help

    exit_on_help(argv)  # ours, not HfArgumentParser's 840 lines
    check_flags(argv)
    if "--config" not in argv and not any(token.startswith("--model_name_or_path") for token in argv):
        raise UserError(
            f"No recipe: give one with --config recipes/<recipe>.yaml ({', '.join(shipped_recipes()) or 'recipes/'})."
        )
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UserError("--config needs a path to a recipe YAML, e.g. --config recipes/tiny_docvqa.yaml")
        load_recipe_yaml(argv[index + 1])
    try:
        # TrainConfig.__post_init__ and HfArgumentParser (unknown flags, bad values) raise ValueError.
        data_args, model_args, training_args, eval_args = make_parser().parse_args_and_config(argv)
    except ValueError as err:
        raise UserError(str(err)) from None
    for group in (data_args, model_args, training_args, eval_args):
        nulls_to_none(group)
    if training_args.hub_token:
        raise UserError(
            "Do not pass hub_token in a recipe or on the command line: it would be saved with the run. "
            "Set HF_TOKEN in the environment or run `hf auth login` instead."
        )
    check_answer_scores(training_args, eval_args)
    try:
        speedups.check(training_args, model_args)
    except ValueError as err:
        raise UserError(str(err)) from None
    return Recipe(data_args, model_args, training_args, eval_args, recipe_argument(argv))
