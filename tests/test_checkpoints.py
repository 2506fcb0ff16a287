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

    alone = run_pipeline(
        smoke_cfg("method=mod", "method.weights=[0.2,0.3,0.5]", f"paths.cache_dir={tmp_path / 'fresh'}"),
        tmp_path / "c",
    )
    assert not alone["cost"]["eval/pi_ref"]["reused"]
    for name in second["policies"]:
        assert alone["policies"][name] == second["policies"][name], name
