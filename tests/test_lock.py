"""The run lock (fsutil.RunLock): one live `lora train` or `lora merge` per output directory; a lock left by a
dead process never blocks; a refused command writes and removes nothing."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lora_cli.errors import InUseError
from lora_cli.fsutil import RunLock, holder_alive, lock_path, process_start_time

from helpers import REPO, alpaca_rows, assert_one_line_error, child_env, cli, python, warm_zygote

TINY_MODEL = {"name": "gpt2", "init": "random", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128,
              "seed": 7}
STEPS = 6  # 12 rows, val_split 0.25: 9 training rows, batch 2 -> 5 steps per epoch; max_steps caps at 6


def write_run(folder: Path) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(alpaca_rows()))
    config = {
        "model": TINY_MODEL,
        "out_dir": "out",
        "data": {"train": "train.json", "val_split": 0.25, "max_length": 48},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"epochs": 2, "max_steps": STEPS, "batch_size": 2, "warmup_steps": 1, "log_every": 1,
                  "eval_every": 0, "save_every": 2, "num_threads": 1, "device": "cpu"},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refusal(directory, name: str, record: dict) -> str:
    return (f"error: {name} {directory} is in use by {record['command']} (process {record['pid']}, since "
            f"{record['since']}); wait for it to end or choose another {name}")


def hold_in_child(directory: Path) -> subprocess.Popen:
    """A separate process that holds `directory`'s lock until its stdin closes (then releases it) or it is killed."""
    code = ("import sys; from lora_cli.fsutil import RunLock; "
            f"lock = RunLock({str(directory)!r}, 'lora train', 'out_dir'); lock.acquire(); "
            "print('held', flush=True); sys.stdin.read(); lock.release()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline() == "held\n"
    return child


# ------------------------------------------------------------------------------------------ the lock itself


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "runs" / "out"
    out.mkdir(parents=True)
    (tmp_path / "link").symlink_to(out)
    with RunLock(out, "lora train", "out_dir") as held:
        assert held.path == tmp_path / "runs" / ".lock.out"
        record = json.loads(held.path.read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        assert record["start"] == process_start_time(os.getpid()) and record["command"] == "lora train"
        # the same directory spelled three ways: one lock
        for spelling in (out, f"{out}/", tmp_path / "link"):
            with pytest.raises(InUseError) as refused:
                RunLock(spelling, "lora merge", "--out").acquire()
            assert f"error: {refused.value}" == refusal(Path(spelling), "--out", record)
            assert refused.value.exit_code == 1
    assert not held.path.exists()  # released: the lock file is gone
    with RunLock(out, "lora merge", "--out"):  # and the directory is free again
        pass


def test_the_lock_leaves_no_folder_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with RunLock(out, "lora train", "out_dir") as held:
        assert held.path.is_file()
    assert list(tmp_path.iterdir()) == []
    with RunLock(out, "lora train", "out_dir"):
        out.mkdir()  # the command wrote its directory: the folders above it stay
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["out"]


def test_a_lock_held_by_another_process_blocks_until_it_is_killed(tmp_path):
    out = tmp_path / "out"
    child = hold_in_child(out)
    try:
        with pytest.raises(InUseError, match=rf"in use by lora train \(process {child.pid}, since "):
            RunLock(out, "lora train", "out_dir").acquire()
    finally:
        child.kill()  # SIGKILL: no release runs; the lock file stays, naming a dead process
        child.wait()
    assert json.loads(lock_path(out).read_text())["pid"] == child.pid
    with RunLock(out, "lora train", "out_dir") as held:
        assert json.loads(held.path.read_text())["pid"] == os.getpid()


def test_holder_alive_checks_pid_start_time_and_host():
    me = {"pid": os.getpid(), "start": process_start_time(os.getpid()), "host": socket.gethostname()}
    assert me["start"] is not None  # Linux: /proc is there
    assert holder_alive(me)
    assert not holder_alive({**me, "start": str(int(me["start"]) - 1)})  # the pid was reused
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert not holder_alive({**me, "pid": gone.pid})  # a process that has ended
    assert holder_alive({**me, "host": "another-host"})  # cannot be checked from here: counts as alive


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
    """On a filesystem without flock the lock falls back to the recorded pid and start time."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "out"
    with RunLock(out, "lora train", "out_dir") as held:
        record = json.loads(held.path.read_text())
        with pytest.raises(InUseError) as refused:
            RunLock(out, "lora train", "out_dir").acquire()
        assert f"error: {refused.value}" == refusal(out, "out_dir", record)
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock_path(out).write_text(json.dumps({**record, "pid": gone.pid}))  # left by a process that has ended
    with RunLock(out, "lora train", "out_dir"):
        pass


# ------------------------------------------------------------------------------------------------ commands


def test_a_second_train_on_a_live_run_is_refused(tmp_path):
    """Run A pauses in the middle of its second checkpoint write (tests/zygote.py); `lora train` on its out_dir,
    plain, --resume and --overwrite, and `lora merge --out` into it are refused naming A's pid, and touch nothing.
    Once A is killed, its lock no longer blocks: --resume finishes the run with each step logged once."""
    z = warm_zygote()
    config = write_run(tmp_path)
    out = tmp_path / "out"
    fifo = tmp_path / "a.fifo"
    os.mkfifo(fifo)
    pid = z.spawn(["train", str(config), "--quiet"], tmp_path, child_env(), fifo,
                  pause={"what": "checkpoint", "at": 2})
    with open(fifo, encoding="utf-8", errors="replace") as stream:
        lines = []
        for line in stream:
            lines.append(line)
            if line.startswith("PAUSED checkpoint"):
                break
        assert lines[-1].startswith("PAUSED checkpoint"), "".join(lines)
        before = snapshot(tmp_path)
        record = json.loads(lock_path(out).read_text())
        assert record["pid"] == pid and record["command"] == "lora train"
        for flags in ([], ["--resume"], ["--overwrite"]):
            second = z.run(["train", str(config), "--quiet", *flags], tmp_path, child_env())
            assert second.rc == 1, second.stderr
            assert second.stderr.splitlines() == [refusal(out, "out_dir", record)]
        merged = z.run(["merge", "--adapter", str(out / "adapter.safetensors"), "--out", str(out), "--overwrite"],
                       tmp_path, child_env())
        assert merged.rc == 1 and merged.stderr.splitlines() == [refusal(out, "--out", record)]
        assert snapshot(tmp_path) == before  # nothing written, nothing removed
        os.kill(pid, signal.SIGKILL)
    assert z.wait(pid) == -signal.SIGKILL
    assert lock_path(out).exists()  # left by the killed run, and no obstacle:
    resumed = z.run(["train", str(config), "--quiet", "--resume"], tmp_path, child_env())
    assert resumed.rc == 0, resumed.stderr
    assert "resumed from step 2" in resumed.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))  # each step once
    assert [(r["step"], "val_loss" in r) for r in records if "loss" not in r] == [(STEPS, True)]  # final validation
    assert not lock_path(out).exists()


def test_a_lock_left_by_a_finished_process_does_not_block(tmp_path):
    config = write_run(tmp_path)
    out = tmp_path / "out"
    ended = python("-c", f"from lora_cli.fsutil import RunLock; RunLock({str(out)!r}, 'lora train').acquire()")
    assert ended.returncode == 0 and lock_path(out).is_file()  # never released: the process just ended
    code, stdout, err = cli("train", config, "--quiet")
    assert code == 0, err
    assert stdout.strip() == str(out / "adapter.safetensors")


def test_merge_and_overwrite_into_a_held_directory_are_refused(tmp_path):
    """The held directory is a finished run's out_dir: `lora train --overwrite` (and its --dry-run, with --resume
    too) and `lora merge --overwrite` into it are refused while another process holds it, and remove nothing."""
    config = write_run(tmp_path)
    out = tmp_path / "out"
    code, _, err = cli("train", config, "--quiet")
    assert code == 0, err
    merged = tmp_path / "merged"
    code, _, err = cli("merge", "--adapter", out / "adapter.safetensors", "--out", merged)
    assert code == 0, err
    before = snapshot(tmp_path)
    for directory, command in ((out, ["train", config, "--quiet", "--overwrite"]),
                               (out, ["train", config, "--dry-run", "--overwrite"]),  # refused as the run is
                               (out, ["train", config, "--dry-run", "--resume"]),
                               (merged, ["merge", "--adapter", out / "adapter.safetensors", "--out", merged,
                                         "--overwrite"]),
                               (tmp_path / "new", ["merge", "--adapter", out / "adapter.safetensors", "--out",
                                                   tmp_path / "new"])):
        child = hold_in_child(directory)
        try:
            record = json.loads(lock_path(directory).read_text())
            name = "out_dir" if command[0] == "train" else "--out"
            line = assert_one_line_error(*cli(*command))
            assert line == refusal(directory, name, record)
        finally:
            child.stdin.close()  # the holder releases and ends
            child.wait()
        assert snapshot(tmp_path) == before


def test_a_folder_the_lock_cannot_make_and_a_symlink_loop_are_one_line(tmp_path, monkeypatch):
    """A missing folder under one that cannot be written: named as not writable (the lock's retry loop once said the
    lock "keeps changing; try again"); an output through a symlink loop: one line (an internal RuntimeError)."""
    from lora_cli.errors import LoraError
    from lora_cli.fsutil import output_path

    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    with pytest.raises(LoraError, match=r"loop1/sub runs through a symlink loop; name another path$"):
        lock_path(tmp_path / "loop1" / "sub")
    with pytest.raises(LoraError, match=r"^--out .*loop1 runs through a symlink loop; name another path$"):
        output_path(tmp_path / "loop1", "--out")
    assert output_path(".", "OUT") == Path.cwd() and output_path("a/b", "OUT") == Path("a/b")

    def refused(self, *args, **kwargs):  # what mkdir does under a folder without write permission (not for root)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(LoraError) as err:
        RunLock(tmp_path / "new" / "run", "lora train", "out_dir").acquire()
    assert str(err.value) == (f"cannot lock out_dir {tmp_path / 'new' / 'run'}: cannot create {tmp_path / 'new'} "
                              "(Permission denied); put out_dir in a writable folder")


def test_a_folder_the_file_system_refuses_is_named_not_retried(tmp_path):
    """/proc refuses mkdir with ENOENT: the lock once read that as a holder removing its folder, retried ten times
    and said "keeps changing; try again"; it now names the file it cannot create."""
    from lora_cli.errors import LoraError

    with pytest.raises(LoraError) as err:
        RunLock("/proc/lora-cli-test/out", "lora merge", "--out").acquire()
    assert str(err.value) == ("cannot lock --out /proc/lora-cli-test/out: cannot create /proc/lora-cli-test/.lock.out "
                              "(No such file or directory); put --out in a writable folder")
