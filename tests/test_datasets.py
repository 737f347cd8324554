"""Datasets by name and in columnar files (data.train as a .parquet file, a `save_to_disk` directory or
hf://datasets/OWNER/NAME read offline from `datasets`' cache) load the same rows; a dataset missing offline and a
missing split are one line; and `lora train --dry-run --show N` prints the exact examples, their trained tokens and
the examples truncation left without one."""

from __future__ import annotations

import json

import pytest

from helpers import assert_one_line_error, child_env, cli
from lora_cli.config import DataConfig
from lora_cli.data import read_table

datasets = pytest.importorskip("datasets")

ROWS = [{"prompt": "Say apple", "completion": "apple", "n": 1},
        {"prompt": "Say river twice", "completion": "river river", "n": None},
        {"prompt": "A prompt far too long to leave room for any answer at all here", "completion": "no", "n": 3},
        {"prompt": "Say stone", "completion": "stone", "n": 4}]
REVISION = "ab" * 20  # the hub commit a real download would name its cache folder after


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The rows as a Parquet file, a Dataset and a DatasetDict written by save_to_disk, and a hub dataset
    `owner/name` in `datasets`' own cache (HF_HOME=hf) exactly as `load_dataset` prepares a downloaded Parquet
    repository there: datasets/owner___name/default/0.0.0/REVISION/ with name-train.arrow and dataset_info.json."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    root = tmp_path_factory.mktemp("datasets")
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.to_parquet(str(root / "train.parquet"))
    dataset.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": dataset, "validation": dataset.select([0, 1])}).save_to_disk(str(root / "dict"))
    builder = Parquet(dataset_name="name", config_name="default", cache_dir=str(root / "builder"),
                      data_files={"train": [str(root / "train.parquet")]})
    builder.download_and_prepare(output_dir=str(root / "hf" / "datasets" / "owner___name" / "default" / "0.0.0"
                                                 / REVISION))
    return root


def offline(root):
    return child_env(HF_HOME=str(root / "hf"), HF_DATASETS_OFFLINE="1")


def write_config(root, train: str, extra: str = "") -> str:
    config = root / f"run-{abs(hash((train, extra)))}.yaml"
    config.write_text(f"""\
model: {{name: gpt2, init: random, n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64, seed: 7}}
data: {{train: "{train}", val_split: 0.0, max_length: 14{extra}}}
lora: {{r: 2, alpha: 4, dropout: 0.0}}
""")
    return str(config)


def test_parquet_and_save_to_disk_directories_read_the_same_rows(sources):
    cfg = DataConfig()
    parquet = read_table(sources / "train.parquet", cfg).frame
    assert parquet.to_dict("records") == ROWS
    for source in ("saved", "dict"):
        assert read_table(sources / source, cfg).frame.equals(parquet), source


SHOWN = """\
training examples 1-3 of 3 ([[...]] carries loss):
example 1 (row 1): 5 tokens, 2 trained
  Say apple
  [[apple<|endoftext|>]]
example 2 (row 2): 7 tokens, 3 trained
  Say river twice
  [[river river<|endoftext|>]]
example 3 (row 4): 5 tokens, 2 trained
  Say stone
  [[stone<|endoftext|>]]
examples left without a trained token by truncation: 1
warning: 1 example lost every trained token to truncation at data.max_length=14 and is left out; raise \
data.max_length or shorten their prompts
"""


def test_dry_run_show_is_the_same_from_parquet_save_to_disk_and_the_offline_hub_cache(sources):
    """The same examples, marks and counts whichever source the rows come from (the hub dataset read from the
    offline cache for real, by `load_dataset`)."""
    outputs = {}
    for name, train in (("parquet", sources / "train.parquet"), ("saved", sources / "saved"),
                        ("hub", "hf://datasets/owner/name")):
        done = cli("train", write_config(sources, train), "--dry-run", "--show", "5", cwd=sources, env=offline(sources))
        assert done.rc == 0, (name, done.stderr)
        lines = done.stdout.splitlines()
        assert lines[2].startswith(f"{train}: prompt_completion, 4 rows -> 3 examples (1 truncated to 14 tokens, "
                                   "1 dropped"), lines[2]
        outputs[name] = done.stdout[done.stdout.index("training examples"):]
    assert outputs["parquet"] == SHOWN
    assert outputs["saved"] == outputs["hub"] == SHOWN


