"""The single-file adapter and PEFT import/export: round trips, sizes, and bad inputs."""

import copy
import json
import warnings

import pytest
import torch

from lora_cli.adapter import attach_adapter, export_peft, load_adapter, save_adapter
from lora_cli.pretrained import load_model
from lora_cli.config import LoraConfig
from lora_cli.errors import AdapterError, ConfigError
from lora_cli.lora import adapter_state_dict, apply_lora, count_parameters, estimate_adapter_bytes
from lora_cli.models import GPT2, GPT2_PRESETS

from helpers import ids_batch, make_hf_gpt2

peft = pytest.importorskip("peft")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

CONFIGS = {
    # slices (exported to PEFT as one c_attn adapter of rank 2r) beside a plain target -> rank_pattern
    "slices": dict(r=4, alpha=8, targets=["attn.q", "attn.v", "mlp.c_fc"], bias="lora_only", modules_to_save=["ln_f"]),
    "dora": dict(r=8, alpha=16, targets=["attn.c_attn", "c_proj"], use_dora=True, use_rslora=True, bias="all"),
    "kv-rslora": dict(r=2, alpha=3, targets=["attn.k", "attn.v"], use_rslora=True, layers=[1]),
}
META = {"task": "causal_lm", "prompt_template": "Q: {prompt}\nA:", "training": {"steps": 3, "val_loss": 1.25}}


def logits(model, ids):
    with torch.no_grad():
        return model.logits(model(ids))


