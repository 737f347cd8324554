"""`lora serve`: an OpenAI-compatible HTTP API over a base model and its adapters (FastAPI on uvicorn).

Endpoints, as OpenAI's API reference defines them (https://platform.openai.com/docs/api-reference):
    GET  /v1/models             the base model (under its own name) and every adapter (under its NAME)
    POST /v1/completions        a raw prompt (text or token ids, or a list of them), no template
    POST /v1/chat/completions   messages -> prompt ids (`messages_to_ids`)
    GET  /health                {"status": "ok", ...}: open even with an API key, for load balancers

`stream: true` answers with server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Every bad
request gets OpenAI's error object {"error": {"message", "type", "param", "code"}} and a 4xx status; the server
goes on serving.

Several adapters over one base: the base is loaded once (per distinct base); each adapter gets a copy of the
model's module tree whose tensors are the base's own (copy.deepcopy with the base tensors in its memo), with the
adapter attached to the copy. Memory: one base plus each adapter's own tensors (LoRA weights, and any base tensor
the adapter trains in full, e.g. biases, which is copied). A request picks its model by name; nothing is swapped.

Concurrency: continuous batching (generate.ContinuousBatch). Each served model has one running batch; a request
becomes a row that joins its model's batch between two decoding steps (its prompt prefilled, then it decodes with
the others) and leaves it as soon as it ends, or at the next step once its client is gone or a stop string is hit.
One engine thread steps the models' batches in turn (see Engine); each request's text is made in its own thread
and handed to the event loop. `run_generation` is the one path from a request to text.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request, the request models)
# at runtime, and those classes live inside build_app.
import asyncio
import copy
import hmac
import json
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_cli.chat import chat_prompt_ids, chat_template_for
from lora_cli.chat_template import content_text, conversation, reply_ends
from lora_cli.config import SEEDS
from lora_cli.errors import ConfigError, ConversationError, LoraError, first_line
from lora_cli.generate import ContinuousBatch, Row, StopText, decode_incremental
from lora_cli.inference import (
    DataSettings, Loaded, attach_to, base_spec, load_base, open_adapter, pack_for_decoding, place,
)
from lora_cli.prompts import prompt_values, render, uses_template
from lora_cli.runtime import device_option, inference_dtype, release_openmp_threads

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
GRACEFUL_SHUTDOWN_S = 30  # on SIGTERM / Ctrl-C, how long requests in flight may take to finish
# The largest request body read (413 beyond): far past any prompt a model's context holds, far below a body that
# would keep the server tokenizing (a 20 MB prompt took seconds, only to be refused as too long).
MAX_BODY_BYTES = 8 * 2**20


# ------------------------------------------------------------------------------------------------ the models


@dataclass
class Served:
    """One name the API answers to: a base model, or an adapter attached to a copy of its base."""

    name: str
    loaded: Loaded
    parent: str | None = None  # an adapter's base model name

    @property
    def context(self) -> int:
        return self.loaded.model.config.n_positions


def adapter_flags(items: Sequence[str]) -> list[tuple[str, str]]:
    """(name, path) for each --adapter value: NAME=PATH, or a PATH named after its file (a run directory or
    .../RUN/adapter.safetensors: the run directory's name)."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or Path(item).exists():
            path = item
            p = Path(path)
            name = p.parent.name if p.name == "adapter.safetensors" else (p.name if p.is_dir() else p.stem)
        if not name.strip() or not path.strip():
            raise ConfigError(f"--adapter {item!r}: expected PATH or NAME=PATH, e.g. --adapter support=runs/support")
        out.append((name.strip(), path.strip()))
    names = [n for n, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"--adapter: two adapters are named {dup!r}; name them apart with NAME=PATH")
    return out


def _shared_copy(model, keep_own: set[str]):
    """A copy of `model`'s modules that shares every parameter and buffer with it, except the tensors named in
    `keep_own` (by their names in `model`), which are copied: those the adapter loaded onto them will write."""
    own = {id(t) for n, t in [*model.named_parameters(remove_duplicate=False),
                              *model.named_buffers(remove_duplicate=False)] if n in keep_own}
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in own}
    return copy.deepcopy(model, memo)


