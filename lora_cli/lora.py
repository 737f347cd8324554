"""LoRA layers, target selection, freezing, and merge/unmerge.

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes a linear layer W [out, in] and learns a low-rank update:

    y = W x + b + scaling * B (A dropout(x)),    A [r, in], B [out, r],    scaling = alpha / r

A starts as PEFT's `kaiming_uniform_(a=sqrt(5))` and B as zeros, so the wrapped model equals the base model at
step 0. rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) uses scaling = alpha / sqrt(r) so higher ranks keep
learning. DoRA (Liu et al. 2024, arXiv:2402.09353) splits the adapted weight into a learned magnitude m [out] and
a direction: W' = m * (W + s B A) / ||W + s B A||_row, with the norm treated as a constant (sec. 4.3); the
forward follows PEFT's `use_dora` term for term, so the two agree to float rounding.

Module and tensor names (the adapter file uses them verbatim):

    transformer.h.0.attn.c_attn                   LoRALinear wrapping the frozen nn.Linear
    transformer.h.0.attn.c_attn.base_layer.weight the frozen base weight [out, in] (bias: .base_layer.bias)
    transformer.h.0.attn.c_attn.lora_A.weight     A [r, in]
    transformer.h.0.attn.c_attn.lora_B.weight     B [out, r]
    transformer.h.0.attn.c_attn.lora_magnitude_vector   DoRA's m [out] (PEFT's saved name, so export maps 1:1)

GPT-2 fuses query, key and value in `attn.c_attn` ([3C, C]). The targets `attn.q`, `attn.k`, `attn.v` give each
third of its output its own adapter (the LoRA paper adapts W_q and W_v only). They are selected by the virtual
names `transformer.h.0.attn.q` etc., and the layer is a LoRASlicedLinear:

    transformer.h.0.attn.c_attn.lora_q.lora_A.weight   A_q [r, C]
    transformer.h.0.attn.c_attn.lora_q.lora_B.weight   B_q [C, r]   (rows 0..C of the c_attn output)
    transformer.h.0.attn.c_attn.lora_v.lora_A.weight   ...          (lora_k: rows C..2C, lora_v: rows 2C..3C)

In training the update is always computed as (x A^T) B^T: the [out, in] product B A is formed only to merge.

Variants beyond the default start (init_lora_weights): Gaussian A; PiSSA and OLoRA, which start A and B from the
base weight and leave the base the residual (portable_adapter converts them back to a LoRA of the untouched base);
per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern); LoRA+ optimizer groups (loraplus_param_groups).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import math
import re
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lora_cli.config import LORA_INITS, MUTATING_INITS, LoraConfig, regex_problem
from lora_cli.errors import AdapterError, ConfigError
from lora_cli.models import HEAD, add_classification_head
from lora_cli.runtime import SAFETENSORS_DTYPES, as_dtype

SLICES = ("q", "k", "v")  # thirds of GPT-2's fused c_attn output, in order
# A block's prefix in each family's module tree: GPT-2, the Llama family, GPT-NeoX.
BLOCK = re.compile(r"^(transformer\.h|model\.layers|gpt_neox\.layers)\.(\d+)\.")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _low_rank_pair(in_features: int, out_features: int, r: int, like: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[nn.Linear, nn.Linear]:
    """A [r, in] initialised as PEFT does (nn.Linear's kaiming_uniform_(a=sqrt(5))), B [out, r] zeros.
    Adapter weights live in fp32 on the base weight's device, whatever the base dtype."""
    device = like.device
    lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
    lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
    if device.type != "meta":  # meta: shapes only (`lora info`), nothing to initialise
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(lora_B.weight)
    return lora_A, lora_B


class MaskDropout(nn.Dropout):
    """nn.Dropout through torch.native_dropout, whose backward keeps a 1-byte mask. On the CPU, F.dropout keeps
    an fp32 copy of its mask instead, one [tokens, in_features] fp32 tensor per LoRA layer until the backward pass
    (12 MB of activations on a batch of ~400 tokens of GPT-2 124M with LoRA on c_attn). On CUDA, F.dropout calls
    native_dropout itself, so the masks are the same there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


class _DroppedDown(torch.autograd.Function):
    """lora_A(dropout(x)), keeping x and the 1-byte mask for the backward instead of the dropped-out copy of x. The
    LoRA layers reading one input (q_proj and v_proj; gate_proj and up_proj) each kept their own copy; now they
    keep x once. The backward rebuilds the copy with native_dropout_backward, which gives the forward's values
    bit for bit, and runs the products autograd runs for F.linear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        dropped, mask = torch.native_dropout(x, p, True)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(x, mask, weight)
        return F.linear(dropped, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mask, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.native_dropout_backward(grad.matmul(weight), mask, ctx.scale)
        if ctx.needs_input_grad[1]:
            dropped = torch.ops.aten.native_dropout_backward(x, mask, ctx.scale)
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().mm(dropped.reshape(-1, dropped.shape[-1]))
        return grad_x, grad_weight, None


class LoRALayer(nn.Module):
    """What LoRALinear and LoRASlicedLinear share: a frozen `base_layer`, merge/unmerge, an off switch."""

    base_layer: nn.Linear

    def __init__(self, base_layer: nn.Linear, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.lora_dropout = MaskDropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # forward = base layer only (see lora_disabled)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A in fp32 [out, in]: merging only."""
        raise NotImplementedError

    def merge(self) -> None:
        """W <- W + scaling * B A, computed in fp32; refuses to write non-finite weights."""
        if self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            new = weight.float() + self.delta_weight()
            _check_finite(new, "merging")
            weight.copy_(new.to(weight.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - scaling * B A (fp32): restores the base weight to float rounding."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            new = weight.float() - self.delta_weight()
            _check_finite(new, "unmerging")
            weight.copy_(new.to(weight.dtype))
        self.merged = False

    def lora_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name relative to this layer, parameter) of the adapter's own weights (not base_layer)."""
        for name, p in self.named_parameters():
            if not name.startswith("base_layer."):
                yield name, p


def check_rank(r: int, target: str | None = None) -> None:
    """LoRA's rank must be positive: the one check of lora.r (layers, apply_lora, per-target ranks)."""
    if r <= 0:
        raise ConfigError(f"lora.r must be a positive integer, got {r}" + (f" for {target}" if target else ""))


def _check_finite(weight: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(weight).all()):
        raise AdapterError(f"{what} the adapter gives non-finite weights (NaN or inf); the adapter is corrupt or diverged")


class LoRALinear(LoRALayer):
    """A frozen nn.Linear plus a rank-r update (optionally DoRA), named like PEFT's LoRA Linear."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, generator: torch.Generator | None = None):
        check_rank(r)
        super().__init__(base_layer, dropout)
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A, self.lora_B = _low_rank_pair(self.in_features, self.out_features, r, base_layer.weight, generator)
        self.lora_magnitude_vector: nn.Parameter | None = None
        self._merged_norm: torch.Tensor | None = None  # DoRA: the norm used by merge, needed to unmerge
        if use_dora:
            # m starts as ||W + s B A||_row = ||W||_row (B = 0), so the model still equals the base model.
            with torch.no_grad():
                norm = self.weight_norm(base_layer.weight)
            self.lora_magnitude_vector = nn.Parameter(norm)

    @classmethod
    def from_base(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                  use_dora: bool = False, generator: torch.Generator | None = None) -> "LoRALinear":
        return cls(linear, r, alpha, dropout, use_rslora, use_dora, generator)

    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| of every output row, in fp32, without forming B A [out, in]:
        ||W_i + s B_i A||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T."""
        W = weight.detach().float()
        A = self.lora_A.weight.detach().float()
        B = self.lora_B.weight.detach().float()
        s = self.scaling
        # fp32 even under autocast: the norm rescales every output, so its rounding matters.
        no_autocast = torch.autocast(W.device.type, enabled=False) if W.device.type in ("cpu", "cuda") \
            else contextlib.nullcontext()
        with no_autocast:
            squared = (
                torch.linalg.vector_norm(W, dim=1).square()
                + 2 * s * (B * (W @ A.T)).sum(dim=1)
                + s * s * ((B @ (A @ A.T)) * B).sum(dim=1)
            )
        return squared.clamp_min(0).sqrt()

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def _drops_in_autograd(self, x: torch.Tensor) -> bool:
        """Whether dropout and lora_A run as _DroppedDown: training with dropout and gradients, without autocast
        (whose casts a custom Function's backward would not repeat) and with x in the adapter's dtype."""
        return (self.training and isinstance(self.lora_dropout, MaskDropout) and self.lora_dropout.p > 0
                and torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
                and x.dtype == self.lora_A.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        out_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        if not self.use_dora:
            if self._drops_in_autograd(x):
                a = _DroppedDown.apply(x, self.lora_A.weight, self.lora_dropout.p)  # [..., r]
            else:
                a = self.lora_A(self.lora_dropout(x))  # [..., r]
            if a.dtype != result.dtype:  # e.g. a bf16 base without autocast: add in the LoRA dtype
                return (result + self.lora_B(a) * self.scaling).to(out_dtype)
            # result + scaling * a B^T as one addmm: the product, its scaled copy and the sum were three
            # [tokens, out] temporaries, whose holes fragment the heap: peak RSS of the instruction benchmark
            # 1051-1058 -> 1023-1033 MB (gpt2 124M, fp32, two runs each)
            fused = torch.addmm(result.reshape(-1, result.shape[-1]), a.reshape(-1, a.shape[-1]),
                                self.lora_B.weight.t(), alpha=self.scaling)
            return fused.view(result.shape).to(out_dtype)
        # DoRA, as PEFT's DoraLinearVariant.forward: without dropout (or in eval) the base output is reused;
        # with dropout, the base term is recomputed on the dropped-out input.
        weight = self.base_layer.weight.to(x.dtype)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base_result = result if self.base_layer.bias is None else result - self.base_layer.bias
        else:
            x = self.lora_dropout(x)
            base_result = F.linear(x, weight)
        norm = self.weight_norm(weight).to(x.dtype)  # detached: a constant, as in the DoRA paper (sec. 4.3)
        scale = self.lora_magnitude_vector / norm  # [out]: broadcasts over any leading dims (an unbatched row too)
        lora_result = self.lora_B(self.lora_A(x))
        result = result + (scale - 1) * base_result + scale * lora_result * self.scaling
        return result.to(out_dtype)

    def merge(self) -> None:
        if not self.use_dora:
            return super().merge()
        if self.merged:
            return
        # W' = m / ||W + dW|| * (W + dW), the norm of the unmerged weight (as the forward uses it).
        weight = self.base_layer.weight
        with torch.no_grad():
            norm = self.weight_norm(weight)
            factor = (self.lora_magnitude_vector.float() / norm).view(-1, 1)
            new = factor * (weight.float() + self.delta_weight())
            _check_finite(new, "merging")
            weight.copy_(new.to(weight.dtype))
        self._merged_norm = norm
        self.merged = True

    def unmerge(self) -> None:
        if not self.use_dora:
            return super().unmerge()
        if not self.merged:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            factor = (self.lora_magnitude_vector.float() / self._merged_norm).view(-1, 1)
            new = weight.float() / factor - self.delta_weight()
            _check_finite(new, "unmerging")
            weight.copy_(new.to(weight.dtype))
        self._merged_norm = None
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dora={self.use_dora}, merged={self.merged}"


class LoRASlice(nn.Module):
    """One slice's adapter inside a LoRASlicedLinear: A [r, in], B [slice_out, r] and its own scaling."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, use_rslora: bool,
                 like: torch.Tensor, generator: torch.Generator | None):
        super().__init__()
        check_rank(r)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A, self.lora_B = _low_rank_pair(in_features, out_features, r, like, generator)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


class LoRASlicedLinear(LoRALayer):
    """The fused q/k/v projection with separate adapters on some of its output thirds (submodules lora_q,
    lora_k, lora_v). One dropout mask is shared by the slices, so the layer is exactly a single LoRA with a
    block-structured B (which is how it is exported to PEFT)."""

    def __init__(self, base_layer: nn.Linear, slices: dict[str, tuple[int, float]], dropout: float = 0.0,
                 use_rslora: bool = False, generator: torch.Generator | None = None):
        super().__init__(base_layer, dropout)
        if self.out_features % len(SLICES):
            raise ConfigError(f"a fused q/k/v layer needs an output size divisible by 3, got {self.out_features}")
        self.slice_size = self.out_features // len(SLICES)
        self.slice_names = tuple(s for s in SLICES if s in slices)  # model order: q, k, v
        for s in self.slice_names:
            r, alpha = slices[s]
            self.add_module(f"lora_{s}", LoRASlice(self.in_features, self.slice_size, r, alpha, use_rslora,
                                                   base_layer.weight, generator))

    def slice(self, name: str) -> LoRASlice:
        return getattr(self, f"lora_{name}")

    def offset(self, name: str) -> int:
        return SLICES.index(name) * self.slice_size

    def delta_weight(self) -> torch.Tensor:
        W = self.base_layer.weight
        delta = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        for s in self.slice_names:
            mod, o = self.slice(s), self.offset(s)
            delta[o : o + self.slice_size] = mod.scaling * (mod.lora_B.weight.float() @ mod.lora_A.weight.float())
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        out_dtype = result.dtype
        x = self.lora_dropout(x.to(self.slice(self.slice_names[0]).lora_A.weight.dtype))
        parts = list(result.split(self.slice_size, dim=-1))
        for s in self.slice_names:
            mod = self.slice(s)
            i = SLICES.index(s)
            parts[i] = parts[i] + mod.lora_B(mod.lora_A(x)) * mod.scaling
        return torch.cat(parts, dim=-1).to(out_dtype)

    def extra_repr(self) -> str:
        return f"slices={','.join(self.slice_names)}, merged={self.merged}"


# ------------------------------------------------------------------------------------------- initialisation

def _adapters(layer: LoRALayer) -> list[tuple[nn.Module, slice]]:
    """(module holding lora_A / lora_B / r / scaling, the base weight rows it updates) of a LoRA layer."""
    if isinstance(layer, LoRASlicedLinear):
        return [(layer.slice(s), slice(layer.offset(s), layer.offset(s) + layer.slice_size)) for s in layer.slice_names]
    return [(layer, slice(None))]


def _pissa(W: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA (Meng et al. 2024, arXiv:2404.02948): W [out, in] = U S Vh; A = sqrt(S_r / s) Vh_r [r, in],
    B = U_r sqrt(S_r / s) [out, r], so s B A is W's top-r part. Op for op PEFT's LoraLayer.pissa_init."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    Ur, Sr, Vhr = U[:, :r], S[:r], Vh[:r]
    Sr /= scaling
    return torch.diag(torch.sqrt(Sr)) @ Vhr, Ur @ torch.diag(torch.sqrt(Sr))


def _olora(W: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA (Büyükakyüz 2024, arXiv:2406.01775): W [out, in] = Q R; A = R[:r] [r, in], B = Q[:, :r] [out, r]
    (orthonormal columns). As PEFT's LoraLayer.olora_init, whose scaling is not folded in."""
    Q, R = torch.linalg.qr(W)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def init_lora_weights(layer: LoRALayer, init: str, generator: torch.Generator | None = None, name: str = "") -> None:
    """Start a freshly built layer's adapters as PEFT's `init_lora_weights` does:

        default   A kaiming-uniform, B zeros (what the layer already holds)
        gaussian  A ~ N(0, (1/r)^2), B zeros
        pissa     A, B from the top-r singular triplets of W (_pissa); the base weight becomes W - s B A
        olora     A, B from the QR decomposition of W (_olora); the base weight becomes W - s B A

    The output at step 0 equals the base model's in every case (pissa/olora to float rounding). pissa/olora
    keep the starting values as buffers lora_A0 / lora_B0 (not saved, not trained): portable_adapter needs them.
    The arithmetic is fp32 whatever the base dtype, as PEFT's."""
    if init not in LORA_INITS:
        raise ConfigError(f"lora.init must be one of {', '.join(LORA_INITS)}, got {init!r}")
    if init == "default":
        return
    weight = layer.base_layer.weight
    for mod, rows in _adapters(layer):
        A, B = mod.lora_A.weight, mod.lora_B.weight
        if init in MUTATING_INITS and mod.r > min(B.shape[0], A.shape[1]):
            raise ConfigError(f"lora.init {init}: rank {mod.r} of {name} exceeds its smaller dimension "
                              f"{min(B.shape[0], A.shape[1])}; lower lora.r (or its rank_pattern)")
        if weight.device.type == "meta":  # shapes only (`lora info`): the starting values are placeholders
            if init in MUTATING_INITS:
                mod.register_buffer("lora_A0", torch.empty_like(A), persistent=False)
                mod.register_buffer("lora_B0", torch.empty_like(B), persistent=False)
            continue
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(A, std=1 / mod.r, generator=generator)
                continue
            W = weight[rows].float()
            A0, B0 = (_pissa if init == "pissa" else _olora)(W, mod.r, mod.scaling)
            A.copy_(A0)
            B.copy_(B0)
            weight[rows] = (W - mod.scaling * B0 @ A0).to(weight.dtype)  # PEFT's order of operations
            mod.register_buffer("lora_A0", A0.clone(), persistent=False)
            mod.register_buffer("lora_B0", B0.clone(), persistent=False)


# ------------------------------------------------------------------------------------------ target selection


def _is_fused_qkv(name: str, module: nn.Linear) -> bool:
    return name.endswith("attn.c_attn") and module.out_features == 3 * module.in_features


def _slice_name(c_attn_name: str, s: str) -> str:
    """transformer.h.0.attn.c_attn -> transformer.h.0.attn.q"""
    return f"{c_attn_name.rsplit('.', 1)[0]}.{s}"


def _split_slice_name(name: str) -> tuple[str, str] | None:
    """transformer.h.0.attn.q -> (transformer.h.0.attn.c_attn, q); None for a real module name."""
    parent, _, last = name.rpartition(".")
    if last in SLICES and parent.endswith("attn"):
        return f"{parent}.c_attn", last
    return None


def _tied_to_input(model: nn.Module, module: nn.Linear) -> bool:
    """A head that shares the input embedding (GPT-2's lm_head): adapting it would change the embedding too."""
    embed = getattr(model, "embed_tokens", None)
    return embed is not None and module.weight is embed.weight


def tied_names(model: nn.Module) -> tuple[str, str] | None:
    """(the output head's name, the input embedding's name) when the head shares the embedding's weight
    (CausalLM.tied: GPT-2's lm_head and transformer.wte; Llama's lm_head and model.embed_tokens; GPT-NeoX's
    embed_out and gpt_neox.embed_in), else None."""
    if not getattr(model, "tied", False):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(model.lm_head)], names[id(model.embed_tokens)]


def _classifier_lm_head(model: nn.Module) -> nn.Module | None:
    """A classifier's language-model head, which its `score` head answers instead (None for a causal LM)."""
    return getattr(model, "lm_head", None) if getattr(model, HEAD, None) is not None else None


def shares_weight(model: nn.Module, name: str) -> bool:
    """Whether module `name` holds a weight another module holds too (a tied lm_head and input embedding)."""
    weight = getattr(model.get_submodule(name), "weight", None)
    return weight is not None and sum(getattr(m, "weight", None) is weight for m in model.modules()) > 1


def target_candidates(model: nn.Module) -> list[str]:
    """Every name a LoRA target may match, in model order: each linear layer (not a head tied to the input
    embedding, nor the language-model head of a classifier, whose `score` head answers instead), and after each
    fused c_attn its virtual slices attn.q, attn.k, attn.v."""
    unused_head = _classifier_lm_head(model)
    names = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            raise ConfigError("the model already has LoRA layers; apply LoRA once, to a fresh base model")
        if isinstance(module, nn.Linear) and not _tied_to_input(model, module) and module is not unused_head:
            names.append(name)
            if _is_fused_qkv(name, module):
                names.extend(_slice_name(name, s) for s in SLICES)
    return names


def shorthands(model: nn.Module) -> list[str]:
    """The target shorthands a model offers: all-linear, then each block's layer names without the block prefix
    (attn.c_attn, attn.q, ... for GPT-2; self_attn.q_proj, ..., mlp.down_proj for Llama), in model order."""
    shorts = ["all-linear"]
    for name in target_candidates(model):
        if (m := BLOCK.match(name)) and name[m.end():] not in shorts:
            shorts.append(name[m.end():])
    return shorts


def _short_names(names: list[str], all_linear: bool = True) -> str:
    """transformer.h.N.attn.c_attn, ... -> "attn.c_attn, ... (in transformer.h.0-11), or all-linear" for error
    messages (without the last part when not all_linear)."""
    shorts: list[str] = []  # the blocks' layers, by their names inside a block
    outside: list[str] = []  # layers outside the blocks (an untied lm_head, a classifier's score)
    blocks: list[int] = []
    prefix = ""
    for name in names:
        m = BLOCK.match(name)
        if m:
            prefix = m.group(1)
            blocks.append(int(m.group(2)))
        into, short = (shorts, name[m.end():]) if m else (outside, name)
        if short not in into:
            into.append(short)
    where = f" (in {prefix}.{min(blocks)}-{max(blocks)})" if blocks else ""
    parts = ([f"{', '.join(shorts)}{where}"] if shorts else []) + outside
    return ", ".join(parts) + (", or all-linear" if all_linear else "")


def _matcher(pattern: str, key: str):
    """A predicate for one pattern: `re:REGEX` (full match), a glob (`h.*.mlp.c_fc`, matched against the
    name or any dotted suffix of it), or a plain name (the name itself or a dotted suffix: `attn.c_attn`)."""
    if pattern.startswith("re:"):
        problem = regex_problem(pattern, pattern[3:])
        if problem:
            raise ConfigError(f"{key}: {problem}")
        rx = re.compile(pattern[3:])
        return lambda name: rx.fullmatch(name) is not None
    if any(c in pattern for c in "*?["):
        def glob(name: str) -> bool:
            parts = name.split(".")
            return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))
        return glob
    return lambda name: name == pattern or name.endswith("." + pattern)


# A rank_pattern / alpha_pattern key matches the end of a module name (peft.utils.other.get_pattern_key's rule)
PATTERN_KEY = r"(.*\.)?({})$"


def pattern_matches(key: str, name: str) -> bool:
    """Whether a rank_pattern / alpha_pattern key matches a module name (PATTERN_KEY)."""
    return re.match(PATTERN_KEY.format(key), name) is not None


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key that matches the module name
    (pattern_matches), else `default`."""
    for key, value in patterns.items():
        if pattern_matches(key, name):
            return value
    return default


def pattern_problems(targets: list[str], cfg: LoraConfig) -> list[str]:
    """Each key of lora.rank_pattern / alpha_pattern must match a targeted layer (a typo would be ignored)."""
    problems = []
    for key, patterns in (("lora.rank_pattern", cfg.rank_pattern), ("lora.alpha_pattern", cfg.alpha_pattern)):
        unmatched = []
        for pattern in patterns or {}:
            problem = regex_problem(pattern, PATTERN_KEY.format(pattern))
            if problem:
                problems.append(f"{key}: {problem}")
            elif not any(pattern_matches(pattern, t) for t in targets):
                unmatched.append(repr(pattern))
        if unmatched:
            what = "matches" if len(unmatched) == 1 else "match"
            problems.append(f"{key}: {', '.join(unmatched)} {what} none of the targeted layers (a key matches the "
                            f"end of a layer's name, as in PEFT); targeted: {_short_names(targets, all_linear=False)}")
    return problems


def combination_problems(targets: list[str], saved: list[str], cfg: LoraConfig) -> list[str]:
    """Settings that exclude each other once the targets and the modules saved whole are known."""
    problems = []
    for t in targets:
        module = (_split_slice_name(t) or (t,))[0]
        clash = next((s for s in saved if module == s or module.startswith(s + ".") or s.startswith(module + ".")), None)
        if clash:
            problems.append(f"lora.modules_to_save: {clash} overlaps the LoRA target {t}; a module is either adapted "
                            f"or saved whole, not both")
            break
    if cfg.init in MUTATING_INITS and cfg.use_dora:
        problems.append(f"lora.init {cfg.init} cannot be combined with use_dora; set use_dora: false or init: default")
    if cfg.init in MUTATING_INITS and HEAD in targets:
        # The adapter file carries the head's base weight, which would be the residual: not the untouched base.
        problems.append(f"lora.init {cfg.init} cannot adapt the classification head {HEAD}; leave it out of "
                        f"lora.targets (it is then trained whole) or use init: default")
    if cfg.use_dora and any(_split_slice_name(t) for t in targets):
        problems.append("lora.use_dora: DoRA on attn.q/attn.k/attn.v slices is not supported; "
                        "target the fused attn.c_attn with DoRA instead")
    return problems


def check_patterns(targets: list[str], cfg: LoraConfig) -> None:
    problems = pattern_problems(targets, cfg)
    if problems:
        raise ConfigError("; ".join(problems))


def resolve_targets(model: nn.Module, targets: list[str] | None, layers: list[int] | None = None) -> list[str]:
    """Config patterns -> the full module names (or slice names) to adapt, in model order. None: the model
    family's default (its `lora_targets`: the query and value projections, as PEFT picks them)."""
    targets = list(model.lora_targets if targets is None else targets)
    candidates = target_candidates(model)
    n_layer = len(getattr(model, "blocks", []))
    if layers is not None:
        problem = layers_problem(layers, n_layer)
        if problem:
            raise ConfigError(problem)
        keep = set(layers)
        pool = [n for n in candidates if (m := BLOCK.match(n)) and int(m.group(2)) in keep]
    else:
        pool = candidates
    if not targets:
        raise ConfigError("lora.targets must name at least one layer pattern (e.g. [attn.c_attn] or all-linear)")
    chosen: set[str] = set()
    unmatched: list[str] = []  # every pattern that matches nothing, reported together
    tied = tied_names(model)  # (head, input embedding) names when the head shares the embedding's weight
    for pattern in targets:
        pattern = str(pattern).strip()
        if pattern == "all-linear":
            # Every linear layer in the blocks (not the head), fused c_attn rather than its slices (as PEFT).
            hits = [n for n in pool if BLOCK.match(n) and _split_slice_name(n) is None]
        else:
            match = _matcher(pattern, "lora.targets")
            hits = [n for n in pool if match(n)]
        if not hits:
            note = ""
            if tied and (pattern in tied or pattern.endswith("." + tied[0].rsplit(".", 1)[-1])):
                note = f" ({tied[0]} shares its weight with {tied[1]}; LoRA cannot target it)"
            elif layers is not None and any(_matcher(pattern, "lora.targets")(n) for n in candidates):
                note = f" in lora.layers {sorted(set(layers))}"
            unmatched.append(f"{pattern!r}{note}")
        chosen.update(hits)
    if unmatched:
        what = "matches" if len(unmatched) == 1 else "match"
        raise ConfigError(f"lora.targets: {', '.join(unmatched)} {what} no linear layer; available: "
                          f"{_short_names(candidates)}")
    for name in [n for n in candidates if n in chosen]:
        split = _split_slice_name(name)
        if split and split[0] in chosen:
            raise ConfigError(f"lora.targets select both {split[0]} and its slice {name}; choose the fused "
                              f"attn.c_attn or the slices attn.q/attn.k/attn.v for a layer, not both")
    return [n for n in candidates if n in chosen]


def layers_problem(layers: list[int], n_layer: int) -> str | None:
    bad = sorted(i for i in layers if not 0 <= i < n_layer)
    return f"lora.layers: block {bad[0]} does not exist; the model has blocks 0-{n_layer - 1}" if bad else None


def config_problems(model: nn.Module, cfg: LoraConfig, resolved_only: bool = False) -> list[str]:
    """What is wrong with the lora section for this model, all of it at once (apply_lora stops at its first
    check that fails): lora.layers, lora.targets and lora.modules_to_save against its modules, then the
    rank/alpha pattern keys and the settings that exclude each other. resolved_only: the first three alone."""
    problems = []
    layers = cfg.layers
    if layers is not None and (problem := layers_problem(layers, len(getattr(model, "blocks", [])))):
        problems.append(problem)
        layers = None  # the targets are still checked, against every block
    targets = saved = None
    try:
        targets = resolve_targets(model, cfg.targets, layers)
    except ConfigError as exc:
        problems.append(str(exc))
    try:
        saved = resolve_modules(model, list(cfg.modules_to_save))
    except ConfigError as exc:
        problems.append(str(exc))
    if targets is not None and not resolved_only:
        problems += pattern_problems(targets, cfg)
        if saved is not None:
            problems += combination_problems(targets, saved, cfg)
    return problems


def without_head(cfg: LoraConfig) -> LoraConfig:
    """The settings less the target and module patterns that name a classifier's head, which is added once the
    data has given the labels: what can be checked against the model before."""
    def keep(patterns):
        return [p for p in patterns if not _matcher(str(p).strip(), "lora.targets")(HEAD)]

    targets = None if cfg.targets is None else keep(cfg.targets) or None
    return dataclasses.replace(cfg, targets=targets, modules_to_save=keep(cfg.modules_to_save))


def resolve_modules(model: nn.Module, patterns: list[str], key: str = "lora.modules_to_save") -> list[str]:
    """Module-name patterns (same rules as targets) -> outermost matching module names, in model order."""
    names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for pattern in patterns:
        match = _matcher(str(pattern).strip(), key)
        hits = [n for n in names if match(n)]
        if not hits:
            shown = ", ".join(n for n in names if "." not in n or n.count(".") == 1)
            raise ConfigError(f"{key}: {pattern!r} matches no module; top-level modules: {shown}")
        chosen.extend(h for h in hits if h not in chosen)
    outer = [n for n in chosen if not any(n.startswith(o + ".") for o in chosen if o != n)]
    return [n for n in names if n in outer]


# --------------------------------------------------------------------------------------------- apply / freeze


def apply_lora(model: nn.Module, lora_cfg: LoraConfig, generator: torch.Generator | None = None, *,
               rank_pattern: dict[str, int] | None = None,
               alpha_pattern: dict[str, float] | None = None) -> list[str]:
    """Wrap the targeted linear layers of `model` in place, freeze everything else, and return the resolved
    target names (slice targets as transformer.h.N.attn.q/k/v).

    rank_pattern / alpha_pattern map resolved target names to a rank / alpha other than lora_cfg's
    (used when loading adapters that carry per-module ranks, e.g. from PEFT); names they lack take lora_cfg's own
    rank_pattern / alpha_pattern (PEFT's regex keys, matched by pattern_value), else r / alpha. lora_cfg.init
    starts the adapters (init_lora_weights)."""
    cfg = lora_cfg
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    check_rank(cfg.r)
    if cfg.alpha <= 0:
        raise ConfigError(f"lora.alpha must be > 0, got {cfg.alpha}")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.bias not in ("none", "lora_only", "all"):
        raise ConfigError(f"lora.bias must be none, lora_only or all, got {cfg.bias!r}")
    targets = resolve_targets(model, cfg.targets, cfg.layers)
    check_patterns(targets, cfg)
    rank_pattern = {t: int(rank_pattern[t]) if t in rank_pattern else int(pattern_value(cfg.rank_pattern, t, cfg.r))
                    for t in targets}
    alpha_pattern = {t: float(alpha_pattern[t]) if t in alpha_pattern else
                     float(pattern_value(cfg.alpha_pattern, t, cfg.alpha)) for t in targets}
    for name, r in rank_pattern.items():
        check_rank(r, name)
    saved = resolve_modules(model, list(cfg.modules_to_save)) if cfg.modules_to_save else []
    problems = combination_problems(targets, saved, cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    slices: dict[str, dict[str, tuple[int, float]]] = {}
    plain: list[str] = []
    for t in targets:
        split = _split_slice_name(t)
        if split:
            slices.setdefault(split[0], {})[split[1]] = (rank_pattern[t], alpha_pattern[t])
        else:
            plain.append(t)

    model.requires_grad_(False)
    for t in [n for n in target_candidates(model) if n in plain or n in slices]:
        parent_name, _, child = t.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if t in slices:
            layer = LoRASlicedLinear(base, slices[t], cfg.dropout, cfg.use_rslora, generator)
        else:
            layer = LoRALinear.from_base(base, rank_pattern[t], alpha_pattern[t], cfg.dropout, cfg.use_rslora,
                                         cfg.use_dora, generator)
        init_lora_weights(layer, cfg.init, generator, t)
        setattr(parent, child, layer)
    # What the adapter is, recorded on the model: adapter_state_dict and save_adapter read it.
    model.lora_settings = {
        "r": cfg.r,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "bias": cfg.bias,
        "targets": targets,
        "modules_to_save": saved,
        "rank_pattern": {k: v for k, v in rank_pattern.items() if v != cfg.r},
        "alpha_pattern": {k: v for k, v in alpha_pattern.items() if v != cfg.alpha},
    }
    set_trainable(model)
    return targets


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


def _settings(model: nn.Module) -> dict:
    settings = getattr(model, "lora_settings", None)
    if settings is None:
        raise ValueError("the model has no LoRA layers; call apply_lora first")
    return settings


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters by our names: LoRA weights, trained biases, whole saved modules."""
    settings = _settings(model)
    out: dict[str, nn.Parameter] = {}
    layers = lora_layers(model)
    for name, layer in layers:
        for pname, p in layer.lora_parameters():
            out[f"{name}.{pname}"] = p
    if settings["bias"] == "lora_only":
        for name, layer in layers:
            if layer.base_layer.bias is not None:
                out[f"{name}.base_layer.bias"] = layer.base_layer.bias
    elif settings["bias"] == "all":
        # As PEFT's bias="all": every parameter named bias, LayerNorm biases included.
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                out[name] = p
    for mod_name in settings["modules_to_save"]:
        for pname, p in model.get_submodule(mod_name).named_parameters():
            out[f"{mod_name}.{pname}"] = p
    return out


def set_trainable(model: nn.Module) -> None:
    """requires_grad exactly on the adapter's parameters, off everywhere else."""
    params = _adapter_parameters(model)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Distinct parameters that train (for the optimizer)."""
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors (the tied lm_head) counted once, LoRA included. A
    classifier's untied language-model head, which its score head replaces, is not counted: PEFT counts
    transformers' *ForSequenceClassification, which has none."""
    unused_head = _classifier_lm_head(model)
    skip = set() if unused_head is None or getattr(model, "tied", False) else {id(p) for p in unused_head.parameters()}
    trainable = total = 0
    for p in model.parameters():  # parameters() yields a shared tensor once
        if id(p) in skip:
            continue
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (detached), named by our module names, e.g.
    transformer.h.0.attn.c_attn.lora_A.weight [r, in]. Only what the adapter trains: never the base weights."""
    return {k: p.detach() for k, p in _adapter_parameters(model).items()}


def portable_adapter(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter's tensors and LoRA settings as they apply to the untouched base model: what save_adapter
    writes. PiSSA / OLoRA took s B0 A0 out of the base weight, so the update of the original W is
    s (B A - B0 A0) = s [B | -B0] [A ; A0]: a rank-2r LoRA, as PEFT's `path_initial_model_for_weight_conversion`
    converts it (r and rank_pattern doubled; alpha and alpha_pattern doubled, times sqrt(2) with rsLoRA, so every
    scaling stays). Other adapters come back as adapter_state_dict and lora_settings give them."""
    state = adapter_state_dict(model)
    settings = dict(_settings(model))
    converted = False
    for name, mod in model.named_modules():
        A0, B0 = getattr(mod, "lora_A0", None), getattr(mod, "lora_B0", None)
        if A0 is None:
            continue
        A, B = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        state[f"{name}.lora_A.weight"] = torch.cat([A, A0.to(A.dtype)], dim=0)  # [2r, in]
        state[f"{name}.lora_B.weight"] = torch.cat([B, -B0.to(B.dtype)], dim=1)  # [out, 2r]
        converted = True
    if converted:
        grow = math.sqrt(2) if settings["use_rslora"] else 2.0
        settings.update(r=2 * settings["r"], alpha=grow * settings["alpha"],
                        rank_pattern={k: 2 * v for k, v in settings["rank_pattern"].items()},
                        alpha_pattern={k: grow * v for k, v in settings["alpha_pattern"].items()})
    return state, settings


def loraplus_param_groups(model: nn.Module, ratio: float, weight_decay: float) -> list[dict]:
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): B learns `ratio` times faster than A. The groups of PEFT's
    create_loraplus_optimizer (called with loraplus_weight_decay = weight_decay): A and every other matrix at lr;
    lora_B and every 1-D tensor (biases, DoRA magnitudes, norm gains) at ratio x lr, biases and LayerNorm
    parameters without weight decay. Each group's `lr_scale` is its multiple of the scheduled lr. (PEFT's group
    for LoRA on embeddings, loraplus_lr_embedding, has no counterpart: lora-cli adapts linear layers only.)"""
    norms = {n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    A, B, B_no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            no_decay = "bias" in name or name.rpartition(".")[0] in norms
            (B_no_decay if no_decay else B).append(p)
        else:
            A.append(p)
    groups = [{"params": A, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": B, "weight_decay": weight_decay, "lr_scale": ratio},
              {"params": B_no_decay, "weight_decay": 0.0, "lr_scale": ratio}]
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------------------------------- merge / unmerge


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (fp32 arithmetic); forward then costs what the base costs."""
    for name, layer in lora_layers(model):
        try:
            layer.merge()
        except AdapterError as exc:
            raise AdapterError(f"{name}: {exc}") from exc


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: the base weights come back to float rounding."""
    for name, layer in lora_layers(model):
        try:
            layer.unmerge()
        except AdapterError as exc:
            raise AdapterError(f"{name}: {exc}") from exc


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then replace every LoRA wrapper by its plain nn.Linear (with the merged weight): a standalone
    GPT-2 with the base model's architecture, ready for checkpoint.save_pretrained (`lora merge`)."""
    merge_lora(model)
    for name, layer in lora_layers(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model without its adapters (e.g. base-vs-adapter evaluation), then switch them back on."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise ValueError("unmerge the adapter before disabling it")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def with_classification_head(model: nn.Module, lora_cfg: LoraConfig, num_labels: int,
                             generator: torch.Generator | None) -> LoraConfig:
    """Add the classification head (model.HEAD) and return the LoRA settings for it. Unless LoRA targets the head
    (the reference's frozen random head with LoRA on it), the head is trained in full: it is added to
    modules_to_save."""
    add_classification_head(model, num_labels, generator)
    try:
        targeted = HEAD in resolve_targets(model, lora_cfg.targets, None)
    except ConfigError:  # a pattern matches nothing: the run stops on it with the other problems (config_problems)
        targeted = False
    if targeted or HEAD in lora_cfg.modules_to_save:
        return lora_cfg
    return dataclasses.replace(lora_cfg, modules_to_save=[*lora_cfg.modules_to_save, HEAD])


# ------------------------------------------------------------------------------------------------ adapter size

_ST_DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def estimate_adapter_bytes(model: nn.Module, dtype: torch.dtype | str = torch.float32) -> int:
    """Size of the adapter file save_adapter would write for `model` (LoRA applied; the meta device is
    fine): the tensor bytes exactly, plus the safetensors header with the LoRA settings and ~1 KiB for the
    run's own metadata (base model, template, training summary)."""
    dtype = as_dtype(dtype)
    tensors, settings = portable_adapter(model)
    header: dict = {}
    offset = 0
    for name, p in tensors.items():
        size = p.numel() * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES.get(dtype, "F32"), "shape": list(p.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "format_version": "1", "lora": json.dumps(settings)}
    header_bytes = len(json.dumps(header, separators=(",", ":")).encode()) + 1024
    return 8 + header_bytes + offset
