"""`lora eval`: a base model, or an adapter next to its base, on held-out data (a file, or a run config's test or
validation split), as small steps: load the subject, build the examples, then the classifier, LM and generation
evaluations of evaluation.py (the core that training's validation shares).

Everything it needs to know about the data (format, columns, template, masking, max_length) comes from the
adapter's metadata (inference.DataSettings) or the run config; flags override it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from lora_cli.adapter import (ADAPTER_FILE, PEFT_CHAT_TEMPLATE, PEFT_CONFIG, PEFT_WEIGHTS, Adapter,
                              check_fits)
from lora_cli.config import DELIMITED_SUFFIXES, DataConfig, RunConfig, data_file_suffix, load_config
from lora_cli.data import (
    FLAG_HINTS, RESPONSE_ROLE, cell_value, row_label, detect_format, encode_records, load_file, load_splits, read_table, render_prompt,
)
from lora_cli.errors import AdapterError, ConfigError, DataError
from lora_cli.evaluation import eval_batches, evaluate_classification, evaluate_lm, generate_texts
from lora_cli.generate import check_room
from lora_cli.fsutil import atomic_path, atomic_write_text, check_output_file, output_path
from lora_cli.inference import (
    DataSettings, Loaded, attach_to, load_base, load_with_tokenizer, open_adapter,
    pack_for_decoding, packing_pays, place,
)
from lora_cli.lora import lora_disabled, lora_layers
from lora_cli.metrics import generation_metrics, meteor_unavailable
from lora_cli.pretrained import BaseModel
from lora_cli.prompts import check_search, response_column
from lora_cli.runtime import autocast_for, device_option, inference_dtype, resolve_precision
from lora_cli.tokenizer import GPT2, Tokenizer

CLASSIFIER_BASE_NOTE = "the adapter's head on the base model, every LoRA layer off"


def classification_file(path, data_cfg, labels, adapter=None, tokenizer: Tokenizer = GPT2):
    """A held-out classification file -> (examples, stats, frame, format, mapping), its labels mapped to ids in
    the adapter's order (`labels`). Labels the adapter does not know are one-line errors naming the file, the
    row and the label; a file none of whose labels the adapter knows is told apart (a wrong adapter or file)."""
    if not labels:
        raise AdapterError(f"adapter {adapter} does not record its class labels; evaluate an adapter written by "
                           "`lora train` with task: classification")
    if Path(path).suffix.lower() == ".txt":
        raise DataError(f"{path}: a classifier is evaluated on a table with text and label columns (CSV, TSV, "
                        "JSON or JSONL), not plain text")
    frame = read_table(path, data_cfg, "--data")
    fmt, mapping = detect_format(frame.columns, replace(data_cfg, format="classification"), "classification", path,
                                 FLAG_HINTS)
    values = [cell_value(v) for v in frame[mapping["label"]]]
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
        raise DataError(f"{path}: {row_label(frame, i)}: label {value!r} is not one of adapter {adapter}'s labels "
                        f"({shown(list(labels))}){more}; fix or drop those rows")
    examples, stats = encode_records(frame, fmt, mapping, data_cfg, path, labels, tokenizer, FLAG_HINTS)
    if not examples:
        raise DataError(f"{path}: no usable examples ({stats.skipped} rows skipped as bad); add data")
    return examples, stats, frame, fmt, mapping


def plot_confusion(confusion, labels, path, title: str | None = None) -> None:
    """The confusion matrix as a PNG (matplotlib, no display): rows true labels, columns predicted labels, each
    cell's count written in it and shaded by its share of the true label's row. Written atomically."""
    import matplotlib  # here: only --plot pays for matplotlib's import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _delta(new: dict, old: dict) -> dict:
    return {k: new[k] - old[k] for k in ("loss", "perplexity", "token_accuracy")}


def _cell_text(value) -> str:
    text = cell_value(value)
    return text if isinstance(text, str) else ""


def generation_items(frame, rows, fmt: str, mapping: dict, data_cfg) -> list[tuple[str, list[str]]]:
    """(prompt text, references) for each distinct prompt among these rows, in first-seen order. Rows with the
    same rendered prompt are one item with several references (E2E has ~8 references per meaning
    representation), so each prompt is generated once and scored against all of its references."""
    reference = mapping[RESPONSE_ROLE[fmt]]
    columns = [str(c) for c in frame.columns]
    groups: dict[str, list[str]] = {}
    for i in rows:
        values = {c: _cell_text(v) for c, v in zip(columns, frame.row(i))}
        for role, column in mapping.items():
            values[role] = values.get(column, "")
        groups.setdefault(render_prompt(values, fmt, data_cfg), []).append(values[reference])
    return list(groups.items())


def _check_reference_column(path, data_cfg, task: str) -> None:
    """--generate scores against the response column: a file without one is a one-line error, before any
    model work."""
    if Path(path).suffix.lower() == ".txt":
        raise DataError(f"{path}: --generate needs prompts with reference texts (a CSV, TSV, JSON, JSONL or Parquet file "
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
    detect_format(columns, replace(data_cfg, format=fmt), task, path, FLAG_HINTS)


@dataclass(frozen=True)
class EvalOptions:
    """`lora eval`'s flags (cli.eval_), with the defaults of the command line.

    Data: `data` (a file, encoded as the adapter was trained: format, columns, template, mask_prompt, max_length
    from its metadata unless fmt / columns / prompt_template / max_length say otherwise), or `config` (a run
    config: its out_dir's adapter, its base model, and its test split if it has one, else its validation split,
    built by data.load_splits exactly as training built them). compare_base: also measure the bare base (for a
    classifier: its head with every LoRA layer off). generate: also decode each distinct prompt once (greedy, or
    beam search with num_beams / length_penalty / no_repeat_ngram_size) and score generation_metrics; lowercase:
    BLEU and NIST ignore case, as the E2E challenge's scoring does; meteor: also METEOR 1.5 (needs pycocoevalcap
    and Java; checked before any work); predictions: a JSONL file of each prompt's output. plot: a classifier's
    confusion matrix as a PNG."""

    data: str | Path | None = None  # a file, a save_to_disk directory, or hf://datasets/OWNER/NAME
    split: str | None = None  # data from a hub dataset or a DatasetDict: this split instead of data.split
    subset: str | None = None  # data from a hub dataset: this configuration instead of data.subset
    adapter: Path | None = None
    model: str | None = None
    config: Path | None = None
    overrides: tuple[str, ...] = ()
    batch_size: int = 8
    max_length: int | None = None
    fmt: str | None = None
    columns: tuple[str, ...] = ()
    prompt_template: str | None = None
    chat_template: str | None = None  # chat data: this template instead of the adapter's or the model's
    header: bool | None = None  # --no-header: False; None: the run config's data.header (else True)
    column_names: tuple[str, ...] = ()  # --column-names: the --data file's column names
    compare_base: bool = True
    allow_mismatch: bool = False
    generate: bool = False
    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    lowercase: bool = False
    meteor: bool = False
    predictions: Path | None = None
    device: str = "auto"
    precision: str = "fp32"  # --precision: the dtype the weights are stored in (runtime.inference_dtype)
    progress: bool = False
    plot: Path | None = None
    overwrite: bool = False  # --overwrite: --predictions and --plot may replace existing files
    skip_bad_rows: bool = False  # --skip-bad-rows: rows with a missing or empty field are skipped and counted

    def inputs(self) -> list[tuple[str, Path]]:
        """(what, path) of the local files the evaluation reads by its flags: --predictions and --plot may not
        replace them, not even with --overwrite. An adapter directory: the files an adapter is read from."""
        found = [(what, Path(str(p)).expanduser()) for what, p in (
            ("the --data file", self.data), ("the run config", self.config), ("the --model", self.model))
            if p is not None and Path(str(p)).expanduser().is_file()]
        if self.adapter is not None:
            adapter = Path(self.adapter).expanduser()
            names = (ADAPTER_FILE, "config.yaml", PEFT_CONFIG, *PEFT_WEIGHTS, PEFT_CHAT_TEMPLATE)
            found += [("the adapter", adapter)] if adapter.is_file() else \
                [("a file of the adapter", adapter / name) for name in names if (adapter / name).is_file()]
        return found

    def check(self) -> None:
        """The flags' own errors, before any file is read."""
        if self.data is None and self.config is None:
            raise ConfigError("name the data: --data FILE, or a run config (lora eval CONFIG.yaml)")
        if self.data is None and (self.header is not None or self.column_names):
            flag = "--no-header" if self.header is not None else "--column-names"
            raise ConfigError(f"{flag} describes the file --data names; pass --data FILE (a run config's own files "
                              "are read with its data.header and data.column_names)")
        if any(not name.strip() for name in self.column_names):
            raise ConfigError(f"--column-names: expected NAME,NAME,... with no empty name, got "
                              f"{','.join(self.column_names)!r}")
        if self.header is False and not self.column_names:
            raise ConfigError("--no-header needs --column-names NAME,NAME,... (one name per column, e.g. "
                              "--column-names label,text)")
        if self.config is not None:  # the config's data keys encode its data, and --data's too
            given = [(flag, key) for flag, key, value in (
                ("--format", "format", self.fmt), ("--column", "columns", self.columns),
                ("--prompt-template", "prompt_template", self.prompt_template),
                ("--chat-template", "chat_template", self.chat_template)) if value]
            if given:
                flag, key = given[0]
                raise ConfigError(f"{flag}: a run config's data is read with its own data.{key}; change it with "
                                  f"--set data.{key}=... or leave out {flag}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"--batch-size must be a positive integer, got {self.batch_size!r}")
        n = self.max_new_tokens
        if self.generate and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"--max-new-tokens must be a positive integer, got {n!r}")
        if self.generate:
            check_search(self.num_beams, self.length_penalty)
        if not self.generate:
            asked = [flag for flag, given in (
                ("--meteor", self.meteor), ("--predictions", self.predictions is not None),
                ("--num-beams", self.num_beams != 1), ("--length-penalty", self.length_penalty != 1.0),
                ("--no-repeat-ngram-size", self.no_repeat_ngram_size != 0), ("--lowercase", self.lowercase),
                ("--max-new-tokens", self.max_new_tokens != EvalOptions.max_new_tokens)) if given]
            if asked:
                what = "scores generated text" if asked[0] in ("--meteor", "--lowercase") else "is for generation"
                raise ConfigError(f"{asked[0]} {what}: add --generate")
        asked = [flag for flag, value in (("--split", self.split), ("--subset", self.subset)) if value is not None]
        if asked and data_file_suffix(self.data) is not None:  # a data file has no splits: the flag would be ignored
            raise ConfigError(f"{asked[0]} picks from a hub dataset (hf://datasets/...) or a saved dataset folder, "
                              f"and --data {self.data} is a file; leave out {asked[0]}")
        if (self.header is not None or self.column_names) and self.data is not None \
                and Path(str(self.data)).suffix.lower() not in DELIMITED_SUFFIXES:
            flag = "--no-header" if self.header is not None else "--column-names"
            raise ConfigError(f"{flag} describes a CSV or TSV file's columns; {self.data} is not one")
        outputs = [(flag, path) for flag, path in (("--predictions", self.predictions), ("--plot", self.plot))
                   if path is not None]
        read_files: dict[Path, str] = {}
        for what, file in self.inputs() if outputs else ():
            read_files.setdefault(file.resolve(), what)
        for flag, path in outputs:  # before the evaluation, not after it
            target = output_path(path, flag, file=True)
            check_output_file(path, flag, self.overwrite)
            read = read_files.get(target.resolve())
            if read is not None:
                raise ConfigError(f"{flag} {path} is {read}, which this evaluation reads; choose another file")
            check_replaceable(path, flag, self.overwrite)
        if self.meteor:
            why = meteor_unavailable()
            if why:
                raise ConfigError(f"--meteor: {why}; leave out --meteor to score BLEU, NIST, ROUGE-L and CIDEr only")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PREDICTION_KEYS = ("prompt", "prediction", "references")  # one line of --predictions (generation_eval writes it)


