"""`lora merge`: base + adapter -> one standalone Hugging Face directory of the base's family.

The adapter is folded into its base in fp32 (W += scaling * B A, per layer, checked finite; DoRA and slice
adapters merge the same way, lora.merge_and_unload), the LoRA wrappers are removed, and checkpoint.save_pretrained
writes config.json + model.safetensors (fp32, or bf16/fp16 after the fp32 merge) with, beside them:

    vocab.json, merges.txt          GPT-2's tokenizer, derived from the bundled BPE ranks (gpt2.tiktoken)
    tokenizer_config.json,
    special_tokens_map.json         as GPT-2's: <|endoftext|> is bos, eos and unk
    README.md                       a model card: base, adapter, LoRA settings, training summary

so `transformers.GPT2LMHeadModel.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` load it, and so
does lora-cli's own loader. The directory appears whole or not at all (built beside it, then renamed).

The other families (Llama, Mistral, Qwen2, Qwen3, GPT-NeoX) are written the same way (one save path,
pretrained.save_pretrained: their parameter names are already transformers'), with the base checkpoint's own
config.json and its tokenizer files carried over: tokenizer.json, tokenizer_config.json, special_tokens_map.json,
generation_config.json and chat_template.jinja, whichever the base (or `model.tokenizer`) has. A random preset
that ran on the bundled GPT-2 BPE gets GPT-2's tokenizer files as above.

A classification adapter merges into a `transformers.GPT2ForSequenceClassification` directory: `score.weight`
[num_labels, n_embd] beside the body (a head trained in full as it is, a LoRA'd frozen head folded like any
other layer), and config.json with architectures GPT2ForSequenceClassification, id2label / label2id in the
adapter's label order and pad_token_id 50256 (<|endoftext|>): transformers pools the last token that is not
pad_token_id, which is our last real token as long as a text does not itself end in <|endoftext|>. lora-cli's
loader reads such a directory as its GPT-2 body and ignores the head (checkpoint.HEAD_KEYS).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_cli.chat_template import TEMPLATE_FILE, add_to_tokenizer_config
from lora_cli.errors import CheckpointError, ConfigError
from lora_cli.fsutil import RunLock, output_path
from lora_cli.inference import load_for_inference
from lora_cli.lora import lora_layers, merge_and_unload
from lora_cli.models import HEAD, model_type
from lora_cli.pretrained import FAMILY_NAMES, architecture, save_pretrained
from lora_cli.runtime import DTYPES
from lora_cli.tokenizer import (EOT_ID, EOT_TOKEN, SIDE_FILES, TOKENIZER_FILE, GPT2Tokenizer, ranks_path,
                                set_in_tokenizer_config)

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# A tokenizer.json checkpoint's files that a merge carries over from the base (those it has).
CARRIED_FILES = (TOKENIZER_FILE, *SIDE_FILES, TEMPLATE_FILE)
# What a merged directory holds; --overwrite replaces only a directory like that (or an empty one).
MERGED_FILES = ("config.json", "model.safetensors", *TOKENIZER_FILES, "README.md", "generation_config.json",
                TOKENIZER_FILE, TEMPLATE_FILE)
# The model card's words that tell a directory `lora merge` wrote from a Hugging Face checkpoint holding the same
# file names (config.json, model.safetensors, README.md): --overwrite replaces only the former.
WRITTEN_BY = "written by `lora merge` (lora-cli)"


# ------------------------------------------------------------------------------------- tokenizer files


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (OpenAI's encoder.py): printable Latin-1 bytes map to
    themselves, the other 68 bytes to the characters U+0100 onwards, in byte order (space is 'Ġ')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Run byte-level BPE on `token` using only merges of rank < max_rank (lowest rank first, as the encoder
    does); for a token of rank max_rank this stops at the two parts whose merge the encoder makes last."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            return parts
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


@functools.lru_cache(maxsize=1)
def hf_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocab.json (token string -> id) and merges (in rank order) from the bundled tiktoken ranks.

    tiktoken stores only token bytes -> rank (= the token id). Each multi-byte token of rank r is the merge of
    the two parts byte-level BPE arrives at using the merges of rank < r; the merge list is those pairs in rank
    order (the standard tiktoken -> Hugging Face conversion). Bytes are shown through bytes_to_unicode."""
    from tiktoken.load import load_tiktoken_bpe  # here: tiktoken's import is paid by merges only

    ranks = load_tiktoken_bpe(ranks_path())
    table = bytes_to_unicode()
    show = lambda b: "".join(table[x] for x in b)  # noqa: E731
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[show(token)] = rank
        if len(token) < 2:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise CheckpointError(f"the bundled BPE ranks are inconsistent: token {rank} is not one merge of two "
                                  "lower-ranked tokens; reinstall lora-cli")
        merges.append((show(parts[0]), show(parts[1])))
    vocab[EOT_TOKEN] = EOT_ID
    return vocab, merges