def load_models(adapters: Sequence[str] = (), model: str | None = None, allow_mismatch: bool = False,
                device=None, dtype=None) -> dict[str, Served]:
    """Every model the server answers to, by name: each distinct base once (--model, else the adapters' own
    bases) and each adapter attached to a tensor-sharing copy of its base. `device`: a torch.device (None: stay
    on the CPU); `dtype`: the weights' dtype (--precision; None: as loaded, fp32)."""
    flags = adapter_flags(adapters)
    if not flags and model is None:
        raise ConfigError("name a model: --model MODEL and/or --adapter [NAME=]PATH (repeatable)")
    bases: dict[str, Served] = {}  # by the spec it was loaded from

    def base_for(adapter) -> Served:
        key = model if model is not None else repr(base_spec(adapter))
        if key not in bases:
            base, tokenizer = load_base(adapter, model)
            place(base.model, device, dtype)
            bases[key] = Served(base.name, Loaded(base, None, DataSettings(), tokenizer))
        return bases[key]

    if model is not None:
        base_for(None)
    served: dict[str, Served] = {}
    for name, path in flags:
        adapter = open_adapter(path)
        settings = DataSettings.from_adapter(adapter)
        if settings.task == "classification":
            raise ConfigError(f"--adapter {path} is a classifier; `lora serve` needs causal-LM adapters")
        parent = base_for(adapter)
        written = {k.replace(".base_layer.", ".") for k in adapter.tensors}
        base = copy.copy(parent.loaded.base)
        base.model = _shared_copy(parent.loaded.model, written)
        loaded = Loaded(base, adapter, settings, parent.loaded.tokenizer)
        attach_to(loaded, allow_mismatch)
        place(loaded.model, device, dtype)  # the adapter's own tensors (LoRA, biases) in the served dtype too
        served[name] = Served(name, loaded, parent.name)
    for b in bases.values():
        if b.name in served:
            raise ConfigError(f"--adapter name {b.name!r} is the base model's name; give the adapter another")
        served[b.name] = b
    pack_for_decoding(*(s.loaded.model for s in served.values()))  # continuous batching decodes many rows
    return served


# ------------------------------------------------------------------------------------------------ requests


class ApiError(Exception):
    """A request the API refuses: OpenAI's error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    @classmethod
    def internal(cls, exc: BaseException) -> "ApiError":
        """A bug's 500: its type and first line, for the bug report."""
        return cls(500, f"internal error ({type(exc).__name__}: {first_line(exc)})", kind="server_error")


@dataclass
class Job:
    """One prompt to continue, and (filled in by the generation) how it went."""

    prompt: list[int]
    max_tokens: int
    sampling: dict  # temperature, top_p, top_k, seed: generate.stream's options
    stop: list[str] = field(default_factory=list)
    eos_ids: tuple[int, ...] | None = None  # None: the tokenizer's
    completion_tokens: int = 0
    finish_reason: str = "length"


@dataclass
class ChatPrompt:
    """What a conversation becomes: the prompt's ids and where the reply ends."""

    ids: list[int]
    eos_ids: tuple[int, ...] | None = None  # None: the tokenizer's eos ids
    end_text: str = ""  # the chat template's end of turn, cut from the reply (a marker the tokenizer splits)


