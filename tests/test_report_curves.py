"""Cost-to-quality curves from RL checkpoints (mpo_exp/report/curves.py), on hand-made results."""

from __future__ import annotations

import pytest

from mpo_exp.report.curves import collect_curves, curve_plots, curves_markdown, reach_mpo
from mpo_exp.report.load import in_table1


def _run(seed: int, policies: dict[str, tuple[float, float]], beta: float = 0.1) -> dict:
    """policies: name -> (total FLOPs, min win rate)."""
    return {
        "seed": seed,
        "beta": beta,
        "policies": {n: {"min_win_rate": w} for n, (_, w) in policies.items()},
        "cost_summary": {n: {"total": {"flops": f, "wall_s": f / 1e10}} for n, (f, _) in policies.items()},
    }


RUNS = [
    _run(
        s,
        {
            "pi_ref": (0.0, 0.5),
            "mpo_decoded": (1e12, 0.55 + d),
            "uniform_mix": (0.9e12, 0.52),
            "morlhf@it2": (2e12, 0.45 + d),
            "morlhf@it1": (1e12, 0.40),
            "morlhf": (4e12, 0.60 + d),
            "maxmin_rlhf_group_min@it1": (1e12, 0.30),
            "maxmin_rlhf_group_min": (3e12, 0.50),
        },
    )
    for s, d in ((0, 0.0), (1, 0.02))
]


def test_checkpoints_and_their_final_policy_form_a_curve_in_iteration_order():
    # a second job of seed 0 (another method) re-evaluates the shared rows: counted once per seed
    other_job = _run(0, {"pi_ref": (0.0, 0.9), "uniform_mix": (0.9e12, 0.9)})
    curves = collect_curves([*RUNS, other_job])[0.1]
    assert curves["pi_ref"][0]["n"] == 2 and curves["pi_ref"][0]["min_win"] == pytest.approx(0.5)
    morlhf = curves["morlhf"]
    assert [p["iteration"] for p in morlhf] == [1, 2, None]
    assert [p["flops"] for p in morlhf] == [1e12, 2e12, 4e12]
    assert morlhf[1]["min_win"] == pytest.approx(0.46) and morlhf[1]["n"] == 2  # mean over seeds
    assert [p["iteration"] for p in curves["mpo_decoded"]] == [None]


def test_cost_to_reach_mpo_is_the_first_point_at_or_above_it_or_not_reached():
    rows = {r["method"]: r for r in reach_mpo(collect_curves(RUNS)[0.1])}
    assert set(rows) == {"morlhf", "maxmin_rlhf_group_min"}  # curves only
    assert rows["morlhf"]["reached"] and rows["morlhf"]["flops"] == 4e12  # MPO 0.56; it2 only 0.46
    assert rows["morlhf"]["flops"] / rows["morlhf"]["mpo_flops"] == pytest.approx(4.0)
    assert not rows["maxmin_rlhf_group_min"]["reached"] and rows["maxmin_rlhf_group_min"]["flops"] is None
    md = curves_markdown(collect_curves(RUNS))
    assert "not within its budget (best 50.0% < 56.0%)" in md
    assert "| morlhf | yes (56.0%) | 4e+12 | 4.0 |" in md


def test_no_checkpoints_no_curve_section(tmp_path):
    plain = [_run(0, {"mpo_decoded": (1e12, 0.5), "morlhf": (4e12, 0.6)})]
    assert curves_markdown(collect_curves(plain)) is None
    assert curve_plots(collect_curves(plain), tmp_path) == []
    (png,) = curve_plots(collect_curves(RUNS), tmp_path)
    assert png.name == "cost_to_quality_beta0.1.png" and png.stat().st_size > 0


def test_checkpoints_stay_out_of_table1():
    assert not in_table1("morlhf@it8") and in_table1("morlhf") and in_table1("mpo_decoded")


def test_budgets_table_counts_a_shared_reward_model_once_per_seed_and_flags_no_plateau():
    from mpo_exp.report.budgets import budgets_markdown

    rm = {"sentiment": {"budget": {"steps": 64, "max_steps": 160, "best_step": 40, "plateaued": True}}}
    runs = [
        {"beta": 0.5, "seed": s, "method": m, "reward_models": rm, "method_policies": [m], "config": {}}
        | (
            {"rl_budget": {"morlhf": {"iterations": 32, "prompts_per_iteration": 16, "plateaued": s == 0}}}
            if m == "morlhf"
            else {}
        )
        for s in (0, 1)
        for m in ("morlhf", "maxmin_rlhf")
    ]
    md = budgets_markdown(runs)
    assert (
        "| 0.5 | reward model sentiment | ≤ 160 steps | 64 steps (best 40) / 64 steps (best 40) "
        "| yes / yes | 2 |" in md
    )
    assert "| 0.5 | RL morlhf | 32 iterations × 16 prompts | " in md and "| yes / **no** | 2 |" in md


