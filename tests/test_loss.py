"""Chunked cross-entropy: the loss and its gradients equal the plain F.cross_entropy path (fp32, <= 1e-5
relative), for any chunk size, with label smoothing, ignored rows, a head that needs a gradient, in evaluation,
and over whole training runs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lora_cli import loss as loss_mod
from lora_cli.loss import Savings, chunked_ce_stats, chunked_cross_entropy, lm_loss_sum

from helpers import rel, tiny_batch, tiny_lora_model

V = 50257


def problem(n=150, c=64, seed=0, ignore=(5, 37)):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, c, generator=g) * 0.1
    hidden = torch.randn(n, c, generator=g)
    targets = torch.randint(0, V, (n,), generator=g)
    targets[list(ignore)] = -100
    return hidden, weight, targets


def plain(hidden, weight, targets, smoothing=0.0, dtype=torch.float32):
    return F.cross_entropy(F.linear(hidden, weight).to(dtype), targets, reduction="sum", label_smoothing=smoothing)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_chunked_loss_and_hidden_grad_equal_plain(chunk_rows, smoothing):
    # The reference is the plain path in fp64: torch's own fp32 gradient with label smoothing is 9.4e-6 (relative)
    # away from it here, about as far as the bound, while the chunked fp32 gradient is within 4e-6.
    hidden, weight, targets = problem()
    h1 = hidden.double().requires_grad_()
    ref = plain(h1, weight.double(), targets, smoothing, dtype=torch.float64)
    (ref * 0.37).backward()  # a scale, as the trainer divides by the target count
    h2 = hidden.clone().requires_grad_()
    out = chunked_cross_entropy(h2, weight, targets, smoothing, chunk_rows)
    (out * 0.37).backward()
    assert out.dtype == torch.float32 and out.requires_grad
    assert rel(ref, out) <= 1e-5
    assert rel(h1.grad, h2.grad) <= 1e-5
    assert h2.grad[[5, 37]].abs().max().item() == 0.0  # ignored rows get no gradient


def test_chunked_without_grad_and_all_ignored():
    hidden, weight, targets = problem()
    with torch.no_grad():
        out = chunked_cross_entropy(hidden, weight, targets, 0.0, 16)
    assert not out.requires_grad
    assert rel(plain(hidden, weight, targets), out) <= 1e-5
    none = torch.full_like(targets, -100)
    assert chunked_cross_entropy(hidden, weight, none, 0.0, 16).item() == 0.0


def test_head_that_needs_a_gradient_takes_the_plain_path():
    hidden, weight, targets = problem(n=40)
    w1 = weight.clone().requires_grad_()
    h1 = hidden.clone().requires_grad_()
    plain(h1, w1, targets, 0.1).backward()
    w2 = weight.clone().requires_grad_()
    h2 = hidden.clone().requires_grad_()
    chunked_cross_entropy(h2, w2, targets, 0.1, 8).backward()
    assert rel(w1.grad, w2.grad) <= 1e-5 and w2.grad.abs().sum() > 0
    assert rel(h1.grad, h2.grad) <= 1e-5


def test_eval_stats_equal_plain():
    hidden, weight, targets = problem(n=90)
    weight[targets[:30].clamp_min(0)] += hidden[:30] * 0.5  # make some argmaxes right
    loss, correct = chunked_ce_stats(hidden, weight, targets, chunk_rows=32)
    logits = F.linear(hidden, weight)
    valid = targets != -100
    assert rel(plain(hidden, weight, targets), loss) <= 1e-5
    expected = ((logits.argmax(-1) == targets) & valid).sum().item()
    assert expected >= 10 and correct.item() == expected


def test_bf16_autocast_is_close_to_the_autocast_plain_path():
    hidden, weight, targets = problem(n=60)
    h1 = hidden.clone().requires_grad_()
    h2 = hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = plain(h1, weight, targets)
        out = chunked_cross_entropy(h2, weight, targets, 0.0, 16)
    ref.backward()
    out.backward()
    assert out.dtype == torch.float32 and h2.grad.dtype == torch.float32
    assert rel(ref, out) <= 1e-3
    assert rel(h1.grad, h2.grad) <= 2e-2  # bf16 rounding of the gradient before the matmul


# --------------------------------------------------------------------------------------- on the real model


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_lm_loss_sum_chunked_equals_plain_on_the_model(smoothing):
    model, batch = tiny_lora_model(), tiny_batch()
    grads = []
    for rows in (0, 5, None):
        model.zero_grad(set_to_none=True)
        value = lm_loss_sum(model, batch, smoothing, Savings(chunk_rows=rows))
        value.backward()
        grads.append((value, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ref, ref_grads), *others = grads
    assert len(ref_grads) == 4  # A and B of c_attn in 2 layers
    for value, g in others:
        assert rel(ref, value) <= 1e-5
        for name in ref_grads:
            assert rel(ref_grads[name], g[name]) <= 1e-5, name


def test_lm_loss_sum_with_a_trained_head_gives_its_gradient():
    model, batch = tiny_lora_model(), tiny_batch()
    model.lm_head.weight.requires_grad_(True)  # what a trained (modules_to_save) head looks like to the loss
    model.zero_grad(set_to_none=True)
    lm_loss_sum(model, batch, savings=Savings(chunk_rows=0)).backward()
    ref = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    lm_loss_sum(model, batch, savings=Savings(chunk_rows=4)).backward()
    assert rel(ref, model.lm_head.weight.grad) <= 1e-5


def test_evaluate_lm_equals_the_plain_computation():
    from lora_cli.evaluation import evaluate_lm

    model, batch = tiny_lora_model(), tiny_batch()
    metrics = evaluate_lm(model, [batch])
    with torch.no_grad():
        hidden = model(batch.input_ids)
        scored = batch.targets != -100
        logits = model.logits(hidden[scored]).float()
        targets = batch.targets[scored]
        loss = F.cross_entropy(logits, targets, reduction="sum").item() / targets.numel()
        accuracy = (logits.argmax(-1) == targets).float().mean().item()
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["token_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert metrics["tokens"] == targets.numel() == batch.n_targets
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    with torch.no_grad():  # a NaN weight: the loss is NaN, and so is its exp (it read inf)
        model.transformer.ln_f.weight[0] = float("nan")
    metrics = evaluate_lm(model, [batch])
    assert math.isnan(metrics["loss"]) and math.isnan(metrics["perplexity"])


def test_training_run_with_and_without_chunking_is_the_same(tmp_path):
    """A whole `lora train` run (loss, clipping, AdamW, validation) with every saving of loss.py (chunked
    cross-entropy, the unpadded forward) and with neither."""
    from lora_cli.config import load_config
    from lora_cli.train import train

    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"}
            for w in ["apple", "river", "stone", "cloud", "green", "quick", "seven", "table", "music", "light"]]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    config = tmp_path / "run.yaml"
    config.write_text("""\
