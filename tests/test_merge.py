"""`lora merge`: the merged directory loads in transformers (same logits as base + adapter), its tokenizer files
encode like ours, our loader reads it back, and an existing output directory is left alone."""

import json
from pathlib import Path

import pytest
import torch

from lora_cli.adapter import attach_adapter
from lora_cli.pretrained import load_model
from lora_cli.merge import bytes_to_unicode, hf_vocab_and_merges
from lora_cli.tokenizer import encode

from helpers import assert_one_line_error, cli, make_hf_gpt2, train_run, tree

DATA = Path(__file__).parent.parent / "data"
# DoRA and a trained bias beside slices would be better coverage but merge like the rest; keep slices + a plain
# target (two LoRA layer kinds) and lora_only biases (stored under base_layer, folded by the unload).
LORA = "{r: 4, alpha: 8, dropout: 0.0, targets: [attn.q, attn.v, mlp.c_fc], bias: lora_only}"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    make_hf_gpt2(root / "base", seed=2)
    train_run(root, root / "base", lora=LORA)
    adapter = root / "out" / "adapter.safetensors"
    code, out, err = cli("merge", "--adapter", adapter, "--out", root / "merged")
    assert code == 0, err
    assert out.strip() == str(root / "merged")
    return root, adapter, root / "merged"


def our_logits(root, adapter, ids):
    base = load_model(str(root / "base"))
    model = attach_adapter(base, adapter).eval()
    with torch.no_grad():
        return model.logits(model(ids))


IDS = torch.randint(0, 50257, (2, 17), generator=torch.Generator().manual_seed(0))


def test_transformers_loads_the_merge_with_equal_logits(merged):
    from transformers import GPT2LMHeadModel

    root, adapter, out = merged
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                     "merges.txt", "model.safetensors", "special_tokens_map.json",
                                                     "tokenizer_config.json", "vocab.json"]
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(IDS).logits
    ours = our_logits(root, adapter, IDS)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    base = GPT2LMHeadModel.from_pretrained(root / "base").eval()
    with torch.no_grad():
        assert (base(IDS).logits - theirs).abs().max() > 1e-3  # the merge changed the model
    # no LoRA tensors remain; our own loader reads the directory too, to the same logits
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    again = load_model(str(out)).model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.logits(again(IDS)), ours, atol=1e-5, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert str(root / "base") in card and "| r | 4 |" in card and "| bias | lora_only |" in card


CORPUS = [
    "Hello, world! It's 2024 and we're testing tokenizers; they'll work, won't they? I'd say so. DON'T SHOUT.",
    "  leading spaces,   runs of spaces,\ttabs\t\tand\n\n\nnewlines\r\n  ",
    "naïve café — “curly quotes” ‘single’ … ellipsis; Ünïcödé: 日本語のテキスト, 中文, 한국어, Ελληνικά, русский",
    "emoji 🤖🚀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "numbers 3.14159 1,000,000 1e-5 0x1F 12345678901234567890 ½ ² ٣",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\nif __name__ == '__main__':\n\tprint(f(3))",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html> https://example.com/path?q=1&r=2#frag",
    "zero\u200bwidth\u00a0nbsp\u2028line-sep\u3000ideographic space",
    "Ġ and Ċ are GPT-2's byte symbols; so is ĉ",
    "<|endoftext|> marks the end",
]


def test_auto_tokenizer_encodes_like_ours(merged):
    from transformers import AutoTokenizer

    _, _, out = merged
    tok = AutoTokenizer.from_pretrained(out)
    texts = list(CORPUS)
    texts += [r["instruction"] + "\n" + r["output"] for r in json.loads((DATA / "instruction-data.json").read_text())[:200]]
    verdict = (DATA / "the-verdict.txt").read_text()
    texts += [verdict[i: i + 2000] for i in range(0, len(verdict), 2000)]
    texts.append(bytes(range(32, 256)).decode("latin-1"))
    mismatched = [t for t in texts if tok.encode(t) != encode(t, allow_special=True)]
    assert mismatched == []
    assert tok.decode(encode(CORPUS[3])) == CORPUS[3]
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id) == ("<|endoftext|>", 50256, 50256)


