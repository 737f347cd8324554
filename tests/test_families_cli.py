"""`lora train`, `eval` and `generate` on the new families through the run's tokenizer: a tiny Llama and a tiny
GPT-NeoX checkpoint saved by transformers, with a byte-level BPE tokenizer.json built by the `tokenizers` library
(bos added as Llama 3 adds it). Losses equal a hand computation with transformers on the same tokens, greedy
decoding equals transformers' `generate` (stopping on any of generation_config's eos ids); random presets of the
new families train offline with the bundled GPT-2 BPE unless `model.tokenizer` names one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import alpaca_rows, assert_one_line_error, build_tokenizer, cli, rel

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

V = 400  # build_tokenizer's vocabulary
SIZES = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256)
TARGETS = {"llama": "[q_proj, v_proj]", "gpt_neox": "[attention.query_key_value]"}


def make_model_dir(path, family: str, vocab_size: int = V):
    """A random transformers checkpoint of `family` with the tokenizer files beside it; returns the special ids."""
    sizes = {**SIZES, "vocab_size": vocab_size}
    config = (transformers.LlamaConfig(**sizes, num_key_value_heads=2, tie_word_embeddings=True)
              if family == "llama" else transformers.GPTNeoXConfig(**sizes, rotary_pct=0.5))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return build_tokenizer(path, bos=True)  # also writes generation_config.json (two eos ids)


def merged_hf_model(model_dir, adapter_file):
    """The transformers model with the adapter folded in by hand: W += alpha / r * B A."""
    from safetensors import safe_open

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with safe_open(str(adapter_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    scaling = 8 / 4  # the runs' lora alpha / r
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                b = tensors[module + ".lora_B.weight"]
                params[module + ".weight"] += scaling * (b.float() @ a.float())
    return hf


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_train_eval_generate_match_transformers(tmp_path, family):
    from tokenizers import Tokenizer

    model_dir = tmp_path / "model"
    ids = make_model_dir(model_dir, family)
    rows = alpaca_rows(with_input=False)
    (tmp_path / "train.json").write_text(json.dumps(rows))
    (tmp_path / "run.yaml").write_text(f"""\
model: {model_dir}
out_dir: out
data: {{train: train.json, val_split: 0.0, max_length: 96}}
lora: {{r: 4, alpha: 8, dropout: 0.0, targets: {TARGETS[family]}}}
train: {{lr: 5e-2, batch_size: 4, max_steps: 3, warmup_steps: 0, eval_every: 0, save_every: 0, log_every: 1}}
""")
    code, out, err = cli("train", tmp_path / "run.yaml", "-q", cwd=tmp_path)
    assert code == 0, err
    adapter = tmp_path / "out" / "adapter.safetensors"
    code, out, err = cli("eval", "--adapter", adapter, "--data", tmp_path / "train.json", "--json", "-q",
                         cwd=tmp_path)
    assert code == 0, err
    result = json.loads(out)

    # By hand: [bos] + Alpaca prompt + response + eos (tokenizer_config's eos_token), loss on response and eos.
    from lora_cli.data.formats import render_prompt

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos, eos = ids["<|begin_of_text|>"], ids["<|end_of_text|>"]
    examples = []
    for row in rows:
        prompt = tok.encode(render_prompt(row, "alpaca"), add_special_tokens=False).ids
        response = tok.encode(row["output"], add_special_tokens=False).ids + [eos]
        examples.append(([bos] + prompt, response))
    hf = merged_hf_model(model_dir, adapter)
    for model, want in ((transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval(), result["base"]),
                        (hf, result)):
        total, count = 0.0, 0
        with torch.no_grad():
            for prompt, response in examples:
                x = torch.tensor([prompt + response])
                logits = model(x).logits[0, len(prompt) - 1:-1].double()
                total += torch.nn.functional.cross_entropy(logits, torch.tensor(response), reduction="sum").item()
                count += len(response)
        assert want["tokens"] == count
        assert rel(torch.tensor(want["loss"]), torch.tensor(total / count)) <= 1e-4

    # Greedy decoding stops on any of generation_config's eos ids: make the first new token that is not a
    # repeat one of them (the first token when the tiny model repeats one token).
    text = "Repeat the word apple."
    prompt = [bos] + tok.encode(text, add_special_tokens=False).ids
    # bos is id 0: without an explicit mask transformers would take it for padding
    inputs = dict(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                  max_new_tokens=12, do_sample=False, pad_token_id=eos)
    with torch.no_grad():
        free = hf.generate(**inputs, eos_token_id=None)[0, len(prompt):].tolist()
    stop = next((i for i in range(1, 12) if free[i] not in free[:i]), 0)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = [eos, free[stop]]
    (model_dir / "generation_config.json").write_text(json.dumps(generation))
    with torch.no_grad():
        want = hf.generate(**inputs, eos_token_id=generation["eos_token_id"])[0, len(prompt):].tolist()
    assert want[-1] == free[stop] and len(want) == stop + 1
    code, out, err = cli("generate", "--adapter", adapter, "--no-template", "--max-new-tokens", "12", "-q", text,
                         cwd=tmp_path)
    assert code == 0, err
    assert out == tok.decode(want[:-1], skip_special_tokens=False) + "\n"


def test_random_preset_trains_with_the_gpt2_bpe_or_model_tokenizer(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps(alpaca_rows(with_input=False)))
    model = "{name: smollm2-135m, init: random, n_layer: 2}"
    run = """\