def trained(path, cfg, seed=1):
    """A base with LoRA applied and random non-zero adapter weights (as after some training)."""
    base = load_model(str(path))
    apply_lora(base.model, LoraConfig(dropout=0.0, **cfg), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_state_dict(base.model).items():
            if "lora_A" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    base.model.eval()
    return base


def peft_load(hf, out_dir):
    """PeftModel.from_pretrained, failing on PEFT's missing-key warning or any unexpected key."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out_dir)).eval()
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
    # from_pretrained warns on missing keys only: the file must hold exactly the keys PEFT itself would save.
    written = load_file(str(out_dir / "adapter_model.safetensors"))
    expected = peft.get_peft_model_state_dict(model)
    assert sorted(written) == sorted(expected)
    assert all(written[k].shape == expected[k].shape for k in written)
    assert peft.set_peft_model_state_dict(model, written).unexpected_keys == []
    return model


# --------------------------------------------------------------------------------------------------- our file


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_attach_round_trip(tiny, tmp_path, name):
    path, _ = tiny
    base = trained(path, CONFIGS[name])
    file = save_adapter(tmp_path / "adapter.safetensors", base.model, {"base_model": base.describe(), **META})
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary file left behind

    expected = adapter_state_dict(base.model)
    with safe_open(str(file), "pt") as f:
        assert sorted(f.keys()) == sorted(expected)
        header = f.metadata()
    assert header["format"] == "pt" and header["format_version"] == "1" and header["tokenizer"] == "gpt2"
    assert header["task"] == "causal_lm" and header["prompt_template"] == "Q: {prompt}\nA:"
    lora = json.loads(header["lora"])
    assert lora["targets"] == base.model.lora_settings["targets"] and lora["r"] == CONFIGS[name]["r"]
    assert json.loads(header["base_model"])["fingerprint"] == base.fingerprint

    adapter = load_adapter(file)
    assert adapter.metadata["training"] == {"steps": 3, "val_loss": 1.25}
    assert adapter.base_model == base.describe() and adapter.kind == "lora-cli"
    fresh = load_model(str(path))
    model = attach_adapter(fresh, adapter).eval()
    assert torch.equal(logits(model, ids_batch(T=9)), logits(base.model, ids_batch(T=9)))
    assert count_parameters(model) == count_parameters(base.model)
    assert load_adapter(tmp_path).path == file  # a run directory holding adapter.safetensors works too
    # the same adapter saved again is the same file, byte for byte (safetensors wrote its metadata map in an order
    # of its own each time), and it is a file safetensors reads as its own
    again = save_adapter(tmp_path / "again.safetensors", base.model, {"base_model": base.describe(), **META})
    assert again.read_bytes() == file.read_bytes()
    raw = file.read_bytes()
    stored = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    assert list(stored) == sorted(header) and len(header) > 5


def test_bf16_adapter(tiny, tmp_path):
    path, _ = tiny
    base = trained(path, CONFIGS["dora"])
    file = save_adapter(tmp_path / "a.safetensors", base.model, {"base_model": base.describe()}, dtype="bf16")
    adapter = load_adapter(file)
    assert {t.dtype for t in adapter.tensors.values()} == {torch.bfloat16}
    model = attach_adapter(load_model(str(path)), adapter).eval()
    assert (logits(model, ids_batch(T=9)) - logits(base.model, ids_batch(T=9))).abs().max().item() < 0.05


@pytest.mark.parametrize("dtype,per_param", [("fp32", 4), ("bf16", 2)])
def test_gpt2_c_attn_r8_file_size(tmp_path, dtype, per_param):
    with torch.device("meta"):
        model = GPT2(GPT2_PRESETS["gpt2"])
    model = model.to_empty(device="cpu")  # the base weights' values do not enter the adapter file
    apply_lora(model, LoraConfig(r=8, targets=["attn.c_attn"]), generator=torch.Generator().manual_seed(0))
    estimate = estimate_adapter_bytes(model, dtype)
    base = {"source": "random", "name": "gpt2", "revision": None, "fingerprint": "0123456789abcdef"}
    file = save_adapter(tmp_path / "a.safetensors", model, {"base_model": base, **META}, dtype=dtype)
    size = file.stat().st_size
    assert abs(size - 294_912 * per_param) <= 64 * 1024
    assert abs(estimate - size) <= 1024


# ----------------------------------------------------------------------------------------------------- PEFT


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_loads_in_peft_with_the_same_logits(tiny, tmp_path, name):
    path, hf = tiny
    base = trained(path, CONFIGS[name])
    file = save_adapter(tmp_path / "a.safetensors", base.model, {"base_model": base.describe(), **META})
    out = export_peft(file, tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["peft_type"] == "LORA"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert all(k.startswith("base_model.model.") for k in f.keys())
    theirs = peft_load(hf, out)
    ids = ids_batch(T=9)
    ours = logits(base.model, ids)
    diff = (theirs(input_ids=ids).logits.detach() - ours).abs().max().item()
    assert diff <= 1e-5
    # and back: the exported directory read by us gives the same model again
    again = attach_adapter(load_model(str(path)), out).eval()
    assert (logits(again, ids) - ours).abs().max().item() <= 1e-5


def test_slices_export_as_one_c_attn_adapter(tiny, tmp_path):
    path, _ = tiny
    base = trained(path, CONFIGS["slices"])
    out = export_peft(save_adapter(tmp_path / "a.safetensors", base.model, {}), tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"][:2] == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    assert config["rank_pattern"] == {"transformer.h.0.attn.c_attn": 8, "transformer.h.1.attn.c_attn": 8}
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        B = f.get_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight")
        assert tuple(f.get_tensor("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight").shape) == (8, 64)
        ln_f = f.get_tensor("base_model.model.transformer.ln_f.weight")
    assert tuple(B.shape) == (192, 8)
    assert B[:64, 4:].abs().max() == 0 and B[64:128].abs().max() == 0 and B[128:, :4].abs().max() == 0
    assert B[:64, :4].abs().max() > 0 and B[128:, 4:].abs().max() > 0
    assert ln_f.shape == (64,)


def test_peft_saved_adapter_loaded_by_us(tiny, tmp_path):
    path, hf = tiny
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True,
                          bias="lora_only", modules_to_save=["ln_f"], rank_pattern={"h.1.attn.c_attn": 6},
                          alpha_pattern={"c_fc": 3}, lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(hf), cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad and "lora_A" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.eval()
    ids = ids_batch(T=9)
    want = theirs(input_ids=ids).logits.detach()
    for safe in (True, False):  # adapter_model.safetensors and adapter_model.bin
        d = tmp_path / f"peft-{safe}"
        theirs.save_pretrained(str(d), safe_serialization=safe)
        adapter = load_adapter(d)
        assert adapter.kind == "peft" and adapter.lora.use_dora
        assert adapter.rank_pattern == {"transformer.h.1.attn.c_attn": 6}
        assert adapter.alpha_pattern == {"transformer.h.0.mlp.c_fc": 3.0, "transformer.h.1.mlp.c_fc": 3.0}
        assert adapter.lora.modules_to_save == ["transformer.ln_f"]
        model = attach_adapter(load_model(str(path)), adapter).eval()
        assert (logits(model, ids) - want).abs().max().item() <= 1e-5


def test_a_peft_adapter_with_bias_all_and_a_saved_module_loads(tiny, tmp_path):
    """bias="all" with modules_to_save: PEFT's file holds the saved module's bias three times (X.bias,
    X.modules_to_save.bias, X.original_module.bias); it was refused as holding unexpected tensors."""
    path, hf = tiny
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="all",
                          modules_to_save=["ln_f"], lora_dropout=0.0)
    theirs = peft.get_peft_model(copy.deepcopy(hf), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    theirs.eval()
    ids = ids_batch(T=9)
    want = theirs(input_ids=ids).logits.detach()
    theirs.save_pretrained(str(tmp_path / "peft"))
    assert "base_model.model.transformer.ln_f.original_module.bias" in load_file(
        str(tmp_path / "peft" / "adapter_model.safetensors"))
    model = attach_adapter(load_model(str(path)), load_adapter(tmp_path / "peft")).eval()
    assert (logits(model, ids) - want).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------------- bad inputs


def saved(tiny, tmp_path, cfg=None):
    path, _ = tiny
    base = trained(path, cfg or dict(r=8, targets=["attn.c_attn"]))
    return save_adapter(tmp_path / "a.safetensors", base.model, {"base_model": base.describe()})


def test_a_peft_export_keeps_how_the_data_was_encoded(tiny, tmp_path):
    """Format, columns, prompt template, mask_prompt and max_length ride in the export's weights header (PEFT
    ignores it): lora-cli reads the export back with the settings it was trained with, not the defaults."""
    from lora_cli.inference import DataSettings

    path, _ = tiny
    base = trained(path, dict(r=8, targets=["attn.c_attn"]))
    data = {"format": "prompt_completion", "columns": {"prompt": "q", "completion": "a"},
            "prompt_template": "Q: {q} => ", "mask_prompt": False, "max_length": 48}
    file = save_adapter(tmp_path / "a.safetensors", base.model, {"base_model": base.describe(), "data": data})
    back = load_adapter(export_peft(file, tmp_path / "peft"))
    assert DataSettings.from_adapter(back) == DataSettings.from_adapter(load_adapter(file))
    assert DataSettings.from_adapter(back).prompt_template == "Q: {q} => "
    # settings a training run could not have written are refused as they are in our own files
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    from safetensors.torch import save_file

    save_file(tensors, str(weights), metadata={"format": "pt", "lora_cli_data": json.dumps(
        {**data, "prompt_template": "{a.__class__}"})})
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: the adapter's settings are damaged "
                                           r"\(data.prompt_template \"\{a.__class__\}\": field \{a.__class__\} is not a "
                                           r"plain \{name\} field\); export it again$"):
        load_adapter(tmp_path / "peft")


def test_truncated_adapter_file(tiny, tmp_path):
    file = saved(tiny, tmp_path)
    data = file.read_bytes()
    for cut in (len(data) // 2, 6):
        file.write_bytes(data[:cut])
        with pytest.raises(AdapterError) as err:
            load_adapter(file)
        assert str(err.value).startswith(f"cannot load adapter {file}: it is truncated, corrupt, or not a safetensors file")
        assert "\n" not in str(err.value)


def test_a_non_finite_adapter_is_refused_by_every_reader(tiny, tmp_path):
    """A NaN in a LoRA matrix: attaching it (eval, merge, generate, GGUF) and exporting it to PEFT are refused
    alike, and no export is written (one was, which every command then refused)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = saved(tiny, tmp_path)
    with safe_open(str(file), "pt") as fh:
        metadata, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(file), metadata=metadata)
    message = f"adapter {file}: tensor {key} is not finite floating point; the file is corrupt"
    with pytest.raises(AdapterError) as err:
        attach_adapter(load_model(str(tiny[0])), file)
    assert str(err.value) == message
    with pytest.raises(AdapterError) as err:
        export_peft(file, tmp_path / "peft")
    assert str(err.value) == message and not (tmp_path / "peft").exists()


