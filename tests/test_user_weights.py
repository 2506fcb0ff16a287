"""method.weights=mpo: a weight-taking method gets MPO's lambda from this run (the max-min table's
second row), and pays for MPO's stages."""

from __future__ import annotations

import pytest

from mpo_exp.pipeline import run_pipeline


def test_mod_with_mpo_weights_is_mpo_and_pays_for_it(smoke_cfg, tmp_path):
    mpo = run_pipeline(smoke_cfg("method=mpo"), tmp_path / "mpo")
    mod = run_pipeline(smoke_cfg("method=fixed_mix", "method.weights=mpo"), tmp_path / "mod")
    assert mod["lambda"] == pytest.approx(mpo["lambda"])  # the same cached scores, the same solve
    policy = mod["policies"]["fixed_mix_mpo_lambda"]
    for key in ("win_rate", "reward"):  # the same mixture, evaluated on the same random stream
        assert policy[key] == pytest.approx(mpo["policies"]["mpo_decoded"][key], abs=1e-6)
    assert mod["policy_costs"]["fixed_mix_mpo_lambda"] == mpo["policy_costs"]["mpo_decoded"]
    assert mod["mpo_policy"] == "mpo_decoded"  # the report shows MOD-with-lambda as this MPO row
    uniform = run_pipeline(smoke_cfg("method=fixed_mix", "method.weights=null"), tmp_path / "uniform")
    assert uniform["policy_costs"]["fixed_mix_0.33_0.33_0.33"]["post_processing"] == []


def test_morlhf_with_mpo_weights_trains_on_lambda(smoke_cfg, tmp_path):
    res = run_pipeline(smoke_cfg("method=morlhf", "method.weights=mpo"), tmp_path / "job")
    mpo = run_pipeline(smoke_cfg("method=mpo"), tmp_path / "mpo")  # cached scores: the same solve
    objectives = res["objectives"]
    assert res["lambda"] == pytest.approx(mpo["lambda"]) and max(res["lambda"]) < 0.99
    cost = res["policy_costs"]["morlhf_mpo_lambda"]
    own = {"mpo_decoded/sampling", "mpo_decoded/scoring", "mpo_decoded/bsmd", "mpo_decoded/decoded"}
    assert own | {"rl/morlhf_mpo_lambda"} <= set(cost["total"])
    assert {f"rm/{o}" for o in objectives} <= set(cost["post_processing"])
