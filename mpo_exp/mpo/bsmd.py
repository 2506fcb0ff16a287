"""Batch stochastic mirror descent (BSMD) for MPO's mixing weights (the paper's Algorithm 2).

Given sequence log-ratios l_k(x, y) = log pi_k(y|x) - log pi_ref(y|x) for m responses
y ~ pi_ref per prompt, the weights solve the convex problem

    min_{lambda in simplex}  F(lambda) = E_x log (1/m) sum_j exp(lambda · l(x, y_j)).

dF/dlambda_k is objective k's importance-weighted mean log-ratio under the current mixture,
i.e. how well the mixture already serves objective k; exponentiated-gradient steps therefore
move weight toward the worst-served objectives. This module needs only torch: call
:func:`solve_bsmd` on any cached (prompts, samples, K) tensor.

Defaults (see :func:`solve_bsmd`): sequence log-ratios are often in the hundreds, which makes
F̂ almost a max of linear functions with gradients of that size, so the paper's fixed step
eta = c/sqrt(T) (scale-blind) oscillates far from the minimiser. The default step is
AdaGrad-norm, eta_t = c·sqrt(log K)/sqrt(sum_{s<=t} ||g_s - mean(g_s)||_inf^2), which is
invariant to the scale of the log-ratios; each step uses every cached prompt (the cache is
small: a step on 64x16x3 scores costs ~0.1 ms); the output averages the last half of the
iterates. ``step_size="fixed", batch_prompts=8, average_from=0`` is the paper's literal rule.
The result carries a Frank-Wolfe gap, a certificate F̂(lambda) - min F̂ <= fw_gap on the cached
scores, and optionally a bootstrap over prompts of lambda (vectorised over replicates).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

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


def _value_and_grad(lam: torch.Tensor, ell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F̂ and its gradient for replicates: lam (B, K), ell (B, N, m, K) -> (B,), (B, K).

    The gradient is the self-normalised importance-weighted mean of l (weights softmax_j of
    lambda · l_j), averaged over prompts; equal to autograd's, without the graph.
    """
    z = torch.einsum("bnjk,bk->bnj", ell, lam)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    w = (z - lse).exp()
    grad = torch.einsum("bnj,bnjk->bk", w, ell) / ell.shape[1]
    return lse.squeeze(-1).mean(-1) - math.log(ell.shape[2]), grad


def frank_wolfe_gap(weights: torch.Tensor, log_ratios: torch.Tensor) -> float:
    """g(lambda) = max_k <grad F̂(lambda), lambda - e_k> on all cached scores (N, m, K).

    F̂ is convex on the simplex, so g(lambda) >= F̂(lambda) - min F̂: a certificate of how far the
    returned weights are from the minimiser's objective value on these scores (0 at the minimiser).
    """
    ell = _check_log_ratios(log_ratios)
    lam = weights.detach().to(torch.float64).reshape(1, -1)
    _, grad = _value_and_grad(lam, ell.unsqueeze(0))
    return _fw_gap(lam[0], grad[0])


def _fw_gap(lam: torch.Tensor, grad: torch.Tensor) -> float:
    """max_k <grad, lam - e_k> = lam·grad - min_k grad_k (>= 0 up to rounding)."""
    return max(float(lam @ grad - grad.min()), 0.0)


