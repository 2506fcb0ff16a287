"""Fixed user weights: hand-written sweeps of MOD, MORLHF, MODPO and RiC over a 2-objective weight grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mpo_exp.report import build_report, hypervolume, main
from tests.test_report import outcomes, policy

OBJ = ["helpful", "humorous"]
GRID = [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0)]


def metrics(
    reward: tuple[float, float], wins: tuple[float, float] = (0.5, 0.5), n: int | None = None
) -> dict:
    """A policy's metrics with the given mean rewards (also as z) and win rates over ``n`` prompts."""
    per_prompt = None
    if n:
        per_prompt = {
            o: outcomes(w, n, k + round(100 * w)) for k, (o, w) in enumerate(zip(OBJ, wins, strict=True))
        }
    return policy(wins, reward, objectives=OBJ, per_prompt=per_prompt)


def stage(flops: float, wall: float = 1.0, reused: bool = False) -> dict:
    return {"wall_s": wall, "flops": flops, "tokens_fwd": 10, "tokens_bwd": 5, "reused": reused}


def suffix(w: tuple[float, float]) -> str:
    return "_".join(f"{x:.2f}" for x in w)


def write_job(
    root: Path,
    job: str,
    method: str,
    seed: int,
    own: dict[str, dict],
    stages: dict[str, dict],
    totals: dict[str, list[str]],
    artifacts: dict[str, str],
) -> None:
    """One job: the shared rows (π_ref's reward is (0, 0): the hypervolume corner) and its own policies."""
    (root / job / ".hydra").mkdir(parents=True)
    shared = {
        "pi_ref": metrics((0.0, 0.0)),
        "pi_helpful": metrics((1.0, 0.0)),
        "pi_humorous": metrics((0.0, 1.0)),
    }
    results = {
        "method": method,
        "seed": seed,
        "beta": 0.1,
        "objectives": OBJ,
        "method_policies": list(own),
        "policies": {**shared, **own},
        "cost": stages,
        "policy_costs": {name: {"total": totals[name], "post_processing": []} for name in own},
        "artifacts": artifacts,
    }
    (root / job / "results.json").write_text(json.dumps(results))


# each seed builds its own pairs and pi_k (other keys); within a seed every job reuses them
def dpo_stages(seed: int) -> tuple[dict, dict]:
    stages = {
        "preferences": stage(10),
        "dpo/ref_logp": stage(4),
        "dpo/helpful": stage(100),
        "dpo/humorous": stage(100),
    }
    keys = {"preferences": f"p{seed}", "dpo/helpful": f"h{seed}", "dpo/humorous": f"u{seed}"}
    return stages, keys


MOD = {(1.0, 0.0): (1.0, 0.2), (0.5, 0.5): (0.7, 0.7), (0.0, 1.0): (0.2, 1.0)}
MORLHF = {(1.0, 0.0): (0.9, 0.1), (0.5, 0.5): (0.5, 0.5), (0.0, 1.0): (0.1, 0.8)}
MODPO = {(1.0, 0.0): (0.8, 0.3), (0.5, 0.5): (0.6, math.nan), (0.0, 1.0): (0.3, 0.8)}
RIC = {(1.0, 0.0): (0.6, 0.1), (0.0, 1.0): (0.1, 0.6)}  # no policy for (0.5, 0.5): a job died


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "pareto2"
    for seed, shift in ((0, 0.05), (1, -0.05)):  # MOD: two seeds around the values above
        stages, keys = dpo_stages(seed)
        for i, w in enumerate(GRID):
            name = f"fixed_mix_{suffix(w)}"
            used = [k for k, x in zip(("dpo/helpful", "dpo/humorous"), w, strict=True) if x > 0]
            reward = tuple(v + shift for v in MOD[w])
            write_job(
                root,
                f"mod_s{seed}_{i}",
                "fixed_mix",
                seed,
                {name: metrics(reward, (0.4 + 0.2 * w[0], 0.4 + 0.2 * w[1]), n=200)},
                stages,
                {name: ["preferences", "dpo/ref_logp", *used]},
                keys,
            )
    stages, keys = dpo_stages(0)
    rm = {
        "rm/helpful": stage(200),
        "rm/humorous": stage(200),
        "rm/ref_samples": stage(3),
        "rm/normalizer": stage(5),
    }
    rm_keys = {**keys, "rm/helpful": "rh", "rm/humorous": "ru", "rm/normalizer": "rn"}
    for i, w in enumerate(GRID):
        name = f"morlhf_{suffix(w)}"
        # the reward models are built by the first job and reused (same key, cost read back) by the others
        job_rm = {k: {**v, "reused": i > 0} for k, v in rm.items()}
        write_job(
            root,
            f"morlhf_{i}",
            "morlhf",
            0,
            {name: metrics(MORLHF[w])},
            {**stages, **job_rm, f"rl/{name}": stage(900)},
            {name: ["preferences", *rm, f"rl/{name}"]},
            {**rm_keys, f"rl/{name}": f"rl{i}"},
        )
        name = f"modpo_{suffix(w)}"
        # one MODPO training per weight: the same stage names, separate runs (different wall times)
        own = {"modpo/margins": stage(7, wall=1.0 + i), "modpo/train": stage(50, wall=2.0 + i)}
        write_job(
            root,
            f"modpo_{i}",
            "modpo",
            0,
            {name: metrics(MODPO[w])},
            {**stages, **own},
            {name: ["preferences", "dpo/ref_logp", *own]},
            {**keys, f"modpo/{name}": f"m{i}"},
        )
    for i, w in enumerate(RIC):
        name = f"ric_{suffix(w)}"
        write_job(
            root,
            f"ric_{i}",
            "ric",
            0,
            {name: metrics(RIC[w])},
            {**stages, "ric/sft": stage(300, reused=i > 0)},
            {name: ["ric/sft"]},
            {**keys, "ric/sft": "ric"},
        )
    write_job(root, "mpo", "mpo", 0, {"mpo": metrics((0.65, 0.65))}, stages, {"mpo": ["preferences"]}, keys)
    lam = {"modpo_mpo_lambda": metrics((0.55, 0.55), (0.6, 0.6))}
    write_job(root, "modpo_lambda", "modpo", 0, lam, stages, {"modpo_mpo_lambda": ["preferences"]}, keys)
    return root


