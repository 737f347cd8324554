"""lora_cli.optim against torch.optim: bit-identical updates and interchangeable state_dicts."""

import subprocess
import sys

import pytest
import torch

from lora_cli.optim import SGD, AdamW


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def _run(optimizer, params, steps: int, seed: int = 1, start: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(start + steps):
        grads = [torch.randn(p.shape, generator=g) for p in params]  # drawn every step, so a resume sees the same
        if i < start:
            continue
        for p, grad in zip(params, grads):
            p.grad = grad
        optimizer.param_groups[0]["lr"] = 1e-2 / (1 + i)  # what the LR schedule does between steps
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


CASES = [
    (AdamW, lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=False),
     dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (AdamW, lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0, foreach=False), dict(lr=1e-2, weight_decay=0.0)),
    (SGD, lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01, foreach=False),
     dict(lr=1e-2, momentum=0.9, weight_decay=0.01)),
    (SGD, lambda ps: torch.optim.SGD(ps, lr=1e-2, foreach=False), dict(lr=1e-2)),
]


@pytest.mark.parametrize("ours, theirs, hyper", CASES)
def test_bit_identical_to_torch_optim(ours, theirs, hyper):
    a, b = _params(), _params()
    _run(ours(a, **hyper), a, steps=7)
    _run(theirs(b), b, steps=7)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("ours, theirs, hyper", CASES)
def test_state_dict_loads_both_ways(ours, theirs, hyper):
    """A checkpoint written by either optimizer resumes in the other, bit for bit."""
    reference = _params()
    _run(ours(reference, **hyper), reference, steps=6)
    for first, second in ((ours, theirs), (theirs, ours)):
        ps = _params()
        opt1 = first(ps, **hyper) if first is ours else first(ps)
        _run(opt1, ps, steps=3)
        state = opt1.state_dict()
        opt2 = second(ps, **hyper) if second is ours else second(ps)
        opt2.load_state_dict(state)
        _run(opt2, ps, steps=3, start=3)
        for x, y in zip(ps, reference):
            assert torch.equal(x, y)


def test_zero_grad_keeps_or_drops_gradients():
    ps = _params()
    opt = AdamW(ps, lr=1e-3)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in ps)
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


def test_load_state_dict_refuses_other_parameters():
    opt = AdamW(_params(), lr=1e-3)
    other = AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(ValueError, match="different set of parameters"):
        opt.load_state_dict(other.state_dict())


def test_building_the_optimizer_does_not_import_dynamo():
    """The point of lora_cli.optim: a training step never pays for torch._dynamo / sympy (+72 MB resident)."""
    code = ("import sys, torch; from lora_cli.optim import AdamW; p = torch.nn.Parameter(torch.zeros(3)); "
            "o = AdamW([p], lr=0.1); p.grad = torch.ones(3); o.step(); o.load_state_dict(o.state_dict()); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