def _earlier_output(flag: str, path: Path) -> bool:
    """Whether an existing file is one that `flag` writes: a PNG for --plot; for --predictions an empty file or
    one whose first line is a prediction. An unreadable file is not."""
    try:
        with open(path, "rb") as fh:
            if flag == "--plot":
                return fh.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
            first = fh.readline().strip()
            if not first:  # empty, or notes that begin with a blank line
                return fh.tell() == 0
    except OSError:
        return False
    try:
        line = json.loads(first)
    except ValueError:
        return False
    return isinstance(line, dict) and set(line) == set(PREDICTION_KEYS)


def check_output(path: Path, flag: str, overwrite: bool) -> None:
    """check_output_file and check_replaceable, again just before the file is written (another command may have
    written it meanwhile)."""
    check_output_file(path, flag, overwrite)
    check_replaceable(path, flag, overwrite)


def check_replaceable(path: Path, flag: str, overwrite: bool) -> None:
    """--overwrite replaces only an earlier output of the same flag (as export's replaces only a GGUF file):
    never a checkpoint, a data file or anything else a user keeps there."""
    target = Path(path)
    if overwrite and target.is_file() and not _earlier_output(flag, target):
        what = "PNG image" if flag == "--plot" else "predictions file (a JSONL of " + ", ".join(PREDICTION_KEYS) + ")"
        raise ConfigError(f"{flag} {target} exists and is not a {what}; --overwrite replaces only that; "
                          "choose another file")


