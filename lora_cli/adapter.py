"""The single-file adapter, and PEFT import/export.

An adapter is ONE .safetensors file: the trainable tensors under our module names (lora.py's docstring lists
them) and, in the safetensors header metadata (string -> string), everything needed to use it alone:

    format            "pt" (the safetensors convention)
    format_version    "1"
    lora              JSON: r, alpha, dropout, use_rslora, use_dora, bias, targets (resolved module names,
                      slices as transformer.h.N.attn.q/k/v), modules_to_save, rank_pattern, alpha_pattern
    base_model        JSON: source, name, revision, fingerprint (pretrained.BaseModel.describe())
    task, tokenizer, prompt_template, training (JSON), ... whatever the caller adds

Scalar strings are stored as they are, anything else as JSON. Loading onto a base whose fingerprint differs
fails unless the caller allows it; a shape mismatch always fails.

PEFT (https://github.com/huggingface/peft) stores LoRA adapters as a directory: adapter_config.json +
adapter_model.safetensors (or .bin), keys prefixed `base_model.model.` (the other families' module names are
transformers' own, so their keys map one to one), and for GPT-2 `fan_in_fan_out: true` because transformers' GPT-2
uses Conv1D. lora_A [r, in] and lora_B [out, r] have the same orientation as ours; only
whole saved Conv1D modules are transposed. Slice adapters (attn.q/k/v) become one c_attn adapter whose rank is
the sum of the slice ranks, with a block-structured B and each slice's scaling folded into its block of B, so
PEFT's alpha / r scaling reproduces ours exactly.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import safetensors.torch
from safetensors import safe_open

from lora_cli.pretrained import CONV1D_SUFFIXES, BaseModel, key_mismatch, meta_model, read_state_dict
from lora_cli.chat_template import template_problem
from lora_cli.config import (BUILTIN_CHAT_TEMPLATES, DATA_FORMATS, FORMAT_CHOICES, MUTATING_INITS, RESPONSE_ROLE,
                             TASKS, TRAIN_ON, LoraConfig, is_inline_template, parse_template)
from lora_cli.errors import AdapterError, ConfigError, first_line, first_repeat
from lora_cli.fsutil import atomic_dir, atomic_path, atomic_write_text
from lora_cli.jsonvalues import complaint, shown
from lora_cli.models import HEAD, add_classification_head
from lora_cli.lora import (
    SLICES,
    LoRALinear,
    _split_slice_name,
    adapter_state_dict,
    apply_lora,
    lora_scaling,
    pattern_value,
    portable_adapter,
    shares_weight,
    target_candidates,
)
from lora_cli.runtime import as_dtype

FORMAT_VERSION = 1
ADAPTER_FILE = "adapter.safetensors"  # the name inside a run directory
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_CHAT_TEMPLATE = "chat_template.jinja"  # a chat adapter's template, in an exported PEFT directory
PEFT_PREFIX = "base_model.model."
# PEFT names modules as transformers builds them: transformers 5 calls GPT-NeoX's output projection lm_head, while
# its checkpoints (and lora-cli's module tree, which keeps the checkpoint's names) call it embed_out.
NEOX_HEAD, NEOX_PEFT_HEAD = "embed_out", "lm_head"


def _neox_head_as(name: str, old: str, new: str) -> str:
    """`name` with a leading module `old` (and only that) renamed `new`."""
    return new + name[len(old):] if name == old or name.startswith(old + ".") else name


def _with_head_renamed(adapter: "Adapter", old: str, new: str) -> "Adapter":
    """The adapter with its output-projection module `old` called `new` in tensors, targets and saved modules."""
    rename = lambda n: _neox_head_as(n, old, new)  # noqa: E731
    lora = replace(adapter.lora, targets=[rename(t) for t in adapter.lora.targets],
                   modules_to_save=[rename(m) for m in adapter.lora.modules_to_save])
    return replace(adapter, tensors={rename(k): v for k, v in adapter.tensors.items()}, lora=lora,
                   rank_pattern={rename(k): v for k, v in adapter.rank_pattern.items()},
                   alpha_pattern={rename(k): v for k, v in adapter.alpha_pattern.items()})
RESERVED = ("format", "format_version", "lora")
PEFT_TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "classification"}
# A model's top-level module -> its family, as named in errors (adapter_family).
FAMILY_TOPS = {"transformer": "gpt2", "gpt_neox": "gpt_neox", "embed_out": "gpt_neox", "model": "llama"}
FAMILY_WORDS = {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX", "llama": "Llama-family (llama, mistral, qwen2, qwen3)"}
# PEFT options that change the computation in ways lora-cli does not implement: key -> values that are harmless.
PEFT_UNSUPPORTED = {
    "lora_bias": (False, None),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (None, False, {}),
    "megatron_config": (None, {}),
    # LoRA variants with weights or a forward of their own (PEFT's is_lora_variant fields; DoRA is read as use_dora)
    "velora_config": (None, {}),
    "kasa_config": (None, {}),
    "monteclora_config": (None, {}),
    "arrow_config": (None, {}),
}


@dataclass
class Adapter:
    """An adapter in memory: tensors by our names, its LoRA settings, and the rest of its metadata."""

    tensors: dict[str, torch.Tensor]
    lora: LoraConfig  # targets / modules_to_save are resolved full names
    metadata: dict  # base_model, task, tokenizer, prompt_template, training, format_version, ...
    path: Path
    kind: str = "lora-cli"  # or "peft"
    rank_pattern: dict[str, int] = field(default_factory=dict)  # target name -> rank, where not lora.r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # target name -> alpha, where not lora.alpha

    @property
    def base_model(self) -> dict:
        return self.metadata.get("base_model") or {}

    def settings(self) -> dict:
        """The LoRA settings as stored in the file header."""
        return _settings_dict(self.lora, self.rank_pattern, self.alpha_pattern)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _settings_dict(lora: LoraConfig, rank_pattern: dict, alpha_pattern: dict) -> dict:
    return {
        "r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "use_rslora": lora.use_rslora,
        "use_dora": lora.use_dora, "bias": lora.bias, "targets": list(lora.targets),
        "modules_to_save": list(lora.modules_to_save), "rank_pattern": dict(rank_pattern),
        "alpha_pattern": dict(alpha_pattern),
    }


# ------------------------------------------------------------------------------------ typed adapter settings

_REQUIRED = object()  # a field with no default: its absence is an error
BIASES = ("none", "lora_only", "all")
OURS_FIX = "the file is damaged: train the adapter again or use another adapter"
RANK, ALPHA, DROPOUT = ("size", 8), ("positive", 16), ("probability", 0.05)  # jsonvalues kinds, good examples


@dataclass
class _Fields:
    """Typed reads (jsonvalues) of one adapter's settings, shared by the PEFT reader (adapter_config.json) and
    ours (the header's `lora` entry, prefix "lora.", and its metadata). Every bad value is one AdapterError line
    '<file>: <field>: <what is wrong>; <what to do>'. `fix`: what to do about any field (our header, which no one
    edits by hand); None: the value's own advice (a JSON file the user can correct)."""

    raw: dict
    file: Path
    prefix: str = ""
    fix: str | None = None

    def fail(self, field: str, problem: str, advice: str) -> AdapterError:
        return AdapterError(f"{self.file}: {self.prefix}{field}: {problem}; {self.fix or advice}")

    def check(self, field: str, value, kind: str, example=None, **words):
        """`value` if it is of the jsonvalues `kind`; words: what / how / nullable, as jsonvalues.complaint."""
        problem = complaint(value, kind, example, **words)
        if problem is not None:
            raise self.fail(field, *problem)
        return value

    def get(self, key: str, kind: str, default=None, example=None, **words):
        """raw[key] checked as `kind`; absent or null gives `default` (_REQUIRED: absent is an error)."""
        if key not in self.raw and default is _REQUIRED:  # the advice a bad value gets (null is no good value here)
            raise self.fail(key, "missing", complaint(None, kind, example, **{**words, "nullable": False})[1])
        value = self.raw.get(key)
        if value is None and default is not _REQUIRED:
            return default
        return self.check(key, value, kind, example, **words)

    def choice(self, key: str, choices, default):
        value = self.raw.get(key, default)
        if type(value) is not str or value not in choices:
            raise self.fail(key, f"{shown(value)} is not one of {', '.join(choices)}",
                            f"write one of {', '.join(choices)}")
        return value

    def names(self, key: str, default=None, regex: bool = False):
        """A list of module names; regex: a str is good too (PEFT's target_modules as one regular expression)."""
        if regex and type(self.raw.get(key)) is str:
            return self.raw[key]
        words = (dict(what="a list of module names or a regular expression", how="a JSON list of module names")
                 if regex else dict(what="a list of module names", how="a JSON list",
                                    nullable=default is not _REQUIRED))  # a required list: null is damage
        value = self.get(key, "names", default, ["c_attn"] if regex else ["lm_head"], **words)
        return list(value) if isinstance(value, list) else value

    def pattern(self, key: str, kind: tuple[str, float]) -> dict:
        """PEFT's rank_pattern / alpha_pattern: module name (or regex) -> rank or alpha (kind: RANK or ALPHA);
        absent or null: {}."""
        value = self.raw.get(key)
        if value is None:
            return {}
        self.check(key, value, "object", {"c_attn": kind[1]},
                   what=f"a mapping of module names to {'ranks' if kind is RANK else 'alphas'}")
        return {k: self.check(f"{key}[{json.dumps(k)}]", v, *kind) for k, v in value.items()}


# ---------------------------------------------------------------------------------------------- our format


def save_adapter(path: str | os.PathLike, model: torch.nn.Module, metadata: dict | None = None,
                 dtype: torch.dtype | str | None = None) -> Path:
    """Write the model's adapter (apply_lora'd model) as one .safetensors file, atomically.

    `metadata`: base_model (BaseModel.describe()), task, tokenizer, prompt_template, training summary, ...;
    None values are left out. dtype: None keeps the parameters' dtype (fp32), else fp32/bf16/fp16."""
    metadata = dict(metadata or {})
    clash = [k for k in RESERVED if k in metadata]
    if clash:
        raise ValueError(f"metadata key {clash[0]!r} is written by save_adapter itself")
    target = as_dtype(dtype) if dtype is not None else None
    # Cloned: safetensors refuses tensors that share storage (a tied head saved whole, say).
    # PiSSA / OLoRA adapters are converted to apply to the untouched base (lora.portable_adapter).
    state, settings = portable_adapter(model)
    state.update({k: v for k, v in task_head_state(model).items() if k not in state})
    tensors = {k: v.to("cpu", target or v.dtype, copy=True).contiguous() for k, v in state.items()}
    header = {"format": "pt", "format_version": str(FORMAT_VERSION), "lora": json.dumps(settings)}
    tied = [m for m in settings["modules_to_save"] if shares_weight(model, m)]
    if tied:  # saved whole, and tied to another module: PEFT cannot say so (export_peft refuses it)
        metadata["tied_modules_to_save"] = tied
    metadata.setdefault("tokenizer", "gpt2")
    for key, value in metadata.items():
        if value is not None:
            header[str(key)] = value if isinstance(value, str) else json.dumps(value)
    path = Path(path)
    with atomic_path(path) as tmp:
        write_tensors(tmp, tensors, header)
    return path


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A .safetensors file of `tensors` at `path` (a temporary path: callers rename it into place)."""
    path.write_bytes(safetensors_bytes(tensors, metadata))


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors.torch.save's file with its header's metadata in sorted order: the library writes that map in
    an order that changes from one process to the next, so the same adapter saved twice (a resumed run and the
    uninterrupted one) differed in its bytes. The tensors' bytes and offsets are the library's."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # padded to 8 bytes, as the library pads it
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter: our .safetensors file, a run directory holding adapter.safetensors, or a PEFT LoRA
    adapter directory (adapter_config.json + adapter_model.safetensors or adapter_model.bin)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AdapterError(f"adapter {p} does not exist; pass an adapter .safetensors file or a PEFT adapter directory")
    if p.is_dir():
        if (p / PEFT_CONFIG).is_file():
            return _load_peft(p)
        if (p / ADAPTER_FILE).is_file():
            return _load_ours(p / ADAPTER_FILE)
        raise AdapterError(f"{p} has no {PEFT_CONFIG}; a PEFT adapter directory needs {PEFT_CONFIG} and "
                           f"{PEFT_WEIGHTS[0]} (or {PEFT_WEIGHTS[1]}), a run directory needs {ADAPTER_FILE}")
    return _load_ours(p)


def _load_ours(p: Path) -> Adapter:
    try:
        with safe_open(str(p), framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as exc:
        raise AdapterError(f"cannot read adapter {p}: {exc.strerror or exc}") from exc
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise AdapterError(f"cannot load adapter {p}: it is truncated, corrupt, or not a safetensors file "
                           f"({first_line(exc)})") from exc
    if "lora" not in header:
        raise AdapterError(f"{p} is not a lora-cli adapter (its header has no LoRA settings); pass an adapter "
                           f"written by `lora train`, or a PEFT adapter directory")
    try:
        version = int(header.get("format_version", "1"))
        s = json.loads(header["lora"])
        if not isinstance(s, dict):
            raise TypeError(f"lora is {type(s).__name__}, not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"{p}: the adapter's LoRA settings are damaged ({first_line(exc)})") from exc
    fields = _Fields(s, p, "lora.", OURS_FIX)
    lora = LoraConfig(r=fields.get("r", RANK[0], _REQUIRED, RANK[1]),
                      alpha=float(fields.get("alpha", ALPHA[0], _REQUIRED, ALPHA[1])),
                      dropout=float(fields.get("dropout", DROPOUT[0], _REQUIRED, DROPOUT[1])),
                      targets=fields.names("targets", _REQUIRED), layers=None,
                      use_rslora=fields.get("use_rslora", "bool", _REQUIRED),
                      use_dora=fields.get("use_dora", "bool", _REQUIRED), bias=fields.choice("bias", BIASES, None),
                      modules_to_save=fields.names("modules_to_save", _REQUIRED))
    rank_pattern = fields.pattern("rank_pattern", RANK)
    alpha_pattern = {k: float(v) for k, v in fields.pattern("alpha_pattern", ALPHA).items()}
    if version > FORMAT_VERSION:
        raise AdapterError(f"{p} has adapter format version {version}; this lora-cli reads up to "
                           f"{FORMAT_VERSION}: upgrade lora-cli")
    metadata: dict = {"format_version": version}
    for key, value in header.items():
        if key in RESERVED:
            continue
        if value[:1] in ("{", "["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        metadata[key] = value
    base_model = _Fields(metadata, p, "", OURS_FIX).get("base_model", "object")
    if base_model is not None:  # pretrained.BaseModel.describe(): where to load the base from, and its fingerprint
        described = _Fields(base_model, p, "base_model.", OURS_FIX)
        for key in ("source", "name", "revision", "fingerprint"):
            described.get(key, "text", nullable=True)
    problem = damaged_settings(metadata)
    if problem:
        raise AdapterError(f"{p}: the adapter's settings are damaged ({problem}); train it again or use another adapter")
    return Adapter(tensors, lora, metadata, p, "lora-cli", rank_pattern, alpha_pattern)


def _peft_base_copies(model: torch.nn.Module, adapter: Adapter, expected, misfit: str) -> set[str]:
    """The base weights PEFT saves beside the LoRA of an adapted head or embedding (save_embedding_layers): copies
    of the base's own, so nothing to load; a changed one (a resized vocabulary) is refused."""
    copies = set()
    for key in adapter.tensors:
        if key in expected or not key.endswith(".base_layer.weight"):
            continue
        module = key[: -len(".weight")]
        mine = getattr(model.get_submodule(module), "weight", None) if _has_module(model, module) else None
        if mine is None:
            continue  # not an adapted layer of this model: reported as unexpected
        saved = adapter.tensors[key]
        # check_fits' meta copy has no values to compare: the shapes now, the values when the adapter is attached
        same = saved.shape == mine.shape and (mine.is_meta or torch.equal(saved.to(mine.dtype), mine.detach().cpu()))
        if not same:
            raise AdapterError(f"{misfit}: PEFT saved a base weight of {module.removesuffix('.base_layer')} other than "
                               "the base model's (a resized vocabulary?); load the adapter onto the base it was "
                               "trained on")
        copies.add(key)
    return copies


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def damaged_settings(metadata: dict) -> str | None:
    """What in an adapter header's task and data settings no training run writes, or None: eval, generate,
    predict, merge and export all act on them. A stored prompt template must be one training takes and rendering
    renders; a stored chat template must compile; the labels must be distinct names (text or numbers, which
    predict shows as text)."""
    task = metadata.get("task") or "causal_lm"
    if task not in TASKS:
        return f"task {task!r} is not {' or '.join(TASKS)}"
    data = metadata.get("data") or {}
    if isinstance(data, str):  # an older writer stored it unparsed (inference.DataSettings reads it so)
        try:
            data = json.loads(data)
        except json.JSONDecodeError:
            return None
    if not isinstance(data, dict):
        return f"data {data!r} is not a mapping"
    is_text = lambda v: v is None or isinstance(v, str)  # noqa: E731
    max_length, columns = data.get("max_length"), data.get("columns") or {}
    if (data.get("format") or "auto") not in FORMAT_CHOICES:
        return f"data.format {data['format']!r} is not one of {', '.join(FORMAT_CHOICES)}"
    if max_length is not None and (type(max_length) is not int or max_length < 2):
        return f"data.max_length {max_length!r} is not an integer >= 2"
    if not isinstance(data.get("mask_prompt", True), bool):
        return f"data.mask_prompt {data['mask_prompt']!r} is not true or false"
    labels = data.get("labels")
    if labels is not None:
        if not isinstance(labels, list) or not all(type(x) in (str, int, float) for x in labels):
            return f"data.labels {shown(labels)} is not a list of label names (text or numbers)"
        twice = first_repeat(str(x) for x in labels)  # as predict, merge and export name them
        if twice is not None:
            return f"data.labels {shown(labels)} lists {twice!r} twice"
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        return "data.columns does not map roles to column names"
    if not (is_text(data.get("prompt_template")) and is_text(data.get("chat_template"))):
        return "data.prompt_template or data.chat_template is not text"
    if (data.get("train_on") or TRAIN_ON[0]) not in TRAIN_ON:
        return f"data.train_on {data['train_on']!r} is not one of {', '.join(TRAIN_ON)}"
    one_line = lambda text: text.replace("\n", "\\n").replace("\r", "\\r")  # noqa: E731
    template, fmt = data.get("prompt_template"), data.get("format") or "auto"
    response = RESPONSE_ROLE.get(fmt)
    if template is not None:  # what rendering takes (config.parse_template) and training wrote
        bad = f"data.prompt_template {shown(template)}:"
        try:
            fields = [name for _, name in parse_template(template) if name is not None]
        except ValueError as exc:
            return one_line(f"{bad} {exc.args[0]}")
        if response in fields:
            return f"{bad} {{{response}}} is the response and cannot be in the prompt"
        # Training took a field that is a role or a column of its file; the header lists the roles' columns only,
        # so another column is taken beside one of those, but not alone: every prompt's text would be left out.
        if response is not None and not fields:
            return f"{bad} names no field, so every example would get the same prompt"
        if response is not None and not {*DATA_FORMATS.get(fmt, ()), *columns.values()} & set(fields):
            return one_line(f"{bad} unknown field {{{fields[0]}}}")
    chat = data.get("chat_template")
    if chat is not None:
        if chat not in BUILTIN_CHAT_TEMPLATES and not is_inline_template(chat):  # training stores the text
            return f"data.chat_template {shown(chat)} is not a chat template's Jinja text"
        problem = template_problem(BUILTIN_CHAT_TEMPLATES.get(chat, chat))
        if problem is not None:
            return one_line(f"data.chat_template {problem}")
    return None


# ------------------------------------------------------------------------------------------- onto a base


def attach_adapter(base: BaseModel | torch.nn.Module, adapter: Adapter | str | os.PathLike,
                   allow_mismatch: bool = False) -> torch.nn.Module:
    """Apply the adapter's LoRA layers to base.model (in place) and load its weights; returns the model.

    The base must be the one the adapter was trained on (same fingerprint) unless allow_mismatch; tensor
    shapes must fit in any case. A bare model (no BaseModel record) skips the fingerprint check."""
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    if isinstance(base, BaseModel):
        model, base_name, have = base.model, base.name, base.fingerprint
    else:
        model, base_name, have = base, "the base model", None
    made_for, base_family = adapter_family(adapter.tensors), adapter_family(n for n, _ in model.named_parameters())
    if made_for and base_family and made_for != base_family:
        raise AdapterError(f"adapter {adapter.path} was trained on a {FAMILY_WORDS[made_for]} model, but base model "
                           f"{base_name} is a {FAMILY_WORDS[base_family]} model; load the adapter onto its own base "
                           f"model (--model)")
    want = adapter.base_model.get("fingerprint")
    if want and have and want != have and not allow_mismatch:
        raise AdapterError(
            f"adapter {adapter.path} was trained on base model {adapter.base_model.get('name')} (fingerprint {want}), "
            f"but the loaded base {base_name} has fingerprint {have}; load the adapter's base model, "
            f"or pass --allow-mismatch to use it anyway"
        )
    misfit = f"adapter {adapter.path} does not fit base model {base_name}"
    if adapter.kind == "peft" and isinstance(getattr(model, NEOX_HEAD, None), torch.nn.Module):
        adapter = _with_head_renamed(adapter, NEOX_PEFT_HEAD, NEOX_HEAD)  # transformers 5's name -> ours
    if adapter.metadata.get("peft_unties"):
        tied = next((m for m in adapter.lora.modules_to_save if _has_module(model, m) and shares_weight(model, m)), None)
        if tied is not None:
            raise AdapterError(f"{misfit}: PEFT saved {tied} apart from the module its base ties it to (it unties them: "
                               "ensure_weight_tying is false), while lora-cli keeps tied weights tied; save the adapter "
                               "with PEFT's ensure_weight_tying=True")
    head_tensors = _attach_task_head(model, adapter, misfit)
    available = set(target_candidates(model))
    absent = [t for t in adapter.lora.targets if t not in available]
    if absent and _has_module(model, absent[0]) and shares_weight(model, absent[0]):
        raise AdapterError(f"{misfit}: it adapts {absent[0]}, which that base ties to its input embedding; lora-cli "
                           "adapts no tied head (a change there would change the embedding too)")
    if absent:
        raise AdapterError(f"{misfit}: it adapts {absent[0]}, which that model does not have; "
                           f"the adapter was made for a different base model")
    try:
        apply_lora(model, adapter.lora, rank_pattern=adapter.rank_pattern, alpha_pattern=adapter.alpha_pattern)
    except ConfigError as exc:
        raise AdapterError(f"{misfit}: {exc}") from exc
    expected = adapter_state_dict(model)
    copies = _peft_base_copies(model, adapter, expected, misfit) if adapter.kind == "peft" else set()
    mismatch = key_mismatch([k for k in expected if k not in adapter.tensors],
                            [k for k in adapter.tensors if k not in expected and k not in head_tensors | copies])
    if mismatch:
        raise AdapterError(f"{misfit}: {mismatch}")
    for key, param in expected.items():
        given = adapter.tensors[key]
        if tuple(given.shape) != tuple(param.shape):
            raise AdapterError(f"{misfit}: tensor {key} has shape {list(given.shape)}, the model needs "
                               f"{list(param.shape)}; the adapter was made for a different base model")
    check_finite(adapter, expected)
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(adapter.tensors[key])
    return model


def check_finite(adapter: Adapter, keys: Iterable[str] | None = None) -> None:
    """AdapterError for the first of `keys` (default: every tensor) that is not finite floating point (a NaN, an
    infinity, integers): the file is corrupt, and nothing computed or written from it would be right."""
    for key in adapter.tensors if keys is None else keys:
        given = adapter.tensors[key]
        if not given.is_floating_point() or not bool(torch.isfinite(given).all()):
            raise AdapterError(f"adapter {adapter.path}: tensor {key} is not finite floating point; the file is corrupt")


def check_fits(base: BaseModel, adapter: Adapter, allow_mismatch: bool = False) -> None:
    """attach_adapter's checks (family, fingerprint, targets, tensor names and shapes) on a meta copy of the base's
    architecture, the base left bare: a command that measures the bare base first refuses a misfit before its
    work and its output begin."""
    attach_adapter(replace(base, model=meta_model(base.model.config)), adapter, allow_mismatch)


def task_head_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a task head (model.score), trained or frozen: the base checkpoint does not have it, so
    the adapter must (a frozen head under LoRA, as the reference classifier, is random init otherwise)."""
    head = getattr(model, HEAD, None)
    if head is None:
        return {}
    return {f"{HEAD}.{k}": v.detach() for k, v in head.state_dict().items()}


def _attach_task_head(model: torch.nn.Module, adapter: Adapter, misfit: str) -> set[str]:
    """For a classification adapter: add model.score with the adapter's labels and load its frozen base weight
    (before LoRA wraps it). Returns the adapter keys consumed here."""
    if adapter.metadata.get("task") != "classification":
        return set()
    labels = (adapter.metadata.get("data") or {}).get("labels") or adapter.metadata.get("labels")
    if not labels:
        raise AdapterError(f"adapter {adapter.path}: a classification adapter without its labels; the file is damaged")
    if getattr(model, HEAD, None) is None:
        add_classification_head(model, len(labels))
    consumed = set()
    for key in (f"{HEAD}.weight", f"{HEAD}.base_layer.weight"):
        if key in adapter.tensors:
            weight = adapter.tensors[key]
            if tuple(weight.shape) != tuple(model.score.weight.shape):
                raise AdapterError(f"{misfit}: tensor {key} has shape {list(weight.shape)}, the model needs "
                                   f"{list(model.score.weight.shape)}")
            with torch.no_grad():
                model.score.weight.copy_(weight)
            if key.endswith("base_layer.weight"):
                consumed.add(key)
    return consumed


# ------------------------------------------------------------------------------------------------ PEFT import


def _load_peft(d: Path) -> Adapter:
    cfg_path = d / PEFT_CONFIG
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{cfg_path} is not a readable JSON file ({first_line(exc)})") from exc
    if not isinstance(raw, dict):
        raise AdapterError(f"{cfg_path} must hold a JSON object")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {peft_type!r}; lora-cli reads LoRA adapters only")
    for key, harmless in PEFT_UNSUPPORTED.items():
        if raw.get(key) not in harmless:
            raise AdapterError(f"{cfg_path}: {key} = {raw.get(key)!r} is not supported by lora-cli; "
                               f"export the adapter without it")
    # The types peft's LoraConfig gives its fields, and nothing else (no "false" for false, no 4.5 for a rank).
    fields = _Fields(raw, cfg_path)
    r, alpha = fields.get("r", RANK[0], _REQUIRED, RANK[1]), float(fields.get("lora_alpha", ALPHA[0], _REQUIRED, ALPHA[1]))
    rank_cfg, alpha_cfg = fields.pattern("rank_pattern", RANK), fields.pattern("alpha_pattern", ALPHA)
    dropout = float(fields.get("lora_dropout", DROPOUT[0], 0.0, DROPOUT[1]))
    use_rslora, use_dora = fields.get("use_rslora", "bool", False), fields.get("use_dora", "bool", False)
    tying = fields.get("ensure_weight_tying", "bool", False)
    fields.names("target_modules", regex=True)  # unused (the weights name the targets), but a bad value is damage
    modules_to_save = fields.names("modules_to_save", [])
    base_name = fields.get("base_model_name_or_path", "text", how="the base model's hub id or directory", nullable=True)
    revision = fields.get("revision", "text", how="the base model's revision (branch, tag or commit)", nullable=True)
    task_type = raw.get("task_type")
    if task_type is not None and (type(task_type) is not str or task_type not in PEFT_TASKS):
        raise fields.fail("task_type", f"{shown(task_type)} is not supported by lora-cli",
                          f"use a {' or '.join(PEFT_TASKS)} adapter (task_type "
                          f"{', '.join(json.dumps(t) for t in PEFT_TASKS)} or null)")
    weights = next((d / f for f in PEFT_WEIGHTS if (d / f).is_file()), None)
    if weights is None:
        raise AdapterError(f"{d} has {PEFT_CONFIG} but no {PEFT_WEIGHTS[0]} or {PEFT_WEIGHTS[1]}")
    state = read_state_dict(weights, AdapterError, "adapter ")
    for name, patterns in (("rank_pattern", rank_cfg), ("alpha_pattern", alpha_cfg)):
        for key in patterns:
            try:
                re.compile(key)
            except re.error as exc:
                raise AdapterError(f"{cfg_path}: cannot honour {name} key {key!r}: not a valid regular "
                                   f"expression ({exc})") from exc

    # Keys: drop the prefix and any adapter name (lora_A.default.weight), unify the DoRA vector's name.
    tensors: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if "lora_embedding" in k or ".lora_E" in k:
            raise AdapterError(f"{weights}: {key} is not a LoRA weight of a linear layer; lora-cli adapts linear layers only")
        k = re.sub(r"\.(lora_A|lora_B)\.[^.]+\.weight$", r".\1.weight", k)
        k = re.sub(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$", ".lora_magnitude_vector", k)
        tensors[k] = t
    # bias="all" with modules_to_save: PEFT saves each saved module's bias twice more, the trained one as
    # X.modules_to_save.bias (also X.bias) and the base's as X.original_module.bias; it reads neither back
    for k in [k for k in tensors if ".original_module." in k or ".modules_to_save." in k]:
        t = tensors.pop(k)
        if ".original_module." in k:
            continue
        plain = k.replace(".modules_to_save.", ".")
        if plain in tensors and not torch.equal(tensors[plain], t):
            raise AdapterError(f"{weights}: {k} differs from {plain}, which holds the same module's "
                               "saved weight; the file is inconsistent: save the adapter again")
        tensors.setdefault(plain, t)
    targets = [k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")]
    if not targets:
        raise AdapterError(f"{weights} holds no lora_A weights; it is not a LoRA adapter")
    rank_pattern, alpha_pattern = {}, {}
    for t in targets:
        if f"{t}.lora_B.weight" not in tensors:
            raise AdapterError(f"{weights}: {t} has lora_A but no lora_B; the file is incomplete")
        if use_dora and f"{t}.lora_magnitude_vector" not in tensors:
            raise AdapterError(f"{weights}: use_dora is true but {t} has no lora_magnitude_vector")
        rank = tensors[f"{t}.lora_A.weight"].shape[0]
        want = pattern_value(rank_cfg, t, r)
        if rank != want:
            raise AdapterError(f"{weights}: {t}.lora_A has rank {rank} but {PEFT_CONFIG} gives r={want}; "
                               f"the two files do not belong together")
        if rank != r:
            rank_pattern[t] = rank
        a = float(pattern_value(alpha_cfg, t, alpha))
        if a != alpha:
            alpha_pattern[t] = a

    # Biases of adapted layers live under base_layer in our names (older PEFT saved them without it).
    target_set = set(targets)
    for k in list(tensors):
        if k.endswith(".bias") and k[: -len(".bias")] in target_set:
            tensors[k[: -len(".bias")] + ".base_layer.bias"] = tensors.pop(k)
    # Whole saved modules: PEFT names them by a plain suffix (`norm` is every *norm); resolve against the tensors.
    saved: list[str] = []
    for entry in modules_to_save:
        for k in tensors:
            if ".lora_" in k or ".base_layer." in k:
                continue
            parts = k.split(".")[:-1]
            for i in range(len(parts), 0, -1):
                module = ".".join(parts[:i])
                if module.endswith(entry):
                    if module not in saved:
                        saved.append(module)
                    break
    if tying:  # PEFT saved the tied head beside the embedding it shares: one tensor, as lora-cli keeps it
        for head in ("lm_head.weight", "embed_out.weight"):
            if head in tensors and not any(head.startswith(m + ".") for m in saved) and any(
                    torch.equal(tensors[head], tensors[f"{m}.weight"]) for m in saved if f"{m}.weight" in tensors):
                del tensors[head]
    for k in list(tensors):
        if k.endswith(CONV1D_SUFFIXES) and any(k.startswith(m + ".") for m in saved):
            tensors[k] = tensors[k].t().contiguous()  # Conv1D [in, out] -> our [out, in]

    # A PiSSA / OLoRA adapter saved without conversion needs its base's residual: PEFT recomputes it when it loads
    # the adapter, and so does apply_lora (the same arithmetic). Random or data-driven starts cannot be redone.
    init = raw.get("init_lora_weights", True)
    if init not in (True, False, None, "gaussian", *MUTATING_INITS):
        raise AdapterError(f"{cfg_path}: init_lora_weights {init!r} is not supported by lora-cli; save the adapter "
                           f"with PEFT's path_initial_model_for_weight_conversion (a plain LoRA of the untouched base)")
    bias = fields.choice("bias", BIASES, "none")
    lora = LoraConfig(r=r, alpha=alpha, dropout=dropout, targets=targets, layers=None,
                      use_rslora=use_rslora, use_dora=use_dora, bias=bias, modules_to_save=saved,
                      init=init if init in MUTATING_INITS else "default")
    base_model = {"source": "peft", "name": base_name, "revision": revision, "fingerprint": None}
    metadata = {"format_version": FORMAT_VERSION, "base_model": base_model, "task": PEFT_TASKS.get(task_type),
                "tokenizer": "gpt2", "peft_unties": not tying}
    # How the adapter's data was encoded (format, columns, templates, max_length, ...): export_peft keeps lora-cli's
    # settings in the weights file's header (PEFT ignores it), and a chat adapter's template beside it, as
    # transformers saves one; an adapter from elsewhere has neither, and is read with the defaults.
    header = _peft_header(weights)
    data = _header_json(header, "lora_cli_data")
    data = dict(data) if isinstance(data, dict) else {}
    if data.get("chat_template") is None and (d / PEFT_CHAT_TEMPLATE).is_file():
        data["chat_template"] = _read_text(d / PEFT_CHAT_TEMPLATE)
    head = tensors.get(f"{HEAD}.weight")
    if metadata["task"] == "classification" and head is not None:
        # The label names (lora_cli_labels, as older exports wrote them too); a classifier exported elsewhere (or
        # names that do not fit the head, or repeat) gets the class ids as names.
        labels = _header_json(header, "lora_cli_labels")
        labels = [str(x) for x in labels] if isinstance(labels, list) else None
        if labels is None or len(labels) != head.shape[0] or first_repeat(labels) is not None:
            labels = [str(i) for i in range(head.shape[0])]
        data.update(format="classification", labels=labels)
    if data:
        metadata["data"] = data
        problem = damaged_settings(metadata)
        if problem:
            raise AdapterError(f"{weights}: the adapter's settings are damaged ({problem}); export it again")
    return Adapter(tensors, lora, metadata, d, "peft", rank_pattern, alpha_pattern)


def _peft_header(weights: Path) -> dict[str, str]:
    """The string metadata of a PEFT weights file's safetensors header ({} for a .bin file)."""
    if weights.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # an unreadable header was reported by read_state_dict already; lora-cli's entries are optional
        return {}


def _header_json(header: dict[str, str], key: str):
    """One of export_peft's JSON entries in a weights file's header, or None (absent or not JSON)."""
    try:
        return json.loads(header.get(key, "null"))
    except (TypeError, ValueError):
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdapterError(f"cannot read {path}: {first_line(exc)}; export the adapter again") from exc


# ------------------------------------------------------------------------------------------------ PEFT export


def peft_state_dict(adapter: Adapter) -> tuple[dict[str, torch.Tensor], list[str], dict[str, int]]:
    """Our tensors -> PEFT's (keys, orientation, slices fused); also PEFT's target_modules and rank_pattern."""
    lora, tensors = adapter.lora, adapter.tensors
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    peft_targets: list[str] = []
    rank_pattern: dict[str, int] = {}

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise AdapterError(f"adapter {adapter.path} lacks tensor {key}; the file is incomplete")
        used.add(key)
        return tensors[key]

    def scaling(name: str) -> float:
        r = adapter.rank_pattern.get(name, lora.r)
        return lora_scaling(r, adapter.alpha_pattern.get(name, lora.alpha), lora.use_rslora)

    for t in lora.targets:
        if t == HEAD:  # PEFT's base model brings its own random score: export this head folded, as a saved module
            out[f"{PEFT_PREFIX}{HEAD}.weight"] = _folded_head(adapter, take, scaling(t))
            continue
        split = _split_slice_name(t)
        if split is None:
            A, B = take(f"{t}.lora_A.weight"), take(f"{t}.lora_B.weight")
            r = A.shape[0]
            # PEFT's scaling for this module is lora_alpha / r (r from rank_pattern); fold any difference into B.
            ratio = scaling(t) / lora_scaling(r, lora.alpha, lora.use_rslora)
            out[f"{PEFT_PREFIX}{t}.lora_A.weight"] = A
            out[f"{PEFT_PREFIX}{t}.lora_B.weight"] = B if ratio == 1 else (B.float() * ratio).to(B.dtype)
            if lora.use_dora:
                out[f"{PEFT_PREFIX}{t}.lora_magnitude_vector"] = take(f"{t}.lora_magnitude_vector")
            peft_targets.append(t)
            if r != lora.r:
                rank_pattern[t] = r
            continue
        parent = split[0]
        if parent in peft_targets:
            continue  # its slices were all written with the first one
        prefix = t.rsplit(".", 1)[0]
        names = [s for s in SLICES if f"{prefix}.{s}" in lora.targets]
        As = [take(f"{parent}.lora_{s}.lora_A.weight") for s in names]
        Bs = [take(f"{parent}.lora_{s}.lora_B.weight") for s in names]
        r_total = sum(A.shape[0] for A in As)
        width = Bs[0].shape[0]  # one third of the c_attn output
        peft_scaling = lora_scaling(r_total, lora.alpha, lora.use_rslora)
        # One adapter of rank r_q + r_k + r_v: A stacked, B block-diagonal over (output third, rank block).
        B_full = torch.zeros(len(SLICES) * width, r_total, dtype=torch.float32)
        col = 0
        for s, A, B in zip(names, As, Bs):
            row = SLICES.index(s) * width
            B_full[row : row + width, col : col + A.shape[0]] = B.float() * (scaling(f"{prefix}.{s}") / peft_scaling)
            col += A.shape[0]
        out[f"{PEFT_PREFIX}{parent}.lora_A.weight"] = torch.cat(As, dim=0)
        out[f"{PEFT_PREFIX}{parent}.lora_B.weight"] = B_full.to(Bs[0].dtype)
        peft_targets.append(parent)
        if r_total != lora.r:
            rank_pattern[parent] = r_total
    for key, t in tensors.items():
        if key in used:
            continue
        if ".lora_" in key:
            raise AdapterError(f"adapter {adapter.path}: tensor {key} belongs to no target; the file is inconsistent")
        # Whole saved modules that are Conv1D in transformers go back to [in, out].
        out[f"{PEFT_PREFIX}{key}"] = t.t() if key.endswith(CONV1D_SUFFIXES) else t
    return {k: v.contiguous() for k, v in out.items()}, peft_targets, rank_pattern


def _folded_head(adapter: Adapter, take, scaling: float) -> torch.Tensor:
    """The weight of a LoRA'd classification head with its update folded in: W + scaling B A (DoRA: rescaled
    row by row by its magnitude), computed by LoRALinear.merge itself so it equals what the model computes."""
    W = take(f"{HEAD}.base_layer.weight")
    A, B = take(f"{HEAD}.lora_A.weight"), take(f"{HEAD}.lora_B.weight")
    linear = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer = LoRALinear(linear, A.shape[0], adapter.lora.alpha, use_rslora=adapter.lora.use_rslora,
                       use_dora=adapter.lora.use_dora)
    with torch.no_grad():
        linear.weight.copy_(W.float())
        layer.lora_A.weight.copy_(A.float())
        layer.lora_B.weight.copy_(B.float())
        if adapter.lora.use_dora:
            layer.lora_magnitude_vector.copy_(take(f"{HEAD}.lora_magnitude_vector").float())
    layer.scaling = scaling
    layer.merge()
    return linear.weight.detach().to(W.dtype)


def adapter_family(names) -> str | None:
    """The family a model's tensor names belong to, by their top-level module (the checkpoint's own names):
    transformer. GPT-2, gpt_neox. GPT-NeoX, model. the Llama family (llama, mistral, qwen2, qwen3)."""
    tops = {name.split(".", 1)[0] for name in names} - {HEAD}
    return next((family for top, family in FAMILY_TOPS.items() if top in tops), None)


def peft_config(adapter: Adapter, target_modules: list[str], rank_pattern: dict[str, int]) -> dict:
    """adapter_config.json for PEFT's LoraConfig (unlisted fields take PEFT's defaults). A classifier's head is
    always a saved module (modules_to_save: score), task_type SEQ_CLS, for GPT2ForSequenceClassification."""
    lora, base = adapter.lora, adapter.base_model
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    saved = list(lora.modules_to_save)
    if adapter.metadata.get("task") == "classification" and HEAD not in saved:
        saved.append(HEAD)
    return {
        "peft_type": "LORA",
        "task_type": {v: k for k, v in PEFT_TASKS.items()}.get(adapter.metadata.get("task")),
        "base_model_name_or_path": base.get("name"),
        "revision": base.get("revision"),
        "r": lora.r,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules,  # full module names: PEFT matches them exactly
        "fan_in_fan_out": adapter_family(adapter.tensors) == "gpt2",  # transformers' GPT-2 uses Conv1D
        "bias": lora.bias,
        "use_rslora": lora.use_rslora,
        "use_dora": lora.use_dora,
        "modules_to_save": saved or None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},  # every scaling difference is folded into B
        "init_lora_weights": lora.init if lora.init in MUTATING_INITS else True,  # pissa/olora: PEFT's own unconverted
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "lora_bias": False,
    }


