"""`lora chat` (an interactive conversation in the terminal) and `lora generate --chat` (replies to conversations
given as JSON): the conversation rendered with the chat template the adapter was trained with (its metadata), or
the model's own, or --chat-template; replies streamed and stopped at the template's end of turn.

`chat_prompt_ids(loaded, messages)` is the one place a conversation becomes the ids a model continues; every
command that answers conversations calls it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from lora_cli.adapter import OURS_FIX
from lora_cli.chat_template import chat_ids, conversation, reply_ends, resolve_template
from lora_cli.data import JsonValueError, loads_unique
from lora_cli.errors import ConfigError, ConversationError, LoraError
from lora_cli.generate import StopText, stream_text
from lora_cli.inference import Loaded
from lora_cli.prompts import escape_line, not_utf8, numbered_lines, read_text_file

PROMPT = ">>> "  # what `lora chat` shows when it waits for the user
HELP = "/reset clears the history, /exit or Ctrl-D ends"


def chat_template_for(loaded: Loaded, override: str | None = None) -> str:
    """The template to talk with: --chat-template if given, else the adapter's (the one it was trained with),
    else the base checkpoint's own; none at all is a ConfigError that says to pass --chat-template. A template
    that is not valid Jinja is named by where it came from: the flag, the adapter file, or the model's file."""
    model_dir = loaded.base.name if loaded.base.source == "local" else None
    stored = loaded.settings.chat_template
    if override is None and stored is not None:
        where = f"{loaded.adapter.path}: data.chat_template" if loaded.adapter is not None else "data.chat_template"
        return resolve_template(stored, loaded.tokenizer, model_dir, key=where, fix=OURS_FIX)
    return resolve_template(override, loaded.tokenizer, model_dir, key="--chat-template")


def chat_prompt_ids(loaded: Loaded, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    template: str | None = None) -> list[int]:
    """The token ids a chat model continues to answer `messages` ([{role, content}, ...], checked as training
    checks them; ShareGPT's {from, value} too): rendered with `template` (default: chat_template_for(loaded))
    and, with add_generation_prompt, the header of the assistant's turn, exactly as training tokenised it."""
    template = template if template is not None else chat_template_for(loaded)
    return chat_ids(template, conversation(messages, need_assistant=False), loaded.tokenizer, add_generation_prompt)


def stop_at(pieces: Iterable[str], stop: str) -> Iterator[str]:
    """The text pieces up to the first `stop` (not included); text that may be the start of `stop` is held back
    until the next piece decides (generate.StopText)."""
    cut = StopText([stop] if stop else [])
    for piece in pieces:
        out, hit = cut.feed(piece)
        if out:
            yield out
        if hit:
            return  # the decoding generator is dropped: no more tokens are computed
    if tail := cut.flush():
        yield tail


@dataclass
class Replier:
    """Streams a model's replies to conversations: the model on its device, the template, the sampling options
    of `lora generate` (prompts.sampling_options plus seed, no_repeat_ngram_size, use_cache)."""

    loaded: Loaded
    net: Any  # loaded.model on its device
    template: str
    max_new_tokens: int
    options: dict
    fit_context: bool = False  # a reply takes at most what the context leaves after the conversation (the default)

    def stream(self, messages: Sequence[Mapping[str, Any]], where: str = "the conversation") -> Iterator[str]:
        """The reply's text pieces as they are decoded. Generation stops at the tokenizer's eos ids, at the
        template's end-of-turn token, or at its end-of-turn text (a marker the tokenizer splits)."""
        tokenizer = self.loaded.tokenizer
        try:
            ids = chat_prompt_ids(self.loaded, messages, template=self.template)
        except ConversationError as exc:
            raise ConversationError(f"{where}: {exc}") from None
        eos, eot = reply_ends(self.template, tokenizer)
        budget = self.max_new_tokens
        context = self.net.config.n_positions
        if self.fit_context:  # a long history shortens the reply instead of failing the turn
            if len(ids) >= context:
                raise ConversationError(f"{where} has {len(ids)} tokens, which fill the model's context of {context} "
                                        "tokens; start over (/reset in lora chat) or shorten it")
            budget = min(budget, context - len(ids))
        elif len(ids) + budget > context:  # --max-new-tokens: the reply's full budget must fit beside it
            raise ConversationError(f"{where} has {len(ids)} tokens, and with --max-new-tokens {budget} it exceeds the "
                                    f"model's context of {context} tokens; start over (/reset in lora chat), shorten "
                                    f"it to at most {context - budget} tokens or lower --max-new-tokens")
        pieces = stream_text(self.net, ids, budget, tokenizer=tokenizer, **{**self.options, "eos_id": eos})
        return stop_at(pieces, eot)

    def reply(self, messages: Sequence[Mapping[str, Any]], where: str = "the conversation") -> str:
        return "".join(self.stream(messages, where))


