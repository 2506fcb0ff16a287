"""MPO's max-min problem for the policy that is decoded: min_lambda max_k KL(pi^tok_lambda || pi_k).

With implicit rewards r_k = beta·log(pi_k/pi_ref), E_pi[r_k] - beta·KL(pi||pi_ref) = -beta·KL(pi||pi_k),
so MPO's problem for any policy family is the KL "centre" of the pi_k. The paper's F(lambda) solves
it over *sequence-level* geometric mixtures; the decoder samples the *token-level* mixture
pi^tok_a(v | y_<t) ∝ exp(sum_e a_e log pi_e(v | y_<t)), a different family, so this module fits
lambda for that family directly, on-policy:

* :func:`decode_kl` samples from pi^tok_a with :class:`~mpo_exp.generation.TokenStepper` and reads,
  at every token, the exact KL(pi^tok_t || pi_{e,t}) over the whole vocabulary, its exact derivative
  in the exponents, Cov_p(log pi_f, log p - log pi_e), and the score of the sampled token,
  log pi_f(y_t) - E_p log pi_f (all from the logits the decoder computes anyway: no extra forward).
* :func:`kl_gradients` turns these into per-sequence KL totals (Rao-Blackwellised) and an unbiased
  gradient (exact per-token part + score-function part with rewards-to-go and a leave-one-out
  baseline over the samples of the same prompt).
* :func:`solve_minimax` runs stochastic successive linearisation on the simplex: each round solves
  the small LP min max_k [h_k + G_k·(lambda - lambda_r)] within a box around lambda_r (whose duals
  are the objectives' weights mu) and moves part of the way there; the output averages the
  iterates of the last rounds. :func:`certificate` and :func:`bootstrap_std` report on the answer.

Calibration (``method.calibration``): with objective k's reward divided by s_k the optimum family is
pi ∝ pi_ref^{1 - sum_k lambda_k/s_k} prod_k pi_k^{lambda_k/s_k} and the max-min objective becomes
h_k = KL(pi||pi_k)/s_k + (1 - 1/s_k)·KL(pi||pi_ref) (:class:`Exponents`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mpo_exp import draws
from mpo_exp.adapters import shared_bank
from mpo_exp.cost import CostMeter, n_params
from mpo_exp.data import SequenceBatch, pad
from mpo_exp.generation import TokenStepper, response_mask_until_eos

if TYPE_CHECKING:
    from mpo_exp.context import RunContext

LOG_FLOOR = -1e4  # log-probs below this are clamped (0·log 0 must stay 0, not NaN)


@dataclass(frozen=True)
class Exponents:
    """lambda (K,) -> exponents a of the decoded models [pi_1..pi_K] (+ pi_ref when calibrated).

    ``scales`` None: a = lambda and h_k = KL(pi||pi_k). Otherwise a = (lambda/s, 1 - sum lambda/s) over
    [pi_1..pi_K, pi_ref] and h_k = KL_k/s_k + (1 - 1/s_k)·KL_ref: both linear, so the chain rule is
    two fixed matrices.
    """

    k: int
    scales: tuple[float, ...] | None = None

    @property
    def with_ref(self) -> bool:
        return self.scales is not None

    @property
    def jacobian(self) -> torch.Tensor:
        """da/dlambda: (E, K)."""
        if self.scales is None:
            return torch.eye(self.k, dtype=torch.float64)
        inv = 1.0 / torch.tensor(self.scales, dtype=torch.float64)
        return torch.cat([torch.diag(inv), -inv.unsqueeze(0)])

    @property
    def objective_map(self) -> torch.Tensor:
        """h = C @ KL over the decoded models: (K, E)."""
        if self.scales is None:
            return torch.eye(self.k, dtype=torch.float64)
        inv = 1.0 / torch.tensor(self.scales, dtype=torch.float64)
        return torch.cat([torch.diag(inv), (1 - inv).unsqueeze(1)], dim=1)

    def __call__(self, lam: torch.Tensor) -> torch.Tensor:
        lam = lam.to(torch.float64)
        if self.scales is None:
            return lam.clone()
        a = lam / torch.tensor(self.scales, dtype=torch.float64)
        return torch.cat([a, (1 - a.sum()).reshape(1)])


@dataclass
class DecodedSamples:
    """Per-sequence, per-token statistics of samples from pi^tok_a (E decoded models)."""

    batch: SequenceBatch
    kl: torch.Tensor  # (n, T, E) KL(pi^tok_t || pi_{e,t}), 0 after the row ended
    dkl: torch.Tensor  # (n, E, F) sum_t dKL_{e,t}/da_f (exact per-token part)
    score: torch.Tensor  # (n, T, F) dlog pi^tok_t(y_t)/da_f, 0 after the row ended


@torch.no_grad()
def decode_kl(
    models: Sequence[torch.nn.Module],
    exponents: Sequence[float],
    prompts: list[list[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_id: int,
    batch_size: int = 256,
    meter: CostMeter | None = None,
) -> DecodedSamples:
    """Sample one response per prompt from pi^tok_a (temperature 1) and record :class:`DecodedSamples`.

    Every model in ``models`` is decoded (a zero exponent still yields its KL); the KLs are to each
    of them. The random stream is torch's global one (seed it before the call).
    """
    a = torch.tensor([float(x) for x in exponents])
    device = next(models[0].parameters()).device
    for m in models:
        m.eval()
    # adapter views run as one forward over a block of rows each: a forward then holds batch_size rows
    step = batch_size if shared_bank(list(models)) is None else max(1, batch_size // len(models))
    parts: list[tuple[SequenceBatch, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for s in range(0, len(prompts), step):
        p_ids, p_mask = pad(prompts[s : s + step], pad_id, left=True)
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)
        stepper = TokenStepper(list(models), p_ids, p_mask)
        b = len(p_ids)
        kls, scores = [], []
        dkl = torch.zeros(b, len(models), len(models), dtype=torch.float64, device=device)
        for _ in range(int(max_new_tokens)):
            logp_e = torch.stack([F.log_softmax(lg, dim=-1) for lg in stepper.logits()]).clamp_min(LOG_FLOOR)
            logp = F.log_softmax(torch.einsum("e,ebv->bv", a.to(logp_e), logp_e), dim=-1).clamp_min(LOG_FLOOR)
            p = logp.exp()
            diff = logp.unsqueeze(0) - logp_e  # (E, B, V): log p - log pi_e
            kl_t = torch.einsum("bv,ebv->be", p, diff)
            centred = logp_e - torch.einsum("bv,fbv->fb", p, logp_e).unsqueeze(-1)  # log pi_f - E_p log pi_f
            dkl_t = torch.einsum("bv,ebv,fbv->bef", p, diff, centred)  # Cov_p(log pi_f, log p - log pi_e)
            token = draws.draw(p)
            alive = (~stepper.done).to(p.dtype)
            score_t = centred.gather(-1, token.view(1, b, 1).expand(len(models), b, 1)).squeeze(-1).T
            kls.append(kl_t * alive.unsqueeze(-1))
            scores.append(score_t * alive.unsqueeze(-1))
            dkl += dkl_t.double() * alive.double().view(b, 1, 1)
            if stepper.emit(token, pad_id, eos_id):
                break
        r_ids = stepper.response.cpu()
        r_mask = response_mask_until_eos(r_ids, eos_id)
        batch = SequenceBatch(p_ids.cpu(), p_mask.cpu(), r_ids.masked_fill(r_mask == 0, pad_id), r_mask)
        if meter is not None:
            for m in models:
                meter.forward(n_params(m), batch.n_tokens)
        parts.append(
            (batch, torch.stack(kls, 1).double().cpu(), dkl.cpu(), torch.stack(scores, 1).double().cpu())
        )
    width = max(p[1].shape[1] for p in parts)

    def widen(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, width - x.shape[1]))

    return DecodedSamples(
        batch=SequenceBatch.concat([p[0] for p in parts], pad_id) if len(parts) > 1 else parts[0][0],
        kl=torch.cat([widen(p[1]) for p in parts]),
        dkl=torch.cat([p[2] for p in parts]),
        score=torch.cat([widen(p[3]) for p in parts]),
    )


def kl_gradients(d: DecodedSamples, samples_per_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: total KL to each decoded model (n, E) and an unbiased gradient of its expectation
    in the exponents (n, E, F).

    gradient = sum_t dKL_t/da + sum_s score_s · (R_s - b_s), R_s = sum_{t>s} KL_t (only later tokens
    depend on y_s), b_s = the mean of R_s over the other samples of the same prompt (independent of
    this sample, so the estimate stays unbiased). Rows are prompts repeated ``samples_per_prompt``
    times in a row; with one sample per prompt the baseline is the other rows' mean.
    """
    kl = d.kl  # (n, T, E)
    total = kl.sum(1)
    to_go = kl.flip(1).cumsum(1).flip(1) - kl  # R_s = sum_{t>s} KL_t: (n, T, E)
    n, t, e = to_go.shape
    m = samples_per_prompt if samples_per_prompt > 1 else n
    groups = to_go.reshape(n // m, m, t, e)
    baseline = (groups.sum(1, keepdim=True) - groups) / max(m - 1, 1)
    centred = (groups - baseline).reshape(n, t, e)
    grad = d.dkl + torch.einsum("nte,ntf->nef", centred, d.score)
    return total, grad


@dataclass
class Estimate:
    """h_k(lambda) with standard errors, and dh_k/dlambda, from one decoded batch; per prompt too (for
    the bootstrap)."""

    values: torch.Tensor  # (K,)
    grad: torch.Tensor  # (K, K)
    stderr: torch.Tensor  # (K,)
    kl: torch.Tensor  # (E,) mean KL to each decoded model
    kl_stderr: torch.Tensor  # (E,)
    per_prompt_values: torch.Tensor  # (P, K)
    per_prompt_grad: torch.Tensor  # (P, K, K)


def estimate_from_samples(d: DecodedSamples, exps: Exponents, samples_per_prompt: int) -> Estimate:
    return estimate_from_totals(*kl_gradients(d, samples_per_prompt), exps, samples_per_prompt)


def estimate_from_totals(
    total: torch.Tensor, grad: torch.Tensor, exps: Exponents, samples_per_prompt: int
) -> Estimate:
    """:class:`Estimate` from per-sequence KL totals (n, E) and gradients (n, E, F) (:func:`kl_gradients`).

    The samples of one prompt are not independent of each other: standard errors are over prompts.
    """
    c, jac = exps.objective_map, exps.jacobian
    m = max(samples_per_prompt, 1)
    p = len(total) // m
    kl_pp = total.reshape(p, m, -1).mean(1)
    h_pp = kl_pp @ c.T
    g_pp = torch.einsum("ke,pef,fj->pkj", c, grad.reshape(p, m, *grad.shape[1:]).mean(1), jac)

    def stderr(x: torch.Tensor) -> torch.Tensor:
        return x.std(0) / math.sqrt(p) if p > 1 else torch.zeros(x.shape[1], dtype=x.dtype)

    return Estimate(h_pp.mean(0), g_pp.mean(0), stderr(h_pp), kl_pp.mean(0), stderr(kl_pp), h_pp, g_pp)


# ---- the solver ---------------------------------------------------------------------------------


@dataclass
class LinearisedStep:
    """argmin over lambda' in the simplex (within ``radius`` of lambda in every coordinate) of the
    linearised max_k [h_k + G_k·(lambda' - lambda)]: the point, the model's value there, and the dual
    weights mu of the objectives (mu_k > 0 only for objectives active at the optimum)."""

    point: torch.Tensor
    value: float
    mu: torch.Tensor


def linearised_step(
    h: torch.Tensor, g: torch.Tensor, lam: torch.Tensor, radius: float = 1.0
) -> LinearisedStep:
    """Solve the small LP  min t  s.t.  h_k + G_k·(lambda' - lambda) <= t,  lambda' in simplex ∩ box."""
    from scipy.optimize import linprog

    k = len(h)
    h, g, lam = (x.double().numpy() for x in (h, g, lam))
    cost = [0.0] * k + [1.0]
    a_ub = [[*g[i], -1.0] for i in range(k)]
    b_ub = [float(g[i] @ lam - h[i]) for i in range(k)]
    bounds = [(max(0.0, lam[j] - radius), min(1.0, lam[j] + radius)) for j in range(k)] + [(None, None)]
    res = linprog(
        cost, A_ub=a_ub, b_ub=b_ub, A_eq=[[1.0] * k + [0.0]], b_eq=[1.0], bounds=bounds, method="highs"
    )
    if res.status != 0:  # pragma: no cover - the box always holds lambda itself, so the LP is feasible
        raise RuntimeError(f"linearised step failed: {res.message}")
    point = torch.tensor(res.x[:k], dtype=torch.float64).clamp_min(0)
    mu = torch.tensor(-res.ineqlin.marginals, dtype=torch.float64).clamp_min(0)
    return LinearisedStep(point / point.sum(), float(res.x[k]), mu / mu.sum() if mu.sum() > 0 else mu)


def certificate(est: Estimate, lam: torch.Tensor) -> dict:
    """max_k h_k(lambda) - min_{lambda'} max_k [h_k + G_k·(lambda' - lambda)] over the whole simplex.

    An upper bound on how far max_k h_k(lambda) is above its minimum when the h_k are convex in
    lambda (their linearisations lie below them); a local certificate otherwise. With the LP's dual
    weights mu of the objectives.
    """
    step = linearised_step(est.values, est.grad, lam)
    return {"certificate": max(float(est.values.max()) - step.value, 0.0), "mu": step.mu.tolist()}


def bootstrap_std(
    est: Estimate, lam: torch.Tensor, radius: float, replicates: int, seed: int
) -> torch.Tensor:
    """lambda's statistical error: the std of the linearised step from ``lam`` over ``replicates``
    resamplings of the decoded prompts (h and G re-averaged on each)."""
    gen = torch.Generator().manual_seed(seed)
    p = len(est.per_prompt_values)
    points = []
    for _ in range(replicates):
        idx = torch.randint(p, (p,), generator=gen)
        h, g = est.per_prompt_values[idx].mean(0), est.per_prompt_grad[idx].mean(0)
        points.append(linearised_step(h, g, lam, radius).point)
    return torch.stack(points).std(0)


@dataclass
class MinimaxResult:
    weights: torch.Tensor  # (K,) averaged iterate
    trajectory: torch.Tensor  # (R+1, K)
    values: torch.Tensor  # (R, K) h_k estimated at each round's iterate
    stderr: torch.Tensor  # (R, K) their standard errors
    mu: torch.Tensor  # (R, K) dual weights of each round's linearised step
    targets: torch.Tensor  # (R, K) each round's linearised minimiser


def solve_minimax(
    estimate: Callable[[torch.Tensor, int], Estimate],
    init: torch.Tensor,
    rounds: int,
    radius: float = 0.2,
    average_from: float = 0.5,
) -> MinimaxResult:
    """Stochastic successive linearisation for min_{lambda in simplex} max_k h_k(lambda).

    Round r estimates h and its Jacobian G at lambda_r on fresh samples (``estimate(lambda_r, r)``),
    takes the minimiser lambda*_r of the linearised max within a box of half-width ``radius``
    (:func:`linearised_step`; a small LP, exact) and moves part of the way:
    lambda_{r+1} = lambda_r + (lambda*_r - lambda_r)/sqrt(r + 1) (the first step is a full one; the
    shrinking steps average the noise out, as in stochastic approximation). The output averages the
    iterates after ``average_from``·R rounds. Steps are in lambda's own units, so the scale of the
    KLs (tiny models: ~20 nats, SmolLM2: up to 100) does not enter.
    """
    lam = init.to(torch.float64).clamp_min(0)
    lam = lam / lam.sum()
    start = min(int(average_from * rounds), rounds - 1)
    traj, values, errs, mus, targets = [lam.clone()], [], [], [], []
    for r in range(rounds):
        est = estimate(lam, r)
        step = linearised_step(est.values, est.grad, lam, radius)
        lam = lam + (step.point - lam) / math.sqrt(r + 1)
        lam = lam.clamp_min(0) / lam.clamp_min(0).sum()
        values.append(est.values)
        errs.append(est.stderr)
        mus.append(step.mu)
        targets.append(step.point)
        traj.append(lam.clone())
    trajectory = torch.stack(traj)
    weights = trajectory[start + 1 :].mean(0)
    return MinimaxResult(
        weights, trajectory, torch.stack(values), torch.stack(errs), torch.stack(mus), torch.stack(targets)
    )


# ---- in the pipeline ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodedSettings:
    """``method.decoded``: rounds of the solver, prompts x samples decoded per round, the trust
    region of each linearised step, the fraction of rounds after which iterates are averaged, the
    prompts (x samples) of the final certifying decode at the answer, and the bootstrap replicates
    over its prompts for lambda's std."""

    rounds: int = 24
    prompts: int = 64
    samples_per_prompt: int = 4
    radius: float = 0.2
    average_from: float = 0.5
    certify_prompts: int = 256
    bootstrap: int = 50

    def __post_init__(self) -> None:
        for name in ("rounds", "prompts", "samples_per_prompt", "certify_prompts"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"method.decoded.{name} must be >= 1, got {getattr(self, name)}")
        if int(self.samples_per_prompt) < 2:
            raise ValueError(
                f"method.decoded.samples_per_prompt must be >= 2 (the gradient's baseline is the other "
                f"samples of a prompt), got {self.samples_per_prompt}"
            )
        if not 0 < self.radius <= 1:
            raise ValueError(f"method.decoded.radius must be in (0, 1], got {self.radius}")
        if int(self.bootstrap) < 0 or int(self.bootstrap) == 1:
            raise ValueError(f"method.decoded.bootstrap must be 0 (off) or >= 2, got {self.bootstrap}")
        if not 0 <= self.average_from < 1:
            raise ValueError(f"method.decoded.average_from must be in [0, 1), got {self.average_from}")


class DecodedEstimator:
    """h(lambda) and its Jacobian by decoding pi^tok_lambda on fresh train prompts (one call = one round).

    Under DDP each rank decodes its share of the prompts (its own random stream) and the
    per-sequence totals and gradients are gathered, so every rank holds the same estimate.
    """

    def __init__(
        self, ctx: RunContext, models: list[torch.nn.Module], exps: Exponents, settings: DecodedSettings
    ):
        self.ctx, self.models, self.exps, self.settings = ctx, models, exps, settings
        self.tokenizer = ctx.reference.tokenizer

    def __call__(self, lam: torch.Tensor, round_: int, n_prompts: int | None = None) -> Estimate:
        from mpo_exp import distributed as dist
        from mpo_exp.generation import encode_prompts

        ctx, st = self.ctx, self.settings
        n = n_prompts or st.prompts
        torch.manual_seed(ctx.seed * 1_000_003 + 7919 * (round_ + 1))
        dist.seed_rank_stream()
        prompts = encode_prompts(self.tokenizer, ctx.task.prompts("train", n, ctx.seed + 7919 * (round_ + 1)))
        rows = [p for p in dist.shard(prompts) for _ in range(st.samples_per_prompt)]
        tok = self.tokenizer
        d = decode_kl(
            self.models,
            self.exps(lam).tolist(),
            rows,
            ctx.task.max_new_tokens,
            tok.pad_token_id,
            tok.eos_token_id,
            ctx.sample_batch_size,
            ctx.meter,
        )
        total, grad = kl_gradients(d, st.samples_per_prompt)
        total, grad = dist.gather_cat(total), dist.gather_cat(grad)
        return estimate_from_totals(total, grad, self.exps, st.samples_per_prompt)


def fit_decoded(
    ctx: RunContext,
    models: list[torch.nn.Module],
    names: list[str],
    exps: Exponents,
    init: torch.Tensor,
    settings: DecodedSettings,
    init_key: str,
    prefix: str = "mpo/",
) -> dict:
    """lambda = argmin max_k h_k(lambda) for the decoded policy, warm-started at ``init``; cached.

    Returns a JSON-able record: the weights, their standard error, the per-round trajectory and
    estimates, and a certifying decode at the answer (h_k, the KL to each decoded model, the dual
    weights mu and the linearised certificate).
    """
    import dataclasses
    import json

    spec = {
        "scores": init_key,
        "policies": {k: ctx.keys[f"dpo/{k}"] for k in names},
        "ref": ctx.keys["sft"],
        "scales": list(exps.scales) if exps.scales is not None else None,
        "init": [round(float(x), 10) for x in init],
        "settings": dataclasses.asdict(settings),
        "max_new_tokens": ctx.task.max_new_tokens,
        "seed": ctx.seed,
    }

    def build(tmp) -> None:
        est = DecodedEstimator(ctx, models, exps, settings)
        with ctx.meter.stage(f"{prefix}decoded"):
            res = solve_minimax(est, init, settings.rounds, settings.radius, settings.average_from)
            final = est(res.weights, settings.rounds, n_prompts=settings.certify_prompts)
        std = (
            bootstrap_std(final, res.weights, settings.radius, settings.bootstrap, ctx.seed)
            if settings.bootstrap
            else torch.full_like(res.weights, float("nan"))
        )
        record = {
            "weights": res.weights.tolist(),
            "weights_std": std.tolist(),
            "trajectory": res.trajectory.tolist(),
            "round_values": res.values.tolist(),
            "round_stderr": res.stderr.tolist(),
            "round_mu": res.mu.tolist(),
            "round_targets": res.targets.tolist(),
            "at_weights": {
                "h": final.values.tolist(),
                "h_stderr": final.stderr.tolist(),
                "kl": final.kl.tolist(),
                "kl_stderr": final.kl_stderr.tolist(),
                **certificate(final, res.weights),
                "prompts": settings.certify_prompts,
            },
        }
        (tmp / "decoded.json").write_text(json.dumps(record))

    art = ctx.cached_stage(f"{prefix}decoded", "mpo_decoded", spec, build)
    return json.loads((art.path / "decoded.json").read_text())
