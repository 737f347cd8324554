"""Chat data and chat templates (issue 16, items 1-3): the rendered text and ids equal transformers'
`apply_chat_template` for a ChatML, a Llama-3-style and a default-system-prompt template; the loss masks cover
exactly the assistant spans (checked against transformers' `{% generation %}` assistant masks and by hand);
`lora eval` on chat data equals a transformers computation on the same ids; `lora chat` in a pty streams what
`lora generate --chat` prints; bad conversations are one line naming the file and row, exit 2."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys

import pytest
import torch

from helpers import REPO, assert_one_line_error, build_tokenizer, child_env, cli, rel, tree
from lora_cli.chat import chat_prompt_ids, stop_at
from lora_cli.chat_template import chat_ids, conversation, encode_chat, end_of_turn, render_chat, template_tokens
from lora_cli.config import CHATML_TEMPLATE
from lora_cli.errors import ConfigError, ConversationError
from lora_cli.inference import load_for_inference
from lora_cli.tokenizer import GPT2, load_tokenizer

transformers = pytest.importorskip("transformers")

# Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5-Instruct's template without its tools branch: a default system message when the conversation has none.
QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}\n{%- else %}\n    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are "
    "a helpful assistant.<|im_end|>\\n' }}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role "
    "== \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}\n        "
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- endif %}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
# ChatML with transformers' `{% generation %}` markers around what the assistant's turn adds (content and end of
# turn): transformers' return_assistant_tokens_mask then marks the tokens our masks must mark.
CHATML_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>\\n' }}{% endgeneration %}{% else %}{{ '<|im_start|>' + "
    "message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Mistral-Instruct's template: it refuses a system message with raise_exception.
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
    "are supported!') }}{% endif %}{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, world!"}, {"role": "assistant", "content": "The quick brown fox."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "green"}, {"role": "user", "content": "And another one?"},
     {"role": "assistant", "content": " naïve café — 東京 🤖\nline two"}],
    [{"role": "user", "content": "  spaces\tand tabs  "}, {"role": "assistant", "content": "def f(x):\n    return x"},
     {"role": "user", "content": "again"}],
]


def tokenizer_dir(path, family: str):
    """A byte-level BPE tokenizer directory (helpers.build_tokenizer) with the chat special tokens of `family`:
    llama3 (<|start_header_id|>, <|end_header_id|> added; bos added by the tokenizer) or qwen (no bos)."""
    from tokenizers import Tokenizer

    build_tokenizer(path, bos=family == "llama3")
    if family == "llama3":
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tok.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>"])
        tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-tokenizers")
    return {family: tokenizer_dir(root / family, family) for family in ("llama3", "qwen")}


def hf_tokenizer(folder, template):
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("family,template", [("qwen", CHATML_TEMPLATE), ("llama3", LLAMA3), ("qwen", QWEN25),
                                             ("qwen", MISTRAL)], ids=["chatml", "llama3", "qwen2.5-default-system",
                                                                      "mistral"])
def test_rendering_equals_apply_chat_template(tokenizer_dirs, family, template):
    folder = tokenizer_dirs[family]
    ours, theirs = load_tokenizer(str(folder)), hf_tokenizer(folder, template)
    for messages in CONVERSATIONS:
        if template is MISTRAL and messages[0]["role"] == "system":
            messages = messages[1:]
        for generation_prompt in (False, True):
            want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            assert render_chat(template, messages, generation_prompt, template_tokens(ours)) == want
            assert chat_ids(template, messages, ours, generation_prompt) == theirs(want, add_special_tokens=False)["input_ids"]
    if template is QWEN25:
        assert "You are Qwen" in render_chat(template, CONVERSATIONS[0], tokens=template_tokens(ours))


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    """GPT-2's tokenizer files as `lora merge` writes them, which transformers' AutoTokenizer reads."""
    from lora_cli.merge import tokenizer_files

    folder = tmp_path_factory.mktemp("gpt2-tokenizer")
    for name, text in tokenizer_files().items():
        (folder / name).write_text(text)
    return folder


def test_gpt2_chatml_renders_as_transformers(gpt2_files):
    theirs = hf_tokenizer(gpt2_files, CHATML_TEMPLATE)
    for messages in CONVERSATIONS:
        want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(CHATML_TEMPLATE, messages, True, template_tokens(GPT2)) == want
        assert chat_ids(CHATML_TEMPLATE, messages, GPT2, True) == theirs(want, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", ["qwen", "gpt2"])
def test_masks_are_the_assistant_spans(tokenizer_dirs, gpt2_files, family):
    """Our masks equal transformers' assistant masks of the same template with `{% generation %}` markers, and the
    masked text is exactly each assistant's content and its end of turn."""
    if family == "gpt2":
        folder, ours = gpt2_files, GPT2
    else:
        folder = tokenizer_dirs[family]
        ours = load_tokenizer(str(folder))
    theirs = hf_tokenizer(folder, CHATML_GENERATION)
    for messages in CONVERSATIONS:
        ids, mask = encode_chat(CHATML_TEMPLATE, messages, ours)
        assert (ids, mask) == encode_chat(CHATML_GENERATION, messages, ours)
        out = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == list(out["input_ids"])
        assert mask == [bool(x) for x in out["assistant_masks"]]
        # by hand: the masked runs decode to "content<|im_end|>\n" of each assistant message, in order
        runs, current = [], []
        for token, m in zip(ids + [None], mask + [False]):
            if m:
                current.append(token)
            elif current:
                runs.append(ours.decode(current))
                current = []
        want = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
        assert runs == want
        last_ids, last_mask = encode_chat(CHATML_TEMPLATE, messages, ours, train_on="last_assistant")
        assert last_ids == ids
        last_runs = [r for r in runs[-1:]]
        assert ours.decode([t for t, m in zip(ids, last_mask) if m]) == "".join(last_runs)
        assert sum(last_mask) < sum(mask) or len(want) == 1


