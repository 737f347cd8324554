"""`lora info`: trainable parameters and adapter size before any training (`--lora-config`), and damaged weights
files caught without loading them."""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error, cli

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


def test_info_lora_config_of_lora_settings_alone(tmp_path):
    """A config with only a lora section (no model, no data.train) is enough to count: the same numbers as the
    whole run config; a classifier's head needs its class count (data.labels) and says so in one line."""
    (tmp_path / "lora.yaml").write_text("lora:\n  r: 8\n  targets: [attn.c_attn]\n")
    alone = json.loads(cli("info", "gpt2", "--random", "--json", "--lora-config", tmp_path / "lora.yaml").stdout)
    whole = json.loads(cli("info", "gpt2", "--random", "--json", "--lora-config", CONFIGS / "quickstart.yaml").stdout)
    assert alone["lora"] == whole["lora"] and alone["lora"]["trainable"] == 294_912
    (tmp_path / "cls.yaml").write_text("task: classification\nlora:\n  r: 8\n  targets: [attn.c_attn]\n")
    line = assert_one_line_error(*cli("info", "gpt2", "--random", "--lora-config", tmp_path / "cls.yaml"),
                                 expected_code=2)
    assert line == (f"error: {tmp_path / 'cls.yaml'}: task: classification needs the number of classes: set "
                    "data.labels (or data.train, whose labels are counted)")
    done = cli("info", "gpt2", "--random", "--json", "--lora-config", tmp_path / "cls.yaml",
               "--set", "data.labels=[neg, pos]")
    assert json.loads(done.stdout)["lora"]["trainable"] == 294_912 + 2 * 768  # the score head, [2, 768]
    (tmp_path / "empty.yaml").write_text("")
    line = assert_one_line_error(*cli("info", "gpt2", "--random", "--lora-config", tmp_path / "empty.yaml"),
                                 expected_code=2)
    assert line == f"error: {tmp_path / 'empty.yaml'}: the config is empty; it needs at least a lora section"
    line = assert_one_line_error(*cli("info", "gpt2", "--random", "--set", "lora.r=4"), expected_code=2)
    assert line == "error: --set overrides keys of the --lora-config file: add --lora-config CONFIG, or drop --set"


# ------------------------------------------------------------------------------------ damaged weights files


def damaged_copy(tiny_hf_dir, folder, name: str, content: bytes):
    """A model directory with tiny_hf_dir's config.json and `content` as its weights file `name`."""
    folder.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", folder / "config.json")
    (folder / name).write_bytes(content)
    return folder / name


def test_info_refuses_a_truncated_safetensors_file(tiny_hf_dir, tmp_path):
    """`lora info` reads no weights, but a download cut short is caught from the header's data offsets."""
    data = (tiny_hf_dir / "model.safetensors").read_bytes()
    weights = damaged_copy(tiny_hf_dir, tmp_path / "cut", "model.safetensors", data[:-100])
    done = cli("info", weights.parent)
    assert (done.rc, done.stdout) == (1, "")
    assert done.stderr == (f"error: {weights} is truncated: its header describes {len(data):,} bytes but the file "
                           f"has {len(data) - 100:,}; download or copy it again\n")
    weights = damaged_copy(tiny_hf_dir, tmp_path / "header-cut", "model.safetensors", data[:200])
    header_len = int.from_bytes(data[:8], "little")
    done = cli("info", weights.parent)
    assert (done.rc, done.stdout) == (1, "")
    assert done.stderr == (f"error: {weights} is truncated: its header alone needs {8 + header_len:,} bytes but "
                           "the file has 200; download or copy it again\n")
    assert cli("info", tiny_hf_dir).rc == 0  # the whole file passes


@pytest.mark.parametrize("change, problem", [
    ({"shape": [-4]}, "has the shape [-4], not a list of sizes"),
    ({"shape": None}, "has the shape null, not a list of sizes"),
    ({"shape": [2.0]}, "has the shape [2.0], not a list of sizes"),
    ({"shape": [2**40, 2**30]}, "of shape [1099511627776, 1073741824] and dtype F32 does not fill its {span} bytes"),
    ({"dtype": None}, "has no dtype"),
])
def test_info_refuses_a_safetensors_header_whose_shape_or_dtype_is_wrong(tiny_hf_dir, tmp_path, change, problem):
    """A header entry's shape and dtype must fill the bytes its data_offsets give (they were read into a tensor
    of that shape: an internal error)."""
    data = (tiny_hf_dir / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key].update(change)
    header[key] = {k: v for k, v in header[key].items() if v is not None}
    span = header[key]["data_offsets"][1] - header[key]["data_offsets"][0]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights = damaged_copy(tiny_hf_dir, tmp_path / "bad", "model.safetensors",
                           len(text).to_bytes(8, "little") + text + data[8 + n:])
    done = cli("info", weights.parent)
    assert (done.rc, done.stdout) == (1, "")
    assert done.stderr == (f"error: {weights} is not a safetensors file (tensor {key} {problem.format(span=span)}); "
                           "download or copy it again\n")


