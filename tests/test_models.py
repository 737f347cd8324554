"""The model families beyond GPT-2 (Llama, Mistral, Qwen2, Qwen3, GPT-NeoX) against transformers and PEFT, on tiny
random checkpoints saved with `save_pretrained`: logits with and without padding, the padding-free and
shared-prefix paths, KV-cached greedy decoding, LoRA logits, gradients and counts, sharded and hub-cache loading,
random presets, and one-line errors for what is not supported."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from helpers import FAMILY_SIZES, child_env, cli, make_family_checkpoint as make_checkpoint, offline_hub_repo, python
from lora_cli.pretrained import load_model
from lora_cli.config import LoraConfig, ModelSpec
from lora_cli.errors import CheckpointError, ConfigError
from lora_cli.lora import (adapter_state_dict, apply_lora, count_parameters, resolve_targets, shorthands,
                           target_candidates)
from lora_cli.models import add_classification_head

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = FAMILY_SIZES["vocab_size"]


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gpt_neox_sequential"]
# Two LoRA target sets per family: (ours, PEFT's target_modules); all-linear leaves the output head out, as PEFT.
TARGETS = {
    "llama-style": [(["q_proj", "self_attn.v_proj"], ["q_proj", "v_proj"]),
                    (["all-linear"], "all-linear")],
    "gpt_neox": [(["attention.query_key_value"], ["query_key_value"]),
                 (["all-linear"], "all-linear")],
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, checkpoint directory, transformers model)."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, make_checkpoint(path, request.param)


def batch(seed: int = 0, B: int = 3, T: int = 11) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def masked_max(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return ((a - b).abs() * mask[..., None]).max().item()


# ------------------------------------------------------------------------------------------- parity


def test_logits_match_transformers_with_and_without_padding(family):
    _, path, hf = family
    ours = load_model(str(path)).model.eval()
    ids = batch()
    left = torch.ones_like(ids)
    left[1, :4] = 0
    left[2, :2] = 0
    right = torch.ones_like(ids)
    right[1, 7:] = 0
    right[2, 9:] = 0
    with torch.no_grad():
        plain = ours.logits(ours(ids))
        assert (plain - hf(input_ids=ids).logits).abs().max().item() <= 1e-4
        assert plain.abs().max().item() > 0.1
        for mask in (left, right):
            got = ours.logits(ours(ids, mask))
            assert masked_max(got, hf(input_ids=ids, attention_mask=mask).logits, mask) <= 1e-4


def test_unpadded_and_shared_prefix_paths_equal_the_padded_path(family):
    _, path, _ = family
    ours = load_model(str(path)).model.eval()
    ids = batch(seed=1, B=3, T=12)
    ids[:, :5] = ids[0, :5]  # a prefix common to every row
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1, 8:] = False
    keep[2, 10:] = False
    outputs = keep.clone()
    outputs[:, :6] = False  # the loss positions only
    with torch.no_grad():
        padded = ours(ids, keep.long())[keep]  # [N, C]
        for share in (False, True):
            ours.share_prefix = share
            assert (ours(ids, keep=keep) - padded).abs().max().item() <= 1e-5
            assert (ours(ids, keep=keep, outputs=outputs) - ours(ids, keep.long())[outputs]).abs().max().item() <= 1e-5


def test_kv_cached_greedy_decoding_equals_transformers_generate(family):
    from lora_cli.generate import generate

    _, path, hf = family
    ours = load_model(str(path)).model.eval()
    prompts = [batch(seed=2, B=1, T=7)[0].tolist(), batch(seed=3, B=1, T=4)[0].tolist()]
    got = generate(ours, prompts, 8, eos_id=None)  # one left-padded batch, KV cache
    for prompt, new in zip(prompts, got):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                          pad_token_id=0)
        assert new == ref[0, len(prompt):].tolist()
    assert generate(ours, prompts, 8, eos_id=None, use_cache=False) == got


def hf_names(names, family_name: str) -> list[str]:
    """transformers 5 calls GPT-NeoX's output head lm_head in the module tree; its checkpoints (and we) embed_out."""
    if not family_name.startswith(("gpt_neox", "pythia")):
        return list(names)
    return [n.replace("lm_head", "embed_out") if n.startswith("lm_head") else n for n in names]


def test_linear_names_and_parameter_counts_are_exact(family):
    name, path, hf = family
    ours = load_model(str(path)).model
    assert ours.linear_names() == hf_names((n for n, m in hf.named_modules() if isinstance(m, nn.Linear)), name)
    assert ours.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert set(ours.state_dict()) == set(hf_names(hf.state_dict(), name))


