"""Generation speed: with and without the KV cache (issue 5), or side by side with transformers and llama.cpp
(issue 20: --side-by-side).

    python scripts/bench_generate.py                 # gpt2 (124M), random init, 256 new tokens, cache vs none
    python scripts/bench_generate.py --new-tokens 64 --model distilgpt2
    python scripts/bench_generate.py --side-by-side --threads 2 --new-tokens 64   # ours fp32/bf16 vs transformers
    python scripts/bench_generate.py --side-by-side --gguf m-f32.gguf m-f16.gguf  # ... and llama.cpp on each GGUF
    python scripts/bench_generate.py --serve --new-tokens 64   # lora serve: total tokens/s, 1, 4, 8 clients
    python scripts/bench_generate.py --e2e-beam 16 --model gpt2-medium   # E2E test MRs, beam 10, as lora eval
    python scripts/bench_generate.py --e2e-beam 16 --model gpt2-medium --precision bf16   # ... --precision bf16

Greedy decoding with no EOT stop, so every run produces exactly --new-tokens tokens per row; the cache and
no-cache runs must give the same tokens. Without the cache every step recomputes the whole sequence (prompt +
tokens so far); only the last position is projected to the vocabulary in both modes, so the difference is the
cache alone. Side by side: batch 1 and batch 8 (eight copies of the prompt), tokens/s = rows x new tokens / s,
for ours in fp32 and bf16 (`--precision`; weights packed where the commands pack them, see
inference.packing_pays: fp32 at 8 rows, or one row with at least 64 new tokens; bf16 on a CPU with AVX-512 BF16 or
AMX), transformers `generate` on the same weights (GPT2LMHeadModel built from our state dict) in fp32 and bf16, and llama.cpp (`llama_cpp`, when importable and --gguf names a GGUF of the
same weights; batch 1 only: its Python API decodes one sequence). A last row of ours runs fp32 with plain weights
(what the commands run when packing would not pay: one row with a short budget).

--serve: `lora serve`'s app (Engine + FastAPI on uvicorn, in this process, 127.0.0.1 on a free port) over the
model; 1, 4 and 8 concurrent clients each ask /v1/completions for --new-tokens greedy tokens (each its own
prompt); total tokens/s = all clients' completion tokens / wall time of the round. Continuous batching decodes
the concurrent requests together, so the total grows with the clients until the batch stops being weight-bound.
--serve and --e2e-beam pack the weights as `lora serve` and `lora eval --generate` do; --plain keeps them plain.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_cli import tokenizer  # noqa: E402  (lora_cli first: it sets torch's allocator up before torch loads)
import torch  # noqa: E402
from lora_cli.config import ModelSpec  # noqa: E402
from lora_cli.generate import generate  # noqa: E402
from lora_cli.inference import pack_for_decoding, packing_pays, place  # noqa: E402
from lora_cli.pretrained import hf_state_dict, load_model  # noqa: E402

PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def timed(model, prompt: list[int], n: int, use_cache: bool, rows: int = 1,
          static: bool | None = None) -> tuple[list[int], float]:
    start = time.perf_counter()
    out = generate(model, [prompt] * rows, n, eos_id=None, use_cache=use_cache, static=static)
    return out[0], time.perf_counter() - start  # (the tokens come back as Python ints: the device has finished)


def cache_vs_none(model, prompt: list[int], n: int) -> None:
    timed(model, prompt, 4, True)  # warm-up: first-call allocations and kernel selection
    timed(model, prompt, 4, False)
    cached, t_cached = timed(model, prompt, n, True)
    print(f"with KV cache:    {n / t_cached:8.1f} tokens/s ({t_cached:.2f} s)", flush=True)
    full, t_full = timed(model, prompt, n, False)
    print(f"without KV cache: {n / t_full:8.1f} tokens/s ({t_full:.2f} s)")
    print(f"speedup: {t_full / t_cached:.1f}x; same tokens: {cached == full}")


def transformers_model(model, name: str):
    """transformers' GPT2LMHeadModel with our weights (GPT-2 presets only), or None."""
    try:
        import transformers
    except ImportError:
        return None
    if getattr(model.config, "model_type", "gpt2") != "gpt2":
        return None
    cfg = model.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head)).eval()
    missing, _ = hf.load_state_dict(hf_state_dict(model.state_dict()), strict=False)
    assert not [k for k in missing if not k.endswith("attn.bias") and k != "lm_head.weight"], missing
    return hf


