"""How reward-model scores are put on one footing before RL aggregates them.

A Bradley–Terry reward model's logit estimates the BT reward up to an arbitrary offset (the BT
loss only sees differences), and DPO's implicit reward β·log π_k/π_ref estimates the same reward
on the same scale. Four normalisations (``method.normalization``):

* ``partition`` (default): the paper's operator
  P(r)(x, y) = r(x, y) − β·log E_{y'~π_ref(·|x)} exp(r(x, y')/β).
  It keeps the BT scale, so RL at the shared β targets the same optimum as the DPO policies
  (MORLHF with weights w: π_ref·exp(Σ_k w_k r_k/β) ∝ Π_k π_k^{w_k}), and it removes each reward
  model's offset, so a min over objectives (MaxMin-RLHF) solves MPO's max-min problem. The shift
  is estimated from m π_ref samples for each of N prompts and applied as its mean over prompts —
  one constant per objective, a documented approximation of the per-prompt operator; the spread
  of the per-prompt shift over prompts is reported (``partition_shift_prompt_std``) so the size
  of that approximation is visible.
* ``partition_prompt``: the same operator applied per prompt. A BT reward model's offset may
  differ from prompt to prompt (its loss only compares responses to one prompt), and a constant
  shift leaves that in a min over objectives; here the shift is estimated for every prompt the
  RL stage trains on and looked up by the prompt's token ids, so r̃_k(x, ·) = β·log π_k/π_ref
  exactly when the reward model is a BT reward up to any per-prompt offset.
* ``zscore``: (r − mean)/std on π_ref samples. Divides objective k by σ_k, i.e. runs it at an
  effective β·σ_k: "same β" becomes nominal.
* ``none``: raw scores (the largest-scale reward model dominates, offsets decide the min).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import torch

from mpo_exp.artifacts import config_key

NORMALIZATIONS = ("partition", "partition_prompt", "zscore", "none")


def check_normalization(how: str, field: str = "method.normalization") -> str:
    if how not in NORMALIZATIONS:
        raise ValueError(f"{field} must be one of {NORMALIZATIONS}, got {how!r}")
    return how


def partition_shift(scores: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-prompt β·log mean_j exp(r(x, y_j)/β) for scores (N prompts, m samples, K): (N, K)."""
    m = scores.shape[1]
    return beta * (torch.logsumexp(scores.double() / beta, dim=1) - math.log(m))


@dataclass
class Normalizer:
    """r̃_k = (r_k − shift_k) / scale_k, fitted on reward-model scores of π_ref samples.

    ``partition_prompt`` replaces ``shift`` (then the mean over prompts, for reports) by the row of
    ``prompt_shift`` that belongs to each response's prompt, found by its token ids.
    """

    how: str
    shift: torch.Tensor  # (K,)
    scale: torch.Tensor  # (K,)
    stats: list[dict]  # per objective: mean, std, partition_shift, partition_shift_prompt_std
    prompt_shift: torch.Tensor | None = None  # (N, K), partition_prompt only
    prompt_index: dict[tuple[int, ...], int] = dataclass_field(default_factory=dict)  # prompt ids -> row

    @property
    def per_prompt(self) -> bool:
        return self.prompt_shift is not None

    def spec(self) -> dict:
        """What identifies the transformation (part of an RL policy's cache key)."""
        out = {"how": self.how, "shift": self.shift.tolist(), "scale": self.scale.tolist()}
        if self.per_prompt:  # a digest: the table has a row per RL training prompt
            rows = sorted(self.prompt_index.items())
            out["prompt_shift"] = config_key([[list(ids), self.prompt_shift[i].tolist()] for ids, i in rows])
        return out

    def __call__(self, scores: torch.Tensor, prompts: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """Normalise (..., K) scores; a per-prompt normaliser needs each row's prompt token ids."""
        scale = self.scale.to(scores)
        if not self.per_prompt:
            return (scores - self.shift.to(scores)) / scale
        if prompts is None or len(prompts) != len(scores):
            raise ValueError("a per-prompt normaliser needs the prompt (token ids) of every row")
        try:
            rows = [self.prompt_index[tuple(int(t) for t in p)] for p in prompts]
        except KeyError as err:
            raise KeyError(
                f"prompt {list(err.args[0])} is not among the {len(self.prompt_index)} prompts the "
                "per-prompt shift was fitted on (the RL stage's training prompts)"
            ) from None
        return (scores - self.prompt_shift[rows].to(scores)) / scale

    @classmethod
    def fit(
        cls,
        scores: torch.Tensor,
        how: str,
        beta: float,
        prompts: Sequence[Sequence[int]] | None = None,
    ) -> Normalizer:
        """``scores``: (N prompts, m π_ref samples per prompt, K objectives); ``prompts``: the N
        prompts' token ids, which ``partition_prompt`` keys its shifts by."""
        check_normalization(how)
        if scores.dim() != 3 or scores.shape[1] < 1:
            raise ValueError(f"need scores shaped (prompts, samples, K), got {tuple(scores.shape)}")
        k = scores.shape[-1]
        flat = scores.reshape(-1, k).double()
        mean, std = flat.mean(0), flat.std(0) if len(flat) > 1 else torch.ones(k, dtype=torch.float64)
        per_prompt = partition_shift(scores, beta)
        shift_spread = per_prompt.std(0) if len(per_prompt) > 1 else torch.zeros(k, dtype=torch.float64)
        stats = [
            {
                "mean": float(mean[i]),
                "std": float(std[i]),
                "partition_shift": float(per_prompt[:, i].mean()),
                "partition_shift_prompt_std": float(shift_spread[i]),
            }
            for i in range(k)
        ]
        ones, zeros = torch.ones(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
        if how == "partition":
            return cls(how, per_prompt.mean(0), ones, stats)
        if how == "partition_prompt":
            if prompts is None or len(prompts) != len(scores):
                raise ValueError("partition_prompt needs the token ids of each of the N prompts scored")
            index = {tuple(int(t) for t in p): i for i, p in enumerate(prompts)}
            if len(index) != len(prompts):
                raise ValueError("partition_prompt: the prompts must be distinct")
            return cls(how, per_prompt.mean(0), ones, stats, per_prompt, index)
        if how == "zscore":
            return cls(how, mean, std.clamp(min=1e-6), stats)
        return cls(how, zeros, ones, stats)
