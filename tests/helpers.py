"""Shared test helpers (plain functions; conftest.py holds the fixtures): tiny random GPT-2 checkpoints, batches,
data rows, trained adapters, the one way to run the real `lora` CLI (`cli`), and the one way to start a fresh
Python interpreter (`python`) for what a forked child cannot show (imports, torchrun, a killed process)."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import zygote
from lora_cli.tokenizer import EOT_ID
from zygote import Result

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, n_head=2, n_embd=64, n_positions=128)
WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "seven", "table", "music", "light", "north", "paper"]
# LORA_TEST_REAL_CLI=1: `cli` runs every command with `python -m lora_cli` instead of a forked zygote child.
REAL_CLI = os.environ.get("LORA_TEST_REAL_CLI", "") not in ("", "0")
TIMEOUT_S = 300

# ------------------------------------------------------------------------------------------ running things


def child_env(**extra) -> dict:
    """The environment for CLI children: no LORA_/HF_ settings of the caller, offline hub, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORA_", "HF_"))}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "COLUMNS": "200", **extra})
    return env


def python(*args, cwd=None, env: dict | None = None, timeout: float = TIMEOUT_S, stdin: str | bytes | None = None,
           popen: bool = False, **kw):
    """`python ARGS` in a fresh interpreter: a CompletedProcess with text output, or the Popen with popen=True
    (stdout and stderr piped unless given in kw). env: the whole environment (default: ours), with the repo on
    PYTHONPATH. Only for what a forked zygote child cannot show; every other CLI run goes through `cli`."""
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, *map(str, args)]
    if popen:
        kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
        return subprocess.Popen(argv, cwd=cwd, env=env, text=True, **kw)
    if isinstance(stdin, bytes):  # bytes that need not be text in, text out
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=timeout, input=stdin, **kw)
        return subprocess.CompletedProcess(argv, done.returncode, done.stdout.decode(errors="replace"),
                                           done.stderr.decode(errors="replace"))
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          input=stdin if stdin is not None else "", **kw)


_ZYGOTE: list[zygote.Zygote] = []


def warm_zygote() -> zygote.Zygote:
    """The session's zygote (tests/zygote.py), started on first use: it forks every `cli` run."""
    if not _ZYGOTE:
        _ZYGOTE.append(zygote.Zygote(Path(tempfile.mkdtemp(prefix="lora-zygote-")), timeout=TIMEOUT_S))
        atexit.register(_ZYGOTE[0].close)
    return _ZYGOTE[0]


def cli(*args, cwd=None, env: dict | None = None, stdin: str | bytes | None = None,
        memory_mb: int | None = None) -> Result:
    """Run the real `lora ARGS` command, as `python -m lora_cli` does, in a child forked from the warm zygote:
    Result(rc, stdout, stderr), which also unpacks as a tuple. cwd: the current directory; env: child_env()
    (no LORA_/HF_ settings of the caller, offline hub); stdin: text (or bytes) for the child's standard input."""
    argv = [str(a) for a in args]
    cwd = Path(cwd or os.getcwd())
    env = child_env() if env is None else env
    if REAL_CLI:
        return cli_fresh(*argv, cwd=cwd, env=env, stdin=stdin)
    return warm_zygote().run(argv, cwd, env, memory_mb=memory_mb, stdin=stdin)


def cli_fresh(*args, cwd=None, env: dict | None = None, stdin: str | bytes | None = None) -> Result:
    """`python -m lora_cli ARGS` in a fresh interpreter, for what a forked child cannot show (what a command
    imports, that the zygote behaves as the real thing); otherwise use `cli`. env: child_env() by default."""
    try:
        done = python("-m", "lora_cli", *args, cwd=cwd, env=child_env() if env is None else env, stdin=stdin)
    except subprocess.TimeoutExpired:
        return Result("timeout", "", "")
    return Result(done.returncode, done.stdout, done.stderr)


def assert_one_line_error(code, out, err, expected_code=1):
    assert code == expected_code, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""
    return lines[0]


# --------------------------------------------------------------------------------------- models and batches


def make_hf_gpt2(path, seed: int = 0, **overrides):
    """Save a random transformers GPT2LMHeadModel (full 50257 vocabulary) with save_pretrained; return it."""
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = HFConfig(**{**TINY, **overrides}, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(path)
    return model


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


def ids_batch(seed=0, B=2, T=10):
    """[B, T] random token ids."""
    return torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(seed))


def rel(a, b) -> float:
    """Norm-wise relative difference of b from a (a the plain path)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


class Evil:
    """A pickle payload: unpickling it calls os.system (weights_only loading must refuse the global)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------- data and runs


def alpaca_rows(words=WORDS, repeat: int = 3, with_input: bool = True):
    """Rows "Repeat the word W." -> W repeated; with_input: every third row has an Input block (the two Alpaca
    templates)."""
    return [{"instruction": f"Repeat the word {w}.", "input": "twice" if with_input and i % 3 == 0 else "",
             "output": " ".join([w] * repeat)} for i, w in enumerate(words)]


