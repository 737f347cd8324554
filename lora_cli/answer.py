"""`lora generate` and `lora chat` as library calls: the flags checked before anything loads, the model loaded
once, then prompts or conversations answered and written. The CLI parses its flags into these options and calls
run_generate or run_chat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from lora_cli.adapter import Adapter
from lora_cli.chat import HELP, Replier, answer_conversations, chat_loop, chat_template_for, read_conversations
from lora_cli.config import CHAT_MAX_NEW_TOKENS, GENERATE_MAX_NEW_TOKENS, SEEDS, SEEDS_TEXT
from lora_cli.errors import ConfigError, DataError
from lora_cli.evaluation import generate_texts
from lora_cli.generate import check_room, stream_text
from lora_cli.inference import DataSettings, load_placed, open_adapter, pack_for_decoding, packing_pays
from lora_cli.prompts import check_lengths, check_search, collect_prompts, escape_line, sampling_options

@dataclass
class Source:
    """The model that answers: --adapter (its base comes with it) and/or --model, placed on --device in
    --precision."""

    adapter: Path | None = None
    model: str | None = None
    allow_mismatch: bool = False
    device: str = "auto"
    precision: str = "fp32"

    def require(self, comes_with: str) -> None:
        """At least one of --adapter and --model (`comes_with`: what else an adapter brings, for the message)."""
        if self.adapter is None and self.model is None:
            raise ConfigError(f"name a model: --adapter FILE (its base and {comes_with} come with it) or --model MODEL")

    def open(self, command: str) -> tuple[Adapter | None, DataSettings]:
        """The adapter (None for --model alone) and its data settings; a classifier is refused."""
        adapter = open_adapter(self.adapter)
        settings = DataSettings.from_adapter(adapter)
        if settings.task == "classification":
            raise ConfigError(f"adapter {self.adapter} is a classifier; `{command}` needs a causal-LM adapter")
        return adapter, settings

    def load(self, adapter: Adapter | None):
        return load_placed(adapter, self.model, self.allow_mismatch, self.device, self.precision)


@dataclass
class Decoding:
    """The decoding flags `lora generate` and `lora chat` share."""

    max_new_tokens: int | None = None  # None: the command's default, or what the context leaves
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool = False
    seed: int | None = None
    no_repeat_ngram_size: int = 0
    use_cache: bool = True

    def options(self) -> dict:
        """generate.generate's keyword options; the flags are checked here, before anything loads."""
        options = sampling_options(self.temperature, self.top_k, self.top_p, self.greedy)
        check_lengths(self.max_new_tokens, self.no_repeat_ngram_size)
        if self.seed is not None and self.seed not in SEEDS:
            raise ConfigError(f"--seed must be {SEEDS_TEXT}, got {self.seed}")
        if self.seed is not None and options["temperature"] == 0:  # greedy: nothing is drawn
            raise ConfigError("--seed seeds sampling, and this decoding is greedy: add --temperature T (T > 0), "
                              "--top-k or --top-p, or drop --seed")
        return {**options, "seed": self.seed, "no_repeat_ngram_size": self.no_repeat_ngram_size,
                "use_cache": self.use_cache}


def chat_replier(source: Source, adapter: Adapter | None, decoding: Decoding, options: dict,
                 chat_template: str | None, default: int) -> Replier:
    """The model (adapter attached, on its device, in its precision) and its chat template, ready to answer
    conversations: replies of at most --max-new-tokens, or (None) `default` tokens or what the context leaves."""
    loaded = source.load(adapter)
    context = loaded.model.config.n_positions
    budget = decoding.max_new_tokens
    if budget is not None and budget >= context:  # no conversation could fit: say so before any
        raise ConfigError(f"--max-new-tokens {budget} leaves no room for a conversation in the model's "
                          f"context of {context} tokens; lower it below {context}")
    if packing_pays(loaded.model, 1, 1, default if budget is None else budget):  # one conversation at a time
        pack_for_decoding(loaded.model)
    template = chat_template_for(loaded, chat_template)
    return Replier(loaded, loaded.model, template, default if budget is None else budget, options,
                   fit_context=budget is None)


