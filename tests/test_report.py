"""The sweep report on hand-made results.json files, including a missing and a corrupt one."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from mpo_exp.report import PromptBootstrap, ReportError, build_report, load_sweep, main

OBJ = ["helpful", "harmless"]
MIN_DEF = "mean over seeds of each seed's minimum over objectives"


def policy(
    wins: tuple[float, ...], z: tuple[float, ...] = (0.1, -0.1), objectives=OBJ, per_prompt=None
) -> dict:
    out = {
        "reward": dict(zip(objectives, z, strict=True)),
        "reward_z": dict(zip(objectives, z, strict=True)),
        "min_reward_z": min(z),
        "win_rate": dict(zip(objectives, wins, strict=True)),
        "min_win_rate": min(wins),
        "kl": 1.0,
    }
    if per_prompt is not None:
        out["win_per_prompt"] = per_prompt
    return out


def outcomes(rate: float, n: int, seed: int) -> list[int]:
    """n outcomes in {0, 1} with exactly round(rate * n) wins, in a seeded random order."""
    k = round(rate * n)
    wins = [1] * k + [0] * (n - k)
    random.Random(seed).shuffle(wins)
    return wins


def from_outcomes(per_prompt: dict[str, list], z=(0.1, -0.1)) -> dict:
    objectives = list(per_prompt)
    wins = tuple(sum(v) / len(v) for v in per_prompt.values())
    return policy(wins, z, objectives, per_prompt)


def pp_policy(rates: tuple[float, ...], n: int, seed: int, objectives=OBJ) -> dict:
    """A policy with per-prompt outcomes behind the given win rates (independent across calls)."""
    return from_outcomes(
        {o: outcomes(r, n, hash((seed, o, r, n)) % 2**31) for o, r in zip(objectives, rates, strict=True)},
        z=(0.1,) * len(objectives),
    )


def stage(wall: float, flops: float) -> dict:
    return {"wall_s": wall, "flops": flops, "tokens_fwd": 10, "tokens_bwd": 5, "reused": False}


def write_run(
    root: Path,
    name: str,
    method: str,
    seed: int,
    extra_policies: dict,
    beta: float = 0.1,
    cost: dict | None = None,
    objectives: list[str] = OBJ,
    n_prompts: int | None = None,
    shared_wins: dict[str, tuple[float, ...]] | None = None,
    **extras,
) -> None:
    """One job's results.json; with n_prompts the shared rows carry per-prompt outcomes too;
    ``shared_wins`` replaces some shared rows' win rates."""
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    other = objectives[1]
    shared_wins = {
        "pi_ref": (0.5, 0.5),
        f"pi_{objectives[0]}": (0.8 - seed * 0.02, 0.2),
        f"pi_{other}": (0.3, 0.9),
        "uniform_mix": (0.55, 0.6),
        **(shared_wins or {}),
    }
    shared = {
        k: pp_policy(w, n_prompts, seed, objectives) if n_prompts else policy(w, objectives=objectives)
        for k, w in shared_wins.items()
    }
    base_cost = {
        "preferences": stage(1, 10),
        **{f"dpo/{o}": stage(5, 100) for o in objectives},
        **(cost or {}),
    }
    results = {
        "method": method,
        "seed": seed,
        "beta": beta,
        "objectives": objectives,
        "method_policies": list(extra_policies),
        "policies": {**shared, **extra_policies},
        "cost": base_cost,
        **extras,
    }
    (job / "results.json").write_text(json.dumps(results))


MPO_COST = {"mpo/sampling": stage(1, 5), "mpo/scoring": stage(1, 5), "mpo/bsmd": stage(0.1, 0)}
MPO_STAGES = ["mpo/sampling", "mpo/scoring", "mpo/bsmd"]
RL_COST = {"rm/helpful": stage(10, 200), "rm/harmless": stage(10, 200), "rl/morlhf": stage(60, 900)}
RL_STAGES = ["rm/helpful", "rm/harmless", "rl/morlhf"]


def mpo_costs(name: str = "mpo") -> dict:
    return {
        name: {
            "total": ["preferences", "dpo/helpful", "dpo/harmless", *MPO_STAGES],
            "post_processing": MPO_STAGES,
        }
    }


def morlhf_costs() -> dict:
    return {"morlhf": {"total": ["preferences", *RL_STAGES], "post_processing": RL_STAGES}}


@pytest.fixture
def sweep(tmp_path):
    """Results written before per-prompt outcomes were recorded (no win_per_prompt)."""
    root = tmp_path / "sweep"
    for seed in (0, 1):
        write_run(
            root,
            f"{seed}_mpo",
            "mpo",
            seed,
            {"mpo": policy((0.6 + seed * 0.02, 0.62))},
            cost=MPO_COST,
            policy_costs=mpo_costs(),
            bsmd={"objectives": OBJ, "step": [0, 10], "trajectory": [[0.5, 0.5], [0.4, 0.6]]},
        )
        write_run(
            root,
            f"{seed}_morlhf",
            "morlhf",
            seed,
            {"morlhf": policy((0.58, 0.57))},
            cost=RL_COST,
            policy_costs=morlhf_costs(),
            reward_normalization="zscore",
        )
    write_run(
        root,
        "2_loo",
        "mpo",
        0,
        {"mpo_without_harmless": policy((0.7, 0.3), z=(0.4, -0.5))},
        # an older run: no policy_costs, its own cost_summary stands in
        cost_summary={"total": stage(2, 30), "post_processing": None},
    )
    (root / "3_killed" / ".hydra").mkdir(parents=True)  # a job that never wrote results.json
    (root / "4_corrupt" / ".hydra").mkdir(parents=True)
    (root / "4_corrupt" / "results.json").write_text('{"method": "mpo", "polic')
    return root


