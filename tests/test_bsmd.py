"""BSMD against the exact minimiser of F on a tabular problem, and its numerical safety."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mpo_exp import SimplexMirrorDescent, mpo_objective, solve_bsmd


def tabular_problem(k: int, n_prompts: int = 4, n_responses: int = 6, beta: float = 0.5, seed: int = 0):
    """pi_ref categorical per prompt; pi_k ∝ pi_ref exp(r_k / beta); exact log-ratios."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.softmax(torch.randn(n_prompts, n_responses, generator=g, dtype=torch.float64), -1)
    r = torch.randn(n_prompts, n_responses, k, generator=g, dtype=torch.float64)
    log_z = torch.logsumexp(ref.log().unsqueeze(-1) + r / beta, dim=1, keepdim=True)
    ell = r / beta - log_z  # log pi_k - log pi_ref, exactly
    return ref, ell


def exact_f(lam: np.ndarray, ref: torch.Tensor, ell: torch.Tensor) -> float:
    lam_t = torch.as_tensor(lam, dtype=torch.float64)
    return float(torch.logsumexp(ref.log() + ell @ lam_t, dim=1).mean())


def exact_minimiser(ref, ell):
    k = ell.shape[-1]
    best = None
    for start in np.eye(k) * 0.8 + 0.2 / k:  # several starts: F is convex, this guards SLSQP
        res = minimize(
            exact_f,
            start,
            args=(ref, ell),
            method="SLSQP",
            bounds=[(0, 1)] * k,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
            options={"ftol": 1e-12},
        )
        if best is None or res.fun < best.fun:
            best = res
    return best.x, best.fun


def sample_log_ratios(ref, ell, m: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(ref, m, replacement=True, generator=g)  # (N, m) responses y ~ pi_ref
    return torch.stack([ell[i, idx[i]] for i in range(ref.shape[0])])  # (N, m, K)


@pytest.mark.parametrize("k", [2, 3])
def test_bsmd_matches_exact_minimiser(k):
    ref, ell = tabular_problem(k)
    lam_star, f_star = exact_minimiser(ref, ell)
    samples = sample_log_ratios(ref, ell, m=20000)
    res = solve_bsmd(samples, steps=4000, lr_scale=2.0, batch_prompts=4, seed=0, objective_every=0)
    lam = res.weights.double().numpy()
    assert np.abs(lam - lam_star).sum() < 1e-2, (lam, lam_star)
    assert abs(exact_f(lam, ref, ell) - f_star) < 1e-3
    # F <= 0 on the simplex, = 0 at the vertices (each pi_k normalises)
    assert f_star < 0
    for v in np.eye(k):
        assert abs(exact_f(v, ref, ell)) < 1e-9


def test_small_m_is_biased_large_m_is_not():
    """The log of a sample mean biases F̂ downward by O(1/m); it vanishes as m grows."""
    ref, ell = tabular_problem(3)
    lam_star, f_star = exact_minimiser(ref, ell)
    lam = torch.as_tensor(lam_star)

    def bias(m: int, seeds: int) -> float:
        return (
            sum(
                f_star - float(mpo_objective(lam, sample_log_ratios(ref, ell, m, seed=s)))
                for s in range(seeds)
            )
            / seeds
        )

    assert bias(4, seeds=50) > 0.02
    assert abs(bias(5000, seeds=20)) < 2e-3


def test_gradient_moves_weight_to_worst_served_objective():
    # objective 0 is served far better than objective 1 by every sample -> lambda_1 must grow
    ell = torch.zeros(8, 16, 2, dtype=torch.float64)
    ell[..., 0] = 2.0
    ell[..., 1] = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = solve_bsmd(ell, steps=200, batch_prompts=4)
    assert res.trajectory[-1, 1] > res.trajectory[0, 1]
    assert res.weights[1] > 0.5


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_log_ratios_stay_on_simplex(scale):
    g = torch.Generator().manual_seed(0)
    ell = scale * torch.sign(torch.randn(16, 8, 3, generator=g))
    res = solve_bsmd(ell, steps=300, lr_scale=10.0)
    for lam in (res.weights, res.last, *res.trajectory):
        assert torch.isfinite(lam).all()
        assert (lam >= 0).all()
        assert abs(float(lam.sum()) - 1) < 1e-5
    assert torch.isfinite(res.objective[~res.objective.isnan()]).all()


def test_mirror_descent_step_is_exponentiated_gradient():
    lam = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64, requires_grad=True)
    opt = SimplexMirrorDescent([lam], lr=0.5)
    grad = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    lam.grad = grad.clone()
    opt.step()
    expected = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64) * torch.exp(-0.5 * grad)
    torch.testing.assert_close(lam.detach(), expected / expected.sum())


def test_gradient_is_importance_weighted_mean():
    ell = torch.randn(5, 7, 3, dtype=torch.float64)
    lam = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64, requires_grad=True)
    mpo_objective(lam, ell).backward()
    w = torch.softmax(ell @ lam.detach(), dim=1).unsqueeze(-1)
    torch.testing.assert_close(lam.grad, (w * ell).sum(1).mean(0))


def test_step_size_and_average_iterate():
    ell = torch.randn(4, 3, 2)
    res = solve_bsmd(ell, steps=100, lr_scale=3.0)
    assert res.lr == pytest.approx(3.0 / math.sqrt(100))
    torch.testing.assert_close(res.weights, res.trajectory[:-1].mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(log_ratios=torch.zeros(3, 4)), "prompts, samples, K"),
        (dict(log_ratios=torch.full((2, 2, 2), float("nan"))), "NaN"),
        (dict(log_ratios=torch.zeros(2, 2, 2), steps=0), "steps"),
        (dict(log_ratios=torch.zeros(2, 2, 2), init=torch.tensor([0.9, 0.2])), "simplex"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve_bsmd(**kwargs)
