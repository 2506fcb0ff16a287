"""MPO's decoded-policy objective: exact per-token KLs and gradients, the solver, the options.

The estimates are checked against exact values computed by enumerating every response of a tiny
vocabulary (two tokens at most), and the solver against the known minimax point of analytic
objectives.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from mpo_exp.mpo.decoded import (
    Estimate,
    Exponents,
    decode_kl,
    estimate_from_samples,
    kl_gradients,
    linearised_step,
    solve_minimax,
)

V, EOS, PAD = 6, 0, 5
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    out = []
    for _ in range(3):
        m = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=V,
                n_layer=1,
                n_embd=16,
                n_head=2,
                n_positions=16,
                bos_token_id=EOS,
                eos_token_id=EOS,
            )
        ).eval()
        with torch.no_grad():  # spread the next-token distributions so the KLs are not tiny
            m.lm_head.weight.mul_(6)
        out.append(m)
    return out


def _next_logp(model, prefix: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([prefix])).logits[0, -1].double(), -1)


def exact_kls(models, a: torch.Tensor, horizon: int) -> torch.Tensor:
    """sum_t E_{pi^tok_a} KL(pi^tok_t || pi_e,t) by enumeration: (E,), differentiable in ``a``."""

    def step(prefix):
        logp_e = torch.stack([_next_logp(m, prefix) for m in models])  # (E, V)
        logp = F.log_softmax(a @ logp_e, -1)
        return logp, (logp.exp() * (logp - logp_e)).sum(-1)

    logp1, kl1 = step(PROMPT)
    total = kl1
    if horizon == 2:
        for y in range(V):
            if y == EOS:
                continue
            _, kl2 = step([*PROMPT, y])
            total = total + logp1[y].exp() * kl2
    return total


@pytest.mark.parametrize("a", [[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.7, 0.6, -0.3]])
def test_one_token_kl_and_gradient_are_exact(models, a):
    a_t = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    exact = exact_kls(models, a_t, 1)
    jac = torch.stack([torch.autograd.grad(exact[e], a_t, retain_graph=True)[0] for e in range(3)])
    d = decode_kl(models, a, [PROMPT] * 4, 1, PAD, EOS)
    total, _ = kl_gradients(d, 2)
    torch.testing.assert_close(total, exact.detach().expand(4, 3), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d.dkl, jac.expand(4, 3, 3), atol=1e-4, rtol=1e-4)


def test_two_token_kl_and_gradient_are_unbiased(models):
    """Monte Carlo over 8,000 responses against enumeration: every entry within 4.5 standard errors."""
    a = [0.5, 0.3, 0.2]
    a_t = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    exact = exact_kls(models, a_t, 2)
    jac = torch.stack([torch.autograd.grad(exact[e], a_t, retain_graph=True)[0] for e in range(3)])
    torch.manual_seed(1)
    m = 4
    d = decode_kl(models, a, [PROMPT] * 8000, 2, PAD, EOS, batch_size=4000)
    total, grad = kl_gradients(d, m)
    groups_t = total.reshape(-1, m, 3).mean(1)
    groups_g = grad.reshape(-1, m, 3, 3).mean(1)
    se_t = groups_t.std(0) / math.sqrt(len(groups_t))
    se_g = groups_g.std(0) / math.sqrt(len(groups_g))
    assert ((groups_t.mean(0) - exact.detach()).abs() <= 4.5 * se_t + 1e-6).all()
    assert ((groups_g.mean(0) - jac).abs() <= 4.5 * se_g + 1e-6).all()
    # the estimate is informative, not a wide interval around anything: the gradient is resolved
    assert (jac.abs() > 3 * se_g).sum() >= 6


def test_a_row_stops_counting_after_its_eos(models):
    eos = int(_next_logp(models[0], PROMPT).argsort()[-2])  # an EOS that is drawn, but not always
    torch.manual_seed(0)
    d = decode_kl(models, [0.3, 0.3, 0.4], [PROMPT] * 200, 5, PAD, eos)
    lengths = d.batch.response_mask.sum(1)
    ended = lengths < d.kl.shape[1]
    for i in torch.nonzero(ended).flatten().tolist():
        assert (d.kl[i, lengths[i] :] == 0).all() and (d.score[i, lengths[i] :] == 0).all()
    assert ended.any()


def test_calibrated_exponents_and_objective():
    exps = Exponents(2, (2.0, 0.5))
    lam = torch.tensor([0.25, 0.75], dtype=torch.float64)
    a = exps(lam)
    torch.testing.assert_close(a, torch.tensor([0.125, 1.5, -0.625], dtype=torch.float64))
    assert float(a.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(exps.jacobian @ lam + torch.tensor([0, 0, 1.0], dtype=torch.float64), a)
    # h_k = KL_k/s_k + (1 - 1/s_k) KL_ref, from -(E_pi[r_k]/s_k - KL(pi||pi_ref)) with r_k = log pi_k/pi_ref
    kl = torch.tensor([3.0, 5.0, 2.0], dtype=torch.float64)  # KL to pi_1, pi_2, pi_ref
    h = exps.objective_map @ kl
    reward = kl[2] - kl[:2]  # E_pi log pi_k/pi_ref = KL(pi||pi_ref) - KL(pi||pi_k)
    torch.testing.assert_close(h, -(reward / torch.tensor([2.0, 0.5], dtype=torch.float64) - kl[2]))
    assert Exponents(2).jacobian.equal(torch.eye(2, dtype=torch.float64))


def _analytic(centres: torch.Tensor, weights: torch.Tensor, noise: float, gen: torch.Generator):
    """h_k(lambda) = w_k·||lambda - c_k||^2 (convex), estimated with Gaussian noise."""

    def estimate(lam: torch.Tensor, _r: int) -> Estimate:
        diff = lam - centres
        h = weights * (diff**2).sum(-1)
        g = 2 * weights.unsqueeze(-1) * diff
        e = torch.randn(h.shape, generator=gen, dtype=torch.float64) * noise
        eg = torch.randn(g.shape, generator=gen, dtype=torch.float64) * noise
        k = len(h)
        return Estimate(h + e, g + eg, torch.full((k,), noise), h, h, (h + e)[None], (g + eg)[None])

    return estimate


def _grid_minimax(centres, weights, steps=200):
    best, arg = math.inf, None
    for i in range(steps + 1):
        for j in range(steps + 1 - i):
            lam = torch.tensor([i / steps, j / steps, (steps - i - j) / steps], dtype=torch.float64)
            v = float((weights * ((lam - centres) ** 2).sum(-1)).max())
            if v < best:
                best, arg = v, lam
    return arg


@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_solver_finds_the_minimax_point(noise):
    centres = torch.eye(3, dtype=torch.float64)
    weights = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    truth = _grid_minimax(centres, weights)
    gen = torch.Generator().manual_seed(0)
    res = solve_minimax(_analytic(centres, weights, noise, gen), torch.full((3,), 1 / 3), rounds=40)
    assert (res.weights - truth).abs().max() < 0.02
    # started far away, it still gets there (the trust region only slows the first rounds)
    res = solve_minimax(_analytic(centres, weights, noise, gen), torch.tensor([0.9, 0.05, 0.05]), rounds=40)
    assert (res.weights - truth).abs().max() < 0.03


def test_linearised_step_solves_the_lp_and_gives_dual_weights():
    h = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g = torch.tensor([[2.0, -2.0], [-2.0, 2.0]], dtype=torch.float64)  # h_1 falls, h_2 rises with lambda_2
    lam = torch.tensor([0.5, 0.5], dtype=torch.float64)
    step = linearised_step(h, g, lam)
    # 1 + 2(d1 - d2) = 0 + 2(d2 - d1) with d1 = -d2: d2 = 0.125
    torch.testing.assert_close(step.point, torch.tensor([0.375, 0.625], dtype=torch.float64))
    assert step.value == pytest.approx(0.5) and step.mu.tolist() == pytest.approx([0.5, 0.5])
    small = linearised_step(h, g, lam, radius=0.05)
    torch.testing.assert_close(small.point, torch.tensor([0.45, 0.55], dtype=torch.float64))
    assert small.mu.tolist() == pytest.approx([1.0, 0.0])


def test_estimate_from_samples_averages_over_prompts(models):
    torch.manual_seed(2)
    d = decode_kl(models, [0.4, 0.4, 0.2], [PROMPT] * 40, 3, PAD, EOS)
    est = estimate_from_samples(d, Exponents(3), 4)
    assert est.per_prompt_values.shape == (10, 3) and est.per_prompt_grad.shape == (10, 3, 3)
    total, _ = kl_gradients(d, 4)
    per_prompt = total.reshape(10, 4, 3).mean(1)  # rows are prompts repeated 4 times in a row
    torch.testing.assert_close(est.values, total.mean(0))
    # the standard error is over prompts (the samples of one prompt are not independent), not rows
    torch.testing.assert_close(est.stderr, per_prompt.std(0) / math.sqrt(10))
    assert not torch.allclose(est.stderr, total.std(0) / math.sqrt(40))


# ---- the paper's F, estimated with a mixture proposal -------------------------------------------


def _tabular(seed: int = 0):
    """pi_ref and two pi_k over 60 outcomes, the pi_k far from pi_ref and from each other."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 60, generator=g, dtype=torch.float64) * torch.tensor([[0.5], [3.0], [3.0]])
    return F.log_softmax(logits, -1)  # rows: pi_ref, pi_1, pi_2


