"""The RL trainer optimises: a reward rises, and a larger beta keeps the policy closer to pi_ref."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch

from baselines.ppo import PPOModule, prompt_collate
from mpo_exp.generation import encode_prompts
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.policies import Policy, TinyGPT2Spec


def train(toy_task, estimator: str, beta: float, iterations: int = 25, seed: int = 0):
    tok = toy_task.build_tokenizer()
    torch.manual_seed(seed)
    ref = TinyGPT2Spec(n_layer=1, n_embd=32, n_head=2).build(tok)
    policy = Policy("pi", copy.deepcopy(ref.model), tok)
    target = tok.convert_tokens_to_ids("haha")

    def reward_fn(batch):  # share of response tokens that are "haha"
        hits = ((batch.response_ids == target) & batch.response_mask.bool()).float().sum(-1)
        return hits / batch.response_mask.sum(-1).clamp(min=1), {}

    module = PPOModule(
        policy,
        MixedPolicy.single(ref.eval(), "ref"),
        reward_fn,
        beta=beta,
        max_new_tokens=8,
        estimator=estimator,
        lr=3e-3,
        rloo_k=4,
    )
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
    kl_large_beta = sum(h["kl"] for h in train(toy_task, "ppo", beta=1.0)[-5:]) / 5
    assert kl_large_beta < kl_small_beta
    assert kl_large_beta >= -0.05  # a Monte-Carlo KL estimate: about non-negative
