"""`lora train`: config -> run directory holding the adapter.

The loop is one plain function (`_loop`) with visible steps; the learning-rate schedule is a pure function
(`lr_at`); validation is evaluation.evaluate_lm / evaluate_classification. The run directory and its checkpoints
are rundir.py's: a resumed run ends with the same adapter, bit for bit on CPU, as one that never stopped.

The global batch is the unit: each epoch is a list of global batches (one per optimizer step), each cut into
grad_accum x W micro-batches (data.split_batch). Under torchrun the same loop runs data-parallel (distributed.py):
every process trains on its grad_accum of each step's micro-batches through DistributedDataParallel, and only
rank 0 writes files and shows progress.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from tqdm import tqdm

from lora_cli.adapter import ADAPTER_FILE, save_adapter
from lora_cli.config import RunConfig, dump_config, run_inputs
from lora_cli.data import batch_indices, collate, load_splits, pack, preview, split_batch, write_split
from lora_cli.data.splits import check_max_length, source_problems
from lora_cli.distributed import (
    DDPView, Dist, FSDPView, env_world_size, full_value, init_distributed, is_comm_failure, resolve_batch,
    shard_sizes, short_reason, with_extra_passes, wrap_ddp, wrap_fsdp,
)
from lora_cli.errors import ConfigError, DataError, LoraError, TrainingError, all_problems, is_out_of_memory
from lora_cli.evaluation import evaluate_classification, evaluate_lm
from lora_cli.fsutil import RunLock, append_line, atomic_write_text, local_path
from lora_cli.lora import (
    apply_lora, config_problems, count_parameters, loraplus_param_groups, with_classification_head, without_head,
)
from lora_cli.loss import Savings, chunk_rows_for, classification_loss_sum, lm_loss_sum
from lora_cli.models import cast_frozen_linears_
from lora_cli.inference import load_with_tokenizer
from lora_cli.prompts import escape_line
from lora_cli.rundir import (
    RunState, apply_checkpoint, clear_out_dir, last_checkpoint_note, order_changed_note, plot_losses, prepare_out_dir,
    DATA_DIGEST, examples_digest, read_checkpoint, read_history, save_checkpoint, trainable_named,
    trained_settings, trim_metrics,
)
from lora_cli.runtime import DTYPES, autocast_for, resolve_device, resolve_precision
from lora_cli.samples import SAMPLES_FILE, decode_samples
from lora_cli.trackers import Trackers, check_installed, open_trackers
from lora_cli.tokenizer import GPT2, Tokenizer, describe as describe_tokenizer



class TrainingInterrupted(LoraError):
    """Ctrl-C or SIGTERM: a checkpoint was written; exit like an interrupted shell command."""

    exit_code = 130


# ------------------------------------------------------------------------------------------------ pieces


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int, schedule: str, min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr, then cosine,
    linear or constant decay towards min_lr_ratio * lr, which step `total_steps` would reach (the last step,
    total_steps - 1, stays one decay step above it: transformers' get_cosine_schedule_with_warmup convention)."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = lr * min_lr_ratio
    if schedule == "linear":
        return floor + (lr - floor) * (1.0 - progress)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(params: list[torch.nn.Parameter] | list[dict], cfg):
    """torch.optim.AdamW (Loshchilov & Hutter 2019, decoupled weight decay) or torch.optim.SGD: one parameter
    group, every trainable tensor, the config's weight decay (or the given parameter groups: LoRA+, whose
    `lr_scale` the loop multiplies the scheduled lr by). On CUDA the fused kernel (one launch per step, no
    per-tensor `.item()`); elsewhere torch's default single-tensor loop. Only training builds one: constructing
    a torch.optim optimizer imports torch._dynamo and sympy (~0.8 s, 72 MB)."""
    t = cfg.train
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    fused = True if flat and all(p.device.type == "cuda" for p in flat) else None
    if t.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, fused=fused)
    else:
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                                      fused=fused)
    implementation = ("foreach", "fused", "capturable", "differentiable")

    def keep_implementation(opt, state_dict):
        """A checkpoint restores hyperparameters and moments, not how this machine computes the update: a CPU
        run's checkpoint may resume on CUDA (fused), and lora-cli's own optimizer wrote foreach=False."""
        groups = [{**saved, **{k: own[k] for k in implementation if k in own}}
                  for saved, own in zip(state_dict["param_groups"], opt.param_groups)]
        return {**state_dict, "param_groups": groups}

    optimizer.register_load_state_dict_pre_hook(keep_implementation)
    return optimizer


@dataclass
class TrainResult:
    out_dir: Path
    adapter: Path
    state: RunState
    final_val: dict | None = None
    history: list = field(default_factory=list)
    rank: int = 0  # this process's rank under torchrun (only rank 0 reports the adapter)


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (so a checkpoint can be written).

    distributed=True (under torchrun): a repeated signal only keeps the flag set (torchrun forwards the Ctrl-C the
    processes already got, and its own SIGKILL after 30 s is the hard stop), and the handlers stay until the
    process exits, so torchrun's SIGTERM to the survivors of a dead peer cannot cut short their error message."""

    def __init__(self, distributed: bool = False):
        self.received: int | None = None
        self.distributed = distributed
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and not self.distributed:  # a second Ctrl-C: stop now
            previous = self._previous.get(signum)
            if callable(previous):  # the command line's handler (cli._Signals), which records it
                previous(signum, frame)
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        if self.distributed:
            return False
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ----------------------------------------------------------------------------------------------- setup