def tokenizer_files(model_max_length: int = 1024) -> dict[str, str]:
    """The text of GPT-2's tokenizer files, as transformers' GPT2Tokenizer(Fast) reads them."""
    vocab, merges = hf_vocab_and_merges()
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(EOT_ID): {"content": EOT_TOKEN, "lstrip": False, "normalized": True,
                                                "rstrip": False, "single_word": False, "special": True}},
        **special,
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def carried_files(folder: Path) -> dict[str, str]:
    """The text of the tokenizer files (CARRIED_FILES) a tokenizer.json checkpoint has in `folder`."""
    files = {}
    for name in CARRIED_FILES:
        if (folder / name).is_file():
            try:
                files[name] = (folder / name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"cannot read {folder / name} to copy it into the merged model: {exc}") from exc
    return files


# ------------------------------------------------------------------------------------------- model card


def model_card(base, adapter, dtype: str) -> str:
    """README.md of the merged directory: what it was made from, and how to load it."""
    classifier = adapter.metadata.get("task") == "classification"
    model_class = architecture(base.model)
    family = model_type(base.model.config)
    lora = adapter.settings()
    b = base.describe()
    training = adapter.metadata.get("training") or {}
    data = adapter.metadata.get("data") or {}
    rev = f" (revision {b['revision']})" if b.get("revision") else ""
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {'text-classification' if classifier else 'text-generation'}",
        f"tags: [{family}, lora, merged, lora-cli]",
        "---",
        "",
        "# Merged LoRA model",
        "",
        f"A {FAMILY_NAMES[family]} model: the LoRA adapter `{adapter.path.name}` folded into its base model, {WRITTEN_BY}. "
        "It loads without lora-cli or PEFT.",
        "",
        "## Made from",
        "",
        f"- base model: `{b['name']}`{rev} ({b['source']}), fingerprint `{b['fingerprint']}`",
        f"- adapter: `{adapter.path}` ({adapter.kind}, {adapter.num_parameters():,} parameters)",
        f"- weights: {dtype}, merged in fp32 as W + scaling * B A (Hu et al. 2021, arXiv:2106.09685)",
        "",
        "## LoRA settings",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    for key in ("r", "alpha", "dropout", "use_rslora", "use_dora", "bias", "targets", "modules_to_save",
                "rank_pattern", "alpha_pattern"):
        value = lora.get(key)
        if key in ("rank_pattern", "alpha_pattern") and not value:
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        lines.append(f"| {key} | {shown if shown not in ('', None) else '-'} |")
    if training or data:
        lines += ["", "## Training", ""]
        if classifier and data.get("labels"):
            lines.append(f"- labels (class ids 0, 1, ...): {', '.join(map(str, data['labels']))}")
        if data.get("format"):
            lines.append(f"- data format: {data['format']}"
                         + (f", prompt template {json.dumps(data['prompt_template'])}" if data.get("prompt_template") else ""))
        for key, value in training.items():
            if value is not None:
                lines.append(f"- {key}: {value}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {model_class}",
        f"model = {model_class}.from_pretrained(\"PATH\")",
        "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")",
        "```",
        "",
    ]
    if data.get("format") in ("alpaca", "prompt_completion"):
        lines += ["Prompts should be rendered with the template the adapter was trained with (above); "
                  "`lora generate --model PATH` feeds raw prompts.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- merge


@dataclass
class MergeResult:
    out_dir: Path
    dtype: str
    layers: int  # LoRA layers folded in
    parameters: int  # of the merged model


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output path unless --overwrite, and even then anything but a merged model directory
    (or an empty one): --overwrite must never delete unrelated files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a directory path for the merged model")
    if not overwrite:
        raise ConfigError(f"--out {out} already exists; choose a new directory or pass --overwrite to replace it")
    names = sorted(p.name for p in out.iterdir())
    foreign = [name for name in names if name not in MERGED_FILES]
    if foreign:
        raise ConfigError(f"--out {out} holds files a merge did not write ({foreign[0]}); --overwrite replaces only "
                          "a merged model directory; choose another directory")
    if names and not _written_by_merge(out / "README.md"):
        raise ConfigError(f"--out {out} is a model directory that `lora merge` did not write (its README.md has no "
                          "lora-cli model card); --overwrite replaces only a merged model directory; choose another "
                          "directory")


def _written_by_merge(card: Path) -> bool:
    try:
        return WRITTEN_BY in card.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def check_not_base(out: Path, base) -> None:
    """--out must not be the directory the base model is read from (or hold it): writing there replaces the
    base that the adapter is recorded against."""
    if base.source != "local":
        return
    where = Path(base.name)
    where = where if where.is_dir() else where.parent
    target = out.resolve()
    if target == where or target in where.parents:
        raise ConfigError(f"--out {out} is where the base model {base.name} is read from; choose another directory "
                          "for the merged model")


def classifier_pad_id(tokenizer) -> int:
    """A merged classifier's pad_token_id. transformers pools the last token that is not pad_token_id, lora-cli
    the last real token: the pad must not be a token the tokenizer writes at the end of every text (the eos of a
    post-processor "<s> $A </s>"), or transformers would pool the token before it. The tokenizer's pad, else its
    eos, else its bos: the first that is not such a token."""
    last = tokenizer.encode("a", add_special_tokens=True)[-1]  # "a"'s own token, or what the tokenizer appends
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    candidates = [i for i in (tokenizer.pad_id, eos, tokenizer.bos_id) if i is not None]
    if not candidates:
        return tokenizer.eos_id  # its error: name an eos token
    return next((i for i in candidates if i != last), candidates[0])


def merge_adapter(adapter, out_dir, model: str | None = None, dtype: str = "fp32", overwrite: bool = False,
                  allow_mismatch: bool = False, log=None) -> MergeResult:
    """Load the base (the adapter's, or `model`) and the adapter, merge in fp32, and write `out_dir`."""
    log = log or (lambda message: None)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = output_path(out_dir, "--out")
    with RunLock(out, "lora merge", "--out"):  # no other train or merge writes `out` meanwhile
        return _merge_into(out, adapter, model, dtype, overwrite, allow_mismatch, log)


def _merge_into(out: Path, adapter, model, dtype: str, overwrite: bool, allow_mismatch: bool, log) -> MergeResult:
    check_out_dir(out, overwrite)
    loaded = load_for_inference(adapter, model, allow_mismatch)
    check_not_base(out, loaded.base)
    net = loaded.model.float()  # the merge arithmetic is fp32 whatever the storage dtype
    labels = loaded.settings.labels if getattr(net, HEAD, None) is not None else None
    layers = len(lora_layers(net))
    head = f" and its {len(labels)}-label head ({', '.join(map(str, labels))})" if labels else ""
    log(f"merging {layers} LoRA layers of {loaded.adapter.path}{head} into {loaded.base.name}")
    merge_and_unload(net)  # W += scaling * B A in fp32, refusing non-finite results
    bad = next((name for name, p in net.state_dict().items() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise CheckpointError(f"the merged weight {bad} is not finite; nothing was written")
    tokenizer = loaded.tokenizer
    gpt2_bpe = isinstance(tokenizer, GPT2Tokenizer)
    files = tokenizer_files(net.config.n_positions) if gpt2_bpe else carried_files(tokenizer.path.parent)
    files["README.md"] = model_card(loaded.base, loaded.adapter, dtype)
    add_to_tokenizer_config(files, loaded.settings.chat_template)  # a chat adapter's template, as trained
    updates = None
    if labels:  # score.weight is in net's state dict, beside the body
        names = [str(x) for x in labels]
        pad = EOT_ID if gpt2_bpe else classifier_pad_id(tokenizer)
        updates = {"num_labels": len(names),
                   "id2label": {str(i): name for i, name in enumerate(names)},
                   "label2id": {name: i for i, name in enumerate(names)},
                   "problem_type": "single_label_classification", "pad_token_id": pad}
        # the tokenizer names the pad token pad_token_id points at, where the base names none, so transformers pads
        # batches (`padding=True`, a batched pipeline) as the model pools them
        set_in_tokenizer_config(files, "pad_token", tokenizer.decode([pad]),
                                overwrite=not gpt2_bpe and pad != tokenizer.pad_id)
    elif gpt2_bpe:
        files["generation_config.json"] = json.dumps({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID,
                                                      "pad_token_id": EOT_ID}, indent=2) + "\n"
    if gpt2_bpe and model_type(net.config) != "gpt2":  # a random preset on GPT-2's BPE: its special ids are EOT
        updates = {"bos_token_id": EOT_ID, "eos_token_id": EOT_ID, **(updates or {})}
    check_out_dir(out, overwrite)  # again: the merge took time, and the directory may have appeared meanwhile
    save_pretrained(net, out, dtype=DTYPES[dtype], extra_files=files, config_updates=updates,
                    base_config=loaded.base.hf_config)
    return MergeResult(out, dtype, layers, net.num_parameters())

