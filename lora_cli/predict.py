"""`lora predict`: a classification adapter's label and probability for each text.

The text is encoded as training encoded it (the base model's tokenizer, no template, cut to the adapter's
data.max_length from the start), the head reads the hidden state of the last real token (model.last_token_hidden),
and the softmax of its logits gives each label's probability; the label is the most likely one, named in the
adapter's stored order (adapter metadata data.labels). Texts are batched longest first, so a batch pads little, and
returned in input order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from lora_cli.data import Example, batch_indices, collate
from lora_cli.errors import ConfigError, DataError
from lora_cli.inference import DataSettings, load_placed, open_adapter
from lora_cli.loss import class_logits
from lora_cli.prompts import numbered_lines, read_stdin, read_text_file
from lora_cli.runtime import DTYPES, autocast_for, resolve_precision


@dataclass
class Prediction:
    text: str
    label: str  # the most likely label
    probability: float  # its probability
    probabilities: dict[str, float]  # every label's, in the adapter's label order

    def to_dict(self) -> dict:
        return {"text": self.text, "label": self.label, "probability": self.probability,
                "probabilities": self.probabilities}


def read_texts(texts: Sequence[str], file: str | Path | None = None, stdin=None) -> list[tuple[str, str]]:
    """(text, where) pairs: the arguments, or --file (one text per line, blank lines skipped; '-': stdin), or
    stdin when neither is given (refused when stdin is a terminal: nothing would ever arrive)."""
    stdin = sys.stdin if stdin is None else stdin
    if texts and file is not None:
        raise ConfigError("give texts as arguments or with --file, not both")
    if texts:
        for i, text in enumerate(texts, start=1):
            if not text.strip():
                raise DataError(f"text {i} is empty; give some text to classify")
        return [(text, f"text {i}") for i, text in enumerate(texts, start=1)]
    if file is None or str(file) == "-":
        if file is None and stdin.isatty():
            raise ConfigError('give texts to classify: lora predict --adapter FILE "TEXT" ..., --file FILE '
                              "(one text per line), or pipe them on stdin")
        content, name = read_stdin(stdin), "stdin"
    else:
        content, name = read_text_file(Path(file), "text"), str(file)
    items = numbered_lines(content, name)
    if not items:
        raise DataError(f"{name} holds no texts (it is empty or blank); write one text per line")
    return items


def load_classifier(adapter, model: str | None = None, allow_mismatch: bool = False, device: str = "auto",
                    precision: str = "fp32"):
    """inference.Loaded with the classification adapter attached, on `device`, in eval mode, its weights in
    `precision` (fp32, bf16, fp16: runtime.inference_dtype). An adapter of another task is a ConfigError."""
    adapter_obj = open_adapter(adapter)
    if adapter_obj is None:
        raise ConfigError("`lora predict` needs a classification adapter: pass --adapter FILE")
    check_classifier(adapter_obj)
    loaded = load_placed(adapter_obj, model, allow_mismatch, device, precision)
    if not DataSettings.from_adapter(adapter_obj).labels:
        raise ConfigError(f"adapter {adapter_obj.path} does not record its class labels; pass an adapter written "
                          "by `lora train` with task: classification")
    return loaded


def check_classifier(adapter) -> None:
    task = adapter.metadata.get("task") or "causal_lm"
    if task != "classification":
        raise ConfigError(f"adapter {adapter.path} is a {task} adapter, not a classifier; `lora predict` needs one "
                          "trained with task: classification (use `lora generate` for text)")


@torch.inference_mode()
def predict_texts(loaded, texts: Sequence[str], batch_size: int = 8,
                  progress: Callable[[int], None] | None = None) -> list[Prediction]:
    """Label and probabilities for each text with a loaded classifier (load_classifier), in input order.
    progress(n) is called after each batch with the number of texts it held."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
    model, settings = loaded.model, loaded.settings
    labels = [str(x) for x in settings.labels]
    max_length = min(settings.max_length or model.config.n_positions, model.config.n_positions)
    examples = []
    for i, text in enumerate(texts):
        ids = loaded.tokenizer.encode(text, add_special_tokens=True)[:max_length]
        if not ids:
            raise DataError(f"text {i + 1} is empty; give some text to classify")
        examples.append(Example(ids, [False] * len(ids), label=0, row=i))
    first = next(model.parameters())
    device = first.device
    # fp32 weights keep the default autocast (bf16 on CUDA); bf16/fp16 weights compute in their own dtype
    precision = next((name for name, dt in DTYPES.items() if dt == first.dtype), "fp32")
    autocast = autocast_for(device, resolve_precision("auto", device) if precision == "fp32" else precision)
    probs: list[torch.Tensor | None] = [None] * len(examples)
    for idx in batch_indices([len(e) for e in examples], batch_size, 0, 0, shuffle=False):
        batch = collate([examples[i] for i in idx], pad_id=loaded.tokenizer.eos_id).to(device)
        with autocast():
            logits = class_logits(model, batch)
        for i, p in zip(idx, torch.softmax(logits.float(), dim=-1).cpu()):
            probs[i] = p
        if progress is not None:
            progress(len(idx))
    out = []
    for text, p in zip(texts, probs):
        best = int(p.argmax())
        out.append(Prediction(text, labels[best], float(p[best]), {name: float(v) for name, v in zip(labels, p)}))
    return out


def prediction_line(prediction: Prediction) -> str:
    """`label probability`, e.g. `spam 0.9812`."""
    return f"{prediction.label} {prediction.probability:.4f}"