model: {name: gpt2, init: random, n_layer: 2, n_head: 2, n_embd: 64, n_positions: 128, seed: 7}
data: {train: train.json, val_split: 0.2, max_length: 64}
lora: {r: 4, alpha: 8, dropout: 0.0}
train: {lr: 1e-2, batch_size: 4, epochs: 2, warmup_steps: 1, log_every: 1, eval_every: 2, save_every: 0,
        label_smoothing: 0.05, device: cpu, precision: fp32}
""")
    results = {}
    for name, rows_per_chunk, unpad in (("plain", 0, False), ("chunked", 3, True)):
        cfg = load_config(config, [f"out_dir={tmp_path / name}"])
        train(cfg, log=lambda *a: None, progress=False, savings=Savings(unpad=unpad, chunk_rows=rows_per_chunk))
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        results[name] = metrics
    plain_run, chunked_run = results["plain"], results["chunked"]
    losses = lambda run, key: [m[key] for m in run if key in m]  # noqa: E731
    assert len(losses(plain_run, "loss")) == 4 and len(losses(plain_run, "val_loss")) >= 2
    for key in ("loss", "val_loss"):
        for a, b in zip(losses(plain_run, key), losses(chunked_run, key), strict=True):
            assert b == pytest.approx(a, rel=1e-5)


def shared_prefix_batch(case: str):
    """Right-padded batches whose rows start with the same tokens, as an instruction template's preamble does."""
    from lora_cli.data import Example, collate

    g = torch.Generator().manual_seed(8)
    prefix = torch.randint(0, V, (11,), generator=g).tolist()
    tail = lambda n: torch.randint(0, V, (n,), generator=g).tolist()  # noqa: E731
    if case == "prompt masked":  # the prefix carries no loss (the instruction-tuning case)
        rows = [(prefix + tail(n), 11 + k) for n, k in ((9, 3), (4, 1), (15, 6), (1, 0))]
    elif case == "prefix scored":  # every position scored, a row that is the prefix alone, rows of other lengths
        rows = [(prefix + tail(n), 0) for n in (6, 0, 13)]
    elif case == "identical rows":
        rows = [(prefix, 0), (prefix, 3)]
    else:  # "nothing shared"
        rows = [(tail(n), 2) for n in (8, 12, 5)]
    return collate([Example(ids, [False] * p + [True] * (len(ids) - p)) for ids, p in rows])


