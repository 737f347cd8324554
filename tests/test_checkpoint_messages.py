"""A damaged checkpoint gets one clear line through the real CLI: a config.json field of the wrong JSON type (a
quoted number, a fraction where a size belongs, null where transformers wants a number, "yes" for true) names the
file, the field and what to write instead; a pytorch_model.bin that is no PyTorch tensor file (a broken zip, a
zip of something else, a plain pickle, a pickle with code or without tensors) says so and what to do, without
torch's own multi-line text. Exit code 1, no traceback."""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile

import pytest
import torch

from helpers import Evil, assert_one_line_error, cli, make_family_checkpoint, make_hf_gpt2

pytest.importorskip("transformers")

_BASES = {}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """family -> a tiny checkpoint directory saved by transformers (GPT-2 with its full vocabulary), built once."""

    def get(family: str):
        if family not in _BASES:
            path = tmp_path_factory.mktemp(family)
            make_hf_gpt2(path) if family == "gpt2" else make_family_checkpoint(path, family)
            _BASES[family] = path
        return _BASES[family]

    yield get
    _BASES.clear()


def damaged(base_dir, dest, drop=(), **changes):
    """A copy of base_dir whose config.json lacks the keys `drop` and has `changes`; returns it."""
    shutil.copytree(base_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    for key in drop:
        config.pop(key, None)
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


TRANSFORMERS_4_ROPE = ("rope_parameters",)  # a config.json of transformers 4: top-level rope_theta / rotary_emb_base

CONFIG_CASES = [
    # family, keys dropped, changes, the message after "<dir>/config.json: "
    ("gpt2", (), {"n_embd": "64"}, 'n_embd: "64" is not a whole number above 0; write 64 without quotes'),
    ("gpt2", (), {"n_layer": 2.5}, "n_layer: 2.5 is not a whole number above 0; write a whole number such as 12"),
    ("gpt2", (), {"layer_norm_epsilon": "x"},
     'layer_norm_epsilon: "x" is not a finite number; write a number such as 1e-05'),
    ("gpt2", (), {"tie_word_embeddings": "yes"}, 'tie_word_embeddings: "yes" is not true or false; write true or false'),
    ("gpt2", (), {"n_inner": "wide"}, 'n_inner: "wide" is not a whole number above 0; write a whole number, or null'),
    ("gpt2", ("n_positions",), {"n_ctx": "128"}, 'n_ctx: "128" is not a whole number above 0; write 128 without quotes'),
    ("llama", (), {"hidden_size": "64"}, 'hidden_size: "64" is not a whole number above 0; write 64 without quotes'),
    ("llama", (), {"num_hidden_layers": 2.5},
     "num_hidden_layers: 2.5 is not a whole number above 0; write a whole number such as 32"),
    ("llama", (), {"rms_norm_eps": None}, "rms_norm_eps: null is not a finite number; write a number such as 1e-06"),
    ("llama", (), {"tie_word_embeddings": "yes"},
     'tie_word_embeddings: "yes" is not true or false; write true or false'),
    ("llama", TRANSFORMERS_4_ROPE, {"rope_theta": "x"},
     'rope_theta: "x" is not a finite number; write a number such as 10000.0'),
    ("llama", (), {"rope_parameters": {"rope_type": "default", "rope_theta": "x"}},
     'rope_parameters.rope_theta: "x" is not a finite number; write a number such as 10000.0'),
    ("llama", TRANSFORMERS_4_ROPE, {"rope_scaling": "linear"},
     'rope_scaling: "linear" is not a JSON object; write a JSON object, or null'),
    ("mistral", (), {"num_key_value_heads": "2"},
     'num_key_value_heads: "2" is not a whole number above 0; write 2 without quotes'),
    ("qwen2", (), {"use_sliding_window": "no"},
     'use_sliding_window: "no" is not true or false; write true or false, or null'),
    ("qwen3", (), {"head_dim": 32.0}, "head_dim: 32.0 is not a whole number above 0; write a whole number, or null"),
    ("gpt_neox", (), {"hidden_size": "64"}, 'hidden_size: "64" is not a whole number above 0; write 64 without quotes'),
    ("gpt_neox", (), {"layer_norm_eps": None},
     "layer_norm_eps: null is not a finite number; write a number such as 1e-05"),
    ("gpt_neox", (), {"use_parallel_residual": "true"},
     'use_parallel_residual: "true" is not true or false; write true without quotes'),
    ("gpt_neox", TRANSFORMERS_4_ROPE, {"rotary_emb_base": "x"},
     'rotary_emb_base: "x" is not a finite number; write a number such as 10000'),
    ("gpt_neox", TRANSFORMERS_4_ROPE, {"rotary_pct": 1.5},
     "rotary_pct (partial_rotary_factor) 1.5 rotates 24 of each head's 16 features; it must be above 0 and at most 1, "
     "rotating an even number"),
    ("gpt_neox", (), {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.1}},
     "rotary_pct (partial_rotary_factor) 0.1 rotates 1 of each head's 16 features; it must be above 0 and at most 1, "
     "rotating an even number"),
]


