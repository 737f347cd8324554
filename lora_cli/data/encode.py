"""Datasets: read a table, detect its format, render prompts, tokenise, mask, split and batch.

The pipeline, in the order `load_splits` runs it:

1. `read_table`: .csv / .tsv / .json (a list of objects) / .jsonl (one object per line) / .txt (plain text) ->
   a `Table` of strings (and, for JSON, the values as written). Every problem with the file is one
   DataError line naming the file and the row or line.
2. `detect_format`: the columns decide the format, as mlx-lm's datasets.py does with keys: `alpaca`
   (instruction, optional input, output), `prompt_completion` (prompt, completion), `text` (text) or, for
   `task: classification`, `classification` (text, label). `data.columns` maps any role to any column.
3. `encode_records`: each row -> `Example(ids, loss_mask)`. Prompt and response are encoded separately and
   concatenated, so a prompt's ids are exactly `encode(prompt)`, which is what generation feeds the model.
   `<|endoftext|>` ends every causal-LM example and is a target. User text is encoded with allow_special=False,
   so a literal "<|endoftext|>" in the data is ordinary text.
4. `split_examples`: seeded train/val/test split (stratified by label for classification).
5. `batch_indices` + `collate`: length-grouped, seeded batches padded only to the longest in the batch.

Row numbers in messages count data rows from 1 (a header is not a row); CSV/TSV/JSONL messages add the line.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import random
import string
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from lora_cli.config import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, PROMPT_COMPLETION_TEMPLATE, DataConfig
from lora_cli.errors import ConfigError, DataError, did_you_mean
from lora_cli.tokenizer import EOT_ID, decode, encode

if TYPE_CHECKING:  # torch is imported lazily so `lora --help` stays fast
    import torch

    from lora_cli.config import RunConfig

IGNORE_INDEX = -100  # targets with this value carry no loss (torch cross_entropy's default ignore_index)

# Roles of each format, in the order they are rendered. `input` is the only optional role.
FORMATS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "classification": ("text", "label"),
}
OPTIONAL_ROLES = {"input"}
RESPONSE_ROLE = {"alpaca": "output", "prompt_completion": "completion"}
TABLE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")
SUPPORTED_SUFFIXES = (*TABLE_SUFFIXES, ".txt")
_FORMAT_HELP = (
    "alpaca (instruction, output, optional input), prompt_completion (prompt, completion), text (text)"
)


@dataclass
class Example:
    """One tokenised example. For causal LM, loss_mask[i] is True when token i is a target, i.e. predicted from
    ids[:i] (so loss_mask[0] is always False). For classification, `label` is the class id and loss_mask is all
    False. `row` is the example's 0-based row in the source DataFrame (-1 for chunks of a .txt file)."""

    ids: list[int]
    loss_mask: list[bool]
    label: int | None = None
    row: int = -1

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class DataStats:
    """What reading and encoding one file did; `describe()` is the line the trainer logs."""

    path: str
    fmt: str
    rows: int = 0  # data rows in the file
    examples: int = 0  # examples produced
    skipped: int = 0  # rows skipped for missing/empty fields (data.skip_bad_rows)
    skipped_rows: list[int] = field(default_factory=list)  # their 1-based row numbers (first 20)
    truncated: int = 0  # examples cut to max_length tokens
    dropped: int = 0  # examples left without any target token after truncation (prompt >= max_length)
    tokens: int = 0
    target_tokens: int = 0  # tokens with loss (causal LM)
    mean_length: float = 0.0
    max_length: int = 0
    min_length: int = 0
    max_length_limit: int = 0  # data.max_length at encoding time
    labels: list[str] | None = None  # classification: label strings, index = class id
    label_counts: dict[str, int] | None = None  # classification: examples per label
    undersampled: int = 0  # examples removed by data.balance: undersample

    def describe(self) -> str:
        parts = [f"{self.path}: {self.fmt}, {self.rows} rows -> {self.examples} examples"]
        notes = []
        if self.skipped:
            notes.append(f"{self.skipped} bad rows skipped")
        if self.truncated:
            notes.append(f"{self.truncated} truncated to {self.max_length_limit} tokens")
        if self.dropped:
            notes.append(f"{self.dropped} dropped (no response left after truncation)")
        if self.undersampled:
            notes.append(f"{self.undersampled} removed by undersampling")
        if notes:
            parts.append(f" ({', '.join(notes)})")
        parts.append(f", {self.tokens:,} tokens")
        if self.labels is None:
            parts.append(f" ({self.target_tokens:,} with loss)")
        parts.append(f", length mean {self.mean_length:.1f} / min {self.min_length} / max {self.max_length}")
        if self.label_counts:
            parts.append(", labels " + ", ".join(f"{k}: {v}" for k, v in self.label_counts.items()))
        return "".join(parts)


