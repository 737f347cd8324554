"""Fixtures only (shared helpers live in tests/helpers.py): tiny GPT-2 checkpoints saved in the real Hugging Face
format."""

from __future__ import annotations

import pytest
import torch

from helpers import make_hf_gpt2

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A directory with config.json + model.safetensors of a tiny random GPT-2."""
    path = tmp_path_factory.mktemp("tiny-gpt2")
    make_hf_gpt2(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, transformers model) of a tiny random GPT-2 (seed 3), one per test module."""
    path = tmp_path_factory.mktemp("tiny")
    return path, make_hf_gpt2(path, seed=3)
