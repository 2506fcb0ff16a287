"""MODPO (Zhou et al., 2023): multi-objective DPO with a margin from the other objectives.

For user weights w and one objective k with w_k > 0, train on objective k's pairs with

    L = -log σ( (β/w_k)·[ℓ_θ(y_w) - ℓ_θ(y_l)] - (1/w_k)·Σ_{j≠k} w_j·[r_j(x,y_w) - r_j(x,y_l)] ),

ℓ_θ = log π_θ/π_ref. Its optimum is MORLHF's for w (π ∝ π_ref·exp(Σ_j w_j r_j / β)) without
RL. r_j comes from a Bradley–Terry reward model (``rewards=rm``) or from π_j's implicit reward
β·log π_j/π_ref (``rewards=implicit``). Only differences on the same prompt enter, so neither
needs the partition shift. With w_{-k} = 0 the loss is DPO's. One run per weight vector.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from baselines.checkpoints import STEPS, TrainingCheckpoints, add_checkpoints, load_checkpoints, write_points
from baselines.reward_model import REWARD_SOURCES, reward_models, reward_source_stages, score_with_rm
from mpo_exp.data import PreferenceBatch, PreferenceDataset
from mpo_exp.methods import Method, MethodOutput, PolicyCost
from mpo_exp.mpo.mixing import MixedPolicy, resolve_weights
from mpo_exp.mpo.user_weights import Weights, check_user_weights, resolve_user_weights
from mpo_exp.policies import Policy, load_policy, save_policy
from mpo_exp.preferences import PairSet
from mpo_exp.scoring import pair_logprobs, score_sequences
from mpo_exp.training.dpo import DPOModule

if TYPE_CHECKING:
    from mpo_exp.context import RunContext
    from mpo_exp.mpo.method import MPOMethod

log = logging.getLogger(__name__)


def modpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    margin: torch.Tensor,
    beta: float,
    weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MODPO's loss and logits; ``margin`` = Σ_{j≠k} w_j·(r_j(y_w) - r_j(y_l)), ``weight`` = w_k."""
    if not weight > 0:
        raise ValueError(f"MODPO needs the trained objective's weight w_k > 0, got {weight}")
    implicit = (chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp)
    logits = (beta * implicit - margin) / weight
    return -F.logsigmoid(logits).mean(), logits


@dataclass
class MarginBatch:
    pairs: PreferenceBatch
    margin: torch.Tensor  # (B,)

    def __len__(self) -> int:
        return len(self.pairs)


class MarginDataset(torch.utils.data.Dataset):
    """Objective k's pairs with the other objectives' weighted reward margin attached."""

    def __init__(self, pairs: PreferenceDataset, margin: torch.Tensor) -> None:
        if len(pairs) != len(margin):
            raise ValueError(f"{len(pairs)} pairs but {len(margin)} margins")
        self.pairs, self.margin = pairs, margin

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> MarginBatch:
        return MarginBatch(self.pairs.collate(idx), self.margin[idx])


class MODPOModule(DPOModule):
    """DPO's module with MODPO's loss: the same optimiser, dropout and cost accounting."""

    def __init__(
        self,
        model: torch.nn.Module,
        beta: float,
        lr: float,
        weight: float,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        objective: str = "objective",
    ) -> None:
        super().__init__(
            model, beta=beta, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, objective=objective
        )
        if not weight > 0:
            raise ValueError(f"MODPO needs the trained objective's weight w_k > 0, got {weight}")
        self.weight = float(weight)

    def training_step(self, batch: MarginBatch, batch_idx: int) -> torch.Tensor:
        b = batch.pairs
        chosen, rejected = pair_logprobs(self.model, b)
        loss, logits = modpo_loss(
            chosen, rejected, b.ref_chosen_logp, b.ref_rejected_logp, batch.margin, self.beta, self.weight
        )
        self.charge(b.chosen.n_tokens + b.rejected.n_tokens)
        tag = f"modpo_{self.objective}"
        self.log(f"{tag}/loss", loss, prog_bar=True, batch_size=len(b))
        self.log(f"{tag}/accuracy", (logits > 0).float().mean(), batch_size=len(b))
        return loss


