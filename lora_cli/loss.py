"""The loss that training and evaluation share: cross-entropy on scored positions only.

Only positions with a target (targets != -100) are projected to the vocabulary: with prompt masking most
positions carry no loss, and the [N, V] logits are the largest tensor of a GPT-2 step.

The projection and the cross-entropy run in chunks of rows (`chunked_cross_entropy`), so the [N, V] fp32 logits
never exist at once: each chunk's logits go into one reused [rows, V] fp32 buffer (13-51 MB for GPT-2, see
chunk_rows_for), from which the loss and, in training, the gradient w.r.t. the hidden states are taken right away
(the same idea as Liger Kernel's fused linear cross-entropy, Hsu et al. 2024, arXiv:2410.10989). The tied
lm_head/wte weight is frozen under LoRA, so only d loss / d hidden is needed: it is computed in the forward and
stored ([N, C], the size of the hidden states themselves), and the backward only scales it. When the head's weight
does need a gradient (e.g. lora.modules_to_save trains it) the plain path runs instead. On an [8 x 256] batch of
plain text this replaces about four 412 MB fp32 tensors (logits, log-probabilities and their gradients) by one 51
MB buffer.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_cli.data.batches import IGNORE_INDEX as IGNORE  # targets that carry no loss
from lora_cli.models import last_token_hidden


@dataclass(frozen=True)
class Savings:
    """Which savings of this module run (all, by default). Each gives the plain path's loss and gradients; tests
    compare them with PLAIN.

    unpad: right-padded batches with padding run the model on their real tokens only (model.Unpadded). On the
        benchmark's Alpaca batches (8.4% padding after length grouping) a step took 7.0% (fp32) and 6.1% (bf16)
        less CPU time; on batches without padding the scatter/gather costs nothing measurable.
    prune_last_block: ... and the last block computes its attention output, MLP and LayerNorms for the scored
        tokens only (the others are needed there as keys and values only). Same Alpaca batches (76% of real tokens
        unscored): 4.3% (fp32) and 6.0% (bf16) less CPU time per step on top of the unpadding.
    chunk_rows: rows of logits per chunk of the vocabulary projection: None picks chunk_rows_for(N); 0 is the
        plain, unchunked path.
    """

    unpad: bool = True
    prune_last_block: bool = True
    chunk_rows: int | None = None


PLAIN = Savings(unpad=False, prune_last_block=False, chunk_rows=0)


def scored_hidden(model, batch, savings: Savings = Savings()) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [N, C] at the N scored positions and their targets [N].

    Right-padded causal batches need no padding mask: a real token only attends to earlier positions, which
    are real too, so the model can take SDPA's fused causal path. Left padding does need the mask. A right-padded
    batch with padding runs on its real tokens only (CausalLM.forward with `keep`): the same values, no padding work.
    """
    scored = batch.targets != IGNORE  # [B, T]; padding has no target
    if getattr(batch, "lengths", None) is not None:  # packed (data.pack): always the examples' padding-free grid
        keep = batch.attention_mask.bool()
        prune = savings.prune_last_block and int(scored.sum()) < int(keep.sum())
        hidden = model(batch.input_ids, keep=keep, outputs=scored if prune else None, lengths=batch.lengths)
        return (hidden if prune else hidden[scored[keep]]), batch.targets[scored]
    mask = padding_mask(batch)
    if mask is None and savings.unpad:
        keep = batch.attention_mask.bool()  # [B, T]
        n_real, n_scored = int(keep.sum()), int(scored.sum())
        prune = savings.prune_last_block and n_scored < n_real
        first = batch.input_ids[:, 0]  # right padding: column 0 is real, so a common first token means a prefix
        share = getattr(model, "share_prefix", False) and keep.shape[0] > 1 and bool((first == first[0]).all())
        # padding to skip, unscored tokens to skip in the last block, or a common prefix to compute once
        if n_real < keep.numel() or prune or share:
            hidden = model(batch.input_ids, keep=keep, outputs=scored if prune else None)  # row-major order
            return (hidden if prune else hidden[scored[keep]]), batch.targets[scored]
    hidden = model(batch.input_ids, mask)  # [B, T, C]
    return hidden[scored], batch.targets[scored]


