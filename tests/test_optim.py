"""The optimizer: torch.optim's AdamW / SGD as build_optimizer sets them up, resuming the optimizer state that
lora-cli's own optimizer (lora_cli/optim.py, removed) wrote into checkpoints, and its import cost kept off the
commands that do not train."""

from pathlib import Path

import pytest
import torch

from helpers import child_env, python
from lora_cli.config import ModelSpec, RunConfig, TrainConfig
from lora_cli.train import build_optimizer

# Written once by lora_cli/optim.py at main 242d2b8: for AdamW and SGD, two parameters (seed 0), six gradients
# (seed 1), the optimizer's state_dict after 3 steps (as checkpoint/state.pt holds it) and the parameters after 3
# and 6 steps; the LR schedule sets lr = 1e-2 / (1 + step) before every step.
OLD_STATE = Path(__file__).parent / "data" / "optimizer_state_v0.pt"


def config(**train) -> RunConfig:
    return RunConfig(model=ModelSpec(name="gpt2"), train=TrainConfig(**train))


def fixture_config(name: str, hyper: dict) -> RunConfig:
    if name == "sgd":
        return config(optimizer="sgd", lr=hyper["lr"], momentum=hyper["momentum"], weight_decay=hyper["weight_decay"])
    return config(lr=hyper["lr"], betas=list(hyper["betas"]), eps=hyper["eps"], weight_decay=hyper["weight_decay"])


def steps(optimizer, params, grads, start: int, stop: int) -> None:
    for i in range(start, stop):
        for p, grad in zip(params, grads[i]):
            p.grad = grad.to(p.device)
        optimizer.param_groups[0]["lr"] = 1e-2 / (1 + i)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_resumes_the_state_the_old_optimizer_wrote(name):
    """checkpoint/state.pt files written before lora-cli used torch.optim resume, bit for bit on the CPU."""
    old = torch.load(OLD_STATE, weights_only=True)
    case = old[name]
    params = [torch.nn.Parameter(p.clone()) for p in case["params_at_3"]]
    optimizer = build_optimizer(params, fixture_config(name, case["hyper"]))
    optimizer.load_state_dict(case["optimizer"])
    steps(optimizer, params, old["grads"], 3, 6)
    for p, expected in zip(params, case["params_at_6"]):
        assert torch.equal(p.detach(), expected)
    assert optimizer.param_groups[0]["foreach"] is None  # the old optimizer's foreach=False is not taken over


def test_adamw_one_group_with_the_configured_hyperparameters():
    params = [torch.nn.Parameter(torch.zeros(4, 2)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = build_optimizer(params, config(lr=2e-4, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.01))
    assert type(optimizer) is torch.optim.AdamW
    [group] = optimizer.param_groups
    assert group["params"] == params
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (2e-4, (0.8, 0.95), 1e-6, 0.01)
    assert group["fused"] is None  # the CPU: torch's single-tensor loop


def test_sgd_one_group_with_momentum_and_weight_decay():
    params = [torch.nn.Parameter(torch.zeros(4))]
    optimizer = build_optimizer(params, config(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.05))
    assert type(optimizer) is torch.optim.SGD
    [group] = optimizer.param_groups
    assert group["params"] == params
    assert (group["lr"], group["momentum"], group["weight_decay"], group["fused"]) == (0.1, 0.9, 0.05, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_on_cuda_and_old_cpu_state_resumes_there(name):
    old = torch.load(OLD_STATE, weights_only=True)
    case = old[name]
    params = [torch.nn.Parameter(p.clone().cuda()) for p in case["params_at_3"]]
    optimizer = build_optimizer(params, fixture_config(name, case["hyper"]))
    assert optimizer.param_groups[0]["fused"] is True
    optimizer.load_state_dict(case["optimizer"])
    assert optimizer.param_groups[0]["fused"] is True  # the checkpoint's fused=None does not switch it off
    assert all(t.device.type == "cuda" for s in optimizer.state.values() for t in s.values())
    steps(optimizer, params, old["grads"], 3, 6)
    for p, expected in zip(params, case["params_at_6"]):
        torch.testing.assert_close(p.detach().cpu(), expected, rtol=1e-5, atol=1e-6)


# `python -m lora_cli ARGV` that reports, at exit, which of the heavy modules it imported.
REPORT_IMPORTS = """
import atexit, runpy, sys
heavy = ("torch._dynamo", "sympy")
atexit.register(lambda: print("imported:", [m for m in heavy if m in sys.modules], file=sys.stderr))
sys.argv = ["lora", *sys.argv[1:]]
runpy.run_module("lora_cli", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("argv", [["info", "gpt2", "--random"], ["generate", "--help"],
                                  ["generate", "--model", "MODEL", "hello", "--max-new-tokens", "2"]])
def test_commands_that_do_not_train_never_import_dynamo(argv, tmp_path):
    """torch.optim's optimizers import torch._dynamo and sympy when built (~0.8 s, 72 MB), and so do meta tensors'
    initialisation and to_empty: only training pays. A fresh interpreter, since the zygote has them loaded."""
    if "MODEL" in argv:
        from lora_cli.pretrained import load_model, save_pretrained

        save_pretrained(load_model({"name": "gpt2", "init": "random", "n_layer": 1, "n_head": 1, "n_embd": 8}).model,
                        tmp_path / "model")
        argv = [str(tmp_path / "model") if a == "MODEL" else a for a in argv]
    done = python("-c", REPORT_IMPORTS, *argv, env=child_env())
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "imported: []"