def messages_to_ids(served: Served, messages: list[dict]) -> ChatPrompt:
    """Chat messages -> the prompt, the one place where messages become a prompt. A chat adapter: the template it
    was trained with (chat.chat_prompt_ids, as `lora generate --chat` renders it). An instruction adapter (alpaca,
    prompt_completion): its prompt template on the last user message, exactly what `lora generate` feeds for that
    text. Anything else: the checkpoint's own chat template; a model with none cannot chat."""
    loaded, settings = served.loaded, served.loaded.settings
    # a null content is left to conversation(), which reads it as generate --chat does (OpenAI's tool-call turn)
    messages = [{**m, "content": _content_text(m["content"])} if m.get("content") is not None else m
                for m in messages]
    if settings.chat_template is None and uses_template(settings):
        try:  # read as a chat adapter's are, though only the last user message is rendered
            conversation(messages, need_assistant=False)
        except ConversationError as exc:
            raise ApiError(400, first_line(exc), "messages") from None
        users = [m for m in messages if m.get("role") == "user"]
        if not users:
            raise ApiError(400, "messages holds no message with role 'user'; add one", "messages")
        text = _content_text(users[-1].get("content"))
        if not text.strip():  # as `lora generate` refuses an empty prompt
            raise ApiError(400, "the last user message is empty; give some text to continue", "messages")
        return ChatPrompt(loaded.tokenizer.encode_prompt(render(prompt_values(text, settings), settings)))
    try:
        template = chat_template_for(loaded)
    except ConfigError:
        raise ApiError(400, f"model {served.name!r} has no chat template; use /v1/completions with a raw prompt, "
                            "or serve a chat or instruction adapter", "messages", "model_not_supported") from None
    try:
        ids = chat_prompt_ids(loaded, messages, template=template)
    except LoraError as exc:
        raise ApiError(400, first_line(exc), "messages") from None
    eos_ids, end_text = reply_ends(template, loaded.tokenizer)
    return ChatPrompt(ids, eos_ids, end_text)


def _content_text(content) -> str:
    """A message's content: a string, or OpenAI's list of parts ({"type": "text", "text": ...})."""
    text = content_text(content)
    if text is None:
        raise ApiError(400, "a message's content must be a string or a list of text parts", "messages")
    return text


def _is_ids(value) -> bool:
    """A non-empty list of token ids (ints, not booleans)."""
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _prompt_ids(prompt, tokenizer) -> list[list[int]]:
    """OpenAI's forms of `prompt` -> one list of token ids per prompt: a string, a list of token ids, or a list
    of strings / token-id lists. Text is encoded as `lora generate` encodes it."""
    many = prompt if isinstance(prompt, list) and prompt and not _is_ids(prompt) else [prompt]
    out = []
    for i, p in enumerate(many, start=1):
        if isinstance(p, str):
            if not p.strip():  # as `lora generate` refuses it (a bos alone was continued)
                raise ApiError(400, f"prompt {i} is empty; give some text to continue", "prompt")
            out.append(tokenizer.encode_prompt(p))
        elif _is_ids(p):
            out.append(list(p))
        else:
            raise ApiError(400, "prompt must be a string, a list of token ids, or a list of strings or token-id "
                                "lists", "prompt")
    return out


def _check_context(served: Served, prompt: list[int], max_tokens: int | None, param: str, what: str,
                   limit: str = "max_tokens") -> int:
    """max_tokens (the default: the rest of the context) once prompt + max_tokens fit the model's context. what: the
    prompt as the error names it ("the prompt", "prompt 2", "the chat prompt"); limit: the request's name for max_tokens."""
    room = served.context - len(prompt)
    if room < 1:
        raise ApiError(400, f"{what} has {len(prompt)} tokens; model {served.name!r} has a context of "
                            f"{served.context} tokens: shorten it", param, "context_length_exceeded")
    if max_tokens is None:
        return room
    if len(prompt) + max_tokens > served.context:
        raise ApiError(400, f"{limit}={max_tokens} plus {what}'s {len(prompt)} tokens exceed the context of "
                            f"model {served.name!r} ({served.context} tokens): lower {limit} to at most {room}",
                       limit, "context_length_exceeded")
    return max_tokens


# ------------------------------------------------------------------------------------------------ generation


_END = object()


class Generation:
    """The text pieces of one request's generation, an async iterator. Its row joins the batch as soon as it is made,
    so aclose() takes the row out whether or not the pieces were ever read (closing an async generator that never
    started runs none of its code: a request of several prompts whose client left during the first kept decoding
    the others to their end)."""

    def __init__(self, pieces: AsyncIterator[str], leave: Callable[[], None]):
        self._pieces, self._leave = pieces, leave

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        try:
            await self._pieces.aclose()
        finally:
            self._leave()


