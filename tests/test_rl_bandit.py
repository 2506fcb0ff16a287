"""The RL trainer converges to the KL-regularised optimum on a bandit where everything is exact.

With one-token responses (max_new_tokens=1) pi(y|x) is a softmax over the vocabulary, so the
optimum of E_y~pi[r(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x)) is known in closed form,

    pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x),

and KL(pi_theta || pi*) can be computed exactly from the logits, with no sampling. Both
estimators (PPO: per-token reward -beta (log pi - log pi_ref) plus the score, GAE, value head,
whitened advantages; RLOO: score - beta KL_seq with a leave-one-out baseline) have pi* as their
fixed point, so the trained policy must approach it, and keep approaching it as training goes on.

pi_ref is a tiny GPT-2 with a large init (initializer_range=0.3), so it is far from uniform
(entropy ~3.5 nats vs log|V| ~4.75): a trainer that regularised towards the uniform
distribution (an entropy bonus) instead of pi_ref would end ~1.4 nats away from pi*. A KL term
counted twice (effective 2 beta) ends 0.12-0.19 nats away, no KL term at all ~2.8 nats (both
measured by patching the trainer), against 0.02-0.03 for the trainer as it is.
"""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from baselines.ppo import PPOModule, prompt_collate
from mpo_exp.data import collate
from mpo_exp.generation import encode_prompts
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.policies import Policy
from mpo_exp.scoring import response_logits
from mpo_exp.tasks.toy import ToyTask

BETA = 0.5
# prompts of different lengths, so rollouts are left-padded
PROMPTS = ["explain cats please <sep>", "cats <sep>", "tell me about space now <sep>", "describe music <sep>"]

# samples per iteration, iterations, the iteration at which the "short run" is read, and the
# tolerance on the long run's KL(pi_theta || pi*). Measured on 2 busy shared CPU cores, seeds 0-4
# (sampling and minibatch order; pi_ref, the reward table and the starting policy fixed),
# initial KL(pi_ref || pi*) = 0.564:
#   PPO : KL after 50 iterations 0.092-0.123, after 320 iterations 0.023-0.030  (9-18 s)
#   RLOO: KL after 40 iterations 0.070-0.084, after 160 iterations 0.016-0.025  (4-6 s)
# Both keep decreasing with more iterations or a decaying lr (PPO 0.006, RLOO 0.011 after 600
# iterations with lr 3e-3 -> 1e-3 -> 3e-4): the residual is sampling noise, not a bias. The
# trained policy is 4-6x further from the optimum of 2 beta (0.09-0.15) and ~10x further from
# that of beta / 2 (0.24-0.32) than from pi*; the tolerance leaves a 2x margin on the worst seed.
SETTINGS = {
    "ppo": dict(samples=64, iterations=320, short=50, tol=0.06),
    "rloo": dict(samples=128, iterations=160, short=40, tol=0.06),
}


def build_reference(tok) -> Policy:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_layer=1,
        n_embd=32,
        n_head=2,
        n_positions=32,
        initializer_range=0.3,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return Policy("ref", GPT2LMHeadModel(cfg).eval(), tok)


@torch.no_grad()
def next_token_logprobs(model, tok, prompts: list[list[int]]) -> torch.Tensor:
    """Exact log pi(.|x) for each prompt: (n_prompts, V), read from the logits."""
    was_training = model.training
    model.eval()
    batch = collate(prompts, [[tok.eos_token_id]] * len(prompts), tok.pad_token_id)
    out = F.log_softmax(response_logits(model, batch)[:, 0], -1)
    model.train(was_training)
    return out


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


class ExactKL(pl.Callback):
    """KL(pi_theta || pi*) averaged over the prompts, after every iteration (one rollout + updates)."""

    def __init__(self, tok, prompts, logp_star) -> None:
        self.tok, self.prompts, self.logp_star, self.trace = tok, prompts, logp_star, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        logp = next_token_logprobs(module.net.lm, self.tok, self.prompts)
        self.trace.append(float(kl(logp, self.logp_star).mean()))


