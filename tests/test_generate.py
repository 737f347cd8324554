"""Decoding: KV cache vs recomputation, batching, parity with transformers' generate (greedy and beam search),
sampling, no-repeat n-grams, EOT, streaming, context limits."""

import itertools

import pytest
import torch

from lora_cli import tokenizer
from lora_cli.pretrained import load_model
from lora_cli.errors import ConfigError, DataError
from lora_cli.generate import (
    banned_ngram_mask,
    beam_search,
    decode_incremental,
    fit_prompt,
    generate,
    process_logits,
    stream,
    stream_text,
)
from lora_cli.tokenizer import EOT_ID

from helpers import make_hf_gpt2

TEXTS = [
    "Every effort moves you",
    "Hello, world! This is a longer sentence.",
    "Hi",
    "The quick brown fox jumps over the lazy dog because",
    "name[The Vaults], eatType[pub], priceRange[more than £30]\n",
    "Once upon a time",
]
PROMPTS = [tokenizer.encode(t) for t in TEXTS]
N_NEW = 20


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """A tiny random GPT-2 whose greedy and beam outputs vary and sometimes end in EOT.

    Plain random tiny models repeat one token forever (tied embeddings: the residual stream is mostly the input
    token's embedding, whose logit is then the largest) and never produce EOT, which would leave the EOS
    branches of beam search untested. Random ln_f gains break the self-similarity; an ln_f bias on dimension 0
    together with an EOT embedding on that dimension gives EOT a logit of about 1 + ln_f(x)_0, so it wins in some
    contexts and not others. Both transformers and our loader read the same saved weights.
    """
    path = tmp_path_factory.mktemp("lively-gpt2")
    hf = make_hf_gpt2(path, seed=0)
    g = torch.Generator().manual_seed(100)
    with torch.no_grad():
        ln_f = hf.transformer.ln_f
        ln_f.weight.copy_(torch.randn(ln_f.weight.shape, generator=g) * 3)
        ln_f.weight[0], ln_f.bias[0] = 1.0, 1.0
        hf.transformer.wte.weight[EOT_ID].zero_()
        hf.transformer.wte.weight[EOT_ID, 0] = 1.0
    hf.save_pretrained(path)
    return hf, load_model(str(path)).model.eval()


@pytest.fixture(scope="module")
def repetitive(tiny_hf_dir):
    """The plain tiny random GPT-2: greedy decoding repeats one token, the worst case for n-gram blocking."""
    return load_model(str(tiny_hf_dir)).model.eval()


