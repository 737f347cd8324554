"""data.packing: examples packed back to back into rows of max_length tokens give the loss and the gradients of
the padded batch of the same examples (fp32, <= 1e-5) in every model family, with prompt masks, a shared prefix,
pruning of the last block and gradient checkpointing; the packed layout itself; the config error for
classification; and a whole training run packed and unpacked."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import rel
from lora_cli.config import LoraConfig, load_config
from lora_cli.data import IGNORE_INDEX, Example, collate, pack
from lora_cli.errors import ConfigError
from lora_cli.lora import apply_lora
from lora_cli.loss import PLAIN, Savings, lm_loss_sum
from lora_cli.pretrained import load_model

transformers = pytest.importorskip("transformers")

V = 300
SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def hf_config(family: str):
    """A tiny transformers config per family (GQA, biases, q/k norms, partial rotary where the family has them)."""
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                       eos_token_id=0)
    if family == "llama":
        return transformers.LlamaConfig(**SIZES, num_key_value_heads=2, attention_bias=True)
    if family == "qwen2":
        return transformers.Qwen2Config(**SIZES, num_key_value_heads=2)
    if family == "qwen3":
        return transformers.Qwen3Config(**SIZES, num_key_value_heads=2, head_dim=16)
    return transformers.GPTNeoXConfig(**SIZES, rotary_pct=0.5)  # gpt_neox


FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "gpt_neox"]


@pytest.fixture(scope="module", params=FAMILIES)
def lora_model(request, tmp_path_factory):
    """Our model of each family from a tiny random checkpoint, with LoRA on every linear layer and B drawn
    non-zero, so every LoRA weight gets a gradient."""
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config(request.param)).save_pretrained(path)
    model = load_model(str(path)).model
    model.set_dropout(0.0)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets=["all-linear"]),
               generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    return model


def examples(case: str) -> list[Example]:
    """Prompt-masked examples of varied lengths; "shared prefix": every one starts with the same 6 tokens, as an
    instruction template's preamble does."""
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, V, (6,), generator=g).tolist()
    out = []
    for n, prompt in ((19, 7), (5, 2), (11, 11 - 3), (2, 1), (14, 0), (8, 4), (3, 3 - 1)):
        ids = torch.randint(0, V, (n,), generator=g).tolist()
        if case == "shared prefix":
            ids = prefix + ids
            prompt += len(prefix)
        out.append(Example(ids, [False] * prompt + [True] * (len(ids) - prompt)))
    return out


def loss_and_grads(model, batch, savings=Savings()):
    model.zero_grad(set_to_none=True)
    value = lm_loss_sum(model, batch, savings=savings)
    value.backward()
    return value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", ["prompt masked", "shared prefix"])
def test_packed_loss_and_gradients_equal_the_padded_batch(lora_model, case):
    """The plain padded computation (no unpadding, no chunking) against packed rows, with the padding-free
    path's options on and off."""
    model, exs = lora_model, examples(case)
    model.share_prefix, model.gradient_checkpointing = False, False
    ref, ref_grads = loss_and_grads(model, collate(exs, pad_id=0), PLAIN)
    packed = pack(exs, max_length=24, pad_id=0)
    assert packed.shape[0] < len(exs) and packed.n_targets == collate(exs, pad_id=0).n_targets
    # (share_prefix, prune_last_block, gradient_checkpointing): the defaults, then the other branches
    other = (False, False, False) if case == "prompt masked" else (True, False, True)
    for share, prune, checkpointed in ((True, True, False), other):
        model.share_prefix, model.gradient_checkpointing = share, checkpointed
        model.train(checkpointed)
        value, grads = loss_and_grads(model, packed, Savings(prune_last_block=prune))
        assert rel(ref, value) <= 1e-5
        assert set(grads) == set(ref_grads)
        for name in ref_grads:
            assert ref_grads[name].abs().sum() > 0, name
            assert rel(ref_grads[name], grads[name]) <= 1e-5, (name, share, prune, checkpointed)
    model.train(False)