def lm_loss_sum(model, batch, label_smoothing: float = 0.0, savings: Savings = Savings()) -> torch.Tensor:
    """Summed (not averaged) cross-entropy over the batch's scored tokens, computed in fp32."""
    hidden, targets = scored_hidden(model, batch, savings)
    weight = head_weight(model)
    if weight is None or savings.chunk_rows == 0:
        logits = model.logits(hidden).float()  # [N, V]
        return F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)
    return chunked_cross_entropy(hidden, weight, targets, label_smoothing, savings.chunk_rows)


def head_weight(model) -> torch.Tensor | None:
    """The [V, C] weight when model.logits is a plain bias-free linear map (GPT-2's tied lm_head), else None
    (a LoRA-wrapped or otherwise replaced head: callers then use model.logits)."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, torch.nn.Linear) and head.bias is None:
        return head.weight
    return None


def chunk_rows_for(n: int) -> int:
    """Rows per chunk for N scored rows: a quarter of them, within [32, 256].

    The [rows, V] fp32 buffer is live at the step's memory peak, on top of every saved activation, while bigger
    chunks run the projection faster. Instruction data (~200 scored rows a batch): 64 rows (13 MB) instead of 256
    (40 MB) lowered the benchmark's peak RSS from 1070 to 1054 MB for 1.5% fewer tokens/s; 32 rows instead of 64,
    1209 -> 1202 MB above the libraries on smollm2-135m. Plain text (2048 rows): 256 rows ran 9% faster than 64 (349
    vs 320 tokens/s), at 2274 vs 2214 MB. (2 cores, gpt2 124M, fp32.)"""
    return max(32, min(256, n // 4))


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          label_smoothing: float = 0.0, chunk_rows: int | None = None) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight.T, targets[i]) in fp32, as F.cross_entropy(F.linear(hidden, weight).float(),
    targets, reduction="sum", label_smoothing=..., ignore_index=-100), chunk by chunk.

    hidden [N, C], weight [V, C], targets [N]. Under autocast the projection runs in the autocast dtype, as
    F.linear would; the softmax and the loss are fp32. Gradients: w.r.t. hidden only; if `weight` requires a
    gradient (and grad mode is on) this falls back to the plain path, which also yields d loss / d weight.
    """
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    grad = torch.is_grad_enabled()
    if grad and weight.requires_grad:
        logits = F.linear(hidden, weight).float()
        return F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)
    dtype, no_autocast = _compute_dtype(hidden)
    h = hidden.to(dtype)
    w = frozen_cast(weight, dtype)
    with no_autocast:
        if grad and h.requires_grad:
            return _ChunkedCE.apply(h, w, targets, float(label_smoothing), chunk_rows)
        with torch.no_grad():
            return _chunked_ce(h, w, targets, float(label_smoothing), chunk_rows, want_grad=False)[0]


def chunked_ce_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation: (summed cross-entropy, number of rows whose argmax is the target), chunk by chunk, no grad."""
    dtype, no_autocast = _compute_dtype(hidden)
    with torch.no_grad(), no_autocast:
        loss, _, correct = _chunked_ce(hidden.to(dtype), frozen_cast(weight, dtype), targets, 0.0, chunk_rows,
                                       want_grad=False, want_correct=True)
    return loss, correct


def frozen_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight.detach().to(dtype), kept on the weight between calls while the weight is unchanged: the frozen
    [V, C] head is cast to bf16 once per run instead of once per step (a 77 MB copy for GPT-2 under autocast)."""
    if weight.dtype == dtype:
        return weight.detach()
    key = (dtype, weight._version, weight.data_ptr(), weight.device)
    cached = getattr(weight, "_lora_cli_cast", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    cast = weight.detach().to(dtype)
    weight._lora_cli_cast = (key, cast)
    return cast


def _compute_dtype(hidden: torch.Tensor):
    """The dtype F.linear would compute in here (the autocast dtype inside autocast), and a context that turns
    autocast off so the chunks run in exactly that dtype."""
    device_type = hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type), torch.autocast(device_type, enabled=False)
    return hidden.dtype, nullcontext()


