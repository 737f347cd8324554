"""The Llama family in one configurable file: Llama 2/3 (Touvron et al. 2023; Grattafiori et al. 2024), Mistral
(Jiang et al. 2023), Qwen2/2.5 (Yang et al. 2024) and Qwen3 (Yang et al. 2025), with transformers' parameter
names (LlamaForCausalLM: `model.embed_tokens`, `model.layers.0.self_attn.q_proj`, `model.norm`, `lm_head`).

What differs between them is configuration: RMSNorm, rotary embeddings (rope_theta; Llama 3's `llama3`
rope_scaling), grouped-query attention (num_key_value_heads), a SwiGLU MLP (Shazeer 2020), q/k/v biases
(Qwen2 always; Llama with attention_bias, which also biases o_proj), a per-head RMSNorm of queries and keys before
the rotation (Qwen3), head_dim from the config, tied or untied embeddings.

Shapes: C hidden_size, H num_attention_heads, Hkv num_key_value_heads, D head_dim, I intermediate_size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from lora_cli.models.common import (
    CausalLM, HFNames, KVCache, Linear, RMSNorm, Rotary, Unpadded, attend, check_config_fields,
    check_config_value, residual, rotary_qkv, swiglu, tie_or_build_head,
)

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "llama3")

# The sizes a config.json must state (no default size is guessed for a real checkpoint).
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# What a config.json leaves out takes the default of its family's config class in transformers (5.24: LlamaConfig,
# MistralConfig, Qwen2Config, Qwen3Config), so the model is the one transformers builds; a field a family does not
# list here takes the dataclass default below (LlamaConfig's, the same in all four). REQUIRED sizes get none.
DEFAULTS: dict[str, dict] = {
    "llama": {},
    "mistral": {"num_key_value_heads": 8, "max_position_embeddings": 131072, "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768, "sliding_window": 4096,
              "use_sliding_window": False},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "max_position_embeddings": 32768, "sliding_window": 4096,
              "use_sliding_window": False},
}
# Keys the family's transformers model never reads (Mistral, Qwen2, Qwen3: no MLP biases; Mistral no attention
# biases, Qwen2 its fixed q/k/v ones; Llama no sliding window): held at these values, whatever config.json says.
UNREAD: dict[str, dict] = {
    "llama": {"sliding_window": None},
    "mistral": {"attention_bias": False, "mlp_bias": False},
    "qwen2": {"attention_bias": False, "mlp_bias": False},
    "qwen3": {"mlp_bias": False},
}
LLAMA3_FACTORS = ("factor", "low_freq_factor", "high_freq_factor")


@dataclass
class LlamaConfig(HFNames):
    """transformers' LlamaConfig / MistralConfig / Qwen2Config / Qwen3Config fields that shape the model."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: H (multi-head attention)
    head_dim: int | None = None  # None: hidden_size / H
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None or {"rope_type": "llama3", "factor", ...}
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float | None = 0.0  # None (LlamaConfig allows it): 0.0
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    sliding_window: int | None = None
    use_sliding_window: bool | None = None  # Qwen2/Qwen3 only; Mistral's window is on whenever it is set
    # Qwen2/Qwen3: layers below this index attend fully (transformers' default); a count, so 0 is good
    max_window_layers: int = field(default=28, metadata={"kind": "count"})
    layer_types: list[str] | None = None  # per layer "full_attention" / "sliding_attention", when config.json says

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {', '.join(MODEL_TYPES)}")
        for name, value in UNREAD[self.model_type].items():
            setattr(self, name, value)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_dropout is None:
            self.attention_dropout = 0.0
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                                 f"({self.num_attention_heads})")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; supported: silu (SwiGLU)")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if rope_type == "default":
            self.rope_scaling = None
        elif rope_type == "llama3":
            missing = [k for k in LLAMA3_FACTORS if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling type 'llama3' needs {', '.join(LLAMA3_FACTORS)}; missing: "
                                 f"{', '.join(missing)}")
            for key in LLAMA3_FACTORS:
                check_config_value(f"rope_scaling.{key}", self.rope_scaling[key], "positive", 8.0)
            # transformers' _compute_llama3_parameters: the pretraining context defaults to max_position_embeddings
            self.rope_scaling = {"original_max_position_embeddings": self.max_position_embeddings, **self.rope_scaling}
            check_config_value("rope_scaling.original_max_position_embeddings",
                               self.rope_scaling["original_max_position_embeddings"], "size", 8192)
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings \
                and any(t == "sliding_attention" for t in self.window_layer_types()):
            raise ValueError(
                f"sliding-window attention (sliding_window {self.sliding_window} < max_position_embeddings "
                f"{self.max_position_embeddings}) is not supported; supported: full causal attention"
            )

    def window_layer_types(self) -> list[str]:
        """Each layer's attention as transformers builds it: Mistral slides in every layer once sliding_window is
        set; Qwen2/Qwen3 only with use_sliding_window, from layer max_window_layers on (or as layer_types says)."""
        n = self.num_hidden_layers
        if self.model_type not in ("qwen2", "qwen3"):
            return ["sliding_attention"] * n
        if not self.use_sliding_window:
            return ["full_attention"] * n
        return self.layer_types or ["sliding_attention" if i >= self.max_window_layers else "full_attention"
                                    for i in range(n)]

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        missing = [k for k in REQUIRED if k not in d]
        if missing:  # a config.json of another architecture: refuse rather than fill in a default size
            raise ValueError(f"model_type {d.get('model_type')!r} needs {', '.join(missing)} in its config")
        known = {f.name for f in fields(cls)}
        values = {**DEFAULTS.get(d.get("model_type", cls.model_type), {}), **{k: v for k, v in d.items() if k in known}}
        values.update(rope_from_hf(d, values.get("rope_theta", cls.rope_theta)))
        values.pop("partial_rotary_factor", None)
        if isinstance(values["rope_scaling"], dict) and "original_max_position_embeddings" in d:
            # a top-level original_max_position_embeddings wins (transformers' standardize_rope_params)
            values["rope_scaling"] = {**values["rope_scaling"],
                                      "original_max_position_embeddings": d["original_max_position_embeddings"]}
        return cls(**check_config_fields(cls, values))


