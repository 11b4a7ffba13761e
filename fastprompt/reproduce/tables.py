"""Published tables shipped as data (`fastprompt/reproduce/tables/*.toml`), loaded and checked.

A table file holds one printed table: its source (paper, arXiv id, table number, setting, and
where each number was read), the datasets of its columns with the paper's headers, the recipe
every row shares (`protocol`, `shots`, `classes`, `train`), and one `[[rows]]` entry per printed
row: its label as printed, the method and options of ours that compute it, and its numbers as
printed (`numbers`: dataset -> accuracy, or [base, new, H] for a base-to-new table; `average`
for the printed Average). A dataset a row has no number for (the paper's "-") is not run for
that row. A row whose method this fastprompt lacks is kept, marked not available
(`Row.available`), and shown in the report with the paper's numbers only.

`fastprompt reproduce NAME` takes a shipped table by name, or any such file by its path.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastprompt.errors import FastpromptError

TABLES_DIR = Path(__file__).with_name("tables")
CLASSES = ("all", "base")  # all: accuracy per dataset; base: train on base, base / new / H per dataset
AVERAGE = "average"  # the key of a row's printed Average in `numbers`
TABLE_KEYS = {"name", "title", "source", "datasets", "columns", "shots", "classes", "protocol", "train", "seeds",
              "decimals", "average", "notes", "rows"}
SOURCE_KEYS = {"paper", "arxiv", "table", "setting", "read_from"}
ROW_KEYS = {"label", "method", "options", "train", "protocol", "numbers", "note", "arithmetic_off"}


@dataclass(frozen=True)
class Source:
    paper: str  # authors, title, venue
    arxiv: str  # arXiv id, e.g. "2208.08340" ("" where the paper has none)
    table: str  # "Table 1"
    setting: str  # backbone, shots, what a number is
    read_from: str  # where every number of this file was read (URL or file, and the table)


@dataclass(frozen=True)
class Row:
    label: str  # as printed, e.g. "VLP-CLIP-CAVPT"
    method: str  # a fastprompt method name (`fastprompt methods`), or one not implemented yet
    options: dict  # method options (create_model keywords), e.g. {"text_prompt": True}
    train: dict  # TrainConfig fields this row sets beyond the table's
    protocol: Optional[str]  # the table's protocol unless the row names another
    numbers: dict  # dataset (or "average") -> float, or [base, new, H]
    note: str = ""  # how the row maps to ours, where that is not obvious
    arithmetic_off: str = ""  # the printed Average or H does not follow from the printed numbers: said, kept as printed

    @property
    def available(self) -> bool:
        """Whether this fastprompt has the row's method (asked of the registry when called)."""
        from fastprompt.methods import METHODS

        return self.method in METHODS

    @property
    def trains(self) -> bool:
        """A trained method (a sweep); zero-shot CLIP is evaluated once per dataset instead."""
        return self.method != "zeroshot"

    @property
    def slug(self) -> str:
        """The row's folder under OUT/rows: its label in lower case, runs of other characters as '-'."""
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")

    def datasets(self, table: "PaperTable") -> list[str]:
        """The table's datasets this row has a printed number for, in the table's order; every
        dataset where the source prints the row's average alone (a README's table of averages)."""
        printed = [d for d in table.datasets if d in self.numbers]
        return printed or list(table.datasets)


@dataclass(frozen=True)
class PaperTable:
    name: str  # what `fastprompt reproduce NAME` takes
    title: str
    source: Source
    datasets: list[str]  # fastprompt dataset names (the .beton sidecar's "name"), in the paper's column order
    columns: dict  # dataset -> the paper's column header
    shots: int  # training images per class
    classes: str  # "all" or "base" (base-to-new)
    protocol: Optional[str]  # `fastprompt protocols` name every row trains under (a row may name another)
    train: dict  # TrainConfig fields every row shares beyond the protocol's (e.g. clip for a test table)
    seeds: list[int]  # the paper's runs per cell
    decimals: int  # printed decimals
    average: bool  # the paper prints an Average column
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    path: str = ""  # the file it was read from

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("acc",) if self.classes == "all" else ("base", "new", "H")

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)


