"""The RL trainer: its rollout statistics are exact, a reward rises, and beta sets the KL it ends at."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch

from baselines.ppo import PPOModule, gae, kl_penalised_rewards, prompt_collate
from mpo_exp.generation import encode_prompts, response_mask_until_eos
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.policies import Policy, TinyGPT2Spec
from mpo_exp.scoring import token_logprobs
from tests.test_rl_bandit import kl, train_bandit


def haha_share(tok):
    target = tok.convert_tokens_to_ids("haha")

    def reward_fn(batch):  # share of response tokens that are "haha"
        hits = ((batch.response_ids == target) & batch.response_mask.bool()).float().sum(-1)
        return hits / batch.response_mask.sum(-1).clamp(min=1), {}

    return reward_fn


def build_module(toy_task, estimator: str, beta: float, seed: int = 0, reward_fn=None) -> PPOModule:
    tok = toy_task.build_tokenizer()
    torch.manual_seed(seed)
    ref = TinyGPT2Spec(n_layer=1, n_embd=32, n_head=2).build(tok)
    policy = Policy("pi", copy.deepcopy(ref.model), tok)
    return PPOModule(
        policy,
        MixedPolicy.single(ref.eval(), "ref"),
        reward_fn or haha_share(tok),
        beta=beta,
        max_new_tokens=8,
        estimator=estimator,
        lr=3e-3,
        rloo_k=4,
    )


def check_rollout(module: PPOModule, prompts: list[list[int]], ro: dict) -> None:
    """Every statistic of a rollout, recomputed exactly on the same samples."""
    batch, mask = ro["batch"], ro["mask"]
    tok = module.policy.tokenizer
    k = module.rloo_k if module.estimator == "rloo" else 1
    assert batch.prompts() == [p for p in prompts for _ in range(k)]  # RLOO: k consecutive copies
    assert torch.equal(batch.response_mask, response_mask_until_eos(batch.response_ids, tok.eos_token_id))
    with torch.no_grad():
        logp = token_logprobs([module.policy.model], [1.0], batch)
        logp_ref = token_logprobs([module.reference.policies[0].model], [1.0], batch)
    torch.testing.assert_close(ro["logp"], logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ro["logp_ref"], logp_ref, atol=1e-5, rtol=0)
    # the sequence KL sample: sum over real response tokens of log pi - log pi_ref
    torch.testing.assert_close(ro["kl"], ((logp - logp_ref) * mask).sum(-1), atol=1e-5, rtol=0)
    assert float(ro["kl"].abs().max()) > 1e-3  # the policy differs from pi_ref here
    assert ro["info"]["kl"] == pytest.approx(float(ro["kl"].mean()), abs=1e-6)
    scores, _ = module.reward_fn(batch)
    torch.testing.assert_close(ro["scores"], scores)
    assert bool((ro["values"][mask == 0] == 0).all())


def train(toy_task, estimator: str, beta: float, iterations: int = 25, seed: int = 0, check_every: int = 0):
    module = build_module(toy_task, estimator, beta, seed)
    tok = module.policy.tokenizer
    if check_every:  # recompute every few rollouts' statistics exactly, on the policy as it is then
        rollout = module.rollout

        def checked_rollout(prompts):
            ro = rollout(prompts)
            if len(module.history) % check_every == check_every - 1:
                check_rollout(module, prompts, ro)
            return ro

        module.rollout = checked_rollout
    prompts = encode_prompts(tok, toy_task.prompts("train", 32 * iterations, seed))
    loader = torch.utils.data.DataLoader(prompts, batch_size=32, collate_fn=prompt_collate)
    trainer = pl.Trainer(
        max_steps=iterations * module.optimizer_steps_per_iteration,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    return module.history


@pytest.mark.parametrize("estimator", ["ppo", "rloo"])
def test_rollout_statistics_are_exact(toy_task, estimator):
    def reward_fn(batch):  # non-zero on every row, so misplacing it shows
        return 1.0 + batch.response_mask.sum(-1).float() / 10, {}

    module = build_module(toy_task, estimator, beta=0.1, reward_fn=reward_fn)
    with torch.no_grad():  # move the policy away from pi_ref, so the KL is not trivially zero
        for p in module.policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tok = module.policy.tokenizer
    prompts = encode_prompts(tok, toy_task.prompts("train", 64, 0))
    torch.manual_seed(0)
    ro = module.rollout(prompts)
    check_rollout(module, prompts, ro)
    mask = ro["mask"]
    lengths = mask.sum(-1)
    # both kinds of rows occur: stopped by EOS, and cut at max_new_tokens
    assert bool((lengths < module.max_new_tokens).any()) and bool((lengths == module.max_new_tokens).any())

    # per-token rewards: -beta (log pi - log pi_ref), plus the score on the last real token only
    rewards = kl_penalised_rewards(ro["scores"], ro["logp"], ro["logp_ref"], mask, module.beta)
    torch.testing.assert_close(rewards.sum(-1), ro["scores"] - module.beta * ro["kl"], atol=1e-5, rtol=0)
    kl_part = -module.beta * (ro["logp"] - ro["logp_ref"]) * mask
    bonus = rewards - kl_part
    last = (lengths - 1).long()
    rows = torch.arange(len(mask))
    torch.testing.assert_close(bonus[rows, last], ro["scores"], atol=1e-6, rtol=0)
    bonus[rows, last] = 0
    assert float(bonus.abs().max()) < 1e-6
    assert bool((rewards[mask == 0] == 0).all())

    # GAE with gamma = lambda = 1 is the reward-to-go minus the value; the return is the reward-to-go
    values = torch.randn_like(rewards) * mask
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(-1).cumsum(-1).flip(-1) * mask
    torch.testing.assert_close(ret, to_go, atol=1e-5, rtol=0)
    torch.testing.assert_close(adv, (to_go - values) * mask, atol=1e-5, rtol=0)
    # lambda = 0: one-step TD errors r_t + V_{t+1} - V_t, with V = 0 after the last real token
    adv0, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1) * torch.cat(
        [mask[:, 1:], torch.zeros_like(mask[:, :1])], 1
    )
    torch.testing.assert_close(adv0, (rewards + next_values - values) * mask, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["ppo", "rloo"])
def test_rl_raises_the_reward(toy_task, estimator):
    history = train(toy_task, estimator, beta=0.01)
    first = sum(h["score"] for h in history[:3]) / 3
    last = sum(h["score"] for h in history[-3:]) / 3
    assert last > first + 0.1, (first, last)


@pytest.mark.slow
def test_larger_beta_keeps_kl_smaller(toy_task):
    kl_small_beta = sum(h["kl"] for h in train(toy_task, "ppo", beta=0.01)[-5:]) / 5
    # the logged KL is checked against an exact recomputation on the same samples, mid-training
    kl_large_beta = sum(h["kl"] for h in train(toy_task, "ppo", beta=1.0, check_every=6)[-5:]) / 5
    assert kl_large_beta < kl_small_beta / 10, (kl_small_beta, kl_large_beta)


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_kl_to_reference_matches_the_closed_form(beta):
    """On the one-token bandit, KL(pi_theta || pi_ref) after training is KL(pi* || pi_ref) for this beta.

    Measured (PPO, 160 iterations of 64 samples, seeds 0-1, ~5 s each): beta=0.25: 1.08-1.11 x
    the closed form (0.996 nats); beta=1.0: 0.99-1.23 x (0.144 nats). A KL coefficient of
    2 beta would give 0.27 x at beta=1; no KL penalty, several times the closed form.
    """
    run = train_bandit("ppo", iterations=160, samples=64, beta=beta)
    closed_form = float(kl(run["logp_star"], run["logp_ref"]).mean())
    trained = float(kl(run["logp"], run["logp_ref"]).mean())
    assert 0.75 * closed_form < trained < 1.5 * closed_form, (beta, closed_form, trained)
