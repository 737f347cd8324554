import pytest
import torch

from lora_cli import tokenizer
from lora_cli.pretrained import load_model
from lora_cli.models import GPT2, GPT2Config, KVCache

from helpers import make_hf_gpt2, tiny_lora_model

TEXTS = ["Every effort moves you", "Hello, world! This is a longer sentence with more tokens in it.", "Hi"]


def padded(texts, side="right"):
    ids = [tokenizer.encode(t) for t in texts]
    width = max(map(len, ids))
    batch = torch.full((len(ids), width), 50256)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        if side == "right":
            batch[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        else:
            batch[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids, batch, mask


@pytest.mark.parametrize("shape", [dict(n_layer=2, n_head=2, n_embd=64), dict(n_layer=3, n_head=4, n_embd=128),
                                   dict(n_layer=4, n_head=2, n_embd=96),
                                   dict(n_layer=2, n_head=2, n_embd=64, n_inner=96, tie_word_embeddings=False)])
def test_logits_match_transformers(tmp_path, shape):
    hf = make_hf_gpt2(tmp_path, seed=1, **shape)
    ours = load_model(str(tmp_path)).model.eval()
    ids, batch, mask = padded(TEXTS)
    with torch.no_grad():
        ref = hf(input_ids=batch, attention_mask=mask).logits
        got = ours.logits(ours(batch, mask))
    for i, row in enumerate(ids):
        n = len(row)
        assert (got[i, :n] - ref[i, :n]).abs().max().item() <= 1e-4
    # unpadded single rows too
    with torch.no_grad():
        one = torch.tensor([ids[1]])
        diff = (ours.logits(ours(one)) - hf(input_ids=one).logits).abs().max().item()
    assert diff <= 1e-4


def test_untied_head_and_n_inner_load_count_and_save_as_transformers_does(tmp_path):
    """A GPT-2 with its own lm_head and an MLP width other than 4 * n_embd: from its directory and from a bare
    weights file (with the config.json beside it), counted as transformers counts it, saved back whole."""
    import safetensors.torch
    from transformers import GPT2LMHeadModel
    from lora_cli.pretrained import save_pretrained

    # a bare file does not say its head count (nor does it the n_inner and untied head of the shapes): the config.json
    # beside it does
    hf = make_hf_gpt2(tmp_path / "hf", seed=3, n_head=1, n_inner=96, tie_word_embeddings=False)
    safetensors.torch.save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    (tmp_path / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    ids = torch.tensor([tokenizer.encode(TEXTS[1])])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        for source in (tmp_path / "hf", tmp_path / "bare.safetensors"):
            ours = load_model(str(source)).model.eval()
            assert not ours.tied and (ours.config.n_inner, ours.num_parameters()) == (96, hf.num_parameters())
            assert (ours.logits(ours(ids)) - ref).abs().max().item() <= 1e-4
        save_pretrained(ours, tmp_path / "ours")
        back = GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
        assert (back(input_ids=ids).logits - ref).abs().max().item() <= 1e-4


def test_left_and_right_padding_equal_unpadded(tiny_hf_dir):
    model = load_model(str(tiny_hf_dir)).model.eval()
    ids, right, rmask = padded(TEXTS, "right")
    _, left, lmask = padded(TEXTS, "left")
    with torch.no_grad():
        hr = model(right, rmask)
        hl = model(left, lmask)
        for i, row in enumerate(ids):
            alone = model(torch.tensor([row]))[0]
            n = len(row)
            assert torch.allclose(hr[i, :n], alone, atol=1e-5)
            assert torch.allclose(hl[i, -n:], alone, atol=1e-5)
            assert torch.isfinite(hl[i]).all()


def test_kv_cache_matches_full_forward(tiny_hf_dir):
    model = load_model(str(tiny_hf_dir)).model.eval()
    ids = torch.tensor([tokenizer.encode("Every effort moves you to the")])
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config.n_layer)
        first = model(ids[:, :3], cache=cache)
        steps = [model(ids[:, i : i + 1], cache=cache) for i in range(3, ids.shape[1])]
    stepped = torch.cat([first, *steps], dim=1)
    assert (stepped - full).abs().max().item() <= 1e-5


def test_parameter_count_gpt2_config():
    with torch.device("meta"):
        model = GPT2(GPT2Config())
    assert model.num_parameters() == 124_439_808
    assert len(model.linear_names()) == 4 * 12 + 1


@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 3, 48), (128, 48), (129, 48), (0, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_decoding_kernel_equals_f_linear(shape, bias):
    """models.common.Linear: without gradients, fp32, at most ONEDNN_MAX_ROWS rows, oneDNN's inner product runs
    (the same values up to summation order); with gradients it is F.linear exactly, gradients included."""
    from torch.profiler import ProfilerActivity, profile

    from lora_cli.models.common import ONEDNN_MAX_ROWS, Linear

    torch.manual_seed(0)
    layer = Linear(48, 40, bias=bias)
    x = torch.randn(shape)
    reference = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fast = layer(x)
    ran_onednn = any(e.name == "mkldnn::_linear_pointwise" for e in prof.events())
    rows = x.numel() // 48
    assert ran_onednn == (0 < rows <= ONEDNN_MAX_ROWS)  # torch's CPU builds ship oneDNN
    assert fast.shape == reference.shape
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    out = layer(x)
    assert torch.equal(out, torch.nn.functional.linear(x, layer.weight, layer.bias))
    out.sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 3, 48), (300, 48), (0, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_f_linear(shape, bias):
    """pack_linears_: the weight becomes oneDNN's packed copy (the same values, as to_dense shows), layers sharing a
    weight share the copy, other modules and weights of dtypes outside PACKED_DTYPES (fp16; bf16 on a CPU without
    bf16 instructions) are passed over; a packed layer computes F.linear's values without gradients (any number of
    rows), and exactly F.linear's with gradients or under autocast."""
    from lora_cli.models.common import PACKED_DTYPES, Linear, pack_linears_

    torch.manual_seed(0)
    layer, twin, half = Linear(48, 40, bias=bias), Linear(48, 40, bias=bias), Linear(48, 40).to(torch.float16)
    twin.weight = layer.weight
    plain = layer.weight.detach().clone()
    assert pack_linears_([layer, twin, half, torch.nn.ReLU(), torch.nn.Linear(48, 40)]) == 1
    assert layer.weight.is_mkldnn and twin.weight is layer.weight and not half.weight.is_mkldnn
    assert torch.float16 not in PACKED_DTYPES
    assert not layer.weight.requires_grad and torch.equal(layer.weight.to_dense(), plain)
    x = torch.randn(shape)
    reference = torch.nn.functional.linear(x, plain, layer.bias)
    with torch.inference_mode():
        fast = layer(x)
    assert fast.shape == reference.shape
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    out = layer(x)
    assert torch.equal(out, torch.nn.functional.linear(x, plain, layer.bias))
    out.sum().backward()
    torch.testing.assert_close(x.grad, plain.sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), torch.nn.functional.linear(x, plain, layer.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_copies_keep_a_shared_weight_plain_beside_one_packed_copy(dtype):
    """pack_copies_ (tied heads, whose weight the input embedding reads; `lora serve`'s adapters each have their own
    head over it): the weight stays the embedding's plain tensor, one packed copy (where PACKED_DTYPES has the dtype)
    holds the same values for every head sharing it and serves forwards without gradients, and the state dict is
    unchanged. pack_linears_ packs a bf16 weight exactly where PACKED_DTYPES says oneDNN runs bf16 natively."""
    from torch.profiler import ProfilerActivity, profile

    from lora_cli.models.common import PACKED_DTYPES, Linear, pack_copies_, pack_linears_

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(40, 48).to(dtype)
    head, twin = Linear(48, 40, bias=False).to(dtype), Linear(48, 40, bias=False).to(dtype)
    head.weight = twin.weight = embedding.weight
    made = pack_copies_([head, twin, torch.nn.ReLU()])
    assert made == (dtype in PACKED_DTYPES) and pack_copies_([head, twin]) == 0  # one copy, made once
    assert head.weight is embedding.weight and not head.weight.is_mkldnn and list(head.state_dict()) == ["weight"]
    assert twin.packed is head.packed
    if made:
        assert head.packed.is_mkldnn and torch.equal(head.packed.to_dense(), embedding.weight.detach())
    x = torch.randn(5, 48).to(dtype)
    exact = torch.nn.functional.linear(x.double(), embedding.weight.detach().double())
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fast = head(x)
    assert any(e.name == "mkldnn::_linear_pointwise" for e in prof.events()) == (made or dtype == torch.float32)
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7  # bf16: the output's own rounding, 8 bits
    torch.testing.assert_close(fast.double(), exact, rtol=tolerance, atol=tolerance)
    x.requires_grad_(True)
    assert torch.equal(head(x), torch.nn.functional.linear(x, embedding.weight))  # gradients: the plain weight
    other = Linear(48, 40).to(dtype)
    assert pack_linears_([other]) == (dtype in PACKED_DTYPES) and other.weight.is_mkldnn == (dtype in PACKED_DTYPES)


def test_pack_for_decoding_leaves_dora_bases_plain():
    """DoRA's forward reads its base weight: pack_for_decoding packs the other block linears (and the tied head's
    copy) only, and the model's outputs stay those of the plain model."""
    from lora_cli.inference import pack_for_decoding
    from lora_cli.lora import LoRALinear

    model = tiny_lora_model(use_dora=True).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.logits(model(ids))
    dora = [m.base_layer for m in model.modules() if isinstance(m, LoRALinear)]
    # attn.c_proj, mlp.c_fc and mlp.c_proj, and the head's packed copy
    assert dora and pack_for_decoding(model) == 3 * len(model.blocks) + 1
    assert not any(m.weight.is_mkldnn for m in dora)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(ids)), before, rtol=1e-5, atol=1e-5)


def test_static_cache_reorder_equals_indexing():
    """KVCache.reorder on a static cache (spare buffer, first `size` columns) keeps exactly kv[index] in the written
    columns, whether the batch grows (beams fan out), is reordered or shrinks, and later writes land after them."""
    torch.manual_seed(0)
    cache, plain = KVCache(3, capacity=8), KVCache(3)  # 3 tokens, then one per reorder
    for layer in range(3):
        k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
        cache.update(layer, k, v)
        plain.update(layer, k, v)
    for index in ([0, 0, 1, 1, 1], [4, 3, 2, 1, 0], [1, 1, 3, 0, 2], [2, 0], [1]):
        index = torch.tensor(index)
        cache.reorder(index)
        plain.reorder(index)
        for layer in range(3):
            k, v = torch.randn(len(index), 2, 1, 4), torch.randn(len(index), 2, 1, 4)
            got = cache.update(layer, k, v)
            want = plain.update(layer, k, v)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    storages = {t.untyped_storage().data_ptr() for kv in cache.layers for t in kv}
    assert len(storages) == 6 and cache.spare[0].untyped_storage().data_ptr() not in storages


def test_linear_under_autocast_computes_in_the_autocast_dtype():
    """Under CPU autocast (bf16 evaluation, validation of a bf16 run) Linear stays F.linear, which autocast casts:
    the fp32 decoding kernel must not run there."""
    from lora_cli.models.common import Linear

    torch.manual_seed(0)
    layer = Linear(48, 40)
    x = torch.randn(3, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        reference = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert out.dtype == torch.bfloat16 and torch.equal(out, reference)
