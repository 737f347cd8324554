"""Tiny trained adapters for the eval / merge / generate tests: a random GPT-2 saved in the Hugging Face format,
a few alpaca rows, and `lora train` run for a few steps (so the adapter carries real training metadata)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from conftest import make_hf_gpt2
from lora_cli.tokenizer import EOT_ID

WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "seven", "table", "music", "light", "north", "paper"]


def alpaca_rows(words=WORDS):
    """Rows with and without an Input block (the two Alpaca templates)."""
    return [{"instruction": f"Repeat the word {w}.", "input": "twice" if i % 3 == 0 else "", "output": f"{w} {w} {w}"}
            for i, w in enumerate(words)]


def make_lively(path, seed=0, eot_bias=0.5):
    """A tiny random GPT-2 whose greedy outputs vary and sometimes end in EOT (see tests/test_generate.py's
    `lively`): random ln_f gains, and an EOT embedding that an ln_f bias can select."""
    hf = make_hf_gpt2(path, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        ln_f = hf.transformer.ln_f
        ln_f.weight.copy_(torch.randn(ln_f.weight.shape, generator=g) * 3)
        ln_f.weight[0], ln_f.bias[0] = 1.0, eot_bias
        hf.transformer.wte.weight[EOT_ID].zero_()
        hf.transformer.wte.weight[EOT_ID, 0] = 1.0
    hf.save_pretrained(path)
    return hf


def train_run(root: Path, base: Path, lora="{r: 4, alpha: 8, dropout: 0.0, targets: [attn.q, attn.v, mlp.c_proj]}",
              rows=None, steps=4, lr=2e-2) -> Path:
    """`lora train` a few steps on alpaca rows; returns the run config (out_dir = root/out)."""
    from lora_cli.config import load_config
    from lora_cli.train import train

    root.mkdir(parents=True, exist_ok=True)
    (root / "train.json").write_text(json.dumps(rows or alpaca_rows()))
    config = root / "run.yaml"
    config.write_text(f"""\
model: {base}
out_dir: out
data: {{train: train.json, val_split: 0.25, max_length: 96}}
lora: {lora}
train: {{lr: {lr}, batch_size: 4, max_steps: {steps}, warmup_steps: 1, eval_every: 0, save_every: 0, log_every: 1}}
""")
    train(load_config(config), log=lambda m: None, progress=False)
    return config


def cli(*args):
    """Run the `lora` command in this process: (exit code, stdout, stderr)."""
    from lora_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code, out, err, expected_code=1):
    assert code == expected_code, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""
    return lines[0]


def tree(path: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file under path: to show nothing changed."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(path).rglob("*"))}