@dataclass
class Subject:
    """What is evaluated: the base model (the adapter not yet attached, so the base can be measured as it is),
    the adapter, how its data was encoded, the run config (lora eval CONFIG.yaml), the device and autocast."""

    base: BaseModel
    adapter: Adapter | None
    adapter_path: Path | None
    settings: DataSettings
    cfg: RunConfig | None
    device: torch.device
    autocast: Callable
    tokenizer: Tokenizer  # the base model's


@dataclass
class HeldOut:
    """The encoded examples and the table they came from (generation reads its prompts and references there)."""

    examples: list
    frame: object  # data.Table
    fmt: str
    mapping: dict
    data_cfg: DataConfig
    source: str
    split: str | None = None  # "test" / "val" for a run config's split


def run_eval(options: EvalOptions, log=None) -> dict:
    """`lora eval`: metrics of a base model, or of an adapter next to its base, as one dict.

    Returns loss / perplexity / token_accuracy / tokens / examples of the evaluated model; with an adapter and
    compare_base also `base` (the same numbers for the bare base) and `delta` (adapter minus base); with
    `generate` also `generation` (generation_metrics of the outputs for each distinct prompt) and `predictions`
    (the JSONL file) when asked.

    A classification adapter gives classification_metrics instead (loss, accuracy, per-class precision / recall
    / F1, macro-F1, confusion matrix); labels are mapped to ids in the adapter's stored order, and a label it
    does not know is an error. Its `base` is the adapter with every LoRA layer switched off but its head kept
    (a bare base model has no trained head to compare): for the reference's frozen random head under LoRA this
    is the untrained classifier, the book's "before fine-tuning" figures; for a head trained in full it shows
    what the LoRA layers add to the head.
    """
    log = log or (lambda message: None)
    options.check()
    subject = load_subject(options)
    if options.generate:  # before the data is read and described
        check_room(options.max_new_tokens, subject.base.model.config.n_positions, "--max-new-tokens")
    held = held_out_examples(options, subject, log)
    result: dict = {"model": subject.base.name,
                    "adapter": str(subject.adapter_path) if subject.adapter_path is not None else None,
                    "data": held.source}
    if held.split:
        result["split"] = held.split
    if subject.settings.task == "classification":
        result.update(classifier_eval(options, subject, held))
        return result
    result.update(lm_eval(options, subject, held))
    if options.generate:
        result.update(generation_eval(options, subject, held))
    return result