def test_vocab_and_merges_structure():
    vocab, merges = hf_vocab_and_merges()
    assert len(vocab) == 50257 and sorted(vocab.values()) == list(range(50257))
    assert len(merges) == 50000  # GPT-2's merges.txt has 50,000 rules
    assert merges[:3] == [("Ġ", "t"), ("Ġ", "a"), ("h", "e")]  # its first lines
    assert bytes_to_unicode()[ord(" ")] == "Ġ" and bytes_to_unicode()[ord("\n")] == "Ċ"
    # every merge joins two tokens of lower id into the token of its own rank
    for rank, (a, b) in enumerate(merges[:2000], start=256):
        assert vocab[a + b] == rank and vocab[a] < rank and vocab[b] < rank


def test_bf16_merge_and_existing_directory(merged, tmp_path):
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel

    root, adapter, out = merged
    half = tmp_path / "half"
    code, _, err = cli("merge", "--adapter", adapter, "--out", half, "--dtype", "bf16")
    assert code == 0, err
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = GPT2LMHeadModel.from_pretrained(half, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, our_logits(root, adapter, IDS), atol=0.05, rtol=0.05)

    # An existing directory: refused without --overwrite, untouched.
    before = tree(half)
    line = assert_one_line_error(*cli("merge", "--adapter", adapter, "--out", half), expected_code=2)
    assert line == f"error: --out {half} already exists; choose a new directory or pass --overwrite to replace it"
    assert tree(half) == before
    # --overwrite replaces a merged directory, but never a directory holding other files.
    code, _, err = cli("merge", "--adapter", adapter, "--out", half, "--overwrite")
    assert code == 0, err
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    line = assert_one_line_error(*cli("merge", "--adapter", adapter, "--out", precious, "--overwrite"), expected_code=2)
    assert "notes.txt" in line and (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["half", "precious"]  # no staging left behind


def test_overwrite_never_replaces_a_checkpoint_merge_did_not_write_nor_the_base(merged, tmp_path):
    import shutil

    root, adapter, out = merged
    # a Hugging Face checkpoint holds only file names a merge writes too; its README is not our model card
    plain = tmp_path / "plain"
    shutil.copytree(root / "base", plain)
    (plain / "README.md").write_text("# my model\n")
    before = tree(plain)
    line = assert_one_line_error(*cli("merge", "--adapter", adapter, "--out", plain, "--overwrite"), expected_code=2)
    assert line == (f"error: --out {plain} is a model directory that `lora merge` did not write (its README.md has "
                    "no lora-cli model card); --overwrite replaces only a merged model directory; choose another "
                    "directory")
    assert tree(plain) == before
    # a merged directory is one --overwrite may replace, but not while it is the base being read
    before = tree(out)
    line = assert_one_line_error(*cli("merge", "--adapter", adapter, "--model", out, "--allow-mismatch", "--out",
                                      out, "--overwrite"), expected_code=2)
    assert line == (f"error: --out {out} is where the base model {out} is read from; choose another directory for "
                    "the merged model")
    assert tree(out) == before


def test_merge_bad_inputs(merged, tmp_path):
    root, adapter, _ = merged
    make_hf_gpt2(tmp_path / "other", seed=5)
    line = assert_one_line_error(*cli("merge", "--adapter", adapter, "--out", tmp_path / "m", "--model",
                                      tmp_path / "other"))
    assert "fingerprint" in line
    assert_one_line_error(*cli("merge", "--adapter", adapter, "--out", tmp_path / "m", "--dtype", "int8"),
                          expected_code=2)
    assert_one_line_error(*cli("merge", "--adapter", tmp_path / "missing.safetensors", "--out", tmp_path / "m"))
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