def export_peft(adapter: Adapter | str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) that
    peft.PeftModel.from_pretrained(transformers GPT2LMHeadModel, out_dir) loads (a classifier:
    GPT2ForSequenceClassification with num_labels, its head in modules_to_save). The directory appears whole
    (built beside it, then renamed); an existing one is replaced only with `overwrite`, and only if it is itself
    an adapter directory."""
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    check_finite(adapter)  # as every command that attaches it refuses it: no export that nothing can load
    tied = adapter.metadata.get("tied_modules_to_save")
    if tied:
        raise AdapterError(f"adapter {adapter.path} saves {tied[0]} whole, a module its base ties to another; PEFT "
                           "unties such a module when it loads it, so the export would not compute as trained; "
                           "use the adapter with lora-cli, or train it without that lora.modules_to_save entry")
    out = Path(out_dir).expanduser()
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"{out} exists and is a file; choose a new output directory")
        others = [p.name for p in out.iterdir() if p.name not in (PEFT_CONFIG, *PEFT_WEIGHTS, "README.md",
                                                                   PEFT_CHAT_TEMPLATE)]
        if others:
            raise ConfigError(f"{out} exists and holds other files ({others[0]}); choose a new or empty output directory")
        if not overwrite and any(out.iterdir()):
            raise ConfigError(f"{out} already exists; choose a new directory or pass --overwrite to replace it")
        if any(out.iterdir()) and not (out / PEFT_CONFIG).is_file():  # a README.md of the user's own, alone
            raise ConfigError(f"{out} holds no {PEFT_CONFIG}, so it is no earlier export that --overwrite would "
                              "replace; choose a new or empty output directory")
    if adapter_family(adapter.tensors) == "gpt_neox":
        adapter = _with_head_renamed(adapter, NEOX_HEAD, NEOX_PEFT_HEAD)
    tensors, targets, rank_pattern = peft_state_dict(adapter)
    config = peft_config(adapter, targets, rank_pattern)
    with atomic_dir(out, AdapterError) as staging:
        atomic_write_text(staging / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
        with atomic_path(staging / PEFT_WEIGHTS[0]) as tmp:
            # lora-cli's own import reads back how the data was encoded (PEFT ignores these entries)
            data = adapter.metadata.get("data") or {}
            header = {"format": "pt", "lora_cli_data": json.dumps(data)}
            labels = data.get("labels")
            if adapter.metadata.get("task") == "classification" and labels:
                header["lora_cli_labels"] = json.dumps([str(x) for x in labels])
            write_tensors(tmp, tensors, header)
        template = (adapter.metadata.get("data") or {}).get("chat_template")
        if template:  # a chat adapter: its template beside it, as transformers saves one (chat_template.jinja)
            atomic_write_text(staging / PEFT_CHAT_TEMPLATE, template)
    return out
