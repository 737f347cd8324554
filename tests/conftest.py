"""Shared fixtures: small GPT-2 checkpoints made here, saved in the real Hugging Face format."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)

TINY = dict(n_layer=2, n_head=2, n_embd=64, n_positions=128)


def make_hf_gpt2(path, seed: int = 0, **overrides):
    """Save a random transformers GPT2LMHeadModel (full 50257 vocabulary) with save_pretrained; return it."""
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = HFConfig(**{**TINY, **overrides}, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A directory with config.json + model.safetensors of a tiny random GPT-2."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    make_hf_gpt2(path)
    return path


@pytest.fixture(scope="module")
def z(tmp_path_factory):
    """A warm process that forks real `lora` CLI runs (tests/zygote.py), one per test module."""
    from zygote import Zygote

    runner = Zygote(tmp_path_factory.mktemp("zygote-io"))
    yield runner
    runner.close()


def tiny_lora_model(use_dora: bool = False):
    """A 2-layer GPT-2 (random, seeded) with LoRA r=4 on c_attn and no dropout; B is drawn non-zero so that every
    LoRA weight gets a gradient (for tests that compare computation paths)."""
    from lora_cli.config import LoraConfig
    from lora_cli.lora import apply_lora
    from lora_cli.models import GPT2, GPT2Config

    model = GPT2(GPT2Config(**TINY))
    model.init_weights(torch.Generator().manual_seed(3))
    model.set_dropout(0.0)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=use_dora), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # B = 0 at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    return model


def tiny_batch():
    """Three right-padded causal-LM examples of random tokens, each with a masked prompt."""
    from lora_cli.data import Example, collate

    g = torch.Generator().manual_seed(6)
    examples = []
    for n, prompt in ((30, 12), (17, 9), (24, 20)):
        ids = torch.randint(0, 50257, (n,), generator=g).tolist()
        examples.append(Example(ids, [False] * prompt + [True] * (n - prompt)))
    return collate(examples)
