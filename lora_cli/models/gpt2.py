"""GPT-2 in plain PyTorch, with the Hugging Face parameter names.

Shapes: B batch, T new tokens, S keys (past + new), C = n_embd, H = n_head, D = C / H, V = vocab_size.
Linear weights are stored [out, in] (Hugging Face's Conv1D files store [in, out]; checkpoint.py transposes once).
The forward returns hidden states; `lm_head` is applied by the caller, so training and evaluation can project
only the positions that carry a loss instead of materialising [B, T, V] logits.
No LoRA and no I/O here: lora.py wraps the nn.Linear layers in place, checkpoint.py loads weights.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint


@dataclass
class GPT2Config:
    """The architecture, with the names of Hugging Face's GPT2Config (so config.json maps one to one)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if "n_positions" not in values and "n_ctx" in d:
            values["n_positions"] = d["n_ctx"]
        return cls(**values)


# Parameter-free sizes of the published checkpoints: the one table of presets (checkpoint.py and `init: random`).
GPT2_PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": GPT2Config(n_layer=6, n_head=12, n_embd=768),
}


class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer, each [B, H, S, D]."""

    def __init__(self, n_layer: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    @property
    def length(self) -> int:
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        past = self.layers[layer]
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` of the batch (beam search)."""
        self.layers = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.layers]


