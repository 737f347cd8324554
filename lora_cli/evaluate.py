"""Held-out metrics. Evaluation scores exactly the tokens training scores (same examples, same masks)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from lora_cli.loss import Savings, chunked_ce_stats, head_weight, scored_hidden


@torch.inference_mode()
def evaluate_lm(model, batches, autocast=nullcontext, max_batches: int | None = None, reduce=None,
                savings: Savings = Savings()) -> dict:
    """Token-weighted mean cross-entropy, perplexity and next-token accuracy over `batches` (an iterable of
    data.Batch already on the model's device). reduce: sums a list of numbers over processes (data-parallel
    evaluation: each process scores its shard, the sums are combined before the means are taken). savings: as in
    loss.lm_loss_sum (chunk_rows 0: plain [N, V] logits)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, tokens, examples = 0.0, 0, 0, 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
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
        "perplexity": math.exp(loss) if tokens and loss < 700 else float("inf"),
        "token_accuracy": correct / tokens if tokens else float("nan"),
        "tokens": tokens,
        "examples": examples,
    }


@torch.inference_mode()
def evaluate_classification(model, batches, labels: list[str], autocast=nullcontext,
                            max_batches: int | None = None, reduce=None) -> dict:
    """Loss, accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix (rows: true label,
    columns: predicted label) over `batches` of classification examples. reduce: as in evaluate_lm."""
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


CLASSIFIER_BASE_NOTE = "the adapter's head on the base model, every LoRA layer off"


def classification_file(path, data_cfg, labels, adapter=None):
    """A held-out classification file -> (examples, stats, frame, format, mapping), its labels mapped to ids in
    the adapter's order (`labels`). Labels the adapter does not know are one-line errors naming the file, the
    row and the label; a file none of whose labels the adapter knows is told apart (a wrong adapter or file)."""
    from dataclasses import replace
    from pathlib import Path

    from lora_cli.data import _cell, _row_label, detect_format, encode_records, read_table
    from lora_cli.errors import AdapterError, DataError

    if not labels:
        raise AdapterError(f"adapter {adapter} does not record its class labels; evaluate an adapter written by "
                           "`lora train` with task: classification")
    if Path(path).suffix.lower() == ".txt":
        raise DataError(f"{path}: a classifier is evaluated on a table with text and label columns (CSV, TSV, "
                        "JSON or JSONL), not plain text")
    frame = read_table(path, data_cfg, "--data")
    fmt, mapping = detect_format(frame.columns, replace(data_cfg, format="classification"), "classification", path)
    values = [_cell(v) for v in frame[mapping["label"]]]
    known = set(labels)
    # Missing or empty labels are left to encode_records, which names those rows.
    unknown = [(i, v) for i, v in enumerate(values) if isinstance(v, str) and v.strip() and v not in known]
    if unknown:
        present = sorted({v for v in values if isinstance(v, str) and v.strip()})
        shown = lambda names: ", ".join(map(repr, names[:5])) + (", ..." if len(names) > 5 else "")  # noqa: E731
        if not known & set(present):
            raise DataError(f"{path}: none of its labels ({shown(present)}) is one of adapter {adapter}'s labels "
                            f"({shown(list(labels))}); evaluate with the adapter trained on these labels")
        i, value = unknown[0]
        others = sorted({v for _, v in unknown} - {value})
        more = f"; {len(unknown) - 1} more rows have unknown labels" if len(unknown) > 1 else ""
        more += f" ({shown(others)})" if others else ""
        raise DataError(f"{path}: {_row_label(frame, i)}: label {value!r} is not one of adapter {adapter}'s labels "
                        f"({shown(list(labels))}){more}; fix or drop those rows")
    examples, stats = encode_records(frame, fmt, mapping, data_cfg, path, labels)
    if not examples:
        raise DataError(f"{path}: no usable examples ({stats.skipped} rows skipped as bad); add data")
    return examples, stats, frame, fmt, mapping


