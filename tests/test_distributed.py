"""Data-parallel training under torchrun: real 2-process gloo runs on the CPU of a tiny random GPT-2.

One uninterrupted 2-process run (module fixture) is the reference for three checks: it equals a single-process run
with the same global batch and seed; a run whose rank 1 is SIGKILLed after a checkpoint fails as a whole with a
clear message and, resumed, ends bit for bit on the reference's adapter, and resumed by a single process ends
within float rounding of it; a resume with another global batch is refused. Without dropout, the adapter does
not depend on batch_size, grad_accum or the process count (the global batch is the unit).
"""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_one_line_error, cli, python
from lora_cli.config import load_config
from lora_cli.distributed import resolve_batch
from lora_cli.errors import ConfigError, TrainingError
from lora_cli.train import build, train

WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "seven", "table", "music", "light", "north", "paper",
         "glass", "horse", "bread", "chair", "dream", "flame", "grape", "heart", "lemon", "ocean", "piano"]


REFERENCE = """\
lora: {r: 4, alpha: 8, dropout: 0.1}
train: {lr: 1e-2, batch_size: 2, global_batch_size: 8, epochs: 6, max_steps: 12, warmup_steps: 2, log_every: 1,
        eval_every: 4, save_every: 3}
"""


def write_config(folder: Path, lora_and_train: str = REFERENCE) -> Path:
    """18 training examples: global batches of 8, 8 and 2 per epoch. The reference's global_batch_size 8 in
    micro-batches of 2: grad_accum 4 on one process, 2 on each of two (no_sync in use); the last global batch of an
    epoch fills only rank 0's two micro-batches, so rank 1 runs weight-0 placeholders."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"} for w in WORDS]
    (folder / "train.json").write_text(json.dumps(rows))
    path = folder / "run.yaml"
    path.write_text("""\
model: {name: gpt2, init: random, n_layer: 2, n_head: 2, n_embd: 64, n_positions: 256, seed: 7}
out_dir: out
data: {train: train.json, val_split: 0.2, max_length: 64}
""" + lora_and_train)
    return path


def torchrun(*args) -> list[str]:
    """Arguments of `python` that run a 2-process `lora train` (--standalone: a free local port for the
    rendezvous, so concurrent test runs do not collide)."""
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lora_cli", "train", *args]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-process run."""
    cfg = write_config(tmp_path_factory.mktemp("ref"))
    done = python(*torchrun(cfg, "--quiet"))
    assert done.returncode == 0, done.stderr
    return cfg, done


def test_global_batch_follows_world_size():
    assert resolve_batch(8, 1, None, 4) == (8, 1)  # no global batch: as configured
    assert resolve_batch(2, 1, 8, 1) == (2, 4)
    assert resolve_batch(2, 1, 8, 2) == (2, 2)
    assert resolve_batch(8, 3, 24, 2) == (6, 2)  # 12 per process: batch_size 8 does not divide it, 6 x 2 does
    assert resolve_batch(8, 1, 8, 8) == (1, 1)
    assert resolve_batch(4, 1, 2**61 - 1, 1) == (1, 2**61 - 1)  # a prime share: at most batch_size trials (it hung)
    assert resolve_batch(6, 1, 2**40 * 3, 1) == (6, 2**39)
    with pytest.raises(ConfigError) as err:
        resolve_batch(4, 1, 10, 4)
    assert str(err.value) == ("train.global_batch_size 10 cannot be split evenly over 4 processes; use a multiple "
                              "of 4 (e.g. 8 or 12) or another process count")


