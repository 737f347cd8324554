"""Run the real `lora` CLI in child processes forked from one warm "zygote" (test helper, not product code).

Importing torch costs ~2 s of CPU per process and this machine has two shared cores, so tests that run the CLI
dozens of times fork each child from a process that imported torch/lora_cli once and never ran a tensor
op (forking stays safe). A child sets sys.argv, cwd, environment and fds 0/1/2, then runs
`runpy.run_module("lora_cli")` exactly as `python -m lora_cli` does: SystemExit gives the exit code, an
uncaught exception prints its traceback and exits 1, like the interpreter.

Two modes:
- `run(argv, cwd, env)`: wait for the child, return exit code, stdout and stderr.
- `spawn(argv, cwd, env, stderr_fifo, pause=None)`: return the child's pid at once; its stderr goes to a FIFO
  the caller reads line by line (to SIGKILL it at a chosen log line), then `wait(pid)` gives the exit status.
  `pause={"what": "checkpoint" | "safetensors" | "metrics", "at": k}` makes the k-th such write in the child write
  half of its bytes, fsync them, print "PAUSED <what>" on stderr and block, so a test can kill it in the middle
  of that write, deterministically. This instrumentation lives here, in the child, not in the product.

`run(..., memory_mb=N)` caps the child's address space (RLIMIT_AS) at its size before the CLI starts plus N MiB,
to provoke a real out-of-memory error in a big training step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import io, json, os, runpy, signal, sys, time, traceback
# The expensive imports, once. No tensor op runs here, so forking stays safe.
import torch, torch._dynamo, yaml, safetensors.torch, typer, click, tqdm, pandas  # pandas: reads every data file
import lora_cli.cli, lora_cli.config, lora_cli.data, lora_cli.pretrained, lora_cli.adapter, lora_cli.train
for name in ("evaluate", "inference", "merge", "generate", "loss", "lora", "distributed", "predict"):
    try:
        __import__("lora_cli." + name)
    except ImportError:  # a module not written yet
        pass


def install_pause(what, at):
    """The at-th write of `what` writes half its bytes, says PAUSED and blocks (until SIGKILL)."""
    seen = [0]

    def stall(path, data):
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        print(f"PAUSED {what} {path}", file=sys.stderr, flush=True)
        while True:
            signal.pause()

    def due():
        seen[0] += 1
        return seen[0] == at

    if what == "checkpoint":
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if due():
                buf = io.BytesIO()
                real(obj, buf, *args, **kwargs)
                stall(f, buf.getvalue())
            return real(obj, f, *args, **kwargs)

        torch.save = save
    elif what == "safetensors":  # merged models (safetensors' save_file); adapters and PEFT exports (write_tensors)
        real_file = safetensors.torch.save_file
        real_tensors = lora_cli.adapter.write_tensors

        def save_file(tensors, filename, metadata=None):
            if due():
                stall(filename, safetensors.torch.save(tensors, metadata=metadata))
            return real_file(tensors, filename, metadata=metadata)

        def write_tensors(path, tensors, metadata):
            if due():
                stall(path, lora_cli.adapter.safetensors_bytes(tensors, metadata))
            return real_tensors(path, tensors, metadata)

        safetensors.torch.save_file = save_file
        lora_cli.adapter.write_tensors = write_tensors
    elif what == "metrics":
        real_append = lora_cli.train.append_line

        def append_line(path, line):
            if due():
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(line[: len(line) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                print(f"PAUSED {what} {path}", file=sys.stderr, flush=True)
                while True:
                    signal.pause()
            return real_append(path, line)

        lora_cli.train.append_line = append_line
    else:
        raise ValueError(what)


def limit_memory(mb):
    """Cap this process's address space at what it uses now plus `mb` MiB (RLIMIT_AS), so a big batch fails to
    allocate. The BLAS library allocates its work buffers on first use, and fails with its own exit rather than
    an error; one small product here makes it do that first."""
    import resource

    torch.ones(256, 256) @ torch.ones(256, 256)
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + mb * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))


def child(req):
    code = 1
    try:
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(req["stderr"], os.O_WRONLY | (0 if req.get("fifo") else os.O_CREAT | os.O_TRUNC), 0o644)
        for target, fd in enumerate([os.open(req.get("stdin") or os.devnull, os.O_RDONLY), out, err]):
            os.dup2(fd, target)
        if req.get("pause"):
            install_pause(req["pause"]["what"], req["pause"]["at"])
        if req.get("memory_mb"):
            limit_memory(req["memory_mb"])
        sys.argv = ["lora", *req["argv"]]
        try:
            runpy.run_module("lora_cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:  # what the interpreter does with SystemExit
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def wait(pid, timeout):
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.02)


print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req:
        print(json.dumps({"rc": wait(req["wait"], req["timeout"])}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        child(req)
    if req.get("spawn"):
        print(json.dumps({"pid": pid}), flush=True)
    else:
        print(json.dumps({"rc": wait(pid, req["timeout"])}), flush=True)
'''


class Result(NamedTuple):
    rc: int | str  # "timeout" when the child was killed for running too long
    stdout: str
    stderr: str


class Zygote:
    def __init__(self, scratch: Path, timeout: float = 120):
        self.scratch = Path(scratch)
        self.timeout = timeout
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=str(REPO))
        assert self.proc.stdout.readline().strip() == "ready"

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def _files(self) -> tuple[Path, Path]:
        self.count += 1
        return self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"

    def run(self, argv: list[str], cwd: Path, env: dict, memory_mb: int | None = None,
            stdin: str | bytes | None = None) -> Result:
        """Run to the end. memory_mb: cap the child's address space at its size before the CLI runs plus this;
        stdin: the text (or bytes) the child reads on its standard input (default: nothing, /dev/null)."""
        out, err = self._files()
        stdin_file = None
        if stdin is not None:
            stdin_file = out.with_suffix(".in")
            stdin_file.write_bytes(stdin if isinstance(stdin, bytes) else stdin.encode())
        reply = self._ask({"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err),
                           "timeout": self.timeout, "memory_mb": memory_mb,
                           "stdin": str(stdin_file) if stdin_file else None})
        return Result(reply["rc"], out.read_text(errors="replace"), err.read_text(errors="replace"))

    def spawn(self, argv: list[str], cwd: Path, env: dict, stderr_fifo: Path, pause: dict | None = None) -> int:
        out, _ = self._files()
        reply = self._ask({"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(stderr_fifo),
                           "fifo": True, "spawn": True, "pause": pause})
        return reply["pid"]

    def wait(self, pid: int) -> int | str:
        return self._ask({"wait": pid, "timeout": self.timeout})["rc"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)