@dataclass
class Setup:
    """Everything built from the config before the first step."""

    cfg: RunConfig
    out_dir: Path
    device: torch.device
    precision: str
    base: object  # pretrained.BaseModel
    model: torch.nn.Module
    targets: list[str]
    data: object  # data.DataSplits
    trainable: int
    total: int
    steps_per_epoch: int
    total_steps: int
    world_size: int = 1  # processes training together (torchrun)
    dist: Dist = field(default_factory=Dist)  # this process's place among them
    savings: Savings = Savings()  # the loss's savings (tests turn them off: loss.PLAIN)
    tokenizer: Tokenizer = GPT2  # the base model's (inference.load_with_tokenizer)
    trackers: Trackers = field(default_factory=Trackers)  # train.report_to (rank 0; elsewhere none)

    @cached_property
    def trained_settings(self) -> dict:
        """The settings a resume is held to (rundir.trained_settings) and a digest of the examples they gave
        (rundir.examples_digest: an edited data file keeps its path): made once, written with every checkpoint."""
        return {**trained_settings(self.cfg, self.out_dir), DATA_DIGEST: examples_digest(self.data)}

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step over all processes: batch_size x grad_accum x world size."""
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.world_size


def build(cfg: RunConfig, world_size: int | None = None, dist: Dist | None = None,
          savings: Savings = Savings()) -> Setup:
    """Load the base model, add LoRA, read the data: everything a dry run shows and a run needs.

    world_size: the number of processes (default: WORLD_SIZE from torchrun's environment, else 1); with
    train.global_batch_size set, the per-process batch_size and grad_accum follow from it (distributed.resolve_batch),
    and the returned Setup's cfg holds them. dist: the process group this process joined (train()). savings: the
    loss's savings (loss.Savings), all on by default."""
    dist = dist or Dist()
    world_size = dist.world_size if dist.enabled else (world_size or env_world_size())
    t = cfg.train
    batch_size, grad_accum = resolve_batch(t.batch_size, t.grad_accum, t.global_batch_size, world_size)
    if (batch_size, grad_accum) != (t.batch_size, t.grad_accum):
        t = replace(t, batch_size=batch_size, grad_accum=grad_accum)
        cfg = replace(cfg, train=t)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = dist.device or resolve_device(t.device)
    precision = resolve_precision(t.precision, device)
    low = DTYPES[precision] if precision in ("bf16", "fp16") else None  # kept as stored: no fp32 copy
    unreadable = source_problems(cfg)  # before a model download that would be wasted
    if unreadable:
        raise DataError(all_problems(cfg.label, unreadable))
    try:
        base, tokenizer = load_with_tokenizer(cfg.model, dtype=low)
    except ConfigError as exc:  # the model section's own fault (a random preset's name or sizes): name the file
        raise ConfigError(all_problems(cfg.label, [str(exc)])) from None
    model = base.model
    context = model.config.n_positions
    if t.samples and t.sample_max_new_tokens >= context:  # known now, not at the first validation's samples
        raise ConfigError(all_problems(cfg.label, [
            f"train.sample_max_new_tokens: {t.sample_max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {context} tokens; set it below {context}"]))
    if cfg.task == "classification":  # its head, which lora.targets may name, comes with the data's labels
        check_against_model(cfg, model, without_head(cfg.lora), resolved_only=True)
    else:
        check_against_model(cfg, model, cfg.lora)
    data = load_splits(cfg, context_length=model.config.n_positions, tokenizer=tokenizer)
    model.set_dropout(t.model_dropout)
    # LoRA's A init (and a new head) draw from their own seeded generator: the same start on any device.
    generator = torch.Generator().manual_seed(t.seed)
    lora_cfg = cfg.lora
    if cfg.task == "classification":
        lora_cfg = with_classification_head(model, lora_cfg, len(data.labels), generator)
        check_against_model(cfg, model, lora_cfg)
    targets = apply_lora(model, lora_cfg, generator=generator)
    trainable, total = count_parameters(model)
    model.gradient_checkpointing = t.gradient_checkpointing
    model.share_prefix = t.share_prefix
    if precision in ("bf16", "fp16"):  # frozen weights stored as autocast would cast them: same products, no copies
        cast_frozen_linears_(model, DTYPES[precision])
    # one step per global batch (batch_size x grad_accum x world size examples)
    steps_per_epoch = max(1, len(batch_indices([len(e) for e in data.train], t.batch_size * t.grad_accum * world_size,
                                               t.seed, 0)))
    total_steps = steps_per_epoch * t.epochs
    if t.max_steps is not None:
        total_steps = min(total_steps, t.max_steps)
    return Setup(cfg, Path(cfg.out_dir), device, precision, base, model.to(device), targets, data,
                 trainable, total, steps_per_epoch, total_steps, world_size, dist, savings, tokenizer)


def check_against_model(cfg: RunConfig, model, lora_cfg, resolved_only: bool = False) -> None:
    """The config's checks that need the model, reported together: data.max_length against its context, and
    lora_cfg (a classifier's has its head) against its modules (lora.config_problems)."""
    problems = []
    try:
        check_max_length(cfg.data.max_length, model.config.n_positions)
    except ConfigError as exc:
        problems.append(str(exc))
    problems += config_problems(model, lora_cfg, resolved_only)
    if problems:
        raise ConfigError(all_problems(cfg.label, problems))


def estimate_memory(s: Setup) -> int:
    """Rough peak bytes of a training step: weights, optimizer state, activations of the longest batch and the
    fp32 logits the cross-entropy holds at once: one chunk of rows and its gradient (loss.chunk_rows_for), never a
    whole batch's (activation formula after Korthikanti et al. 2022, sec. 4.1)."""
    c = s.model.config
    bytes_per = 2 if s.precision in ("bf16", "fp16") else 4
    T = min(s.cfg.data.max_length, max((len(e) for e in s.data.train), default=1))
    B = min(s.cfg.train.batch_size, max(1, len(s.data.train)))  # a batch holds at most the whole split
    weights = s.total * 4
    if s.cfg.train.strategy == "fsdp" and s.world_size > 1:  # a process's shard, plus a block gathered whole
        weights = weights // s.world_size + weights // c.n_layer  # (a block is at most total / n_layer)
    optimizer = s.trainable * 4 * 3  # grads + two Adam moments
    per_layer = B * T * c.n_embd * 34 * bytes_per // 2 + B * c.n_head * T * T * bytes_per
    if s.cfg.train.gradient_checkpointing:
        per_layer = B * T * c.n_embd * bytes_per + per_layer // c.n_layer
    rows = B * T  # scored positions, at most
    logits = min(rows, chunk_rows_for(rows)) * c.vocab_size * 4 * 2 if s.cfg.task == "causal_lm" else 0
    return weights + optimizer + per_layer * c.n_layer + logits


def dry_run_report(s: Setup, show: int | None = None) -> list[str]:
    """What `lora train --dry-run` prints; with show=N, N training examples instead of one (see show_examples)."""
    cfg = s.cfg
    t = cfg.train
    lines = [f"model: {s.base.name} ({s.base.source}), {s.total - s.trainable:,} frozen parameters",
             f"tokenizer: {describe_tokenizer(s.tokenizer)}"]
    lines += s.data.describe()
    lines.append(f"lora: r={cfg.lora.r} alpha={cfg.lora.alpha:g} on {len(s.targets)} layers "
                 f"({', '.join(s.targets[:4])}{', ...' if len(s.targets) > 4 else ''})")
    lines.append(f"trainable parameters: {s.trainable:,} of {s.total:,} ({100 * s.trainable / s.total:.4f}%)")
    processes = f" x {s.world_size} processes" if s.world_size > 1 else ""
    lines.append(f"steps: {s.total_steps} ({s.steps_per_epoch} per epoch x {t.epochs} epochs"
                 f"{', capped by max_steps' if t.max_steps and s.total_steps < s.steps_per_epoch * t.epochs else ''}); "
                 f"batch {t.batch_size} x grad_accum {t.grad_accum}"
                 f"{processes} = global batch {s.global_batch}")
    lines.append(f"device: {s.device}, precision: {s.precision}")
    peak = estimate_memory(s)
    lines.append(f"estimated peak memory: {peak / 2**30:.2f} GiB" if peak >= 2**30 / 10 else
                 f"estimated peak memory: {peak / 2**20:.0f} MiB")
    available = _available_memory(s.device)
    if available and peak > 0.9 * available:
        lines.append(f"warning: that is above 90% of the {available / 2**30:.1f} GiB available; lower train.batch_size "
                     "or data.max_length, raise train.grad_accum, or set train.gradient_checkpointing: true")
    if show is not None:
        lines += show_examples(s, show)
    elif s.data.train:
        lines.append("first training example ([[...]] carries loss):")
        lines.append("  " + preview(s.data.train[0], s.tokenizer).replace("\n", "\n  "))
    return lines


def dry_run_out_dir(s: Setup, resume: bool, overwrite: bool) -> list[str]:
    """`--dry-run` with --resume or --overwrite: out_dir and its checkpoint checked as the run would check them
    (prepare_out_dir, read_checkpoint: the same refusals, in one line), and what the run would do. Nothing is
    written (the run's lock is taken and let go at once: a run in out_dir refuses the dry run as it would the
    run). Without either flag a dry run leaves out_dir alone."""
    if not (resume or overwrite):
        return []
    out_dir = Path(s.cfg.out_dir)
    with RunLock(out_dir, "lora train --dry-run", "out_dir"):
        _check_out_dir(s.cfg, resume, overwrite)
    if overwrite:
        held = out_dir.is_dir() and any(out_dir.iterdir())
        return [f"--overwrite: the run in {out_dir} would be replaced" if held else
                f"--overwrite: {out_dir} holds no run; the run would start there"]
    step = _resume_payload(s)["state"]["step"]
    if step >= s.total_steps:
        return [f"--resume: the run in {out_dir} has done all {s.total_steps} steps; there is nothing to resume"]
    return [f"--resume: would continue the run in {out_dir} from step {step} of {s.total_steps}"]


def _check_out_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """rundir.prepare_out_dir with the files the run reads, which --overwrite must not remove (listed for it
    alone: listing them reads and parses the config again)."""
    prepare_out_dir(Path(cfg.out_dir), resume, overwrite, run_inputs(cfg) if overwrite and not resume else ())


def _resume_payload(s: Setup) -> dict:
    """The checkpoint --resume continues, checked against this run (rundir.read_checkpoint)."""
    t = s.cfg.train
    return read_checkpoint(Path(s.cfg.out_dir), s.model, s.global_batch, t.grad_accum * s.world_size == 1,
                           s.trained_settings)


def show_examples(s: Setup, n: int) -> list[str]:
    """`--dry-run --show N`: the first N training examples with the trained tokens in [[...]], each with its
    source row and its counts of tokens and trained tokens, then how many examples truncation to data.max_length
    left without a trained token (dropped from training; a warning line when there are any)."""
    shown = s.data.train[:n]
    lines = [f"training examples 1-{len(shown)} of {len(s.data.train)} ([[...]] carries loss):"]
    for k, ex in enumerate(shown, start=1):
        where = f"row {ex.row + 1}" if ex.row >= 0 else "a chunk of the text"
        trained = "label " + str(ex.label) if ex.label is not None else f"{sum(ex.loss_mask)} trained"
        lines.append(f"example {k} ({where}): {len(ex)} tokens, {trained}")
        lines.append("  " + preview(ex, s.tokenizer).replace("\n", "\n  "))
    if s.cfg.task != "classification":
        dropped = sum(stats.dropped for stats in s.data.stats.values())
        lines.append(f"examples left without a trained token by truncation: {dropped}")
        if dropped:
            one = dropped == 1
            lines.append(f"warning: {dropped} example{'' if one else 's'} lost every trained token to truncation at "
                         f"data.max_length={s.cfg.data.max_length} and {'is' if one else 'are'} left out; raise "
                         "data.max_length or shorten their prompts")
    return lines


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    # MemAvailable counts reclaimable page cache (free pages alone undercount), capped by a container's cgroup limit
    available = None
    try:
        with open("/proc/meminfo") as fh:
            available = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        if limit != "max":
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return available


# ----------------------------------------------------------------------------------------------- train


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, log=print, progress: bool = True,
          savings: Savings = Savings()) -> TrainResult:
    """Run the config: returns where the adapter was written. Writes out_dir/adapter.safetensors (best by
    validation loss, else last), checkpoint/, metrics.jsonl, config.yaml and loss.png.

    Launched by torchrun, this process joins the process group and trains its shard of the data; rank 0 alone
    writes out_dir and logs (log and progress are ignored on the other ranks). savings: see loss.Savings."""
    check_installed(cfg.train.report_to)  # a missing extra stops the run before anything loads
    dist = init_distributed(resolve_device(cfg.train.device))
    lock = RunLock(cfg.out_dir, "lora train", "out_dir")  # rank 0 holds it: the only rank that writes out_dir
    try:
        dist.on_main(lock.acquire)  # a refusal reaches every rank, so none waits for rank 0
        return _train(cfg, dist, resume, overwrite, log if dist.is_main else (lambda m: None), progress and dist.is_main,
                      savings)
    finally:
        lock.release()
        dist.close()


