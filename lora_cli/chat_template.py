"""Chat templates: a conversation -> the text (and token ids) a chat model sees, rendered with jinja2 exactly as
transformers' `apply_chat_template` renders it, and the assistant's spans that carry loss in training.

Rendering copies transformers' environment (utils/chat_template_utils.py, `_compile_jinja_template`): an
ImmutableSandboxedEnvironment (a template from a checkpoint is data, not code) with trim_blocks and lstrip_blocks,
the loopcontrols extension, a `{% generation %}` block that renders its body, a `tojson` filter that does not
escape HTML, and the globals `raise_exception` and `strftime_now`; the template sees `messages`,
`add_generation_prompt` and the tokenizer's special tokens (bos_token, eos_token, ...), and the rendered text is
tokenised with its special tokens recognised and nothing added (apply_chat_template's add_special_tokens=False).

Assistant spans come from rendering prefix by prefix: for the assistant message k, the span is what
render(messages[:k+1]) adds to render(messages[:k], add_generation_prompt=True), i.e. its content and the
template's end-of-turn text. Both ends must fall on token boundaries of the whole conversation's ids, or the
example is refused (its masks would be off by a merged token).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from lora_cli.config import BUILTIN_CHAT_TEMPLATES, is_inline_template
from lora_cli.errors import ConfigError, ConversationError, did_you_mean, first_line
from lora_cli.tokenizer import GPT2Tokenizer, Tokenizer, set_in_tokenizer_config

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # ShareGPT's `from` -> role
TEMPLATE_FILE = "chat_template.jinja"  # transformers >= 4.50 saves the template beside tokenizer_config.json


# ------------------------------------------------------------------------------------------- conversations


def conversation(value: Any, need_assistant: bool = True) -> list[dict]:
    """A conversation checked and normalised: a list of messages {role, content, ...} (keys holding null dropped,
    as transformers does). Accepts a list (or its JSON text, as a CSV cell holds it), an object with `messages`,
    and ShareGPT messages {from: human|gpt|system, value}; a content given as OpenAI's list of text parts becomes
    their text. Raises ConversationError (without a location: callers
    add the file and row)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConversationError("the messages are text, not a list of {role, content} objects") from None
    if isinstance(value, Mapping):
        value = value.get("messages", value.get("conversations"))
    if not isinstance(value, (list, tuple)) or not value:
        raise ConversationError('the messages must be a non-empty list of objects such as {"role": "user", '
                                '"content": "..."}')
    messages = []
    for j, message in enumerate(value, start=1):
        if not isinstance(message, Mapping):
            raise ConversationError(f"message {j} is not an object; write it as {{\"role\": ..., \"content\": ...}}")
        message = {str(k): v for k, v in message.items() if v is not None}
        if "role" not in message and "from" in message:  # ShareGPT
            sender = message.pop("from")
            if not isinstance(sender, str) or sender not in SHAREGPT_ROLES:  # (a list is no dict key)
                raise ConversationError(f"message {j} is from the unknown sender {sender!r}; ShareGPT senders are "
                                        "human, gpt and system")
            message = {"role": SHAREGPT_ROLES[sender], "content": message.pop("value", None), **message}
        if "role" not in message:
            raise ConversationError(f"message {j} has no 'role'; give every message a role (system, user or "
                                    "assistant) and its content")
        role = message["role"]
        if role not in ROLES:
            raise ConversationError(f"message {j} has the unknown role {role!r}{did_you_mean(str(role), ROLES)}; "
                                    f"roles are {', '.join(ROLES)}")
        if isinstance(message.get("content"), list):  # OpenAI's content parts: their text, joined
            kinds = sorted({str(p.get("type")) if isinstance(p, Mapping) else type(p).__name__
                            for p in message["content"]} - {"text"})
            if kinds:
                raise ConversationError(f"message {j} ({role}) has content parts of type {', '.join(kinds)}; "
                                        'lora-cli trains on text: keep the {"type": "text", "text": ...} parts')
            message["content"] = content_text(message["content"])
        if role == "assistant" and "content" not in message and message.get("tool_calls"):
            message["content"] = ""  # OpenAI's tool-call turn: content null, the calls in tool_calls for the template
        if not isinstance(message.get("content"), str):
            raise ConversationError(f"message {j} ({role}) has no text 'content'")
        messages.append(message)
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("the conversation has no assistant message, so nothing to learn from; add the "
                                "assistant's reply")
    return messages