@pytest.mark.parametrize("family, drop, changes, message", CONFIG_CASES,
                         ids=[f"{c[0]}-{next(iter(c[2]))}" for c in CONFIG_CASES])
def test_config_field_of_the_wrong_type(base, tmp_path, family, drop, changes, message):
    model = damaged(base(family), tmp_path / "model", drop, **changes)
    line = assert_one_line_error(*cli("info", model))
    assert line == f"error: {model}/config.json: {message}"


def test_the_same_line_from_generate_and_train(base, tmp_path):
    model = damaged(base("gpt2"), tmp_path / "model", n_embd="64")
    expected = f'error: {model}/config.json: n_embd: "64" is not a whole number above 0; write 64 without quotes'
    assert assert_one_line_error(*cli("generate", "--model", model, "hi", "--max-new-tokens", "1")) == expected
    assert train_error(tmp_path, model) == expected


def test_settings_transformers_accepts_still_load(base, tmp_path):
    """Nulls where transformers takes them, a JSON int for a float, a Qwen window count of 0."""
    model = damaged(base("llama"), tmp_path / "llama", attention_dropout=None, rms_norm_eps=1, head_dim=None,
                    max_window_layers=0, sliding_window=None, layer_types=None)
    assert cli("info", model).rc == 0
    model = damaged(base("gpt2"), tmp_path / "gpt2", n_inner=None, attn_pdrop=0)
    assert cli("info", model).rc == 0


# ------------------------------------------------------------------------------------------ pytorch_model.bin


def broken_zip(path, marker):
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)


def foreign_zip(path, marker):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "not a torch file")


def plain_pickle(path, marker):
    path.write_bytes(pickle.dumps({"transformer.wte.weight": [[0.0, 1.0]]}, protocol=2))


def pickle_garbage(path, marker):  # a pickle opcode, then noise: torch's unpickler warns before it refuses
    path.write_bytes(b"\x80" + bytes(range(256)) * 3)


def pickle_with_code(path, marker):
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "payload": Evil(marker)}, path)


def no_tensors(path, marker):
    torch.save({"transformer.wte.weight": "hello"}, path)


NOT_A_TENSOR_FILE = "cannot load {path}: it is truncated, corrupt, or not a plain tensor file; download or copy it again"
BIN_CASES = [
    (broken_zip, NOT_A_TENSOR_FILE),
    (foreign_zip, NOT_A_TENSOR_FILE),
    (plain_pickle, NOT_A_TENSOR_FILE),
    (pickle_garbage, NOT_A_TENSOR_FILE),
    (pickle_with_code, NOT_A_TENSOR_FILE),
    (no_tensors, "{path} does not hold a state dict of tensors (names to tensors); download or copy it again, or "
                 "save the model's state_dict() alone"),
]


def bin_model(base_dir, dest, write):
    """GPT-2's config.json beside a pytorch_model.bin that `write(path, marker)` wrote; returns the .bin's path."""
    dest.mkdir()
    shutil.copy(base_dir / "config.json", dest / "config.json")
    weights = dest / "pytorch_model.bin"
    write(weights, dest.parent / "PWNED")
    return weights


@pytest.mark.parametrize("write, message", BIN_CASES, ids=[c[0].__name__ for c in BIN_CASES])
def test_weights_bin_that_is_no_tensor_file(base, tmp_path, write, message):
    weights = bin_model(base("gpt2"), tmp_path / "model", write)
    line = assert_one_line_error(*cli("generate", "--model", weights.parent, "hi", "--max-new-tokens", "1"))
    assert line == "error: " + message.format(path=weights)
    assert not (tmp_path / "PWNED").exists()


def test_weights_bin_line_from_train(base, tmp_path):
    weights = bin_model(base("gpt2"), tmp_path / "model", broken_zip)
    assert train_error(tmp_path, weights.parent) == "error: " + NOT_A_TENSOR_FILE.format(path=weights)


def train_error(root, model) -> str:
    """The one error line of `lora train` on `model` (its log lines on stdout are allowed)."""
    (root / "train.json").write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}] * 4))
    (root / "run.yaml").write_text(f"model: {model}\nout_dir: {root / 'out'}\ndata: {{train: {root / 'train.json'}}}\n"
                                   "train: {max_steps: 1, batch_size: 2}\n")
    done = cli("train", root / "run.yaml", cwd=root)
    assert done.rc == 1 and "Traceback" not in done.stderr, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]
