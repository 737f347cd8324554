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
