"""Using a trained adapter: find and load its base model, attach it, rebuild its data settings (prompts.py turns
user text into its prompts).

`lora eval`, `lora merge` and `lora generate` take `--adapter FILE` alone: everything else comes from the
adapter's safetensors metadata, which `lora train` writes (train._save_adapter):

    base_model   {source, name, revision, fingerprint}   which base to load, and a check that it is that base
    model_spec   the config's `model:` value              how to rebuild a random-init base (preset, seed, sizes)
    task         causal_lm | classification
    data         {format, columns, prompt_template, mask_prompt, max_length, labels, chat_template, train_on}

A flag given on the command line (--model, --format, --column, --prompt-template, --max-length) wins over the
metadata. A PEFT adapter directory names only `base_model_name_or_path`; a base without a fingerprint is not
checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from lora_cli.adapter import Adapter, attach_adapter, load_adapter
from lora_cli.config import FORMAT_CHOICES, DataConfig, ModelSpec, found_by_detection
from lora_cli.errors import AdapterError, CheckpointError, ConfigError
from lora_cli.lora import LoRALinear
from lora_cli.models import PACKED_DTYPES, model_type, pack_copies_, pack_linears_
from lora_cli.pretrained import BaseModel, load_model
from lora_cli.runtime import device_option, inference_dtype
from lora_cli.tokenizer import GPT2, Tokenizer, check_fits, model_tokenizer


# -------------------------------------------------------------------------------------------- base + adapter


def load_with_tokenizer(spec: ModelSpec | str, weights: bool = True, dtype=None) -> tuple[BaseModel, Tokenizer]:
    """pretrained.load_model and the model's tokenizer (tokenizer.model_tokenizer). A random preset gets its
    tokenizer's vocabulary size; a tokenizer larger than the embedding is an error. dtype: load_model's (the
    compute dtype of a bf16/fp16 training run)."""
    try:
        spec = ModelSpec.parse(spec)
    except ValueError as exc:
        raise CheckpointError(f"model: {exc}") from exc
    tokenizer = None
    if spec.init == "random":  # the preset's vocabulary is its tokenizer's: GPT-2's 50,257 or model.tokenizer's
        tokenizer = model_tokenizer(spec, "")
        spec = replace(spec, overrides={**spec.overrides, "vocab_size": tokenizer.vocab_size})
    base = load_model(spec, weights, dtype)
    if tokenizer is None:
        tokenizer = model_tokenizer(spec, model_type(base.model.config))
    check_fits(tokenizer, base.model.config.vocab_size, base.name)
    return base, tokenizer


def base_spec(adapter) -> ModelSpec:
    """The base model an adapter was trained on, as a ModelSpec.

    A local base is loaded from the absolute path recorded at training time, a hub base at the resolved
    revision (a commit hash: it loads offline from the cache), a random-init base from the config's model spec
    (preset, seed and size overrides rebuild the same weights). The run's `model.tokenizer`, if it named one, comes
    with each."""
    base = adapter.base_model
    source, name = base.get("source"), base.get("name")
    spec = adapter.metadata.get("model_spec")
    parsed = None
    if spec is not None:
        try:
            parsed = ModelSpec.parse(spec)
        except ValueError as exc:
            raise AdapterError(f"adapter {adapter.path}: its model_spec metadata is damaged ({exc}); pass --model") from exc
    tokenizer = parsed.tokenizer if parsed is not None else None
    if source == "local" and name:
        return ModelSpec(name=str(name), tokenizer=tokenizer)
    if source == "hub" and name:
        return ModelSpec(name=str(name), revision=base.get("revision") or None, tokenizer=tokenizer)
    if parsed is not None:
        return parsed
    if name:  # a PEFT adapter: base_model_name_or_path
        return ModelSpec(name=str(name), revision=base.get("revision") or None)
    raise AdapterError(f"adapter {adapter.path} does not name its base model; pass --model (a hub id or a local "
                       "model directory)")


def load_base(adapter=None, model: str | None = None) -> tuple[BaseModel, Tokenizer]:
    """pretrained.BaseModel and its tokenizer for `--model` if given, else the adapter's own base."""
    if model is not None:
        return load_with_tokenizer(model)
    if adapter is None:
        raise ConfigError("name a model: pass --adapter FILE (its base model is recorded in it) or --model MODEL")
    spec = base_spec(adapter)
    try:
        return load_with_tokenizer(spec)
    except CheckpointError as exc:
        raise CheckpointError(f"the base model of adapter {adapter.path}: {exc}; or pass --model") from exc