def test_a_token_across_the_span_edge_is_in_the_span(tmp_path):
    """A reply that starts with a newline, after ChatML's "assistant\n", merges with it into one "\n\n" token (as
    in Qwen's vocabulary): the token is trained, as in transformers' assistant mask, where it was an error that
    stopped the run."""
    from tokenizers import Tokenizer

    folder = tokenizer_dir(tmp_path / "tok", "qwen")
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw.add_tokens(["\n\n"])
    raw.save(str(folder / "tokenizer.json"))
    ours, theirs = load_tokenizer(str(folder)), hf_tokenizer(folder, CHATML_GENERATION)
    messages = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "\nGreen."},
                {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Blue.\n"}]
    ids, mask = encode_chat(CHATML_TEMPLATE, messages, ours)
    out = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"]) and mask == [bool(x) for x in out["assistant_masks"]]
    assert ours.decode([t for t, m in zip(ids, mask) if m]) == "\n\nGreen.<|im_end|>\nBlue.\n<|im_end|>\n"


def test_an_edge_the_prefix_alone_tokenizes_otherwise_is_found(gpt2_files):
    """GPT-2's BPE encodes a prefix ending in "\n\n" (a header, or the end of a reply) as one "\n\n" token, the
    whole conversation there as "\n", "\n": the span's start was put before the header's newlines and a reply's
    end before its own last newline. Each reply's span is now its content and its "\n\n", as transformers' mask
    has it (gpt2_files: the same BPE as an AutoTokenizer)."""
    template = ("{% for m in messages %}{{ m['role'] + ':\\n\\n' }}{% if m['role'] == 'assistant' %}"
                "{% generation %}{{ m['content'] + '\\n\\n' }}{% endgeneration %}{% else %}"
                "{{ m['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant:\\n\\n' }}{% endif %}")
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."},
                {"role": "user", "content": "More"}, {"role": "assistant", "content": "Sure."}]
    ids, mask = encode_chat(template, messages, GPT2)
    theirs = hf_tokenizer(gpt2_files, template)
    out = theirs.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == list(out["input_ids"]) and mask == [bool(x) for x in out["assistant_masks"]]
    assert GPT2.decode([t for t, m in zip(ids, mask) if m]) == "Hi there.\n\nSure.\n\n"


def test_reasoning_under_any_of_its_names_reaches_the_template(tokenizer_dirs):
    """A message's reasoning given as reasoning_content, thinking or reasoning is rendered by a template that reads
    reasoning_content (Qwen3's) or thinking (gpt-oss's), as apply_chat_template renders it."""
    theirs = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dirs["qwen"]))
    reads = {"reasoning_content": "{% for m in messages %}{{ m.role }}:{{ m.reasoning_content }}|{{ m.content }}\n"
                                  "{% endfor %}",
             "thinking": "{% for m in messages %}{{ m.role }}:{{ m.thinking }}|{{ m.content }}\n{% endfor %}"}
    for field in ("reasoning_content", "thinking", "reasoning"):
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", field: "greet"}]
        for template in reads.values():
            want = theirs.apply_chat_template(messages, tokenize=False, chat_template=template)
            assert render_chat(template, messages) == want
            assert "assistant:greet|Hello" in want


def test_templates_that_raise_or_drop_history_are_named():
    zero = "{{ 1 // 0 }}"
    with pytest.raises(ConversationError, match=re.escape("the chat template failed to render the conversation "
                                                          "(ZeroDivisionError: integer division or modulo by zero)")):
        render_chat(zero, CONVERSATIONS[0])
    # Qwen3-like: earlier replies are rendered without their reasoning, so the prefix differs from the whole
    drops = ("{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')"
             "[-1] }}{% else %}{{ m.content }}{% endif %}\n{% endfor %}")
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>x</think>b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>y</think>d"}]
    with pytest.raises(ConversationError, match=re.escape("message 2: the chat template does not render the "
                       "conversation prefix by prefix (the text up to this message differs from the whole "
                       "conversation's), so its assistant span cannot be found; set data.train_on: last_assistant")):
        encode_chat(drops, messages, GPT2)
    ids, mask = encode_chat(drops, messages, GPT2, train_on="last_assistant")
    assert GPT2.decode([t for t, m in zip(ids, mask) if m]) == "<think>y</think>d"  # trim_blocks ate the "\n"