def oriented_margin(
    pairs: PairSet,
    scores_a: torch.Tensor,
    scores_b: torch.Tensor,
    k: int,
    weights: Sequence[float],
    drop_ties: bool,
) -> torch.Tensor:
    """Σ_{j≠k} w_j·(r_j(chosen) - r_j(rejected)) for objective k's pairs, in ``PairSet.dataset(k)`` order.

    ``scores_a`` / ``scores_b``: (n, K) rewards of every pair's two responses (column k unused).
    Kept and oriented by :meth:`PairSet.orient`, as the dataset is, so margins and pairs line up.
    """
    chosen, rejected = pairs.orient(k, scores_a, scores_b, drop_ties)
    w = torch.tensor(weights, dtype=torch.float32)
    w[k] = 0.0
    return (chosen - rejected).float() @ w


def pair_rewards(ctx: RunContext, source: str, others: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, K) rewards of both responses of every pair; columns outside ``others`` are zero."""
    pairs, objectives = ctx.pairs, ctx.task.objectives
    n, k = len(pairs.a), len(objectives)
    out_a, out_b = torch.zeros(n, k), torch.zeros(n, k)
    for o in others:
        j = objectives.index(o)
        if source == "rm":
            model = reward_models(ctx)[o].model
            out_a[:, j] = score_with_rm(model, pairs.a, ctx.batch_size, ctx.meter)
            out_b[:, j] = score_with_rm(model, pairs.b, ctx.batch_size, ctx.meter)
        else:  # beta * log pi_j / pi_ref, pi_ref's log-probs of the pairs are already scored
            model = ctx.single_objective_policies[o].model
            la = score_sequences([model], [1.0], pairs.a, ctx.batch_size, ctx.meter)
            lb = score_sequences([model], [1.0], pairs.b, ctx.batch_size, ctx.meter)
            out_a[:, j] = ctx.beta * (la - pairs.ref_logp_a)
            out_b[:, j] = ctx.beta * (lb - pairs.ref_logp_b)
    return out_a, out_b


class MODPOMethod(Method):
    """One MODPO policy for ``weights`` (null: uniform; ``mpo``: MPO's λ from this run).

    ``objective``: whose pairs are trained on (null: the largest weight); ``rewards``: where
    the other objectives' rewards come from (``rm`` or ``implicit``). Training reuses the
    ``dpo`` group (lr, batch size, steps, ties), so MODPO and the π_k share a budget.
    """

    name = "modpo"

    def __init__(
        self,
        weights: Mapping[str, float] | Sequence[float] | str | None = None,
        rewards: str = "rm",
        objective: str | None = None,
        checkpoints: Sequence[int] | None = None,
        mpo: MPOMethod | None = None,
    ) -> None:
        if rewards not in REWARD_SOURCES:
            raise ValueError(f"method.rewards must be one of {REWARD_SOURCES}, got {rewards!r}")
        self.weights: Weights = weights
        self.rewards, self.objective, self.mpo = rewards, objective, mpo
        self.checkpoints = sorted(int(c) for c in checkpoints or ())

    def validate(self, objectives: list[str]) -> None:
        check_user_weights(self.weights, self.mpo, objectives)
        if self.objective is not None and self.objective not in objectives:
            raise ValueError(f"method.objective={self.objective!r} is not one of the objectives {objectives}")
        fixed = self.objective is not None and self.weights not in (None, "mpo")
        if fixed and resolve_weights(self.weights, objectives)[objectives.index(self.objective)] <= 0:
            raise ValueError(f"method.objective={self.objective!r} has weight 0 in method.weights")

    def run(self, ctx: RunContext) -> MethodOutput:
        objectives = ctx.task.objectives
        w = resolve_user_weights(self.weights, self.mpo, ctx)
        k = (
            objectives.index(self.objective)
            if self.objective
            else max(range(len(w.vector)), key=w.vector.__getitem__)
        )
        if w.vector[k] <= 0:
            raise ValueError(f"method.objective={objectives[k]!r} has weight 0 (weights {w.vector})")
        others = [o for j, o in enumerate(objectives) if j != k and w.vector[j] > 0]
        label = "modpo" + (f"_{w.suffix}" if w.suffix else "")
        cfg = ctx.cfg.dpo
        sources = reward_source_stages(self.rewards, others)
        if self.rewards == "rm" and others:
            reward_models(ctx)  # trained (or loaded) outside this policy's own stages
        spec = {
            "ref": ctx.keys["sft"],
            "pairs": ctx.keys["preferences"],
            "objective": objectives[k],
            "weights": w.vector,
            "rewards": self.rewards,
            "sources": {o: ctx.keys[s] for o, s in zip(others, sources, strict=True)},
            "beta": ctx.beta,
            "dpo": ctx.plain(cfg),
            "seed": ctx.seed,
            **({"checkpoints": self.checkpoints} if self.checkpoints else {}),  # none: older keys stay
        }

        def build(tmp: Path) -> None:
            ctx.reseed(50 + k)
            pad = ctx.reference.tokenizer.pad_token_id
            drop_ties = bool(cfg.drop_ties)
            with ctx.meter.stage("modpo/margins"):
                ra, rb = pair_rewards(ctx, self.rewards, others)
                margin = oriented_margin(ctx.pairs, ra, rb, k, w.vector, drop_ties)
            data = MarginDataset(ctx.pairs.dataset(k, pad, drop_ties=drop_ties), margin)
            log.info(
                "MODPO on '%s' pairs (%d) with w=%s, margin from %s rewards of %s",
                objectives[k],
                len(data),
                [round(x, 3) for x in w.vector],
                self.rewards,
                others,
            )
            policy = load_policy(ctx.store.path("sft", ctx.keys["sft"]), name=label, dtype=ctx.dtype)
            model = ctx.dpo_trainable(policy.model)  # dpo.lora: LoRA, merged on save
            kwargs = {a: v for a, v in ctx.plain(cfg.module).items() if not a.startswith("_")}
            module = MODPOModule(model=model, weight=w.vector[k], objective=objectives[k], **kwargs)

            def save_checkpoint(step: int) -> None:
                merged = ctx.dpo_merged(copy.deepcopy(model))  # training goes on
                save_policy(Policy(label, merged, policy.tokenizer), tmp / "checkpoints" / STEPS.folder(step))

            saver = TrainingCheckpoints(
                self.checkpoints, save_checkpoint, ctx.meter, STEPS, before=ctx.meter.stages["modpo/margins"]
            )
            with ctx.meter.stage("modpo/train"):
                ctx.fit(module, data, data.collate, cfg, callbacks=[saver] if self.checkpoints else [])
            policy.model = ctx.dpo_merged(model)
            save_policy(policy, tmp)
            write_points(tmp, saver.points)

        art = ctx.cached_stage(
            f"modpo/{label}", "modpo", spec, build, stages=("modpo/margins", "modpo/train")
        )
        policy = load_policy(art.path, name=label, dtype=ctx.dtype).eval()
        # reward models count as the method's own work (as for the RL baselines); the pi_j are shared
        own = (*(sources if self.rewards == "rm" else ()), *w.own, "modpo/margins", "modpo/train")
        shared = (*w.shared, *(sources if self.rewards == "implicit" else ()))
        cost = PolicyCost(tuple(dict.fromkeys(("preferences", "dpo/ref_logp", *shared, *own))), own)
        policies, costs = [MixedPolicy.single(policy)], {label: cost}
        checkpoints = load_checkpoints(
            art.path, label, STEPS, lambda path, name: load_policy(path, name=name, dtype=ctx.dtype).eval()
        )
        add_checkpoints(ctx, ("modpo/margins", "modpo/train"), cost, checkpoints, policies, costs)
        return MethodOutput(
            policies,
            costs=costs,
            weights=dict(zip(objectives, w.vector, strict=True)),
            extras={
                **w.extras,
                "modpo": {"objective": objectives[k], "rewards": self.rewards, "others": others},
                "checkpoints": {label: [p for _, p in checkpoints]},
            },
        )
