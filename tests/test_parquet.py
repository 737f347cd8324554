"""Parquet data files: read by pandas (pyarrow) into the same pipeline as CSV. The same rows as Parquet and as
CSV give the same encoded examples, the same training losses and adapter, the same `lora eval` figures and the
same `lora predict` answers; non-string Parquet columns read as a CSV would show them (nulls are missing cells),
and a file that is not Parquet is one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file as load_tensors

from lora_cli import data as D
from lora_cli.config import DataConfig
from lora_cli.errors import DataError

from helpers import alpaca_rows, assert_one_line_error, cli, make_hf_gpt2

POS = ["great", "lovely", "excellent", "happy", "wonderful"]
NEG = ["awful", "terrible", "horrible", "sad", "dreadful"]


def classification_rows(n=32):
    """Texts with one telling word each; labels alternate neg / pos."""
    return [{"text": f"the day was {(POS if i % 2 else NEG)[i % 5]} and so on {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(n)]


def write_both(folder: Path, name: str, rows: list[dict]) -> tuple[Path, Path]:
    """The same rows as NAME.csv (pandas' to_csv) and NAME.parquet (pandas' to_parquet with pyarrow)."""
    frame = pd.DataFrame(rows)
    csv_path, parquet_path = folder / f"{name}.csv", folder / f"{name}.parquet"
    frame.to_csv(csv_path, index=False)
    frame.to_parquet(parquet_path, index=False)
    return csv_path, parquet_path


def same_examples(a, b):
    return [(e.ids, e.loss_mask, e.label, e.row) for e in a] == [(e.ids, e.loss_mask, e.label, e.row) for e in b]


# --------------------------------------------------------------------------------------------------- reading


def test_parquet_encodes_like_the_same_rows_in_csv(tmp_path):
    rows = alpaca_rows() + [{"instruction": 'Quote "this", please.', "input": "a, b\nc", "output": "NA"}]
    csv_path, parquet_path = write_both(tmp_path, "alpaca", rows)
    from_csv = D.load_file(csv_path, DataConfig())
    from_parquet = D.load_file(parquet_path, DataConfig())
    assert from_parquet[3] == from_csv[3] == "alpaca"
    assert same_examples(from_parquet[0], from_csv[0]) and len(from_csv[0]) == len(rows)
    stats_csv, stats_parquet = from_csv[1], from_parquet[1]
    assert (stats_parquet.rows, stats_parquet.tokens, stats_parquet.target_tokens) == (
        stats_csv.rows, stats_csv.tokens, stats_csv.target_tokens)
    frame = from_parquet[2]
    assert frame.columns == ["instruction", "input", "output"] and frame.lines is None
    assert frame["output"][-1] == "NA" and frame["input"][-1] == "a, b\nc"  # strings as written, no NA guessing


def test_parquet_non_string_columns_read_as_csv_shows_them(tmp_path):
    """ints stay ints (1, not 1.0, even beside a null), floats and booleans as str() writes them, a null is a
    missing cell (row-numbered error, or skipped with skip_bad_rows), a list is not text."""
    table = pa.table({
        "text": pa.array(["one", "two", None, "four", "five"]),
        "label": pa.array([10, 2, 2, None, 10], pa.int64()),
        "score": pa.array([1.5, None, 0.25, 2.0, float("nan")]),
        "flag": pa.array([True, False, None, True, False]),
    })
    path = tmp_path / "mixed.parquet"
    pq.write_table(table, path)
    frame = D.read_table(path, DataConfig())
    assert frame.columns == ["text", "label", "score", "flag"]
    assert [D.cell_value(v) for v in frame["label"]] == ["10", "2", "2", None, "10"]
    assert [D.cell_value(v) for v in frame["score"]] == ["1.5", None, "0.25", "2.0", None]
    assert [D.cell_value(v) for v in frame["flag"]] == ["True", "False", None, "True", "False"]
    with pytest.raises(DataError) as err:
        D.load_file(path, DataConfig(), "classification")
    assert str(err.value) == (f"{path}: row 3: column 'text' is missing (1 more bad rows: 4); fill it in or set "
                              "data.skip_bad_rows: true to skip such rows")
    examples, stats, *_ = D.load_file(path, DataConfig(skip_bad_rows=True), "classification")
    assert stats.labels == ["2", "10"] and [e.label for e in examples] == [1, 0, 1]
    assert stats.skipped_rows == [3, 4]
    # The same rows as a CSV shows them (a null is an empty field) encode to the same examples.
    csv_path = tmp_path / "mixed.csv"
    csv_path.write_text("text,label,score,flag\none,10,1.5,True\ntwo,2,,False\n,2,0.25,\nfour,,2.0,True\n"
                        "five,10,,False\n")
    from_csv, csv_stats, *_ = D.load_file(csv_path, DataConfig(skip_bad_rows=True), "classification")
    assert same_examples(examples, from_csv) and csv_stats.labels == stats.labels
    # A template field from a numeric column renders as its text too.
    cfg = DataConfig(format="prompt_completion", columns={"prompt": "text", "completion": "flag"},
                     prompt_template="{text} ({score}):", skip_bad_rows=True)
    (first, *_), *_ = D.load_file(path, cfg)
    expected, _ = D.encode_pair("one (1.5):", "True", 512)
    assert (first.ids, first.loss_mask) == (expected.ids, expected.loss_mask)

    nested = tmp_path / "nested.parquet"
    pq.write_table(pa.table({"text": pa.array([["a", "b"], ["c"]]), "label": ["x", "y"]}), nested)
    with pytest.raises(DataError, match=r"nested.parquet: row 1: column 'text' holds a list, an object or bytes that "
                                         r"are not UTF-8, not text"):
        D.load_file(nested, DataConfig(), "classification")
    # a binary column is text when its bytes are UTF-8 (as a string column is), else the row is named
    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"text": pa.array([b"caf\xc3\xa9", b"ok"], pa.binary()), "label": ["x", "y"]}), binary)
    examples, *_ = D.load_file(binary, DataConfig(), "classification")
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"text": ["café", "ok"], "label": ["x", "y"]}), text)
    assert same_examples(examples, D.load_file(text, DataConfig(), "classification")[0])
    # a run's test split written from it holds the text, as CSV and as JSONL (CSV had b'caf\xc3\xa9', JSONL crashed)
    frame = D.read_table(binary, DataConfig())
    assert frame.to_csv([0, 1]) == "text,label\ncafé,x\nok,y\n"
    assert frame.to_jsonl([0]) == '{"text": "café", "label": "x"}\n'
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xff"], pa.binary()), "label": ["x", "y"]}), binary)
    with pytest.raises(DataError, match=r"binary.parquet: row 2: column 'text' holds a list, an object or bytes"):
        D.load_file(binary, DataConfig(), "classification")


def test_bad_parquet_files_are_one_line(tmp_path):
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("text,label\na,b\n")
    with pytest.raises(DataError) as err:
        D.read_table(not_parquet, DataConfig())
    text = str(err.value)
    assert text.startswith(f"{not_parquet}: cannot read Parquet (") and "\n" not in text
    assert text.endswith("; check that it is a Parquet file (e.g. written by pandas' to_parquet)")
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.parquet: the file is empty; it needs at least one data row"):
        D.read_table(empty, DataConfig())
    no_rows = tmp_path / "no-rows.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), no_rows)
    with pytest.raises(DataError, match=r"no-rows.parquet: no data rows \(only a header\); add at least one row"):
        D.read_table(no_rows, DataConfig())
    dup = tmp_path / "dup.parquet"  # pandas' reader fails on it with Arrow's "Multiple matches for FieldRef"
    pq.write_table(pa.table([["a"], ["b"], ["c"]], names=["instruction", "output", "output"]), dup)
    with pytest.raises(DataError) as err:
        D.read_table(dup, DataConfig())
    assert str(err.value) == f"{dup}: duplicate column name 'output'; give every column a distinct name"
    xlsx = tmp_path / "table.xlsx"
    xlsx.write_text("x")
    with pytest.raises(DataError) as err:
        D.read_table(xlsx, DataConfig())
    assert str(err.value) == (f"data.train: {xlsx}: unsupported file type '.xlsx'; use .csv, .tsv, .json (a list "
                              "of objects), .jsonl (one object per line), .parquet or .txt (plain text)")


def test_pandas_is_imported_only_when_a_file_is_read():
    import subprocess
    import sys

    code = "import sys, lora_cli.data, lora_cli.cli; print('pandas' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# -------------------------------------------------------------------------------- train, eval and predict


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("parquet-base")
    make_hf_gpt2(path, seed=3)
    return path


def train_on(root: Path, base: Path, train_file: Path, task: str) -> Path:
    """`lora train` a few steps on this file; returns the run's out_dir."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "run.yaml"
    config.write_text(f"""\
model: {base}
task: {task}
out_dir: out
data: {{train: {train_file}, val_split: 0.25, max_length: 48}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
train: {{lr: 2e-2, batch_size: 4, max_steps: 4, warmup_steps: 1, eval_every: 2, save_every: 0, log_every: 1, seed: 5}}
""")
    code, out, err = cli("train", config, "--quiet")
    assert code == 0, err
    return root / "out"


