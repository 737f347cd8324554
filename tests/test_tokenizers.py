"""load_tokenizer: a checkpoint's tokenizer.json (through `tokenizers`) gives the ids transformers' AutoTokenizer
gives, with bos added exactly when the model's tokenizer adds it; GPT-2 keeps the bundled BPE; bad files are one
line each. The tokenizers are byte-level BPEs trained here with the `tokenizers` library."""

from __future__ import annotations

import json
import os
import shutil
import socket

import pytest

from helpers import build_metaspace_tokenizer, build_tokenizer as build, offline_hub_repo, python
from lora_cli import tokenizer as gpt2_bpe
from lora_cli.config import ModelSpec
from lora_cli.errors import CheckpointError
from lora_cli.tokenizer import GPT2Tokenizer, HFTokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    " leading space and trailing space ",
    "naïve café — 東京 🤖 ß∂ƒ",
    "line one\nline two\r\n\ttabbed",
    "<|begin_of_text|>special in the middle<|eot_id|> and after",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


@pytest.mark.parametrize("bos", [True, False], ids=["llama3-style", "qwen2-style"])
def test_ids_equal_autotokenizer(tmp_path, bos):
    ids = build(tmp_path, bos=bos)
    ours = load_tokenizer(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(ours, HFTokenizer) and ours.vocab_size == len(theirs)
    for text in TEXTS:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text, allow_special=True, add_special_tokens=True) == expected, text
        assert ours.encode(text, allow_special=True) == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ours.encode(text)) == text
    if bos:
        assert ours.adds_bos and ours.bos_id == ids["<|begin_of_text|>"] == theirs.bos_token_id
        assert ours.eos_ids == (ids["<|end_of_text|>"], ids["<|eot_id|>"]) and ours.pad_id is None
    else:
        assert not ours.adds_bos and ours.bos_id is None
        assert ours.eos_ids == (ids["<|im_end|>"], ids["<|endoftext|>"]) == (theirs.eos_token_id, theirs.pad_token_id)
        assert ours.pad_id == ids["<|endoftext|>"]