def open_adapter(path: str | Path | None):
    """adapter.load_adapter (an Adapter passes through), or None without a path."""
    if path is None or isinstance(path, Adapter):
        return path
    return load_adapter(path)


@dataclass
class Loaded:
    """A model ready for inference and where it came from."""

    base: Any  # pretrained.BaseModel; base.model is `model` (with the adapter attached, when there is one)
    adapter: Any  # adapter.Adapter | None
    settings: "DataSettings"
    tokenizer: Tokenizer = GPT2  # the base model's (tokenizer.model_tokenizer)

    @property
    def model(self):
        return self.base.model


def load_for_inference(adapter: str | Path | None = None, model: str | None = None, allow_mismatch: bool = False,
                       attach: bool = True) -> Loaded:
    """Load the base (the adapter's, or --model) and attach the adapter. attach=False leaves the base bare (to
    measure it first); call `attach_to(loaded)` afterwards."""
    adapter_obj = open_adapter(adapter)
    base, tokenizer = load_base(adapter_obj, model)
    loaded = Loaded(base, adapter_obj, DataSettings.from_adapter(adapter_obj), tokenizer)
    if attach:
        attach_to(loaded, allow_mismatch)
    return loaded


def load_placed(adapter, model: str | None, allow_mismatch: bool, device: str, precision: str) -> Loaded:
    """load_for_inference, then the model placed on --device with its weights in --precision. The precision is
    checked (runtime.inference_dtype) before anything loads."""
    dev = device_option(device)
    dtype = inference_dtype(precision, dev)
    loaded = load_for_inference(adapter, model, allow_mismatch)
    place(loaded.model, dev, dtype)
    return loaded


def place(model, device, dtype=None):
    """The model on `device` in eval mode with every floating-point weight (base, LoRA, heads) stored in `dtype`
    (runtime.inference_dtype; None keeps it). The cast replaces the parameters: no fp32 copy of the base stays
    behind, and LoRA layers compute in the same dtype as their base. Returns the model."""
    return model.to(device=device, dtype=dtype).eval()


def _first_weight(model) -> torch.Tensor:
    return next(p for p in model.blocks.parameters() if p.is_floating_point())


def weights_dtype(model) -> torch.dtype:
    """The dtype the model computes in (place stores every weight in it): its blocks' first weight's."""
    return _first_weight(model).dtype


# One fp32 row decodes faster on packed weights too, but the packing (about 0.3 s for GPT-2 124M) must be repaid
# first: on the AVX-512 machine 16.4 -> 9.6 ms a token (GPT-2 124M, its head packed too: repaid after about 40
# tokens); on the earlier AVX2 ones the blocks gained 0-15% (about 100 tokens). So one fp32 row packs when its budget
# is at least this many tokens (`lora generate`'s default of 128 and `lora chat`'s 256 are).
FP32_ONE_ROW_PACKING_TOKENS = 64


def packing_pays(model, prompts: int, num_beams: int, new_tokens: int) -> bool:
    """Whether pack_for_decoding pays for itself before generating up to `new_tokens` per row. fp32: when several
    rows decode per step (batches of prompts, beams), or one row for at least FP32_ONE_ROW_PACKING_TOKENS. bf16 on
    a CPU whose oneDNN packs it (models.common.PACKED_DTYPES): always, where the packed kernel runs the layers in
    less than half the time of PyTorch's. Off the CPU: never (oneDNN's packed layout is a CPU one)."""
    weight = _first_weight(model)
    if weight.device.type != "cpu":
        return False
    if weight.dtype != torch.float32:
        return weight.dtype in PACKED_DTYPES
    return prompts > 1 or num_beams > 1 or new_tokens >= FP32_ONE_ROW_PACKING_TOKENS