# ------------------------------------------------------------------------------------------------- reading


@dataclass
class Table:
    """A data file's rows, column by column: `values[column]` holds one value per row (strings for CSV/TSV, the
    values as written for JSON, None where a record lacks the key). `lines`: each row's source line (CSV, TSV,
    JSONL), for messages."""

    columns: list[str]
    values: dict[str, list]
    path: str = "data"
    lines: list[int] | None = None

    def __len__(self) -> int:
        return len(self.values[self.columns[0]]) if self.columns else 0

    def __getitem__(self, column: str) -> list:
        return self.values[column]

    def row(self, i: int) -> list:
        return [self.values[c][i] for c in self.columns]

    def to_csv(self, rows: Sequence[int]) -> str:
        """These rows as CSV text under a header line, missing values as empty fields (pandas' to_csv layout)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.columns)
        missing = lambda v: v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731
        writer.writerows(["" if missing(v) else v for v in self.row(i)] for i in rows)
        return out.getvalue()


def read_table(path: str | Path, data_cfg: DataConfig, key: str = "data.train") -> Table:
    """Read a data file into a Table (CSV/TSV values are strings: "NA" and "" stay strings).

    CSV/TSV are parsed with Python's csv module; ragged rows are an error naming the row. TSV uses QUOTE_NONE
    (a `"` is text, as in the SMS Spam Collection). A .txt file becomes one row with a `text` column.
    `key` names the config key in messages (data.train, data.val, data.test, --data).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise DataError(f"{key}: {path} does not exist; check the path (relative paths are resolved against "
                        "the config file's folder)")
    if path.is_dir():
        raise DataError(f"{key}: {path} is a directory; name a data file (.csv, .tsv, .json, .jsonl or .txt)")
    if suffix not in SUPPORTED_SUFFIXES:
        shown = repr(suffix) if suffix else "(no extension)"
        raise DataError(f"{key}: {path}: unsupported file type {shown}; use .csv, .tsv, .json (a list of "
                        "objects), .jsonl (one object per line) or .txt (plain text)")
    text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it needs at least one data row")
    if suffix == ".txt":
        table = Table(["text"], {"text": [text]})
    elif suffix in (".csv", ".tsv"):
        table = _read_delimited(text, path, data_cfg)
    elif suffix == ".json":
        table = _table(_read_json(text, path))
    else:
        table = _table(*_read_jsonl(text, path))
    if len(table) == 0:
        raise DataError(f"{path}: no data rows (only a header); add at least one row")
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
    tsv = path.suffix.lower() == ".tsv"
    if not cfg.header and not cfg.column_names:
        raise ConfigError("data.column_names: is required when header is false (names for the columns, e.g. "
                          "[label, text])")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the default 128 KiB cap rejects long documents
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, strict=not tsv)
    rows: list[list[str]] = []
    lines: list[int] = []
    names: list[str] | None = None
    header_line = 0
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or row == [""]:
                continue  # blank line
            if names is None and cfg.header:
                names, header_line = row, line
                continue
            rows.append(row)
            lines.append(line)
    except csv.Error as exc:
        raise DataError(f"{path}: line {start}: cannot parse {'TSV' if tsv else 'CSV'} ({exc}); check the "
                        "quoting on that line") from None
    if cfg.column_names:
        if names is not None and len(names) != len(cfg.column_names):
            raise DataError(f"{path}: data.column_names has {len(cfg.column_names)} names but the header on line "
                            f"{header_line} has {len(names)} columns; give one name per column")
        names = list(cfg.column_names)
    if names is None:
        raise DataError(f"{path}: the file is empty; it needs a header row and at least one data row")
    names = [n.strip() or f"column_{i + 1}" for i, n in enumerate(names)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate column name {duplicates[0]!r} in the header; give every column a "
                        "distinct name")
    ragged = [i for i, row in enumerate(rows) if len(row) != len(names)]
    if ragged:
        i = ragged[0]
        more = f" ({len(ragged) - 1} more rows like it)" if len(ragged) > 1 else ""
        hint = "check for tab characters inside the text" if tsv else "quote fields that contain commas"
        raise DataError(f"{path}: row {i + 1} (line {lines[i]}) has {len(rows[i])} fields, expected "
                        f"{len(names)} ({', '.join(names)}){more}; {hint}")
    return Table(names, {name: [row[j] for row in rows] for j, name in enumerate(names)}, lines=lines)


def _read_json(text: str, path: Path) -> list[dict]:
    try:
        data = json.loads(text)
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
            item = json.loads(line)
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


