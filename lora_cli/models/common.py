"""What every model family shares: the CausalLM interface, the linear layer (with its decoding kernel), attention
(SDPA with grouped-query attention), the KV cache, rotary embeddings, RMSNorm, the padding-free and shared-prefix
paths, and the classification head.

Shapes: B batch, T new tokens, S keys (past + new), C hidden size, H query heads, Hkv key/value heads (H for
multi-head attention, fewer for grouped-query attention), D head size, V vocab_size, N real tokens of a batch.
A family (gpt2.py, llama.py, gpt_neox.py) builds its module tree with the checkpoint's own parameter names and
supplies `embed`, `blocks`, `final_norm`, `embed_tokens` (and `rope` when it uses rotary embeddings); forward,
the unpadded path, logits and the counts live here once.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import MISSING, asdict, fields
from typing import Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from lora_cli.jsonvalues import complaint


# Linear layers with few rows (decoding: one token per row) read the whole weight to do little arithmetic, so
# their speed is the memory bandwidth the kernel reaches. F.linear calls MKL, whose fp32 GEMV reached 12-13 GB/s
# on this project's 2-core AMD EPYC; oneDNN's inner product (the op torch.compile's CPU freezing pass emits)
# reached 18-19 GB/s, and 23.6 GB/s with transparent huge pages (lora_cli/__init__.py), against 25-28 GB/s for a
# plain sum. The 48 linear layers of GPT-2 124M, fp32, 2 threads, ms per pass of [rows x in] inputs, MKL vs
# oneDNN: rows 1 28 vs 19-22; 8 70-74 vs 40-42; 18 79-91 vs 51-65; 64 134-165 vs 120-136; 128 268-278 vs
# 204-224; 512 708-790 vs 764-817. Sums are taken in another order (differences ~1e-7 relative).
ONEDNN_MAX_ROWS = 128

# With a plain [out, in] weight oneDNN's kernel for a few rows is not the one it would pick for its own blocked
# layout. `pack_linears_` stores the weight in the layout oneDNN chooses for PACK_ROWS rows (what torch.compile's
# freezing pass does with the batch size it sees). The same 48 layers, ms, plain vs packed: rows 1 14.4-17.5 vs
# 14.7; 2 24.0-26.2 vs 15.1-17.3; 4 26.9-27.7 vs 17.6-19.4; 8 28.0-34.1 vs 22.6-23.0; 16 37.6-47.7 vs 30.7-35.2;
# 80 126-133 vs 105-117; 2048 (F.linear) 716 vs 643. Packing hints of 2, 8, 16 and 64 rows did no better.
PACK_ROWS = 4


def _onednn_op(name: str):
    """torch's oneDNN op `name`, or None where this torch build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return getattr(torch.ops.mkldnn, name)
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_op("_linear_pointwise")
_ONEDNN_PACK = _onednn_op("_reorder_linear_weight")


