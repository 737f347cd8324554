"""The run configuration: one typed schema, the only home of defaults.

`load_config(path, overrides)` reads YAML, applies `--set a.b=value` overrides, coerces values to the schema's
types (PyYAML reads `3e-4` as a string), checks every constraint, and reports every problem at once, each with
the key and its line. Unknown keys are errors with a did-you-mean. Relative paths are resolved against the
config file's folder. Nothing here imports torch, so `lora --help` and config errors stay fast.
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import math
import os
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lora_cli.errors import (KNOWN_ALIASES, ConfigError, LoraError, all_problems, did_you_mean, first_line,
                             first_repeat)
from lora_cli.jsonvalues import lone_surrogate

ARCH_OVERRIDES = ("n_layer", "n_head", "n_embd", "n_positions")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # a model named as a single weights file
SEEDS = range(-2**63, 2**64)  # the seeds torch.Generator.manual_seed takes
SEEDS_TEXT = f"an integer from {SEEDS.start} to {SEEDS.stop - 1}"
MAX_THREADS = 1024  # train.num_threads: more threads than this no CPU has, and their stacks exhaust memory

# train.device and --device: auto, cpu, cuda, cuda:1, mps (an index as torch writes it: no leading zero)
DEVICE = re.compile(r"auto|(cpu|cuda|mps)(:(0|[1-9]\d{0,3}))?")


@dataclass
class ModelSpec:
    """Which base model: a hub id (`gpt2`, `org/name@revision`), a local directory or weights file, or a
    preset with random weights (`{name: gpt2, init: random}`, optionally with n_layer/n_head/n_embd/n_positions
    to shrink it for smoke tests)."""

    name: str
    init: Literal["pretrained", "random"] = "pretrained"
    revision: str | None = None
    seed: int = 0  # random init only
    overrides: dict = field(default_factory=dict)
    tokenizer: str | None = None  # a tokenizer directory or tokenizer.json (random presets: else GPT-2's BPE)

    @classmethod
    def parse(cls, value: Any) -> "ModelSpec":
        if isinstance(value, ModelSpec):
            return value
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("must name a model (hub id, path, or {name: gpt2, init: random})")
            return cls(name=value.strip())
        if not isinstance(value, dict):
            raise ValueError(f"must be a string or a mapping, got {type(value).__name__}")
        allowed = ("name", "init", "revision", "seed", "tokenizer", *ARCH_OVERRIDES)
        problems = [f"unknown key {k}{did_you_mean(str(k), allowed) or ' (the keys: ' + ', '.join(allowed) + ')'}"
                    for k in value if k not in allowed]
        if problems:
            raise ValueError("; ".join(problems))
        name = value.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError("name is required (hub id, path, or preset)")
        init = value.get("init", "pretrained")
        if init not in ("pretrained", "random"):
            raise ValueError(f"init must be pretrained or random, got {init!r}")
        overrides = {}
        for key in ARCH_OVERRIDES:  # integers as the sections read them (2.0 and "1e3" too)
            if key in value:
                v = _integer(value[key])
                if v is None or v <= 0:
                    raise ValueError(f"{key} must be a positive integer, got {value[key]!r}")
                overrides[key] = v
        if overrides and init != "random":
            raise ValueError("architecture overrides (n_layer, ...) need init: random")
        seed = _integer(value.get("seed", 0))
        if seed is None or seed not in SEEDS:
            raise ValueError(f"seed must be {SEEDS_TEXT}, got {value.get('seed')!r}")
        revision = value.get("revision")
        if revision is not None and (isinstance(revision, (bool, list, dict)) or not str(revision).strip()):
            raise ValueError(f"revision must be a branch, tag or commit of the hub repository, got {revision!r}")
        if isinstance(revision, (int, float)):  # YAML read a commit like 0123 as the number 83
            raise ValueError(f"revision: YAML reads it as the number {revision!r}, which may not be the revision "
                             "written; quote it (revision: '0123')")
        tokenizer = value.get("tokenizer")
        if tokenizer is not None and (not isinstance(tokenizer, str) or not tokenizer.strip()):
            raise ValueError(f"tokenizer must be a tokenizer directory or tokenizer.json path, got {tokenizer!r}")
        return cls(name=name.strip(), init=init, revision=None if revision is None else str(revision),
                   seed=seed, overrides=overrides, tokenizer=tokenizer and tokenizer.strip())

    def to_yaml(self) -> Any:
        if self.init == "pretrained" and self.revision is None and self.tokenizer is None:
            return self.name
        out: dict[str, Any] = {"name": self.name, "init": self.init}
        if self.revision is not None:
            out["revision"] = self.revision
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer
        if self.init == "random":
            out["seed"] = self.seed
        return {**out, **self.overrides}


# Prompt templates: Python format strings whose {fields} are the format's roles (instruction, input, output,
# prompt, completion, text) or any column of the data file. The response/completion follows the rendered prompt
# and `<|endoftext|>` ends every example. The Alpaca pair is the format of Taori et al. 2023 (Stanford Alpaca)
# as written by Raschka, "Build a Large Language Model (From Scratch)", ch. 7 (`format_input`): the Input block
# is left out when a row's input is empty. A user's data.prompt_template replaces both for every row.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# prompt_completion default: the prompt, a newline, then the completion (E2E: "name[The Vaults], ...\nThe Vaults is ...").
PROMPT_COMPLETION_TEMPLATE = "{prompt}\n"

# Chat templates built in, for models without their own (GPT-2, base checkpoints): data.chat_template names one.
# chatml: OpenAI's ChatML as transformers' former default template wrote it (no default system message).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE}


# data.labels naming one label twice (the config's check, and encode.label_order's for a DataConfig built in code)
LABELS_TWICE = "names {!r} twice; list each label once, in the order of its class id"

# The data formats and their roles, in the order they are rendered (`input` is the only optional role): the one
# list that data.format, lora_cli.data and `--format` read.
DATA_FORMATS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "classification": ("text", "label"),
    "chat": ("messages",),  # a list of {role, content}; ShareGPT's `conversations` of {from, value} too
}
FORMAT_CHOICES = ("auto", *DATA_FORMATS)  # data.format and --format
ROLES = tuple(dict.fromkeys(r for roles in DATA_FORMATS.values() for r in roles))  # what data.columns maps
RESPONSE_ROLE = {"alpaca": "output", "prompt_completion": "completion"}  # the formats with a prompt to template
SHAREGPT_COLUMN = "conversations"  # ShareGPT's list of {from, value} turns: the chat format's messages


def found_by_detection(role: str, column: str) -> bool:
    """Whether format detection maps this role to this column by itself (the same name in any case, or ShareGPT's
    conversations for chat messages), so the mapping is no rename: another file may spell the role otherwise."""
    return column.lower() == role.lower() or (role == "messages" and column == SHAREGPT_COLUMN)
# Tokens `lora generate` and `lora chat` decode at most unless --max-new-tokens says otherwise (each also no more
# than what the model's context leaves after the prompt or conversation).
GENERATE_MAX_NEW_TOKENS = 128
CHAT_MAX_NEW_TOKENS = 256
TASKS = ("causal_lm", "classification")  # task: a language model, or a classifier with a score head
TRAIN_ON = ("all_assistant", "last_assistant")  # data.train_on: the assistant turns of a chat with a loss
TRACKERS = ("tensorboard", "mlflow", "wandb")  # train.report_to: each an optional extra of the same name


@dataclass
class DataConfig:
    """Where the examples come from and how they become tokens."""

    train: str | None = None  # a data file, a save_to_disk directory or hf://datasets/OWNER/NAME
    val: str | None = None  # a separate validation file; else val_split of train
    test: str | None = None  # held-out file for `lora eval CONFIG`
    val_split: float = 0.1  # seeded fraction of train held out for validation when val is null
    test_split: float = 0.0  # seeded fraction of train held out as a test split (written to out_dir)
    format: Literal[FORMAT_CHOICES] = "auto"  # auto: detected from the column names
    columns: dict[str, str] = field(default_factory=dict)  # role -> column, e.g. {prompt: mr, completion: ref}
    prompt_template: str | None = None  # alpaca/prompt_completion prompt, {role} or {column} fields; null: built-in
    max_length: int = 512  # tokens per example, truncated beyond (counted in the log)
    mask_prompt: bool = True  # loss on the response only
    skip_bad_rows: bool = False  # skip rows with missing/empty fields (counted) instead of failing
    header: bool = True  # CSV/TSV first row names the columns
    column_names: list[str] | None = None  # names for a header-less CSV/TSV
    group_by_length: bool = True  # batch examples of similar length, pad to the longest in the batch
    labels: list[str] | None = None  # classification: label order (default: sorted distinct labels)
    balance: Literal["none", "undersample", "class_weights"] = "none"  # classification
    chat_template: str | None = None  # chat: a built-in (chatml), a Jinja file, or null: the model's own
    train_on: Literal[TRAIN_ON] = "all_assistant"  # chat: the assistant turns with loss
    packing: bool = False  # causal LM: each micro-batch's examples back to back in rows of max_length tokens
    split: str = "train"  # the split data.train reads from a hub dataset or a save_to_disk DatasetDict
    subset: str | None = None  # a hub dataset's configuration (load_dataset's name), e.g. main


# lora.init: PEFT's init_lora_weights True ("default"), "gaussian", "pissa", "olora"; the last two move part of
# the base weight into A and B (lora.init_lora_weights).
LORA_INITS = ("default", "gaussian", "pissa", "olora")
MUTATING_INITS = ("pissa", "olora")


@dataclass
class LoraConfig:
    """LoRA (Hu et al. 2021, arXiv:2106.09685): W + (alpha/r) B A with A random, B zero."""

    r: int = 8
    alpha: float = 16.0  # scaling = alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.05  # on the LoRA input path only
    # patterns, `all-linear`, attn.q/k/v; None: the family's query and value projections (PEFT's default)
    targets: list[str] | None = None
    layers: list[int] | None = None  # restrict to these block indices
    use_rslora: bool = False  # rank-stabilised scaling (Kalajdzievski 2023, arXiv:2312.03732)
    use_dora: bool = False  # weight-decomposed LoRA (Liu et al. 2024, arXiv:2402.09353)
    bias: Literal["none", "lora_only", "all"] = "none"
    modules_to_save: list[str] = field(default_factory=list)  # whole modules trained and saved (e.g. a head)
    init: Literal[LORA_INITS] = "default"  # A/B start: default, gaussian, pissa, olora (lora.init_lora_weights)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # PEFT's: module-name regex -> rank instead of r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # PEFT's: module-name regex -> alpha
    loraplus_lr_ratio: float | None = None  # LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B's lr = ratio x lr


@dataclass
class TrainConfig:
    """The optimisation. AdamW (Loshchilov & Hutter 2019) with linear warmup then decay."""

    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops early when set
    batch_size: int = 8  # examples per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    global_batch_size: int | None = None  # if set: examples per step over all processes; grad_accum follows
    strategy: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate the model (ddp) or shard it (fsdp)
    lr: float = 3e-4
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of lr
    warmup_steps: int = 10
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    max_grad_norm: float | None = 1.0  # gradient-norm clipping; null disables
    label_smoothing: float = 0.0
    model_dropout: float = 0.0  # dropout inside the frozen base during training
    eval_every: int = 50  # optimizer steps between validations (0: only at the end)
    eval_max_batches: int | None = None  # cap validation at this many global batches (null: the whole split)
    save_every: int = 100  # optimizer steps between checkpoints (0: only at the end)
    log_every: int = 10  # optimizer steps between metrics.jsonl lines
    early_stopping_patience: int | None = None  # validations without improvement before stopping
    skip_nonfinite_steps: int = 0  # tolerate this many non-finite losses (step skipped) before stopping
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 elsewhere
    device: str = "auto"  # auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps
    gradient_checkpointing: bool = False
    share_prefix: bool = True  # compute a prompt prefix common to a whole batch once (exact without dropout)
    num_threads: int | None = None  # torch.set_num_threads
    report_to: list[Literal[TRACKERS]] = field(default_factory=list)  # experiment trackers (trackers.py)
    run_name: str | None = None  # the trackers' run name (default: out_dir's folder name)
    samples: int = 0  # first N validation prompts decoded greedily at every validation (samples.jsonl)
    sample_max_new_tokens: int = 64  # tokens each sample generates at most


@dataclass
class RunConfig:
    model: ModelSpec
    out_dir: str = "runs/default"
    task: Literal[TASKS] = "causal_lm"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str | None = None  # the config file this came from (not a key)

    @property
    def label(self) -> str:
        """What messages about this config start with: its file, or 'config' for one built in code."""
        return self.source or "config"

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"model": self.model.to_yaml(), "out_dir": self.out_dir, "task": self.task}
        for section in SECTIONS:
            out[section] = dataclasses.asdict(getattr(self, section))
        return out


DELIMITED_SUFFIXES = (".csv", ".tsv")  # data files whose columns data.header / data.column_names describe
TABLE_SUFFIXES = (*DELIMITED_SUFFIXES, ".json", ".jsonl", ".parquet")  # data files with columns
SUPPORTED_SUFFIXES = (*TABLE_SUFFIXES, ".txt")  # every data file lora-cli reads


def data_file_suffix(source: Any) -> str | None:
    """The suffix of a local data file among SUPPORTED_SUFFIXES (".csv"), or None: a hub dataset (hf://), a saved
    dataset folder, another file type, or no source."""
    if not isinstance(source, (str, os.PathLike)) or str(source).startswith("hf://"):
        return None
    suffix = Path(source).suffix.lower()
    return suffix if suffix in SUPPORTED_SUFFIXES else None


SECTIONS: dict[str, type] = {"data": DataConfig, "lora": LoraConfig, "train": TrainConfig}
TOP_KEYS = ("model", "out_dir", "task", *SECTIONS)


# --------------------------------------------------------------------------------------------- reading YAML


def _yaml_lines(text: str) -> dict[str, int]:
    """1-based line of every key path ("train.lr") in the YAML text."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = f"{prefix}{key_node.value}"
                lines.setdefault(path, key_node.start_mark.line + 1)
                walk(value_node, path + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return lines


# The most values a config's YAML may hold once its aliases are expanded: a run config has a few dozen, and
# aliases of aliases ("billion laughs") expand exponentially; every later step (validation, messages) walks them.
YAML_VALUES_MAX = 10_000


def _alias_problem(text: str) -> str | None:
    """':3: ...' where a YAML alias refers to a value that holds it (a loop), or ': ...' where aliases expand the
    config past YAML_VALUES_MAX values; else None. (_yaml_lines and _duplicate_key walk aliases: they need this
    first.)"""
    try:
        root = yaml.compose(text)
    except (yaml.YAMLError, RecursionError):
        return None
    sizes: dict[int, int] = {}  # values under each node, its aliases expanded (a node aliased twice is one object)
    ancestors: set[int] = set()

    def size(node) -> int:
        if id(node) in ancestors:
            raise _AliasLoop(node.start_mark.line + 1)
        if id(node) not in sizes:
            children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                        else node.value if isinstance(node, yaml.SequenceNode) else [])
            ancestors.add(id(node))
            sizes[id(node)] = 1 + sum(size(child) for child in children)
            ancestors.discard(id(node))
        return sizes[id(node)]

    try:
        total = 0 if root is None else size(root)
    except _AliasLoop as loop:
        return f":{loop.args[0]}: a YAML alias refers to a value that holds it (a loop); write the value out"
    except RecursionError:
        return ": the YAML is nested too deeply; write the values out"
    if total > YAML_VALUES_MAX:
        return (f": its YAML aliases expand it to {total:,} values (at most {YAML_VALUES_MAX:,}); write the values "
                "out")
    return None


class _AliasLoop(Exception):
    """A YAML node reached again below itself; args[0]: its line."""


def _duplicate_key(text: str) -> str | None:
    """':7: key data appears twice (first on line 2); keep one' for the first key a YAML mapping repeats, else None.
    YAML forbids it, but PyYAML keeps the last one silently: a config's earlier setting would vanish."""
    def walk(node, prefix: str) -> str | None:
        if isinstance(node, yaml.SequenceNode):
            return next((d for child in node.value if (d := walk(child, prefix))), None)
        if not isinstance(node, yaml.MappingNode):
            return None
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in seen and key != "<<":
                return f":{line}: key {prefix}{key} appears twice (first on line {seen[key]}); keep one"
            seen[key] = line
            if (found := walk(value_node, f"{prefix}{key}.")):
                return found
        return None

    try:
        return walk(yaml.compose(text), "")
    except yaml.YAMLError:
        return None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4); the value is read as YAML (so lists and null work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    text = raw.strip()
    # YAML reads `#` (first, or after a space) as a comment: `data.prompt_template=### {instruction}` became null,
    # the default. On the command line such a value is its text (quote it, or write a list, for YAML's reading).
    commented = "#" in text and text[0] not in "'\"[{"
    try:
        value = yaml.safe_load(raw) if text else None
    except yaml.YAMLError as exc:
        if not commented:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
        value = text
    if commented and (value is None or isinstance(value, str) and not _numeric_text(value)):
        value = text  # (but `train.lr=3e-4 # note` is 3e-4, as YAML reads `0.0003 # note`)
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set {item!r}: the key {key.strip()!r} has an empty part; write SECTION.KEY, e.g. "
                          "--set train.lr=1e-4")
    return keys, value


