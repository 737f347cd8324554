"""`lora info --lora-config`: trainable parameters and adapter size before any training."""

import json
from pathlib import Path

import pytest

from helpers import cli

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("model,config,sets,trainable", [
    ("gpt2", "quickstart.yaml", [], 294_912),  # r=8 on attn.c_attn (PEFT prints the same)
    ("gpt2-medium", "e2e.yaml", [], 393_216),  # r=4 on attn.q + attn.v: the LoRA paper's E2E setting
    ("gpt2", "appendix-e-spam.yaml", [], 2_666_528),  # the LoRA appendix's spam classifier
    ("gpt2", "quickstart.yaml", ["--set", "lora.targets=all-linear"], 1_179_648),
])
def test_info_lora_config_counts(model, config, sets, trainable):
    done = cli("info", model, "--random", "--json", "--lora-config", CONFIGS / config, *sets)
    assert done.rc == 0, done.stderr
    lora = json.loads(done.stdout)["lora"]
    assert lora["trainable"] == trainable
    # fp32 tensors plus a small header
    assert trainable * 4 <= lora["adapter_bytes"] <= trainable * 4 + 64 * 1024
