"""MOD / fixed-weight mixing: the closed-form MORLHF optimum pi_w ∝ prod_k pi_k^{w_k}, no training."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from mpo_exp.methods import Method, MethodOutput, dpo_policies_cost
from mpo_exp.mpo.method import MPOMethod
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.mpo.user_weights import check_user_weights, resolve_user_weights

if TYPE_CHECKING:
    from mpo_exp.context import RunContext


class FixedMixMethod(Method):
    """MOD (Shi et al., 2024; ``method=mod``): pi_w ∝ prod_k pi_k^{w_k} with user weights, decoded
    token by token -- MORLHF's closed-form optimum, no training. Shown as "MOD (fixed_mix)"."""

    name = "fixed_mix"

    def __init__(
        self, weights: Mapping[str, float] | Sequence[float] | str | None = None, mpo: MPOMethod | None = None
    ) -> None:
        self.weights, self.mpo = weights, mpo

    def validate(self, objectives: list[str]) -> None:
        check_user_weights(self.weights, self.mpo, objectives)

    def run(self, ctx: RunContext) -> MethodOutput:
        singles = ctx.single_objective_policies
        uw = resolve_user_weights(self.weights, self.mpo, ctx)
        w = uw.vector
        # weights=mpo: MPO's lambda (this policy is MPO's); otherwise named by its weights
        name = "fixed_mix_" + (uw.suffix if uw.own else "_".join(f"{v:.2f}" for v in w))
        if uw.own:  # MPO's policy, so MPO's cost: every pi_k its lambda was solved on, a zero weight too
            assert self.mpo is not None
            used = [o for o in singles if o not in self.mpo.exclude]
        else:  # a pi_k with zero weight is not in the mixture and never built for it
            used = [o for o, x in zip(singles, w, strict=True) if x > 0]
        return MethodOutput(
            [MixedPolicy(name, list(singles.values()), w)],
            costs={name: dpo_policies_cost(used, *uw.own)},
            weights=dict(zip(singles, w, strict=True)),
            extras=uw.extras,
        )
