"""MPO as a method: sample from pi_ref, score log-ratios once, learn lambda by BSMD, mix."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mpo_exp import distributed as dist
from mpo_exp.data import SequenceBatch
from mpo_exp.generation import encode_prompts, sample
from mpo_exp.methods import Method, MethodOutput, dpo_policies_cost
from mpo_exp.mpo.bsmd import bootstrap_bsmd, solve_bsmd
from mpo_exp.mpo.decoded import DecodedSettings, Exponents, fit_decoded
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.scoring import score_policies

if TYPE_CHECKING:
    from mpo_exp.context import RunContext

log = logging.getLogger(__name__)


PROPOSALS = ("reference", "mixture")
OBJECTIVES = ("sequence", "decoded")
CALIBRATIONS = ("none", "std", "kl_ref")


def proposal_counts(proposal: str, k: int, m: int) -> list[int]:
    """Samples per prompt drawn from [pi_ref, pi_1..pi_K]: all from pi_ref, or m/(K+1) from each
    (the remainder from pi_ref, so alpha_i = count_i / m)."""
    if proposal == "reference":
        return [m] + [0] * k
    each = m // (k + 1)
    if each == 0:
        raise ValueError(f"method.proposal=mixture needs method.samples_per_prompt >= K+1 = {k + 1}, got {m}")
    return [m - k * each] + [each] * k


@dataclass
class SampleScores:
    """l[x, j, k] = log pi_k(y_j|x) - log pi_ref(y_j|x) for y_j from the proposal, and where each y_j came
    from: ``counts[i]`` samples per prompt from policy i of [pi_ref, pi_1..pi_K], in that order."""

    log_ratios: torch.Tensor  # (N, m, K)
    counts: list[int]

    @property
    def ref_rows(self) -> slice:
        return slice(0, self.counts[0])

    def proposal_offset(self) -> torch.Tensor:
        """log pi_ref - log q at every sample: 0 for pi_ref alone; -logsumexp_i(log alpha_i + l_i) for
        the mixture q = sum_i alpha_i p_i (l_ref = 0). Every weight pi_lambda/q is then <= 1/min alpha."""
        if self.counts[1:] == [0] * (len(self.counts) - 1):
            return torch.zeros(self.log_ratios.shape[:2], dtype=torch.float64)
        m = sum(self.counts)
        ell = self.log_ratios.double()
        alphas = torch.tensor([c / m for c in self.counts], dtype=torch.float64)
        with_ref = torch.cat([torch.zeros_like(ell[..., :1]), ell], dim=-1)
        return -torch.logsumexp(with_ref + alphas.log(), dim=-1)

    def calibration_scales(self, kind: str, keep: list[int]) -> tuple[float, ...] | None:
        """s_k for the kept objectives, measured on the pi_ref samples, normalised to geometric mean 1
        (so the calibration reweights objectives against each other and leaves the overall scale):
        ``std``: the std of log pi_k/pi_ref; ``kl_ref``: KL(pi_ref || pi_k) = -E_{pi_ref} l_k."""
        if kind == "none":
            return None
        ell = self.log_ratios[:, self.ref_rows].double()[..., keep].reshape(-1, len(keep))
        raw = ell.std(0) if kind == "std" else (-ell.mean(0)).clamp_min(1e-6)
        raw = raw.clamp_min(1e-6)
        return tuple((raw / raw.log().mean().exp()).tolist())


def score_samples(
    ctx: RunContext,
    n_prompts: int,
    samples_per_prompt: int,
    proposal: str = "reference",
    prefix: str = "mpo/",
) -> SampleScores:
    """Sample the proposal (pi_ref, or the mixture of pi_ref and the pi_k) and score log pi_k/pi_ref:
    K+1 scoring passes, cached. Its cost is charged to ``{prefix}sampling`` and ``{prefix}scoring``.

    Under DDP each rank samples and scores its contiguous share of the (prompt, sample) rows and
    the log-probs are gathered in rank order, so every rank holds the whole tensor (BSMD then runs
    once, on rank 0, and lambda is broadcast: :meth:`MPOMethod.run`).
    """
    ref, singles = ctx.reference, ctx.single_objective_policies
    counts = proposal_counts(proposal, len(singles), samples_per_prompt)
    spec = {
        "ref": ctx.keys["sft"],
        "policies": {k: ctx.keys[f"dpo/{k}"] for k in singles},
        "n_prompts": n_prompts,
        "samples_per_prompt": samples_per_prompt,
        "max_new_tokens": ctx.task.max_new_tokens,
        "seed": ctx.seed,
    }
    if proposal != "reference":  # the reference proposal keeps the key it always had
        spec["proposal"] = proposal

    def build(tmp: Path) -> None:
        ctx.reseed(3)
        dist.seed_rank_stream()
        prompts = ctx.task.prompts("train", n_prompts, ctx.seed + 1)
        sources = [i for i, c in enumerate(counts) for _ in range(c)]
        rows = [(p, i) for p in encode_prompts(ref.tokenizer, prompts) for i in sources]
        mine = list(dist.shard(rows))  # this rank's contiguous (prompt, sample) rows; all in one process
        samplers = [ref, *(MixedPolicy.single(pi) for pi in singles.values())]
        # pi_ref's own log-probs come from decoding where they equal scoring (fp32, pi_ref samples only)
        own = proposal == "reference" and ctx.dtype == "float32"
        batches, order, ref_logp = [], [], []
        with ctx.meter.stage(f"{prefix}sampling"):
            for i, policy in enumerate(samplers):
                idx = [r for r, (_, src) in enumerate(mine) if src == i]
                if not idx:
                    continue
                who = "pi_ref" if i == 0 else policy.name
                drawn = sample(
                    policy,
                    [mine[r][0] for r in idx],
                    ctx.task.max_new_tokens,
                    ctx.sample_batch_size,
                    meter=ctx.meter,
                    desc=f"MPO: sampling from {who}",
                    with_logprobs=own,
                )
                if own:
                    drawn, logp_ref = drawn
                    ref_logp.append(logp_ref)
                batches.append(drawn)
                order += idx
        batch = batches[0] if len(batches) == 1 else SequenceBatch.concat(batches, ref.tokenizer.pad_token_id)
        with ctx.meter.stage(f"{prefix}scoring"):
            models = [*([] if own else [ref.policies[0].model]), *(pi.model for pi in singles.values())]
            logp = score_policies(models, batch, ctx.batch_size, ctx.meter, desc="MPO: scoring pi_k")
            if own:
                logp = torch.cat([torch.cat(ref_logp).unsqueeze(1).to(logp), logp], dim=1)
        logp = logp[torch.argsort(torch.tensor(order))]  # back to (prompt, sample) row order
        logp = dist.gather_cat(logp)  # every rank's rows in rank order: the single-process row order
        ell = (logp[:, 1:] - logp[:, :1]).reshape(n_prompts, samples_per_prompt, len(singles))
        torch.save({"log_ratios": ell, "objectives": list(singles), "counts": counts}, tmp / "log_ratios.pt")

    stages = (f"{prefix}sampling", f"{prefix}scoring")
    art = ctx.cached_stage(f"{prefix}scores", "mpo_scores", spec, build, stages=stages)
    saved = torch.load(art.path / "log_ratios.pt")
    return SampleScores(saved["log_ratios"], saved.get("counts", counts))


def score_log_ratios(ctx: RunContext, n_prompts: int, samples_per_prompt: int) -> torch.Tensor:
    """l[x, j, k] = log pi_k(y_j|x) - log pi_ref(y_j|x) for y_j ~ pi_ref (the paper's estimator's input)."""
    return score_samples(ctx, n_prompts, samples_per_prompt).log_ratios


def sample_coverage(log_ratios: torch.Tensor, names: list[str]) -> dict[str, dict[str, float]]:
    """How well the cached pi_ref samples stand for each pi_k, per objective.

    ``F_vertex``: F-hat(e_k) = mean_x log (1/m) sum_j pi_k(y_j|x)/pi_ref(y_j|x). Its exact value is
    log E_{pi_ref} pi_k/pi_ref = 0; the estimate is biased low (the log of a sample mean), and by
    much when pi_k puts its mass where m samples of pi_ref rarely go. ``ess``: the importance
    weights' effective sample size (sum w)^2 / sum w^2, mean over prompts, out of m.
    """
    ell = log_ratios.double()
    m = ell.shape[1]
    f_vertex = (torch.logsumexp(ell, dim=1) - math.log(m)).mean(0)
    w = torch.softmax(ell, dim=1)
    ess = (1.0 / (w**2).sum(1)).mean(0)
    return {
        n: {"F_vertex": float(f_vertex[i]), "ess": float(ess[i]), "samples_per_prompt": m}
        for i, n in enumerate(names)
    }


class MPOMethod(Method):
    """MPO: score log pi_k/pi_ref once on pi_ref samples, learn lambda by BSMD, mix.

    Solver fields (see :func:`mpo_exp.mpo.bsmd.solve_bsmd`): ``steps``, ``lr_scale`` (c),
    ``batch_prompts`` (None = every cached prompt per step), ``step_size`` ("adaptive":
    AdaGrad-norm, scale-free; "fixed": the paper's c/sqrt(T)), ``average_from`` (fraction of
    the steps after which iterates are averaged; 0 = the paper's full average).
    ``gap_tolerance`` / ``gap_tolerance_abs``: a warning is logged when the Frank-Wolfe gap
    exceeds max(gap_tolerance_abs, gap_tolerance · (F̂(uniform) - F̂(lambda) + gap)), i.e. when
    more than a ``gap_tolerance`` fraction of the uniform start's excess F̂ may be left (absolute
    floor in nats of F̂). ``bootstrap``: prompt-resampling replicates for lambda's std (0 = off).
    """

    name = "mpo"

    def __init__(
        self,
        n_prompts: int = 64,
        samples_per_prompt: int = 16,
        steps: int = 2000,
        lr_scale: float = 1.0,
        batch_prompts: int | None = None,
        exclude: list[str] | tuple[str, ...] = (),
        log_every: int = 10,
        step_size: str = "adaptive",
        average_from: float = 0.5,
        gap_tolerance: float = 0.01,
        gap_tolerance_abs: float = 1e-4,
        coverage_tolerance: float = 1.0,
        bootstrap: int = 50,
        objective: str = "decoded",
        proposal: str = "reference",
        calibration: str = "none",
        decoded: Mapping | None = None,
    ) -> None:
        self._init_kwargs = {k: v for k, v in locals().items() if k != "self"}
        for field, value in [
            ("n_prompts", n_prompts),
            ("samples_per_prompt", samples_per_prompt),
            ("steps", steps),
            ("batch_prompts", batch_prompts),
            ("log_every", log_every),
        ]:
            if value is not None and int(value) < 1:
                raise ValueError(f"method.{field} must be >= 1, got {value}")
        if n_prompts is None or samples_per_prompt is None or steps is None or log_every is None:
            raise ValueError("method.n_prompts, samples_per_prompt, steps and log_every must be set")
        if not lr_scale > 0:
            raise ValueError(f"method.lr_scale must be > 0, got {lr_scale}")
        if step_size not in ("adaptive", "fixed"):
            raise ValueError(f"method.step_size must be 'adaptive' or 'fixed', got {step_size!r}")
        if not 0 <= average_from < 1:
            raise ValueError(f"method.average_from must be in [0, 1), got {average_from}")
        if not gap_tolerance >= 0 or not gap_tolerance_abs >= 0:
            raise ValueError(
                f"method.gap_tolerance and method.gap_tolerance_abs must be >= 0, "
                f"got {gap_tolerance} and {gap_tolerance_abs}"
            )
        if int(bootstrap) < 0 or int(bootstrap) == 1:
            raise ValueError(f"method.bootstrap must be 0 (off) or >= 2 replicates, got {bootstrap}")
        self.n_prompts, self.samples_per_prompt, self.steps = n_prompts, samples_per_prompt, steps
        self.lr_scale, self.batch_prompts, self.log_every = lr_scale, batch_prompts, log_every
        self.step_size, self.average_from = step_size, float(average_from)
        self.gap_tolerance, self.gap_tolerance_abs = float(gap_tolerance), float(gap_tolerance_abs)
        if not coverage_tolerance > 0:
            raise ValueError(f"method.coverage_tolerance must be > 0, got {coverage_tolerance}")
        self.coverage_tolerance = float(coverage_tolerance)
        self.bootstrap = int(bootstrap)
        self.exclude = list(exclude)
        for field, value, allowed in [
            ("objective", objective, OBJECTIVES),
            ("proposal", proposal, PROPOSALS),
            ("calibration", calibration, CALIBRATIONS),
        ]:
            if value not in allowed:
                raise ValueError(f"method.{field} must be one of {allowed}, got {value!r}")
        self.objective, self.proposal, self.calibration = objective, proposal, calibration
        decoded = dict(decoded or {})
        unknown = sorted(set(decoded) - {f.name for f in dataclasses.fields(DecodedSettings)})
        if unknown:
            raise ValueError(f"method.decoded.{unknown[0]}: unknown field")
        self.decoded = DecodedSettings(**decoded)
        if proposal == "mixture":
            proposal_counts(proposal, 1, int(samples_per_prompt))  # m >= 2 at least; K checked in validate

    def validate(self, objectives: list[str]) -> None:
        unknown = [o for o in self.exclude if o not in objectives]
        if unknown:
            raise ValueError(f"method.exclude: unknown objective(s) {unknown}; objectives are {objectives}")
        if len(self.exclude) >= len(objectives):
            raise ValueError(f"method.exclude leaves no policy to mix (objectives: {objectives})")
        proposal_counts(self.proposal, len(objectives), int(self.samples_per_prompt))

    def variant(self, **overrides) -> MPOMethod:
        """The same MPO with some fields replaced (e.g. ``objective="decoded"``), validated anew."""
        return MPOMethod(**{**self._init_kwargs, **overrides})

    @property
    def stage_prefix(self) -> str:
        """Cost-meter stages of this variant: ``mpo/`` for the paper's estimator, ``<label>/`` otherwise
        (so that variants run in one job, as ``method=landscape`` does, are each charged their own work)."""
        return self.label + "/"

    @property
    def label(self) -> str:
        """The policy's name: ``mpo`` for the paper's estimator, else the options that differ from it."""
        parts = [] if self.objective == "sequence" else [self.objective]
        parts += [] if self.proposal == "reference" else [self.proposal]
        parts += [] if self.calibration == "none" else [f"cal_{self.calibration}"]
        base = "_".join(["mpo", *parts])
        return base if not self.exclude else base + "_without_" + "_".join(self.exclude)

    def run(self, ctx: RunContext) -> MethodOutput:
        singles = ctx.single_objective_policies
        prefix = self.stage_prefix
        scores = score_samples(ctx, self.n_prompts, self.samples_per_prompt, self.proposal, prefix)
        ell = scores.log_ratios
        names = list(singles)
        keep = [i for i, n in enumerate(names) if n not in self.exclude]
        scales = scores.calibration_scales(self.calibration, keep)
        # the solver's input: l_k/s_k + log pi_ref - log q, so that lambda·input = log(pi_lambda / q)
        solver_ell = ell[..., keep].double() / torch.tensor(scales or [1.0] * len(keep), dtype=torch.float64)
        solver_ell = solver_ell + scores.proposal_offset().unsqueeze(-1)
        res = None
        if dist.is_main():  # under DDP: BSMD runs once, on rank 0, and lambda is broadcast
            with ctx.meter.stage(f"{prefix}bsmd"):
                res = solve_bsmd(
                    solver_ell,
                    self.steps,
                    self.lr_scale,
                    self.batch_prompts,
                    seed=ctx.seed,
                    objective_every=self.log_every,
                    progress=True,
                    step_size=self.step_size,
                    average_from=self.average_from,
                )
            if self.bootstrap:  # lambda's statistical error: reported, needed by no method
                with ctx.meter.stage(f"diagnostics/{self.label}_bootstrap"):
                    res = bootstrap_bsmd(res, solver_ell, self.bootstrap, seed=ctx.seed)
        res = dist.broadcast_object(res)
        lam = torch.zeros(len(names))
        lam[keep] = res.weights
        weights = dict(zip(names, lam.tolist(), strict=True))
        lam_std = None
        if res.weights_std is not None:
            std = torch.zeros(len(names))
            std[keep] = res.weights_std
            lam_std = std.tolist()
        tolerance = res.gap_tolerance(self.gap_tolerance, self.gap_tolerance_abs)
        log.info(
            "MPO lambda = %s%s  (F(lambda) = %.4f, Frank-Wolfe gap = %.3g <= tolerance %.3g: %s; "
            "step size %s, last eta = %.4g, %d prompts/step)",
            {k: round(v, 4) for k, v in weights.items()},
            ""
            if lam_std is None
            else f" ± {dict(zip(names, [round(v, 4) for v in lam_std], strict=True))}"
            f" (bootstrap std, {self.bootstrap} replicates)",
            res.objective_at_weights,
            res.fw_gap,
            tolerance,
            res.fw_gap <= tolerance,
            res.step_size,
            res.lr,
            res.batch_prompts,
        )
        if res.fw_gap > tolerance:
            log.warning(
                "MPO: BSMD's lambda is not certified: Frank-Wolfe gap %.3g > tolerance %.3g, so F(lambda) "
                "may be up to %.3g above its minimum on the cached scores. Raise method.steps (now %d), use "
                "every cached prompt per step (method.batch_prompts=null, now %s), method.step_size=adaptive "
                "(now %s) or a later method.average_from (now %g); more cached samples "
                "(method.n_prompts, method.samples_per_prompt) shrink lambda's statistical error instead.",
                res.fw_gap,
                tolerance,
                res.fw_gap,
                self.steps,
                self.batch_prompts,
                self.step_size,
                self.average_from,
            )
        kept = [names[i] for i in keep]
        coverage = sample_coverage(ell[..., keep].double() + scores.proposal_offset().unsqueeze(-1), kept)
        worst = min(coverage, key=lambda k: coverage[k]["F_vertex"])
        if coverage[worst]["F_vertex"] < -self.coverage_tolerance:
            log.warning(
                "MPO: the %s samples barely cover pi_%s: F-hat(e_%s) = %.3g where F(e_k) = 0 exactly, "
                "importance-sampling effective sample size %.2g of m=%d per prompt. F-hat is then biased "
                "low most where the samples cover a pi_k least, and lambda minimises that bias as much as "
                "F: method.proposal=mixture bounds the weights, method.objective=decoded fits the decoded "
                "policy on its own samples; or raise method.samples_per_prompt. "
                "(Tolerance: method.coverage_tolerance=%g nats.)",
                "pi_ref" if self.proposal == "reference" else "proposal",
                worst,
                worst,
                coverage[worst]["F_vertex"],
                coverage[worst]["ess"],
                ell.shape[1],
                self.coverage_tolerance,
            )
        for t in range(0, self.steps + 1, self.log_every):
            metrics = {f"mpo/lambda_{names[i]}": float(res.trajectory[t, j]) for j, i in enumerate(keep)}
            metrics["mpo/F"] = float(res.objective[t])
            metrics["mpo/step"] = t
            ctx.log_metrics(metrics)
        ctx.log_metrics({"mpo/fw_gap": res.fw_gap, "mpo/F_at_lambda": res.objective_at_weights})
        exps = Exponents(len(keep), scales)
        extras: dict = {
            "options": {
                "objective": self.objective,
                "proposal": self.proposal,
                "calibration": self.calibration,
            },
            "calibration_scales": None if scales is None else dict(zip(kept, scales, strict=True)),
        }
        if self.objective == "decoded":
            models = [singles[n].model for n in kept]
            if exps.with_ref:
                models.append(ctx.reference.policies[0].model)
            record = fit_decoded(
                ctx,
                models,
                kept,
                exps,
                res.weights.double(),
                self.decoded,
                ctx.keys[f"{prefix}scores"],
                prefix,
            )
            extras["sequence_lambda"] = dict(zip(names, lam.tolist(), strict=True))
            lam = torch.zeros(len(names))
            lam[keep] = torch.tensor(record["weights"], dtype=torch.float32)
            lam = lam / lam.sum()
            std = torch.zeros(len(names))
            std[keep] = torch.tensor(record["weights_std"], dtype=torch.float32)
            lam_std = std.tolist()
            weights = dict(zip(names, lam.tolist(), strict=True))
            at = record["at_weights"]
            log.info(
                "MPO (decoded) lambda = %s ± %s (bootstrap std); at lambda: max-min objective h = %s ± %s, "
                "dual weights mu = %s, certificate %.3g nats",
                {k: round(v, 4) for k, v in weights.items()},
                [round(v, 4) for v in record["weights_std"]],
                [round(v, 3) for v in at["h"]],
                [round(v, 3) for v in at["h_stderr"]],
                [round(v, 3) for v in at["mu"]],
                at["certificate"],
            )
            extras["decoded"] = {"objectives": kept, **record}
        exponents = exps(lam[keep].double()).tolist()
        mixed = [singles[n] for n in kept] + ([ctx.reference.policies[0]] if exps.with_ref else [])
        extras["exponents"] = dict(
            zip([*kept, *(["pi_ref"] if exps.with_ref else [])], exponents, strict=True)
        )
        name = self.label
        policy = (
            MixedPolicy(name, mixed, exponents, affine=True)
            if exps.with_ref
            else MixedPolicy(name, [singles[n] for n in names], lam.tolist())
        )
        every = slice(None, None, self.log_every)
        kept_std = None if res.weights_std is None else res.weights_std.tolist()
        return MethodOutput(
            policies=[policy],
            # the mixture needs the kept pi_k's DPO runs plus MPO's own sampling, scoring and BSMD
            costs={name: dpo_policies_cost(kept, prefix)},
            weights=weights,
            extras={
                # lambda's statistical error per objective (all objectives; 0 if excluded): the bootstrap
                # std over prompts of the cache (sequence objective) or of the final decode (decoded)
                "lambda_std": lam_std,
                # scale of the pi_k's implicit rewards beta*log(pi_k/pi_ref) on pi_ref samples, to set
                # beside the reward models' (results["reward_models"][k]["std"] of the RL baselines)
                "implicit_reward_std": dict(
                    zip(
                        names,
                        (ctx.beta * ell[:, scores.ref_rows].double()).reshape(-1, len(names)).std(0).tolist(),
                        strict=True,
                    )
                ),
                # how well the cached proposal samples cover each pi_k (see sample_coverage)
                "coverage": coverage,
                **extras,
                "bsmd": {
                    "objectives": kept,
                    "step": list(range(0, self.steps + 1))[every],
                    "trajectory": res.trajectory[every].tolist(),
                    "objective": res.objective[every].tolist(),
                    "final_F": res.final_objective,
                    "F_at_lambda": res.objective_at_weights,
                    "F_at_uniform": res.objective_at_init,
                    "lr": res.lr,
                    "step_size": res.step_size,
                    "batch_prompts": res.batch_prompts,
                    "average_from_step": res.average_from,
                    "fw_gap": res.fw_gap,
                    "fw_gap_tolerance": tolerance,
                    "certified": res.fw_gap <= tolerance,
                    # std in the order of bsmd.objectives (the mixed objectives)
                    "bootstrap": {"replicates": self.bootstrap, "std": kept_std},
                },
            },
        )
