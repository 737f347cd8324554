"""A config.json that leaves keys out, or sets keys the family's transformers model never reads: our config takes
transformers 5.24's per-family defaults (models/llama.py DEFAULTS and UNREAD; GPT-NeoX's rotary base; llama3's
original_max_position_embeddings), so a tiny random checkpoint whose saved config.json was edited so gives the
logits transformers gives."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import FAMILY_SIZES
from lora_cli.errors import CheckpointError
from lora_cli.models import config_from_dict
from lora_cli.pretrained import load_model

transformers = pytest.importorskip("transformers")

V = FAMILY_SIZES["vocab_size"]
CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "gpt_neox": "GPTNeoXConfig"}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


def checkpoint(path, family: str, drop=(), rope_drop=(), sizes=None, **changes) -> str:
    """Save a random transformers model of `family` (FAMILY_SIZES, 2 key/value heads, with `sizes`; parameters
    perturbed), then edit its config.json: the keys `drop` (and `rope_drop` of rope_parameters) removed, `changes`
    set."""
    heads = {} if family == "gpt_neox" else {"num_key_value_heads": 2}
    config = getattr(transformers, CONFIGS[family])(**{**FAMILY_SIZES, **heads, **(sizes or {})})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(path)
    saved = json.loads((path / "config.json").read_text())
    for key in drop:
        saved.pop(key, None)
    for key in rope_drop:
        saved["rope_parameters"].pop(key)
    saved.update(changes)
    (path / "config.json").write_text(json.dumps(saved))
    return str(path)


def assert_logits_match(path: str, T: int = 11) -> None:
    """Our model and transformers' AutoModelForCausalLM, both loaded from `path`: equal fp32 logits."""
    ours = load_model(path).model.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        assert want.abs().max().item() > 0.1
        assert (ours.logits(ours(ids)) - want).abs().max().item() <= 1e-4


def hf_windows(config) -> list:
    """Each layer's sliding window (None: full attention) as transformers' model of the family builds it."""
    n = config.num_hidden_layers
    if config.model_type == "mistral":
        return [config.sliding_window] * n
    if config.model_type in ("qwen2", "qwen3"):
        return [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]
    return [None] * n


