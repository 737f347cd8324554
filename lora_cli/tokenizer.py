"""Tokenizers: GPT-2 byte-pair encoding through tiktoken, built from the ranks file bundled in the package (no
network), and any checkpoint's tokenizer.json through Hugging Face's `tokenizers` (load_tokenizer)."""

from __future__ import annotations

import functools
import json
from importlib import resources
from pathlib import Path

from lora_cli.config import WEIGHT_SUFFIXES, ModelSpec
from lora_cli.errors import CheckpointError, first_line

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
# The GPT-2 pre-tokenizer split pattern, as in OpenAI's encoder.py and tiktoken's `gpt2` encoding.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def ranks_path() -> str:
    return str(resources.files("lora_cli").joinpath("assets/gpt2.tiktoken"))


@functools.lru_cache(maxsize=1)
def get_encoding():
    """The tiktoken Encoding for GPT-2, equal to `tiktoken.get_encoding("gpt2")` but read from the package."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(ranks_path()),
        special_tokens={EOT_TOKEN: EOT_ID},
    )


def encode(text: str, allow_special: bool = False) -> list[int]:
    """Token ids for `text`. `<|endoftext|>` in the text is the special token only when `allow_special`;
    otherwise it is encoded as the plain characters, so user data can never inject an end-of-text."""
    enc = get_encoding()
    if allow_special:
        return enc.encode(text, allowed_special={EOT_TOKEN})
    return enc.encode(text, disallowed_special=())


def decode(ids: list[int]) -> str:
    return get_encoding().decode(ids)


# ------------------------------------------------------------------------------------ tokenizers by checkpoint
#
# One interface for every model's tokenizer: encode(text, allow_special, add_special_tokens), encode_batch,
# decode, vocab_size, bos_id, eos_ids, pad_id. GPT-2 keeps the bundled BPE ranks above (offline, unchanged);
# other checkpoints bring a tokenizer.json, read with Hugging Face's `tokenizers` library (the fast tokenizer
# transformers' AutoTokenizer wraps), with bos/eos/pad from tokenizer_config.json, special_tokens_map.json and
# generation_config.json.

def _token_text(token):
    """A special token as tokenizer_config.json names it: its text, also from {"content": "<s>", ...} (older files)."""
    return token.get("content") if isinstance(token, dict) else token


TOKENIZER_FILE = "tokenizer.json"
# The special tokens transformers passes a chat template by name (apply_chat_template's special_tokens_map)
TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# The files next to tokenizer.json that name special tokens; generation_config.json adds the ids that end a reply.
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def set_in_tokenizer_config(files: dict[str, str], key: str, value, overwrite: bool = True) -> None:
    """Set `key` in the tokenizer_config.json text among a model directory's files (when it has one), rewritten as
    transformers writes it; with overwrite=False only where the key is missing or null."""
    if "tokenizer_config.json" not in files:
        return
    config = json.loads(files["tokenizer_config.json"])
    if overwrite or config.get(key) is None:
        config[key] = value
        files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"


class GPT2Tokenizer:
    """The bundled GPT-2 BPE behind the common interface (the module functions above, unchanged)."""

    name = "gpt2"  # as adapters record it
    vocab_size = EOT_ID + 1  # 50,257: the 50,256 BPE ranks, then <|endoftext|>
    bos_id: int | None = EOT_ID
    eos_ids: tuple[int, ...] = (EOT_ID,)
    pad_id: int | None = None
    adds_bos = False  # GPT-2's tokenizer adds no special token to a text

    def __init__(self, folder: Path | None = None):
        # the local checkpoint folder it serves, where its side files (a merged model's chat template) are read
        self.folder = folder

    @property
    def named_tokens(self) -> dict[str, str]:
        """What a chat template sees by name: GPT-2's tokenizer_config.json names <|endoftext|> three times."""
        return {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}

    def encode(self, text: str, allow_special: bool = False, add_special_tokens: bool = False) -> list[int]:
        return encode(text, allow_special)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encode(text) for text in texts]

    def encode_prompt(self, text: str) -> list[int]:
        return encode(text)

    def encode_split(self, prefix: str, text: str) -> tuple[list[int], list[int]]:
        """(ids of prefix, ids of text), each encoded on its own: GPT-2's pre-tokenizer cuts at the spaces and
        newlines a prompt ends with, so the two match the whole's ids there (see HFTokenizer.encode_split)."""
        return encode(prefix), encode(text)

    @property
    def eos_id(self) -> int:
        return self.eos_ids[0]

    def decode(self, ids: list[int]) -> str:
        return decode(ids)


