"""MORLHF, MaxMin-RLHF (group-min, sample-min, EM groups) and Rewarded Soups as methods."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from baselines.aggregation import NORMALIZATIONS, RewardAggregator
from baselines.em import em_user_groups, purity
from baselines.reward_model import RewardModel, bt_loss, reward_models, score_with_rm
from baselines.rl import train_rl_policy
from baselines.soups import average_state_dicts
from mpo_exp.methods import Method, MethodOutput
from mpo_exp.mpo.mixing import MixedPolicy, resolve_weights
from mpo_exp.policies import Policy

if TYPE_CHECKING:
    from mpo_exp.context import RunContext
    from mpo_exp.mpo.method import MPOMethod

log = logging.getLogger(__name__)

RL_TOTAL = ("preferences", "rm/", "rl/")


def _aggregator(
    ctx: RunContext, rms: list[RewardModel], rule: str, normalization: str, weights: list[float] | None = None
) -> RewardAggregator:
    return RewardAggregator(
        [r.model for r in rms],
        [r.objective for r in rms],
        [r.mean for r in rms],
        [r.std for r in rms],
        rule,
        normalization,
        weights,
        ctx.meter,
    )


def _rm_summary(rms: list[RewardModel]) -> dict:
    return {r.objective: {"heldout_accuracy": r.heldout_accuracy, "mean": r.mean, "std": r.std} for r in rms}


class MORLHFMethod(Method):
    """PPO on r_w = sum_k w_k r~_k with user weights (default uniform)."""

    name = "morlhf"

    def __init__(
        self, weights: Mapping[str, float] | Sequence[float] | None = None, normalization: str = "zscore"
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"method.normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.weights, self.normalization = weights, normalization

    def validate(self, objectives: list[str]) -> None:
        resolve_weights(self.weights, objectives)

    def run(self, ctx: RunContext) -> MethodOutput:
        objectives = ctx.task.objectives
        w = resolve_weights(self.weights, objectives)
        rms = list(reward_models(ctx).values())
        label = "morlhf" if self.weights is None else "morlhf_" + "_".join(f"{x:.2f}" for x in w)
        spec = {
            "method": "morlhf",
            "weights": w,
            "normalization": self.normalization,
            "rms": [ctx.keys[f"rm/{o}"] for o in objectives],
        }
        policy, history = train_rl_policy(
            ctx, label, spec, lambda: _aggregator(ctx, rms, "weighted", self.normalization, w)
        )
        return MethodOutput(
            [MixedPolicy.single(policy)],
            weights=dict(zip(objectives, w, strict=True)),
            own_stages=("rm/", "rl/"),
            total_stages=RL_TOTAL,
            extras={"reward_models": _rm_summary(rms), "rl_history": {label: history}},
        )


class MaxMinRLHFMethod(Method):
    """PPO on the worst objective: group-min (the paper) and/or sample-min (the public code).

    ``groups="em"`` first recovers reward models for users whose group is unknown, by
    hard-assignment EM over synthetic users drawn from the objectives' labels.
    """

    name = "maxmin_rlhf"
    VARIANTS = ("group_min", "sample_min")

    def __init__(
        self,
        variants: list[str] | tuple[str, ...] = VARIANTS,
        normalization: str = "zscore",
        groups: str = "known",
        em: dict | None = None,
    ) -> None:
        bad = [v for v in variants if v not in self.VARIANTS]
        if bad or not variants:
            raise ValueError(
                f"method.variants must be a non-empty subset of {self.VARIANTS}, got {list(variants)}"
            )
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"method.normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if groups not in ("known", "em"):
            raise ValueError(f"method.groups must be 'known' or 'em', got {groups!r}")
        self.variants, self.normalization, self.groups = list(variants), normalization, groups
        self.em = {"users": 24, "iterations": 5, "rm_steps": 40, **(dict(em) if em else {})}

    def run(self, ctx: RunContext) -> MethodOutput:
        extras: dict = {"rl_history": {}}
        if self.groups == "known":
            rms = list(reward_models(ctx).values())
            rm_keys = [ctx.keys[f"rm/{o}"] for o in ctx.task.objectives]
        else:
            with ctx.meter.stage("rm/em"):
                rms, em_info = em_reward_models(ctx, **self.em)
            rm_keys = [f"em:{em_info['spec_key']}"]
            extras["em"] = em_info
        extras["reward_models"] = _rm_summary(rms)
        policies = []
        for variant in self.variants:
            label = f"maxmin_rlhf_{variant}" + ("_em" if self.groups == "em" else "")
            spec = {
                "method": "maxmin_rlhf",
                "variant": variant,
                "normalization": self.normalization,
                "rms": rm_keys,
            }
            rule = variant
            policy, history = train_rl_policy(
                ctx, label, spec, lambda rule=rule: _aggregator(ctx, rms, rule, self.normalization)
            )
            policies.append(MixedPolicy.single(policy))
            extras["rl_history"][label] = history
        return MethodOutput(policies, own_stages=("rm/", "rl/"), total_stages=RL_TOTAL, extras=extras)


def em_reward_models(
    ctx: RunContext, users: int, iterations: int, rm_steps: int
) -> tuple[list[RewardModel], dict]:
    """Synthetic users each label their share of pairs with one hidden objective; EM recovers the groups."""
    from hydra.utils import instantiate

    from baselines.reward_model import load_reward_model
    from mpo_exp.artifacts import config_key
    from mpo_exp.data import PreferenceDataset

    pairs, k = ctx.pairs, len(ctx.task.objectives)
    pad = ctx.reference.tokenizer.pad_token_id
    truth = [u % k for u in range(users)]
    owner = torch.arange(len(pairs.a)) % users  # pair i is labelled by user owner[i]
    labelled = [
        pairs.dataset(g, pad, drop_ties=False) for g in range(k)
    ]  # every pair, labelled by objective g
    datasets = [
        labelled[truth[u]].subset(((owner == u) & ~pairs.tie[:, truth[u]]).nonzero().squeeze(-1).tolist())
        for u in range(users)
    ]
    cfg = ctx.cfg.reward_model

    def fit(members):
        merged = PreferenceDataset.concat([datasets[u] for u in members])
        model = load_reward_model(ctx.store.path("sft", ctx.keys["sft"]))
        ctx.fit(instantiate(cfg.module)(model=model), merged, merged.collate, cfg, max_steps=rm_steps)
        return model

    def loglik(model, u: int) -> float:
        batch = datasets[u].collate(list(range(len(datasets[u]))))
        c, r = score_with_rm(model, batch.chosen), score_with_rm(model, batch.rejected)
        return -float(bt_loss(c, r)) * len(datasets[u])

    start = time.perf_counter()
    ctx.reseed(30)
    result = em_user_groups(users, k, fit, loglik, iterations=iterations, seed=ctx.seed)
    score = purity(result.assignment, truth)
    log.info("EM over %d users: purity %.3f after %d iterations", users, score, result.iterations)
    rms = []
    for g, model in enumerate(result.models):
        s = torch.cat([score_with_rm(model, pairs.a), score_with_rm(model, pairs.b)])
        rms.append(RewardModel(f"group{g}", model, float(s.mean()), float(s.std()), float("nan")))
    info = {
        "purity": score,
        "iterations": result.iterations,
        "assignment": result.assignment,
        "truth": truth,
        "wall_s": time.perf_counter() - start,
        "spec_key": config_key(
            {
                "sft": ctx.keys["sft"],
                "pairs": ctx.keys["preferences"],
                "users": users,
                "iterations": iterations,
                "rm_steps": rm_steps,
                "seed": ctx.seed,
            }
        ),
    }
    return rms, info


class RewardSoupsMethod(Method):
    """Average the pi_k's parameters: uniformly, and weighted by MPO's lambda ("Weighted RS")."""

    name = "reward_soups"

    def __init__(self, mpo: MPOMethod | None = None) -> None:
        self.mpo = mpo

    def _soup(self, ctx: RunContext, name: str, weights: list[float]) -> Policy:
        singles = list(ctx.single_objective_policies.values())
        with ctx.meter.stage(f"soup/{name}"):
            model = type(singles[0].model)(singles[0].model.config)
            model.load_state_dict(average_state_dicts([p.model.state_dict() for p in singles], weights))
        return Policy(name, model.eval(), singles[0].tokenizer)

    def run(self, ctx: RunContext) -> MethodOutput:
        objectives = ctx.task.objectives
        uniform = [1 / len(objectives)] * len(objectives)
        policies = [MixedPolicy.single(self._soup(ctx, "reward_soup", uniform))]
        extras: dict = {}
        weights = None
        if self.mpo is not None:
            lam = self.mpo.run(ctx).weights
            weights = lam
            policies.append(
                MixedPolicy.single(self._soup(ctx, "weighted_reward_soup", [lam[o] for o in objectives]))
            )
            extras["soup_weights"] = {
                "reward_soup": uniform,
                "weighted_reward_soup": [lam[o] for o in objectives],
            }
        return MethodOutput(
            policies,
            weights=weights,
            own_stages=("soup/", "mpo/"),
            total_stages=("preferences", "dpo/", "soup/", "mpo/"),
            extras=extras,
        )