def _train(cfg: RunConfig, dist: Dist, resume: bool, overwrite: bool, log, progress: bool,
           savings: Savings) -> TrainResult:
    out_dir = Path(cfg.out_dir)
    dist.on_main(lambda: _check_out_dir(cfg, resume, overwrite))
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    s = build(cfg, dist=dist, savings=savings)
    t = s.cfg.train
    params = list(trainable_named(s.model).values())
    if s.cfg.lora.loraplus_lr_ratio is not None:  # LoRA+: B's group learns at ratio x lr
        params = loraplus_param_groups(s.model, s.cfg.lora.loraplus_lr_ratio, t.weight_decay)
    optimizer = build_optimizer(params, s.cfg)
    state = RunState()

    def first_files():  # rank 0: the checkpoint to resume from, then the run's first files
        payload = _resume_payload(s) if resume else None
        clear_out_dir(out_dir, resume, overwrite)
        if payload is not None:
            trim_metrics(out_dir / "metrics.jsonl", payload["state"]["step"])
            trim_metrics(out_dir / SAMPLES_FILE, payload["state"]["step"])
        wrote_test = None  # first: a split that cannot be written leaves no config.yaml behind
        if s.data.test and not cfg.data.test and all(e.row >= 0 for e in s.data.test):
            wrote_test = write_split(out_dir, "test", s.data.test, s.data.frame)
        atomic_write_text(out_dir / "config.yaml", dump_config(s.cfg, out_dir))
        return payload, read_history(out_dir / "metrics.jsonl"), wrote_test

    payload, history, wrote_test = dist.on_main(first_files)
    # what the run is, once a resume has passed its checks: a refused one is the error's line alone
    for line in s.data.describe():
        log(line)
    log(f"trainable parameters: {s.trainable:,} of {s.total:,}; {s.total_steps} steps on {s.device} ({s.precision})")
    log(f"global batch {s.global_batch} = batch_size {t.batch_size} x grad_accum {t.grad_accum} x "
        f"{s.world_size} process{'es' if s.world_size > 1 else ''}" + (f" ({dist.backend})" if dist.enabled else ""))
    if payload is not None:
        state = apply_checkpoint(payload, s.model, optimizer)
        log(f"resumed from step {state.step}")
        if note := order_changed_note(payload, s.steps_per_epoch):
            log(note)
    if wrote_test:
        log(f"test split ({len(s.data.test)} rows) written to {wrote_test}")
    elif s.data.test and not cfg.data.test:  # a .txt file's chunks are no rows of a table to write
        log(f"test split ({len(s.data.test)} chunks of {cfg.data.train}) held out, not written to a file: `lora eval "
            f"{out_dir / 'config.yaml'}` evaluates it")
    forward = s.model
    if dist.enabled and t.strategy == "fsdp":
        forward = wrap_fsdp(s.model, optimizer, dist)
        sizes = shard_sizes(s.model, dist)
        log(f"fsdp: {sum(sizes):,} parameter elements sharded over {len(sizes)} processes: "
            f"{' + '.join(f'{n:,}' for n in sizes)}")
    elif dist.enabled:
        forward = DDPView(wrap_ddp(s.model, dist))
    elif t.strategy == "fsdp":
        log("train.strategy fsdp: a single process, nothing to shard; training unsharded (start several processes "
            "with torchrun or --nproc N to shard the model)")

    def start_trackers():  # rank 0 alone reports; a tracker that cannot start stops every rank (on_main)
        s.trackers = open_trackers(s.cfg, out_dir, None if payload is None else payload["state"]["step"])

    if t.report_to:
        dist.on_main(start_trackers)
    try:
        with StopSignals(distributed=dist.enabled) as stop:
            _loop(s, optimizer, state, stop, history, log, progress, forward)
            # a signal after the last step waits for the final validation and the writes (a second one still
            # stops at once): it killed the run there, with neither its adapter nor a checkpoint of those steps
            final_val = _finish(s, optimizer, state, history, log)
        if stop.received is not None:
            log("a stop signal came while the run was finishing; it finished first (exit code 0)")
    except (RuntimeError, MemoryError) as exc:
        if is_out_of_memory(exc):  # nothing was written since the last checkpoint: it is kept
            raise TrainingError(out_of_memory_message(s, state)) from exc
        if not (dist.enabled and is_comm_failure(exc)):
            raise
        raise TrainingError(
            f"lost contact with the other training processes at step {state.step + 1} ({short_reason(exc)}): one of "
            f"them stopped or the network failed; the last checkpoint is in {out_dir / 'checkpoint'}; rerun the same "
            "command with --resume") from exc
    finally:
        s.trackers.close(failed=sys.exc_info()[0] is not None)
    dist.barrier()  # rank 0 has written everything before any process reports success
    return TrainResult(out_dir, out_dir / ADAPTER_FILE, state, final_val, history, dist.rank)