def _draw(logp: torch.Tensor, counts: list[int], n: int, g: torch.Generator):
    """n prompts x sum(counts) samples, counts[i] from policy i: (n, m, K) log-ratios to pi_ref."""
    rows = []
    for i, c in enumerate(counts):
        if c:
            rows.append(torch.multinomial(logp[i].exp(), n * c, replacement=True, generator=g).reshape(n, c))
    y = torch.cat(rows, dim=1)
    return (logp[1:, y] - logp[0, y]).permute(1, 2, 0)


def test_mixture_proposal_estimates_the_papers_F_without_the_coverage_bias():
    from mpo_exp.mpo.bsmd import mpo_objective
    from mpo_exp.mpo.method import SampleScores, proposal_counts

    logp = _tabular()
    lam = torch.tensor([0.5, 0.5], dtype=torch.float64)
    exact = float(torch.logsumexp(lam @ logp[1:], -1))  # log sum_y pi_1^0.5 pi_2^0.5
    g = torch.Generator().manual_seed(1)
    m, n = 15, 4000
    ref = SampleScores(
        _draw(logp, proposal_counts("reference", 2, m), n, g), proposal_counts("reference", 2, m)
    )
    mix = SampleScores(_draw(logp, proposal_counts("mixture", 2, m), n, g), proposal_counts("mixture", 2, m))
    assert mix.counts == [5, 5, 5] and ref.counts == [15, 0, 0]

    def estimate(s: SampleScores) -> float:
        return float(mpo_objective(lam, s.log_ratios.double() + s.proposal_offset().unsqueeze(-1)))

    # each weight pi_lambda/q is at most 1/min alpha = 3 (weighted AM-GM), so the log-mean is nearly unbiased
    shifted = mix.log_ratios.double() + mix.proposal_offset().unsqueeze(-1)
    assert float((shifted @ lam).max()) <= math.log(3) + 1e-9
    assert abs(estimate(mix) - exact) < 0.15
    assert estimate(ref) < exact - 0.5  # pi_ref's samples rarely reach where pi_1 and pi_2 meet