def test_named_special_tokens_that_are_plain_vocabulary_entries_become_special(tmp_path):
    """tokenizer_config.json names <|im_end|> (eos) and <|im_start|> (an additional special token), which the
    tokenizer.json holds as plain vocabulary entries, not added tokens: transformers makes them special, and so do
    we (a chat template's "<|im_end|>" was encoded as characters, and no reply could end at it)."""
    ids = build(tmp_path, bos=False)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in ("<|im_start|>", "<|im_end|>")]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = ["<|im_start|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert ours.encode(text, allow_special=True) == theirs(text, add_special_tokens=False)["input_ids"], text
    assert ours.encode("hi<|im_end|>", allow_special=True)[-1] == ids["<|im_end|>"] == ours.eos_id
    assert len(ours.encode("<|im_end|>")) > 1  # in user text it stays text
    assert ours.vocab_size == len(theirs)  # no new ids


@pytest.mark.parametrize("decoder", [False, True], ids=["older-config", "with-added_tokens_decoder"])
def test_special_tokens_map_counts_as_transformers_reads_it(tmp_path, decoder):
    """special_tokens_map.json names eos <|im_end|>, tokenizer_config.json <|endoftext|>: transformers 5 takes the
    map's over an older tokenizer_config.json, and ignores the map beside one with an added_tokens_decoder."""
    ids = build(tmp_path, bos=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    if decoder:
        config["added_tokens_decoder"] = {str(i): {"content": t, "special": True, "normalized": False,
                                                   "lstrip": False, "rstrip": False, "single_word": False}
                                          for t, i in ids.items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                                  "pad_token": "<|im_start|>"}))
    (tmp_path / "generation_config.json").unlink()
    ours = load_tokenizer(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.eos_id == theirs.eos_token_id == ids["<|endoftext|>" if decoder else "<|im_end|>"]
    assert ours.pad_id == theirs.pad_token_id
    assert ours.named_tokens == {k: v for k, v in theirs.special_tokens_map.items() if k != "additional_special_tokens"}


def test_saved_truncation_and_padding_are_not_applied(tmp_path):
    """tokenizers saves enable_truncation / enable_padding into tokenizer.json; AutoTokenizer applies neither unless
    asked, and neither do we (they cut every example to the saved length and padded inside the trained span)."""
    build(tmp_path, bos=False)
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    raw.enable_truncation(max_length=4)
    raw.enable_padding(length=16, pad_id=0, pad_token=raw.id_to_token(0))
    raw.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = TEXTS[2] * 3
    assert ours.encode(text) == theirs(text)["input_ids"] and len(ours.encode(text)) > 16
    assert ours.encode("hi") == theirs("hi")["input_ids"] and len(ours.encode("hi")) < 4
    assert ours.encode_batch([text, "hi"]) == [ours.encode(text), ours.encode("hi")]


@pytest.mark.parametrize("eos_after", [False, True], ids=["mistral-style", "eos-appending"])
def test_prompt_and_completion_are_cut_from_the_whole_texts_ids(tmp_path, eos_after):
    """A prompt and its completion are tokenised as one text and cut where the completion begins (TRL's
    prompt-completion tokenisation): a sentencepiece-style tokenizer encoding them apart put a word-start marker
    before the completion ("\\n4" trained as "\\n", "▁4"), and a post-processor's eos landed after the prompt."""
    from lora_cli.data.encode import chunk_text, encode_pair

    build_metaspace_tokenizer(tmp_path, eos_after=eos_after)
    ours = load_tokenizer(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    whole = lambda text: [i for i in theirs(text)["input_ids"] if i != 2] + [2]  # noqa: E731  (one eos, at the end)
    for prompt, completion in [("Name a color.\n", "Green."), ("Q: 2+2=\n", " 4"), ("Say hi\n", "hi there"),
                               ("The quick", " brown fox"), ("", "only text"), ("prompt only\n", "")]:
        example, _ = encode_pair(prompt, completion, 512, tokenizer=ours)
        assert example.ids == whole(prompt + completion), (prompt, completion)
        head, tail = ours.encode_split(prompt, completion)
        assert head == [i for i in theirs(prompt)["input_ids"] if i != 2], prompt
        assert ours.encode_prompt(prompt) == head, prompt  # the prompt as generation feeds it: no eos after it
        assert example.loss_mask == [False] * len(head) + [True] * (len(tail) + 1)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    chunks = chunk_text(text, 8, tokenizer=ours)
    assert [t for c in chunks for t in c.ids[1:]] == whole(text)[1:] and chunks[0].ids[0] == 1


def test_special_tokens_in_user_text_stay_text_unless_allowed(tmp_path):
    ids = build(tmp_path, bos=True)
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    text = "a<|eot_id|>b"
    assert ids["<|eot_id|>"] in ours.encode(text, allow_special=True)
    plain = ours.encode(text)
    assert ids["<|eot_id|>"] not in plain and ours.decode(plain) == text
    assert ours.encode_batch([text, "x"]) == [plain, ours.encode("x")]


@pytest.mark.parametrize("post_bos", [True, False], ids=["post-processor-adds-bos", "none"])
def test_the_post_processor_decides_the_bos_whatever_add_bos_token_says(tmp_path, post_bos):
    """AutoTokenizer (transformers 5) adds what the tokenizer.json's post-processor adds and reads no
    add_bos_token from tokenizer_config.json: ids equal its where the two disagree."""
    ids = build(tmp_path, bos=post_bos)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["add_bos_token"] = not post_bos
    if not post_bos:
        config["bos_token"] = "<|endoftext|>"  # a bos named, never added
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS + ["", "hi"]:
        assert ours.encode(text, allow_special=True, add_special_tokens=True) == theirs(text)["input_ids"], text
    assert ours.adds_bos == post_bos
    assert ours.bos_id == ids["<|begin_of_text|>" if post_bos else "<|endoftext|>"]


def test_gpt2_keeps_the_bundled_bpe(tmp_path, tiny_hf_dir):
    for source in (str(tiny_hf_dir), ModelSpec.parse({"name": "smollm2-135m", "init": "random"})):
        tok = load_tokenizer(source)
        assert isinstance(tok, GPT2Tokenizer)
        assert tok.encode("Hello, world!") == gpt2_bpe.encode("Hello, world!") == [15496, 11, 995, 0]
        assert tok.encode("<|endoftext|>", allow_special=True, add_special_tokens=True) == [50256]
        assert tok.eos_ids == (50256,) and tok.vocab_size == 50257 and not tok.adds_bos


def test_hub_id_loads_from_the_offline_cache(tmp_path):
    """A hub id's tokenizer.json and side files come through huggingface_hub's cache (HF_HUB_OFFLINE=1); an id
    that is not cached is one line naming it."""
    source = tmp_path / "source"
    ids = build(source, bos=True)
    (source / "config.json").write_text(json.dumps({"model_type": "llama"}))
    offline_hub_repo(tmp_path / "home", "test-org/tiny-llama", source)
    code = ("import json; from lora_cli.tokenizer import load_tokenizer; t = load_tokenizer('test-org/tiny-llama');"
            "print(json.dumps([t.encode('Hello there', add_special_tokens=True), t.bos_id, list(t.eos_ids)]))")
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    out = python("-c", code, env=env)
    assert out.returncode == 0, out.stderr
    direct = load_tokenizer(str(source))
    assert json.loads(out.stdout) == [direct.encode("Hello there", add_special_tokens=True), ids["<|begin_of_text|>"],
                                      [ids["<|end_of_text|>"], ids["<|eot_id|>"]]]
    missing = python("-c", "from lora_cli.tokenizer import load_tokenizer; load_tokenizer('test-org/absent')", env=env)
    assert missing.returncode == 1 and "CheckpointError" in missing.stderr and "test-org/absent" in missing.stderr
    # once config.json has named the commit, the other files come from its cache without asking the hub, and a
    # file the cache knows the commit lacks (a .no_exist marker) is not asked for: each question costs
    # huggingface_hub's retries without network (about 23 s a file)
    revision = (tmp_path / "home" / "hub" / "models--test-org--tiny-llama" / "refs" / "main").read_text()
    absent = tmp_path / "home" / "hub" / "models--test-org--tiny-llama" / ".no_exist" / revision
    absent.mkdir(parents=True)
    for name in ("special_tokens_map.json", "chat_template.jinja"):
        (absent / name).write_text("")
    spy = ("import json, huggingface_hub; asked = []; real = huggingface_hub.hf_hub_download\n"
           "def ask(repo_id, filename, **kw):\n"
           "    asked.append(filename); return real(repo_id, filename, **kw)\n"
           "huggingface_hub.hf_hub_download = ask\n")
    out = python("-c", spy + code + "; print(json.dumps(asked))", env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == ["config.json"]
    # without network (and no HF_HUB_OFFLINE): once the hub does not answer, a file the cache does not hold is
    # asked of the cache alone, at once, not after huggingface_hub's retries
    shutil.rmtree(absent)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    spy = spy.replace("asked.append(filename)", "asked.append([filename, kw.get('local_files_only', False)])")
    offline = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    out = python("-c", spy + code + "; print(json.dumps(asked))", env=offline)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == [["config.json", False], ["special_tokens_map.json", True],
                                                       ["chat_template.jinja", True]]


def test_missing_tokenizer_json_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"has no tokenizer.json; pass a model directory with its tokenizer "
                                              r"files, or a tokenizer.json file$"):
        load_tokenizer(str(tmp_path))


def test_corrupt_tokenizer_json_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(CheckpointError, match=r"tokenizer.json: it is not a tokenizer.json that the tokenizers "
                                              r"library can load \(.+\); pass a model directory") as err:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(err.value)


def test_unknown_special_token_is_one_line(tmp_path):
    build(tmp_path, bos=False)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(CheckpointError, match=r"eos_token '</s>' of tokenizer_config.json is not in the vocabulary"):
        load_tokenizer(str(tmp_path))


def test_a_runs_model_tokenizer_goes_with_its_adapter(tmp_path):
    """`model.tokenizer` on a pretrained base (here Qwen3's byte-level BPE without bos over a Llama whose own adds
    bos): every command that reads the adapter encodes with it, from any folder (the adapter stores it as an
    absolute path although the config named it relative to a relative config path), and a merge carries its files."""
    from helpers import alpaca_rows, cli, make_family_checkpoint

    for family, bos in (("llama", True), ("qwen3", False)):
        make_family_checkpoint(tmp_path / family, family, vocab_size=400)
        build(tmp_path / family, bos=bos)
    (tmp_path / "runs").mkdir()
    (tmp_path / "train.json").write_text(json.dumps(alpaca_rows()))
    (tmp_path / "runs" / "run.yaml").write_text(
        "model: {name: ../llama, tokenizer: ../qwen3}\nout_dir: out\n"
        "data: {train: ../train.json, val_split: 0.0, max_length: 64}\nlora: {r: 2, alpha: 4, dropout: 0.0}\n"
        "train: {batch_size: 4, max_steps: 1, warmup_steps: 0, eval_every: 0, save_every: 0}\n")
    code, out, err = cli("train", "runs/run.yaml", "-q", cwd=tmp_path)
    assert code == 0, err
    adapter = tmp_path / "runs" / "out" / "adapter.safetensors"
    counts = {}
    for name, args, cwd in (("config", ["runs/run.yaml", "--data", tmp_path / "train.json"], tmp_path),
                            ("adapter", ["--adapter", adapter, "--data", tmp_path / "train.json"], tmp_path.parent),
                            ("bare llama", ["--model", tmp_path / "llama", "--data", tmp_path / "train.json"],
                             tmp_path)):
        code, out, err = cli("eval", *args, "--json", "-q", cwd=cwd)
        assert code == 0, (name, err)
        counts[name] = json.loads(out)["tokens"]
    assert counts["adapter"] == counts["config"] != counts["bare llama"], counts
    code, out, err = cli("merge", "--adapter", adapter, "--out", tmp_path / "merged", cwd=tmp_path.parent)
    assert code == 0, err
    assert (tmp_path / "merged" / "tokenizer.json").read_text() == (tmp_path / "qwen3" / "tokenizer.json").read_text()


def test_a_weights_file_takes_the_tokenizer_of_its_folder(tmp_path):
    """A single weights file of another family reads the tokenizer.json beside it, as its folder would (it once
    got the bundled GPT-2 BPE); a folder with a config.json of another family and no tokenizer.json is one line."""
    build(tmp_path, bos=True)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    alone, folder = load_tokenizer(str(tmp_path / "model.safetensors")), load_tokenizer(str(tmp_path))
    assert isinstance(alone, HFTokenizer) and alone.encode("Hello there") == folder.encode("Hello there")
    assert alone.eos_ids == folder.eos_ids and alone.bos_id == folder.bos_id
    # a model named as a weights file of another suffix (a .ckpt state dict) too: it was read as a tokenizer.json
    (tmp_path / "w.ckpt").write_bytes(b"PK\x03\x04")
    named = load_tokenizer(ModelSpec(name=str(tmp_path / "w.ckpt")))
    assert isinstance(named, HFTokenizer) and named.encode("Hello there") == folder.encode("Hello there")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes(b"")
    assert isinstance(load_tokenizer(str(bare / "model.safetensors")), GPT2Tokenizer)  # no config.json: GPT-2
    (bare / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(str(bare / "model.safetensors"))
    assert str(err.value) == (f"{bare / 'model.safetensors'}'s folder has no tokenizer.json; pass a model directory "
                              f"with its tokenizer files, or a tokenizer.json file")


def test_without_a_generation_config_the_eos_ids_of_config_json_end_replies(tmp_path):
    """transformers builds the generation config from config.json when there is no generation_config.json; its
    eos_token_id (an id or a list) then ends replies here too."""
    ids = build(tmp_path, bos=True)
    (tmp_path / "generation_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": [ids["<|eot_id|>"], 7]}))
    assert load_tokenizer(str(tmp_path)).eos_ids == (ids["<|end_of_text|>"], ids["<|eot_id|>"], 7)
    theirs = transformers.GenerationConfig.from_model_config(transformers.AutoConfig.from_pretrained(str(tmp_path)))
    assert theirs.eos_token_id == [ids["<|eot_id|>"], 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))  # it wins where it exists
    assert load_tokenizer(str(tmp_path)).eos_ids == (ids["<|end_of_text|>"], 5)


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json"])
def test_a_side_file_that_is_no_json_object_is_one_line(tmp_path, name):
    build(tmp_path, bos=False)
    (tmp_path / name).write_text("[1, 2]")
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(str(tmp_path))
    assert str(err.value) == (f"{tmp_path / name} must hold a JSON object ({{...}}), not list [1, 2]; restore the "
                              f"file from the checkpoint")