def _epoch_batches(s: Setup, epoch: int) -> list[list[int]]:
    """The epoch's global batches: length-grouped and seeded at the global batch's size, so the order does not
    depend on batch_size, grad_accum or the process count."""
    t = s.cfg.train
    return batch_indices([len(e) for e in s.data.train], s.global_batch, t.seed, epoch,
                         group_by_length=s.cfg.data.group_by_length)


def _validate(s: Setup, autocast) -> dict | None:
    """Validation metrics. Data-parallel: each process scores every world_size-th batch of the (length-sorted)
    list and the sums (loss, tokens, correct, confusion counts) are all-reduced before the means are taken, so
    the result is token-weighted over the whole split: the single-process value up to the order of the float
    additions (about 1e-16 relative)."""
    if not s.data.val:
        return None
    t, d = s.cfg.train, s.dist
    order = batch_indices([len(e) for e in s.data.val], t.batch_size, 0, 0, shuffle=False)
    if t.eval_max_batches is not None:  # that many global batches: the same examples whatever the layout
        kept = [i for idx in order for i in idx][:t.eval_max_batches * s.global_batch]  # (length-sorted)
        order = [kept[k:k + t.batch_size] for k in range(0, len(kept), t.batch_size)]
    reduce = None
    if d.enabled:
        rounds = math.ceil(len(order) / d.world_size)
        order = order[d.rank::d.world_size]
        reduce = d.all_reduce_sum
    batches = (collate([s.data.val[i] for i in idx], pad_id=s.tokenizer.eos_id).to(s.device) for idx in order)
    if d.sharded:  # FSDP: as many forwards on every process
        first = collate([s.data.val[0]], pad_id=s.tokenizer.eos_id).to(s.device)

        def extra_pass():
            with autocast():
                s.model(first.input_ids)

        batches = with_extra_passes(batches, rounds - len(order), extra_pass)
    if s.cfg.task == "classification":
        return evaluate_classification(s.model, batches, s.data.labels, autocast, reduce=reduce)
    return evaluate_lm(s.model, batches, autocast, reduce=reduce, savings=s.savings)