def front(rep: dict, method: str):
    return next(f for f in rep["fronts"] if f.method == method)


def test_fixed_weight_table_rows_and_values(sweep):
    rep = build_report(sweep, plots=False)
    table = rep["fixed_weights"]
    assert [f.method for f in rep["fronts"]] == ["fixed_mix", "modpo", "morlhf", "ric"]
    mod = front(rep, "fixed_mix")
    assert [p.weights for p in mod.points] == GRID  # from the first objective's vertex to the last's
    # mean ± std over the two seeds (±0.05 around the value), and the prompt bootstrap for the win rate
    mid = mod.points[1]
    assert mid.reward[0] == pytest.approx((0.7, math.sqrt(0.005)))
    lo, hi = mid.win_ci[0]
    assert lo < 0.5 < hi and hi - lo < 0.25
    assert f"| 0.1 | MOD | (0.5, 0.5) | 0.700 ± 0.071 | 0.700 ± 0.071 | 50.0 ± 0.0 [{lo * 100:.1f}, " in table
    assert "| 0.1 | MORLHF | (1, 0) | 0.900 ± 0.000 | 0.100 ± 0.000 | 50.0 ± 0.0 | 50.0 ± 0.0 | 1 |" in table
    assert "| 0.1 | π_ref | — | 0.000 ± 0.000 | 0.000 ± 0.000 |" in table
    assert "| 0.1 | MPO | λ | 0.650 ± 0.000 |" in table
    assert (sweep / "fixed_weights.md").read_text().strip() == table.strip()
    csv_rows = (sweep / "fixed_weights.csv").read_text().splitlines()
    assert csv_rows[0].startswith("beta,method,policy,w_helpful,w_humorous,reward_helpful_mean")
    assert len(csv_rows) == 1 + 3 + 3 + 3 + 2


def test_front_cost_counts_shared_stages_once(sweep):
    rep = build_report(sweep, plots=False)
    # MOD: the pairs, pi_ref's log-probs and each pi_k once (per seed, then the mean over seeds)
    mod = front(rep, "fixed_mix").cost
    assert mod.flops == (10 + 4 + 100 + 100, 0.0) and mod.jobs == 3
    assert mod.naive_flops == 114 + 214 + 114
    # MORLHF: the pairs and the reward models once (same artifact keys, rm/ref_samples the same
    # cached measurement), one RL run per weight
    assert front(rep, "morlhf").cost.flops[0] == 10 + 200 + 200 + 3 + 5 + 3 * 900
    # MODPO: same stage names in every job but three separate trainings: counted three times
    assert front(rep, "modpo").cost.flops[0] == 10 + 4 + 3 * (7 + 50)
    # RiC: one SFT for all weights
    ric = front(rep, "ric").cost
    assert (ric.flops[0], ric.naive_flops, ric.shared) == (300, 600, 1)
    assert "| 0.1 | RiC | 2 of 2 |" in rep["fixed_weights"]