# On the CPU, SDPA's bf16 flash kernel is slow on short sequences; its plain "math" backend (two bf16 matmuls and
# a softmax) is faster up to about 170 tokens. Forward + backward of one GPT-2 layer, [8 x 12 heads x T x 64],
# 1 thread of a 2-core AMD EPYC (Zen 4): T=48 13.2 (flash) vs 7.1 ms (math), 96 23.3 vs 16.5, 128 33.4 vs 29.2,
# 160 45.3 vs 38.7, 192 44.1 vs 62.8, 256 70.6 vs 87.8. A whole bf16 training step on Alpaca-style batches of
# ~55 tokens took 13% less CPU time. But for its backward the math backend keeps fp32 copies of q, k, v and the
# probabilities (77 MB more than flash's q, k, v, out on a 68-token batch of 8), so training stays on flash: the
# bf16 instruction benchmark ran 1650 (math) vs 1439 (flash) tokens/s at a peak RSS of 1103 vs 980 MB. Forward
# passes without gradients (evaluation, no KV cache) of up to this many tokens use math.
MATH_BF16_ATTENTION_MAX = 160


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.attn_pdrop = config.attn_pdrop
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused query, key, value
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None,
                grid: "Unpadded | None" = None, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """outputs (with grid): indices into x's N rows; only those rows' outputs are computed and returned."""
        qkv = self.c_attn(x)  # [B, T, 3C], or [N, 3C] on the unpadded path (x is the real tokens only)
        if grid is None:
            y = self._attend(qkv, mask, cache)  # [B, T, C]
        else:
            y = self._attend_rows(qkv, grid, outputs)  # [N, C], or [len(outputs), C]
        return self.resid_dropout(self.c_proj(y))

    def _attend_rows(self, qkv: torch.Tensor, grid: "Unpadded", outputs: torch.Tensor | None) -> torch.Tensor:
        """[N, 3C] -> [N, C] (or [len(outputs), C]): attention alone needs the [B, T] layout."""
        padded = grid.pad(qkv)  # [B, T, 3C]
        with grid.save_as_rows(qkv, padded):
            y = self._attend(padded, None, None)
        return grid.unpad(y, outputs)

    def _attend(self, qkv: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        """[B, T, 3C] -> [B, T, C]."""
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(C, dim=2)  # 3 x [B, T, C]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, H, S, D]
        short_bf16 = cache is None and T <= MATH_BF16_ATTENTION_MAX and q.dtype == torch.bfloat16 \
            and q.device.type == "cpu" and not (torch.is_grad_enabled() and q.requires_grad)
        with sdpa_kernel(SDPBackend.MATH) if short_bf16 else nullcontext():  # see MATH_BF16_ATTENTION_MAX
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=mask,
                dropout_p=self.attn_pdrop if self.training else 0.0,
                # Without a mask the plain causal case runs SDPA's fused path; one new token sees every cached key.
                is_causal=mask is None and T > 1,
            )  # [B, H, T, D]
        return y.transpose(1, 2).reshape(B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

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
                grid: "Unpadded | None" = None, outputs: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn(self.ln_1(x), mask, cache, grid, outputs)
        x = (x if outputs is None else x.index_select(0, outputs)) + a
        return x + self.mlp(self.ln_2(x))


class Unpadded:
    """The distinct real tokens of a right-padded [B, T] batch, as N rows in row-major order of the grid.

    The unpadded forward (GPT2.forward with `keep`) runs embeddings, LayerNorms, linear layers and the MLP on the
    [N, C] rows only, so padding costs no FLOPs and no activation memory there; attention alone gathers q, k, v
    back into [B, T] (padding reads some real row: causal attention never lets a real query see a later position,
    so those values reach no output, and the zero gradients of unread outputs add nothing in the backward).

    shared: the first `shared` columns hold the same tokens in every row (a prompt preamble common to the batch,
    such as an instruction template's). Causal attention makes their hidden states the same in every row, so they
    are computed once: rows 0..shared-1 are row 0's, and every row of the grid reads them. The gradient of a shared
    row sums the gradients of all the batch rows that read it, as the per-row computation would."""

    def __init__(self, keep: torch.Tensor, shared: int = 0):
        B, T = self.shape = tuple(keep.shape)
        self.shared = shared
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
        if self.shared == 0 or not (torch.is_grad_enabled() and x.requires_grad):
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


class GPT2(nn.Module):
    """GPT-2 language model. `forward` returns hidden states [B, T, C]; `logits` projects them to [.., V]."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.share_prefix = True  # compute a prefix common to a right-padded batch once (see Unpadded)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                drop=nn.Dropout(config.embd_pdrop),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        # Built on the meta device: its own [V, C] weight (154 MB for GPT-2) would only be allocated, initialised
        # and dropped again by the tie below, raising the peak RSS of every run with random weights.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False, device="meta")
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2

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

    def set_dropout(self, p: float) -> None:
        """One dropout probability for embeddings, attention and residuals (fine-tuning often uses 0)."""
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, Attention):
                module.attn_pdrop = p

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, S], 1 = real token, 0 = padding
        cache: KVCache | None = None,
        keep: torch.Tensor | None = None,  # [B, T] bool, a prefix of True per row: return only those positions
        outputs: torch.Tensor | None = None,  # [B, T] bool within keep: return only these (see _forward_unpadded)
    ) -> torch.Tensor:  # [B, T, C], or [N, C] with `keep` (the kept or output positions in row-major order)
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens exceeds the model's context of {self.config.n_positions}")
        if keep is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("keep is for right-padded batches without a cache or an attention mask")
            return self._forward_unpadded(input_ids, keep, outputs)
        pos = position_ids(attention_mask, B, T, past, input_ids.device)  # [B, T]
        mask = attention_bias(attention_mask, T, past)  # [B, 1, T, S] or None
        if mask is not None:
            mask = mask.to(input_ids.device)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(pos))  # [B, T, C]
        for block in self.transformer.h:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, cache)
        return self.transformer.ln_f(x)

    def _forward_unpadded(self, input_ids: torch.Tensor, keep: torch.Tensor,
                          outputs: torch.Tensor | None = None) -> torch.Tensor:
        """The forward on the real tokens of a right-padded batch only (see Unpadded): one row [.., C] per kept
        position, or per `outputs` position, in row-major order.

        With `outputs` ([B, T] bool, a subset of keep: the positions with a loss) the last block computes its
        attention projection, MLP and LayerNorms for those rows alone: the other tokens are needed there only as
        keys and values. With prompt masking most tokens carry no loss, so this skips most of the last block's
        c_proj and MLP work (forward and backward). With `share_prefix` set, a prefix common to every row is
        computed once (Unpadded's `shared`)."""
        keep = keep.to(input_ids.device)
        B = input_ids.shape[0]
        shared = shared_prefix_length(input_ids, keep) if self.share_prefix and B > 1 else 0
        grid = Unpadded(keep, shared)
        wanted = (keep if outputs is None else outputs.to(input_ids.device)).reshape(-1)
        requested = grid.rows[wanted.nonzero().squeeze(1)]  # [M] the row each returned position reads
        needed = requested.unique(sorted=True) if shared else requested  # rows to compute in the last block
        rows = needed if len(needed) < len(grid.index) else None
        pos = grid.index % input_ids.shape[1]  # right padding: a real token's position is its column
        x = self.transformer.drop(self.transformer.wte(input_ids.reshape(-1)[grid.index]) + self.transformer.wpe(pos))
        last = len(self.transformer.h) - 1
        for i, block in enumerate(self.transformer.h):
            out = rows if i == last else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, None, None, grid, out, use_reentrant=False)
            else:
                x = block(x, None, None, grid, out)
        x = self.transformer.ln_f(x)  # [len(needed), C]
        if shared and (len(needed) != len(requested) or not torch.equal(needed, requested)):
            x = x.index_select(0, torch.searchsorted(needed, requested))  # shared rows read by several positions
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., C] -> [..., V]."""
        return self.lm_head(hidden)

    def num_parameters(self) -> int:
        """Distinct parameters (the tied lm_head counted once)."""
        return sum(p.numel() for p in self.parameters())

    def linear_names(self) -> list[str]:
        """Full names of every linear layer LoRA can target, in model order."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.Linear)]


# ------------------------------------------------------------------------------------- classification head

HEAD = "score"  # transformers' name for GPT2ForSequenceClassification's head, so merged models load there


def add_classification_head(model: GPT2, num_labels: int, generator: torch.Generator | None = None) -> nn.Linear:
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
    stay fp32; so do the embeddings and the tied lm_head/wte (the embedding lookup is not autocast), LayerNorm,
    the base layer of a DoRA adapter (its weight norm is taken in fp32) and a task head (model.score: the adapter
    file carries it, frozen or not, and must keep its fp32 values)."""
    skip = {id(model.lm_head)} if hasattr(model, "lm_head") else set()
    for name, module in model.named_modules():
        if getattr(module, "use_dora", False) and hasattr(module, "base_layer"):
            skip.add(id(module.base_layer))
        if name == HEAD or name.startswith(HEAD + "."):
            skip.add(id(module))
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear or id(module) in skip:
            continue
        params = [p for p in module.parameters(recurse=False)]
        if any(p.requires_grad for p in params) or module.weight is getattr(model, "lm_head", module).weight:
            continue
        module.to(dtype)
        count += sum(p.numel() for p in params)
    return count
