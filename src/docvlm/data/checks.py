"""Check every row before the first step, so that a bad row is skipped and counted (or stops the run, as the
recipe's `on_bad_example` says) before the model loads, instead of killing a long run at the step that draws it.

Each row's pages are decoded and converted, its question and answers read, and its length in tokens (image tokens
included) taken with the training collator itself, so a row that passes here builds a batch. The check runs in
parallel threads with a progress bar, and its result is cached by the dataset's fingerprint, the size and time of
every page file and every setting it depends on, so a rerun does not pay it again, and a changed file is checked
anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from docvlm.conversations import as_answers
from docvlm.errors import UserError
from docvlm.pages import IMAGE_MISSING, IMAGE_UNREADABLE, PageProblem, open_page, undecoded_pages

SCREEN_VERSION = "2"  # part of the cache key: bump when a check changes
SHOWN = 5  # problems printed in full; all are counted, and data_report.json lists them all


# Why a row is skipped, beside the page's own reasons (docvlm.pages): data_report.json groups skipped rows by them.
NO_QUESTION = "no question"
NO_ANSWER = "no answer"
TOO_LONG = "longer than max_length"
BAD_PROMPT = "question cannot be prompted"


def row_problem(row: dict, collator, columns: dict[str, str]) -> tuple[str, str, str] | None:
    """(field, reason, what is wrong) for a row that cannot be trained on or scored, else None."""
    question = row.get("question")
    if row.get("messages") is None and (not isinstance(question, str) or not question.strip()):
        return columns["question"], NO_QUESTION, "the question is empty" if isinstance(question, str) else "no question"
    if not as_answers(row.get("answers")):
        return columns["answers"], NO_ANSWER, "no non-empty answer"
    stored = row.get("image")
    pages = []
    for page in stored if isinstance(stored, list) else [stored]:
        try:
            pages.append(open_page(page, "Row"))
        except PageProblem as problem:
            return columns["image"], problem.reason, str(problem)
        except UserError as error:
            return columns["image"], IMAGE_UNREADABLE, str(error)
    if not pages:
        return columns["image"], IMAGE_MISSING, "no image"
    try:
        length = collator.lengths([{**row, "image": pages, "answers": as_answers(row["answers"])}])[0]
    except UserError as error:
        return columns["question"], BAD_PROMPT, str(error).removeprefix("Row: ").removeprefix("Row ")
    if collator.max_length is not None and length > collator.max_length:
        return (
            columns["image"],
            TOO_LONG,
            (f"{length} tokens (image tokens included), over max_length={collator.max_length}; skipped, never cut"),
        )
    return None


def _check_batch(batch, collator, columns):
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    found = [row_problem(row, collator, columns) for row in rows]
    return {
        "_field": [p[0] if p else None for p in found],
        "_reason": [p[1] if p else None for p in found],
        "_problem": [p[2] if p else None for p in found],
    }


def _cache_file(rows, collator, columns) -> Path | None:
    from docvlm.fixtures import cache_root

    fingerprint = getattr(rows, "_fingerprint", None)
    if not fingerprint:
        return None
    processor = collator.processor
    settings = {
        "version": SCREEN_VERSION,
        "rows": fingerprint,
        "page_files": page_files_digest(rows),
        "count": len(rows),
        "max_length": collator.max_length,
        "prompt": repr(collator.prompt),
        "columns": columns,
        "image_processor": processor.image_processor.to_json_string(),
        "tokenizer": processor.tokenizer.name_or_path,
        "vocabulary": len(processor.tokenizer),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / "screened" / f"{key}.json"


def page_files_digest(rows) -> str:
    """A digest of the path, size and modification time of every page stored as a file: a page changed on disk
    after a check (truncated, replaced) makes the check run again. Pages stored as bytes are covered by the
    dataset's fingerprint. Read from Arrow without touching any page's bytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    for chunk in rows.data.column("image").chunks:
        while pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
            chunk = chunk.flatten()
        if not pa.types.is_struct(chunk.type) or chunk.type.get_field_index("path") < 0:
            continue
        stored_as_files = pc.is_null(pc.struct_field(chunk, "bytes"))
        for path in pc.filter(pc.struct_field(chunk, "path"), stored_as_files).to_pylist():
            try:
                stat = os.stat(path)
                digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except (OSError, TypeError):
                digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def _cached(cache: Path | None, split: str, say: bool) -> list[dict] | None:
    if cache is None or not cache.is_file():
        return None
    found = json.loads(cache.read_text())
    if say:
        print(f"Split '{split}': checked before, {len(found)} bad row(s) (cached in {cache}).", file=sys.stderr)
    return found