def table_names() -> list[str]:
    """The shipped tables, by name."""
    return sorted(p.stem for p in TABLES_DIR.glob("*.toml"))


def load_table(name_or_path: str) -> PaperTable:
    """A shipped table by name, or a table file by its path; FastpromptError naming the problem."""
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") and path.is_file()):
        path = TABLES_DIR / f"{text}.toml"
        if not path.is_file():
            raise FastpromptError(f"unknown table {text!r}; use one of {', '.join(table_names())} "
                                  "(`fastprompt reproduce --list`) or the path of a table .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise FastpromptError(f"{path} is not a readable TOML table ({err}); fix or restore the file") from None
    return parse_table(data, str(path))


def _fail(where: str, problem: str) -> None:
    raise FastpromptError(f"{where}: {problem}")


def _unknown(where: str, given: dict, allowed: set) -> None:
    extra = sorted(set(given) - allowed)
    if extra:
        _fail(where, f"unknown key(s) {', '.join(extra)}; allowed: {', '.join(sorted(allowed))}")


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 100:
        _fail(where, f"{value!r} must be an accuracy in 0..100 as printed")
    return float(value)


def parse_table(data: dict, path: str) -> PaperTable:
    """A `PaperTable` from a table file's TOML, every field checked (FastpromptError naming the
    file, the field and the fix)."""
    from fastprompt.training.config import TrainConfig
    from fastprompt.training.protocols import PROTOCOLS

    _unknown(path, data, TABLE_KEYS)
    for key in ("name", "title", "source", "datasets", "columns", "shots", "rows"):
        if key not in data:
            _fail(path, f"lacks '{key}'; every table file names it (see fastprompt/reproduce/tables.py)")
    source = data["source"]
    if not isinstance(source, dict):
        _fail(path, "source must be a table with paper, arxiv, table, setting, read_from")
    _unknown(f"{path} [source]", source, SOURCE_KEYS)
    for key in SOURCE_KEYS:
        if not isinstance(source.get(key), str) or (key != "arxiv" and not source[key].strip()):
            _fail(f"{path} [source]", f"{key} must be a string saying it (where every number was read, for read_from)")
    datasets = data["datasets"]
    if not (isinstance(datasets, list) and datasets and all(isinstance(d, str) and d for d in datasets)
            and len(set(datasets)) == len(datasets)):
        _fail(path, f"datasets={datasets!r} must list each dataset name once (the .beton sidecar's name, e.g. eurosat)")
    columns = data["columns"]
    if not (isinstance(columns, dict) and set(columns) == set(datasets) and all(isinstance(v, str) for v in columns.values())):
        _fail(path, "columns must give every dataset of `datasets` its printed header, e.g. {eurosat = \"EuroSAT\"}")
    classes = data.get("classes", "all")
    if classes not in CLASSES:
        _fail(path, f"classes={classes!r} must be one of {', '.join(CLASSES)}")
    shots = data["shots"]
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        _fail(path, f"shots={shots!r} must be an integer >= 1")
    seeds = data.get("seeds", [1, 2, 3])
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        _fail(path, f"seeds={seeds!r} must be a list of integers >= 0")
    protocol = data.get("protocol")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"method", "data", "out", "shots", "seed",
                                                                        "options", "classes", "protocol"}
    from fastprompt.methods import METHODS

    # a row whose method is not here yet may name the protocol that method will bring
    for where, proto in ((path, protocol), *((f"{path} row {r.get('label')!r}", r.get("protocol")) for r in data["rows"]
                                             if isinstance(r, dict) and r.get("method") in METHODS)):
        if proto is not None and proto not in PROTOCOLS:
            _fail(where, f"protocol={proto!r} is not one of `fastprompt protocols`: {', '.join(PROTOCOLS)}")
    train = data.get("train", {})
    if not isinstance(train, dict) or set(train) - train_fields:
        _fail(path, f"train={train!r} must be a table of `fastprompt train` settings ({', '.join(sorted(train_fields))})")
    rows = [_parse_row(r, k, path, datasets, classes, train_fields) for k, r in enumerate(data["rows"], 1)]
    labels = [r.label for r in rows]
    if len(set(labels)) != len(labels) or len({r.slug for r in rows}) != len(rows):
        _fail(path, f"row labels {labels!r} must differ (also in lower case, punctuation aside: each row has a folder)")
    decimals = data.get("decimals", 2)
    notes = data.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        _fail(path, "notes must be a list of strings")
    return PaperTable(name=str(data["name"]), title=str(data["title"]), source=Source(**source), datasets=list(datasets),
                      columns=dict(columns), shots=shots, classes=classes, protocol=protocol, train=dict(train),
                      seeds=list(seeds), decimals=int(decimals), average=bool(data.get("average", True)), rows=rows,
                      notes=list(notes), path=path)


