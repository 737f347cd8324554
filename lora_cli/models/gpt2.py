"""GPT-2 (Radford et al. 2019) in plain PyTorch, with the Hugging Face parameter names.

Shapes: B batch, T new tokens, S keys (past + new), C = n_embd, H = n_head, D = C / H, V = vocab_size.
Linear weights are stored [out, in] (Hugging Face's Conv1D files store [in, out]; pretrained.py transposes once).
The forward returns hidden states; `lm_head` is applied by the caller, so training and evaluation can project
only the positions that carry a loss instead of materialising [B, T, V] logits.
No LoRA and no I/O here: lora.py wraps the nn.Linear layers in place, pretrained.py loads weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lora_cli.models.common import (
    CausalLM, Dropout, KVCache, Linear, Unpadded, attend, check_config_fields, check_config_value, residual,
    tie_or_build_head,
)


@dataclass
class GPT2Config:
    """The architecture, with the names of Hugging Face's GPT2Config (so config.json maps one to one)."""

    model_type = "gpt2"  # not a field: the one type this config describes

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    n_inner: int | None = None  # the MLP's width; None: 4 * n_embd
    tie_word_embeddings: bool = True  # lm_head shares wte's weight, as in every published GPT-2

    def __post_init__(self) -> None:
        sizes = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") + ("n_inner",) * (self.n_inner is not None)
        for name in sizes:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def intermediate_size(self) -> int:
        """The MLP's hidden width (the other families' name for it)."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if "n_positions" not in values and "n_ctx" in d:
            check_config_value("n_ctx", d["n_ctx"], "size", cls.n_positions)
            values["n_positions"] = d["n_ctx"]
        return cls(**check_config_fields(cls, values))


# Parameter-free sizes of the published checkpoints: the one table of presets (pretrained.py and `init: random`).
GPT2_PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": GPT2Config(n_layer=6, n_head=12, n_embd=768),
}


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.heads = (config.n_head, config.n_head, config.n_embd // config.n_head)  # (H, Hkv, D)
        self.layer_idx = layer_idx
        self.attn_pdrop = config.attn_pdrop
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # fused query, key, value
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None,
                grid: Unpadded | None = None, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """outputs (with grid): indices into x's N rows; only those rows' outputs are computed and returned."""
        qkv = self.c_attn(x)  # [B, T, 3C], or [N, 3C] on the unpadded path (x is the real tokens only)
        dropout = self.attn_pdrop if self.training else 0.0
        y = attend(qkv, self.heads, mask, cache, self.layer_idx, dropout, grid, outputs)  # [B, T, C] or [N, C]
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.intermediate_size)
        self.c_proj = Linear(config.intermediate_size, config.n_embd)
        self.dropout = Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in Hugging Face).
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None,
                grid: Unpadded | None = None, outputs: torch.Tensor | None = None, rope: None = None) -> torch.Tensor:
        a = self.attn(self.ln_1(x), mask, cache, grid, outputs)
        x = residual(x if outputs is None else x.index_select(0, outputs), a)
        return residual(x, self.mlp(self.ln_2(x)))


class GPT2(CausalLM):
    """GPT-2 language model (GPT2LMHeadModel's names). `forward` returns hidden states [B, T, C]; `logits`
    projects them to [.., V]."""

    lora_targets = ("attn.c_attn",)  # lora.targets' default: the fused query/key/value, as PEFT's for gpt2

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                drop=Dropout(config.embd_pdrop),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        tie_or_build_head(self, config.n_embd, config.vocab_size, config.tie_word_embeddings)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """GPT-2's initialisation (Radford et al. 2019, sec. 2.3): N(0, 0.02), residual projections scaled by
        1/sqrt(2 * n_layer); biases zero, LayerNorm weights one."""
        std = 0.02
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj") else 1.0
                with torch.no_grad():
                    module.weight.normal_(0.0, std * scale, generator=generator)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.transformer.wte

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.h

    @property
    def final_norm(self) -> nn.Module:
        return self.transformer.ln_f

    def embed(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(pos))