def hf_timed(hf, prompt: list[int], n: int, rows: int) -> tuple[list[int], float]:
    ids = torch.tensor([prompt] * rows, device=hf.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist(), time.perf_counter() - start


def llama_cpp_timed(path: str, prompt: list[int], n: int, threads: int) -> tuple[list[int], float] | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + n + 8, n_threads=threads, verbose=False)
    start = time.perf_counter()
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if len(out) == n:
            break
    return out, time.perf_counter() - start


def side_by_side(model, name: str, prompt: list[int], n: int, ggufs: list[str], device: torch.device) -> None:
    hf = transformers_model(model, name)
    cpu = torch.device("cpu")
    cuda = device.type == "cuda"
    print(f"{'':28s} {'batch 1':>12s} {'batch 8':>12s}   (tokens/s: rows x new tokens / s)")
    precisions = (("fp32", torch.float32), ("bf16", torch.bfloat16)) + ((("fp16", torch.float16),) if cuda else ())
    # On CUDA, ours decodes with a CUDA graph of the fixed-shape step by default; "eager" is the same without it.
    variants = (("", None), (" eager", False)) if cuda else (("", None),)
    for precision, dtype in precisions:
        place(model, device, dtype)
        if hf is not None:
            hf.to(device=device, dtype=dtype)
        figures = {}
        for rows in (1, 8):
            # as the commands decode: weights packed where inference.packing_pays says so
            subject = model
            if packing_pays(model, rows, 1, n):
                subject = copy.deepcopy(model)
                pack_for_decoding(subject)
            for label, static in variants:
                timed(subject, prompt, 4, True, rows, static)  # warm-up
                ours, t = timed(subject, prompt, n, True, rows, static)
                figures[(label, rows)] = rows * n / t
            del subject
            if hf is not None:
                hf_timed(hf, prompt, 4, rows)
                theirs, t = hf_timed(hf, prompt, n, rows)
                figures[("transformers", rows)] = rows * n / t
                figures[("same", rows)] = ours == theirs
        for label, _ in variants:
            print(f"{'lora-cli ' + precision + label:28s} {figures[label, 1]:12.1f} {figures[label, 8]:12.1f}",
                  flush=True)
        if hf is not None:
            print(f"{'transformers ' + precision:28s} {figures['transformers', 1]:12.1f} "
                  f"{figures['transformers', 8]:12.1f}   same tokens: {figures['same', 1]} / {figures['same', 8]}",
                  flush=True)
    place(model, cpu, torch.float32)
    if hf is not None:
        hf.to(device=cpu, dtype=torch.float32)
    if cuda:
        return  # the packed layout and llama.cpp's CPU build are CPU rows
    # fp32 with plain weights (A/B: what the commands run when packing would not pay, a short budget at one row)
    figures = {}
    for rows in (1, 8):
        timed(model, prompt, 4, True, rows)
        figures[rows] = rows * n / timed(model, prompt, n, True, rows)[1]
    print(f"{'lora-cli fp32, plain':28s} {figures[1]:12.1f} {figures[8]:12.1f}", flush=True)
    for gguf in ggufs:
        result = llama_cpp_timed(gguf, prompt, n, torch.get_num_threads())
        if result is None:
            print("llama.cpp: `llama_cpp` is not importable (pip install llama-cpp-python)")
            break
        else:
            print(f"{'llama.cpp ' + Path(gguf).name:28s} {n / result[1]:12.1f} {'-':>12s}")


