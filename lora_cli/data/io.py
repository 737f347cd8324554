"""Reading data files: .csv / .tsv / .json (a list of objects) / .jsonl (one object per line) / .parquet / .txt
(plain text) -> a `Table`, a pandas DataFrame of the file's values with what messages need (the path, each row's
source line). Every problem with a file is one DataError line naming the file and the row or line.

Values are never guessed: CSV/TSV values are strings as written ("NA", "null" and "" stay strings), JSON and
Parquet values keep their type (1 stays 1, not 1.0) and a missing key or a null is a missing cell; lora_cli.data
turns a value into text with `cell_value`. Row numbers in messages count data rows from 1 (a header is not a
row); CSV/TSV/JSONL messages add the line. A hub dataset (hf://datasets/OWNER/NAME) or a save_to_disk directory
is read by data.hub.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from lora_cli.config import DELIMITED_SUFFIXES, SUPPORTED_SUFFIXES, DataConfig
from lora_cli.data.hub import hub_name_problem, is_hub_dataset, is_saved_dataset, read_dataset
from lora_cli.errors import ConfigError, DataError, first_line
from lora_cli.jsonvalues import lone_surrogate

if TYPE_CHECKING:  # pandas is imported when a file is read, so importing lora_cli.data stays light
    import pandas as pd

SUFFIXES_HELP = ".csv, .tsv, .json (a list of objects), .jsonl (one object per line), .parquet or .txt (plain text)"


@dataclass
class Table:
    """A data file's rows: `frame` holds the values (strings for CSV/TSV, the values as written for JSON and
    Parquet, None where a record lacks the key or holds a null). `lines`: each row's source line (CSV, TSV,
    JSONL), for messages."""

    frame: "pd.DataFrame"
    path: str = "data"
    lines: list[int] | None = None
    classes: dict[str, list[str]] = field(default_factory=dict)  # a datasets ClassLabel column's names, in order

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.frame.columns]

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, column: str) -> list:
        return self.frame[column].tolist()

    def row(self, i: int) -> list:
        return self.frame.iloc[i].tolist()

    def to_csv(self, rows: Sequence[int]) -> str:
        """These rows as CSV text under a header line, missing values as empty fields."""
        part = self.frame.iloc[list(rows)]
        binary = [c for c in part.columns if any(isinstance(v, (bytes, bytearray)) for v in part[c])]
        if binary:  # a Parquet binary column: its text, as training read it (pandas would write b'...')
            part = part.copy()
            for column in binary:
                part[column] = [_plain(v) for v in part[column]]
        return part.to_csv(index=False, lineterminator="\n")

    def nested(self, rows: Sequence[int]) -> bool:
        """Whether any of these rows holds a list or an object (chat messages), which CSV can only hold as text."""
        return any(isinstance(v, (list, dict)) or getattr(v, "ndim", 0) > 0  # Parquet's lists are numpy arrays
                   for r in rows for v in self.frame.iloc[r].tolist())

    def to_jsonl(self, rows: Sequence[int]) -> str:
        """These rows as JSON lines, one object per row: nested values (chat messages) as JSON, missing keys left
        out."""
        lines = []
        for r in rows:
            record = {c: _plain(v) for c, v in zip(self.columns, self.frame.iloc[r].tolist())}
            lines.append(json.dumps({c: v for c, v in record.items() if v is not None}, ensure_ascii=False))
        return "".join(line + "\n" for line in lines)


def _plain(value: Any) -> Any:
    """A frame's value as JSON holds it: Parquet's numpy arrays and scalars as lists and numbers, NaN as None,
    bytes as text."""
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, (bytes, bytearray)):  # a Parquet binary column: UTF-8 text as training reads it
        return bytes(value).decode("utf-8", errors="replace")
    return value


def source_problem(path: str | Path, key: str) -> str | None:
    """What is wrong with a data source before it is read, or None: a malformed hub dataset name (the hub is not
    asked), a path that does not exist, a directory that save_to_disk did not write, an unsupported file type."""
    if is_hub_dataset(path):
        return hub_name_problem(str(path), key)
    path = Path(path)
    if not path.exists():
        where = (f"a relative path is read from the current folder, {Path.cwd()}" if key.startswith("--")
                 else "relative paths are resolved against the config file's folder")
        return f"{key}: {path} does not exist; check the path ({where})"
    if path.is_dir():
        if is_saved_dataset(path):
            return None
        return (f"{key}: {path} is a directory; name a data file (.csv, .tsv, .json, .jsonl, .parquet or .txt) or a "
                "directory written by datasets' save_to_disk")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        shown = repr(path.suffix.lower()) if path.suffix else "(no extension)"
        return f"{key}: {path}: unsupported file type {shown}; use {SUFFIXES_HELP}"
    return None


def read_table(path: str | Path, data_cfg: DataConfig, key: str = "data.train") -> Table:
    """Read a data file into a Table with pandas.

    CSV/TSV: pandas reads the values as strings (dtype=str, no NA guessing); the csv module first checks the
    records, because pandas pads short rows silently and counts rows, not source lines: ragged rows are an
    error naming the row and line. TSV uses QUOTE_NONE (a `"` is text, as in the SMS Spam Collection). JSON and
    JSONL are parsed with the json module (exact line and column in errors; pandas' read_json would turn an int
    column with a missing value into floats) and framed by pandas. Parquet is read by pandas with pyarrow. A .txt
    file becomes one row with a `text` column. `key` names the config key in messages (data.train, data.val,
    data.test, --data).
    """
    problem = source_problem(path, key)
    if problem:
        raise DataError(problem)
    if is_hub_dataset(path) or is_saved_dataset(path):  # through the `datasets` library (data.hub)
        frame, classes = read_dataset(str(path), data_cfg, key)
        return Table(frame, path=str(path), classes=classes)
    path = Path(path)
    suffix = path.suffix.lower()
    # pandas is imported here, when a data file is read, not with lora_cli.data: with the pyarrow it loads it
    # costs ~1 s and ~75 MB, which `lora --help` and commands without data files should not pay.
    import pandas as pd

    if suffix == ".parquet":
        table = Table(_read_parquet(path))
    else:
        text = _read_utf8(path)
        if not text.strip():
            raise DataError(f"{path}: the file is empty; it needs at least one data row")
        if suffix == ".txt":
            table = Table(pd.DataFrame({"text": [text]}, dtype=object))
        elif suffix in DELIMITED_SUFFIXES:
            table = _read_delimited(text, path, data_cfg)
        elif suffix == ".json":
            records = _read_json(text, path)
            _check_fields(records, path)
            table = Table(_frame(records))
        else:
            records, lines = _read_jsonl(text, path)
            _check_fields(records, path, lines)
            table = Table(_frame(records), lines=lines)
    if len(table) == 0:
        what = "an empty list" if suffix == ".json" else "only a header"
        raise DataError(f"{path}: no data rows ({what}); add at least one row")
    table.path = str(path)
    return table


def _read_utf8(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; check the file's permissions") from exc
    if raw.startswith(codecs.BOM_UTF8):  # Excel writes a BOM; it is not part of the first column's name
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at line {line} (byte offset "
                        f"{exc.start}); re-save the file as UTF-8") from None


def _read_delimited(text: str, path: Path, cfg: DataConfig) -> Table:
    import pandas as pd  # lazily, as in read_table

    tsv = path.suffix.lower() == ".tsv"
    if not cfg.header and not cfg.column_names:
        raise ConfigError("data.column_names: is required when header is false (names for the columns, e.g. "
                          "[label, text])")
    quoting = csv.QUOTE_MINIMAL if not tsv or _csv_quoted(text) else csv.QUOTE_NONE
    header, lines = _check_records(text, path, cfg, tsv, quoting)
    other = "," if tsv else "\t"
    if len(header) == 1 and other in header[0]:  # one column whose name holds the other separator: misnamed
        kind, suffix = ("comma", ".csv") if tsv else ("tab", ".tsv")
        raise DataError(f"{path}: the header is one column, {header[0][:60]!r}, with {kind}s in it: the file looks "
                        f"{kind}-separated; name it {suffix}")
    names = list(cfg.column_names) if cfg.column_names else header
    names = [n.strip() or f"column_{i + 1}" for i, n in enumerate(names)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        where = "the column names given (data.column_names or --column-names)" if cfg.column_names else "the header"
        raise DataError(f"{path}: duplicate column name {duplicates[0]!r} in {where}; give every column a distinct "
                        "name")
    frame = pd.read_csv(io.StringIO(text, newline=""), sep="\t" if tsv else ",", quoting=quoting,
                        header=0 if cfg.header else None, names=names, dtype=str, keep_default_na=False,
                        na_filter=False, skip_blank_lines=True, engine="c")
    if len(frame) != len(lines):  # a bug, not bad data: the two readers must agree on the records
        raise AssertionError(f"{path}: pandas read {len(frame)} rows, the csv module {len(lines)}")
    return Table(frame, lines=lines)


# A tab-separated field quoted as Python's csv module and pandas' to_csv(sep="\t") quote one: wrapped in quotes,
# its own quotes doubled. Only a writer that quotes makes one holding a doubled quote, a tab or a line break.
_QUOTED_FIELD = re.compile(r'(?:^|\t)"((?:[^"]|"")*)"(?=\t|\r?\n|$)', re.MULTILINE)


def _csv_quoted(text: str) -> bool:
    """Whether a TSV file was written with CSV quoting (then read with it, so the quotes are not kept as text).
    Otherwise a TSV is read unquoted, as the SMS Spam Collection is written: a `"` there is part of the text.

    A quote that opens one row's text can pair with a quote that closes another row's text lines later (the SMS
    Spam Collection has texts of each kind), which looks like a quoted field holding line breaks. So when every
    line read unquoted is a row of one width, and reading the file quoted would make fewer rows of them, the
    quotes are text: read quoted, those rows merged into one without a word."""
    if not any('""' in m.group(1) or "\t" in m.group(1) or "\n" in m.group(1) for m in _QUOTED_FIELD.finditer(text)):
        return False
    unquoted = _tsv_widths(text, csv.QUOTE_NONE)
    rows_of_one_width = len(set(unquoted)) == 1 and unquoted[0] > 1  # one column: every line is "one field"
    return not (rows_of_one_width and len(_tsv_widths(text, csv.QUOTE_MINIMAL)) < len(unquoted))


def _tsv_widths(text: str, quoting: int) -> list[int]:
    """The number of fields of each non-blank row of a TSV text read with `quoting`."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=quoting, strict=False)
    return [len(row) for row in reader if row and any(field.strip() for field in row)]


