import json
import random
import pytest
import torch

from lora_cli.config import LoraConfig, load_config
from lora_cli.lora import apply_lora, count_parameters
from lora_cli.pretrained import load_model
from lora_cli.models import add_classification_head
from lora_cli.train import build, train

QKV_ALL = ["attn.q", "attn.k", "attn.v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def gpt2_meta():
    return load_model({"name": "gpt2", "init": "random"}, weights=False).model


@pytest.mark.parametrize("targets,save,expected", [
    (QKV_ALL + ["score"], [], 2_666_528),  # the reference: separate q/k/v, LoRA on a frozen head
    (["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "score"], [], 2_371_616),
    (QKV_ALL, ["score"], 2_655_744),  # the head trained in full instead: 2,654,208 + 768 x 2
])
def test_reference_parameter_counts(targets, save, expected):
    model = gpt2_meta()
    with torch.device("meta"):
        add_classification_head(model, 2)
    apply_lora(model, LoraConfig(r=16, alpha=16, dropout=0.0, targets=targets, modules_to_save=save))
    assert count_parameters(model)[0] == expected


def test_last_token_pooling_right_and_left_padding_agree(tiny_hf_dir):
    model = load_model(str(tiny_hf_dir)).model.eval()
    add_classification_head(model, 3, torch.Generator().manual_seed(0))
    from lora_cli.data import Example, collate
    from lora_cli.loss import class_logits

    examples = [Example(ids, [False] * len(ids), label=0) for ids in ([5, 6, 7, 8, 9], [10, 11], [12, 13, 14])]
    with torch.no_grad():
        right = class_logits(model, collate(examples, pad_side="right"))
        left = class_logits(model, collate(examples, pad_side="left"))
        alone = torch.cat([class_logits(model, collate([e])) for e in examples])
    assert (right - alone).abs().max().item() <= 1e-5
    assert (left - alone).abs().max().item() <= 1e-5


def separable_rows(n=160, seed=0):
    rng = random.Random(seed)
    pos = ["great", "lovely", "excellent", "happy", "wonderful"]
    neg = ["awful", "terrible", "horrible", "sad", "dreadful"]
    filler = ["the", "day", "was", "food", "movie", "really", "quite", "and", "it", "so"]
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(filler, 4) + [rng.choice(pos if label == "pos" else neg)] + rng.sample(filler, 2)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def test_tiny_classifier_learns_and_reloads(tmp_path):
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in separable_rows()))
    (tmp_path / "cls.yaml").write_text("""\
model: {name: gpt2, init: random, n_layer: 2, n_head: 2, n_embd: 64, n_positions: 64, seed: 1}
task: classification
out_dir: out
data: {train: data.jsonl, val_split: 0.2, test_split: 0.2, max_length: 64}
lora: {r: 8, alpha: 16, dropout: 0.0, targets: all-linear}
train: {epochs: 12, batch_size: 16, lr: 2e-2, warmup_steps: 2, eval_every: 0, log_every: 5, seed: 3}
""")
    cfg = load_config(tmp_path / "cls.yaml")
    result = train(cfg, log=lambda m: None, progress=False)
    final = result.history[-1]
    assert final["val_accuracy"] >= 0.95
    assert (tmp_path / "out" / "test.csv").read_text().splitlines()[0] == "text,label"
    # reload: identical predictions on the validation split
    from lora_cli.adapter import attach_adapter, load_adapter
    from lora_cli.data import collate
    from lora_cli.loss import class_logits

    s = build(cfg)
    adapter = load_adapter(tmp_path / "out" / "adapter.safetensors")
    assert adapter.metadata["task"] == "classification" and adapter.metadata["data"]["labels"] == ["neg", "pos"]
    model = attach_adapter(load_model(cfg.model), adapter).eval()
    model2 = attach_adapter(load_model(cfg.model), load_adapter(tmp_path / "out" / "adapter.safetensors")).eval()
    batch = collate(s.data.val)
    with torch.no_grad():
        a, b = class_logits(model, batch), class_logits(model2, batch)
    assert torch.equal(a, b)
    accuracy = (a.argmax(-1) == batch.labels).float().mean().item()
    assert accuracy == pytest.approx(final["val_accuracy"])


def test_label_order_refuses_a_label_listed_twice_in_a_config_built_in_code():
    """load_config refuses data.labels naming a label twice (test_config); a DataConfig built in code reaches
    data.encode.label_order unchecked, which says the same in one line."""
    from lora_cli.config import DataConfig
    from lora_cli.data.encode import label_order
    from lora_cli.errors import ConfigError

    assert label_order(["b", "a"], DataConfig(labels=["b", 10, "a"])) == ["b", "10", "a"]
    assert label_order(["10", "2", "10"], DataConfig()) == ["2", "10"]  # integers in numeric order
    with pytest.raises(ConfigError) as err:
        label_order(["a", "b"], DataConfig(labels=["a", "b", "a"]))
    assert str(err.value) == "data.labels names 'a' twice; list each label once, in the order of its class id"