def _loss_fn(s: Setup):
    """(model, batch) -> summed loss over the batch's targets (tokens, or examples for classification)."""
    smoothing = s.cfg.train.label_smoothing
    if s.cfg.task == "classification":
        weights = None if s.data.class_weights is None else torch.tensor(s.data.class_weights, device=s.device)
        return lambda model, batch: classification_loss_sum(model, batch, smoothing, weights)
    return lambda model, batch: lm_loss_sum(model, batch, smoothing, s.savings)


def dropout_seed(seed: int, epoch: int, position: int, micro: int) -> int:
    """The torch seed set before micro-batch `micro` of the global batch at `position` of epoch `epoch`: dropout
    masks are a pure function of (seed, epoch, global batch, micro-batch index), the same on any number of
    processes with the same micro-batch count and after a resume, so no per-process RNG state has to be gathered
    into checkpoints."""
    return random.Random(f"dropout:{seed}:{epoch}:{position}:{micro}").getrandbits(63)


@dataclass
class StepBatches:
    """One optimizer step's micro-batches on this process, and the counts of the whole (global) step."""

    micro: list  # (data.Batch, index among the global batch's micro-batches, weight: 0.0 for a placeholder)
    n_targets: int  # target tokens (or examples) of the global step: the loss's denominator
    tokens: int  # real tokens of the global step


