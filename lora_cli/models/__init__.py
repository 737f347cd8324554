"""Model families, chosen by the `model_type` of a checkpoint's config.json (mlx-lm's layout: one short file per
family; what they share is in common.py).

    gpt2                          gpt2.py      GPT2LMHeadModel
    llama, mistral, qwen2, qwen3  llama.py     LlamaForCausalLM and relatives
    gpt_neox                      gpt_neox.py  GPTNeoXForCausalLM (Pythia)
"""

from __future__ import annotations

from lora_cli.models.common import (
    HEAD, PACKED_DTYPES, CausalLM, KVCache, Unpadded, add_classification_head, cast_frozen_linears_,
    last_token_hidden, pack_copies_, pack_linears_, shared_prefix_length,
)
from lora_cli.models.gpt2 import GPT2, GPT2_PRESETS, GPT2Config
from lora_cli.models.gpt_neox import GPTNeoX, GPTNeoXConfig
from lora_cli.models.llama import Llama, LlamaConfig

# model_type -> (config class, model class)
FAMILIES: dict[str, tuple[type, type[CausalLM]]] = {
    "gpt2": (GPT2Config, GPT2),
    **{t: (LlamaConfig, Llama) for t in ("llama", "mistral", "qwen2", "qwen3")},
    "gpt_neox": (GPTNeoXConfig, GPTNeoX),
}


def config_from_dict(d: dict):
    """A config.json's dict -> the family's config; ValueError naming what is supported."""
    model_type = d.get("model_type", "gpt2")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type][0].from_dict(d)


def model_type(config) -> str:
    return getattr(config, "model_type", "gpt2")


def build_model(config) -> CausalLM:
    """An uninitialised model of the config's family (under `torch.device("meta")` it allocates nothing)."""
    return FAMILIES[model_type(config)][1](config)


__all__ = [
    "FAMILIES", "HEAD", "CausalLM", "GPT2", "GPT2Config", "GPT2_PRESETS", "GPTNeoX", "GPTNeoXConfig", "KVCache",
    "Llama", "LlamaConfig", "Unpadded", "add_classification_head", "build_model", "cast_frozen_linears_",
    "PACKED_DTYPES", "config_from_dict", "last_token_hidden", "model_type", "pack_copies_", "pack_linears_",
    "shared_prefix_length",
]
