"""A split's column names as a recipe may give them (dots reach into struct columns), the error for one that is not
there, and the working columns a mapping writes."""

from __future__ import annotations

from docvlm.errors import UserError

# The columns an expansion writes; unusual names, so that they never meet a dataset's own.
EXPANDED = {
    "question": "_docvlm_question",
    "answers": "_docvlm_answers",
    "row": "_docvlm_row",
    "field": "_docvlm_field",
    "messages": "_docvlm_messages",
}


def column_names(dataset) -> list[str]:
    """All column names, with dotted paths into struct columns (query.en), as the recipe may name them."""
    names = []

    def walk(prefix, feature):
        names.append(prefix)
        if isinstance(feature, dict):
            for key, sub in feature.items():
                walk(f"{prefix}.{key}", sub)

    for name, feature in dataset.features.items():
        walk(name, feature)
    return names


def missing_column(column: str, role: str, split: str, source: str, present: list[str], hint: str = "") -> UserError:
    """The error for a column the recipe names that the split does not have, listing those it has."""
    return UserError(
        f"Column '{column}' ({role}) not found in split '{split}' of {source}. Columns present: "
        f"{', '.join(present)}.{hint}"
    )