def test_loader_names_and_skips_missing_and_corrupt(sweep):
    loaded = load_sweep(sweep)
    assert len(loaded.runs) == 5
    reasons = {p.parent.name: why for p, why in loaded.skipped}
    assert reasons["3_killed"].startswith("missing") and reasons["4_corrupt"].startswith("corrupt")


def test_report_tables(sweep):
    rep = build_report(sweep, paper=True, plots=True)
    table = rep["table1"]
    # mean ± std over the two seeds; no per-prompt outcomes: no interval and no bold, and it says so
    assert "| 0.1 | MPO | 61.0 ± 1.4 | 62.0 ± 0.0 | 61.0 ± 1.4 | -0.10 ± 0.00 | 2 |" in table
    assert "| 0.1 | π_helpful | 79.0 ± 1.4 | 20.0 ± 0.0 | 20.0 ± 0.0 |" in table
    assert "**" not in table.split("| β |")[1].split("\n\n")[0]  # no bold cell in the table body
    assert "No per-prompt outcomes (win_per_prompt) for all rows" in table
    assert MIN_DEF in table and "std over seeds" in table and "bootstrap over eval prompts" in table
    assert "Published numbers" in table  # --paper
    mpo_cost = next(r for r in rep["costs"] if r["policy"] == "mpo")
    morlhf_cost = next(r for r in rep["costs"] if r["policy"] == "morlhf")
    loo_cost = next(r for r in rep["costs"] if r["policy"] == "mpo_without_harmless")
    assert mpo_cost["total_flops"] == 10 + 200 + 10 and mpo_cost["post_flops"] == 10
    assert morlhf_cost["total_flops"] == 10 + 400 + 900 and morlhf_cost["post_flops"] == 1300
    assert morlhf_cost["total_flops_vs_mpo"] == pytest.approx(1310 / 220)
    assert loo_cost["total_flops"] == 30 and loo_cost["post_flops"] == 0
    assert "cost_summary" in rep["cost"] and "`2_loo`" in rep["cost"]
    assert "MPO w/o π_harmless" in rep["ablation"]
    assert "Reward normalisation of the RL baselines: MORLHF → zscore." in table
    for name in (
        "table1.md",
        "table1.tex",
        "table1.csv",
        "cost.md",
        "ablation.md",
        "report.md",
        "bars_beta0.1.png",
        "lambda_trajectory.png",
        "min_win_vs_cost.png",
    ):
        assert (sweep / name).stat().st_size > 0, name
    report_md = (sweep / "report.md").read_text()
    assert "4_corrupt" in report_md and MIN_DEF in report_md
    assert "61.0$\\pm$1.4" in (sweep / "table1.tex").read_text()
    assert "\\textbf" not in (sweep / "table1.tex").read_text()
    header = (sweep / "table1.csv").read_text().splitlines()[0]
    assert header.startswith("beta,policy,helpful_mean") and "min_ci_low,min_ci_high" in header
    assert not (sweep / "lambda.md").exists()  # no lambda recorded in these results
    # rewards, KL and the total cost per row; a row whose stages were not recorded shows "–"
    per_policy = (sweep / "policies.md").read_text()
    assert (
        "| 0.1 | MORLHF (uniform w) | 0.100 ± 0.000 | -0.100 ± 0.000 | 1.00 ± 0.00 | 1.31e+03 | 60 | 81 | 2 |"
        in per_policy
    )
    assert "| 0.1 | π_ref | 0.100 ± 0.000 | -0.100 ± 0.000 | 1.00 ± 0.00 | – | – | – | 2 |" in per_policy
    assert "Rewards, KL and cost per policy" in report_md


def test_cli_prints_the_tables(sweep, capsys):
    main([str(sweep), "--no-plots"])
    out = capsys.readouterr().out
    assert "MPO" in out and "skipped" in out and "4_corrupt" in out
    assert MIN_DEF in out and "Reward normalisation" in out


def test_empty_sweep_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no readable results.json"):
        build_report(tmp_path)


def test_pareto_plot_only_for_weight_sweeps(tmp_path):
    root = tmp_path / "pareto"
    write_run(root, "mpo", "mpo", 0, {"mpo": policy((0.6, 0.6))})
    write_run(root, "uniform_morlhf", "morlhf", 0, {"morlhf": policy((0.5, 0.6))})
    build_report(root)
    assert not (root / "pareto_beta0.1.png").exists()  # uniform MORLHF alone is not a front
    for i, w in enumerate([(1, 0), (0.5, 0.5), (0, 1)]):
        name = f"fixed_mix_{w[0]:.2f}_{w[1]:.2f}"
        write_run(root, f"fm{i}", "fixed_mix", 0, {name: policy((0.3 + 0.4 * w[0], 0.3 + 0.4 * w[1]))})
    build_report(root)
    assert (root / "pareto_beta0.1.png").stat().st_size > 0


