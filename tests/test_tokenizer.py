import pytest

from lora_cli import tokenizer


@pytest.mark.parametrize("text,ids", [
    ("Hello, world!", [15496, 11, 995, 0]),
    ("Every effort moves you", [6109, 3626, 6100, 345]),
])
def test_known_ids(text, ids):
    assert tokenizer.encode(text) == ids


@pytest.mark.parametrize("text", ["naïve café — 東京 🤖 \u200b", "tabs\tand\nnewlines\r\n  ", "", "ß∂ƒ©˙∆˚¬…æ" * 3])
def test_unicode_round_trip(text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_endoftext_is_special_only_when_allowed():
    assert tokenizer.encode("<|endoftext|>", allow_special=True) == [50256]
    plain = tokenizer.encode("<|endoftext|>")
    assert 50256 not in plain and tokenizer.decode(plain) == "<|endoftext|>"
    assert tokenizer.get_encoding().n_vocab == 50257


def test_matches_tiktoken_reference_pattern():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    # tiktoken's own `gpt2` split pattern (its download is what we avoid) must tokenize exactly as ours
    tiktoken_pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    ref = tiktoken.Encoding(name="ref", pat_str=tiktoken_pattern,
                            mergeable_ranks=load_tiktoken_bpe(tokenizer.ranks_path()), special_tokens={})
    text = "It's 2026;   they'll  say\n\n  'hello'   world's 1234567 !!?\t end  "
    assert ref.encode_ordinary(text) == tokenizer.encode(text)