def _peft_pair(family_name: str, path, hf, targets, peft_targets, r=4):
    ours = load_model(str(path)).model.eval()
    apply_lora(ours, LoraConfig(r=r, alpha=2 * r + 3, dropout=0.0, targets=targets),
               generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:  # B = 0 at init: draw it, so parity is not trivially W x
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=r, lora_alpha=2 * r + 3, lora_dropout=0.0, target_modules=peft_targets)).eval()
    return ours, theirs


def our_key(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".default", "")


@pytest.mark.parametrize("which", [0, 1])
def test_lora_logits_gradients_and_counts_match_peft(family, which):
    name, path, hf = family
    targets, peft_targets = TARGETS["gpt_neox" if name.startswith("gpt_neox") else "llama-style"][which]
    ours, theirs = _peft_pair(name, path, hf, targets, peft_targets)
    assert count_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    state = adapter_state_dict(ours)
    copied = 0
    with torch.no_grad():
        for pname, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(state[our_key(pname)])
                copied += 1
    assert copied == len(state) > 0

    ids = batch(seed=4, B=2, T=10)
    a = ours.logits(ours(ids))
    b = theirs(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    labels = batch(seed=5, B=2, T=10)
    nn.functional.cross_entropy(a.flatten(0, 1), labels.flatten()).backward()
    nn.functional.cross_entropy(b.flatten(0, 1), labels.flatten()).backward()
    mine = dict(ours.named_parameters())
    for pname, p in theirs.named_parameters():
        if p.requires_grad:
            assert (mine[our_key(pname)].grad - p.grad).abs().max().item() <= 1e-5, pname


def test_lora_layers_select_blocks_and_shorthands_name_the_family(family):
    name, path, _ = family
    ours = load_model(str(path)).model
    prefix = "gpt_neox.layers" if name.startswith("gpt_neox") else "model.layers"
    picked = resolve_targets(ours, ["all-linear"], layers=[1])
    assert picked and all(n.startswith(f"{prefix}.1.") for n in picked)
    assert len(picked) == len(resolve_targets(ours, ["all-linear"])) // 2
    with pytest.raises(ConfigError, match=r"lora.layers: block 2 does not exist; the model has blocks 0-1"):
        resolve_targets(ours, ["all-linear"], layers=[2])
    with pytest.raises(ConfigError, match=rf"'attn.q' matches no linear layer; available: .*\(in {prefix}.0-1\)"):
        resolve_targets(ours, ["attn.q"])
    shorts = shorthands(ours)
    assert shorts[0] == "all-linear" and all(not s.startswith(prefix) for s in shorts)
    assert len(shorts) == 1 + len({n.split(".", 3)[3] for n in ours.linear_names() if n.startswith(prefix)})
    # no lora.targets: the modules PEFT adapts by default for this model_type
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    peft_default = PEFT_DEFAULTS[ours.config.model_type]
    assert resolve_targets(ours, None) == [n for n in ours.linear_names() if n.rsplit(".", 1)[-1] in peft_default]
    # a classifier answers through its score head: the language-model head is no target (LoRA there never trains)
    head = "embed_out" if name.startswith("gpt_neox") else "lm_head"
    assert (head in target_candidates(ours)) == (not ours.tied)
    add_classification_head(ours, 2)
    assert head not in target_candidates(ours) and "score" in target_candidates(ours)


# ------------------------------------------------------------------------------------------- loading


def test_sharded_checkpoint_loads_with_equal_logits(tmp_path):
    hf = make_checkpoint(tmp_path, "llama", max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = load_model(str(tmp_path)).model.eval()
    ids = batch()
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - hf(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_a_checkpoints_other_files_named_as_the_model_are_one_line(tmp_path):
    """The shard index or config.json of a checkpoint, or a GGUF export, named where the weights belong: what the
    file is, and what to pass instead (they were called truncated or corrupt); a weight_map naming no file name."""
    from lora_cli.errors import CheckpointError

    make_checkpoint(tmp_path, "llama", max_shard_size="40KB")
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    for name, what in (("model.safetensors.index.json", "shard index"), ("config.json", "config")):
        with pytest.raises(CheckpointError) as err:
            load_model(str(tmp_path / name), weights=False)
        assert str(err.value) == (f"{tmp_path / name} is the {what} of a checkpoint, not its weights; pass the "
                                  f"directory that holds it ({tmp_path})")
    with pytest.raises(CheckpointError, match=r"m.gguf is a GGUF file \(llama.cpp's format\), which lora-cli does not "
                                              r"read; pass the Hugging Face checkpoint it came from"):
        load_model(str(tmp_path / "m.gguf"))
    index = tmp_path / "model.safetensors.index.json"
    for shard in (3, "../model.safetensors", ""):
        index.write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
        with pytest.raises(CheckpointError) as err:
            load_model(str(tmp_path), weights=False)
        assert str(err.value) == (f"{index} is not a readable shard index (a JSON object with a weight_map): "
                                  f"weight_map names the shard {json.dumps(shard)}, not a file name")


def test_sharded_bin_checkpoint_loads_and_info_checks_every_shard(tmp_path):
    """pytorch_model.bin.index.json with .bin shards (older Llama and Mistral fine-tunes) loads as the safetensors
    shards do; `lora info` (no weights read) checks the shards of either kind, and names a missing one."""
    from safetensors.torch import load_file

    from lora_cli.errors import CheckpointError

    source = tmp_path / "st"
    hf = make_checkpoint(source, "llama", max_shard_size="40KB")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    binned = tmp_path / "bin"
    binned.mkdir()
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        tensors = load_file(source / shard)
        torch.save(tensors, binned / name)
        weight_map.update({k: name for k in tensors})
    (binned / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (binned / "config.json").write_text((source / "config.json").read_text())
    ids = batch()
    for folder in (source, binned):
        ours = load_model(str(folder)).model.eval()
        with torch.no_grad():
            assert (ours.logits(ours(ids)) - hf(input_ids=ids).logits).abs().max().item() <= 1e-4
        assert load_model(str(folder), weights=False).model.num_parameters() == ours.num_parameters()
    (binned / sorted(set(weight_map.values()))[-1]).unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin.index.json names shard pytorch_model-000\d\d-of-"
                                              r"000\d\d.bin, which is missing; download the checkpoint again"):
        load_model(str(binned), weights=False)


def test_sharded_checkpoint_loads_offline_from_the_hub_cache(tmp_path):
    source = tmp_path / "source"
    make_checkpoint(source, "qwen2", max_shard_size="40KB")
    revision = offline_hub_repo(tmp_path / "home", "test-org/tiny-qwen2", source)
    code = ("from lora_cli.pretrained import load_model; b = load_model('test-org/tiny-qwen2');"
            "print(b.source, b.revision, b.fingerprint, b.model.num_parameters())")
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    out = python("-c", code, env=env)
    assert out.returncode == 0, out.stderr
    direct = load_model(str(source))
    assert out.stdout.split() == ["hub", revision, direct.fingerprint, str(direct.model.num_parameters())]


def test_a_tied_config_over_a_stored_head_of_other_values_is_refused(tmp_path):
    """tie_word_embeddings true, and model.safetensors holds lm_head.weight: an equal copy loads as tied; other
    values are one line (transformers would keep that head untied; tying it would change the logits)."""
    from safetensors.torch import load_file, save_file

    from lora_cli.errors import CheckpointError

    make_checkpoint(tmp_path, "llama")  # tied, as the llama test config has it
    state = load_file(tmp_path / "model.safetensors")
    embed = state["model.embed_tokens.weight"]
    save_file({**state, "lm_head.weight": embed.clone()}, tmp_path / "model.safetensors")
    assert load_model(str(tmp_path)).model.tied
    save_file({**state, "lm_head.weight": embed + 1}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(str(tmp_path))
    assert str(err.value) == (
        f"{tmp_path}: config.json ties the output head to the input embedding (tie_word_embeddings: true), but the "
        "checkpoint stores an output head with other values; set tie_word_embeddings: false in config.json to use "
        "that head (as transformers does)")


def test_hub_id_at_revision_loads_from_the_cache_and_a_missing_revision_is_named(tmp_path):
    """owner/name@revision (a commit or a branch such as main) loads that revision from the cache; a revision the
    cache lacks is one line naming it and the download command that gets it."""
    source = tmp_path / "source"
    make_checkpoint(source, "qwen2")
    revision = offline_hub_repo(tmp_path / "home", "test-org/tiny", source)
    env = child_env(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    for name in (f"test-org/tiny@{revision}", "test-org/tiny@main", "test-org/tiny"):
        code, out, err = cli("info", name, "--json", env=env)
        assert code == 0, err
        assert (json.loads(out)["model"], json.loads(out)["revision"]) == ("test-org/tiny", revision)
    code, out, err = cli("info", "test-org/tiny@v2", env=env)
    assert code == 1 and err.strip() == (
        "error: model test-org/tiny (revision v2) could not be downloaded and is not in the Hugging Face cache "
        "(offline mode (HF_HUB_OFFLINE=1) is on and LocalEntryNotFoundError); download it once with `hf download "
        "test-org/tiny --revision v2` where there is internet, or pass a local directory or weights file")


# Published sizes (transformers' own count of the same config on the meta device is checked too).
PRESET_PARAMETERS = {"smollm2-135m": 134_515_008, "pythia-160m": 162_322_944}


@pytest.mark.parametrize("preset", ["smollm2-135m", "qwen2.5-0.5b", "qwen3-0.6b", "pythia-160m", "llama-3.2-1b"])
def test_random_presets_match_transformers_counts(preset):
    from lora_cli.pretrained import PRESET_DIR

    spec = ModelSpec.parse({"name": preset, "init": "random"})
    net = load_model(spec, weights=False).model
    raw = json.loads((PRESET_DIR / f"{preset}.json").read_text())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**raw))
    assert net.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert net.linear_names() == hf_names((n for n, m in hf.named_modules() if isinstance(m, nn.Linear)), preset)
    if preset in PRESET_PARAMETERS:
        assert net.num_parameters() == PRESET_PARAMETERS[preset]


def test_random_preset_with_overrides_runs():
    spec = ModelSpec.parse({"name": "smollm2-135m", "init": "random", "n_layer": 2, "n_embd": 72, "n_head": 3,
                            "seed": 5})
    base = load_model(spec)
    net = base.model
    assert (net.config.num_hidden_layers, net.config.hidden_size, net.config.num_attention_heads) == (2, 72, 3)
    assert net.tied and base.fingerprint == load_model(spec).fingerprint
    with torch.no_grad():
        out = net.logits(net(torch.tensor([[1, 2, 3]])))
    assert out.shape == (1, 3, 49152) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------- bad inputs


def _edited(tmp_path, family: str, **changes):
    make_checkpoint(tmp_path, family)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_unsupported_model_type_is_one_line(tmp_path):
    path = _edited(tmp_path, "llama", model_type="mamba")
    with pytest.raises(CheckpointError, match=r"config.json: model_type 'mamba' is not supported; supported: gpt2, "
                                              r"llama, mistral, qwen2, qwen3, gpt_neox$"):
        load_model(path)


def test_active_sliding_window_is_one_line(tmp_path):
    path = _edited(tmp_path, "mistral", sliding_window=16)
    with pytest.raises(CheckpointError, match=r"sliding-window attention \(sliding_window 16 < max_position_embeddings "
                                              r"128\) is not supported; supported: full causal attention"):
        load_model(path)


def test_qwen2_window_off_is_accepted(tmp_path):
    path = _edited(tmp_path, "qwen2", sliding_window=16, use_sliding_window=False)
    assert load_model(path).model.config.sliding_window == 16


@pytest.mark.parametrize("first_window_layer", [1, FAMILY_SIZES["num_hidden_layers"]])
def test_qwen2_window_slides_from_max_window_layers_on(tmp_path, first_window_layer):
    """transformers gives Qwen2 a sliding window only in layers max_window_layers and up: past the last layer it
    attends fully everywhere (and so do we, logits equal), else the window is refused."""
    path = _edited(tmp_path, "qwen2", sliding_window=16, use_sliding_window=True, layer_types=None,
                   max_window_layers=first_window_layer)
    if first_window_layer < FAMILY_SIZES["num_hidden_layers"]:
        with pytest.raises(CheckpointError, match=r"sliding-window attention \(sliding_window 16 < "):
            load_model(path)
        return
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert set(hf.config.layer_types) == {"full_attention"}
    ours = load_model(path).model.eval()
    with torch.no_grad():
        assert (ours.logits(ours(batch())) - hf(input_ids=batch()).logits).abs().max().item() <= 1e-4


def test_unknown_rope_scaling_is_one_line(tmp_path):
    path = _edited(tmp_path, "llama", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(CheckpointError, match=r"rope_scaling type 'yarn' is not supported; supported: default, llama3"):
        load_model(path)


def test_vocab_size_that_does_not_match_the_embedding_is_one_line(tmp_path):
    path = _edited(tmp_path, "qwen3", vocab_size=V + 10)
    with pytest.raises(CheckpointError, match=rf"tensor model.embed_tokens.weight has shape \[{V}, 64\], the model "
                                              rf"expects \[{V + 10}, 64\]"):
        load_model(path)


def test_missing_tensor_names_the_family(tmp_path):
    path = _edited(tmp_path, "gpt_neox", num_hidden_layers=3)
    with pytest.raises(CheckpointError, match=r"does not match the GPT-NeoX architecture of its config: missing "
                                              r"gpt_neox.layers.2."):
        load_model(path)


def test_bf16_checkpoint_keeps_its_linear_weights_for_a_bf16_run(tmp_path):
    """A bf16 run loads a bf16 checkpoint's linear weights as stored (no fp32 copy); once train has cast the
    frozen linears, the model equals the one loaded in fp32 and cast, bit for bit, and trained layers are fp32."""
    from lora_cli.models import cast_frozen_linears_

    make_checkpoint(tmp_path / "fp32", "qwen2").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    kept = load_model(str(tmp_path / "bf16"), dtype=torch.bfloat16).model
    assert kept.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert kept.model.embed_tokens.weight.dtype == kept.model.norm.weight.dtype == torch.float32
    plain = load_model(str(tmp_path / "bf16")).model
    assert plain.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    cfg = LoraConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj"], modules_to_save=["layers.1.mlp.up_proj"],
                     bias="lora_only")
    for model in (kept, plain):
        apply_lora(model, cfg, generator=torch.Generator().manual_seed(0))
        cast_frozen_linears_(model, torch.bfloat16)
    a, b = kept.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert a["model.layers.1.mlp.up_proj.weight"].dtype == a["model.layers.0.self_attn.q_proj.base_layer.bias"].dtype \
        == torch.float32
    assert a["model.layers.0.self_attn.k_proj.weight"].dtype == torch.bfloat16


def test_cast_frozen_linears_keeps_a_lora_head_base_in_fp32(tmp_path):
    """With LoRA on an untied head (Qwen3's lm_head), a bf16 run's cast keeps the head's frozen base layer in fp32
    (its logits feed the fp32 loss) and casts the blocks' frozen layers; before, the LoRA-wrapped head (no weight of
    its own) stopped the cast with an AttributeError."""
    from lora_cli.models import cast_frozen_linears_

    make_checkpoint(tmp_path / "base", "qwen3")
    model = load_model(str(tmp_path / "base")).model
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "lm_head"]), generator=torch.Generator().manual_seed(0))
    assert cast_frozen_linears_(model, torch.bfloat16) > 0
    assert model.lm_head.base_layer.weight.dtype == model.lm_head.lora_A.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_autograd_bit_for_bit_and_keeps_two_tensors(dtype):
    """common.swiglu (the Llama MLP's silu(gate) * up) gives autograd's values and gradients exactly, and keeps only
    gate and up for the backward (autograd keeps silu(gate) as well)."""
    import torch.nn.functional as F

    from lora_cli.models.common import swiglu

    g = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(7, 24, generator=g).to(dtype) for _ in range(3))
    results = []
    for fn in (lambda a, b: F.silu(a) * b, swiglu):
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(a, b)
        results.append((out, *torch.autograd.grad(out, (a, b), grad), len(saved)))
    (out, d_gate, d_up, n_autograd), (out2, d_gate2, d_up2, n_ours) = results
    assert torch.equal(out, out2) and torch.equal(d_gate, d_gate2) and torch.equal(d_up, d_up2)
    assert (n_autograd, n_ours) == (3, 2)


