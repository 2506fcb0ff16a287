"""Policies saved along MODPO's and RiC's training (``method.checkpoints``), and the evaluation
cache that lets a sweep's jobs share the rows of pi_ref, the pi_k and uniform mixing."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from mpo_exp.report.curves import collect_curves, is_curve


def _weights(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


def _check_points(res: dict, label: str, steps: list[int], replaced: set[str]) -> None:
    """Each checkpoint is a policy charged the final policy's cost with the training cut short."""
    points = res["checkpoints"][label]
    assert [p["step"] for p in points] == steps
    flops = [p["flops"] for p in points]
    assert flops[0] > 0 and flops == sorted(flops) and len(set(flops)) == len(flops)
    final_total = set(res["policy_costs"][label]["total"])
    assert replaced <= final_total
    for p in points:
        name = f"{label}@step{p['step']}"
        assert name in res["policies"] and name in res["method_policies"]
        total = res["policy_costs"][name]["total"]
        assert f"checkpoint/{name}" in total and not replaced & set(total)
        assert set(total) - {f"checkpoint/{name}"} == final_total - replaced
        assert res["cost_summary"][name]["total"]["flops"] < res["cost_summary"][label]["total"]["flops"]


def test_modpo_checkpoints_are_evaluated_with_the_cost_up_to_them(smoke_cfg, tmp_path):
    from mpo_exp.pipeline import run_pipeline

    res = run_pipeline(smoke_cfg("method=modpo", "method.checkpoints=[2,4]"), tmp_path / "run")
    _check_points(res, "modpo", [2, 4], {"modpo/margins", "modpo/train"})
    # step 2's cost holds the margins (scored before training) and part of the training
    margins = res["cost"]["modpo/margins"]["flops"]
    assert margins < res["checkpoints"]["modpo"][0]["flops"] < margins + res["cost"]["modpo/train"]["flops"]
    (art,) = (tmp_path / "cache").glob("modpo/*/checkpoints")
    first, last = _weights(art / "step2"), _weights(art.parent)
    assert any(not torch.equal(first[k], last[k]) for k in first)
    curves = collect_curves([res])[res["beta"]]
    assert is_curve(curves["modpo"]) and [p["iteration"] for p in curves["modpo"]] == [2, 4, None]


def test_ric_checkpoints_span_the_offline_and_online_rounds(smoke_cfg, tmp_path):
    from mpo_exp.pipeline import run_pipeline

    cfg = smoke_cfg(
        "method=ric",
        "method.steps=3",
        "method.online_steps=2",
        "method.online_samples=32",
        "method.batch_size=16",
        "method.checkpoints=[1,4]",
    )
    res = run_pipeline(cfg, tmp_path / "run")
    stages = {"ric/scoring", "ric/sft", "ric/augment", "ric/online_sft"}
    _check_points(res, "ric", [1, 4], stages)
    first, second = res["checkpoints"]["ric"]
    offline = sum(res["cost"][s]["flops"] for s in ("ric/scoring", "ric/sft", "ric/augment"))
    assert first["flops"] < offline < second["flops"]  # step 4 is the online round's first


def test_a_sweeps_jobs_share_the_evaluations_of_pi_ref_the_pi_k_and_uniform(smoke_cfg, tmp_path):
    """The second job reuses the first's evaluations of the shared rows, and what it reports is
    what a job with an empty cache computes (each policy samples from its own fixed stream)."""
    from mpo_exp.pipeline import run_pipeline

    shared = ["pi_ref", "uniform_mix"]
    first = run_pipeline(smoke_cfg("method=mod", "method.weights=[0.6,0.3,0.1]"), tmp_path / "a")
    second = run_pipeline(smoke_cfg("method=mod", "method.weights=[0.2,0.3,0.5]"), tmp_path / "b")
    singles = [n for n in first["policies"] if n.startswith("pi_") and n != "pi_ref"]
    assert len(singles) == len(first["objectives"]) >= 2
    for name in ["pi_ref_baseline", *shared, *singles]:
        assert not first["cost"][f"eval/{name}"]["reused"] and second["cost"][f"eval/{name}"]["reused"]
    (own,) = second["method_policies"]
    assert not second["cost"][f"eval/{own}"]["reused"]
    for name in [*shared, *singles]:
        assert second["policies"][name] == first["policies"][name]
    assert second["pi_ref_fingerprint"] == first["pi_ref_fingerprint"]

    # what changes an evaluation changes its key: another seed or another number of prompts
    # evaluates afresh (a key without them would hand one seed's rows to another)
    for extra in ("seed=1", "eval.n_prompts=16"):
        other = run_pipeline(smoke_cfg("method=mod", "method.weights=[0.2,0.3,0.5]", extra), tmp_path / extra)
        assert not any(other["cost"][f"eval/{n}"]["reused"] for n in ["pi_ref_baseline", *shared, *singles])

    alone = run_pipeline(
        smoke_cfg("method=mod", "method.weights=[0.2,0.3,0.5]", f"paths.cache_dir={tmp_path / 'fresh'}"),
        tmp_path / "c",
    )
    assert not alone["cost"]["eval/pi_ref"]["reused"]
    for name in second["policies"]:
        assert alone["policies"][name] == second["policies"][name], name


def test_modpo_and_ric_checkpoints_are_checked_before_any_compute(smoke_cfg):
    """MODPO's points lie before dpo.max_steps (5 in the smoke config), RiC's before its total steps."""
    import pytest

    from mpo_exp.config import ConfigError, validate_config

    for bad in ("[0]", "[5]", "[2,2]"):
        with pytest.raises(ConfigError, match="method.checkpoints"):
            validate_config(smoke_cfg("method=modpo", f"method.checkpoints={bad}"), check_paths=False)
    validate_config(smoke_cfg("method=modpo", "method.checkpoints=[1,4]"), check_paths=False)
    from baselines.ric import RiCMethod

    with pytest.raises(ValueError, match="method.checkpoints"):
        RiCMethod(steps=3, online_steps=2, checkpoints=[5])
    assert RiCMethod(steps=3, online_steps=2, checkpoints=[4, 1]).checkpoints == [1, 4]


def test_an_evaluations_key_holds_the_eval_seed_even_where_pi_refs_key_does_not():
    """SmolLM2's pi_ref is the model as loaded: its key is the same for every seed, so the cached
    evaluation of pi_ref must be keyed by the evaluation's own seed (else seeds share rows)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from mpo_exp.pipeline import _evaluation_spec

    def spec(seed: int) -> dict:
        ctx = SimpleNamespace(keys={"sft": "same"}, cfg=OmegaConf.create({"task": {"t": 1}}), dtype="float32")
        ev = SimpleNamespace(
            prompts=[1, 2], temperature=1.0, n_examples=3, seed=seed + 2, batch_size=8, own_logprobs=True
        )
        return _evaluation_spec(ctx, ev)

    assert spec(0) != spec(1) and spec(0) == spec(0)
