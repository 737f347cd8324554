"""Using a trained adapter: find its base model, rebuild its data settings, turn user text into its prompts.

`lora eval`, `lora merge` and `lora generate` take `--adapter FILE` alone: everything else comes from the
adapter's safetensors metadata, which `lora train` writes (train._save_adapter):

    base_model   {source, name, revision, fingerprint}   which base to load, and a check that it is that base
    model_spec   the config's `model:` value              how to rebuild a random-init base (preset, seed, sizes)
    task         causal_lm | classification
    data         {format, columns, prompt_template, mask_prompt, max_length, labels}

A flag given on the command line (--model, --format, --column, --prompt-template, --max-length) wins over the
metadata. A PEFT adapter directory names only `base_model_name_or_path`; a base without a fingerprint is not
checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from lora_cli.config import FORMAT_CHOICES as FORMATS, DataConfig, ModelSpec
from lora_cli.errors import AdapterError, CheckpointError, ConfigError, DataError


# -------------------------------------------------------------------------------------------- base + adapter


def base_spec(adapter) -> ModelSpec:
    """The base model an adapter was trained on, as a ModelSpec.

    A local base is loaded from the absolute path recorded at training time, a hub base at the resolved
    revision (a commit hash: it loads offline from the cache), a random-init base from the config's model spec
    (preset, seed and size overrides rebuild the same weights)."""
    base = adapter.base_model
    source, name = base.get("source"), base.get("name")
    spec = adapter.metadata.get("model_spec")
    if source == "local" and name:
        return ModelSpec(name=str(name))
    if source == "hub" and name:
        return ModelSpec(name=str(name), revision=base.get("revision") or None)
    if spec is not None:
        try:
            return ModelSpec.parse(spec)
        except ValueError as exc:
            raise AdapterError(f"adapter {adapter.path}: its model_spec metadata is damaged ({exc}); pass --model") from exc
    if name:  # a PEFT adapter: base_model_name_or_path
        return ModelSpec(name=str(name), revision=base.get("revision") or None)
    raise AdapterError(f"adapter {adapter.path} does not name its base model; pass --model (a hub id or a local "
                       "model directory)")


def load_base(adapter=None, model: str | None = None):
    """checkpoint.BaseModel for `--model` if given, else the adapter's own base."""
    from lora_cli.checkpoint import load_model

    if model is not None:
        return load_model(model)
    if adapter is None:
        raise ConfigError("name a model: pass --adapter FILE (its base model is recorded in it) or --model MODEL")
    spec = base_spec(adapter)
    try:
        return load_model(spec)
    except CheckpointError as exc:
        raise CheckpointError(f"the base model of adapter {adapter.path}: {exc}; or pass --model") from exc


def open_adapter(path: str | Path | None):
    """adapter.load_adapter (an Adapter passes through), or None without a path."""
    from lora_cli.adapter import Adapter, load_adapter

    if path is None or isinstance(path, Adapter):
        return path
    return load_adapter(path)


@dataclass
class Loaded:
    """A model ready for inference and where it came from."""

    base: Any  # checkpoint.BaseModel; base.model is `model` (with the adapter attached, when there is one)
    adapter: Any  # adapter.Adapter | None
    settings: "DataSettings"

    @property
    def model(self):
        return self.base.model


def load_for_inference(adapter: str | Path | None = None, model: str | None = None, allow_mismatch: bool = False,
                       attach: bool = True) -> Loaded:
    """Load the base (the adapter's, or --model) and attach the adapter. attach=False leaves the base bare (to
    measure it first); call `attach_to(loaded)` afterwards."""
    adapter_obj = open_adapter(adapter)
    base = load_base(adapter_obj, model)
    loaded = Loaded(base, adapter_obj, DataSettings.from_adapter(adapter_obj))
    if attach:
        attach_to(loaded, allow_mismatch)
    return loaded


def attach_to(loaded: Loaded, allow_mismatch: bool = False) -> None:
    from lora_cli.adapter import attach_adapter

    if loaded.adapter is not None:
        attach_adapter(loaded.base, loaded.adapter, allow_mismatch=allow_mismatch)
    loaded.model.eval()