model: MODEL
out_dir: out
data: {train: train.json, val_split: 0.0, max_length: 160}
lora: {r: 2, alpha: 4, targets: [q_proj, v_proj]}
train: {lr: 1e-3, batch_size: 4, max_steps: 2, warmup_steps: 0, eval_every: 0, save_every: 0, log_every: 1}
"""
    (tmp_path / "run.yaml").write_text(run.replace("MODEL", model))
    code, out, err = cli("train", tmp_path / "run.yaml", "--dry-run", cwd=tmp_path)
    assert code == 0, err
    assert "tokenizer: GPT-2 BPE (bundled), vocabulary 50,257" in out
    code, out, err = cli("train", tmp_path / "run.yaml", "-q", cwd=tmp_path)
    assert code == 0, err
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # its merged directory carries GPT-2's vocab.json and merges.txt, which lora-cli reads back as the bundled BPE
    assert cli("merge", "--adapter", tmp_path / "out", "--out", tmp_path / "merged")[0] == 0
    generated = [cli("generate", *source, "--no-template", "--max-new-tokens", "6", "-q", "The river")
                 for source in (("--adapter", tmp_path / "out"), ("--model", tmp_path / "merged"))]
    assert generated[0][0] == 0 and generated[0] == generated[1]

    build_tokenizer(tmp_path / "tok", bos=True)
    with_tok = model.replace("}", f", tokenizer: {tmp_path / 'tok'}}}")
    (tmp_path / "run2.yaml").write_text(run.replace("MODEL", with_tok))
    code, out, err = cli("train", tmp_path / "run2.yaml", "--dry-run", cwd=tmp_path)
    assert code == 0, err
    assert f"tokenizer: {tmp_path / 'tok' / 'tokenizer.json'}, vocabulary 400" in out
    assert "[[" in out


def test_tokenizer_larger_than_the_embedding_is_one_line(tmp_path):
    make_model_dir(tmp_path / "model", "llama", vocab_size=300)
    line = assert_one_line_error(*cli("generate", "--model", tmp_path / "model", "hi", cwd=tmp_path))
    assert line == (f"error: the tokenizer ({tmp_path / 'model' / 'tokenizer.json'}, vocabulary 400) has more "
                    f"tokens than model {tmp_path / 'model'} has embedding rows (300); use the tokenizer the model "
                    "was trained with (model.tokenizer)")


def test_model_tokenizer_key_is_validated(tmp_path):
    from lora_cli.config import ModelSpec

    spec = ModelSpec.parse({"name": "smollm2-135m", "init": "random", "tokenizer": "tok/"})
    assert spec.tokenizer == "tok/" and spec.to_yaml()["tokenizer"] == "tok/"
    with pytest.raises(ValueError, match="tokenizer must be a tokenizer directory or tokenizer.json path"):
        ModelSpec.parse({"name": "smollm2-135m", "init": "random", "tokenizer": 3})
    # a path that is not there is said so at once (it was looked up on the hub, retries and all)
    (tmp_path / "run.yaml").write_text("model: {name: smollm2-135m, init: random, tokenizer: nothere}\n"
                                       "data: {train: train.json}\n")
    line = assert_one_line_error(*cli("train", tmp_path / "run.yaml", "--dry-run", cwd=tmp_path), expected_code=2)
    assert line == (f"error: {tmp_path / 'run.yaml'}: model.tokenizer: {tmp_path / 'nothere'} does not exist; name a "
                    "tokenizer directory or tokenizer.json file (relative to the config)")


def test_generation_feeds_a_prompt_without_the_eos_its_tokenizer_appends(tmp_path):
    """A tokenizer whose post-processor writes "<s> $A </s>" (Llama 2 with add_eos_token): training's prompts end
    before the response, with no </s>, and `lora generate` feeds the prompt that way (it fed "<s> prompt </s>",
    asking the model to go on after an end of text). Greedy output equals transformers' generate on those ids."""
    from helpers import FAMILY_SIZES, build_metaspace_tokenizer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**FAMILY_SIZES, "vocab_size": 512})
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path)
    special = build_metaspace_tokenizer(tmp_path, eos_after=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "The quick"
    whole = tok(text)["input_ids"]
    assert whole[0] == special["<s>"] and whole[-1] == special["</s>"]
    prompt = whole[:-1]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           max_new_tokens=6, do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
    code, out, err = cli("generate", "--model", tmp_path, "--no-template", "--max-new-tokens", "6", "-q", text)
    assert code == 0, err
    assert out == tok.decode(want, skip_special_tokens=False) + "\n"