class HFTokenizer:
    """A checkpoint's tokenizer.json through `tokenizers`, with the special tokens its side files name.

    add_special_tokens adds what the model's own tokenizer adds (AutoTokenizer's default in transformers 5): what
    its post-processor adds (Llama 3, SmolLM: a TemplateProcessing "<bos> $A"; nothing for Qwen2), whatever
    `add_bos_token` in tokenizer_config.json says."""

    def __init__(self, path: Path, side: dict[str, dict]):
        from tokenizers import Tokenizer  # here, not at the top: GPT-2 runs never load it

        self.path = path
        self.name = str(path)  # as adapters record it
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception subclass for every damaged file
            raise CheckpointError(
                f"cannot read {path}: it is not a tokenizer.json that the tokenizers library can load "
                f"({first_line(exc)}); pass a model directory with a valid tokenizer.json"
            ) from exc
        # A tokenizer.json keeps the truncation and padding it was saved with; transformers ignores them unless a
        # call asks, and so do we: examples are truncated and padded by max_length and the collator.
        self._tok.no_truncation()
        self._tok.no_padding()
        # As transformers 5 reads them (PreTrainedTokenizerBase.from_pretrained): a tokenizer_config.json with an
        # added_tokens_decoder alone; an older one with special_tokens_map.json's entries over its own
        tokenizer_config = side.get("tokenizer_config.json", {})
        config = dict(tokenizer_config) if "added_tokens_decoder" in tokenizer_config else \
            {**tokenizer_config, **side.get("special_tokens_map.json", {})}
        self._add_named_special_tokens(config)
        # what a chat template sees as bos_token, eos_token, ...: the tokens these files name, and only those (as
        # transformers' apply_chat_template; generation_config.json's eos ids end replies but name no eos_token)
        named = {key: _token_text(config.get(key)) for key in TEMPLATE_TOKEN_KEYS}
        self.named_tokens = {key: token for key, token in named.items() if isinstance(token, str)}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._token_id(config.get("bos_token"), "bos_token")
        eos_id = self._token_id(config.get("eos_token"), "eos_token")
        self.pad_id = self._token_id(config.get("pad_token"), "pad_token")
        # the ids that end a reply: generation_config.json's, or without one config.json's (as transformers)
        generation = side.get("generation_config.json", side.get("config.json", {}))
        generation_eos = generation.get("eos_token_id")
        extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        self.eos_ids = tuple(dict.fromkeys(i for i in [eos_id, *extra] if isinstance(i, int)))
        probe = self._tok.encode("a", add_special_tokens=True).ids
        # The post-processor alone decides, as AutoTokenizer does (transformers 5 reads no add_bos_token)
        self.adds_bos = self.bos_id is not None and probe[:1] == [self.bos_id]
        # byte-fallback pieces (sentencepiece-style "<0x2D>"): a run of them is decoded together, as UTF-8 or one
        # U+FFFD per byte, so a text's end can change until a run ends (generate.decode_incremental waits)
        self.byte_pieces = frozenset(i for i in (self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256))
                                     if i is not None)

    def _add_named_special_tokens(self, config: dict) -> None:
        """The special tokens the side files name (bos_token, ..., and the additional or extra ones) that
        tokenizer.json holds as plain vocabulary entries become special added tokens, as transformers 5's
        TokenizersBackend makes them: "hi<|im_end|>" in a chat template's text is then the one token, and a reply
        can end at it. A named token the vocabulary lacks gets no new id (the model has no embedding for one)."""
        from tokenizers import AddedToken

        added = {token.content for token in self._tok.get_added_tokens_decoder().values()}
        extra = [t for key in ("additional_special_tokens", "extra_special_tokens")
                 if isinstance(config.get(key), list) for t in config[key]]
        new = []
        for token in [config.get(key) for key in TEMPLATE_TOKEN_KEYS] + extra:
            text = _token_text(token)
            if not isinstance(text, str) or not text or text in added or self._tok.token_to_id(text) is None:
                continue
            flags = {k: bool(token[k]) for k in ("single_word", "lstrip", "rstrip", "normalized")
                     if isinstance(token, dict) and k in token}
            new.append(AddedToken(text, **{"normalized": False, **flags}, special=True))
            added.add(text)
        if new:
            self._tok.add_special_tokens(new)

    def _token_id(self, token, key: str) -> int | None:
        token = _token_text(token)
        if token is None:
            return None
        token_id = self._tok.token_to_id(str(token))
        if token_id is None:
            raise CheckpointError(f"{self.path}: {key} {token!r} of tokenizer_config.json is not in the vocabulary")
        return token_id

    def encode(self, text: str, allow_special: bool = False, add_special_tokens: bool = False) -> list[int]:
        """Token ids; special tokens written in `text` are special only when `allow_special` (else plain text,
        so user data can never inject one)."""
        self._tok.encode_special_tokens = not allow_special
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def eos_id(self) -> int:
        """The token that ends an example (the first of eos_ids)."""
        if not self.eos_ids:
            raise CheckpointError(f"{self.path}: no eos_token in tokenizer_config.json or generation_config.json; "
                                  "name one there (examples and generation need an end-of-text token)")
        return self.eos_ids[0]

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt as generation feeds it: the ids a training example's prompt has (encode_split's prefix), so
        the bos the model's tokenizer adds and never the eos a post-processor appends to a whole text ("<s> $A
        </s>": an adapter trained on "<s> prompt response </s>" would be asked to go on after an end of text)."""
        return self.encode_split(text, "")[0]

    def encode_split(self, prefix: str, text: str) -> tuple[list[int], list[int]]:
        """prefix + text encoded as one string (special tokens in them are text; the bos the model's tokenizer
        adds, no eos), cut where `text` begins: (prefix's ids, text's ids), a token across the edge going with
        `text`. As TRL tokenizes a prompt and its completion: encoded apart, a sentencepiece-style tokenizer
        (Llama 2, Mistral: Metaspace) would give the text a word-start marker the whole does not have ("\\n4" as
        "\\n", "▁4")."""
        self._tok.encode_special_tokens = True
        whole = self._tok.encode(prefix + text, add_special_tokens=True)
        content = [i for i, added in enumerate(whole.special_tokens_mask) if not added]
        # the post-processor's tokens before the text stay (a bos), those after it (an eos) are dropped
        end = content[-1] + 1 if content else int(self.adds_bos)
        cut = next((i for i in content if whole.offsets[i][1] > len(prefix)), end)
        return whole.ids[:cut], whole.ids[cut:end]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self._tok.encode_special_tokens = True
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


