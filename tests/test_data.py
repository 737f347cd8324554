"""lora_cli.data: reading, format detection, masking, splits, batching and collation, on hand-written examples
and the datasets shipped in data/."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from lora_cli import data as D
from lora_cli.config import ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, DataConfig, build_config
from lora_cli.errors import ConfigError, DataError
from lora_cli.tokenizer import EOT_ID, encode

DATA = Path(__file__).resolve().parents[1] / "data"
SMS = dict(header=False, column_names=["label", "text"])

# The prompt exactly as Raschka's ch07 `format_input(entry)` + "\n\n### Response:\n" renders it.
CH07_PREAMBLE = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def load(path, task="causal_lm", **data):
    return D.load_file(path, DataConfig(**data), task)


def run_config(tmp_path: Path, task: str = "causal_lm", seed: int = 42, **data):
    raw = {"model": "gpt2", "task": task, "data": data, "train": {"seed": seed}}
    return build_config(raw, base_dir=tmp_path)


# ------------------------------------------------------------------------------------------- alpaca masking


def test_alpaca_templates_render_the_ch07_format():
    assert ALPACA_TEMPLATE.format(instruction="I", input="X") == (
        CH07_PREAMBLE + "\n\n### Instruction:\nI" + "\n\n### Input:\nX" + "\n\n### Response:\n")
    assert ALPACA_TEMPLATE_NO_INPUT.format(instruction="I") == (
        CH07_PREAMBLE + "\n\n### Instruction:\nI" + "\n\n### Response:\n")


def test_alpaca_loss_is_exactly_on_response_and_eot(tmp_path):
    rows = [
        {"instruction": "Convert to passive voice.", "input": "The cat chased the mouse.",
         "output": "The mouse was chased by the cat."},
        {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    ]
    path = write(tmp_path, "a.json", json.dumps(rows))
    examples, stats, _, fmt, _ = load(path)
    assert fmt == "alpaca" and stats.examples == 2 and stats.truncated == 0
    prompts = [
        CH07_PREAMBLE + "\n\n### Instruction:\nConvert to passive voice.\n\n### Input:\nThe cat chased the mouse."
        "\n\n### Response:\n",
        CH07_PREAMBLE + "\n\n### Instruction:\nName a primary color.\n\n### Response:\n",
    ]
    for ex, prompt, row in zip(examples, prompts, rows):
        prompt_ids, response_ids = encode(prompt), encode(row["output"]) + [EOT_ID]
        assert ex.ids == prompt_ids + response_ids  # prompt encoded on its own: generation sees the same ids
        assert [t for t, m in zip(ex.ids, ex.loss_mask) if m] == response_ids
        assert ex.loss_mask == [False] * len(prompt_ids) + [True] * len(response_ids)
        assert ex.ids[-1] == EOT_ID
    # After the shift in collate, the targets that carry loss are the response tokens + EOT, nothing else.
    batch = D.collate(examples)
    for b, ex in enumerate(examples):
        kept = batch.targets[b][batch.targets[b] != D.IGNORE_INDEX].tolist()
        assert kept == [t for t, m in zip(ex.ids, ex.loss_mask) if m]
    assert D.preview(examples[1]).endswith("### Response:\n[[Red.<|endoftext|>]]")


def test_mask_prompt_false_trains_on_every_token_but_the_first(tmp_path):
    path = write(tmp_path, "a.jsonl", json.dumps({"instruction": "Say hi.", "output": "Hi!"}) + "\n")
    (ex,), stats, _, fmt, mapping = load(path, mask_prompt=False)
    assert fmt == "alpaca" and "input" not in mapping  # input is optional
    assert ex.loss_mask == [False] + [True] * (len(ex.ids) - 1)
    assert stats.target_tokens == len(ex.ids) - 1


def test_special_token_text_in_user_data_is_not_eot(tmp_path):
    path = write(tmp_path, "t.jsonl", json.dumps({"text": "a <|endoftext|> b"}) + "\n")
    (ex,), *_ = load(path)
    assert ex.ids.count(EOT_ID) == 1 and ex.ids[-1] == EOT_ID  # only the terminator we append


# ------------------------------------------------------------------------------------------ format detection


@pytest.mark.parametrize("columns, task, data, expected", [
    (["instruction", "input", "output"], "causal_lm", {}, ("alpaca", {"instruction": "instruction",
                                                                     "input": "input", "output": "output"})),
    (["instruction", "output", "extra"], "causal_lm", {}, ("alpaca", {"instruction": "instruction",
                                                                     "output": "output"})),
    (["prompt", "completion"], "causal_lm", {}, ("prompt_completion", {"prompt": "prompt",
                                                                      "completion": "completion"})),
    (["text", "meta"], "causal_lm", {}, ("text", {"text": "text"})),
    (["text", "label"], "classification", {}, ("classification", {"text": "text", "label": "label"})),
    (["mr", "ref"], "causal_lm", {"columns": {"prompt": "mr", "completion": "ref"}},
     ("prompt_completion", {"prompt": "mr", "completion": "ref"})),
    (["body"], "causal_lm", {"columns": {"text": "body"}}, ("text", {"text": "body"})),
    (["sms", "kind"], "classification", {"columns": {"text": "sms", "label": "kind"}},
     ("classification", {"text": "sms", "label": "kind"})),
    (["q", "instruction", "output"], "causal_lm", {"columns": {"input": "q"}},
     ("alpaca", {"instruction": "instruction", "input": "q", "output": "output"})),
    (["MR", "ref"], "causal_lm", {"format": "prompt_completion", "columns": {"completion": "ref"}},
     None),  # no prompt column: error below
])
def test_detect_format(columns, task, data, expected):
    cfg = DataConfig(**data)
    if expected is None:
        with pytest.raises(DataError, match="format prompt_completion needs a column for 'prompt'"):
            D.detect_format(columns, cfg, task)
    else:
        assert D.detect_format(columns, cfg, task) == expected


def test_detect_format_errors():
    with pytest.raises(DataError) as err:
        D.detect_format(["question", "answer"], DataConfig(), path="qa.csv")
    assert str(err.value) == (
        "qa.csv: cannot tell the data format from the columns (question, answer); expected alpaca (instruction, "
        "output, optional input), prompt_completion (prompt, completion), text (text); set data.format, and "
        "data.columns to map roles to your columns (e.g. {prompt: mr, completion: ref})")
    with pytest.raises(DataError) as err:
        D.detect_format(["mr", "ref"], DataConfig(columns={"prompt": "mr", "completion": "reference"}), path="e.csv")
    assert str(err.value) == ("e.csv: column 'reference' named by data.columns.completion is not in the file; "
                              "its columns are: mr, ref; map one with data.columns.completion: <column>")
    with pytest.raises(ConfigError, match=r"data.columns.promt: unknown role \(did you mean prompt\?\)"):
        D.detect_format(["mr", "ref"], DataConfig(columns={"promt": "mr"}))
    with pytest.raises(ConfigError, match="data.columns.label: not a role of format alpaca"):
        D.detect_format(["instruction", "output", "y"], DataConfig(format="alpaca", columns={"label": "y"}))
    with pytest.raises(DataError, match="format alpaca needs a column for 'output'.*columns are: instruction, "
                                        "response; map one with data.columns.output"):
        D.detect_format(["instruction", "response"], DataConfig(format="alpaca"))
    with pytest.raises(DataError, match="format classification needs a column for 'label'"):
        D.detect_format(["text"], DataConfig(), "classification")


# ------------------------------------------------------------------------------------------ prompt templates


def test_prompt_completion_default_and_custom_templates(tmp_path):
    path = write(tmp_path, "e.csv", 'mr,ref,lang\n"name[X], food[Thai]",X serves Thai food.,en\n')
    cols = {"prompt": "mr", "completion": "ref"}
    (ex,), *_ = load(path, columns=cols)
    assert ex.ids == encode("name[X], food[Thai]\n") + encode("X serves Thai food.") + [EOT_ID]
    (ex,), *_ = load(path, columns=cols, prompt_template="[{lang}] {{mr}} {prompt} ||| ")
    assert ex.ids[:len(encode("[en] {mr} name[X], food[Thai] ||| "))] == encode("[en] {mr} name[X], food[Thai] ||| ")
    with pytest.raises(ConfigError, match=r"data.prompt_template: unknown field \{colour\}; use one of: prompt, mr"):
        load(path, columns=cols, prompt_template="{colour}")
    with pytest.raises(ConfigError, match=r"\{completion\} is the response and cannot be in the prompt"):
        load(path, columns=cols, prompt_template="{prompt} {completion}")
    with pytest.raises(ConfigError, match="data.prompt_template: Single '}' encountered"):
        load(path, columns=cols, prompt_template="{prompt} }")
    with pytest.raises(ConfigError, match=re.escape("data.prompt_template: names no field, so every example would "
                                                    "get the same prompt; write {prompt}, not {{prompt}} (doubled")):
        load(path, columns=cols, prompt_template="Q: {{prompt}}\nA:")
    with pytest.raises(ConfigError, match=re.escape("same prompt; add one such as {prompt}")):
        load(path, columns=cols, prompt_template="Answer:")
    assert D.render_prompt({"instruction": "I", "input": "  "}, "alpaca") == ALPACA_TEMPLATE_NO_INPUT.format(
        instruction="I")
    assert D.render_prompt({"instruction": "I", "input": "X"}, "alpaca", DataConfig()) == ALPACA_TEMPLATE.format(
        instruction="I", input="X")
    assert D.render_prompt({"prompt": "p"}, "prompt_completion", "Q: {prompt}\nA:") == "Q: p\nA:"
    assert D.prompt_template("prompt_completion", DataConfig()) == "{prompt}\n"
    assert D.prompt_template("text", DataConfig()) is None and D.prompt_template("classification") is None


# ------------------------------------------------------------------------------------------- bad data files


@pytest.mark.parametrize("name, content, kind, message", [
    ("bad.csv", b"instruction,output\nhi,there\ncaf\xe9,ok\n", DataError,
     "bad.csv: not UTF-8 text: byte 0xe9 at line 3 (byte offset 31); re-save the file as UTF-8"),
    ("obj.json", '{"data": [{"text": "a"}]}', DataError,
     "obj.json: the JSON is an object (keys: data), not a list of records; write the records as a list"),
    ("items.json", '[{"text": "a"}, "b"]', DataError,
     "items.json: row 2 is a string, not an object"),
    ("syntax.json", '[{"text": "a"},\n {"text": }]', DataError,
     "syntax.json: invalid JSON at line 2 column 11: Expecting value"),
    ("broken.jsonl", '{"text": "a"}\n\n{"text": "b"\n{"text": "c"}\n', DataError,
     "broken.jsonl: line 3 is not valid JSON (Expecting ',' delimiter at column 13); fix or remove that line"),
    ("list.jsonl", '{"text": "a"}\n[1, 2]\n', DataError,
     "list.jsonl: line 2 is a list, not a JSON object"),
    # json keeps the last of two values of a key without a word
    ("twice.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d", "output": "e"}\n',
     DataError, "twice.jsonl: line 2 names the key 'output' twice, and only one value can be read; remove or rename "
                "one of them"),
    ("twice.json", '[{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}]', DataError,
     "twice.json: an object names the key 'role' twice, and only one value can be read; remove or rename one of "
     "them"),
    # json reads 1e400 and Infinity as inf (a label 1e400 became the class "inf"); NaN stays a missing value
    ("inf.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1e400}\n', DataError,
     "inf.jsonl: line 2 holds the number 1e400, which is no finite number; write a finite number, or quote it to "
     "keep it as text"),
    ("inf.json", '[{"text": "a", "label": -Infinity}]', DataError,
     "inf.json: a value holds the number -Infinity, which is no finite number"),
    # json reads half of a surrogate pair as a string no file can hold (writing the split crashed); pairs are text
    ("half.jsonl", '{"text": "a\\ud83d\\ude00"}\n{"text": "b \\\\ud800 \\udc00"}\n', DataError,
     "half.jsonl: line 2 holds the escape \\udc00, half of a UTF-16 surrogate pair, which is no character; write the "
     "character itself, or both halves of its pair"),
    ("half.json", '[{"messages": [{"role": "user", "content": "\\ud800"}]}]', DataError,
     "half.json: a value holds the escape \\ud800, half of a UTF-16 surrogate pair"),
    # json's reader recurses: a RecursionError was an internal error
    ("deep.jsonl", '{"text": "a", "meta": ' + "[" * 5000 + "]" * 5000 + "}\n", DataError,
     "deep.jsonl: line 1 is nested too deeply to read (over a thousand lists or objects inside each other); "
     "flatten it"),
    ("deep.json", "[" * 5000 + "]" * 5000, DataError, "deep.json: a value is nested too deeply to read"),
    ("long.csv", "prompt,completion\na,b\nc,d,e\nf,g\nh,i,j\n", DataError,
     "long.csv: row 2 (line 3) has 3 fields, expected 2 (prompt, completion) (1 more rows like it); quote fields "
     "that contain commas"),
    ("short.csv", "prompt,completion\na,b\nc\n", DataError,
     "short.csv: row 2 (line 3) has 1 fields, expected 2 (prompt, completion); quote fields"),
    ("first.csv", "prompt,completion\na,b,c\n", DataError,
     "first.csv: row 1 (line 2) has 3 fields, expected 2"),
    ("quote.csv", 'prompt,completion\na,b\nc,"unterminated\n', DataError,
     "quote.csv: line 3: cannot parse CSV (unexpected end of data); check the quoting on that line"),
    ("dup.csv", "text,text\na,b\n", DataError, "dup.csv: duplicate column name 'text' in the header"),
    ("nbsp.csv", "prompt,completion\na,b\n\u00a0\nc,d\n", DataError,  # pandas reads it as a row: so do we
     "nbsp.csv: row 2 (line 3) has 1 fields, expected 2 (prompt, completion)"),
    ("tabs.csv", "prompt\tcompletion\na\tb\n", DataError, "tabs.csv: the header is one column, "
     "'prompt\\tcompletion', with tabs in it: the file looks tab-separated; name it .tsv"),
    ("commas.tsv", "prompt,completion\na,b\n", DataError, "commas.tsv: the header is one column, "
     "'prompt,completion', with commas in it: the file looks comma-separated; name it .csv"),
    ("empty.jsonl", "", DataError, "empty.jsonl: the file is empty; it needs at least one data row"),
    ("blank.csv", "\n\n  \n", DataError, "blank.csv: the file is empty"),
    ("header.csv", "prompt,completion\n", DataError, "header.csv: no data rows (only a header); add at least"),
    ("empty-list.json", "[]", DataError, "empty-list.json: no data rows (an empty list); add at least one row"),
    ("table.xlsx", "x", DataError, "data.train: {tmp}/table.xlsx: unsupported file type '.xlsx'; use .csv, .tsv"),
    ("noext", "x", DataError, "unsupported file type (no extension)"),
])
def test_bad_files(tmp_path, name, content, kind, message):
    path = write(tmp_path, name, content)
    with pytest.raises(kind) as err:
        load(path)
    text = str(err.value)
    assert "\n" not in text
    assert message.replace("{tmp}", str(tmp_path)) in text
    assert text.startswith(str(path)) or text.startswith("data.train: ")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError) as err:
        D.read_table(tmp_path / "nope.json", DataConfig(), key="data.val")
    assert str(err.value) == (f"data.val: {tmp_path}/nope.json does not exist; check the path (relative paths are "
                              "resolved against the config file's folder)")
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    with pytest.raises(DataError, match=r"data.train: .*dir.csv is a directory; name a data file"):
        D.read_table(folder, DataConfig())


def test_values_stay_strings_and_bom_is_dropped(tmp_path):
    path = write(tmp_path, "na.csv", "\ufefftext,label\nNA,1\nnull,2\n")
    frame = D.read_table(path, DataConfig())
    assert list(frame.columns) == ["text", "label"]
    assert frame["text"] == ["NA", "null"] and frame["label"] == ["1", "2"]


def test_tsv_quotes_are_text_and_column_names(tmp_path):
    path = write(tmp_path, "s.tsv", 'ham\tsay "hi\nspam\tWIN "now"\n')
    frame = D.read_table(path, DataConfig(**SMS))
    assert [dict(zip(frame.columns, frame.row(i))) for i in range(len(frame))] == [
        {"label": "ham", "text": 'say "hi'}, {"label": "spam", "text": 'WIN "now"'}]
    with pytest.raises(DataError, match="data.column_names has 3 names but the header on line 1 has 2 columns"):
        D.read_table(path, DataConfig(column_names=["a", "b", "c"]))
    with pytest.raises(ConfigError, match="data.column_names: is required when header is false"):
        D.read_table(path, DataConfig(header=False))



def test_a_tsv_written_with_csv_quoting_reads_its_values(tmp_path):
    """pandas' to_csv(sep="\t") and Python's csv module quote a field holding a quote, a tab or a line break; such
    a file is read with that quoting (the values as written), not with the quotes as text."""
    import pandas as pd

    rows = [{"prompt": 'Say "b"', "completion": "b\t!"}, {"prompt": "two\nlines", "completion": "plain"},
            {"prompt": 'WIN "now"', "completion": 'a "b" c'}]
    pd.DataFrame(rows).to_csv(tmp_path / "q.tsv", sep="\t", index=False)
    frame = D.read_table(tmp_path / "q.tsv", DataConfig())
    assert [dict(zip(frame.columns, frame.row(i))) for i in range(len(frame))] == rows
    assert frame.lines == [2, 3, 5]
    # a field wrapped in quotes with nothing a quoting writer would have added stays as it is (the SMS file's way)
    path = write(tmp_path, "plain.tsv", 'ham\t"hi there"\nspam\tWIN "now"\n')
    assert D.read_table(path, DataConfig(**SMS))["text"] == ['"hi there"', 'WIN "now"']
    # a text that opens with a quote and one that closes with a quote lines later (the SMS file has both), with a
    # doubled quote between: read quoted, the rows between merged into one text without a word (5 rows gave 3)
    texts = ['"Pete can you please ring me', "normal text here", '"Free ""prize"" now"', '"quoted" then more',
             "call now"]
    path = write(tmp_path, "sms.tsv", "".join(f"{label}\t{text}\n" for label, text in
                                              zip(["ham", "ham", "spam", "ham", "spam"], texts)))
    frame = D.read_table(path, DataConfig(**SMS))
    assert frame["text"] == texts and frame["label"] == ["ham", "ham", "spam", "ham", "spam"]
    # one column written with CSV quoting: every line is "one field" unquoted too, so the quoted line break decides
    pd.DataFrame({"text": ["first line\nsecond line", "plain"]}).to_csv(tmp_path / "one.tsv", sep="\t", index=False)
    assert D.read_table(tmp_path / "one.tsv", DataConfig())["text"] == ["first line\nsecond line", "plain"]

# ---------------------------------------------------------------------------------------------- bad rows


def test_missing_and_empty_fields_name_the_row(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c"}, {"instruction": "d", "output": "  "},
            {"instruction": "", "output": "x"}, {"instruction": "e", "output": ["not", "text"]}]
    path = write(tmp_path, "a.json", json.dumps(rows))
    with pytest.raises(DataError) as err:
        load(path)
    assert str(err.value) == (f"{path}: row 2: column 'output' is missing (3 more bad rows: 3, 4, 5); fill it in "
                              "or set data.skip_bad_rows: true to skip such rows")
    examples, stats, *_ = load(path, skip_bad_rows=True)
    assert len(examples) == 1 and stats.skipped == 4 and stats.skipped_rows == [2, 3, 4, 5]
    assert "4 bad rows skipped" in stats.describe()

    jsonl = write(tmp_path, "p.jsonl", '{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": null}\n')
    with pytest.raises(DataError, match=r"p.jsonl: row 2 \(line 3\): column 'completion' is missing; fill it in"):
        load(jsonl)
    csvfile = write(tmp_path, "p.csv", "prompt,completion\na,b\nc,\n")
    with pytest.raises(DataError, match=r"p.csv: row 2 \(line 3\): column 'completion' is empty"):
        load(csvfile)
    only_bad = write(tmp_path, "bad.csv", "prompt,completion\nc,\n")
    with pytest.raises(DataError, match=r"bad.csv: no usable examples \(1 rows skipped as bad\); add data"):
        load(only_bad, skip_bad_rows=True)


def test_truncation_is_counted_and_prompt_only_examples_dropped(tmp_path):
    long = " ".join(["word"] * 50)
    rows = [{"prompt": "short", "completion": long}, {"prompt": long, "completion": "x"},
            {"prompt": "p", "completion": "ok"}]
    path = write(tmp_path, "t.json", json.dumps(rows))
    examples, stats, *_ = load(path, max_length=20)
    assert stats.truncated == 2 and stats.dropped == 1 and stats.examples == 2
    assert [len(e) for e in examples] == [20, len(encode("p\n") + encode("ok")) + 1]
    assert examples[0].ids == (encode("short\n") + encode(long))[:20]
    assert examples[0].ids[-1] != EOT_ID  # cut off: the EOT is gone with the tail
    assert "2 truncated to 20 tokens, 1 dropped" in stats.describe()


def test_txt_file_is_chunked_with_every_token_a_target_once(tmp_path):
    text = (DATA / "the-verdict.txt").read_text(encoding="utf-8")
    examples, stats, _, fmt, _ = load(DATA / "the-verdict.txt", max_length=256)
    ids = encode(text) + [EOT_ID]
    assert fmt == "text" and len(ids) == 5146  # 5,145 tokens, as the book counts, + EOT
    assert stats.target_tokens == len(ids) - 1 == 5145
    assert all(len(e) <= 256 and not e.loss_mask[0] for e in examples)
    rebuilt = examples[0].ids + [t for e in examples[1:] for t in e.ids[1:]]
    assert rebuilt == ids
    with pytest.raises(DataError, match="a .txt file is plain text for format text, not alpaca"):
        load(DATA / "the-verdict.txt", format="alpaca")


# ---------------------------------------------------------------------------------------- classification


def test_sms_spam_reads_all_rows_and_undersamples_to_747_each(tmp_path):
    cfg = run_config(tmp_path, task="classification", train=str(DATA / "sms_spam.tsv"), val_split=0.0,
                     balance="undersample", **SMS)
    splits = D.load_splits(cfg, context_length=1024)
    stats = splits.stats["train"]
    assert splits.fmt == "classification" and splits.labels == ["ham", "spam"]
    assert stats.rows == 5574 and stats.undersampled == 4827 - 747
    assert stats.label_counts == {"ham": 747, "spam": 747}
    counts = [sum(ex.label == k for ex in splits.train) for k in (0, 1)]
    assert counts == [747, 747] and splits.val == [] and splits.test == []
    assert all(not any(ex.loss_mask) for ex in splits.train)
    again = D.load_splits(cfg, context_length=1024)
    assert [ex.row for ex in again.train] == [ex.row for ex in splits.train]  # seeded
    other = D.load_splits(run_config(tmp_path, task="classification", seed=1, train=str(DATA / "sms_spam.tsv"),
                                     val_split=0.0, balance="undersample", **SMS), context_length=1024)
    assert [ex.row for ex in other.train] != [ex.row for ex in splits.train]


def test_sms_stratified_splits_and_written_test_split(tmp_path):
    cfg = run_config(tmp_path, task="classification", train=str(DATA / "sms_spam.tsv"), val_split=0.1,
                     test_split=0.2, balance="class_weights", **SMS)
    splits = D.load_splits(cfg, context_length=1024)
    count = lambda xs, k: sum(ex.label == k for ex in xs)  # noqa: E731
    # ham 4827: val round(482.7)=483, test round(965.4)=965; spam 747: val 75 -> 74 (483 + 75 is more than
    # round(5574 * 0.1) = 557: the class rounded up the most gives one back), test 149
    assert (count(splits.val, 0), count(splits.val, 1)) == (483, 74)
    assert (count(splits.test, 0), count(splits.test, 1)) == (965, 149)
    assert (count(splits.train, 0), count(splits.train, 1)) == (4827 - 483 - 965, 747 - 74 - 149)
    n, ham, spam = len(splits.train), 3379, 524
    assert splits.class_weights == pytest.approx([n / (2 * ham), n / (2 * spam)])
    out = D.write_split(tmp_path, "sms_test", splits.test, splits.frame)
    assert out == tmp_path / "sms_test.csv"
    back, _, _, fmt, _ = D.load_file(out, DataConfig(), "classification", labels=splits.labels)
    assert fmt == "classification" and [(e.ids, e.label) for e in back] == [(e.ids, e.label) for e in splits.test]


def test_classification_label_errors(tmp_path):
    one = write(tmp_path, "one.csv", "text,label\na,x\nb,x\n")
    with pytest.raises(DataError) as err:
        D.load_splits(run_config(tmp_path, task="classification", train=str(one)), 1024)
    assert str(err.value) == (f"{one}: the label column 'label' has only one class ('x'); classification needs at "
                              "least two classes")
    two = write(tmp_path, "two.csv", "text,label\na,x\nb,y\nc,z\n")
    with pytest.raises(DataError, match=r"two.csv: row 3 \(line 4\): label 'z' is not one of data.labels \(y, x\)"):
        load(two, "classification", labels=["y", "x"])
    yes_no = write(tmp_path, "yn.csv", "text,label\na,no\nb,yes\n")  # `labels: [no, yes]` unquoted reads as bools
    hint = "(YAML reads unquoted true/false, yes/no and on/off as the booleans True and False: quote the labels)"
    with pytest.raises(DataError, match=re.escape(f"label 'no' is not one of data.labels (False, True) {hint}")):
        load(yes_no, "classification", labels=[str(x) for x in yaml.safe_load("[no, yes]")])
    true_false = write(tmp_path, "tf.csv", "text,label\na,true\nb,false\n")  # the user wrote true: still YAML's True
    with pytest.raises(DataError, match=re.escape(f"label 'true' is not one of data.labels (True, False) {hint}")):
        load(true_false, "classification", labels=[str(x) for x in yaml.safe_load("[true, false]")])
    # every record an empty object: said so (it was "no data rows (an empty list)" for a list of two)
    for name, text, where in (("e.json", "[{}, {}]", "row 1"), ("e.jsonl", "{}\n{}\n", "row 1 (line 1)")):
        with pytest.raises(DataError) as err:
            load(write(tmp_path, name, text), "classification")
        assert str(err.value) == (f"{tmp_path / name}: {where}: every record is an empty object {{}}; give each "
                                  "record its fields (e.g. instruction and output, prompt and completion, text, or "
                                  "messages)")
    (a, b, c), stats, *_ = load(two, "classification", labels=["z", "y", "x"])
    assert (a.label, b.label, c.label) == (2, 1, 0) and stats.labels == ["z", "y", "x"]
    numeric = write(tmp_path, "n.jsonl", "\n".join(json.dumps({"text": t, "label": k})
                                                 for t, k in [("a", 10), ("b", 2), ("c", 2)]))
    examples, stats, *_ = load(numeric, "classification")
    assert stats.labels == ["2", "10"] and [e.label for e in examples] == [1, 0, 0]
    val = write(tmp_path, "val.csv", "text,label\nq,w\n")
    with pytest.raises(DataError, match=r"val.csv: row 1 \(line 2\): label 'w' is not one of the training labels"):
        D.load_splits(run_config(tmp_path, task="classification", train=str(two), val=str(val)), 1024)
    with pytest.raises(DataError, match=r"missing.csv: row 2 \(line 3\): column 'text' is empty"):
        load(write(tmp_path, "missing.csv", "text,label\na,x\n,y\n"), "classification")


# --------------------------------------------------------------------------------------------- load_splits


def test_load_splits_instruction_data_and_context_check(tmp_path):
    cfg = run_config(tmp_path, train=str(DATA / "instruction-data.json"), val_split=0.05, test_split=0.1)
    splits = D.load_splits(cfg, context_length=1024)
    assert splits.fmt == "alpaca" and splits.labels is None and splits.class_weights is None
    assert (len(splits.train), len(splits.val), len(splits.test)) == (935, 55, 110)  # the book's 85/5/10 sizes
    rows = [e.row for s in (splits.train, splits.val, splits.test) for e in s]
    assert sorted(rows) == list(range(1100))
    stats = splits.stats["train"]
    assert (stats.rows, stats.examples, stats.truncated) == (1100, 1100, 0)
    with pytest.raises(ConfigError) as err:
        D.load_splits(cfg, context_length=256)
    assert str(err.value) == ("data.max_length: 512 is above the model's context (n_positions = 256); set "
                              "data.max_length to at most 256")


def test_load_splits_separate_val_file(tmp_path):
    cfg = run_config(tmp_path, train=str(DATA / "e2e_dev.csv"), val=str(DATA / "e2e_test.csv"),
                     columns={"prompt": "mr", "completion": "ref"})
    splits = D.load_splits(cfg, context_length=1024)
    assert splits.fmt == "prompt_completion" and splits.mapping == {"prompt": "mr", "completion": "ref"}
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4672, 4693, 0)
    assert set(splits.stats) == {"train", "val"}


# -------------------------------------------------------------------------------------------------- splits


def test_split_examples_stratified_counts_and_determinism():
    examples = [D.Example([i, 0], [False, True], label=int(i >= 100), row=i) for i in range(120)]
    labels = [e.label for e in examples]
    train, val, test = D.split_examples(examples, 0.1, 0.2, seed=3, stratify=labels)
    assert (sum(e.label == 0 for e in val), sum(e.label == 1 for e in val)) == (10, 2)
    assert (sum(e.label == 0 for e in test), sum(e.label == 1 for e in test)) == (20, 4)
    assert len(train) == 84
    rows = [e.row for e in train + val + test]
    assert sorted(rows) == list(range(120))
    assert all(a.row < b.row for a, b in zip(val, val[1:]))  # each split keeps file order
    assert D.split_examples(examples, 0.1, 0.2, seed=3, stratify=labels) == (train, val, test)
    assert D.split_examples(examples, 0.1, 0.2, seed=4, stratify=labels)[1] != val
    plain = D.split_examples(examples, 0.1, 0.0, seed=3)
    assert [len(s) for s in plain] == [108, 12, 0]
    tiny = D.split_examples(examples[:3], 0.1, 0.0, seed=0)
    assert [len(s) for s in tiny] == [2, 1, 0]  # a requested split is never empty
    with pytest.raises(DataError, match=r"too few examples \(1\) to hold out data.val_split=0.1"):
        D.split_examples(examples[:1], 0.1, 0.0, seed=0)


# ------------------------------------------------------------------------------------------------ batching


def test_batch_indices_deterministic_and_complete():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    a = D.batch_indices(lengths, 8, seed=1, epoch=0)
    assert a == D.batch_indices(lengths, 8, seed=1, epoch=0)
    assert a != D.batch_indices(lengths, 8, seed=1, epoch=1)
    assert a != D.batch_indices(lengths, 8, seed=2, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(1000))
    assert sorted(len(b) for b in a) == [8] * 125
    b = D.batch_indices(lengths[:1003 - 3] + [5, 5, 5], 8, seed=1, epoch=0, drop_last=True)
    assert len(b) == 125 and all(len(x) == 8 for x in b)
    fixed = D.batch_indices(lengths, 8, shuffle=False)
    assert [lengths[i] for b in fixed for i in b] == sorted(lengths, reverse=True)
    assert D.batch_indices(lengths[:5], 2, shuffle=False, group_by_length=False) == [[0, 1], [2, 3], [4]]


def test_largest_batch_leads_each_shuffled_epoch():
    """Length-grouped batches start with the one of most padded tokens (the longest example's; a run that does not
    fit fails at step 1), the rest in seeded random order; without grouping the order is the shuffle's alone."""
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    lengths[613] = 500  # one long example, in whichever batch the shuffle puts it
    for epoch in range(4):
        order = D.batch_indices(lengths, 8, seed=3, epoch=epoch)
        assert 613 in order[0], epoch
        padded = [len(b) * max(lengths[i] for i in b) for b in order]
        assert padded[0] == max(padded) and padded[1:] != sorted(padded[1:], reverse=True)
    # seed 3 leaves the 10-token example alone in the last chunk: 8 x 9 padded tokens outweigh its 1 x 10
    assert D.batch_indices([9] * 8 + [10], 8, seed=3, epoch=0, chunk_batches=1) == [[5, 4, 2, 6, 1, 3, 0, 7], [8]]
    assert 613 not in D.batch_indices(lengths, 8, seed=3, epoch=0, group_by_length=False)[0]