def resolve_device(name: str = "auto"):
    from lora_cli.errors import TrainingError
    from lora_cli.train import resolve_device as train_device

    try:
        return train_device(name)
    except TrainingError as exc:  # CUDA or MPS asked for but absent
        raise ConfigError(f"--device {name}: that device is not available here; use --device auto or cpu") from exc
    except RuntimeError as exc:  # torch.device("nonsense")
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from exc


# --------------------------------------------------------------------------------------------- data settings


@dataclass
class DataSettings:
    """How the adapter's training data became tokens (metadata `data`), with command-line overrides."""

    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # role -> column of the training file
    prompt_template: str | None = None
    mask_prompt: bool = True
    max_length: int | None = None
    labels: list[str] | None = None
    task: str = "causal_lm"

    @classmethod
    def from_adapter(cls, adapter) -> "DataSettings":
        if adapter is None:
            return cls()
        meta = adapter.metadata
        data = meta.get("data") or {}
        if isinstance(data, str):  # an older writer may have stored it unparsed
            try:
                data = json.loads(data)
            except json.JSONDecodeError:
                data = {}
        return cls(
            format=data.get("format") or "auto",
            columns=dict(data.get("columns") or {}),
            prompt_template=data.get("prompt_template"),
            mask_prompt=bool(data.get("mask_prompt", True)),
            max_length=data.get("max_length"),
            labels=data.get("labels"),
            task=meta.get("task") or "causal_lm",
        )

    def override(self, fmt: str | None = None, columns: Sequence[str] = (), prompt_template: str | None = None,
                 max_length: int | None = None) -> "DataSettings":
        """Apply --format, --column ROLE=COLUMN (repeatable), --prompt-template, --max-length."""
        if fmt is not None:
            if fmt not in FORMATS:
                raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
            self.format = fmt
        for item in columns:
            role, sep, column = item.partition("=")
            if not sep or not role.strip() or not column.strip():
                raise ConfigError(f"--column {item!r}: expected ROLE=COLUMN, e.g. --column prompt=mr")
            self.columns[role.strip()] = column.strip()
        if prompt_template is not None:
            self.prompt_template = prompt_template
        if max_length is not None:
            if max_length < 2:
                raise ConfigError(f"--max-length must be at least 2, got {max_length}")
            self.max_length = max_length
        return self

    def data_config(self, n_positions: int) -> DataConfig:
        """A DataConfig that encodes rows the way training did. Only renamed roles are kept as column
        mappings, so a held-out file may spell a column in another case or lack the optional `input`."""
        renames = {role: col for role, col in self.columns.items() if col != role}
        fmt = self.format if self.format != "classification" or self.task == "classification" else "auto"
        max_length = min(self.max_length or DataConfig.max_length, n_positions)
        return DataConfig(format=fmt, columns=renames, prompt_template=self.prompt_template, max_length=max_length,
                          mask_prompt=self.mask_prompt, labels=self.labels)


# ------------------------------------------------------------------------------------------------- prompts


def response_column(fmt: str, columns: Sequence[str], renames: Mapping[str, str]) -> tuple[str, str | None]:
    """(role, column) of the reference text in a table of this format: the column is None when the file has
    none (matched as data.detect_format does: the renamed column, else the role's name, else a unique
    case-insensitive match)."""
    from lora_cli.data import RESPONSE_ROLE

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


def record_values(record: Mapping[str, Any], settings: DataSettings, where: str) -> dict[str, str]:
    """Template fields for a JSON prompt record: its keys are roles (prompt / instruction, input) or the
    training file's column names."""
    values = {str(k): ("" if v is None else str(v)) for k, v in record.items()}
    for role, column in settings.columns.items():
        if column in values and role not in values:
            values[role] = values[column]
        elif role in values and column not in values:
            values[column] = values[role]
    if uses_template(settings):
        needed = "instruction" if settings.format == "alpaca" else "prompt"
        if not values.get(needed, "").strip() and settings.prompt_template is None:
            column = settings.columns.get(needed)
            also = f" (or {column!r})" if column and column != needed else ""
            raise DataError(f"{where}: the object has no {needed!r}{also} field; write e.g. "
                            f'{{"{needed}": "..."}}')
    elif not str(values.get("prompt", values.get("text", ""))).strip():
        raise DataError(f'{where}: the object has no "prompt" field; write e.g. {{"prompt": "..."}}')
    return values


