"""The sweep report on hand-made results.json files, including a missing and a corrupt one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpo_exp.report import build_report, load_sweep, main

OBJ = ["helpful", "harmless"]


def policy(wins: tuple[float, float], z: tuple[float, float] = (0.1, -0.1)) -> dict:
    return {
        "reward": dict(zip(OBJ, z, strict=True)),
        "reward_z": dict(zip(OBJ, z, strict=True)),
        "min_reward_z": min(z),
        "win_rate": dict(zip(OBJ, wins, strict=True)),
        "min_win_rate": min(wins),
        "kl": 1.0,
    }


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
    **extras,
) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    shared = {
        "pi_ref": policy((0.5, 0.5)),
        "pi_helpful": policy((0.8 - seed * 0.02, 0.2)),
        "pi_harmless": policy((0.3, 0.9)),
        "uniform_mix": policy((0.55, 0.6)),
    }
    cost = cost or {}
    base_cost = {
        "preferences": stage(1, 10),
        "dpo/helpful": stage(5, 100),
        "dpo/harmless": stage(5, 100),
        **cost,
    }
    results = {
        "method": method,
        "seed": seed,
        "beta": beta,
        "objectives": OBJ,
        "method_policies": list(extra_policies),
        "policies": {**shared, **extra_policies},
        "cost": base_cost,
        **extras,
    }
    (job / "results.json").write_text(json.dumps(results))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for seed in (0, 1):
        write_run(
            root,
            f"{seed}_mpo",
            "mpo",
            seed,
            {"mpo": policy((0.6 + seed * 0.02, 0.62))},
            cost={"mpo/sampling": stage(1, 5), "mpo/scoring": stage(1, 5), "mpo/bsmd": stage(0.1, 0)},
            bsmd={"objectives": OBJ, "step": [0, 10], "trajectory": [[0.5, 0.5], [0.4, 0.6]]},
        )
        write_run(
            root,
            f"{seed}_morlhf",
            "morlhf",
            seed,
            {"morlhf": policy((0.58, 0.57))},
            cost={"rm/helpful": stage(10, 200), "rm/harmless": stage(10, 200), "rl/morlhf": stage(60, 900)},
        )
    write_run(root, "2_loo", "mpo", 0, {"mpo_without_harmless": policy((0.7, 0.3), z=(0.4, -0.5))})
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
    # MPO has the best mean minimum (61%) and is bold; mean ± std over the two seeds
    assert "| 0.1 | MPO | 61.0 ± 1.4 | 62.0 ± 0.0 | **61.0 ± 1.4** |" in table
    assert "| 0.1 | π_helpful | 79.0 ± 1.4 | 20.0 ± 0.0 | 20.0 ± 0.0 |" in table
    assert "Published numbers" in table  # --paper
    mpo_cost = next(r for r in rep["costs"] if r["policy"] == "mpo")
    morlhf_cost = next(r for r in rep["costs"] if r["policy"] == "morlhf")
    assert mpo_cost["total_flops"] == 10 + 200 + 10 and mpo_cost["post_flops"] == 10
    assert morlhf_cost["total_flops"] == 10 + 400 + 900
    assert morlhf_cost["total_flops_vs_mpo"] == pytest.approx(1310 / 220)
    assert "MPO w/o π_harmless" in rep["ablation"]
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
    assert "4_corrupt" in (sweep / "report.md").read_text()
    assert "\\textbf{61.0$\\pm$1.4}" in (sweep / "table1.tex").read_text()
    assert (sweep / "table1.csv").read_text().splitlines()[0].startswith("beta,policy,helpful_mean")


def test_cli_prints_the_tables(sweep, capsys):
    main([str(sweep), "--no-plots"])
    out = capsys.readouterr().out
    assert "MPO" in out and "skipped" in out and "4_corrupt" in out


def test_empty_sweep_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no readable results.json"):
        build_report(tmp_path)


def test_pareto_plot_only_for_weight_sweeps(tmp_path):
    root = tmp_path / "pareto"
    write_run(root, "mpo", "mpo", 0, {"mpo": policy((0.6, 0.6))})
    write_run(root, "uniform_morlhf", "morlhf", 0, {"morlhf": policy((0.5, 0.6))})
    build_report(root)
    assert not (root / "pareto.png").exists()  # uniform MORLHF alone is not a front
    for i, w in enumerate([(1, 0), (0.5, 0.5), (0, 1)]):
        name = f"fixed_mix_{w[0]:.2f}_{w[1]:.2f}"
        write_run(root, f"fm{i}", "fixed_mix", 0, {name: policy((0.3 + 0.4 * w[0], 0.3 + 0.4 * w[1]))})
    build_report(root)
    assert (root / "pareto.png").stat().st_size > 0