def _check_records(text: str, path: Path, cfg: DataConfig, tsv: bool, quoting: int) -> tuple[list[str], list[int]]:
    """(header names or [], each data row's first line), after checking every record with the csv module: a
    quoting error names its line, a row with the wrong number of fields names its row and line."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the default 128 KiB cap rejects long documents
    last = [""]  # the source line the reader took last: tells a blank line from a quoted blank field ("")

    def source_lines():
        for line in io.StringIO(text, newline=""):
            last[0] = line
            yield line

    reader = csv.reader(source_lines(), delimiter="\t" if tsv else ",", quoting=quoting, strict=not tsv)
    widths: list[int] = []
    lines: list[int] = []
    header: list[str] | None = None
    header_line = 0
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or (len(row) == 1 and not last[0].strip(" \t\r\n")):  # pandas: spaces and tabs only
                continue  # a blank or whitespace-only line, which pandas skips too
            if header is None and cfg.header:
                header, header_line = row, line
                continue
            widths.append(len(row))
            lines.append(line)
    except csv.Error as exc:
        raise DataError(f"{path}: line {start}: cannot parse {'TSV' if tsv else 'CSV'} ({exc}); check the "
                        "quoting on that line") from None
    if cfg.column_names and header is not None and len(header) != len(cfg.column_names):
        raise DataError(f"{path}: data.column_names has {len(cfg.column_names)} names but the header on line "
                        f"{header_line} has {len(header)} columns; give one name per column")
    names = list(cfg.column_names or header or [])
    if not names:
        raise DataError(f"{path}: the file is empty; it needs a header row and at least one data row")
    ragged = [i for i, width in enumerate(widths) if width != len(names)]
    if ragged:
        i = ragged[0]
        more = f" ({len(ragged) - 1} more rows like it)" if len(ragged) > 1 else ""
        hint = "check for tab characters inside the text" if tsv else "quote fields that contain commas"
        raise DataError(f"{path}: row {i + 1} (line {lines[i]}) has {widths[i]} fields, expected "
                        f"{len(names)} ({', '.join(names)}){more}; {hint}")
    return header or [], lines


class JsonValueError(Exception):
    """A JSON text json reads without a word, but wrongly. str(): what is wrong, to follow where it is (a line) or
    `subject` (in a whole file: "an object names ...")."""

    subject = "a value"


class RepeatedKey(JsonValueError):
    """A JSON object naming one key twice (json keeps the last value without a word); args[0]: the key."""

    subject = "an object"

    def __str__(self) -> str:
        return f"names the key {self.args[0]!r} twice, and only one value can be read; remove or rename one of them"


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    record: dict = {}
    for key, value in pairs:
        if key in record:
            raise RepeatedKey(key)
        record[key] = value
    return record


class TooDeep(JsonValueError):
    """JSON nested past what json's recursive reader takes (its RecursionError: about a thousand levels)."""

    def __str__(self) -> str:
        return "is nested too deeply to read (over a thousand lists or objects inside each other); flatten it"


