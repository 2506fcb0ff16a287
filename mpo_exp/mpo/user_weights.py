"""User weights for the methods that take them: fixed, uniform, or MPO's λ from this run.

In the max-min comparison a weight-taking method gets two rows: uniform weights
(``method.weights=null``) and MPO's λ (``method.weights=mpo``), the same nested MPO that
Weighted Reward Soups uses, so the λ comes from this run's cached π_ref scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mpo_exp.mpo.mixing import resolve_weights

if TYPE_CHECKING:
    from mpo_exp.context import RunContext
    from mpo_exp.mpo.method import MPOMethod

MPO = "mpo"
Weights = Mapping[str, float] | Sequence[float] | str | None


@dataclass
class ResolvedWeights:
    """A simplex vector in objective order, the policy-name suffix it implies, and what it cost."""

    vector: list[float]
    suffix: str  # "" (uniform), "mpo_lambda", or "0.50_0.30_0.20"
    #: shared stages the weights need (MPO's λ: every π_k) and the weights' own work (MPO's stages)
    shared: tuple[str, ...] = ()
    own: tuple[str, ...] = ()
    extras: dict = field(default_factory=dict)


def check_user_weights(weights: Weights, mpo: MPOMethod | None, objectives: list[str]) -> None:
    """Raise ``ValueError`` naming ``method.weights`` (or ``method.mpo``) when the setting cannot work."""
    if isinstance(weights, str):
        if weights != MPO:
            raise ValueError(f"method.weights must be null, 'mpo', a list or a mapping, got {weights!r}")
        if mpo is None:
            raise ValueError("method.weights=mpo needs the nested MPO config method.mpo")
        mpo.validate(objectives)
        return
    resolve_weights(weights, objectives)


def resolve_user_weights(weights: Weights, mpo: MPOMethod | None, ctx: RunContext) -> ResolvedWeights:
    """The weight vector for this run; ``weights="mpo"`` runs (or reuses) MPO on the shared π_k."""
    objectives = ctx.task.objectives
    check_user_weights(weights, mpo, objectives)
    if weights == MPO:
        assert mpo is not None
        out = mpo.run(ctx)
        assert out.weights is not None
        extras = {k: v for k, v in out.extras.items() if k in ("bsmd", "lambda_std", "options")}
        extras["mpo_policy"] = out.policies[0].name  # which MPO variant's lambda (the report's row for MOD)
        shared = ("dpo/ref_logp", *(f"dpo/{o}" for o in objectives))
        own = (mpo.stage_prefix,)
        return ResolvedWeights([out.weights[o] for o in objectives], "mpo_lambda", shared, own, extras)
    vector = resolve_weights(weights, objectives)
    suffix = "" if weights is None else "_".join(f"{x:.2f}" for x in vector)
    return ResolvedWeights(vector, suffix)