# ---- bootstrap intervals and the bold -----------------------------------------------------------
def row(rep: dict, name: str) -> dict:
    return next(r for r in rep["rows"] if r["policy"] == name)


def test_interval_contains_the_point_and_shrinks_with_more_prompts(tmp_path):
    widths = []
    for n in (50, 800):
        root = tmp_path / f"n{n}"
        for seed in (0, 1, 2):
            write_run(root, f"{seed}_mpo", "mpo", seed, {"mpo": pp_policy((0.6, 0.66), n, seed)}, n_prompts=n)
        rep = build_report(root, plots=False)
        for r in rep["rows"]:
            lo, hi = r["ci"]
            assert lo <= r["min"][0] <= hi, (n, r["policy"])
        mpo = row(rep, "mpo")
        assert f"[{mpo['ci'][0] * 100:.1f}, {mpo['ci'][1] * 100:.1f}]" in rep["table1"]
        assert "No per-prompt outcomes" not in rep["table1"]
        widths.append(mpo["ci"][1] - mpo["ci"][0])
    assert widths[1] < widths[0] / 2.5  # ~ 1/sqrt(n): 4x narrower for 16x the prompts


def test_bootstrap_is_seeded_and_paired():
    boot = PromptBootstrap(200)
    again = PromptBootstrap(200)
    assert (boot.counts(0, 30) == again.counts(0, 30)).all()  # same report, same intervals
    assert (boot.counts(0, 30).sum(axis=1) == 30).all()
    assert not (boot.counts(0, 30) == boot.counts(1, 30)).all()  # seeds resample independently


def test_best_within_noise_is_not_bold(tmp_path):
    root = tmp_path / "close"
    n = 100
    for seed in (0, 1):
        write_run(root, f"{seed}_mpo", "mpo", seed, {"mpo": pp_policy((0.62, 0.64), n, seed)}, n_prompts=n)
        write_run(
            root,
            f"{seed}_morlhf",
            "morlhf",
            seed,
            {"morlhf": pp_policy((0.61, 0.63), n, seed + 7)},
            n_prompts=n,
        )
    rep = build_report(root, plots=False)
    assert not any(r["bold"] for r in rep["rows"])
    assert "**" not in rep["table1"].split("| β |")[1].split("\n\n")[0]
    assert "within noise, no bold" in rep["table1"] and "runner-up MORLHF" in rep["table1"]


def test_clear_winner_is_bold(tmp_path):
    root = tmp_path / "clear"
    n = 300
    for seed in (0, 1):
        write_run(root, f"{seed}_mpo", "mpo", seed, {"mpo": pp_policy((0.85, 0.88), n, seed)}, n_prompts=n)
        write_run(
            root,
            f"{seed}_morlhf",
            "morlhf",
            seed,
            {"morlhf": pp_policy((0.6, 0.62), n, seed + 7)},
            n_prompts=n,
        )
    rep = build_report(root, plots=False)
    assert row(rep, "mpo")["bold"] and not row(rep, "morlhf")["bold"]
    mpo = row(rep, "mpo")
    assert f"| **85.0 ± 0.0** [{mpo['ci'][0] * 100:.1f}, {mpo['ci'][1] * 100:.1f}] |" in rep["table1"]
    assert "runner-up MORLHF" in rep["table1"] and "bold." in rep["table1"]
    assert "\\textbf{85.0$\\pm$0.0}" in (root / "table1.tex").read_text()


def test_the_bold_uses_the_paired_bootstrap(tmp_path):
    """A 4-point gain on the same prompts: significant when paired, lost in the noise if not."""
    root = tmp_path / "paired"
    n = 400
    for seed in (0, 1):
        base = outcomes(0.6, n, seed)
        better = list(base)
        losses = [i for i, v in enumerate(base) if v == 0]
        for i in losses[:16]:  # MPO also wins 16 of the prompts MORLHF loses: +4 points
            better[i] = 1
        everything = [1] * n
        write_run(
            root,
            f"{seed}_a",
            "mpo",
            seed,
            {"mpo": from_outcomes({"helpful": better, "harmless": everything})},
        )
        write_run(
            root,
            f"{seed}_b",
            "morlhf",
            seed,
            {"morlhf": from_outcomes({"helpful": base, "harmless": everything})},
        )
    rep = build_report(root, plots=False)
    mpo, morlhf = row(rep, "mpo"), row(rep, "morlhf")
    assert mpo["bold"]
    # the two rows' own intervals overlap: an unpaired comparison could not tell them apart
    assert mpo["ci"][0] < morlhf["ci"][1]