def test_proposal_offset_is_log_pi_ref_over_the_mixture():
    from mpo_exp.mpo.method import SampleScores

    ell = torch.tensor([[[0.0, math.log(2)], [math.log(3), 0.0], [-1.0, 1.0]]])  # 1 prompt, 3 samples, K = 2
    s = SampleScores(ell, [1, 1, 1])
    q_over_ref = (1 + ell.double().exp().sum(-1)) / 3
    torch.testing.assert_close(s.proposal_offset(), -q_over_ref.log())
    assert SampleScores(ell, [3, 0, 0]).proposal_offset().abs().max() == 0


def test_calibration_scales_are_measured_on_pi_ref_samples_with_geometric_mean_one():
    from mpo_exp.mpo.method import SampleScores

    g = torch.Generator().manual_seed(0)
    ell = torch.randn(50, 8, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 4.0]) - torch.tensor(
        [1.0, 9.0]
    )
    ell[:, 4:] = 100.0  # rows drawn from the pi_k must not enter the scales
    s = SampleScores(ell, [4, 2, 2])
    std = s.calibration_scales("std", [0, 1])
    assert std[0] * std[1] == pytest.approx(1.0) and std[1] / std[0] == pytest.approx(4.0, rel=0.2)
    kl = s.calibration_scales("kl_ref", [0, 1])
    assert kl[1] / kl[0] == pytest.approx(9.0, rel=0.2)
    assert s.calibration_scales("none", [0, 1]) is None


def test_an_affine_mixture_samples_and_scores_the_same_distribution(tiny_policies):
    """pi ∝ pi_1^1.5 pi_ref^-0.5 (calibrated MPO's family): the decoder's first-token frequencies
    match softmax(1.5 log pi_1 - 0.5 log pi_ref), which is also what scoring reads."""
    from mpo_exp.generation import sample
    from mpo_exp.mpo.mixing import MixedPolicy
    from mpo_exp.scoring import token_logprobs

    p1, p_ref = tiny_policies[0], tiny_policies[1]
    with pytest.raises(ValueError, match="must be non-negative"):
        MixedPolicy("x", [p1, p_ref], [1.5, -0.5])
    pol = MixedPolicy("x", [p1, p_ref], [1.5, -0.5], affine=True)
    with pytest.raises(ValueError, match="sum to 1"):
        MixedPolicy("x", [p1, p_ref], [1.5, -0.4], affine=True)
    prompt = p1.tokenizer("the cat", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    batch = sample(pol, [prompt] * 3000, max_new_tokens=1)
    with torch.no_grad():
        logits = [m(torch.tensor([prompt])).logits[0, -1] for m in (p1.model, p_ref.model)]
    expected = F.softmax(1.5 * F.log_softmax(logits[0], -1) - 0.5 * F.log_softmax(logits[1], -1), -1)
    freq = torch.bincount(batch.response_ids[:, 0], minlength=len(expected)).double() / 3000
    se = (expected * (1 - expected) / 3000).sqrt().double()
    assert ((freq - expected.double()).abs() <= 4.5 * se + 1e-3).all()
    lp = token_logprobs([p1.model, p_ref.model], [1.5, -0.5], batch[:5])
    torch.testing.assert_close(lp[:, 0].exp(), expected[batch.response_ids[:5, 0]], atol=1e-5, rtol=1e-4)
