"""Baselines: GAE by hand, KL-penalised rewards, BT loss, aggregations, soups, EM group recovery."""

from __future__ import annotations

import math

import pytest
import torch

from baselines.aggregation import RewardAggregator, group_min, sample_min, weighted_sum
from baselines.em import em_user_groups, purity
from baselines.normalization import Normalizer, partition_shift
from baselines.ppo import gae, kl_penalised_rewards, masked_whiten
from baselines.reward_model import bt_loss
from baselines.soups import average_state_dicts


def test_gae_matches_hand_computation():
    # one sequence of 3 real tokens + 1 padding, gamma = 0.9, lambda = 0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.3  # last real token: no bootstrap
    d1 = 0.0 + 0.9 * 0.3 - 0.4
    d0 = 0.0 + 0.9 * 0.4 - 0.5
    a2 = d2
    a1 = d1 + 0.9 * 0.5 * a2
    a0 = d0 + 0.9 * 0.5 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0]]))


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 2.0], [0.3, 1.0, 0.0]])
    values = torch.tensor([[0.2, 0.1, 0.4], [0.0, 0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    togo = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1])
    torch.testing.assert_close(adv, (togo - values) * mask)


def test_kl_penalised_rewards_put_score_on_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = kl_penalised_rewards(torch.tensor([3.0, -1.0]), logp, ref, mask, beta=0.1)
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.1, 3.0], [-0.1, -1.0, 0.0]]))


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert float(w[mask.bool()].mean()) == pytest.approx(0, abs=1e-6)
    assert float(w[mask.bool()].std(unbiased=False)) == pytest.approx(1, abs=1e-3)
    assert (w[:, 2] == 0).all()


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = -(math.log(1 / (1 + math.exp(-1))) + math.log(1 / (1 + math.exp(1)))) / 2
    assert float(bt_loss(chosen, rejected)) == pytest.approx(expected)


def test_aggregations():
    r = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    torch.testing.assert_close(weighted_sum(r, [0.5, 0.25, 0.25]), torch.tensor([0.125, 1.25]))
    torch.testing.assert_close(sample_min(r), torch.tensor([-2.0, -1.0]))
    scores, k = group_min(r)  # column means 2, -1, -0.25 -> objective 1 is the worst served
    assert k == 1 and torch.equal(scores, r[:, 1])


