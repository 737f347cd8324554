"""Generation samples during training: the first N validation prompts decoded greedily with the adapter as it is,
at every validation (train.samples), as litgpt decodes a sample at each validation: a loss that falls can hide a
model that rambles or never stops.

A sample is decoded from exactly the prompt tokens training saw and leaves training as it was: the model's
train/eval mode and every random-number generator are restored, so a run with samples ends with the same adapter,
bit for bit, as one without.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch

from lora_cli.data import Example
from lora_cli.generate import generate
from lora_cli.tokenizer import GPT2, Tokenizer

SAMPLES_FILE = "samples.jsonl"  # in out_dir: one line per sample (step, prompt, generated, reference)


def split_example(example: Example, tokenizer: Tokenizer = GPT2) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids) of an encoded causal-LM example: the prompt is every token before the first
    target (the rendered template, bos included); the reference is the rest without its closing eos. An example
    with no prompt (data.format text, or mask_prompt false) is cut in half."""
    first = next((i for i, target in enumerate(example.loss_mask) if target), len(example.ids))
    if first <= 1:
        first = max(1, len(example.ids) // 2)
    reference = list(example.ids[first:])
    while reference and reference[-1] in tokenizer.eos_ids:
        reference.pop()
    return list(example.ids[:first]), reference


def prompt_text(ids: Sequence[int], tokenizer: Tokenizer = GPT2) -> str:
    """The prompt as text that `lora generate --no-template` encodes back to `ids` (a tokenizer that adds bos adds
    it again, so it is left out here)."""
    if tokenizer.adds_bos and list(ids[:1]) == [tokenizer.bos_id]:
        ids = ids[1:]
    return tokenizer.decode(list(ids))


def decode_samples(model, examples: Sequence[Example], max_new_tokens: int, tokenizer: Tokenizer = GPT2,
                   autocast=nullcontext) -> list[dict]:
    """{prompt, generated, reference} for each example, decoded greedily (stopping at the tokenizer's eos ids);
    prompts too long for the context lose their first tokens. The model's mode and the RNG states are restored."""
    pairs = [split_example(e, tokenizer) for e in examples]
    device = next(model.parameters()).device
    # greedy decoding draws nothing, but the RNG streams are training's: keep them untouched whatever runs here
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
        new = generate(model, [prompt for prompt, _ in pairs], max_new_tokens, eos_id=tokenizer.eos_ids,
                       truncate=True, batch_size=8)
    return [{"prompt": prompt_text(prompt, tokenizer), "generated": tokenizer.decode(out),
             "reference": tokenizer.decode(reference)} for (prompt, reference), out in zip(pairs, new)]