# ---- what differs is never merged ---------------------------------------------------------------
def test_nan_and_missing_values_are_flagged_and_never_bold(tmp_path):
    root = tmp_path / "nan"
    n = 200
    for seed in (0, 1):
        mpo = pp_policy((0.95, 0.95), n, seed)
        if seed == 0:
            mpo["win_rate"]["helpful"] = math.nan
            mpo["min_win_rate"] = math.nan
        morlhf = pp_policy((0.6, 0.62), n, seed + 7)
        if seed == 1:
            del morlhf["win_rate"]["harmless"]
        write_run(root, f"{seed}_mpo", "mpo", seed, {"mpo": mpo}, n_prompts=n)
        write_run(root, f"{seed}_morlhf", "morlhf", seed, {"morlhf": morlhf}, n_prompts=n)
    rep = build_report(root, plots=False)
    table = rep["table1"]
    assert "| 0.1 | MPO | NaN† | 95.0 ± 0.0 | NaN† |" in table
    assert "| 0.1 | MORLHF (uniform w) | 60.0 ± 0.0 | —† |" in table
    assert "† NaN:" in table and "never get the bold" in table
    assert not row(rep, "mpo")["bold"] and not row(rep, "morlhf")["bold"]
    assert "**NaN" not in table
    assert "NaN$^\\dagger$" in (root / "table1.tex").read_text()


def test_different_objective_sets_are_reported_separately(tmp_path):
    root = tmp_path / "mixed"
    other = ["helpful", "honest"]
    write_run(root, "0_mpo", "mpo", 0, {"mpo": policy((0.6, 0.7))})
    write_run(root, "1_mpo", "mpo", 0, {"mpo": policy((0.9, 0.4), objectives=other)}, objectives=other)
    rep = build_report(root, plots=True)
    assert rep["groups"] == [OBJ, other]
    table = rep["table1"]
    first, second = table.split("## Objectives: helpful, honest")
    assert "## Objectives: helpful, harmless" in first and "honest" not in first.split("| β |")[1]
    assert "| β | method | helpful | honest |" in second and "harmless" not in second
    assert "| 0.1 | MPO | 60.0 ± 0.0 | 70.0 ± 0.0 |" in first
    assert "| 0.1 | MPO | 90.0 ± 0.0 | 40.0 ± 0.0 |" in second  # not averaged with the other set
    for name in (
        "table1_helpful-harmless.csv",
        "table1_helpful-honest.tex",
        "bars_beta0.1_helpful-honest.png",
    ):
        assert (root / name).stat().st_size > 0, name
    assert "different objective sets" not in table  # the report.md says why there are two
    assert "do not share one objective set" in (root / "report.md").read_text()


def test_duplicate_rows_are_reported(tmp_path):
    root = tmp_path / "dups"
    write_run(root, "0_mpo", "mpo", 0, {"mpo": policy((0.6, 0.7))})
    write_run(root, "1_mpo_again", "mpo", 0, {"mpo": policy((0.2, 0.3))})
    rep = build_report(root, plots=False)
    assert len(rep["duplicates"]) == 1
    assert "kept `0_mpo`, dropped `1_mpo_again`" in rep["table1"]
    assert "| 0.1 | MPO | 60.0 ± 0.0 | 70.0 ± 0.0 |" in rep["table1"] and row(rep, "mpo")["seeds"] == 1
    assert "Duplicates" in (root / "report.md").read_text()


def test_normalisations_are_shown_and_never_averaged(tmp_path):
    root = tmp_path / "norm"
    for seed, norm in ((0, "zscore"), (1, "zscore"), (2, "partition")):
        write_run(
            root,
            f"{seed}_morlhf",
            "morlhf",
            seed,
            {"morlhf": policy((0.5 + seed / 10, 0.6))},
            cost=RL_COST,
            policy_costs=morlhf_costs(),
            reward_normalization=norm,
        )
    write_run(root, "3_maxmin", "maxmin_rlhf", 0, {"maxmin_rlhf_group_min": policy((0.5, 0.5))})
    rep = build_report(root, plots=False)
    table = rep["table1"]
    assert "MaxMin-RLHF → not recorded; MORLHF → partition, zscore." in table
    assert "| 0.1 | MORLHF (uniform w) [partition] | 70.0 ± 0.0 |" in table
    assert "| 0.1 | MORLHF (uniform w) [zscore] | 55.0 ± 7.1 |" in table
    assert "never averaged" in table
    assert {r["label"] for r in rep["costs"]} >= {
        "MORLHF (uniform w) [partition]",
        "MORLHF (uniform w) [zscore]",
    }