@pytest.mark.parametrize("case", ["prompt masked", "prefix scored", "identical rows", "nothing shared"])
def test_shared_prefix_loss_and_gradients_equal_the_padded_path(case):
    """A prefix common to the batch is computed once (model.Unpadded's `shared`): the loss and every LoRA gradient
    equal the plain padded computation, with and without pruning the last block."""
    model, batch = tiny_lora_model(), shared_prefix_batch(case)
    runs = {}
    for name, unpad, share, prune in (("padded", False, False, False), ("shared", True, True, True),
                                      ("shared, all rows out", True, True, False), ("unshared", True, False, True),
                                      ("shared, checkpointed", True, True, True)):
        model.share_prefix = share
        model.gradient_checkpointing = name.endswith("checkpointed")
        model.zero_grad(set_to_none=True)
        value = lm_loss_sum(model, batch, savings=Savings(unpad=unpad, prune_last_block=prune))
        value.backward()
        runs[name] = (value, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    ref, ref_grads = runs.pop("padded")
    for name, (value, grads) in runs.items():
        assert rel(ref, value) <= 1e-5, name
        for param in ref_grads:
            assert rel(ref_grads[param], grads[param]) <= 1e-5, (name, param)


def test_shared_prefix_length():
    from lora_cli.models import Unpadded, shared_prefix_length

    batch = shared_prefix_batch("prompt masked")
    keep = batch.attention_mask.bool()
    assert shared_prefix_length(batch.input_ids, keep) == 11
    assert shared_prefix_length(batch.input_ids[:1], keep[:1]) == int(keep[0].sum())  # one row shares all of itself
    assert shared_prefix_length(shared_prefix_batch("nothing shared").input_ids,
                                shared_prefix_batch("nothing shared").attention_mask.bool()) == 0
    identical = shared_prefix_batch("identical rows")
    assert shared_prefix_length(identical.input_ids, identical.attention_mask.bool()) == 10  # 11 tokens, 10 inputs
    grid = Unpadded(keep, shared=11)
    assert len(grid.index) == int(keep.sum()) - 3 * 11  # rows 1..3 read row 0's 11 prefix rows
    assert grid.rows.view(keep.shape)[:, :11].eq(torch.arange(11)).all()


def test_shared_prefix_attention_saves_distinct_rows_only():
    """With a shared prefix, the q, k, v that attention keeps for the backward pass are stored as the N distinct
    rows, not as the [B, T, 3C] grid that repeats the prefix in every row (Unpadded.save_as_rows)."""
    from lora_cli.models import Unpadded, shared_prefix_length

    model, batch = tiny_lora_model(), shared_prefix_batch("prompt masked")
    keep = batch.attention_mask.bool()
    grid = Unpadded(keep, shared_prefix_length(batch.input_ids, keep))
    attention = model.transformer.h[0].attn
    x = torch.randn(len(grid.index), 64, requires_grad=True)
    B, T = keep.shape
    grid_bytes = B * T * 3 * 64 * 4

    def run():
        kept = []  # storage sizes of every tensor autograd keeps for the backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.untyped_storage().nbytes()) or t,
                                                      lambda t: t):
            y = attention(x, None, None, grid)
        x.grad = None
        y.sum().backward()
        return kept, x.grad.clone()

    kept, grad = run()
    assert grid_bytes not in kept
    grid.shared = 0  # save_as_rows does nothing then: the grid itself is kept, and the gradient is the same
    kept, plain_grad = run()
    assert grid_bytes in kept
    assert rel(plain_grad, grad) <= 1e-6


def test_chunk_rows_for():
    assert [loss_mod.chunk_rows_for(n) for n in (1, 100, 200, 300, 1024, 2048, 10**6)] == [32, 32, 50, 75, 256, 256, 256]


def test_shared_prefix_under_bf16_autocast_matches_the_unshared_step():
    """The same saving under bf16 autocast (frozen weights cast as `precision: bf16` does): loss and LoRA
    gradients match the unshared computation to bf16 precision."""
    from lora_cli.models import cast_frozen_linears_

    model, batch = tiny_lora_model(), shared_prefix_batch("prompt masked")
    cast_frozen_linears_(model, torch.bfloat16)
    runs = []
    for share in (False, True):
        model.share_prefix = share
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = lm_loss_sum(model, batch)
        value.backward()
        runs.append((value, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (ref, ref_grads), (value, grads) = runs
    assert rel(ref, value) <= 1e-3
    for name in ref_grads:
        assert rel(ref_grads[name], grads[name]) <= 2e-2, name
