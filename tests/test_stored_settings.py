"""Data settings stored in an adapter's header (`data`: prompt_template, chat_template, labels) that no training run
writes: each case rewrites ONE field of a trained adapter's safetensors metadata and runs the real `lora` CLI on
it. The adapter is refused when it is opened, by every command (adapter.damaged_settings): exit code 1, one line
naming the file and the field, no traceback, and `lora merge` writes nothing. A chat template that is not valid
Jinja is named by where it came from: the adapter file, the model's own tokenizer_config.json or
chat_template.jinja, or --chat-template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers import assert_one_line_error, cli, make_hf_gpt2, train_run, tree

DAMAGED = "train it again or use another adapter"
CHAT = '[{"role": "user", "content": "hi"}]'
BAD_JINJA = "{{ messages[0].content }}{% if %}"
JINJA_PROBLEM = "is not valid Jinja (Expected an expression, got 'end of statement block')"

# (id, stored data.prompt_template, what the message says after `data.prompt_template "TEMPLATE": `)
PROMPT_CASES = [
    ("unknown-field", "{nosuch}", "unknown field {nosuch}"),
    ("lone-brace", "{", "Single '{' encountered in format string"),
    ("unclosed-field", "Q: {instruction", "expected '}' before end of string"),
    ("response-field", "{instruction}\n{output}", "{output} is the response and cannot be in the prompt"),
    ("no-field", "Answer:", "names no field, so every example would get the same prompt"),
    ("attribute", "{instruction.__class__}", "field {instruction.__class__} is not a plain {name} field"),
    ("format-spec", "{instruction:>99999}", "field {instruction:>99999} is not a plain {name} field"),
]

# (id, stored data.labels, the message's part after "data.labels ")
LABEL_CASES = [
    ("twice", ["pos", "pos"], "[\"pos\", \"pos\"] lists 'pos' twice"),
    ("twice-of-three", ["neg", "pos", "neg"], "[\"neg\", \"pos\", \"neg\"] lists 'neg' twice"),
    ("twice-as-text", [1, "1"], "[1, \"1\"] lists '1' twice"),
    ("object", [{"name": "neg"}, "pos"], '[{"name": "neg"}, "pos"] is not a list of label names (text or numbers)'),
    ("booleans", [False, True], "[false, true] is not a list of label names (text or numbers)"),
    ("null", [None, "pos"], '[null, "pos"] is not a list of label names (text or numbers)'),
    ("text", "neg,pos", '"neg,pos" is not a list of label names (text or numbers)'),
]

# (id, stored data.chat_template, the message's part after "data.chat_template ")
CHAT_CASES = [
    ("not-jinja", BAD_JINJA, JINJA_PROBLEM),
    ("a-name", "chatlm", '"chatlm" is not a chat template\'s Jinja text'),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny GPT-2 base and three adapters `lora train` wrote for it: alpaca, chat (ChatML), classifier."""
    from lora_cli.config import load_config
    from lora_cli.train import train

    root = tmp_path_factory.mktemp("stored-settings")
    make_hf_gpt2(root / "base", seed=1)
    train_run(root / "lm", root / "base", steps=1)
    chats = [{"messages": [{"role": "user", "content": f"Repeat {w}."}, {"role": "assistant", "content": f"{w} {w}"}]}
             for w in ("apple", "river", "stone", "cloud")]
    train_run(root / "chat", root / "base", rows=chats, steps=1, data_keys=", chat_template: chatml")
    (root / "cls").mkdir()
    texts = [("what a lovely day", "pos"), ("an awful day", "neg"), ("great food", "pos"), ("sad movie", "neg")]
    (root / "cls" / "data.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in texts * 2))
    (root / "cls" / "run.yaml").write_text(f"""\
model: {root / 'base'}
task: classification
out_dir: out
data: {{train: data.jsonl, val_split: 0.0, max_length: 32}}
lora: {{r: 4, alpha: 8, dropout: 0.0, targets: [attn.c_attn]}}
train: {{max_steps: 1, batch_size: 4, lr: 2e-2, warmup_steps: 0, eval_every: 0, save_every: 0, log_every: 1}}
""")
    train(load_config(root / "cls" / "run.yaml"), log=lambda m: None, progress=False)
    adapters = {name: root / name / "out" / "adapter.safetensors" for name in ("lm", "chat", "cls")}
    return {**adapters, "base": root / "base"}


def stored(src: Path, dst: Path, field: str, value) -> Path:
    """A copy of adapter `src` whose header entry `data` has `field` set to `value`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    data = json.loads(header["data"])
    assert field in data  # the field training writes
    header["data"] = json.dumps({**data, field: value})
    save_file(tensors, str(dst), metadata=header)
    return dst


def refused(adapter: Path, command: str, tmp_path: Path, problem: str) -> None:
    """`lora COMMAND --adapter ADAPTER` fails with exit 1 and the one damaged-settings line, writing nothing."""
    args = {"generate": ["generate", "--adapter", adapter, "--max-new-tokens", "2", "hi"],
            "generate-chat": ["generate", "--adapter", adapter, "--chat", CHAT, "--max-new-tokens", "2"],
            "chat": ["chat", "--adapter", adapter, "--max-new-tokens", "2"],
            "predict": ["predict", "--adapter", adapter, "great day", "awful day"],
            "merge": ["merge", "--adapter", adapter, "--out", tmp_path / "merged"]}[command]
    before = tree(tmp_path)
    result = cli(*args, cwd=tmp_path, stdin="hi\n")
    assert assert_one_line_error(*result) == f"error: {adapter}: the adapter's settings are damaged ({problem}); " \
                                              f"{DAMAGED}"
    assert tree(tmp_path) == before and not (tmp_path / "merged").exists()  # nothing written, not even in part


@pytest.mark.parametrize("command", ["generate", "merge"])
@pytest.mark.parametrize("template,problem", [c[1:] for c in PROMPT_CASES], ids=[c[0] for c in PROMPT_CASES])
def test_stored_prompt_template_that_cannot_render(trained, tmp_path, template, problem, command):
    adapter = stored(trained["lm"], tmp_path / "a.safetensors", "prompt_template", template)
    refused(adapter, command, tmp_path, f"data.prompt_template {json.dumps(template)}: {problem}")


def test_stored_prompt_template_with_a_column_of_the_training_file_still_works(trained, tmp_path):
    """A field that is no role of the format may be a column of the training file (the header lists only the
    roles' columns): beside a role's field it is kept (a --json prompt can fill it)."""
    adapter = stored(trained["lm"], tmp_path / "a.safetensors", "prompt_template", "[{lang}] {instruction}\n")
    code, out, err = cli("generate", "--adapter", adapter, "--max-new-tokens", "2", "hi", cwd=tmp_path)
    assert code == 0 and "error" not in err, err
    (tmp_path / "p.jsonl").write_text(json.dumps({"instruction": "hi", "lang": "en"}) + "\n")
    code, out, err = cli("generate", "--adapter", adapter, "--max-new-tokens", "2", "--json", "--file",
                         tmp_path / "p.jsonl", cwd=tmp_path)
    assert code == 0 and json.loads(out)["lang"] == "en", err


@pytest.mark.parametrize("command", ["predict", "merge"])
@pytest.mark.parametrize("labels,problem", [c[1:] for c in LABEL_CASES], ids=[c[0] for c in LABEL_CASES])
def test_stored_labels_that_are_not_one_name_per_class(trained, tmp_path, labels, problem, command):
    adapter = stored(trained["cls"], tmp_path / "a.safetensors", "labels", labels)
    refused(adapter, command, tmp_path, f"data.labels {problem}")


@pytest.mark.parametrize("command", ["generate-chat", "chat", "merge"])
@pytest.mark.parametrize("template,problem", [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES])
def test_stored_chat_template_is_named_as_the_adapters(trained, tmp_path, template, problem, command):
    """Not blamed on --chat-template, which was not given."""
    adapter = stored(trained["chat"], tmp_path / "a.safetensors", "chat_template", template)
    refused(adapter, command, tmp_path, f"data.chat_template {problem}")


@pytest.mark.parametrize("source", ["tokenizer_config.json", "chat_template.jinja", "--chat-template"])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_chat_template_is_named_by_where_it_came_from(trained, tmp_path, source, command):
    """The model's own template (tokenizer_config.json's chat_template, or chat_template.jinja beside it) or the
    flag's: each message names its source, and only the flag's says to fix what was passed."""
    model = tmp_path / "model"
    shutil.copytree(trained["base"], model)
    flag = []
    if source == "tokenizer_config.json":
        (model / source).write_text(json.dumps({"chat_template": BAD_JINJA}))
        where = f"{model / source}: chat_template: the model's chat template"
    elif source == "chat_template.jinja":
        (model / source).write_text(BAD_JINJA)
        where = f"{model / source}: the model's chat template"
    else:
        flag = ["--chat-template", BAD_JINJA]
        where = "--chat-template: the chat template"
    fix = "fix the template" if flag else "fix it, or pass --chat-template (chatml or a .jinja file) to use another"
    args = ["generate", "--chat", CHAT] if command == "generate" else ["chat"]
    result = cli(*args, "--model", model, *flag, "--max-new-tokens", "2", cwd=tmp_path, stdin="hi\n")
    assert assert_one_line_error(*result, expected_code=2) == f"error: {where} {JINJA_PROBLEM}; {fix}"
