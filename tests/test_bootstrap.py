"""The README's two commands (`make run`, `make test` -> scripts/bootstrap.sh): what they run, the torch choice,
and that a second run installs nothing. pip itself is replaced by a recorder here; the real install from scratch
is what CI does (.ci/run runs `make test` in a fresh clone)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bootstrap.sh"


def test_the_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    first_block = re.search(r"```\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make run", "make test"]
    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert commands[-1] == "make test"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_targets_run_the_main_job_and_the_whole_suite():
    def dry(*args):
        return subprocess.run(["make", "-s", "-n", *args], cwd=REPO, capture_output=True, text=True, check=True,
                              env={k: v for k, v in os.environ.items() if k not in ("RUN_CONFIG", "RUN_ARGS",
                                                                                      "PYTEST_ARGS")}).stdout
    assert dry("run") == "bash scripts/bootstrap.sh run train configs/offline.yaml --overwrite\n"
    assert dry("test") == "bash scripts/bootstrap.sh test -q -p no:cacheprovider tests \n"
    assert dry("test", "PYTEST_ARGS=-k config") == "bash scripts/bootstrap.sh test -q -p no:cacheprovider tests -k config\n"


def fake_bin(folder: Path, **tools: str) -> Path:
    """A PATH folder with `dirname` (the script needs it) and the given tools as shell scripts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dirname").symlink_to(shutil.which("dirname"))
    for name, body in tools.items():
        path = folder / name.replace("_", "-")
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return folder


@pytest.mark.parametrize("tools, env, expected", [
    ({}, {}, "torch==2.13.0"),  # no nvidia-smi: CI's CPU pin
    ({"nvidia_smi": "exit 9"}, {}, "torch==2.13.0"),  # nvidia-smi without a working GPU
    ({"nvidia_smi": "echo 'GPU 0: NVIDIA H200'"}, {}, "torch"),  # a GPU: PyPI's default (CUDA) build
    ({"nvidia_smi": "echo 'GPU 0: NVIDIA H200'"}, {"TORCH_SPEC": "torch==2.13.0 --index-url https://x/cpu"},
     "torch==2.13.0 --index-url https://x/cpu"),
    ({}, {"TORCH_SPEC": "skip"}, "skip"),
])
def test_torch_choice(tmp_path, tools, env, expected):
    path = fake_bin(tmp_path / "bin", **tools)
    done = subprocess.run([shutil.which("bash"), str(SCRIPT), "torch-spec"], capture_output=True, text=True,
                          env={"PATH": str(path), **env})
    assert (done.returncode, done.stdout, done.stderr) == (0, expected + "\n", "")


def fake_clone(root: Path) -> Path:
    """The script and pyproject.toml in a folder of their own, with a .venv/ whose pip, lora and pytest only
    record their arguments (its python runs the real one for everything else)."""
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "scripts" / "bootstrap.sh")
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    log = root / "calls.log"
    python = (f'if [ "$1 $2" = "-m pip" ] || [ "$1 $2" = "-m pytest" ]; then echo "$*" >> {log}; exit 0; fi\n'
              f'exec {shutil.which("python3")} "$@"')
    fake_bin(root / ".venv" / "bin", python=python, lora=f'echo "lora $*" >> {log}')
    return root


def calls(root: Path) -> list[str]:
    log = root / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


def test_a_second_run_installs_nothing(tmp_path):
    root = fake_clone(tmp_path / "clone")
    env = {"PATH": f"{root / '.venv' / 'bin'}:{os.environ['PATH']}", "PYTHON": shutil.which("python3"),
           "TORCH_SPEC": "torch==2.13.0"}

    def bootstrap(*args, **extra):
        done = subprocess.run(["bash", str(root / "scripts" / "bootstrap.sh"), *args], capture_output=True,
                              text=True, env={**env, **extra})
        assert done.returncode == 0, done.stderr
        return calls(root)

    install_test = ["-m pip install -q torch==2.13.0", "-m pip install -q -e .[test]"]
    assert bootstrap("test", "-q", "tests") == [*install_test, "-m pytest -q tests"]
    assert bootstrap("test", "-q", "tests") == ["-m pytest -q tests"]
    assert bootstrap("run", "train", "c.yaml") == ["lora train c.yaml"]  # the test extras hold the plain install
    # another torch choice, or an edited pyproject.toml: installed again, once
    assert bootstrap("run", "info", TORCH_SPEC="skip") == ["-m pip install -q -e .", "lora info"]
    assert bootstrap("run", "info", TORCH_SPEC="skip") == ["lora info"]
    with open(root / "pyproject.toml", "a") as fh:
        fh.write("\n# edited\n")
    assert bootstrap("test", "-x") == [*install_test, "-m pytest -x"]
    assert bootstrap("test", "-x") == ["-m pytest -x"]
