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
    hidden = model(batch.input_ids, padding_mask(batch))  # [B, T, C]
    scored = batch.targets != IGNORE  # [B, T]
    return hidden[scored], batch.targets[scored]


def lm_loss_sum(model, batch, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed (not averaged) cross-entropy over the batch's scored tokens, computed in fp32."""
    hidden, targets = scored_hidden(model, batch)
    logits = model.logits(hidden).float()  # [N, V]
    return F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)


def padding_mask(batch) -> torch.Tensor | None:
    """The mask the model needs: None for right padding (causal attention never sees later padding)."""
    return None if bool(batch.attention_mask[:, 0].all()) else batch.attention_mask


def class_logits(model, batch) -> torch.Tensor:
    """[B, num_labels] fp32 logits from the last real token of each row (model.score head)."""
    from lora_cli.model import last_token_hidden

    hidden = model(batch.input_ids, padding_mask(batch))  # [B, T, C]
    return model.score(last_token_hidden(hidden, batch.attention_mask)).float()


def classification_loss_sum(model, batch, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy over the batch's examples (optionally class-weighted)."""
    return F.cross_entropy(class_logits(model, batch), batch.labels, weight=class_weights, reduction="sum",
                           label_smoothing=label_smoothing)
