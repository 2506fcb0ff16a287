"""KL-regularised RL from reward models: PPO (clipped, value head, GAE) or RLOO, with manual optimisation.

One trainer serves every baseline: what differs between MORLHF and MaxMin-RLHF is only the
``reward_fn`` that turns a batch of responses into one scalar score per response.

Under DDP (``trainer.strategy=ddp``) each rank rolls out its share of every batch of prompts
with its own random stream, advantages (and ``whiten_scores``) are whitened with the global
batch's statistics, DDP averages the gradients of every ``manual_backward`` (PPO's token means
divide by the global token count, so the average is the single-process gradient), and the
logged statistics are means over ranks.

Per-token rewards follow the standard RLHF recipe (Ziegler et al., 2019; TRL):
r_t = -beta * (log pi(y_t) - log pi_ref(y_t)), plus the sequence score on the last token,
so beta is the same KL coefficient the DPO policies used.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from mpo_exp import distributed as dist
from mpo_exp.adapters import disable_model_dropout
from mpo_exp.cost import CostMeter, n_params
from mpo_exp.data import SequenceBatch
from mpo_exp.generation import sample
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.policies import Policy
from mpo_exp.scoring import token_logprobs

RewardFn = Callable[[SequenceBatch], tuple[torch.Tensor, dict[str, float]]]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def global_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``masked_mean`` over the rows of every rank (DDP): the mean of the global batch."""
    if dist.world_size() == 1:
        return masked_mean(x, mask)
    total = dist.all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]).detach())
    return total[0] / total[1].clamp(min=1)