def test_length_grouping_pads_less_than_random():
    frame = D.read_table(DATA / "instruction-data.json", DataConfig())
    examples, *_ = D.encode_records(frame, "alpaca", {"instruction": "instruction", "input": "input",
                                                      "output": "output"}, DataConfig())
    lengths = [len(e) for e in examples]
    grouped = D.padding_waste(lengths, D.batch_indices(lengths, 8, seed=42, epoch=0))
    scattered = D.padding_waste(lengths, D.batch_indices(lengths, 8, seed=42, epoch=0, group_by_length=False))
    assert grouped * 10 < scattered, (grouped, scattered)


def test_split_batch_deals_sorted_contiguous_slices():
    """A global batch's micro-batches: longest first (ties keep their order), sizes differing by at most one, empty
    slices when there are fewer examples than parts; every example once, whatever the number of parts."""
    lengths = [3, 9, 5, 9, 1, 7, 2]
    batch = [0, 1, 2, 3, 4, 5, 6]
    assert D.split_batch(batch, lengths, 1) == [[1, 3, 5, 2, 0, 6, 4]]
    assert D.split_batch(batch, lengths, 3) == [[1, 3, 5], [2, 0], [6, 4]]
    assert D.split_batch([4, 2], lengths, 4) == [[2], [4], [], []]
    for parts in range(1, 9):
        assert [i for m in D.split_batch(batch, lengths, parts) for i in m] == [1, 3, 5, 2, 0, 6, 4]
    with pytest.raises(ValueError):
        D.split_batch(batch, lengths, 0)


