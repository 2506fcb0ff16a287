"""The mixed policy pi_lambda ∝ prod_k pi_k^lambda_k, decoded token by token.

At each step the next-token distribution is softmax(sum_k lambda_k log_softmax(logits_k)).
``MixtureLogitsProcessor`` plugs this into ``transformers.generate``: generate drives the first
model (its logits arrive as ``scores``) and the processor runs the others, each with its own KV
cache, so every model forwards each token exactly once. The same class serves MPO's learned
lambda and fixed user weights (the MORLHF closed form, pi_w ∝ prod_k pi_k^w_k).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import LogitsProcessor

from mpo_exp.data import position_ids_from_mask
from mpo_exp.policies import Policy, check_same_tokenizer
from mpo_exp.scoring import mixture_log_softmax

SIMPLEX_TOL = 1e-4


def check_simplex(weights: Sequence[float], field: str = "weights") -> None:
    w = [float(x) for x in weights]
    if any(x < 0 or x != x for x in w):
        raise ValueError(f"{field} must be non-negative, got {w}")
    if abs(sum(w) - 1.0) > SIMPLEX_TOL:
        raise ValueError(f"{field} must sum to 1 (a point on the simplex), got sum={sum(w):.6g} for {w}")


def resolve_weights(
    weights: Mapping[str, float] | Sequence[float] | None,
    objectives: Sequence[str],
    field: str = "method.weights",
) -> list[float]:
    """User weights as a simplex vector in objective order: a {name: w} mapping, a list in objective
    order (convenient in Hydra sweeps: ``method.weights=[0.5,0.5,0],[1,0,0]``), or None for uniform."""
    if weights is None:
        return [1.0 / len(objectives)] * len(objectives)
    if isinstance(weights, Mapping):
        unknown = [o for o in weights if o not in objectives]
        if unknown:
            raise ValueError(f"{field}: unknown objective(s) {unknown}; objectives are {list(objectives)}")
        vector = [float(weights.get(o, 0.0)) for o in objectives]
    else:
        vector = [float(w) for w in weights]
        if len(vector) != len(objectives):
            raise ValueError(
                f"{field} has {len(vector)} entries for {len(objectives)} objectives {list(objectives)}"
            )
    check_simplex(vector, field=field)
    return vector


def check_affine(weights: Sequence[float], field: str = "weights") -> None:
    w = [float(x) for x in weights]
    if any(x != x or abs(x) == float("inf") for x in w):
        raise ValueError(f"{field} must be finite, got {w}")
    if abs(sum(w) - 1.0) > SIMPLEX_TOL:
        raise ValueError(f"{field} must sum to 1, got sum={sum(w):.6g} for {w}")


class MixedPolicy:
    """K policies over one tokenizer with simplex weights. One policy with weight 1 is that policy.

    ``affine=True`` allows any real exponents that sum to 1 (negative ones included), the family
    pi ∝ pi_ref^{1 - sum_k a_k} prod_k pi_k^{a_k} of calibrated MPO (cf. decoding-time realignment):
    token by token, softmax(sum_k a_k log_softmax(logits_k)) is still a distribution.
    """

    def __init__(
        self, name: str, policies: Sequence[Policy], weights: Sequence[float], affine: bool = False
    ) -> None:
        if len(policies) != len(weights):
            raise ValueError(f"{name}: {len(policies)} policies but {len(weights)} weights")
        (check_affine if affine else check_simplex)(weights, field=f"weights of mixed policy '{name}'")
        check_same_tokenizer({p.name: p.tokenizer for p in policies})
        self.name = name
        self.policies = list(policies)
        self.weights = [float(w) for w in weights]

    @classmethod
    def single(cls, policy: Policy, name: str | None = None) -> MixedPolicy:
        return cls(name or policy.name, [policy], [1.0])

    @property
    def tokenizer(self):
        return self.policies[0].tokenizer

    @property
    def live(self) -> tuple[list[torch.nn.Module], list[float]]:
        """Models with non-zero weight (a zero-weight model is never run)."""
        pairs = [(p.model, w) for p, w in zip(self.policies, self.weights, strict=True) if w != 0]
        return [m for m, _ in pairs], [w for _, w in pairs]


class MixtureLogitsProcessor(LogitsProcessor):
    """Replace the driving model's scores with the weighted sum of K models' log-softmaxes.

    ``weights[0]`` belongs to the model that ``generate`` runs; ``others`` are run here with
    their own caches. Needs the prompt's attention mask (left padding) to place positions the
    way ``generate`` does.
    """

    def __init__(
        self,
        weights: Sequence[float],
        others: Sequence[torch.nn.Module],
        prompt_attention_mask: torch.Tensor,
    ) -> None:
        if len(weights) != len(others) + 1:
            raise ValueError("need one weight for the driving model plus one per other model")
        self.weights = list(weights)
        self.others = list(others)
        self.prompt_mask = prompt_attention_mask
        self.caches: list = [None] * len(self.others)
        self.seen = 0  # tokens of input_ids already fed to the other models

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        b, t = input_ids.shape
        extra = t - self.prompt_mask.shape[1]
        mask = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(b, extra)], dim=1)
        positions = position_ids_from_mask(mask)
        new = slice(self.seen, t)
        logits = [scores]
        for k, model in enumerate(self.others):
            out = model(
                input_ids=input_ids[:, new],
                attention_mask=mask,
                position_ids=positions[:, new],
                cache=self.caches[k],
                use_cache=True,
                logits_to_keep=1,  # the first call spans the whole prompt: its last row only
            )
            self.caches[k] = out.cache
            logits.append(out.logits[:, -1])
        self.seen = t
        return mixture_log_softmax(logits, self.weights)
