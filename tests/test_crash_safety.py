"""Crash safety: SIGKILL the trainer at many moments, `--resume`, and end bit for bit where an uninterrupted
run ends.

A trial runs `lora train` (tiny random GPT-2, CLI child process), kills it with SIGKILL at a deterministic event,
then resumes until the run finishes. The events: right after the k-th "checkpoint saved at step N" log line (for
several N, one on an epoch boundary), in the middle of a checkpoint write, of an adapter write and of a
metrics.jsonl append (the child writes half the bytes, fsyncs, and blocks until killed: see tests/zygote.py;
there is no test hook in the product), and twice in one trial (once right after "resumed from step N"). Each
trial must end with the same adapter as the reference run (torch.equal on every tensor, and the same header
metadata) and the same per-step losses in metrics.jsonl, and at every kill the files a reader would open
(checkpoint/state.pt, adapter.safetensors) must load.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import child_env, cli, warm_zygote

TINY_MODEL = {"name": "gpt2", "init": "random", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128,
              "seed": 7}
WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "seven", "table", "music", "light", "north",
         "paper", "glass", "horse", "bread", "chair"]
TOTAL_STEPS = 12  # 12 training rows, batch 2: 6 steps per epoch, 2 epochs


def write_run(folder: Path) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w} {w}"} for w in WORDS]
    (folder / "train.json").write_text(json.dumps(rows))
    config = {
        "model": TINY_MODEL,
        "out_dir": "out",
        "data": {"train": "train.json", "val_split": 0.25, "max_length": 48},
        # dropout > 0: resuming must restore the RNG streams too
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 2, "log_every": 1, "eval_every": 3,
                  "save_every": 2, "seed": 3, "num_threads": 1, "device": "cpu"},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def adapter(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def losses(out: Path) -> list[tuple[int, float | None, float | None]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    cfg = write_run(folder)
    done = cli("train", str(cfg), "--quiet", cwd=folder)
    assert done.rc == 0, done.stderr
    out = folder / "out"
    assert [s for s, _, _ in losses(out)][-1] == TOTAL_STEPS
    return adapter(out / "adapter.safetensors"), losses(out), out / "adapter.safetensors"


def run_until(folder: Path, args: list[str], kill_at: str | None, pause: dict | None = None,
              command: list[str] | None = None) -> tuple[int | str, list[str]]:
    """Start `lora train` (or `command`), read its stderr line by line, SIGKILL it at the first line starting
    with `kill_at` (None: let it finish). Returns the exit status and the lines read."""
    fifo = folder / "stderr.fifo"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    argv = command or ["train", str(folder / "run.yaml"), "--quiet", *args]
    pid = warm_zygote().spawn(argv, folder, child_env(), fifo, pause=pause)
    lines = []
    with open(fifo, encoding="utf-8", errors="replace") as stream:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if kill_at is not None and line.startswith(kill_at):
                os.kill(pid, signal.SIGKILL)
                break
    status = warm_zygote().wait(pid)
    fifo.unlink()
    return status, lines


def readable(out: Path) -> int:
    """What a reader finds after a kill: state.pt and adapter.safetensors (if present) load whole. Returns the
    checkpoint's step."""
    state = torch.load(out / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)
    if (out / "adapter.safetensors").exists():
        adapter(out / "adapter.safetensors")
    return state["state"]["step"]


# Each trial: the kills, in order: (stderr line prefix to kill at, pause spec or None, the step of the checkpoint a
# reader must then find). Validation runs at steps 3, 6 and 9 (the adapter is rewritten when it improves) and a
# checkpoint is saved every 2 steps.
TRIALS = {
    "after-checkpoint-2": [("checkpoint saved at step 2", None, 2)],
    "after-checkpoint-6-epoch-boundary": [("checkpoint saved at step 6", None, 6)],
    "after-checkpoint-10": [("checkpoint saved at step 10", None, 10)],
    "during-checkpoint-write-3": [("PAUSED checkpoint", {"what": "checkpoint", "at": 3}, 4)],
    "during-adapter-write-2": [("PAUSED safetensors", {"what": "safetensors", "at": 2}, 4)],
    "during-metrics-append-7": [("PAUSED metrics", {"what": "metrics", "at": 7}, 6)],
    "three-kills-one-right-after-resume": [("checkpoint saved at step 4", None, 4), ("resumed from step", None, 4),
                                           ("checkpoint saved at step 8", None, 8)],
}


@pytest.mark.parametrize("name", list(TRIALS))
def test_sigkill_then_resume_ends_bitwise_equal(name, reference, tmp_path):
    (ref_tensors, ref_meta), ref_losses, _ = reference
    write_run(tmp_path)
    out = tmp_path / "out"
    kills = 0
    for i, (kill_at, pause, step) in enumerate(TRIALS[name]):
        status, lines = run_until(tmp_path, ["--resume"] if i else [], kill_at, pause)
        assert status == -signal.SIGKILL, (status, lines)
        assert lines[-1].startswith(kill_at)
        kills += 1
        assert readable(out) == step  # the last good checkpoint, whole
        if pause is not None and pause["what"] != "metrics":
            # killed in the middle of a write: its half-written temporary file is there; the target is whole
            temps = list(out.rglob(".*.tmp"))
            assert len(temps) == 1 and temps[0].stat().st_size > 0, sorted(p.name for p in out.rglob("*"))
        if pause is not None and pause["what"] == "metrics":
            assert not (out / "metrics.jsonl").read_text().endswith("\n")  # a torn last line
    status, lines = run_until(tmp_path, ["--resume"], None)
    assert status == 0, lines
    assert any(line.startswith("resumed from step") for line in lines)
    tensors, meta = adapter(out / "adapter.safetensors")
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    assert meta == ref_meta
    assert losses(out) == ref_losses
    assert kills == len(TRIALS[name])


def test_sigkill_during_merge_keeps_the_previous_merged_model(reference, tmp_path):
    """`lora merge --overwrite` killed while it writes model.safetensors: the earlier merged directory is
    still there, byte for byte, and loads; the next merge completes."""
    from lora_cli.pretrained import load_model

    adapter_path = reference[2]
    merged = tmp_path / "merged"
    command = ["merge", "--adapter", str(adapter_path), "--out", str(merged)]
    status, lines = run_until(tmp_path, [], None, command=command)
    assert status == 0, lines
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    status, lines = run_until(tmp_path, [], "PAUSED safetensors", {"what": "safetensors", "at": 1},
                              command=[*command, "--overwrite"])
    assert status == -signal.SIGKILL, lines
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before
    load_model(str(merged))
    staging = [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.")]
    assert len(staging) == 1  # the killed merge's half-built directory, beside the target (safe to delete)
    status, lines = run_until(tmp_path, [], None, command=[*command, "--overwrite"])
    assert status == 0, lines
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before  # the same merge, the same bytes


def test_a_directory_output_named_through_a_symlink_is_written_through_it(tmp_path):
    """atomic_dir (lora merge --out, lora export OUT) given a symlink replaces the folder it points to and keeps the
    link (it replaced the link with a folder, left the target as it was and a `.NAME.old-PID` link behind); a
    dangling link is an existing output for check_output_file."""
    from lora_cli.errors import ConfigError
    from lora_cli.fsutil import atomic_dir, check_output_file

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to("real")
    with atomic_dir(tmp_path / "link") as staging:
        (staging / "new.txt").write_text("new")
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == "real"
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    (tmp_path / "dangling").symlink_to("nowhere")
    with pytest.raises(ConfigError, match="dangling already exists; choose a new file or pass --overwrite"):
        check_output_file(tmp_path / "dangling", "--predictions", overwrite=False)
