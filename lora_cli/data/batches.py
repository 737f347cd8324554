"""Batching: length-grouped seeded batches of example indices, the micro-batches of a global batch, and collation
into padded tensors.

`batch_indices` + `collate`: batches hold examples of similar length and are padded only to the longest in the
batch; `pack` (data.packing) puts a batch's examples back to back in rows of max_length tokens instead. Training
draws global batches (one per optimizer step) with `batch_indices` and cuts each into the micro-batches of the
processes and accumulation steps with `split_batch`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

from lora_cli.tokenizer import EOT_ID

if TYPE_CHECKING:  # torch is imported lazily so `lora --help` stays fast
    import torch

    from lora_cli.data.encode import Example

IGNORE_INDEX = -100  # targets with this value carry no loss (torch cross_entropy's default ignore_index)


# The version of batch_indices' order, kept in checkpoints: a run resumed mid-epoch under another order would see
# some of that epoch's examples twice and others not at all. 2: each shuffled, length-grouped epoch starts with
# its largest batch.
BATCH_ORDER = 2


def batch_indices(
    lengths: Sequence[int],
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    group_by_length: bool = True,
    drop_last: bool = False,
    chunk_batches: int = 50,
) -> list[list[int]]:
    """Batches of example indices, a pure function of (lengths, batch_size, seed, epoch, flags).

    Length grouping (as in Hugging Face's LengthGroupedSampler): shuffle, sort each chunk of `chunk_batches`
    batches by length (longest first), cut it into batches, then shuffle the batch order, except that the
    largest batch (most padded tokens) leads, as LengthGroupedSampler's does. Batches hold examples of similar
    length, so padding to the longest wastes little, and the order stays random. The largest batch first: a run
    that does not fit in memory fails at its first step, not hours in, and the heap grows to that batch's size
    at once, where smaller batches' buffers reuse it (glibc keeps freed memory in holes a later, larger batch
    cannot use: 30 steps of smollm2-135m on the instruction data, fp32, peaked at 1833 and 1872 MB with the largest
    batch first, 1937 and 1984 MB with it where the shuffle put it; two seeds).
    Without shuffle, grouping sorts everything by length (for evaluation). drop_last drops a final short batch.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n = len(lengths)
    order = list(range(n))
    rng = random.Random(f"batches:{seed}:{epoch}")  # a str seed is hashed with SHA-512: stable across runs
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        size = batch_size * chunk_batches if shuffle else max(n, 1)
        order = [i for s in range(0, n, size) for i in sorted(order[s:s + size], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle and group_by_length and batches:
        rng.shuffle(batches)
        largest = max(range(len(batches)), key=lambda b: padded_tokens(lengths, batches[b]))
        batches[0], batches[largest] = batches[largest], batches[0]
    return batches


def split_batch(batch: Sequence[int], lengths: Sequence[int], parts: int) -> list[list[int]]:
    """One global batch cut into `parts` micro-batches: its examples sorted by length (longest first; ties keep
    their order), dealt as contiguous slices whose sizes differ by at most one (the first ones larger), so each
    micro-batch pads little. A function of the global batch and `parts` only; slices are empty when the batch has
    fewer than `parts` examples (the last, short one of an epoch)."""
    if parts < 1:
        raise ValueError("parts must be >= 1")
    order = sorted(batch, key=lambda i: -lengths[i])
    size, larger = divmod(len(order), parts)
    bounds = [j * size + min(j, larger) for j in range(parts + 1)]
    return [order[bounds[j]:bounds[j + 1]] for j in range(parts)]


@dataclass
class Batch:
    """A padded batch. Causal LM: targets [B, T] with IGNORE_INDEX (-100) where there is no loss. Classification:
    labels [B]. attention_mask is 1 for real tokens, 0 for padding."""

    input_ids: "torch.Tensor"  # [B, T] long
    attention_mask: "torch.Tensor"  # [B, T] long
    targets: "torch.Tensor | None" = None  # [B, T] long (causal LM)
    labels: "torch.Tensor | None" = None  # [B] long (classification)
    n_tokens: int = 0  # real (non-padding) input tokens
    n_targets: int = 0  # tokens with loss (causal LM) or examples (classification)
    lengths: tuple[int, ...] | None = None  # packed (see pack): each example's input tokens, in row-major order

    def to(self, device: Any, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
                       targets=move(self.targets), labels=move(self.labels))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)


def collate(examples: Sequence[Example], pad_id: int = EOT_ID, pad_side: str = "right") -> Batch:
    """Pad a list of examples to the longest in it.

    Causal LM: input_ids = ids[:-1], targets = ids[1:] with -100 where loss_mask[1:] is False and on padding.
    Classification (examples with labels): input_ids = ids, labels [B]; the model pools the last real token, so
    right and left padding give the same result.
    """
    import torch

    if not examples:
        raise ValueError("cannot collate an empty batch")
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side must be right or left, got {pad_side!r}")
    classify = examples[0].label is not None
    if any((ex.label is not None) != classify for ex in examples):
        raise ValueError("a batch mixes classification and causal-LM examples")
    if classify:
        inputs = [ex.ids for ex in examples]
        targets = None
    else:
        inputs, targets = map(list, zip(*map(_shifted, examples)))
    B, T = len(examples), max(len(x) for x in inputs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    target_ids = torch.full((B, T), IGNORE_INDEX, dtype=torch.long) if targets is not None else None
    for b, x in enumerate(inputs):
        span = slice(0, len(x)) if pad_side == "right" else slice(T - len(x), T)
        input_ids[b, span] = torch.tensor(x, dtype=torch.long)
        attention[b, span] = 1
        if target_ids is not None:
            target_ids[b, span] = torch.tensor(targets[b], dtype=torch.long)
    n_tokens = int(attention.sum())
    if classify:
        labels = torch.tensor([ex.label for ex in examples], dtype=torch.long)
        return Batch(input_ids, attention, labels=labels, n_tokens=n_tokens, n_targets=B)
    n_targets = int((target_ids != IGNORE_INDEX).sum())
    return Batch(input_ids, attention, targets=target_ids, n_tokens=n_tokens, n_targets=n_targets)


def _shifted(ex: Example) -> tuple[list[int], list[int]]:
    """A causal-LM example's inputs ids[:-1] and targets ids[1:], IGNORE_INDEX where loss_mask[1:] is False."""
    return ex.ids[:-1], [t if m else IGNORE_INDEX for t, m in zip(ex.ids[1:], ex.loss_mask[1:])]


def pack(examples: Sequence[Example], max_length: int, pad_id: int = EOT_ID) -> Batch:
    """Causal-LM examples packed back to back into rows of at most `max_length` input tokens, then right-padded
    to the longest row (data.packing).

    Rows are filled first-fit, longest example first (first-fit decreasing), so a micro-batch of short examples
    becomes a few full rows. Each example keeps its own inputs and targets, as collate makes them: no target
    crosses an example's boundary. `lengths` records each example's input tokens in row-major order; the model
    (CausalLM.forward with keep and lengths) restarts positions at each example and never lets attention cross
    one, so the loss and gradients equal those of collate's batch of the same examples. n_tokens and n_targets
    are collate's too. Examples with one token (no input) are left out: they carry no target."""
    import torch

    if any(ex.label is not None for ex in examples):
        raise ValueError("classification examples are not packed")
    shifted = [_shifted(ex) for ex in sorted(examples, key=lambda ex: -len(ex)) if len(ex) > 1]
    if not shifted:
        raise ValueError("cannot pack an empty batch")
    rows: list[list[int]] = []  # indices into shifted
    room: list[int] = []
    for i, (x, _) in enumerate(shifted):
        if len(x) > max_length:
            raise ValueError(f"an example of {len(x)} input tokens does not fit rows of {max_length}")
        row = next((r for r, free in enumerate(room) if free >= len(x)), None)
        if row is None:
            rows.append([])
            room.append(max_length)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= len(x)
    B, T = len(rows), max(max_length - free for free in room)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    target_ids = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(rows):
        x = [t for i in row for t in shifted[i][0]]
        y = [t for i in row for t in shifted[i][1]]
        input_ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
        target_ids[b, :len(y)] = torch.tensor(y, dtype=torch.long)
        attention[b, :len(x)] = 1
    lengths = tuple(len(shifted[i][0]) for row in rows for i in row)
    return Batch(input_ids, attention, targets=target_ids, n_tokens=int(attention.sum()),
                 n_targets=int((target_ids != IGNORE_INDEX).sum()), lengths=lengths)


def padded_tokens(lengths: Sequence[int], batch: Sequence[int]) -> int:
    """Positions of the batch padded to its longest example (its size x that length)."""
    return max(lengths[i] for i in batch) * len(batch)


def padding_waste(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Pad tokens these batches need (sum over batches of longest x size, minus real tokens)."""
    return sum(padded_tokens(lengths, b) - sum(lengths[i] for i in b) for b in batches if b)