class Engine:
    """The served models, one ContinuousBatch each, the thread that decodes them, and counters for /health.

    Batching: one engine thread steps every served model's batch in turn (round-robin, one decoding step each),
    so the models, which share the base weights and the CPU/GPU, never run at once, and each model's concurrent
    requests decode together. A request's row joins its model's batch at the next step and its tokens go to the
    request's queue; the text (incremental decoding, stop strings) is made in the request's own thread."""

    def __init__(self, models: dict[str, Served]):
        self.models = models
        self.lock = threading.Lock()  # around stats
        self.stats = {"active": 0, "completed": 0, "disconnected": 0, "tokens": 0}  # tokens: generated, in all
        self.batches = {name: ContinuousBatch(s.loaded.model) for name, s in models.items()}
        self.wake = threading.Condition()  # around inbox, gone and sinks
        self.inbox: list[tuple[str, Row]] = []  # rows to add, by model name
        self.gone: list[tuple[str, Row]] = []  # rows to remove (a client gone, a stop string hit)
        self.sinks: dict[Row, queue.SimpleQueue] = {}  # each running row's tokens, then None (or an exception)
        release_openmp_threads()  # the engine thread computes from now on, with the only OpenMP team (see there)
        threading.Thread(target=self._loop, name="lora-serve-batching", daemon=True).start()

    def model(self, name) -> Served:
        if name not in self.models:
            known = ", ".join(sorted(self.models))
            raise ApiError(404, f"the model {name!r} does not exist; this server has: {known}", "model",
                           "model_not_found")
        return self.models[name]

    def batching(self) -> dict:
        """/health's batching counters: steps that decoded several requests at once, and the most at once."""
        return {"batched_steps": sum(b.batched_steps for b in self.batches.values()),
                "max_batch": max((b.max_rows for b in self.batches.values()), default=0)}

    @staticmethod
    def checked_row(served: Served, job: Job, where: str = "prompt 1") -> Row:
        """The batch row for `job`, its prompt and options checked (LoraError naming `where`): a request checks
        all its rows before any of them starts (run_generation)."""
        return Row(served.loaded.model, job.prompt, job.max_tokens, where=where,
                   eos_id=job.eos_ids or served.loaded.tokenizer.eos_ids, **job.sampling)

    def run_generation(self, served: Served, job: Job, row: Row | None = None) -> Generation:
        """The one path from a request to text: checks the options now (LoraError; or takes `row`, checked_row's
        for this job), then returns an async iterator of text pieces (stop strings applied; job.completion_tokens
        and job.finish_reason filled in at its end). Closing the iterator early (a client gone) takes the request
        out of the batch at the next step."""
        tokenizer = served.loaded.tokenizer
        row = row or self.checked_row(served, job)
        sink: queue.SimpleQueue = queue.SimpleQueue()
        with self.wake:
            self.sinks[row] = sink
            self.inbox.append((served.name, row))
            self.wake.notify()

        def leave() -> None:  # ended early (or not: then this is a no-op)
            with self.wake:
                self.gone.append((served.name, row))
                self.wake.notify()

        def counted() -> Iterator[int]:
            try:
                while (t := sink.get()) is not None:
                    if isinstance(t, BaseException):
                        raise t
                    job.completion_tokens += 1
                    yield t
            finally:
                leave()

        return Generation(self._pieces(decode_incremental(counted(), tokenizer), job), leave)

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not (self.inbox or self.gone or any(self.batches.values())):
                    self.wake.wait()
                for name, row in self.inbox:
                    self.batches[name].add(row)
                for name, row in self.gone:
                    sink = self.sinks.pop(row, None)
                    if sink is not None:  # still running
                        self.batches[name].remove(row)
                        sink.put(None)  # a reader waiting for its next token ends (its request is gone)
                self.inbox, self.gone = [], []
            for name, batch in self.batches.items():
                if batch:
                    self._step(name, batch)

    def _step(self, name: str, batch: ContinuousBatch) -> None:
        try:
            out = batch.step()
        except BaseException as exc:  # a bug in generation: its requests get a 500, the server goes on
            with self.wake:
                for row in [*batch.rows, *batch.waiting]:
                    sink = self.sinks.pop(row, None)
                    if sink is not None:
                        sink.put(exc)
            self.batches[name] = ContinuousBatch(batch.model)
            return
        generated = 0
        with self.wake:
            for row, token in out:
                sink = self.sinks.get(row)
                if sink is None:  # removed meanwhile
                    continue
                if token is not None:
                    sink.put(token)
                    generated += 1
                if row.finished:
                    sink.put(None)
                    del self.sinks[row]
        self._count("tokens", generated)

    def _count(self, key: str, n: int) -> None:
        with self.lock:
            self.stats[key] += n

    async def _pieces(self, text: Iterator[str], job: Job) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop has closed (server shut down): nobody is listening
                pass

        def work() -> None:
            stop = StopText(job.stop)
            try:
                self._count("active", 1)
                try:
                    hit = False
                    for piece in text:
                        if cancel.is_set():
                            break
                        out, hit = stop.feed(piece)
                        if out:
                            put(out)
                        if hit:
                            break
                    else:  # no stop string: it ran to max_tokens ("length") or ended at an EOS ("stop")
                        if not cancel.is_set():
                            put(stop.flush())
                    if cancel.is_set():  # the client left: at a token, or its row was taken out between two
                        self._count("disconnected", 1)
                        return
                    hit_limit = not hit and job.completion_tokens >= job.max_tokens
                    job.finish_reason = "length" if hit_limit else "stop"
                    self._count("completed", 1)
                finally:
                    text.close()  # ends the token chain: the row leaves the batch at the next step
                    self._count("active", -1)
            except BaseException as exc:  # a bug in generation: the request gets a 500, the server goes on
                put(exc)
            finally:
                put(_END)

        threading.Thread(target=work, name="lora-serve-generation", daemon=True).start()
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                if item:
                    yield item
        finally:
            cancel.set()  # the client left (or the request failed): stop at the next token


