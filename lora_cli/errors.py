"""The LoraError family: every failure a user can cause or fix.

The CLI turns any LoraError into one line on stderr and its exit code; anything else is a bug and keeps its
traceback. Messages name the file, key or row at fault and say what to do.
"""

import re


class LoraError(Exception):
    """A user-facing failure carrying a one-line message."""

    exit_code = 1


class ConfigError(LoraError):
    """A bad config file, key, value or command-line flag."""

    exit_code = 2


class DataError(LoraError):
    """A dataset that cannot be read or does not fit the chosen format."""


class ConversationError(DataError):
    """A conversation that does not fit the chat format or its chat template (a message without a role, an unknown
    role, no assistant turn, a template that fails to render it). Exit code 2, like a bad flag: issue 16 asks
    it so, because the fix is in the user's input, not in a file the tool could not read."""

    exit_code = 2


class CheckpointError(LoraError):
    """A model checkpoint that cannot be found, read or matched to GPT-2."""


class AdapterError(LoraError):
    """An adapter file or PEFT directory that cannot be read or does not fit the base model."""


class TrainingError(LoraError):
    """A run that had to stop (non-finite loss, out of memory, existing output directory)."""


class InUseError(LoraError):
    """An output directory that a live `lora train` or `lora merge` holds (fsutil.run_lock)."""


def all_problems(label: str, problems: list[str]) -> str:
    """Every problem of one input in one line: 'LABEL: N problems: a; b' (one: 'LABEL: a')."""
    count = f"{len(problems)} problems: " if len(problems) > 1 else ""
    return f"{label}: {count}{'; '.join(problems)}"


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its class name when it has none), for one-line error reports."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS out-of-memory errors, and the CPU allocator's ("can't allocate memory") or Python's MemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def out_of_memory_line(exc: BaseException) -> str:
    """One line for running out of memory outside a training step (building a model of huge sizes or rank,
    loading one too large for this machine): how much was asked for, when the allocator says, and what to do."""
    asked = re.search(r"allocate (\d+) bytes", str(exc))
    size = f" (an allocation of {int(asked.group(1)) / 2**30:,.1f} GiB)" if asked else ""
    return (f"out of memory{size}; choose a smaller model (or model sizes), a lower lora.r, a smaller batch "
            "(train.batch_size, --batch-size), or fewer and shorter inputs")


# Other tools' names for our keys (PEFT's LoraConfig, transformers' TrainingArguments): too far apart to spell alike.
KNOWN_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                 "target_modules": "targets", "learning_rate": "lr", "num_train_epochs": "epochs",
                 "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
                 "lr_scheduler_type": "lr_schedule", "output_dir": "out_dir"}


def first_repeat(items):
    """The first item that an earlier one equals (for a message naming it), or None when all are distinct."""
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def did_you_mean(key: str, choices) -> str:
    """' (did you mean X?)' for the closest of `choices` (or the one another tool names so), or '' when none is
    close."""
    import difflib  # only on the error path

    choices = list(choices)
    if KNOWN_ALIASES.get(key) in choices:
        return f" (did you mean {KNOWN_ALIASES[key]}?)"
    match = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""