def content_text(content: Any) -> str | None:
    """A message's text: its content string, or the text of OpenAI's list of parts ({"type": "text", "text": ...})
    joined as the API joins them; None for anything else (an image part, a number)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


# ---------------------------------------------------------------------------------------------- templates


def read_template(value: str, key: str = "data.chat_template") -> str:
    """A template's Jinja text from a built-in name (chatml), a file, or the text itself (as adapters store it)."""
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    if is_inline_template(value):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        builtins = ", ".join(BUILTIN_CHAT_TEMPLATES)
        raise ConfigError(f"{key}: {value!r} is neither a built-in chat template ({builtins}) nor a file"
                          f"{did_you_mean(value, BUILTIN_CHAT_TEMPLATES)}; name a .jinja file or {builtins}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path}: {first_line(exc)}") from None


def checkpoint_template(tokenizer: Tokenizer, model_dir: str | Path | None = None) -> str | None:
    """A checkpoint's own chat template: chat_template.jinja, else tokenizer_config.json's `chat_template` (a
    string, or a list of {name, template} whose `default` is taken), looked up beside the tokenizer.json and in
    the model directory. None when there is none (GPT-2, base checkpoints)."""
    found = checkpoint_template_source(tokenizer, model_dir)
    return None if found is None else found[0]


def checkpoint_template_source(tokenizer: Tokenizer, model_dir: str | Path | None = None) -> tuple[str, str] | None:
    """(checkpoint_template's text, where it was found, as errors name it: ".../chat_template.jinja" or
    ".../tokenizer_config.json: chat_template"), or None."""
    folders = []
    if not isinstance(tokenizer, GPT2Tokenizer):
        folders.append(Path(tokenizer.path).parent)
    elif tokenizer.folder is not None:  # a local GPT-2 checkpoint (a merged one keeps its template there)
        folders.append(tokenizer.folder)
    if model_dir is not None and Path(model_dir).is_dir():
        folders.append(Path(model_dir))
    for folder in folders:
        if (folder / TEMPLATE_FILE).is_file():
            return (folder / TEMPLATE_FILE).read_text(encoding="utf-8"), str(folder / TEMPLATE_FILE)
        try:
            found = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        if isinstance(found, list):
            found = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}.get("default")
        if isinstance(found, str) and found.strip():
            return found, f"{folder / 'tokenizer_config.json'}: chat_template"
    return None


def resolve_template(value: str | None, tokenizer: Tokenizer, model_dir: str | Path | None = None,
                     key: str = "data.chat_template", fix: str = "fix the template") -> str:
    """The template a chat run uses: `value` (data.chat_template, --chat-template, an adapter's stored template)
    if given, else the checkpoint's own; a model without one is a ConfigError saying what to set. `key` names
    where `value` came from in errors (an adapter's: "FILE: data.chat_template"), and a template that is not
    valid Jinja is named by where it came from: `key`, or the checkpoint's file; `fix`: what to do about a bad
    `value`."""
    if value is not None:
        template, where = read_template(value, key), f"{key} {value!r}" if not is_inline_template(value) else key
        what = "the chat template"
    else:
        found = checkpoint_template_source(tokenizer, model_dir)
        if found is None:
            how = f"pass {key} chatml" if key.startswith("--") else f"set {key}: chatml"
            raise ConfigError(f"{key}: the model has no chat template (no chat_template in its tokenizer_config.json); "
                              f"{how} (built in) or a .jinja file")
        (template, where), what = found, "the model's chat template"
        fix = f"fix it, or {'pass' if key.startswith('--') else 'set'} {key} (chatml or a .jinja file) to use another"
    problem = template_problem(template)
    if problem is not None:  # the template's fault, not the first data row's
        raise ConfigError(f"{where}: {what} {problem}; {fix}")
    return template


