"""LoRA variants (issue 19, item 3): lora.init gaussian / pissa / olora, lora.rank_pattern / alpha_pattern and
LoRA+ (lora.loraplus_lr_ratio), each checked against PEFT: PiSSA/OLoRA start from exactly PEFT's A, B and residual
base, the saved adapter (converted to a rank-2r LoRA) applies to the untouched transformers base as PEFT loads it,
per-module ranks and scalings equal PEFT's, and LoRA+ trains as a plain PEFT loop with create_loraplus_optimizer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_cli.config import LoraConfig, build_config, load_config
from lora_cli.errors import ConfigError
from lora_cli.lora import apply_lora, count_parameters, lora_layers

from helpers import TINY, WORDS, alpaca_rows, build_tokenizer, cli, make_hf_gpt2, rel, train_run

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("tokenizers")

LLAMA = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny random GPT-2, Llama and GPT-NeoX checkpoints saved by transformers (the last two with a tokenizer.json
    of 400 tokens)."""
    root = tmp_path_factory.mktemp("variants")
    make_hf_gpt2(root / "gpt2", seed=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**LLAMA)).save_pretrained(root / "llama")
    build_tokenizer(root / "llama", bos=True)
    neox = {k: v for k, v in LLAMA.items() if k not in ("num_key_value_heads", "tie_word_embeddings")}
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.GPTNeoXConfig(**neox, rotary_pct=0.5)).save_pretrained(
        root / "gpt_neox")
    build_tokenizer(root / "gpt_neox", bos=True)
    return root


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def ours(path, lora: LoraConfig):
    from lora_cli.pretrained import load_model

    model = load_model(str(path)).model.eval()
    apply_lora(model, lora, generator=torch.Generator().manual_seed(0))
    return model


def peft_weights(model) -> dict[str, torch.Tensor]:
    """A PEFT model's adapted layers by our names: base_layer.weight, lora_A.weight, lora_B.weight."""
    out = {}
    for name, p in model.named_parameters():
        name = name.removeprefix("base_model.model.").replace(".default.", ".")
        if ".lora_" in name or ".base_layer.weight" in name:
            out[name] = p.detach()
    return out


# ------------------------------------------------------------------------------------------------ the start


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_llama_init_equals_peft_and_the_base(bases, init):
    """Same weights in, bit-identical A, B and residual base out; the adapted model still computes the base."""
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"], init=init,
                      rank_pattern={"layers.1.self_attn.v_proj": 6}, alpha_pattern={"down_proj": 4})
    model = ours(bases / "llama", lora)
    hf = hf_model(bases / "llama")
    reference = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=init,
        rank_pattern={"layers.1.self_attn.v_proj": 6}, alpha_pattern={"down_proj": 4}))
    theirs = peft_weights(reference)
    mine = {k: v.detach() for k, v in model.named_parameters() if ".lora_" in k or ".base_layer.weight" in k}
    assert sorted(mine) == sorted(theirs) and len(mine) == 2 * 3 * 3
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key
    assert mine["model.layers.1.self_attn.v_proj.lora_A.weight"].shape == (6, 64)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(hf(ids).logits, model.logits(model(ids))) < 1e-5  # step 0 equals the base


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_gpt2_init_equals_peft_on_the_same_weight(bases, init):
    """GPT-2's layers are nn.Linear here: PEFT's init on an nn.Linear holding the same [out, in] weight (the fused
    c_attn and each attn.q / attn.v third of it) gives the same A, B and residual."""
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, targets=["h.0.attn.c_attn", "h.1.attn.q", "h.1.attn.v"], init=init)
    original = ours(bases / "gpt2", LoraConfig(r=4, alpha=8, dropout=0.0, targets=["mlp.c_fc"]))
    model = ours(bases / "gpt2", lora)
    C = TINY["n_embd"]

    def peft_on(weight):
        holder = nn.Sequential()
        holder.add_module("proj", nn.Linear(weight.shape[1], weight.shape[0], bias=False))
        with torch.no_grad():
            holder.proj.weight.copy_(weight)
        wrapped = peft.get_peft_model(holder, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                              init_lora_weights=init))
        p = wrapped.base_model.model.proj
        return p.lora_A["default"].weight, p.lora_B["default"].weight, p.base_layer.weight

    W0 = original.get_submodule("transformer.h.0.attn.c_attn").weight.detach()
    A, B, residual = peft_on(W0)
    layer = model.get_submodule("transformer.h.0.attn.c_attn")
    assert torch.equal(layer.lora_A.weight, A) and torch.equal(layer.lora_B.weight, B)
    assert torch.equal(layer.base_layer.weight, residual)
    W1 = original.get_submodule("transformer.h.1.attn.c_attn").weight.detach()
    sliced = model.get_submodule("transformer.h.1.attn.c_attn")
    for s, rows in (("q", slice(0, C)), ("v", slice(2 * C, 3 * C))):
        A, B, residual = peft_on(W1[rows])
        assert torch.equal(sliced.slice(s).lora_A.weight, A) and torch.equal(sliced.slice(s).lora_B.weight, B)
        assert torch.equal(sliced.base_layer.weight[rows], residual)
    assert torch.equal(sliced.base_layer.weight[C : 2 * C], W1[C : 2 * C])  # k: no adapter, untouched
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(original.logits(original(ids)), model.logits(model(ids))) < 1e-5


