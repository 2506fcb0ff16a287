"""Batch stochastic mirror descent (BSMD) for MPO's mixing weights (the paper's Algorithm 2).

Given sequence log-ratios l_k(x, y) = log pi_k(y|x) - log pi_ref(y|x) for m responses
y ~ pi_ref per prompt, the weights solve the convex problem

    min_{lambda in simplex}  F(lambda) = E_x log (1/m) sum_j exp(lambda · l(x, y_j)).

dF/dlambda_k is objective k's importance-weighted mean log-ratio under the current mixture,
i.e. how well the mixture already serves objective k; exponentiated-gradient steps therefore
move weight toward the worst-served objectives. This module needs only torch: call
:func:`solve_bsmd` on any cached (prompts, samples, K) tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


class SimplexMirrorDescent(torch.optim.Optimizer):
    """Entropic mirror descent (exponentiated gradient) keeping each parameter on the simplex.

    ``w <- w * exp(-lr * grad) / Z``, computed in log space so that extreme gradients (±1e4)
    underflow to tiny weights instead of NaN. Parameters must start on the simplex.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "log_w" not in state:
                    state["log_w"] = p.detach().clamp_min(0).log()
                log_w = state["log_w"] - group["lr"] * torch.nan_to_num(p.grad, nan=0.0)
                log_w = log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)
                state["log_w"] = log_w
                p.copy_(log_w.exp())
        return loss


def mpo_objective(weights: torch.Tensor, log_ratios: torch.Tensor) -> torch.Tensor:
    """F(lambda) = mean_x [ logsumexp_j(lambda · l(x, y_j)) - log m ] for log_ratios (N, m, K)."""
    m = log_ratios.shape[1]
    return (torch.logsumexp(log_ratios @ weights, dim=1) - math.log(m)).mean()


@dataclass
class BSMDResult:
    weights: torch.Tensor  # (K,) the averaged iterate, the solver's output
    last: torch.Tensor  # (K,) the final iterate
    trajectory: torch.Tensor  # (T+1, K) iterates lambda^0 .. lambda^T
    objective: torch.Tensor  # (T+1,) full-data F(lambda^t) (NaN where not evaluated)
    lr: float

    @property
    def final_objective(self) -> float:
        return float(self.objective[~self.objective.isnan()][-1])


def _check_log_ratios(log_ratios: torch.Tensor) -> torch.Tensor:
    if not isinstance(log_ratios, torch.Tensor) or log_ratios.dim() != 3:
        shape = getattr(log_ratios, "shape", None)
        raise ValueError(f"log_ratios must be a tensor shaped (prompts, samples, K), got shape {shape}")
    if 0 in log_ratios.shape:
        raise ValueError(f"log_ratios has an empty dimension: shape {tuple(log_ratios.shape)}")
    if not torch.isfinite(log_ratios).all():
        raise ValueError("log_ratios contains NaN or inf")
    return log_ratios.to(torch.float64)


def solve_bsmd(
    log_ratios: torch.Tensor,
    steps: int = 2000,
    lr_scale: float = 1.0,
    batch_prompts: int = 8,
    init: torch.Tensor | None = None,
    seed: int = 0,
    objective_every: int = 1,
    progress: bool = False,
) -> BSMDResult:
    """Run T=``steps`` BSMD steps with eta = lr_scale / sqrt(T) and return the averaged iterate.

    Each step draws ``batch_prompts`` prompts (with their m cached responses), forms the
    mini-batch log-mean-exp objective, takes its gradient with autograd and makes one
    :class:`SimplexMirrorDescent` step. ``objective_every`` controls how often the full-data
    F is recorded (it is cheap for cached scores; set 0 to skip).
    """
    ell = _check_log_ratios(log_ratios)
    n, _, k = ell.shape
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_prompts < 1:
        raise ValueError(f"batch_prompts must be >= 1, got {batch_prompts}")
    lam = torch.full((k,), 1.0 / k, dtype=torch.float64) if init is None else init.to(torch.float64).clone()
    if lam.shape != (k,) or (lam < 0).any() or abs(float(lam.sum()) - 1) > 1e-6:
        raise ValueError(f"init must be a point on the {k}-simplex, got {init}")
    lam.requires_grad_(True)
    lr = lr_scale / math.sqrt(steps)
    opt = SimplexMirrorDescent([lam], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    b = min(batch_prompts, n)

    trajectory = torch.empty(steps + 1, k, dtype=torch.float64)
    objective = torch.full((steps + 1,), float("nan"), dtype=torch.float64)
    running_sum = torch.zeros(k, dtype=torch.float64)

    def record(t: int) -> None:
        trajectory[t] = lam.detach()
        if objective_every and (t % objective_every == 0 or t == steps):
            with torch.no_grad():
                objective[t] = mpo_objective(lam.detach(), ell)

    record(0)
    for t in tqdm(range(steps), desc="BSMD", disable=None if progress else True, leave=False):
        running_sum += lam.detach()  # average of lambda^0 .. lambda^{T-1}
        idx = torch.randperm(n, generator=gen)[:b]
        opt.zero_grad(set_to_none=True)
        mpo_objective(lam, ell[idx]).backward()
        opt.step()
        record(t + 1)
    lam_bar = running_sum / steps
    return BSMDResult(
        weights=(lam_bar / lam_bar.sum()).float(),
        last=lam.detach().float(),
        trajectory=trajectory.float(),
        objective=objective,
        lr=lr,
    )
