"""Metrics by hand (win rate with ties, z-scores) and the shared cost meter."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mpo_exp.cost import CostMeter, StageCost, n_params
from mpo_exp.evaluation import PolicyEval, win_rate, z_scores


def test_win_rate_counts_ties_half():
    rewards = torch.tensor([[1.0, 0.0], [2.0, 5.0], [0.0, 1.0], [3.0, 3.0]])
    base = torch.tensor([[0.0, 0.0], [2.0, 1.0], [1.0, 1.0], [1.0, 4.0]])
    # col 0: win, tie, loss, win -> (1 + .5 + 0 + 1)/4 ; col 1: tie, win, tie, loss -> (.5 + 1 + .5 + 0)/4
    torch.testing.assert_close(win_rate(rewards, base), torch.tensor([0.625, 0.5]))


def test_z_scores_against_baseline_distribution():
    base = torch.tensor([[0.0, 10.0], [2.0, 30.0]])  # means 1, 20; stds sqrt(2), sqrt(200)
    rewards = torch.tensor([[3.0, 20.0], [3.0, 20.0]])
    torch.testing.assert_close(z_scores(rewards, base), torch.tensor([2 / 2**0.5, 0.0]))


def test_summary_reports_minimum_over_objectives():
    base = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    ev = PolicyEval(rewards=torch.tensor([[2.0, 0.0], [2.0, 0.0], [2.0, 1.0]]), kl=0.3, examples=[])
    s = ev.summary(["a", "b"], base)
    assert s["min_win_rate"] == pytest.approx(min(s["win_rate"].values()))
    assert (
        s["min_reward_z"] == pytest.approx(s["reward_z"]["b"]) and s["reward_z"]["b"] < 0 < s["reward_z"]["a"]
    )
    assert s["kl"] == 0.3


def test_summary_keeps_per_prompt_outcomes_in_prompt_order():
    base = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    ev = PolicyEval(rewards=torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]]), kl=0.0, examples=[])
    s = ev.summary(["a", "b"], base)
    # a: win, tie, loss ; b: tie, loss, win — compact ints and 0.5 floats, one per eval prompt
    assert s["win_per_prompt"] == {"a": [1, 0.5, 0], "b": [0.5, 0, 1]}
    assert [type(v) for v in s["win_per_prompt"]["a"]] == [int, float, int]
    for o in ("a", "b"):
        assert sum(s["win_per_prompt"][o]) / 3 == pytest.approx(s["win_rate"][o])
    json.loads(json.dumps(s))  # JSON-serialisable


def test_cost_meter_flops_and_stages():
    model = torch.nn.Linear(10, 10)
    n = n_params(model)
    assert n == 110
    meter = CostMeter()
    with meter.stage("train"):
        meter.forward(n, 100)
        meter.backward(n, 100)
    with meter.stage("score"):
        meter.forward(n, 50)
    meter.forward(n, 999)  # no stage open: not charged anywhere
    assert meter.stages["train"].flops == 6 * n * 100
    assert meter.stages["train"].tokens_bwd == 100
    assert meter.stages["score"].flops == 2 * n * 50
    assert meter.stages["train"].wall_s >= 0
    with meter.stage("rl"):
        meter.charge(n, 10, backward=True)
        meter.charge(n, 10)
    assert meter.stages["rl"].flops == 6 * n * 10 + 2 * n * 10 and meter.stages["rl"].tokens_bwd == 10
    meter.record("old", StageCost(wall_s=2.0, flops=1.0, reused=True))
    total = meter.total(("train", "old"))
    assert total.flops == 6 * n * 100 + 1 and total.wall_s >= 2.0
    assert set(meter.as_dict()) == {"train", "score", "rl", "old"}


def test_the_run_table_bolds_the_best_minimum_only():
    from mpo_exp.results import format_table

    def pol(m):
        return {
            "win_rate": {"a": m},
            "min_win_rate": m,
            "reward_z": {"a": 0.0},
            "min_reward_z": 0.0,
            "kl": 0.0,
        }

    table = format_table({"objectives": ["a"], "policies": {"x": pol(0.4), "y": pol(0.6), "z": pol(0.5)}})
    assert table.count("**") == 2 and "**0.600**" in table


def test_scoring_at_the_temperature_sampled_describes_the_samples(tiny_policies):
    """At T = 0.5 the sampler's first-token frequencies match exp(token_logprobs(..., temperature=T))."""
    from mpo_exp.generation import sample
    from mpo_exp.mpo.mixing import MixedPolicy
    from mpo_exp.scoring import token_logprobs

    p1, p2 = (copy.deepcopy(p) for p in tiny_policies[:2])
    for p in (p1, p2):  # logits x4 (the final layer norm's output): peaked enough for T to matter
        with torch.no_grad():
            p.model.transformer.ln_f.weight.mul_(4)
            p.model.transformer.ln_f.bias.mul_(4)
    pol = MixedPolicy("mix", [p1, p2], [0.3, 0.7])
    prompt = p1.tokenizer("the cat", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    n = 3000
    batch = sample(pol, [prompt] * n, max_new_tokens=1, temperature=0.5)
    vocab = p1.model.config.vocab_size
    ids = torch.arange(vocab)
    one_token = batch[:1]
    with torch.no_grad():  # the probability of every first token, read through scoring
        rows = type(one_token)(
            one_token.prompt_ids.repeat(vocab, 1),
            one_token.prompt_mask.repeat(vocab, 1),
            ids.view(-1, 1),
            torch.ones(vocab, 1, dtype=one_token.response_mask.dtype),
        )
        models, weights = [p1.model, p2.model], [0.3, 0.7]
        expected = token_logprobs(models, weights, rows, temperature=0.5)[:, 0].exp().double()
        at_one = token_logprobs(models, weights, rows)[:, 0].exp().double()
    assert expected.sum() == pytest.approx(1, abs=1e-5)
    freq = torch.bincount(batch.response_ids[:, 0], minlength=vocab).double() / n
    se = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 4.5 * se + 1e-3).all()
    assert ((freq - at_one).abs() > 4.5 * (at_one * (1 - at_one) / n).sqrt() + 1e-3).any()  # T matters


