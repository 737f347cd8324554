"""Splits: balancing (undersampling, class weights), the seeded train/val/test split (stratified by label for
classification), and `load_splits`, the one entry the trainer calls for the data section.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from lora_cli.chat_template import resolve_template
from lora_cli.config import DataConfig
from lora_cli.data.encode import DataStats, Example, count_stats, load_file
from lora_cli.data.io import Table, source_problem
from lora_cli.errors import ConfigError, DataError
from lora_cli.fsutil import atomic_write_text
from lora_cli.tokenizer import GPT2, Tokenizer

if TYPE_CHECKING:
    from lora_cli.config import RunConfig



def undersample(examples: Sequence[Example], seed: int) -> list[Example]:
    """Keep every class's examples down to the smallest class's count, chosen at random (seeded), in the original
    order. As in Raschka, "Build a Large Language Model (From Scratch)", ch. 6 / appendix E
    (`create_balanced_dataset`: 747 spam + 747 of the 4,825 ham)."""
    by_label: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(ex.label, []).append(i)
    smallest = min(len(v) for v in by_label.values())
    rng = random.Random(f"undersample:{seed}")
    keep: list[int] = []
    for label in sorted(by_label):
        keep.extend(rng.sample(by_label[label], smallest))
    return [examples[i] for i in sorted(keep)]


def class_weights(examples: Sequence[Example], num_labels: int) -> list[float]:
    """Inverse-frequency weights n / (k * n_c) (scikit-learn's "balanced"): a weighted loss counts every class
    equally. A class absent from the examples gets weight 0."""
    counts = [0] * num_labels
    for ex in examples:
        counts[ex.label] += 1
    present = sum(1 for c in counts if c)
    n = sum(counts)
    return [n / (present * c) if c else 0.0 for c in counts]


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half up; Python's round() rounds half to even


def _class_sizes(counts: Sequence[int], frac: float) -> list[int]:
    """How many of each class's examples a split takes: round(count * frac) each, but never more in all than
    round(sum * frac). Per-class rounding alone held out 10 of 50 examples for a 10% split of 10 classes of 5
    (each 0.5 rounded up): the classes rounded up the most (ties: the first) give one back until the total fits."""
    sizes = [_round(c * frac) for c in counts]
    excess = sum(sizes) - _round(sum(counts) * frac)
    if excess > 0:
        generous = sorted(range(len(counts)), key=lambda k: (counts[k] * frac - sizes[k], k))
        for k in generous[:excess]:
            sizes[k] -= 1
    return sizes


def split_examples(
    examples: Sequence[Example],
    val_frac: float,
    test_frac: float,
    seed: int,
    stratify: Sequence[int] | None = None,
    where: str = "",
    lost: Sequence[str] = (),
) -> tuple[list[Example], list[Example], list[Example]]:
    """Seeded (train, val, test). Sizes are round(n * frac), at least 1 when frac > 0. With `stratify` (one
    label per example) each class is split on its own, so the splits keep the class proportions (sizes rounded
    per class, never more in all than round(n * frac): see _class_sizes). Each split keeps the input order.
    lost: what became of the rows that gave no example (DataStats.notes), for the message when too few are left."""
    n = len(examples)
    rng = random.Random(f"split:{seed}")
    groups: dict[Any, list[int]] = {}
    if stratify is None:
        groups[None] = list(range(n))
    else:
        if len(stratify) != n:
            raise ValueError("stratify needs one label per example")
        for i, label in enumerate(stratify):
            groups.setdefault(label, []).append(i)
    val: list[int] = []
    test: list[int] = []
    keys = sorted(groups, key=repr)  # any fixed order will do; the rng makes the choice
    test_sizes, val_sizes = (_class_sizes([len(groups[k]) for k in keys], frac) for frac in (test_frac, val_frac))
    for key, n_test, n_val in zip(keys, test_sizes, val_sizes):
        members = groups[key]
        rng.shuffle(members)
        test.extend(members[:n_test])
        val.extend(members[n_test:n_test + n_val])
    # A requested split never comes out empty: take one more example from the largest class.
    for frac, chosen in ((test_frac, test), (val_frac, val)):
        if frac > 0 and not chosen and n > 0:
            taken = set(val) | set(test)
            largest = max(groups.values(), key=lambda m: sum(i not in taken for i in m))
            free = [i for i in largest if i not in taken]
            if free:
                chosen.append(free[-1])
    held = set(val) | set(test)
    train = [i for i in range(n) if i not in held]
    if not train:
        lost_rows = f"; of its rows {', '.join(lost)}" if lost else ""
        raise DataError(f"{where}too few examples ({n}{lost_rows}) to hold out data.val_split={val_frac} and "
                        f"data.test_split={test_frac}; add data or lower the fractions")
    pick = lambda idx: [examples[i] for i in sorted(idx)]  # noqa: E731
    return pick(train), pick(val), pick(test)


# ------------------------------------------------------------------------------------------- the one entry


@dataclass
class DataSplits:
    """Everything the trainer needs from the data section."""

    train: list[Example]
    val: list[Example]
    test: list[Example]
    stats: dict[str, DataStats]  # per file read: "train", and "val"/"test" when those are separate files
    labels: list[str] | None  # classification: label strings, index = class id
    class_weights: list[float] | None  # data.balance: class_weights
    fmt: str
    mapping: dict[str, str] = field(default_factory=dict)  # role -> column of the training file
    frame: Table | None = None  # the training file's rows (Example.row indexes it)
    chat_template: str | None = None  # chat: the template's text the examples were rendered with

    def describe(self) -> list[str]:
        lines = [s.describe() for s in self.stats.values()]
        lines.append(f"splits: train {len(self.train)}, val {len(self.val)}, test {len(self.test)}")
        return lines


def check_max_length(max_length: int, context_length: int) -> None:
    if max_length > context_length:
        raise ConfigError(f"data.max_length: {max_length} is above the model's context (n_positions = "
                          f"{context_length}); set data.max_length to at most {context_length}")


def source_problems(cfg: "RunConfig") -> list[str]:
    """What is wrong with data.train, data.val and data.test before they are read (data.io.source_problem): checked
    before the model loads."""
    sources = (("data.train", cfg.data.train), ("data.val", cfg.data.val), ("data.test", cfg.data.test))
    return [p for key, source in sources if source is not None and (p := source_problem(source, key))]


def load_splits(cfg: "RunConfig", context_length: int, tokenizer: Tokenizer = GPT2) -> DataSplits:
    """Read data.train (and data.val / data.test), encode, balance and split, as the config says.

    Validation comes from data.val if set, else a seeded data.val_split fraction of train; test likewise from
    data.test or data.test_split. Seeds: train.seed. Classification splits are stratified by label;
    `balance: undersample` is applied to data.train before splitting (so val/test drawn from it are balanced,
    as in the reference), class weights are computed on the training split.
    """
    d = cfg.data
    check_max_length(d.max_length, context_length)
    if d.train is None:
        raise ConfigError("data.train: is required: a CSV, TSV, JSON, JSONL, Parquet or TXT file")
    seed = cfg.train.seed
    task = cfg.task
    examples, stats, frame, fmt, mapping = load_file(d.train, d, task, "data.train", tokenizer=tokenizer)
    check_format_settings(cfg.data, fmt)
    all_stats = {"train": stats}
    labels = stats.labels
    if fmt == "classification":
        present = [name for name, count in (stats.label_counts or {}).items() if count]
        if len(present) < 2:
            shown = f" ({present[0]!r})" if present else ""
            raise DataError(f"{d.train}: the label column {mapping['label']!r} has only one class{shown}; "
                            "classification needs at least two classes")
        if d.balance == "undersample":
            before = len(examples)
            examples = undersample(examples, seed)
            stats.undersampled = before - len(examples)
            count_stats(stats, examples)  # the counts describe what training sees
    val_frac = 0.0 if d.val else d.val_split
    test_frac = 0.0 if d.test else d.test_split
    stratify = [ex.label for ex in examples] if fmt == "classification" else None
    train, val, test = split_examples(examples, val_frac, test_frac, seed, stratify, where=f"{d.train}: ",
                                       lost=stats.notes(truncated=False))
    if fmt == "classification":  # a class the split took wholly into val/test would be a head row never trained
        trained = {ex.label for ex in train}
        lost = [(k, name) for k, name in enumerate(labels) if k not in trained and stats.label_counts.get(name)]
        if lost:
            k, name = lost[0]
            n = stats.label_counts[name]
            raise DataError(f"{d.train}: class {name!r} has {n} example{'s' if n > 1 else ''} and the validation/test "
                            "split took all of them, so training would see none; add examples of it, remove its "
                            "rows, or give the held-out data as data.val / data.test files")
    for key in ("val", "test"):
        path = getattr(d, key)
        if path:
            extra, extra_stats, _, _, _ = load_file(path, d, task, f"data.{key}", fmt=fmt, labels=labels,
                                                      tokenizer=tokenizer)
            all_stats[key] = extra_stats
            if key == "val":
                val = extra
            else:
                test = extra
    weights = class_weights(train, len(labels)) if fmt == "classification" and d.balance == "class_weights" else None
    chat_template = resolve_template(d.chat_template, tokenizer) if fmt == "chat" else None
    return DataSplits(train, val, test, all_stats, labels, weights, fmt, mapping, frame, chat_template)


def check_format_settings(d: DataConfig, fmt: str) -> None:
    """Data settings that the detected format would ignore are errors, not silent no-ops: a prompt template for
    chat or plain text, a chat template or train_on for anything but chat."""
    problems = []
    if d.prompt_template is not None and fmt in ("chat", "text"):
        renders = "its chat template renders the conversations" if fmt == "chat" else "text has no prompt"
        problems.append(f"data.prompt_template does not apply ({renders})")
    if fmt != "chat":
        problems += [f"data.{key} applies to chat data only" for key in ("chat_template", "train_on")
                     if getattr(d, key) != getattr(DataConfig, key)]
    if problems:
        raise ConfigError(f"{d.train} is {fmt} data: {'; '.join(problems)}; remove "
                          f"{' and '.join(p.split()[0] for p in problems)}")


def write_split(out_dir: str | Path, name: str, examples: Sequence[Example], frame: Table) -> Path:
    """Write the source rows of these examples atomically to out_dir/NAME.csv (with a header), or NAME.jsonl where
    a row holds nested values (chat messages), which CSV would keep only as text; e.g. the test split for
    `lora eval --data`. Returns the path written."""
    rows = [ex.row for ex in examples]
    if any(r < 0 for r in rows):
        raise DataError("cannot write a split of a .txt file (its examples are chunks, not rows)")
    if frame.nested(rows):
        path = Path(out_dir) / f"{name}.jsonl"
        atomic_write_text(path, frame.to_jsonl(rows))
    else:
        path = Path(out_dir) / f"{name}.csv"
        atomic_write_text(path, frame.to_csv(rows))
    return path