def test_hypervolume_by_hand(sweep):
    rep = build_report(sweep, plots=False)
    # from pi_ref's point (0, 0), slices from the top: 0.2·1.0 + 0.5·0.7 + 0.3·0.2
    assert front(rep, "fixed_mix").hypervolume == pytest.approx(0.61)
    assert front(rep, "morlhf").hypervolume == pytest.approx(0.1 * 0.8 + 0.4 * 0.5 + 0.4 * 0.1)
    assert "| 0.1 | MOD | 3 of 3 | 0.61 |" in rep["fixed_weights"]
    assert "π_ref's mean reward (0, 0)" in rep["fixed_weights"]
    assert hypervolume([(2, 1, 1), (1, 2, 1)], (0, 0, 0)) == pytest.approx(3)  # 2 + 2 - overlap 1
    assert hypervolume([(0.5, 0.5), (0.4, 0.4)], (0, 0)) == pytest.approx(
        0.25
    )  # a dominated point adds nothing
    assert hypervolume([(1.0, -1.0)], (0, 0)) == 0.0  # below the corner in one objective


def test_nan_and_missing_points_are_flagged_not_plotted(sweep, monkeypatch):
    from matplotlib.axes import Axes

    lines: dict[str, list] = {}
    draw = Axes.plot

    def record(ax, xs, ys, *args, **kwargs):
        lines[kwargs["label"].split(" (")[0]] = list(zip(xs, ys, strict=True))
        return draw(ax, xs, ys, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", record)
    rep = build_report(sweep, plots=True)
    table = rep["fixed_weights"]
    modpo = front(rep, "modpo")
    assert [p.weights for p in modpo.bad] == [(0.5, 0.5)]
    assert "| 0.1 | MODPO | (0.5, 0.5) | 0.600 ± 0.000 | NaN† |" in table
    # the hypervolume is over the two good points only, and daggered
    assert modpo.hypervolume == pytest.approx(0.3 * 0.8 + 0.5 * 0.3)
    assert "| 0.1 | MODPO | 2 of 3 | 0.39† |" in table
    assert "not plotted (NaN or missing value): (0.5, 0.5)" in table
    ric = next(line for line in table.splitlines() if line.startswith("| 0.1 | RiC | 2 of 2 |"))
    assert "†" in ric and "no policy for (0.5, 0.5)" in ric
    assert (sweep / "pareto_beta0.1.png").stat().st_size > 0
    assert lines["MODPO"] == [(0.8, 0.3), (0.3, 0.8)]  # drawn without the NaN point
    assert len(lines["MOD"]) == 3 and len(lines["RiC"]) == 2
    assert "pareto_beta0.1.png" in (sweep / "report.md").read_text()


def test_max_min_table_takes_uniform_and_lambda_rows_only(sweep, capsys):
    rep = build_report(sweep, plots=False)
    labels = [r["label"] for r in rep["rows"]]
    # the grid's uniform point is the method's uniform row; MPO's λ has its own row
    assert {"MOD (uniform w)", "MORLHF (uniform w)", "MODPO (uniform w)", "MODPO (MPO's λ)", "MPO"} <= set(
        labels
    )
    assert not [label for label in labels if "w=" in label]  # other fixed weights: the fronts' table
    assert "| 0.1 | MORLHF (uniform w) | 50.0 ± 0.0 | 50.0 ± 0.0 |" in rep["table1"]
    assert "| 0.1 | MODPO (MPO's λ) | 60.0 ± 0.0 | 60.0 ± 0.0 |" in rep["table1"]
    # the per-policy cost table keeps Table 1's rows; the uniform MORLHF row costs its own job's stages
    assert not [r for r in rep["costs"] if "w=" in r["label"]]
    morlhf = next(r for r in rep["costs"] if r["policy"] == "morlhf")
    assert morlhf["total_flops"] == 10 + 200 + 200 + 3 + 5 + 900
    main([str(sweep), "--no-plots"])
    assert "Whole fronts" in capsys.readouterr().out


def test_no_front_without_fixed_weights(tmp_path):
    root = tmp_path / "maxmin"
    stages, keys = dpo_stages(0)
    write_job(root, "mpo", "mpo", 0, {"mpo": metrics((0.6, 0.6))}, stages, {"mpo": ["preferences"]}, keys)
    rep = build_report(root)
    assert rep["fixed_weights"] is None and rep["fronts"] == []
    assert not (root / "fixed_weights.md").exists() and not list(root.glob("pareto*.png"))