Tokenizer = GPT2Tokenizer | HFTokenizer
GPT2 = GPT2Tokenizer()  # the default wherever no model's tokenizer is given: GPT-2 runs stay as they were


def model_tokenizer(spec: ModelSpec, model_type: str) -> Tokenizer:
    """The tokenizer of a model: `model.tokenizer` when the spec names one, the bundled BPE for GPT-2 and for
    random-init presets (their real tokenizers cannot be had offline), else the checkpoint's own tokenizer.json."""
    if spec.tokenizer is not None:
        return load_tokenizer(spec.tokenizer)
    if spec.init == "random":
        return GPT2
    if model_type == "gpt2":
        local = Path(spec.name).expanduser()
        folder = local if local.is_dir() else local.parent if local.is_file() else None
        return GPT2 if folder is None else GPT2Tokenizer(folder)
    return load_tokenizer(spec)


def describe(tokenizer: Tokenizer) -> str:
    """How `--dry-run` names the tokenizer."""
    if isinstance(tokenizer, GPT2Tokenizer):
        return f"GPT-2 BPE (bundled), vocabulary {tokenizer.vocab_size:,}"
    return f"{tokenizer.path}, vocabulary {tokenizer.vocab_size:,}"


def check_fits(tokenizer: Tokenizer, vocab_size: int, model_name: str) -> None:
    """Every id the tokenizer can produce must have an embedding row (fewer ids than rows is normal: padded)."""
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"the tokenizer ({describe(tokenizer)}) has more tokens than model {model_name} has embedding rows "
            f"({vocab_size:,}); use the tokenizer the model was trained with (model.tokenizer)"
        )


