"""MPO as a method: sample from pi_ref, score log-ratios once, learn lambda by BSMD, mix.

Also the fixed-weight mixture (the closed-form MORLHF optimum pi_w ∝ prod_k pi_k^{w_k}).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mpo_exp.generation import encode_prompts, sample
from mpo_exp.methods import Method, MethodOutput
from mpo_exp.mpo.bsmd import solve_bsmd
from mpo_exp.mpo.mixing import MixedPolicy, resolve_weights
from mpo_exp.scoring import score_sequences

if TYPE_CHECKING:
    from mpo_exp.context import RunContext

log = logging.getLogger(__name__)


def score_log_ratios(ctx: RunContext, n_prompts: int, samples_per_prompt: int) -> torch.Tensor:
    """l[x, j, k] = log pi_k(y_j|x) - log pi_ref(y_j|x) for y_j ~ pi_ref: K+1 scoring passes, cached."""
    ref, singles = ctx.reference, ctx.single_objective_policies
    spec = {
        "ref": ctx.keys["sft"],
        "policies": {k: ctx.keys[f"dpo/{k}"] for k in singles},
        "n_prompts": n_prompts,
        "samples_per_prompt": samples_per_prompt,
        "max_new_tokens": ctx.task.max_new_tokens,
        "seed": ctx.seed,
    }

    def build(tmp: Path) -> None:
        ctx.reseed(3)
        prompts = ctx.task.prompts("train", n_prompts, ctx.seed + 1)
        ids = [p for p in encode_prompts(ref.tokenizer, prompts) for _ in range(samples_per_prompt)]
        with ctx.meter.stage("mpo/sampling"):
            batch = sample(
                ref,
                ids,
                ctx.task.max_new_tokens,
                ctx.batch_size,
                meter=ctx.meter,
                desc="MPO: sampling from pi_ref",
            )
        with ctx.meter.stage("mpo/scoring"):
            logp_ref = score_sequences(
                *ref.live, batch, ctx.batch_size, ctx.meter, desc="MPO: scoring pi_ref"
            )
            cols = [
                score_sequences(
                    [pi.model], [1.0], batch, ctx.batch_size, ctx.meter, desc=f"MPO: scoring {name}"
                )
                - logp_ref
                for name, pi in singles.items()
            ]
        ell = torch.stack(cols, dim=-1).reshape(n_prompts, samples_per_prompt, len(cols))
        torch.save({"log_ratios": ell, "objectives": list(singles)}, tmp / "log_ratios.pt")

    art = ctx.cached_stage("mpo/scores", "mpo_scores", spec, build, stages=("mpo/sampling", "mpo/scoring"))
    return torch.load(art.path / "log_ratios.pt")["log_ratios"]


class MPOMethod(Method):
    name = "mpo"

    def __init__(
        self,
        n_prompts: int = 64,
        samples_per_prompt: int = 16,
        steps: int = 2000,
        lr_scale: float = 1.0,
        batch_prompts: int = 8,
        exclude: list[str] | tuple[str, ...] = (),
        log_every: int = 10,
    ) -> None:
        for field, value in [
            ("n_prompts", n_prompts),
            ("samples_per_prompt", samples_per_prompt),
            ("steps", steps),
            ("batch_prompts", batch_prompts),
            ("log_every", log_every),
        ]:
            if int(value) < 1:
                raise ValueError(f"method.{field} must be >= 1, got {value}")
        if not lr_scale > 0:
            raise ValueError(f"method.lr_scale must be > 0, got {lr_scale}")
        self.n_prompts, self.samples_per_prompt, self.steps = n_prompts, samples_per_prompt, steps
        self.lr_scale, self.batch_prompts, self.log_every = lr_scale, batch_prompts, log_every
        self.exclude = list(exclude)

    def validate(self, objectives: list[str]) -> None:
        unknown = [o for o in self.exclude if o not in objectives]
        if unknown:
            raise ValueError(f"method.exclude: unknown objective(s) {unknown}; objectives are {objectives}")
        if len(self.exclude) >= len(objectives):
            raise ValueError(f"method.exclude leaves no policy to mix (objectives: {objectives})")

    def run(self, ctx: RunContext) -> MethodOutput:
        singles = ctx.single_objective_policies
        ell = score_log_ratios(ctx, self.n_prompts, self.samples_per_prompt)
        names = list(singles)
        keep = [i for i, n in enumerate(names) if n not in self.exclude]
        with ctx.meter.stage("mpo/bsmd"):
            res = solve_bsmd(
                ell[..., keep],
                self.steps,
                self.lr_scale,
                self.batch_prompts,
                seed=ctx.seed,
                objective_every=self.log_every,
                progress=True,
            )
        lam = torch.zeros(len(names))
        lam[keep] = res.weights
        weights = dict(zip(names, lam.tolist(), strict=True))
        log.info(
            "MPO lambda = %s  (F = %.4f, eta = %.4f)",
            {k: round(v, 4) for k, v in weights.items()},
            res.final_objective,
            res.lr,
        )
        for t in range(0, self.steps + 1, self.log_every):
            metrics = {f"mpo/lambda_{names[i]}": float(res.trajectory[t, j]) for j, i in enumerate(keep)}
            metrics["mpo/F"] = float(res.objective[t])
            metrics["mpo/step"] = t
            ctx.log_metrics(metrics)
        name = "mpo" if not self.exclude else "mpo_without_" + "_".join(self.exclude)
        policy = MixedPolicy(name, [singles[n] for n in names], lam.tolist())
        every = slice(None, None, self.log_every)
        return MethodOutput(
            policies=[policy],
            weights=weights,
            own_stages=("mpo/",),
            extras={
                "bsmd": {
                    "objectives": [names[i] for i in keep],
                    "step": list(range(0, self.steps + 1))[every],
                    "trajectory": res.trajectory[every].tolist(),
                    "objective": res.objective[every].tolist(),
                    "final_F": res.final_objective,
                    "lr": res.lr,
                }
            },
        )


class FixedMixMethod(Method):
    """pi_w ∝ prod_k pi_k^{w_k} with user weights: MORLHF's closed-form optimum, no training."""

    name = "fixed_mix"

    def __init__(self, weights: Mapping[str, float] | Sequence[float] | None = None) -> None:
        self.weights = weights

    def validate(self, objectives: list[str]) -> None:
        resolve_weights(self.weights, objectives)

    def run(self, ctx: RunContext) -> MethodOutput:
        singles = ctx.single_objective_policies
        w = resolve_weights(self.weights, list(singles))
        label = "_".join(f"{v:.2f}" for v in w)
        return MethodOutput(
            [MixedPolicy(f"fixed_mix_{label}", list(singles.values()), w)],
            weights=dict(zip(singles, w, strict=True)),
        )