def writes_assistant_content(template: str, tokens: Mapping[str, str] | None = None) -> bool:
    """False when the template renders a user/assistant exchange without the assistant's words: training on it
    would find no token to learn. True too when it refuses that exchange (its own rules are judged per row)."""
    probe = "\x00reply\x00"
    try:
        text = render_chat(template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                           False, tokens)
    except ConversationError:
        return True
    return probe in text


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The jinja2 Template for this text, in transformers' environment (see the module docstring)."""
    # jinja2 is imported here: only chat data and chat commands need it
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        error = ConversationError(f"the chat template is not valid Jinja ({first_line(exc)}); fix the template")
        error.problem = f"is not valid Jinja ({first_line(exc)})"  # for messages that name where the text came from
        raise error from None


def template_problem(source: str) -> str | None:
    """Why `source` is no chat template ("is not valid Jinja (...)"), or None when it compiles."""
    try:
        compile_template(source)
    except ConversationError as exc:
        return exc.problem
    return None


def template_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The special tokens a template can name, as apply_chat_template passes them: those the tokenizer's files
    name (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token: their text)."""
    return dict(tokenizer.named_tokens)


# The names a message's reasoning comes under; templates read the first (Qwen3's), gpt-oss templates `thinking`.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _with_reasoning_aliases(message: Mapping) -> dict:
    """The message with its reasoning, under whichever name it came, under `reasoning_content` and `thinking` too
    (as transformers' apply_chat_template fills them), so that any template finds it."""
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    return dict(message) if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render_chat(template: str, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                tokens: Mapping[str, str] | None = None) -> str:
    """The conversation's text, as tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=...) gives it. A template that raises is a ConversationError."""
    import jinja2  # loaded already by compile_template; named here for its exception type

    compiled = compile_template(template)
    try:
        return compiled.render(messages=[_with_reasoning_aliases(m) for m in messages],
                               add_generation_prompt=add_generation_prompt,
                               tools=None, documents=None, **(tokens or {}))
    except Exception as exc:  # noqa: BLE001  (the template is the user's code: whatever it raises is its fault)
        what = first_line(exc) if isinstance(exc, jinja2.exceptions.TemplateError) else \
            f"{type(exc).__name__}: {first_line(exc)}"
        raise ConversationError(f"the chat template failed to render the conversation ({what})") from None


def chat_ids(template: str, messages: Sequence[Mapping], tokenizer: Tokenizer,
             add_generation_prompt: bool = False) -> list[int]:
    """Token ids of the rendered conversation: special tokens in the text are special, nothing is added (the
    template writes the bos token itself where the model wants one)."""
    text = render_chat(template, messages, add_generation_prompt, template_tokens(tokenizer))
    return tokenizer.encode(text, allow_special=True)


def encode_chat(template: str, messages: Sequence[Mapping], tokenizer: Tokenizer, train_on: str = "all_assistant",
                mask_all: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask) of a conversation: the mask is True on every assistant message's span (content and the
    template's end-of-turn tokens; only the last one's with train_on last_assistant), or on every token but the
    first with mask_all (data.mask_prompt: false). Raises ConversationError when the template does not render
    the conversation prefix by prefix or a span's ends fall inside a token."""
    tokens = template_tokens(tokenizer)
    text = render_chat(template, messages, False, tokens)
    ids = tokenizer.encode(text, allow_special=True)
    if mask_all:
        return ids, [False] + [True] * (len(ids) - 1)
    mask = [False] * len(ids)
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]

    def boundary(prefix: str, k: int) -> tuple[int, int]:
        """(tokens wholly before the edge at len(prefix), tokens up to and including the one holding it)."""
        if not text.startswith(prefix):
            hint = ("set data.train_on: last_assistant (only the last reply, whose prefix it renders as a whole) or "
                    "use another template") if train_on != "last_assistant" and len(turns) > 1 else \
                "use another template"
            raise ConversationError(f"message {k + 1}: the chat template does not render the conversation prefix "
                                    "by prefix (the text up to this message differs from the whole "
                                    f"conversation's), so its assistant span cannot be found; {hint}")
        head = tokenizer.encode(prefix, allow_special=True)
        if ids[:len(head)] == head:
            return len(head), len(head)
        # Where the prefix alone ends in other tokens than the whole text has there, walk the whole text's tokens
        # from the first that differs until they spell the prefix's rest. Spelled exactly, the edge falls between
        # tokens (GPT-2 encodes a trailing "\n\n" alone as one token, in the whole text as two). Passed, one
        # token holds the edge (a reply that starts with "\n" after a header's "\n": Qwen's "\n\n"); it belongs
        # to the span, as transformers' assistant mask takes the token holding a span's first and last character.
        same = next((i for i, (a, b) in enumerate(zip(ids, head)) if a != b), min(len(ids), len(head)))
        rest = tokenizer.decode(head[same:])
        for j in range(same + 1, min(len(ids), same + 8) + 1):
            spelled = tokenizer.decode(ids[same:j])
            if spelled == rest:
                return j, j
            if spelled.startswith(rest):
                return j - 1, j
            if not rest.startswith(spelled):
                break
        if ids[:len(head) - 1] == head[:-1]:  # (a token that decodes to other text alone: a byte-fallback run)
            return len(head) - 1, len(head)
        raise ConversationError(f"message {k + 1}: the assistant span's token boundaries do not line up with the "
                                "template (tokens span its edge); end the template's text before the content "
                                "with a separator such as a newline")

    for k in turns:
        start = boundary(render_chat(template, messages[:k], True, tokens), k)[0]
        end = boundary(render_chat(template, messages[:k + 1], False, tokens), k)[1]
        for i in range(max(start, 1), end):  # token 0 is predicted from nothing
            mask[i] = True
    return ids, mask