def test_llama3_spans_include_eot(tokenizer_dirs):
    ours = load_tokenizer(str(tokenizer_dirs["llama3"]))
    ids, mask = encode_chat(LLAMA3, CONVERSATIONS[1], ours)
    assert ids[0] == ours.bos_id and ours.encode("<|eot_id|>", allow_special=True) == [ids[-1]] and mask[-1]
    masked = ours.decode([t for t, m in zip(ids, mask) if m])
    assert masked == "green<|eot_id|>naïve café — 東京 🤖\nline two<|eot_id|>"  # Llama 3 trims the content
    assert end_of_turn(LLAMA3, template_tokens(ours)) == "<|eot_id|>"
    assert end_of_turn(CHATML_TEMPLATE) == "<|im_end|>"


def test_conversation_checks_and_sharegpt():
    sharegpt = [{"from": "system", "value": "s"}, {"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]
    assert conversation(sharegpt) == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                      {"role": "assistant", "content": "a"}]
    assert conversation(json.dumps({"messages": sharegpt[1:]})) == conversation(sharegpt)[1:]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]},
             {"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]  # OpenAI's content parts
    assert conversation(parts) == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    image = [{"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": "What is it?"}]
    bad = [([{"role": "user", "content": image}, parts[1]],
            "message 1 (user) has content parts of type image_url; lora-cli trains on text"),
           ([parts[0], {"role": "assistant", "content": [{"type": "text", "text": 5}]}],
            "message 2 (assistant) has no text 'content'"),
           ([parts[0], {"role": "assistant", "content": 5}], "message 2 (assistant) has no text 'content'"),
           ([{"content": "x"}], "message 1 has no 'role'"),
           ([{"role": "user", "content": "x"}, {"role": "asistant", "content": "y"}],
            "message 2 has the unknown role 'asistant' (did you mean assistant?)"),
           ([{"role": "user", "content": "x"}], "no assistant message"),
           ([{"from": "bot", "value": "x"}], "unknown sender 'bot'"),
           ([{"from": ["human"], "value": "x"}], "unknown sender ['human']"),  # was an internal TypeError
           ([{"from": {"a": 1}, "value": "x"}], "unknown sender {'a': 1}"),
           ([parts[0], {"role": "assistant", "content": None}], "message 2 (assistant) has no text 'content'"),
           ([], "non-empty list")]
    for value, message in bad:
        with pytest.raises(ConversationError, match=re.escape(message)):
            conversation(value)
    # OpenAI's tool-call turn: content null, the calls in tool_calls (rendered by the template)
    calls = [{"type": "function", "function": {"name": "f", "arguments": {}}}]
    turn = conversation([parts[0], {"role": "assistant", "content": None, "tool_calls": calls},
                         {"role": "tool", "content": "42"}, {"role": "assistant", "content": "It is 42."}])
    assert turn[1] == {"role": "assistant", "content": "", "tool_calls": calls}


def test_stop_at_holds_back_a_partial_marker():
    pieces = ["Hel", "lo<", "|im", "_e", "nd|>\nmore"]
    assert list(stop_at(pieces, "<|im_end|>")) == ["Hel", "lo"]
    assert "".join(stop_at(["a<", "b"], "<|im_end|>")) == "a<b"
    assert "".join(stop_at(pieces, "")) == "Hello<|im_end|>\nmore"


# ------------------------------------------------------------------------------------------- through the CLI

ROWS = [
    [{"role": "user", "content": f"Repeat {w}."}, {"role": "assistant", "content": f"{w} {w}"},
     {"role": "user", "content": "Once more?"}, {"role": "assistant", "content": w}]
    for w in ("apple", "river", "stone", "cloud", "green", "quick")
]
RUN = """\
model: {model}
out_dir: out
data: {{train: train.jsonl, val_split: 0.0, max_length: 96, chat_template: chatml}}
lora: {{r: 4, alpha: 8, dropout: 0.0, targets: [attn.c_attn, mlp.c_proj]}}
train: {{lr: 5e-2, batch_size: 3, max_steps: 2, warmup_steps: 0, eval_every: 0, save_every: 0, log_every: 1}}
"""


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@pytest.fixture(scope="module")
def chat_run(tiny, tmp_path_factory):
    """A chat adapter trained by `lora train` on GPT-2 with the built-in ChatML template: (folder, adapter)."""
    root = tmp_path_factory.mktemp("chat-run")
    write_jsonl(root / "train.jsonl", [{"messages": m} for m in ROWS])
    (root / "run.yaml").write_text(RUN.format(model=tiny[0]))
    code, out, err = cli("train", root / "run.yaml", "-q", cwd=root)
    assert code == 0, err
    return root, root / "out" / "adapter.safetensors"




def reference_loss(model, tok, conversations) -> tuple[float, int]:
    """Mean cross-entropy over the assistant tokens, computed with transformers on its own ids and masks."""
    total, count = 0.0, 0
    for messages in conversations:
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        labels = torch.tensor([t if m else -100 for t, m in zip(ids, mask)][1:])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
        total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-100).item()
        count += int((labels != -100).sum())
    return total / count, count


