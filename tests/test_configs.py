"""Every shipped config loads and dry-runs (hub models swapped for a tiny random GPT-2: no internet here)."""

from pathlib import Path

import pytest

from helpers import cli
from lora_cli.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
TINY = "model={name: gpt2, init: random, n_layer: 2, n_head: 2, n_embd: 64}"
# Hub models of other families are swapped for a small random preset of their family.
TINY_FOR = {"smollm2-quickstart.yaml": "model={name: smollm2-135m, init: random, n_layer: 2}"}
# Training files a script fetches (git-ignored, absent in CI): those configs dry-run on a committed file of the
# same format instead (scripts/get_e2e_data.sh -> data/e2e/trainset.csv; the E2E dev set has its columns).
FETCHED = {"e2e-lora-paper.yaml": f"data.train={Path(__file__).parent.parent / 'data' / 'e2e_dev.csv'}"}


def test_there_are_configs():
    assert {"quickstart.yaml", "offline.yaml", "smollm2-quickstart.yaml", "smollm2-offline.yaml"} <= {
        p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_dry_runs(path):
    sets = [FETCHED[path.name]] if path.name in FETCHED else []
    cfg = load_config(path, sets)
    assert Path(cfg.data.train).is_file()
    args = ["train", str(path), "--dry-run", *(a for s in sets for a in ("--set", s))]
    if cfg.model.init != "random":
        args += ["--set", TINY_FOR.get(path.name, TINY)]
    done = cli(*args)
    assert done.rc == 0, done.stderr
    assert "trainable parameters:" in done.stdout and "estimated peak memory" in done.stdout


def test_appendix_e_dry_run_prints_reference_count():
    path = Path(__file__).parent.parent / "configs" / "appendix-e-spam.yaml"
    done = cli("train", path, "--dry-run", "--set", "model={name: gpt2, init: random}")
    assert done.rc == 0, done.stderr
    assert "trainable parameters: 2,666,528 of " in done.stdout
    assert "labels ham: 747, spam: 747" in done.stdout
