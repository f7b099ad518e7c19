"""Hugging Face Hub access: fail fast, with instructions, when a model or dataset cannot be reached.

Without this, an unreachable Hub surfaces deep inside `from_pretrained` / `load_dataset` after retries, as a
wall of traceback. We ask the Hub once, with a short timeout, before loading anything heavy.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from docvlm.errors import UserError

HUB_TIMEOUT_S = 10.0


def looks_local(name: str) -> bool:
    """A path rather than a Hub id: it exists, or it is written like a path (./x, /x, ~/x, x/y/z, a table file), or
    its first part is a local folder (data/my_scan)."""
    return (
        Path(name).expanduser().exists()
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or name.endswith((".parquet", ".jsonl", ".json", ".csv", ".tsv", ".arrow"))
        or ("/" in name and Path(name.split("/")[0]).is_dir())
    )


def near_path(name: str) -> str | None:
    """An existing file or folder whose name is close to a missing path's (my_scan -> my_scans), or None."""
    import difflib

    path = Path(name).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return None
    siblings = [p.name for p in parent.iterdir()]
    close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.75)
    return str(parent / close[0]) if close else None


def missing_path_error(name: str, kind: str, recipe_key: str) -> UserError:
    near = near_path(name)
    hint = f" Did you mean '{near}'?" if near else ""
    return UserError(f"The {kind} path '{name}' ({recipe_key}) does not exist.{hint}")


def _is_cached(repo_id: str, repo_type: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    probe = "config.json" if repo_type == "model" else "README.md"
    found = try_to_load_from_cache(repo_id, probe, revision=revision, repo_type=repo_type)
    return isinstance(found, str)


def check_recipe_sources(model_args, data_args) -> None:
    """The recipe's model and dataset, checked before anything heavy is loaded (fixtures are built here)."""
    from docvlm.fixtures import resolve

    check_sources(
        (resolve(model_args.model_name_or_path), "model", "model_name_or_path", model_args.model_revision),
        (resolve(data_args.dataset_name), "dataset", "dataset_name", None),
    )


def check_sources(*sources: tuple[str, str, str, str | None]) -> None:
    """check_source for each (name, kind, recipe_key, revision), reporting every unreachable one at once."""
    problems = []
    for source in sources:
        if not source[0]:  # a missing name is reported by the loader that needs it
            continue
        try:
            check_source(*source)
        except UserError as err:
            problems.append(str(err))
    if problems:
        raise UserError("\n".join(problems))


@functools.cache  # one Hub round-trip per source and run; failures are not cached
def check_source(name: str, kind: str, recipe_key: str, revision: str | None = None) -> None:
    """Raise a UserError unless `name` (a model or dataset) is a local path, cached, or reachable on the Hub."""
    repo_type = "model" if kind == "model" else "dataset"
    if looks_local(name):
        if not Path(name).expanduser().exists():
            raise missing_path_error(name, kind, recipe_key)
        return
    if "/" not in name and near_path(name):  # a mistyped local folder, not a Hub id (those are owner/name)
        raise missing_path_error(name, kind, recipe_key)
    if _is_cached(name, repo_type, revision):
        return
    how_to_fix = (
        f"Download it on a machine that can reach the Hub (`hf download {name}"
        f"{' --repo-type dataset' if repo_type == 'dataset' else ''} --local-dir <dir>`), copy <dir> here and set "
        f"`{recipe_key}: <dir>` in the recipe or pass `--{recipe_key} <dir>`."
    )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UserError(f"HF_HUB_OFFLINE is set and the {kind} '{name}' is not in the local cache. {how_to_fix}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().repo_info(name, repo_type=repo_type, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise UserError(
            f"The {kind} '{name}' is gated: accept its licence on the Hub, then set HF_TOKEN or run `hf auth login`."
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"The {kind} '{name}' ({recipe_key}) was not found on the Hub: check the spelling, or log in if it is "
            "private. A local path must exist."
        ) from None
    except Exception as err:  # noqa: BLE001 - any network failure means the same thing to the user
        raise UserError(
            f"Could not reach the Hugging Face Hub to get the {kind} '{name}' ({type(err).__name__}). {how_to_fix}"
        ) from None