def train_run(root: Path, base: Path, lora="{r: 4, alpha: 8, dropout: 0.0, targets: [attn.q, attn.v, mlp.c_proj]}",
              rows=None, steps=4, lr=2e-2, data_keys: str = "") -> Path:
    """`lora train` a few steps on alpaca rows (or `rows`; `data_keys` adds data keys such as
    ", chat_template: chatml"); returns the run config (out_dir = root/out)."""
    from lora_cli.config import load_config
    from lora_cli.train import train

    root.mkdir(parents=True, exist_ok=True)
    (root / "train.json").write_text(json.dumps(rows or alpaca_rows()))
    config = root / "run.yaml"
    config.write_text(f"""\
model: {base}
out_dir: out
data: {{train: train.json, val_split: 0.25, max_length: 96{data_keys}}}
lora: {lora}
train: {{lr: {lr}, batch_size: 4, max_steps: {steps}, warmup_steps: 1, eval_every: 0, save_every: 0, log_every: 1}}
""")
    train(load_config(config), log=lambda m: None, progress=False)
    return config


def tree(path: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file under path: to show nothing changed."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(path).rglob("*"))}


def offline_hub_repo(home: Path, repo_id: str, source: Path, revision: str = "0123456789abcdef" * 2 + "01234567") -> str:
    """Put the files of `source` into HF_HOME=`home` as huggingface_hub's cache lays out a download of `repo_id`
    (blobs, snapshots/REVISION links, refs/main), so HF_HUB_OFFLINE=1 loads it; returns the revision."""
    import shutil

    repo_dir = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo_dir / "snapshots" / revision
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for f in source.iterdir():
        blob = repo_dir / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    return revision


# ------------------------------------------------------------------------------------------------ tokenizers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "naïve café — 東京 🤖 über straße", "  leading spaces\tand tabs\nnew lines",
    "def f(x):\n    return x * 2",
] * 20


def build_tokenizer(folder, *, bos: bool) -> dict[str, int]:
    """A byte-level BPE tokenizer.json like Llama 3 / SmolLM (bos: a TemplateProcessing post-processor adds it)
    or like Qwen2 (no bos), saved with its tokenizer_config.json and generation_config.json (vocabulary 400).
    Returns the special tokens' ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"] if bos
                else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = {s: tok.token_to_id(s) for s in specials}
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", ids["<|begin_of_text|>"])])
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
        generation = {"bos_token_id": ids["<|begin_of_text|>"],
                      "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        generation = {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              **config}))
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return ids


def build_metaspace_tokenizer(folder, *, eos_after: bool = False) -> dict[str, int]:
    """A sentencepiece-style tokenizer.json like Mistral's and Llama 2's (Metaspace "first": a word-start marker
    before the text; BPE with byte fallback; <s> added by a TemplateProcessing post-processor, and </s> after the
    text as well with eos_after), with its tokenizer_config.json. Returns the special tokens' ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    learner.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, limit_alphabet=60))
    learned = json.loads(learner.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    single = "<s> $A </s>" if eos_after else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(single=single, pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "bos_token": "<s>", "eos_token": "</s>"}))
    return {"<unk>": 0, "<s>": 1, "</s>": 2}


# ------------------------------------------------------------------------------------------ other families

FAMILY_SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128)


def hf_family_config(family: str, vocab_size: int = FAMILY_SIZES["vocab_size"]):
    """A tiny transformers config per family, each with the feature that sets the family apart switched on."""
    import transformers

    sizes = {**FAMILY_SIZES, "vocab_size": vocab_size}
    if family == "llama":  # GQA, tied embeddings, q/k/v/o biases, llama3 rope scaling
        return transformers.LlamaConfig(**sizes, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if family == "mistral":  # no sliding window (not supported), untied
        return transformers.MistralConfig(**sizes, num_key_value_heads=2, sliding_window=None)
    if family == "qwen2":  # q/k/v biases, multi-head
        return transformers.Qwen2Config(**sizes, num_key_value_heads=4, tie_word_embeddings=True)
    if family == "qwen3":  # q/k RMSNorm, head_dim * heads != hidden_size
        return transformers.Qwen3Config(**sizes, num_key_value_heads=2, head_dim=32)
    if family == "gpt_neox":  # partial rotary, parallel residual, fused per-head q/k/v
        return transformers.GPTNeoXConfig(**sizes, rotary_pct=0.5, use_parallel_residual=True)
    if family == "gpt_neox_sequential":
        return transformers.GPTNeoXConfig(**sizes, use_parallel_residual=False)
    raise KeyError(family)


def make_family_checkpoint(path, family: str, seed: int = 0, vocab_size: int = FAMILY_SIZES["vocab_size"],
                           **save_kwargs):
    """Save a random transformers model of `family` (biases and norm weights perturbed away from 0 and 1);
    return it in eval mode."""
    import transformers

    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_family_config(family, vocab_size)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(path, **save_kwargs)
    return hf
