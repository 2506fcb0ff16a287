"""Rewards-in-Context: score bins, the preference-to-score map, rejection sampling, the conditioned
model (same numbers as the training layout, never emits a score token), and a run."""

from __future__ import annotations

import torch

from baselines.ric import (
    ScoreConditionedLM,
    add_condition_rows,
    bin_edges,
    condition_ids,
    desired_bins,
    rejection_mask,
    sample_goals,
    to_bins,
)
from mpo_exp.data import collate
from mpo_exp.generation import sample
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.pipeline import run_pipeline
from mpo_exp.policies import Policy
from mpo_exp.scoring import response_logits, score_sequences


def test_preference_to_score_map_by_hand():
    assert desired_bins([1 / 3, 1 / 3, 1 / 3], 10) == [9, 9, 9]  # K*w_i = 1: every objective at the top
    assert desired_bins([0.2, 0.5, 0.3], 10) == [round(0.6 * 9), 9, round(0.9 * 9)]  # [5, 9, 8]
    assert desired_bins([1.0, 0.0, 0.0], 5) == [4, 0, 0]
    assert desired_bins([0.1, 0.9], 11) == [2, 10]


def test_quantile_bins_fill_equally_and_ids_by_hand():
    scores = torch.stack([torch.arange(100.0), -10 * torch.arange(100.0)], dim=-1)
    edges = bin_edges(scores, 4)
    bins = to_bins(scores, edges)
    for k in range(2):
        assert torch.bincount(bins[:, k], minlength=4).tolist() == [25, 25, 25, 25]
    assert bins[0].tolist() == [0, 3] and bins[-1].tolist() == [3, 0]  # rank-based: any scale or sign
    # (objective k, bin b) -> base + k * bins + b
    assert condition_ids(torch.tensor([[2, 0], [3, 1]]), 50, 4).tolist() == [[52, 54], [53, 55]]


def test_goals_lie_on_the_front_and_rejection_keeps_any_objectives_top():
    goals = sample_goals(500, 3, 6, torch.Generator().manual_seed(0))
    assert ((goals == 5).sum(-1) >= 2).all()  # at most one objective below the top
    assert (goals < 5).any() and goals.min() == 0
    scores = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 9.0], [4.0, 1.0]])
    # 0.5-quantiles: column 0 -> 2, column 1 -> 0 (every row reaches it)
    assert rejection_mask(scores, 0.5).tolist() == [True] * 5
    assert rejection_mask(scores[:, :1], 0.5).tolist() == [False, False, True, True, True]


def _conditioned(tiny_policies, toy_task):
    tok = tiny_policies[0].tokenizer
    model = tiny_policies[0].model
    base = add_condition_rows(model, 6, torch.Generator().manual_seed(0))
    prefix = condition_ids(torch.tensor([1, 2]), base, 3).tolist()
    return tok, model, base, prefix


def test_conditioned_model_computes_the_training_layout(tiny_policies, toy_task):
    tok, model, base, prefix = _conditioned(tiny_policies, toy_task)
    prompts = [
        tok(p, add_special_tokens=False)["input_ids"]
        for p in ["explain cats please <sep>", "describe space now <sep>"]
    ]
    responses = [
        tok("purr fur haha", add_special_tokens=False)["input_ids"],
        tok("orbit", add_special_tokens=False)["input_ids"],
    ]
    lm = ScoreConditionedLM(model, prefix, base)
    plain = collate(prompts, responses, tok.pad_token_id)
    trained_on = collate([prefix + p for p in prompts], responses, tok.pad_token_id)  # [pads][scores][prompt]
    got = response_logits(lm, plain)
    want = response_logits(model, trained_on)[..., :base]
    mask = plain.response_mask.bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    assert got.shape[-1] == base == len(tok)  # an ordinary policy over pi_ref's vocabulary
    other = ScoreConditionedLM(model, condition_ids(torch.tensor([0, 0]), base, 3).tolist(), base)
    assert not torch.allclose(response_logits(other, plain)[mask], got[mask])  # the scores matter


