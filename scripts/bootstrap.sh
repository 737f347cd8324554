#!/usr/bin/env bash
# Set up this clone's virtual environment .venv/ and run a command in it; `make run` and `make test` call this.
#
#   scripts/bootstrap.sh run ARGS...     the project installed (pip install -e .), then `lora ARGS...`
#   scripts/bootstrap.sh test ARGS...    with the test extras (pip install -e ".[test]"), then `pytest ARGS...`
#   scripts/bootstrap.sh torch-spec      print the torch choice (below) and exit
#
# Needs only python3 >= 3.10 (PYTHON=python3.12 picks another) with its venv module. Installs happen once: a stamp
# file in .venv/ records a hash of pyproject.toml and the torch choice, and while both are unchanged nothing is
# installed again (the install is editable, so edits to lora_cli/ need none). Delete .venv/ to start afresh.
#
# torch: TORCH_SPEC, the pip arguments that install it, else
#   - where `nvidia-smi -L` answers (an NVIDIA GPU): `torch`, PyPI's default build (CUDA);
#   - elsewhere: `torch==2.13.0`, the version CI pins (its CPU build where pip finds one, as on CI's machines).
# Examples: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" (a CPU-only build from
# PyTorch's index), TORCH_SPEC=skip (install none: keep the torch already in .venv/, e.g. a ROCm build).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PYTHON=${PYTHON:-python3}

torch_spec() {
    if [ -n "${TORCH_SPEC:-}" ]; then
        echo "$TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "torch"
    else
        echo "torch==2.13.0"
    fi
}

say() { echo "bootstrap: $*" >&2; }

# The stamp of an install: pyproject.toml (dependencies, extras) and the torch choice, hashed.
stamp_key() {  # extras
    { cat pyproject.toml; echo "extras: $1"; echo "torch: $(torch_spec)"; } |
        "$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
}

make_venv() {
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        say "$PYTHON not found; install Python 3.10 or newer, or name one with PYTHON=..."
        exit 1
    fi
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        say "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); lora-cli needs 3.10 or newer: name one with PYTHON=python3.12"
        exit 1
    fi
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c '' 2>/dev/null; then
        return
    fi
    say "creating $VENV/ with $PYTHON ($("$PYTHON" -c 'import platform; print(platform.python_version())'))"
    # --clear: a .venv/ whose interpreter no longer runs (Python upgraded or removed) is rebuilt
    if ! "$PYTHON" -m venv --clear "$VENV"; then
        say "could not create $VENV/; on Debian or Ubuntu install the venv module: apt install python3-venv"
        exit 1
    fi
}

install() {  # extras: "" or "test"
    local extras=$1 stamp="$VENV/.installed${1:+-$1}" key spec
    key=$(stamp_key "$extras")
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
        return
    fi
    spec=$(torch_spec)
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    if [ "$spec" != skip ]; then
        say "installing torch into $VENV/: pip install $spec"
        # first and on its own: as a dependency of the project pip could pick a multi-GB CUDA build on any machine
        # shellcheck disable=SC2086  # TORCH_SPEC is pip arguments, split on purpose
        "$VENV/bin/python" -m pip install -q $spec
    fi
    say "installing lora-cli into $VENV/: pip install -e .${extras:+[$extras]}"
    "$VENV/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
    echo "$key" > "$stamp"
    if [ -n "$extras" ]; then  # the test extras hold the plain install too
        stamp_key "" > "$VENV/.installed"
    fi
}

case "${1:-}" in
    run)
        shift
        make_venv
        install ""
        exec "$VENV/bin/lora" "$@"
        ;;
    test)
        shift
        make_venv
        install test
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    torch-spec)
        torch_spec
        ;;
    *)
        echo "usage: scripts/bootstrap.sh run LORA_ARGS... | test PYTEST_ARGS... | torch-spec" >&2
        exit 2
        ;;
esac
