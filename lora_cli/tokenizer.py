"""GPT-2 byte-pair encoding through tiktoken, built from the ranks file bundled in the package (no network)."""

from __future__ import annotations

import functools
from importlib import resources

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