@dataclass
class GenerateOptions:
    """What `lora generate` answers and how it writes the answers."""

    source: Source
    decoding: Decoding
    prompts: Sequence[str] = ()
    file: Path | None = None  # one prompt (or with chat, one conversation) per line; "-": stdin
    as_json: bool = False
    template: bool = True  # the adapter's prompt template (--no-template: False)
    input_text: str | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    batch_size: int = 8
    progress: bool = False
    chat: bool = False
    chat_template: str | None = None

    def check(self) -> None:
        if self.chat_template is not None and not self.chat:
            raise ConfigError("--chat-template renders a --chat conversation: add --chat (and give the conversation "
                              "as JSON)")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be a positive integer, got {self.batch_size}")
        check_search(self.num_beams, self.length_penalty)
        if self.length_penalty != 1.0 and self.num_beams == 1:
            raise ConfigError("--length-penalty scores beam search's hypotheses: add --num-beams N (N > 1) or drop "
                              "--length-penalty")
        d = self.decoding
        if self.num_beams > 1:  # beam search keeps the most likely continuations: it draws nothing
            sampling = [flag for flag, given in (("--temperature", (d.temperature or 0) > 0), ("--top-k", d.top_k),
                                                 ("--top-p", d.top_p), ("--seed", d.seed is not None)) if given]
            if sampling:
                raise ConfigError(f"{sampling[0]} is for sampling, and beam search does not sample: drop "
                                  f"{sampling[0]} or --num-beams")
        if not self.chat:
            return
        if self.num_beams != 1:
            raise ConfigError("--chat streams replies: drop --num-beams")
        for flag, given in (("--input", self.input_text is not None), ("--no-template", not self.template)):
            if given:
                raise ConfigError(f"--chat renders the conversation with the chat template: drop {flag}")


def run_generate(opts: GenerateOptions, write: Callable[[str], Any]) -> None:
    """Answer the prompts (or conversations): a single prompt streams, the rest are decoded in batches and written
    one line each (or one JSON object each)."""
    opts.source.require("prompt template")
    opts.check()  # the flags that go together, before their values
    options = opts.decoding.options()
    adapter, settings = opts.source.open("lora generate")
    if opts.chat:
        items = read_conversations(list(opts.prompts), opts.file)
        replier = chat_replier(opts.source, adapter, opts.decoding, options, opts.chat_template,
                               GENERATE_MAX_NEW_TOKENS)
        answer_conversations(replier, items, streamed=opts.file is None and not opts.as_json, as_json=opts.as_json,
                             write=write)
        return
    items = collect_prompts(list(opts.prompts), opts.file, opts.as_json, settings, template=opts.template,
                            input_text=opts.input_text)
    loaded = opts.source.load(adapter)
    net, tokenizer = loaded.model, loaded.tokenizer
    budget = opts.decoding.max_new_tokens
    if budget is None:  # the default, shortened where the longest prompt leaves less of the context
        context = net.config.n_positions
        length, where = max((len(tokenizer.encode_prompt(item.text)), item.where) for item in items)
        if length >= context:  # no --max-new-tokens to blame: the prompt alone fills the context
            raise DataError(f"{where} has {length:,} tokens and leaves none of the model's context of {context:,} to "
                            f"generate in; shorten it to at most {context - 1:,} tokens")
        budget = min(GENERATE_MAX_NEW_TOKENS, context - length)
    else:
        check_room(budget, net.config.n_positions, "--max-new-tokens")  # named as the flag it came from
    if packing_pays(net, len(items), opts.num_beams, budget):
        pack_for_decoding(net)
    if len(items) == 1 and opts.file is None and not opts.as_json and opts.num_beams == 1:
        prompt = tokenizer.encode_prompt(items[0].text)
        for piece in stream_text(net, prompt, budget, tokenizer=tokenizer, **options):
            write(piece)
        write("\n")
        return
    texts = generate_texts(net, [item.text for item in items], budget, tokenizer=tokenizer,
                           where=[item.where for item in items], batch_size=opts.batch_size,
                           num_beams=opts.num_beams, length_penalty=opts.length_penalty, progress=opts.progress,
                           **options)
    for item, text in zip(items, texts):
        write((json.dumps({**item.record, "generated": text}, ensure_ascii=False) if opts.as_json
               else escape_line(text)) + "\n")


def run_chat(source: Source, decoding: Decoding, system: str | None, chat_template: str | None,
             log: Callable[[str], Any]) -> int:
    """`lora chat`: talk until /exit or the end of input; returns the number of turns that failed."""
    source.require("chat template")
    options = decoding.options()
    adapter, _ = source.open("lora chat")
    replier = chat_replier(source, adapter, decoding, options, chat_template, CHAT_MAX_NEW_TOKENS)
    log(f"chatting with {source.adapter or source.model}; {HELP}")
    _, failed = chat_loop(replier, system)
    return failed
