"""The LoraError family: every failure a user can cause or fix.

The CLI turns any LoraError into one line on stderr and its exit code; anything else is a bug and keeps its
traceback. Messages name the file, key or row at fault and say what to do.
"""


class LoraError(Exception):
    """A user-facing failure carrying a one-line message."""

    exit_code = 1


class ConfigError(LoraError):
    """A bad config file, key, value or command-line flag."""

    exit_code = 2


class DataError(LoraError):
    """A dataset that cannot be read or does not fit the chosen format."""


class CheckpointError(LoraError):
    """A model checkpoint that cannot be found, read or matched to GPT-2."""


class AdapterError(LoraError):
    """An adapter file or PEFT directory that cannot be read or does not fit the base model."""


class TrainingError(LoraError):
    """A run that had to stop (non-finite loss, out of memory, existing output directory)."""