def test_normalizers_by_hand():
    # 2 prompts x 3 pi_ref samples x 2 objectives
    scores = torch.tensor(
        [[[0.0, 1.0], [1.0, 1.0], [2.0, 4.0]], [[-1.0, 0.0], [0.0, 2.0], [1.0, 0.0]]], dtype=torch.float64
    )
    beta = 0.5
    by_hand = torch.tensor(
        [
            [
                beta * math.log((math.exp(0 / beta) + math.exp(1 / beta) + math.exp(2 / beta)) / 3),
                beta * math.log((2 * math.exp(1 / beta) + math.exp(4 / beta)) / 3),
            ],
            [
                beta * math.log((math.exp(-1 / beta) + 1 + math.exp(1 / beta)) / 3),
                beta * math.log((2 + math.exp(2 / beta)) / 3),
            ],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(partition_shift(scores, beta), by_hand)
    part = Normalizer.fit(scores, "partition", beta)
    torch.testing.assert_close(part.scale, torch.ones(2, dtype=torch.float64))  # the BT scale is kept
    torch.testing.assert_close(part(scores), scores - by_hand.mean(0))
    # idempotent: P(P(r)) = P(r) for a per-objective shift
    again = Normalizer.fit(part(scores), "partition", beta)
    torch.testing.assert_close(again.shift, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    flat = scores.reshape(-1, 2)
    z = Normalizer.fit(scores, "zscore", beta)
    torch.testing.assert_close(z(scores), (scores - flat.mean(0)) / flat.std(0))
    assert torch.equal(Normalizer.fit(scores, "none", beta)(scores), scores)
    stats = part.stats[1]
    assert stats["partition_shift"] == pytest.approx(float(by_hand[:, 1].mean()))
    assert stats["partition_shift_prompt_std"] == pytest.approx(float(by_hand[:, 1].std()))
    with pytest.raises(ValueError, match="normalization"):
        Normalizer.fit(scores, "rank", beta)


def _exact_ref_samples(rewards: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Response i repeated counts[i] times: a sample mean over them is E_{pi_ref} exactly, with
    pi_ref(i) = counts[i] / counts.sum(). rewards (n, K) -> (counts.sum(), K)."""
    return rewards.repeat_interleave(counts, dim=0)


@pytest.mark.parametrize(
    ("how", "morlhf_matches", "min_matches"),
    [
        ("partition", True, True),
        ("partition_prompt", True, True),
        ("none", True, False),
        ("zscore", False, False),
    ],
)
def test_normalised_rewards_give_morlhf_the_fixed_weight_mixture_and_maxmin_mpos_min(
    how, morlhf_matches, min_matches
):
    """Reward models are BT rewards up to an offset each (5, -2, 0.7 here).

    MORLHF: the KL-regularised optimum of sum_k w_k r~_k at beta vs prod_k pi_k^{w_k}, where
    pi_k ∝ pi_ref exp(r_k/beta). A constant per objective does not move it, so raw scores pass
    too; z-scoring divides objective k by sigma_k (another effective beta per objective) and fails.
    MaxMin-RLHF: a min over objectives is MPO's max-min problem only if r~_k is
    beta*log(pi_k/pi_ref) — the offsets must go (raw scores fail) at the BT scale (z-scores fail).
    """
    g = torch.Generator().manual_seed(0)
    beta, n_resp, k = 0.5, 12, 3
    counts = torch.randint(1, 5, (n_resp,), generator=g)
    log_ref = torch.log(counts.double() / counts.sum())
    r = torch.randn(n_resp, k, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.3])
    rm = r + torch.tensor([5.0, -2.0, 0.7])  # each reward model's arbitrary offset
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    log_pi_k = torch.log_softmax(log_ref.unsqueeze(-1) + r / beta, 0)
    mixture = torch.log_softmax(log_pi_k @ w, 0)
    prompt = [[7, 3]]  # one prompt (its token ids), for the per-prompt normaliser
    norm = Normalizer.fit(_exact_ref_samples(rm, counts).unsqueeze(0), how, beta, prompts=prompt)
    normalised = norm(rm, prompt * n_resp)
    optimum = torch.log_softmax(log_ref + weighted_sum(normalised, w.tolist()) / beta, 0)
    assert torch.allclose(optimum, mixture, atol=1e-9) == morlhf_matches
    implicit = beta * (log_pi_k - log_ref.unsqueeze(-1))  # what MPO's pi_k say about each response
    assert torch.allclose(sample_min(normalised), sample_min(implicit), atol=1e-9) == min_matches
    assert torch.allclose(normalised, implicit, atol=1e-9) == min_matches


def _contextual_bandit(n_prompts: int = 6, n_resp: int = 8, k: int = 3, beta: float = 0.5):
    """Prompts with their own pi_ref and BT rewards; reward models add an offset per prompt and
    objective (the BT loss only compares responses to the same prompt, so nothing pins it)."""
    g = torch.Generator().manual_seed(1)
    base = torch.randint(1, 5, (n_resp,), generator=g)
    counts = torch.stack([base[torch.randperm(n_resp, generator=g)] for _ in range(n_prompts)])
    log_ref = torch.log(counts.double() / counts.sum(-1, keepdim=True))  # (N, n)
    r = torch.randn(n_prompts, n_resp, k, generator=g, dtype=torch.float64)
    offsets = 2.0 * torch.randn(n_prompts, 1, k, generator=g, dtype=torch.float64)
    rm = r + offsets
    implicit = beta * (torch.log_softmax(log_ref.unsqueeze(-1) + r / beta, 1) - log_ref.unsqueeze(-1))
    samples = torch.stack([_exact_ref_samples(rm[i], counts[i]) for i in range(n_prompts)])
    prompts = [[5] * (1 + i % 3) + [10 + i] for i in range(n_prompts)]  # unequal lengths: padded
    return beta, rm, implicit, samples, prompts


def test_per_prompt_partition_removes_per_prompt_offsets_the_global_shift_keeps():
    beta, rm, implicit, samples, prompts = _contextual_bandit()
    n_prompts, n_resp, k = rm.shape
    rows = [p for p in prompts for _ in range(n_resp)]
    per_prompt = Normalizer.fit(samples, "partition_prompt", beta, prompts=prompts)
    glob = Normalizer.fit(samples, "partition", beta)
    target = implicit.reshape(-1, k)
    exact = per_prompt(rm.reshape(-1, k), rows)
    torch.testing.assert_close(exact, target, atol=1e-9, rtol=0)  # r~_k = beta log pi_k/pi_ref
    approx = glob(rm.reshape(-1, k))
    assert not torch.allclose(sample_min(approx), sample_min(target), atol=0.1)
    assert (approx.argmin(-1) != target.argmin(-1)).any()  # the global shift picks wrong minima
    # both report the same per-prompt statistics; the spread is what the global shift leaves in
    assert per_prompt.stats == glob.stats
    spread = partition_shift(samples, beta).std(0)
    assert per_prompt.stats[0]["partition_shift_prompt_std"] == pytest.approx(float(spread[0]))
    # the global option's spec (an RL policy's cache key) is as before; the per-prompt one has the table
    assert set(glob.spec()) == {"how", "shift", "scale"}
    other = Normalizer.fit(samples.flip(0), "partition_prompt", beta, prompts=prompts)
    assert per_prompt.spec()["prompt_shift"] != other.spec()["prompt_shift"]
    with pytest.raises(KeyError, match="not among"):
        per_prompt(rm[0], [[99]] * n_resp)
    with pytest.raises(ValueError, match="token ids"):
        per_prompt(rm[0])
    with pytest.raises(ValueError, match="token ids"):
        Normalizer.fit(samples, "partition_prompt", beta)


def test_reward_aggregator_looks_up_each_rollouts_prompt_by_its_token_ids(monkeypatch):
    """The RL reward function sees only a padded batch: the shift must follow each row's prompt."""
    from mpo_exp.data import collate

    beta, rm, implicit, samples, prompts = _contextual_bandit()
    n_prompts, n_resp, k = rm.shape
    norm = Normalizer.fit(samples, "partition_prompt", beta, prompts=prompts)
    order = torch.randperm(n_prompts * n_resp, generator=torch.Generator().manual_seed(2))
    pairs = [(int(i) // n_resp, int(i) % n_resp) for i in order]  # shuffled (prompt, response) rows
    batch = collate([prompts[x] for x, _ in pairs], [[4, 4 + y] for _, y in pairs], pad_id=0)
    monkeypatch.setattr("baselines.reward_model.score_with_rm", lambda model, b, meter=None: model(b))

    def reward_model(j: int):  # reads back rm[x, y, j] from the rows' token ids
        return lambda b: torch.stack(
            [rm[prompts.index(p), r[1] - 4, j] for p, r in zip(b.prompts(), b.responses(), strict=True)]
        )

    agg = RewardAggregator([reward_model(j) for j in range(k)], list("abc"), norm, "sample_min")
    scores, _ = agg(batch)
    want = torch.stack([implicit[x, y].min() for x, y in pairs])
    torch.testing.assert_close(scores, want, atol=1e-9, rtol=0)


def test_per_prompt_normalisation_fits_on_the_rl_training_prompts(smoke_cfg, tmp_path):
    """End to end: one shift per distinct RL training prompt, every rollout's prompt found."""
    from mpo_exp.pipeline import run_pipeline

    cfg = smoke_cfg(
        "method=maxmin_rlhf", "method.variants=[sample_min]", "method.normalization=partition_prompt"
    )
    res = run_pipeline(cfg, tmp_path / "run")
    assert res["reward_normalization"] == "partition_prompt"
    assert res["policy_costs"]["maxmin_rlhf_sample_min"]["total"][-3:] == [
        "rm/ref_samples",
        "rm/normalizer",
        "rl/maxmin_rlhf_sample_min",
    ]
    (scores,) = (tmp_path / "cache").glob("rm_reference_scores/**/scores.pt")
    n_rl = int(cfg.rl.iterations) * int(cfg.rl.batch_size)
    from mpo_exp.tasks.toy import ToyTask

    distinct = set(ToyTask().prompts("train", n_rl, int(cfg.seed) + 5))
    assert torch.load(scores).shape == (len(distinct), int(cfg.reward_model.normalizer.samples_per_prompt), 3)
    for stats in res["reward_models"].values():
        assert stats["partition_shift_prompt_std"] > 0


def test_reward_models_stop_at_their_held_out_plateau_and_runs_record_the_budgets(smoke_cfg, tmp_path):
    """min_delta=10 cannot be beaten after the first check: with every=2 and patience=1 each
    reward model stops at step 4 of 50; results.json records both budgets."""
    from mpo_exp.pipeline import run_pipeline

    cfg = smoke_cfg(
        "method=morlhf",
        "reward_model.max_steps=50",
        "reward_model.plateau.every=2",
        "reward_model.plateau.patience=1",
        "reward_model.plateau.min_delta=10",
    )
    res = run_pipeline(cfg, tmp_path / "run")
    for stats in res["reward_models"].values():
        budget = stats["budget"]
        assert budget["steps"] == 4 and budget["max_steps"] == 50 and budget["plateaued"] is True
        assert budget["best_step"] == 2  # the weights kept are the best check's
        assert [c["step"] for c in budget["curve"]] == [2, 4]
        assert all(0 <= c["heldout_accuracy"] <= 1 and c["heldout_loss"] > 0 for c in budget["curve"])
    rl = res["rl_budget"]["morlhf"]
    assert rl["iterations"] == int(cfg.rl.iterations) == len(res["rl_history"]["morlhf"])
    assert rl["prompts_per_iteration"] == int(cfg.rl.batch_size)


def test_a_reward_model_that_stops_at_its_plateau_keeps_its_best_checks_weights(
    smoke_cfg, tmp_path, monkeypatch
):
    """Held-out losses 1.0, 0.5, 0.9, 0.95 (patience 2): training stops at step 4 and the saved
    model is the one scored at step 2, not the last one."""
    from baselines import reward_model as rm
    from mpo_exp.pipeline import run_pipeline

    losses, seen = iter([1.0, 0.5, 0.9, 0.95] * 3), []

    def fake(model, data, meter=None):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(losses), 0.5

    monkeypatch.setattr(rm, "heldout_metrics", fake)
    cfg = smoke_cfg(
        "method=morlhf",
        "task.objectives=[helpful]",
        "reward_model.max_steps=10",
        "reward_model.plateau.every=1",
        "reward_model.plateau.patience=2",
    )
    res = run_pipeline(cfg, tmp_path / "run")
    assert res["reward_models"]["helpful"]["budget"]["steps"] == 4
    (saved,) = [p for p in (tmp_path / "cache" / "reward_model").iterdir() if p.is_dir()]
    kept = rm.load_reward_model(saved).state_dict()
    assert all(torch.equal(kept[k], seen[1][k]) for k in kept)
    assert any(not torch.equal(kept[k], seen[3][k]) for k in kept)


def test_rl_checkpoints_are_evaluated_with_the_rl_cost_up_to_them(smoke_cfg, tmp_path):
    """rl.checkpoints=[1,2] of 3 iterations: two more policies, each charged the reward models,
    the normaliser and the RL stage cut at its iteration; their weights are neither pi_ref's
    nor the final policy's."""
    from mpo_exp.pipeline import run_pipeline

    res = run_pipeline(smoke_cfg("method=morlhf", "rl.checkpoints=[1,2]"), tmp_path / "run")
    points = res["rl_checkpoints"]["morlhf"]
    assert [p["iteration"] for p in points] == [1, 2]
    final = res["cost"]["rl/morlhf"]
    assert 0 < points[0]["flops"] < points[1]["flops"] < final["flops"]
    assert 0 < points[0]["wall_s"] < points[1]["wall_s"] < final["wall_s"]
    for p in points:
        name = f"morlhf@it{p['iteration']}"
        assert name in res["policies"] and name in res["method_policies"]
        total = res["policy_costs"][name]["total"]
        assert f"checkpoint/{name}" in total and "rl/morlhf" not in total
        shared = set(res["policy_costs"]["morlhf"]["total"]) - {"rl/morlhf"}
        assert set(total) - {f"checkpoint/{name}"} == shared
        assert res["cost_summary"][name]["total"]["flops"] < res["cost_summary"]["morlhf"]["total"]["flops"]
    (art,) = (tmp_path / "cache").glob("rl_policy/*/checkpoints")
    from safetensors.torch import load_file

    def weights(d):
        return load_file(str(next(d.glob("*.safetensors"))))

    first, last = weights(art / "it1"), weights(art.parent)
    (ref,) = [p for p in (tmp_path / "cache").glob("sft/*") if p.is_dir()]
    assert any(not torch.equal(first[k], last[k]) for k in first)
    assert any(not torch.equal(first[k], weights(ref)[k]) for k in first if k in weights(ref))


def test_rl_checkpoints_are_checked_and_keyed_only_when_set(smoke_cfg):
    from baselines.rl import rl_spec
    from mpo_exp.config import ConfigError, validate_config

    for bad in ("[0]", "[3]", "[1,1]"):
        with pytest.raises(ConfigError, match="rl.checkpoints"):
            validate_config(smoke_cfg(f"rl.checkpoints={bad}"), check_paths=False)
    base = {"iterations": 3, "plateau_tol": 0.02}
    assert rl_spec({**base, "checkpoints": []}) == rl_spec(base) == {"iterations": 3}
    assert rl_spec({**base, "checkpoints": [1]})["checkpoints"] == [1]


def test_the_plateau_rule_is_in_a_reward_models_key_only_when_on():
    from baselines.reward_model import rm_training_spec

    base = {"batch_size": 8, "max_steps": 5, "normalizer": {"n_prompts": 4}}
    off = {**base, "plateau": {"every": 0, "patience": 3, "min_delta": 0.0}}
    on = {**base, "plateau": {"every": 2, "patience": 3, "min_delta": 0.0}}
    assert rm_training_spec(off) == rm_training_spec(base) == {"batch_size": 8, "max_steps": 5}
    assert rm_training_spec(on)["plateau"]["every"] == 2


def test_rl_budget_reads_the_plateau_off_the_last_two_quarters():
    from baselines.rl import rl_budget

    flat = [{"score": 1.0, "kl": 2.0}] * 8  # objective 1 - 0.5 * 2 = 0 throughout
    rising = [{"score": float(i), "kl": 0.0} for i in range(8)]  # quarters (4, 5) then (6, 7)
    assert rl_budget(flat, 0.5, 16, 0.01)["plateaued"] is True
    got = rl_budget(rising, 0.5, 16, 0.01)
    assert got["change_over_last_quarter"] == pytest.approx(2.0)
    assert got["change_stderr"] == pytest.approx(0.5**0.5)  # each quarter's variance is 0.5
    assert got["plateaued"] is False  # 2.0 > 2 * 0.71
    assert rl_budget(rising, 0.5, 16, 2.0)["plateaued"] is True
    assert rl_budget(rising[:7], 0.5, 16, 0.01)["plateaued"] is None  # quarters of one iteration
    # a noisy objective whose quarters differ by less than twice their standard error: no change
    noisy = [{"score": s, "kl": 0.0} for s in (0, 0, 0, 0, 1, -1, 1.5, -1.3)]
    got = rl_budget(noisy, 0.5, 16, 0.01)
    assert abs(got["change_over_last_quarter"]) < 2 * got["change_stderr"] and got["plateaued"] is True


def test_group_min_follows_the_worst_objective_across_batches():
    class Fixed(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

    none = Normalizer("none", torch.zeros(2), torch.ones(2), [{}, {}])
    agg = RewardAggregator([Fixed(0), Fixed(0)], ["a", "b"], none, "group_min")
    agg.per_objective = lambda batch: batch  # reward models replaced by a fixed table
    for table, worst in [
        (torch.tensor([[0.0, 1.0], [0.0, 1.0]]), 0),
        (torch.tensor([[2.0, 1.0], [2.0, -1.0]]), 1),
    ]:
        scores, info = agg(table)
        assert info["group"] == worst and torch.equal(scores, table[:, worst])
    assert agg.group_counts == [1, 1]
    with pytest.raises(ValueError, match="rule"):
        RewardAggregator([], [], none, "mean")


def test_soup_averages_state_dicts():
    a = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor(3)}
    out = average_state_dicts([a, b], [0.25, 0.75])
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))
    assert out["steps"] == 3
    with pytest.raises(ValueError, match="sum to 1"):
        average_state_dicts([a, b], [0.5, 0.6])
    with pytest.raises(ValueError, match="differ"):
        average_state_dicts([a, {"w": b["w"], "steps": torch.tensor(4)}], [0.5, 0.5])


def test_soup_of_identical_models_is_the_model(tiny_policies):
    sd = tiny_policies[0].model.state_dict()
    out = average_state_dicts([sd, sd, sd], [0.2, 0.3, 0.5])
    for key, value in sd.items():
        torch.testing.assert_close(out[key], value)


def test_em_recovers_synthetic_user_groups():
    """Users from 3 hidden groups, each preferring along its own direction; EM finds the groups."""
    g = torch.Generator().manual_seed(0)
    dim, n_users, pairs_per_user, k = 6, 30, 40, 3
    directions = torch.eye(dim)[:k] * 3.0
    truth = [u % k for u in range(n_users)]
    data = []
    for u in range(n_users):
        x_a, x_b = (
            torch.randn(pairs_per_user, dim, generator=g),
            torch.randn(pairs_per_user, dim, generator=g),
        )
        p = torch.sigmoid((x_a - x_b) @ directions[truth[u]])
        a_wins = torch.rand(pairs_per_user, generator=g) < p
        chosen = torch.where(a_wins.unsqueeze(-1), x_a, x_b)
        rejected = torch.where(a_wins.unsqueeze(-1), x_b, x_a)
        data.append((chosen, rejected))

    def fit(users):  # a linear BT reward model r(x) = theta . x
        theta = torch.zeros(dim, requires_grad=True)
        opt = torch.optim.LBFGS([theta], max_iter=50)
        c = torch.cat([data[u][0] for u in users])
        r = torch.cat([data[u][1] for u in users])

        def closure():
            opt.zero_grad()
            loss = bt_loss(c @ theta, r @ theta) + 1e-3 * theta.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        return theta.detach()

    def loglik(theta, u):
        c, r = data[u]
        return -float(bt_loss(c @ theta, r @ theta)) * len(c)

    result = em_user_groups(n_users, k, fit, loglik, iterations=10, seed=1)
    assert purity(result.assignment, truth) == 1.0
    assert len(set(result.assignment)) == k
    assert result.iterations <= 10


def test_purity():
    assert purity([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    assert purity([0, 0, 0, 0], [1, 1, 2, 2]) == 0.5