def load_subject(options: EvalOptions) -> Subject:
    """1. The run config (if any), the adapter, its base model (bare) and its data settings, on the device."""
    cfg, adapter = None, options.adapter
    device = device_option(options.device)
    inference_dtype(options.precision, device)  # a bad --precision fails before anything loads
    if options.config is not None:
        cfg = load_config(options.config, list(options.overrides))
        if adapter is None:
            adapter = Path(cfg.out_dir) / ADAPTER_FILE
            if not adapter.is_file():
                raise AdapterError(f"no adapter at {adapter}; train the run first (`lora train {options.config}`) or "
                                   "pass --adapter FILE")
    elif options.overrides:
        raise ConfigError("--set overrides a run config's keys; pass the config (lora eval CONFIG.yaml --set ...)")
    adapter_obj = open_adapter(adapter)
    if cfg is not None and options.model is None:
        base, tokenizer = load_with_tokenizer(cfg.model)
    else:
        base, tokenizer = load_base(adapter_obj, options.model)
    settings = DataSettings.from_adapter(adapter_obj).override(options.fmt, options.columns, options.prompt_template,
                                                               options.max_length, options.chat_template)
    if cfg is not None:
        settings = replace(settings, task=cfg.task)
    if settings.task == "classification" and options.generate:
        raise ConfigError("--generate is for causal-LM adapters; this adapter is a classifier")
    if settings.task != "classification" and options.fmt == "classification":
        raise ConfigError("--format classification is a classifier's data (text and label columns); this adapter "
                          "is a causal LM: name its data's format (alpaca, prompt_completion, chat, text) or leave "
                          "out --format")
    if settings.task == "classification" and options.fmt not in (None, "auto"):
        raise ConfigError(f"--format {options.fmt}: a classifier reads a text and a label column, not another format; "
                          "leave out --format and map the columns with --column text=COLUMN --column label=COLUMN")
    if settings.task == "classification" and options.prompt_template is not None:
        raise ConfigError("--prompt-template: a classifier reads its text column as it is, with no prompt; leave out "
                          "--prompt-template")
    if options.plot is not None and settings.task != "classification":
        raise ConfigError("--plot draws a classifier's confusion matrix; this is not a classification adapter")
    if adapter_obj is not None:  # the bare base is measured first: a misfit is its message now, before the data's
        check_fits(base, adapter_obj, options.allow_mismatch)
    place(base.model, device, inference_dtype(options.precision, device))
    # fp32 weights keep the default autocast (bf16 on CUDA); bf16/fp16 weights compute in their own dtype
    autocast = autocast_for(device, resolve_precision("auto", device) if options.precision == "fp32" else options.precision)
    return Subject(base, adapter_obj, adapter, settings, cfg, device, autocast, tokenizer)


