"""Hold documents out for evaluation, so that no held-out page is ever trained on.

Rows are grouped before the draw: rows that show the same page (the same image content, whatever its file name)
are one unit, a row of several pages joins its pages into one document, and a recipe's `eval_split_by` column
(a document id) joins every row that shares its value. The draw takes whole units: with one row per question, all
of a page's questions are held out together.
"""

from __future__ import annotations

import hashlib
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from docvlm.errors import UserError

DIGEST_CHARS = 16  # of a page's sha256, in page names: unique among any realistic number of pages


@dataclass
class HeldOut:
    """What eval_split_size held out, for the log, data_report.json and report.json."""

    size: float
    seed: int
    by: str | None  # the eval_split_by column, if any
    unit: str  # "pages", or "documents" when a unit can hold several pages
    units: int  # pages or documents in the split before the draw
    held_units: int
    held_questions: int
    train_questions: int
    pages: list[str] = field(default_factory=list)  # the held-out pages' names

    def summary(self, source: str) -> str:
        pages = f"{len(self.pages)} pages, " if self.unit == "documents" else ""
        by = f", eval_split_by {self.by}" if self.by else ""
        return (
            f"Held out {self.held_units} of {self.units} {self.unit} ({pages}{self.held_questions} questions) of "
            f"{source} for evaluation (eval_split_size {self.size:g}, eval_split_seed {self.seed}{by}); training "
            f"keeps the other {self.units - self.held_units} {self.unit} ({self.train_questions} questions), none "
            "of them shared."
        )

    def as_json(self) -> dict:
        return {
            "eval_split_size": self.size,
            "eval_split_seed": self.seed,
            "eval_split_by": self.by,
            "unit": self.unit,
            "units": self.units,
            "held_out_units": self.held_units,
            "held_out_questions": self.held_questions,
            "train_questions": self.train_questions,
            "held_out_pages": self.pages,
        }


def _stored_pages(rows, batch_size: int = 64):
    """Each row's pages as stored ({bytes, path} dicts), batch by batch, never decoded."""
    from datasets import Image, LargeList, List

    feature = rows.features["image"]
    several = isinstance(feature, List | LargeList)
    if isinstance(feature.feature if several else feature, Image):
        rows = rows.cast_column("image", List(Image(decode=False)) if several else Image(decode=False))
    for batch in rows.select_columns(["image"]).iter(batch_size=batch_size):
        for stored in batch["image"]:
            yield stored if several else [stored]


def page_identity(stored, base: Path | None) -> tuple[str, str]:
    """(digest of the page's content, the page's name): the file's path (relative to `base` when under it) for a
    page read from a file, else 'sha256:<digest>'. A file that cannot be read is identified by its path."""
    if isinstance(stored, dict) and stored.get("bytes") is None and stored.get("path"):
        path = Path(stored["path"])
        name = _relative(path, base)
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest(), name
        except OSError:
            return f"unreadable:{path}", name
    if isinstance(stored, dict) and stored.get("bytes") is not None:
        digest = hashlib.sha256(stored["bytes"]).hexdigest()
        return digest, f"sha256:{digest[:DIGEST_CHARS]}"
    if stored is not None and hasattr(stored, "tobytes"):  # a PIL image in memory
        digest = hashlib.sha256(stored.tobytes()).hexdigest()
        return digest, f"sha256:{digest[:DIGEST_CHARS]}"
    return "missing", "(no image)"


def _relative(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return path.resolve().relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def page_names(rows, base: Path | None = None) -> list[list[str]]:
    """Each row's pages by name, as predictions.jsonl and data_report.json give them."""
    return [[page_identity(stored, base)[1] for stored in pages] for pages in _stored_pages(rows)]


def document_units(page_digests: list[list[str]], keys: list | None = None) -> list[int]:
    """For each row, the number of its unit: rows that share a page, or a non-empty key, are one unit (union-find
    over the rows). Units are numbered in the order of their first row."""
    parent = list(range(len(page_digests)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_row: dict[tuple, int] = {}
    for row, digests in enumerate(page_digests):
        links = [("page", digest) for digest in digests if digest != "missing"]
        if keys is not None and keys[row] not in (None, ""):
            links.append(("key", keys[row]))
        for link in links:
            if link in first_row:
                parent[find(row)] = find(first_row[link])
            else:
                first_row[link] = row
    numbers: dict[int, int] = {}
    return [numbers.setdefault(find(row), len(numbers)) for row in range(len(page_digests))]


def carve_eval_split(rows, size: float, seed: int, source: str, by: str | None = None, base: Path | None = None):
    """(train, held-out, HeldOut) from one split: a seeded draw of `size` of its pages or documents (a fraction
    below 1, else a count), all their questions held out, the same units for the same data and seed. `by`: the
    column (already mapped to `split_key`) that also joins rows into one document."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    quiet = not PartialState().is_local_main_process
    digests, names = [], []
    for pages in tqdm(_stored_pages(rows), total=len(rows), desc="Grouping rows by page", disable=quiet):
        found = [page_identity(stored, base) for stored in pages]
        digests.append([digest for digest, _ in found])
        names.append([name for _, name in found])
    keys = list(rows["split_key"]) if by else None
    units = document_units(digests, keys)
    total = max(units, default=-1) + 1
    count = round(size * total) if 0 < size < 1 else int(size)
    what = "documents" if by or total < len({d for ds in digests for d in ds}) else "pages"
    if size <= 0 or (size > 1 and size != int(size)) or not 1 <= count < total:
        raise UserError(
            f"eval_split_size {size:g} cannot hold {what} out of the {total} {what} of {source} and leave some to "
            f"train on: use a fraction between 0 and 1 (0.1) or a whole number of {what} below {total}."
        )
    held = set(random.Random(seed).sample(range(total), count))
    held_rows = [row for row, unit in enumerate(units) if unit in held]
    train_rows = [row for row, unit in enumerate(units) if unit not in held]
    held_pages = list(dict.fromkeys(name for row in held_rows for name in names[row]))
    info = HeldOut(size, seed, by, what, total, count, len(held_rows), len(train_rows), held_pages)
    if PartialState().is_main_process:
        print(info.summary(source), file=sys.stderr)
    return rows.select(train_rows), rows.select(held_rows), info  # both in file order: max_*_samples keep the first
