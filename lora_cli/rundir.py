"""A training run's directory: its checkpoints (checkpoint/state.pt), the checks before a run may write there, and
the files of a finished run besides the adapter (metrics.jsonl history, loss.png).

Checkpoints hold everything the loop's future depends on (trainable weights, optimizer moments, RNG states,
position in the data), so an interrupted run that is resumed ends with the same adapter, bit for bit on CPU, as
one that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import yaml

from lora_cli.adapter import ADAPTER_FILE
from lora_cli.config import RunConfig, dump_config, written_by_a_run
from lora_cli.data import BATCH_ORDER
from lora_cli.errors import TrainingError
from lora_cli.fsutil import atomic_path, atomic_write_text
from lora_cli.samples import SAMPLES_FILE
from lora_cli.trackers import RUNS_FILE, TENSORBOARD_DIR

CHECKPOINT_FILE = "checkpoint/state.pt"


@dataclass
class RunState:
    """Where the loop is; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches (optimizer steps, skipped ones included) of this epoch consumed
    tokens: int = 0  # real tokens trained on
    best_val: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    nonfinite_skipped: int = 0
    elapsed: float = 0.0
    finished: bool = False


def trainable_named(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# What a resumed run may set anew: how it logs, validates, saves and reports, where and in how many pieces it
# computes. The batch's split is free too: read_checkpoint checks the global batch itself. Every other setting
# decides what is trained, so a resume must keep it (or the run is a mix of two, its best loss over two data sets).
RESUME_FREE = {f"train.{k}" for k in (
    "batch_size", "grad_accum", "global_batch_size", "strategy", "eval_every", "eval_max_batches", "save_every",
    "log_every", "early_stopping_patience", "skip_nonfinite_steps", "device", "gradient_checkpointing",
    "share_prefix", "num_threads", "report_to", "run_name", "samples", "sample_max_new_tokens")} | {"out_dir"}


# The key of trained_settings' digest of the encoded examples: a data file edited under the same path changes it
DATA_DIGEST = "data (the encoded train and validation examples)"


def examples_digest(splits) -> str:
    """A digest of the encoded train and validation examples (ids, loss mask, class) of a data.DataSplits."""
    digest = hashlib.sha256()
    for name, examples in (("train", splits.train), ("val", splits.val)):
        digest.update(f"{name} {len(examples)}\n".encode())
        for e in examples:
            digest.update(array("q", e.ids).tobytes())
            digest.update(bytes(e.loss_mask))
            digest.update(f"|{e.label}\n".encode())
    return digest.hexdigest()[:16]


def trained_settings(cfg: RunConfig, out_dir: Path) -> dict:
    """The config's settings that decide what is trained, as {"data.train": value, ...}, paths relative to
    out_dir (as its config.yaml has them, so a resume from another working directory compares equal)."""
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif prefix not in RESUME_FREE:
            flat[prefix] = value

    walk("", yaml.safe_load(dump_config(cfg, out_dir)))
    return flat


def save_checkpoint(out_dir: Path, model, optimizer, state: RunState, world_size: int = 1,
                    global_batch: int | None = None, settings: dict | None = None) -> None:
    """One file, written atomically: a reader finds the previous checkpoint or this one, never a mix. The data
    position counts global batches, so any process count or micro-batch size with the same global batch can
    resume it. Dropout needs no per-process RNG state: its seed is a pure function of the micro-batch
    (train.dropout_seed)."""
    payload = {
        "trainable": {n: p.detach().cpu().clone() for n, p in trainable_named(model).items()},
        "optimizer": optimizer.state_dict(),
        "state": asdict(state),
        "world_size": world_size,  # for the record: a resume may use another count
        "global_batch": global_batch,
        "settings": settings,  # trained_settings: what read_checkpoint holds a resume to
        "batch_order": BATCH_ORDER,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": list(random.getstate()[1]),
        },
    }
    with atomic_path(out_dir / CHECKPOINT_FILE) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(out_dir: Path, model, global_batch: int | None = None, one_micro_batch_per_step: bool = True,
                    settings: dict | None = None) -> dict:
    """The checkpoint's payload, checked against this run's LoRA parameters, global batch and (`settings`, its
    trained_settings) the settings that decide what is trained.

    one_micro_batch_per_step: this run takes one micro-batch per optimizer step on one process (grad_accum 1), the
    layout in which a checkpoint of an older lora-cli (its position counted micro-batches) means the same thing."""
    path = out_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise TrainingError(f"--resume: no checkpoint at {path}; start without --resume (add --overwrite to replace the run)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"--resume: checkpoint {path} is unreadable ({type(exc).__name__}); start again with --overwrite") from exc
    if not isinstance(payload, dict) or not {"trainable", "optimizer", "state", "rng"} <= set(payload):
        raise TrainingError(f"--resume: {path} is not a lora-cli checkpoint; start again with --overwrite")
    params = trainable_named(model)
    saved = payload["trainable"]
    if set(saved) != set(params) or any(saved[n].shape != p.shape for n, p in params.items()):
        raise TrainingError(f"--resume: checkpoint {path} was written for other LoRA settings; keep the config of that run or use --overwrite")
    saved_settings = payload.get("settings")  # absent from the checkpoints of older lora-cli versions
    if settings is not None and isinstance(saved_settings, dict):
        now = settings
        changed = next((k for k in [*saved_settings, *now] if saved_settings.get(k) != now.get(k)
                        and (k != DATA_DIGEST or k in saved_settings)), None)  # older checkpoints have no digest
        if changed == DATA_DIGEST:
            raise TrainingError(
                f"--resume: the training data differs from what checkpoint {path} was trained on (a data file "
                "changed under the same path, or the tokenizer did); a resume continues the same run: restore the "
                "data, or start again with --overwrite")
        if changed is not None:
            raise TrainingError(
                f"--resume: checkpoint {path} was written with {changed}: {saved_settings.get(changed)!r}, this run "
                f"has {now.get(changed)!r}; a resume continues the same run: keep its settings ({out_dir / 'config.yaml'}) "
                "or start again with --overwrite")
    saved_batch = payload.get("global_batch")
    if saved_batch is None:  # before the global batch was the unit, the position counted micro-batches
        if payload.get("world_size", 1) == 1 and one_micro_batch_per_step:
            return payload  # one micro-batch per step: that count is the number of global batches
        raise TrainingError(f"--resume: checkpoint {path} was written by an older lora-cli, whose position counted "
                            "micro-batches; resume it with one process and train.grad_accum: 1, or start again with "
                            "--overwrite")
    if saved_batch != global_batch:
        raise TrainingError(
            f"--resume: checkpoint {path} was written with a global batch of {saved_batch}, this run's is "
            f"{global_batch}; set train.global_batch_size: {saved_batch} (any process count and batch_size can "
            "resume it) or start again with --overwrite")
    return payload


def order_changed_note(payload: dict, batches_per_epoch: int) -> str | None:
    """A warning when the checkpoint was written mid-epoch by a lora-cli whose batch order differs from this one's
    (data.BATCH_ORDER; 1 where the checkpoint has none): the rest of that epoch is drawn in this order."""
    state = payload.get("state") or {}
    if payload.get("batch_order", 1) == BATCH_ORDER or not 0 < state.get("batch_in_epoch", 0) < batches_per_epoch:
        return None
    return (f"warning: the checkpoint was written by an older lora-cli, whose batches came in another order; the "
            f"rest of epoch {state.get('epoch', 0) + 1} is drawn in this version's order, so some of its examples "
            "are seen twice and others not at all (later epochs are whole)")


def apply_checkpoint(payload: dict, model, optimizer) -> RunState:
    """Load a checked payload into the model and optimizer (on every process); returns where the run was."""
    params = trainable_named(model)
    saved = payload["trainable"]
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(payload["optimizer"])
    rng = payload["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate((3, tuple(rng["python"]), None))
    return RunState(**payload["state"])


# What a run writes into out_dir and --overwrite removes first (with TENSORBOARD_DIR, removed whole)
RUN_FILES = (CHECKPOINT_FILE, ADAPTER_FILE, "metrics.jsonl", "loss.png", "config.yaml", "test.csv", "test.jsonl",
             SAMPLES_FILE, RUNS_FILE)


def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool,
                    inputs: Sequence[tuple[str, Path]] = ()) -> None:
    """Check out_dir before anything is loaded. Nothing is created or deleted here: clear_out_dir and the first
    atomic write do that once the model and data have loaded, so a run that fails to start (bad data, a typo
    in the model path) leaves out_dir, and an earlier run in it, as they were. inputs: (what, path) of the files
    the run reads (run_inputs), none of which --overwrite may remove or replace."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainingError(f"out_dir {out_dir} is a file; choose a directory path")
    if not out_dir.exists():
        parent = next(p for p in out_dir.parents if p.exists())
        if not parent.is_dir():
            raise TrainingError(f"cannot create out_dir {out_dir}: {parent} is a file, not a directory; choose another out_dir")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise TrainingError(f"cannot create out_dir {out_dir}: {parent} is not writable; choose another out_dir")
    busy = out_dir.is_dir() and any(out_dir.iterdir())
    if resume:
        if not (out_dir / CHECKPOINT_FILE).is_file():
            raise TrainingError(f"--resume: no checkpoint at {out_dir / CHECKPOINT_FILE}; start without --resume "
                                "(add --overwrite to replace the run)")
        return
    if busy and not _holds_a_run(out_dir):
        found = sorted(p.name for p in out_dir.iterdir())
        names = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise TrainingError(f"out_dir {out_dir} holds files no lora-cli run wrote ({names}); a run (and --overwrite, "
                            "which replaces an earlier run) needs an empty or new out_dir")
    if busy and not overwrite:
        raise TrainingError(f"out_dir {out_dir} is not empty; pass --resume to continue that run or --overwrite to replace it")
    if busy:
        replaced = {(out_dir / name).resolve() for name in RUN_FILES}
        board = (out_dir / TENSORBOARD_DIR).resolve()
        for what, path in inputs:
            target = path.resolve()
            if target in replaced or board in target.parents:
                raise TrainingError(f"--overwrite would delete or replace {path}, which this run reads as {what}; "
                                    f"move it out of out_dir {out_dir}, or choose another out_dir")


def _holds_a_run(out_dir: Path) -> bool:
    """Whether out_dir holds an earlier run: its checkpoint, its adapter, or a config.yaml a run wrote."""
    return ((out_dir / CHECKPOINT_FILE).is_file() or (out_dir / ADAPTER_FILE).is_file()
            or ((out_dir / "config.yaml").is_file() and written_by_a_run(out_dir / "config.yaml")))


def clear_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """--overwrite: remove the earlier run's files, once the new run has loaded its model and data."""
    if overwrite and not resume:
        for name in RUN_FILES:
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / TENSORBOARD_DIR, ignore_errors=True)  # else the old run's events mix with the new


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics lines written after the checkpoint (they will be written again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def last_checkpoint_note(out_dir: Path) -> str:
    """Where the run can be resumed from, for messages of a run that stopped."""
    path = out_dir / CHECKPOINT_FILE
    try:
        step = torch.load(path, map_location="cpu", weights_only=True)["state"]["step"]
    except Exception:  # absent (nothing saved yet) or unreadable: say so rather than point at it
        return "no checkpoint was saved before it"
    return f"the last good checkpoint is {path} (step {step}; continue with --resume)"


def plot_losses(history: list[dict], path: Path) -> None:
    """Train and validation loss against step (matplotlib, no display)."""
    import matplotlib  # here: only the end of a run pays for matplotlib's import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_pts = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val_pts = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train_pts:
        ax.plot(*zip(*train_pts), label="train")
    if val_pts:
        ax.plot(*zip(*val_pts), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