def _step_batches(s: Setup, state: RunState, batches: list) -> StepBatches:
    """The global batch at batch_in_epoch, cut into grad_accum x W micro-batches; this process takes micro-batches
    rank x grad_accum, ..., (rank + 1) x grad_accum - 1. A micro-batch left empty by a short last global batch
    becomes a placeholder of weight 0 (the global batch's first example), so every process makes the same passes."""
    d, t = s.dist, s.cfg.train
    examples = s.data.train
    micro = split_batch(batches[state.batch_in_epoch], [len(e) for e in examples], t.grad_accum * d.world_size)
    mine = range(d.rank * t.grad_accum, (d.rank + 1) * t.grad_accum)
    step = [(_micro_batch(s, [examples[i] for i in micro[j]]), j, 1.0) if micro[j] else
            (_micro_batch(s, [examples[micro[0][0]]]), j, 0.0) for j in mine]
    real = [b for b, _, weight in step if weight]
    n_targets, tokens = sum(b.n_targets for b in real), sum(b.n_tokens for b in real)
    if d.enabled:
        n_targets, tokens = (int(v) for v in d.all_reduce_sum([n_targets, tokens]))
    return StepBatches(step, n_targets, tokens)


def _micro_batch(s: Setup, examples: list):
    """A micro-batch's tensors: padded to its longest example, or packed into rows of data.max_length tokens."""
    if s.cfg.data.packing:
        return pack(examples, s.cfg.data.max_length, pad_id=s.tokenizer.eos_id)
    return collate(examples, pad_id=s.tokenizer.eos_id)


def _forward_backward(s: Setup, state: RunState, step: StepBatches, forward, loss_sum, autocast) -> float:
    """Accumulate the step's gradients; returns this process's share of the step's mean loss."""
    wrapped = forward if isinstance(forward, (DDPView, FSDPView)) else None  # DDP, FSDP: every process, every pass
    W = s.dist.world_size
    loss_value = 0.0
    for k, (batch, j, weight) in enumerate(step.micro):
        if wrapped is None and not weight:  # a placeholder only keeps the processes' passes in step
            continue
        batch = batch.to(s.device)
        torch.manual_seed(dropout_seed(s.cfg.train.seed, state.epoch, state.batch_in_epoch, j))
        last = k == len(step.micro) - 1
        with nullcontext() if wrapped is None or last else wrapped.no_sync():
            with autocast():
                loss = loss_sum(forward, batch) / max(1, step.n_targets)
            if wrapped is None:
                loss.backward()
            else:
                (loss * (W * weight)).backward()
        loss_value += loss.item() * weight  # a non-finite padding loss still makes the step non-finite
    return loss_value


def _warm_up_ddp(s: Setup, step: StepBatches, forward, loss_sum, autocast, optimizer) -> None:
    """DDP's static graph is recorded in a first backward that must be synchronised: a zero-weighted pass."""
    with autocast():
        (loss_sum(forward, step.micro[0][0].to(s.device)) * 0.0).backward()
    optimizer.zero_grad(set_to_none=True)


def _nonfinite(s: Setup, state: RunState, loss_value: float, grad_norm: float, log) -> bool:
    """A non-finite loss or gradient norm: True to skip the step (up to skip_nonfinite_steps), else stop with the
    last good checkpoint."""
    what = "loss" if not math.isfinite(loss_value) else "gradient norm" if not math.isfinite(grad_norm) else None
    if what is None:
        return False
    t = s.cfg.train
    state.nonfinite_skipped += 1
    if state.nonfinite_skipped > t.skip_nonfinite_steps:
        value = loss_value if what == "loss" else grad_norm
        raise TrainingError(
            f"{what} is {value} at step {state.step + 1}; stopped, {last_checkpoint_note(s.out_dir)}; "
            "lower train.lr, keep train.max_grad_norm set, or check the data"
        )
    log(f"step {state.step + 1}: non-finite {what} skipped ({state.nonfinite_skipped}/{t.skip_nonfinite_steps})")
    return True


def _interrupted(s: Setup, model, optimizer, state: RunState) -> TrainingInterrupted:
    """Save a checkpoint on every stop signal; every process stops here and rank 0 says so."""
    d = s.dist
    with d.gathered(model, optimizer):
        if d.is_main:
            save_checkpoint(s.out_dir, model, optimizer, state, d.world_size, s.global_batch,
                            s.trained_settings)
    d.barrier()  # the checkpoint is complete before any process exits
    # the run's own config.yaml: it holds every --set override, its paths relative to the run directory
    again = f"`lora train {s.out_dir / 'config.yaml'} --resume`" if not d.enabled else "the same command and --resume"
    interrupted = TrainingInterrupted(
        f"interrupted at step {state.step}; checkpoint saved in {s.out_dir / 'checkpoint'}; continue with {again}"
    )
    interrupted.from_rank0 = not d.is_main
    return interrupted