def serve_clients(base, prompt: list[int], n: int, pack: bool = True) -> None:
    """base: pretrained.BaseModel (its model in eval mode)."""
    import socket
    import threading

    import httpx
    import uvicorn

    from lora_cli.inference import DataSettings, Loaded
    from lora_cli.serve import Engine, Served, build_app

    if pack:
        pack_for_decoding(base.model)  # as lora serve's load_models does
    engine = Engine({"bench": Served("bench", Loaded(base, None, DataSettings()))})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(build_app(engine), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    while not server.started:
        time.sleep(0.05)

    def ask(i: int, out: list) -> None:  # each client its own prompt: the prompt plus i tokens
        body = {"model": "bench", "prompt": prompt + prompt[:i], "max_tokens": n, "temperature": 0}
        out[i] = httpx.post(url + "/v1/completions", json=body, timeout=3600).json()["usage"]["completion_tokens"]

    ask(0, [0])  # warm-up
    print(f"{'clients':>8s} {'total tokens/s':>15s} {'per client':>11s} {'seconds':>8s}", flush=True)
    for clients in (1, 4, 8):
        done = [0] * clients
        threads = [threading.Thread(target=ask, args=(i, done)) for i in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        print(f"{clients:8d} {sum(done) / seconds:15.1f} {sum(done) / seconds / clients:11.1f} {seconds:8.2f}",
              flush=True)
    health = httpx.get(url + "/health").json()
    print(f"/health: max_batch {health['max_batch']}, batched_steps {health['batched_steps']}")
    server.should_exit = True


def e2e_beam(model, limit: int, new_tokens: int, batch_size: int, pack: bool = True) -> None:
    """The decoding of scripts/reproduce_e2e.sh's `lora eval --generate` on the first `limit` distinct meaning
    representations of data/e2e_test.csv: prompt "{mr}\n", beam 10, length penalty 0.9, no-repeat 4-grams,
    --batch-size prompts decoded together, at most `new_tokens` new tokens (a random model rarely ends early)."""
    import csv

    from lora_cli.generate import beam_search

    with open(Path(__file__).resolve().parents[1] / "data" / "e2e_test.csv", newline="") as f:
        mrs = list(dict.fromkeys(row["mr"] for row in csv.DictReader(f)))
    prompts = [tokenizer.encode(mr + "\n") for mr in mrs[:limit]]
    if pack:
        pack_for_decoding(model)  # as lora eval --generate does
    start = time.perf_counter()
    out = beam_search(model, prompts, new_tokens, num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4,
                      batch_size=batch_size)
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in out)
    print(f"{len(prompts)} of {len(mrs)} test MRs, beam 10, batch {batch_size}: {seconds:.1f} s, "
          f"{len(prompts) / seconds:.3f} MRs/s, {tokens / seconds:.1f} output tokens/s "
          f"(all {len(mrs)}: about {len(mrs) * seconds / len(prompts) / 60:.0f} min)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", help="preset name, random weights (default gpt2)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="ours (fp32, bf16) vs transformers generate vs llama.cpp, batch 1 and 8")
    parser.add_argument("--gguf", nargs="+", default=[], help="--side-by-side: GGUFs of the same weights for llama.cpp")
    parser.add_argument("--serve", action="store_true",
                        help="lora serve: total tokens/s with 1, 4 and 8 concurrent clients")
    parser.add_argument("--e2e-beam", type=int, default=0, metavar="N",
                        help="beam-10 decoding of the first N E2E test MRs, as lora eval --generate runs it")
    parser.add_argument("--batch-size", type=int, default=8, help="--e2e-beam: prompts decoded together (8)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (--side-by-side: on CUDA also fp16, and ours "
                        "with and without its CUDA graph)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="--serve, --e2e-beam: the weights' dtype, as the commands' --precision (default fp32)")
    parser.add_argument("--plain", action="store_true",
                        help="--serve, --e2e-beam: keep the weights plain, not packed as the commands pack them (A/B)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = load_model(ModelSpec(name=args.model, init="random"))
    model = base.model.eval()
    prompt = tokenizer.encode(PROMPT)
    cfg = model.config
    print(f"model {args.model} (random init, {model.num_parameters() / 1e6:.1f}M parameters, n_layer={cfg.n_layer}, "
          f"n_embd={cfg.n_embd}), prompt {len(prompt)} tokens, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    if args.e2e_beam:
        place(model, torch.device(args.device), dtype)
        e2e_beam(model, args.e2e_beam, args.new_tokens, args.batch_size, pack=not args.plain)
    elif args.serve:
        place(base.model, torch.device(args.device), dtype)
        serve_clients(base, prompt, args.new_tokens, pack=not args.plain)
    elif args.side_by_side:
        side_by_side(model, args.model, prompt, args.new_tokens, args.gguf, torch.device(args.device))
    else:
        cache_vs_none(place(model, torch.device(args.device), torch.float32), prompt, args.new_tokens)


if __name__ == "__main__":
    main()
