"""Numerical and resource guards of `lora train`, through the real CLI (tests/zygote.py children).

- A NaN/inf loss stops the run naming the step, and the last good checkpoint stays as it was;
  `train.skip_nonfinite_steps: N` skips N such steps first.
- A non-finite gradient norm behind a finite loss (an overflow in the backward pass) stops the run the same way.
- An out-of-memory error in a training step (provoked for real: the child's address space is capped) is one
  line with the step, the micro-batch shape and what to change; the checkpoint is kept.
- `--dry-run` estimates peak memory and warns when the estimate exceeds what is available.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from helpers import alpaca_rows, assert_one_line_error, child_env, cli, warm_zygote

WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "seven", "table", "music", "light", "north",
         "paper", "glass", "horse", "bread", "chair"]


def tiny_model(n_positions: int = 128) -> str:
    return f"{{name: gpt2, init: random, n_layer: 2, n_head: 2, n_embd: 64, n_positions: {n_positions}, seed: 7}}"


def write_run(folder: Path, train: str, rows: list[dict] | None = None, data: str = "val_split: 0.0, max_length: 64",
              model: str | None = None) -> Path:
    rows = rows or [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"} for w in WORDS]
    (folder / "train.json").write_text(json.dumps(rows))
    path = folder / "run.yaml"
    path.write_text(f"model: {model or tiny_model()}\nout_dir: out\ndata: {{train: train.json, {data}}}\n"
                    f"lora: {{r: 4, alpha: 8, dropout: 0.0}}\n"
                    f"train: {{eval_every: 0, warmup_steps: 0, num_threads: 1, log_every: 1, device: cpu, {train}}}\n")
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert sum(line.startswith("error:") for line in lines) == 1, stderr
    return lines[-1]


def kill_after(folder: Path, cfg: Path, line_prefix: str, args=()) -> None:
    """Run `lora train` and SIGKILL it right after it prints line_prefix (a run that stops mid-way with a
    checkpoint and is not `finished`)."""
    fifo = folder / "stderr.fifo"
    os.mkfifo(fifo)
    pid = warm_zygote().spawn(["train", str(cfg), "--quiet", *args], folder, child_env(), fifo)
    with open(fifo) as stream:
        for line in stream:
            if line.startswith(line_prefix):
                os.kill(pid, signal.SIGKILL)
                break
    assert warm_zygote().wait(pid) == -signal.SIGKILL
    fifo.unlink()


# ------------------------------------------------------------------------------------------ non-finite


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    # lr 1e30 without clipping: after step 1 the LoRA weights are ~1e30 and step 2's forward overflows
    cfg = write_run(tmp_path, "batch_size: 8, max_steps: 6, save_every: 1, lr: 1e30, max_grad_norm: null")
    done = cli("train", str(cfg), "--quiet", cwd=tmp_path)
    assert done.rc == 1
    out = tmp_path / "out"
    assert error_line(done.stderr) == (
        f"error: loss is nan at step 2; stopped, the last good checkpoint is {out / 'checkpoint' / 'state.pt'} "
        "(step 1; continue with --resume); lower train.lr, keep train.max_grad_norm set, or check the data")
    state = checkpoint(out)
    assert state["state"]["step"] == 1
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert not (out / "adapter.safetensors").exists()  # no adapter from a diverged run


def test_skip_nonfinite_steps_tolerates_n_then_stops(tmp_path):
    cfg = write_run(tmp_path, "batch_size: 8, max_steps: 6, save_every: 1, lr: 1e30, max_grad_norm: null, "
                              "skip_nonfinite_steps: 2")
    done = cli("train", str(cfg), "--quiet", cwd=tmp_path)
    assert done.rc == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-3:-1] == ["step 2: non-finite loss skipped (1/2)", "step 2: non-finite loss skipped (2/2)"]
    assert error_line(done.stderr).startswith("error: loss is nan at step 2; stopped, the last good checkpoint is ")
    assert checkpoint(tmp_path / "out")["state"]["step"] == 1


def test_nonfinite_gradient_with_finite_loss_stops(tmp_path):
    """A checkpoint whose LoRA A is 0 and B is 1e38: the forward adds scaling B (A x) = 0 (a finite loss; B stays
    below the fp32 limit once scaled, which the fused addmm may do first), but the gradient of A is
    scaling B^T (...) ~ 1e36 per entry, whose norm overflows to inf. Clipping it would zero the gradients in
    silence; the run must stop instead, leaving that checkpoint untouched."""
    cfg = write_run(tmp_path, "batch_size: 4, max_steps: 8, save_every: 2, lr: 1e-3")
    kill_after(tmp_path, cfg, "checkpoint saved at step 2")
    path = tmp_path / "out" / "checkpoint" / "state.pt"
    state = checkpoint(tmp_path / "out")
    for name, t in state["trainable"].items():
        t.fill_(0.0 if ".lora_A." in name else 1e38)
    torch.save(state, path)
    before = digest(path)
    done = cli("train", str(cfg), "--quiet", "--resume", cwd=tmp_path)
    assert done.rc == 1
    assert error_line(done.stderr) == (
        f"error: gradient norm is inf at step 3; stopped, the last good checkpoint is {path} "
        "(step 2; continue with --resume); lower train.lr, keep train.max_grad_norm set, or check the data")
    assert digest(path) == before


def test_merge_refuses_non_finite_weights():
    """W + scaling B A that overflows fp32 is refused, naming the layer (the CLI path: test_bad_inputs,
    row merge-non-finite-result)."""
    from lora_cli.config import LoraConfig
    from lora_cli.errors import AdapterError
    from lora_cli.lora import apply_lora, merge_and_unload
    from lora_cli.models import GPT2, GPT2Config

    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=64, n_positions=32, vocab_size=100))
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.fill_(3e30)
    with pytest.raises(AdapterError, match=r"transformer\.h\.0\.attn\.c_attn.*non-finite"):
        merge_and_unload(model)


# -------------------------------------------------------------------------------------------- memory


def long_rows(n: int) -> list[dict]:
    return [{"instruction": f"Repeat the word {w}. " + "Please do. " * 40, "input": "", "output": f"{w} " * 60}
            for w in (WORDS * (n // len(WORDS) + 1))[:n]]


def test_out_of_memory_is_one_line_with_the_batch_shape_and_the_checkpoint_is_kept(tmp_path):
    """A real allocation failure: step 2 runs in a child whose address space is capped 200 MiB above its size
    before the CLI started (step 1 needed ~300 MiB more: 64 examples x 218 tokens)."""
    cfg = write_run(tmp_path, "batch_size: 64, max_steps: 2, save_every: 1, lr: 1e-3", rows=long_rows(128),
                    data="val_split: 0.0, max_length: 256", model=tiny_model(256))
    kill_after(tmp_path, cfg, "checkpoint saved at step 1")
    path = tmp_path / "out" / "checkpoint" / "state.pt"
    before = digest(path)
    done = cli("train", str(cfg), "--quiet", "--resume", cwd=tmp_path, memory_mb=200)
    assert done.rc == 1, done.stderr
    assert error_line(done.stderr) == (
        f"error: out of memory on cpu at step 2 (micro-batch of 64 examples x 218 tokens); the last good "
        f"checkpoint is {path} (step 1; continue with --resume); lower train.batch_size (now 64) and raise "
        "train.grad_accum (now 1) to keep the effective batch, lower data.max_length, or set "
        "train.gradient_checkpointing: true")
    assert digest(path) == before


@pytest.mark.parametrize("exc, oom", [
    (MemoryError(), True),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1.00 GB)"), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), False),
    (ValueError("out of memory"), False),
])
def test_is_out_of_memory(exc, oom):
    from lora_cli.errors import is_out_of_memory

    assert is_out_of_memory(exc) is oom


def test_dry_run_warns_before_an_obvious_out_of_memory(tmp_path):
    """Enough 1024-token chunks that one batch of them needs twice the memory available here."""
    from lora_cli.train import _available_memory

    available = _available_memory(torch.device("cpu"))
    assert available
    # 16 heads: the attention scores (16 x 1023 x 1023 fp32 a layer, 2 layers) are the estimate's biggest term
    per_example = 2 * (16 * 1023 * 1023 * 4 + 1023 * 64 * 34 * 4 // 2)
    chunks = int(2 * available / per_example) + 2
    (tmp_path / "book.txt").write_text(" word" * (1023 * chunks))
    cfg = tmp_path / "run.yaml"
    model = "{name: gpt2, init: random, n_layer: 2, n_head: 16, n_embd: 64, n_positions: 1024, seed: 7}"
    cfg.write_text(f"model: {model}\nout_dir: out\n"
                   "data: {train: book.txt, val_split: 0.0, max_length: 1024}\n"
                   f"train: {{batch_size: {chunks + 10}, num_threads: 1, device: cpu}}\n")
    done = cli("train", str(cfg), "--dry-run", cwd=tmp_path)
    assert done.rc == 0, done.stderr
    lines = done.stdout.splitlines()
    estimate = next(line for line in lines if line.startswith("estimated peak memory: "))
    gib = float(estimate.split(": ")[1].split()[0])
    assert gib * 2**30 > 1.8 * available
    warning = next(line for line in lines if line.startswith("warning: "))
    assert "train.batch_size" in warning and "train.grad_accum" in warning and "gradient_checkpointing" in warning
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_without_warning_when_it_fits(tmp_path):
    cfg = write_run(tmp_path, "batch_size: 4")
    done = cli("train", str(cfg), "--dry-run", cwd=tmp_path)
    assert done.rc == 0, done.stderr
    estimate = next(line for line in done.stdout.splitlines() if line.startswith("estimated peak memory: "))
    assert estimate.endswith(" MiB") and 0 < int(estimate.split(": ")[1].split()[0]) < 100  # small: in MiB
    assert not any(line.startswith("warning") for line in done.stdout.splitlines())


def test_sizes_this_machine_cannot_hold_are_one_line(tmp_path):
    """A LoRA rank (or model size) whose weights the machine cannot allocate is the input's fault: one line
    saying so and what to change, exit 1 (it was reported as an internal error)."""
    (tmp_path / "train.json").write_text(json.dumps(alpaca_rows()))
    (tmp_path / "run.yaml").write_text("model: {name: gpt2, init: random, n_layer: 1, n_embd: 64, n_head: 2, "
                                       "n_positions: 64}\ndata: {train: train.json, max_length: 64}\n")
    line = assert_one_line_error(*cli("train", tmp_path / "run.yaml", "--dry-run", "--set", "lora.r=1e12"))
    assert line == ("error: out of memory (an allocation of 238,418.6 GiB); choose a smaller model (or model sizes), a "
                    "lower lora.r, a smaller batch (train.batch_size, --batch-size), or fewer and shorter inputs")


def test_output_to_a_closed_pipe_exits_as_other_tools_do():
    """`lora info ... | head -1`: the reader is gone before the output is written. Exit 141 (as a process killed
    by SIGPIPE reports it) and no message; it was exit 1, a failure without a word."""
    from helpers import python

    proc = python("-m", "lora_cli", "info", "gpt2", "--random", popen=True)
    proc.stdout.close()  # nobody reads: the first write meets a closed pipe
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == ""


def test_a_signal_waits_for_a_deferred_block_then_arrives():
    """fsutil.signals_deferred, around the renames that swap a folder output: a Ctrl-C inside waits for the block
    to end (between the renames it left the output missing), then reaches the handler the block replaced."""
    from lora_cli.fsutil import signals_deferred

    torch.ones(64, 64) @ torch.ones(64, 64)  # torch's worker threads are up: a signal mask would miss them
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # bytecodes where Python would have run the handler
                done.append(len(done))
    assert len(done) == 1000 and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stop_signal_during_an_import_stops_the_command_after_it():
    """SIGTERM (or Ctrl-C) while torch imports numpy: raised there, the KeyboardInterrupt failed numpy's import,
    torch went on without it, and the command ran to its end (or crashed at numpy's first use). It waits for
    the import to finish, then stops the command: `interrupted`, exit 130."""
    from helpers import python

    code = ("import os, signal, sys\n"
            "class Hook:\n"
            "    fired = False\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'numpy._core.multiarray' and not Hook.fired:\n"
            "            Hook.fired = True\n"
            "            os.kill(os.getpid(), signal.SIGTERM)\n"
            "sys.meta_path.insert(0, Hook())\n"
            "import lora_cli.cli\n"
            "lora_cli.cli.main(['info', 'gpt2', '--random'])\n")
    done = python("-c", code)  # (info may have printed by the time the import ended: that output is whole)
    assert (done.returncode, done.stderr) == (130, "interrupted\n")


@pytest.mark.parametrize("args, code, err", [(["info", "gpt2", "--random"], 0, ""),
                                             (["info", "/no/such/model"], 1, "error: model path /no/such/model")])
@pytest.mark.parametrize("when", ["after the command", "during Python's exit"])
def test_a_stop_signal_after_the_command_keeps_its_exit_code(args, code, err, when):
    """A command that has ended has its outputs and its exit code: a SIGTERM right after it ends the process at
    once with that code, and one during Python's exit (1-3 s of tearing torch down, where no Python handler runs)
    is ignored. It killed the process with 143 and no word, after a run that had finished."""
    from helpers import python

    script = ("import atexit, os, signal\n"
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"  # runs after lora's own: at exit
              "import lora_cli.cli\n"
              "try:\n"
              f"    lora_cli.cli.main({args!r})\n"
              "finally:\n"
              f"    {'os.kill(os.getpid(), signal.SIGTERM)' if when == 'after the command' else 'pass'}\n"
              "    print('went on')\n")
    done = python("-c", script)
    assert done.returncode == code and done.stderr.startswith(err) and len(done.stderr.splitlines()) == bool(err), done
    assert ("went on" in done.stdout) == (when != "after the command"), done.stdout