def uses_template(settings: DataSettings) -> bool:
    return settings.format in ("alpaca", "prompt_completion")


def render(values: Mapping[str, str], settings: DataSettings, template: bool = True) -> str:
    """The text the model sees: the adapter's prompt template applied (as in training), or the raw prompt."""
    from lora_cli.data import render_prompt

    if not template or not uses_template(settings):
        return str(values.get("prompt", values.get("text", values.get("instruction", ""))))
    return render_prompt(values, settings.format, settings.prompt_template)


# ------------------------------------------------------------------------------------------ `lora generate`


@dataclass
class PromptItem:
    """One prompt: the text the model sees, the record it came from (echoed in --json output), its origin."""

    text: str
    record: dict
    where: str


def _read_prompt_file(path: Path) -> str:
    import sys

    if str(path) == "-":
        return sys.stdin.read()
    if not path.exists():
        raise DataError(f"--file {path} does not exist")
    if path.is_dir():
        raise DataError(f"--file {path} is a directory; pass a text file with one prompt per line")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"--file {path}: not UTF-8 text (byte offset {exc.start}); re-save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read --file {path}: {exc.strerror or exc}") from exc


def collect_prompts(prompts: Sequence[str], file: Path | None, as_json: bool, settings: DataSettings,
                    template: bool = True, input_text: str | None = None) -> list[PromptItem]:
    """Prompts from the arguments, or from --file: one per line (blank lines skipped), or with --json one JSON
    object per line ({"prompt": ...}, alpaca {"instruction": ..., "input": ...}, or the training columns).
    Each is rendered with the adapter's template unless template=False."""
    if prompts and file is not None:
        raise ConfigError("give prompts as arguments or with --file, not both")
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
    content = _read_prompt_file(file)
    for number, line in enumerate(content.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{file} line {number}"
        if as_json:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}); write one object "
                                'per line, e.g. {"prompt": "..."}') from None
            if not isinstance(record, dict):
                raise DataError(f'{where} is not a JSON object; write one object per line, e.g. {{"prompt": "..."}}')
            values = record_values(record, settings, where)
            if input_text is not None and "input" not in record:
                values["input"] = input_text
        else:
            record = {"prompt": line}
            values = prompt_values(line, settings, input_text)
        items.append(PromptItem(render(values, settings, template), record, where))
    if not items:
        raise DataError(f"--file {file} holds no prompts (it is empty or blank); write one prompt per line")
    return items


def sampling_options(temperature: float | None, top_k: int | None, top_p: float | None, greedy: bool) -> dict:
    """Greedy unless asked to sample: --temperature T samples at T; --top-k / --top-p alone sample at 1.0."""
    if greedy:
        if (temperature or 0.0) > 0 or top_k is not None or top_p is not None:
            raise ConfigError("--greedy picks the most likely token; drop --temperature, --top-k and --top-p")
        return {"temperature": 0.0, "top_k": None, "top_p": None}
    if temperature is None:
        temperature = 1.0 if (top_k is not None or top_p is not None) else 0.0
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p}


def escape_line(text: str) -> str:
    """A generation on one output line: backslashes, newlines and carriage returns written as escapes."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def generate_texts(model, items: Sequence[PromptItem], max_new_tokens: int, *, batch_size: int = 8,
                   progress: bool = False, **options) -> list[str]:
    """Decoded generations (stopped at <|endoftext|>) for each prompt, in order; options as generate.generate."""
    import sys

    from tqdm import tqdm

    from lora_cli.generate import fit_prompt, generate
    from lora_cli.tokenizer import decode, encode

    ids = [encode(item.text) for item in items]
    for item, x in zip(items, ids):
        if not x:
            raise DataError(f"{item.where} is empty after the template; give some text to continue")
        # checked here too, so a prompt too long for the context is named by its file and line
        fit_prompt(x, max_new_tokens, model.config.n_positions, options.get("truncate", False), where=item.where)
    with tqdm(total=len(ids), desc="generate", unit="prompt", file=sys.stderr, disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        new = generate(model, ids, max_new_tokens, batch_size=batch_size, progress=bar.update, **options)
    return [decode(x) for x in new]
