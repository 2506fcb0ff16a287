"""Rewards-in-Context: score bins, the preference-to-score map, rejection sampling, the conditioned
model (same numbers as the training layout, never emits a score token), and a run."""

from __future__ import annotations

from types import SimpleNamespace

import pytorch_lightning as pl
import torch

from baselines.ric import (
    RiCMethod,
    ScoreConditionedLM,
    add_condition_rows,
    bin_edges,
    condition_ids,
    conditioned_prompts,
    desired_bins,
    rejection_mask,
    sample_goals,
    to_bins,
)
from mpo_exp.data import collate
from mpo_exp.generation import decode_prompts, decode_responses, encode_prompts, sample
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.pipeline import run_pipeline
from mpo_exp.policies import Policy, TinyGPT2Spec
from mpo_exp.scoring import response_logits, score_sequences
from mpo_exp.training.common import fit


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


def test_conditioning_on_a_score_steers_a_trained_model(toy_task):
    """RiC's offline stage on the toy corpus (oracle scores in 3 bins, RiCMethod._fit on the training
    layout), then sampling through ScoreConditionedLM: asking for the top humour bin gives funnier
    responses than asking for the bottom one, the other objectives' bins held fixed. With 256
    samples per arm the gap is > 10 standard errors at every seed tried; we ask for 5 and 0.25."""
    tok, seed, n_bins = toy_task.build_tokenizer(), 0, 3
    humour = toy_task.objectives.index("humorous")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1-layer model: threads only add overhead (and stall on a busy machine)
    try:
        torch.manual_seed(seed)
        model = TinyGPT2Spec(n_layer=1, n_embd=32, n_head=2).build(tok).model
        corpus = toy_task.corpus(512, seed)
        prompts = encode_prompts(tok, [p for p, _ in corpus])
        responses = [r + [tok.eos_token_id] for r in encode_prompts(tok, [r for _, r in corpus])]
        scores = toy_task.rewards([p for p, _ in corpus], [r for _, r in corpus])
        labels = to_bins(scores, bin_edges(scores, n_bins))
        base = add_condition_rows(
            model, len(toy_task.objectives) * n_bins, torch.Generator().manual_seed(seed)
        )

        def trainer(**kw) -> pl.Trainer:
            return pl.Trainer(
                accelerator="cpu",
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=False,
                **kw,
            )

        def ctx_fit(module, data, collate_fn, cfg, callbacks=()) -> None:
            fit(
                module,
                data,
                collate_fn,
                trainer,
                cfg.batch_size,
                cfg.max_steps,
                None,
                seed=seed,
                callbacks=callbacks,
            )

        ctx = SimpleNamespace(reference=SimpleNamespace(tokenizer=tok), fit=ctx_fit)
        method = RiCMethod(bins=n_bins, lr=3e-3, warmup_steps=0, batch_size=64)
        method._fit(ctx, model, conditioned_prompts(prompts, labels, base, n_bins), responses, 300)
        model.eval()

        eval_prompts = encode_prompts(tok, toy_task.prompts("eval", 256, seed))

        def humour_when_asked_for(b: int) -> torch.Tensor:
            goal = torch.ones(len(toy_task.objectives), dtype=torch.long)  # the others: middle bin
            goal[humour] = b
            lm = ScoreConditionedLM(model, condition_ids(goal, base, n_bins).tolist(), base)
            batch = sample(MixedPolicy.single(Policy("ric", lm, tok)), eval_prompts, toy_task.max_new_tokens)
            return toy_task.rewards(decode_prompts(tok, batch), decode_responses(tok, batch))[:, humour]

        torch.manual_seed(seed)
        high, low = humour_when_asked_for(n_bins - 1), humour_when_asked_for(0)
    finally:
        torch.set_num_threads(threads)
    gap = float(high.mean() - low.mean())
    stderr = float((high.var() / len(high) + low.var() / len(low)).sqrt())
    assert gap > 0.25 and gap > 5 * stderr, (float(high.mean()), float(low.mean()), stderr)


