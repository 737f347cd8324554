"""AdamW and SGD for the trained parameters: the update rules of torch.optim.AdamW and torch.optim.SGD
(single-tensor, foreach=False), written out, with the same state_dict layout.

Why not torch.optim: constructing any torch.optim.Optimizer imports torch._dynamo, torch._inductor and sympy
(about 830 modules, +72 MB resident on this CPU), which a LoRA run never uses. The updates below do the same
tensor operations in the same order as torch's single-tensor implementations, so the results are bit-identical
(tests/test_optim.py), and checkpoints written with either load in the other.
"""

from __future__ import annotations

import torch


class Optimizer:
    """The part of torch.optim.Optimizer's interface the trainer uses: param_groups (a list of dicts holding
    "params" and the hyperparameters; the LR schedule writes group["lr"]), state, step, zero_grad,
    state_dict and load_state_dict."""

    defaults: dict = {}

    def __init__(self, params, **hyper):
        self.param_groups = [{"params": list(params), **self.defaults, **hyper}]
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        """{"state": {index: {...}}, "param_groups": [{..., "params": [index, ...]}]}, as torch.optim writes it."""
        index, groups = {}, []
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        params = [p for g in self.param_groups for p in g["params"]]
        state = {index[id(p)]: dict(self.state[p]) for p in params if p in self.state}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(own["params"]) for g, own in zip(groups, self.param_groups)):
            raise ValueError("the optimizer state was saved for a different set of parameters")
        self.state = {}
        for saved, group in zip(groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
            for i, p in zip(saved["params"], group["params"]):
                if i in state_dict["state"]:
                    self.state[p] = {k: self._to_param(k, v, p) for k, v in state_dict["state"][i].items()}

    @staticmethod
    def _to_param(key: str, value, p: torch.Tensor):
        """State tensors move to the parameter's device and dtype; AdamW's step counter stays an fp32 scalar."""
        if not isinstance(value, torch.Tensor):
            return value
        if key == "step":
            return value.to(dtype=torch.float32)
        return value.to(device=p.device, dtype=p.dtype)


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization",
    algorithm 2; Kingma & Ba 2015 for Adam), as torch.optim.AdamW computes it."""

    defaults = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False,
                    foreach=False, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=True)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state.get(p)
                if state is None:
                    state = self.state[p] = {
                        "step": torch.tensor(0.0, dtype=torch.float32),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                if wd != 0:
                    p.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = state["step"].item()
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (Sutskever et al. 2013) and L2 weight decay, as
    torch.optim.SGD computes it (dampening 0, no Nesterov)."""

    defaults = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                    foreach=False, differentiable=False, fused=None)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if wd != 0:
                    grad = grad.add(p, alpha=wd)
                if momentum != 0:
                    state = self.state.setdefault(p, {"momentum_buffer": None})
                    buf = state["momentum_buffer"]
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(grad).detach()
                    else:
                        buf.mul_(momentum).add_(grad)
                    grad = buf
                p.add_(grad, alpha=-lr)