# ------------------------------------------------------------------------------------------------ the app


def build_app(engine: Engine, api_key: str | None = None):
    """The FastAPI application serving `engine`'s models."""
    import anyio  # fastapi's own dependency
    from fastapi import APIRouter, Depends, FastAPI, Request  # the `serve` extra: only `lora serve` needs it
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, field_validator
    from starlette.exceptions import HTTPException

    class ClosingStreamingResponse(StreamingResponse):
        """A stream that closes its body generator however the response ends. A client gone mid-stream cancels the
        task iterating the body, which leaves the generator suspended at a `yield`, its `finally` (which stops the
        generation) unrun until the garbage collector finds it: in 4 of 25 abandoned streams here, after the whole
        generation had run."""

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                with anyio.CancelScope(shield=True):  # the cancelled task may still close it
                    await self.body_iterator.aclose()

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        include_usage: bool = False

    class Sampling(BaseModel):
        # strict: "max_tokens": true or "5" is a 400, not 1 or 5; no inf/nan (JSON's 1e309) for a number
        model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
        model: str
        max_tokens: int | None = Field(None, ge=0)
        max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens
        temperature: float = Field(1.0, ge=0)  # OpenAI's default: sampling at 1
        top_p: float = Field(1.0, gt=0, le=1)
        top_k: int | None = Field(None, ge=1)  # not OpenAI's, but common (vLLM, llama.cpp)
        seed: int | None = Field(None, ge=SEEDS.start, lt=SEEDS.stop)
        stop: Any = None  # a string or a list of them: checked in jobs(), with a clearer message than a union's
        stream: bool = False
        stream_options: StreamOptions | None = None
        n: Literal[1] = 1
        logprobs: Literal[None, False] = None
        top_logprobs: int | None = None
        # accepted only at their no-op values (checked in jobs()): the decoder has no penalties, biases or grammar
        frequency_penalty: float = 0.0
        presence_penalty: float = 0.0
        logit_bias: dict | None = None
        response_format: dict | None = None

        @field_validator("temperature", "top_p", "stream", "n", "frequency_penalty", "presence_penalty",
                         mode="before")
        @classmethod
        def _null_is_the_default(cls, value, info):  # OpenAI's API takes null for "the default", as clients send
            return cls.model_fields[info.field_name].default if value is None else value

        @field_validator("n", "best_of", mode="before", check_fields=False)  # (best_of: completions only)
        @classmethod
        def _an_int(cls, value, info):  # true == 1 and 1.0 == 1 would pass the Literal
            if value is not None and type(value) is not int:
                raise ValueError(f"{info.field_name} must be the integer 1 (one completion a prompt)")
            return value

        @field_validator("top_logprobs", mode="before")
        @classmethod
        def _no_top_logprobs(cls, value):
            if value is not None and (type(value) is not int or value != 0):
                raise ValueError("this server returns no log-probabilities; leave top_logprobs out")
            return value

        @field_validator("logprobs", mode="before")
        @classmethod
        def _no_logprobs(cls, value):  # 0 == False would pass the Literal, and OpenAI's logprobs: 0 asks for them
            if value is not None and value is not False:
                raise ValueError("this server returns no log-probabilities; leave logprobs out, or false")
            return value

    class CompletionRequest(Sampling):
        prompt: Any  # checked by _prompt_ids, with a clearer message than a union's
        echo: Literal[False] = False
        best_of: Literal[None, 1] = None
        suffix: Literal[None] = None

        @field_validator("echo", mode="before")
        @classmethod
        def _no_echo(cls, value):  # 0 == False would pass the Literal
            if value is not None and value is not False:
                raise ValueError("this server does not echo the prompt; leave echo out, or false")
            return False

    class ChatRequest(Sampling):
        messages: list[dict] = Field(min_length=1)
        # tools (and the older functions) would be ignored: refused unless absent or empty; the choice among none
        tools: Any = None
        functions: Any = None
        tool_choice: Any = None
        function_call: Any = None

        @field_validator("tools", "functions")
        @classmethod
        def _no_tools(cls, value, info):
            if value not in (None, []):
                raise ValueError(f"this server does not call tools; leave {info.field_name} out")
            return None

        @field_validator("tool_choice", "function_call")
        @classmethod
        def _no_tool_choice(cls, value, info):  # "none" and "auto" ask nothing when no tool is offered
            if value not in (None, "none", "auto"):
                raise ValueError(f"this server does not call tools; leave {info.field_name} out, or \"none\"")
            return None

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect or missing API key: send the header 'Authorization: Bearer KEY' with "
                                "the key the server was started with", None, "invalid_api_key")

    app = FastAPI(title="lora serve", docs_url=None, redoc_url=None)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc)

    def too_large(size: int | None) -> ApiError:
        """413 for a body of `size` bytes (its Content-Length), or None: one that passed the limit as it arrived."""
        what = (f"has {size:,} bytes, more than the {MAX_BODY_BYTES:,}" if size is not None
                else f"passed the {MAX_BODY_BYTES:,} bytes")
        return ApiError(413, f"the request body {what} this server reads; send a shorter prompt", None,
                        "request_too_large")

    class BodyLimit:
        """ASGI middleware: a request body over MAX_BODY_BYTES gets its 413 before the app sees it, by its
        Content-Length, or, sent without one (chunked), as soon as that many bytes have arrived. Below the limit
        the body is read here and handed on whole (the app reads all of it anyway), and what the client sends
        after it (a disconnect) reaches the app as it comes."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            length = dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                return await error(too_large(int(length)))(scope, receive, send)
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":  # the client left before its body was whole
                    return
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > MAX_BODY_BYTES:
                    return await error(too_large(None))(scope, receive, send)
                more = message.get("more_body", False)
            whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            handed = False

            async def replay():
                nonlocal handed
                if not handed:
                    handed = True
                    return whole
                return await receive()

            await self.inner(scope, replay, send)

    app.add_middleware(BodyLimit)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", first["msg"])
            return error(ApiError(400, f"the request body is not valid JSON: {reason}"))
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if not loc:  # not an object: a list, a string, or a body sent without Content-Type: application/json
            return error(ApiError(400, "the request body must be a JSON object, sent with Content-Type: "
                                       "application/json"))
        return error(ApiError(400, f"{'.'.join(loc)}: {first['msg']}", loc[0]))

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):  # unknown route, wrong method
        return error(ApiError(exc.status_code, str(exc.detail), None, None))

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return error(ApiError.internal(exc))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": sorted(engine.models), **engine.stats, "running": len(engine.sinks),
                **engine.batching()}

    @v1.get("/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [
            {"id": s.name, "object": "model", "created": created, "owned_by": "lora-cli",
             **({"parent": s.parent} if s.parent else {})} for s in engine.models.values()]}

    def jobs(served: Served, req: Sampling, prompts: list[list[int]], param: str,
             chat: ChatPrompt | None = None) -> list[tuple[Job, Generation]]:
        """Check every prompt and option before any generation starts: a bad one is a 400, never a broken
        stream."""
        for name, ignorable in (("frequency_penalty", req.frequency_penalty == 0),
                                ("presence_penalty", req.presence_penalty == 0),
                                ("logit_bias", not req.logit_bias),
                                ("response_format", req.response_format in (None, {"type": "text"}))):
            if not ignorable:
                raise ApiError(400, f"{name} is not supported by this server (it would be ignored); leave it out",
                               name)
        stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, "stop must be a non-empty string or a list of them", "stop")
        sampling = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "seed": req.seed}
        checked = []
        limit = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None and chat is None:  # OpenAI's completions default; a chat runs to the context's end
            max_tokens = COMPLETION_MAX_TOKENS
        for i, prompt in enumerate(prompts):
            what = "the chat prompt" if chat is not None else f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
            job = Job(prompt, _check_context(served, prompt, max_tokens, param, what, limit), sampling, stops)
            if chat is not None:  # the reply ends at the template's end of turn too
                job.eos_ids = chat.eos_ids
                job.stop = [*stops, chat.end_text] if chat.end_text else stops
            try:
                checked.append((job, engine.checked_row(served, job, where=f"prompt {i + 1}")))
            except LoraError as exc:
                raise ApiError(400, first_line(exc, 400), param) from exc
        # every prompt passed: only now do they join the batch (a later bad one left the first ones decoding)
        return [(job, engine.run_generation(served, job, row)) for job, row in checked]

    def usage(done: list[Job]) -> dict:
        prompt = sum(len(j.prompt) for j in done)
        completion = sum(j.completion_tokens for j in done)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def unless_gone(request: Request, answer):
        """`answer` awaited, or None if the client leaves first: then it is cancelled (and its caller closes the
        request's generations, which leave the batch at their next step, as an abandoned stream's do)."""
        task = asyncio.ensure_future(answer)

        async def gone() -> None:  # the request's body was read: the next message is the disconnect
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watcher = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None

    def respond(req: Sampling, kind: str, work: list[tuple[Job, Generation]], request: Request):
        """The JSON answer, or with stream=true the SSE stream of chunks (OpenAI's formats for `kind`:
        "text_completion" or "chat.completion")."""
        rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": kind, "created": int(time.time()), "model": req.model}

        def choice(i: int, text: str | None, finish: str | None, delta: bool = False) -> dict:
            if kind == "text_completion":
                return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            if delta:
                return {"index": i, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
            return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

        async def close_all() -> None:  # a client gone: every generation of the request stops now
            for _, pieces in work:
                await pieces.aclose()

        if not req.stream:
            async def collect() -> dict:
                choices = []
                for i, (job, pieces) in enumerate(work):
                    text = "".join([p async for p in pieces])
                    choices.append(choice(i, text, job.finish_reason))
                return {**head, "choices": choices, "usage": usage([j for j, _ in work])}

            async def whole():
                try:
                    answer = await unless_gone(request, collect())
                    return Response(status_code=499) if answer is None else answer  # 499: nobody reads it
                finally:
                    await close_all()  # also when the client left before collect() began
            return whole()

        chunk_head = {**head, "object": kind + ".chunk"} if kind != "text_completion" else head

        def event(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events():
            try:
                for i, (job, pieces) in enumerate(work):
                    try:
                        if kind != "text_completion":
                            yield event({**chunk_head, "choices": [
                                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
                        async for piece in pieces:
                            yield event({**chunk_head, "choices": [choice(i, piece, None, delta=True)]})
                        yield event({**chunk_head, "choices": [choice(i, None, job.finish_reason, delta=True)]})
                    except Exception as exc:  # generation failed after the 200 went out: the stream says so, ends
                        yield event(ApiError.internal(exc).body())
                        return
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield event({**chunk_head, "choices": [], "usage": usage([j for j, _ in work])})
                yield "data: [DONE]\n\n"
            finally:
                await close_all()

        return ClosingStreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @v1.post("/completions")
    async def completions(req: CompletionRequest, request: Request):
        served = engine.model(req.model)
        prompts = _prompt_ids(req.prompt, served.loaded.tokenizer)
        out = respond(req, "text_completion", jobs(served, req, prompts, "prompt"), request)
        return out if req.stream else await out

    @v1.post("/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        served = engine.model(req.model)
        chat_prompt = messages_to_ids(served, req.messages)
        out = respond(req, "chat.completion", jobs(served, req, [chat_prompt.ids], "messages", chat_prompt), request)
        return out if req.stream else await out

    app.include_router(v1)
    return app


# ------------------------------------------------------------------------------------------------ serving


def _exit_cleanly(signum, frame) -> None:
    raise SystemExit(0)


def serve(adapters: Sequence[str], model: str | None, host: str, port: int, api_key: str | None = None,
          device: str = "auto", allow_mismatch: bool = False, log: Callable[[str], None] = print,
          precision: str = "fp32") -> None:
    """Load the models and serve them until SIGTERM or Ctrl-C (a clean stop: in-flight requests finish first).
    Port 0 picks a free port; the line "serving http://HOST:PORT (models: ...)" says which."""
    try:  # the `serve` extra
        import fastapi  # noqa: F401  (build_app imports it; checked here before the models load)
        import uvicorn
    except ImportError as exc:
        raise ConfigError(f"lora serve needs FastAPI and uvicorn ({exc.name} is missing): "
                          "pip install 'lora-cli[serve]'") from None

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0-65535 (0: any free port), got {port}")
    if api_key is not None and not api_key.strip():  # `--api-key "$KEY"` with KEY unset: not an open server
        raise ConfigError("--api-key is empty; give the key clients must send, or leave --api-key out to serve "
                          "without one")
    if api_key is None:
        api_key = os.environ.get("LORA_API_KEY") or None
    # SIGTERM stops the server cleanly with exit code 0. uvicorn handles it while serving and raises it again
    # once stopped; this handler turns that (or a SIGTERM while the models load) into a normal exit.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    dev = device_option(device)
    dtype = inference_dtype(precision, dev)
    # Bind before loading the models (a port in use fails at once), listen after (until then clients are
    # refused rather than kept waiting).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); pick "
                          "another port (0: any free one)") from None
    engine = Engine(load_models(adapters, model, allow_mismatch, dev, dtype))
    sock.listen(2048)  # uvicorn's default backlog
    bound = sock.getsockname()[1]
    config = uvicorn.Config(build_app(engine, api_key), log_level="info", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    shown = f"[{host}]" if ":" in host else host  # an IPv6 address goes in brackets in a URL (RFC 3986)
    log(f"serving http://{shown}:{bound} (models: {', '.join(engine.models)}"
        f"{'; API key required' if api_key else ''})")
    uvicorn.Server(config).run(sockets=[sock])