def test_packed_rows_hold_whole_examples_first_fit_longest_first():
    exs = [Example(list(range(100 + 10 * k, 100 + 10 * k + n)), [False] + [True] * (n - 1))
           for k, n in enumerate((4, 9, 3, 6, 1))]
    batch = pack(exs, max_length=10, pad_id=0)
    # inputs (ids[:-1]) of 8, 5, 3, 2 tokens; the 1-token example has none. First fit, longest first:
    # 8 opens row 0 (2 left), 5 opens row 1 (5 left), 3 joins row 1, 2 fills row 0.
    assert batch.lengths == (8, 2, 5, 3)
    assert batch.input_ids.tolist() == [
        [110, 111, 112, 113, 114, 115, 116, 117, 120, 121],
        [130, 131, 132, 133, 134, 100, 101, 102, 0, 0],
    ]
    assert batch.targets.tolist() == [
        [111, 112, 113, 114, 115, 116, 117, 118, 121, 122],
        [131, 132, 133, 134, 135, 101, 102, 103, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch.attention_mask.sum(1).tolist() == [10, 8]
    assert (batch.n_tokens, batch.n_targets) == (18, 18)


def test_positions_restart_and_attention_stays_within_each_example(lora_model):
    """Each packed example's hidden states are those of the example run alone."""
    model = lora_model
    exs = examples("prompt masked")[:4]
    packed = pack(exs, max_length=64, pad_id=0)
    assert packed.shape[0] == 1
    with torch.no_grad():
        hidden = model(packed.input_ids, keep=packed.attention_mask.bool(), lengths=packed.lengths)  # [N, C]
        alone = torch.cat([model(torch.tensor([ex.ids[:-1]]))[0] for ex in sorted(exs, key=lambda e: -len(e))])
    assert (hidden - alone).abs().max().item() <= 1e-5


def write_run(tmp_path, extra: str = "", task: str = "") -> str:
    rows = [{"instruction": f"Repeat the word {w}." + " Twice." * (i % 3), "input": "", "output": f"{w} " * (1 + i % 4)}
            for i, w in enumerate(["apple", "river", "stone", "cloud", "green", "quick", "seven", "table", "music",
                                   "light", "north", "paper"])]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    config = tmp_path / "run.yaml"
    config.write_text(f"""\
model: {{name: gpt2, init: random, n_layer: 2, n_head: 2, n_embd: 32, n_positions: 128, seed: 7}}
{task}data: {{train: train.json, val_split: 0.25, max_length: 64{extra}}}
lora: {{r: 4, alpha: 8, dropout: 0.0}}
train: {{lr: 1e-2, batch_size: 3, grad_accum: 2, epochs: 1, warmup_steps: 1, log_every: 1, eval_every: 1,
        save_every: 0, device: cpu, precision: fp32}}
""")
    return str(config)


def test_a_training_run_packed_equals_the_run_unpacked(tmp_path):
    """Loss, clipping, AdamW and validation over a whole run: the same numbers with and without packing."""
    from lora_cli.train import train

    runs = {}
    for name, extra in (("padded", ""), ("packed", ", packing: true")):
        cfg = load_config(write_run(tmp_path, extra), [f"out_dir={tmp_path / name}"])
        train(cfg, log=lambda *a: None, progress=False)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "val_loss", "tokens"):
        padded = [m[key] for m in runs["padded"] if key in m]
        packed = [m[key] for m in runs["packed"] if key in m]
        assert len(padded) >= 2
        assert packed == pytest.approx(padded, rel=1e-5), key


def test_packing_with_classification_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.packing: does not apply to task classification"):
        load_config(write_run(tmp_path, ", packing: true", task="task: classification\n"))
    with pytest.raises(ConfigError, match=r"data.prompt_template: does not apply to task classification \(the text "
                                          r"is classified as it is\); remove it"):  # it was accepted and ignored
        load_config(write_run(tmp_path, ", prompt_template: 'Review: {text}'", task="task: classification\n"))
