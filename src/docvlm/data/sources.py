"""Read a dataset as it is stored: a Hub id, a `save_to_disk` folder, a table file, a folder of split-named tables,
a folder of page images with a metadata table beside them, or the tables a recipe names with `data_files`.

Each split comes with the folder its image paths are relative to (the folder of the table it was read from). csv
and tsv tables are read as text: their format cannot tell text from numbers, and an answer such as "007" or "9.00"
must reach training as written, not as 7.0 or 9.0.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from docvlm.errors import UserError

TABLE_SUFFIXES = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".arrow": "arrow",
}
# The tables datasets reads beside a folder of images (its image-folder convention); their `file_name` column
# names each row's page, relative to the table's folder.
METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


@dataclass
class RawSplits:
    """The splits as stored, and for each local split the folders its relative image paths are looked up in (the
    table's own folder first, then the dataset's folder)."""

    splits: dict = field(default_factory=dict)  # split name -> datasets.Dataset
    image_dirs: dict[str, list[Path]] = field(default_factory=dict)

    def __contains__(self, split: str) -> bool:
        return split in self.splits

    def __getitem__(self, split: str):
        return self.splits[split]

    def __iter__(self):
        return iter(self.splits)


def load_raw(name: str, config: str | None = None, data_files=None, json_field: str | None = None) -> RawSplits:
    """The splits of a Hub id, a `save_to_disk` folder, a table file, or a folder of tables or images."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(name).expanduser()
    if data_files is not None:
        if not path.is_dir():
            raise UserError(
                f"data_files is set, but dataset_name {name} is not a folder: data_files names tables inside the "
                "dataset's folder. Set dataset_name to that folder, or drop data_files and name the file itself."
            )
        return _named_tables(path, data_files, json_field)
    if _saved_with_save_to_disk(path):
        loaded = load_from_disk(str(path))
        loaded = loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
        return RawSplits(dict(loaded), {})
    if path.is_file():
        return RawSplits({"train": read_tables([path], json_field)}, {"train": [path.parent]})
    if path.is_dir():
        return _load_folder(path, config, json_field)
    extra = {"field": json_field} if json_field else {}
    return RawSplits(dict(load_dataset(name, config, **extra)), {})  # a Hub id


def _saved_with_save_to_disk(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _named_tables(folder: Path, data_files, json_field: str | None) -> RawSplits:
    """`data_files`: one table (read as the train split) or {split: table or [tables]}, relative to the folder."""
    named = data_files if isinstance(data_files, dict) else {"train": data_files}
    raw = RawSplits()
    for split, names in named.items():
        paths = [folder / name for name in ([names] if isinstance(names, str) else names)]
        for path in paths:
            if not path.is_file():
                present = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in TABLE_SUFFIXES)
                raise UserError(
                    f"data_files: {path} (split '{split}') not found. Tables in {folder}: "
                    f"{', '.join(present) or 'none'}."
                )
        raw.splits[str(split)] = read_tables(paths, json_field)
        raw.image_dirs[str(split)] = [paths[0].parent, folder]
    return raw


def _load_folder(folder: Path, config: str | None, json_field: str | None) -> RawSplits:
    """A folder of split-named tables (train.jsonl, test.csv...) or of page images with metadata tables.

    Tables are read split by split: datasets reads every split of a folder into one schema, so two jsonl splits
    whose *unused* nested columns differ would fail to load at all. An image folder's metadata.csv is read here
    as text, not by datasets' image-folder reader, which parses "007" as the number 7."""
    from datasets import load_dataset, load_dataset_builder

    builder = load_dataset_builder(str(folder), config)
    files = {str(split): [Path(name) for name in names] for split, names in (builder.config.data_files or {}).items()}
    if builder.name in ("json", "csv", "parquet", "arrow"):
        return RawSplits(
            {split: read_tables(paths, json_field) for split, paths in files.items()},
            {split: [paths[0].parent, folder] for split, paths in files.items()},
        )
    if builder.name != "imagefolder":
        return RawSplits(dict(load_dataset(str(folder), config)), {})
    raw = RawSplits()
    for split, paths in files.items():
        tables = [path for path in paths if path.name in METADATA_NAMES]
        if tables:
            raw.splits[split] = with_page_columns(read_tables(tables, None))
            raw.image_dirs[split] = [tables[0].parent, folder]
    if raw.splits:
        return raw
    strays = unread_tables(folder)
    if strays:
        raise UserError(
            f"{folder} holds page images and {', '.join(strays[:3])}, but beside images only a table named "
            f"{' / '.join(METADATA_NAMES)} is read, so {strays[0]} would be ignored. Rename it metadata"
            f"{Path(strays[0]).suffix}, or name it in the recipe: data_files: {strays[0]}."
        )
    return RawSplits(dict(load_dataset(str(folder), config)), {})


def unread_tables(folder: Path) -> list[str]:
    """Tables in a folder (and its first level of subfolders) that an image folder does not read."""
    found = []
    for path in sorted([*folder.glob("*"), *folder.glob("*/*")]):
        if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES and path.name not in METADATA_NAMES:
            found.append(path.relative_to(folder).as_posix())
    return found


_FILE_NAME_COLUMN = re.compile(r"^(?:(?P<prefix>.+)_)?file_name(?P<plural>s?)$")


