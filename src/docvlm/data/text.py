"""Cells of text columns as training reads them: numbers and booleans become text, and nothing stored as text is
turned into a number on the way.

datasets stores a column that mixes types (a list in some rows, a string in others) as JSON text, and it stores a
string that itself parses as JSON (`"9.00"`, `"true"`) unquoted, so that decoding gives back the number 9.0. Such
columns are read undecoded here (`without_json_decoding`) and their cells decoded by `json_cells`, which keeps a
bare scalar as the text it was stored as (a `StoredScalar`, counted as converted like a number).
"""

from __future__ import annotations

import json


class StoredScalar(str):
    """Text that a mixed-type column stored as a JSON number or boolean: a number in the source, or text that reads
    as one ("9.00"). Either way it is counted as converted to text."""


def cell_text(value) -> str | None:
    """A scalar cell as text: numbers as written (42.0 -> '42', 3.5 -> '3.5'), booleans as true/false, text stripped;
    None for anything else (None, a list, a dict)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return str(value).strip()
    return None


def is_converted(value) -> bool:
    """Whether cell_text turns this value into text it was not (a number or a boolean)."""
    return isinstance(value, bool | int | float | StoredScalar)


def decode_json_text(raw: str | None):
    """One cell of a datasets Json column, decoded, except that a bare scalar stays the text it was stored as."""
    if raw is None:
        return None
    value = json.loads(raw)
    return StoredScalar(raw.strip()) if isinstance(value, bool | int | float) else value


def without_json_decoding(feature):
    """The same features with every Json part left undecoded (raw JSON text), for json_cells to decode."""
    from datasets import Features, Json, LargeList, List

    if isinstance(feature, Json):
        return Json(decode=False)
    if isinstance(feature, List):
        return List(without_json_decoding(feature.feature), length=feature.length)
    if isinstance(feature, LargeList):
        return LargeList(without_json_decoding(feature.feature))
    if isinstance(feature, Features):
        return Features({key: without_json_decoding(sub) for key, sub in feature.items()})
    if isinstance(feature, dict):
        return {key: without_json_decoding(sub) for key, sub in feature.items()}
    return feature


def has_json(feature) -> bool:
    from datasets import Json, LargeList, List

    if isinstance(feature, Json):
        return True
    if isinstance(feature, List | LargeList):
        return has_json(feature.feature)
    if isinstance(feature, dict):
        return any(has_json(sub) for sub in feature.values())
    return False


def json_cells(value, feature):
    """A value read with without_json_decoding, its Json parts decoded by decode_json_text (`feature`: the
    column's original, decoding feature)."""
    from datasets import Json, LargeList, List

    if value is None:
        return None
    if isinstance(feature, Json):
        return decode_json_text(value)
    if isinstance(feature, List | LargeList):
        return [json_cells(item, feature.feature) for item in value]
    if isinstance(feature, dict):
        return {key: json_cells(value.get(key), sub) for key, sub in feature.items()}
    return value


def as_text_or_texts(value) -> tuple[str | list[str] | None, int, bool]:
    """(text or list of texts, how many cells were converted to text, whether the value had a shape text cannot
    take: a dict, or a list inside a list)."""
    if isinstance(value, list | tuple):
        texts, converted = [], 0
        for item in value:
            if isinstance(item, list | tuple | dict):
                return None, 0, True
            text = cell_text(item)
            converted += is_converted(item)
            if text is not None:
                texts.append(text)
        return texts, converted, False
    if isinstance(value, dict):
        return None, 0, True
    return cell_text(value), int(is_converted(value)), False
