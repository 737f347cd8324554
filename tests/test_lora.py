"""LoRA layers and target selection: exact parameter counts, parity with PEFT, merge/unmerge, bad configs."""

import copy
import math

import pytest
import torch
from torch import nn

from lora_cli.pretrained import load_model
from lora_cli.config import LoraConfig
from lora_cli.errors import AdapterError, ConfigError
from lora_cli.lora import (
    LoRALinear,
    LoRASlicedLinear,
    adapter_state_dict,
    apply_lora,
    count_parameters,
    lora_disabled,
    merge_and_unload,
    merge_lora,
    resolve_targets,
    unmerge_lora,
)
from lora_cli.models import GPT2, GPT2_PRESETS, GPT2Config

from helpers import ids_batch

peft = pytest.importorskip("peft")


def meta_gpt2(preset: str) -> GPT2:
    with torch.device("meta"):
        return GPT2(GPT2_PRESETS[preset])


def peft_trainable(preset: str, **lora_kwargs) -> int:
    """PEFT's own trainable count for a transformers GPT-2 of this size (built on the meta device)."""
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    size = GPT2_PRESETS[preset]
    with torch.device("meta"):
        hf = GPT2LMHeadModel(HFConfig(n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd))
    model = peft.get_peft_model(hf, peft.LoraConfig(fan_in_fan_out=True, **lora_kwargs))
    return model.get_nb_trainable_parameters()[0]