def ddp_masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``masked_mean`` of a loss over the global batch's tokens, as this rank's share of DDP's average.

    A per-rank ``masked_mean`` would weigh a token on a rank with short responses more than one on
    a rank with long ones; :func:`~mpo_exp.distributed.ddp_mean` divides by the global count.
    """
    return dist.ddp_mean((x * mask).sum(), mask.sum())


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten with the mean and variance of the global batch (over ranks under DDP)."""
    mean = global_masked_mean(x, mask)
    var = global_masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_penalised_rewards(
    scores: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """(B, T) per-token rewards: -beta * (log pi - log pi_ref), the score added on the last real token."""
    rewards = -beta * (logp - logp_ref) * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()
    return rewards + scores.unsqueeze(-1) * last


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded (B, T) tensors; returns (advantages, returns)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(mask[:, 0])
        next_value = values[:, t + 1] * next_mask if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * next_mask * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten_global(scores: torch.Tensor) -> torch.Tensor:
    """(scores - mean) / std (unbiased) over the global batch: every rank's rollouts under DDP."""
    if dist.world_size() == 1:
        return (scores - scores.mean()) / scores.std().clamp(min=1e-6)
    s = dist.all_reduce_sum(torch.stack([scores.sum(), (scores**2).sum(), scores.new_tensor(len(scores))]))
    mean = s[0] / s[2]
    std = ((s[1] - s[2] * mean**2) / (s[2] - 1).clamp(min=1)).clamp(min=0).sqrt()
    return (scores - mean) / std.clamp(min=1e-6)


class PolicyWithValueHead(torch.nn.Module):
    """A causal LM plus a scalar value head on its last hidden state (as TRL's value-head models)."""

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        self.v_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.v_head.weight)
        torch.nn.init.zeros_(self.v_head.bias)

    def forward(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R, V) logits predicting each response token and (B, R) values of the states before them."""
        p, r = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
        out = self.lm(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=r + 1,  # the head on the positions that predict the response only
        )
        logits = out.logits[:, -(r + 1) : -1].float()
        values = self.v_head(out.hidden_states[-1][:, p - 1 : p + r - 1]).squeeze(-1).float()
        return logits, values


class PPOModule(pl.LightningModule):
    """One training step = one rollout on a batch of prompts + the policy updates on it."""

    config_group = "rl"

    def __init__(
        self,
        policy: Policy,
        reference: MixedPolicy,
        reward_fn: RewardFn,
        beta: float,
        max_new_tokens: int,
        estimator: str = "ppo",
        lr: float = 1e-4,
        ppo_epochs: int = 2,
        minibatches: int = 2,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        whiten_scores: bool = False,
        rloo_k: int = 4,
        max_grad_norm: float = 1.0,
    ) -> None:
        super().__init__()
        if estimator not in ("ppo", "rloo"):
            raise ValueError(f"rl.estimator must be 'ppo' or 'rloo', got {estimator!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.automatic_optimization = False
        self.net = PolicyWithValueHead(policy.model)
        disable_model_dropout(self.net)  # old/new log-probs must agree; a LoRA adapter keeps its dropout
        self.policy, self.reference, self.reward_fn = policy, reference, reward_fn
        self.beta, self.max_new_tokens, self.estimator = beta, max_new_tokens, estimator
        self.lr, self.ppo_epochs, self.minibatches = lr, ppo_epochs, minibatches
        self.clip_range, self.clip_range_value, self.vf_coef = clip_range, clip_range_value, vf_coef
        self.gamma, self.lam, self.whiten_scores, self.rloo_k = gamma, lam, whiten_scores, rloo_k
        self.max_grad_norm = max_grad_norm
        self.meter: CostMeter | None = None
        self._n_params: dict[torch.nn.Module, int] = {}
        self.history: list[dict[str, float]] = []

    @property
    def optimizer_steps_per_iteration(self) -> int:
        return 1 if self.estimator == "rloo" else self.ppo_epochs * self.minibatches

    def on_fit_start(self) -> None:
        dist.seed_rank_stream()  # under DDP each rank draws its own rollouts
        # pi_ref and the reward models are not submodules (never trained): move them by hand
        for model in [*self.reference.live[0], *getattr(self.reward_fn, "models", [])]:
            model.to(self.device)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr)

    def _charge(self, model: torch.nn.Module, tokens: int, backward: bool = False) -> None:
        if self.meter is not None:
            if model not in self._n_params:  # counted once, not on every minibatch
                self._n_params[model] = n_params(model)
            self.meter.charge(self._n_params[model], tokens, backward)

    # ---- rollout ---------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: list[list[int]]) -> dict[str, torch.Tensor]:
        self.net.eval()
        if self.estimator == "rloo":
            prompts = [p for p in prompts for _ in range(self.rloo_k)]
        batch = sample(MixedPolicy.single(self.policy), prompts, self.max_new_tokens).to(self.device)
        mask = batch.response_mask.float()
        logits, values = self.net(batch)
        logp = (
            torch.gather(F.log_softmax(logits, -1), -1, batch.response_ids.unsqueeze(-1)).squeeze(-1) * mask
        )
        logp_ref = token_logprobs(*self.reference.live, batch)
        scores, info = self.reward_fn(batch)
        scores = scores.to(self.device)
        for model, passes in ((self.net, 2), (self.reference.policies[0].model, 1)):  # generate+score, ref
            self._charge(model, passes * batch.n_tokens)
        if self.whiten_scores:
            scores = whiten_global(scores)
        kl = ((logp - logp_ref) * mask).sum(-1)
        info.update(score=float(scores.mean()), kl=float(kl.mean()), length=float(mask.sum(-1).mean()))
        self.net.train()
        return dict(
            batch=batch,
            mask=mask,
            logp=logp,
            logp_ref=logp_ref,
            values=values * mask,
            scores=scores,
            kl=kl,
            info=info,
        )

    # ---- updates ---------------------------------------------------------------------------
    def _ppo_updates(self, ro: dict) -> dict[str, float]:
        opt = self.optimizers()
        mask = ro["mask"]
        rewards = kl_penalised_rewards(ro["scores"], ro["logp"], ro["logp_ref"], mask, self.beta)
        advantages, returns = gae(rewards, ro["values"], mask, self.gamma, self.lam)
        advantages = masked_whiten(advantages, mask)
        n = len(ro["batch"])
        stats: dict[str, float] = {}
        for _ in range(self.ppo_epochs):
            perm = torch.randperm(n, device=mask.device)
            for idx in perm.chunk(self.minibatches):
                b, m = ro["batch"][idx], mask[idx]
                logits, values = self.net(b)
                logp = torch.gather(F.log_softmax(logits, -1), -1, b.response_ids.unsqueeze(-1)).squeeze(-1)
                ratio = torch.exp(logp - ro["logp"][idx])
                adv = advantages[idx]
                # token means over the global minibatch (ranks' halves differ in length): shares
                pg = ddp_masked_mean(
                    torch.max(-adv * ratio, -adv * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)), m
                )
                v_old = ro["values"][idx]
                v_clip = v_old + (values - v_old).clamp(-self.clip_range_value, self.clip_range_value)
                vf = 0.5 * ddp_masked_mean(
                    torch.max((values - returns[idx]) ** 2, (v_clip - returns[idx]) ** 2), m
                )
                loss = pg + self.vf_coef * vf
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                self._charge(self.net, b.n_tokens, backward=True)
                stats = {
                    "pg_loss": float(pg.detach()),
                    "vf_loss": float(vf.detach()),
                    "clipfrac": float(global_masked_mean(((ratio - 1).abs() > self.clip_range).float(), m)),
                }
        return stats

    def _rloo_update(self, ro: dict) -> dict[str, float]:
        """REINFORCE with a leave-one-out baseline over k samples per prompt (Ahmadian et al., 2024)."""
        opt = self.optimizers()
        k = self.rloo_k
        total = (ro["scores"] - self.beta * ro["kl"]).view(-1, k)
        advantages = (total - (total.sum(1, keepdim=True) - total) / (k - 1)).view(-1)
        logits, values = self.net(ro["batch"])
        logp = torch.gather(F.log_softmax(logits, -1), -1, ro["batch"].response_ids.unsqueeze(-1)).squeeze(-1)
        # a mean over rows, not tokens: every rank holds as many rows, so DDP's average is exact
        loss = -(advantages.detach() * (logp * ro["mask"]).sum(-1)).mean()
        if dist.world_size() > 1:  # DDP expects a gradient for every parameter: a zero one for v_head
            loss = loss + 0.0 * values.sum()
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        self._charge(self.net, ro["batch"].n_tokens, backward=True)
        return {"pg_loss": float(loss.detach())}

    def training_step(self, prompts: list[list[int]], batch_idx: int) -> None:
        ro = self.rollout(prompts)
        stats = self._rloo_update(ro) if self.estimator == "rloo" else self._ppo_updates(ro)
        stats.update(ro["info"])
        stats = _mean_over_ranks(stats, self.device)
        self.history.append(stats)
        shown = {"score", "kl"}
        self.log_dict({f"rl/{k}": v for k, v in stats.items() if k not in shown}, batch_size=len(prompts))
        self.log_dict({f"rl/{k}": stats[k] for k in shown}, prog_bar=True, batch_size=len(prompts))


def _mean_over_ranks(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-iteration statistics of the global batch (ranks hold equal shares of it)."""
    if dist.world_size() == 1:
        return stats
    keys = sorted(stats)
    total = dist.all_reduce_sum(torch.tensor([float(stats[k]) for k in keys], device=device))
    return {k: float(v) / dist.world_size() for k, v in zip(keys, total.tolist(), strict=True)}


def prompt_collate(items: list[list[int]]) -> list[list[int]]:
    return list(items)