def test_two_processes_equal_one(reference, tmp_path):
    cfg_path, done = reference
    out2 = cfg_path.parent / "out"
    assert "global batch 8 = batch_size 2 x grad_accum 2 x 2 processes (gloo)" in done.stderr
    assert done.stdout.strip() == str(out2 / "adapter.safetensors")  # rank 0 alone reports
    assert done.stderr.count("done: 12 steps") == 1  # and logs
    assert sorted(p.name for p in out2.iterdir()) == ["adapter.safetensors", "checkpoint", "config.yaml", "loss.png",
                                                       "metrics.jsonl"]
    assert torch.load(out2 / "checkpoint" / "state.pt", weights_only=True)["world_size"] == 2

    one = write_config(tmp_path)
    lines = []
    result = train(load_config(one), log=lines.append, progress=False)
    assert "global batch 8 = batch_size 2 x grad_accum 4 x 1 process" in lines
    a, b = load_file(str(result.adapter)), load_file(str(out2 / "adapter.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    m1, m2 = metrics(tmp_path / "out"), metrics(out2)
    assert [(m["step"], m["tokens"], m["epoch"]) for m in m1] == [(m["step"], m["tokens"], m["epoch"]) for m in m2]
    for x, y in zip(m1, m2):
        for key in ("loss", "val_loss"):
            assert (key in x) == (key in y)
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-6)


def worker_pid(parent: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (its children carry RANK in their environment)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(entry)
    raise AssertionError(f"no rank {rank} worker under pid {parent}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_killed_rank_stops_the_job_and_resume_matches(reference, tmp_path):
    cfg = write_config(tmp_path)
    proc = python(*torchrun(cfg, "--quiet"), popen=True, stdout=subprocess.DEVNULL)
    for line in proc.stderr:
        if line.startswith("checkpoint saved at step 3"):
            os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert "error: lost contact with the other training processes at step " in rest
    assert "rerun the same command with --resume" in rest
    state = torch.load(tmp_path / "out" / "checkpoint" / "state.pt", weights_only=True)
    assert (state["state"]["step"], state["world_size"], state["global_batch"]) == (3, 2, 8)
    elastic = tmp_path.parent / f"{tmp_path.name}-elastic"
    shutil.copytree(tmp_path, elastic)

    resumed = python(*torchrun(cfg, "--resume", "--quiet"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 3" in resumed.stderr
    ref_out = reference[0].parent / "out"
    a, b = load_file(str(ref_out / "adapter.safetensors")), load_file(str(tmp_path / "out" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "epoch", "loss", "val_loss", "lr", "tokens")  # all but the timings
    assert [[m.get(k) for k in keys] for m in metrics(tmp_path / "out")] == [[m.get(k) for k in keys] for m in metrics(ref_out)]

    # the same checkpoint resumed by one process (grad_accum 4): the same step and data position, the same result
    lines = []
    one = train(load_config(elastic / "run.yaml"), resume=True, log=lines.append, progress=False)
    assert "resumed from step 3" in lines and "global batch 8 = batch_size 2 x grad_accum 4 x 1 process" in lines
    c = load_file(str(one.adapter))
    assert c.keys() == a.keys() and max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-5
    assert [m["step"] for m in metrics(elastic / "out")] == [m["step"] for m in metrics(ref_out)]


def test_resume_refuses_another_global_batch(reference, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(reference[0].parent, folder)
    config = folder / "run.yaml"
    config.write_text(config.read_text().replace("global_batch_size: 8", "global_batch_size: 4"))
    with pytest.raises(TrainingError) as err:
        train(load_config(config), resume=True, log=lambda m: None, progress=False)
    path = folder / "out" / "checkpoint" / "state.pt"
    assert str(err.value) == (f"--resume: checkpoint {path} was written with a global batch of 8, this run's is 4; "
                              "set train.global_batch_size: 8 (any process count and batch_size can resume it) or "
                              "start again with --overwrite")


def test_adapter_depends_on_the_global_batch_not_its_layout(tmp_path):
    """Dropout 0, 8 steps of global batch 8 (the last of each epoch short): one process x batch 8 against four
    other layouts, two of them torchrun with 2 processes."""
    def config(name: str, train_options: str) -> Path:
        return write_config(tmp_path / name, "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
                            f"train: {{lr: 1e-2, epochs: 6, max_steps: 8, warmup_steps: 2, {train_options}}}\n")

    def adapter(cfg: Path) -> dict:
        return load_file(str(cfg.parent / "out" / "adapter.safetensors"))

    base = config("b8", "batch_size: 8")
    train(load_config(base), log=lambda m: None, progress=False)
    reference = adapter(base)
    layouts = {"b4a2": "batch_size: 4, grad_accum: 2", "g8b2": "global_batch_size: 8, batch_size: 2",
               "w2b4": "batch_size: 4", "w2g8b8": "global_batch_size: 8, batch_size: 8"}
    for name, options in layouts.items():
        cfg = config(name, options)
        if name.startswith("w2"):
            done = python(*torchrun(cfg, "--quiet"))
            assert done.returncode == 0, done.stderr
            assert "global batch 8 = batch_size 4 x grad_accum 1 x 2 processes (gloo)" in done.stderr
        else:
            train(load_config(cfg), log=lambda m: None, progress=False)
        got = adapter(cfg)
        assert got.keys() == reference.keys()
        assert max((got[k] - reference[k]).abs().max().item() for k in got) <= 1e-5, name


def test_capped_validation_scores_the_same_examples_in_every_layout(tmp_path):
    """train.eval_max_batches counts global batches: batch 8, 4 x accum 2 and 2 x accum 4 validate the same
    examples (it counted micro-batches, so the best adapter and early stopping followed batch_size)."""
    def val_losses(name: str, options: str) -> list[float]:
        cfg = write_config(tmp_path / name, "lora: {r: 4, alpha: 8, dropout: 0.0}\n"
                           f"train: {{lr: 1e-2, max_steps: 4, eval_every: 1, eval_max_batches: 1, {options}}}\n")
        text = cfg.read_text().replace("val_split: 0.2", "val_split: 0.5")  # 12 validation examples: the cap bites
        cfg.write_text(text)
        train(load_config(cfg), log=lambda m: None, progress=False)
        return [m["val_loss"] for m in metrics(cfg.parent / "out") if "val_loss" in m]

    reference = val_losses("b8", "batch_size: 8")
    assert len(reference) == 2  # (one epoch: two global batches)
    for name, options in {"b4a2": "batch_size: 4, grad_accum: 2", "g8b2": "global_batch_size: 8, batch_size: 2"}.items():
        assert val_losses(name, options) == pytest.approx(reference, rel=1e-6), name


# ------------------------------------------------------------------------------------------------- FSDP


def fsdp_config(folder: Path) -> Path:
    return write_config(folder, REFERENCE.replace("save_every: 3}", "save_every: 3, strategy: fsdp}"))


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory):
    """The reference's run with train.strategy: fsdp, uninterrupted."""
    cfg = fsdp_config(tmp_path_factory.mktemp("fsdp"))
    done = python(*torchrun(cfg, "--quiet"))
    assert done.returncode == 0, done.stderr
    return cfg, done


def test_fsdp_equals_ddp_and_halves_the_parameters(reference, fsdp_reference):
    cfg, done = fsdp_reference
    ref_out, out = reference[0].parent / "out", cfg.parent / "out"
    a, b = load_file(str(ref_out / "adapter.safetensors")), load_file(str(out / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # gathered whole on rank 0
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    keys = ("step", "epoch", "tokens")
    assert [[m.get(k) for k in keys] for m in metrics(out)] == [[m.get(k) for k in keys] for m in metrics(ref_out)]
    for x, y in zip(metrics(out), metrics(ref_out)):
        assert x.get("loss", 0) == pytest.approx(y.get("loss", 0), rel=1e-6)
    # the checkpoint is the DDP one: the same names, shapes and optimizer layout
    c, d = (torch.load(o / "checkpoint" / "state.pt", weights_only=True) for o in (ref_out, out))
    assert {k: v.shape for k, v in c["trainable"].items()} == {k: v.shape for k, v in d["trainable"].items()}
    assert c["optimizer"]["param_groups"] == d["optimizer"]["param_groups"]
    assert {i: {k: v.shape for k, v in s.items()} for i, s in c["optimizer"]["state"].items()} == \
        {i: {k: v.shape for k, v in s.items()} for i, s in d["optimizer"]["state"].items()}
    # each process holds its rows of every parameter (torch.chunk's split of dim 0): half, up to odd row counts
    model = build(load_config(cfg)).model
    rows = [[len(c) for c in torch.arange(p.shape[0]).chunk(2)] + [0] for p in model.parameters()]
    per_rank = [sum(r[k] * p[0].numel() for r, p in zip(rows, model.parameters())) for k in (0, 1)]
    assert per_rank == [1_667_520, 1_667_456] and sum(per_rank) == 3_334_976
    assert "fsdp: 3,334,976 parameter elements sharded over 2 processes: 1,667,520 + 1,667,456" in done.stderr


def stop_rank0_after(cfg: Path, line: str, *args) -> str:
    """A 2-process run whose rank 0 gets SIGTERM once `line` is logged: every process stops after the step in
    progress and a checkpoint is written. Returns the rest of the log."""
    proc = python(*torchrun(cfg, "--quiet", *args), popen=True, stdout=subprocess.DEVNULL)
    for got in proc.stderr:
        if got.startswith(line):
            os.kill(worker_pid(proc.pid, 0), signal.SIGTERM)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode != 0 and "interrupted at step " in rest, rest
    return rest


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_fsdp_checkpoint_resumes_under_ddp_and_back(reference, tmp_path):
    """fsdp, stopped after a checkpoint -> ddp from there, stopped again -> fsdp to the end: the reference's
    adapter within float rounding (the checkpoint holds whole tensors whatever the strategy)."""
    cfg = fsdp_config(tmp_path)
    stop_rank0_after(cfg, "checkpoint saved at step 3")
    ddp = cfg.read_text().replace(", strategy: fsdp", "")
    cfg.write_text(ddp)
    stop_rank0_after(cfg, "checkpoint saved at step ", "--resume")  # logged in the loop, where signals are caught
    cfg.write_text(fsdp_config(tmp_path).read_text())
    done = python(*torchrun(cfg, "--resume", "--quiet"))
    assert done.returncode == 0, done.stderr
    ref_out, out = reference[0].parent / "out", tmp_path / "out"
    a, b = load_file(str(ref_out / "adapter.safetensors")), load_file(str(out / "adapter.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert [m["step"] for m in metrics(out)] == [m["step"] for m in metrics(ref_out)]


def test_fsdp_in_one_process_trains_unsharded(tmp_path):
    cfg = write_config(tmp_path, REFERENCE.replace("max_steps: 12", "max_steps: 2").replace(
        "save_every: 3}", "save_every: 3, strategy: fsdp}"))
    lines = []
    train(load_config(cfg), log=lines.append, progress=False)
    assert ("train.strategy fsdp: a single process, nothing to shard; training unsharded (start several processes "
            "with torchrun or --nproc N to shard the model)") in lines
    assert (tmp_path / "out" / "adapter.safetensors").is_file()


def test_nproc_exits_with_its_processes_failure(tmp_path):
    """`lora train --nproc 2` whose processes stop on an error exits 1 with their error line (it exited 0: the
    launcher's exit code was lost on the way out of the CLI)."""
    cfg = write_config(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, out, err = cli("train", cfg, "--nproc", "2", "--quiet", cwd=tmp_path)
    assert assert_one_line_error(code, out, err) == (  # the launcher's own banner and report are left out
        f"error: out_dir {tmp_path / 'out'} holds files no lora-cli run wrote (keep.txt); a run (and --overwrite, "
        "which replaces an earlier run) needs an empty or new out_dir")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