def _chunked_ce(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, eps: float, chunk_rows: int | None,
                want_grad: bool, want_correct: bool = False):
    """(loss_sum fp32 scalar, d loss_sum / d h [N, C] or None, correct count or None).

    Per chunk of rows (chunk_rows, or chunk_rows_for(N) when None): logits z = h w^T into one fp32 buffer;
    loss = lse(z) - z_t (with label smoothing eps: (1 - eps)(lse - z_t) + eps (lse - mean z)); gradient w.r.t.
    z = softmax(z) - (1 - eps) onehot(t) - eps / V, formed in place in the buffer, then d/dh = (dz) w. Rows whose
    target is IGNORE add nothing."""
    N, V = h.shape[0], w.shape[0]
    rows = max(1, min(chunk_rows_for(N) if chunk_rows is None else chunk_rows, N))
    buf = torch.empty(rows, V, dtype=torch.float32, device=h.device)
    low = None if h.dtype == torch.float32 else torch.empty(rows, V, dtype=h.dtype, device=h.device)
    wt = w.t()
    losses = torch.zeros(-(-N // rows), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if want_grad else None
    correct = torch.zeros((), dtype=torch.long, device=h.device) if want_correct else None
    for c, start in enumerate(range(0, N, rows)):
        stop = min(start + rows, N)
        n = stop - start
        z = buf[:n]
        if low is None:
            torch.mm(h[start:stop], wt, out=z)
        else:
            torch.mm(h[start:stop], wt, out=low[:n])
            z.copy_(low[:n])
        t = targets[start:stop]
        valid = t != IGNORE
        all_valid = bool(valid.all())
        t_safe = t if all_valid else t.clamp_min(0)
        z_t = z.gather(1, t_safe[:, None]).squeeze(1)  # [n], before z is overwritten
        if want_correct:
            hit = z.argmax(dim=1) == t
            correct += (hit & valid).sum()
        mean = z.mean(dim=1) if eps else None
        m = z.amax(dim=1, keepdim=True)
        z.sub_(m).exp_()  # one exp pass: e = exp(z - max)
        s = z.sum(dim=1, keepdim=True)
        lse = (m + s.log()).squeeze(1)
        loss = lse - z_t
        if eps:
            loss = (1 - eps) * loss + eps * (lse - mean)
        if not all_valid:
            loss = loss * valid
        losses[c] = loss.sum()
        if want_grad:
            z.div_(s)  # softmax
            z[torch.arange(n, device=z.device), t_safe] -= 1 - eps
            if eps:
                z.sub_(eps / V)
            if not all_valid:
                z.mul_(valid[:, None])
            if low is None:
                torch.mm(z, w, out=grad_h[start:stop])
            else:
                low[:n].copy_(z)
                torch.mm(low[:n], w, out=grad_h[start:stop])
    return losses.sum(), grad_h, correct


class _ChunkedCE(torch.autograd.Function):
    """Loss and d loss / d hidden in one chunked pass; the backward scales the stored gradient."""

    @staticmethod
    def forward(ctx, h, w, targets, eps, chunk_rows):
        loss, grad_h, _ = _chunked_ce(h, w, targets, eps, chunk_rows, want_grad=True)
        ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None, None, None


def padding_mask(batch) -> torch.Tensor | None:
    """The mask the model needs: None for right padding (causal attention never sees later padding)."""
    return None if bool(batch.attention_mask[:, 0].all()) else batch.attention_mask


def class_logits(model, batch) -> torch.Tensor:
    """[B, num_labels] fp32 logits from the last real token of each row (model.score head)."""
    hidden = model(batch.input_ids, padding_mask(batch))  # [B, T, C]
    return model.score(last_token_hidden(hidden, batch.attention_mask)).float()


def classification_loss_sum(model, batch, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy over the batch's examples (optionally class-weighted)."""
    return F.cross_entropy(class_logits(model, batch), batch.labels, weight=class_weights, reduction="sum",
                           label_smoothing=label_smoothing)
