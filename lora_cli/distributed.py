"""Data-parallel training with torch.distributed, launched the standard way: torchrun (or `lora train --nproc N`,
which hands over to torchrun's own launcher).

The environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) is the whole contract: a
process that finds RANK and WORLD_SIZE joins the process group (NCCL when it trains on CUDA, each process on the
GPU of its local rank; gloo on the CPU); one without them trains alone, exactly as before. There is no process
management or communication of our own: torchrun starts, watches and tears down the processes, DDP all-reduces the
gradients, and the few other collectives (token counts, the step's loss, validation sums, resume state) are single
torch.distributed calls.

How one optimizer step is spread (see train._loop): the epoch is a list of global batches (data.batch_indices at
the global batch's size, length-grouped); step s takes global batch s, sorted by length and cut into A*W
contiguous micro-batches (data.split_batch), rank r running micro-batches r*A ... (r+1)*A - 1. So the step's
examples depend on the global batch only, not on (batch_size, grad_accum, W). The loss of each micro-batch is
normalised by the target tokens of the whole global batch (all-reduced before backward) and multiplied by W,
because DDP averages the gradients over the W processes; the result is the single-process gradient.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lora_cli.errors import ConfigError, LoraError, TrainingError, first_line


def launched() -> bool:
    """True in a process started by torchrun (or anything that sets its environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_world_size() -> int:
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


@dataclass
class Dist:
    """This process's place in the job. The default is a single process with no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None  # "nccl" or "gloo" once the process group is up; None: a single process
    sharded: bool = False  # the model is sharded over the processes (wrap_fsdp)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over all processes, in float64 (exact for counts below 2**53)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, fn):
        """Run fn on rank 0 only and hand its result to every process; if it raises a LoraError, every process
        raises it (so no process waits forever for a peer that stopped). Used for what touches out_dir."""
        if not self.enabled:
            return fn()
        import torch.distributed as dist

        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except LoraError as exc:
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            if not self.is_main:
                value.from_rank0 = True  # the CLI lets rank 0 print it, once
            raise value
        return value

    @contextmanager
    def gathered(self, model: torch.nn.Module, optimizer=None):
        """Every process: for the duration of the block, the model's trainable parameters, its task head and the
        optimizer's state are whole plain tensors, so the single-process writers (adapter.save_adapter,
        rundir.save_checkpoint) run unchanged on rank 0 and write the same files as under DDP. A no-op unless
        sharded. The base's frozen weights stay sharded: gathering them would need the memory FSDP saves."""
        if not self.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule  # here: only an fsdp run pays for FSDP's import
        from torch.distributed.tensor import DTensor

        from lora_cli.models.common import HEAD

        for module in model.modules():  # a forward without backward (validation) may leave the root unsharded
            if isinstance(module, FSDPModule):
                module.reshard()
        swapped = []  # (module, name, the sharded parameter FSDP keeps a reference to)
        for full_name, p in list(model.named_parameters()):
            if isinstance(p, DTensor) and (p.requires_grad or full_name.startswith(HEAD + ".")):
                module_name, _, name = full_name.rpartition(".")
                module = model.get_submodule(module_name)
                module.register_parameter(name, torch.nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad))
                swapped.append((module, name, p))
        states = {}
        if optimizer is not None:
            for p, state in optimizer.state.items():
                states[p] = state
                optimizer.state[p] = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}
        try:
            yield
        finally:  # FSDP's own parameters and state back in place before the next forward
            for module, name, p in swapped:
                module.register_parameter(name, p)
            for p, state in states.items():
                optimizer.state[p] = state

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.backend = None