# ---- costs and lambda ---------------------------------------------------------------------------
def test_policy_costs_are_summed_per_policy(tmp_path):
    root = tmp_path / "cost"
    soups = {
        "reward_soup": {
            "total": ["preferences", "dpo/helpful", "dpo/harmless", "soup/reward_soup"],
            "post_processing": ["soup/reward_soup"],
        },
        "weighted_reward_soup": {
            "total": ["preferences", "dpo/helpful", "dpo/harmless", "soup/weighted_reward_soup", *MPO_STAGES],
            "post_processing": ["soup/weighted_reward_soup", *MPO_STAGES],
        },
    }
    write_run(
        root,
        "0_soups",
        "reward_soups",
        0,
        {"reward_soup": policy((0.5, 0.6)), "weighted_reward_soup": policy((0.55, 0.6))},
        cost={"soup/reward_soup": stage(2, 1), "soup/weighted_reward_soup": stage(3, 2), **MPO_COST},
        policy_costs=soups,
    )
    rep = build_report(root, plots=False)
    rs, wrs = row_cost(rep, "reward_soup"), row_cost(rep, "weighted_reward_soup")
    assert (rs["total_flops"], rs["post_flops"], rs["post_wall_s"]) == (211, 1, 2)
    assert (wrs["total_flops"], wrs["post_flops"]) == (10 + 200 + 2 + 10, 12)
    assert wrs["total_wall_s"] == pytest.approx(1 + 10 + 3 + 2.1)
    assert "| 0.1 | Weighted RS | 16.1 | 222 | 70 / 35 | 5.1 | 12 |" in rep["cost"]


def row_cost(rep: dict, name: str) -> dict:
    return next(r for r in rep["costs"] if r["policy"] == name)


def test_a_cost_stage_missing_is_an_error_naming_the_run(tmp_path, capsys):
    root = tmp_path / "badcost"
    write_run(
        root,
        "0_mpo",
        "mpo",
        0,
        {"mpo": policy((0.6, 0.6))},
        policy_costs={"mpo": {"total": ["preferences", "mpo/bsmd"], "post_processing": ["mpo/bsmd"]}},
    )
    with pytest.raises(ReportError, match=r"0_mpo.*'mpo/bsmd'"):
        build_report(root, plots=False)
    with pytest.raises(SystemExit, match="0_mpo"):
        main([str(root), "--no-plots"])


def test_lambda_table(tmp_path):
    root = tmp_path / "lambda"
    for seed, lam, std, gap in ((0, [0.4, 0.6], [0.02, 0.03], 1e-3), (1, [0.5, 0.5], [0.04, 0.05], 5e-4)):
        write_run(
            root,
            f"{seed}_mpo",
            "mpo",
            seed,
            {"mpo": policy((0.6, 0.6))},
            cost=MPO_COST,
            policy_costs=mpo_costs(),
            bsmd={"objectives": OBJ, "step": [0], "trajectory": [[0.5, 0.5]], "fw_gap": gap},
            **{"lambda": lam, "lambda_std": std},
        )
    # an older run: no bootstrap std, no FW gap; and a run of a method without lambda
    write_run(
        root,
        "2_mpo",
        "mpo",
        0,
        {"mpo": policy((0.6, 0.6))},
        beta=0.5,
        bsmd={"objectives": OBJ},
        **{"lambda": [1, 0]},
    )
    write_run(root, "3_morlhf", "morlhf", 0, {"morlhf": policy((0.5, 0.5))})
    rep = build_report(root, plots=False)
    lam = rep["lambda"]
    assert "| 0.1 | MPO | 0.450 ± 0.071 | 0.550 ± 0.071 | 0.030 / 0.040 | 1.00e-03 | 2 |" in lam
    assert "| 0.5 | MPO | 1.000 ± 0.000 | 0.000 ± 0.000 | — / — | — | 1 |" in lam
    assert "MORLHF" not in lam
    assert (root / "lambda.md").read_text().strip() == lam.strip()
    assert lam in (root / "report.md").read_text()


def test_rl_is_set_beside_its_closed_form(tmp_path):
    """MORLHF(uniform w) − uniform mixing per objective, paired per seed, with a bootstrap interval."""
    import re

    root = tmp_path / "closed"
    n = 400
    for seed in (0, 1):
        morlhf = pp_policy((0.45, 0.6), n, seed + 11)  # uniform mixing has (0.55, 0.6) in write_run
        write_run(
            root,
            f"{seed}_morlhf",
            "morlhf",
            seed,
            {"morlhf": morlhf},
            n_prompts=n,
            reward_normalization="partition",
        )
    rep = build_report(root, plots=False)
    line = next(x for x in rep["closed_form"].splitlines() if x.startswith("| 0.1 | MORLHF"))
    assert "(partition) | Uniform mixing | -10.0 ± 0.0 [" in line and "| 0.0 ± 0.0 [" in line
    lo, hi = (float(v) for v in re.search(r"-10\.0 ± 0\.0 \[([-+\d.]+), ([-+\d.]+)\]", line).groups())
    assert lo < -10.0 < hi < 0  # the interval holds the point and excludes no difference
    assert (root / "closed_form.md").exists()
    mpo_only = tmp_path / "mpo"
    write_run(mpo_only, "0_mpo", "mpo", 0, {"mpo": pp_policy((0.6, 0.6), 50, 0)}, n_prompts=50)
    assert build_report(mpo_only, plots=False)["closed_form"] is None