def _table(records: list[dict], lines: list[int] | None = None) -> Table:
    """Records -> Table: JSON values keep their type (1 stays 1, not 1.0); a key absent from a record is None."""
    columns: dict[str, None] = {}
    for record in records:
        for key in record:
            columns.setdefault(str(key), None)
    return Table(list(columns), {c: [r.get(c) for r in records] for c in columns}, lines=lines)


# ------------------------------------------------------------------------------------------ format detection


def detect_format(
    columns: Iterable[Any], data_cfg: DataConfig, task: str = "causal_lm", path: str | Path | None = None
) -> tuple[str, dict[str, str]]:
    """(format, {role: column}) for a table with these columns.

    `data.format: auto` tries alpaca, prompt_completion and text in that order (restricted to the formats that
    have every role named in data.columns) and takes the first whose required columns exist; task
    classification always means the classification format. A role's column is data.columns[role] if given,
    else the column named like the role (matched case-insensitively when there is no exact match).
    """
    columns = [str(c) for c in columns]
    where = f"{path}: " if path is not None else ""
    renames = dict(data_cfg.columns)
    all_roles = list(dict.fromkeys(r for roles in FORMATS.values() for r in roles))
    for role, column in renames.items():
        if role not in all_roles:
            raise ConfigError(f"data.columns.{role}: unknown role{did_you_mean(role, all_roles)}; the roles are "
                              "instruction, input, output (alpaca), prompt, completion (prompt_completion), "
                              "text (text) and text, label (classification)")
        if column not in columns:
            raise DataError(f"{where}column {column!r} named by data.columns.{role} is not in the file; its "
                            f"columns are: {', '.join(columns)}")
    fmt = data_cfg.format
    if task == "classification":
        fmt = "classification"
    elif fmt == "classification":
        raise ConfigError("data.format: classification needs task: classification")
    if fmt == "auto":
        for candidate in ("alpaca", "prompt_completion", "text"):
            if not set(renames) <= set(FORMATS[candidate]):
                continue
            mapping, missing = _map_roles(candidate, renames, columns)
            if not missing:
                return candidate, mapping
        raise DataError(f"{where}cannot tell the data format from the columns ({', '.join(columns)}); expected "
                        f"{_FORMAT_HELP}; set data.format, and data.columns to map roles to your columns "
                        "(e.g. {prompt: mr, completion: ref})")
    for role in renames:
        if role not in FORMATS[fmt]:
            raise ConfigError(f"data.columns.{role}: not a role of format {fmt} (its roles: "
                              f"{', '.join(FORMATS[fmt])})")
    mapping, missing = _map_roles(fmt, renames, columns)
    if missing:
        role = missing[0]
        raise DataError(f"{where}format {fmt} needs a column for {role!r} but there is no column {role!r}; the "
                        f"file's columns are: {', '.join(columns)}; map one with data.columns.{role}: <column>")
    return fmt, mapping


def _map_roles(fmt: str, renames: Mapping[str, str], columns: list[str]) -> tuple[dict[str, str], list[str]]:
    mapping: dict[str, str] = {}
    missing: list[str] = []
    lower = {}
    for c in columns:
        lower.setdefault(c.lower(), []).append(c)
    for role in FORMATS[fmt]:
        if role in renames:
            mapping[role] = renames[role]
        elif role in columns:
            mapping[role] = role
        elif len(lower.get(role, [])) == 1:
            mapping[role] = lower[role][0]  # e.g. E2E's test file spells its column "MR"
        elif role not in OPTIONAL_ROLES:
            missing.append(role)
    return mapping, missing


# ------------------------------------------------------------------------------------------------ rendering


def prompt_template(fmt: str, data_cfg: DataConfig | str | None = None, has_input: bool = False) -> str | None:
    """The prompt template for a row: the custom template if set (data.prompt_template, given as the DataConfig
    or the string itself; used for every row), else the built-in one (alpaca: with or without the Input block
    by `has_input`; prompt_completion: "{prompt}\\n"). None for formats without a prompt (text,
    classification). Adapter metadata should store data.prompt_template (null = the built-in pair), since the
    alpaca default is two templates."""
    custom = data_cfg.prompt_template if isinstance(data_cfg, DataConfig) else data_cfg
    if fmt not in RESPONSE_ROLE:
        return None
    if custom is not None:
        return custom
    if fmt == "alpaca":
        return ALPACA_TEMPLATE if has_input else ALPACA_TEMPLATE_NO_INPUT
    return PROMPT_COMPLETION_TEMPLATE