def test_ric_runs_and_its_model_serves_every_weight_setting(smoke_cfg, tmp_path):
    """Fixed weights, then MPO's lambda, read out of one cached model. Neither is uniform: uniform
    weights put every objective at the top bin, which a readout ignoring the weights also gives."""
    small = ["method=ric", "method.steps=5", "method.online_steps=3", "method.online_samples=32"]
    res = run_pipeline(smoke_cfg(*small, "method.weights=[0.2,0.5,0.3]"), tmp_path / "fixed")
    objectives, row = res["objectives"], "ric_0.20_0.50_0.30"
    assert res["method"] == "ric" and res["method_policies"] == [row]
    assert set(res["policies"][row]) >= {
        "reward",
        "win_rate",
        "min_win_rate",
        "reward_z",
        "min_reward_z",
        "kl",
    }
    assert res["policies"][row]["kl"] > 0.01
    # the L-inf map by hand (3 objectives, 10 bins): the largest weight at the top (9), the others at
    # round(min(3 w_i, 1) * 9): 0.2 -> round(5.4) = 5, 0.3 -> round(8.1) = 8
    assert res["ric"]["target_bins"] == dict(zip(objectives, [5, 9, 8], strict=True))
    assert 0 < res["ric"]["online_kept"] <= res["ric"]["online_samples"] == 32
    stages = ["ric/scoring", "ric/sft", "ric/augment", "ric/online_sft"]
    own = [*(f"rm/{o}" for o in objectives), *stages]  # scores from reward models, not the oracle
    assert res["policy_costs"][row] == {"total": ["preferences", *own], "post_processing": own}
    assert res["cost"]["ric/sft"]["tokens_bwd"] > 0 and res["cost"]["ric/augment"]["tokens_bwd"] == 0
    assert res["cost"]["ric/augment"]["tokens_fwd"] > 0  # sampling and rescoring are paid for
    lam = run_pipeline(smoke_cfg(*small, "method.weights=mpo", "method.mpo.bootstrap=0"), tmp_path / "mpo")
    assert lam["method_policies"] == ["ric_mpo_lambda"]
    assert all(lam["cost"][s]["reused"] for s in stages)  # the same model, read out at MPO's lambda
    lam_w = lam["lambda"]
    best = max(range(len(lam_w)), key=lam_w.__getitem__)
    want = [9 if i == best else round(min(3 * x, 1.0) * 9) for i, x in enumerate(lam_w)]
    assert min(want) < 9  # MPO's lambda here is far from uniform, so the bins show which weights were used
    assert lam["ric"]["target_bins"] == dict(zip(objectives, want, strict=True))
    assert "mpo_decoded/bsmd" in lam["policy_costs"]["ric_mpo_lambda"]["total"]


def test_ric_through_the_real_model_path_with_lora(smoke_cfg, tmp_path):
    """model=hf (a local HF checkpoint) with LoRA adapters: the score rows are added before the
    adapters, stay frozen (random, distinct), and the merged model is saved and read back."""
    from tests.test_real_models import local_hf_overrides, make_local_assets

    data = make_local_assets(tmp_path)
    cfg = smoke_cfg(
        *local_hf_overrides(tmp_path, data),
        "+model.lora={r: 4, alpha: 8, target_modules: [c_attn]}",
        "method=ric",
        "method.weights=[0.3,0.7]",
        "method.steps=5",
        "method.online_steps=3",
        "method.online_samples=16",
    )
    res = run_pipeline(cfg, tmp_path / "run")
    assert res["objectives"] == ["a", "b"] and res["method_policies"] == ["ric_0.30_0.70"]
    assert res["ric"]["target_bins"] == {"a": 5, "b": 9}  # round(min(2 * 0.3, 1) * 9) = 5; b on top
    assert abs(res["policies"]["ric_0.30_0.70"]["kl"]) > 1e-4
