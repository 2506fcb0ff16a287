"""The whole pipeline on the shrunk default config: results schema, caching, CLI, wandb."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpo_exp.pipeline import run_pipeline

REPO = Path(__file__).resolve().parents[1]


def test_pipeline_writes_results_and_reuses_cached_stages(smoke_cfg, tmp_path):
    cfg = smoke_cfg()
    first = run_pipeline(cfg, tmp_path / "run1")
    objectives = first["objectives"]
    assert objectives == ["helpful", "harmless", "humorous"]
    assert sum(first["lambda"]) == pytest.approx(1, abs=1e-5)
    expected = {"pi_ref", "pi_helpful", "pi_harmless", "pi_humorous", "uniform_mix", "mpo_decoded"}
    assert set(first["policies"]) == expected
    for pol in first["policies"].values():
        assert set(pol) >= {"reward", "reward_z", "min_reward_z", "win_rate", "min_win_rate", "kl"}
        assert list(pol["win_rate"]) == objectives
    for o in objectives:  # DPO moved every pi_k away from pi_ref (a no-op training step would not)
        assert first["policies"][f"pi_{o}"]["kl"] > 0.01
    # MPO's policy is the mixture with the reported lambda: its KL lies below the pi_k's worst one
    assert first["policies"]["mpo_decoded"]["kl"] < max(
        first["policies"][f"pi_{o}"]["kl"] for o in objectives
    )
    own = ["mpo_decoded/sampling", "mpo_decoded/scoring", "mpo_decoded/bsmd", "mpo_decoded/decoded"]
    for stage in ["sft", "preferences", "dpo/helpful", *own]:
        cost = first["cost"][stage]
        assert set(cost) >= {"wall_s", "flops", "tokens_fwd", "tokens_bwd"}
        assert not cost["reused"]
    assert first["cost"]["sft"]["tokens_bwd"] > 0 and first["cost"]["mpo_decoded/scoring"]["tokens_bwd"] == 0
    # MPO pays for the pairs, pi_ref's log-probs of them (DPO's input), the K DPO runs and its own stages
    dpo = ["preferences", "dpo/ref_logp", *(f"dpo/{o}" for o in objectives)]
    assert first["policy_costs"]["mpo_decoded"] == {"total": [*dpo, *own], "post_processing": own}
    assert first["policy_costs"]["uniform_mix"] == {"total": dpo, "post_processing": []}
    assert first["policy_costs"]["pi_ref"] == {"total": [], "post_processing": []}
    post = first["cost_summary"]["mpo_decoded"]["post_processing"]
    assert post["flops"] == pytest.approx(sum(first["cost"][s]["flops"] for s in own))
    assert first["cost"]["mpo_decoded/decoded"]["flops"] > 0  # the decoded fit decodes: it is charged
    assert (tmp_path / "run1" / "results.md").read_text().count("| mpo_decoded |") == 1
    assert json.loads((tmp_path / "run1" / "results.json").read_text())["lambda"] == first["lambda"]

    second = run_pipeline(cfg, tmp_path / "run2")
    cached = [s for s in own if not s.endswith("/bsmd")]  # BSMD on the cached scores runs again (ms)
    for stage in ["sft", "preferences", "dpo/helpful", "dpo/harmless", "dpo/humorous", *cached]:
        assert second["cost"][stage]["reused"]
        assert second["cost"][stage]["flops"] == first["cost"][stage]["flops"]  # cost of the build
    assert second["artifacts"] == first["artifacts"]
    assert second["lambda"] == pytest.approx(first["lambda"])
    for key in ("win_rate", "reward_z"):  # seeded end to end: the same numbers again
        assert second["policies"]["mpo_decoded"][key] == pytest.approx(
            first["policies"]["mpo_decoded"][key], abs=1e-6
        )

    # a different beta retrains the policies but reuses pi_ref and the pairs
    third = run_pipeline(smoke_cfg("beta=0.5"), tmp_path / "run3")
    assert third["cost"]["sft"]["reused"] and third["cost"]["preferences"]["reused"]
    assert not third["cost"]["dpo/helpful"]["reused"]


def test_leave_one_out_and_fixed_weights(smoke_cfg, tmp_path):
    loo = run_pipeline(smoke_cfg("method.exclude=[humorous]"), tmp_path / "loo")
    assert loo["lambda"][2] == 0 and sum(loo["lambda"]) == pytest.approx(1, abs=1e-5)
    assert "mpo_decoded_without_humorous" in loo["policies"]
    fixed = run_pipeline(smoke_cfg("method=fixed_mix"), tmp_path / "fixed")
    assert fixed["lambda"] == pytest.approx([1 / 3] * 3, abs=1e-6)


def _cli(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "MPO_EXP_CACHE": str(tmp_path / "c"),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "mpo_exp.cli", *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_runs_offline_with_wandb_and_prints_the_table(tmp_path):
    out = _cli(
        ["experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| mpo_decoded |" in out.stdout and "lambda:" in out.stdout
    assert (tmp_path / "run" / "results.json").exists()
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    again = _cli(["experiment=smoke", f"hydra.run.dir={tmp_path / 'run2'}", "logger=csv"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing cached sft" in again.stdout + again.stderr


def test_cli_reports_bad_field(tmp_path):
    out = _cli(["experiment=smoke", "beta=-1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert out.returncode != 0
    assert "beta must be a number > 0" in out.stderr


@pytest.mark.parametrize(
    ("method", "extra", "rows"),
    [
        ("morlhf", [], ["morlhf"]),
        ("morlhf", ["rl=rloo", "method.normalization=none"], ["morlhf"]),
        ("maxmin_rlhf", [], ["maxmin_rlhf_group_min", "maxmin_rlhf_sample_min"]),
        (
            "maxmin_rlhf",
            [
                "method.variants=[group_min]",
                "method.groups=em",
                "method.em.users=6",
                "method.em.iterations=2",
                "method.em.rm_steps=2",
            ],
            ["maxmin_rlhf_group_min_em"],
        ),
        ("reward_soups", [], ["reward_soup", "weighted_reward_soup"]),
    ],
)
def test_baseline_methods_write_the_same_results(smoke_cfg, tmp_path, method, extra, rows):
    res = run_pipeline(smoke_cfg(f"method={method}", *extra), tmp_path / method)
    assert res["method"] == method and res["method_policies"] == rows
    for row in rows + ["pi_ref", "uniform_mix"]:
        assert set(res["policies"][row]) >= {
            "reward",
            "reward_z",
            "min_reward_z",
            "win_rate",
            "min_win_rate",
            "kl",
        }
    objectives = res["objectives"]
    dpo = ["preferences", "dpo/ref_logp", *(f"dpo/{o}" for o in objectives)]
    if method == "reward_soups":
        assert res["cost"]["soup/reward_soup"]["tokens_bwd"] == 0
        assert res["policy_costs"]["reward_soup"]["total"] == [*dpo, "soup/reward_soup"]
        assert res["policy_costs"]["weighted_reward_soup"]["total"] == [
            *dpo,
            "mpo_decoded/sampling",
            "mpo_decoded/scoring",
            "mpo_decoded/bsmd",
            "mpo_decoded/decoded",
            "soup/weighted_reward_soup",
        ]
        return
    assert "dpo/helpful" in res["cost"]  # computed for the table, but not part of the method's cost
    em = "em" in res
    rms = ["rm/em"] if em else [f"rm/{o}" for o in objectives]
    norm = [] if "method.normalization=none" in extra else ["rm/ref_samples", "rm/normalizer"]
    for row in rows:  # each RL policy pays for its own RL run only, never for the other variant's
        own = [*rms, *norm, f"rl/{row}"]
        assert res["policy_costs"][row] == {"total": ["preferences", *own], "post_processing": own}
        assert res["cost"][f"rl/{row}"]["tokens_bwd"] > 0
        total = res["cost_summary"][row]["total"]["flops"]
        assert total == pytest.approx(sum(res["cost"][s]["flops"] for s in ["preferences", *own]))
    assert set(res["rl_history"]) == set(rows)
    assert res["reward_normalization"] == ("none" if norm == [] else "partition")
    if em:
        # the E-step's scoring is charged: more tokens forwarded than back-propagated by the M-steps
        assert res["cost"]["rm/em"]["tokens_fwd"] > res["cost"]["rm/em"]["tokens_bwd"] > 0
        assert len(res["em"]["assignment"]) == 6
    else:
        for o in objectives:  # reward-model training only; the held-out accuracy is a diagnostic
            assert res["cost"][f"rm/{o}"]["tokens_fwd"] == res["cost"][f"rm/{o}"]["tokens_bwd"]
            assert res["cost"][f"diagnostics/rm/{o}"]["tokens_bwd"] == 0
            assert res["cost"][f"diagnostics/rm/{o}"]["tokens_fwd"] > 0
            assert 0 <= res["reward_models"][o]["heldout_accuracy"] <= 1


@pytest.mark.slow
def test_multirun_sweep_shares_artifacts_and_reports(tmp_path):
    from mpo_exp.report import build_report

    sweep = tmp_path / "sweep"
    out = _cli(
        [
            "-m",
            "experiment=smoke",
            "logger=none",
            "seed=0",
            "method=mpo,fixed_mix",
            f"hydra.sweep.dir={sweep}",
            "trainer.enable_progress_bar=false",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 2  # one output dir per job
    assert "reusing cached dpo/helpful" in out.stdout + out.stderr  # the second job reuses the first's pi_k
    report = build_report(sweep)
    assert "MPO" in report["table1"] and (sweep / "table1.md").exists() and (sweep / "cost.md").exists()


def test_a_finished_job_is_not_run_again(smoke_cfg, tmp_path):
    cfg = smoke_cfg("method=fixed_mix")
    first = run_pipeline(cfg, tmp_path / "job")
    again = run_pipeline(cfg, tmp_path / "job")
    assert again == json.loads(json.dumps(first))  # read back, not recomputed
    changed = run_pipeline(smoke_cfg("method=fixed_mix", "eval.n_prompts=16"), tmp_path / "job")
    assert changed["run_key"] != first["run_key"]  # a different config in the same dir runs
    forced = run_pipeline(
        smoke_cfg("method=fixed_mix", "eval.n_prompts=16", "resume=false"), tmp_path / "job"
    )
    assert forced["wall_s_this_run"] != changed["wall_s_this_run"]


@pytest.mark.slow
def test_a_killed_sweep_resumes_and_reports_the_same(tmp_path):
    import signal
    import time

    from mpo_exp.report import build_report

    args = [
        "-m",
        "experiment=smoke",
        "logger=none",
        "method=mpo,fixed_mix",
        "seed=0",
        "trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPO_EXP_CACHE": str(tmp_path / "cache")}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpo_exp.cli", *args, f"hydra.sweep.dir={killed}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 480  # the first job builds every shared stage: slow on a busy machine
    while not list(killed.glob("*/results.json")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_before = {p.parent.name for p in killed.glob("*/results.json")}
    assert len(finished_before) == 1
    resumed = _cli([*args, f"hydra.sweep.dir={killed}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (resumed.stdout + resumed.stderr).count("job already complete") == len(finished_before)
    clean = tmp_path / "clean"
    assert _cli([*args, f"hydra.sweep.dir={clean}"], tmp_path).returncode == 0
    assert build_report(killed, plots=False)["table1"] == build_report(clean, plots=False)["table1"]


def test_the_pairs_reference_log_probs_are_the_samplers_own_and_equal_scoring(smoke_cfg, tmp_path):
    """fp32: pi_ref's log-probs of the pairs come from decoding (no second pass) and equal
    teacher-forced scoring; the dpo/ref_logp stage then forwards nothing."""
    from mpo_exp.context import RunContext
    from mpo_exp.scoring import score_sequences

    ctx = RunContext(smoke_cfg(), tmp_path)
    pairs, ref = ctx.pairs, ctx.reference
    for batch, logp in ((pairs.a, pairs.ref_logp_a), (pairs.b, pairs.ref_logp_b)):
        torch.testing.assert_close(logp, score_sequences(*ref.live, batch), atol=1e-4, rtol=0)
    assert ctx.meter.stages["dpo/ref_logp"].tokens_fwd == 0