def end_of_turn(template: str, tokens: Mapping[str, str] | None = None) -> str:
    """The text the template writes after an assistant's content (ChatML: "<|im_end|>"), whitespace stripped; ""
    when it writes none or the template cannot say. Generation stops there (a plain-text marker, e.g. ChatML on
    GPT-2's tokenizer, is no eos token)."""
    probe = "\x00reply\x00"
    user = [{"role": "user", "content": "hi"}]
    try:
        head = render_chat(template, user, True, tokens)
        full = render_chat(template, [*user, {"role": "assistant", "content": probe}], False, tokens)
    except ConversationError:
        return ""
    if not full.startswith(head) or probe not in full:
        return ""
    return full[full.index(probe) + len(probe):].strip()


def end_of_turn_id(template: str, tokenizer: Tokenizer) -> int | None:
    """The template's end of turn as one token of the tokenizer (Llama 3's <|eot_id|>, ChatML's <|im_end|> in
    Qwen's vocabulary), else None (no end-of-turn text, or one the tokenizer splits: <|im_end|> on GPT-2's BPE)."""
    eot = end_of_turn(template, template_tokens(tokenizer))
    ids = tokenizer.encode(eot, allow_special=True) if eot else []
    return ids[0] if len(ids) == 1 else None


def reply_ends(template: str, tokenizer: Tokenizer) -> tuple[tuple[int, ...], str]:
    """Where a reply ends: (the eos ids to stop at, the end-of-turn text to cut at). The template's end of turn
    joins the eos ids when the tokenizer has it as one token (end_of_turn_id); as text it also catches a marker
    the tokenizer splits."""
    eot_id = end_of_turn_id(template, tokenizer)
    eos = [*tokenizer.eos_ids, *([] if eot_id is None else [eot_id])]
    return tuple(dict.fromkeys(eos)), end_of_turn(template, template_tokens(tokenizer))


def add_to_tokenizer_config(files: dict[str, str], template: str | None) -> None:
    """Write `template` as `chat_template` into the tokenizer_config.json text of a model directory's files (a
    merged model is then used the way it was trained), and over a chat_template.jinja carried from the base,
    which transformers and checkpoint_template read first; nothing without a template."""
    if template is None:
        return
    if TEMPLATE_FILE in files:
        files[TEMPLATE_FILE] = template
    set_in_tokenizer_config(files, "chat_template", template)
