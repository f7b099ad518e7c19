"""`connector_checkpointing` (with `connector_checkpoint_pages` and `connector_perceiver_pages`): the
vision-language connector recomputed in the backward pass, a few pages at a time, instead of keeping its
activations; the family's connector patch does it (Family.checkpoint_connector)."""

from __future__ import annotations

from docvlm.speedups.base import LOADED, Setting, Switch


def _check(args, model_args) -> None:
    if args.connector_checkpoint_pages < 1:
        raise ValueError(f"connector_checkpoint_pages must be at least 1, got {args.connector_checkpoint_pages}.")
    perceiver = args.connector_perceiver_pages
    if perceiver is not None and perceiver < 1:
        raise ValueError(f"connector_perceiver_pages must be at least 1 or null, got {perceiver}.")
    if perceiver is not None and not args.connector_checkpointing:
        raise ValueError(
            "connector_perceiver_pages is set, but connector_checkpointing is false: it says how many pages the "
            "perceiver recomputes together. Set connector_checkpointing: true, or connector_perceiver_pages: null."
        )
    if perceiver is not None and perceiver < args.connector_checkpoint_pages:
        raise ValueError(
            f"connector_perceiver_pages ({perceiver}) is below connector_checkpoint_pages "
            f"({args.connector_checkpoint_pages}): the perceiver is recomputed in chunks of at least the "
            "projection's. Raise it, or set it to null."
        )


def _apply(run) -> bool:
    args = run.args
    return run.family.checkpoint_connector(run.model, args.connector_checkpoint_pages, args.connector_perceiver_pages)


def _plan(terms) -> None:
    """The connector's activations alive at once: the largest recomputed chunk, and the perceiver's if larger."""
    args = terms.args
    terms.connector_pages = min(terms.pages, args.connector_checkpoint_pages)
    terms.perceiver_pages = min(terms.pages, args.connector_perceiver_pages or terms.connector_pages)
    terms.connector_recomputed = True
    if args.connector_perceiver_pages is not None:
        terms.perceiver_own_chunks = "connector_perceiver_pages"


SWITCH = Switch(
    settings=(
        Setting(
            "connector_checkpointing",
            bool,
            False,
            "Recompute the vision-language connector in the backward pass, a few pages at a time, so that a larger "
            "batch fits; generation runs it in the same chunks. Same math. A family without a perceiver connector "
            "refuses it.",
        ),
        Setting(
            "connector_checkpoint_pages",
            int,
            1,
            "Pages recomputed together under connector_checkpointing: more is faster (fewer, larger kernels) but "
            "holds more memory in the recompute.",
        ),
        Setting(
            "connector_perceiver_pages",
            int | None,
            None,
            "Pages the perceiver resampler runs together, when more than connector_checkpoint_pages (null: the same "
            "chunks as the projection); each of its layers is then recomputed by itself. The perceiver holds far "
            "less memory a page than the projection and launches most of the connector's kernels.",
        ),
    ),
    is_on=lambda args: bool(args.connector_checkpointing),
    lacks="connector",
    memory_advice="turn on connector_checkpointing with fewer connector_checkpoint_pages",
    family_hook="checkpoint_connector",
    check=_check,
    apply={LOADED: _apply},
    in_evaluation=True,
    plan=_plan,
)