@dataclass
class BSMDResult:
    weights: torch.Tensor  # (K,) the averaged iterate, the solver's output
    last: torch.Tensor  # (K,) the final iterate
    trajectory: torch.Tensor  # (T+1, K) iterates lambda^0 .. lambda^T
    objective: torch.Tensor  # (T+1,) full-data F(lambda^t) (NaN where not evaluated)
    lr: float  # the step size: eta (fixed) or the last eta_t (adaptive)
    fw_gap: float = float("nan")  # Frank-Wolfe gap at ``weights`` on all scores: >= F̂(weights) - min F̂
    objective_at_weights: float = float("nan")  # F̂(weights) on all scores
    objective_at_init: float = float("nan")  # F̂(lambda^0) on all scores
    objective_at_vertices: torch.Tensor | None = None  # (K,) F̂(e_k); max over them = max of F̂ on the simplex
    step_size: str = "adaptive"
    batch_prompts: int = 0  # prompts per step actually used
    average_from: int = 0  # the output averages lambda^average_from .. lambda^{T-1}
    bootstrap_weights: torch.Tensor | None = None  # (B, K) solutions on prompt-resampled caches
    lr_scale: float = 1.0  # c in the step-size rule

    @property
    def final_objective(self) -> float:
        return float(self.objective[~self.objective.isnan()][-1])

    @property
    def weights_std(self) -> torch.Tensor | None:
        """lambda's bootstrap standard deviation per objective (None without a bootstrap)."""
        if self.bootstrap_weights is None:
            return None
        return self.bootstrap_weights.double().std(dim=0).float()

    def gap_tolerance(self, relative: float, absolute: float = 0.0) -> float:
        """The tolerance for :attr:`fw_gap`: max(absolute, relative · (F̂(lambda^0) - F̂(weights) + fw_gap)).

        F̂(lambda^0) - F̂(weights) + fw_gap >= F̂(lambda^0) - min F̂, so fw_gap below the relative part
        certifies (F̂(weights) - min F̂) / (F̂(lambda^0) - min F̂) <= relative: at most that fraction of
        the starting point's (uniform's) excess objective is left. The absolute floor (in nats of F̂)
        covers the case where lambda^0 is already (nearly) optimal.
        """
        excess = self.objective_at_init - self.objective_at_weights + self.fw_gap
        return max(absolute, relative * max(excess, 0.0))


def _check_log_ratios(log_ratios: torch.Tensor) -> torch.Tensor:
    if not isinstance(log_ratios, torch.Tensor) or log_ratios.dim() != 3:
        shape = getattr(log_ratios, "shape", None)
        raise ValueError(f"log_ratios must be a tensor shaped (prompts, samples, K), got shape {shape}")
    if 0 in log_ratios.shape:
        raise ValueError(f"log_ratios has an empty dimension: shape {tuple(log_ratios.shape)}")
    if not torch.isfinite(log_ratios).all():
        raise ValueError("log_ratios contains NaN or inf")
    return log_ratios.to(torch.float64)


def _run_eg(
    ell: torch.Tensor,
    init: torch.Tensor,
    steps: int,
    lr_scale: float,
    batch: int,
    step_size: str,
    start_avg: int,
    gen: torch.Generator,
    objective_every: int = 0,
    progress: bool = False,
) -> dict:
    """Algorithm 2 on B replicates at once: ell (B, N, m, K) -> averaged/last iterates (B, K).

    Replicate 0's iterates (and full-data F at every ``objective_every``-th) are recorded.
    """
    n_rep, n, _, k = ell.shape
    log_lam = init.clamp_min(0).log().expand(n_rep, k).clone()
    full = batch >= n
    acc = torch.zeros(n_rep, dtype=torch.float64)  # AdaGrad: sum_s ||g_s - mean g_s||_inf^2
    eta = torch.full((n_rep,), lr_scale / math.sqrt(steps), dtype=torch.float64)
    c = lr_scale * math.sqrt(math.log(k))
    running_sum = torch.zeros(n_rep, k, dtype=torch.float64)
    trajectory = torch.empty(steps + 1, k, dtype=torch.float64)
    objective = torch.full((steps + 1,), float("nan"), dtype=torch.float64)

    def wants_objective(t: int) -> bool:
        return bool(objective_every) and (t % objective_every == 0 or t == steps)

    for t in tqdm(range(steps), desc="BSMD", disable=None if progress else True, leave=False):
        lam = log_lam.exp()
        trajectory[t] = lam[0]
        if t >= start_avg:
            running_sum += lam
        e = ell if full else ell[:, torch.randperm(n, generator=gen)[:batch]]
        value, grad = _value_and_grad(lam, e)
        if wants_objective(t):
            objective[t] = value[0] if full else _value_and_grad(lam[:1], ell[:1])[0][0]
        # EG ignores a constant shift of g: centre it (numerically kinder, and the AdaGrad scale)
        grad = torch.nan_to_num(grad, nan=0.0)
        grad = grad - grad.mean(-1, keepdim=True)
        if step_size == "adaptive":
            acc += grad.abs().amax(-1).square()
            eta = c / acc.sqrt().clamp_min(1e-300)  # acc = 0 only if g is flat: then no move anyway
        log_lam = log_lam - eta.unsqueeze(-1) * grad
        log_lam = log_lam - torch.logsumexp(log_lam, dim=-1, keepdim=True)
    lam = log_lam.exp()
    trajectory[steps] = lam[0]
    if wants_objective(steps):
        objective[steps] = _value_and_grad(lam[:1], ell[:1])[0][0]
    avg = running_sum / running_sum.sum(-1, keepdim=True)
    return {"weights": avg, "last": lam, "trajectory": trajectory, "objective": objective, "eta": eta}