def test_train_eval_merge_match_transformers(chat_run, tiny, gpt2_files, tmp_path):
    root, adapter = chat_run
    code, out, err = cli("eval", "--adapter", adapter, "--data", root / "train.jsonl", "--json", "-q", cwd=root)
    assert code == 0, err
    result = json.loads(out)
    tok = hf_tokenizer(gpt2_files, CHATML_GENERATION)  # the ChatML template marked for assistant masks
    base_loss, count = reference_loss(tiny[1], tok, ROWS)
    assert result["tokens"] == result["base"]["tokens"] == count == sum(
        len(tok(m["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
        for row in ROWS for m in row if m["role"] == "assistant")
    assert rel(torch.tensor(result["base"]["loss"]), torch.tensor(base_loss)) <= 1e-4
    # the merged model carries the template in tokenizer_config.json: transformers alone reproduces the adapter's loss
    code, out, err = cli("merge", "--adapter", adapter, "--out", tmp_path / "merged", cwd=root)
    assert code == 0, err
    merged_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    assert merged_tok.chat_template == CHATML_TEMPLATE
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    adapter_loss, _ = reference_loss(merged, tok, ROWS)
    assert rel(torch.tensor(result["loss"]), torch.tensor(adapter_loss)) <= 1e-4
    assert abs(result["loss"] - result["base"]["loss"]) > 1e-3  # the adapter learned something
    # the merged directory alone (its tokenizer_config.json's template) answers as the adapter does
    conversation_json = json.dumps(ROWS[0][:3])
    replies = [cli("generate", *source, "--chat", conversation_json, "--max-new-tokens", "8", cwd=root)
               for source in (("--adapter", adapter), ("--model", tmp_path / "merged"))]
    assert replies[0].rc == 0 and replies[0][:2] == replies[1][:2] and replies[0].stdout.strip(), replies
    # and a PEFT export carries it as chat_template.jinja
    code, out, err = cli("export", adapter, tmp_path / "peft", cwd=root)
    assert code == 0, err
    assert (tmp_path / "peft" / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    # which lora-cli reads back (with the rest of the data settings): the export evaluates and answers as trained
    code, out, err = cli("eval", "--adapter", tmp_path / "peft", "--data", root / "train.jsonl", "--json", "-q",
                         "--no-base", cwd=root)
    assert code == 0, err
    exported = json.loads(out)
    assert exported["tokens"] == result["tokens"] and exported["loss"] == pytest.approx(result["loss"], rel=1e-6)
    replies.append(cli("generate", "--adapter", tmp_path / "peft", "--model", tiny[0], "--chat", conversation_json,
                       "--max-new-tokens", "8", cwd=root))
    assert replies[2][:2] == replies[0][:2], replies
    # training on the merged directory's own template; a broken one is named by its file, not as data.chat_template
    (tmp_path / "run.yaml").write_text(RUN.format(model=tmp_path / "merged").replace(", chat_template: chatml", "")
                                       .replace("train: train.jsonl", f"train: {root / 'train.jsonl'}")
                                       .replace("out_dir: out", f"out_dir: {tmp_path / 'again'}"))
    code, out, err = cli("train", tmp_path / "run.yaml", "-q", cwd=root)
    assert code == 0, err
    config = tmp_path / "merged" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": "{% for m in messages %}"}))
    line = assert_one_line_error(*cli("train", tmp_path / "run.yaml", "-q", "--overwrite", cwd=root), expected_code=2)
    assert line.startswith(f"error: {config}: chat_template: the model's chat template is not valid Jinja"), line
    assert line.endswith("; fix it, or set data.chat_template (chatml or a .jinja file) to use another"), line


def test_a_chat_runs_test_split_is_jsonl_that_lora_eval_reads_back(tiny, tmp_path):
    """Chat rows hold lists, which a CSV keeps only as Python text: the run writes its test split as test.jsonl,
    and `lora eval --data out/test.jsonl` gives what `lora eval CONFIG` gives on the split training built."""
    write_jsonl(tmp_path / "train.jsonl", [{"messages": m} for m in ROWS])
    (tmp_path / "run.yaml").write_text(RUN.format(model=tiny[0]).replace("val_split: 0.0", "test_split: 0.34"))
    code, out, err = cli("train", tmp_path / "run.yaml", "-q", cwd=tmp_path)
    assert code == 0, err
    assert not (tmp_path / "out" / "test.csv").exists()
    written = [json.loads(line) for line in (tmp_path / "out" / "test.jsonl").read_text().splitlines()]
    assert len(written) == 2 and all(row["messages"] in ROWS for row in written)
    by_config = cli("eval", tmp_path / "run.yaml", "--json", "-q", cwd=tmp_path)
    by_file = cli("eval", "--adapter", tmp_path / "out", "--data", tmp_path / "out" / "test.jsonl", "--json", "-q",
                  cwd=tmp_path)
    assert by_config.rc == by_file.rc == 0, (by_config, by_file)
    a, b = json.loads(by_config.stdout), json.loads(by_file.stdout)
    assert (a["tokens"], a["loss"], a["base"]["loss"]) == (b["tokens"], b["loss"], b["base"]["loss"])


def test_a_sharegpt_adapter_evaluates_messages_data_and_back(chat_run, tmp_path):
    """Detection maps chat to ShareGPT's conversations column by itself: an adapter trained on either spelling
    reads the other (its stored column is no rename the user asked for)."""
    root, adapter = chat_run
    sender = {"user": "human", "assistant": "gpt"}
    write_jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": sender[m["role"]], "value": m["content"]}
                                                              for m in row]} for row in ROWS])
    results = {}
    for name in ("share.jsonl", "train.jsonl"):
        code, out, err = cli("eval", "--adapter", adapter, "--data", (tmp_path if name == "share.jsonl" else root) / name,
                             "--json", "-q", "--no-base", cwd=root)
        assert code == 0, err
        results[name] = json.loads(out)
    assert results["share.jsonl"]["tokens"] == results["train.jsonl"]["tokens"]
    assert results["share.jsonl"]["loss"] == results["train.jsonl"]["loss"]
    line = assert_one_line_error(*cli("eval", "--adapter", adapter, "--data", root / "train.jsonl", "--column",
                                      "messages=turns", cwd=root))
    assert line == (f"error: {root / 'train.jsonl'}: column 'turns' for role messages (--column, or the column the "
                    "adapter was trained on) is not in the file; its columns are: messages; map one with --column "
                    "messages=<column> (a file without a header row: --no-header --column-names NAME,NAME,...)")