def held_out_examples(options: EvalOptions, subject: Subject, log) -> HeldOut:
    """2. The examples: the run config's test (else validation) split, or the --data file encoded as the adapter
    was trained."""
    cfg, settings = subject.cfg, subject.settings
    n_positions = subject.base.model.config.n_positions
    if options.max_length is not None and options.max_length > n_positions:  # it was cut to the context unsaid
        raise ConfigError(f"--max-length {options.max_length} is above the model's context (n_positions = "
                          f"{n_positions}); pass at most {n_positions}")
    if options.skip_bad_rows and cfg is not None:
        cfg = replace(cfg, data=replace(cfg.data, skip_bad_rows=True))
    if cfg is not None and options.data is None:
        if options.max_length is not None:
            cfg = replace(cfg, data=replace(cfg.data, max_length=options.max_length))
        splits = load_splits(cfg, context_length=n_positions, tokenizer=subject.tokenizer)
        split = "test" if splits.test else "val"
        examples = splits.test or splits.val
        if not examples:
            raise DataError(f"{options.config}: the run holds out no validation or test data (data.val_split is 0 "
                            "and data.val / data.test are unset); pass --data FILE")
        if settings.task == "classification" and settings.labels and list(splits.labels or []) != list(settings.labels):
            raise AdapterError(f"adapter {subject.adapter_path} was trained on the labels {', '.join(settings.labels)}, "
                               f"but {options.config}'s data has {', '.join(splits.labels or [])}; retrain it (lora "
                               f"train {options.config} --overwrite) or pass the matching --adapter")
        separate = cfg.data.test if split == "test" else cfg.data.val
        if separate:
            frame = read_table(separate, cfg.data, f"data.{split}")
            _, mapping = detect_format(frame.columns, replace(cfg.data, format=splits.fmt), cfg.task, separate)
        else:
            frame, mapping = splits.frame, splits.mapping
        for line in splits.describe():
            log(line)
        return HeldOut(examples, frame, splits.fmt, mapping, cfg.data, separate or cfg.data.train, split)
    data = options.data
    data_cfg = cfg.data if cfg is not None else settings.data_config(n_positions)
    if cfg is not None:
        data_cfg = replace(data_cfg, max_length=min(options.max_length or data_cfg.max_length, n_positions))
    data_cfg = replace(data_cfg, split=options.split or data_cfg.split,
                       subset=options.subset if options.subset is not None else data_cfg.subset,
                       skip_bad_rows=data_cfg.skip_bad_rows or options.skip_bad_rows)
    if options.header is not None:
        data_cfg = replace(data_cfg, header=options.header)
    elif not data_cfg.header and _starts_with_names(data, data_cfg):
        # The run's data has no header row, but this file starts with its column names: a split `lora train`
        # wrote (out_dir/test.csv has a header), not a row whose label is "label".
        data_cfg = replace(data_cfg, header=True)
    if options.column_names:
        data_cfg = replace(data_cfg, column_names=[name.strip() for name in options.column_names])
    if options.generate:
        _check_reference_column(data, data_cfg, settings.task)
    if settings.task == "classification":
        examples, stats, frame, fmt, mapping = classification_file(data, data_cfg, settings.labels,
                                                                   subject.adapter_path, subject.tokenizer)
    else:
        examples, stats, frame, fmt, mapping = load_file(data, data_cfg, settings.task, "--data",
                                                         labels=settings.labels, tokenizer=subject.tokenizer)
    if fmt == "chat" and options.prompt_template is not None:
        raise ConfigError(f"--prompt-template: {data} is chat data, which a chat template renders (the adapter's, "
                          "the model's or --chat-template); leave out --prompt-template")
    if fmt != "chat" and options.chat_template is not None:
        raise ConfigError(f"--chat-template renders chat data (a messages or conversations column); {data} is {fmt} "
                          "data: leave out --chat-template")
    log(stats.describe())
    return HeldOut(examples, frame, fmt, mapping, data_cfg, str(data))


