"""GPT-NeoX (Black et al. 2022), the architecture of Pythia (Biderman et al. 2023), with transformers' parameter
names (GPTNeoXForCausalLM: `gpt_neox.embed_in`, `gpt_neox.layers.0.attention.query_key_value`,
`gpt_neox.final_layer_norm`, `embed_out`).

LayerNorm, exact GELU, rotary embeddings on the first rotary_pct of each head's features, a fused query/key/value
projection whose output is laid out per head ([H, 3, D]: each head's q, k and v side by side), and the parallel
residual x + attn(ln1(x)) + mlp(ln2(x)) when use_parallel_residual.

Shapes: C hidden_size, H num_attention_heads, D = C / H, I intermediate_size.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lora_cli.models.common import (
    CausalLM, Dropout, HFNames, KVCache, Linear, Rotary, Unpadded, attend, check_config_fields, check_config_value,
    residual, rotary_qkv, tie_or_build_head,
)
from lora_cli.models.llama import REQUIRED, rope_from_hf


@dataclass
class GPTNeoXConfig(HFNames):
    """transformers' GPTNeoXConfig fields that shape the model."""

    vocab_size: int = 50432
    hidden_size: int = 6144
    intermediate_size: int = 24576
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    tie_word_embeddings: bool = False
    hidden_act: str = "gelu"
    initializer_range: float = 0.02

    model_type = "gpt_neox"  # not a field: the one type this config describes

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: gelu")
        rotary = int(self.head_dim * self.rotary_pct)  # the features of each head that rotate
        if not 0 < self.rotary_pct <= 1 or rotary < 2 or rotary % 2:
            raise ValueError(f"rotary_pct (partial_rotary_factor) {self.rotary_pct} rotates {rotary} of each head's "
                             f"{self.head_dim} features; it must be above 0 and at most 1, rotating an even number")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported for gpt_neox; supported: default")
        self.rope_scaling = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "GPTNeoXConfig":
        missing = [k for k in REQUIRED if k not in d]
        if missing:  # a config.json of another architecture: refuse rather than fill in a default size
            raise ValueError(f"model_type {d.get('model_type')!r} needs {', '.join(missing)} in its config")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        # The rotary base as GPTNeoXConfig (transformers 5) reads it: rope_parameters' rope_theta, else
        # rotary_emb_base, else 10000; a top-level rope_theta it never reads.
        base = d.get("rotary_emb_base", cls.rope_theta)
        check_config_value("rotary_emb_base", base, "number", 10000)
        rope = rope_from_hf({**d, "rope_theta": base}, base)
        values["rope_theta"], values["rope_scaling"] = rope["rope_theta"], rope["rope_scaling"]
        if "partial_rotary_factor" in rope:  # transformers 5 moved rotary_pct into rope_parameters
            values["rotary_pct"] = rope["partial_rotary_factor"]
        return cls(**check_config_fields(cls, values))


class Attention(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_idx: int):
        super().__init__()
        H, D, C = config.num_attention_heads, config.head_dim, config.hidden_size
        self.heads = (H, H, D)
        self.layer_idx = layer_idx
        self.attn_pdrop = config.attention_dropout
        self.query_key_value = Linear(C, 3 * C, bias=config.attention_bias)  # [H, 3, D] per position
        self.dense = Linear(C, C, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, grid: Unpadded | None,
                outputs: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        H, _, D = self.heads
        lead = x.shape[:-1]
        q, k, v = self.query_key_value(x).view(*lead, H, 3 * D).split(D, dim=-1)  # 3 x [.., H, D]
        qkv = rotary_qkv(q, k, v, rope)  # [.., 3 H D] as q | k | v
        dropout = self.attn_pdrop if self.training else 0.0
        return self.dense(attend(qkv, self.heads, mask, cache, self.layer_idx, dropout, grid, outputs))


class MLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_idx: int):
        super().__init__()
        self.parallel = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_dropout = Dropout(config.hidden_dropout)
        self.post_mlp_dropout = Dropout(config.hidden_dropout)
        self.attention = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None,
                grid: Unpadded | None = None, outputs: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        a = self.post_attention_dropout(self.attention(self.input_layernorm(x), mask, cache, grid, outputs, rope))
        x = x if outputs is None else x.index_select(0, outputs)
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x)), summed in that order
            return residual(residual(x, a), self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(x))))
        x = residual(x, a)
        return residual(x, self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(x))))


class GPTNeoX(CausalLM):
    """GPTNeoXForCausalLM, configured by a GPTNeoXConfig."""

    lora_targets = ("query_key_value",)  # lora.targets' default: the fused projection, as PEFT's for gpt_neox

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = nn.ModuleDict(
            dict(
                embed_in=nn.Embedding(config.vocab_size, config.hidden_size),
                emb_dropout=Dropout(config.hidden_dropout),
                layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
                final_layer_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
            )
        )
        self.rotary = Rotary(int(config.head_dim * config.rotary_pct), config.rope_theta)
        tie_or_build_head(self, config.hidden_size, config.vocab_size, config.tie_word_embeddings, "embed_out")

    @property
    def lm_head(self) -> nn.Linear:  # the interface's name for the output projection
        return self.embed_out

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.gpt_neox.embed_in

    @property
    def blocks(self) -> nn.ModuleList:
        return self.gpt_neox.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.gpt_neox.final_layer_norm

    def embed(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.gpt_neox.emb_dropout(self.gpt_neox.embed_in(input_ids))

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(pos)