def plot_confusion(confusion, labels, path, title: str | None = None) -> None:
    """The confusion matrix as a PNG (matplotlib, no display): rows true labels, columns predicted labels, each
    cell's count written in it and shaded by its share of the true label's row. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_cli.fsutil import atomic_path

    counts = torch.as_tensor(confusion, dtype=torch.float64)
    share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    k = len(labels)
    side = min(12.0, 2.5 + 0.6 * k)
    fig, ax = plt.subplots(figsize=(side, side * 0.85), dpi=100)
    ax.imshow(share.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), labels=[str(x) for x in labels], rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), labels=[str(x) for x in labels])
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    for t in range(k):
        for p in range(k):
            ax.text(p, t, f"{int(counts[t, p]):,}", ha="center", va="center",
                    color="white" if share[t, p] > 0.5 else "black")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ `lora eval`
#
# run_eval measures a base model, or an adapter next to its base, on a held-out file (or a run's validation /
# test split), optionally with generation metrics. Everything it needs to know about the data (format, columns,
# template, masking, max_length) comes from the adapter's metadata (inference.DataSettings) or the run config.


def _eval_batches(examples, batch_size: int, device, progress: bool, desc: str):
    """Batches of similar lengths (longest first), as training's validation builds them, with a progress bar."""
    import sys

    from tqdm import tqdm

    from lora_cli.data import batch_indices, collate

    order = batch_indices([len(e) for e in examples], batch_size, 0, 0, shuffle=False)
    with tqdm(total=len(order), desc=desc, unit="batch", file=sys.stderr, disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        for idx in order:
            yield collate([examples[i] for i in idx]).to(device)
            bar.update(1)


def _delta(new: dict, old: dict) -> dict:
    return {k: new[k] - old[k] for k in ("loss", "perplexity", "token_accuracy")}


def _cell_text(value) -> str:
    from lora_cli.data import _cell

    text = _cell(value)
    return text if isinstance(text, str) else ""


def generation_items(frame, rows, fmt: str, mapping: dict, data_cfg) -> list[tuple[str, list[str]]]:
    """(prompt text, references) for each distinct prompt among these rows, in first-seen order. Rows with the
    same rendered prompt are one item with several references (E2E has ~8 references per meaning
    representation), so each prompt is generated once and scored against all of its references."""
    from lora_cli.data import RESPONSE_ROLE, render_prompt

    reference = mapping[RESPONSE_ROLE[fmt]]
    columns = [str(c) for c in frame.columns]
    groups: dict[str, list[str]] = {}
    for i in rows:
        values = {c: _cell_text(v) for c, v in zip(columns, frame.row(i))}
        for role, column in mapping.items():
            values[role] = values.get(column, "")
        groups.setdefault(render_prompt(values, fmt, data_cfg), []).append(values[reference])
    return list(groups.items())


# BLEU, NIST, ROUGE-L, CIDEr-D and METEOR with every reference of a prompt: lora_cli/metrics.py (E2E scoring).
from lora_cli.metrics import generation_metrics  # noqa: E402,F401  (imported from here by callers and tests)


def _check_reference_column(path, data_cfg, task: str) -> None:
    """--generate scores against the response column: a file without one is a one-line error, before any
    model work."""
    from dataclasses import replace
    from pathlib import Path

    from lora_cli.data import RESPONSE_ROLE, detect_format, read_table
    from lora_cli.errors import DataError
    from lora_cli.inference import response_column

    if Path(path).suffix.lower() == ".txt":
        raise DataError(f"{path}: --generate needs prompts with reference texts (a CSV, TSV, JSON or JSONL file "
                        "with prompt and completion columns, or alpaca instruction and output), not plain text")
    frame = read_table(path, data_cfg, "--data")
    columns = [str(c) for c in frame.columns]
    fmt = data_cfg.format
    if fmt == "auto":
        lower = {c.lower() for c in columns}
        if data_cfg.columns.get("instruction", "instruction").lower() in lower:
            fmt = "alpaca"
        elif data_cfg.columns.get("prompt", "prompt").lower() in lower:
            fmt = "prompt_completion"
        else:
            raise DataError(f"{path}: --generate needs a prompt column ('prompt', or 'instruction' for alpaca "
                            f"data); the file's columns are: {', '.join(columns)}; name one with --column "
                            "prompt=COLUMN")
    if fmt not in RESPONSE_ROLE:
        raise DataError(f"{path}: --generate needs prompt/completion or alpaca data with references, but the data "
                        f"format is {fmt}")
    role, column = response_column(fmt, columns, data_cfg.columns)
    if column is None:
        wanted = data_cfg.columns.get(role, role)
        raise DataError(f"{path}: --generate needs the reference column {wanted!r} (the {role} of format {fmt}) to "
                        f"score generations against; the file's columns are: {', '.join(columns)}; add it or name "
                        f"it with --column {role}=COLUMN")
    detect_format(columns, replace(data_cfg, format=fmt), task, path)


def run_eval(
    data=None,
    *,
    adapter=None,
    model: str | None = None,
    config=None,
    overrides=(),
    batch_size: int = 8,
    max_length: int | None = None,
    fmt: str | None = None,
    columns=(),
    prompt_template: str | None = None,
    compare_base: bool = True,
    allow_mismatch: bool = False,
    generate: bool = False,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    lowercase: bool = False,
    meteor: bool = False,
    predictions=None,
    device: str = "auto",
    progress: bool = False,
    log=None,
    plot=None,
) -> dict:
    """`lora eval`: metrics of a base model, or of an adapter next to its base, as one dict.

    Data: `data` (a file, encoded as the adapter was trained: format, columns, template, mask_prompt,
    max_length from its metadata unless fmt/columns/prompt_template/max_length say otherwise), or `config` (a
    run config: its out_dir's adapter, its base model, and its test split if it has one, else its validation
    split, built by data.load_splits exactly as training built them). Returns loss / perplexity /
    token_accuracy / tokens / examples of the evaluated model; with an adapter and compare_base also `base`
    (the same numbers for the bare base) and `delta` (adapter minus base); with `generate` also `generation`
    (generation_metrics of the outputs for each distinct prompt, greedy or beam search), and each prompt's
    output in `predictions` (a JSONL file) when given. lowercase: BLEU and NIST ignore case, as the E2E
    challenge's scoring does; meteor: also METEOR 1.5 (needs pycocoevalcap and Java; checked before any work).

    A classification adapter gives classification_metrics instead (loss, accuracy, per-class precision / recall
    / F1, macro-F1, confusion matrix); labels are mapped to ids in the adapter's stored order, and a label it
    does not know is an error. Its `base` is the adapter with every LoRA layer switched off but its head kept
    (a bare base model has no trained head to compare): for the reference's frozen random head under LoRA this
    is the untrained classifier, the book's "before fine-tuning" figures; for a head trained in full it shows
    what the LoRA layers add to the head. `plot`: a confusion-matrix PNG of the adapter's predictions.
    """
    import json
    from pathlib import Path

    from lora_cli.pretrained import load_model
    from lora_cli.errors import AdapterError, ConfigError, DataError
    from lora_cli.fsutil import atomic_write_text
    from lora_cli.adapter import ADAPTER_FILE
    from lora_cli.inference import DataSettings, attach_to, load_base, open_adapter
    from lora_cli.runtime import autocast_for, device_option, resolve_precision

    log = log or (lambda message: None)
    if data is None and config is None:
        raise ConfigError("name the data: --data FILE, or a run config (lora eval CONFIG.yaml)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if generate and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        raise ConfigError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if meteor and not generate:
        raise ConfigError("--meteor scores generated text: add --generate")
    if meteor:
        from lora_cli.metrics import meteor_unavailable

        why = meteor_unavailable()
        if why:
            raise ConfigError(f"--meteor: {why}; leave out --meteor to score BLEU, NIST, ROUGE-L and CIDEr only")

    # 1. The model (not yet with its adapter, so the base can be measured as it is).
    cfg = None
    if config is not None:
        from lora_cli.config import load_config

        cfg = load_config(config, list(overrides))
        if adapter is None:
            adapter = Path(cfg.out_dir) / ADAPTER_FILE
            if not adapter.is_file():
                raise AdapterError(f"no adapter at {adapter}; train the run first (`lora train {config}`) or pass "
                                   "--adapter FILE")
    elif overrides:
        raise ConfigError("--set overrides a run config's keys; pass the config (lora eval CONFIG.yaml --set ...)")
    adapter_obj = open_adapter(adapter)
    if cfg is not None and model is None:
        base = load_model(cfg.model)
    else:
        base = load_base(adapter_obj, model)
    settings = DataSettings.from_adapter(adapter_obj).override(fmt, columns, prompt_template, max_length)
    if cfg is not None:
        settings.task = cfg.task
    if settings.task == "classification" and generate:
        raise ConfigError("--generate is for causal-LM adapters; this adapter is a classifier")
    if plot is not None and settings.task != "classification":
        raise ConfigError("--plot draws a classifier's confusion matrix; this is not a classification adapter")
    n_positions = base.model.config.n_positions
    want = adapter_obj.base_model.get("fingerprint") if adapter_obj is not None else None
    if want and base.fingerprint and want != base.fingerprint and not allow_mismatch:
        # attach_adapter checks the fingerprint before it touches the model: its one-line message, now.
        from lora_cli.adapter import attach_adapter

        attach_adapter(base, adapter_obj)
    dev = device_option(device)
    base.model.to(dev).eval()
    autocast = autocast_for(dev, resolve_precision("auto", dev))

    # 2. The examples, and where their rows are (for generation).
    from dataclasses import replace

    from lora_cli.data import detect_format, load_file, load_splits, read_table

    split = None
    if cfg is not None and data is None:
        if max_length is not None:
            cfg.data.max_length = max_length
        splits = load_splits(cfg, context_length=n_positions)
        split = "test" if splits.test else "val"
        examples = splits.test or splits.val
        if not examples:
            raise DataError(f"{config}: the run holds out no validation or test data (data.val_split is 0 and "
                            "data.val / data.test are unset); pass --data FILE")
        data_cfg, fmt_used = cfg.data, splits.fmt
        if settings.task == "classification" and settings.labels and list(splits.labels or []) != list(settings.labels):
            raise AdapterError(f"adapter {adapter} was trained on the labels {', '.join(settings.labels)}, but "
                               f"{config}'s data has {', '.join(splits.labels or [])}; retrain it (lora train "
                               f"{config} --overwrite) or pass the matching --adapter")
        separate = cfg.data.test if split == "test" else cfg.data.val
        if separate:
            frame = read_table(separate, cfg.data, f"data.{split}")
            _, mapping = detect_format(frame.columns, replace(cfg.data, format=fmt_used), cfg.task, separate)
        else:
            frame, mapping = splits.frame, splits.mapping
        source = separate or cfg.data.train
        for line in splits.describe():
            log(line)
    else:
        data_cfg = cfg.data if cfg is not None else settings.data_config(n_positions)
        if cfg is not None:
            data_cfg = replace(data_cfg, max_length=min(max_length or data_cfg.max_length, n_positions))
        if generate:
            _check_reference_column(data, data_cfg, settings.task)
        if settings.task == "classification":
            examples, stats, frame, fmt_used, mapping = classification_file(data, data_cfg, settings.labels, adapter)
        else:
            examples, stats, frame, fmt_used, mapping = load_file(data, data_cfg, settings.task, "--data",
                                                                  labels=settings.labels)
        source = str(data)
        log(stats.describe())

    result: dict = {"model": base.name, "adapter": str(adapter) if adapter is not None else None, "data": source}
    if split:
        result["split"] = split

    # 3. Classification adapters: the adapter, and the same head with the LoRA layers off as its "base".
    if settings.task == "classification":
        from lora_cli.inference import Loaded
        from lora_cli.lora import lora_disabled, lora_layers

        if adapter_obj is None:
            raise ConfigError("a classification eval needs the adapter that carries the head: pass --adapter")
        attach_to(Loaded(base, adapter_obj, settings), allow_mismatch)
        base.model.to(dev)
        labels = settings.labels
        metrics = evaluate_classification(base.model, _eval_batches(examples, batch_size, dev, progress, "adapter"),
                                          labels, autocast)
        result.update(metrics)
        if compare_base and lora_layers(base.model):
            with lora_disabled(base.model):
                base_metrics = evaluate_classification(
                    base.model, _eval_batches(examples, batch_size, dev, progress, "base"), labels, autocast)
            result["base"] = {**base_metrics, "note": CLASSIFIER_BASE_NOTE}
            result["delta"] = {k: metrics[k] - base_metrics[k] for k in ("loss", "accuracy", "macro_f1")}
        if plot is not None:
            title = f"{Path(str(adapter)).name} on {Path(source).name}: accuracy {metrics['accuracy']:.4f}"
            plot_confusion(metrics["confusion_matrix"], labels, plot, title)
            result["plot"] = str(plot)
        return result

    # 4. Loss, perplexity, accuracy: the base first, then with the adapter.
    base_metrics = None
    if adapter_obj is None or compare_base:
        desc = "base" if adapter_obj is not None else "eval"
        base_metrics = evaluate_lm(base.model, _eval_batches(examples, batch_size, dev, progress, desc), autocast)
    if adapter_obj is None:
        result.update(base_metrics)
    else:
        from lora_cli.inference import Loaded

        attach_to(Loaded(base, adapter_obj, settings), allow_mismatch)
        base.model.to(dev)
        metrics = evaluate_lm(base.model, _eval_batches(examples, batch_size, dev, progress, "adapter"), autocast)
        result.update(metrics)
        if base_metrics is not None:
            result["base"] = base_metrics
            result["delta"] = _delta(metrics, base_metrics)

    # 5. Generation metrics, once per distinct prompt.
    if generate:
        from lora_cli.data import RESPONSE_ROLE

        if fmt_used not in RESPONSE_ROLE:
            raise DataError(f"{source}: --generate needs prompt/completion or alpaca data with references, but the "
                            f"data format is {fmt_used}")
        rows = sorted({ex.row for ex in examples if ex.row >= 0})
        items = generation_items(frame, rows, fmt_used, mapping, data_cfg)
        outputs, truncated = _generate_all(base.model, [p for p, _ in items], max_new_tokens, num_beams,
                                           length_penalty, no_repeat_ngram_size, batch_size, progress)
        hyps = [o.strip() for o in outputs]
        gen = generation_metrics(hyps, [refs for _, refs in items], lowercase=lowercase, meteor=meteor)
        gen.update({"max_new_tokens": max_new_tokens, "num_beams": num_beams, "length_penalty": length_penalty,
                    "no_repeat_ngram_size": no_repeat_ngram_size, "truncated_prompts": truncated})
        result["generation"] = gen
        if predictions is not None:
            lines = [json.dumps({"prompt": p, "prediction": h, "references": refs}, ensure_ascii=False)
                     for (p, refs), h in zip(items, hyps)]
            atomic_write_text(predictions, "".join(line + "\n" for line in lines))
            result["predictions"] = str(predictions)
    return result


def _generate_all(model, prompts: list[str], max_new_tokens: int, num_beams: int, length_penalty: float,
                  no_repeat_ngram_size: int, batch_size: int, progress: bool) -> tuple[list[str], int]:
    """Decoded outputs (stopped at <|endoftext|>) for each prompt text, and how many prompts lost their first
    tokens to fit the context with max_new_tokens."""
    import sys

    from tqdm import tqdm

    from lora_cli.generate import generate as decode_ids
    from lora_cli.tokenizer import decode, encode

    ids = [encode(p) for p in prompts]
    room = model.config.n_positions - max_new_tokens
    truncated = sum(len(x) > room for x in ids)
    with tqdm(total=len(ids), desc="generate", unit="prompt", file=sys.stderr, disable=not progress,
              dynamic_ncols=True, leave=False) as bar:
        new = decode_ids(model, ids, max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                         no_repeat_ngram_size=no_repeat_ngram_size, truncate=True, batch_size=batch_size,
                         progress=bar.update)
    return [decode(x) for x in new], truncated


def _aligned(table: list[list[str]]) -> list[str]:
    """Rows of cells: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip()
            for row in table]


def classification_table(result: dict) -> list[str]:
    """A classifier's report: loss / accuracy / macro-F1 (base, adapter, delta), per-class precision, recall,
    F1 and support, and the confusion matrix (rows: true label, columns: predicted)."""
    base = result.get("base")
    head = ["", "base", "adapter", "delta"] if base else ["", "adapter"]
    table = [head]
    for label, key in (("loss", "loss"), ("accuracy", "accuracy"), ("macro-F1", "macro_f1")):
        row = [label] + ([f"{base[key]:.4f}"] if base else []) + [f"{result[key]:.4f}"]
        table.append(row + ([f"{result['delta'][key]:+.4f}"] if base else []))
    table.append(["examples"] + ([f"{base['examples']:,}"] if base else []) + [f"{result['examples']:,}"]
                 + ([""] if base else []))
    lines = [""] + _aligned(table)
    per_class = [["class", "precision", "recall", "F1", "support"]]
    for name, v in result["per_class"].items():
        per_class.append([str(name), f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", f"{v['support']:,}"])
    lines += [""] + _aligned(per_class)
    labels = [str(x) for x in result["labels"]]
    matrix = [["true \\ predicted", *labels]] + [[name, *(f"{n:,}" for n in row)]
                                                 for name, row in zip(labels, result["confusion_matrix"])]
    lines += ["", "confusion matrix (rows: true label, columns: predicted label)"] + _aligned(matrix)
    if base:
        lines += ["", f"base: {base['note']}"]
    if result.get("plot"):
        lines.append(f"confusion matrix plot written to {result['plot']}")
    return lines


def eval_table(result: dict) -> list[str]:
    """`lora eval`'s human-readable report: one aligned table, base and adapter side by side with the delta."""
    lines = [f"data     {result['data']}" + (f" ({result['split']} split)" if result.get("split") else "")]
    lines.append(f"model    {result['model']}" + (f" + adapter {result['adapter']}" if result.get("adapter") else ""))
    if "accuracy" in result and "per_class" in result:  # a classifier
        return lines + classification_table(result)
    columns = [("adapter" if result.get("adapter") else "model", result)]
    if "base" in result:
        columns = [("base", result["base"]), ("adapter", result), ("delta", result["delta"])]
    rows = [("loss", "loss", "{:.4f}", "{:+.4f}"), ("perplexity", "perplexity", "{:.3f}", "{:+.3f}"),
            ("token accuracy", "token_accuracy", "{:.4f}", "{:+.4f}"), ("tokens", "tokens", "{:,}", None),
            ("examples", "examples", "{:,}", None)]
    table = [[""] + [name for name, _ in columns]]
    for label, key, fmt, dfmt in rows:
        cells = []
        for name, values in columns:
            if name == "delta":
                cells.append(dfmt.format(values[key]) if dfmt else "")
            else:
                cells.append(fmt.format(values[key]))
        table.append([label, *cells])
    gen = result.get("generation")
    if gen:
        where = 1 if "base" in result else 0  # the generations are the evaluated model's (adapter column)
        scores = [("BLEU", f"{gen['bleu']:.2f}")]
        scores += [("NIST", f"{gen['nist']:.4f}")] if "nist" in gen else []
        scores += [("METEOR", f"{gen['meteor']:.2f}")] if "meteor" in gen else []
        scores += [("ROUGE-L", f"{gen['rouge_l']:.2f}")]
        scores += [("CIDEr", f"{gen['cider']:.4f}")] if "cider" in gen else []
        for label, value in scores + [("exact match", f"{gen['exact_match']:.4f}")]:
            cells = [""] * len(columns)
            cells[where] = value
            table.append([label, *cells])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines.append("")
    for row in table:
        lines.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip())
    if gen:
        beams = f"beam search ({gen['num_beams']} beams)" if gen["num_beams"] > 1 else "greedy"
        lines.append("")
        lines.append(f"generation: {gen['prompts']:,} prompts, {gen['references']:,} references, {beams}, "
                     f"max {gen['max_new_tokens']} new tokens" +
                     ("; BLEU and NIST case-insensitive" if gen.get("lowercase") else "") +
                     (f"; {gen['truncated_prompts']} prompts cut to fit the context" if gen["truncated_prompts"] else ""))
        if result.get("predictions"):
            lines.append(f"predictions written to {result['predictions']}")
    return lines