def train_bandit(estimator: str, iterations: int, samples: int, seed: int = 0, beta: float = BETA):
    """Train on the bandit; returns a dict with the exact log-probs and the per-iteration KL trace."""
    tok = ToyTask().build_tokenizer()
    prompts = encode_prompts(tok, PROMPTS)
    ref = build_reference(tok)
    table = torch.rand(len(prompts), len(tok), generator=torch.Generator().manual_seed(0)) * 2.0
    logp_ref = next_token_logprobs(ref.model, tok, prompts)
    logp_star = F.log_softmax(logp_ref + table / beta, -1)  # pi_ref exp(r / beta) / Z

    index = {tuple(p): i for i, p in enumerate(prompts)}

    def reward_fn(batch):  # r(x, y) from the table; y is the one response token (may be EOS)
        assert batch.response_ids.shape[1] == 1 and bool(batch.response_mask.all())
        rows = torch.tensor([index[tuple(p)] for p in batch.prompts()])
        return table[rows, batch.response_ids[:, 0].cpu()], {}

    torch.manual_seed(seed)
    policy = Policy("pi", copy.deepcopy(ref.model), tok)
    module = PPOModule(
        policy,
        MixedPolicy.single(ref, "ref"),
        reward_fn,
        beta=beta,
        max_new_tokens=1,
        estimator=estimator,
        lr=3e-3,
        rloo_k=4,
    )
    per_step = samples // (module.rloo_k if estimator == "rloo" else 1)
    data = [prompts[i % len(prompts)] for i in range(per_step * iterations)]
    loader = torch.utils.data.DataLoader(data, batch_size=per_step, collate_fn=prompt_collate)
    exact = ExactKL(tok, prompts, logp_star)
    trainer = pl.Trainer(
        max_steps=iterations * module.optimizer_steps_per_iteration,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[exact],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    assert len(exact.trace) == iterations
    return dict(
        logp_ref=logp_ref,
        logp_star=logp_star,
        logp_star_fn=lambda beta: F.log_softmax(logp_ref + table / beta, -1),
        logp=next_token_logprobs(module.net.lm, tok, prompts),
        trace=exact.trace,
        history=module.history,
    )


@pytest.mark.parametrize("estimator", ["ppo", "rloo"])
def test_rl_converges_to_the_kl_regularised_optimum(estimator):
    s = SETTINGS[estimator]
    run = train_bandit(estimator, s["iterations"], s["samples"])
    logp, logp_ref, star = run["logp"], run["logp_ref"], run["logp_star_fn"]
    initial = float(kl(logp_ref, run["logp_star"]).mean())
    short, long = run["trace"][s["short"] - 1], run["trace"][-1]
    # the long run read after fewer iterations is the shorter run: training on CPU is deterministic
    shorter_run = train_bandit(estimator, s["short"], s["samples"])
    assert shorter_run["trace"][-1] == pytest.approx(short, abs=1e-5)
    assert long == pytest.approx(float(kl(logp, run["logp_star"]).mean()), abs=1e-6)
    assert initial > 0.5, initial  # the problem is not trivial: pi_ref is far from pi*
    assert short < initial / 3, (initial, short)
    assert long < s["tol"], (initial, short, long)
    assert long < short / 2, (short, long)  # training longer keeps approaching pi*
    # closer to the optimum of this beta than to those of half or twice this beta
    for other in (BETA / 2, 2 * BETA):
        assert long < float(kl(logp, star(other)).mean()) / 2, (other, long)
    # the KL the trainer logs (sampled log pi - log pi_ref) estimates the exact KL(pi_theta || pi_ref)
    logged = sum(h["kl"] for h in run["history"][-20:]) / 20
    exact = float(kl(logp, logp_ref).mean())
    assert logged == pytest.approx(exact, abs=0.1), (logged, exact)