def _native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX-512 BF16 or AMX), which oneDNN's bf16 kernels run
    on. (torch.cpu's probes are private: a torch without them counts as a CPU without.)"""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


# The dtypes whose weights pack_linears_ stores in oneDNN's layout. fp32 everywhere oneDNN is. bf16 only where the
# CPU multiplies bf16 natively: there oneDNN's packed bf16 inner product reads the weights at the memory bandwidth,
# and PyTorch's own bf16 kernel does not (the 48 linear layers of GPT-2 124M and its head, one row, 2 threads, on
# an AMD EPYC with AVX-512 BF16: F.linear 8.6 + 2.7 ms, packed 3.4 + 1.6 ms). Elsewhere oneDNN's bf16 would emulate
# the products, and PyTorch's kernel stays.
PACKED_DTYPES = (torch.float32,) + ((torch.bfloat16,) if _ONEDNN_PACK is not None and _native_bf16() else ())


def _plain_cpu(weight: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """A weight oneDNN can take as it is, or pack: one of `dtypes`, on the CPU, dense, and not a tensor subclass
    (FSDP's DTensor)."""
    return (weight.dtype in dtypes and weight.device.type == "cpu" and not weight.is_mkldnn
            and type(weight) in (nn.Parameter, torch.Tensor))


class Dropout(nn.Dropout):
    """nn.Dropout that is not called at all when it would return its input (evaluation, or p = 0): a module call
    costs a few microseconds, and GPT-2 decodes through 25 dropouts a token (about 1% of a 124M model's fp32
    decoding step on 2 threads). Training with p > 0 runs nn.Dropout as it is."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x) if self.training and self.p > 0 else x


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and state dict) whose forward without gradients on the CPU, the shape of
    decoding, runs oneDNN's inner product instead of F.linear (MKL): fp32 with a plain weight for at most
    ONEDNN_MAX_ROWS rows; with a packed one (pack_linears_, pack_copies_) for any number of rows."""

    # pack_copies_' packed copy of a weight that another module reads plain (a tied head's: the input embedding)
    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (not torch.is_grad_enabled() and _ONEDNN_LINEAR is not None  # training decides at the first test
                and x.device.type == "cpu" and x.numel() > 0
                and not torch.is_autocast_enabled("cpu")):  # autocast casts F.linear's inputs; this op it would not
            packed = weight if weight.is_mkldnn else self.packed
            if packed is not None and packed.dtype == x.dtype:
                return _ONEDNN_LINEAR(x, packed, self.bias, "none", [], "")
            if (x.dtype == torch.float32 and _plain_cpu(weight, (torch.float32,))
                    and x.numel() <= ONEDNN_MAX_ROWS * self.in_features):
                return _ONEDNN_LINEAR(x, weight, self.bias, "none", [], "")
        if weight.is_mkldnn:  # packed, but this call needs the plain weight (gradients, autocast): rebuilt for it
            weight = weight.to_dense()
        return F.linear(x, weight, self.bias)


def pack_linears_(layers: Iterable[nn.Module]) -> int:
    """Give each CPU `Linear` among `layers` (other modules are passed over) whose weight has a PACKED_DTYPES dtype
    its weight in oneDNN's packed layout (see PACK_ROWS) in place of the plain one: an opaque tensor of the same
    size, so memory stays the same once the plain weight is freed. Layers that share a weight share its packed
    copy. For decoding only: a packed layer's forward without gradients runs oneDNN; anything else rebuilds the
    plain weight per call, and a packed model is not meant to be trained, merged, cast or saved. Returns how many
    weights were packed."""
    if _ONEDNN_PACK is None or _ONEDNN_LINEAR is None:
        return 0
    owners: dict[int, list[Linear]] = {}  # one entry per distinct weight (modules may share one)
    for layer in layers:
        if isinstance(layer, Linear) and _plain_cpu(layer.weight, PACKED_DTYPES):
            owners.setdefault(id(layer.weight), []).append(layer)
    for group in owners.values():
        packed = nn.Parameter(_ONEDNN_PACK(group[0].weight.detach(), PACK_ROWS), requires_grad=False)
        for layer in group:  # the plain weight goes with its last owner, before the next one is packed
            layer.weight = packed
    return len(owners)


def pack_copies_(layers: Iterable[nn.Module]) -> int:
    """pack_linears_ for `Linear`s whose weight another module also reads as it is (a tied output head: the input
    embedding looks rows up in it): the packed weight is kept beside the plain one, in `layer.packed`, at the cost
    of a second copy of the weight; layers sharing a weight (the heads of `lora serve`'s adapters over one base)
    share one copy. The copy is made once and not updated: a model packed this way is for decoding only, as with
    pack_linears_. Returns how many copies were made."""
    if _ONEDNN_PACK is None or _ONEDNN_LINEAR is None:
        return 0
    copies: dict[int, torch.Tensor] = {}
    for layer in layers:
        if isinstance(layer, Linear) and layer.packed is None and _plain_cpu(layer.weight, PACKED_DTYPES):
            key = id(layer.weight)
            if key not in copies:
                copies[key] = _ONEDNN_PACK(layer.weight.detach(), PACK_ROWS)
            layer.packed = copies[key]
    return len(copies)


class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer, each [B, Hkv, S, D].

    With `capacity` (the most tokens a row will hold: prompt + new tokens) the cache is static: each layer's
    keys and values are allocated once, [B, Hkv, capacity, D], and every step writes its new columns in place
    and attends over a view of the first S. Without it each step concatenates (a fresh [B, Hkv, S, D] copy per
    layer and step: memory traffic that grows with the sequence and is not reading weights)."""

    def __init__(self, n_layer: int, capacity: int | None = None):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        self.capacity = capacity
        self.size = 0  # static: tokens written so far (the same in every layer after a whole forward)
        self.spare: tuple[torch.Tensor, torch.Tensor] | None = None  # static: reorder's buffer (see reorder)
        # Fixed-shape steps (CausalLM.decode_step): [1] long on the device, the column the next token is written to.
        # Its owner moves it (and `size`) between steps, so a recorded CUDA graph replays against new columns.
        self.column: torch.Tensor | None = None
        # Beams of one prompt (share_prefix): each layer's prompt columns once per prompt, [G, Hkv, P, D]; `layers`
        # then holds the columns after them, [G * group, Hkv, capacity - P, D], one row per beam.
        self.prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.group = 1

    @property
    def length(self) -> int:
        if self.capacity is not None:
            return self.size
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    @property
    def prefix_length(self) -> int:
        return 0 if self.prefix is None else self.prefix[0][0].shape[2]

    def share_prefix(self, group: int) -> None:
        """Turn a static cache of G prefilled prompts into G * `group` rows (row g * group + j: beam j of prompt g)
        whose prompt columns are kept once per prompt: reorder then moves only the columns written after them,
        and attention reads a prompt's keys and values once for all its beams (attend_shared_prefix). Beam 10 over
        E2E prompts (~30 tokens, 64 new) gathered every cached column of every beam at each step: 23% of the time."""
        P = self.size
        self.prefix = [(k[:, :, :P].contiguous(), v[:, :, :P].contiguous()) for k, v in self.layers]
        self.layers = [tuple(t.new_empty((t.shape[0] * group, t.shape[1], self.capacity - P, t.shape[3]))
                             for t in kv) for kv in self.layers]
        self.group, self.spare = group, None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.layers[layer]
        if self.prefix is not None:  # beams sharing prompts: the new columns go after the prompt's
            start = self.size - self.prefix_length
            T = k.shape[2]
            past[0][:, :, start:start + T] = k
            past[1][:, :, start:start + T] = v
            if layer == len(self.layers) - 1:
                self.size += T
            return past[0][:, :, :start + T], past[1][:, :, :start + T]
        if self.capacity is not None:
            B, Hkv, T, D = k.shape
            if past is None:
                past = (k.new_empty(B, Hkv, self.capacity, D), v.new_empty(B, Hkv, self.capacity, D))
                self.layers[layer] = past
            if self.column is not None:  # every column comes back; the caller's mask hides those not written yet
                past[0].index_copy_(2, self.column, k)
                past[1].index_copy_(2, self.column, v)
                return past
            start = self.size
            past[0][:, :, start:start + T] = k
            past[1][:, :, start:start + T] = v
            if layer == len(self.layers) - 1:
                self.size += T
            return past[0][:, :, :start + T], past[1][:, :, :start + T]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` of the batch (finished rows dropped, beams reordered).

        A static cache gathers the first `size` columns of each layer into a spare buffer of the same shape and
        keeps the layer's old buffer as the spare of the next layer: one buffer more than the cache, allocated
        once. Indexing (`kv[index]`) instead allocated a fresh [N, Hkv, capacity, D] tensor per layer and step,
        whose page faults cost more than the copy: beam 10 over 8 E2E prompts on gpt2-medium (80 rows), 11.5 ms per
        layer and step, as long as that layer's linear layers took."""
        if self.capacity is None:
            self.layers = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.layers]
            return
        if self.prefix is not None:  # rows stay with their prompt: a dropped prompt's rows leave together
            groups = index.view(-1, self.group) // self.group  # [G', group]: the prompt of each new row
            if not bool((groups == groups[:, :1]).all()):
                raise ValueError("a reorder of beams sharing prompts must keep each row with its prompt")
            groups = groups[:, 0]
            if groups.numel() != self.prefix[0][0].shape[0] or bool((groups != torch.arange(
                    groups.numel(), device=groups.device)).any()):
                self.prefix = [(k[groups], v[groups]) for k, v in self.prefix]
        n, S = index.numel(), self.size - self.prefix_length
        spare = self.spare
        for i, kv in enumerate(self.layers):
            if kv is None:
                continue
            if spare is None or spare[0].shape[0] < n or spare[0].shape[1:] != kv[0].shape[1:]:
                spare = tuple(t.new_empty((n,) + t.shape[1:]) for t in kv)
            for src, dst in zip(kv, spare):
                torch.index_select(src[:, :, :S], 0, index, out=dst[:n, :, :S])
            self.layers[i], spare = tuple(t[:n] for t in spare), kv
        self.spare = spare

    def replace(self, layers: list[tuple[torch.Tensor, torch.Tensor]], capacity: int, size: int) -> None:
        """New static buffers (generate._Decoder.join builds them): the spare of the old shape goes."""
        if self.prefix is not None:
            raise ValueError("a cache of beams sharing prompts cannot take other rows")
        self.layers, self.capacity, self.size, self.spare = layers, capacity, size, None


# On the CPU, SDPA's bf16 flash kernel is slow on short sequences; its plain "math" backend (two bf16 matmuls and
# a softmax) is faster up to about 170 tokens. Forward + backward of one GPT-2 layer, [8 x 12 heads x T x 64],
# 1 thread of a 2-core AMD EPYC (Zen 4): T=48 13.2 (flash) vs 7.1 ms (math), 96 23.3 vs 16.5, 128 33.4 vs 29.2,
# 160 45.3 vs 38.7, 192 44.1 vs 62.8, 256 70.6 vs 87.8. A whole bf16 training step on Alpaca-style batches of
# ~55 tokens took 13% less CPU time. But for its backward the math backend keeps fp32 copies of q, k, v and the
# probabilities (77 MB more than flash's q, k, v, out on a 68-token batch of 8), so training stays on flash: the
# bf16 instruction benchmark ran 1650 (math) vs 1439 (flash) tokens/s at a peak RSS of 1103 vs 980 MB. Forward
# passes without gradients (evaluation, no KV cache) of up to this many tokens use math.
MATH_BF16_ATTENTION_MAX = 160


def attend(qkv: torch.Tensor, heads: tuple[int, int, int], mask: torch.Tensor | None, cache: KVCache | None,
           layer_idx: int, dropout_p: float, grid: "Unpadded | None" = None,
           outputs: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention (Vaswani et al. 2017) with grouped-query attention (Ainslie et al. 2023).

    qkv: queries | keys | values side by side, [B, T, (H + 2 Hkv) D]; or, with `grid`, the [N, ...] rows of the
    real tokens (the padding-free path: attention alone needs the [B, T] layout). heads: (H, Hkv, D).
    Returns [B, T, H D], or [N, H D] with grid ([len(outputs), H D] with outputs, indices into the N rows)."""
    if grid is None:
        return _attend(qkv, heads, mask, cache, layer_idx, dropout_p)
    padded = grid.pad(qkv)  # [B, T, (H + 2 Hkv) D]
    with grid.save_as_rows(qkv, padded):
        y = _attend(padded, heads, None, None, layer_idx, dropout_p)
    return grid.unpad(y, outputs)


def _attend(qkv: torch.Tensor, heads: tuple[int, int, int], mask: torch.Tensor | None, cache: KVCache | None,
            layer_idx: int, dropout_p: float) -> torch.Tensor:
    """[B, T, (H + 2 Hkv) D] -> [B, T, H D]."""
    H, Hkv, D = heads
    B, T = qkv.shape[0], qkv.shape[1]
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=2)
    q = q.view(B, T, H, D).transpose(1, 2)  # [B, H, T, D]
    k, v = (t.view(B, T, Hkv, D).transpose(1, 2) for t in (k, v))  # [B, Hkv, T, D]
    # A bf16 model decoding on the CPU keeps its KV cache in fp32 and attends in fp32 (its projections stay bf16).
    # SDPA's bf16 kernel takes several times as long as its fp32 one for one query over a cache (GPT-2 124M, 12
    # heads, 146 keys: 90 vs 12 us a layer), and fp32 scores do not round where bf16 ones would. The price is a
    # cache twice as large: for one row small next to the weights a step reads (GPT-2 124M: 72 KB a token, against
    # 250 MB of bf16 weights), but many rows multiply it (beam 10 over 8 E2E prompts on gpt2-medium: about 1.5 GB,
    # against 0.75 GB in bf16). Greedy, 2 threads, interleaved runs, tokens/s: 128 new tokens 113-120 (bf16 cache) vs
    # 120-123; 512: 101-105 vs 108-115. Beam 10 over 16 E2E prompts, gpt2-medium: 32.2 vs 29.1 s.
    wide = cache is not None and q.dtype == torch.bfloat16 and q.device.type == "cpu" and not torch.is_grad_enabled()
    if wide:
        q, k, v = q.float(), k.float(), v.float()
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # [B, Hkv, S, D]: the cache keeps the shared heads once
    if cache is not None and cache.prefix is not None:
        y = attend_shared_prefix(q, *cache.prefix[layer_idx], k, v, mask, cache.group)
        if wide:
            y = y.to(qkv.dtype)
        return y.transpose(1, 2).reshape(B, T, H * D)
    short_bf16 = cache is None and T <= MATH_BF16_ATTENTION_MAX and q.dtype == torch.bfloat16 \
        and q.device.type == "cpu" and not (torch.is_grad_enabled() and q.requires_grad)
    with sdpa_kernel(SDPBackend.MATH) if short_bf16 else nullcontext():  # see MATH_BF16_ATTENTION_MAX
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            dropout_p=dropout_p,
            # Without a mask the plain causal case runs SDPA's fused path; one new token sees every cached key.
            is_causal=mask is None and T > 1,
            # Each group of H / Hkv query heads reads one key/value head. SDPA does the grouping itself (torch >= 2.5;
            # the CPU flash and math kernels both take it, with or without a mask), so no [B, H, S, D] copies of
            # k and v are made by repeat_interleave (nor kept for the backward).
            enable_gqa=Hkv != H,
        )  # [B, H, T, D]
    if wide:
        y = y.to(qkv.dtype)
    return y.transpose(1, 2).reshape(B, T, H * D)


def attend_shared_prefix(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, mask: torch.Tensor | None, group: int) -> torch.Tensor:
    """Attention of beams over their prompt's keys and values, kept once per prompt, and their own later ones.

    q [G * group, H, T, D]; k_prefix, v_prefix [G, Hkv, P, D]; k, v [G * group, Hkv, S', D]; mask [G * group, 1, T,
    P + S'] (True = may attend) or None. The scores of both parts go through one softmax, as over the concatenated
    keys. Grouped-query heads are matched by reshaping q, not by copying k and v. -> [G * group, H, T, D]"""
    N, H, T, D = q.shape
    G, Hkv, P, _ = k_prefix.shape
    rep = H // Hkv
    scale = D ** -0.5
    # prefix: the beams of a prompt and the query heads of a key/value head become the rows of one matmul
    qg = q.view(G, group, Hkv, rep, T, D).permute(0, 2, 1, 3, 4, 5).reshape(G, Hkv, group * rep * T, D)
    pre = (qg @ k_prefix.transpose(-1, -2)).view(G, Hkv, group, rep, T, P)
    pre = pre.permute(0, 2, 1, 3, 4, 5).reshape(N, H, T, P)
    own = (q.view(N, Hkv, rep * T, D) @ k.transpose(-1, -2)).view(N, H, T, -1)  # [N, H, T, S']
    scores = torch.cat([pre, own], dim=-1) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    p_pre, p_own = probs.split([P, own.shape[-1]], dim=-1)
    p_pre = p_pre.reshape(G, group, Hkv, rep * T, P).permute(0, 2, 1, 3, 4).reshape(G, Hkv, group * rep * T, P)
    y = (p_pre @ v_prefix).view(G, Hkv, group, rep * T, D).permute(0, 2, 1, 3, 4).reshape(N, H, T, D)
    return y + (p_own.reshape(N, Hkv, rep * T, -1) @ v).view(N, H, T, D)


class Unpadded:
    """The distinct real tokens of a right-padded [B, T] batch, as N rows in row-major order of the grid.

    The unpadded forward (CausalLM.forward with `keep`) runs embeddings, norms, linear layers and the MLP on the
    [N, C] rows only, so padding costs no FLOPs and no activation memory there; attention alone gathers q, k, v
    back into [B, T] (padding reads some real row: causal attention never lets a real query see a later position,
    so those values reach no output, and the zero gradients of unread outputs add nothing in the backward).

    shared: the first `shared` columns hold the same tokens in every row (a prompt preamble common to the batch,
    such as an instruction template's). Causal attention makes their hidden states the same in every row, so they
    are computed once: rows 0..shared-1 are row 0's, and every row of the grid reads them. The gradient of a shared
    row sums the gradients of all the batch rows that read it, as the per-row computation would.

    compact_saves: whether `save_as_rows` hooks into autograd. Off under gradient checkpointing: the checkpoint
    keeps no block activations anyway, and its own saved-tensor hooks lose to ours, the innermost, so ours kept
    attention's tensors past the backward. On the smollm2-135m instruction benchmark (fp32) peak RSS grew step by
    step to 2037 MB, against 1077-1090 MB with the hooks off (1540-1553 MB without checkpointing)."""

    def __init__(self, keep: torch.Tensor, shared: int = 0, compact_saves: bool = True):
        B, T = self.shape = tuple(keep.shape)
        self.shared = shared
        self.compact_saves = compact_saves
        own = keep.reshape(-1).clone()  # [B * T] the positions that get a row of their own
        column = torch.arange(B * T, device=keep.device) % T
        if shared:
            own[T:] &= column[T:] >= shared
        self.index = own.nonzero().squeeze(1)  # [N] the grid position each row is computed at
        rank = own.long().cumsum(0) - 1
        # [B * T] the row each grid position reads: its own, the shared row of its column, or (padding) row 0
        self.rows = torch.where(own, rank, torch.where(column < shared, column, 0))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[N, F] -> [B, T, F]."""
        B, T = self.shape
        return x.index_select(0, self.rows).view(B, T, -1)

    def unpad(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, F] -> [N, F]; with rows (indices into the N rows), just those: [len(rows), F]."""
        B, T = self.shape
        index = self.index if rows is None else self.index[rows]
        return x.reshape(B * T, -1).index_select(0, index)

    def save_as_rows(self, x: torch.Tensor, padded: torch.Tensor):
        """A context in which autograd keeps `padded` = pad(x) (and views of it, such as the q, k, v that SDPA
        saves for its backward) as x's N rows, gathering the [B, T, F] grid again when the backward needs it.

        With a shared prefix the grid repeats the prefix in every row: on the instruction benchmark's largest
        batch (8 rows, 80 columns, 418 distinct tokens) the saved q, k, v fell from 5.9 to 3.9 MB per layer."""
        if self.shared == 0 or not self.compact_saves or not (torch.is_grad_enabled() and x.requires_grad):
            return nullcontext()
        storage = padded.untyped_storage().data_ptr()
        index, grid_shape = self.rows, padded.shape
        rebuilt: list[torch.Tensor] = []  # the grid, gathered once for all the views unpacked with it

        def pack(t: torch.Tensor):
            if t.untyped_storage().data_ptr() != storage:
                return t
            return (t.size(), t.stride(), t.storage_offset())

        def unpack(saved):
            if isinstance(saved, torch.Tensor):
                return saved
            if not rebuilt:
                rebuilt.append(x.detach().index_select(0, index).view(grid_shape))
            return rebuilt[0].as_strided(*saved)

        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def shared_prefix_length(input_ids: torch.Tensor, keep: torch.Tensor) -> int:
    """How many leading columns of a [B, T] batch are real tokens with the same id in every row."""
    same = (input_ids == input_ids[:1]).all(dim=0) & keep.all(dim=0)  # [T]
    return int(same.long().cumprod(0).sum())


def unpack_rows(input_ids: torch.Tensor, keep: torch.Tensor, outputs: torch.Tensor | None,
                lengths: "torch.Tensor | list[int]") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A packed batch as the right-padded batch of its examples: ([E, L] ids, keep, outputs), L the longest.

    Packed rows (data.batches.pack) hold whole examples back to back, then padding; `lengths` counts each
    example's tokens in row-major order. Row e of the result holds example e from column 0, so positions restart
    at each example, and causal attention within a row never reaches another example: the padding-free path
    (Unpadded) then runs it on its real tokens, attending within the examples' grid: no new attention path, and
    E x L^2 attention scores rather than rows x max_length^2 for a block-diagonal mask. The real tokens keep
    their row-major order, the packed batch's, so the forward's output rows are its real positions in order."""
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=input_ids.device)  # [E]
    keep = keep.to(input_ids.device)
    if int(lengths.sum()) != int(keep.sum()):
        raise ValueError(f"lengths add up to {int(lengths.sum())} tokens, the packed batch holds {int(keep.sum())}")
    grid = torch.arange(int(lengths.max()), device=input_ids.device) < lengths[:, None]  # [E, L]
    ids = input_ids.new_zeros(grid.shape)
    ids[grid] = input_ids[keep]  # boolean indexing is row-major on both sides
    if outputs is not None:
        wanted = torch.zeros_like(grid)
        wanted[grid] = outputs.to(input_ids.device)[keep]
        outputs = wanted
    return ids, grid, outputs


def attention_bias(attention_mask: torch.Tensor | None, T: int, past: int) -> torch.Tensor | None:
    """Boolean [B, 1, T, S] mask (True = may attend) from a [B, S] padding mask, or None when plain causal
    attention is exact (no padding), which lets SDPA take its fused causal path."""
    S = past + T
    if attention_mask is None or bool(attention_mask.all()):
        if past == 0 or T == 1:
            return None
        causal = torch.ones(T, S, dtype=torch.bool).tril(diagonal=past)
        return causal[None, None]
    device = attention_mask.device
    causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=past)  # [T, S]
    keys = attention_mask[:, None, None, :S].bool()  # [B, 1, 1, S]
    mask = causal[None, None] & keys
    # A padding query (left padding) would see no key at all and SDPA would return NaN: let it see itself.
    # Its output is never used, and real tokens never attend to padding.
    own = torch.zeros(T, S, dtype=torch.bool, device=device)
    own[torch.arange(T), torch.arange(past, S)] = True
    return mask | own[None, None]


def position_ids(attention_mask: torch.Tensor | None, B: int, T: int, past: int, device) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded row gets the positions of the unpadded row."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device).expand(B, T)
    pos = attention_mask.long().cumsum(dim=1) - 1  # [B, S]
    return pos[:, past : past + T].clamp(min=0)


# ------------------------------------------------------------------------------------------- building blocks


def _rms_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * (x / rms(x)).to(x.dtype), 1 / rms(x) [..., 1]): transformers' LlamaRMSNorm, computed in fp32, with
    the same ops in the same order (so the same bits) and one [.., C] buffer for the output."""
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
    y = (h * rstd).to(x.dtype)
    same = torch.promote_types(weight.dtype, y.dtype) == y.dtype
    return (y.mul_(weight) if same else weight * y), rstd


class _RMSNorm(torch.autograd.Function):
    """RMSNorm keeping only its input (which the residual stream holds anyway) and 1 / rms per row for the
    backward. Autograd over the plain ops takes ten [.., C] buffers for a norm's backward, this three: on the
    qwen2.5-0.5b instruction benchmark (48 norms, rows of 896 floats) fewer buffers of the hidden size to interleave
    with the ones kept for the backward, so fewer free holes in the heap. Gradients equal autograd's to rounding:
    d x = rstd (g - x^ mean(g x^)), with g = d(x^) and x^ = x rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rms_normalize(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd  # [.., C] fp32, as the forward normalised
        grad_weight = None
        if ctx.needs_input_grad[1]:  # y = weight * x^ (in x's dtype), summed over every row
            grad_weight = (grad * xhat.to(x.dtype)).flatten(0, -2).sum(0).to(weight.dtype)
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None
        g = (grad * weight).to(x.dtype).float()  # a new buffer (grad is autograd's): in place below
        dot = (g * xhat).mean(-1, keepdim=True)
        return g.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype), grad_weight, None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in fp32 as transformers' LlamaRMSNorm."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNorm.apply(x, self.weight, self.eps)
        return _rms_normalize(x, self.weight, self.eps)[0]


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up for the backward (autograd would also keep silu(gate)).

    The backward recomputes silu(gate) and runs the ops autograd runs (mul, aten.silu_backward), in the same
    order and dtype, so gradients are bit-identical to F.silu(gate) * up. One [N, I] tensor less per layer: the
    smollm2-135m instruction benchmark (30 layers, I = 1536, fp32) peaked at 1488 instead of 1523 MB. The product
    is taken in place, into silu(gate)'s buffer, and so are both gradients (two [N, I] buffers instead of four in
    the backward): fewer large temporaries to leave holes in the heap."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(grad)
        if ctx.needs_input_grad[0]:
            t = grad * up
            grad_gate = torch.ops.aten.silu_backward.grad_input(t, gate, grad_input=t)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (the SwiGLU of Shazeer 2020), with one activation less kept for the backward."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate).mul_(up)


def residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + branch, into the branch's buffer when it holds the sum's dtype (a block's output is a fresh tensor nobody
    keeps for the backward: autograd's version check would refuse it otherwise): one [.., C] buffer less."""
    if torch.promote_types(x.dtype, branch.dtype) == branch.dtype and branch.shape == x.shape:
        return branch.add_(x)
    return x + branch


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al. 2021, RoFormer) on the first `dim` features of each head, in the
    rotate-half layout of Llama and GPT-NeoX checkpoints. `scaling`: None, or the `llama3` rope_scaling of
    Llama 3.1/3.2 (Meta's frequency-dependent interpolation, as transformers' _compute_llama3_parameters)."""

    def __init__(self, dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.dim = dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        inv_freq = 1.0 / (theta ** exponents)  # [dim / 2]
        # A plain attribute, not a buffer: not in the checkpoint (older files carry it; loading drops it), and
        # kept real when the model is built on the meta device and materialised with to_empty.
        self.inv_freq = _llama3_inv_freq(inv_freq, scaling) if scaling else inv_freq

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> (cos, sin), each [..., dim], in fp32."""
        if self.inv_freq.device != pos.device:  # moved once, not copied per call (a CUDA graph cannot copy)
            self.inv_freq = self.inv_freq.to(pos.device)
        angles = pos[..., None].float() * self.inv_freq  # [..., dim / 2]
        angles = torch.cat([angles, angles], dim=-1)  # [..., dim]
        return angles.cos(), angles.sin()


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_context = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_context / low, old_context / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long wavelengths: interpolated
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """out = x [..., heads, D] rotated on its first Dr features, cos/sin [..., 1, Dr] (the rotate-half layout): the
    first half x1 c - x2 s, the second x2 c + x1 s, as `x * cos + rotate_half(x) * sin` in transformers, in the same
    roundings, with two half-width temporaries instead of autograd's five buffers; features past Dr copied."""
    rd = cos.shape[-1]
    half = rd // 2
    torch.mul(x[..., :rd], cos, out=out[..., :rd])
    out[..., :half] -= x[..., half:rd] * sin[..., :half]
    out[..., half:rd] += x[..., :half] * sin[..., half:]
    if rd < x.shape[-1]:
        out[..., rd:] = x[..., rd:]
    return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _rotate_into(torch.empty(x.shape, dtype=x.dtype, device=x.device), x, cos, sin)