def test_adapter_for_another_base_fingerprint(tiny, tmp_path):
    file = saved(tiny, tmp_path)
    other = tmp_path / "other"
    make_hf_gpt2(other, seed=4)  # same shapes, other weights
    with pytest.raises(AdapterError) as err:
        attach_adapter(load_model(str(other)), file)
    assert "was trained on base model" in str(err.value)
    assert "load the adapter's base model, or pass --allow-mismatch to use it anyway" in str(err.value)
    attach_adapter(load_model(str(other)), file, allow_mismatch=True)  # the explicit override


def test_adapter_for_another_base_shape(tiny, tmp_path):
    file = saved(tiny, tmp_path)
    wider = tmp_path / "wider"
    make_hf_gpt2(wider, seed=0, n_embd=96)
    with pytest.raises(AdapterError) as err:
        attach_adapter(load_model(str(wider)), file, allow_mismatch=True)  # shapes cannot be overridden
    assert "tensor transformer.h.0.attn.c_attn.lora_A.weight has shape [8, 64], the model needs [8, 96]" in str(err.value)
    deeper = tmp_path / "deeper"
    make_hf_gpt2(deeper, seed=0, n_layer=3)
    file3 = save_adapter(tmp_path / "deep.safetensors", trained(deeper, dict(r=2, targets=["attn.c_attn"])).model, {})
    with pytest.raises(AdapterError, match="it adapts transformer.h.2.attn.c_attn, which that model does not have"):
        attach_adapter(load_model(str(tiny[0])), file3)