def _plain_rms_norm(x, weight, eps):  # transformers' LlamaRMSNorm, op for op
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_rms_norm_equals_autograd_and_keeps_its_input_and_scale(dtype, train_weight):
    """common.RMSNorm's autograd function: the forward bit for bit as transformers' ops; the gradients of the input
    and (when trained) the weight within fp32 rounding of autograd's over those ops; only x, the weight and one
    scale per row kept for the backward."""
    from lora_cli.models.common import RMSNorm

    g = torch.Generator().manual_seed(1)
    x, grad = (torch.randn(3, 5, 64, generator=g).mul(3).to(dtype) for _ in range(2))
    norm = RMSNorm(64, 1e-6).to(dtype)
    norm.weight.data = torch.randn(64, generator=g).to(dtype)
    results = []
    for fn in (lambda a, w: _plain_rms_norm(a, w, 1e-6), lambda a, w: norm(a)):
        a = x.clone().requires_grad_()
        w = norm.weight.requires_grad_(train_weight)
        norm.weight.grad = None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            out = fn(a, w)
        out.backward(grad)
        results.append((out, a.grad, w.grad, saved))
    (out, dx, dw, saved_plain), (out2, dx2, dw2, saved_ours) = results
    assert torch.equal(out, out2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the last bit of a bf16 gradient
    assert (dx - dx2).abs().max().item() <= tol * dx.abs().max().item()
    assert (dw is None) == (dw2 is None) == (not train_weight)
    if train_weight:
        assert (dw - dw2).abs().max().item() <= tol * dw.abs().max().item()
    assert saved_ours == [x.shape, (64,), (3, 5, 1)]
    assert len(saved_plain) > len(saved_ours)


@pytest.mark.parametrize("rotary_dims", [16, 6])  # all of a head's features (Llama), a part of them (GPT-NeoX)
def test_rotary_equals_rotate_half_bit_for_bit(rotary_dims):
    """common.apply_rotary equals transformers' `x * cos + rotate_half(x) * sin` bit for bit, forward and backward,
    on all or the first rotary_dims features of each head, and keeps only the angles for the backward."""
    from lora_cli.models.common import Rotary, apply_rotary

    def rotate_half(t):
        return torch.cat([-t[..., t.shape[-1] // 2:], t[..., : t.shape[-1] // 2]], dim=-1)

    def plain(t, rope):
        cos, sin = (r.unsqueeze(-2) for r in rope)
        rot = t[..., :rotary_dims]
        return torch.cat([rot * cos + rotate_half(rot) * sin, t[..., rotary_dims:]], dim=-1)

    g = torch.Generator().manual_seed(2)
    rope = Rotary(rotary_dims, 10000.0)(torch.arange(9)[None].expand(2, 9))
    x, grad = (torch.randn(2, 9, 3, 16, generator=g) for _ in range(2))
    results = []
    for fn in (plain, apply_rotary):
        a = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(a, rope)
        out.backward(grad)
        results.append((out, a.grad, len(saved)))
        with torch.no_grad():  # decoding takes the same arithmetic without autograd
            assert torch.equal(fn(x, rope), out)
    (out, dx, n_plain), (out2, dx2, n_ours) = results
    assert torch.equal(out, out2) and torch.equal(dx, dx2)
    assert n_ours == n_plain == 2  # cos and sin, as autograd keeps


@pytest.mark.parametrize("rotary_dims", [16, 6])
def test_rotary_qkv_equals_rotating_and_concatenating(rotary_dims):
    """common.rotary_qkv (q and k rotated and v written into one buffer) equals apply_rotary and torch.cat bit for bit,
    forward and backward, with grouped-query heads (4 query heads, 2 key/value heads), with and without autograd."""
    from lora_cli.models.common import Rotary, apply_rotary, rotary_qkv

    g = torch.Generator().manual_seed(3)
    rope = Rotary(rotary_dims, 10000.0)(torch.arange(5)[None].expand(2, 5))
    q, k, v = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 5, 2, 16, generator=g), torch.randn(2, 5, 2, 16,
                                                                                                           generator=g)
    grad = torch.randn(2, 5, 8 * 16, generator=g)

    def plain(a, b, c, rope):
        return torch.cat([apply_rotary(a, rope).flatten(-2), apply_rotary(b, rope).flatten(-2), c.flatten(-2)], -1)

    results = []
    for fn in (plain, rotary_qkv):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, rope)
        out.backward(grad)
        results.append((out, *(t.grad for t in leaves)))
        with torch.no_grad():
            assert torch.equal(fn(q, k, v, rope), out)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_unreadable_weights_are_named_as_unreadable(tmp_path, monkeypatch):
    """safetensors reports a file it may not read as "No such file or directory": the permission is named instead
    (os.access answers as a user without read permission would; root reads anything)."""
    from lora_cli.errors import CheckpointError

    make_checkpoint(tmp_path, "llama")
    weights = tmp_path / "model.safetensors"
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(weights) else real(p, mode, **kw))
    with pytest.raises(CheckpointError) as err:
        load_model(str(tmp_path))
    assert str(err.value) == f"cannot read {weights}: Permission denied; make it readable (chmod +r)"
