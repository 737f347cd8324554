"""`lora merge`, `lora export` (PEFT) and classifiers on the families beyond GPT-2, against transformers and PEFT on
tiny random checkpoints with a tokenizer.json beside them: the merged directory loads in AutoModelForCausalLM /
AutoModelForSequenceClassification and AutoTokenizer with our logits, config and tokenizer files carried over;
PEFT loads our export on the transformers base and its loss equals `lora eval`'s on the exported directory; an
adapter of one family on another is one line."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from helpers import alpaca_rows, assert_one_line_error, build_tokenizer, cli, make_family_checkpoint, make_hf_gpt2, rel
from lora_cli.adapter import attach_adapter, check_fits, export_peft, load_adapter, save_adapter
from lora_cli.config import LoraConfig
from lora_cli.errors import CheckpointError
from lora_cli.lora import apply_lora, with_classification_head
from lora_cli.merge import merge_adapter
from lora_cli.models import last_token_hidden
from lora_cli.pretrained import load_model
from lora_cli.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("tokenizers")

V = 400  # build_tokenizer's vocabulary
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt_neox"]
TARGETS = {"gpt_neox": ["attention.query_key_value", "mlp.dense_4h_to_h"]}
LLAMA_TARGETS = ["q_proj", "v_proj", "mlp.down_proj"]
CARRIED = ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]


def make_adapter(base_dir, path, task="causal_lm", seed=0, **lora):
    """An adapter on base_dir's model with random (non-zero) B, saved as `lora train` saves it."""
    base = load_model(str(base_dir))
    family = base.model.config.model_type
    cfg = LoraConfig(**{"r": 4, "alpha": 8, "dropout": 0.0, "targets": TARGETS.get(family, LLAMA_TARGETS), **lora})
    g = torch.Generator().manual_seed(seed)
    metadata = {"base_model": base.describe(), "task": task}
    if task == "classification":
        cfg = with_classification_head(base.model, cfg, 3, g)
        metadata["data"] = {"format": "classification", "labels": ["a", "b", "c"]}
    apply_lora(base.model, cfg, generator=g)
    with torch.no_grad():
        for name, p in base.model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(path, base.model, metadata)
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, base directory with tokenizer files, adapter file)."""
    root = tmp_path_factory.mktemp(request.param)
    make_family_checkpoint(root / "base", request.param, vocab_size=V)
    build_tokenizer(root / "base", bos=request.param in ("llama", "mistral", "gpt_neox"))
    return request.param, root / "base", make_adapter(root / "base", root / "adapter.safetensors")


IDS = torch.randint(3, V, (2, 13), generator=torch.Generator().manual_seed(0))  # no special token (pad, eos)


def our_logits(base_dir, adapter):
    model = attach_adapter(load_model(str(base_dir)), adapter).eval()
    with torch.no_grad():
        return model, model.logits(model(IDS))


def test_merge_loads_in_transformers_with_equal_logits_and_carried_files(family, tmp_path):
    name, base_dir, adapter = family
    merge_adapter(adapter, tmp_path / "merged")
    out = tmp_path / "merged"
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "config.json", "model.safetensors", *CARRIED])
    for f in CARRIED:  # carried over unchanged from the base
        assert (out / f).read_text() == (base_dir / f).read_text()
    config, base_config = (json.loads((d / "config.json").read_text()) for d in (out, base_dir))
    assert config == base_config  # the checkpoint's own fields (fp32 as it was)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    _, ours = our_logits(base_dir, adapter)
    with torch.no_grad():
        theirs = hf(input_ids=IDS).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()(input_ids=IDS).logits
    assert (theirs - ours).abs().max().item() <= 1e-4
    assert (base - theirs).abs().max().item() > 1e-3  # the merge changed the model
    text = "naïve café — 東京 says hello, world"
    assert (transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
            == load_tokenizer(base_dir).encode(text, add_special_tokens=True))
    again = load_model(str(out)).model.eval()  # our loader reads it back
    with torch.no_grad():
        assert (again.logits(again(IDS)) - ours).abs().max().item() <= 1e-5
    assert f"{config['architectures'][0]}.from_pretrained" in (out / "README.md").read_text()


@pytest.mark.parametrize("family", ["qwen3"], indirect=True)  # one family is enough
def test_bf16_merge_records_its_dtype(family, tmp_path):
    name, base_dir, adapter = family
    merge_adapter(adapter, tmp_path / "m", dtype="bf16")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert {config.get(k) for k in ("torch_dtype", "dtype")} - {None} == {"bfloat16"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    _, ours = our_logits(base_dir, adapter)
    with torch.no_grad():
        assert (hf(input_ids=IDS).logits - ours).abs().max().item() <= 0.1


def hand_loss(model, tok, rows) -> tuple[float, int]:
    """Mean loss of `model` (transformers' interface) on Alpaca rows encoded as `lora eval` does: [bos] + prompt,
    then response + eos scored."""
    from lora_cli.data.formats import render_prompt

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tok.encode(render_prompt(row, "alpaca"), add_special_tokens=True)
            response = tok.encode(row["output"]) + [tok.eos_id]
            x = torch.tensor([prompt + response])
            logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, len(prompt) - 1:-1].double()
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(response), reduction="sum").item()
            count += len(response)
    return total / count, count


def test_peft_loads_the_export_and_its_loss_equals_lora_eval(family, tmp_path):
    name, base_dir, adapter = family
    export_peft(adapter, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False and config["task_type"] == "CAUSAL_LM"
    assert all(t.startswith("gpt_neox.layers." if name == "gpt_neox" else "model.layers.")
               for t in config["target_modules"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    _, ours = our_logits(base_dir, adapter)
    with torch.no_grad():
        assert (theirs(input_ids=IDS).logits - ours).abs().max().item() <= 1e-5

    rows = alpaca_rows(with_input=False, repeat=1)
    (tmp_path / "val.json").write_text(json.dumps(rows))
    code, out, err = cli("eval", "--adapter", tmp_path / "peft", "--model", base_dir, "--data", tmp_path / "val.json",
                         "--json", "-q")
    assert code == 0, err
    result = json.loads(out)
    loss, count = hand_loss(theirs, load_tokenizer(base_dir), rows)
    assert result["tokens"] == count
    assert rel(torch.tensor(result["loss"]), torch.tensor(loss)) <= 1e-4


def test_dora_and_rslora_export_to_peft_on_qwen2(tmp_path):
    make_family_checkpoint(tmp_path / "base", "qwen2", vocab_size=V)
    adapter = make_adapter(tmp_path / "base", tmp_path / "a.safetensors", use_dora=True, use_rslora=True)
    export_peft(adapter, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    _, ours = our_logits(tmp_path / "base", adapter)
    _, again = our_logits(tmp_path / "base", tmp_path / "peft")  # and our import of the export
    with torch.no_grad():
        assert (theirs(input_ids=IDS).logits - ours).abs().max().item() <= 1e-5
    assert (again - ours).abs().max().item() <= 1e-6


# ------------------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt_neox"])
def test_classifier_merges_and_exports_as_transformers_sequence_classifier(tmp_path, name):
    make_family_checkpoint(tmp_path / "base", name, vocab_size=V)
    build_tokenizer(tmp_path / "base", bos=name == "llama")
    adapter = make_adapter(tmp_path / "base", tmp_path / "cls.safetensors", task="classification")
    model = attach_adapter(load_model(str(tmp_path / "base")), adapter).eval()
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        ours = model.score(last_token_hidden(model(IDS, mask), mask))  # [B, 3]

    merge_adapter(adapter, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c"}
    tok = load_tokenizer(tmp_path / "base")
    assert config["pad_token_id"] == (tok.pad_id if tok.pad_id is not None else tok.eos_id)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == config["architectures"][0]
    # its tokenizer pads with the config's pad id (it had no pad token: padding=True and batched pipelines failed)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert hf_tok.pad_token_id == config["pad_token_id"]
    assert hf_tok(["a b c", "a"], padding=True)["input_ids"][1][-1] == config["pad_token_id"]
    with torch.no_grad():
        assert (merged(input_ids=IDS).logits - ours).abs().max().item() <= 1e-4
    # lora-cli reads the merged directory back as a base (its body) where the head is the tied embedding; an untied
    # head is not in it: one line saying so, loading and for `lora info` (weights=False) alike
    if model.tied:
        assert load_model(str(tmp_path / "merged")).model.tied
    else:
        head = "embed_out" if name == "gpt_neox" else "lm_head"
        for weights in (True, False):
            with pytest.raises(CheckpointError, match=f"is a merged classifier without the {head} its base has: "
                                                      "lora-cli reads a merged classifier as a base model only when"):
                load_model(str(tmp_path / "merged"), weights=weights)

    export_peft(adapter, tmp_path / "peft")
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["task_type"] == "SEQ_CLS" and peft_config["modules_to_save"] == ["score"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", num_labels=3, pad_token_id=config["pad_token_id"]).eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    with torch.no_grad():
        assert (theirs(input_ids=IDS).logits - ours).abs().max().item() <= 1e-5


def test_classifier_of_an_eos_appending_tokenizer_pools_the_same_token_in_transformers(tmp_path):
    """A tokenizer that writes </s> after every text (post-processor "<s> $A </s>") and names no pad token: the
    merged classifier's pad_token_id is not </s> (transformers would take the appended </s> for padding and pool
    the token before it); transformers' logits on the tokenizer's own ids equal ours, padded batches included."""
    from helpers import build_metaspace_tokenizer

    make_family_checkpoint(tmp_path / "base", "mistral", vocab_size=512)
    special = build_metaspace_tokenizer(tmp_path / "base", eos_after=True)
    adapter = make_adapter(tmp_path / "base", tmp_path / "cls.safetensors", task="classification")
    merge_adapter(adapter, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["pad_token_id"] == special["<s>"]
    texts = ["the cat sat down", "a dog"]
    tok = load_tokenizer(tmp_path / "base")
    ids = [tok.encode(t, add_special_tokens=True) for t in texts]
    assert ids[1][-1] == special["</s>"]
    model = attach_adapter(load_model(str(tmp_path / "base")), adapter).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"][1].tolist()[:len(ids[1])] == ids[1]
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        ours = torch.cat([model.score(last_token_hidden(model(torch.tensor([i])), torch.ones(1, len(i))))
                          for i in ids])
        theirs = merged(**batch).logits
    assert (theirs - ours).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("family", ["llama"], indirect=True)  # one family is enough
def test_adapter_of_another_family_is_one_line(family, tmp_path):
    name, base_dir, adapter = family
    make_hf_gpt2(tmp_path / "gpt2")
    words = "Llama-family \\(llama, mistral, qwen2, qwen3\\)"
    for command in (["eval", "--data", tmp_path / "d.json"], ["generate", "hi"], ["merge", "--out", tmp_path / "m"]):
        (tmp_path / "d.json").write_text(json.dumps(alpaca_rows(repeat=1)))
        code, out, err = cli(*command, "--adapter", adapter, "--model", tmp_path / "gpt2")
        assert_one_line_error(code, out, err)
        assert re.search(rf"adapter {adapter} was trained on a {words} model, but base model {tmp_path / 'gpt2'} is "
                         rf"a GPT-2 model; load the adapter onto its own base model", err), err
    assert not (tmp_path / "m").exists()


def test_bad_checkpoints_are_one_line_exit_1_on_the_command_line(tmp_path):
    """An unsupported model_type, a missing or corrupt tokenizer.json, a tokenizer larger than the embedding."""
    make_family_checkpoint(tmp_path / "ok", "qwen2", vocab_size=V)
    build_tokenizer(tmp_path / "ok", bos=False)
    cases = {}
    for case in ("mamba", "no-tokenizer", "corrupt", "small-vocab"):
        shutil.copytree(tmp_path / "ok", tmp_path / case)
        cases[case] = tmp_path / case
    config = json.loads((cases["mamba"] / "config.json").read_text())
    (cases["mamba"] / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    (cases["no-tokenizer"] / "tokenizer.json").unlink()
    (cases["corrupt"] / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    make_family_checkpoint(cases["small-vocab"], "qwen2", vocab_size=300)  # the tokenizer has 400 tokens
    expected = {
        "mamba": r"model_type 'mamba' is not supported; supported: gpt2, llama, mistral, qwen2, qwen3, gpt_neox",
        "no-tokenizer": r"has no tokenizer.json; pass a model directory with its tokenizer files",
        "corrupt": r"tokenizer.json: it is not a tokenizer.json that the tokenizers library can load",
        "small-vocab": r"the tokenizer \(.*tokenizer.json, vocabulary 400\) has more tokens than model .* has embedding "
                       r"rows \(300\)",
    }
    for case, path in cases.items():
        code, out, err = cli("generate", "--model", path, "--max-new-tokens", "2", "hello")
        assert_one_line_error(code, out, err)
        assert re.search(expected[case], err), (case, err)


def test_peft_saved_modules_by_suffix_and_tied_weights(tmp_path):
    """PEFT names saved modules by a plain suffix (`norm`: every *norm); a head tied to the embedding is refused
    when PEFT unties it, and read when it keeps it tied (ensure_weight_tying), as lora-cli computes it."""
    from lora_cli.errors import AdapterError

    hf = make_family_checkpoint(tmp_path / "base", "llama", vocab_size=V)  # tied embeddings
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    for name, saved, tying in (("norm", ["norm"], False), ("tied", ["lm_head"], True), ("untied", ["lm_head"], False)):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=saved,
                                 init_lora_weights=False, ensure_weight_tying=tying)
        model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "modules_to_save" in n:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
            want = model(input_ids=ids).logits
        model.save_pretrained(tmp_path / name)
        base = load_model(str(tmp_path / "base"))
        if name == "untied":
            with pytest.raises(AdapterError, match=r"PEFT saved lm_head apart from the module its base ties it to "
                                                   r"\(it unties them: ensure_weight_tying is false\)"):
                attach_adapter(base, tmp_path / name)
            continue
        ours = attach_adapter(base, tmp_path / name).eval()
        with torch.no_grad():
            assert (ours.logits(ours(ids)) - want).abs().max().item() <= 1e-5, name
    # our own adapter saving a tied head: lora-cli computes it tied, PEFT could not, so it is not exported
    base = load_model(str(tmp_path / "base"))
    apply_lora(base.model, LoraConfig(r=4, alpha=8, targets=["q_proj"], modules_to_save=["lm_head"]))
    save_adapter(tmp_path / "mine.safetensors", base.model, {"base_model": base.describe()})
    with pytest.raises(AdapterError, match=r"saves lm_head whole, a module its base ties to another; PEFT unties"):
        export_peft(tmp_path / "mine.safetensors", tmp_path / "mine-peft")
    assert not (tmp_path / "mine-peft").exists()


def test_peft_lora_on_an_untied_head_with_its_saved_base_copy(tmp_path):
    """PEFT saves an adapted head's base weight beside its LoRA (save_embedding_layers): a copy of the base's, read
    past; the logits equal PEFT's."""
    make_family_checkpoint(tmp_path / "base", "qwen3", vocab_size=V)  # untied
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), config)
    model.save_pretrained(tmp_path / "peft")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.lm_head.base_layer.weight" in f.keys()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    check_fits(load_model(str(tmp_path / "base")), load_adapter(tmp_path / "peft"))  # lora eval's check, on a meta copy
    ours = attach_adapter(load_model(str(tmp_path / "base")), tmp_path / "peft").eval()
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - model(input_ids=ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("lora", [{"targets": ["attention.query_key_value", "embed_out"]},
                                  {"targets": ["attention.query_key_value"], "modules_to_save": ["embed_out"]}])
def test_gpt_neox_head_is_lm_head_to_peft_and_back(tmp_path, lora):
    """transformers 5 builds GPT-NeoX's output projection as lm_head (its checkpoint, and lora-cli, say embed_out):
    the export names it so for PEFT, and a PEFT adapter naming it so loads back with PEFT's logits."""
    make_family_checkpoint(tmp_path / "base", "gpt_neox", vocab_size=V)
    adapter = make_adapter(tmp_path / "base", tmp_path / "a.safetensors", **lora)
    export_peft(adapter, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "lm_head" in (config["target_modules"] + (config["modules_to_save"] or []))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    _, ours = our_logits(tmp_path / "base", adapter)
    _, back = our_logits(tmp_path / "base", tmp_path / "peft")
    with torch.no_grad():
        want = theirs(input_ids=IDS).logits
    assert (want - ours).abs().max().item() <= 1e-5 and (back - ours).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", ["qwen3", "gpt_neox", "llama"])
def test_classifier_parameter_counts_equal_peft(tmp_path, name):
    """A classifier's counts (lora info, lora train) equal PEFT's on transformers' *ForSequenceClassification: the
    same trainable parameters, and the same total less the copy of the score head PEFT keeps for modules_to_save.
    An untied base's language-model head, which the classifier never uses, is not counted (it was)."""
    from lora_cli.lora import count_parameters

    make_family_checkpoint(tmp_path / "base", name, vocab_size=V)
    net = load_model(str(tmp_path / "base")).model
    cfg = LoraConfig(r=4, alpha=8, targets=["all-linear"])
    apply_lora(net, with_classification_head(net, cfg, 3, torch.Generator().manual_seed(0)))
    trainable, total = count_parameters(net)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    task_type="SEQ_CLS"))
    peft_trainable, peft_total = model.get_nb_trainable_parameters()
    copy = sum(p.numel() for n, p in model.named_parameters() if "score.original_module" in n)
    assert copy == 3 * net.config.n_embd and (trainable, total) == (peft_trainable, peft_total - copy)
