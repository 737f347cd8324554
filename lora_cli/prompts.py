"""Prompts for a trained adapter: user text (arguments, --file lines, JSON records) rendered with the adapter's
prompt template, the reference column of a held-out table, and `lora generate`'s option and output helpers."""

from __future__ import annotations

import json
import math
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from lora_cli.data import NOT_TEXT, RESPONSE_ROLE, JsonValueError, cell_value, loads_unique, render_prompt
from lora_cli.errors import ConfigError, DataError
from lora_cli.inference import DataSettings


# ------------------------------------------------------------------------------------------------- prompts


def response_column(fmt: str, columns: Sequence[str], renames: Mapping[str, str]) -> tuple[str, str | None]:
    """(role, column) of the reference text in a table of this format: the column is None when the file has
    none (matched as data.detect_format does: the renamed column, else the role's name, else a unique
    case-insensitive match)."""
    role = RESPONSE_ROLE[fmt]
    wanted = renames.get(role, role)
    if wanted in columns:
        return role, wanted
    if role not in renames:
        matches = [c for c in columns if c.lower() == role.lower()]
        if len(matches) == 1:
            return role, matches[0]
    return role, None


def prompt_values(text: str, settings: DataSettings, input_text: str | None = None) -> dict[str, str]:
    """Template fields for a prompt given as plain text: alpaca -> the instruction (and --input), otherwise the
    prompt role (and the column it was read from in training, so a template like "{mr}\\n" works)."""
    if settings.format == "alpaca":
        values = {"instruction": text, "input": input_text or ""}
        for role in ("instruction", "input"):
            column = settings.columns.get(role)
            if column:
                values.setdefault(column, values[role])
        return values
    values = {"prompt": text}
    column = settings.columns.get("prompt")
    if column:
        values[column] = text
    return values


def record_values(record: Mapping[str, Any], settings: DataSettings, where: str,
                  template: bool = True) -> dict[str, str]:
    """Template fields for a JSON prompt record: its keys are roles (prompt / instruction, input) or the
    training file's column names. template=False (--no-template): the text fed as is (raw_prompt)."""
    read = {"prompt", "text", "instruction", "input", *settings.columns.values()}  # the fields a prompt reads
    if settings.prompt_template is not None:
        read |= {name for _, name, _, _ in string.Formatter().parse(settings.prompt_template) if name}
    values = {}
    for key, value in record.items():
        text = cell_value(value)
        if text is NOT_TEXT and str(key) in read:
            kind = "list" if isinstance(value, list) else "object"
            raise DataError(f"{where}: the field {str(key)!r} holds a JSON {kind}, not text; write its text")
        values[str(key)] = "" if text is None or text is NOT_TEXT else text
    for role, column in settings.columns.items():
        if column in values and role not in values:
            values[role] = values[column]
        elif role in values and column not in values:
            values[column] = values[role]
    if template and uses_template(settings):
        needed = "instruction" if settings.format == "alpaca" else "prompt"
        if not values.get(needed, "").strip() and settings.prompt_template is None:
            column = settings.columns.get(needed)
            also = f" (or {column!r})" if column and column != needed else ""
            raise DataError(f"{where}: the object has no {needed!r}{also} field; write e.g. "
                            f'{{"{needed}": "..."}}')
    elif not raw_prompt(values).strip():
        raise DataError(f'{where}: the object has no "prompt" field; write e.g. {{"prompt": "..."}}')
    return values


def raw_prompt(values: Mapping[str, str]) -> str:
    """The text of a prompt fed without a template: its "prompt", else "text", else "instruction" field."""
    return str(values.get("prompt", values.get("text", values.get("instruction", ""))))


def uses_template(settings: DataSettings) -> bool:
    return settings.format in ("alpaca", "prompt_completion")


def render(values: Mapping[str, str], settings: DataSettings, template: bool = True) -> str:
    """The text the model sees: the adapter's prompt template applied (as in training), or the raw prompt."""
    if not template or not uses_template(settings):
        return raw_prompt(values)
    return render_prompt(values, settings.format, settings.prompt_template)


# ------------------------------------------------------------------------------------------ `lora generate`


@dataclass
class PromptItem:
    """One prompt: the text the model sees, the record it came from (echoed in --json output), its origin."""

    text: str
    record: dict
    where: str


def utf8_text(data: bytes, name: str) -> str:
    """Bytes read from a file or stdin as UTF-8 text; anything else is one line naming where it came from."""
    try:
        return data.decode("utf-8-sig")  # an editor's byte-order mark is not part of the first line
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text (byte offset {exc.start}); re-save it as UTF-8") from None


def read_stdin(stream=None) -> str:
    """All of stdin as UTF-8 text, strictly: Python's own decoding of stdin would let other bytes through as
    escapes (under a C locale) and turn them into junk tokens."""
    stream = sys.stdin if stream is None else stream
    raw = getattr(stream, "buffer", None)
    return stream.read() if raw is None else utf8_text(raw.read(), "stdin")