def test_peft_dir_problems(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match="has no adapter_config.json; a PEFT adapter directory needs adapter_config.json"):
        load_adapter(empty)
    (empty / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    with pytest.raises(AdapterError, match="has adapter_config.json but no adapter_model.safetensors or adapter_model.bin"):
        load_adapter(empty)
    (empty / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="peft_type is 'IA3'; lora-cli reads LoRA adapters only"):
        load_adapter(empty)
    out = export_peft(saved(tiny, tmp_path), tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"c_attn(": 4}}))
    with pytest.raises(AdapterError, match="cannot honour rank_pattern key 'c_attn\\('"):
        load_adapter(out)
    (out / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"h.0.attn.c_attn": 4}}))
    with pytest.raises(AdapterError, match="lora_A has rank 8 but adapter_config.json gives r=4"):
        load_adapter(out)
    (out / "adapter_config.json").write_text(json.dumps({**config, "layer_replication": [[0, 1]]}))
    with pytest.raises(AdapterError, match="layer_replication = \\[\\[0, 1\\]\\] is not supported"):
        load_adapter(out)
    # LoRA variants with tensors or a forward of their own: named, not reported as a base that does not fit
    for key, value in (("velora_config", {"rank": 1}), ("kasa_config", {"enabled": True}),
                       ("monteclora_config", {"n": 2}), ("arrow_config", {"top_k": 2})):
        (out / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(AdapterError) as err:
            load_adapter(out)
        assert str(err.value) == (f"{out / 'adapter_config.json'}: {key} = {value!r} is not supported by lora-cli; "
                                  "export the adapter without it")


def test_other_bad_paths(tiny, tmp_path):
    with pytest.raises(AdapterError, match="does not exist; pass an adapter .safetensors file or a PEFT adapter directory"):
        load_adapter(tmp_path / "nope.safetensors")
    with pytest.raises(AdapterError, match="is not a lora-cli adapter"):
        load_adapter(tiny[0] / "model.safetensors")
    file = saved(tiny, tmp_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    # an output path that cannot be used is a flag problem (exit 2), as for merge and GGUF exports
    with pytest.raises(ConfigError, match="exists and holds other files \\(notes.txt\\)"):
        export_peft(file, busy)
    assert (busy / "notes.txt").read_text() == "mine"
    out = export_peft(file, tmp_path / "peft")
    with pytest.raises(ConfigError, match="peft already exists; choose a new directory or pass --overwrite to "
                                           "replace it$"):
        export_peft(file, out)
    assert export_peft(file, out, overwrite=True) == out  # a previous export is replaced
    # a folder of a user's README.md (or a chat template) alone is no earlier export: --overwrite deleted it
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("my notes")
    with pytest.raises(ConfigError, match="notes holds no adapter_config.json, so it is no earlier export that "
                                          "--overwrite would replace; choose a new or empty output directory$"):
        export_peft(file, notes, overwrite=True)
    assert (notes / "README.md").read_text() == "my notes"
