import json
import os
import pickle
import shutil

import pytest
import torch

from helpers import Evil, child_env, cli, python
from lora_cli import tokenizer
from lora_cli.pretrained import load_model, save_pretrained
from lora_cli.errors import CheckpointError


TEXT = "The quick brown fox jumps over the lazy dog. Every effort moves you."


def logits_of(model, ids):
    with torch.no_grad():
        return model.logits(model(ids))


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    ours = load_model({"name": "gpt2", "init": "random", "n_layer": 2, "n_head": 2, "n_embd": 64, "seed": 3}).model.eval()
    save_pretrained(ours, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    assert (logits_of(ours, ids) - ref).abs().max().item() <= 1e-4
    # and our loader reads its own output back bit for bit
    again = load_model(str(tmp_path / "out")).model
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_single_file_checkpoints_with_and_without_prefix(tmp_path, tiny_hf_dir):
    """A bare weights file (transformers' keys, with or without the transformer. prefix; safetensors or a pickle)
    does not say its head count: of a size GPT-2 never published, it is refused in one line unless its config.json
    sits beside it, and then it loads exactly (a guess of 64-wide heads gave 1 head where there are 2)."""
    from safetensors.torch import load_file, save_file

    ref = load_model(str(tiny_hf_dir)).model
    state = load_file(str(tiny_hf_dir / "model.safetensors"))
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    torch.save(state, tmp_path / "weights.bin")
    torch.save(bare, tmp_path / "weights.pt")
    ids = torch.tensor([tokenizer.encode(TEXT)])
    for name in ("bare.safetensors", "weights.bin", "weights.pt"):
        with pytest.raises(CheckpointError) as err:
            load_model(str(tmp_path / name))
        assert str(err.value) == (f"{tmp_path / name}: 2 layers of width 64 is no published GPT-2 size, and a bare "
                                  "weights file does not say its number of attention heads; put its config.json "
                                  "beside it (or pass its Hugging Face directory)")
    shutil.copy(tiny_hf_dir / "config.json", tmp_path / "config.json")
    for name in ("bare.safetensors", "weights.bin", "weights.pt"):
        model = load_model(str(tmp_path / name)).model
        assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 2, 64)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
        assert torch.equal(logits_of(model, ids), logits_of(ref, ids))


def test_random_init_is_seeded_and_counts_match():
    a = load_model({"name": "gpt2", "init": "random", "n_layer": 2, "n_embd": 64, "n_head": 2, "seed": 1})
    b = load_model({"name": "gpt2", "init": "random", "n_layer": 2, "n_embd": 64, "n_head": 2, "seed": 1})
    c = load_model({"name": "gpt2", "init": "random", "n_layer": 2, "n_embd": 64, "n_head": 2, "seed": 2})
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert torch.equal(a.model.transformer.wte.weight, b.model.transformer.wte.weight)
    assert a.model.lm_head.weight is a.model.transformer.wte.weight


def make_hub_cache(root, repo, source_dir, revision="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: blobs, snapshots/<commit>/<file> links, refs/main."""
    repo_dir = root / "hub" / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snap = repo_dir / "snapshots" / revision
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for f in ("config.json", "model.safetensors"):
        blob = repo_dir / "blobs" / f"blob-{f}"
        shutil.copy(source_dir / f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f)
    return revision


def test_offline_load_from_hub_cache(tmp_path, tiny_hf_dir):
    rev = make_hub_cache(tmp_path, "test-org/tiny-gpt2", tiny_hf_dir)
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    code = (
        "import torch; from lora_cli.pretrained import load_model; b = load_model('test-org/tiny-gpt2');"
        "print(b.source, b.name, b.revision, b.fingerprint)"
    )
    out = python("-c", code, env={**os.environ, **env})  # a fresh interpreter: huggingface_hub reads HF_HOME once
    assert out.returncode == 0, out.stderr
    direct = load_model(str(tiny_hf_dir))
    assert out.stdout.split() == ["hub", "test-org/tiny-gpt2", rev, direct.fingerprint]
    info = cli("info", "test-org/tiny-gpt2", "--json", env=child_env(**env))
    assert info.rc == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["parameters"] == direct.model.num_parameters() == sum(p.numel() for p in direct.model.parameters())
    assert report["revision"] == rev


def test_offline_unknown_hub_id_is_one_line(tmp_path):
    out = cli("info", "nobody/no-such-model", env=child_env(HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1"))
    assert out.rc == 1
    assert out.stderr.startswith("error: model nobody/no-such-model could not be downloaded and is not in the Hugging Face cache")
    assert "offline mode (HF_HUB_OFFLINE=1)" in out.stderr and "pass a local directory" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_info_gpt2_exact_count():
    out = cli("info", "gpt2", "--random", "--json")
    assert out.rc == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["parameters"] == 124_439_808
    assert report["linear_layers"][:4] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                           "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert len(report["linear_layers"]) == 48 and report["tied_head"] == {"head": "lm_head", "embedding": "transformer.wte"}
    medium = json.loads(cli("info", "gpt2-medium", "--random", "--json").stdout)
    assert medium["parameters"] == 354_823_168


def test_info_local_dir(tiny_hf_dir):
    out = cli("info", str(tiny_hf_dir))
    assert out.rc == 0, out.stderr
    n = load_model(str(tiny_hf_dir)).model.num_parameters()
    assert f"parameters  {n:,}" in out.stdout
    assert "transformer.h.1.mlp.c_proj" in out.stdout


# ------------------------------------------------------------------------------------------- bad inputs


def test_bad_checkpoints(tmp_path, tiny_hf_dir):
    with pytest.raises(CheckpointError, match="model path .*/missing does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))
    # truncated safetensors
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", broken / "config.json")
    data = (tiny_hf_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt, or not a plain tensor file"):
        load_model(str(broken))
    # another architecture: a config that does not fit the weights
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((tiny_hf_dir / "config.json").read_text())
    config["n_layer"] = 3
    (other / "config.json").write_text(json.dumps(config))
    shutil.copy(tiny_hf_dir / "model.safetensors", other / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not match the GPT-2 architecture of its config: missing transformer.h.2"):
        load_model(str(other))
    config["n_layer"] = 2
    config["n_embd"] = 128
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor transformer.wte.weight has shape \[50257, 64\], the model expects \[50257, 128\]"):
        load_model(str(other))
    bert = tmp_path / "bert.safetensors"
    from safetensors.torch import save_file
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(10, 4)}, str(bert))
    with pytest.raises(CheckpointError, match="is not a GPT-2 state dict"):
        load_model(str(bert))


def test_malicious_pickle_is_refused(tmp_path):
    evil = tmp_path / "evil.bin"
    with open(evil, "wb") as fh:
        pickle.dump({"transformer.wte.weight": Evil(tmp_path / "PWNED")}, fh)
    out = cli("info", str(evil), cwd=tmp_path)
    assert out.rc == 1
    assert "not a plain tensor file" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "PWNED").exists()


def test_written_files_get_normal_permissions(tmp_path):
    from lora_cli.fsutil import atomic_write_text, default_mode

    atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == default_mode()
    model = load_model({"name": "gpt2", "init": "random", "n_layer": 1, "n_head": 1, "n_embd": 8}).model
    save_pretrained(model, tmp_path / "m")
    assert (tmp_path / "m").stat().st_mode & 0o777 == default_mode(directory=True)
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == default_mode()