def test_info_refuses_an_unreadable_bin_file(tiny_hf_dir, tmp_path):
    buffer = io.BytesIO()
    torch.save({"transformer.wte.weight": torch.zeros(4, 2)}, buffer)
    data = buffer.getvalue()
    weights = damaged_copy(tiny_hf_dir, tmp_path / "cut", "pytorch_model.bin", data[: len(data) // 2])
    done = cli("info", weights.parent)
    assert (done.rc, done.stdout) == (1, "")
    assert done.stderr == (f"error: {weights} is truncated or corrupt (its zip archive has no end record); "
                           "download or copy it again\n")
    weights = damaged_copy(tiny_hf_dir, tmp_path / "html", "pytorch_model.bin", b"<html>404 Not Found</html>")
    done = cli("info", weights.parent)
    assert (done.rc, done.stdout) == (1, "")
    assert done.stderr == f"error: {weights} is not a PyTorch weights file (neither torch.save's zip nor a pickle)\n"


@pytest.mark.parametrize("damage, words", [
    ("drop-a-layer", "does not match the GPT-2 architecture of its config: missing transformer.h.1."),
    ("wrong-shape", "tensor transformer.wte.weight has shape"),
    ("int-weights", "tensor transformer.h.0.mlp.c_fc.weight has dtype torch.int64, expected floating point"),
    ("int32-weights", "tensor transformer.h.0.mlp.c_fc.weight has dtype torch.int32, expected floating point"),
])
def test_info_refuses_weights_that_disagree_with_config_json(tiny_hf_dir, tmp_path, damage, words):
    """The safetensors header (read, not the weights) must agree with config.json as loading checks it: info
    refuses exactly what `lora generate --model` refuses, with the same line, instead of describing config.json."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_hf_dir / "model.safetensors"))
    if damage == "drop-a-layer":
        state = {k: v for k, v in state.items() if ".h.1." not in k}
    elif damage == "wrong-shape":
        state["transformer.wte.weight"] = state["transformer.wte.weight"][:, :-1].contiguous()
    else:  # info names the file's own dtype, as loading does
        kind = torch.int64 if damage == "int-weights" else torch.int32
        state["transformer.h.0.mlp.c_fc.weight"] = state["transformer.h.0.mlp.c_fc.weight"].to(kind)
    folder = tmp_path / damage
    folder.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", folder / "config.json")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    done = cli("info", folder)
    assert (done.rc, done.stdout) == (1, "")
    line = done.stderr.strip()
    assert line.startswith(f"error: {folder}") and words in line and len(done.stderr.splitlines()) == 1
    loading = cli("generate", "--model", folder, "hi", "--max-new-tokens", "1")
    assert (loading.rc, loading.stderr.strip()) == (1, line)


def test_info_describes_a_random_preset_as_a_run_builds_it():
    """A Llama-family preset on the bundled GPT-2 BPE: the vocabulary (and the count) `lora train` uses, 50,257
    rows, not the published 49,152 (134,515,008 parameters, tests/test_models.py)."""
    done = cli("info", "smollm2-135m", "--random", "--json")
    report = json.loads(done.stdout)
    assert report["config"]["vocab_size"] == 50257
    assert report["parameters"] == 134_515_008 + (50257 - 49152) * 576
    # the tied head is no LoRA target: named apart from the linear layers, which are the 7 of each of 30 blocks
    assert "model.layers.0.self_attn.q_proj" in report["linear_layers"] and len(report["linear_layers"]) == 7 * 30
    assert "lm_head" not in report["linear_layers"]
    assert report["tied_head"] == {"head": "lm_head", "embedding": "model.embed_tokens"}
    text = cli("info", "smollm2-135m", "--random").stdout
    assert text.endswith("  model.layers.29.mlp.down_proj\n  (lm_head shares model.embed_tokens's weight: not a LoRA "
                         "target)\n")


def test_info_lists_an_untied_head_as_a_target():
    report = json.loads(cli("info", "pythia-160m", "--random", "--json").stdout)  # GPT-NeoX: its own embed_out
    assert report["linear_layers"][-1] == "embed_out" and "tied_head" not in report and not report["tied"]