def with_page_columns(table):
    """An image-folder metadata table with its `file_name` column named as datasets names it (`image`; `images`
    for `file_names`; `page` for `page_file_name`), still holding the paths."""
    renames = {}
    for column in table.column_names:
        match = _FILE_NAME_COLUMN.match(column)
        if match:
            renames[column] = match["prefix"] or ("images" if match["plural"] else "image")
    taken = [new for old, new in renames.items() if new in table.column_names and new not in renames]
    if taken:
        raise UserError(f"A metadata table has both '{taken[0]}' and a file_name column that would become it.")
    return table.rename_columns(renames) if renames else table


def read_tables(paths: list[Path], json_field: str | None):
    """One split from one or more table files of the same kind; csv and tsv as text, JSON documents from their
    `json_field` list of records."""
    from datasets import Features, Value, load_dataset

    suffixes = {path.suffix.lower() for path in paths}
    unknown = suffixes - set(TABLE_SUFFIXES)
    if unknown or len({TABLE_SUFFIXES[s] for s in suffixes - unknown}) > 1:
        raise UserError(
            f"Cannot read {', '.join(str(p) for p in paths)} as one table: use files of one kind among "
            f"{', '.join(sorted(TABLE_SUFFIXES))}."
        )
    kind = TABLE_SUFFIXES[suffixes.pop()]
    for path in paths:
        check_text_file(path, json_field)
    names = [str(path) for path in paths]
    if kind == "csv":
        sep = "\t" if paths[0].suffix.lower() == ".tsv" else ","
        header = csv_header(paths[0], sep)
        features = Features({column: Value("string") for column in header})
        return load_dataset(
            "csv",
            data_files={"train": names},
            sep=sep,
            features=features,
            encoding="utf-8-sig",
            keep_default_na=False,  # "NA", "None", "null" are answers too; only an empty cell is missing
            na_values=[""],
        )["train"]
    if kind == "json" and json_field:
        return load_dataset("json", data_files={"train": names}, field=json_field)["train"]
    return load_dataset(kind, data_files={"train": names})["train"]


def csv_header(path: Path, sep: str) -> list[str]:
    """The column names pandas gives a csv's header row (an empty name becomes 'Unnamed: <n>')."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle, delimiter=sep), None)
    if not header:
        raise UserError(f"{path} is empty: its first line should name the columns (file_name,question,answer).")
    return [name if name else f"Unnamed: {n}" for n, name in enumerate(header)]


def check_text_file(path: Path, json_field: str | None = None) -> None:
    """jsonl / json-lines / csv / tsv files are read line by line first, so that invalid UTF-8 or a malformed JSON
    line is reported with its file and line number instead of a parser traceback. A JSON document (not lines) is
    parsed here too, to say where its records are when they sit under a key."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        return
    json_lines = suffix == ".jsonl"
    number = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(
                    f"{path}, line {number}: not valid UTF-8 (byte {error.start + 1} of the line). Save it as UTF-8."
                ) from None
            if suffix == ".json" and number == 1:
                try:
                    json_lines = isinstance(json.loads(line), dict) and not json_field  # one object per line
                except json.JSONDecodeError:
                    json_lines = False  # a JSON document over several lines
                continue
            if json_lines and line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as error:
                    where = f"{path}, line {number}"
                    raise UserError(f"{where}: not valid JSON ({error.msg}, column {error.colno}).") from None
    if suffix == ".json" and (not json_lines or number == 1):  # one line may be a whole document too
        _check_json_document(path, json_field)


def _check_json_document(path: Path, json_field: str | None) -> None:
    """A JSON document holds its rows as a top-level list, or under the key json_field names (DocVQA's official
    files: {"dataset_name": ..., "data": [{"image": ..., "question": ..., "answers": [...]}, ...]})."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}, column {error.colno}).") from None
    records = [key for key, value in document.items() if _is_records(value)] if isinstance(document, dict) else []
    if json_field:
        if not isinstance(document, dict) or not _is_records(document.get(json_field)):
            keys = ", ".join(document)[:200] if isinstance(document, dict) else f"a {type(document).__name__}"
            hint = f" Its records are under '{records[0]}': set json_field: {records[0]}." if records else ""
            raise UserError(
                f"{path}: json_field is '{json_field}', but the file's top level holds no list of records under that "
                f"key (it has: {keys}).{hint}"
            )
    elif records and not all(isinstance(value, list) for value in document.values()):
        raise UserError(
            f"{path} is one JSON document whose rows are the list under '{records[0]}'. Set json_field: "
            f"{records[0]} in the recipe."
        )


def _is_records(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def split_files(source: str, data_files=None) -> dict[str, str]:
    """For error messages: the tables behind each split of a local source ({'test': 'test.jsonl'})."""
    from datasets import load_dataset_builder

    path = Path(source).expanduser()
    if data_files is not None:
        named = data_files if isinstance(data_files, dict) else {"train": data_files}
        return {str(split): names if isinstance(names, str) else ", ".join(names) for split, names in named.items()}
    if path.is_file():
        return {"train": path.name}
    if not path.is_dir() or _saved_with_save_to_disk(path):
        return {}
    try:
        data_files = load_dataset_builder(str(path)).config.data_files or {}
    except Exception:  # only a message depends on it
        return {}
    tables = {
        str(split): [Path(name).name for name in names if Path(name).suffix.lower() in TABLE_SUFFIXES]
        for split, names in data_files.items()
    }
    return {split: ", ".join(names) for split, names in tables.items() if names}