def template_fields(template: str, fmt: str, columns: Iterable[str]) -> list[str]:
    """The {fields} of a prompt template, checked: each must be a role of the format (not its response) or a
    column of the file. Raises ConfigError naming data.prompt_template."""
    allowed = [r for r in FORMATS[fmt] if r != RESPONSE_ROLE.get(fmt)] + [str(c) for c in columns]
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"data.prompt_template: {exc}; write a literal brace as {{{{ or }}}}") from None
    fields = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit() or any(ch in name for ch in ".["):
            raise ConfigError(f"data.prompt_template: field {{{name}}} is not supported; name a role or a column, "
                              f"e.g. {{{allowed[0]}}}")
        if name == RESPONSE_ROLE.get(fmt):
            raise ConfigError(f"data.prompt_template: {{{name}}} is the response and cannot be in the prompt")
        if name not in allowed:
            raise ConfigError(f"data.prompt_template: unknown field {{{name}}}; use one of: "
                              f"{', '.join(dict.fromkeys(allowed))}")
        fields.append(name)
    return fields


def render_prompt(values: Mapping[str, str], fmt: str, template: DataConfig | str | None = None) -> str:
    """The prompt text for one record. `values` maps roles (and, for custom templates, columns) to text;
    `template` is a DataConfig, a custom template string (e.g. from adapter metadata) or None (built-in), e.g.
    render_prompt({"instruction": "Name a color.", "input": ""}, "alpaca"). Generation uses this too, so a
    prompt at inference is tokenised exactly as in training: encode(render_prompt(...))."""
    chosen = prompt_template(fmt, template, has_input=bool(str(values.get("input") or "").strip()))
    if chosen is None:
        raise ValueError(f"format {fmt} has no prompt")
    return fill_template(chosen, values)


def fill_template(template: str, values: Mapping[str, Any]) -> str:
    """str.format_map restricted to plain {name} fields ({{ and }} are literal braces; an absent name renders
    as ""). A template can come from an adapter file, which is data: attribute or index access ({x.__class__},
    {x[0]}), conversions and format specs ({x:>99999999999} would allocate gigabytes) are refused."""
    out = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"prompt template {template[:60]!r}: {exc}; write a literal brace as {{{{ or }}}}") from None
    for literal, name, spec, conversion in parsed:
        out.append(literal)
        if name is None:
            continue
        if not name or name.isdigit() or "." in name or "[" in name or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ConfigError(f"prompt template {template[:60]!r}: field {{{shown}}} is not a plain {{name}} field; "
                              "use fields such as {instruction} or {prompt}")
        value = values.get(name)
        out.append("" if value is None else str(value))
    return "".join(out)


def encode_pair(prompt: str, response: str, max_length: int, mask_prompt: bool = True) -> tuple[Example, bool]:
    """Prompt + response + <|endoftext|>, each encoded on its own, truncated to max_length tokens.
    Returns (example, truncated). Targets: the response and EOT (mask_prompt) or every token but the first."""
    prompt_ids = encode(prompt)
    response_ids = encode(response) + [EOT_ID]
    ids = prompt_ids + response_ids
    if mask_prompt:
        mask = [False] * len(prompt_ids) + [True] * len(response_ids)
    else:
        mask = [False] + [True] * (len(ids) - 1)
    mask[0] = False  # the first token has nothing to be predicted from
    truncated = len(ids) > max_length
    return Example(ids[:max_length], mask[:max_length]), truncated


def encode_text(text: str, max_length: int) -> tuple[Example, bool]:
    """Plain causal LM: every token but the first is a target; <|endoftext|> ends the text."""
    return encode_pair("", text, max_length, mask_prompt=False)


def chunk_text(text: str, max_length: int) -> list[Example]:
    """A long document (a .txt file) -> chunks of max_length tokens that overlap by one token, so every token
    after the first is a target exactly once (the chunk's first token is context only)."""
    ids = encode(text) + [EOT_ID]
    stride = max_length - 1
    chunks = []
    for start in range(0, max(len(ids) - 1, 1), stride):
        piece = ids[start:start + max_length]
        if len(piece) < 2:
            break
        chunks.append(Example(piece, [False] + [True] * (len(piece) - 1)))
    return chunks


# ------------------------------------------------------------------------------------------------- encoding

_NOT_TEXT = object()


