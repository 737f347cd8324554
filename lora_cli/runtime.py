"""Where and in what precision tensors live: device names, precision names, autocast, dtype names; and the
CPU's OpenMP threads.

The foundation layer: everything above (training, evaluation, the commands) asks here, so a precision name maps
to one torch dtype in one place.
"""

from __future__ import annotations

import ctypes
from contextlib import nullcontext

import torch

from lora_cli.errors import ConfigError, TrainingError

# Precision names (config `train.precision`, `lora merge --dtype`, adapter dtypes) -> torch dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# A safetensors header's dtype names -> torch dtypes (the float8 ones where this torch has them)
SAFETENSORS_DTYPES = {name: dtype for name, dtype in (
    ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
    ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8), ("U8", torch.uint8),
    ("U16", getattr(torch, "uint16", None)), ("U32", getattr(torch, "uint32", None)),
    ("U64", getattr(torch, "uint64", None)),
    ("BOOL", torch.bool), ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)),
    ("F8_E5M2", getattr(torch, "float8_e5m2", None))) if dtype is not None}


def as_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """torch dtype from a dtype or a name (fp32, bf16, fp16, float32, ...)."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"adapter dtype must be one of fp32, bf16, fp16, got {dtype!r}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """`auto` (cuda > mps > cpu) or a torch device name that is available here (train.device)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"train.device is {name} but CUDA is not available here; use device: auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError(f"train.device is {name} but MPS is not available here; use device: auto or cpu")
    return device


def device_option(name: str = "auto") -> torch.device:
    """resolve_device for a command's `--device` flag: its errors name the flag."""
    try:
        return resolve_device(name)
    except TrainingError as exc:  # CUDA or MPS asked for but absent
        raise ConfigError(f"--device {name}: that device is not available here; use --device auto or cpu") from exc
    except RuntimeError as exc:  # torch.device("nonsense")
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from exc


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast on CUDA (fp32 LoRA weights and optimizer), fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError("train.precision fp16 needs a CUDA device; use bf16 or fp32 on this machine")
    return precision


def autocast_for(device: torch.device, precision: str):
    """A zero-argument factory of autocast contexts (fp32: a no-op)."""
    if precision == "fp32":
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=DTYPES[precision])


# `--precision` of the inference commands (generate, eval, predict, serve): the dtype the weights are stored in.
INFERENCE_PRECISIONS = ("fp32", "bf16", "fp16")


def inference_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of `--precision` on `device`: fp16 needs CUDA (CPU fp16 matmuls are slow and overflow-prone)."""
    if precision not in INFERENCE_PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(INFERENCE_PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"--precision fp16 needs a CUDA device (this is {device.type}); use bf16 or fp32 here")
    return DTYPES[precision]


OMP_PAUSE_SOFT = 1  # OpenMP 5.0's omp_pause_resource_t: omp_pause_soft


def release_openmp_threads() -> bool:
    """Let go of the calling thread's OpenMP worker threads (OpenMP 5.0's omp_pause_resource_all, soft); call it
    before handing the computing to another thread. Returns whether the OpenMP runtime did.

    torch's CPU kernels run on OpenMP, and each thread that starts parallel work gets its own team of workers.
    libgomp spins a waiting worker for a while between parallel regions only while it manages no more threads than
    there are CPUs; beyond that it spins 100 times and sleeps, and every parallel region pays for waking it.
    `lora serve` loads its models on the main thread and decodes on its engine thread: two teams. On 2 cores the
    engine's linear layers then used 1.0-1.6 cores' CPU time instead of 2.0 and took 15.6-22 instead of 12-14 ms
    (GPT-2's 48 block linears, one row); released first, 2.0 cores and 15 ms, as on the main thread. torch loads
    its OpenMP runtime with its symbols global on Linux; where the symbol is not found this does nothing."""
    try:
        pause = ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError, TypeError):  # no OpenMP 5.0 runtime in the global namespace (or no dlopen(NULL))
        return False
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause(OMP_PAUSE_SOFT) == 0