def init_distributed(device: torch.device) -> Dist:
    """Join torchrun's process group when launched by it; else a single-process Dist on `device`.

    Under torchrun a CUDA run puts each process on cuda:LOCAL_RANK and uses NCCL; a CPU run uses gloo."""
    if not launched():
        return Dist(device=device)
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        if device.index is not None:
            raise TrainingError(f"train.device is {device}, but under torchrun each process uses the GPU of its local "
                                "rank (cuda:LOCAL_RANK); set train.device to auto or cuda")
        if local >= torch.cuda.device_count():
            raise TrainingError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible on this machine; "
                                f"start at most {torch.cuda.device_count()} processes per node (--nproc_per_node)")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise TrainingError(f"train.device {device.type} cannot be shared by several processes; use CUDA (nccl) or "
                            "train.device: cpu (gloo)")
    try:
        dist.init_process_group(backend)
    except (RuntimeError, ValueError) as exc:
        raise TrainingError(f"cannot join the torchrun process group as rank {rank} of {world} ({short_reason(exc)}); "
                            "start the run with torchrun or `lora train --nproc N`") from exc
    return Dist(rank, world, local, device, backend)


def wrap_ddp(model: torch.nn.Module, d: Dist):
    """DistributedDataParallel with settings that fit LoRA on a frozen base.

    - find_unused_parameters=False: every trainable parameter (the LoRA factors, a trained head) gets a gradient
      in every step, so DDP never needs its per-step search of the autograd graph for unused parameters.
    - static_graph=True: the set of trainable parameters and the graph never change during a run; DDP records
      the graph once and also accepts parameters used outside forward (the classification head) and
      activation checkpointing. Its first backward must be a synchronised one (not under no_sync): train._loop
      spends one zero-weighted micro-batch on it.
    - gradient_as_bucket_view=True: gradients live in DDP's all-reduce buckets; no copy, no second gradient buffer.
    - bucket_cap_mb: the trainable set of a LoRA run is small (GPT-2 124M, r=8 on c_attn: 1.2 MB in fp32), so one
      bucket holds it all and each step does a single all-reduce; the overlap smaller buckets would buy is worth
      less than the per-call latency. Trainable sets above DDP's default 25 MB keep 25 MB buckets.
    - buffers are not re-broadcast at every forward: GPT-2 has none that change in training.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    kwargs = dict(static_graph=True, find_unused_parameters=False, gradient_as_bucket_view=True,
                  bucket_cap_mb=min(25, max(1, math.ceil(trainable_bytes / 2**20))))
    # torch 2.13 renamed broadcast_buffers (now deprecated, with a warning) to forward_sync_buffers
    params = inspect.signature(DDP.__init__).parameters
    kwargs["forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"] = False
    if d.device is not None and d.device.type == "cuda":
        kwargs.update(device_ids=[d.device.index], output_device=d.device.index)
    return DDP(model, **kwargs)


class DDPView:
    """The model as the loss functions see it under DDP: calls go through DDP's forward (which arms its gradient
    hooks), attributes (logits, lm_head, score, config) come from the wrapped module."""

    needs_warm_up = True  # static_graph: the first backward must be a synchronised one

    def __init__(self, ddp):
        self.ddp = ddp

    def __call__(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.ddp.module, name)

    def no_sync(self):
        return self.ddp.no_sync()


class FSDPView:
    """The model as the loss functions see it under FSDP: fully_shard changed the module in place, so calls and
    attributes are the model's own; no_sync() defers the gradient reduce-scatter to a step's last micro-batch,
    as DDP's no_sync defers its all-reduce."""

    needs_warm_up = False  # no static graph to record

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)

    @contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)


def wrap_fsdp(model: torch.nn.Module, optimizer, d: Dist) -> FSDPView:
    """Shard the model over the processes with FSDP2 (torch.distributed.fsdp.fully_shard; Zhao et al. 2023, "PyTorch
    FSDP: Experiences on Scaling Fully Sharded Data Parallel"): each transformer block, then the root (embeddings,
    final norm, head). Every parameter, the frozen base's and LoRA's alike, becomes a DTensor holding 1/W of its
    rows (Shard(0), W = world size); a block's weights are all-gathered just before its forward and freed after
    it (again for the backward), and gradients are reduce-scattered, averaged over the processes as DDP's are.

    fully_shard replaces the parameters, so the optimizer (built, and possibly loaded from a checkpoint, on the
    whole ones) is moved onto the new ones in place: its param_groups point at the DTensors and its state becomes
    each process's shard of the saved tensors (every process holds the whole checkpoint: no communication)."""
    from torch.distributed.device_mesh import init_device_mesh  # here: only an fsdp run pays for FSDP's import
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    # this run's device type: fully_shard's default mesh is CUDA whenever a GPU is visible, even for a CPU run
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    before = dict(model.named_parameters())
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    after = dict(model.named_parameters())
    new = {id(before[name]): after[name] for name in before}
    for group in optimizer.param_groups:
        group["params"] = [new[id(p)] for p in group["params"]]
    for old in list(optimizer.state):
        p, state = new[id(old)], optimizer.state.pop(old)
        optimizer.state[p] = {k: distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                              if torch.is_tensor(v) and v.shape == p.shape else v for k, v in state.items()}
    d.sharded = True
    return FSDPView(model)