def rope_from_hf(d: dict, theta: float) -> dict:
    """rope_theta, rope_scaling (and partial_rotary_factor, when given) from a config.json written by transformers
    4 (`rope_theta`, `rope_scaling`) or 5 (`rope_parameters`). A non-empty rope_scaling replaces rope_parameters
    whole, as transformers 5 reads a config.json that has both (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict:
    `rope_scaling or rope_parameters`; rope_theta then comes from the top level)."""
    params = d.get("rope_scaling") or d.get("rope_parameters")
    if not isinstance(params, dict):
        return {"rope_theta": d.get("rope_theta", theta), "rope_scaling": d.get("rope_scaling")}
    for key, example in (("rope_theta", 10000.0), ("partial_rotary_factor", 0.25)):  # under config.json's names
        if key in params:
            check_config_value(f"rope_parameters.{key}", params[key], "number", example)
    out = {"rope_theta": params.get("rope_theta", theta), "rope_scaling": params}
    if "partial_rotary_factor" in params:
        out["partial_rotary_factor"] = params["partial_rotary_factor"]
    return out


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        H, Hkv, D, C = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.heads = (H, Hkv, D)
        self.layer_idx = layer_idx
        self.attn_pdrop = config.attention_dropout
        qkv_bias = config.model_type == "qwen2" or config.attention_bias
        o_bias = config.attention_bias  # never for Qwen2 (UNREAD)
        self.q_proj = Linear(C, H * D, bias=qkv_bias)
        self.k_proj = Linear(C, Hkv * D, bias=qkv_bias)
        self.v_proj = Linear(C, Hkv * D, bias=qkv_bias)
        self.o_proj = Linear(H * D, C, bias=o_bias)
        if config.model_type == "qwen3":  # RMSNorm over each head's D features of q and k, before the rotation
            self.q_norm = RMSNorm(D, config.rms_norm_eps)
            self.k_norm = RMSNorm(D, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, grid: Unpadded | None,
                outputs: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, T, C] or [N, C] -> the same leading shape (or [len(outputs), C]) with C features."""
        H, Hkv, D = self.heads
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, H, D)
        k = self.k_proj(x).view(*lead, Hkv, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        qkv = rotary_qkv(q, k, self.v_proj(x).view(*lead, Hkv, D), rope)  # [.., (H + 2 Hkv) D]
        dropout = self.attn_pdrop if self.training else 0.0
        return self.o_proj(attend(qkv, self.heads, mask, cache, self.layer_idx, dropout, grid, outputs))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(C, I, bias=bias)
        self.up_proj = Linear(C, I, bias=bias)
        self.down_proj = Linear(I, C, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None,
                grid: Unpadded | None = None, outputs: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), mask, cache, grid, outputs, rope)
        x = residual(x if outputs is None else x.index_select(0, outputs), a)
        return residual(x, self.mlp(self.post_attention_layernorm(x)))


class Llama(CausalLM):
    """LlamaForCausalLM and its relatives (MODEL_TYPES), configured by a LlamaConfig."""

    lora_targets = ("q_proj", "v_proj")  # lora.targets' default, as PEFT's for these families

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
                layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
                norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            )
        )
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling)
        tie_or_build_head(self, config.hidden_size, config.vocab_size, config.tie_word_embeddings)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(pos)