def _loop(s: Setup, optimizer, state: RunState, stop: StopSignals, history: list, log, progress: bool,
          forward=None) -> None:
    """The training loop: micro-batches -> loss -> backward -> (every grad_accum) clip, step, log, validate, save.

    forward: what the loss functions call (distributed.DDPView under torchrun; default s.model). An optimizer
    step takes one global batch of the epoch's list and cuts it into grad_accum x W micro-batches (_step_batches),
    grad_accum on each of the W processes. Each micro-batch's summed loss is divided by the target tokens of the
    whole global batch (all-reduced first) and multiplied by W, which DDP's gradient averaging divides out again:
    the gradient is the global batch's, whatever batch_size, grad_accum and W are, up to float rounding (with a
    power-of-two W the scaling itself is exact). Micro-batches before the last of a step run under no_sync, so
    gradients are all-reduced once per step. A short last global batch may leave micro-batches empty: they run
    as weight-0 placeholders, so every process does the same number of passes and no example counts twice."""
    t, model, d = s.cfg.train, s.model, s.dist
    forward = forward if forward is not None else model
    loss_sum = _loss_fn(s)
    autocast = autocast_for(s.device, s.precision)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    bar = tqdm(total=s.total_steps, initial=state.step, disable=not progress, unit="step", dynamic_ncols=True)
    started = time.perf_counter() - state.elapsed
    window = [0, time.perf_counter()]  # tokens since the last metrics line, and when it was written
    warm = not getattr(forward, "needs_warm_up", False)
    model.train()
    while state.step < s.total_steps and not state.finished:
        batches = _epoch_batches(s, state.epoch)
        while state.batch_in_epoch < len(batches) and state.step < s.total_steps:
            # 1. the step's micro-batches; the loss is normalised by the target tokens of all of them
            step = _step_batches(s, state, batches)
            for g in optimizer.param_groups:
                g["lr"] = lr_at(state.step, s.total_steps, t.lr, t.warmup_steps, t.lr_schedule,
                                t.min_lr_ratio) * g.get("lr_scale", 1.0)
            if not warm:
                _warm_up_ddp(s, step, forward, loss_sum, autocast, optimizer)
                warm = True
            loss_value = _forward_backward(s, state, step, forward, loss_sum, autocast)
            signalled = 0.0
            if d.enabled:  # every process takes the same decisions: the global loss, and a stop signal any one got
                loss_value, signalled = d.all_reduce_sum([loss_value, float(stop.received is not None)])
            # 2. the gradient norm, clipped to max_grad_norm when set (an overflow in the backward pass can leave
            #    inf/NaN gradients behind a finite loss); a non-finite step is skipped or stops the run
            grad_norm = grad_total_norm(params, t.max_grad_norm)
            if _nonfinite(s, state, loss_value, grad_norm, log):
                optimizer.zero_grad(set_to_none=True)
                state.batch_in_epoch += 1
                continue
            # 3. the update
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.batch_in_epoch += 1
            state.tokens += step.tokens
            window[0] += step.tokens
            state.elapsed = time.perf_counter() - started
            # 4. log, validate, checkpoint, stop
            _log_and_validate(s, state, optimizer, loss_value, len(batches), window, history, autocast, log)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            tok_s=f"{state.tokens / max(1e-9, state.elapsed):.0f}")
            if t.save_every and state.step % t.save_every == 0:
                with d.gathered(model, optimizer):
                    if d.is_main:
                        save_checkpoint(s.out_dir, model, optimizer, state, d.world_size, s.global_batch,
                            s.trained_settings)
                log(f"checkpoint saved at step {state.step}")
            if (signalled > 0) if d.enabled else stop.received is not None:
                bar.close()
                raise _interrupted(s, model, optimizer, state)
            if state.finished:  # early stopping
                break
        if state.batch_in_epoch >= len(batches):
            state.epoch += 1
            state.batch_in_epoch = 0
    bar.close()


def _log_and_validate(s: Setup, state: RunState, optimizer, loss_value: float, n_batches: int, window: list,
                      history: list, autocast, log) -> None:
    """Every log_every steps a metrics line; every eval_every steps a validation (with val_loss in that line)."""
    t = s.cfg.train
    record = None
    if state.step % t.log_every == 0 or state.step == s.total_steps or (
            t.eval_every and state.step % t.eval_every == 0 and state.step < s.total_steps):
        record = {"step": state.step, "epoch": state.epoch + state.batch_in_epoch / n_batches, "loss": loss_value,
                  "lr": optimizer.param_groups[0]["lr"], "tokens": state.tokens, "elapsed": state.elapsed}
    if record is not None and (state.step % t.log_every == 0 or state.step == s.total_steps):
        now = time.perf_counter()
        record["tokens_per_s"] = window[0] / max(1e-9, now - window[1])
        window[0], window[1] = 0, now
    if t.eval_every and state.step % t.eval_every == 0 and state.step < s.total_steps:
        _after_validation(s, state, record, autocast, log)
        s.model.train()
    if record is not None:
        if s.dist.is_main:
            append_line(s.out_dir / "metrics.jsonl", json.dumps(record))
        s.trackers.log_record(record)
        history.append(record)


