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


@torch.inference_mode()
def evaluate_classification(model, batches, labels: list[str], autocast=nullcontext,
                            max_batches: int | None = None) -> dict:
    """Loss, accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix (rows: true label,
    columns: predicted label) over `batches` of classification examples."""
    from lora_cli.loss import class_logits

    was_training = model.training
    model.eval()
    k = len(labels)
    confusion = torch.zeros(k, k, dtype=torch.long)
    loss_sum, examples = 0.0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        with autocast():
            logits = class_logits(model, batch)
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").item()
        predicted = logits.argmax(dim=-1).cpu()
        for t, p in zip(batch.labels.cpu().tolist(), predicted.tolist()):
            confusion[t, p] += 1
        examples += batch.labels.shape[0]
    model.train(was_training)
    return classification_metrics(confusion, labels, loss_sum / examples if examples else float("nan"))


def classification_metrics(confusion: torch.Tensor, labels: list[str], loss: float) -> dict:
    per_class = {}
    for c, name in enumerate(labels):
        tp = confusion[c, c].item()
        predicted = confusion[:, c].sum().item()
        actual = confusion[c, :].sum().item()
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    total = confusion.sum().item()
    return {
        "loss": loss,
        "accuracy": confusion.diag().sum().item() / total if total else float("nan"),
        "macro_f1": sum(v["f1"] for v in per_class.values()) / len(labels) if labels else float("nan"),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "labels": list(labels),
        "examples": total,
    }