CHECK_BATCH = 16  # rows a thread checks at a time


def _check_all(rows, collator, columns, split: str) -> list[dict]:
    """Every bad row of the split, with its field and problem.

    Large splits are checked in threads, each with its own copy of the collator (a fast tokenizer is not safe to
    share between threads). Not in forked processes: by now a GPU run holds a CUDA context and live threads, which
    a fork copies in whatever state they are in; on an H200, 8 processes forked to check a 1,000-row split stayed
    at 0 rows for minutes, in two runs. Decoding, resizing and tokenizing release the GIL, so threads share the
    work."""
    import copy
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from accelerate import PartialState
    from tqdm.auto import tqdm

    undecoded = undecoded_pages(rows)
    workers = min(os.cpu_count() or 1, 8) if len(rows) >= 512 else 1
    local = threading.local()

    def check(batch):
        if not hasattr(local, "collator"):
            local.collator = copy.deepcopy(collator)
        return _check_batch(batch, local.collator, columns)

    fields, reasons, problems = [], [], []
    window = CHECK_BATCH * workers * 4  # rows read at a time: a large split's pages are never all in memory at once
    quiet = not PartialState().is_local_main_process
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="check-rows") as pool,
        tqdm(total=len(rows), desc=f"Checking {split} rows", unit="row", disable=quiet) as bar,
    ):
        for start in range(0, len(rows), window):
            end = min(start + window, len(rows))
            batches = [undecoded[i : min(i + CHECK_BATCH, end)] for i in range(start, end, CHECK_BATCH)]
            for checked in pool.map(check, batches):
                fields += checked["_field"]
                reasons += checked["_reason"]
                problems += checked["_problem"]
                bar.update(len(checked["_field"]))
    return [
        {"split": split, "row": row, "index": index, "field": field, "reason": reason, "problem": problem}
        for index, (row, field, reason, problem) in enumerate(zip(rows["row"], fields, reasons, problems, strict=True))
        if problem is not None
    ]


def screen(rows, collator, columns: dict[str, str], split: str, source: str, policy: str = "skip"):
    """(rows to keep, problems): every row checked, the bad ones dropped (policy "skip") or reported in one error
    (policy "error"). Each problem names the dataset, split, row index (as in the source) and field."""
    from accelerate import PartialState

    if len(rows) == 0:
        return rows, []
    cache = _cache_file(rows, collator, columns)
    state = PartialState()
    with state.main_process_first():  # under a multi-process launch the others then read what the main one cached
        found = _cached(cache, split, state.is_main_process)
        if found is None:
            found = _check_all(rows, collator, columns, split)
            if cache is not None and state.is_main_process:
                cache.parent.mkdir(parents=True, exist_ok=True)
                partial = cache.with_suffix(".partial")
                partial.write_text(json.dumps(found))
                partial.replace(cache)  # never a half-written result that a later run would trust
    if not found:
        return rows, []
    lines = [f"  {source}, split '{p['split']}', row {p['row']}, {p['field']}: {p['problem']}" for p in found]
    more = f"\n  ... and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    if policy == "error":
        raise UserError(
            f"{len(found)} of the {len(rows)} rows of split '{split}' cannot be used (on_bad_example: error):\n"
            + "\n".join(lines[:SHOWN])
            + more
            + "\nFix or drop them, or set on_bad_example: skip to train without them."
        )
    bad = {p["index"] for p in found}  # positions: several questions may share a source row, and only one be bad
    kept = rows.select([i for i in range(len(rows)) if i not in bad])
    if state.is_main_process:
        print(
            f"Split '{split}': skipped {len(rows) - len(kept)} of {len(rows)} rows (on_bad_example: skip):\n"
            + "\n".join(lines[:SHOWN])
            + more,
            file=sys.stderr,
        )
    return kept, found