def test_conditioned_model_never_samples_a_score_token(tiny_policies, toy_task):
    tok, model, base, prefix = _conditioned(tiny_policies, toy_task)
    with torch.no_grad():  # make the score tokens by far the likeliest outputs
        model.get_output_embeddings().weight[base:] *= 50
        model.get_output_embeddings().weight[base:] += model.get_output_embeddings().weight[:base].max()
    lm = ScoreConditionedLM(model, prefix, base)
    prompts = [tok("explain cats please <sep>", add_special_tokens=False)["input_ids"]] * 16
    torch.manual_seed(0)
    batch = sample(MixedPolicy.single(Policy("ric", lm, tok)), prompts, 8)
    assert int(batch.response_ids.max()) < base
    assert torch.isfinite(score_sequences([lm], [1.0], batch)).all()


def test_ric_runs_and_its_model_serves_every_weight_setting(smoke_cfg, tmp_path):
    small = ["method=ric", "method.steps=5", "method.online_steps=3", "method.online_samples=32"]
    res = run_pipeline(smoke_cfg(*small), tmp_path / "uniform")
    objectives = res["objectives"]
    assert res["method"] == "ric" and res["method_policies"] == ["ric"]
    assert set(res["policies"]["ric"]) >= {
        "reward",
        "win_rate",
        "min_win_rate",
        "reward_z",
        "min_reward_z",
        "kl",
    }
    assert res["policies"]["ric"]["kl"] > 0.01
    assert res["ric"]["target_bins"] == dict.fromkeys(objectives, 9)
    assert 0 < res["ric"]["online_kept"] <= res["ric"]["online_samples"] == 32
    stages = ["ric/scoring", "ric/sft", "ric/augment", "ric/online_sft"]
    own = [*(f"rm/{o}" for o in objectives), *stages]  # scores from reward models, not the oracle
    assert res["policy_costs"]["ric"] == {"total": ["preferences", *own], "post_processing": own}
    assert res["cost"]["ric/sft"]["tokens_bwd"] > 0 and res["cost"]["ric/augment"]["tokens_bwd"] == 0
    assert res["cost"]["ric/augment"]["tokens_fwd"] > 0  # sampling and rescoring are paid for
    lam = run_pipeline(smoke_cfg(*small, "method.weights=mpo", "method.mpo.bootstrap=0"), tmp_path / "mpo")
    assert lam["method_policies"] == ["ric_mpo_lambda"]
    assert all(lam["cost"][s]["reused"] for s in stages)  # the same model, read out at MPO's lambda
    assert lam["ric"]["target_bins"] == dict(zip(objectives, desired_bins(lam["lambda"], 10), strict=True))
    assert "mpo_decoded/bsmd" in lam["policy_costs"]["ric_mpo_lambda"]["total"]


def test_ric_through_the_real_model_path_with_lora(smoke_cfg, tmp_path):
    """model=hf (a local HF checkpoint) with LoRA adapters: the score rows are added before the
    adapters, stay frozen (random, distinct), and the merged model is saved and read back."""
    from tests.test_real_models import local_hf_overrides, make_local_assets

    data = make_local_assets(tmp_path)
    cfg = smoke_cfg(
        *local_hf_overrides(tmp_path, data),
        "+model.lora={r: 4, lora_alpha: 8, target_modules: [c_attn]}",
        "method=ric",
        "method.steps=5",
        "method.online_steps=3",
        "method.online_samples=16",
    )
    res = run_pipeline(cfg, tmp_path / "run")
    assert res["objectives"] == ["a", "b"] and res["method_policies"] == ["ric"]
    assert res["ric"]["target_bins"] == {"a": 9, "b": 9}
    assert abs(res["policies"]["ric"]["kl"]) > 1e-4