def test_mod_with_mpo_lambda_is_reported_as_mpo_and_grid_uniform_as_the_uniform_row():
    from mpo_exp.report.load import pretty, row_name

    assert row_name("fixed_mix_mpo_lambda") == "mpo" and pretty(row_name("fixed_mix_mpo_lambda")) == "MPO"
    assert row_name("morlhf_0.50_0.50") == "morlhf" and pretty("morlhf") == "MORLHF (uniform w)"
    assert (
        row_name("morlhf_mpo_lambda") == "morlhf_mpo_lambda"
        and pretty("morlhf_mpo_lambda") == "MORLHF (MPO's λ)"
    )
    assert row_name("fixed_mix_0.75_0.25") == "fixed_mix_0.75_0.25"  # a front point, not a Table 1 row


# ---- settings, job order, pairing and recorded weights ------------------------------------------
def job_config(*overrides: str, seed: int = 0) -> dict:
    """The config a job records in results.json (the real default config with these overrides)."""
    from mpo_exp.results import result_config
    from tests.conftest import compose_config

    return result_config(compose_config([f"task.objectives=[{','.join(OBJ)}]", f"seed={seed}", *overrides]))


def test_result_config_is_the_resolved_config_less_what_cannot_change_a_number():
    cfg = job_config("method=morlhf", "rl=rloo", "trainer.enable_progress_bar=false", seed=3)
    assert (
        cfg["rl"]["module"]["estimator"] == "rloo" and cfg["seed"] == 3 and cfg["task"]["objectives"] == OBJ
    )
    assert cfg["dpo"]["module"]["beta"] == cfg["beta"]  # resolved
    assert not {"paths", "logger", "hydra", "num_threads", "resume"} & set(cfg)
    assert not {"enable_progress_bar", "log_every_n_steps"} & set(cfg["trainer"])
    assert json.loads(json.dumps(cfg)) == cfg


def test_jobs_that_differ_in_a_setting_are_two_rows_never_a_duplicate(tmp_path):
    root = tmp_path / "settings"
    for seed in (0, 1):
        for est, win in (("ppo", 0.5), ("rloo", 0.7)):
            write_run(
                root,
                f"{seed}_morlhf_{est}",
                "morlhf",
                seed,
                {"morlhf": policy((win + seed / 100, 0.6))},
                reward_normalization="partition",
                config=job_config("method=morlhf", f"rl={est}", seed=seed),
                **{"lambda": [0.5, 0.5]},
            )
        # MPO never reads rl: MPO jobs of either rl setting are one MPO row
        rl = "rloo" if seed else "ppo"
        config = job_config(f"rl={rl}", seed=seed)
        write_run(root, f"{seed}_mpo", "mpo", seed, {"mpo": policy((0.6, 0.6))}, config=config)
    # uniform weights spelled out are the same setting as weights=null
    write_run(
        root,
        "2_morlhf_ppo",
        "morlhf",
        2,
        {"morlhf_0.50_0.50": policy((0.52, 0.6))},
        reward_normalization="partition",
        config=job_config("method=morlhf", "method.weights=[0.5,0.5]", seed=2),
        **{"lambda": [0.5, 0.5]},
    )
    rep = build_report(root, plots=False)
    table = rep["table1"]
    assert not rep["duplicates"]
    assert "| 0.1 | MORLHF (uniform w) [rl.module.estimator=ppo] | 51.0 ± 1.0 |" in table
    assert "| 0.1 | MORLHF (uniform w) [rl.module.estimator=rloo] | 70.5 ± 0.7 |" in table
    assert sorted(r["seeds"] for r in rep["rows"] if r["policy"] == "morlhf") == [2, 3]  # seeds pool
    assert "| 0.1 | MPO | 60.0 ± 0.0 |" in table and row(rep, "mpo")["seeds"] == 2
    assert "| 0.1 | π_helpful | 78.0 ± 2.0 |" in table  # the shared rows do not depend on rl either
    assert "never averaged" in table and "MORLHF (uniform w) at β=0.1" in table
    assert "[rl.module.estimator=rloo]" in (root / "table1.csv").read_text()
    # an older results.json (no config) still loads; its rows are never merged with recorded ones
    write_run(root, "9_legacy", "mpo", 3, {"mpo": policy((0.4, 0.4))})
    rep = build_report(root, plots=False)
    seeds = {r["label"]: r["seeds"] for r in rep["rows"] if r["policy"] == "mpo"}
    assert seeds == {"MPO [config recorded]": 2, "MPO [config not recorded]": 1}


def test_shared_rows_split_by_their_own_settings(tmp_path):
    root = tmp_path / "lora"
    for r, win in ((0, 0.7), (8, 0.9)):
        write_run(
            root,
            f"{r}_mpo",
            "mpo",
            0,
            {"mpo": policy((0.6, 0.6))},
            shared_wins={"pi_helpful": (win, 0.2)},
            config=job_config(f"dpo.lora.r={r}"),
        )
    table = build_report(root, plots=False)["table1"]
    assert "| 0.1 | π_helpful [dpo.lora.r=0] | 70.0 ± 0.0 |" in table
    assert "| 0.1 | π_helpful [dpo.lora.r=8] | 90.0 ± 0.0 |" in table
    assert "| 0.1 | MPO [dpo.lora.r=8] |" in table
    assert "differ between jobs" not in table