def _starts_with_names(path, data_cfg: DataConfig) -> bool:
    """Whether a CSV/TSV file read without a header has data.column_names as its first row."""
    if Path(str(path)).suffix.lower() not in DELIMITED_SUFFIXES or not data_cfg.column_names:
        return False
    first = read_table(path, data_cfg, "--data").row(0)
    return [cell_value(v) for v in first] == list(data_cfg.column_names)


def _attach(options: EvalOptions, subject: Subject) -> None:
    attach_to(Loaded(subject.base, subject.adapter, subject.settings, subject.tokenizer), options.allow_mismatch)
    place(subject.base.model, subject.device, inference_dtype(options.precision, subject.device))


def _batches(options: EvalOptions, subject: Subject, held: HeldOut, desc: str):
    return eval_batches(held.examples, options.batch_size, subject.device, options.progress, desc,
                        pad_id=subject.tokenizer.eos_id)


def classifier_eval(options: EvalOptions, subject: Subject, held: HeldOut) -> dict:
    """3. A classification adapter, and the same head with the LoRA layers off as its "base"."""
    if subject.adapter is None:
        raise ConfigError("a classification eval needs the adapter that carries the head: pass --adapter")
    _attach(options, subject)
    model, labels = subject.base.model, subject.settings.labels
    metrics = evaluate_classification(model, _batches(options, subject, held, "adapter"), labels, subject.autocast)
    result = dict(metrics)
    if options.compare_base and lora_layers(model):
        with lora_disabled(model):
            base_metrics = evaluate_classification(model, _batches(options, subject, held, "base"), labels,
                                                   subject.autocast)
        result["base"] = {**base_metrics, "note": CLASSIFIER_BASE_NOTE}
        result["delta"] = {k: metrics[k] - base_metrics[k] for k in ("loss", "accuracy", "macro_f1")}
    if options.plot is not None:
        title = (f"{Path(str(subject.adapter_path)).name} on {Path(held.source).name}: "
                 f"accuracy {metrics['accuracy']:.4f}")
        check_output(options.plot, "--plot", options.overwrite)  # again: another command may have written it
        plot_confusion(metrics["confusion_matrix"], labels, options.plot, title)
        result["plot"] = str(options.plot)
    return result