class LoneSurrogate(JsonValueError):
    """A string holding half of a UTF-16 surrogate pair (the escape \\ud800 alone): json reads it, but it is no
    Unicode character, and writing the text anywhere (a split, predictions, a path) fails; args[0]: the escape."""

    def __str__(self) -> str:
        return (f"holds the escape {self.args[0]}, half of a UTF-16 surrogate pair, which is no character; write the "
                "character itself, or both halves of its pair")


# The escape of a UTF-16 surrogate (\ud800-\udfff): only a text holding one can read as a lone surrogate
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _loads(text: str, **hooks) -> Any:
    """json.loads with the checks every JSON input gets: RepeatedKey, TooDeep, LoneSurrogate."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, **hooks)
    except RecursionError:
        raise TooDeep() from None
    # walked only where the text holds such an escape (a pair reads as one character, an escaped "\\\\ud800" as text)
    found = lone_surrogate(value) if _SURROGATE_ESCAPE.search(text) else None
    if found:
        raise LoneSurrogate(found[1])
    return value


def loads_unique(text: str) -> Any:
    """json.loads, raising RepeatedKey for an object that names a key twice, TooDeep and LoneSurrogate (data files,
    prompt and chat input)."""
    return _loads(text)


class NotFinite(JsonValueError):
    """A JSON number no float holds (1e400) or an Infinity literal; args[0]: it as written."""

    def __str__(self) -> str:
        return (f"holds the number {self.args[0]}, which is no finite number; write a finite number, or quote it to "
                "keep it as text")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotFinite(text)
    return value


def _nan_only(text: str) -> float:
    if text != "NaN":  # Python's json.dumps writes NaN for a missing float: read as missing (encode.cell_value)
        raise NotFinite(text)
    return math.nan


def _load_record(text: str) -> Any:
    """A data file's JSON: loads_unique, and NotFinite where json would read an infinity (a number past the
    float range, 1e400, or an Infinity literal: a label 1e400 became the class "inf")."""
    return _loads(text, parse_float=_finite, parse_constant=_nan_only)


def _read_json(text: str, path: Path) -> list[dict]:
    try:
        data = _load_record(text)
    except JsonValueError as exc:
        raise DataError(f"{path}: {exc.subject} {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}; fix the "
                        "syntax (a .json file holds one list of objects; use .jsonl for one object per line)") from None
    if isinstance(data, dict):
        keys = ", ".join(list(map(str, data))[:5])
        raise DataError(f"{path}: the JSON is an object (keys: {keys}), not a list of records; write the records "
                        "as a list [{...}, {...}] or as .jsonl with one object per line")
    if not isinstance(data, list):
        raise DataError(f"{path}: the JSON is a {_json_type(data)}, not a list of records; write the records as a "
                        "list [{...}, {...}]")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"{path}: row {i + 1} is a {_json_type(item)}, not an object; every item of the list "
                            'must be an object such as {"text": "..."}')
    return data


def _read_jsonl(text: str, path: Path) -> tuple[list[dict], list[int]]:
    records, lines = [], []
    # Split on \n only: str.splitlines would also split on U+2028, which JSON allows inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            item = _load_record(line)
        except JsonValueError as exc:
            raise DataError(f"{path}: line {number} {exc}") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg} at column {exc.colno}); fix or "
                            "remove that line") from None
        if not isinstance(item, dict):
            raise DataError(f"{path}: line {number} is a {_json_type(item)}, not a JSON object; each line must "
                            'be one object such as {"text": "..."}')
        records.append(item)
        lines.append(number)
    return records, lines


def _json_type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_fields(records: list[dict], path: Path, lines: list[int] | None = None) -> None:
    """Records that are all empty objects make a table with no columns and so no rows: say what they are (it was
    "no data rows (an empty list)" for a list of two {})."""
    if records and not any(records):
        where = f"row 1 (line {lines[0]})" if lines else "row 1"
        raise DataError(f"{path}: {where}: every record is an empty object {{}}; give each record its fields (e.g. "
                        "instruction and output, prompt and completion, text, or messages)")


def _frame(records: list[dict]) -> "pd.DataFrame":
    """Records -> DataFrame with object dtype, so JSON values keep their type (1 stays 1, not 1.0 as pandas'
    inference would make it next to a missing value); a key absent from a record is None."""
    import pandas as pd  # lazily, as in read_table

    columns: dict[str, None] = {}
    for record in records:
        for key in record:
            columns.setdefault(str(key), None)
    return pd.DataFrame({c: [r.get(c) for r in records] for c in columns}, columns=list(columns), dtype=object)


def _read_parquet(path: Path) -> "pd.DataFrame":
    """A Parquet file -> DataFrame with object dtype holding Python values: strings, ints, floats, bools,
    datetimes as written (cell_value gives their text as a CSV shows them), nulls as None (missing cells), lists
    and structs as lists and dicts (not text, as in JSON)."""
    import pandas as pd  # lazily, as in read_table
    import pyarrow as pa  # pandas' Parquet engine, a dependency for this

    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty; it needs at least one data row")
    import pyarrow.parquet as pq

    try:
        schema_names = [str(n) for n in pq.read_schema(path).names]
        # (pandas' reader fails on a repeated name with Arrow's "Multiple matches for FieldRef": say it plainly)
        duplicates = sorted({n for n in schema_names if schema_names.count(n) > 1})
        if duplicates:
            raise DataError(f"{path}: duplicate column name {duplicates[0]!r}; give every column a distinct name")
        # Arrow types, not numpy's: an int column with a null stays ints (numpy would make it float, 1 -> 1.0).
        frame = pd.read_parquet(path, dtype_backend="pyarrow")
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read Parquet ({first_line(exc)}); check that it is a Parquet file "
                        "(e.g. written by pandas' to_parquet)") from None
    names = [str(c) for c in frame.columns]
    values = {name: pa.array(frame[c].array).to_pylist() for name, c in zip(names, frame.columns)}
    return pd.DataFrame(values, columns=names, dtype=object)