def test_gaussian_init_draws_a_with_std_one_over_r(bases):
    model = ours(bases / "gpt2", LoraConfig(r=4, alpha=8, dropout=0.0, targets=["mlp.c_fc"], init="gaussian",
                                            rank_pattern={"h.1.mlp.c_fc": 16}))
    for name, layer in lora_layers(model):
        A = layer.lora_A.weight
        assert abs(A.std().item() * layer.r - 1) < 0.1, name  # 256 to 1024 draws of N(0, 1/r^2)
        assert not layer.lora_B.weight.any()


# ------------------------------------------------------------------------------------------- rank patterns


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rank_and_alpha_patterns_equal_peft(bases, family, use_rslora):
    targets = ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"] if family == "gpt2" else ["q_proj", "v_proj", "up_proj"]
    ranks = {"h.1.attn.c_attn": 8, "c_fc": 2} if family == "gpt2" else {r"layers\.1\.self_attn\.q_proj": 8, "up_proj": 2}
    alphas = {"mlp.c_proj": 3, "h.0.mlp.c_fc": 5} if family == "gpt2" else {"v_proj": 3, "layers.0.mlp.up_proj": 5}
    model = ours(bases / family, LoraConfig(r=4, alpha=8, dropout=0.0, targets=targets, use_rslora=use_rslora,
                                            rank_pattern=ranks, alpha_pattern=alphas))
    reference = peft.get_peft_model(hf_model(bases / family), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_rslora=use_rslora,
        rank_pattern=ranks, alpha_pattern=alphas, fan_in_fan_out=family == "gpt2"))
    trainable, _ = count_parameters(model)
    assert trainable == reference.get_nb_trainable_parameters()[0]
    scalings = {name: layer.scaling for name, layer in lora_layers(model)}
    theirs = {name.removeprefix("base_model.model."): m.scaling["default"] for name, m in reference.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert scalings == pytest.approx(theirs, rel=1e-12) and len(scalings) == 6
    assert len(set(scalings.values())) >= 4  # the patterns did change something


def test_bad_variant_settings_are_reported_at_once(tmp_path):
    raw = {"model": "gpt2", "data": {"train": "t.json"},
           "lora": {"rank_pattern": {"c_fc": 0, "[": 2}, "alpha_pattern": {"c_proj": -1}, "init": "pissa",
                    "use_dora": True, "loraplus_lr_ratio": 0}}
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    message = str(info.value)
    assert message.startswith("config: 5 problems: ")
    for part in ("lora.rank_pattern: c_fc: must be > 0, got 0", "lora.rank_pattern: '[' is not a valid regular",
                 "lora.alpha_pattern: c_proj: must be > 0, got -1.0", "lora.init: pissa cannot be combined with use_dora",
                 "lora.loraplus_lr_ratio: must be > 0 or null, got 0.0"):
        assert part in message
    with pytest.raises(ConfigError, match=r"lora.init pissa: rank 80 of transformer.h.0.attn.c_attn exceeds its "
                                          r"smaller dimension 64; lower lora.r"):
        apply_lora(make_tiny_gpt2(), LoraConfig(r=80, alpha=8, init="pissa"))
    # a key that matches no targeted layer would be ignored ("attn": c_attn's name does not end in ".attn")
    for key in ("rank_pattern", "alpha_pattern"):
        with pytest.raises(ConfigError) as info:
            apply_lora(make_tiny_gpt2(), LoraConfig(r=4, alpha=8, targets=["attn.c_attn"], **{key: {"attn": 2}}))
        assert str(info.value) == (f"lora.{key}: 'attn' matches none of the targeted layers (a key matches the end "
                                   "of a layer's name, as in PEFT); targeted: attn.c_attn (in transformer.h.0-1)")


def make_tiny_gpt2():
    from lora_cli.models import GPT2, GPT2Config

    model = GPT2(GPT2Config(**TINY))
    model.init_weights(torch.Generator().manual_seed(3))
    return model


# --------------------------------------------------------------------------------- trained, exported, merged


def reference_loss(model, examples) -> float:
    """Token-weighted cross-entropy of a transformers (or PEFT) model over the examples, one at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.ids])
            targets = torch.tensor([t if m else -100 for t, m in zip(ex.ids[1:], ex.loss_mask[1:])])
            logits = model(ids[:, :-1]).logits[0].double()
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return total / count


def val_examples(config):
    from lora_cli.data import load_splits
    from lora_cli.inference import load_with_tokenizer

    cfg = load_config(config)
    base, tokenizer = load_with_tokenizer(cfg.model, weights=False)
    return load_splits(cfg, context_length=base.model.config.n_positions, tokenizer=tokenizer).val


VARIANTS = {
    # family, lora settings: slices, per-module ranks / alphas and rsLoRA ride along (gaussian: the LoRA+ test)
    "gpt2-pissa": ("gpt2", "{r: 4, alpha: 8, dropout: 0.0, init: pissa, targets: [attn.q, attn.v, mlp.c_proj], "
                           "rank_pattern: {mlp.c_proj: 2}, alpha_pattern: {h.1.attn.v: 4}}"),
    "llama-olora": ("llama", "{r: 4, alpha: 8, dropout: 0.0, init: olora, use_rslora: true, targets: [q_proj, down_proj], "
                             "rank_pattern: {down_proj: 2}}"),
    "llama-pissa": ("llama", "{r: 4, alpha: 8, dropout: 0.0, init: pissa, targets: [q_proj, v_proj], "
                             "alpha_pattern: {v_proj: 2}}"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_exports_to_peft_on_the_untouched_base(bases, tmp_path, variant):
    """`lora eval` reproduces the training validation loss; the PEFT export, loaded by PeftModel.from_pretrained on
    the untouched transformers base, and `lora merge`, give the loss `lora eval` gives."""
    from safetensors import safe_open

    family, lora = VARIANTS[variant]
    config = train_run(tmp_path, bases / family, lora=lora, rows=alpaca_rows(with_input=False), steps=3, lr=2e-2)
    adapter = tmp_path / "out" / "adapter.safetensors"
    with safe_open(str(adapter), "pt") as f:
        trained = json.loads(f.metadata()["training"])["best_val_loss"]
        settings = json.loads(f.metadata()["lora"])
    assert settings["r"] == 8  # PiSSA/OLoRA: a rank-2r LoRA of the untouched base
    code, out, err = cli("eval", config, "--json", "--no-base", "--device", "cpu", cwd=tmp_path)
    assert code == 0, err
    loss = json.loads(out)["loss"]
    assert loss == pytest.approx(trained, rel=1e-4)

    examples = val_examples(config)
    base = hf_model(bases / family)
    base_loss = reference_loss(base, examples)
    code, out, err = cli("export", adapter, tmp_path / "peft")
    assert code == 0, err
    tuned = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    assert reference_loss(tuned, examples) == pytest.approx(loss, rel=1e-4)
    assert abs(loss - base_loss) > 1e-3  # training changed something measurable
    if family == "gpt2":  # `lora merge` writes GPT-2 checkpoints only
        code, out, err = cli("merge", "--adapter", adapter, "--out", tmp_path / "merged")
        assert code == 0, err
        assert reference_loss(hf_model(tmp_path / "merged"), examples) == pytest.approx(loss, rel=1e-4)


# ----------------------------------------------------------------------------------------------------- LoRA+


def test_loraplus_matches_a_peft_loop_step_by_step(bases, tmp_path):
    """20 steps of the whole training set (one batch per step) with LoRA+ ratio 16, weight decay and trained
    biases (three parameter groups) on GPT-NeoX (biased linears, a small vocabulary), against transformers + PEFT + create_loraplus_optimizer started from the
    same (gaussian) A: the losses agree step by step, and the PEFT export gives the loss `lora eval` gives."""
    from lora_cli.adapter import adapter_state_dict
    from lora_cli.train import build, train

    rows = alpaca_rows(WORDS[:8], with_input=False)
    (tmp_path / "train.json").write_text(json.dumps(rows))
    (tmp_path / "run.yaml").write_text(f"""\
model: {bases / 'gpt_neox'}
out_dir: out
data: {{train: train.json, val_split: 0.0, max_length: 96}}
lora: {{r: 4, alpha: 8, dropout: 0.0, bias: lora_only, init: gaussian, loraplus_lr_ratio: 16,
       targets: [query_key_value, dense_h_to_4h]}}
train: {{lr: 1e-3, lr_schedule: constant, warmup_steps: 0, weight_decay: 0.1, batch_size: {len(rows)}, max_steps: 20,
         epochs: 20, eval_every: 0, save_every: 0, log_every: 1}}
""")
    cfg = load_config(tmp_path / "run.yaml")
    setup = build(cfg)  # the same A the run starts from, and its encoded examples
    start = adapter_state_dict(setup.model)
    examples = setup.data.train
    train(cfg, log=lambda m: None, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20

    from peft.optimizers import create_loraplus_optimizer

    model = peft.get_peft_model(hf_model(bases / "gpt_neox"), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, bias="lora_only", target_modules=["query_key_value", "dense_h_to_4h"]))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in start.items():
            if ".lora_" in key:
                params["base_model.model." + key.replace(".weight", ".default.weight")].copy_(value)
    model.train()
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16,
                                          loraplus_weight_decay=0.1)
    assert sorted(len(g["params"]) for g in optimizer.param_groups) == [0, 4, 4, 4]  # A, B, biases; no embedding
    # The whole training set as one right-padded batch: inputs ids[:-1], targets ids[1:] (-100: no loss).
    T = max(len(ex.ids) for ex in examples) - 1
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    targets = torch.full((len(examples), T), -100)
    for i, ex in enumerate(examples):
        n = len(ex.ids) - 1
        ids[i, :n], mask[i, :n] = torch.tensor(ex.ids[:-1]), 1
        targets[i, :n] = torch.tensor([t if m else -100 for t, m in zip(ex.ids[1:], ex.loss_mask[1:])])
    for step in range(20):
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)  # mean over targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad()
        assert losses[step] == pytest.approx(loss.item(), rel=1e-4), step
    assert losses[-1] < losses[0] - 0.1

    code, out, err = cli("eval", "--adapter", tmp_path / "out" / "adapter.safetensors", "--data", tmp_path / "train.json",
                         "--json", "--no-base", "--device", "cpu")
    assert code == 0, err
    loss = json.loads(out)["loss"]
    code, out, err = cli("export", tmp_path / "out" / "adapter.safetensors", tmp_path / "peft")
    assert code == 0, err
    exported = peft.PeftModel.from_pretrained(hf_model(bases / "gpt_neox"), str(tmp_path / "peft")).eval()
    assert reference_loss(exported, examples) == pytest.approx(loss, rel=1e-4)
    assert reference_loss(model.eval(), examples) == pytest.approx(loss, rel=1e-3)  # the PEFT loop's own end


# ------------------------------------------------------------------------------------- PEFT's own PiSSA files


def test_unconverted_peft_pissa_adapter_loads_as_peft_loads_it(bases, tmp_path):
    """A PiSSA adapter PEFT saved without conversion holds A, B for the residual base: PEFT redoes the SVD when it
    loads it, and so does lora-cli (attach, and export again with init_lora_weights pissa); a randomised start
    (pissa_niter_K) cannot be redone and is refused in one line."""
    from lora_cli.adapter import attach_adapter, export_peft, load_adapter
    from lora_cli.errors import AdapterError
    from lora_cli.pretrained import load_model

    trained = peft.get_peft_model(hf_model(bases / "llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    with torch.no_grad():  # as if trained
        for name, p in trained.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    trained.save_pretrained(tmp_path / "pissa")
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(hf_model(bases / "llama"), str(tmp_path / "pissa")).eval()(ids).logits
        assert rel(want, hf_model(bases / "llama")(ids).logits) > 1e-3  # the adapter does something
        model = attach_adapter(load_model(str(bases / "llama")).model.eval(), load_adapter(tmp_path / "pissa"))
        assert rel(want, model.logits(model(ids))) < 1e-5
        export_peft(load_adapter(tmp_path / "pissa"), tmp_path / "again")
        again = peft.PeftModel.from_pretrained(hf_model(bases / "llama"), str(tmp_path / "again")).eval()(ids).logits
        assert rel(want, again) < 1e-6
    config = json.loads((tmp_path / "pissa" / "adapter_config.json").read_text())
    (tmp_path / "pissa" / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(AdapterError, match=r"adapter_config.json: init_lora_weights 'pissa_niter_4' is not supported "
                                           r"by lora-cli; save the adapter with PEFT's path_initial_model_for_weight"):
        load_adapter(tmp_path / "pissa")