def test_a_hub_dataset_missing_from_the_offline_cache_is_one_line(sources):
    done = cli("train", write_config(sources, "hf://datasets/owner/missing"), "--dry-run", cwd=sources,
               env=offline(sources))
    line = assert_one_line_error(*done, expected_code=1)
    assert line.startswith("error: data.train: hf://datasets/owner/missing is not in the local cache (")
    assert line.endswith("HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: load it once online, or unset them")


def test_a_missing_split_names_the_splits_there_are(sources):
    done = cli("train", write_config(sources, sources / "dict", ", split: test"), "--dry-run", cwd=sources,
               env=offline(sources))
    line = assert_one_line_error(*done, expected_code=1)
    assert line == (f"error: data.train: {sources / 'dict'} has no split 'test' (it has train, validation); set "
                    "data.split")
    done = cli("train", write_config(sources, sources / "dict", ", split: validation"), "--dry-run", "--show", "1",
               cwd=sources, env=offline(sources))
    assert done.rc == 0 and "training examples 1-1 of 2" in done.stdout


def test_show_needs_dry_run(sources):
    done = cli("train", write_config(sources, sources / "train.parquet"), "--show", "2", cwd=sources)
    line = assert_one_line_error(*done, expected_code=2)
    assert line == "error: --show N goes with --dry-run (it shows examples instead of training)"


def test_lora_eval_reads_hub_datasets_and_saved_splits(sources, tmp_path):
    """`lora eval --data` takes the same sources as data.train: the hub dataset (offline cache) and a saved
    DatasetDict's split (--split) give the figures of the same rows read from Parquet."""
    done = cli("train", write_config(sources, sources / "train.parquet"), "--set", f"out_dir={tmp_path / 'out'}",
               "--set", "train.max_steps=1", "-q", cwd=sources)
    assert done.rc == 0, done.stderr
    adapter = tmp_path / "out" / "adapter.safetensors"

    def figures(*data):
        done = cli("eval", "--adapter", adapter, "--data", *data, "--json", "--no-base", cwd=sources,
                   env=offline(sources))
        assert done.rc == 0, done.stderr
        result = json.loads(done.stdout)
        return result["loss"], result["tokens"], result["examples"]

    parquet = figures(sources / "train.parquet")
    assert parquet[2] == 3
    assert figures("hf://datasets/owner/name") == parquet
    assert figures(sources / "dict", "--split", "train") == parquet
    assert figures(sources / "dict", "--split", "validation")[2] == 2  # rows 1 and 2 of the same data


def test_class_label_columns_read_as_their_names_in_their_order(tmp_path):
    """A datasets ClassLabel column holds ids; it is read as the class names (-1, "no label", as a missing value),
    and the classes keep the ClassLabel's order (not sorted), as the dataset's ids number them."""
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["World", "Sports", "Business"])})
    rows = {"text": ["match won", "markets fell", "summit held", "cup final", "shares rose", "no label here"],
            "label": [1, 2, 0, 1, 2, -1]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "news"))
    table = read_table(tmp_path / "news", DataConfig())
    assert table["label"] == ["Sports", "Business", "World", "Sports", "Business", None]
    assert table.classes == {"label": ["World", "Sports", "Business"]}
    from lora_cli.data import encode_records

    examples, stats = encode_records(table, "classification", {"text": "text", "label": "label"},
                                     DataConfig(skip_bad_rows=True), tmp_path / "news")
    assert [e.label for e in examples] == [1, 2, 0, 1, 2] and stats.skipped == 1 and stats.labels == [
        "World", "Sports", "Business"]
