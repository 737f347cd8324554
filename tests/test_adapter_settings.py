"""Bad values in an adapter's settings: a PEFT adapter_config.json, or the header of our own .safetensors adapter
(its `lora` entry and its `base_model` metadata). Each case corrupts ONE field of a real adapter (a PEFT one saved
by peft itself, ours by save_adapter) and runs the real `lora` CLI on it: exit code 1, one line naming the file
and the field and what to do, no traceback. The commands that take an adapter all read it with
adapter.load_adapter (`lora export ADAPTER`, `generate/eval/merge/predict/chat --adapter`, `serve --adapter`);
`lora export` is the fastest, and a few cases also go through `generate` and `eval`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import TINY, assert_one_line_error, cli

peft = pytest.importorskip("peft")

OURS_FIX = "the file is damaged: train the adapter again or use another adapter"
TASKS = 'use a CAUSAL_LM or SEQ_CLS adapter (task_type "CAUSAL_LM", "SEQ_CLS" or null)'

# (id, field as the config has it, value or DELETE, the message after "<file>: ")
DELETE = object()
PEFT_CASES = [
    ("rank-pattern-str-value", "rank_pattern", {"c_attn": "4"},
     'rank_pattern["c_attn"]: "4" is not a whole number above 0; write 4 without quotes'),
    ("alpha-pattern-str-value", "alpha_pattern", {"c_attn": "8"},
     'alpha_pattern["c_attn"]: "8" is not a finite number above 0; write 8 without quotes'),
    ("rank-pattern-list", "rank_pattern", ["c_attn"],
     'rank_pattern: ["c_attn"] is not a mapping of module names to ranks; write a JSON object such as '
     '{"c_attn": 8}'),
    ("alpha-pattern-list", "alpha_pattern", ["c_attn"],
     'alpha_pattern: ["c_attn"] is not a mapping of module names to alphas; write a JSON object such as '
     '{"c_attn": 16}'),
    ("dropout-str", "lora_dropout", "x",
     'lora_dropout: "x" is not a probability from 0 up to (not including) 1; write a number such as 0.05'),
    ("alpha-nan", "lora_alpha", float("nan"),
     "lora_alpha: NaN is not a finite number above 0; write a number above 0 such as 16"),
    ("alpha-inf", "lora_alpha", float("inf"),
     "lora_alpha: Infinity is not a finite number above 0; write a number above 0 such as 16"),
    ("alpha-zero", "lora_alpha", 0, "lora_alpha: 0 is not a finite number above 0; write a number above 0 such as 16"),
    ("alpha-negative", "lora_alpha", -8,
     "lora_alpha: -8 is not a finite number above 0; write a number above 0 such as 16"),
    ("alpha-missing", "lora_alpha", DELETE, "lora_alpha: missing; write a number above 0 such as 16"),
    ("r-zero", "r", 0, "r: 0 is not a whole number above 0; write a whole number such as 8"),
    ("r-fraction", "r", 4.5, "r: 4.5 is not a whole number above 0; write a whole number such as 8"),
    ("r-str", "r", "4", 'r: "4" is not a whole number above 0; write 4 without quotes'),
    ("r-bool", "r", True, "r: true is not a whole number above 0; write a whole number such as 8"),
    ("rslora-str", "use_rslora", "false",
     'use_rslora: "false" is not true or false; write false without quotes'),
    ("dora-str", "use_dora", "yes", 'use_dora: "yes" is not true or false; write true or false'),
    ("weight-tying-str", "ensure_weight_tying", "false",
     'ensure_weight_tying: "false" is not true or false; write false without quotes'),
    ("target-modules-int", "target_modules", 5,
     'target_modules: 5 is not a list of module names or a regular expression; write a JSON list of module '
     'names such as ["c_attn"]'),
    ("target-modules-int-list", "target_modules", [5],
     'target_modules: [5] is not a list of module names or a regular expression; write a JSON list of module '
     'names such as ["c_attn"]'),
    ("modules-to-save-str", "modules_to_save", "lm_head",
     'modules_to_save: "lm_head" is not a list of module names; write a JSON list such as ["lm_head"], or null'),
    ("task-seq2seq", "task_type", "SEQ_2_SEQ_LM", f'task_type: "SEQ_2_SEQ_LM" is not supported by lora-cli; {TASKS}'),
    ("task-int", "task_type", 1, f"task_type: 1 is not supported by lora-cli; {TASKS}"),
    ("base-name-list", "base_model_name_or_path", ["gpt2"],
     "base_model_name_or_path: [\"gpt2\"] is not text; write the base model's hub id or directory, or null"),
]

# (id, header entry: "lora.KEY" inside the `lora` JSON, else a metadata entry; value; the message after "<file>: ")
OURS_CASES = [
    ("alpha-nan", "lora.alpha", float("nan"), "lora.alpha: NaN is not a finite number above 0"),
    ("alpha-inf", "lora.alpha", float("-inf"), "lora.alpha: -Infinity is not a finite number above 0"),
    ("alpha-zero", "lora.alpha", 0, "lora.alpha: 0 is not a finite number above 0"),
    ("alpha-str", "lora.alpha", "8", 'lora.alpha: "8" is not a finite number above 0'),
    ("r-fraction", "lora.r", 4.5, "lora.r: 4.5 is not a whole number above 0"),
    ("r-str", "lora.r", "4", 'lora.r: "4" is not a whole number above 0'),
    ("r-negative", "lora.r", -4, "lora.r: -4 is not a whole number above 0"),
    ("r-missing", "lora.r", DELETE, "lora.r: missing"),
    ("targets-missing", "lora.targets", DELETE, "lora.targets: missing"),
    ("modules-to-save-missing", "lora.modules_to_save", DELETE, "lora.modules_to_save: missing"),
    ("targets-null", "lora.targets", None, "lora.targets: null is not a list of module names"),
    ("modules-to-save-null", "lora.modules_to_save", None, "lora.modules_to_save: null is not a list of module names"),
    ("dropout-str", "lora.dropout", "x", 'lora.dropout: "x" is not a probability from 0 up to (not including) 1'),
    ("rslora-str", "lora.use_rslora", "false", 'lora.use_rslora: "false" is not true or false'),
    ("dora-str", "lora.use_dora", "yes", 'lora.use_dora: "yes" is not true or false'),
    ("bias-unknown", "lora.bias", "some", 'lora.bias: "some" is not one of none, lora_only, all'),
    ("targets-str", "lora.targets", "transformer.h.0.attn.c_attn",
     'lora.targets: "transformer.h.0.attn.c_attn" is not a list of module names'),
    ("modules-to-save-str", "lora.modules_to_save", "lm_head", 'lora.modules_to_save: "lm_head" is not a list of '
                                                               'module names'),
    ("rank-pattern-list", "lora.rank_pattern", ["transformer.h.0.attn.c_attn"],
     'lora.rank_pattern: ["transformer.h.0.attn.c_attn"] is not a mapping of module names to ranks'),
    ("rank-pattern-str-value", "lora.rank_pattern", {"transformer.h.0.attn.c_attn": "4"},
     'lora.rank_pattern["transformer.h.0.attn.c_attn"]: "4" is not a whole number above 0'),
    ("alpha-pattern-str-value", "lora.alpha_pattern", {"transformer.h.0.attn.c_attn": "8"},
     'lora.alpha_pattern["transformer.h.0.attn.c_attn"]: "8" is not a finite number above 0'),
    ("base-model-list", "base_model", ["gpt2"], 'base_model: ["gpt2"] is not a JSON object'),
    ("base-model-name-list", "base_model.name", ["gpt2"], 'base_model.name: ["gpt2"] is not text'),
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny GPT-2 base, our adapter of it, and a PEFT adapter of it saved by peft itself; both load as they are."""
    from transformers import GPT2LMHeadModel

    from helpers import make_hf_gpt2
    from lora_cli.adapter import load_adapter, save_adapter
    from lora_cli.config import LoraConfig
    from lora_cli.lora import apply_lora
    from lora_cli.pretrained import load_model

    root = tmp_path_factory.mktemp("adapter-settings")
    make_hf_gpt2(root / "base", seed=1)
    base = load_model(str(root / "base"))
    apply_lora(base.model, LoraConfig(r=4, alpha=8, dropout=0.0, targets=["attn.c_attn"]),
               generator=torch.Generator().manual_seed(0))
    ours = save_adapter(root / "ours.safetensors", base.model, {"base_model": base.describe(), "task": "causal_lm"})

    hf = GPT2LMHeadModel.from_pretrained(str(root / "base"))  # base_model_name_or_path: the base's directory
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0,
                          task_type="CAUSAL_LM")
    peft.get_peft_model(hf, cfg).save_pretrained(str(root / "peft"))
    raw = json.loads((root / "peft" / "adapter_config.json").read_text())
    # what real PEFT files hold, and what must keep loading
    assert raw["use_rslora"] is False and raw["rank_pattern"] == {} and isinstance(raw["target_modules"], list)
    for good in (ours, root / "peft"):
        load_adapter(good)
    return root