def _rotary_qkv(q, k, v, cos, sin) -> torch.Tensor:
    """q [..., H, D] and k [..., Hkv, D] rotated and v [..., Hkv, D] written side by side into one
    [..., (H + 2 Hkv) D] buffer, the layout attention reads (no rotated copies of q and k to concatenate)."""
    H, D = q.shape[-2:]
    Hkv = k.shape[-2]
    lead = q.shape[:-2]
    qkv = torch.empty((*lead, (H + 2 * Hkv) * D), dtype=q.dtype, device=q.device)
    _rotate_into(qkv[..., : H * D].view(*lead, H, D), q, cos, sin)
    _rotate_into(qkv[..., H * D : (H + Hkv) * D].view(*lead, Hkv, D), k, cos, sin)
    qkv[..., (H + Hkv) * D :].view(*lead, Hkv, D).copy_(v)
    return qkv


class _RotaryQKV(torch.autograd.Function):
    """The rotation of q and k and their concatenation with v as one autograd node that keeps nothing but the
    angles: the gradients of q and k are the inverse rotation (the same cos, -sin) of their slices of the incoming
    gradient, v's is its slice."""

    @staticmethod
    def forward(ctx, q, k, v, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.shapes = (q.shape, k.shape, v.shape)
        return _rotary_qkv(q, k, v, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        q_shape, k_shape, v_shape = ctx.shapes
        nq, nk = q_shape[-2] * q_shape[-1], k_shape[-2] * k_shape[-1]
        gq, gk, gv = grad.split([nq, nk, grad.shape[-1] - nq - nk], dim=-1)
        return (_rotate(gq.reshape(q_shape), cos, -sin), _rotate(gk.reshape(k_shape), cos, -sin),
                gv.reshape(v_shape), None, None)


def _angles(rope: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.unsqueeze(-2).to(dtype) for t in rope)  # [..., 1, Dr]


class _Rotary(torch.autograd.Function):
    """The rotation as one autograd node that keeps nothing but the angles: its gradient is the inverse rotation
    of the incoming gradient (the same cos, -sin)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [..., heads, D] with (cos, sin) [..., Dr], Dr <= D: rotate the first Dr features of every head."""
    cos, sin = _angles(rope, x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotary.apply(x, cos, sin)
    return _rotate(x, cos, sin)


def rotary_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """q [..., H, D] and k [..., Hkv, D] rotated (apply_rotary) beside v [..., Hkv, D]: [..., (H + 2 Hkv) D], the
    layout attention reads, written once instead of rotated copies concatenated."""
    if not q.dtype == k.dtype == v.dtype:  # cat's type promotion
        return torch.cat([apply_rotary(q, rope).flatten(-2), apply_rotary(k, rope).flatten(-2), v.flatten(-2)], -1)
    cos, sin = _angles(rope, q.dtype)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _RotaryQKV.apply(q, k, v, cos, sin)
    return _rotary_qkv(q, k, v, cos, sin)


# ------------------------------------------------------------------------------------------- the interface


class ModelConfig(Protocol):
    """What callers read from any family's config: GPT-2's names (the other families alias them, HFNames)."""

    model_type: str
    vocab_size: int
    n_positions: int  # the context length
    n_embd: int  # the hidden size (a classification head reads it)
    n_layer: int
    n_head: int

    def to_dict(self) -> dict: ...


class HFNames:
    """The interface's names for a config with transformers' newer field names (Llama, GPT-NeoX, ...)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int

    @property
    def n_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def n_embd(self) -> int:
        return self.hidden_size

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)


# A config field's annotation (less "| None") -> its jsonvalues kind; a field's metadata["kind"] overrides it.
FIELD_KINDS = {"int": "size", "float": "number", "bool": "bool", "str": "text", "dict": "object", "list[str]": "names"}


def check_config_value(name: str, value, kind: str, example=None, nullable: bool = False) -> None:
    """ValueError '<name>: <value> is not <what>; write <how>' unless `value` (config.json's, as JSON spells it)
    is of `kind` (jsonvalues.KINDS), or null where `nullable`. example: a good value to show (the default)."""
    problem = complaint(value, kind, example, nullable)
    if problem is not None:
        raise ValueError(f"{name}: {problem[0]}; {problem[1]}")


def check_config_fields(cls, values: dict) -> dict:
    """`values` (config.json's, under the field names of the config dataclass `cls`) checked against the fields'
    annotations (check_config_value: `X | None` also takes null; int is a size above 0 unless the field's
    metadata names another kind, such as "count"); returns them. The families' from_dict call it before building the config."""
    for f in fields(cls):
        if f.name in values:
            kinds = f.type.split(" | ")
            example = None if f.default is MISSING else f.default
            kind = f.metadata.get("kind", FIELD_KINDS[kinds[0]])
            check_config_value(f.name, values[f.name], kind, example, "None" in kinds)
    return values


class CausalLM(nn.Module):
    """A decoder-only language model: `forward` returns hidden states [B, T, C]; `logits` projects them to
    [.., V], so training and evaluation can project only the positions that carry a loss.

    A family provides `config` (n_positions, n_embd, n_layer, n_head, vocab_size, to_dict/from_dict), `lm_head`,
    and the accessors below; it keeps the checkpoint's own parameter names in its module tree."""

    config: ModelConfig
    lm_head: nn.Linear
    lora_targets: tuple[str, ...]  # lora.targets when the config names none: the query and value projections

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self.share_prefix = True  # compute a prefix common to a right-padded batch once (see Unpadded)

    # ---- what a family supplies
    @property
    def embed_tokens(self) -> nn.Embedding:
        """The input token embedding (the tied lm_head shares its weight)."""
        raise NotImplementedError

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids and positions [...] -> [..., C]."""
        return self.embed_tokens(input_ids)

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) for the positions, or None for a model without rotary embeddings."""
        return None

    # ---- shared
    @property
    def tied(self) -> bool:
        """Whether the output head reads the input embedding's weight. A head with LoRA on it has no weight of its
        own (its base layer does) and is never tied: LoRA cannot target a tied head."""
        return getattr(self.lm_head, "weight", None) is self.embed_tokens.weight

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """N(0, initializer_range) for linear and embedding weights (transformers' _init_weights); biases zero,
        norm weights one."""
        std = getattr(self.config, "initializer_range", 0.02)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    module.weight.normal_(0.0, std, generator=generator)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def set_dropout(self, p: float) -> None:
        """One dropout probability for embeddings, attention and residuals (fine-tuning often uses 0)."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif hasattr(module, "attn_pdrop"):
                module.attn_pdrop = p

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, S], 1 = real token, 0 = padding
        cache: KVCache | None = None,
        keep: torch.Tensor | None = None,  # [B, T] bool, a prefix of True per row: return only those positions
        outputs: torch.Tensor | None = None,  # [B, T] bool within keep: return only these (see _forward_unpadded)
        lengths: "torch.Tensor | list[int] | None" = None,  # with keep: a packed batch's examples (see unpack_rows)
    ) -> torch.Tensor:  # [B, T, C], or [N, C] with `keep` (the kept or output positions in row-major order)
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens exceeds the model's context of {self.config.n_positions}")
        if keep is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("keep is for right-padded batches without a cache or an attention mask")
            if lengths is not None:  # a packed batch runs as the right-padded batch of its examples
                input_ids, keep, outputs = unpack_rows(input_ids, keep, outputs, lengths)
            return self._forward_unpadded(input_ids, keep, outputs)
        if lengths is not None:
            raise ValueError("lengths (a packed batch) needs keep")
        pos = position_ids(attention_mask, B, T, past, input_ids.device)  # [B, T]
        mask = attention_bias(attention_mask, T, past)  # [B, 1, T, S] or None
        if mask is not None:
            mask = mask.to(input_ids.device)
        x = self.embed(input_ids, pos)  # [B, T, C]
        rope = self.rope(pos)  # 2 x [B, T, Dr] or None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, None, None, None, rope, use_reentrant=False)
            else:
                x = block(x, mask, cache, None, None, rope)
        return self.final_norm(x)

    def decode_step(self, input_ids: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
                    cache: KVCache) -> torch.Tensor:
        """One new token per row at shapes that never change, so that a CUDA graph can record it once: input_ids and
        pos [B, 1], keys [B, 1, 1, capacity] (True = may attend: the row's real past tokens and the new one), and a
        static cache whose `column` says where the new keys and values go. Attention reads the whole capacity;
        the positions and the mask, not Python integers, say which columns count. -> [B, 1, C]"""
        x = self.embed(input_ids, pos)
        rope = self.rope(pos)
        for block in self.blocks:
            x = block(x, keys, cache, None, None, rope)
        return self.final_norm(x)

    def _forward_unpadded(self, input_ids: torch.Tensor, keep: torch.Tensor,
                          outputs: torch.Tensor | None = None) -> torch.Tensor:
        """The forward on the real tokens of a right-padded batch only (see Unpadded): one row [.., C] per kept
        position, or per `outputs` position, in row-major order.

        With `outputs` ([B, T] bool, a subset of keep: the positions with a loss) the last block computes its
        attention projection, MLP and norms for those rows alone: the other tokens are needed there only as
        keys and values. With prompt masking most tokens carry no loss, so this skips most of the last block's
        output projection and MLP work (forward and backward). With `share_prefix` set, a prefix common to every
        row is computed once (Unpadded's `shared`)."""
        keep = keep.to(input_ids.device)
        B = input_ids.shape[0]
        shared = shared_prefix_length(input_ids, keep) if self.share_prefix and B > 1 else 0
        checkpointing = self.gradient_checkpointing and self.training
        grid = Unpadded(keep, shared, compact_saves=not checkpointing)
        wanted = (keep if outputs is None else outputs.to(input_ids.device)).reshape(-1)
        requested = grid.rows[wanted.nonzero().squeeze(1)]  # [M] the row each returned position reads
        needed = requested.unique(sorted=True) if shared else requested  # rows to compute in the last block
        rows = needed if len(needed) < len(grid.index) else None
        pos = grid.index % input_ids.shape[1]  # right padding: a real token's position is its column
        x = self.embed(input_ids.reshape(-1)[grid.index], pos)  # [N, C]
        rope = self.rope(pos)  # 2 x [N, Dr] or None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            out = rows if i == last else None
            if checkpointing:
                x = checkpoint(block, x, None, None, grid, out, rope, use_reentrant=False)
            else:
                x = block(x, None, None, grid, out, rope)
        x = self.final_norm(x)  # [len(needed), C]
        if shared and (len(needed) != len(requested) or not torch.equal(needed, requested)):
            x = x.index_select(0, torch.searchsorted(needed, requested))  # shared rows read by several positions
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., C] -> [..., V]."""
        return self.lm_head(hidden)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied lm_head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def linear_names(self) -> list[str]:
        """Full names of every linear layer, in model order (a tied head too, which LoRA cannot target)."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.Linear)]


def tie_or_build_head(model: CausalLM, hidden: int, vocab: int, tied: bool, name: str = "lm_head") -> None:
    """The output projection `name` (the checkpoint's: lm_head, GPT-NeoX's embed_out): sharing the input
    embedding's weight, or a [V, C] weight of its own."""
    if not tied:
        setattr(model, name, Linear(hidden, vocab, bias=False))
        return
    # Built on the meta device: its own [V, C] weight (154 MB for GPT-2) would only be allocated, initialised
    # and dropped again by the tie below, raising the peak RSS of every run with random weights.
    head = Linear(hidden, vocab, bias=False, device="meta")
    head.weight = model.embed_tokens.weight
    setattr(model, name, head)


# ------------------------------------------------------------------------------------- classification head

HEAD = "score"  # transformers' name for the *ForSequenceClassification head, so merged models load there


def add_classification_head(model: CausalLM, num_labels: int, generator: torch.Generator | None = None) -> nn.Linear:
    """Attach `model.score`: a bias-free linear map [num_labels, n_embd] from the last real token's hidden
    state to class logits (as transformers' GPT2ForSequenceClassification, so a merged model is exact)."""
    head = nn.Linear(model.config.n_embd, num_labels, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=generator)
    model.score = head
    return head


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> [B, C]: the hidden state of each row's last real token (right or left padding)."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)  # [B]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def cast_frozen_linears_(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights and biases of every frozen nn.Linear in `dtype` (the autocast dtype of a bf16/fp16 run);
    returns the number of parameters cast.

    Under autocast, F.linear casts its fp32 weight and bias to the autocast dtype on every call: a full copy of the
    frozen model every forward (kept alive until the backward) and the memory traffic to make it. A frozen weight
    stored already rounded to that dtype gives bit-identical products. Trained parameters (LoRA, modules_to_save)
    stay fp32; so do the embeddings and the lm_head (tied to the embedding, whose lookup is not autocast, or the
    projection whose logits feed the fp32 loss), norms, the base layer of a DoRA adapter (its weight norm is taken
    in fp32) and a task head (model.score: the adapter file carries it, frozen or not, and must keep its fp32
    values)."""
    head = getattr(model, "lm_head", None)
    # the head, and with LoRA on it (an untied head) its frozen base layer
    skip = set() if head is None else {id(m) for m in head.modules()}
    for name, module in model.named_modules():
        if getattr(module, "use_dora", False) and hasattr(module, "base_layer"):
            skip.add(id(module.base_layer))
        if name == HEAD or name.startswith(HEAD + "."):
            skip.add(id(module))
    count = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        params = [p for p in module.parameters(recurse=False)]
        if any(p.requires_grad for p in params) or id(module) in skip:
            # A layer trained (or read in fp32) that was loaded in `dtype` (pretrained.build_model's keep): fp32.
            if any(p.dtype != torch.float32 for p in params):
                module.float()
            continue
        if head is not None and module.weight is getattr(head, "weight", None):  # a layer sharing the head's weight
            continue
        module.to(dtype)
        count += sum(p.numel() for p in params)
    return count