def test_a_chat_template_sees_the_special_tokens_transformers_passes(tmp_path):
    """apply_chat_template passes every special token tokenizer_config.json names (unk_token, sep_token, ... too)
    and only those: an eos id that only generation_config.json gives names no eos_token."""
    from lora_cli.chat_template import render_chat, template_tokens

    template = "{% for m in messages %}{{ m.role }}:{{ m.content }}{{ eos_token }}|{{ unk_token }}|{{ sep_token }}" \
               "{% endfor %}"
    messages = [{"role": "user", "content": "hi"}]
    for name, extra in (("named", {"unk_token": "<|endoftext|>", "sep_token": "<|im_start|>"}),
                        ("no-eos", {"eos_token": None})):
        folder = tmp_path / name
        build(folder, bos=False)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **extra, "chat_template": template}))
        theirs = transformers.AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False)
        ours = render_chat(template, messages, False, template_tokens(load_tokenizer(str(folder))))
        assert ours == theirs, name
    assert ours == "user:hi||"  # no eos_token: generation_config.json's <|im_end|> is not one


def test_streamed_pieces_join_to_the_decoded_text_across_byte_fallback_runs(tmp_path):
    """A run of byte-fallback pieces decodes together: "-" (<0x2D>) then a byte that is not UTF-8 becomes two
    U+FFFD, so text streamed at the "-" would change afterwards (it was printed twice). The pieces join to the
    whole decode, for broken and for whole multi-byte characters."""
    from lora_cli.generate import decode_incremental

    build_metaspace_tokenizer(tmp_path)
    ours = load_tokenizer(str(tmp_path))
    byte = {b: ours._tok.token_to_id(f"<0x{b:02X}>") for b in range(256)}
    word, more = ours.encode("The quick"), ours.encode(" brown fox")
    for run in ([0x2D, 0x8D], [0xF0, 0x9F, 0xA4, 0x96], [0x2D], [0xE6, 0x9D]):
        ids = word + [byte[b] for b in run] + more + [byte[0x2D]]
        pieces = list(decode_incremental(ids, ours))
        assert "".join(pieces) == ours.decode(ids), run
    assert "".join(decode_incremental(word + [byte[0x2D], byte[0x8D]], ours)) == ours.decode(word) + "\ufffd\ufffd"