# ------------------------------------------------------------------------------------------- missing keys


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_a_config_of_sizes_alone_parses_as_transformers_config_class(family):
    """Only the sizes given: num_key_value_heads, head_dim, max_position_embeddings, windows, rope_theta and the
    rest are transformers' (64 heads: its key/value-head defaults 8 and 32 differ from multi-head attention)."""
    d = dict(model_type=family, vocab_size=V, hidden_size=4096, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=64)
    if family == "mistral":  # its default window 4096 then covers the whole context (active: see below)
        d["max_position_embeddings"] = 4096
    ours = config_from_dict(d)
    hf = transformers.AutoConfig.for_model(**d)
    for name in ("num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    windows = [ours.sliding_window if t == "sliding_attention" else None for t in ours.window_layer_types()]
    assert windows == hf_windows(hf)


def test_mistral_without_sliding_window_gets_transformers_active_window_refused_in_one_line(tmp_path):
    """No sliding_window and no max_position_embeddings: transformers slides a 4096 window over a 131072 context,
    which we do not implement: one line naming what is supported."""
    path = checkpoint(tmp_path, "mistral", drop=("sliding_window", "max_position_embeddings"))
    hf = transformers.AutoConfig.from_pretrained(path)
    assert (hf.sliding_window, hf.max_position_embeddings) == (4096, 131072)
    with pytest.raises(CheckpointError, match=r"config.json: sliding-window attention \(sliding_window 4096 < "
                                              r"max_position_embeddings 131072\) is not supported; supported: full "
                                              r"causal attention$") as info:
        load_model(path)
    assert "\n" not in str(info.value)


MISSING = {  # case: (family, sizes of the saved model, keys its config.json then loses)
    "mistral-kv-heads-and-window": ("mistral", dict(num_attention_heads=16, num_key_value_heads=8, head_dim=None),
                                    ("num_key_value_heads", "sliding_window", "head_dim")),
    "qwen2-kv-heads-and-window": ("qwen2", dict(hidden_size=128, num_attention_heads=64, num_key_value_heads=32),
                                  ("num_key_value_heads", "sliding_window", "use_sliding_window", "layer_types",
                                   "max_window_layers")),
    "qwen3-head-dim": ("qwen3", dict(head_dim=128), ("head_dim", "sliding_window")),
}


@pytest.mark.parametrize("case", list(MISSING))
def test_missing_keys_take_the_family_defaults_and_logits_match_transformers(tmp_path, case):
    family, sizes, drop = MISSING[case]
    assert_logits_match(checkpoint(tmp_path, family, drop=drop, sizes=sizes))


# ------------------------------------------------------------------------------------------- unread keys


UNREAD = {  # case: (family, config.json keys the family's transformers model does not read, a length past them)
    "mistral-biases": ("mistral", dict(attention_bias=True, mlp_bias=True), 11),
    "qwen2-biases": ("qwen2", dict(attention_bias=True, mlp_bias=True), 11),
    "qwen3-mlp-bias": ("qwen3", dict(mlp_bias=True), 11),
    "llama-sliding-window": ("llama", dict(sliding_window=16), 24),
}


@pytest.mark.parametrize("case", list(UNREAD))
def test_keys_the_family_does_not_read_change_nothing(tmp_path, case):
    family, changes, T = UNREAD[case]
    assert_logits_match(checkpoint(tmp_path, family, **changes), T)


# ------------------------------------------------------------------------------------------- rotary embeddings


def test_llama3_without_original_max_position_embeddings_uses_max_position_embeddings(tmp_path):
    path = checkpoint(tmp_path, "llama", sizes=dict(rope_scaling=LLAMA3),
                      rope_drop=("original_max_position_embeddings",))
    assert transformers.AutoConfig.from_pretrained(path).rope_parameters["original_max_position_embeddings"] == 128
    assert_logits_match(path, T=40)


def test_llama3_top_level_original_max_position_embeddings_wins_as_in_transformers(tmp_path):
    """transformers' standardize_rope_params lets a top-level original_max_position_embeddings (Phi-3's layout)
    override the one in rope_parameters when the model is built."""
    assert_logits_match(checkpoint(tmp_path, "llama", sizes=dict(rope_scaling=LLAMA3),
                                   original_max_position_embeddings=64), T=40)


def test_rope_scaling_beside_rope_parameters_wins_as_in_transformers(tmp_path):
    """transformers 5 takes a non-empty rope_scaling whole over rope_parameters (convert_rope_params_to_dict):
    a config.json with llama3 rope_parameters and a default rope_scaling builds a default rotary; a yarn
    rope_scaling is refused, whatever rope_parameters says."""
    path = checkpoint(tmp_path / "default", "llama", sizes=dict(rope_scaling=LLAMA3),
                      rope_scaling={"rope_type": "default"})
    assert transformers.AutoConfig.from_pretrained(path).rope_parameters["rope_type"] == "default"
    assert load_model(path, weights=False).model.config.rope_scaling is None
    assert_logits_match(path, T=40)
    path = checkpoint(tmp_path / "yarn", "llama", sizes=dict(rope_scaling=LLAMA3),
                      rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(CheckpointError, match=r"rope_scaling type 'yarn' is not supported; supported: "):
        load_model(path, weights=False)


def test_llama3_without_its_factors_is_one_line(tmp_path):
    path = checkpoint(tmp_path, "llama", sizes=dict(rope_scaling=LLAMA3),
                      rope_drop=("low_freq_factor", "high_freq_factor"))
    with pytest.raises(CheckpointError, match=r"config.json: rope_scaling type 'llama3' needs factor, low_freq_factor, "
                                              r"high_freq_factor; missing: low_freq_factor, high_freq_factor$"):
        load_model(path)


def test_llama3_factors_of_the_wrong_type_are_one_line(tmp_path):
    path = checkpoint(tmp_path, "llama", sizes=dict(rope_scaling=LLAMA3))
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["rope_parameters"]["factor"] = "8"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r'config.json: rope_scaling.factor: "8" is not a finite number above 0; '
                                              r"write 8 without quotes$"):
        load_model(path)


GPT_NEOX_ROPE = {  # case: config.json's rotary keys, rope_parameters removed (transformers 4's layout)
    "top-level-rope_theta-alone": dict(rope_theta=500.0, rotary_pct=0.5),
    "rotary_emb_base-over-rope_theta": dict(rotary_emb_base=700.0, rope_theta=500.0, rotary_pct=0.5),
}


@pytest.mark.parametrize("case", list(GPT_NEOX_ROPE))
def test_gpt_neox_rotary_base_is_read_as_transformers_reads_it(tmp_path, case):
    """GPTNeoXConfig takes the base from rope_parameters, else rotary_emb_base, else 10000: never from a
    top-level rope_theta."""
    path = checkpoint(tmp_path, "gpt_neox", drop=("rope_parameters",), **GPT_NEOX_ROPE[case])
    want = GPT_NEOX_ROPE[case].get("rotary_emb_base", 10000.0)
    assert transformers.AutoConfig.from_pretrained(path).rope_parameters["rope_theta"] == want
    assert load_model(path, weights=False).model.config.rope_theta == want
    assert_logits_match(path)