def randomise(model: nn.Module, seed: int = 1) -> None:
    """Random non-zero B (and a perturbed DoRA magnitude), so parity is not trivially W x."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def our_key(peft_name: str) -> str:
    """PEFT parameter name -> our adapter tensor name."""
    return (peft_name.removeprefix("base_model.model.").replace(".default", "")
            .replace("lora_magnitude_vector.weight", "lora_magnitude_vector"))


# ------------------------------------------------------------------------------------------- parameter counts


def test_gpt2_c_attn_r8_count_is_294912_like_peft():
    model = meta_gpt2("gpt2")
    base_total = model.num_parameters()
    targets = apply_lora(model, LoraConfig(r=8, targets=["attn.c_attn"]))
    assert targets == [f"transformer.h.{i}.attn.c_attn" for i in range(12)]
    trainable, total = count_parameters(model)
    assert trainable == 294_912
    assert total == base_total + 294_912  # LoRA counted, the tied lm_head once
    assert peft_trainable("gpt2", r=8, target_modules=["c_attn"]) == 294_912


def test_gpt2_medium_q_v_r4_count_is_393216():
    model = meta_gpt2("gpt2-medium")
    targets = apply_lora(model, LoraConfig(r=4, targets=["attn.q", "attn.v"]))
    assert targets[:2] == ["transformer.h.0.attn.q", "transformer.h.0.attn.v"] and len(targets) == 48
    assert count_parameters(model)[0] == 393_216  # the LoRA paper's E2E setting (Hu et al. 2021, table 4)


def test_all_linear_matches_peft_count():
    model = meta_gpt2("gpt2")
    targets = apply_lora(model, LoraConfig(r=8, targets=["all-linear"]))
    assert len(targets) == 48 and "lm_head" not in targets
    expected = peft_trainable("gpt2", r=8, target_modules=["c_attn", "c_proj", "c_fc"])
    assert count_parameters(model)[0] == expected == 1_179_648


@pytest.mark.parametrize("bias,modules_to_save", [("all", None), ("lora_only", None), ("none", ["ln_f"])])
def test_bias_and_modules_to_save_counts_match_peft(bias, modules_to_save):
    model = meta_gpt2("gpt2")
    apply_lora(model, LoraConfig(r=8, targets=["attn.c_attn", "mlp.c_fc"], bias=bias,
                                 modules_to_save=modules_to_save or []))
    expected = peft_trainable("gpt2", r=8, target_modules=["c_attn", "c_fc"], bias=bias, modules_to_save=modules_to_save)
    assert count_parameters(model)[0] == expected
    assert sum(t.numel() for t in adapter_state_dict(model).values()) == expected


# --------------------------------------------------------------------------------------------- PEFT parity

PARITY = [
    # r, our targets, PEFT target_modules, rsLoRA, DoRA
    (1, ["attn.c_attn"], ["c_attn"], False, False),
    (4, ["attn.c_attn"], ["c_attn"], True, False),
    (16, ["attn.c_attn"], ["c_attn"], False, True),
    (1, ["attn.c_attn", "c_proj", "mlp.c_fc"], ["c_attn", "c_proj", "c_fc"], True, True),
    (4, ["all-linear"], ["c_attn", "c_proj", "c_fc"], False, False),
    (16, ["attn.c_attn", "c_proj", "mlp.c_fc"], ["c_attn", "c_proj", "c_fc"], True, False),
    (4, ["mlp.c_proj"], ["mlp.c_proj"], False, True),
    (16, ["mlp.c_proj"], ["mlp.c_proj"], True, True),
    (1, ["mlp.c_proj"], ["mlp.c_proj"], False, False),
]


@pytest.mark.parametrize("r,targets,peft_targets,rslora,dora", PARITY)
def test_logits_and_gradients_match_peft(tiny, r, targets, peft_targets, rslora, dora):
    path, hf = tiny
    ours = load_model(str(path)).model.eval()
    apply_lora(ours, LoraConfig(r=r, alpha=2 * r + 3, dropout=0.0, targets=targets, use_rslora=rslora, use_dora=dora),
               generator=torch.Generator().manual_seed(0))
    randomise(ours)
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=r, lora_alpha=2 * r + 3, lora_dropout=0.0, target_modules=peft_targets, fan_in_fan_out=True,
        use_rslora=rslora, use_dora=dora)).eval()
    state = adapter_state_dict(ours)
    copied = 0
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(state[our_key(name)])
                copied += 1
    assert copied == len(state)

    ids = ids_batch()
    a = ours.logits(ours(ids))
    b = theirs(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    assert a.abs().max().item() > 0.1  # real logits, not a degenerate case

    labels = ids_batch(seed=5)
    nn.functional.cross_entropy(a.flatten(0, 1), labels.flatten()).backward()
    nn.functional.cross_entropy(b.flatten(0, 1), labels.flatten()).backward()
    ours_params = dict(ours.named_parameters())
    checked = 0
    for name, p in theirs.named_parameters():
        if p.requires_grad:
            mine = ours_params[our_key(name)].grad
            assert mine is not None and p.grad is not None
            assert (mine - p.grad).abs().max().item() <= 1e-5, name
            checked += 1
    assert checked == copied
    assert any(ours_params[k].grad.abs().max() > 0 for k in state if "lora_A" in k)  # B != 0: A learns too


def test_step_zero_equals_base(tiny):
    path, _ = tiny
    base = load_model(str(path)).model.eval()
    model = copy.deepcopy(base)
    apply_lora(model, LoraConfig(r=8, targets=["all-linear"], use_dora=True), generator=torch.Generator().manual_seed(0))
    ids = ids_batch()
    with torch.no_grad():
        assert (model.logits(model(ids)) - base.logits(base(ids))).abs().max().item() <= 1e-5
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.lora_B.weight.abs().max() == 0
    assert layer.lora_A.weight.abs().max() > 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on [r, in] gives U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max().item() <= bound
    assert not layer.base_layer.weight.requires_grad and layer.lora_A.weight.requires_grad
    assert not model.transformer.wte.weight.requires_grad


def test_init_is_seeded():
    a, b = meta_free_tiny(), meta_free_tiny()
    apply_lora(a, LoraConfig(targets=["attn.q"]), generator=torch.Generator().manual_seed(7))
    apply_lora(b, LoraConfig(targets=["attn.q"]), generator=torch.Generator().manual_seed(7))
    sa, sb = adapter_state_dict(a), adapter_state_dict(b)
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "transformer.h.0.attn.c_attn.lora_q.lora_A.weight" in sa
    assert sa["transformer.h.0.attn.c_attn.lora_q.lora_B.weight"].shape == (64, 8)


def meta_free_tiny(seed: int = 0) -> GPT2:
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64,
                            embd_pdrop=0, attn_pdrop=0, resid_pdrop=0))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


# ----------------------------------------------------------------------------------------------------- slices


def test_slices_are_a_block_structured_fused_adapter():
    model = meta_free_tiny()
    apply_lora(model, LoraConfig(r=2, alpha=5, targets=["attn.q", "attn.v"], dropout=0.0),
               generator=torch.Generator().manual_seed(0))
    randomise(model)
    layer = model.transformer.h[1].attn.c_attn
    assert isinstance(layer, LoRASlicedLinear) and layer.slice_names == ("q", "v")
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        y = layer(x)
        base = layer.base_layer(x)
    C = 64
    q, v = layer.lora_q, layer.lora_v
    assert (y[..., C : 2 * C] - base[..., C : 2 * C]).abs().max().item() == 0  # key third untouched
    want_q = base[..., :C] + 2.5 * (x @ q.lora_A.weight.T) @ q.lora_B.weight.T
    want_v = base[..., 2 * C :] + 2.5 * (x @ v.lora_A.weight.T) @ v.lora_B.weight.T
    assert (y[..., :C] - want_q).abs().max().item() <= 1e-5
    assert (y[..., 2 * C :] - want_v).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------- merge / unmerge


@pytest.mark.parametrize("cfg", [
    dict(targets=["all-linear"], r=4),
    dict(targets=["attn.c_attn", "mlp.c_fc"], r=8, use_dora=True, use_rslora=True),
    dict(targets=["attn.q", "attn.k", "attn.v", "mlp.c_proj"], r=2, bias="lora_only"),
])
def test_merge_unmerge(cfg):
    model = meta_free_tiny()
    apply_lora(model, LoraConfig(dropout=0.0, **cfg), generator=torch.Generator().manual_seed(0))
    randomise(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer.weight" in n}
    ids = ids_batch()
    with torch.no_grad():
        unmerged = model.logits(model(ids))
        merge_lora(model)
        merged = model.logits(model(ids))
        changed = max((p - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before)
        unmerge_lora(model)
        again = model.logits(model(ids))
    assert changed > 1e-3  # the merge really moved the weights
    assert (merged - unmerged).abs().max().item() <= 1e-4
    for n, p in model.named_parameters():
        if n in before:
            assert (p - before[n]).abs().max().item() <= 1e-6, n
    assert (again - unmerged).abs().max().item() <= 1e-5

    with torch.no_grad():
        plain = merge_and_unload(model)
        assert not any(isinstance(m, (LoRALinear, LoRASlicedLinear)) for m in plain.modules())
        assert set(plain.state_dict()) == set(meta_free_tiny().state_dict())
        assert (plain.logits(plain(ids)) - unmerged).abs().max().item() <= 1e-4


def test_merge_refuses_non_finite_weights():
    model = meta_free_tiny()
    apply_lora(model, LoraConfig(r=2, targets=["mlp.c_fc"]))
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.lora_B.weight.fill_(float("inf"))
    weight = model.transformer.h[1].mlp.c_fc.base_layer.weight.detach().clone()
    with pytest.raises(AdapterError, match=r"transformer\.h\.1\.mlp\.c_fc: merging the adapter gives non-finite weights"):
        merge_lora(model)
    assert torch.equal(model.transformer.h[1].mlp.c_fc.base_layer.weight, weight)  # left as it was


def test_disabled_adapter_is_the_base():
    model = meta_free_tiny()
    base = copy.deepcopy(model)
    apply_lora(model, LoraConfig(r=2, targets=["all-linear"]))
    randomise(model)
    ids = ids_batch()
    with torch.no_grad():
        with lora_disabled(model):
            off = model.logits(model(ids))
        on = model.logits(model(ids))
        ref = base.logits(base(ids))
    assert torch.equal(off, ref) and (on - ref).abs().max() > 1e-3


def test_dropout_only_on_the_lora_path_in_training():
    model = meta_free_tiny()
    apply_lora(model, LoraConfig(r=4, dropout=0.5, targets=["mlp.c_fc"]), generator=torch.Generator().manual_seed(0))
    randomise(model)
    layer = model.transformer.h[0].mlp.c_fc
    x = torch.randn(4, 64)
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    b = layer(x)
    layer.eval()
    c, d = layer(x), layer(x)
    assert (a - b).abs().max() > 0 and torch.equal(c, d)


# ---------------------------------------------------------------------------------------------- target rules


def test_target_patterns():
    model = meta_gpt2("gpt2")
    assert resolve_targets(model, None) == [f"transformer.h.{i}.attn.c_attn" for i in range(12)]  # PEFT's default
    assert resolve_targets(model, ["h.*.mlp.c_fc"], layers=[0, 11]) == ["transformer.h.0.mlp.c_fc", "transformer.h.11.mlp.c_fc"]
    assert resolve_targets(model, [r"re:transformer\.h\.1[01]\.attn\.c_proj"]) == [
        "transformer.h.10.attn.c_proj", "transformer.h.11.attn.c_proj"]
    assert resolve_targets(model, ["c_proj"], layers=[3]) == ["transformer.h.3.attn.c_proj", "transformer.h.3.mlp.c_proj"]
    assert resolve_targets(model, ["attn.k"], layers=[2]) == ["transformer.h.2.attn.k"]
    assert resolve_targets(model, ["transformer.h.5.mlp.c_proj"]) == ["transformer.h.5.mlp.c_proj"]
    assert len(resolve_targets(model, ["all-linear", "attn.c_attn"])) == 48


def test_pattern_matching_nothing_lists_available_names():
    with pytest.raises(ConfigError) as err:
        apply_lora(meta_gpt2("gpt2"), LoraConfig(targets=["attn.c_atn"]))
    assert str(err.value) == (
        "lora.targets: 'attn.c_atn' matches no linear layer; available: attn.c_attn, attn.q, attn.k, attn.v, "
        "attn.c_proj, mlp.c_fc, mlp.c_proj (in transformer.h.0-11), or all-linear")
    assert err.value.exit_code == 2


@pytest.mark.parametrize("cfg,message", [
    (dict(r=0), "lora.r must be a positive integer, got 0"),
    (dict(r=-4), "lora.r must be a positive integer, got -4"),
    (dict(targets=["lm_head"]), "lm_head shares its weight with transformer.wte; LoRA cannot target it"),
    (dict(targets=["attn.c_attn"], layers=[12]), "lora.layers: block 12 does not exist; the model has blocks 0-11"),
    (dict(targets=["re:h.(["]), "lora.targets: 're:h.([' is not a valid regular expression"),
    (dict(targets=["attn.c_attn", "attn.q"]), "lora.targets select both transformer.h.0.attn.c_attn and its slice "
                                              "transformer.h.0.attn.q"),
    (dict(targets=["attn.v"], use_dora=True), "DoRA on attn.q/attn.k/attn.v slices is not supported"),
    (dict(targets=["attn.c_attn"], modules_to_save=["score"]), "lora.modules_to_save: 'score' matches no module"),
    (dict(targets=["attn.c_attn"], modules_to_save=["attn"]), "overlaps the LoRA target transformer.h.0.attn.c_attn"),
])
def test_bad_lora_configs(cfg, message):
    with pytest.raises(ConfigError) as err:
        apply_lora(meta_gpt2("gpt2"), LoraConfig(**cfg))
    assert message in str(err.value)


def test_applying_twice_is_refused():
    model = meta_gpt2("gpt2")
    apply_lora(model, LoraConfig())
    with pytest.raises(ConfigError, match="the model already has LoRA layers"):
        apply_lora(model, LoraConfig())


def test_lora_dropout_keeps_a_one_byte_mask_for_the_backward():
    """LoRA dropout (MaskDropout) zeroes a fraction p and scales the rest by 1 / (1 - p), as nn.Dropout; what it
    keeps for the backward pass is a bool mask, not the fp32 copy CPU F.dropout keeps."""
    from lora_cli.lora import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear.from_base(torch.nn.Linear(64, 32), r=4, alpha=8, dropout=0.25).train()
    x = torch.randn(512, 64, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.dtype, tuple(t.shape))) or t, lambda t: t):
        layer(x)
    assert (torch.bool, (512, 64)) in kept
    assert kept.count((torch.float32, (512, 64))) == 1  # the dropped-out input, which lora_A's gradient needs
    dropped = layer.lora_dropout(x).detach()
    zero = dropped == 0
    assert torch.allclose(dropped[~zero], x.detach()[~zero] / 0.75)
    assert abs(zero.float().mean().item() - 0.25) < 0.02
    layer.eval()
    assert torch.equal(layer.lora_dropout(x), x)


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_linear_takes_an_unbatched_row(use_dora):
    """A LoRA layer keeps its input's leading dims, as nn.Linear does: one row [in] gives [out], the same values as
    that row in a batch (DoRA's magnitude scale used to add a leading dim: [1, out])."""
    torch.manual_seed(0)
    layer = LoRALinear.from_base(torch.nn.Linear(12, 10), r=4, alpha=8, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 12)
    with torch.no_grad():
        row, batch = layer(x[1]), layer(x)
    assert row.shape == (10,) and torch.allclose(row, batch[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family,head,embedding", [("llama", "lm_head", "model.embed_tokens"),
                                                    ("gpt_neox", "embed_out", "gpt_neox.embed_in")])
def test_a_tied_head_target_names_the_familys_own_modules(tmp_path, family, head, embedding):
    """LoRA on a head tied to the input embedding is refused naming that family's head and embedding (it named
    GPT-2's transformer.wte on every family)."""
    import transformers

    from helpers import make_family_checkpoint

    if family == "gpt_neox":  # tied: GPT-NeoX checkpoints are untied by default
        config = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                            num_attention_heads=4, tie_word_embeddings=True)
        transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "base")
    else:
        make_family_checkpoint(tmp_path / "base", family, vocab_size=64)
    model = load_model(str(tmp_path / "base")).model
    assert model.tied
    for pattern in (head, embedding):
        with pytest.raises(ConfigError) as err:
            apply_lora(model, LoraConfig(targets=["q_proj" if family == "llama" else "query_key_value", pattern]))
        assert f"'{pattern}' ({head} shares its weight with {embedding}; LoRA cannot target it)" in str(err.value)


