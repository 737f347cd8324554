"""The speed paths of model.py change no result: the unpadded forward (and its last block for the scored tokens
only) equals the padded one (fp32, <= 1e-5 relative, values and gradients), frozen weights stored in the autocast dtype give the same products as autocast's
own casts, the short-sequence bf16 attention path (no gradients) matches the fused kernel to bf16 rounding, training keeps
the fused kernel, and the lm_head is tied without a weight of its own."""

from contextlib import nullcontext

import pytest
import torch

from lora_cli.models import common as model_mod
from lora_cli.config import LoraConfig
from lora_cli.lora import apply_lora
from lora_cli.loss import Savings, lm_loss_sum
from lora_cli.models import GPT2, GPT2Config, cast_frozen_linears_

from helpers import rel, tiny_batch, tiny_lora_model


def loss_and_grads(model, b):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = lm_loss_sum(model, b)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lm_head_is_tied_and_weightless_of_its_own():
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=64))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not model.lm_head.weight.is_meta
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("use_dora", [False, True])
def test_frozen_weights_in_bf16_give_the_autocast_results_bit_for_bit(use_dora):
    b = tiny_batch()
    ref_model, fast_model = tiny_lora_model(use_dora), tiny_lora_model(use_dora)
    ref_loss, ref_grads = loss_and_grads(ref_model, b)
    cast = cast_frozen_linears_(fast_model, torch.bfloat16)
    expected = 2 * (12 * 64 * 64 + 9 * 64)  # per layer: c_attn, attn.c_proj, c_fc, mlp.c_proj weights and biases
    if use_dora:
        expected -= 2 * (3 * 64 * 64 + 3 * 64)  # a DoRA layer's base keeps fp32 (its weight norm is fp32)
    assert cast == expected
    dtypes = {n: p.dtype for n, p in fast_model.named_parameters()}
    assert dtypes["transformer.h.0.mlp.c_fc.weight"] == torch.bfloat16
    assert dtypes["transformer.wte.weight"] == dtypes["transformer.h.0.ln_1.weight"] == torch.float32
    assert all(p.dtype == torch.float32 for p in fast_model.parameters() if p.requires_grad)
    loss, grads = loss_and_grads(fast_model, b)
    assert torch.equal(loss, ref_loss)
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def bf16_eval_loss(model, b):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return lm_loss_sum(model, b).item()


def test_short_bf16_attention_path_matches_the_fused_kernel():
    """Forward passes without gradients take SDPA's math backend for short bf16 sequences: the same loss as the
    fused flash kernel to bf16 rounding."""
    b = tiny_batch()
    model = tiny_lora_model()
    fast = bf16_eval_loss(model, b)
    limit = model_mod.MATH_BF16_ATTENTION_MAX
    try:
        model_mod.MATH_BF16_ATTENTION_MAX = 0  # the fused flash kernel only
        ref = bf16_eval_loss(model, b)
    finally:
        model_mod.MATH_BF16_ATTENTION_MAX = limit
    assert fast == pytest.approx(ref, rel=2e-3)
    assert fast != ref  # the two kernels round differently: the math path did run


def test_bf16_training_keeps_the_flash_kernel():
    """With gradients, attention stays on the flash kernel, which keeps no [T, T] probability matrix (the math
    backend keeps fp32 probabilities and fp32 copies of q, k, v for its backward)."""
    b = tiny_batch()
    model = tiny_lora_model()
    T = b.input_ids.shape[1]
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lm_loss_sum(model, b)
    assert kept and not any(len(shape) == 4 and shape[-2:] == (T, T) for shape in kept)


def test_fp32_runs_never_take_the_bf16_attention_path():
    b = tiny_batch()
    model = tiny_lora_model()
    with torch.no_grad():
        hidden = model(b.input_ids)
    limit = model_mod.MATH_BF16_ATTENTION_MAX
    try:
        model_mod.MATH_BF16_ATTENTION_MAX = 0
        with torch.no_grad():
            again = model(b.input_ids)
    finally:
        model_mod.MATH_BF16_ATTENTION_MAX = limit
    assert torch.equal(hidden, again)