def not_utf8(text: str) -> bool:
    """A line Python decoded with escapes for bytes that are not UTF-8 (its surrogateescape error handler)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def read_text_file(path: Path, item: str = "prompt") -> str:
    """The UTF-8 text of --file PATH ('-': stdin), with one-line errors naming it; item: what each line holds."""
    if str(path) == "-":
        return read_stdin()
    if not path.exists():
        raise DataError(f"--file {path} does not exist")
    if path.is_dir():
        raise DataError(f"--file {path} is a directory; pass a text file with one {item} per line")
    try:
        return utf8_text(path.read_bytes(), f"--file {path}")
    except OSError as exc:
        raise DataError(f"cannot read --file {path}: {exc.strerror or exc}") from exc


def numbered_lines(content: str, name: str) -> list[tuple[str, str]]:
    """(line, where) for each non-blank line of a text (a trailing carriage return dropped), where being
    "NAME line N" for messages."""
    items = []
    for number, line in enumerate(content.split("\n"), start=1):
        line = line.rstrip("\r")
        if line.strip():
            items.append((line, f"{name} line {number}"))
    return items


def collect_prompts(prompts: Sequence[str], file: Path | None, as_json: bool, settings: DataSettings,
                    template: bool = True, input_text: str | None = None) -> list[PromptItem]:
    """Prompts from the arguments, or from --file: one per line (blank lines skipped), or with --json one JSON
    object per line ({"prompt": ...}, alpaca {"instruction": ..., "input": ...}, or the training columns).
    Each is rendered with the adapter's template unless template=False."""
    if prompts and file is not None:
        raise ConfigError("give prompts as arguments or with --file, not both")
    check_input_flag(settings, template, input_text)
    items: list[PromptItem] = []
    if file is None:
        if not prompts:
            raise ConfigError("give a prompt: lora generate --adapter FILE \"PROMPT\" (or --file PROMPTS.txt)")
        for i, text in enumerate(prompts, start=1):
            where = f"prompt {i}"
            if not text.strip():
                raise DataError(f"{where} is empty; give some text to continue")
            values = prompt_values(text, settings, input_text)
            items.append(PromptItem(render(values, settings, template), {"prompt": text}, where))
        return items
    for line, where in numbered_lines(read_text_file(file), str(file)):
        if as_json:
            try:
                record = loads_unique(line)
            except JsonValueError as exc:  # a repeated key, too deep, a lone surrogate
                raise DataError(f"{where} {exc}") from None
            except json.JSONDecodeError as exc:
                raise DataError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); write one object "
                                'per line, e.g. {"prompt": "..."}') from None
            if not isinstance(record, dict):
                raise DataError(f'{where} is not a JSON object; write one object per line, e.g. {{"prompt": "..."}}')
            values = record_values(record, settings, where, template)
            if input_text is not None and "input" not in record:
                values["input"] = input_text
        else:
            record = {"prompt": line}
            values = prompt_values(line, settings, input_text)
        items.append(PromptItem(render(values, settings, template), record, where))
    if not items:
        raise DataError(f"--file {file} holds no prompts (it is empty or blank); write one prompt per line")
    return items


def check_input_flag(settings: DataSettings, template: bool, input_text: str | None) -> None:
    """--input fills the Input block of an alpaca adapter's prompt template: refused where no template reads it
    (it would be dropped without a word)."""
    if input_text is None:
        return
    if not template:
        raise ConfigError("--input fills the adapter's prompt template, which --no-template leaves out; drop one of "
                          "them (or write the input into the prompt)")
    if settings.format != "alpaca":
        what = "no alpaca prompt template applies here" if settings.format == "auto" else \
            f"this adapter's data format is {settings.format}"
        raise ConfigError(f"--input is the Input block of an alpaca adapter's prompt, and {what}; write the input "
                          "into the prompt")
    if settings.prompt_template is not None:
        fields = {name for _, name, _, _ in string.Formatter().parse(settings.prompt_template) if name}
        if not fields & {"input", settings.columns.get("input", "input")}:
            raise ConfigError("--input: the adapter's prompt template has no {input} field, so the input would be "
                              "dropped; write it into the prompt")


def sampling_options(temperature: float | None, top_k: int | None, top_p: float | None, greedy: bool) -> dict:
    """Greedy unless asked to sample: --temperature T samples at T; --top-k / --top-p alone sample at 1.0. The
    flags are checked here, before a model loads, so a bad one is the command's one error line."""
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k must be a positive integer, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")
    if greedy:
        if (temperature or 0.0) > 0 or top_k is not None or top_p is not None:
            raise ConfigError("--greedy picks the most likely token; drop --temperature, --top-k and --top-p")
        return {"temperature": 0.0, "top_k": None, "top_p": None}
    if temperature is None:
        temperature = 1.0 if (top_k is not None or top_p is not None) else 0.0
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p}


def check_lengths(max_new_tokens: int | None, no_repeat_ngram_size: int) -> None:
    """--max-new-tokens and --no-repeat-ngram-size, checked before a model loads."""
    if max_new_tokens is not None and max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be a non-negative integer, got {max_new_tokens}")
    if no_repeat_ngram_size < 0:
        raise ConfigError(f"--no-repeat-ngram-size must be a non-negative integer (0 = off), got {no_repeat_ngram_size}")


def check_search(num_beams: int, length_penalty: float) -> None:
    """--num-beams and --length-penalty, checked before a model loads (the decoder's own checks name its
    arguments, num_beams, not the flags)."""
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ConfigError(f"--num-beams must be a positive integer, got {num_beams}")
    if not math.isfinite(length_penalty):
        raise ConfigError(f"--length-penalty must be a finite number, got {length_penalty}")


def escape_line(text: str) -> str:
    """A generation on one output line: backslashes, newlines and carriage returns written as escapes."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