# -------------------------------------------------------------------------------------------- `lora chat`


def _to(stream) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()
    return write


def chat_loop(replier: Replier, system: str | None = None, read: Callable[[], str] = input,
              write: Callable[[str], Any] | None = None, report: Callable[[str], Any] | None = None) -> tuple[int, int]:
    """Talk until /exit or end of input (Ctrl-D): each line is the user's message, the reply is streamed, the
    history is kept (/reset clears it, keeping --system). A turn that fails (e.g. the history outgrew the
    context) reports one error line (on stderr: stdout holds only the conversation) and leaves the history as it
    was. Returns (replies, failed turns)."""
    write = write or _to(sys.stdout)
    report = report or _to(sys.stderr)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    replies = failed = 0
    while True:
        write(PROMPT)  # on stdout: input(PROMPT) would write it to stderr when it reads a terminal
        try:
            line = read()
        except EOFError:  # Ctrl-D
            write("\n")
            return replies, failed
        except UnicodeDecodeError:  # a strict stdin decoder met bytes that are not UTF-8
            line = "\udcff"
        if not_utf8(line):
            report("error: that line is not UTF-8 text; type or send UTF-8\n")
            failed += 1
            continue
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            return replies, failed
        if command == "/reset":
            history = list(start)
            write("(history cleared)\n")
            continue
        turn = [*history, {"role": "user", "content": line}]
        text = ""
        try:
            for piece in replier.stream(turn):
                write(piece)
                text += piece
        except LoraError as exc:
            write("\n" if text else "")  # a reply cut short ends its line
            report(f"error: {exc}\n")
            failed += 1
            continue
        write("\n")
        history = [*turn, {"role": "assistant", "content": text}]
        replies += 1


# --------------------------------------------------------------------------------------- `generate --chat`


@dataclass
class ChatItem:
    """One conversation to answer: its messages, the record it came from (echoed by --json), its origin."""

    messages: list[dict]
    record: dict
    where: str


def _parse(text: str, where: str) -> ChatItem:
    try:
        value = loads_unique(text)
    except JsonValueError as exc:  # a repeated key, too deep, a lone surrogate
        raise ConversationError(f"{where}: {exc.subject} {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConversationError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); give a conversation "
                                'such as [{"role": "user", "content": "Hi"}]') from None
    try:
        messages = conversation(value, need_assistant=False)
    except ConversationError as exc:
        raise ConversationError(f"{where}: {exc}") from None
    record = dict(value) if isinstance(value, Mapping) else {"messages": value}
    return ChatItem(messages, record, where)


def read_conversations(arguments: Sequence[str], file: Path | None) -> list[ChatItem]:
    """`lora generate --chat`'s conversations: one JSON argument (a list of messages, or an object with
    `messages`), or --file JSONL with one conversation per line (blank lines skipped)."""
    if arguments and file is not None:
        raise ConfigError("give the conversation as an argument or with --file, not both")
    if file is None:
        if len(arguments) != 1:
            raise ConfigError("--chat takes one conversation as JSON, e.g. lora generate --chat "
                              "'[{\"role\": \"user\", \"content\": \"Hi\"}]' (several: --file CONVERSATIONS.jsonl)")
        return [_parse(arguments[0], "--chat")]
    items = [_parse(line, where) for line, where in numbered_lines(read_text_file(file, "conversation"), f"--file {file}")]
    if not items:
        raise ConversationError(f"--file {file} holds no conversations; write one JSON conversation per line")
    return items


def answer_conversations(replier: Replier, items: Sequence[ChatItem], streamed: bool, as_json: bool,
                         write: Callable[[str], Any]) -> None:
    """Print each conversation's reply: streamed for a single one given as an argument, else one line each
    (newlines escaped), or with --json each record plus "generated"."""
    for item in items:
        if streamed:
            for piece in replier.stream(item.messages, item.where):
                write(piece)
            write("\n")
            continue
        text = replier.reply(item.messages, item.where)
        write((json.dumps({**item.record, "generated": text}, ensure_ascii=False) if as_json
               else escape_line(text)) + "\n")
