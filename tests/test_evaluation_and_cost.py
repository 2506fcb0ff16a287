"""Metrics by hand (win rate with ties, z-scores) and the shared cost meter."""

from __future__ import annotations

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