def test_the_kl_column_is_of_the_distribution_sampled(toy_task, tiny_policies):
    """eval.temperature != 1: pi_ref's own KL is KL(pi_ref at T || pi_ref) > 0, by hand; at T = 1 it is 0."""
    from mpo_exp.evaluation import Evaluator
    from mpo_exp.mpo.mixing import MixedPolicy
    from mpo_exp.scoring import score_sequences

    toy_task.bind_tokenizer(tiny_policies[0].tokenizer)
    ref = MixedPolicy.single(tiny_policies[0])
    kls = {}
    for t in (1.0, 0.5):
        ev = Evaluator(toy_task, ref, n_prompts=64, seed=0, temperature=t)
        ev.reference_rewards()
        kls[t] = ev.evaluate(ref).kl
        batch = ev._sample(ref, None, stream=1)  # the very samples evaluate() drew
        by_hand = score_sequences([ref.policies[0].model], [1.0], batch, temperature=t) - score_sequences(
            [ref.policies[0].model], [1.0], batch
        )
        assert kls[t] == pytest.approx(float(by_hand.mean()), abs=1e-5)
        # the sampler's own log-probs (one scoring pass fewer) give the same column
        own = Evaluator(toy_task, ref, n_prompts=64, seed=0, temperature=t, own_logprobs=True)
        own.reference_rewards()
        assert own.evaluate(ref).kl == pytest.approx(kls[t], abs=1e-4)
    assert kls[1.0] == pytest.approx(0, abs=1e-6) and kls[0.5] > 0.01  # was 0 at every T

    # pi_ref evaluated against itself with its own log-probs: no scoring pass, a KL of exactly 0
    from mpo_exp.cost import CostMeter

    meter, own = CostMeter(), Evaluator(toy_task, ref, n_prompts=64, seed=0, own_logprobs=True)
    own.reference_rewards()
    with meter.stage("ref"):
        assert own.evaluate(ref, meter).kl == 0.0
    with meter.stage("other"):
        own.evaluate(MixedPolicy.single(tiny_policies[1]), meter)
    assert meter.stages["other"].tokens_fwd > meter.stages["ref"].tokens_fwd > 0
