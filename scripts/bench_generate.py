"""Generation speed with and without the KV cache (issue 5: the cache must win by >= 3x at 256 new tokens on
gpt2-sized random weights, batch 1).

    python scripts/bench_generate.py                 # gpt2 (124M), random init, 256 new tokens
    python scripts/bench_generate.py --new-tokens 64 --model distilgpt2

Greedy decoding with no EOT stop, so both runs produce exactly --new-tokens tokens; they must be the same tokens.
Without the cache every step recomputes the whole sequence (prompt + tokens so far); only the last position is
projected to the vocabulary in both modes, so the difference is the cache alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lora_cli import tokenizer  # noqa: E402
from lora_cli.pretrained import load_model  # noqa: E402
from lora_cli.config import ModelSpec  # noqa: E402
from lora_cli.generate import generate  # noqa: E402

PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def timed(model, prompt: list[int], n: int, use_cache: bool) -> tuple[list[int], float]:
    start = time.perf_counter()
    (out,) = generate(model, [prompt], n, eos_id=None, use_cache=use_cache)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", help="preset name, random weights (default gpt2)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(ModelSpec(name=args.model, init="random")).model.eval()
    prompt = tokenizer.encode(PROMPT)
    cfg = model.config
    print(f"model {args.model} (random init, {model.num_parameters() / 1e6:.1f}M parameters, n_layer={cfg.n_layer}, "
          f"n_embd={cfg.n_embd}), prompt {len(prompt)} tokens, {args.new_tokens} new tokens, batch 1, "
          f"{torch.get_num_threads()} threads")

    timed(model, prompt, 4, True)  # warm-up: first-call allocations and kernel selection
    timed(model, prompt, 4, False)
    cached, t_cached = timed(model, prompt, args.new_tokens, True)
    print(f"with KV cache:    {args.new_tokens / t_cached:8.1f} tokens/s ({t_cached:.2f} s)", flush=True)
    full, t_full = timed(model, prompt, args.new_tokens, False)
    print(f"without KV cache: {args.new_tokens / t_full:8.1f} tokens/s ({t_full:.2f} s)")
    print(f"speedup: {t_full / t_cached:.1f}x; same tokens: {cached == full}")


if __name__ == "__main__":
    main()
