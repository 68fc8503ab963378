"""Yogi (Zaheer et al. 2018), the server optimizer of FedYogi (Reddi et al., "Adaptive Federated
Optimization", 2021). torch.optim has Adam and Adagrad (FedAdam, FedAdagrad) but no Yogi."""

from __future__ import annotations

import torch


class Yogi(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-2, betas=(0.9, 0.99), eps: float = 1e-3, initial_accumulator: float = 1e-6):
        if lr <= 0 or eps <= 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid Yogi hyper-parameters lr={lr}, betas={betas}, eps={eps}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, initial_accumulator=initial_accumulator))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, group["initial_accumulator"])
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                g2 = g * g
                # v <- v - (1 - beta2) * sign(v - g^2) * g^2: additive, so v grows slowly (unlike Adam)
                v.addcmul_(torch.sign(v - g2), g2, value=-(1 - beta2))
                p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-group["lr"])
        return loss