def _parse_row(row: Any, k: int, path: str, datasets: list, classes: str, train_fields: set) -> Row:
    from fastprompt.methods import METHODS

    where = f"{path} row {k}"
    if not isinstance(row, dict):
        _fail(where, "must be a table ([[rows]])")
    _unknown(where, row, ROW_KEYS)
    for key in ("label", "method", "numbers"):
        if key not in row:
            _fail(where, f"lacks '{key}'")
    where = f"{path} row {row['label']!r}"
    method, options = row["method"], row.get("options", {})
    if not isinstance(options, dict):
        _fail(where, "options must be a table of method options, e.g. {text_prompt = true}")
    if method in METHODS:
        valid = set(METHODS[method].options.field_names())
        bad = sorted(set(options) - valid)
        if bad:
            _fail(where, f"{method} has no option(s) {', '.join(bad)}; its options: {', '.join(sorted(valid)) or 'none'}")
    train = row.get("train", {})
    if not isinstance(train, dict) or set(train) - train_fields:
        _fail(where, f"train={train!r} must be a table of `fastprompt train` settings ({', '.join(sorted(train_fields))})")
    numbers = row["numbers"]
    if not isinstance(numbers, dict) or not numbers:
        _fail(where, "numbers must be a table: dataset = accuracy as printed (average = the printed Average)")
    extra = sorted(set(numbers) - set(datasets) - {AVERAGE})
    if extra:
        _fail(where, f"numbers name {', '.join(extra)}, not datasets of this table ({', '.join(datasets)})")
    parsed = {}
    for key, value in numbers.items():
        if classes == "base":
            if not (isinstance(value, list) and len(value) == 3):
                _fail(f"{where} numbers.{key}", f"{value!r} must be [base, new, H] as printed")
            parsed[key] = [_number(f"{where} numbers.{key}", v) for v in value]
        else:
            parsed[key] = _number(f"{where} numbers.{key}", value)
    return Row(label=str(row["label"]), method=str(method), options=dict(options), train=dict(train),
               protocol=row.get("protocol"), numbers=parsed, note=str(row.get("note", "")),
               arithmetic_off=str(row.get("arithmetic_off", "")))


def tables_markdown() -> str:
    """docs/methods.md's list of the shipped tables: each with its source and how its rows map to
    ours (tests/reproduce/test_tables.py checks the document holds it verbatim)."""
    parts = []
    for name in table_names():
        t = load_table(name)
        s = t.source
        arxiv = f", arXiv {s.arxiv}" if s.arxiv else ""
        lines = [f"#### `{name}`", "", f"{t.title}. {s.paper}{arxiv}: {s.table}. {s.setting}. Numbers read from {s.read_from}.",
                 "", f"Datasets: {', '.join(t.datasets)}; {t.shots} shots, classes {t.classes}, seeds "
                 f"{','.join(map(str, t.seeds))}; protocol `{t.protocol or 'none'}` unless a row names another.", "",
                 "| row (as printed) | ours | note |", "|---|---|---|"]
        for r in t.rows:
            ours = " ".join([f"`--method {r.method}`"]
                            + [f"`{k}={v}`" for k, v in {**r.train, **r.options}.items()]
                            + ([f"`--protocol {r.protocol}`"] if r.protocol else []))
            note = "; ".join(x for x in (r.note, r.arithmetic_off) if x)
            lines.append(f"| {r.label} | {ours} | {note} |")
        lines += [""] + [f"- {n}" for n in t.notes]
        parts.append("\n".join(lines).rstrip())
    return "\n\n".join(parts) + "\n"
