"""Decoding for `lora generate` and `lora eval --generate`: greedy, sampling and beam search, KV-cached.

Prompts are token ids. A batch of prompts is LEFT-padded: the model derives position ids from the attention
mask, so a padded row computes exactly what it would alone, and every row's next token sits in the last
column. The mask handed to the model always covers the cached tokens plus the new ones ([N, S_total]).

Public functions:
  generate(model, prompts, max_new_tokens, ...)  -> one list of new token ids per prompt (EOT not included)
  beam_search(model, prompts, max_new_tokens, ...) -> the same, by beam search (generate calls it for num_beams > 1)
  stream(model, prompt, max_new_tokens, ...)     -> iterator of token ids for one prompt, as they are decoded
  stream_text(model, prompt, max_new_tokens, ...) -> iterator of text pieces (whole UTF-8 characters only)
  decode_incremental(token_ids)                   -> text pieces from any iterable of ids
  ContinuousBatch(model), Row(model, prompt, ...) -> rows that join and leave a running batch between steps
  fit_prompt(prompt, max_new_tokens, n_positions, truncate, where) -> the prompt checked against the context
  process_logits / choose_tokens / banned_ngram_mask: the per-step pieces, exposed for tests and callers.

`use_cache=False` recomputes the whole sequence at every step (same tokens, much slower): it exists to check the
cache and to measure what the cache buys (scripts/bench_generate.py). On CUDA, greedy and sampled decoding with the
cache replay a CUDA graph of one fixed-shape step (_StaticDecoder; `static=False` decodes eagerly).
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from lora_cli.config import SEEDS, SEEDS_TEXT
from lora_cli.errors import ConfigError, DataError
from lora_cli.models import CausalLM, KVCache
from lora_cli.tokenizer import EOT_ID, GPT2, GPT2Tokenizer, Tokenizer, get_encoding

# Added to the score of a hypothesis that must not be picked; the constant transformers uses, so that float32
# rounding of "score + penalty" is the same as in its beam search (Hugging Face `_beam_search`).
_NEG = -1.0e9


# ----------------------------------------------------------------------------------------------------------
# Checking inputs


def check_room(max_new_tokens: int, n_positions: int, name: str = "max_new_tokens") -> int:
    """The tokens a prompt may have beside max_new_tokens new ones; none is a ConfigError naming the budget as
    `name` (the flag or config key it came from)."""
    room = n_positions - max_new_tokens
    if room < 1:
        raise ConfigError(
            f"{name} {max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{n_positions} tokens; lower {name} below {n_positions}"
        )
    return room


def fit_prompt(prompt: Sequence[int], max_new_tokens: int, n_positions: int, truncate: bool = False,
               where: str = "prompt", vocab_size: int | None = None) -> list[int]:
    """The prompt as a list of ids, checked to leave room for `max_new_tokens` in the model's context.

    A prompt that does not fit is an error, or with `truncate` loses tokens from the LEFT (the end of a prompt,
    next to the text to be generated, matters most). `where` names the prompt in messages ("prompts.txt line 3").
    """
    ids = [int(t) for t in prompt]
    if not ids:
        raise DataError(f"{where} is empty (0 tokens); give it some text to continue")
    if vocab_size is not None:
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise DataError(f"{where} holds token id {bad}, outside the model's vocabulary of {vocab_size}")
    room = check_room(max_new_tokens, n_positions)
    if len(ids) > room:
        if not truncate:
            raise DataError(
                f"{where} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the model's context "
                f"of {n_positions} tokens: shorten it to at most {room} tokens or lower max_new_tokens"
            )
        ids = ids[-room:]
    return ids


def _check_options(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   no_repeat_ngram_size: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(no_repeat_ngram_size, bool) or not isinstance(no_repeat_ngram_size, int) or no_repeat_ngram_size < 0:
        raise ConfigError(f"no_repeat_ngram_size must be a non-negative integer (0 = off), got {no_repeat_ngram_size!r}")


def _check_static(static: bool | None, use_cache: bool, num_beams: int = 1) -> None:
    if static and not use_cache:
        raise ConfigError("the static decoding step needs the KV cache (use_cache)")
    if static and num_beams > 1:
        raise ConfigError("beam search decodes with the eager step: static is for greedy and sampled decoding")


def _make_generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed not in SEEDS:
        raise ConfigError(f"seed must be {SEEDS_TEXT}, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


EosIds = int | Sequence[int] | None  # the token(s) that end a row: a tokenizer's eos_ids; None never ends


def _eos_ids(eos_id: EosIds) -> tuple[int, ...]:
    if eos_id is None:
        return ()
    return (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)


def _is_eos(tokens: torch.Tensor, eos: tuple[int, ...]) -> torch.Tensor:
    """tokens [N] (or [N, K]) -> bool of the same shape: the token is one of `eos`."""
    return torch.isin(tokens, torch.tensor(eos, dtype=tokens.dtype, device=tokens.device))


def _device(model: CausalLM) -> torch.device:
    return model.embed_tokens.weight.device


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N, P] (padding = id 0, in every vocabulary and never attended) and mask [N, P] (1 = real token),
    padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------------------
# One forward step for a batch of rows, with or without the KV cache


class _Decoder:
    """Next-token logits [N, V] (float32) for N rows that each grow by one token per step, up to `capacity`
    tokens a row (prompt + new tokens).

    With the cache only the new token goes through the model, and the keys and values go into a static cache
    allocated once (KVCache with a capacity); without it the whole sequence is recomputed. The attention mask
    is allocated once too, [N, capacity] of ones, with a view of its first S columns handed to the model.
    `select(index)` keeps/reorders rows (finished rows dropped, beams reordered)."""

    def __init__(self, model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool, capacity: int):
        self.model = model
        S = mask.shape[1]
        self.full_mask = torch.ones((mask.shape[0], max(capacity, S)), dtype=mask.dtype, device=mask.device)
        self.full_mask[:, :S] = mask
        self.length = S  # tokens per row so far
        self.padded = not bool(mask.all())
        self.cache = KVCache(model.config.n_layer, capacity=capacity) if use_cache else None
        self.ids = None if use_cache else ids
        self._rows: torch.Tensor | None = None  # rows of _logits that select() kept, gathered when read
        self.logits = self._forward(ids)

    @property
    def logits(self) -> torch.Tensor:
        """[N, V] fp32: each row's next-token logits. select() gathers them only if they are read before the next
        append() replaces them (beam 10 over 8 E2E prompts: 16 MB a step, 7% of the decoding)."""
        if self._rows is not None:
            self._logits, self._rows = self._logits[self._rows], None
        return self._logits

    @logits.setter
    def logits(self, value: torch.Tensor) -> None:
        self._logits, self._rows = value, None

    def _keep_logits(self, index: torch.Tensor) -> None:
        self._rows = index if self._rows is None else self._rows[index]

    @property
    def mask(self) -> torch.Tensor:
        """[N, S]: past + new tokens."""
        return self.full_mask[:, :self.length]

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Without padding, mask=None lets the model skip building a mask and take SDPA's fused causal path.
        hidden = self.model(ids, self.mask if self.padded else None, cache=self.cache)
        return self.model.logits(hidden[:, -1]).float()  # only the last position: no [N, T, V] tensor

    def select(self, index: torch.Tensor) -> None:
        self.full_mask = self.full_mask[index]
        self.padded = not bool(self.mask.all())
        self._keep_logits(index)
        if self.cache is not None:
            self.cache.reorder(index)
        else:
            self.ids = self.ids[index]

    def expand_beams(self, num_beams: int) -> None:
        """Each prompt's row becomes `num_beams` rows (row b * num_beams + j: beam j of prompt b). A static cache
        keeps the prompts' keys and values once per prompt (KVCache.share_prefix)."""
        index = torch.arange(self.full_mask.shape[0], device=self.full_mask.device).repeat_interleave(num_beams)
        if self.cache is None or self.cache.capacity is None:
            return self.select(index)
        self.full_mask = self.full_mask[index]
        self._keep_logits(index)
        self.cache.share_prefix(num_beams)

    def join(self, other: _Decoder, capacity: int) -> None:
        """Take in `other`'s rows (prompts prefilled on their own) between two steps: continuous batching. Each side
        is right-aligned at the longer one's length (the shorter one left-padded, as `_left_pad` pads prompts; a
        row's positions come from its mask, so its past is unchanged), columns that are padding in every row are
        dropped, and the cache is reallocated for `capacity` tokens a row. Cached decoders only."""
        # (mask [n, w], cache layers [n, Hkv, w, D]) of each side, its real columns only: w <= width
        parts = [(d.mask[:, d.first_column():], [tuple(t[:, :, d.first_column():d.length] for t in kv)
                                                 for kv in d.cache.layers]) for d in (self, other)]
        width = max(mask.shape[1] for mask, _ in parts)  # the joined rows' length
        N, capacity = sum(mask.shape[0] for mask, _ in parts), max(capacity, width)
        self.full_mask = torch.ones((N, capacity), dtype=self.mask.dtype, device=self.mask.device)
        self.full_mask[:, :width] = 0
        # [N, Hkv, capacity, D] per layer; zeros in the padding (never attended, but finite)
        layers = [tuple(t.new_zeros((N, t.shape[1], capacity, t.shape[3])) for t in kv) for kv in parts[0][1]]
        row = 0
        for mask, kvs in parts:
            rows, cols = slice(row, row + mask.shape[0]), slice(width - mask.shape[1], width)
            self.full_mask[rows, cols] = mask
            for (k, v), (pk, pv) in zip(layers, kvs):
                k[rows, :, cols], v[rows, :, cols] = pk, pv
            row = rows.stop
        self.cache.replace(layers, capacity, width)
        self.length = width
        self.padded = not bool(self.mask.all())
        self.logits = torch.cat([self.logits, other.logits])

    def first_column(self) -> int:
        """The first column that some row attends to (the ones before are padding in every row)."""
        return int(self.mask.any(dim=0).long().argmax())

    def append(self, tokens: torch.Tensor) -> None:
        new = tokens[:, None]
        self.length += 1  # the new column of full_mask is already 1
        if self.cache is not None:
            self.logits = self._forward(new)
        else:
            self.ids = torch.cat([self.ids, new], dim=1)
            self.logits = self._forward(self.ids)


