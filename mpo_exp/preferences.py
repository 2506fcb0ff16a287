"""Per-objective preference pairs: two pi_ref samples per prompt, labelled by the oracle.

The label for objective k is a Bradley–Terry draw, P(a > b) = sigmoid((r_k(a) - r_k(b)) / T);
T (``bt_temperature``) is the label noise (T -> 0: the oracle's ranking, larger T: noisier).
Exact reward ties carry no preference and are dropped by default. The same response pairs are
labelled once per objective, as in HH-RLHF's per-attribute labels. pi_ref's log-probs of the
pairs, which only DPO needs, are the sampler's own (``with_logprobs``, read while decoding: no
second pass) where they agree with teacher-forced scoring (fp32), else scored separately
(:meth:`PairSet.score_reference`), so that their cost is charged to the methods that use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mpo_exp.cost import CostMeter
from mpo_exp.data import PreferenceDataset, SequenceBatch
from mpo_exp.generation import decode_prompts, decode_responses, encode_prompts, sample
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.scoring import score_sequences
from mpo_exp.tasks.base import Task


@dataclass
class PairSet:
    a: SequenceBatch
    b: SequenceBatch
    rewards_a: torch.Tensor  # (n, K)
    rewards_b: torch.Tensor
    a_wins: torch.Tensor  # (n, K) bool: the BT draw per objective
    tie: torch.Tensor  # (n, K) bool
    ref_logp_a: torch.Tensor | None = None  # (n,) pi_ref's sequence log-probs, for DPO
    ref_logp_b: torch.Tensor | None = None

    def score_reference(
        self, ref: MixedPolicy, batch_size: int = 256, meter: CostMeter | None = None
    ) -> None:
        models, weights = ref.live
        self.ref_logp_a = score_sequences(models, weights, self.a, batch_size, meter)
        self.ref_logp_b = score_sequences(models, weights, self.b, batch_size, meter)

    def save(self, path: Path) -> None:
        torch.save(self.__dict__, path / "pairs.pt")

    @classmethod
    def load(cls, path: Path) -> PairSet:
        return cls(**torch.load(path / "pairs.pt", weights_only=False))

    def orientation(self, k: int, drop_ties: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx, a_chosen): the rows objective k trains on (its ties dropped if asked) and whether
        response a is the chosen one. The one place pairs are kept and oriented, so everything
        attached to them row by row (sequences, pi_ref log-probs, MODPO's margins) lines up."""
        keep = ~self.tie[:, k] if drop_ties else torch.ones_like(self.tie[:, k])
        idx = keep.nonzero().squeeze(-1)
        return idx, self.a_wins[idx, k]

    def orient(
        self, k: int, values_a: torch.Tensor, values_b: torch.Tensor, drop_ties: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rows of a per-response quantity ((n, ...) for a and b), in
        :meth:`dataset` order."""
        idx, a_chosen = self.orientation(k, drop_ties)
        a_chosen = a_chosen.view(-1, *([1] * (values_a.dim() - 1)))
        va, vb = values_a[idx], values_b[idx]
        return torch.where(a_chosen, va, vb), torch.where(a_chosen, vb, va)

    def dataset(self, k: int, pad_id: int, drop_ties: bool = True) -> PreferenceDataset:
        if self.ref_logp_a is None or self.ref_logp_b is None:
            raise ValueError("pairs have no pi_ref log-probs: call PairSet.score_reference first")
        idx, a_chosen = self.orientation(k, drop_ties)
        rows = list(zip(idx.tolist(), a_chosen.tolist(), strict=True))
        prompts = self.a.prompts()
        ra, rb = self.a.responses(), self.b.responses()
        chosen = [ra[i] if w else rb[i] for i, w in rows]
        rejected = [rb[i] if w else ra[i] for i, w in rows]
        ref_c, ref_r = self.orient(k, self.ref_logp_a, self.ref_logp_b, drop_ties)
        return PreferenceDataset([prompts[i] for i, _ in rows], chosen, rejected, ref_c, ref_r, pad_id)


def bradley_terry_labels(
    rewards_a: torch.Tensor, rewards_b: torch.Tensor, temperature: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_wins, tie) for every objective; with temperature 0 the oracle ranking itself."""
    diff = rewards_a - rewards_b
    tie = diff == 0
    if temperature == 0:
        return diff > 0, tie
    p = torch.sigmoid(diff / temperature)
    return torch.rand(p.shape, generator=generator) < p, tie


def build_pairs(
    ref: MixedPolicy,
    task: Task,
    n_prompts: int,
    bt_temperature: float,
    seed: int,
    meter: CostMeter | None = None,
    batch_size: int = 256,
    with_logprobs: bool = False,
) -> PairSet:
    """``with_logprobs``: keep the sampler's own log-probs as pi_ref's (``ref_logp_a/b``)."""
    tok = ref.tokenizer
    prompts = encode_prompts(tok, task.prompts("train", n_prompts, seed))
    kw = dict(meter=meter, with_logprobs=with_logprobs)
    a = sample(ref, prompts, task.max_new_tokens, batch_size, desc="sampling pairs (a)", **kw)
    b = sample(ref, prompts, task.max_new_tokens, batch_size, desc="sampling pairs (b)", **kw)
    (a, logp_a), (b, logp_b) = (a, b) if with_logprobs else ((a, None), (b, None))
    text_prompts = decode_prompts(tok, a)
    r_a = task.rewards(text_prompts, decode_responses(tok, a))
    r_b = task.rewards(text_prompts, decode_responses(tok, b))
    a_wins, tie = bradley_terry_labels(r_a, r_b, bt_temperature, torch.Generator().manual_seed(seed))
    return PairSet(a, b, r_a, r_b, a_wins, tie, logp_a, logp_b)