# ------------------------------------------------------------------------------------------------- collate


def test_collate_causal_lm_right_and_left():
    a = D.Example([1, 2, 3, 4, 5], [False, False, True, True, True])
    b = D.Example([7, 8, 9], [False, True, True])
    batch = D.collate([a, b])
    assert batch.shape == (2, 4) and batch.n_tokens == 6 and batch.n_targets == 5
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [7, 8, EOT_ID, EOT_ID]]
    assert batch.targets.tolist() == [[-100, 3, 4, 5], [8, 9, -100, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.labels is None and batch.input_ids.dtype == torch.long
    left = D.collate([a, b], pad_side="left")
    assert left.input_ids.tolist() == [[1, 2, 3, 4], [EOT_ID, EOT_ID, 7, 8]]
    assert left.targets.tolist() == [[-100, 3, 4, 5], [-100, -100, 8, 9]]
    assert left.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    moved = batch.to("cpu")
    assert torch.equal(moved.targets, batch.targets) and moved.n_targets == 5


def test_collate_classification():
    a = D.Example([5, 6, 7], [False] * 3, label=1)
    b = D.Example([8], [False], label=0)
    batch = D.collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [1, 0] and batch.targets is None
    assert (batch.n_tokens, batch.n_targets) == (4, 2)
    left = D.collate([a, b], pad_id=0, pad_side="left")
    assert left.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    with pytest.raises(ValueError, match="mixes classification and causal-LM"):
        D.collate([a, D.Example([1, 2], [False, True])])


def test_prompt_files_drop_a_byte_order_mark(tmp_path):
    """`lora predict --file` / `generate --file`: an editor's BOM is not part of the first prompt (data files drop
    it too); it shifted the first text's probabilities."""
    from lora_cli.prompts import read_text_file

    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xef\xbb\xbfthe day was great\nsecond\n")
    assert read_text_file(path) == "the day was great\nsecond\n"


def test_a_class_the_split_takes_wholly_is_an_error(tmp_path):
    """One 'rare' example and a stratified split that holds it out: the head would get a row no step trains."""
    rows = "".join(f"t{i},{'neg' if i % 2 else 'pos'}\n" for i in range(14)) + "odd one,rare\n"
    path = write(tmp_path, "c.csv", "text,label\n" + rows)
    with pytest.raises(DataError) as err:
        D.load_splits(run_config(tmp_path, task="classification", train=str(path), val_split=0.0, test_split=0.5), 1024)
    assert str(err.value) == (f"{path}: class 'rare' has 1 example and the validation/test split took all of them, "
                              "so training would see none; add examples of it, remove its rows, or give the held-out "
                              "data as data.val / data.test files")
    splits = D.load_splits(run_config(tmp_path, task="classification", train=str(path), val_split=0.0), 1024)
    assert splits.labels == ["neg", "pos", "rare"] and {e.label for e in splits.train} == {0, 1, 2}


@pytest.mark.parametrize("classes, per_class, frac, held", [(10, 5, 0.1, 5), (20, 2, 0.25, 10), (4, 3, 0.3, 4)])
def test_stratified_splits_hold_out_no_more_than_asked(classes, per_class, frac, held):
    """Each class rounded on its own held out 10 of 50 for a 10% split of 10 classes of 5 (0.5 each, rounded up),
    and all 40 of 20 classes of 2 for 25% + 25%: the totals are round(n * frac), still stratified."""
    examples = [object() for _ in range(classes * per_class)]
    labels = [i % classes for i in range(len(examples))]
    train, val, test = D.split_examples(examples, frac, frac, seed=0, stratify=labels)
    assert len(val) == len(test) == held and len(train) == len(examples) - 2 * held
    for split in (val, test):  # no class gives more than its rounded share
        taken = [labels[examples.index(e)] for e in split]
        assert max(taken.count(c) for c in range(classes)) <= math.floor(per_class * frac + 0.5)


def test_two_roles_never_read_one_column():
    """A model trained to copy its prompt: data.columns naming one column for two roles, or a rename onto a column
    another role reads by default, is a ConfigError naming both roles."""
    for columns, message in (
            ({"prompt": "instruction", "completion": "instruction"},
             "roles prompt and completion both read column 'instruction' (named by data.columns.completion); give "
             "each role its own column"),
            ({"instruction": "output"},
             "roles instruction and output both read column 'output' (named by data.columns.instruction); give each "
             "role its own column")):
        with pytest.raises(ConfigError) as err:
            D.detect_format(["instruction", "output"], DataConfig(columns=columns))
        assert str(err.value) == message


def test_duplicate_names_given_for_a_headerless_file_are_named_as_given(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("spam,hello\nham,hi\n")
    with pytest.raises(DataError) as err:
        D.read_table(path, DataConfig(header=False, column_names=["label", "label"]))
    assert str(err.value) == (f"{path}: duplicate column name 'label' in the column names given (data.column_names "
                              "or --column-names); give every column a distinct name")


def test_too_few_examples_names_the_file(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    cfg = run_config(tmp_path, train=str(path))
    with pytest.raises(DataError) as err:
        D.load_splits(cfg, context_length=1024)
    assert str(err.value) == (f"{path}: too few examples (1) to hold out data.val_split=0.1 and data.test_split=0.0; "
                              "add data or lower the fractions")
    # rows that gave no example are counted: the data had more rows than the message's examples
    long = "word " * 40
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}] + [{"instruction": long, "output": "c"}] * 3))
    cfg = run_config(tmp_path, train=str(path), max_length=60)
    with pytest.raises(DataError) as err:
        D.load_splits(cfg, context_length=1024)
    assert str(err.value) == (f"{path}: too few examples (1; of its rows 3 dropped (no response left after "
                              "truncation)) to hold out data.val_split=0.1 and data.test_split=0.0; add data or lower "
                              "the fractions")