def test_shared_rows_come_from_the_lowest_job_number_and_other_copies_are_checked(tmp_path, caplog):
    root = tmp_path / "order"
    write_run(root, "2_mpo", "mpo", 0, {"mpo": policy((0.6, 0.6))}, shared_wins={"pi_helpful": (0.7, 0.2)})
    write_run(
        root, "10_morlhf", "morlhf", 0, {"morlhf": policy((0.5, 0.5))}, shared_wins={"pi_helpful": (0.9, 0.2)}
    )
    write_run(
        root,
        "11_mod",
        "fixed_mix",
        0,
        {"fixed_mix": policy((0.5, 0.5))},
        shared_wins={"pi_helpful": (0.7, 0.2)},
    )
    assert [r["_rel"] for r in load_sweep(root).runs] == ["2_mpo", "10_morlhf", "11_mod"]
    with caplog.at_level("WARNING", logger="mpo_exp.report"):
        table = build_report(root, plots=False)["table1"]
    assert "| 0.1 | π_helpful | 70.0 ± 0.0 |" in table  # job 2, not "10_" (first as a string)
    assert "π_helpful at β=0.1, seed 0: `2_mpo` ≠ `10_morlhf`" in table and "11_mod" not in table
    assert "2_mpo and 10_morlhf disagree" in caplog.text


def paired_sweep(root: Path, fingerprints: tuple[str | None, str | None]) -> dict:
    """MPO wins 16 more of 400 prompts than MORLHF on the same outcomes (see the test above); the two
    jobs record the given π_ref fingerprints."""
    n = 400
    for seed in (0, 1):
        base = outcomes(0.6, n, seed)
        better = list(base)
        for i in [i for i, v in enumerate(base) if v == 0][:16]:
            better[i] = 1
        for job, method, wins, fp in (
            ("a", "mpo", better, fingerprints[0]),
            ("b", "morlhf", base, fingerprints[1]),
        ):
            extras = {} if fp is None else {"pi_ref_fingerprint": f"{fp}{seed}"}
            write_run(
                root,
                f"{seed}_{job}",
                method,
                seed,
                {method: from_outcomes({"helpful": wins, "harmless": [1] * n})},
                **extras,
            )
    return build_report(root, plots=False)


def test_runs_are_paired_only_on_the_same_pi_ref_responses(tmp_path):
    assert row(paired_sweep(tmp_path / "same", ("x", "x")), "mpo")["bold"]
    # other π_ref responses: the same outcome lists are not the same prompts' outcomes, no pairing
    other = paired_sweep(tmp_path / "other", ("x", "y"))
    assert not row(other, "mpo")["bold"] and "within noise, no bold" in other["table1"]
    legacy = paired_sweep(tmp_path / "legacy", (None, None))  # older files: (seed, prompts) as before
    assert row(legacy, "mpo")["bold"] and "No π_ref fingerprint in `0_a`" in legacy["table1"]
    boot = PromptBootstrap(50)
    assert (boot.counts(0, 30) == boot.counts(0, 30, None)).all()
    assert (boot.counts(0, 30, "x") == PromptBootstrap(50).counts(0, 30, "x")).all()
    assert not (boot.counts(0, 30, "x") == boot.counts(0, 30, "y")).all()


def test_the_pi_ref_fingerprint_is_taken_at_evaluation(toy_task, tiny_policies):
    from mpo_exp.evaluation import Evaluator
    from mpo_exp.mpo.mixing import MixedPolicy

    def fingerprint(seed: int, ref: int = 0) -> str:
        ev = Evaluator(toy_task, MixedPolicy.single(tiny_policies[ref]), 8, seed, batch_size=8)
        assert ev.fingerprint is None
        ev.reference_rewards()
        return ev.fingerprint

    first = fingerprint(0)
    assert isinstance(first, str) and first == fingerprint(0)  # the same prompts and π_ref samples
    assert first != fingerprint(1) and first != fingerprint(0, ref=1)


def test_weights_are_read_from_the_results_not_from_the_rounded_name(tmp_path):
    root = tmp_path / "weights"
    # named morlhf_0.50_0.50 (2 decimals) but made with (0.504, 0.496): a front point, not the uniform row
    write_run(
        root, "0_near", "morlhf", 0, {"morlhf_0.50_0.50": policy((0.5, 0.5))}, **{"lambda": [0.504, 0.496]}
    )
    write_run(
        root,
        "1_third",
        "fixed_mix",
        0,
        {"fixed_mix_0.33_0.67": policy((0.4, 0.7))},
        **{"lambda": [1 / 3, 2 / 3]},
    )
    write_run(
        root, "2_half", "fixed_mix", 0, {"fixed_mix_0.50_0.50": policy((0.5, 0.6))}, **{"lambda": [0.5, 0.5]}
    )
    rep = build_report(root, plots=False)
    assert {r["policy"] for r in rep["rows"]} & {"morlhf", "fixed_mix"} == {"fixed_mix"}
    fronts = {f.method: f for f in rep["fronts"]}
    assert [p.weights for p in fronts["morlhf"].points] == [(0.504, 0.496)]
    assert [p.weights for p in fronts["fixed_mix"].points] == [(0.5, 0.5), (1 / 3, 2 / 3)]


