"""The evaluation core that training and `lora eval` share: the LM and classification loops, their metrics, and
the one generation helper (prompt texts -> decoded outputs) used by `lora eval --generate` and `lora generate`.

Evaluation scores exactly the tokens training scores (same examples, same masks, loss.py's scored positions).
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lora_cli.data import batch_indices, collate
from lora_cli.errors import DataError
from lora_cli.generate import fit_prompt, generate
from lora_cli.loss import Savings, chunked_ce_stats, class_logits, head_weight, scored_hidden
from lora_cli.tokenizer import GPT2, Tokenizer


@torch.inference_mode()
def evaluate_lm(model, batches, autocast=nullcontext, reduce=None, savings: Savings = Savings()) -> dict:
    """Token-weighted mean cross-entropy, perplexity and next-token accuracy over `batches` (an iterable of
    data.Batch already on the model's device). reduce: sums a list of numbers over processes (data-parallel
    evaluation: each process scores its shard, the sums are combined before the means are taken). savings: as in
    loss.lm_loss_sum (chunk_rows 0: plain [N, V] logits)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, tokens, examples = 0.0, 0, 0, 0
    for batch in batches:
        with autocast():
            hidden, targets = scored_hidden(model, batch, savings)
            weight = head_weight(model)
            if weight is None or savings.chunk_rows == 0:  # a replaced head (or the plain path): [N, V] logits
                logits = model.logits(hidden).float()
                batch_loss = F.cross_entropy(logits, targets, reduction="sum")
                batch_correct = (logits.argmax(dim=-1) == targets).sum()
            else:  # chunk by chunk: the [N, V] fp32 logits never exist at once (loss.py)
                batch_loss, batch_correct = chunked_ce_stats(hidden, weight, targets, savings.chunk_rows)
        loss_sum += batch_loss.item()
        correct += batch_correct.item()
        tokens += targets.numel()
        examples += batch.input_ids.shape[0]
    model.train(was_training)
    if reduce is not None:
        loss_sum, correct, tokens, examples = reduce([loss_sum, correct, tokens, examples])
        correct, tokens, examples = int(correct), int(tokens), int(examples)
    loss = loss_sum / tokens if tokens else float("nan")
    return {
        "loss": loss,
        # exp overflows past 709: inf; a NaN loss (a weight that is NaN) stays NaN, not inf
        "perplexity": math.exp(loss) if tokens and loss < 700 else loss if math.isnan(loss) else float("inf"),
        "token_accuracy": correct / tokens if tokens else float("nan"),
        "tokens": tokens,
        "examples": examples,
    }


@torch.inference_mode()
def evaluate_classification(model, batches, labels: list[str], autocast=nullcontext, reduce=None) -> dict:
    """Loss, accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix (rows: true label,
    columns: predicted label) over `batches` of classification examples. reduce: as in evaluate_lm."""
    was_training = model.training
    model.eval()
    k = len(labels)
    confusion = torch.zeros(k, k, dtype=torch.long)
    loss_sum, examples = 0.0, 0
    for batch in batches:
        with autocast():
            logits = class_logits(model, batch)
        loss_sum += F.cross_entropy(logits, batch.labels, reduction="sum").item()
        predicted = logits.argmax(dim=-1).cpu()
        for t, p in zip(batch.labels.cpu().tolist(), predicted.tolist()):
            confusion[t, p] += 1
        examples += batch.labels.shape[0]
    model.train(was_training)
    if reduce is not None:
        summed = reduce([loss_sum, examples, *confusion.flatten().tolist()])
        loss_sum, examples = summed[0], int(summed[1])
        confusion = torch.tensor([int(v) for v in summed[2:]], dtype=torch.long).view(k, k)
    return classification_metrics(confusion, labels, loss_sum / examples if examples else float("nan"))


def classification_metrics(confusion: torch.Tensor, labels: list[str], loss: float) -> dict:
    """Metrics from a confusion matrix (rows: true label, columns: predicted). Precision, recall and F1 of a
    class with no predictions / no examples are 0 (scikit-learn's zero_division=0); macro-F1 is their plain mean
    over every label of the adapter, so a class absent from the data counts with F1 0."""
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


def eval_batches(examples, batch_size: int, device, progress: bool, desc: str, pad_id: int = GPT2.eos_id):
    """Batches of similar lengths (longest first), as training's validation builds them, with a progress bar.
    pad_id: the tokenizer's eos (an id inside every model's vocabulary; padding is never attended)."""
    order = batch_indices([len(e) for e in examples], batch_size, 0, 0, shuffle=False)
    with tqdm(total=len(order), desc=desc, unit="batch", file=sys.stderr, disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        for idx in order:
            yield collate([examples[i] for i in idx], pad_id=pad_id).to(device)
            bar.update(1)


def generate_texts(model, prompts: Sequence[str], max_new_tokens: int, *, tokenizer: Tokenizer = GPT2,
                   where: Sequence[str] | None = None, batch_size: int = 8, progress: bool = False,
                   **options) -> list[str]:
    """Decoded generations (stopped at any of the tokenizer's eos ids) for each prompt text, in order; options as
    generate.generate (truncate=True cuts prompts too long for the context from the left). where: how each
    prompt is named in messages ("prompts.txt line 3"; default "prompt N")."""
    ids = [tokenizer.encode_prompt(text) for text in prompts]  # as training encoded prompts
    for i, x in enumerate(ids):
        name = where[i] if where is not None else f"prompt {i + 1}"
        if not x:
            raise DataError(f"{name} is empty after the template; give some text to continue")
        # checked here too, so a prompt too long for the context is named by its file and line
        fit_prompt(x, max_new_tokens, model.config.n_positions, options.get("truncate", False), where=name)
    with tqdm(total=len(ids), desc="generate", unit="prompt", file=sys.stderr, disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        new = generate(model, ids, max_new_tokens, batch_size=batch_size, progress=bar.update,
                       eos_id=tokenizer.eos_ids, **options)
    return [tokenizer.decode(x) for x in new]
