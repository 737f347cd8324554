"""Batched, KV-cached (static cache), uncached and beam decoding against the sequential, uncached reference, token
for token (greedy), on a tiny checkpoint of every model family, in fp32 and bf16 (bf16: against a bf16 reference);
and `--precision` on the inference commands (weights stored in that dtype, fp16 refused off CUDA in one line)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_one_line_error, cli, make_family_checkpoint, make_hf_gpt2
from lora_cli.errors import ConfigError
from lora_cli.generate import ContinuousBatch, Row, beam_search, generate, stream
from lora_cli.config import LoraConfig
from lora_cli.inference import FP32_ONE_ROW_PACKING_TOKENS, pack_for_decoding, packing_pays, place, weights_dtype
from lora_cli.lora import apply_lora
from lora_cli.models import PACKED_DTYPES, KVCache
from lora_cli.models.common import attend_shared_prefix
from lora_cli.pretrained import load_model
from lora_cli.prompts import escape_line
from lora_cli.runtime import inference_dtype

transformers = pytest.importorskip("transformers")

V = 64  # a small vocabulary: fewer near-ties among the top logits (see `reference`)
SIZES = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "gpt_neox"]
PROMPTS = [[5, 17, 42, 19, 3, 50, 8], [7, 7, 12], [20, 1, 2, 3, 4, 5, 6, 9, 11, 60], [31, 63]]
NEW = 12


def hf_config(family: str):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    if family == "llama":  # grouped-query attention, tied embeddings
        return transformers.LlamaConfig(**SIZES, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "qwen2":  # q/k/v biases
        return transformers.Qwen2Config(**SIZES, num_key_value_heads=4, tie_word_embeddings=True)
    if family == "qwen3":  # q/k RMSNorm
        return transformers.Qwen3Config(**SIZES, num_key_value_heads=2, head_dim=32)
    return transformers.GPTNeoXConfig(**SIZES, rotary_pct=0.5)  # partial rotary, parallel residual


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    """A random checkpoint whose weights are scaled up, so that greedy outputs vary (a fresh init's logits are
    nearly flat and its outputs repeat one token)."""
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(request.param)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(path)
    return path


@torch.inference_mode()
def reference(model, prompt: list[int], n: int, eos: int | None) -> tuple[list[int], int]:
    """Greedy decoding one prompt at a time, recomputing the whole sequence at every step: no cache, no padding.
    Returns the tokens and how many of them were clear choices: the steps before the first near-tie (top two
    logits within 4 units in the last place of the top logit's dtype), where any other rounding of the same
    computation (another batch shape, the cache's kernels) may pick the other token. fp32 ties do not occur here;
    bf16 logits have 8 significant bits, and the paths' roundings move them by up to 2-3 ulps."""
    ids, out, clear = list(prompt), [], None
    for step in range(n):
        logits = model.logits(model(torch.tensor([ids], device=model.embed_tokens.weight.device))[0, -1])
        top = logits.float().topk(2).values
        ulp = torch.finfo(logits.dtype).eps * 2.0 ** math.floor(math.log2(top[0].abs().item()))
        if clear is None and top[0] - top[1] < 4 * ulp:
            clear = step
        token = int(logits.float().argmax())
        if token == eos:
            break
        out.append(token)
        ids.append(token)
    return out, len(out) if clear is None else clear


def agree(got: list[list[int]], want: list[tuple[list[int], int]]) -> bool:
    """Token for token equal over each reference row's clear steps, and equal in full for a row without ties."""
    return all(g[:c] == w[:c] and (c < len(w) or g == w) for g, (w, c) in zip(got, want))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_batched_cached_and_uncached_decoding_equal_the_sequential_reference(checkpoint, precision):
    dtype = inference_dtype(precision, torch.device("cpu"))
    model = place(load_model(str(checkpoint)).model, torch.device("cpu"), dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    free = [reference(model, p, NEW, None)[0] for p in PROMPTS]
    assert len({tuple(f) for f in free}) == len(PROMPTS)  # outputs that vary
    # An eos that a row produces early: it leaves the batch, the others go on.
    eos = free[0][2]
    want = [reference(model, p, NEW, eos) for p in PROMPTS]
    tokens = [w for w, _ in want]
    assert min(len(t) for t in tokens) < NEW and len({len(t) for t in tokens}) > 1  # rows end at different steps
    if precision == "fp32":
        assert all(c == len(w) for w, c in want)  # no near-ties: every token is compared
    else:
        assert sum(c for _, c in want) >= len(PROMPTS)  # clear steps to compare
    assert agree(generate(model, PROMPTS, NEW, eos_id=eos), want)  # one left-padded batch, static KV cache
    # fixed-shape steps (what a CUDA graph records): every row to the end, over the cache's whole capacity
    assert agree(generate(model, PROMPTS, NEW, eos_id=eos, static=True), want)
    assert agree([list(stream(model, p, NEW, eos_id=eos, static=True)) for p in PROMPTS], want)
    for call in (lambda: stream(model, PROMPTS[0], NEW, static=True, use_cache=False),  # refused at the call
                 lambda: generate(model, PROMPTS, 0, static=True, use_cache=False),
                 lambda: generate(model, PROMPTS, NEW, static=True, num_beams=2)):
        with pytest.raises(ConfigError, match="static"):
            call()
    assert agree(generate(model, PROMPTS, NEW, eos_id=eos, use_cache=False), want)
    assert agree(generate(model, PROMPTS, NEW, eos_id=eos, batch_size=3), want)  # batches of similar lengths
    assert agree(beam_search(model, PROMPTS, NEW, num_beams=1, eos_id=eos), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_graph_decoding_equals_the_sequential_reference(checkpoint, precision):
    """On CUDA, decoding replays a CUDA graph of the fixed-shape step by default: the same tokens as the eager
    step and the sequential, uncached reference on the same device and dtype."""
    cuda = torch.device("cuda")
    model = place(load_model(str(checkpoint)).model, cuda, inference_dtype(precision, cuda))
    eos = reference(model, PROMPTS[0], NEW, None)[0][2]
    want = [reference(model, p, NEW, eos) for p in PROMPTS]
    assert sum(c for _, c in want) >= len(PROMPTS)
    assert agree(generate(model, PROMPTS, NEW, eos_id=eos), want)  # graph
    assert agree(generate(model, PROMPTS, NEW, eos_id=eos, static=False), want)  # eager, rows leave the batch
    assert agree([list(stream(model, p, NEW, eos_id=eos)) for p in PROMPTS], want)  # batch 1, graph
    assert agree(beam_search(model, PROMPTS, NEW, num_beams=1, eos_id=eos), want)


def test_batched_beam_search_equals_one_prompt_at_a_time_uncached(checkpoint):
    model = load_model(str(checkpoint)).model.eval()
    eos = reference(model, PROMPTS[0], NEW, None)[0][2]
    want = [beam_search(model, [p], NEW, num_beams=3, eos_id=eos, use_cache=False)[0] for p in PROMPTS]
    assert beam_search(model, PROMPTS, NEW, num_beams=3, eos_id=eos) == want
    assert beam_search(model, PROMPTS, NEW, num_beams=3, eos_id=eos, batch_size=2) == want


def test_bf16_decoding_on_the_cpu_attends_over_an_fp32_cache(checkpoint):
    """A bf16 model with a KV cache on the CPU keeps keys and values in fp32 (SDPA's fp32 kernel is the fast one for
    one query); its outputs stay bf16 and match the uncached forward up to bf16 rounding. With gradients the cache
    stays bf16."""
    model = place(load_model(str(checkpoint)).model, torch.device("cpu"), torch.bfloat16)
    ids = torch.tensor([PROMPTS[0]])
    cache = KVCache(len(model.blocks))
    with torch.inference_mode():
        prefilled = model(ids[:, :-1], cache=cache)
        last = model(ids[:, -1:], cache=cache)
        whole = model(ids)
    assert {t.dtype for kv in cache.layers for t in kv} == {torch.float32} and cache.length == ids.shape[1]
    assert prefilled.dtype == last.dtype == whole.dtype == torch.bfloat16
    taped = KVCache(len(model.blocks))
    with torch.enable_grad():
        model(ids, cache=taped)
    assert {t.dtype for kv in taped.layers for t in kv} == {torch.bfloat16}
    cached = torch.cat([prefilled, last], dim=1).float()
    torch.testing.assert_close(cached, whole.float(), rtol=0.05, atol=0.05 * whole.float().abs().max().item())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_weights_decode_the_reference_tokens(checkpoint, precision):
    """pack_for_decoding (what `lora serve`, `lora generate` with several prompts or beams, `lora eval --generate`,
    one fp32 row with a budget of FP32_ONE_ROW_PACKING_TOKENS or more, and in bf16 every decoding command do): every
    block's linear layers and the head take oneDNN's packed weights where it packs their dtype
    (models.common.PACKED_DTYPES: bf16 only on a CPU with bf16 instructions; a tied head: a packed copy beside the
    embedding's weight), and batched, beam and continuous decoding give the tokens of the plain model (bf16: over the
    reference's clear steps)."""
    dtype = inference_dtype(precision, torch.device("cpu"))
    model = place(load_model(str(checkpoint)).model, torch.device("cpu"), dtype)
    eos = reference(model, PROMPTS[0], NEW, None)[0][2]
    want = [reference(model, p, NEW, eos) for p in PROMPTS]
    beams = beam_search(model, PROMPTS, NEW, num_beams=3, eos_id=eos)
    blocks = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    packs = dtype in PACKED_DTYPES
    head = model.lm_head
    short = FP32_ONE_ROW_PACKING_TOKENS - 1
    assert packing_pays(model, 1, 1, short) == (packs and precision == "bf16")
    assert packing_pays(model, 1, 1, short + 1) == packs
    assert packing_pays(model, 2, 1, 1) == packing_pays(model, 1, 3, 1) == packs
    assert pack_for_decoding(model) == (len(blocks) + 1 if packs else 0) and blocks
    assert all(m.weight.is_mkldnn == packs for m in blocks)
    if model.tied:  # the embedding still looks rows up in the plain weight
        assert not head.weight.is_mkldnn and (head.packed is not None) == packs
        assert head.weight is model.embed_tokens.weight
    else:
        assert head.weight.is_mkldnn == packs and head.packed is None
    assert pack_for_decoding(model) == 0  # packed once
    assert agree(generate(model, PROMPTS, NEW, eos_id=eos), want)
    if precision == "fp32":
        assert all(c == len(w) for w, c in want)
        assert beam_search(model, PROMPTS, NEW, num_beams=3, eos_id=eos) == beams
    got = run_continuous(ContinuousBatch(model), [Row(model, p, NEW, eos_id=eos) for p in PROMPTS], [0, 1, 3, 4])
    assert agree(got, want)
    assert agree([list(stream(model, p, NEW, eos_id=eos)) for p in PROMPTS], want)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_packing_a_model_with_lora_on_its_untied_head(tmp_path, precision, use_dora):
    """A head with LoRA on it (an untied head: Qwen3's) has no weight of its own: packing_pays and pack_for_decoding
    read the model's dtype from its blocks and pack the head's base layer (not a DoRA base, whose forward reads its
    weight); the tokens stay those of the unpacked model."""
    make_family_checkpoint(tmp_path / "base", "qwen3", vocab_size=V)
    base = load_model(str(tmp_path / "base"))
    apply_lora(base.model, LoraConfig(r=4, alpha=8, targets=["q_proj", "lm_head"], use_dora=use_dora))
    model = place(base.model, torch.device("cpu"), inference_dtype(precision, torch.device("cpu")))
    assert not model.tied and not hasattr(model.lm_head, "weight")
    eos = reference(model, PROMPTS[0], NEW, None)[0][2]
    want = [reference(model, p, NEW, eos) for p in PROMPTS]
    packs = weights_dtype(model) in PACKED_DTYPES
    assert packing_pays(model, 1, 1, FP32_ONE_ROW_PACKING_TOKENS) == packs
    packed = pack_for_decoding(model)
    head_packed = packs and not use_dora
    assert model.lm_head.base_layer.weight.is_mkldnn == head_packed and (packed > 0) == packs
    assert agree(generate(model, PROMPTS, NEW, eos_id=eos), want)


def run_continuous(batch: ContinuousBatch, rows: list[Row], joins: list[int]) -> list[list[int]]:
    """Decode `rows`, row i joining the running batch before step joins[i]; each row's tokens."""
    out = {id(r): [] for r in rows}
    step = 0
    while step <= max(joins) or batch:
        for r, j in zip(rows, joins):
            if j == step:
                batch.add(r)
        for r, t in batch.step():
            if t is not None:
                out[id(r)].append(t)
        step += 1
    return [out[id(r)] for r in rows]


def test_rows_joining_a_running_batch_get_the_tokens_they_get_alone(checkpoint):
    """Continuous batching: prompts of different lengths join at different steps (one before the batch's first
    step, one into a batch of longer rows, one longer than the running rows, one after others have left), rows
    end at an eos or their own max_new_tokens; each gets the sequential reference's greedy tokens."""
    model = load_model(str(checkpoint)).model.eval()
    eos = reference(model, PROMPTS[0], NEW, None)[0][2]
    news = [NEW, 9, NEW, 6]
    want = [reference(model, p, n, eos) for p, n in zip(PROMPTS, news)]
    batch = ContinuousBatch(model)
    got = run_continuous(batch, [Row(model, p, n, eos_id=eos) for p, n in zip(PROMPTS, news)], [0, 1, 3, 9])
    assert agree(got, want) and all(c == len(w) for w, c in want)
    assert batch.max_rows == 3 and batch.batched_steps > 0 and not batch.rows and batch.decoder is None
    # seeded sampling and greedy rows side by side: each row's draws are those of the same seed alone
    options = [dict(temperature=1.0, seed=3), dict(temperature=0.8, top_k=20, seed=4), {},
               dict(temperature=1.2, top_p=0.9, seed=5)]
    alone = [list(stream(model, p, NEW, **o)) for p, o in zip(PROMPTS, options)]
    assert run_continuous(ContinuousBatch(model), [Row(model, p, NEW, **o) for p, o in zip(PROMPTS, options)],
                          [0, 2, 2, 5]) == alone


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2-full-vocab")
    make_hf_gpt2(path)
    return path


def test_precision_flag_stores_the_weights_in_that_dtype_and_refuses_fp16_off_cuda(tmp_path, gpt2_dir):
    from lora_cli.evaluation import generate_texts

    model = place(load_model(str(gpt2_dir)).model, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    want = generate_texts(model, ["The river"], 6)[0]
    code, out, err = cli("generate", "--model", str(gpt2_dir), "--precision", "bf16", "--max-new-tokens", "6",
                         "--file", "-", stdin="The river\n")
    assert code == 0, err
    assert out == escape_line(want) + "\n"

    text = tmp_path / "held.txt"
    text.write_text("the quick river runs over seven stones\n" * 4)
    losses = {}
    for precision in ("fp32", "bf16"):
        code, out, err = cli("eval", "--model", str(gpt2_dir), "--data", str(text), "--json", "--precision", precision)
        assert code == 0, err
        losses[precision] = json.loads(out)["loss"]
    assert losses["bf16"] != losses["fp32"] and abs(losses["bf16"] / losses["fp32"] - 1) < 2e-2

    for command in (["generate", "--model", str(gpt2_dir), "hi"], ["eval", "--model", str(gpt2_dir), "--data", str(text)]):
        code, out, err = cli(*command, "--precision", "fp16", "--device", "cpu")
        assert_one_line_error(code, out, err, expected_code=2)
        assert "--precision fp16 needs a CUDA device (this is cpu); use bf16 or fp32 here" in err
        code, out, err = cli(*command, "--precision", "fp8")
        assert_one_line_error(code, out, err, expected_code=2)
        assert "--precision must be one of fp32, bf16, fp16, got 'fp8'" in err


@pytest.mark.parametrize("T", [1, 2])
def test_beams_sharing_a_prompt_attend_as_over_whole_rows(T):
    """attend_shared_prefix (prompt keys once per prompt, grouped-query heads) equals SDPA over every row's own copy
    of the prompt's keys followed by its later ones, with a padding mask."""
    g = torch.Generator().manual_seed(0)
    G, group, H, Hkv, D, P, S = 3, 4, 6, 2, 8, 5, 3
    N = G * group
    q = torch.randn(N, H, T, D, generator=g)
    k_prefix, v_prefix = (torch.randn(G, Hkv, P, D, generator=g) for _ in range(2))
    k, v = (torch.randn(N, Hkv, S, D, generator=g) for _ in range(2))
    mask = torch.rand(N, 1, T, P + S, generator=g) > 0.3
    mask[..., -1] = True  # every query sees a key
    whole = [torch.cat([pre.repeat_interleave(group, 0), own], dim=2) for pre, own in ((k_prefix, k), (v_prefix, v))]
    for m in (mask, None):
        want = F.scaled_dot_product_attention(q, *whole, attn_mask=m, enable_gqa=True)
        torch.testing.assert_close(attend_shared_prefix(q, k_prefix, v_prefix, k, v, m, group), want,
                                   rtol=1e-5, atol=1e-6)


def test_a_shared_prefix_cache_reorders_as_a_plain_one():
    """Beams reordered within their prompts and a prompt dropped: the prompt columns (kept once per prompt) and
    the later ones (one row per beam) hold what a plain static cache holds; a row moved to another prompt is an
    error."""
    g = torch.Generator().manual_seed(1)
    G, group, Hkv, P, D, capacity = 3, 2, 2, 4, 5, 9
    plain, shared = KVCache(1, capacity=capacity), KVCache(1, capacity=capacity)
    prompt = [torch.randn(G, Hkv, P, D, generator=g) for _ in range(2)]
    for cache in (plain, shared):
        cache.update(0, *prompt)
    plain.reorder(torch.arange(G).repeat_interleave(group))
    shared.share_prefix(group)
    steps = [torch.tensor([1, 0, 2, 2, 5, 4]), torch.tensor([0, 0, 5, 4]), torch.tensor([1, 1, 3, 2])]
    rows = G * group
    for index in steps:  # the second drops prompt 1 (rows 2 and 3)
        new = [torch.randn(rows, Hkv, 1, D, generator=g) for _ in range(2)]
        rows = index.numel()
        for cache in (plain, shared):
            cache.update(0, *new)
            cache.reorder(index)
        got = [torch.cat([pre.repeat_interleave(group, 0), own[:, :, :shared.size - P]], dim=2)
               for pre, own in zip(shared.prefix[0], shared.layers[0])]
        assert shared.size == plain.size and shared.length == plain.length
        assert all(torch.equal(a, b[:, :, :plain.size]) for a, b in zip(got, plain.layers[0]))
    with pytest.raises(ValueError, match="keep each row with its prompt"):
        shared.reorder(torch.tensor([0, 2, 1, 3]))
