"""Data formats: which roles a file's columns play, and the prompt templates that render them.

`detect_format`: the columns decide the format, as mlx-lm's datasets.py does with keys: `alpaca` (instruction,
optional input, output), `prompt_completion` (prompt, completion), `chat` (messages, or ShareGPT's
conversations), `text` (text) or, for `task: classification`, `classification` (text, label). `data.columns` maps any role to any column. The formats and
their roles are listed once, in lora_cli.config (DATA_FORMATS), which defines the config schema.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from lora_cli.config import (ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, DATA_FORMATS, PROMPT_COMPLETION_TEMPLATE,
                             RESPONSE_ROLE, ROLES, SHAREGPT_COLUMN, DataConfig, parse_template)
from lora_cli.errors import ConfigError, DataError, did_you_mean

OPTIONAL_ROLES = {"input"}
_FORMAT_HELP = (
    "alpaca (instruction, output, optional input), prompt_completion (prompt, completion), text (text)"
)


# How a message tells the user to name a role's column: in the run config, or (a file given with --data) by flag.
CONFIG_HINTS = {"map": "map one with data.columns.{role}: <column>",
                "detect": "set data.format, and data.columns to map roles to your columns (e.g. {{prompt: mr, "
                          "completion: ref}})",
                "skip": "set data.skip_bad_rows: true to skip such rows",
                "named": "named by data.columns.{role}",
                "chat_template": "data.chat_template"}
FLAG_HINTS = {"map": "map one with --column {role}=<column> (a file without a header row: --no-header "
                     "--column-names NAME,NAME,...)",
              "detect": "pass --format, and --column ROLE=COLUMN to map roles to your columns (a file without a "
                        "header row: --no-header --column-names NAME,NAME,...)",
              "skip": "pass --skip-bad-rows to skip such rows",
              "named": "for role {role} (--column, or the column the adapter was trained on)",
              "chat_template": "--chat-template"}


def hints_for(key: str) -> Mapping[str, str]:
    """The hints for a file named by `key`: a config key (data.train) or a flag (--data)."""
    return FLAG_HINTS if key.startswith("--") else CONFIG_HINTS


def detect_format(
    columns: Iterable[Any], data_cfg: DataConfig, task: str = "causal_lm", path: str | Path | None = None,
    hints: Mapping[str, str] = CONFIG_HINTS,
) -> tuple[str, dict[str, str]]:
    """(format, {role: column}) for a table with these columns. `hints`: how messages say to map a column
    (CONFIG_HINTS, or FLAG_HINTS for a file a command-line flag named).

    `data.format: auto` tries alpaca, prompt_completion, chat and text in that order (restricted to the formats that
    have every role named in data.columns) and takes the first whose required columns exist; task
    classification always means the classification format. A role's column is data.columns[role] if given,
    else the column named like the role (matched case-insensitively when there is no exact match).
    """
    columns = [str(c) for c in columns]
    where = f"{path}: " if path is not None else ""
    renames = dict(data_cfg.columns)
    for role, column in renames.items():
        if role not in ROLES:
            raise ConfigError(f"data.columns.{role}: unknown role{did_you_mean(role, ROLES)}; the roles are "
                              "instruction, input, output (alpaca), prompt, completion (prompt_completion), "
                              "messages (chat), text (text) and text, label (classification)")
        if column not in columns:
            raise DataError(f"{where}column {column!r} {hints['named'].format(role=role)} is not in the file; its "
                            f"columns are: {', '.join(columns)}; " + hints["map"].format(role=role))
    fmt = data_cfg.format
    if task == "classification":
        fmt = "classification"
    elif fmt == "classification":
        raise ConfigError("data.format: classification needs task: classification")
    if fmt == "auto":
        for candidate in ("alpaca", "prompt_completion", "chat", "text"):
            if not set(renames) <= set(DATA_FORMATS[candidate]):
                continue
            mapping, missing = _map_roles(candidate, renames, columns)
            if not missing:
                return candidate, _one_column_each(mapping, renames, hints)
        raise DataError(f"{where}cannot tell the data format from the columns ({', '.join(columns)}); expected "
                        f"{_FORMAT_HELP}; " + hints["detect"].format())
    for role in renames:
        if role not in DATA_FORMATS[fmt]:
            raise ConfigError(f"data.columns.{role}: not a role of format {fmt} (its roles: "
                              f"{', '.join(DATA_FORMATS[fmt])})")
    mapping, missing = _map_roles(fmt, renames, columns)
    if missing:
        role = missing[0]
        raise DataError(f"{where}format {fmt} needs a column for {role!r} but there is no column {role!r}; the "
                        f"file's columns are: {', '.join(columns)}; " + hints["map"].format(role=role))
    return fmt, _one_column_each(mapping, renames, hints)


def _one_column_each(mapping: dict[str, str], renames: Mapping[str, str], hints: Mapping[str, str]) -> dict[str, str]:
    """The mapping, unless two roles read one column (a model trained to copy its prompt): a ConfigError."""
    readers: dict[str, str] = {}
    for role, column in mapping.items():
        if column in readers:
            first = readers[column]
            named = role if role in renames else first
            raise ConfigError(f"roles {first} and {role} both read column {column!r} ({hints['named'].format(role=named)}"
                              "); give each role its own column")
        readers[column] = role
    return mapping


def _map_roles(fmt: str, renames: Mapping[str, str], columns: list[str]) -> tuple[dict[str, str], list[str]]:
    mapping: dict[str, str] = {}
    missing: list[str] = []
    lower = {}
    for c in columns:
        lower.setdefault(c.lower(), []).append(c)
    for role in DATA_FORMATS[fmt]:
        if role in renames:
            mapping[role] = renames[role]
        elif role in columns:
            mapping[role] = role
        elif len(lower.get(role, [])) == 1:
            mapping[role] = lower[role][0]  # e.g. E2E's test file spells its column "MR"
        elif fmt == "chat" and SHAREGPT_COLUMN in columns:
            mapping[role] = SHAREGPT_COLUMN
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
    allowed = [r for r in DATA_FORMATS[fmt] if r != RESPONSE_ROLE.get(fmt)] + [str(c) for c in columns]
    try:
        parsed = parse_template(template)
    except ValueError as exc:
        raise ConfigError("data.prompt_template: {}; {}".format(*exc.args)) from None
    fields = []
    for _, name in parsed:
        if name is None:
            continue
        if name == RESPONSE_ROLE.get(fmt):
            raise ConfigError(f"data.prompt_template: {{{name}}} is the response and cannot be in the prompt")
        if name not in allowed:
            raise ConfigError(f"data.prompt_template: unknown field {{{name}}}; use one of: "
                              f"{', '.join(dict.fromkeys(allowed))}")
        fields.append(name)
    if not fields:  # every example would get the same prompt; {{name}} (Jinja's habit) is a literal {name}
        literal = "".join(text for text, _ in parsed)
        doubled = re.search(r"{(\w+)}", literal)
        hint = (f"write {{{doubled[1]}}}, not {{{{{doubled[1]}}}}} (doubled braces are literal braces)" if doubled
                else f"add one such as {{{allowed[0]}}}")
        raise ConfigError(f"data.prompt_template: names no field, so every example would get the same prompt; {hint}")
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
    """str.format_map restricted to plain {name} fields (config.parse_template; an absent name renders as "")."""
    out = []
    try:
        parsed = parse_template(template)
    except ValueError as exc:
        raise ConfigError("prompt template {!r}: {}; {}".format(template[:60], *exc.args)) from None
    for literal, name in parsed:
        out.append(literal)
        if name is not None:
            value = values.get(name)
            out.append("" if value is None else str(value))
    return "".join(out)