def load_config(path: str | Path, overrides: list[str] | None = None, whole_run: bool = True) -> RunConfig:
    """The run config at `path`, with --set overrides, validated (every problem in one ConfigError).
    whole_run=False: a config that describes LoRA settings only (`lora info --lora-config`): model and
    data.train may be left out."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config path {path} is a directory; pass a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or first_line(exc, limit=10_000)
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}; fix the syntax") from exc
    duplicate = _alias_problem(text) or _duplicate_key(text)
    if duplicate:
        raise ConfigError(f"{path}{duplicate}")
    if raw is None:
        needs = "model and data.train" if whole_run else "a lora section"
        raise ConfigError(f"{path}: the config is empty; it needs at least {needs}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys (model, data, lora, train, out_dir)")
    lines = _yaml_lines(text)
    set_keys: set[str] = set()
    for item in overrides or []:
        keys, value = parse_override(item)
        node = raw
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            elif not isinstance(node[k], dict):  # replacing it would drop what the config says there
                here = ".".join(keys[:i + 1])
                raise ConfigError(f"--set {item!r}: {here} is {node[k]!r} in {path}, not a mapping; set it whole "
                                  f"(--set {here}=...) or write it as a mapping in the config")
            node = node[k]
        node[keys[-1]] = value
        set_keys.add(".".join(keys))
    unreadable = lone_surrogate(raw)
    if unreadable:  # YAML's "\ud800" escape alone: no character, and no path or file can hold it
        key, escape = unreadable
        where = f":{lines[key]}" if key in lines else ""
        raise ConfigError(f"{path}{where}: {key or 'the config'} holds the escape {escape}, half of a UTF-16 surrogate "
                          "pair, which is no character; write the character itself")
    return build_config(raw, base_dir=path.parent, source=str(path), lines=lines, set_keys=set_keys,
                        whole_run=whole_run)


def build_config(
    raw: dict,
    base_dir: str | Path = ".",
    source: str | None = None,
    lines: dict[str, int] | None = None,
    set_keys: set[str] | None = None,
    whole_run: bool = True,
) -> RunConfig:
    """Validate a raw mapping into a RunConfig; every problem is collected and raised as one ConfigError.
    whole_run=False: model and data.train are not required (load_config)."""
    lines = lines or {}
    set_keys = set_keys or set()
    problems: list[str] = []

    def report(key: str, message: str) -> None:
        if key in set_keys:
            where = "--set "
        elif key in lines:
            where = f"line {lines[key]}: "
        else:
            where = ""
        problems.append(f"{where}{key}: {message}")

    for key in raw:
        if key not in TOP_KEYS:
            report(str(key), f"unknown key{_in_a_section(str(key), None) or did_you_mean(str(key), TOP_KEYS)}")
    model = None
    if "model" not in raw and not whole_run:
        model = ModelSpec(name="gpt2")  # a stand-in: the caller names the model
    elif "model" not in raw:
        report("model", "is required (a hub id such as gpt2, a local path, or {name: gpt2, init: random})")
    else:
        try:
            model = ModelSpec.parse(raw["model"])
        except ValueError as exc:
            report("model", str(exc))
    sections = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name)
        value = {} if value is None else value  # `lora:` with nothing under it
        if not isinstance(value, dict):
            report(name, f"must be a mapping of keys, got {type(value).__name__}")
            value = {}
        sections[name] = _build_section(cls, value, name, report)
    out_dir = raw.get("out_dir", RunConfig.out_dir)
    if isinstance(out_dir, (int, float)) and not isinstance(out_dir, bool):
        # YAML 1.1 reads 2024_01_15 as 20240115 and 010 as 8: the name as written is lost, so ask for quotes
        report("out_dir", f"YAML reads it as the number {out_dir!r}, which may not be the name written; quote it "
                          "(out_dir: '2024')")
        out_dir = RunConfig.out_dir
    elif not isinstance(out_dir, str) or not out_dir.strip():
        report("out_dir", f"must be a path, got {out_dir!r}")
        out_dir = RunConfig.out_dir
    task = raw.get("task", RunConfig.task)
    if task not in TASKS:
        report("task", f"must be {' or '.join(TASKS)}, got {task!r}")
        task = "causal_lm"
    # The constraints are checked even when the model spec is bad (with a stand-in), so every problem is reported
    checked = RunConfig(model=model or ModelSpec(name="gpt2"), out_dir=out_dir, task=task, source=source, **sections)
    _check_constraints(checked, report, whole_run)
    cfg = checked if model is not None else None
    if problems:
        raise ConfigError(all_problems(checked.label, problems))
    assert cfg is not None
    _resolve_paths(cfg, Path(base_dir))
    template = cfg.data.chat_template
    if template is not None and template not in BUILTIN_CHAT_TEMPLATES and not is_inline_template(template) \
            and not Path(template).expanduser().is_file():
        raise ConfigError(f"{cfg.label}: data.chat_template: {template} is not a file; name a .jinja file (relative "
                          "to the config), or chatml")
    if cfg.model.tokenizer is not None and not Path(cfg.model.tokenizer).exists():  # a path, never a hub id
        raise ConfigError(f"{cfg.label}: model.tokenizer: {cfg.model.tokenizer} does not exist; name a "
                          "tokenizer directory or tokenizer.json file (relative to the config)")
    return cfg


def _in_a_section(key: str, section: str | None) -> str:
    """' (did you mean train.lr?)' when `key` (or another tool's name for it) is a key of another section than
    `section` (None: the top level), or ''."""
    for name, cls in SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        found = next((k for k in (key, KNOWN_ALIASES.get(key)) if k in fields), None)
        if name != section and found is not None:
            return f" (did you mean {name}.{found}?)"
    top = next((k for k in (key, KNOWN_ALIASES.get(key)) if k in TOP_KEYS and k not in SECTIONS), None)
    return f" (did you mean {top}, a top-level key?)" if section is not None and top is not None else ""


def _build_section(cls, values: dict, section: str, report) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            hint = _in_a_section(str(key), section) or did_you_mean(str(key), names)
            report(f"{section}.{key}", f"unknown key{hint}")
            continue
        try:
            kwargs[key] = coerce(value, hints[key])
        except ValueError as exc:
            report(f"{section}.{key}", str(exc))
    return cls(**kwargs)


def coerce(value: Any, hint: Any) -> Any:
    """Coerce a YAML value to a schema type, or raise ValueError saying what was expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0]) if len(inner) == 1 else value
    if value is None:
        raise ValueError(f"must not be null (expected {_type_name(hint)})")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ValueError(f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:  # exact ("9007199254740993" through a float became ...992), and "1e3" too
                number = decimal.Decimal(value.strip())
            except decimal.InvalidOperation:
                number = decimal.Decimal("nan")
            if number.is_finite() and number.adjusted() < 64 and number == number.to_integral_value():
                return int(number)
        raise ValueError(f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            number = float(value)
        else:
            try:
                number = float(str(value))  # PyYAML reads 3e-4 (no dot) as a string
            except ValueError:
                raise ValueError(f"must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"must be a string, got a {type(value).__name__}")
        return str(value)
    if origin is list:
        if isinstance(value, str) and "," in value and not value.startswith("re:"):  # not a regex's {1,2}
            items = ", ".join(part.strip() for part in value.split(","))
            raise ValueError(f"must be a list, got the text {value!r}; write it as a list: [{items}]")
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single target is a one-item list
        if not isinstance(value, list):
            raise ValueError(f"must be a list, got {type(value).__name__}")
        return [_coerce_item(f"item {i}", v, args[0]) for i, v in enumerate(value, start=1)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping, got {type(value).__name__}")
        return {str(k): _coerce_item(str(k), v, args[1]) for k, v in value.items()}
    return value


def _coerce_item(name: str, value: Any, hint: Any) -> Any:
    """coerce for one item of a list or mapping, its error naming the item ("c_attn: must not be null ...")."""
    try:
        return coerce(value, hint)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _numeric_text(text: str) -> bool:
    """Whether YAML left a number as text (PyYAML reads 3e-4 as a string): the number keys coerce it."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _integer(value: Any) -> int | None:
    """`value` read as the config's integer keys read it (coerce), or None when it is not one."""
    try:
        return coerce(value, int)
    except ValueError:
        return None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def regex_problem(pattern: str, regex: str) -> str | None:
    """Why the regular expression `regex` (what `pattern`, as the config spells it, compiles to) does not compile,
    or None."""
    try:
        re.compile(regex)
    except re.error as exc:
        return f"{pattern!r} is not a valid regular expression ({exc})"
    return None


def _check_constraints(cfg: RunConfig, report, whole_run: bool = True) -> None:
    """Cross-field and range checks; each failure names its key."""
    d, lo, t = cfg.data, cfg.lora, cfg.train
    if (whole_run or d.train is not None) and (d.train is None or not str(d.train).strip()):
        report("data.train", "is required: a CSV, TSV, JSON, JSONL, Parquet or TXT file")
    if not 0 <= d.val_split < 1:
        report("data.val_split", f"must be in [0, 1), got {d.val_split}")
    if not 0 <= d.test_split < 1:
        report("data.test_split", f"must be in [0, 1), got {d.test_split}")
    for role in d.columns:  # here, with the config's line, not once the data is read
        if role not in ROLES:
            report(f"data.columns.{role}", f"unknown role{did_you_mean(role, ROLES)}; the roles are "
                                           f"{', '.join(ROLES)}")
    for file_key, split_key in (("val", "val_split"), ("test", "test_split")):
        if getattr(d, file_key) and getattr(d, split_key) not in (0, getattr(DataConfig, split_key)):
            report(f"data.{split_key}", f"does not apply: data.{file_key} names the {file_key} data; remove one of "
                                        "them")
    if d.val_split + d.test_split >= 1:
        report("data.val_split + data.test_split", f"must leave training data (sum < 1), got {d.val_split:g} + "
                                                   f"{d.test_split:g}")
    for key in ("val", "test", "chat_template"):  # an empty path would be read as the config's own folder
        if getattr(d, key) is not None and not getattr(d, key).strip():
            report(f"data.{key}", "is empty; name a file, or remove the key (null) for none")
    for key in ("train", "val", "test"):
        value = getattr(d, key)
        if isinstance(value, str) and value.startswith("hf://") and not value.startswith("hf://datasets/"):
            report(f"data.{key}", f"{value!r}: a hub dataset is named hf://datasets/OWNER/NAME")
    if not d.split.strip():
        report("data.split", "must name a split, e.g. train")
    train_file = data_file_suffix(d.train) is not None
    sources = [data_file_suffix(source) for source in (d.train, d.val, d.test) if source]
    # JSON, Parquet, TXT, a saved dataset folder, a hub dataset: none is read with a header or column names
    if sources and all(suffix not in DELIMITED_SUFFIXES for suffix in sources):
        for key, given in (("header", not d.header), ("column_names", d.column_names is not None)):
            if given:
                report(f"data.{key}", f"describes the columns of a CSV or TSV file, and the run reads none "
                                      f"(data.train is {d.train}); remove it (data.columns maps roles to columns)")
    for key, given in (("split", d.split != DataConfig.split), ("subset", d.subset is not None)):
        if given and train_file:  # a data file has no splits or configurations: it would be ignored
            report(f"data.{key}", f"applies to a hub dataset (hf://datasets/...) or a saved dataset folder, and "
                                  f"data.train is the file {d.train}; remove data.{key}")
    if d.max_length < 2:
        report("data.max_length", f"must be >= 2 tokens, got {d.max_length}")
    if not d.header and not d.column_names:
        report("data.column_names", "is required when header is false (names for the columns, e.g. [label, text])")
    if cfg.task == "classification" and d.format not in ("auto", "classification"):
        report("data.format", f"task classification needs format auto or classification, got {d.format}")
    twice = first_repeat(d.column_names or [])
    if twice is not None:
        report("data.column_names", f"names {twice!r} twice; give each column its own name")
    if cfg.task == "classification" and d.prompt_template is not None:
        report("data.prompt_template", "does not apply to task classification (the text is classified as it "
                                       "is); remove it")
    elif d.prompt_template is not None:  # its syntax now; its fields once the data's columns are known
        try:
            parse_template(d.prompt_template)
        except ValueError as exc:
            report("data.prompt_template", "{}; {}".format(*exc.args))
    if cfg.task != "classification":
        for key, given in (("data.labels", d.labels is not None), ("data.balance", d.balance != "none")):
            if given:
                report(key, "applies to task classification only; remove it, or set task: classification")
    elif d.labels is not None and (twice := first_repeat(map(str, d.labels))) is not None:
        report("data.labels", LABELS_TWICE.format(twice))
    if d.labels is not None and not d.labels:
        report("data.labels", "is empty; list the labels in the order of their class ids, or remove it")
    if d.val is None and d.val_split == 0:  # no validation data: what needs it would never run
        for key, given in (("train.samples", t.samples), ("train.early_stopping_patience", t.early_stopping_patience)):
            if given:
                report(key, "needs validation data, and there is none; set data.val or data.val_split > 0")
    if cfg.task == "classification" and d.packing:
        report("data.packing", "does not apply to task classification (each example is scored at its own last "
                               "token); set data.packing: false")
    if lo.r <= 0:
        report("lora.r", f"must be a positive integer, got {lo.r}")
    if lo.alpha <= 0:
        report("lora.alpha", f"must be > 0, got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        report("lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    if lo.targets is not None and not lo.targets:
        report("lora.targets", "must name at least one layer pattern (e.g. [attn.c_attn] or all-linear)")
    if lo.layers is not None and any(i < 0 for i in lo.layers):
        report("lora.layers", "block indices must be >= 0")
    if lo.layers is not None and not lo.layers:
        report("lora.layers", "is empty, so no block would be adapted; name blocks (e.g. [0, 1]) or remove the key "
                              "to adapt every block")
    for key in ("targets", "modules_to_save"):  # `re:` patterns are full-match regular expressions
        for pattern in (str(p).strip() for p in getattr(lo, key) or []):
            if pattern.startswith("re:") and (problem := regex_problem(pattern, pattern[3:])):
                report(f"lora.{key}", problem)
    for key, bad in (("rank_pattern", [k for k, v in lo.rank_pattern.items() if v <= 0]),
                     ("alpha_pattern", [k for k, v in lo.alpha_pattern.items() if v <= 0])):
        if bad:
            report(f"lora.{key}", f"{bad[0]}: must be > 0, got {getattr(lo, key)[bad[0]]}")
        for pattern in getattr(lo, key):
            if problem := regex_problem(pattern, pattern):
                report(f"lora.{key}", problem)
    if lo.init in MUTATING_INITS and lo.use_dora:
        report("lora.init", f"{lo.init} cannot be combined with use_dora (its conversion to a plain LoRA adapter "
                            "on the untouched base is linear, DoRA is not); set use_dora: false or init: default")
    if lo.loraplus_lr_ratio is not None and lo.loraplus_lr_ratio <= 0:
        report("lora.loraplus_lr_ratio", f"must be > 0 or null, got {lo.loraplus_lr_ratio}")
    for key in ("epochs", "batch_size", "grad_accum"):
        if getattr(t, key) < 1:
            report(f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    if t.max_steps is not None and t.max_steps < 1:
        report("train.max_steps", f"must be >= 1 or null, got {t.max_steps}")
    if t.global_batch_size is not None and t.global_batch_size < 1:
        report("train.global_batch_size", f"must be >= 1 or null, got {t.global_batch_size}")
    if t.lr <= 0:
        report("train.lr", f"must be > 0, got {t.lr:g}")
    if not 0 <= t.min_lr_ratio <= 1:
        report("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    for key in ("warmup_steps", "eval_every", "save_every", "skip_nonfinite_steps"):
        if getattr(t, key) < 0:
            report(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if t.log_every < 1:
        report("train.log_every", f"must be >= 1, got {t.log_every}")
    if t.weight_decay < 0:
        report("train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        got = t.betas[0] if len(t.betas) == 1 else t.betas  # a lone number was made a one-item list
        report("train.betas", f"must be two numbers in [0, 1) such as [0.9, 0.999], got {got}")
    if t.eps <= 0:
        report("train.eps", f"must be > 0, got {t.eps}")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        report("train.max_grad_norm", f"must be > 0 or null, got {t.max_grad_norm}")
    if not 0 <= t.label_smoothing < 1:
        report("train.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    if not 0 <= t.model_dropout < 1:
        report("train.model_dropout", f"must be in [0, 1), got {t.model_dropout}")
    if t.early_stopping_patience is not None and t.early_stopping_patience < 1:
        report("train.early_stopping_patience", f"must be >= 1 or null, got {t.early_stopping_patience}")
    if t.eval_max_batches is not None and t.eval_max_batches < 1:
        report("train.eval_max_batches", f"must be >= 1 or null, got {t.eval_max_batches}")
    if t.num_threads is not None and not 1 <= t.num_threads <= MAX_THREADS:
        report("train.num_threads", f"must be from 1 to {MAX_THREADS} or null, got {t.num_threads}")
    if t.samples < 0:
        report("train.samples", f"must be >= 0, got {t.samples}")
    elif t.samples and cfg.task == "classification":
        report("train.samples", "a classifier generates no text; set train.samples: 0")
    if t.sample_max_new_tokens < 1:
        report("train.sample_max_new_tokens", f"must be >= 1, got {t.sample_max_new_tokens}")
    if not DEVICE.fullmatch(t.device):
        report("train.device", f"must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}")
    if t.seed not in SEEDS:
        report("train.seed", f"must be {SEEDS_TEXT}, got {t.seed}")
    if t.momentum < 0:
        report("train.momentum", f"must be >= 0, got {t.momentum}")
    if t.lr_schedule == "constant" and t.min_lr_ratio != TrainConfig.min_lr_ratio:  # nothing decays to it
        report("train.min_lr_ratio", "is the floor of a decaying schedule, and train.lr_schedule is constant; set "
                                     "lr_schedule: cosine or linear, or remove train.min_lr_ratio")
    defaults = type(t)()
    for key, optimizer in (("momentum", "sgd"), ("betas", "adamw"), ("eps", "adamw")):
        if t.optimizer != optimizer and getattr(t, key) != getattr(defaults, key):  # set, and it would be ignored
            report(f"train.{key}", f"applies to train.optimizer: {optimizer} only (this run uses {t.optimizer}); set "
                                   f"train.optimizer: {optimizer} or remove train.{key}")


def path_fields(cfg: RunConfig) -> list[tuple[Any, str]]:
    """The config's fields that hold paths, as (section object, attribute): the data files, a chat template file,
    out_dir, model.tokenizer and a pretrained model's name (a path, or a hub id: see _resolve_paths). The one
    list that reading a config (_resolve_paths) and writing a run's copy (dump_config) go through."""
    d = cfg.data
    fields = [(d, "train"), (d, "val"), (d, "test"), (cfg, "out_dir"), (cfg.model, "tokenizer")]
    if d.chat_template is not None and not is_inline_template(d.chat_template) \
            and d.chat_template not in BUILTIN_CHAT_TEMPLATES:
        fields.append((d, "chat_template"))  # a template file, not a built-in name or the template's text
    if cfg.model.init == "pretrained":
        fields.append((cfg.model, "name"))
    return fields


def run_inputs(cfg: RunConfig) -> list[tuple[str, Path]]:
    """The local files and folders a run reads, as (what, path): the config file (unless a run wrote it: a run
    started again, perhaps with --set, from the config.yaml an earlier run saved) and the paths of path_fields
    that exist, but for out_dir. rundir.prepare_out_dir keeps --overwrite off them."""
    found = []
    if cfg.source is not None and Path(cfg.source).is_file() and not written_by_a_run(Path(cfg.source)):
        found.append(("its config", Path(cfg.source)))
    for owner, attr in path_fields(cfg):
        value = getattr(owner, attr)
        if attr == "out_dir" or value is None or value.startswith("hf://") or not Path(value).expanduser().exists():
            continue
        section = "model" if owner is cfg.model else "data"
        found.append((f"{section}.{attr}", Path(value).expanduser()))
    return found


def written_by_a_run(path: Path) -> bool:
    """Whether the config file at `path` is a run's saved config.yaml: exactly what dump_config writes for it."""
    try:
        return path.read_text(encoding="utf-8") == dump_config(load_config(path), path.parent)
    except (LoraError, OSError, UnicodeDecodeError):
        return False


def _resolve_paths(cfg: RunConfig, base: Path) -> None:
    """Relative paths of the config become paths from the config's folder. That folder is resolved first and the
    result normalised: a run's saved config.yaml holds paths relative to its resolved out_dir (dump_config), so
    `lora train out/config.yaml --resume` names the model as the first run did (`/x/ckpt`, not `/x/runs/A/../../ckpt`)
    and the resumed adapter's metadata is the same bytes."""
    base = base.expanduser().resolve()
    for owner, attr in path_fields(cfg):
        value = getattr(owner, attr)
        if value is None or value.startswith("hf://"):  # a hub dataset's name, not a path
            continue
        path = Path(value).expanduser()
        if path.is_absolute():
            setattr(owner, attr, str(path))
        elif owner is not cfg.model or attr != "name" or (base / path).exists():
            # a model name is a path only when it exists relative to the config; otherwise it is a hub id
            setattr(owner, attr, os.path.normpath(base / path))


def parse_template(template: str) -> list[tuple[str, str | None]]:
    """A prompt template as (literal text, field name or None) pieces: str.format's syntax restricted to plain
    {name} fields ({{ and }} are literal braces). A template can come from an adapter file, which is data:
    attribute or index access ({x.__class__}, {x[0]}), conversions and format specs ({x:>99999999999} would
    allocate gigabytes) are refused: ValueError(what is wrong, what to write instead)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(str(exc), "write a literal brace as {{ or }}") from None
    pieces = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (not name or name.isdigit() or "." in name or "[" in name or spec or conversion):
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"field {{{shown}}} is not a plain {{name}} field",
                             "use fields such as {instruction} or {prompt}")
        pieces.append((literal, name))
    return pieces


def is_inline_template(value: str) -> bool:
    """True for a chat template's own Jinja text (adapters store it so), False for a built-in name or a path."""
    return "{{" in value or "{%" in value


def dump_config(cfg: RunConfig, folder: str | Path | None = None) -> str:
    """The config as YAML. With `folder` (where the YAML is written: a run's out_dir), its paths are made relative
    to that folder, so the saved file loads again from wherever it sits (`lora eval out_dir/config.yaml`)."""
    if folder is not None:
        out_dir = cfg.out_dir
        cfg = copy.deepcopy(cfg)
        for owner, attr in path_fields(cfg):
            p = getattr(owner, attr)
            if p is None or p.startswith("hf://") or not (p == out_dir or Path(p).expanduser().exists()):
                continue  # a hub id, or a path the run never read
            setattr(owner, attr, os.path.relpath(Path(p).expanduser().resolve(), Path(folder).resolve()))
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