def test_settings_the_data_format_would_ignore_are_refused(tiny, tmp_path):
    """A prompt template on chat data, a chat template or train_on on alpaca data: one line, exit 1, no out_dir;
    and eval's flags likewise, with its missing template named by its flag."""
    write_jsonl(tmp_path / "train.jsonl", [{"messages": m} for m in ROWS])
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": f"Say {w}.", "output": w} for w in "abcdef"]))
    chat_run = RUN.format(model=tiny[0])
    configs = {
        "chat data, prompt_template": (chat_run.replace("chat_template: chatml", "chat_template: chatml, "
                                                        "prompt_template: 'Q: {prompt}'"),
                                       "train.jsonl is chat data: data.prompt_template does not apply (its chat template "
                                       "renders the conversations); remove data.prompt_template"),
        "alpaca data, chat keys": (chat_run.replace("train.jsonl", "alpaca.json").replace(
                                       "chat_template: chatml", "chat_template: chatml, train_on: last_assistant"),
                                   "alpaca.json is alpaca data: data.chat_template applies to chat data only; "
                                   "data.train_on applies to chat data only; remove data.chat_template and "
                                   "data.train_on"),
    }
    for text, message in configs.values():  # ConfigError: exit 2, as any bad setting
        (tmp_path / "run.yaml").write_text(text)
        before = tree(tmp_path)
        line = assert_one_line_error(*cli("train", tmp_path / "run.yaml", "-q", cwd=tmp_path), expected_code=2)
        assert line == f"error: {tmp_path}/{message}"
        assert tree(tmp_path) == before
    eval_cases = [
        (["--data", "train.jsonl"], "error: --chat-template: the model has no chat template (no chat_template in its "
                                    "tokenizer_config.json); pass --chat-template chatml (built in) or a .jinja file"),
        (["--data", "train.jsonl", "--chat-template", "chatml", "--prompt-template", "Q: {prompt}"],
         "error: --prompt-template: train.jsonl is chat data, which a chat template renders (the adapter's, the "
         "model's or --chat-template); leave out --prompt-template"),
        (["--data", "alpaca.json", "--chat-template", "chatml"],
         "error: --chat-template renders chat data (a messages or conversations column); alpaca.json is alpaca data: "
         "leave out --chat-template"),
    ]
    for flags, message in eval_cases:
        assert assert_one_line_error(*cli("eval", "--model", tiny[0], *flags, cwd=tmp_path), expected_code=2) == message
    code, out, err = cli("eval", "--model", tiny[0], "--data", "train.jsonl", "--chat-template", "chatml", "--json",
                         "-q", cwd=tmp_path)
    assert code == 0 and json.loads(out)["examples"] == len(ROWS), err
    (tmp_path / "run.yaml").write_text(chat_run)
    for flag, key, value in (("--chat-template", "chat_template", "chatml"), ("--format", "format", "chat"),
                             ("--prompt-template", "prompt_template", "{prompt}"), ("--column", "columns", "a=b")):
        line = assert_one_line_error(*cli("eval", "run.yaml", flag, value, cwd=tmp_path), expected_code=2)
        assert line == (f"error: {flag}: a run config's data is read with its own data.{key}; change it with --set "
                        f"data.{key}=... or leave out {flag}")


