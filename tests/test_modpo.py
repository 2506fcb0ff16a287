"""MODPO: the loss by hand, its reduction to DPO, its optimum (MORLHF's), margins, configs, a run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from baselines.modpo import MarginDataset, MODPOModule, modpo_loss, oriented_margin, pair_rewards
from mpo_exp.config import ConfigError, build_method, validate_config
from mpo_exp.data import collate
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.pipeline import run_pipeline
from mpo_exp.preferences import PairSet
from mpo_exp.training.dpo import dpo_loss
from tests.conftest import compose_config


def test_modpo_loss_by_hand():
    beta, w_k = 0.5, 0.25
    chosen, rejected = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
    ref_c, ref_r = torch.tensor([-2.5, -2.0]), torch.tensor([-2.0, -3.0])
    margin = torch.tensor([0.2, -0.4])  # sum_{j != k} w_j (r_j(y_w) - r_j(y_l))
    loss, logits = modpo_loss(chosen, rejected, ref_c, ref_r, margin, beta, w_k)
    # row 0: implicit = (-3 + 2.5) - (-2 + 2) = -0.5 ; logit = (0.5 * -0.5 - 0.2) / 0.25 = -1.8
    # row 1: implicit = (-1 + 2) - (-4 + 3) = 2     ; logit = (0.5 * 2 + 0.4) / 0.25 = 5.6
    torch.testing.assert_close(logits, torch.tensor([-1.8, 5.6]))
    expected = (math.log1p(math.exp(1.8)) + math.log1p(math.exp(-5.6))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="w_k > 0"):
        modpo_loss(chosen, rejected, ref_c, ref_r, margin, beta, 0.0)


def test_modpo_is_dpo_when_the_other_weights_are_zero():
    g = torch.Generator().manual_seed(0)
    c, r, rc, rr = (torch.randn(8, generator=g) for _ in range(4))
    dpo, dpo_margin = dpo_loss(c, r, rc, rr, beta=0.3)
    modpo, logits = modpo_loss(c, r, rc, rr, torch.zeros(8), beta=0.3, weight=1.0)
    torch.testing.assert_close(modpo, dpo)
    torch.testing.assert_close(logits, dpo_margin)
    # the margin a weight vector (1, 0, 0) builds is zero, whatever the other rewards are
    pairs = _pairs(torch.tensor([[True, False, True]] * 4), torch.zeros(4, 3, dtype=torch.bool))
    ra, rb = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert torch.equal(oriented_margin(pairs, ra, rb, 0, [1.0, 0.0, 0.0], drop_ties=True), torch.zeros(4))


def _pairs(a_wins: torch.Tensor, tie: torch.Tensor) -> PairSet:
    n = a_wins.shape[0]
    seqs = collate([[1]] * n, [[2]] * n, 0)
    zeros = torch.zeros(n, a_wins.shape[1])
    return PairSet(seqs, seqs, zeros, zeros, a_wins, tie, torch.zeros(n), torch.zeros(n))


def test_margin_follows_objective_k_orientation_and_drops_its_ties():
    a_wins = torch.tensor([[True, True, False], [False, True, True], [True, False, False]])
    tie = torch.tensor([[False, False, False], [False, False, False], [True, False, False]])
    ra = torch.tensor([[9.0, 1.0, 2.0], [9.0, 0.0, 1.0], [9.0, 5.0, 5.0]])
    rb = torch.tensor([[9.0, 0.0, 4.0], [9.0, 3.0, 0.0], [9.0, 0.0, 0.0]])
    w = [0.5, 0.2, 0.3]
    margin = oriented_margin(_pairs(a_wins, tie), ra, rb, 0, w, drop_ties=True)
    # pair 0: a wins on objective 0 -> 0.2*(1-0) + 0.3*(2-4) = -0.4
    # pair 1: b wins -> -(0.2*(0-3) + 0.3*(1-0)) = 0.3
    torch.testing.assert_close(margin, torch.tensor([-0.4, 0.3]))  # pair 2 ties on objective 0: dropped
    kept = oriented_margin(_pairs(a_wins, tie), ra, rb, 0, w, drop_ties=False)
    assert kept.shape == (3,) and float(kept[2]) == pytest.approx(0.2 * 5 + 0.3 * 5)  # a "wins" the tie


class _TokenSumRM(torch.nn.Module):
    """A stand-in reward model: r(x, y) = Σ_t c[token_t] over the row's real tokens, so every row's
    score is known by hand and depends on that row's own tokens only."""

    def __init__(self, c: torch.Tensor) -> None:
        super().__init__()
        self.c = torch.nn.Parameter(c, requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=(self.c[input_ids] * attention_mask).sum(-1, keepdim=True))