def test_morlhf_with_mpo_lambda_keeps_its_closed_form_line(tmp_path):
    root = tmp_path / "closed_lambda"
    n = 200
    lams = {0: [0.3, 0.7], 1: [0.4, 0.6], 2: [0.2, 0.8]}
    for seed, lam in lams.items():
        mpo = pp_policy((0.6, 0.65), n, seed)
        if seed == 1:  # MOD with MPO's λ is MPO's policy (its row)
            write_run(
                root,
                f"{seed}_mod",
                "fixed_mix",
                seed,
                {"fixed_mix_mpo_lambda": mpo},
                n_prompts=n,
                mpo_policy="mpo",
                **{"lambda": lam},
            )
        else:
            write_run(root, f"{seed}_mpo", "mpo", seed, {"mpo": mpo}, n_prompts=n, **{"lambda": lam})
        # seed 2's MORLHF had another λ: not the closed form of that seed's MPO
        rl_lam = [0.5, 0.5] if seed == 2 else lam
        write_run(
            root,
            f"{seed}_morlhf",
            "morlhf",
            seed,
            {"morlhf_mpo_lambda": pp_policy((0.55, 0.65), n, seed + 5)},
            n_prompts=n,
            reward_normalization="partition",
            mpo_policy="mpo",
            **{"lambda": rl_lam},
        )
    closed = build_report(root, plots=False)["closed_form"]
    line = next(x for x in closed.splitlines() if "MORLHF (MPO's λ)" in x)
    assert "(partition) | MPO | -5.0 ± 0.0 [" in line and line.endswith("| 2 |")


def test_mod_with_mpo_lambda_is_charged_what_mpo_is_when_lambda_has_a_zero(tiny_policies, monkeypatch):
    from types import SimpleNamespace

    from mpo_exp.methods import dpo_policies_cost
    from mpo_exp.mpo import fixed_mix
    from mpo_exp.mpo.method import MPOMethod
    from mpo_exp.mpo.user_weights import ResolvedWeights

    mpo = MPOMethod()
    ctx = SimpleNamespace(single_objective_policies=dict(zip(OBJ, tiny_policies[:2], strict=True)))
    lam = ResolvedWeights([1.0, 0.0], "mpo_lambda", own=(mpo.stage_prefix,))
    monkeypatch.setattr(fixed_mix, "resolve_user_weights", lambda *args: lam)
    out = fixed_mix.FixedMixMethod("mpo", mpo).run(ctx)
    # MPO's own cost (mpo/method.py): every π_k its λ was solved on, the zero-weight one too
    assert out.costs["fixed_mix_mpo_lambda"] == dpo_policies_cost(OBJ, mpo.stage_prefix)
    fixed = ResolvedWeights([1.0, 0.0], "1.00_0.00")
    monkeypatch.setattr(fixed_mix, "resolve_user_weights", lambda *args: fixed)
    out = fixed_mix.FixedMixMethod([1.0, 0.0]).run(ctx)
    assert out.costs["fixed_mix_1.00_0.00"] == dpo_policies_cost(["helpful"])  # user weights: never built


def test_lambda_table_never_averages_two_settings(tmp_path):
    root = tmp_path / "lambda_settings"
    for steps, lam in ((500, [0.2, 0.8]), (2000, [0.4, 0.6])):
        write_run(
            root,
            f"{steps}_mpo",
            "mpo",
            0,
            {"mpo": policy((0.6, 0.6))},
            bsmd={"objectives": OBJ},
            config=job_config(f"method.steps={steps}"),
            **{"lambda": lam},
        )
    rep = build_report(root, plots=False)
    assert "| 0.1 | MPO [method.steps=500] | 0.200 ± 0.000 | 0.800 ± 0.000 |" in rep["lambda"]
    assert "| 0.1 | MPO [method.steps=2000] | 0.400 ± 0.000 | 0.600 ± 0.000 |" in rep["lambda"]
    assert "| 0.1 | MPO [method.steps=500] |" in rep["table1"] and not rep["duplicates"]


def test_the_options_table_differences_are_the_differences_of_its_points(tmp_path):
    """options.md's "− uniform mixing" is MPO's min − uniform mixing's min, as printed beside it.
    Uniform mixing's two objectives tie, so its resampled minimum is biased low by ~2.8 points on
    100 prompts: the mean of the paired draws would read about −2, not −5."""
    root = tmp_path / "options"
    write_run(
        root,
        "0_mpo",
        "mpo",
        0,
        {"mpo_decoded": pp_policy((0.45, 0.9), 100, 0)},
        beta=0.5,
        n_prompts=100,
        shared_wins={"uniform_mix": (0.5, 0.5)},
    )
    build_report(root, plots=False)
    text = (root / "options.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| 0.5")]
    cells = {r[1]: r for r in rows}
    assert cells["Uniform mixing"][3].startswith("50.0 [")
    assert cells["MPO (decoded)"][3].startswith("45.0 [")
    assert cells["MPO (decoded)"][4].startswith("-5.0 [")