def _cell(value: Any) -> Any:
    """A table value as text; None for missing (None, NaN), _NOT_TEXT for lists/objects."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (dict, list, tuple)):
        return _NOT_TEXT
    return str(value)


def _row_label(frame: Table, i: int) -> str:
    lines = frame.lines
    return f"row {i + 1} (line {lines[i]})" if lines else f"row {i + 1}"


def label_order(values: Iterable[str], data_cfg: DataConfig) -> list[str]:
    """Class ids: data.labels in its order if given, else the distinct labels sorted (numerically when every
    label is an integer, so "2" < "10"). The order is stored with the adapter so ids mean the same later."""
    if data_cfg.labels:
        labels = [str(x) for x in data_cfg.labels]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"data.labels: {dup[0]!r} is listed twice; list every label once")
        return labels
    distinct = set(values)
    try:
        return sorted(distinct, key=lambda x: (int(x), x))
    except ValueError:
        return sorted(distinct)


def encode_records(
    df: Table,
    fmt: str,
    mapping: Mapping[str, str],
    data_cfg: DataConfig,
    path: str | Path | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[list[Example], DataStats]:
    """Rows -> Examples. Rows with a missing or empty required field (or a list/object where text belongs)
    raise one DataError naming the rows, or are skipped and counted with data.skip_bad_rows. For
    classification, `labels` fixes the label order (e.g. the training file's, or an adapter's); otherwise it is
    `label_order`; a label outside a fixed order is a DataError."""
    path = str(path if path is not None else df.path)
    max_length = data_cfg.max_length
    stats = DataStats(path=path, fmt=fmt, rows=len(df), max_length_limit=max_length)
    if fmt == "text" and Path(path).suffix.lower() == ".txt":
        examples = chunk_text(str(df[mapping["text"]][0]), max_length)
        return examples, _finish(stats, examples)

    required = [r for r in FORMATS[fmt] if r not in OPTIONAL_ROLES]
    role_values = {role: df[column] for role, column in mapping.items()}
    extra_columns: list[str] = []
    if fmt in RESPONSE_ROLE and data_cfg.prompt_template is not None:
        fields = template_fields(data_cfg.prompt_template, fmt, df.columns)
        extra_columns = [f for f in dict.fromkeys(fields) if f not in FORMATS[fmt]]
    column_values = {c: df[c] for c in extra_columns}

    bad: list[tuple[int, str, str]] = []  # (row index, column, problem)
    records: list[tuple[int, dict[str, str]]] = []
    for i in range(len(df)):
        values: dict[str, str] = {}
        problem = None
        for role in FORMATS[fmt]:
            if role not in mapping:
                continue
            value = _cell(role_values[role][i])
            if value is _NOT_TEXT:
                problem = problem or (mapping[role], "holds a list or object, not text")
                continue
            if role in required and value is None:
                problem = problem or (mapping[role], "is missing")
            elif role in required and not value.strip():
                problem = problem or (mapping[role], "is empty")
            values[role] = value or ""
        if problem:
            bad.append((i, *problem))
            continue
        for column in extra_columns:
            value = _cell(column_values[column][i])
            values[column] = value if isinstance(value, str) else ""
        records.append((i, values))

    if bad and not data_cfg.skip_bad_rows:
        i, column, what = bad[0]
        more = ""
        if len(bad) > 1:
            others = ", ".join(str(b[0] + 1) for b in bad[1:6])
            more = f" ({len(bad) - 1} more bad rows: {others}{', ...' if len(bad) > 6 else ''})"
        raise DataError(f"{path}: {_row_label(df, i)}: column {column!r} {what}{more}; fill it in or set "
                        "data.skip_bad_rows: true to skip such rows")
    stats.skipped = len(bad)
    stats.skipped_rows = [b[0] + 1 for b in bad[:20]]

    examples: list[Example] = []
    if fmt == "classification":
        fixed = labels is not None or bool(data_cfg.labels)
        order = list(labels) if labels is not None else label_order((v["label"] for _, v in records), data_cfg)
        index = {name: k for k, name in enumerate(order)}
        unknown = [(i, v["label"]) for i, v in records if v["label"] not in index]
        if unknown and fixed:
            i, value = unknown[0]
            source = "data.labels" if labels is None else "the training labels"
            raise DataError(f"{path}: {_row_label(df, i)}: label {value!r} is not one of {source} "
                            f"({', '.join(order)}); fix the label or add it to data.labels")
        for i, values in records:
            ids = encode(values["text"])
            stats.truncated += len(ids) > max_length
            ids = ids[:max_length]
            examples.append(Example(ids, [False] * len(ids), label=index[values["label"]], row=i))
        stats.labels = order
        return examples, _finish(stats, examples)

    for i, values in records:
        if fmt == "text":
            example, truncated = encode_text(values["text"], max_length)
        else:
            prompt = render_prompt(values, fmt, data_cfg)
            example, truncated = encode_pair(prompt, values[RESPONSE_ROLE[fmt]], max_length, data_cfg.mask_prompt)
        stats.truncated += truncated
        if not any(example.loss_mask):
            stats.dropped += 1  # the prompt alone fills max_length: nothing left to learn from
            continue
        example.row = i
        examples.append(example)
    return examples, _finish(stats, examples)


def _finish(stats: DataStats, examples: list[Example]) -> DataStats:
    lengths = [len(e) for e in examples]
    stats.examples = len(examples)
    stats.tokens = sum(lengths)
    stats.target_tokens = sum(sum(e.loss_mask) for e in examples)
    stats.mean_length = stats.tokens / len(lengths) if lengths else 0.0
    stats.max_length = max(lengths, default=0)
    stats.min_length = min(lengths, default=0)
    if stats.labels is not None:
        counts = [0] * len(stats.labels)
        for ex in examples:
            counts[ex.label] += 1
        stats.label_counts = dict(zip(stats.labels, counts))
    return stats


def load_file(
    path: str | Path,
    data_cfg: DataConfig,
    task: str = "causal_lm",
    key: str = "data.train",
    fmt: str | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[list[Example], DataStats, Table, str, dict[str, str]]:
    """Read, detect and encode one file -> (examples, stats, frame, format, mapping). `fmt` forces a format
    (val/test files take the training file's); `labels` forces a label order (val/test, or an adapter's at
    eval time). A file with no usable example is a DataError."""
    frame = read_table(path, data_cfg, key)
    if Path(path).suffix.lower() == ".txt":
        wanted = fmt or ("classification" if task == "classification" else data_cfg.format)
        if wanted not in ("auto", "text"):
            raise DataError(f"{path}: a .txt file is plain text for format text, not {wanted}; use a CSV, TSV, "
                            "JSON or JSONL file with columns")
        fmt, mapping = "text", {"text": "text"}
    else:
        cfg = data_cfg if fmt is None else replace(data_cfg, format=fmt)
        fmt, mapping = detect_format(frame.columns, cfg, task, path)
    examples, stats = encode_records(frame, fmt, mapping, data_cfg, path, labels)
    if not examples:
        why = []
        if stats.skipped:
            why.append(f"{stats.skipped} rows skipped as bad")
        if stats.dropped:
            why.append(f"{stats.dropped} prompts longer than data.max_length={data_cfg.max_length}")
        raise DataError(f"{path}: no usable examples ({', '.join(why) or 'no rows'}); add data"
                        + (" or raise data.max_length" if stats.dropped else ""))
    return examples, stats, frame, fmt, mapping


# --------------------------------------------------------------------------------------- balancing, splits


def undersample(examples: Sequence[Example], seed: int) -> list[Example]:
    """Keep every class's examples down to the smallest class's count, chosen at random (seeded), in the original
    order. As in Raschka, "Build a Large Language Model (From Scratch)", ch. 6 / appendix E
    (`create_balanced_dataset`: 747 spam + 747 of the 4,825 ham)."""
    by_label: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    smallest = min(len(v) for v in by_label.values())
    rng = random.Random(f"undersample:{seed}")
    keep: list[int] = []
    for label in sorted(by_label):
        keep.extend(rng.sample(by_label[label], smallest))
    return [examples[i] for i in sorted(keep)]


def class_weights(examples: Sequence[Example], num_labels: int) -> list[float]:
    """Inverse-frequency weights n / (k * n_c) (scikit-learn's "balanced"): a weighted loss counts every class
    equally. A class absent from the examples gets weight 0."""
    counts = [0] * num_labels
    for ex in examples:
        counts[ex.label] += 1
    present = sum(1 for c in counts if c)
    n = sum(counts)
    return [n / (present * c) if c else 0.0 for c in counts]


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up; Python's round() rounds half to even


def split_examples(
    examples: Sequence[Example],
    val_frac: float,
    test_frac: float,
    seed: int,
    stratify: Sequence[int] | None = None,
) -> tuple[list[Example], list[Example], list[Example]]:
    """Seeded (train, val, test). Sizes are round(n * frac), at least 1 when frac > 0. With `stratify` (one
    label per example) each class is split on its own, so the splits keep the class proportions (sizes rounded
    per class). Each split keeps the input order."""
    n = len(examples)
    rng = random.Random(f"split:{seed}")
    groups: dict[Any, list[int]] = {}
    if stratify is None:
        groups[None] = list(range(n))
    else:
        if len(stratify) != n:
            raise ValueError("stratify needs one label per example")
        for i, label in enumerate(stratify):
            groups.setdefault(label, []).append(i)
    val: list[int] = []
    test: list[int] = []
    for key in sorted(groups, key=repr):  # any fixed order will do; the rng makes the choice
        members = groups[key]
        rng.shuffle(members)
        n_test = _round(len(members) * test_frac)
        n_val = _round(len(members) * val_frac)
        test.extend(members[:n_test])
        val.extend(members[n_test:n_test + n_val])
    # A requested split never comes out empty: take one more example from the largest class.
    for frac, chosen in ((test_frac, test), (val_frac, val)):
        if frac > 0 and not chosen and n > 0:
            taken = set(val) | set(test)
            largest = max(groups.values(), key=lambda m: sum(i not in taken for i in m))
            free = [i for i in largest if i not in taken]
            if free:
                chosen.append(free[-1])
    held = set(val) | set(test)
    train = [i for i in range(n) if i not in held]
    if not train:
        raise DataError(f"too few examples ({n}) to hold out data.val_split={val_frac} and data.test_split="
                        f"{test_frac}; add data or lower the fractions")
    pick = lambda idx: [examples[i] for i in sorted(idx)]  # noqa: E731
    return pick(train), pick(val), pick(test)


# ------------------------------------------------------------------------------------------------- batching


def batch_indices(
    lengths: Sequence[int],
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    group_by_length: bool = True,
    drop_last: bool = False,
    chunk_batches: int = 50,
) -> list[list[int]]:
    """Batches of example indices, a pure function of (lengths, batch_size, seed, epoch, flags).

    Length grouping (as in Hugging Face's LengthGroupedSampler): shuffle, sort each chunk of `chunk_batches`
    batches by length (longest first), cut it into batches, then shuffle the batch order. Batches hold examples
    of similar length, so padding to the longest wastes little, and the order stays random. Without shuffle,
    grouping sorts everything by length (for evaluation). drop_last drops a final short batch.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n = len(lengths)
    order = list(range(n))
    rng = random.Random(f"batches:{seed}:{epoch}")  # a str seed is hashed with SHA-512: stable across runs
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        size = batch_size * chunk_batches if shuffle else max(n, 1)
        order = [i for s in range(0, n, size) for i in sorted(order[s:s + size], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle and group_by_length:
        rng.shuffle(batches)
    return batches


def shard(batches: Sequence[list[int]], rank: int, world_size: int, drop_remainder: bool = False) -> list[list[int]]:
    """This rank's batches: batches[rank::world_size], after making the count a multiple of world_size so every
    rank runs the same number of steps (a rank with fewer would hang the others in all-reduce). By default the
    list is padded by repeating batches from its start (no example is lost; a few are seen twice per epoch, as
    with torch's DistributedSampler); drop_remainder=True drops the last len % world_size batches instead."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    batches = list(batches)
    if not batches:
        return []
    extra = len(batches) % world_size
    if extra:
        if drop_remainder:
            batches = batches[:len(batches) - extra]
        else:
            pad = world_size - extra
            batches += [batches[i % len(batches)] for i in range(pad)]
    return batches[rank::world_size]


@dataclass
class Batch:
    """A padded batch. Causal LM: targets [B, T] with IGNORE_INDEX (-100) where there is no loss. Classification:
    labels [B]. attention_mask is 1 for real tokens, 0 for padding."""

    input_ids: "torch.Tensor"  # [B, T] long
    attention_mask: "torch.Tensor"  # [B, T] long
    targets: "torch.Tensor | None" = None  # [B, T] long (causal LM)
    labels: "torch.Tensor | None" = None  # [B] long (classification)
    n_tokens: int = 0  # real (non-padding) input tokens
    n_targets: int = 0  # tokens with loss (causal LM) or examples (classification)

    def to(self, device: Any, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
                       targets=move(self.targets), labels=move(self.labels))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


def collate(examples: Sequence[Example], pad_id: int = EOT_ID, pad_side: str = "right") -> Batch:
    """Pad a list of examples to the longest in it.

    Causal LM: input_ids = ids[:-1], targets = ids[1:] with -100 where loss_mask[1:] is False and on padding.
    Classification (examples with labels): input_ids = ids, labels [B]; the model pools the last real token, so
    right and left padding give the same result.
    """
    import torch

    if not examples:
        raise ValueError("cannot collate an empty batch")
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side must be right or left, got {pad_side!r}")
    classify = examples[0].label is not None
    if any((ex.label is not None) != classify for ex in examples):
        raise ValueError("a batch mixes classification and causal-LM examples")
    if classify:
        inputs = [ex.ids for ex in examples]
        targets = None
    else:
        inputs = [ex.ids[:-1] for ex in examples]
        targets = [[t if m else IGNORE_INDEX for t, m in zip(ex.ids[1:], ex.loss_mask[1:])] for ex in examples]
    B, T = len(examples), max(len(x) for x in inputs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    target_ids = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if targets is not None else None
    for b, x in enumerate(inputs):
        span = slice(0, len(x)) if pad_side == "right" else slice(T - len(x), T)
        input_ids[b, span] = torch.tensor(x, dtype=torch.long)
        attention[b, span] = 1
        if target_ids is not None:
            target_ids[b, span] = torch.tensor(targets[b], dtype=torch.long)
    n_tokens = int(attention.sum())
    if classify:
        labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
        return Batch(input_ids, attention, labels=labels, n_tokens=n_tokens, n_targets=B)
    n_targets = int((target_ids != IGNORE_INDEX).sum())
    return Batch(input_ids, attention, targets=target_ids, n_tokens=n_tokens, n_targets=n_targets)


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Pad tokens these batches need (sum over batches of longest x size, minus real tokens)."""
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches if b)


def preview(example: Example) -> str:
    """An example as text with the tokens that carry loss in [[double brackets]] (for --dry-run)."""
    if example.label is not None:
        return f"{decode(example.ids)!r} -> label {example.label}"
    out, run, run_mask = [], [], None
    for token, mask in zip(example.ids, example.loss_mask):
        if mask != run_mask and run:
            out.append(f"[[{decode(run)}]]" if run_mask else decode(run))
            run = []
        run.append(token)
        run_mask = mask
    if run:
        out.append(f"[[{decode(run)}]]" if run_mask else decode(run))
    return "".join(out)


# ------------------------------------------------------------------------------------------- the one entry


@dataclass
class DataSplits:
    """Everything the trainer needs from the data section."""

    train: list[Example]
    val: list[Example]
    test: list[Example]
    stats: dict[str, DataStats]  # per file read: "train", and "val"/"test" when those are separate files
    labels: list[str] | None  # classification: label strings, index = class id
    class_weights: list[float] | None  # data.balance: class_weights
    fmt: str
    mapping: dict[str, str] = field(default_factory=dict)  # role -> column of the training file
    frame: Table | None = None  # the training file's rows (Example.row indexes it)

    def describe(self) -> list[str]:
        lines = [s.describe() for s in self.stats.values()]
        lines.append(f"splits: train {len(self.train)}, val {len(self.val)}, test {len(self.test)}")
        return lines


def load_splits(cfg: "RunConfig", context_length: int) -> DataSplits:
    """Read data.train (and data.val / data.test), encode, balance and split, as the config says.

    Validation comes from data.val if set, else a seeded data.val_split fraction of train; test likewise from
    data.test or data.test_split. Seeds: train.seed. Classification splits are stratified by label;
    `balance: undersample` is applied to data.train before splitting (so val/test drawn from it are balanced,
    as in the reference), class weights are computed on the training split.
    """
    d = cfg.data
    if d.max_length > context_length:
        raise ConfigError(f"data.max_length: {d.max_length} is above the model's context (n_positions = "
                          f"{context_length}); set data.max_length to at most {context_length}")
    if d.train is None:
        raise ConfigError("data.train: is required: a CSV, TSV, JSON, JSONL or TXT file")
    seed = cfg.train.seed
    task = cfg.task
    examples, stats, frame, fmt, mapping = load_file(d.train, d, task, "data.train")
    all_stats = {"train": stats}
    labels = stats.labels
    if fmt == "classification":
        present = [name for name, count in (stats.label_counts or {}).items() if count]
        if len(present) < 2:
            shown = f" ({present[0]!r})" if present else ""
            raise DataError(f"{d.train}: the label column {mapping['label']!r} has only one class{shown}; "
                            "classification needs at least two classes")
        if d.balance == "undersample":
            before = len(examples)
            examples = undersample(examples, seed)
            stats.undersampled = before - len(examples)
            _finish(stats, examples)  # the counts describe what training sees
    val_frac = 0.0 if d.val else d.val_split
    test_frac = 0.0 if d.test else d.test_split
    stratify = [ex.label for ex in examples] if fmt == "classification" else None
    train, val, test = split_examples(examples, val_frac, test_frac, seed, stratify)
    for key in ("val", "test"):
        path = getattr(d, key)
        if path:
            extra, extra_stats, _, _, _ = load_file(path, d, task, f"data.{key}", fmt=fmt, labels=labels)
            all_stats[key] = extra_stats
            if key == "val":
                val = extra
            else:
                test = extra
    weights = class_weights(train, len(labels)) if fmt == "classification" and d.balance == "class_weights" else None
    return DataSplits(train, val, test, all_stats, labels, weights, fmt, mapping, frame)


def write_split(path: str | Path, examples: Sequence[Example], frame: Table) -> None:
    """Write the source rows of these examples as a CSV (with a header), atomically; e.g. the classification
    test split for `lora eval --data`."""
    from lora_cli.fsutil import atomic_write_text

    rows = [ex.row for ex in examples]
    if any(r < 0 for r in rows):
        raise DataError("cannot write a split of a .txt file (its examples are chunks, not rows)")
    atomic_write_text(path, frame.to_csv(rows))