def load_tokenizer(source) -> Tokenizer:
    """The tokenizer of a model: a directory (its tokenizer.json and side files; a GPT-2 directory without one
    gets the bundled BPE), a tokenizer.json file, a hub id (downloads tokenizer.json and the side files through
    huggingface_hub's cache), or a ModelSpec / name of a random preset (the bundled GPT-2 BPE: real tokenizers
    of the other presets cannot be had offline)."""
    spec = source if isinstance(source, ModelSpec) else None
    if spec is not None and spec.init == "random":
        return GPT2
    name = spec.name if spec is not None else str(source)
    path = Path(name).expanduser()

    if path.is_file() and (spec is not None or path.suffix in WEIGHT_SUFFIXES):
        # a single weights file (a model named as a file, whatever its suffix: .ckpt too): the tokenizer of its
        # folder, whose config.json describes it (pretrained.infer_config)
        return _folder_tokenizer(path.parent, f"{path}'s folder", bare_is_gpt2=True)
    if path.is_file():
        return HFTokenizer(path, _read_side(path.parent))
    if path.is_dir():
        return _folder_tokenizer(path, str(path))
    return _hub_tokenizer(spec or ModelSpec(name=name))


def _folder_tokenizer(folder: Path, named: str, bare_is_gpt2: bool = False) -> Tokenizer:
    """A model folder's tokenizer.json (with its side files); a GPT-2 folder without one: the bundled BPE (and with
    bare_is_gpt2, a folder without a config.json: a bare weights file is a GPT-2 checkpoint)."""
    if (folder / TOKENIZER_FILE).is_file():
        return HFTokenizer(folder / TOKENIZER_FILE, _read_side(folder))
    model_type = _model_type(folder / "config.json")
    if model_type == "gpt2" or (bare_is_gpt2 and model_type is None) or _has_gpt2_bpe_files(folder):
        return GPT2Tokenizer(folder)
    raise CheckpointError(f"{named} has no {TOKENIZER_FILE}; pass a model directory with its tokenizer files, "
                          f"or a tokenizer.json file")


def _read_side(folder: Path) -> dict[str, dict]:
    """The side files (SIDE_FILES) in `folder`, each a JSON object; and its config.json where it is one, whose
    eos_token_id ends replies when there is no generation_config.json (as transformers' GenerationConfig
    .from_model_config). A damaged config.json is the model loader's to report."""
    side = {}
    for f in SIDE_FILES:
        if (folder / f).is_file():
            try:
                value = json.loads((folder / f).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{folder / f} is not readable JSON: {first_line(exc)}") from exc
            if not isinstance(value, dict):
                raise CheckpointError(f"{folder / f} must hold a JSON object ({{...}}), not {type(value).__name__} "
                                      f"{json.dumps(value)[:40]}; restore the file from the checkpoint")
            side[f] = value
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if isinstance(config, dict):
        side["config.json"] = config
    return side


def _has_gpt2_bpe_files(folder: Path) -> bool:
    """GPT-2's own BPE as vocab.json + merges.txt (what `lora merge` writes beside a random preset of another
    family, and what GPT-2 fine-tunes ship): 50,257 tokens, <|endoftext|> last, byte-level pieces at GPT-2's ids."""
    if not (folder / "merges.txt").is_file():
        return False
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (isinstance(vocab, dict) and len(vocab) == EOT_ID + 1 and vocab.get(EOT_TOKEN) == EOT_ID
            and vocab.get("!") == 0 and vocab.get("\u0120the") == 262)  # "\u0120" (Ġ): the byte-level space


def _model_type(config_file: Path) -> str | None:
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "gpt2")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def _hub_tokenizer(spec) -> Tokenizer:
    # Here, not at the top: huggingface_hub and pretrained (torch) load only when a hub id is named.
    from lora_cli.pretrained import HubFiles, hub_failure, hub_ref

    files = HubFiles(*hub_ref(spec.name, spec.revision))
    try:
        config_file = files.need("config.json")
        if _model_type(config_file) == "gpt2":
            return GPT2  # the bundled ranks: nothing more to download
        tokenizer_file = files.need(TOKENIZER_FILE)
        for f in (*SIDE_FILES, "chat_template.jinja"):  # the template: for chat_template.checkpoint_template
            try:
                files.fetch(f)
            except Exception:  # optional files: a repository may have none of them
                pass
    except CheckpointError:
        raise
    except Exception as exc:  # huggingface_hub raises many types (network, auth, offline); all mean "not here"
        raise CheckpointError(hub_failure(spec.name, exc, spec.revision)) from exc
    return HFTokenizer(tokenizer_file, _read_side(tokenizer_file.parent))
