"""Held-out metrics. Evaluation scores exactly the tokens training scores (same examples, same masks)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from lora_cli.loss import scored_hidden


@torch.inference_mode()
def evaluate_lm(model, batches, autocast=nullcontext, max_batches: int | None = None) -> dict:
    """Token-weighted mean cross-entropy, perplexity and next-token accuracy over `batches` (an iterable of
    data.Batch already on the model's device)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, tokens, examples = 0.0, 0, 0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        with autocast():
            hidden, targets = scored_hidden(model, batch)
            logits = model.logits(hidden).float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == targets).sum().item()
        tokens += targets.numel()
        examples += batch.input_ids.shape[0]
    model.train(was_training)
    loss = loss_sum / tokens if tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if tokens and loss < 700 else float("inf"),
        "token_accuracy": correct / tokens if tokens else float("nan"),
        "tokens": tokens,
        "examples": examples,
    }