class _StaticDecoder:
    """_Decoder's interface (logits, select, append; cached only) with every step at the same shapes, so that on
    CUDA the step is recorded once as a CUDA graph and then replayed: one launch per token instead of a few hundred
    kernel launches issued from Python, which is what batch-1 decoding of a small model on a GPU waits on.

    Fixed shapes: the prompt is prefilled into a static KVCache as _Decoder does; then each step runs all N rows
    (a finished row stays in the batch with its outputs unread: on a GPU, rows are nearly free next to launches)
    against the cache's whole capacity, with `keys` [N, 1, 1, capacity] hiding the padding and the columns not
    written yet. The new token's column (KVCache.column), the positions and the ids are device tensors changed in
    place between replays. graph=False runs the same step eagerly (how the CPU tests check it token for token)."""

    def __init__(self, model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, capacity: int, graph: bool):
        N, S = ids.shape
        self.model = model
        self.cache = KVCache(model.config.n_layer, capacity=capacity)
        hidden = model(ids, None if bool(mask.all()) else mask, cache=self.cache)
        self.out = model.logits(hidden[:, -1]).float()  # [N, V], overwritten by each step
        for kv in self.cache.layers:  # unwritten columns are read (with weight 0): they must be finite, not garbage
            for t in kv:
                t[:, :, S:].zero_()
        self.keys = torch.zeros((N, 1, 1, capacity), dtype=torch.bool, device=ids.device)
        self.keys[:, 0, 0, :S] = mask.bool()
        self.pos = mask.long().sum(dim=1, keepdim=True) - 1  # [N, 1] the last token's position (real tokens only)
        self.cache.column = torch.full((1,), S - 1, dtype=torch.long, device=ids.device)
        self.ids = torch.zeros((N, 1), dtype=torch.long, device=ids.device)
        self.live: torch.Tensor | None = None  # the rows still decoding, as indices into the N (None: all)
        self.graph = graph
        self.recorded: torch.cuda.CUDAGraph | None = None

    @property
    def logits(self) -> torch.Tensor:
        return self.out if self.live is None else self.out[self.live]

    def select(self, index: torch.Tensor) -> None:
        self.live = index if self.live is None else self.live[index]

    def append(self, tokens: torch.Tensor) -> None:
        if self.live is None:
            self.ids[:, 0] = tokens
        else:
            self.ids[self.live, 0] = tokens
        self.cache.column += 1
        self.cache.size += 1
        self.pos += 1
        if not self.graph:
            self._step()
        elif self.recorded is None:
            self.recorded = self._record()
            self.recorded.replay()
        else:
            self.recorded.replay()

    def _step(self) -> None:
        self.keys.index_fill_(3, self.cache.column, True)
        hidden = self.model.decode_step(self.ids, self.pos, self.keys, self.cache)
        self.out.copy_(self.model.logits(hidden[:, -1]))

    def _record(self) -> torch.cuda.CUDAGraph:
        """The step, run once on a side stream (lazy initialisation, such as cuBLAS workspaces, must happen
        outside a capture), then captured. A step is idempotent (same column, same inputs), so running it again
        by replay gives the same cache and logits."""
        side = torch.cuda.Stream(self.out.device)
        side.wait_stream(torch.cuda.current_stream(self.out.device))
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream(self.out.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        return graph


def _decoder(model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool, capacity: int,
             static: bool | None) -> _Decoder | _StaticDecoder:
    """The decoder for a batch: static (fixed shapes, a CUDA graph on CUDA) when asked, or by default on CUDA
    with the cache; else _Decoder, whose rows leave the batch as they finish (what pays on a CPU)."""
    cuda = ids.device.type == "cuda"
    if static is None:
        static = cuda and use_cache
    if static:
        return _StaticDecoder(model, ids, mask, capacity, graph=cuda)
    return _Decoder(model, ids, mask, use_cache, capacity)


# ----------------------------------------------------------------------------------------------------------
# Per-step token choice


def banned_ngram_mask(seqs: torch.Tensor, n: int, vocab_size: int,
                      valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean [N, V]: tokens that would complete an n-gram already present in each row of `seqs` [N, L].

    The prompt counts, as in transformers' NoRepeatNGramLogitsProcessor for decoder-only models (n-gram blocking:
    Paulus et al. 2017, "A Deep Reinforced Model for Abstractive Summarization"; fairseq's no_repeat_ngram_size).
    `valid` [N, L] marks real tokens: n-grams touching left padding never ban anything. None: nothing banned.
    """
    N, L = seqs.shape
    if n <= 0 or L < n:
        return None
    prefix = seqs[:, L - n + 1:]  # the last n-1 tokens: an n-gram starting with them is what the next token makes
    windows = seqs.unfold(1, n, 1)  # [N, L-n+1, n]
    matches = (windows[..., :-1] == prefix[:, None, :]).all(dim=-1)
    if valid is not None:
        matches &= valid.unfold(1, n, 1).all(dim=-1) & valid[:, L - n + 1:].all(dim=-1, keepdim=True)
    # A non-matching window scatters into a spare column past the vocabulary.
    banned = torch.zeros((N, vocab_size + 1), dtype=torch.bool, device=seqs.device)
    banned.scatter_(1, torch.where(matches, windows[..., -1], vocab_size), True)
    return banned[:, :vocab_size]


MIN_TEMPERATURE = 1e-30


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """Temperature, then top-k (Fan et al. 2018), then nucleus top-p (Holtzman et al. 2020, arXiv:1904.09751),
    the order of transformers' sampling warpers. Removed tokens get -inf. `logits` [N, V]."""
    if temperature != 1.0:
        # a temperature so small that logits / temperature would overflow (to inf, then NaN probabilities) is as
        # good as MIN_TEMPERATURE: both put all the probability on the top logits (in fp32, whose range it keeps)
        logits = logits.float() / max(temperature, MIN_TEMPERATURE)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p (at least one token).
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row [N]: argmax when temperature is 0, else a sample from the processed logits."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = process_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------------------------------------
# Greedy and sampling


def _choose_per_row(logits: torch.Tensor, rows: torch.Tensor, temperature: float, top_k: int | None,
                    top_p: float | None, generators: list[torch.Generator]) -> torch.Tensor:
    """choose_tokens for each row of logits [N, V] with the generator of its prompt (rows [N]: prompt indices)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.cat([choose_tokens(logits[i:i + 1], temperature, top_k, top_p, generators[r])
                      for i, r in enumerate(rows.tolist())])


@torch.inference_mode()
def _sampling_steps(model: CausalLM, prompts: list[list[int]], max_new_tokens: int, *, temperature: float,
                    top_k: int | None, top_p: float | None,
                    generator: torch.Generator | list[torch.Generator] | None,
                    no_repeat_ngram_size: int, eos_id: EosIds, use_cache: bool,
                    static: bool | None = None) -> Iterator[tuple[list[int], list[int]]]:
    """Yields, per step, (rows, tokens): the prompts (by index) that produced a token and the tokens. A row that
    produces an `eos_id` is finished: it is left out of that step and dropped from the batch, so it stops costing.
    generator: one for the whole batch, or a list with one per prompt (each row draws from its prompt's)."""
    eos = _eos_ids(eos_id)
    if max_new_tokens == 0 or not prompts:
        return
    was_training = model.training
    model.eval()
    try:
        ids, mask = _left_pad(prompts, _device(model))
        decoder = _decoder(model, ids, mask, use_cache, ids.shape[1] + max_new_tokens, static)
        rows = torch.arange(len(prompts), device=ids.device)
        history, valid = ids, mask.bool()  # for no-repeat n-grams
        vocab = model.config.vocab_size
        for step in range(max_new_tokens):
            logits = decoder.logits
            if no_repeat_ngram_size:
                banned = banned_ngram_mask(history, no_repeat_ngram_size, vocab, valid)
                if banned is not None:
                    logits = logits.masked_fill(banned, float("-inf"))
            if isinstance(generator, list):
                tokens = _choose_per_row(logits, rows, temperature, top_k, top_p, generator)
            else:
                tokens = choose_tokens(logits, temperature, top_k, top_p, generator)
            going = ~_is_eos(tokens, eos) if eos else torch.ones_like(tokens, dtype=torch.bool)
            keep = going.nonzero().squeeze(1)
            yield rows[keep].tolist(), tokens[keep].tolist()
            if step == max_new_tokens - 1 or keep.numel() == 0:
                return
            if keep.numel() < rows.numel():
                rows, tokens = rows[keep], tokens[keep]
                history, valid = history[keep], valid[keep]
                decoder.select(keep)
            if no_repeat_ngram_size:
                history = torch.cat([history, tokens[:, None]], dim=1)
                valid = torch.cat([valid, torch.ones_like(tokens[:, None], dtype=torch.bool)], dim=1)
            decoder.append(tokens)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# Beam search


@torch.inference_mode()
def _beam_batch(model: CausalLM, prompts: list[list[int]], max_new_tokens: int, num_beams: int, length_penalty: float,
                early_stopping: bool | str, no_repeat_ngram_size: int, eos_id: EosIds,
                use_cache: bool) -> list[list[int]]:
    """Beam search over a batch of prompts, step for step the algorithm of transformers' `_beam_search`
    (GenerationMixin, v4.50+ vectorised form), so that its outputs are the same tokens:

    - each step keeps the top max(2, 1 + number of EOS ids) * num_beams continuations of all beams by summed
      log-probability;
    - the best num_beams of them that do not end in EOS are the running beams of the next step;
    - among the top num_beams continuations, those ending in EOS (or all of them at the last step) are finished
      hypotheses scored sum_logprob / generated_len ** length_penalty, generated_len counting the new tokens
      including the EOS (not the prompt); the best num_beams finished hypotheses are kept;
    - early_stopping=False stops a prompt once all num_beams finished slots are full and the best running beam,
      scored at its current length, cannot beat the worst of them; True stops as soon as the slots are full;
      "never" scores the running beam at max length when length_penalty > 0.
    The answer is the best finished hypothesis, without its EOS. A prompt that is done leaves the batch.
    """
    # transformers' beams_to_keep: with n EOS ids, up to n of a beam's best continuations may end, and num_beams
    # running ones must remain (2 * num_beams lost every running beam when both of two EOS ids ranked high)
    nb, K = num_beams, max(2, 1 + len(_eos_ids(eos_id))) * num_beams
    B, M, V = len(prompts), max_new_tokens, model.config.vocab_size
    was_training = model.training
    model.eval()
    try:
        ids, mask = _left_pad(prompts, _device(model))
        dev = ids.device
        decoder = _Decoder(model, ids, mask, use_cache, ids.shape[1] + M)
        decoder.expand_beams(nb)  # row b*nb + j is beam j of prompt b
        prompt_ids, prompt_valid = ids.repeat_interleave(nb, 0), mask.bool().repeat_interleave(nb, 0)

        entries = torch.arange(B, device=dev)  # which prompt each live batch entry is
        run_gen = torch.zeros((B, nb, 0), dtype=torch.long, device=dev)  # running beams' new tokens
        run_score = torch.zeros((B, nb), device=dev)
        run_score[:, 1:] = _NEG  # all beams start equal: only beam 0's continuations may be chosen at step 0
        eos = _eos_ids(eos_id)
        fill = eos[0] if eos else 0
        fin_gen = torch.full((B, nb, M), fill, dtype=torch.long, device=dev)  # finished hypotheses' new tokens
        fin_len = torch.zeros((B, nb), dtype=torch.long, device=dev)
        fin_score = torch.full((B, nb), _NEG, device=dev)
        fin_flag = torch.zeros((B, nb), dtype=torch.bool, device=dev)
        improvable = torch.ones((B, 1), dtype=torch.bool, device=dev)  # transformers' "heuristic unsatisfied"
        top_nb = torch.arange(K, device=dev) < nb
        results: list[list[int] | None] = [None] * B

        for step in range(M):
            n_live = entries.numel()
            log_probs = F.log_softmax(decoder.logits, dim=-1)  # [n_live*nb, V]
            if no_repeat_ngram_size:
                seqs = torch.cat([prompt_ids, run_gen.reshape(n_live * nb, step)], dim=1)
                valid = torch.cat([prompt_valid, torch.ones_like(seqs[:, ids.shape[1]:], dtype=torch.bool)], dim=1)
                banned = banned_ngram_mask(seqs, no_repeat_ngram_size, V, valid)
                if banned is not None:
                    log_probs.masked_fill_(banned, float("-inf"))  # log_softmax made it: no copy
            log_probs = log_probs.view(n_live, nb, V).add_(run_score[:, :, None])
            top_scores, top_index = torch.topk(log_probs.view(n_live, nb * V), K)  # [n_live, K], best first
            source, token = top_index // V, top_index % V
            cand_gen = torch.cat([torch.gather(run_gen, 1, source[:, :, None].expand(-1, -1, step)),
                                  token[:, :, None]], dim=2)  # [n_live, K, step+1]
            last = step + 1 >= M
            ends = torch.ones_like(token, dtype=torch.bool) if last else (
                _is_eos(token, eos) if eos else torch.zeros_like(token, dtype=torch.bool))

            # Running beams for the next step: the best continuations that did not end.
            running = top_scores + ends.to(torch.float32) * _NEG
            pick = torch.topk(running, nb).indices
            run_gen = torch.gather(cand_gen, 1, pick[:, :, None].expand(-1, -1, step + 1))
            run_score = torch.gather(running, 1, pick)
            run_source = torch.gather(source, 1, pick)

            # Finished hypotheses: merge the new ones (top num_beams continuations only) into the kept ones.
            just_ended = ends & top_nb[None, :]
            cand = top_scores / ((step + 1) ** length_penalty)
            full = fin_flag.all(dim=-1, keepdim=True) & (early_stopping is True)
            cand = cand + full.to(torch.float32) * _NEG
            cand = cand + (~improvable).to(torch.float32) * _NEG
            cand = cand + (~just_ended) * _NEG
            padded_gen = torch.full((n_live, K, M), fill, dtype=torch.long, device=dev)
            padded_gen[:, :, : step + 1] = cand_gen
            merged_score = torch.cat([fin_score, cand], dim=1)
            keep = torch.topk(merged_score, nb).indices
            fin_score = torch.gather(merged_score, 1, keep)
            fin_flag = torch.gather(torch.cat([fin_flag, just_ended], dim=1), 1, keep)
            fin_len = torch.gather(torch.cat([fin_len, torch.full_like(token, step + 1)], dim=1), 1, keep)
            fin_gen = torch.gather(torch.cat([fin_gen, padded_gen], dim=1), 1, keep[:, :, None].expand(-1, -1, M))

            # Can a running beam still beat the worst finished hypothesis?
            hypothetical = M if (early_stopping == "never" and length_penalty > 0.0) else step + 1
            best_running = run_score[:, :1] / (hypothetical ** length_penalty)
            worst_finished = torch.where(fin_flag, fin_score.min(dim=1, keepdim=True).values, _NEG)
            improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)

            done = ~improvable[:, 0]
            if early_stopping is True:
                done |= fin_flag.all(dim=-1)
            if last:
                done[:] = True
            for i in done.nonzero().squeeze(1).tolist():
                best = fin_gen[i, 0, : fin_len[i, 0]].tolist()
                if best and best[-1] in eos:
                    best = best[:-1]
                results[int(entries[i])] = best
            live = (~done).nonzero().squeeze(1)
            if live.numel() == 0:
                break
            if live.numel() < n_live:
                entries, run_gen, run_score, run_source = entries[live], run_gen[live], run_score[live], run_source[live]
                fin_gen, fin_len, fin_score, fin_flag = fin_gen[live], fin_len[live], fin_score[live], fin_flag[live]
                improvable = improvable[live]
                rows = (live[:, None] * nb + torch.arange(nb, device=dev)).flatten()
                prompt_ids, prompt_valid = prompt_ids[rows], prompt_valid[rows]
            # Reorder the cache so row b*nb + j holds the past of running beam j (one gather for drop + reorder).
            decoder.select((live[:, None] * nb + run_source).flatten())
            decoder.append(run_gen[:, :, -1].flatten())
        return [r if r is not None else [] for r in results]
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def _prepare(model: CausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, truncate: bool) -> list[list[int]]:
    return [_fit(model, p, max_new_tokens, truncate, f"prompt {i + 1}") for i, p in enumerate(prompts)]


def _fit(model: CausalLM, prompt: Sequence[int], max_new_tokens: int, truncate: bool, where: str) -> list[int]:
    """fit_prompt against the model's context and vocabulary; `where` names the prompt in errors."""
    cfg = model.config
    return fit_prompt(prompt, max_new_tokens, cfg.n_positions, truncate, where=where, vocab_size=cfg.vocab_size)


def _in_batches(prompts: list[list[int]], batch_size: int | None, run: Callable[[list[list[int]]], list[list[int]]],
                progress: Callable[[int], None] | None) -> list[list[int]]:
    """Run `run` on batches of similar length (longest first, so memory peaks at once), in the caller's order."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i])) if batch_size else list(range(len(prompts)))
    size = batch_size or max(len(prompts), 1)
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), size):
        chunk = order[start: start + size]
        for i, result in zip(chunk, run([prompts[i] for i in chunk])):
            out[i] = result
        if progress is not None:
            progress(len(chunk))
    return out


def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | torch.Generator | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    no_repeat_ngram_size: int = 0,
    eos_id: EosIds = EOT_ID,
    truncate: bool = False,
    use_cache: bool = True,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    static: bool | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (without the EOT that ended it), in the order of `prompts`.

    temperature 0 is greedy decoding (top_k/top_p/seed are then unused); > 0 samples from
    softmax(logits / temperature) restricted by top_k/top_p, drawing from `seed`: an int seeds a generator of each
    prompt's own, so a prompt gets the draws it would get alone, whatever the other prompts and batch_size; a
    torch.Generator continues one stream of draws for the batch; None: torch's global generator. no_repeat_ngram_size > 0 forbids any token that
    would repeat an n-gram of prompt + output. num_beams > 1 is beam search (deterministic; see `beam_search`).
    A row stops at `eos_id` (an id or several, e.g. a tokenizer's eos_ids; None: never) or after max_new_tokens.
    A prompt that does not leave room for max_new_tokens in the context is an error, or with `truncate` loses
    its first tokens. batch_size None runs all prompts as one batch; otherwise batches of similar lengths, and
    `progress(n)` is called after each with the number of prompts it held. static: decode with fixed-shape
    steps, recorded once as a CUDA graph on CUDA (_StaticDecoder; True needs the cache and num_beams 1); None: on
    CUDA with the cache (not beam search).
    """
    _check_options(max_new_tokens, temperature, top_k, top_p, no_repeat_ngram_size)
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ConfigError(f"num_beams must be a positive integer, got {num_beams!r}")
    if num_beams > 1 and temperature > 0:
        raise ConfigError("beam search does not sample: set temperature to 0 or num_beams to 1")
    _check_static(static, use_cache, num_beams)
    ids = _prepare(model, prompts, max_new_tokens, truncate)
    if num_beams > 1:
        return beam_search(model, ids, max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
                           early_stopping=early_stopping, no_repeat_ngram_size=no_repeat_ngram_size, eos_id=eos_id,
                           truncate=truncate, use_cache=use_cache, batch_size=batch_size, progress=progress)
    generator = _make_generator(seed, _device(model))
    per_prompt = temperature > 0 and generator is not None and not isinstance(seed, torch.Generator)

    def run(batch: list[list[int]]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in batch]
        # with an int seed every prompt draws from a generator of its own, seeded alike (as `stream` for one prompt)
        draws = [_make_generator(seed, _device(model)) for _ in batch] if per_prompt else generator
        for rows, tokens in _sampling_steps(model, batch, max_new_tokens, temperature=temperature, top_k=top_k,
                                            top_p=top_p, generator=draws, eos_id=eos_id, use_cache=use_cache,
                                            no_repeat_ngram_size=no_repeat_ngram_size, static=static):
            for r, t in zip(rows, tokens):
                out[r].append(t)
        return out

    return _in_batches(ids, batch_size, run, progress)


def beam_search(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    no_repeat_ngram_size: int = 0,
    eos_id: EosIds = EOT_ID,
    truncate: bool = False,
    use_cache: bool = True,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Beam search (the best hypothesis per prompt, without its EOT), token for token the result of transformers'
    `generate(num_beams=..., length_penalty=..., early_stopping=..., no_repeat_ngram_size=..., do_sample=False)`.

    length_penalty: a finished hypothesis scores sum(log p) / n_new ** length_penalty (n_new counts generated
    tokens including EOT); > 1 favours longer outputs, < 1 shorter. early_stopping: False (transformers' default),
    True, or "never" (see `_beam_batch`). num_beams=1 gives the greedy tokens. The LoRA paper's E2E decoding
    (Hu et al. 2021, arXiv:2106.09685, appendix D, GPT-2 hyperparameters) is num_beams=10, length_penalty 0.9
    (GPT-2 M) or 0.8 (L), no_repeat_ngram_size=4.
    """
    _check_options(max_new_tokens, 0.0, None, None, no_repeat_ngram_size)
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ConfigError(f"num_beams must be a positive integer, got {num_beams!r}")
    if not (isinstance(length_penalty, (int, float)) and math.isfinite(length_penalty)):
        raise ConfigError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise ConfigError(f"early_stopping must be true, false or never, got {early_stopping!r}")
    ids = _prepare(model, prompts, max_new_tokens, truncate)
    if max_new_tokens == 0:
        return [[] for _ in ids]

    def run(batch: list[list[int]]) -> list[list[int]]:
        return _beam_batch(model, batch, max_new_tokens, num_beams, float(length_penalty), early_stopping,
                           no_repeat_ngram_size, eos_id, use_cache)

    return _in_batches(ids, batch_size, run, progress)


def stream(
    model: CausalLM,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | torch.Generator | None = None,
    no_repeat_ngram_size: int = 0,
    eos_id: EosIds = EOT_ID,
    truncate: bool = False,
    use_cache: bool = True,
    static: bool | None = None,
) -> Iterator[int]:
    """Token ids for one prompt, yielded as each is decoded (the EOT is not yielded). The same tokens as
    `generate(model, [prompt], ...)`. Options are checked now, before the first token is asked for."""
    _check_options(max_new_tokens, temperature, top_k, top_p, no_repeat_ngram_size)
    _check_static(static, use_cache)
    (ids,) = _prepare(model, [prompt], max_new_tokens, truncate)
    generator = _make_generator(seed, _device(model))
    steps = _sampling_steps(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator, no_repeat_ngram_size=no_repeat_ngram_size, eos_id=eos_id,
                            use_cache=use_cache, static=static)
    return (tokens[0] for _, tokens in steps if tokens)


class Row:
    """One prompt of a ContinuousBatch with its own options: what `stream(model, prompt, ...)` takes, checked
    now (ConfigError, DataError). Its own torch.Generator (from `seed`) draws its samples: a row draws from it
    exactly the samples it would draw alone, whatever else is in the batch."""

    def __init__(self, model: CausalLM, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | torch.Generator | None = None,
                 eos_id: EosIds = EOT_ID, truncate: bool = False, where: str = "prompt 1"):
        _check_options(max_new_tokens, temperature, top_k, top_p, 0)
        self.prompt = _fit(model, prompt, max_new_tokens, truncate, where)  # a request's third prompt: "prompt 3"
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.generator = _make_generator(seed, _device(model))
        self.eos = _eos_ids(eos_id)
        self.produced = 0  # tokens so far
        self.finished = False  # it ended (an eos, max_new_tokens, or removed)


class ContinuousBatch:
    """Continuous batching (Yu et al. 2022, "Orca", OSDI): rows join a running batch between two decoding steps
    and leave it as soon as they end, so one forward decodes every running row. One `_Decoder` holds the batch:
    a joining row's prompt is prefilled on its own, then `_Decoder.join` left-pads it (or the batch) into the
    batch's cache. Every row gets the tokens it gets alone from `stream` (greedy: token for token; sampling: the
    same draws from its own generator). Not thread-safe: one thread calls add, remove and step."""

    def __init__(self, model: CausalLM):
        self.model = model.eval()
        self.rows: list[Row] = []  # the decoder's rows, in its order
        self.waiting: list[Row] = []
        self.decoder: _Decoder | None = None
        self.batched_steps = 0  # steps that decoded more than one row
        self.max_rows = 0  # the most rows one step decoded

    def add(self, row: Row) -> None:
        """Queue `row`: it joins at the next step that has room for it in the model's context."""
        self.waiting.append(row)

    def remove(self, row: Row) -> None:
        """Drop `row` (its client is gone) at the next step."""
        row.finished = True

    def __bool__(self) -> bool:
        return bool(self.rows or self.waiting)

    def _admit(self) -> list[Row]:
        """Prefill and join the waiting rows that fit, in order; returns those that end before decoding."""
        ended = []
        while self.waiting:
            row = self.waiting[0]
            if row.finished or row.max_new_tokens == 0:
                row.finished = True
                ended.append(self.waiting.pop(0))
                continue
            P = len(row.prompt)
            if self.decoder is not None:
                width = max(self.decoder.length - self.decoder.first_column(), P)
                need = width + max(r.max_new_tokens - r.produced for r in [*self.rows, row])
                if need > self.model.config.n_positions:
                    break  # it waits for rows to leave (alone it always fits: Row checked that)
            ids = torch.tensor([row.prompt], device=_device(self.model))
            prefill = _Decoder(self.model, ids, torch.ones_like(ids), True, P + row.max_new_tokens)
            if self.decoder is None:
                self.decoder = prefill
            else:
                self.decoder.join(prefill, need)
            self.rows.append(self.waiting.pop(0))
        return ended

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int | None]]:
        """Admit waiting rows, then decode one token for every row: (row, token) pairs, token None for a row that
        ended at an eos (not yielded, as `stream` does not) or before decoding. A row that ends has `finished` set
        and has left the batch."""
        out: list[tuple[Row, int | None]] = [(r, None) for r in self._admit()]
        live = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(live) < len(self.rows) and self.decoder is not None:
            self._keep(live)
        if not self.rows:
            return out
        logits = self.decoder.logits  # [N, V]
        tokens = logits.argmax(dim=-1)  # greedy rows; sampling rows draw from their own generator below
        for i, r in enumerate(self.rows):
            if r.temperature > 0:
                tokens[i] = choose_tokens(logits[i:i + 1], r.temperature, r.top_k, r.top_p, r.generator)[0]
        self.max_rows = max(self.max_rows, len(self.rows))
        self.batched_steps += len(self.rows) > 1
        keep = []
        for i, (r, t) in enumerate(zip(self.rows, tokens.tolist())):
            if t in r.eos:
                r.finished = True
                out.append((r, None))
                continue
            r.produced += 1
            r.finished = r.produced == r.max_new_tokens
            out.append((r, t))
            if not r.finished:
                keep.append(i)
        if len(keep) < len(self.rows):
            self._keep(keep)
        if self.rows:
            self.decoder.append(tokens[keep] if len(keep) < tokens.numel() else tokens)
        return out

    def _keep(self, index: list[int]) -> None:
        self.rows = [self.rows[i] for i in index]
        if not self.rows:
            self.decoder = None
        else:
            self.decoder.select(torch.tensor(index, device=self.decoder.logits.device))


class StopText:
    """Cuts generated text at the first stop string (`lora serve`'s `stop`, a chat template's end of turn). Text
    that could be the start of a stop string is held back until the next piece decides it."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.pending = list(stops), ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text to emit now, whether a stop string was hit)"""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def decode_incremental(token_ids: Iterable[int], tokenizer: Tokenizer = GPT2) -> Iterator[str]:
    """Text pieces for a stream of token ids. A byte-level BPE token can hold part of a UTF-8 character
    (an emoji is often 2-3 tokens), so only whole characters are yielded; the pieces join to
    `tokenizer.decode(ids)`. GPT-2: bytes through an incremental UTF-8 decoder; other tokenizers: the decoded
    text of all ids so far, yielded past what was yielded once it no longer ends in a partial character or a run
    of byte-fallback pieces (a "-" piece followed by a byte that is not UTF-8 decodes as two U+FFFD)."""
    if not isinstance(tokenizer, GPT2Tokenizer):
        yield from _decode_by_prefix(token_ids, tokenizer)
        return
    enc = get_encoding()
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tiktoken's decode also replaces
    for t in token_ids:
        piece = utf8.decode(enc.decode_single_token_bytes(t))
        if piece:
            yield piece
    tail = utf8.decode(b"", final=True)
    if tail:
        yield tail


def _decode_by_prefix(token_ids: Iterable[int], tokenizer: Tokenizer) -> Iterator[str]:
    ids: list[int] = []
    done = ""
    for t in token_ids:
        ids.append(t)
        if t in tokenizer.byte_pieces:
            continue
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd") and text.startswith(done):  # a whole character more (U+FFFD: a partial one)
            yield text[len(done):]
            done = text
    text = tokenizer.decode(ids)
    if text != done:
        yield text[len(done):] if text.startswith(done) else text


def stream_text(model: CausalLM, prompt: Sequence[int], max_new_tokens: int, tokenizer: Tokenizer = GPT2,
                **options) -> Iterator[str]:
    """Text pieces for one prompt as they are decoded: `decode_incremental(stream(...))`, stopping at any of
    the tokenizer's eos ids."""
    options.setdefault("eos_id", tokenizer.eos_ids)
    return decode_incremental(stream(model, prompt, max_new_tokens, **options), tokenizer)