def lm_eval(options: EvalOptions, subject: Subject, held: HeldOut) -> dict:
    """4. Loss, perplexity, accuracy: the base first, then with the adapter (which stays attached)."""
    model = subject.base.model
    base_metrics = None
    if subject.adapter is None or options.compare_base:
        desc = "base" if subject.adapter is not None else "eval"
        base_metrics = evaluate_lm(model, _batches(options, subject, held, desc), subject.autocast)
    if subject.adapter is None:
        return dict(base_metrics)
    _attach(options, subject)
    result = dict(evaluate_lm(model, _batches(options, subject, held, "adapter"), subject.autocast))
    if base_metrics is not None:
        result["base"] = base_metrics
        result["delta"] = _delta(result, base_metrics)
    return result


def generation_eval(options: EvalOptions, subject: Subject, held: HeldOut) -> dict:
    """5. Generation metrics, once per distinct prompt against all of its references."""
    if held.fmt not in RESPONSE_ROLE:
        raise DataError(f"{held.source}: --generate needs prompt/completion or alpaca data with references, but the "
                        f"data format is {held.fmt}")
    model, n = subject.base.model, options.max_new_tokens
    rows = sorted({ex.row for ex in held.examples if ex.row >= 0})
    items = generation_items(held.frame, rows, held.fmt, held.mapping, held.data_cfg)
    prompts = [p for p, _ in items]
    room = model.config.n_positions - n
    tokenizer = subject.tokenizer
    truncated = sum(len(tokenizer.encode_prompt(p)) > room for p in prompts)  # prompts that lose their first tokens to fit
    if packing_pays(model, len(prompts), options.num_beams, n):
        pack_for_decoding(model)
    outputs = generate_texts(model, prompts, n, tokenizer=tokenizer, batch_size=options.batch_size, progress=options.progress,
                             num_beams=options.num_beams, length_penalty=options.length_penalty,
                             no_repeat_ngram_size=options.no_repeat_ngram_size, truncate=True)
    hyps = [o.strip() for o in outputs]
    gen = generation_metrics(hyps, [refs for _, refs in items], lowercase=options.lowercase, meteor=options.meteor)
    gen.update({"max_new_tokens": n, "num_beams": options.num_beams, "length_penalty": options.length_penalty,
                "no_repeat_ngram_size": options.no_repeat_ngram_size, "truncated_prompts": truncated})
    result = {"generation": gen}
    if options.predictions is not None:
        lines = [json.dumps(dict(zip(PREDICTION_KEYS, (p, h, refs))), ensure_ascii=False)
                 for (p, refs), h in zip(items, hyps)]
        check_output(options.predictions, "--predictions", options.overwrite)  # again: written meanwhile?
        atomic_write_text(options.predictions, "".join(line + "\n" for line in lines))
        result["predictions"] = str(options.predictions)
    return result


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
