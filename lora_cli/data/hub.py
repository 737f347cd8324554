"""Datasets read through the Hugging Face `datasets` library (the optional extra `hf-datasets`): a hub dataset
named `hf://datasets/OWNER/NAME` (data.subset picks its configuration), or a directory written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk`.

A hub dataset is downloaded and prepared once into `datasets`' cache (HF_HOME, HF_DATASETS_CACHE) and read from
there afterwards; with HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1 it is read from that cache only. The split:
data.split for data.train (and --data), `validation` for data.val, `test` for data.test. The rows come back as
a pandas DataFrame of Python values (object dtype, nulls as None), as data.io reads a Parquet file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lora_cli.config import DataConfig
from lora_cli.errors import ConfigError, DataError, first_line

if TYPE_CHECKING:  # pandas and datasets are imported when a dataset is read
    import pandas as pd

HUB_PREFIX = "hf://datasets/"
KEY_SPLITS = {"data.val": "validation", "data.test": "test"}  # the split each key reads; others read data.split
INSTALL = "pip install 'lora-cli[hf-datasets]'"


def is_hub_dataset(source: str | Path) -> bool:
    return str(source).startswith(HUB_PREFIX)


def is_saved_dataset(path: str | Path) -> bool:
    """A directory written by save_to_disk: a Dataset's (state.json) or a DatasetDict's (dataset_dict.json)."""
    path = Path(path)
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def split_for(key: str, data_cfg: DataConfig) -> str:
    return KEY_SPLITS.get(key, data_cfg.split)


def read_dataset(source: str, data_cfg: DataConfig, key: str = "data.train") -> tuple["pd.DataFrame", dict]:
    """One split of a hub dataset or a save_to_disk directory -> (DataFrame, {column: class names}); every failure
    is one DataError line naming the key and the source. A ClassLabel column holds its class names, not their
    ids (-1, "no label", becomes a missing value), and the names come back in the ClassLabel's order."""
    try:  # optional: only these sources need it
        import datasets
    except ImportError:
        raise ConfigError(f"{key}: {source} is read with the `datasets` library, which is not installed; "
                          f"{INSTALL}") from None
    from huggingface_hub.utils import logging as hf_logging  # installed with datasets

    datasets.logging.set_verbosity_error()  # "Using the latest cached version ..." is not for our users
    hf_logging.set_verbosity_error()  # nor the download's retry warnings (12 lines when the hub is unreachable)
    split = split_for(key, data_cfg)
    if is_hub_dataset(source):
        ds = _load_hub(datasets, source, data_cfg.subset, split, key)
    else:
        ds = _load_saved(datasets, source, split, key)
    if len(ds) == 0:
        raise DataError(f"{key}: {source}: split {split!r} has no rows; add at least one")
    import pandas as pd  # lazily, as data.io does

    frame = _frame(ds.with_format("arrow")[:], f"{key}: {source}")
    classes = {str(name): list(feature.names) for name, feature in ds.features.items()
               if isinstance(feature, datasets.ClassLabel)}
    for name, names in classes.items():
        frame[name] = pd.Series([names[v] if isinstance(v, int) and 0 <= v < len(names) else None
                                 for v in frame[name]], index=frame.index, dtype=object)
    return frame, classes


def _repo(source: str) -> str:
    return source[len(HUB_PREFIX):].strip("/")


def hub_name_problem(source: str, key: str) -> str | None:
    """A source that is not hf://datasets/OWNER/NAME: checked before anything is read (data.io.source_problem)."""
    repo = _repo(source)
    if repo.count("/") != 1 or not all(repo.split("/")):
        return f"{key}: {source} is not a hub dataset name; write hf://datasets/OWNER/NAME"
    return None


def _load_hub(datasets, source: str, subset: str | None, split: str, key: str):
    repo = _repo(source)  # its form was checked by read_table (hub_name_problem)
    try:
        return datasets.load_dataset(repo, subset, split=split)
    except Exception as exc:  # noqa: BLE001: the library raises ConnectionError, ValueError, FileNotFoundError, ...
        offline = datasets.config.HF_HUB_OFFLINE or getattr(datasets.config, "HF_DATASETS_OFFLINE", False)
        reason = first_line(exc)
        if "Unknown split" in reason:
            what = f"has no split {split!r} ({reason}); set data.split"
        elif offline:
            what = (f"is not in the local cache ({reason}); HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: load it "
                    "once online, or unset them")
        else:
            what = f"cannot be loaded ({reason}); check the name, data.subset and data.split"
        raise DataError(f"{key}: {source}{f' (subset {subset})' if subset else ''} {what}") from None


def _load_saved(datasets, source: str, split: str, key: str):
    try:
        ds = datasets.load_from_disk(source)
    except Exception as exc:  # noqa: BLE001: a damaged directory raises whatever its files cause
        raise DataError(f"{key}: {source}: cannot read the save_to_disk directory ({first_line(exc)}); save it "
                        "again with Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{key}: {source} has no split {split!r} (it has {', '.join(ds)}); set data.split")
        ds = ds[split]
    return ds


def _frame(table, where: str) -> "pd.DataFrame":
    """A pyarrow Table -> DataFrame of Python values, object dtype (as data.io frames a Parquet file)."""
    import pandas as pd  # lazily, as data.io does

    names = [str(c) for c in table.column_names]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{where}: duplicate column name {duplicates[0]!r}; give every column a distinct name")
    return pd.DataFrame({n: table.column(i).to_pylist() for i, n in enumerate(names)}, columns=names, dtype=object)
