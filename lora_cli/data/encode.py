"""Encoding: each row of a data file -> `Example(ids, loss_mask)`, with the label order for classification.

Text becomes ids through the model's tokenizer (tokenizer.py; GPT-2's BPE by default). Prompt and response are
split as `tokenizer.encode_split` splits them (a tokenizer.json encodes them as one text, cut where the response
begins; GPT-2's pre-tokenizer cuts there anyway), so a prompt's ids are exactly `tokenizer.encode_prompt(prompt)`
(the bos token first when the model's tokenizer adds one, no eos after it), which is what generation feeds the
model. The tokenizer's eos (`<|endoftext|>` for GPT-2) ends every causal-LM example and is a target.
User text is encoded with allow_special=False, so a literal "<|endoftext|>" in the data is ordinary text.
`load_file` runs the steps for one file: read (data.io), detect the format (data.formats), encode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from lora_cli.chat_template import (conversation, encode_chat, resolve_template, template_tokens,
                                    writes_assistant_content)
from lora_cli.config import DATA_FORMATS, LABELS_TWICE, DataConfig
from lora_cli.data.formats import (CONFIG_HINTS, OPTIONAL_ROLES, RESPONSE_ROLE, detect_format, hints_for, render_prompt,
                                   template_fields)
from lora_cli.data.io import Table, read_table
from lora_cli.errors import ConfigError, ConversationError, DataError, first_repeat
from lora_cli.tokenizer import GPT2, Tokenizer


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

    def notes(self, truncated: bool = True) -> list[str]:
        """What became of the rows: skipped, truncated (unless truncated=False: only the rows that gave no
        example), dropped, undersampled."""
        notes = []
        if self.skipped:
            notes.append(f"{self.skipped} bad rows skipped")
        if self.truncated and truncated:
            notes.append(f"{self.truncated} truncated to {self.max_length_limit} tokens")
        if self.dropped:
            notes.append(f"{self.dropped} dropped (no response left after truncation)")
        if self.undersampled:
            notes.append(f"{self.undersampled} removed by undersampling")
        return notes

    def describe(self) -> str:
        parts = [f"{self.path}: {self.fmt}, {self.rows} rows -> {self.examples} examples"]
        notes = self.notes()
        if notes:
            parts.append(f" ({', '.join(notes)})")
        parts.append(f", {self.tokens:,} tokens")
        if self.labels is None:
            parts.append(f" ({self.target_tokens:,} with loss)")
        parts.append(f", length mean {self.mean_length:.1f} / min {self.min_length} / max {self.max_length}")
        if self.label_counts:
            parts.append(", labels " + ", ".join(f"{k}: {v}" for k, v in self.label_counts.items()))
        return "".join(parts)


def encode_pair(prompt: str, response: str, max_length: int, mask_prompt: bool = True,
                tokenizer: Tokenizer = GPT2) -> tuple[Example, bool]:
    """[bos] + prompt + response + eos (the two texts cut apart as Tokenizer.encode_split cuts them), truncated to
    max_length tokens. Returns (example, truncated). Targets: the response and eos (mask_prompt) or every token
    but the first."""
    prompt_ids, response_ids = tokenizer.encode_split(prompt, response)  # bos only at the start of an example
    response_ids = response_ids + [tokenizer.eos_id]
    ids = prompt_ids + response_ids
    if mask_prompt:
        mask = [False] * len(prompt_ids) + [True] * len(response_ids)
    else:
        mask = [False] + [True] * (len(ids) - 1)
    mask[0] = False  # the first token has nothing to be predicted from
    truncated = len(ids) > max_length
    return Example(ids[:max_length], mask[:max_length]), truncated


def encode_text(text: str, max_length: int, tokenizer: Tokenizer = GPT2) -> tuple[Example, bool]:
    """Plain causal LM: every token but the first is a target; eos ends the text."""
    return encode_pair("", text, max_length, mask_prompt=False, tokenizer=tokenizer)


def chunk_text(text: str, max_length: int, tokenizer: Tokenizer = GPT2) -> list[Example]:
    """A long document (a .txt file) -> chunks of max_length tokens that overlap by one token, so every token
    after the first is a target exactly once (the chunk's first token is context only)."""
    bos, body = tokenizer.encode_split("", text)
    ids = bos + body + [tokenizer.eos_id]
    stride = max_length - 1
    chunks = []
    for start in range(0, max(len(ids) - 1, 1), stride):
        piece = ids[start:start + max_length]
        if len(piece) < 2:
            break
        chunks.append(Example(piece, [False] + [True] * (len(piece) - 1)))
    return chunks


# ------------------------------------------------------------------------------------------------- encoding

NOT_TEXT = object()  # cell_value's answer for a list, an object, or bytes that are not UTF-8, where text belongs


def cell_value(value: Any) -> Any:
    """A table value as text: strings as they are, bytes (a Parquet binary column) decoded as UTF-8, numbers and
    booleans as str() writes them (as a CSV shows them), None for missing (None, NaN), NOT_TEXT for lists,
    objects and bytes that are not UTF-8."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return NOT_TEXT
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (dict, list, tuple)):
        return NOT_TEXT
    return str(value)


def row_label(frame: Table, i: int) -> str:
    """'row 3 (line 4)' for row index 2 of a file with source lines (CSV, TSV, JSONL), else 'row 3'."""
    lines = frame.lines
    return f"row {i + 1} (line {lines[i]})" if lines else f"row {i + 1}"


def label_order(values: Iterable[str], data_cfg: DataConfig, classes: Sequence[str] | None = None) -> list[str]:
    """Class ids: data.labels in its order if given, else the distinct labels in the order of `classes` (a datasets
    ClassLabel's names) or sorted (numerically when every label is an integer, so "2" < "10"). The order is stored
    with the adapter so ids mean the same later."""
    if data_cfg.labels:
        labels = [str(x) for x in data_cfg.labels]
        twice = first_repeat(labels)
        if twice is not None:
            raise ConfigError("data.labels " + LABELS_TWICE.format(twice))
        return labels
    distinct = set(values)
    if classes:
        return [name for name in classes if name in distinct] + sorted(distinct - set(classes))
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
    tokenizer: Tokenizer = GPT2,
    hints: Mapping[str, str] = CONFIG_HINTS,
) -> tuple[list[Example], DataStats]:
    """Rows -> Examples. Rows with a missing or empty required field (or a list/object where text belongs)
    raise one DataError naming the rows (and, from `hints`, how to skip them: data.skip_bad_rows, or a flag),
    or are skipped and counted with data.skip_bad_rows. For
    classification, `labels` fixes the label order (e.g. the training file's, or an adapter's); otherwise it is
    `label_order`; a label outside a fixed order is a DataError."""
    path = str(path if path is not None else df.path)
    max_length = data_cfg.max_length
    stats = DataStats(path=path, fmt=fmt, rows=len(df), max_length_limit=max_length)
    if fmt == "text" and Path(path).suffix.lower() == ".txt":
        examples = chunk_text(str(df[mapping["text"]][0]), max_length, tokenizer)
        return examples, count_stats(stats, examples)

    if fmt == "chat":
        examples = encode_conversations(df, mapping["messages"], data_cfg, path, tokenizer, stats, hints)
        return examples, count_stats(stats, examples)

    required = [r for r in DATA_FORMATS[fmt] if r not in OPTIONAL_ROLES]
    role_values = {role: df[column] for role, column in mapping.items()}
    extra_columns: list[str] = []
    if fmt in RESPONSE_ROLE and data_cfg.prompt_template is not None:
        fields = template_fields(data_cfg.prompt_template, fmt, df.columns)
        extra_columns = [f for f in dict.fromkeys(fields) if f not in DATA_FORMATS[fmt]]
    column_values = {c: df[c] for c in extra_columns}

    bad: list[tuple[int, str, str]] = []  # (row index, column, problem)
    records: list[tuple[int, dict[str, str]]] = []
    for i in range(len(df)):
        values: dict[str, str] = {}
        problem = None
        for role in DATA_FORMATS[fmt]:
            if role not in mapping:
                continue
            value = cell_value(role_values[role][i])
            if value is NOT_TEXT:
                problem = problem or (mapping[role], "holds a list, an object or bytes that are not UTF-8, not text")
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
            value = cell_value(column_values[column][i])
            values[column] = value if isinstance(value, str) else ""
        records.append((i, values))

    if bad and not data_cfg.skip_bad_rows:
        i, column, what = bad[0]
        more = ""
        if len(bad) > 1:
            others = ", ".join(str(b[0] + 1) for b in bad[1:6])
            more = f" ({len(bad) - 1} more bad rows: {others}{', ...' if len(bad) > 6 else ''})"
        raise DataError(f"{path}: {row_label(df, i)}: column {column!r} {what}{more}; fill it in or "
                        f"{hints['skip']}")
    stats.skipped = len(bad)
    stats.skipped_rows = [b[0] + 1 for b in bad[:20]]

    examples: list[Example] = []
    if fmt == "classification":
        fixed = labels is not None or bool(data_cfg.labels)
        order = list(labels) if labels is not None else label_order((v["label"] for _, v in records), data_cfg,
                                                                    df.classes.get(mapping["label"]))
        index = {name: k for k, name in enumerate(order)}
        unknown = [(i, v["label"]) for i, v in records if v["label"] not in index]
        if unknown and fixed:
            i, value = unknown[0]
            source = "data.labels" if labels is None else "the training labels"
            # `labels: [true, false]` (or yes/no, on/off) are YAML booleans, which became "True" and "False"
            yaml_bools = labels is None and {"True", "False"} & set(order) \
                and str(value).lower() in ("yes", "no", "on", "off", "y", "n", "true", "false")
            hint = (" (YAML reads unquoted true/false, yes/no and on/off as the booleans True and False: quote the "
                    "labels)") if yaml_bools else ""
            raise DataError(f"{path}: {row_label(df, i)}: label {value!r} is not one of {source} "
                            f"({', '.join(order)}){hint}; fix the label or add it to data.labels")
        for i, values in records:
            ids = tokenizer.encode(values["text"], add_special_tokens=True)
            stats.truncated += len(ids) > max_length
            ids = ids[:max_length]
            examples.append(Example(ids, [False] * len(ids), label=index[values["label"]], row=i))
        stats.labels = order
        return examples, count_stats(stats, examples)

    for i, values in records:
        if fmt == "text":
            example, truncated = encode_text(values["text"], max_length, tokenizer)
        else:
            prompt = render_prompt(values, fmt, data_cfg)
            example, truncated = encode_pair(prompt, values[RESPONSE_ROLE[fmt]], max_length, data_cfg.mask_prompt,
                                             tokenizer)
        stats.truncated += truncated
        if not any(example.loss_mask):
            stats.dropped += 1  # the prompt alone fills max_length: nothing left to learn from
            continue
        example.row = i
        examples.append(example)
    return examples, count_stats(stats, examples)


def encode_conversations(df: Table, column: str, data_cfg: DataConfig, path: str, tokenizer: Tokenizer,
                         stats: DataStats, hints: Mapping[str, str] = CONFIG_HINTS) -> list[Example]:
    """Chat rows -> Examples rendered with the chat template (data.chat_template, else the model's own), loss on
    the assistant spans (chat_template.encode_chat). A malformed conversation is a ConversationError naming the
    file and row (or skipped and counted with data.skip_bad_rows); one the template cannot render or split into
    spans is always an error."""
    key = hints["chat_template"]
    template = resolve_template(data_cfg.chat_template, tokenizer, key=key)
    if not writes_assistant_content(template, template_tokens(tokenizer)):
        where = key if data_cfg.chat_template is not None else "the model's chat template"
        raise ConfigError(f"{where} never writes an assistant message's content, so no token could carry a loss; "
                          "use a template that renders the assistant turns (e.g. chatml)")
    bad: list[tuple[int, str]] = []
    examples: list[Example] = []
    for i, value in enumerate(df[column]):
        try:
            messages = conversation(value)
        except ConversationError as exc:
            bad.append((i, str(exc)))
            continue
        try:
            ids, mask = encode_chat(template, messages, tokenizer, data_cfg.train_on, not data_cfg.mask_prompt)
        except ConversationError as exc:
            raise ConversationError(f"{path}: {row_label(df, i)}: column {column!r}: {exc}") from None
        stats.truncated += len(ids) > data_cfg.max_length
        example = Example(ids[:data_cfg.max_length], mask[:data_cfg.max_length], row=i)
        if not any(example.loss_mask):
            stats.dropped += 1  # the assistant's turns all lie beyond max_length
            continue
        examples.append(example)
    if bad and not data_cfg.skip_bad_rows:
        i, what = bad[0]
        more = f" ({len(bad) - 1} more bad rows)" if len(bad) > 1 else ""
        raise ConversationError(f"{path}: {row_label(df, i)}: column {column!r}: {what}{more}; fix it or "
                                f"{hints['skip']}")
    stats.skipped = len(bad)
    stats.skipped_rows = [b[0] + 1 for b in bad[:20]]
    return examples


def count_stats(stats: DataStats, examples: list[Example]) -> DataStats:
    """Fill the token, length and label counts of `stats` from these examples (again after undersampling)."""
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
    tokenizer: Tokenizer = GPT2,
) -> tuple[list[Example], DataStats, Table, str, dict[str, str]]:
    """Read, detect and encode one file -> (examples, stats, frame, format, mapping). `fmt` forces a format
    (val/test files take the training file's); `labels` forces a label order (val/test, or an adapter's at
    eval time). A file with no usable example is a DataError."""
    frame = read_table(path, data_cfg, key)
    if Path(path).suffix.lower() == ".txt":
        wanted = fmt or ("classification" if task == "classification" else data_cfg.format)
        if wanted not in ("auto", "text"):
            raise DataError(f"{path}: a .txt file is plain text for format text, not {wanted}; use a CSV, TSV, "
                            "JSON, JSONL or Parquet file with columns")
        fmt, mapping = "text", {"text": "text"}
    else:
        cfg = data_cfg if fmt is None else replace(data_cfg, format=fmt)
        fmt, mapping = detect_format(frame.columns, cfg, task, path, hints_for(key))
    examples, stats = encode_records(frame, fmt, mapping, data_cfg, path, labels, tokenizer, hints_for(key))
    if not examples:
        why = []
        if stats.skipped:
            why.append(f"{stats.skipped} rows skipped as bad")
        if stats.dropped:
            why.append(f"{stats.dropped} prompts longer than data.max_length={data_cfg.max_length}")
        raise DataError(f"{path}: no usable examples ({', '.join(why) or 'no rows'}); add data"
                        + (" or raise data.max_length" if stats.dropped else ""))
    return examples, stats, frame, fmt, mapping


def preview(example: Example, tokenizer: Tokenizer = GPT2) -> str:
    """An example as text with the tokens that carry loss in [[double brackets]] (for --dry-run)."""
    decode = tokenizer.decode
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
