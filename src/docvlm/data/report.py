"""data_report.json: what became of every row of the dataset, written by every training run (evaluation on or
off) before the model loads: rows read and questions made per split, cells converted to text, every skipped row
by reason, and what was held out for evaluation. report.json carries the same counts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

REPORT_FILE = "data_report.json"
FIRST_ROWS = 5  # rows report.json shows per reason; data_report.json lists them all
LISTED = 100  # rows report.json lists in file order, whatever their reason


class DataReport:
    """Filled in as the data is read (docvlm.data), held out (docvlm.data.splits) and checked (docvlm.data.checks)."""

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.splits: dict[str, dict[str, int]] = {}
        self.converted: Counter = Counter()
        self.skipped: list[dict] = []
        self.held_out = None  # docvlm.data.splits.HeldOut, when eval_split_size carved the held-out split

    def read(self, split: str, rows: int, questions: int) -> None:
        """A split was read: `rows` in the source, `questions` made of them (one a row, or several)."""
        self.splits[split] = {"rows": rows, "questions": questions}

    def used(self, split: str, questions: int) -> None:
        """The questions of a split that training or evaluation uses, after the draw and the checks."""
        self.splits.setdefault(split, {})["used"] = questions

    def convert(self, what: str, cells: int) -> None:
        if cells:
            self.converted[what] += cells

    def skip(self, split: str, row: int, field: str, reason: str, detail: str | None = None) -> None:
        self.skipped.append({"split": split, "row": row, "field": field, "reason": reason, "detail": detail or reason})

    def by_reason(self, limit: int | None = None) -> dict[str, dict]:
        """{reason: {count, rows}} with every skipped row (or the first `limit`) of each reason."""
        grouped: dict[str, dict] = {}
        for skip in self.skipped:
            entry = grouped.setdefault(skip["reason"], {"count": 0, "rows": []})
            entry["count"] += 1
            if limit is None or len(entry["rows"]) < limit:
                entry["rows"].append({k: v for k, v in skip.items() if k != "reason"})
        return grouped

    def counts(self) -> dict:
        """The counts report.json carries: per split, conversions, skips by reason (first rows only), held out."""
        held = self.held_out.as_json() if self.held_out else None
        if held:
            held = {**held, "held_out_pages": len(held["held_out_pages"])}
        return {
            "dataset": self.dataset,
            "splits": self.splits,
            "converted_to_text": dict(self.converted),
            "skipped": {
                "count": len(self.skipped),
                "by_reason": self.by_reason(FIRST_ROWS),
                "rows": self.skipped[:LISTED],
            },
            "held_out": held,
        }

    def report_meta(self) -> dict:
        """What report.json says of the data: these counts, and the skipped rows under `skipped` as before."""
        counts = self.counts()
        return {"data": counts, "skipped": counts["skipped"]}

    def as_json(self) -> dict:
        return {
            **self.counts(),
            "skipped": {"count": len(self.skipped), "by_reason": self.by_reason()},
            "held_out": self.held_out.as_json() if self.held_out else None,
        }

    def write(self, folder: Path) -> Path:
        path = Path(folder) / REPORT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json(), indent=2, ensure_ascii=False))
        return path

    def summary(self) -> str:
        """One line for the end of a run."""
        reasons = Counter(skip["reason"] for skip in self.skipped)
        listed = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
        rows = sum(split.get("rows", 0) for split in self.splits.values())
        used = sum(split.get("used", 0) for split in self.splits.values())
        text = f"Data: {rows} rows read, {used} questions used"
        return text + (f"; {len(self.skipped)} skipped ({listed})." if self.skipped else "; none skipped.")