def read_until(fd, marker: bytes, timeout: float = 120.0) -> bytes:
    """Bytes from a pty master until `marker` has arrived (select, no sleeps); a child that stops talking first
    fails the test."""
    data = b""
    while marker not in data:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no {marker!r} after {data!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        assert chunk, f"the terminal closed before {marker!r}: {data!r}"
        data += chunk
    return data


def test_chat_in_a_terminal_equals_generate_chat(chat_run):
    root, adapter = chat_run
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "lora_cli", "chat", "--adapter", str(adapter),
                             "--max-new-tokens", "12", "--system", "Be brief."],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE, cwd=root,
                            env={**child_env(), "PYTHONPATH": str(REPO)})
    os.close(slave)
    try:
        def turn(text: str) -> str:
            os.write(master, text.encode() + b"\n")
            out = read_until(master, b"\r\n>>> ").decode()
            echoed, _, reply = out.partition("\r\n")  # the terminal echoes the line typed
            assert echoed.endswith(text)
            return reply[:-len("\r\n>>> ")].replace("\r\n", "\n")

        read_until(master, b">>> ")
        first = turn("Repeat apple.")
        second = turn("Once more?")
        assert turn("/reset") == "(history cleared)"
        third = turn("Repeat apple.")
        os.write(master, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill() if proc.poll() is None else None
        os.close(master)
    assert "chatting with" in proc.stderr.read().decode()
    system = {"role": "system", "content": "Be brief."}
    history = [system, {"role": "user", "content": "Repeat apple."}, {"role": "assistant", "content": first},
               {"role": "user", "content": "Once more?"}]
    code, out, err = cli("generate", "--adapter", adapter, "--max-new-tokens", "12", "--chat", json.dumps(history),
                         cwd=root)
    assert code == 0, err
    assert out == second + "\n"
    assert third == first and first  # /reset forgot the history (and kept --system)
    lines = [json.dumps(history[:2]), json.dumps({"messages": history, "id": 7})]
    (root / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    code, out, err = cli("generate", "--adapter", adapter, "--max-new-tokens", "12", "--chat", "--file",
                         root / "conversations.jsonl", "--json", "-q", cwd=root)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["generated"] for r in records] == [first, second] and records[1]["id"] == 7


def test_piped_chat_fits_replies_in_the_context_and_fails_with_exit_1(chat_run):
    """By default a reply takes at most what the context (128 here) leaves after the conversation, so turns do not
    fail once the history is long; a turn that fails (an explicit --max-new-tokens too large) makes the exit
    status 1."""
    root, adapter = chat_run
    code, out, err = cli("chat", "--adapter", adapter, "--device", "cpu", stdin="Repeat apple.\nOnce more?\n",
                         cwd=root)
    first, second = out.split(">>> ")[1:3]
    assert first.strip() and "error" not in first  # a reply (256 tokens would not fit: every turn failed)
    ids = len(chat_prompt_ids(load_for_inference(adapter), [{"role": "user", "content": "Repeat apple."},
                                                            {"role": "assistant", "content": first[:-1]},
                                                            {"role": "user", "content": "Once more?"}]))
    assert second == ""  # the failed turn's error is on stderr: stdout holds only the conversation
    assert err.splitlines()[-1] == (f"error: the conversation has {ids} tokens, which fill the model's context of "
                                    "128 tokens; start over (/reset in lora chat) or shorten it")  # context used up
    assert code == 1  # a turn failed


def test_bytes_that_are_not_utf8_on_stdin(chat_run):
    """Bytes that are not UTF-8 on stdin are refused as they are in a file, not decoded into junk tokens: a whole
    stdin (generate --file -) in one line, exit 1; a chat line as a failed turn (the next line is answered)."""
    root, adapter = chat_run
    line = assert_one_line_error(*cli("generate", "--adapter", adapter, "--device", "cpu", "--file", "-",
                                      stdin=b"Hello\ncaf\xe9\n", cwd=root))
    assert line == "error: stdin: not UTF-8 text (byte offset 9); re-save it as UTF-8"
    code, out, err = cli("chat", "--adapter", adapter, "--device", "cpu", "--max-new-tokens", "3",
                         stdin=b"caf\xe9\nHi\n", cwd=root)
    assert code == 1  # a turn failed: the first; the second was answered
    assert [line for line in err.splitlines() if "error" in line] == [
        "error: that line is not UTF-8 text; type or send UTF-8"]
    assert out.count(">>> ") == 3 and out.split(">>> ")[1] == ""


FLAG_ERRORS = [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be a non-negative integer, got -1"),
    (["--temperature", "-0.5"], "--temperature must be >= 0 (0 = greedy), got -0.5"),
    (["--temperature", "nan"], "--temperature must be >= 0 (0 = greedy), got nan"),
    (["--top-k", "0"], "--top-k must be a positive integer, got 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--no-repeat-ngram-size", "-2"], "--no-repeat-ngram-size must be a non-negative integer (0 = off), got -2"),
    (["--seed", str(2**64)], "--seed must be an integer from -9223372036854775808 to 18446744073709551615, got "
                             "18446744073709551616"),
]
# lora generate fits each prompt to the budget once the prompts are read; lora chat checks it as it starts
CHAT_ONLY = [(["--max-new-tokens", "200"], "--max-new-tokens 200 leaves no room for a conversation in the model's "
                                           "context of 128 tokens; lower it below 128")]


@pytest.mark.parametrize("command, flags, message", [("chat", *case) for case in FLAG_ERRORS + CHAT_ONLY]
                         + [("generate", *case) for case in FLAG_ERRORS])