def test_cast_model_refuses_nothing_in_eval_under_autocast():
    from lora_cli.evaluation import evaluate_lm

    b = tiny_batch()
    ref, fast = tiny_lora_model(), tiny_lora_model()
    cast_frozen_linears_(fast, torch.bfloat16)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    assert evaluate_lm(fast, [b], autocast) == evaluate_lm(ref, [b], autocast)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_unpadded_forward_equals_the_padded_one(checkpointing):
    b = tiny_batch()
    model = tiny_lora_model()
    model.gradient_checkpointing = checkpointing
    keep = b.attention_mask.bool()
    assert not keep.all()  # the batch has padding
    with torch.no_grad():
        padded = model(b.input_ids)[keep]  # [N, C]
        unpadded = model(b.input_ids, keep=keep)
    assert unpadded.shape == padded.shape == (int(keep.sum()), 64)
    assert rel(padded, unpadded) <= 1e-5
    scored = b.targets != -100
    with torch.no_grad():  # the last block for the scored positions only
        pruned = model(b.input_ids, keep=keep, outputs=scored)
    assert pruned.shape == (int(scored.sum()), 64) and int(scored.sum()) < int(keep.sum()) / 2
    assert rel(model(b.input_ids)[scored].detach(), pruned) <= 1e-5
    grads = {}
    for unpad, prune in ((False, False), (True, False), (True, True)):
        model.zero_grad(set_to_none=True)
        value = lm_loss_sum(model, b, savings=Savings(unpad=unpad, prune_last_block=prune))
        value.backward()
        grads[unpad, prune] = (value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    ref, ref_grads = grads[False, False]
    for key in ((True, False), (True, True)):
        out, out_grads = grads[key]
        assert rel(ref, out) <= 1e-5, key
        for name in ref_grads:
            assert rel(ref_grads[name], out_grads[name]) <= 1e-5, (key, name)


def test_checkpointing_with_a_shared_prefix_installs_no_hooks_of_its_own(monkeypatch):
    """A batch whose rows share a prompt prefix: under gradient checkpointing the grid leaves attention's saved
    tensors to the checkpoint (its saved-tensor hooks would win over the checkpoint's, the outer ones, and keep them
    past the backward); without checkpointing it keeps them as rows. Loss and gradients are the same either way."""
    from lora_cli.data import Example, collate

    g = torch.Generator().manual_seed(7)
    prefix = torch.randint(0, 50257, (8,), generator=g).tolist()
    batch = collate([Example(prefix + torch.randint(0, 50257, (n,), generator=g).tolist(), [False] * 8 + [True] * n)
                     for n in (9, 4, 6)])
    hooked = []
    plain_save_as_rows = model_mod.Unpadded.save_as_rows

    def spy(self, x, padded):
        context = plain_save_as_rows(self, x, padded)
        hooked.append(self.shared > 0 and not isinstance(context, type(nullcontext())))
        return context

    monkeypatch.setattr(model_mod.Unpadded, "save_as_rows", spy)
    model = tiny_lora_model()
    results = {}
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        hooked.clear()
        value = lm_loss_sum(model, batch, savings=Savings())
        value.backward()
        assert hooked and all(h == (not checkpointing) for h in hooked), checkpointing
        results[checkpointing] = value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                  if p.requires_grad}
    (ref, ref_grads), (out, out_grads) = results[False], results[True]
    assert rel(ref, out) <= 1e-6
    assert all(rel(ref_grads[n], out_grads[n]) <= 1e-5 for n in ref_grads)


def test_unpadded_forward_refuses_a_cache_or_a_mask():
    b = tiny_batch()
    model = tiny_lora_model()
    keep = b.attention_mask.bool()
    with pytest.raises(ValueError, match="right-padded"):
        model(b.input_ids, b.attention_mask, keep=keep)
    with pytest.raises(ValueError, match="right-padded"):
        model(b.input_ids, cache=model_mod.KVCache(2), keep=keep)


def test_cast_keeps_a_task_head_in_fp32():
    from lora_cli.models import add_classification_head

    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=64))
    add_classification_head(model, 3)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=["attn.c_attn", "score"]))
    cast_frozen_linears_(model, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["score.base_layer.weight"] == torch.float32
    assert dtypes["transformer.h.0.attn.c_attn.base_layer.weight"] == torch.bfloat16
