"""MORLHF, MaxMin-RLHF (group-min, sample-min, EM groups) and Rewarded Soups as methods."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from baselines.aggregation import RewardAggregator
from baselines.checkpoints import add_checkpoints
from baselines.em import em_user_groups, purity
from baselines.normalization import Normalizer, check_normalization
from baselines.reward_model import RewardModel, bt_loss, reference_scores, reward_models, score_with_rm
from baselines.rl import rl_budget, rl_train_prompts, train_rl_policy
from baselines.soups import average_state_dicts
from mpo_exp.adapters import full_model
from mpo_exp.generation import encode_prompts
from mpo_exp.methods import Method, MethodOutput, PolicyCost, dpo_policies_cost
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.mpo.user_weights import check_user_weights, resolve_user_weights
from mpo_exp.policies import Policy

if TYPE_CHECKING:
    from mpo_exp.context import RunContext
    from mpo_exp.mpo.method import MPOMethod

log = logging.getLogger(__name__)


def rl_cost(reward_model_stages: Sequence[str], rl_stage: str) -> PolicyCost:
    """An RL baseline pays for the pairs, its reward models, their normalisation and its own RL run."""
    own = (*reward_model_stages, "rm/ref_samples", "rm/normalizer", rl_stage)
    return PolicyCost(("preferences", *own), own)


def _normalizer(ctx: RunContext, rms: list[RewardModel], keys: list[str], how: str) -> Normalizer:
    if how == "none":  # nothing to fit: no pi_ref samples are drawn or paid for
        k = len(rms)
        return Normalizer("none", torch.zeros(k), torch.ones(k), [{} for _ in rms])
    models = [r.model for r in rms]
    if how != "partition_prompt":
        return Normalizer.fit(reference_scores(ctx, models, keys), how, ctx.beta)
    # one shift per distinct RL training prompt, looked up by token ids in the reward function
    texts = rl_train_prompts(ctx)
    by_ids: dict[tuple[int, ...], str] = {}
    for ids, text in zip(encode_prompts(ctx.reference.tokenizer, texts), texts, strict=True):
        by_ids.setdefault(tuple(ids), text)
    scores = reference_scores(ctx, models, keys, prompts=list(by_ids.values()))
    return Normalizer.fit(scores, how, ctx.beta, prompts=list(by_ids))


def _rl_budget(ctx: RunContext, history: list[dict]) -> dict:
    cfg = ctx.cfg.rl
    return rl_budget(history, ctx.beta, int(cfg.batch_size), float(cfg.plateau_tol))


def _rm_summary(rms: list[RewardModel], normalizer: Normalizer) -> dict:
    return {
        r.objective: {"heldout_accuracy": r.heldout_accuracy, "budget": r.budget, **stats}
        for r, stats in zip(rms, normalizer.stats, strict=True)
    }


class MORLHFMethod(Method):
    """PPO on r_w = sum_k w_k r~_k with user weights: uniform (``weights=null``), fixed, or MPO's
    lambda from this run (``weights=mpo``, the max-min table's second row)."""

    name = "morlhf"

    def __init__(
        self,
        weights: Mapping[str, float] | Sequence[float] | str | None = None,
        normalization: str = "partition",
        mpo: MPOMethod | None = None,
    ) -> None:
        self.weights, self.normalization = weights, check_normalization(normalization)
        self.mpo = mpo

    def validate(self, objectives: list[str]) -> None:
        check_user_weights(self.weights, self.mpo, objectives)

    def run(self, ctx: RunContext) -> MethodOutput:
        objectives = ctx.task.objectives
        uw = resolve_user_weights(self.weights, self.mpo, ctx)
        w = uw.vector
        rms = list(reward_models(ctx).values())
        keys = [ctx.keys[f"rm/{o}"] for o in objectives]
        norm = _normalizer(ctx, rms, keys, self.normalization)
        label = "morlhf" + (f"_{uw.suffix}" if uw.suffix else "")
        spec = {"method": "morlhf", "weights": w, "normalizer": norm.spec(), "rms": keys}
        policy, history, checkpoints = train_rl_policy(
            ctx,
            label,
            spec,
            lambda: RewardAggregator([r.model for r in rms], objectives, norm, "weighted", w, ctx.meter),
        )
        cost = rl_cost([f"rm/{o}" for o in objectives], f"rl/{label}")
        if uw.shared or uw.own:  # MPO's lambda: the pi_k and MPO's own stages come with it
            cost = PolicyCost((*cost.total, *uw.shared, *uw.own), (*cost.post_processing, *uw.own))
        policies, costs = [MixedPolicy.single(policy)], {label: cost}
        add_checkpoints(ctx, (f"rl/{label}",), cost, checkpoints, policies, costs)
        return MethodOutput(
            policies,
            costs=costs,
            weights=dict(zip(objectives, w, strict=True)),
            extras={
                **uw.extras,
                "reward_models": _rm_summary(rms, norm),
                "reward_normalization": self.normalization,
                "rl_history": {label: history},
                "rl_budget": {label: _rl_budget(ctx, history)},
                "rl_checkpoints": {label: [p for _, p in checkpoints]},
            },
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
        normalization: str = "partition",
        groups: str = "known",
        em: dict | None = None,
    ) -> None:
        bad = [v for v in variants if v not in self.VARIANTS]
        if bad or not variants:
            raise ValueError(
                f"method.variants must be a non-empty subset of {self.VARIANTS}, got {list(variants)}"
            )
        check_normalization(normalization)
        if groups not in ("known", "em"):
            raise ValueError(f"method.groups must be 'known' or 'em', got {groups!r}")
        self.variants, self.normalization, self.groups = list(variants), normalization, groups
        self.em = {"users": 24, "iterations": 5, "rm_steps": 40, **(dict(em) if em else {})}

    def run(self, ctx: RunContext) -> MethodOutput:
        extras: dict = {
            "rl_history": {},
            "rl_budget": {},
            "rl_checkpoints": {},
            "reward_normalization": self.normalization,
        }
        if self.groups == "known":
            rms = list(reward_models(ctx).values())
            rm_keys = [ctx.keys[f"rm/{o}"] for o in ctx.task.objectives]
            rm_stages = [f"rm/{o}" for o in ctx.task.objectives]
        else:
            with ctx.meter.stage("rm/em"):
                rms, em_info = em_reward_models(ctx, **self.em)
            rm_keys = [f"em:{em_info['spec_key']}:{g}" for g in range(len(rms))]
            rm_stages = ["rm/em"]
            extras["em"] = em_info
        norm = _normalizer(ctx, rms, rm_keys, self.normalization)
        extras["reward_models"] = _rm_summary(rms, norm)
        policies, costs = [], {}
        names = [r.objective for r in rms]
        for variant in self.variants:
            label = f"maxmin_rlhf_{variant}" + ("_em" if self.groups == "em" else "")
            spec = {
                "method": "maxmin_rlhf",
                "variant": variant,
                "normalizer": norm.spec(),
                "rms": rm_keys,
            }
            policy, history, checkpoints = train_rl_policy(
                ctx,
                label,
                spec,
                lambda rule=variant: RewardAggregator(
                    [r.model for r in rms], names, norm, rule, meter=ctx.meter
                ),
            )
            policies.append(MixedPolicy.single(policy))
            costs[label] = rl_cost(rm_stages, f"rl/{label}")
            add_checkpoints(ctx, (f"rl/{label}",), costs[label], checkpoints, policies, costs)
            extras["rl_checkpoints"][label] = [p for _, p in checkpoints]
            extras["rl_history"][label] = history
            extras["rl_budget"][label] = _rl_budget(ctx, history)
        return MethodOutput(policies, costs=costs, extras=extras)


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
        c = score_with_rm(model, batch.chosen, meter=ctx.meter)
        r = score_with_rm(model, batch.rejected, meter=ctx.meter)
        return -float(bt_loss(c, r)) * len(datasets[u])

    start = time.perf_counter()
    ctx.reseed(30)
    result = em_user_groups(users, k, fit, loglik, iterations=iterations, seed=ctx.seed)
    score = purity(result.assignment, truth)
    log.info("EM over %d users: purity %.3f after %d iterations", users, score, result.iterations)
    rms = [RewardModel(f"group{g}", model, float("nan")) for g, model in enumerate(result.models)]
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
            full = [full_model(p.model) for p in singles]  # LoRA pi_k: merged (soup of the deltas)
            model = type(full[0])(full[0].config)
            model.load_state_dict(average_state_dicts([m.state_dict() for m in full], weights))
        return Policy(name, model.eval(), singles[0].tokenizer)

    def run(self, ctx: RunContext) -> MethodOutput:
        objectives = ctx.task.objectives
        uniform = [1 / len(objectives)] * len(objectives)
        policies = [MixedPolicy.single(self._soup(ctx, "reward_soup", uniform))]
        extras: dict = {}
        weights = None
        if self.mpo is not None:
            mpo = self.mpo.run(ctx)
            lam = mpo.weights
            weights = lam
            extras.update({k: v for k, v in mpo.extras.items() if k in ("bsmd", "lambda_std")})
            policies.append(
                MixedPolicy.single(self._soup(ctx, "weighted_reward_soup", [lam[o] for o in objectives]))
            )
            extras["soup_weights"] = {
                "reward_soup": uniform,
                "weighted_reward_soup": [lam[o] for o in objectives],
            }
        costs = {"reward_soup": dpo_policies_cost(objectives, "soup/reward_soup")}
        if self.mpo is not None:
            costs["weighted_reward_soup"] = dpo_policies_cost(
                objectives, self.mpo.stage_prefix, "soup/weighted_reward_soup"
            )
        return MethodOutput(policies, costs=costs, weights=weights, extras=extras)
