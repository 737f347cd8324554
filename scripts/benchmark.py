"""Our trainer against transformers + PEFT, side by side, on the same data, model, LoRA settings and precision.

    python scripts/benchmark.py                           # instruction data, prompt masked (the default)
    python scripts/benchmark.py --mode text               # plain text, 8 x 256, every position scored
    python scripts/benchmark.py --mode eval               # forward only, under torch.inference_mode
    python scripts/benchmark.py --precision bf16 --steps 6 --warmup-steps 2 --threads 2
    python scripts/benchmark.py --device cuda --model gpt2-medium --mode text --batch-size 32 --seq-len 512 \
        --precision bf16 --reference-peak-tflops 790      # a GPU (H200): MFU against its bf16 figure

Each tool runs in its own subprocess, one after the other (so peak RSS is each tool's own), after a third
subprocess has measured the machine's matmul peak on the same threads. Each prints one JSON line; a last line
holds the ratios ours / peer.

What runs
- ours: `lora_cli.train.build` (model, LoRA, threads, precision, data encoding, exactly as `lora train`), then
  the step of `train._loop`: `data.collate` of a length-grouped batch (`data.batch_indices`), `loss.lm_loss_sum`
  / target tokens under `runtime.autocast_for`, backward, `clip_grad_norm_(foreach=False)`, the AdamW of
  `train.build_optimizer`, `zero_grad`, `loss.item()`. Eval: `evaluation.evaluate_lm` on each batch. With
  --packing (data.packing), `data.pack` puts each batch into rows of --max-length tokens instead of `collate`.
- peer: `transformers.GPT2LMHeadModel` (random init, SDPA attention) + `peft.get_peft_model` LoRA, fed the way
  its users feed it: the examples shuffled, padded to the longest in each batch, an attention mask, labels -100 on
  the prompt and on padding, full logits, `model(input_ids, attention_mask, labels=labels).loss`, backward,
  `clip_grad_norm_(1.0)`, `torch.optim.AdamW`, `zero_grad`, `loss.item()`; bf16: `torch.autocast` around the
  forward, as Hugging Face's Trainer does. Eval: the same forward under `torch.inference_mode`.
- Both: the same architecture (--model: GPT-2's sizes, or a random-init preset of another family, whose config
  file in lora_cli/presets/ the peer builds with transformers' AutoModelForCausalLM, LlamaForCausalLM /
  Qwen2ForCausalLM, with the bundled GPT-2 BPE's vocabulary of 50,257 as ours), random weights, dropout
  --model-dropout (0, our default) in the base, LoRA r=8 alpha=16 dropout 0.05 on attn.c_attn (GPT-2) or q_proj
  and v_proj (the presets), AdamW lr 3e-4, batch --batch-size, --precision, the same
  examples. The pool is a seeded shuffle of the data: the first warmup_steps x batch_size examples are the warmup
  pool, the next steps x batch_size the measured pool; each tool batches each pool its own way (ours length-
  grouped, the peer in shuffled order), so both process exactly the same tokens in the measured steps.

Figures (per tool; with --repeats N the tools run alternately N times and each tool's fastest run is reported,
with every run's tokens/s alongside and the largest peak memory of its runs)
- real_tokens_per_s: input positions that are not padding (an example of L tokens has L - 1 input positions, the
  ones with a next token; our trainer's `tokens`), summed over the measured steps / their summed wall time.
- scored_tokens_per_s: positions with a target (not -100), likewise.
- step_time_median_s / step_time_min_s; cpu_s_per_step (user + system CPU time of the process per step: less
  sensitive than wall time to other processes on a shared machine, but it counts spinning threads).
- peak_rss_mb: resource.getrusage(RUSAGE_SELF).ru_maxrss of the tool's subprocess (imports, model, data and all
  steps), on CPU; on CUDA max_memory_allocated_mb instead.
- libraries_rss_mb: the same, measured once the libraries the tool runs on are imported and before anything is
  built: ours torch, pandas (which reads the data) and torch._dynamo (torch.optim imports it with the first
  optimizer); the peer torch, transformers and peft (which import torch._dynamo themselves).
  peak_rss_above_libraries_mb = peak_rss_mb - libraries_rss_mb: what the training itself holds, the figure a
  memory target is held to (a library's import cost is not the tool's to cut).
- useful_flops_per_s and frac_of_matmul_peak (against the measured peak of the precision in use). Our trainer
  computes a prompt prefix common to a batch once (train.share_prefix), so its useful FLOPs/s can exceed the
  peak; prefix_positions_skipped counts those positions and frac_of_matmul_peak_run leaves their linear-layer
  FLOPs out (what the hardware ran; an upper bound, since the last block's unscored positions stay counted).

Useful FLOPs (counted from the data, the same for both tools; padding and the peer's extra last position count
nothing). A matmul with a weight of P parameters costs 2P FLOPs per row forward. Below for GPT-2; a preset of
another family counts its own linear layers the same way (q/k/v/o and the SwiGLU MLP; layer 0's q/k/v and LoRA
A without an input gradient) and attention with its query width H D instead of C. Per input position of a
training step, in every layer: the frozen linear weights (c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj: 12 C^2
parameters) 4 FLOPs per parameter (forward + gradient w.r.t. the input; frozen weights need no weight gradient),
except layer 0's c_attn, whose input never needs a gradient (2 per parameter); the LoRA matrices A [r, C] and B
[3C, r] 6 per parameter (forward, input gradient, weight gradient; 4 for layer 0's A, whose input needs no
gradient); causal attention, for the query at position p (0-based) with its p + 1 keys: Q K^T and A V, 4 C (p + 1)
forward, x3 with the backward (both operands of each need gradients). Per scored position: the LM head [V, C],
4 FLOPs per parameter (frozen, tied to wte: forward + input gradient). Eval counts forward FLOPs only (2 per
parameter, attention 4 C (p + 1)). Not counted: LayerNorm, GELU, softmax, the optimizer, embeddings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# lora_cli asks torch's allocator for transparent huge pages (lora_cli/__init__.py) by setting this variable, which
# subprocesses would inherit: the peer and the matmul peak run with the caller's own setting, as its users run it.
CALLER_THP = os.environ.get("THP_MEM_ALLOC_ENABLE")

ARCH = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768), "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024)}
PRESETS = ("smollm2-135m", "qwen2.5-0.5b")  # random-init presets of the Llama family (lora_cli/presets/*.json)
VOCAB = 50257
LORA = dict(r=8, alpha=16.0, dropout=0.05, targets=["attn.c_attn"])
PRESET_TARGETS = ["q_proj", "v_proj"]
LR = 3e-4
# glibc settings the issue measured on the peer (page-faulting 412 MB logits copies every step).
TUNED_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", "MALLOC_TOP_PAD_": "1073741824"}


# ------------------------------------------------------------------------------------------------ the model


def preset_config(name: str) -> dict:
    """A preset's config.json fields with the bundled GPT-2 BPE's vocabulary (as `init: random` builds it)."""
    from lora_cli.pretrained import PRESET_DIR

    raw = json.loads((PRESET_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return {**{k: v for k, v in raw.items() if not k.startswith("_")}, "vocab_size": VOCAB}


def sizes(model: str, r: int) -> dict:
    """What the FLOP count needs: layers, width C, query width H D, frozen linear parameters per layer, those of
    layer 0 whose input needs no gradient, and the LoRA A / B parameters per layer."""
    if model in ARCH:
        C = ARCH[model]["n_embd"]
        return dict(n_layer=ARCH[model]["n_layer"], C=C, attn=C, frozen=12 * C * C, first=3 * C * C,
                    lora_a=r * C, lora_b=3 * C * r)
    c = preset_config(model)
    C, I, H = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"]
    D = c.get("head_dim") or C // H
    Hkv = c.get("num_key_value_heads") or H
    qkv = C * (H + 2 * Hkv) * D
    return dict(n_layer=c["num_hidden_layers"], C=C, attn=H * D, frozen=qkv + H * D * C + 3 * C * I, first=qkv,
                lora_a=2 * r * C, lora_b=(H + Hkv) * D * r)  # LoRA on q_proj and v_proj


# ------------------------------------------------------------------------------------------------ the data


def run_config(args, data_path: str):
    """The RunConfig our child builds from (also used by the parent to encode the same examples)."""
    from lora_cli.config import build_config

    text = args.mode == "text"
    return build_config({
        "model": {"name": args.model, "init": "random", "seed": args.seed},
        "out_dir": str(Path(tempfile.gettempdir()) / "lora-bench-unused"),
        "data": {"train": data_path, "val_split": 0.0, "max_length": args.seq_len + 1 if text else args.max_length,
                 "format": "text" if text else "alpaca", "group_by_length": not args.no_group,
                 "packing": args.packing},
        "lora": {**LORA, "targets": PRESET_TARGETS} if args.model in PRESETS else dict(LORA),
        "train": {"batch_size": args.batch_size, "lr": LR, "precision": args.precision, "device": args.device,
                  "num_threads": args.threads, "model_dropout": args.model_dropout, "seed": args.seed,
                  "gradient_checkpointing": args.gradient_checkpointing},
    })


def pool_indices(n_examples: int, args) -> tuple[list[int], list[int]]:
    """(warmup pool, measured pool): example indices from a seeded shuffle, cycled if the data is short."""
    order = list(range(n_examples))
    random.Random(f"bench:{args.seed}").shuffle(order)
    need = (args.warmup_steps + args.steps) * args.batch_size
    picked = [order[i % n_examples] for i in range(need)]
    cut = args.warmup_steps * args.batch_size
    return picked[:cut], picked[cut:]


def digest(examples) -> str:
    return hashlib.sha256(json.dumps([[e[0], e[1]] for e in examples]).encode()).hexdigest()[:16]


def body_flops(mode: str, a: dict) -> float:
    """Linear-layer FLOPs per input position, all layers (the module docstring's definition); a: sizes().
    GPT-2's frozen weights per layer: c_attn 3C^2 + attn.c_proj C^2 + c_fc 4C^2 + mlp.c_proj 4C^2."""
    n_layer, frozen, lora_a, lora_b = a["n_layer"], a["frozen"], a["lora_a"], a["lora_b"]
    if mode == "eval":
        return n_layer * 2 * (frozen + lora_a + lora_b)
    return n_layer * (4 * frozen + 6 * (lora_a + lora_b)) - 2 * a["first"] - 2 * lora_a


def useful_flops(examples, mode: str, a: dict, V: int = VOCAB) -> float:
    """The useful FLOPs of processing `examples` ([(ids, loss_mask)]) once, as the module docstring defines."""
    train = mode != "eval"
    n_layer, C = a["n_layer"], a["C"]
    body = body_flops(mode, a)
    total = 0.0
    for ids, mask in examples:
        P = len(ids) - 1  # input positions (the last token is only a target)
        S = sum(mask[1:])  # scored positions
        key_sum = P * (P + 1) / 2  # sum over queries of the keys each attends to
        total += P * body + n_layer * (12 if train else 4) * a["attn"] * key_sum + S * (4 if train else 2) * V * C
    return total


# --------------------------------------------------------------------------------------------- the children


def child_peak(args) -> dict:
    """Best-of-n torch.matmul throughput of large square matrices, fp32 and bf16, on the same threads."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    n = 2048 if device.type == "cpu" else 8192
    out = {"matmul_n": n}
    # bf16 only for a bf16 run: on a CPU without bf16 instructions one 2048^3 bf16 matmul takes about a minute
    dtypes = (("fp32", torch.float32),) + ((("bf16", torch.bfloat16),) if args.precision == "bf16" else ())
    for name, dtype in dtypes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        best = 0.0
        for i in range(8):
            _sync(device)
            t0 = time.perf_counter()
            torch.matmul(a, b)
            _sync(device)
            dt = time.perf_counter() - t0
            if i:  # the first is warmup
                best = max(best, 2 * n**3 / dt)
        out[f"{name}_matmul_peak_flops"] = best
    return out


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device) -> dict:
    import torch

    if device.type == "cuda":
        return {"max_memory_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_rss_mb": _rss_mb()}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_ours(args, pools) -> dict:
    from lora_cli.cli import prepare_process

    prepare_process()  # what `lora train` does before it imports torch
    import pandas  # noqa: F401  (reads the data files)
    import torch
    import torch._dynamo  # noqa: F401  (torch.optim's first optimizer imports it)

    libraries = _rss_mb()

    from lora_cli.data import batch_indices, collate, pack
    from lora_cli.evaluation import evaluate_lm
    from lora_cli.loss import Savings, lm_loss_sum
    from lora_cli.runtime import autocast_for
    from lora_cli.rundir import trainable_named
    from lora_cli.train import build, build_optimizer

    cfg = run_config(args, pools["data_path"])
    s = build(cfg)
    examples = s.data.train
    warm = [examples[i] for i in pools["warmup"]]
    measured = [examples[i] for i in pools["measured"]]
    if digest([(e.ids, e.loss_mask) for e in measured]) != pools["digest"]:
        raise SystemExit("ours: the encoded examples differ from the parent's")
    model, t = s.model, cfg.train
    autocast = autocast_for(s.device, s.precision)
    params = list(trainable_named(model).values())
    optimizer = build_optimizer(params, cfg)
    savings = Savings(chunk_rows=args.chunk_rows)

    def batches(pool):
        lengths = [len(e) for e in pool]
        shuffle = args.mode != "eval"  # evaluation sorts by length, as train._validate does
        order = batch_indices(lengths, t.batch_size, t.seed, 0, shuffle=shuffle, group_by_length=cfg.data.group_by_length)
        return [[pool[i] for i in idx] for idx in order]

    def tensors(group):  # as train._micro_batch makes them
        return pack(group, cfg.data.max_length) if cfg.data.packing else collate(group)

    def step(group) -> float:
        batch = tensors(group).to(s.device)
        if args.mode == "eval":
            return evaluate_lm(model, [batch], autocast)["loss"]
        with autocast():
            loss = lm_loss_sum(model, batch, t.label_smoothing, savings) / max(1, batch.n_targets)
        loss.backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm, foreach=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    from lora_cli.models import shared_prefix_length

    def shared_rows(group) -> int:  # input positions the shared-prefix saving computes once instead of B times
        if not model.share_prefix or len(group) < 2:
            return 0
        batch = collate(group)
        return shared_prefix_length(batch.input_ids, batch.attention_mask.bool()) * (len(group) - 1)

    model.train()
    result = {**_timed(args, s.device, batches(warm), batches(measured), step), "libraries_rss_mb": libraries}
    result["shared_rows_skipped"] = sum(shared_rows(g) for g in batches(measured))
    if cfg.data.packing:  # the packed rows' padding, not the padded batches' that _timed counts
        packed = [tensors(g) for g in batches(measured)]
        result["padding_fraction"] = 1 - sum(b.n_tokens for b in packed) / sum(b.input_ids.numel() for b in packed)
    return result


def child_peer(args, pools) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    libraries = _rss_mb()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    p = args.model_dropout
    torch.manual_seed(args.seed)
    if args.model in PRESETS:  # LlamaForCausalLM / Qwen2ForCausalLM from the preset's config, random init
        config = AutoConfig.for_model(**{**preset_config(args.model), "attention_dropout": p})
        model = AutoModelForCausalLM.from_config(config)
        targets, fan_in_fan_out = PRESET_TARGETS, False
    else:
        config = GPT2Config(**ARCH[args.model], vocab_size=VOCAB, n_positions=1024, resid_pdrop=p, embd_pdrop=p,
                            attn_pdrop=p)
        model = GPT2LMHeadModel(config)
        targets, fan_in_fan_out = ["c_attn"], True
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                                             task_type="CAUSAL_LM"))
    model.to(device)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    eot = 50256
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else None

    def batches(pool):  # the shuffled pool, in order, as a DataLoader over a shuffled dataset gives it
        return [pool[i:i + args.batch_size] for i in range(0, len(pool), args.batch_size)]

    def collate(group):  # DataCollatorForSeq2Seq-style: pad to the longest, labels -100 on prompt and padding
        T = max(len(ids) for ids, _ in group)
        input_ids = torch.full((len(group), T), eot, dtype=torch.long)
        attention = torch.zeros((len(group), T), dtype=torch.long)
        labels = torch.full((len(group), T), -100, dtype=torch.long)
        for b, (ids, mask) in enumerate(group):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention[b, :len(ids)] = 1
            labels[b, :len(ids)] = torch.tensor([i if m else -100 for i, m in zip(ids, mask)])
        return input_ids.to(device), attention.to(device), labels.to(device)

    def forward(input_ids, attention, labels):
        if autocast is None:
            return model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        with autocast():
            return model(input_ids=input_ids, attention_mask=attention, labels=labels).loss

    def step(group) -> float:
        input_ids, attention, labels = collate(group)
        if args.mode == "eval":
            model.eval()
            with torch.inference_mode():
                value = forward(input_ids, attention, labels).item()
            model.train()
            return value
        loss = forward(input_ids, attention, labels)
        loss.backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    model.train()
    warm = [pools["examples"][i] for i in range(len(pools["warmup"]))]
    measured = pools["examples"][len(pools["warmup"]):]
    return {**_timed(args, device, batches(warm), batches(measured), step), "libraries_rss_mb": libraries}


def _timed(args, device, warm_batches, measured_batches, step) -> dict:
    """Run the warmup steps, then time each measured step (wall and process CPU time)."""
    for group in warm_batches:
        step(group)
    times, cpu, losses = [], [], []
    padded = real = 0
    for group in measured_batches:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step(group))
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        lengths = _lengths(group)
        padded += max(lengths) * len(lengths)
        real += sum(lengths)
    return {"step_times_s": times, "cpu_times_s": cpu, "losses": losses,
            "padding_fraction": 1 - real / padded if padded else 0.0, **_memory(device)}


def _lengths(group) -> list[int]:
    return [len(e.ids) if hasattr(e, "ids") else len(e[0]) for e in group]


# ------------------------------------------------------------------------------------------------ the parent


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["instruct", "text", "eval"], default="instruct")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per tool")
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256, help="text mode: scored positions per example")
    ap.add_argument("--max-length", type=int, default=512, help="instruct/eval: tokens per example, truncated beyond")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--model", choices=sorted(ARCH) + list(PRESETS), default="gpt2")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    ap.add_argument("--data", default=None, help="data file (default: instruction data, or The Verdict in text mode)")
    ap.add_argument("--model-dropout", type=float, default=0.0, help="dropout inside the base model, both tools")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tools", default="ours,peer", help="comma list of ours, peer")
    ap.add_argument("--repeats", type=int, default=1, help="run the tools alternately this many times; report each "
                    "tool's fastest run (shared machines) and its largest peak memory")
    ap.add_argument("--chunk-rows", type=int, default=None,
                    help="ours: rows per cross-entropy chunk (default: loss.chunk_rows_for); 0 = plain path")
    ap.add_argument("--no-group", action="store_true", help="ours: no length grouping (A/B)")
    ap.add_argument("--packing", action="store_true", help="ours: data.packing, each batch packed into rows of "
                    "--max-length tokens (A/B)")
    ap.add_argument("--peer-malloc-tuned", action="store_true", help=f"peer: run with {TUNED_MALLOC_ENV}")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="ours: train.gradient_checkpointing (recompute each block in the backward; the peer as its "
                    "users run it by default, without)")
    ap.add_argument("--reference-peak-tflops", type=float, default=None,
                    help="also report useful FLOPs / this figure as mfu (e.g. 790 for an H200's bf16)")
    ap.add_argument("--child", choices=["peak", "ours", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--pools", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is None:
        args.threads = os.cpu_count() or 1
    if args.data is None:
        args.data = str(ROOT / ("data/the-verdict.txt" if args.mode == "text" else "data/instruction-data.json"))
    return args


def child_main(args) -> None:
    if args.child == "peak":
        result = child_peak(args)
    else:
        pools = json.loads(Path(args.pools).read_text())
        result = child_ours(args, pools) if args.child == "ours" else child_peer(args, pools)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(args, argv, which: str, pools_path: str, env_extra: dict | None = None) -> dict:
    env = {**os.environ, **(env_extra or {})}
    if which != "ours":
        env.pop("THP_MEM_ALLOC_ENABLE", None)
        if CALLER_THP is not None:
            env["THP_MEM_ALLOC_ENABLE"] = CALLER_THP
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", which, "--pools", pools_path]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{which}: exited with {done.returncode}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    from lora_cli.data import load_splits

    cfg = run_config(args, args.data)
    examples = load_splits(cfg, context_length=1024).train
    if args.mode == "text":  # only full-length chunks: 8 x seq_len, every position scored
        full = [i for i, e in enumerate(examples) if len(e.ids) == args.seq_len + 1]
        warm, measured = ([full[i] for i in pool] for pool in pool_indices(len(full), args))
    else:
        warm, measured = pool_indices(len(examples), args)
    pool_examples = [(examples[i].ids, examples[i].loss_mask) for i in warm + measured]
    measured_examples = pool_examples[len(warm):]
    with tempfile.TemporaryDirectory() as tmp:
        pools_path = str(Path(tmp) / "pools.json")
        Path(pools_path).write_text(json.dumps({"data_path": args.data, "warmup": warm, "measured": measured,
                                                "digest": digest(measured_examples), "examples": pool_examples}))
        peak = run_child(args, argv, "peak", pools_path)
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):  # ours, peer, ours, peer, ...: both see the same spells of contention
            for tool in [t.strip() for t in args.tools.split(",") if t.strip()]:
                env = TUNED_MALLOC_ENV if tool == "peer" and args.peer_malloc_tuned else None
                runs.setdefault(tool, []).append(run_child(args, argv, tool, pools_path, env))
    # Each tool's fastest run (least disturbed by other processes on a shared machine); memory: the largest.
    results = {tool: min(rs, key=lambda r: sum(r["step_times_s"])) for tool, rs in runs.items()}

    arch = sizes(args.model, LORA["r"])
    real_count = sum(len(ids) - 1 for ids, _ in measured_examples)
    flops = useful_flops(measured_examples, args.mode, arch)
    real = sum(len(ids) - 1 for ids, _ in measured_examples)
    scored = sum(sum(mask[1:]) for _, mask in measured_examples)
    peak_flops = peak[f"{args.precision}_matmul_peak_flops"]
    summary = {}
    for tool, r in results.items():
        wall = sum(r["step_times_s"])
        line = {
            "tool": tool, "mode": args.mode, "precision": args.precision, "model": args.model,
            "batch_size": args.batch_size, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "threads": args.threads, "device": args.device,
            **({"packing": True} if tool == "ours" and args.packing else {}),
            "real_tokens_per_s": round(real / wall, 1),
            "scored_tokens_per_s": round(scored / wall, 1),
            "step_time_median_s": round(statistics.median(r["step_times_s"]), 4),
            "step_time_min_s": round(min(r["step_times_s"]), 4),
            "cpu_s_per_step": round(sum(r["cpu_times_s"]) / len(r["cpu_times_s"]), 4),
            "padding_fraction": round(r["padding_fraction"], 4),
            "useful_gflops_per_s": round(flops / wall / 1e9, 2),
            "frac_of_matmul_peak": round(flops / wall / peak_flops, 4),
            # FLOPs run: the useful count less the linear layers of the positions a shared prompt prefix saved
            # (an upper bound: the last block's unscored positions, also skipped, are not subtracted)
            "prefix_positions_skipped": r.get("shared_rows_skipped", 0),
            "frac_of_matmul_peak_run": round((flops - r.get("shared_rows_skipped", 0) * body_flops(
                args.mode, arch)) / wall / peak_flops, 4),
            **({"mfu": round(flops / wall / (args.reference_peak_tflops * 1e12), 4)} if args.reference_peak_tflops else {}),
            "fp32_matmul_peak_gflops": round(peak["fp32_matmul_peak_flops"] / 1e9, 1),
            "bf16_matmul_peak_gflops": round(peak.get("bf16_matmul_peak_flops", 0.0) / 1e9, 1),
            "real_tokens": real, "scored_tokens": scored,
            "mean_loss": round(sum(r["losses"]) / len(r["losses"]), 4),
        }
        for key in ("peak_rss_mb", "max_memory_allocated_mb"):
            if key in r:
                line[key] = round(max(run[key] for run in runs[tool]), 1)
        if "peak_rss_mb" in r:
            line["libraries_rss_mb"] = round(max(run["libraries_rss_mb"] for run in runs[tool]), 1)
            line["peak_rss_above_libraries_mb"] = round(max(run["peak_rss_mb"] - run["libraries_rss_mb"]
                                                            for run in runs[tool]), 1)
        if args.repeats > 1:
            line["repeats"] = args.repeats
            line["real_tokens_per_s_each_run"] = [round(real_count / sum(run["step_times_s"]), 1) for run in runs[tool]]
        if tool == "peer" and args.peer_malloc_tuned:
            line["malloc_env"] = TUNED_MALLOC_ENV
        if tool == "ours" and args.gradient_checkpointing:
            line["gradient_checkpointing"] = True
        summary[tool] = line
        print(json.dumps(line), flush=True)
    if "ours" in summary and "peer" in summary:
        o, p = summary["ours"], summary["peer"]
        mem = "peak_rss_mb" if "peak_rss_mb" in o else "max_memory_allocated_mb"
        print(json.dumps({
            "ratios": "ours/peer", "mode": args.mode, "precision": args.precision,
            "real_tokens_per_s": round(o["real_tokens_per_s"] / p["real_tokens_per_s"], 3),
            "scored_tokens_per_s": round(o["scored_tokens_per_s"] / p["scored_tokens_per_s"], 3),
            "step_time_median": round(o["step_time_median_s"] / p["step_time_median_s"], 3),
            "cpu_s_per_step": round(o["cpu_s_per_step"] / p["cpu_s_per_step"], 3),
            mem: round(o[mem] / p[mem], 3),
            **({"peak_rss_above_libraries_mb": round(o["peak_rss_above_libraries_mb"]
                                                     / p["peak_rss_above_libraries_mb"], 3)}
               if mem == "peak_rss_mb" else {}),
        }), flush=True)


if __name__ == "__main__":
    main()
