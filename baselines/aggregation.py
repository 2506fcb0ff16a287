"""How K reward-model scores become the one scalar that RL maximises.

Scores are first normalised per objective by a fitted :class:`~baselines.normalization.Normalizer`
(default: the paper's operator P(r), a shift that keeps the Bradley–Terry scale; see
:mod:`baselines.normalization` for why, and for the ``zscore`` / ``none`` alternatives).

* weighted sum (MORLHF):  r_w = sum_k w_k r~_k
* sample-min (public MaxMin-RLHF code):  r = min_k r~_k per response
* group-min (Chakraborty et al., 2024):  each batch, optimise the objective whose mean
  normalised reward is currently lowest
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from baselines.normalization import Normalizer
from mpo_exp.cost import CostMeter
from mpo_exp.data import SequenceBatch


def weighted_sum(r: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    return r @ torch.as_tensor(weights, dtype=r.dtype)


def sample_min(r: torch.Tensor) -> torch.Tensor:
    return r.min(dim=-1).values


def group_min(r: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The column of the objective with the lowest batch mean, and its index."""
    k = int(r.mean(0).argmin())
    return r[:, k], k


class RewardAggregator:
    """Scores a batch of responses with K reward models and aggregates them into (B,) scores."""

    RULES = ("weighted", "sample_min", "group_min")

    def __init__(
        self,
        models: Sequence[torch.nn.Module],
        names: Sequence[str],
        normalizer: Normalizer,
        rule: str,
        weights: Sequence[float] | None = None,
        meter: CostMeter | None = None,
    ) -> None:
        if rule not in self.RULES:
            raise ValueError(f"aggregation rule must be one of {self.RULES}, got {rule!r}")
        if rule == "weighted" and (weights is None or len(weights) != len(models)):
            raise ValueError("the weighted rule needs one weight per reward model")
        if len(normalizer.shift) != len(models):
            raise ValueError(
                f"normalizer fitted for {len(normalizer.shift)} objectives, {len(models)} models"
            )
        self.models, self.names, self.normalizer = list(models), list(names), normalizer
        self.rule, self.weights, self.meter = rule, weights, meter
        self.group_counts = [0] * len(models)

    def per_objective(self, batch: SequenceBatch) -> torch.Tensor:
        from baselines.reward_model import score_with_rm

        raw = torch.stack([score_with_rm(m, batch, meter=self.meter) for m in self.models], dim=-1)
        if self.normalizer.per_prompt:  # each response's shift is its prompt's (by token ids)
            return self.normalizer(raw, batch.to("cpu").prompts())
        return self.normalizer(raw)

    def __call__(self, batch: SequenceBatch) -> tuple[torch.Tensor, dict[str, float]]:
        r = self.per_objective(batch)
        info = {f"rm_{n}": float(r[:, k].mean()) for k, n in enumerate(self.names)}
        if self.rule == "weighted":
            return weighted_sum(r, self.weights), info
        if self.rule == "sample_min":
            return sample_min(r), info
        scores, k = group_min(r)
        self.group_counts[k] += 1
        info["group"] = float(k)
        return scores, info
