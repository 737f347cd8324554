"""Start-up (issue 20): the commands that only run a trained adapter (eval, merge, export, generate) never import
torch._dynamo or sympy, which cost `lora info` 1.8 s of its 5.3 s; only training builds a torch.optim optimizer,
which imports them. test_optim checks `info --random`, `generate --help` and generate on a bare base. One fresh
interpreter runs all four commands (the zygote has the modules loaded already)."""

import json

from helpers import child_env, make_hf_gpt2, python, train_run

RUN_ALL = """
import json, runpy, sys
for argv in json.loads(sys.argv[1]):
    sys.argv = ["lora", *argv]
    try:
        runpy.run_module("lora_cli", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code:
            raise
print("imported:", [m for m in ("torch._dynamo", "sympy") if m in sys.modules], file=sys.stderr)
"""


def test_adapter_commands_never_import_dynamo(tmp_path):
    make_hf_gpt2(tmp_path / "base")
    run = train_run(tmp_path, tmp_path / "base", steps=1).parent / "out"
    commands = [["eval", "--adapter", run, "--data", tmp_path / "train.json", "--no-base", "--json"],
                ["merge", "--adapter", run, "--out", tmp_path / "merged"],
                ["export", run, tmp_path / "peft"],
                ["generate", "--adapter", run, "--max-new-tokens", "2", "hello"]]
    done = python("-c", RUN_ALL, json.dumps([[str(a) for a in c] for c in commands]), env=child_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "imported: []"
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "peft" / "adapter_config.json").is_file()
    assert json.loads(done.stdout.splitlines()[0])["examples"] > 0  # eval's --json line came first


def test_lora_cli_asks_torch_for_huge_pages_unless_the_environment_says():
    """Importing lora_cli sets THP_MEM_ALLOC_ENABLE=1 (torch's allocator reads it at its first allocation, so it must
    come before torch), and leaves a value the caller set alone."""
    code = "import os, lora_cli, torch; torch.ones(1); print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in child_env().items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert python("-c", code, env=env).stdout.strip() == "1"
    assert python("-c", code, env={**env, "THP_MEM_ALLOC_ENABLE": "0"}).stdout.strip() == "0"
