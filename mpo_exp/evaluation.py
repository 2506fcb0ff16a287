"""Balanced-performance evaluation of policies against pi_ref on held-out prompts.

For each policy we sample one response per prompt and report, per objective: the mean oracle
reward; the same z-normalised against pi_ref's reward distribution (so objectives on different
scales are comparable) and its worst objective; the win rate against a pi_ref response to the
same prompt (ties count half) and its minimum; and a Monte-Carlo KL(pi || pi_ref) estimate,
mean over samples of log pi(y|x) - log pi_ref(y|x) (the mixed policy's log-prob is its
token-level normalised decoding distribution). The per-prompt win outcomes (``win_per_prompt``,
in eval-prompt order) are kept too, so the report can bootstrap over prompts, paired across the
policies of a seed.

Under DDP each rank samples and scores its contiguous share of the prompts (with its own random
stream) and the rewards, log-ratios and examples are gathered in prompt order, so every rank
returns the same evaluation.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from mpo_exp import distributed as dist
from mpo_exp.cost import CostMeter
from mpo_exp.data import SequenceBatch
from mpo_exp.generation import decode_prompts, decode_responses, encode_prompts, sample
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.scoring import score_sequences
from mpo_exp.tasks.base import Task


def win_outcomes(rewards: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Per row and objective: 1 if ``rewards`` beats ``baseline``, 0.5 on a tie, else 0: (n, K)."""
    return (rewards > baseline).float() + 0.5 * (rewards == baseline).float()


def win_rate(rewards: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Share of rows where ``rewards`` beats ``baseline``, ties counting half: (K,)."""
    return win_outcomes(rewards, baseline).mean(0)


def compact_outcomes(column: torch.Tensor) -> list[int | float]:
    """Outcomes in {0, 0.5, 1} as JSON-compact ints (0, 1) and 0.5 floats."""
    return [0.5 if v == 0.5 else int(v) for v in column.tolist()]


def responses_fingerprint(prompts: list[str], responses: list[str]) -> str:
    """Hash of the (prompt, π_ref response) pairs a run's win rates are measured against: the report
    pairs two runs' per-prompt outcomes in its bootstrap only when their fingerprints are equal."""
    return hashlib.sha256(json.dumps([prompts, responses]).encode()).hexdigest()[:16]


def z_scores(rewards: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """(mean reward - baseline mean) / baseline std, per objective: (K,)."""
    return (rewards.mean(0) - baseline.mean(0)) / baseline.std(0).clamp(min=1e-8)


@dataclass
class PolicyEval:
    rewards: torch.Tensor  # (n, K)
    kl: float
    examples: list[tuple[str, str]]

    def summary(self, objectives: list[str], baseline: torch.Tensor) -> dict:
        z = z_scores(self.rewards, baseline)
        outcomes = win_outcomes(self.rewards, baseline)
        wr = outcomes.mean(0)
        return {
            "reward": dict(zip(objectives, self.rewards.mean(0).tolist(), strict=True)),
            "reward_z": dict(zip(objectives, z.tolist(), strict=True)),
            "min_reward_z": float(z.min()),
            "win_rate": dict(zip(objectives, wr.tolist(), strict=True)),
            "min_win_rate": float(wr.min()),
            # row i is eval prompt i against pi_ref's response to it: the same prompts and pi_ref
            # responses for every policy of a run, so rows pair across policies within a seed
            "win_per_prompt": {o: compact_outcomes(outcomes[:, k]) for k, o in enumerate(objectives)},
            "kl": self.kl,
        }


class Evaluator:
    def __init__(
        self,
        task: Task,
        ref: MixedPolicy,
        n_prompts: int,
        seed: int,
        batch_size: int = 256,
        temperature: float = 1.0,
        n_examples: int = 3,
        sample_batch_size: int | None = None,
        own_logprobs: bool = False,
    ) -> None:
        """``own_logprobs``: take each policy's log-probs from its sampler (one scoring pass fewer per
        policy); only where decoding and teacher-forced scoring agree (fp32, tests/test_generation.py)."""
        self.task, self.ref, self.batch_size, self.temperature = task, ref, batch_size, temperature
        self.sample_batch_size, self.own_logprobs = sample_batch_size or batch_size, own_logprobs
        self.n_examples, self.seed = n_examples, seed
        self.prompts = encode_prompts(ref.tokenizer, task.prompts("eval", n_prompts, seed))
        self.shard = list(dist.shard(self.prompts))  # this rank's prompts (all of them in one process)
        self.baseline: torch.Tensor | None = None
        self.fingerprint: str | None = None  # of pi_ref's responses, set with the baseline

    def _sample(
        self, policy: MixedPolicy, meter: CostMeter | None, stream: int, with_logprobs: bool = False
    ) -> SequenceBatch | tuple[SequenceBatch, torch.Tensor]:
        # every policy samples with the same random stream (common random numbers), so
        # differences between policies are not drowned in sampling noise
        torch.manual_seed(self.seed * 7919 + stream)
        dist.seed_rank_stream()
        return sample(
            policy,
            self.shard,
            self.task.max_new_tokens,
            self.sample_batch_size,
            self.temperature,
            meter,
            desc=f"eval: sampling {policy.name}",
            with_logprobs=with_logprobs,
        )

    def _rewards(self, batch: SequenceBatch) -> tuple[torch.Tensor, list[str], list[str]]:
        tok = self.ref.tokenizer
        prompts, responses = decode_prompts(tok, batch), decode_responses(tok, batch)
        rewards = self.task.rewards(prompts, responses)
        if dist.world_size() == 1:
            return rewards, prompts, responses
        texts = dist.gather_objects((prompts, responses))
        prompts, responses = [p for ps, _ in texts for p in ps], [r for _, rs in texts for r in rs]
        return dist.gather_cat(rewards), prompts, responses

    def reference_rewards(self, meter: CostMeter | None = None) -> torch.Tensor:
        """pi_ref's responses that every policy is compared against (drawn once)."""
        if self.baseline is None:
            self.baseline, prompts, responses = self._rewards(self._sample(self.ref, meter, stream=0))
            self.fingerprint = responses_fingerprint(prompts, responses)
        return self.baseline

    def evaluate(self, policy: MixedPolicy, meter: CostMeter | None = None) -> PolicyEval:
        # KL(what was sampled || pi_ref): the policy at the temperature it was sampled at, pi_ref as is
        if self.own_logprobs:
            batch, logp = self._sample(policy, meter, stream=1, with_logprobs=True)
        else:
            batch = self._sample(policy, meter, stream=1)
            logp = score_sequences(*policy.live, batch, self.batch_size, meter, temperature=self.temperature)
        rewards, prompts, responses = self._rewards(batch)
        same = self.own_logprobs and self.temperature == 1.0 and _same_policy(policy, self.ref)
        logp_ref = logp if same else score_sequences(*self.ref.live, batch, self.batch_size, meter)
        examples = list(zip(prompts[: self.n_examples], responses[: self.n_examples], strict=True))
        return PolicyEval(rewards, float(dist.gather_cat(logp - logp_ref).mean()), examples)


def _same_policy(a: MixedPolicy, b: MixedPolicy) -> bool:
    """The same models with the same weights: the sampler's log-probs are the other's too."""
    (ma, wa), (mb, wb) = a.live, b.live
    return len(ma) == len(mb) and all(x is y for x, y in zip(ma, mb, strict=True)) and list(wa) == list(wb)