def grad_total_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The gradients' total L2 norm (clipping them to max_norm when set): one number that is finite exactly when
    every gradient is."""
    if max_norm is not None:
        return float(full_value(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)))
    grads = [p.grad for p in params if p.grad is not None]
    return float(full_value(torch.nn.utils.get_total_norm(grads, foreach=False))) if grads else 0.0


def out_of_memory_message(s: Setup, state: RunState) -> str:
    """One line: where it ran out, the shape of the step's largest micro-batch, and what to change."""
    t = s.cfg.train
    batches = _epoch_batches(s, state.epoch)
    batch = batches[min(state.batch_in_epoch, len(batches) - 1)]
    lengths = [len(e) for e in s.data.train]
    B = max(len(m) for m in split_batch(batch, lengths, t.grad_accum * s.dist.world_size))
    T = max(lengths[i] for i in batch)  # the longest example leads the first micro-batch
    return (f"out of memory on {s.device} at step {state.step + 1} (micro-batch of {B} examples x {T} tokens); "
            f"{last_checkpoint_note(s.out_dir)}; lower train.batch_size (now {t.batch_size}) and raise "
            f"train.grad_accum (now {t.grad_accum}) to keep the effective batch, lower data.max_length, or set "
            "train.gradient_checkpointing: true")


def _after_validation(s: Setup, state: RunState, record: dict, autocast, log) -> dict | None:
    """Validate, keep the best adapter, count patience. Adds val_loss to `record`."""
    metrics = _validate(s, autocast)
    if metrics is None:
        return None
    record["val_loss"] = metrics["loss"]
    if "accuracy" in metrics:
        record["val_accuracy"] = metrics["accuracy"]
    else:
        record["val_perplexity"] = metrics["perplexity"]
    if s.cfg.train.samples and (s.dist.is_main or s.dist.sharded):
        _samples(s, state, autocast, log)  # under fsdp each forward gathers shards from every process
    if state.best_val is None or metrics["loss"] < state.best_val:
        state.best_val, state.best_step = metrics["loss"], state.step
        state.evals_without_improvement = 0
        with s.dist.gathered(s.model):
            if s.dist.is_main:
                _save_adapter(s, state)
    else:
        state.evals_without_improvement += 1
        patience = s.cfg.train.early_stopping_patience
        if patience is not None and state.evals_without_improvement >= patience:
            log(f"early stopping at step {state.step}: no validation improvement in {patience} evaluations")
            state.finished = True
    return metrics


def _samples(s: Setup, state: RunState, autocast, log) -> None:
    """Decode the first train.samples validation prompts greedily (samples.py): samples.jsonl, the log, trackers."""
    t = s.cfg.train
    samples = decode_samples(s.model, s.data.val[:t.samples], t.sample_max_new_tokens, s.tokenizer, autocast)
    if not s.dist.is_main:  # fsdp: every process decoded the same greedy tokens; rank 0 alone writes
        return
    for i, sample in enumerate(samples, 1):
        append_line(s.out_dir / SAMPLES_FILE, json.dumps({"step": state.step, **sample}, ensure_ascii=False))
        log(f"sample {i}/{len(samples)} at step {state.step}: ...{escape_line(sample['prompt'][-40:])} -> "
            f"{escape_line(sample['generated'])}")
    s.trackers.log_samples(state.step, samples)


def _save_adapter(s: Setup, state: RunState) -> None:
    cfg = s.cfg
    metadata = {
        "base_model": s.base.describe(),
        # a tokenizer path as an absolute one: the adapter is used from other folders than the run's
        "model_spec": replace(cfg.model, tokenizer=local_path(cfg.model.tokenizer)).to_yaml(),
        "task": cfg.task,
        "tokenizer": local_path(s.tokenizer.name),
        "data": {"format": s.data.fmt, "columns": s.data.mapping, "prompt_template": cfg.data.prompt_template,
                 "mask_prompt": cfg.data.mask_prompt, "max_length": cfg.data.max_length, "labels": s.data.labels,
                 "chat_template": s.data.chat_template, "train_on": cfg.data.train_on},
        "training": {"step": state.step, "best_val_loss": state.best_val, "best_step": state.best_step,
                     "tokens": state.tokens, "lr": cfg.train.lr, "epochs": cfg.train.epochs, "seed": cfg.train.seed},
    }
    save_adapter(s.out_dir / ADAPTER_FILE, s.model, metadata)


def _finish(s: Setup, optimizer, state: RunState, history: list, log) -> dict | None:
    """Final validation, the adapter (best, or last without validation), a final checkpoint and the plot."""
    autocast = autocast_for(s.device, s.precision)
    final = None
    if s.data.val and (not history or "val_loss" not in history[-1] or history[-1]["step"] != state.step):
        epoch = state.epoch + state.batch_in_epoch / s.steps_per_epoch  # fractional, as the step lines have it
        record = {"step": state.step, "epoch": epoch, "tokens": state.tokens, "elapsed": state.elapsed}
        final = _after_validation(s, state, record, autocast, log)
        if s.dist.is_main:
            append_line(s.out_dir / "metrics.jsonl", json.dumps(record))
        s.trackers.log_record(record)
        history.append(record)
    elif history and "val_loss" in history[-1]:
        final = {"loss": history[-1]["val_loss"]}
    state.finished = True
    with s.dist.gathered(s.model, optimizer):
        if s.dist.is_main:  # only rank 0 writes
            if not s.data.val:
                _save_adapter(s, state)
            save_checkpoint(s.out_dir, s.model, optimizer, state, s.world_size, s.global_batch,
                            s.trained_settings)
            plot_losses(history, s.out_dir / "loss.png")
    best = f", best validation loss {state.best_val:.4f} at step {state.best_step}" if state.best_val is not None else ""
    log(f"done: {state.step} step{'s' if state.step != 1 else ''}{best}; adapter written to {s.out_dir / ADAPTER_FILE}")
    return final