def test_decoding_flags_are_checked_before_any_input(chat_run, command, flags, message):
    """A bad decoding flag is one line, exit 2, before a line of input is read (as lora generate does), with or
    without input to answer."""
    root, adapter = chat_run
    args = ["generate", "--file", "-"] if command == "generate" else ["chat"]
    args += ["--adapter", adapter, "--device", "cpu", *flags]
    for stdin in ("", "Hi\n"):
        line = assert_one_line_error(*cli(*args, stdin=stdin, cwd=root), expected_code=2)
        assert line == f"error: {message}"


def test_chat_precision(chat_run):
    """--precision reaches the chat commands: bf16 weights answer (the same reply up to bf16 rounding is not
    asserted on a random tiny model), fp16 off CUDA is one line, exit 2."""
    root, adapter = chat_run
    history = json.dumps([{"role": "user", "content": "Repeat apple."}])
    code, out, err = cli("generate", "--adapter", adapter, "--max-new-tokens", "4", "--chat", history, "--json",
                         "--precision", "bf16", "--device", "cpu", cwd=root)
    assert code == 0, err
    assert isinstance(json.loads(out)["generated"], str)
    code, out, err = cli("chat", "--adapter", adapter, "--precision", "fp16", "--device", "cpu", cwd=root)
    assert assert_one_line_error(code, out, err, expected_code=2) == (
        "error: --precision fp16 needs a CUDA device (this is cpu); use bf16 or fp32 here")


BAD = {
    "no-role": ([ROWS[0], [{"content": "hi"}, {"role": "assistant", "content": "x"}]], "chatml",
                "no-role.jsonl: row 2 (line 2): column 'messages': message 1 has no 'role'"),
    "unknown-role": ([ROWS[0], ROWS[1], [{"role": "robot", "content": "hi"}]], "chatml",
                     "unknown-role.jsonl: row 3 (line 3): column 'messages': message 1 has the unknown role 'robot'"),
    "no-assistant": ([[{"role": "user", "content": "hi"}], ROWS[0]], "chatml",
                     "no-assistant.jsonl: row 1 (line 1): column 'messages': the conversation has no assistant message"),
    "bad-template": ([[{"role": "system", "content": "s"}] + ROWS[0]], "mistral.jinja",
                     "bad-template.jsonl: row 1 (line 1): column 'messages': the chat template failed to render the "
                     "conversation (Conversation roles must alternate"),
}


def test_chat_files_read_alike(tmp_path):
    """JSON, JSONL, Parquet, ShareGPT and a CSV cell of JSON text give the same examples."""
    import pandas as pd

    from lora_cli.config import DataConfig
    from lora_cli.data import load_file

    (tmp_path / "a.json").write_text(json.dumps([{"messages": m} for m in ROWS]))
    write_jsonl(tmp_path / "b.jsonl", [{"messages": m} for m in ROWS])
    pd.DataFrame({"messages": ROWS}).to_parquet(tmp_path / "c.parquet")
    sender = {"user": "human", "assistant": "gpt", "system": "system"}
    write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": sender[m["role"]], "value": m["content"]}
                                                          for m in row]} for row in ROWS])
    pd.DataFrame({"messages": [json.dumps(m) for m in ROWS]}).to_csv(tmp_path / "e.csv", index=False)
    cfg = DataConfig(chat_template="chatml", max_length=96)
    loaded = [load_file(tmp_path / name, cfg) for name in ("a.json", "b.jsonl", "c.parquet", "d.jsonl", "e.csv")]
    assert [x[3] for x in loaded] == ["chat"] * 5 and loaded[3][4] == {"messages": "conversations"}
    want = [(e.ids, e.loss_mask) for e in loaded[0][0]]
    assert want == [encode_chat(CHATML_TEMPLATE, m, GPT2) for m in ROWS]
    for examples, *_ in loaded[1:]:
        assert [(e.ids, e.loss_mask) for e in examples] == want
    last = load_file(tmp_path / "b.jsonl", DataConfig(chat_template="chatml", max_length=96, train_on="last_assistant"))
    assert [e.loss_mask for e in last[0]] == [encode_chat(CHATML_TEMPLATE, m, GPT2, "last_assistant")[1] for m in ROWS]


@pytest.mark.parametrize("name", list(BAD))
def test_bad_conversations(tmp_path, name):
    from lora_cli.config import DataConfig
    from lora_cli.data import load_file

    rows, template, message = BAD[name]
    write_jsonl(tmp_path / f"{name}.jsonl", [{"messages": m} for m in rows])
    (tmp_path / "mistral.jinja").write_text(MISTRAL)
    with pytest.raises(ConversationError) as err:
        load_file(tmp_path / f"{name}.jsonl", DataConfig(chat_template=str(tmp_path / template) if "." in template
                                                         else template))
    assert message in str(err.value) and err.value.exit_code == 2


def test_bad_conversation_stops_lora_train_with_one_line(tiny, tmp_path):
    rows, _, message = BAD["no-role"]
    write_jsonl(tmp_path / "no-role.jsonl", [{"messages": m} for m in rows])
    (tmp_path / "run.yaml").write_text(RUN.format(model=tiny[0]).replace("train.jsonl", "no-role.jsonl"))
    before = tree(tmp_path)
    line = assert_one_line_error(*cli("train", tmp_path / "run.yaml", "-q", cwd=tmp_path), expected_code=2)
    assert message in line, line
    assert tree(tmp_path) == before  # nothing written