def _logp_by_hand(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log π(response | prompt) from one unpadded forward pass: no masks, no batching."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return logp.gather(-1, ids[0, 1:, None])[-len(response) :].sum()


def _random_pairs(n: int, vocab: int, tie_k: list[int], k: int, g: torch.Generator) -> PairSet:
    """n pairs of distinct random responses (lengths vary, so padding differs row to row)."""

    def seq(lo: int, hi: int) -> list[int]:
        return torch.randint(5, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    prompts = [seq(2, 5) for _ in range(n)]
    a = collate(prompts, [seq(1, 6) for _ in range(n)], 0)
    b = collate(prompts, [seq(1, 6) for _ in range(n)], 0)
    a_wins = torch.rand(n, 3, generator=g) < 0.5
    tie = torch.zeros(n, 3, dtype=torch.bool)
    tie[tie_k, k] = True
    zeros = torch.zeros(n, 3)
    return PairSet(a, b, zeros, zeros, a_wins, tie, torch.randn(n, generator=g), torch.randn(n, generator=g))


@pytest.mark.parametrize("source", ["rm", "implicit"])
def test_margins_are_each_rows_own_weighted_reward_differences(source, tiny_policies, monkeypatch):
    """pair_rewards -> oriented_margin -> MarginDataset, batched in shuffled order: each row's margin
    is Σ_{j≠k} w_j [r_j(chosen) - r_j(rejected)] of the chosen/rejected tokens that row holds, and
    its chosen response is the one objective k's label prefers."""
    g = torch.Generator().manual_seed(0)
    objectives, k, w, beta = ["a", "b", "c"], 1, [0.5, 0.3, 0.2], 0.7
    tok = tiny_policies[0].tokenizer
    pairs = _random_pairs(9, len(tok), tie_k=[2, 6], k=k, g=g)
    if source == "rm":
        coef = {o: torch.randn(len(tok), generator=g) for o in objectives}
        rms = {o: SimpleNamespace(model=_TokenSumRM(coef[o])) for o in objectives}
        monkeypatch.setattr("baselines.modpo.reward_models", lambda ctx: rms)

        def reward(o: str, prompt: list[int], response: list[int]) -> float:
            return float(coef[o][prompt + response].sum())

    else:
        ref = tiny_policies[0].model
        pairs.score_reference(MixedPolicy.single(tiny_policies[0]))

        def reward(o: str, prompt: list[int], response: list[int]) -> float:
            logp = _logp_by_hand(pi[o], prompt, response)
            return beta * float(logp - _logp_by_hand(ref, prompt, response))

    pi = {"a": tiny_policies[1].model, "c": tiny_policies[2].model}  # pi_j for the implicit rewards
    ctx = SimpleNamespace(
        pairs=pairs,
        task=SimpleNamespace(objectives=objectives),
        batch_size=4,  # several chunks
        meter=None,
        beta=beta,
        single_objective_policies={o: SimpleNamespace(model=m) for o, m in pi.items()},
    )
    with torch.no_grad():
        ra, rb = pair_rewards(ctx, source, ["a", "c"])
        margin = oriented_margin(pairs, ra, rb, k, w, drop_ties=True)
    assert (ra[:, k] == 0).all() and (rb[:, k] == 0).all()  # objective k's rewards are never needed
    data = MarginDataset(pairs.dataset(k, tok.pad_token_id, drop_ties=True), margin)
    kept = [i for i in range(9) if i not in (2, 6)]
    assert len(data) == len(kept)
    assert 0 < int(pairs.a_wins[kept, k].sum()) < len(kept)  # both orientations occur
    order = [5, 0, 3, 6, 1, 4, 2]
    batch = data.collate(order)
    assert batch.margin.abs().min() > 1e-3  # every margin is far from zero: a swap would show
    prompts, resp_a, resp_b = pairs.a.prompts(), pairs.a.responses(), pairs.b.responses()
    for row, i in enumerate(order):
        chosen, rejected = batch.pairs.chosen[row : row + 1], batch.pairs.rejected[row : row + 1]
        p, c, r = chosen.prompts()[0], chosen.responses()[0], rejected.responses()[0]
        pair = kept[i]
        assert p == prompts[pair]
        winner, loser = (resp_a, resp_b) if pairs.a_wins[pair, k] else (resp_b, resp_a)
        assert (c, r) == (winner[pair], loser[pair])
        want = sum(w[j] * (reward(o, p, c) - reward(o, p, r)) for j, o in enumerate(objectives) if j != k)
        assert float(batch.margin[row]) == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_modpo_module_loss_by_hand(tiny_policies):
    """MODPOModule.training_step on a tiny GPT-2: the policy's log-probs of each padded row, against
    unpadded forward passes and MODPO's formula written out."""
    g = torch.Generator().manual_seed(1)
    tok, model = tiny_policies[0].tokenizer, tiny_policies[0].model
    pairs = _random_pairs(5, len(tok), tie_k=[], k=0, g=g)
    data = MarginDataset(pairs.dataset(0, tok.pad_token_id), torch.tensor([0.3, -1.2, 0.0, 2.0, -0.4]))
    beta, w_k, order = 0.4, 0.6, [3, 1, 4, 0, 2]
    batch = data.collate(order)
    module = MODPOModule(model, beta=beta, lr=1e-3, weight=w_k)
    loss = module.training_step(batch, 0)
    assert loss.requires_grad
    logits = []
    for i in order:
        p = data.pairs.prompts[i]
        c = _logp_by_hand(model, p, data.pairs.chosen[i]) - float(data.pairs.ref_chosen_logp[i])
        r = _logp_by_hand(model, p, data.pairs.rejected[i]) - float(data.pairs.ref_rejected_logp[i])
        logits.append((beta * (c - r) - float(data.margin[i])) / w_k)
    want = torch.stack([torch.nn.functional.softplus(-x) for x in logits]).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def test_modpo_optimum_is_the_morlhf_optimum():
    """Population MODPO loss over a bandit with BT labels of r_k and margins from r_j (j != k):
    its minimiser is pi ∝ pi_ref exp((sum_j w_j r_j) / beta), MORLHF's optimum for w."""
    g = torch.Generator().manual_seed(1)
    n, beta = 6, 0.5
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    r = torch.randn(n, 3, generator=g, dtype=torch.float64)
    log_ref = torch.log_softmax(torch.randn(n, generator=g, dtype=torch.float64), 0)
    theta = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    i, j = torch.triu_indices(n, n, 1)
    p_i_wins = torch.sigmoid(r[i, 0] - r[j, 0])  # BT labels of objective k = 0
    margin = (r[i, 1:] - r[j, 1:]) @ w[1:]  # oriented i over j; flips sign when j wins
    opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15)

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(theta, 0)
        i_wins = _per_pair(logp, log_ref, i, j, margin, beta, w[0])
        j_wins = _per_pair(logp, log_ref, j, i, -margin, beta, w[0])
        loss = (p_i_wins * i_wins + (1 - p_i_wins) * j_wins).sum()
        loss.backward()
        return loss

    opt.step(closure)
    expected = torch.log_softmax(log_ref + (r @ w) / beta, 0)
    torch.testing.assert_close(torch.log_softmax(theta.detach(), 0), expected, atol=1e-5, rtol=0)


def _per_pair(logp, log_ref, i, j, margin, beta, w_k) -> torch.Tensor:
    """Per-pair MODPO loss (modpo_loss averages; the population loss weights each pair)."""
    _, logits = modpo_loss(logp[i], logp[j], log_ref[i], log_ref[j], margin, beta, float(w_k))
    return -torch.nn.functional.logsigmoid(logits)


def test_method_configs_fail_with_the_field_named():
    base = ["paths.output_dir=/tmp/x"]
    with pytest.raises(ConfigError, match=r"^method.bad: unknown argument of baselines.modpo.MODPOMethod"):
        validate_config(compose_config(["method=modpo", "+method.bad=1", *base]))
    with pytest.raises(ConfigError, match=r"^method.rewards must be one of"):
        validate_config(compose_config(["method=ric", "method.rewards=oracle", *base]))
    with pytest.raises(ConfigError, match=r"method.weights must be null, 'mpo'"):
        build_method(compose_config(["method=modpo", "method.weights=best", *base]))
    with pytest.raises(ConfigError, match=r"method.objective='humorous' has weight 0"):
        build_method(
            compose_config(["method=modpo", "method.weights=[1,0,0]", "method.objective=humorous", *base])
        )
    with pytest.raises(ConfigError, match=r"method.bins must be >= 2"):
        build_method(compose_config(["method=ric", "method.bins=1", *base]))
    mod = compose_config(["method=mod", *base])  # MOD is the fixed-weight mixture, by another name
    assert mod.method == compose_config(["method=fixed_mix", *base]).method


def test_modpo_runs_and_declares_its_costs(smoke_cfg, tmp_path):
    """Uniform weights with reward-model margins, then MPO's lambda with implicit-reward margins."""
    for extra, row in [
        ([], "modpo"),
        (["method.weights=mpo", "method.rewards=implicit", "method.mpo.bootstrap=0"], "modpo_mpo_lambda"),
    ]:
        res = run_pipeline(smoke_cfg("method=modpo", *extra), tmp_path / row)
        objectives = res["objectives"]
        assert res["method"] == "modpo" and res["method_policies"] == [row]
        assert set(res["policies"][row]) >= {
            "reward",
            "win_rate",
            "min_win_rate",
            "reward_z",
            "min_reward_z",
            "kl",
        }
        assert res["policies"][row]["kl"] > 0.01  # trained away from pi_ref
        assert (
            res["cost"]["modpo/train"]["tokens_bwd"] > 0 and res["cost"]["modpo/margins"]["tokens_bwd"] == 0
        )
        k, others = res["modpo"]["objective"], res["modpo"]["others"]
        assert k not in others and set(others) <= set(objectives)
        total = res["policy_costs"][row]["total"]
        if row == "modpo":  # reward models of the other objectives only; no pi_k is needed
            rms = [f"rm/{o}" for o in others]
            assert total == ["preferences", "dpo/ref_logp", *rms, "modpo/margins", "modpo/train"]
            assert res["lambda"] == pytest.approx([1 / 3] * 3)
        else:  # MPO's lambda needs every pi_k and MPO's stages; the margins read the pi_j's implicit rewards
            assert {f"dpo/{o}" for o in objectives} | {"mpo_decoded/sampling", "mpo_decoded/bsmd"} <= set(
                total
            )
            assert not any(s.startswith("rm/") for s in total)
            assert k == objectives[max(range(3), key=res["lambda"].__getitem__)]


def test_modpo_through_the_real_model_path(smoke_cfg, tmp_path):
    from tests.test_real_models import local_hf_overrides, make_local_assets

    data = make_local_assets(tmp_path)
    cfg = smoke_cfg(
        *local_hf_overrides(tmp_path, data),
        "method=modpo",
        "method.weights={a: 0.7, b: 0.3}",
    )
    res = run_pipeline(cfg, tmp_path / "run")
    assert res["method_policies"] == ["modpo_0.70_0.30"] and res["lambda"] == pytest.approx([0.7, 0.3])
    assert res["modpo"] == {"objective": "a", "rewards": "rm", "others": ["b"]}
    assert abs(res["policies"]["modpo_0.70_0.30"]["kl"]) > 1e-4