def _outcome_run(seed: int, policies: dict[str, tuple[float, list[int]]], n: int = 400) -> dict:
    """policies: name -> (total FLOPs, the prompts won, in both objectives; the rest lost)."""

    def wins(won: list[int]) -> dict:
        col = [1.0 if i in won else 0.0 for i in range(n)]
        return {"min_win_rate": sum(col) / n, "win_per_prompt": {"a": col, "b": col}}

    return {
        "seed": seed,
        "beta": 0.1,
        "objectives": ["a", "b"],
        "pi_ref_fingerprint": "same prompts",
        "policies": {name: wins(won) for name, (_, won) in policies.items()},
        "cost_summary": {n_: {"total": {"flops": f, "wall_s": 1.0}} for n_, (f, _) in policies.items()},
    }


MPO_WON = list(range(0, 400, 2))  # half the prompts
FOUR_MORE = MPO_WON + [1, 3, 5, 7]  # MPO's wins and 4 more: +1 point, and 2% of draws see none of them


def test_reaching_mpo_is_judged_against_noise_and_all_points_together():
    from mpo_exp.report.stats import PromptBootstrap

    run = _outcome_run(
        0,
        {
            "mpo_decoded": (1e12, MPO_WON),
            # clearly better at its final point only
            **{f"better@it{i}": (i * 1e12, MPO_WON) for i in (1, 2)},
            "better": (3e12, list(range(400))),
            # worse at every point
            **{f"worse@it{i}": (i * 1e12, []) for i in (1, 2)},
            "worse": (3e12, [0]),
            # a small gain at one point of six: beyond noise alone (95%), not once the curve's six
            # points are judged together
            **{f"slight@it{i}": (i * 1e12, MPO_WON) for i in (1, 2, 3, 4, 5)},
            "slight": (6e12, FOUR_MORE),
        },
    )
    curves = collect_curves([run], PromptBootstrap())[0.1]
    rows = {r["method"]: r for r in reach_mpo(curves)}
    assert rows["better"]["verdict"] == "above MPO beyond noise from 3e+12 FLOPs (3.0×)"
    assert rows["better"]["delta"] == (0.0, 0.0, 0.0)  # its first point at MPO's level is MPO's twin
    assert rows["worse"]["verdict"] == "below MPO beyond noise at every point"
    assert not rows["worse"]["reached"] and rows["worse"]["delta"] is None
    assert rows["slight"]["flops"] == 1e12  # reached at once (a tie), so take the last point by hand
    last = _delta_of(curves["slight"][-1], curves["mpo_decoded"][0])
    assert last[0] == pytest.approx(0.01) and last[1] > 0  # one point, 95%: beyond noise
    assert rows["slight"]["verdict"] == "within noise of MPO at every point"  # six points, family-wise: not
    md = curves_markdown(collect_curves([run], PromptBootstrap()))
    assert (
        "| better | yes (50.0%) | 1e+12 | 1.0 | +0.0 [+0.0, +0.0] | 3e+12 | "
        "above MPO beyond noise from 3e+12 FLOPs (3.0×) |" in md
    )


def _delta_of(point: dict, mpo: dict) -> tuple[float, float, float]:
    from mpo_exp.report.curves import _delta

    return _delta(point, mpo)


def test_no_interval_when_the_seeds_differ_or_outcomes_are_missing():
    from mpo_exp.report.stats import PromptBootstrap

    runs = [
        _outcome_run(0, {"mpo_decoded": (1e12, MPO_WON), "x@it1": (1e12, MPO_WON), "x": (2e12, MPO_WON)}),
        _outcome_run(1, {"x@it1": (1e12, MPO_WON), "x": (2e12, MPO_WON)}),
    ]
    (row,) = reach_mpo(collect_curves(runs, PromptBootstrap())[0.1])
    assert row["reached"] and row["delta"] is None
    assert row["verdict"].startswith("no interval")
    (row,) = reach_mpo(collect_curves(runs[:1])[0.1])  # no bootstrap: no draws
    assert row["delta"] is None and row["verdict"].startswith("no interval")


def test_the_figure_draws_mpos_interval_as_a_band(tmp_path):
    from mpo_exp.report.curves import _mpo_band
    from mpo_exp.report.stats import PromptBootstrap

    run = _outcome_run(0, {"mpo_decoded": (1e12, MPO_WON), "x@it1": (1e12, []), "x": (2e12, MPO_WON)})
    curves = collect_curves([run], PromptBootstrap())
    name, lo, hi = _mpo_band(curves[0.1])
    assert name == "mpo_decoded" and 43 < lo < 50 < hi < 57  # 50% on 400 prompts: about ±5
    assert _mpo_band(collect_curves([run])[0.1]) is None  # no draws, no band
    (png,) = curve_plots(curves, tmp_path)
    assert png.stat().st_size > 0