def _bootstrap(
    ell: torch.Tensor,
    replicates: int,
    lam0: torch.Tensor,
    steps: int,
    lr_scale: float,
    b: int,
    step_size: str,
    start_avg: int,
    seed: int,
) -> torch.Tensor:
    """Re-solve on ``replicates`` caches whose prompts are resampled with replacement: (B, K)."""
    n, m, k = ell.shape
    boot_gen = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(n, (replicates, n), generator=boot_gen)
    chunk = max(1, (1 << 22) // (n * m * k))  # a chunk's resampled cache stays ~<= 32 MB
    parts = [
        _run_eg(ell[idx[i : i + chunk]], lam0, steps, lr_scale, b, step_size, start_avg, boot_gen)["weights"]
        for i in range(0, replicates, chunk)
    ]
    return torch.cat(parts).float()


def bootstrap_bsmd(
    result: BSMDResult, log_ratios: torch.Tensor, replicates: int, seed: int = 0
) -> BSMDResult:
    """``result`` with its bootstrap over prompts added (the same settings as the solve that made it).

    Separate from :func:`solve_bsmd` so that a pipeline can meter it as a diagnostic: λ's
    statistical error is reported, but no method needs it.
    """
    if replicates < 2:
        raise ValueError(f"bootstrap must be >= 2 replicates, got {replicates}")
    ell = _check_log_ratios(log_ratios)
    k = ell.shape[-1]
    lam0 = result.trajectory[0].double()
    lam0 = lam0 / lam0.sum()
    steps = result.trajectory.shape[0] - 1
    lr_scale = result.lr_scale
    boot = _bootstrap(
        ell,
        replicates,
        lam0,
        steps,
        lr_scale,
        result.batch_prompts,
        result.step_size,
        result.average_from,
        seed,
    )
    assert boot.shape[-1] == k
    return dataclasses.replace(result, bootstrap_weights=boot)


def solve_bsmd(
    log_ratios: torch.Tensor,
    steps: int = 2000,
    lr_scale: float = 1.0,
    batch_prompts: int | None = None,
    init: torch.Tensor | None = None,
    seed: int = 0,
    objective_every: int = 1,
    progress: bool = False,
    step_size: Literal["adaptive", "fixed"] = "adaptive",
    average_from: float = 0.5,
    bootstrap: int = 0,
) -> BSMDResult:
    """Run T=``steps`` exponentiated-gradient (BSMD) steps and return the averaged iterate.

    Each step takes ``batch_prompts`` prompts (with their m cached responses; ``None``, the
    default, takes every cached prompt, so the step is the exact gradient of F̂ on the cache),
    forms the mini-batch log-mean-exp objective F̂_t and updates
    lambda_k <- lambda_k·exp(-eta_t·dF̂_t/dlambda_k) / Z.

    ``step_size``:
      * ``"adaptive"`` (default): AdaGrad-norm, eta_t = c·sqrt(log K) / sqrt(sum_{s<=t} ||g_s -
        mean(g_s)||_inf^2) with c = ``lr_scale``. Invariant to the scale of the log-ratios
        (EG ignores a constant shift of g, hence the centring), so sharp problems with
        |l| ~ 200 converge as well as mild ones.
      * ``"fixed"``: the paper's eta = c / sqrt(T), c = ``lr_scale``.

    The output averages lambda^s for s >= ``average_from``·T (0 = all iterates, the paper's
    rule; the default 0.5 averages the last half, which drops the transient). The result's
    ``fw_gap`` is the Frank-Wolfe gap of the output on all cached scores (an upper bound on
    F̂(weights) - min F̂). ``bootstrap`` = B > 0 also re-solves, with the same settings, on B
    caches whose prompts are resampled with replacement (all B at once, vectorised), giving
    ``result.bootstrap_weights`` and ``result.weights_std``. ``objective_every`` controls how
    often the full-data F is recorded (set 0 to skip).
    """
    ell = _check_log_ratios(log_ratios)
    n, m, k = ell.shape
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_prompts is not None and batch_prompts < 1:
        raise ValueError(f"batch_prompts must be >= 1 (or None for all prompts), got {batch_prompts}")
    if not lr_scale > 0:
        raise ValueError(f"lr_scale must be > 0, got {lr_scale}")
    if step_size not in ("adaptive", "fixed"):
        raise ValueError(f"step_size must be 'adaptive' or 'fixed', got {step_size!r}")
    if not 0 <= average_from < 1:
        raise ValueError(f"average_from must be in [0, 1), got {average_from}")
    if bootstrap < 0 or bootstrap == 1:
        raise ValueError(f"bootstrap must be 0 (off) or >= 2 replicates, got {bootstrap}")
    lam0 = torch.full((k,), 1.0 / k, dtype=torch.float64) if init is None else init.to(torch.float64).clone()
    if lam0.shape != (k,) or (lam0 < 0).any() or abs(float(lam0.sum()) - 1) > 1e-6:
        raise ValueError(f"init must be a point on the {k}-simplex, got {init}")
    lam0 = lam0 / lam0.sum()
    b = n if batch_prompts is None else min(batch_prompts, n)
    start_avg = min(int(average_from * steps), steps - 1)
    gen = torch.Generator().manual_seed(seed)
    out = _run_eg(
        ell.unsqueeze(0), lam0, steps, lr_scale, b, step_size, start_avg, gen, objective_every, progress
    )
    weights = out["weights"][0].float().double()  # certify exactly the float32 weights returned

    boot = None
    if bootstrap:
        boot = _bootstrap(ell, bootstrap, lam0, steps, lr_scale, b, step_size, start_avg, seed)

    # F̂ at the answer, at lambda^0 and at the vertices; the gradient at the answer for the certificate
    points = torch.cat([weights.unsqueeze(0), lam0.unsqueeze(0), torch.eye(k, dtype=torch.float64)])
    values, grad = _value_and_grad(points, ell.unsqueeze(0).expand(k + 2, -1, -1, -1))
    gap = _fw_gap(weights, grad[0])
    return BSMDResult(
        weights=weights.float(),
        last=out["last"][0].float(),
        trajectory=out["trajectory"].float(),
        objective=out["objective"],
        lr=float(out["eta"][0]),
        fw_gap=gap,
        objective_at_weights=float(values[0]),
        objective_at_init=float(values[1]),
        objective_at_vertices=values[2:].clone(),
        step_size=step_size,
        batch_prompts=b,
        average_from=start_avg,
        bootstrap_weights=boot,
        lr_scale=lr_scale,
    )
