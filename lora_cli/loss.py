"""The loss that training and evaluation share: cross-entropy on scored positions only.

Only positions with a target (targets != -100) are projected to the vocabulary: with prompt masking most
positions carry no loss, and the [N, V] logits are the largest tensor of a GPT-2 step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def scored_hidden(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [N, C] at the N scored positions and their targets [N].

    Right-padded causal batches need no padding mask: a real token only attends to earlier positions, which
    are real too, so the model can take SDPA's fused causal path. Left padding does need the mask.
    """
    no_left_padding = bool(batch.attention_mask[:, 0].all())
    mask = None if no_left_padding else batch.attention_mask
    hidden = model(batch.input_ids, mask)  # [B, T, C]
    scored = batch.targets != IGNORE  # [B, T]
    return hidden[scored], batch.targets[scored]


def lm_loss_sum(model, batch, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed (not averaged) cross-entropy over the batch's scored tokens, computed in fp32."""
    hidden, targets = scored_hidden(model, batch)
    logits = model.logits(hidden).float()  # [N, V]
    return F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)