def test_a_template_that_is_no_jinja_or_drops_the_assistant_is_named(tmp_path):
    from lora_cli.config import DataConfig
    from lora_cli.data import load_file

    write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor")
    (tmp_path / "quiet.jinja").write_text("{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}\n"
                                          "{% endif %}{% endfor %}")
    with pytest.raises(ConfigError, match=r"^data.chat_template '.*bad.jinja': the chat template is not valid Jinja "):
        load_file(tmp_path / "chat.jsonl", DataConfig(chat_template=str(tmp_path / "bad.jinja")))
    with pytest.raises(ConfigError, match=r"^data.chat_template never writes an assistant message's content, so no "
                                          r"token could carry a loss; use a template that renders the assistant turns"):
        load_file(tmp_path / "chat.jsonl", DataConfig(chat_template=str(tmp_path / "quiet.jinja")))


def test_checkpoint_template_lookup(tmp_path):
    from lora_cli.chat_template import checkpoint_template, resolve_template
    from lora_cli.errors import ConfigError

    folder = tokenizer_dir(tmp_path / "tok", "qwen")
    tok = load_tokenizer(str(folder))
    assert checkpoint_template(tok) is None
    with pytest.raises(ConfigError, match="the model has no chat template .* set data.chat_template: chatml"):
        resolve_template(None, tok)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**config, "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": QWEN25}]}))
    assert checkpoint_template(tok) == resolve_template(None, tok) == QWEN25
    (folder / "chat_template.jinja").write_text(LLAMA3)  # transformers >= 4.50 saves it so; it wins
    assert checkpoint_template(tok) == LLAMA3
    assert resolve_template("chatml", tok) == CHATML_TEMPLATE and resolve_template(MISTRAL, tok) == MISTRAL
    with pytest.raises(ConfigError, match=r"'chatlm' is neither a built-in chat template \(chatml\) nor a file "
                                          r"\(did you mean chatml\?\)"):
        resolve_template("chatlm", tok)
    # a GPT-2 directory (no tokenizer.json) keeps its template in tokenizer_config.json, as `lora merge` writes it
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))
    assert checkpoint_template(GPT2) is None and checkpoint_template(GPT2, tmp_path / "gpt2") == CHATML_TEMPLATE


def test_merge_writes_the_trained_template_over_the_bases_file(tmp_path):
    """`lora merge` carries a base's chat_template.jinja, which transformers reads before tokenizer_config.json: the
    template the adapter was trained with replaces it, so the merged model chats as trained."""
    from lora_cli.chat_template import add_to_tokenizer_config, checkpoint_template

    folder = tokenizer_dir(tmp_path / "tok", "qwen")
    files = {name: (folder / name).read_text() for name in ("tokenizer.json", "tokenizer_config.json")}
    files["chat_template.jinja"] = LLAMA3  # the base's own
    add_to_tokenizer_config(files, CHATML_TEMPLATE)
    for name, text in files.items():
        (folder / name).write_text(text)
    assert checkpoint_template(load_tokenizer(str(folder))) == CHATML_TEMPLATE
    assert json.loads(files["tokenizer_config.json"])["chat_template"] == CHATML_TEMPLATE
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) \
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_conversation_that_does_not_fit_beside_max_new_tokens_is_named(chat_run):
    """--max-new-tokens given: a conversation too long to leave room for it is named as the conversation, not as
    a numbered prompt (the message generate's prompt files get)."""
    root, adapter = chat_run
    conversation_json = json.dumps([{"role": "user", "content": "apple " * 40}])
    line = assert_one_line_error(*cli("generate", "--adapter", adapter, "--chat", conversation_json,
                                      "--max-new-tokens", "100", cwd=root), expected_code=2)
    assert re.fullmatch(r"error: --chat has \d+ tokens, and with --max-new-tokens 100 it exceeds the model's context "
                        r"of 128 tokens; start over \(/reset in lora chat\), shorten it to at most 28 tokens or "
                        r"lower --max-new-tokens", line), line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_at_the_prompt_says_interrupted(chat_run, sig):
    """Ctrl-C or SIGTERM outside training's loop: one line, `interrupted`, exit 130. SIGINT exited 130 without a
    word (typer turns the KeyboardInterrupt into an exit code), SIGTERM killed the process (no cleanup at all)."""
    root, adapter = chat_run
    # pipes, not a terminal: GNU readline (input() on a terminal) has signal handling of its own
    proc = subprocess.Popen([sys.executable, "-m", "lora_cli", "chat", "--adapter", str(adapter)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=root,
                            env={**child_env(), "PYTHONPATH": str(REPO)})
    try:
        read_until(proc.stdout.fileno(), b">>> ")  # waiting for a line: the model is loaded, the handlers set
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill() if proc.poll() is None else None
        proc.stdin.close()
    assert proc.stderr.read().decode().splitlines()[-1] == "interrupted"