def pack_for_decoding(*models) -> int:
    """Before decoding (see packing_pays): the linear layers of every block and the output head take oneDNN's
    packed weights (models.common.pack_linears_; on the CPU, fp32: 20-30% more tokens/s at 4 and 8 rows, about 70%
    at one row on the AVX-512 machine; bf16: twice the tokens/s at one row). Models that share base weights
    (`lora serve`'s adapters) share the packed weights. DoRA's base layers stay plain: their forward reads the weight
    (where such a layer shares its weight with another model's packed layer, both the plain and the packed tensor
    stay alive). A tied head (the input embedding) keeps its plain weight beside a packed copy
    (models.common.pack_copies_: the head's size again, 154 MB for GPT-2 124M in fp32, one copy for all the models
    sharing it): one fp32 row of GPT-2 124M decoded 97-105 instead of 70-93 tokens/s with it. A head with LoRA on it
    has its base layer packed. Call it last: the models are then for inference only. Returns the weights packed or
    copied."""
    layers, tied_heads = [], []
    for model in models:
        dora = {id(m.base_layer) for m in model.modules() if isinstance(m, LoRALinear) and m.use_dora}
        parts = list(model.blocks)
        if model.tied:
            tied_heads.append(model.lm_head)
        else:
            parts.append(model.lm_head)
        layers += [m for part in parts for m in part.modules() if id(m) not in dora]
    return pack_linears_(layers) + pack_copies_(tied_heads)


def attach_to(loaded: Loaded, allow_mismatch: bool = False) -> None:
    if loaded.adapter is not None:
        attach_adapter(loaded.base, loaded.adapter, allow_mismatch=allow_mismatch)
    loaded.model.eval()


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
    chat_template: str | None = None  # chat: the template's text (a built-in name or file after --chat-template)
    train_on: str = "all_assistant"

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
        return cls(  # the header was checked when the adapter was read (adapter.damaged_settings)
            format=data.get("format") or "auto",
            columns=dict(data.get("columns") or {}),
            prompt_template=data.get("prompt_template"),
            mask_prompt=bool(data.get("mask_prompt", True)),
            max_length=data.get("max_length"),
            labels=data.get("labels"),
            task=meta.get("task") or "causal_lm",
            chat_template=data.get("chat_template"),
            train_on=data.get("train_on") or "all_assistant",
        )

    def override(self, fmt: str | None = None, columns: Sequence[str] = (), prompt_template: str | None = None,
                 max_length: int | None = None, chat_template: str | None = None) -> "DataSettings":
        """Apply --format, --column ROLE=COLUMN (repeatable), --prompt-template, --max-length, --chat-template."""
        if fmt is not None:
            if fmt not in FORMAT_CHOICES:
                raise ConfigError(f"--format must be one of {', '.join(FORMAT_CHOICES)}, got {fmt!r}")
            self.format = fmt
        for item in columns:
            role, sep, column = item.partition("=")
            if not sep or not role.strip() or not column.strip():
                raise ConfigError(f"--column {item!r}: expected ROLE=COLUMN, e.g. --column prompt=mr")
            self.columns[role.strip()] = column.strip()
        if prompt_template is not None:
            self.prompt_template = prompt_template
        if chat_template is not None:
            self.chat_template = chat_template
        if max_length is not None:
            if max_length < 2:
                raise ConfigError(f"--max-length must be at least 2, got {max_length}")
            self.max_length = max_length
        return self

    def data_config(self, n_positions: int) -> DataConfig:
        """A DataConfig that encodes rows the way training did. Only renamed roles are kept as column
        mappings, so a held-out file may spell a column in another case, lack the optional `input`, or hold chat
        as `messages` where training read ShareGPT's `conversations` (and the other way round)."""
        renames = {role: col for role, col in self.columns.items() if not found_by_detection(role, col)}
        fmt = self.format if self.format != "classification" or self.task == "classification" else "auto"
        max_length = min(self.max_length or DataConfig.max_length, n_positions)
        return DataConfig(format=fmt, columns=renames, prompt_template=self.prompt_template, max_length=max_length,
                          mask_prompt=self.mask_prompt, labels=self.labels, chat_template=self.chat_template,
                          train_on=self.train_on)