def shard_sizes(model: torch.nn.Module, d: Dist) -> list[int]:
    """The parameter elements each process holds, by rank (a collective: every process gets the list)."""
    mine = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    counts = [0.0] * d.world_size
    counts[d.rank] = mine
    return [int(c) for c in d.all_reduce_sum(counts)]


def with_extra_passes(batches, extra: int, run):
    """`batches`, then `run()` called `extra` times before the iteration ends. Under FSDP every forward all-gathers
    weights with the other processes, so a process with fewer validation batches than its peers makes up the
    difference with passes whose results are dropped, still inside the evaluation loop (before its reduce)."""
    yield from batches
    for _ in range(extra):
        run()


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's whole value (a collective: every process calls it); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def resolve_batch(batch_size: int, grad_accum: int, global_batch_size: int | None, world_size: int) -> tuple[int, int]:
    """(batch_size, grad_accum) of each process. Without train.global_batch_size: as configured. With it, the
    global batch is shared evenly by the processes, and each process's share is cut into the fewest micro-batches
    whose size divides it and stays within train.batch_size (the memory cap): grad_accum follows, and batch_size
    is lowered only when it does not divide the share."""
    if global_batch_size is None:
        return batch_size, grad_accum
    if global_batch_size % world_size:
        lower = global_batch_size // world_size * world_size
        hint = f"{lower} or {lower + world_size}" if lower else f"{world_size}"
        raise ConfigError(f"train.global_batch_size {global_batch_size} cannot be split evenly over {world_size} "
                          f"processes; use a multiple of {world_size} (e.g. {hint}) or another process count")
    share = global_batch_size // world_size
    # the largest micro-batch within batch_size that divides the share: at most batch_size trials, however
    # large the share (counting accumulation steps up from 1 took share trials for a prime share)
    micro = next(m for m in range(min(batch_size, share), 0, -1) if share % m == 0)
    return micro, share // micro


def short_reason(exc: BaseException) -> str:
    """The first sentence of an error, without the C++ source location gloo and NCCL put in front."""
    text = first_line(exc, limit=10_000)
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ")[0].rstrip(".")


def is_comm_failure(exc: BaseException) -> bool:
    """A collective that failed because a peer died or the network broke (not a bug in the step)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "NCCL", "gloo", "timed out", "Timed out", "ProcessGroup"))


def launch(nproc: int, train_args: list[str]) -> int:
    """`lora train --nproc N ...`: run `torchrun --standalone --nproc_per_node N -m lora_cli train ...` in this
    process (torch.distributed.run, the launcher torchrun is). Returns the exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", "--nproc_per_node", str(nproc), "-m", "lora_cli",
                                         "train", *train_args])
    # The launcher's banner (OMP_NUM_THREADS) and its failure report: each process prints its own error line, and
    # a crash is reported below, in one line
    for name in ("torch.distributed.run", "torch.distributed.elastic"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except SignalException:  # Ctrl-C or SIGTERM: torchrun passed it on; the processes saved and said so
        return 130
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()  # the root cause; the others were stopped because of it
        if failure.exitcode in (1, 2, 130):  # the process printed its own one-line error
            return failure.exitcode
        how = f"exit code {failure.exitcode}"
        if failure.exitcode < 0:
            import signal

            try:
                how = f"killed by {signal.Signals(-failure.exitcode).name}"
            except ValueError:
                how = f"killed by signal {-failure.exitcode}"
        raise TrainingError(f"training process rank {rank} stopped ({how}) and the others with it; continue from "
                            "the last checkpoint with the same command and --resume") from None
    return 0
