"""Chat data and chat templates (issue 16, items 1-3): the rendered text and ids equal transformers'
`apply_chat_template` for a ChatML, a Llama-3-style and a default-system-prompt template; the loss masks cover
exactly the assistant spans (checked against transformers' `{% generation %}` assistant masks and by hand);
`lora eval` on chat data equals a transformers computation on the same ids; `lora chat` in a pty streams what
`lora generate --chat` prints; bad conversations are one line naming the file and row, exit 2."""

from __future__ import annotations

import json
import math
import os
import pty
import re
import select
import subprocess
import sys

import pytest
import torch

from helpers import REPO, assert_one_line_error, build_tokenizer, child_env, cli, make_hf_gpt2, rel, tree
from lora_cli.chat import stop_at
from lora_cli.chat_template import chat_ids, conversation, encode_chat, end_of_turn, render_chat, template_tokens
from lora_cli.config import CHATML_TEMPLATE
from lora_cli.errors import ConversationError
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


def test_gpt2_chatml_renders_as_transformers(tmp_path):
    from lora_cli.merge import tokenizer_files

    for name, text in tokenizer_files().items():
        (tmp_path / name).write_text(text)
    theirs = hf_tokenizer(tmp_path, CHATML_TEMPLATE)
    for messages in CONVERSATIONS:
        want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(CHATML_TEMPLATE, messages, True, template_tokens(GPT2)) == want
        assert chat_ids(CHATML_TEMPLATE, messages, GPT2, True) == theirs(want, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", ["qwen", "gpt2"])
def test_masks_are_the_assistant_spans(tokenizer_dirs, tmp_path, family):
    """Our masks equal transformers' assistant masks of the same template with `{% generation %}` markers, and the
    masked text is exactly each assistant's content and its end of turn."""
    if family == "gpt2":
        from lora_cli.merge import tokenizer_files

        for name, text in tokenizer_files().items():
            (tmp_path / name).write_text(text)
        folder, ours = tmp_path, GPT2
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
    bad = [([{"content": "x"}], "message 1 has no 'role'"),
           ([{"role": "user", "content": "x"}, {"role": "asistant", "content": "y"}],
            "message 2 has the unknown role 'asistant' (did you mean assistant?)"),
           ([{"role": "user", "content": "x"}], "no assistant message"),
           ([{"from": "bot", "value": "x"}], "unknown sender 'bot'"),
           ([], "non-empty list")]
    for value, message in bad:
        with pytest.raises(ConversationError, match=re.escape(message)):
            conversation(value)


def test_stop_at_holds_back_a_partial_marker():
    pieces = ["Hel", "lo<", "|im", "_e", "nd|>\nmore"]
    assert list(stop_at(pieces, "<|im_end|>")) == ["Hel", "lo"]
    assert "".join(stop_at(["a<", "b"], "<|im_end|>")) == "a<b"
    assert "".join(stop_at(pieces, "")) == "Hello<|im_end|>\nmore"
