"""`lora info --lora-config`: trainable parameters and adapter size before any training."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("model,config,sets,trainable", [
    ("gpt2", "quickstart.yaml", [], 294_912),  # r=8 on attn.c_attn (PEFT prints the same)
    ("gpt2-medium", "e2e.yaml", [], 393_216),  # r=4 on attn.q + attn.v: the LoRA paper's E2E setting
    ("gpt2", "appendix-e-spam.yaml", [], 2_666_528),  # the LoRA appendix's spam classifier
    ("gpt2", "quickstart.yaml", ["--set", "lora.targets=all-linear"], 1_179_648),
])
def test_info_lora_config_counts(model, config, sets, trainable):
    done = subprocess.run([sys.executable, "-m", "lora_cli", "info", model, "--random", "--json",
                           "--lora-config", str(CONFIGS / config), *sets], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lora = json.loads(done.stdout)["lora"]
    assert lora["trainable"] == trainable
    # fp32 tensors plus a small header
    assert trainable * 4 <= lora["adapter_bytes"] <= trainable * 4 + 64 * 1024