def metrics_of(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "elapsed", "tokens_per_sec")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path):
    """Equal floats: every logged loss, and every adapter tensor."""
    ma, mb = metrics_of(a), metrics_of(b)
    losses = lambda m: [(x.get("step"), x.get("loss"), x.get("val_loss")) for x in m]  # noqa: E731
    assert losses(ma) == losses(mb) and any(x.get("loss") is not None for x in ma)
    ta, tb = load_tensors(str(a / "adapter.safetensors")), load_tensors(str(b / "adapter.safetensors"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("task", ["causal_lm", "classification"])
def test_parquet_trains_evaluates_and_predicts_like_csv(tmp_path, base_dir, task):
    rows = alpaca_rows() if task == "causal_lm" else classification_rows()
    csv_path, parquet_path = write_both(tmp_path, "data", rows)
    out_csv = train_on(tmp_path / "csv", base_dir, csv_path, task)
    out_parquet = train_on(tmp_path / "parquet", base_dir, parquet_path, task)
    assert_same_run(out_csv, out_parquet)

    adapter = out_parquet / "adapter.safetensors"
    results = []
    for data in (csv_path, parquet_path):
        code, out, err = cli("eval", "--adapter", adapter, "--data", data, "--json", "--batch-size", "3")
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0].pop("data") == str(csv_path) and results[1].pop("data") == str(parquet_path)
    assert results[0] == results[1]
    assert results[0]["examples"] == len(rows) and results[0]["loss"] > 0

    if task == "classification":
        texts = [r["text"] for r in rows[:6]]
        answers = []
        for run_out in (out_csv, out_parquet):
            code, out, err = cli("predict", "--adapter", run_out / "adapter.safetensors", "--json", *texts)
            assert code == 0, err
            answers.append([json.loads(line) for line in out.splitlines()])
        assert answers[0] == answers[1] and [a["text"] for a in answers[1]] == texts
        assert all(a["label"] in ("neg", "pos") for a in answers[1])


def test_parquet_bad_file_through_the_cli(tmp_path, base_dir):
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {base_dir}\nout_dir: out\ndata: {{train: {fake}, max_length: 64}}\n")
    line = assert_one_line_error(*cli("train", config, "--quiet"))
    assert line.startswith(f"error: {fake}: cannot read Parquet (")