def test_layers_outside_the_blocks_are_listed_apart():
    """An untied head (or a classifier's score) is no layer of model.layers.0-1: the list says so."""
    from lora_cli.lora import _short_names

    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")] + ["lm_head"]
    assert _short_names(names) == "self_attn.q_proj, self_attn.v_proj (in model.layers.0-1), lm_head, or all-linear"
    assert _short_names(["score"], all_linear=False) == "score"


def test_dropout_and_lora_a_keep_the_shared_input_once():
    """Two LoRA layers with dropout on one input (q_proj and v_proj): the backward keeps that input once and a
    1-byte mask per layer (each layer kept its own fp32 dropped-out copy), with the plain path's values and
    gradients bit for bit."""
    import copy

    from lora_cli.lora import LoRALinear

    torch.manual_seed(0)
    layers = [LoRALinear.from_base(torch.nn.Linear(16, 24), r=4, alpha=8, dropout=0.1) for _ in range(2)]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B.weight)
    plain = copy.deepcopy(layers)
    for layer in plain:
        layer._drops_in_autograd = lambda x: False
    x = torch.randn(3, 5, 16, requires_grad=True)
    results = []
    for stack in (layers, plain):
        inp = x.detach().clone().requires_grad_()
        kept = {}

        def pack(t):
            if t.numel() == inp.numel():  # x, a dropped-out copy (as F.linear's [15, 16] view) or a mask
                kept[t.untyped_storage().data_ptr()] = t.dtype
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = sum(layer(inp).square().sum() for layer in stack)
        out.backward()
        results.append((out, inp.grad, [(l.lora_A.weight.grad, l.lora_B.weight.grad) for l in stack], kept))
    (out, grad, weights, kept), (out_p, grad_p, weights_p, kept_p) = results
    assert sorted(kept.values(), key=str) == [torch.bool, torch.bool, torch.float32]  # x once, two masks
    assert sorted(kept_p.values(), key=str) == [torch.bool, torch.bool, torch.float32, torch.float32]
    assert torch.equal(out, out_p) and torch.equal(grad, grad_p)
    assert all(torch.equal(a, b) for pair, pair_p in zip(weights, weights_p) for a, b in zip(pair, pair_p))