def corrupt_peft(src: Path, dst: Path, key: str, value) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    if value is DELETE:
        del cfg[key]
    else:
        cfg[key] = value
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def corrupt_ours(src: Path, dst: Path, key: str, value) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        header, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    entry, _, field = key.partition(".")
    if field:  # a field of a JSON entry (lora.r, base_model.name)
        settings = json.loads(header[entry])
        if value is DELETE:
            del settings[field]
        else:
            settings[field] = value
        header[entry] = json.dumps(settings)
    else:
        header[entry] = json.dumps(value)
    save_file(tensors, str(dst), metadata=header)
    return dst


def run_export(adapter: Path, tmp_path: Path) -> str:
    out = tmp_path / "exported"
    result = cli("export", adapter, out, cwd=tmp_path)
    line = assert_one_line_error(*result)
    assert not out.exists()
    return line


@pytest.mark.parametrize("key,value,message", [c[1:] for c in PEFT_CASES], ids=[c[0] for c in PEFT_CASES])
def test_bad_peft_setting(adapters, tmp_path, key, value, message):
    d = corrupt_peft(adapters / "peft", tmp_path / "peft", key, value)
    assert run_export(d, tmp_path) == f"error: {d / 'adapter_config.json'}: {message}"


@pytest.mark.parametrize("key,value,message", [c[1:] for c in OURS_CASES], ids=[c[0] for c in OURS_CASES])
def test_bad_own_setting(adapters, tmp_path, key, value, message):
    file = corrupt_ours(adapters / "ours.safetensors", tmp_path / "a.safetensors", key, value)
    assert run_export(file, tmp_path) == f"error: {file}: {message}; {OURS_FIX}"


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_nan_alpha_refused_before_use(adapters, tmp_path, command):
    """The sweep's worst case: `generate` printed garbage with exit 0 for a NaN lora_alpha."""
    (tmp_path / "data.json").write_text(json.dumps([{"text": "apple river stone"}] * 4))
    extra = ["hello"] if command == "generate" else ["--data", tmp_path / "data.json"]
    peft_dir = corrupt_peft(adapters / "peft", tmp_path / "peft", "lora_alpha", float("nan"))
    ours = corrupt_ours(adapters / "ours.safetensors", tmp_path / "a.safetensors", "lora.alpha", float("nan"))
    for adapter, want in (
        (peft_dir, f"{peft_dir / 'adapter_config.json'}: lora_alpha: NaN is not a finite number above 0; write a "
                   "number above 0 such as 16"),
        (ours, f"{ours}: lora.alpha: NaN is not a finite number above 0; {OURS_FIX}"),
    ):
        result = cli(command, "--adapter", adapter, *extra, "--model", adapters / "base", cwd=tmp_path)
        assert assert_one_line_error(*result) == f"error: {want}"