def hf_new_tokens(hf, prompt, n, **kwargs):
    """transformers' generated tokens for one prompt, cut at the first EOT (ours never include it)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=EOT_ID, **kwargs)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(EOT_ID)] if EOT_ID in new else new


def ngrams(seq, n):
    return [tuple(seq[i: i + n]) for i in range(len(seq) - n + 1)]


# ---------------------------------------------------------------------------------------------- greedy


def test_cached_greedy_equals_recomputed_and_unbatched(lively):
    _, model = lively
    batched = generate(model, PROMPTS, N_NEW)
    assert batched == generate(model, PROMPTS, N_NEW, use_cache=False)
    assert batched == [generate(model, [p], N_NEW)[0] for p in PROMPTS]
    # Some rows stop at EOT early and leave the batch, others run to the end: both paths are exercised.
    assert sorted(map(len, batched)) == [1, 3, 5, 8, 10, 20]
    # With n-gram blocking too (the history must follow rows as finished ones are dropped).
    blocked = generate(model, PROMPTS, N_NEW, no_repeat_ngram_size=2)
    assert blocked == generate(model, PROMPTS, N_NEW, no_repeat_ngram_size=2, use_cache=False)
    assert blocked == [generate(model, [p], N_NEW, no_repeat_ngram_size=2)[0] for p in PROMPTS]


def test_greedy_matches_transformers(lively):
    hf, model = lively
    ours = generate(model, PROMPTS, N_NEW)
    for prompt, got in zip(PROMPTS, ours):
        assert got == hf_new_tokens(hf, prompt, N_NEW)
    # transformers with a left-padded batch and its attention mask agrees too.
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[EOT_ID] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, pad_token_id=EOT_ID)
    for row, got in zip(out[:, width:].tolist(), ours):
        assert got == (row[: row.index(EOT_ID)] if EOT_ID in row else row)


def test_greedy_no_repeat_ngram_matches_transformers(lively):
    hf, model = lively
    for prompt in PROMPTS:
        assert generate(model, [prompt], N_NEW, no_repeat_ngram_size=3)[0] == hf_new_tokens(
            hf, prompt, N_NEW, no_repeat_ngram_size=3)


def test_stops_at_eot(lively):
    _, model = lively
    stopped = generate(model, PROMPTS, N_NEW)
    running = generate(model, PROMPTS, N_NEW, eos_id=None)
    for short, full in zip(stopped, running):
        assert EOT_ID not in short
        if len(short) < N_NEW:  # it stopped because the next greedy token was EOT
            assert full[: len(short) + 1] == short + [EOT_ID]
        else:
            assert full == short


# ---------------------------------------------------------------------------------------------- beam search

BEAM_SETTINGS = [
    dict(num_beams=4, length_penalty=0.8, no_repeat_ngram_size=4),
    dict(num_beams=4, length_penalty=2.0),
    dict(num_beams=3, length_penalty=1.0, early_stopping=True),
    dict(num_beams=4, length_penalty=0.8, early_stopping="never"),
    dict(num_beams=5, length_penalty=0.5, no_repeat_ngram_size=2, early_stopping=True),
    dict(num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4),  # the LoRA paper's E2E decoding
]


@pytest.mark.parametrize("settings", BEAM_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_beam_search_matches_transformers(lively, settings):
    hf, model = lively
    ours = [beam_search(model, [p], N_NEW, **settings)[0] for p in PROMPTS]
    theirs = [hf_new_tokens(hf, p, N_NEW, **settings) for p in PROMPTS]
    assert ours == theirs


def test_beam_search_exercises_eos_and_length(lively):
    """The parity test above is only meaningful if hypotheses end both by EOT and by max_new_tokens."""
    _, model = lively
    lengths = [[len(beam_search(model, [p], N_NEW, num_beams=4, length_penalty=lp)[0]) for p in PROMPTS]
               for lp in (0.8, 2.0)]
    assert lengths[0] == [14, 9, 1, 8, 2, 3]
    # A length penalty of 2 divides a finished score by n_new ** 2, favouring long hypotheses.
    assert lengths[1] == [20, 20, 20, 20, 19, 20]


def test_beam_batched_equals_single_and_uncached(lively):
    _, model = lively
    settings = dict(num_beams=4, length_penalty=0.8, no_repeat_ngram_size=3)
    batched = beam_search(model, PROMPTS, N_NEW, **settings)
    assert batched == [beam_search(model, [p], N_NEW, **settings)[0] for p in PROMPTS]
    assert batched == beam_search(model, PROMPTS, N_NEW, use_cache=False, **settings)
    assert batched == generate(model, PROMPTS, N_NEW, batch_size=2, **settings)


def test_one_beam_equals_greedy(lively):
    _, model = lively
    for lp, ngram in [(1.0, 0), (0.8, 0), (2.0, 3)]:
        assert beam_search(model, PROMPTS, N_NEW, num_beams=1, length_penalty=lp, no_repeat_ngram_size=ngram) == \
            generate(model, PROMPTS, N_NEW, no_repeat_ngram_size=ngram)


# ---------------------------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_and_seeded(lively):
    _, model = lively
    opts = dict(temperature=0.9, top_k=50, top_p=0.95, eos_id=None)
    first = generate(model, PROMPTS, N_NEW, seed=123, **opts)
    assert first == generate(model, PROMPTS, N_NEW, seed=123, **opts)
    # a torch.Generator is one stream of draws for the batch: the same as an int seed for a single prompt
    shared = generate(model, PROMPTS, N_NEW, seed=torch.Generator().manual_seed(123), **opts)
    assert shared == generate(model, PROMPTS, N_NEW, seed=torch.Generator().manual_seed(123), **opts)
    assert generate(model, PROMPTS[:1], N_NEW, seed=torch.Generator().manual_seed(123), **opts) == first[:1]
    assert first != generate(model, PROMPTS, N_NEW, seed=124, **opts)
    assert first != generate(model, PROMPTS, N_NEW, **{**opts, "temperature": 0.0})
    # The cache does not change the draws.
    assert first == generate(model, PROMPTS, N_NEW, seed=123, use_cache=False, **opts)


def test_an_int_seed_gives_each_prompt_the_draws_it_gets_alone(lively):
    """With an int seed each prompt samples from a generator of its own: its text does not depend on the other
    prompts, on batch_size, or on rows that finish before it (here prompt 0 ends at its first token)."""
    _, model = lively
    opts = dict(temperature=1.0, top_k=50, seed=7)
    together = generate(model, PROMPTS, N_NEW, eos_id=None, **opts)
    eos = together[0][0]
    together = generate(model, PROMPTS, N_NEW, eos_id=eos, **opts)
    assert together[0] == [] and any(len(t) > 1 for t in together[1:])
    assert generate(model, PROMPTS, N_NEW, eos_id=eos, batch_size=1, **opts) == together
    assert generate(model, PROMPTS[::-1], N_NEW, eos_id=eos, batch_size=2, **opts) == together[::-1]
    assert [list(stream(model, p, N_NEW, eos_id=eos, **opts)) for p in PROMPTS] == together


def test_top_k_one_and_tiny_top_p_are_greedy(lively):
    _, model = lively
    greedy = generate(model, PROMPTS, N_NEW)
    assert generate(model, PROMPTS, N_NEW, temperature=1.0, top_k=1, seed=0) == greedy
    assert generate(model, PROMPTS, N_NEW, temperature=1.5, top_p=1e-6, seed=0) == greedy


def test_process_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1000, generator=g) * 3
    for k in (1, 7, 50):
        assert torch.equal(process_logits(logits, top_k=k), TopKLogitsWarper(k)(None, logits))
        assert (process_logits(logits, top_k=k).isfinite().sum(dim=1) == k).all()
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(process_logits(logits, top_p=p), TopPLogitsWarper(p)(None, logits))
    # Hand-made: probabilities 0.5, 0.3, 0.15, 0.05; top_p 0.7 keeps the two most likely tokens.
    kept = process_logits(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log(), top_p=0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.allclose(process_logits(logits, temperature=2.0), logits / 2)
    # a temperature whose division would overflow: finite logits, all the probability on the top one
    for tiny in (1e-45, 1e-300):
        probs = process_logits(logits * 1000, temperature=tiny).softmax(dim=-1)
        assert probs.isfinite().all() and torch.equal(probs.argmax(dim=-1), logits.argmax(dim=-1))
        assert torch.allclose(probs.max(dim=-1).values, torch.ones(len(logits)))


# ---------------------------------------------------------------------------------------------- n-grams


def test_banned_ngram_mask_matches_transformers():
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 6, (8, 30), generator=g)  # a small alphabet: many repeated n-grams
    scores = torch.zeros(8, 10)
    for n in (1, 2, 3, 4):
        expected = NoRepeatNGramLogitsProcessor(n)(seqs, scores).isinf()
        assert torch.equal(banned_ngram_mask(seqs, n, 10), expected)
        assert expected.any()
    # n-grams that touch left padding ban nothing: [pad pad 3 4 | 3] with n=2 bans 4 only, not the pad's successor.
    seq = torch.tensor([[3, 9, 3, 4, 3]])
    valid = torch.tensor([[False, False, True, True, True]])
    assert banned_ngram_mask(seq, 2, 10, valid)[0].nonzero().flatten().tolist() == [4]
    assert banned_ngram_mask(seq, 2, 10)[0].nonzero().flatten().tolist() == [4, 9]


def test_no_repeat_ngram_blocks_repeats(repetitive):
    model = repetitive
    prompt = PROMPTS[0]
    plain = generate(model, [prompt], 30, eos_id=None)[0]
    assert len(set(ngrams(prompt + plain, 2))) < len(ngrams(prompt + plain, 2))  # it does repeat without blocking
    runs = {
        "greedy": lambda n: generate(model, PROMPTS, 30, eos_id=None, no_repeat_ngram_size=n),
        "sampling": lambda n: generate(model, PROMPTS, 30, eos_id=None, no_repeat_ngram_size=n,
                                       temperature=1.0, top_k=3, seed=0),
        "beam": lambda n: beam_search(model, PROMPTS, 30, eos_id=None, no_repeat_ngram_size=n, num_beams=3),
    }
    for (name, run), n in itertools.product(runs.items(), (1, 2, 3)):
        for prompt, out in zip(PROMPTS, run(n)):
            assert len(out) == 30, name
            grams = ngrams(prompt + out, n)
            # Every n-gram that ends in a generated token is new (the prompt itself may repeat).
            for i in range(len(prompt) - n + 1, len(grams)):
                assert grams[i] not in grams[:i], (name, n, i)


# ---------------------------------------------------------------------------------------------- streaming


def test_stream_yields_the_generated_tokens(lively):
    _, model = lively
    for prompt in PROMPTS[:3]:
        assert list(stream(model, prompt, N_NEW)) == generate(model, [prompt], N_NEW)[0]
        sampled = generate(model, [prompt], N_NEW, temperature=1.0, seed=7, eos_id=None)[0]
        assert list(stream(model, prompt, N_NEW, temperature=1.0, seed=7, eos_id=None)) == sampled
        assert "".join(stream_text(model, prompt, N_NEW, temperature=1.0, seed=7, eos_id=None)) == \
            tokenizer.decode(sampled)


def test_decode_incremental_never_splits_a_character():
    text = "Tea 🍵 and café, 日本語 ✓ — done"
    ids = tokenizer.encode(text)
    pieces = list(decode_incremental(ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) < len(ids)  # some tokens hold only part of a character and were held back
    # Bytes that never complete a character come out as U+FFFD, as in tokenizer.decode.
    broken = tokenizer.encode("🍵")[:1]
    assert "".join(decode_incremental(broken)) == tokenizer.decode(broken)


# ---------------------------------------------------------------------------------------------- limits and errors


def test_context_limit_error_and_truncation(lively):
    _, model = lively  # n_positions = 128
    long_prompt = (PROMPTS[1] * 20)[:120]
    with pytest.raises(DataError) as err:
        generate(model, [PROMPTS[0], long_prompt], 16)
    assert str(err.value) == (
        "prompt 2 has 120 tokens; with max_new_tokens=16 it exceeds the model's context of 128 tokens: "
        "shorten it to at most 112 tokens or lower max_new_tokens"
    )
    truncated = generate(model, [long_prompt], 16, truncate=True)
    assert truncated == generate(model, [long_prompt[-112:]], 16)
    assert fit_prompt(long_prompt, 16, 128, truncate=True) == long_prompt[-112:]
    with pytest.raises(ConfigError, match="max_new_tokens 128 leaves no room for a prompt"):
        generate(model, [PROMPTS[0]], 128)
    # Right at the limit: prompt + new tokens = context.
    assert len(generate(model, [long_prompt[:108]], 20, eos_id=None)[0]) == 20


def test_bad_inputs_raise_one_line_errors(lively):
    _, model = lively
    cases = [
        (dict(prompts=[[]]), DataError, "prompt 1 is empty (0 tokens); give it some text to continue"),
        (dict(prompts=[[1, 50257]]), DataError, "prompt 1 holds token id 50257, outside the model's vocabulary of 50257"),
        (dict(top_p=0.0), ConfigError, "top_p must be in (0, 1], got 0.0"),
        (dict(top_k=0), ConfigError, "top_k must be a positive integer, got 0"),
        (dict(temperature=-1), ConfigError, "temperature must be >= 0 (0 = greedy), got -1"),
        (dict(num_beams=0), ConfigError, "num_beams must be a positive integer, got 0"),
        (dict(num_beams=2, temperature=0.7), ConfigError,
         "beam search does not sample: set temperature to 0 or num_beams to 1"),
        (dict(num_beams=2, early_stopping="sometimes"), ConfigError,
         "early_stopping must be true, false or never, got 'sometimes'"),
        (dict(no_repeat_ngram_size=-1), ConfigError,
         "no_repeat_ngram_size must be a non-negative integer (0 = off), got -1"),
        (dict(batch_size=0), ConfigError, "batch_size must be a positive integer, got 0"),
    ]
    for kwargs, error, message in cases:
        prompts = kwargs.pop("prompts", [PROMPTS[0]])
        with pytest.raises(error) as err:
            generate(model, prompts, 4, **kwargs)
        assert str(err.value) == message
    with pytest.raises(DataError, match="prompt 1 is empty"):
        stream(model, [], 4)  # checked when called, not at the first token


def test_batches_progress_and_edge_sizes(lively):
    _, model = lively
    seen = []
    out = generate(model, PROMPTS, N_NEW, batch_size=2, progress=seen.append)
    assert out == generate(model, PROMPTS, N_NEW)
    assert seen == [2, 2, 2]
    assert generate(model, PROMPTS, 0) == [[] for _ in PROMPTS]
    assert beam_search(model, PROMPTS, 0) == [[] for _ in PROMPTS]
    assert generate(model, [], 5) == []
    model.train()  # generation switches dropout off and restores the mode
    assert generate(model, PROMPTS[:1], 5)[0] == out[0][:5]
    assert model.training
    model.eval()


@pytest.mark.parametrize("num_beams,length_penalty", [(2, 3.0), (3, 2.0)])
def test_beam_search_with_two_likely_eos_ids_equals_transformers(tmp_path, num_beams, length_penalty):
    """Two EOS ids that both rank high (Llama 3 and Qwen stop on two): each step must keep
    max(2, 1 + n_eos) * num_beams continuations, as transformers does, or every running beam can end at once."""
    from lora_cli.generate import beam_search

    eot, other = 50256, 50255
    hf = make_hf_gpt2(tmp_path, seed=0)
    g = torch.Generator().manual_seed(100)
    with torch.no_grad():  # both ids point where the final norm pushes every hidden state: likely ends
        hf.transformer.ln_f.weight.copy_(torch.randn(64, generator=g) * 3)
        hf.transformer.ln_f.weight[0], hf.transformer.ln_f.bias[0] = 1.0, 4.0
        for e in (eot, other):
            hf.transformer.wte.weight[e].zero_()
            hf.transformer.wte.weight[e, 0] = 1.0
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path)).model.eval()
    for prompt in ([40], [464, 2068, 7586]):
        kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping="never")
        ours = beam_search(model, [prompt], 10, eos_id=(eot, other), **kw)[0]
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=10, do_sample=False, pad_token_id=eot, eos_token_id=[eot, other],
                              **kw)[0, len(prompt):].tolist()
        assert ours == out[:next((i for i, t in enumerate(out) if t in (eot, other)), len(out))], prompt
