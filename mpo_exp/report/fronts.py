"""Fixed user weights (the MORLHF setting, the paper's Lemma 3.9): each method's Pareto front.

A policy is a point of a front when its name is ``<method>_<w_1>_..._<w_K>`` (how fixed_mix = MOD,
morlhf, modpo and ric name the policy for fixed weights w); its weights are the job's recorded ones
(``results["lambda"]``, full precision; the name's 2 decimals only for files without them). A front
is one method's points at one β and one setting (the job's config but its weights and seed: an
MORLHF grid trained with RLOO and one with PPO are two fronts, labelled by the fields that differ);
a point's value per objective is its mean reward (mean ± std over seeds) and its win rate vs π_ref
(with the prompt bootstrap of Table 1).

Cost of the whole front: per seed, the sum over the method's jobs of the stages behind each point
(``policy_costs[name]["total"]``), where a stage shared by several jobs counts once, then the mean
over seeds. Two jobs share a stage when it has the same artifact key (``artifacts``, for stages
named like their artifact: ``dpo/helpful``, ``rm/humorous``, ``rl/morlhf_0.50_0.50``) or, for the
other stages of a cached artifact (``dpo/ref_logp`` of the pairs, ``rm/ref_samples`` of the
normaliser), the same recorded measurement: a reused stage carries its builder's wall time, tokens
and FLOPs verbatim, and two stages that were really run never agree on wall time to the last bit.

Hypervolume: the area (volume for K > 2) the front's points dominate above one reference point per
β: π_ref's mean reward, or, without π_ref, the minimum over every front's points at that β. Points
with a NaN or missing value are flagged and left out of the hypervolume and the figure.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from mpo_exp.report.cells import Cell
from mpo_exp.report.cost import COST_KEYS
from mpo_exp.report.load import (
    WEIGHTED,
    ReportError,
    Setting,
    is_ok,
    mean_std,
    metric,
    parse_weights,
    pi_ref_fingerprint,
    recorded_weights,
    row_setting,
    setting_text,
)
from mpo_exp.report.stats import PromptBootstrap, interval, outcome_matrix

Seeded = dict[int, tuple[dict, dict]]  # seed -> (policy metrics, the run's results)


@dataclass
class Point:
    weights: tuple[float, ...]
    name: str
    by_seed: Seeded
    reward: list[Cell] = field(default_factory=list)  # per objective, mean ± std over seeds
    win: list[Cell] = field(default_factory=list)
    win_ci: list[tuple[float, float] | None] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(is_ok(v) for v in self.reward)

    @property
    def xy(self) -> tuple[float, ...]:
        return tuple(v[0] for v in self.reward)


@dataclass
class FrontCost:
    flops: tuple[float, float]  # mean ± std over seeds, shared stages once
    wall_s: tuple[float, float]
    naive_flops: float  # the sum of the points' own totals (shared stages every time), mean over seeds
    jobs: int  # jobs per seed (most)
    shared: int  # stage entries counted once although several jobs list them (per seed, most)


@dataclass
class Front:
    beta: float
    method: str
    points: list[Point]
    cost: FrontCost | None = None
    cost_note: str | None = None
    hypervolume: float | None = None
    missing: list[tuple[float, ...]] = field(default_factory=list)  # weights other fronts of β have
    setting: Setting = None
    detail: str = ""  # the fields in which its setting differs from another front of its method and β

    @property
    def label(self) -> str:
        name = WEIGHTED.get(self.method, self.method)
        return f"{name} [{self.detail}]" if self.detail else name

    @property
    def bad(self) -> list[Point]:
        return [p for p in self.points if not p.ok]


@dataclass
class Reference:
    """π_ref's and MPO's points at one β, and the corner the hypervolumes are measured from."""

    beta: float
    pi_ref: Point | None
    mpo: Point | None
    corner: tuple[float, ...] | None = None
    corner_from: str = ""


def summarise(point: Point, objectives: list[str], boot: PromptBootstrap) -> Point:
    ms = [m for m, _ in point.by_seed.values()]
    point.reward = [mean_std([metric(m, "reward", o) for m in ms]) for o in objectives]
    point.win = [mean_std([metric(m, "win_rate", o) for m in ms]) for o in objectives]
    outcomes = {s: outcome_matrix(m, objectives) for s, (m, _) in point.by_seed.items()}
    fps = {s: pi_ref_fingerprint(res) for s, (_, res) in point.by_seed.items()}
    point.win_ci = [None] * len(objectives)
    if all(w is not None for w in outcomes.values()) and all(is_ok(v) for v in point.win):
        draws = boot.rate_draws(outcomes, fps)
        point.win_ci = [interval(draws[:, k]) for k in range(len(objectives))]
    return point


def stage_identity(res: dict, stage: str) -> tuple:
    """What makes two jobs' stage the same piece of work (see the module docstring)."""
    key = (res.get("artifacts") or {}).get(stage)
    if key is not None:
        return ("artifact", stage, key)
    c = res["cost"][stage]
    return ("measured", stage, *(c.get(k) for k in COST_KEYS))


def front_cost(points: list[Point]) -> tuple[FrontCost | None, str | None]:
    """Per seed, the stages behind every point, each shared stage once; mean over seeds."""
    per_seed: dict[int, list[tuple[dict, str]]] = defaultdict(list)
    for p in points:
        for seed, (_, res) in p.by_seed.items():
            per_seed[seed].append((res, p.name))
    flops, wall, plain, jobs, shared = [], [], [], [], []
    for items in per_seed.values():
        seen: dict[tuple, dict] = {}
        listed = 0
        naive = 0.0
        for res, name in items:
            stages = (res.get("policy_costs") or {}).get(name, {}).get("total")
            if not isinstance(stages, list):
                return None, f"`{res['_rel']}` has no policy_costs for {name}: no front cost"
            for s in stages:
                if s not in res["cost"]:
                    raise ReportError(
                        f"{res['_dir']}: results.json policy_costs[{name!r}] names stage {s!r}, "
                        f"which its cost section does not have"
                    )
                seen.setdefault(stage_identity(res, s), res["cost"][s])
                naive += float(res["cost"][s].get("flops", 0))
            listed += len(stages)
        flops.append(math.fsum(float(c.get("flops", 0)) for c in seen.values()))
        wall.append(math.fsum(float(c.get("wall_s", 0)) for c in seen.values()))
        plain.append(naive)
        jobs.append(len({id(res) for res, _ in items}))
        shared.append(listed - len(seen))
    return (
        FrontCost(
            mean_std(flops),
            mean_std(wall),
            math.fsum(plain) / len(plain),
            max(jobs),
            max(shared),
        ),
        None,
    )


def hypervolume(points: list[tuple[float, ...]], corner: tuple[float, ...]) -> float:
    """Volume dominated by ``points`` (maximisation) above ``corner``, by slicing the last objective."""
    pts = [p for p in points if all(x > c for x, c in zip(p, corner, strict=True))]
    if not pts:
        return 0.0
    if len(corner) == 1:
        return max(p[0] for p in pts) - corner[0]
    levels = sorted({p[-1] for p in pts}, reverse=True)
    total = 0.0
    for i, z in enumerate(levels):
        below = levels[i + 1] if i + 1 < len(levels) else corner[-1]
        above = [p[:-1] for p in pts if p[-1] >= z]
        total += (z - below) * hypervolume(above, corner[:-1])
    return total


def _shared_point(runs: list[dict], beta: float, name: str, own: bool) -> Point | None:
    by_seed: Seeded = {}
    for res in runs:
        if float(res["beta"]) == beta and name in res["policies"]:
            if own and name not in res["method_policies"]:
                continue
            by_seed.setdefault(int(res["seed"]), (res["policies"][name], res))
    return Point((), name, by_seed) if by_seed else None


def front_setting(res: dict, name: str) -> Setting:
    """A point's setting less its weights: the points of one front differ in ``method.weights`` only."""
    setting = row_setting(res, name, own=True)
    return None if setting is None else tuple(kv for kv in setting if kv[0] != "method.weights")


def collect_fronts(
    objectives: list[str], runs: list[dict], boot: PromptBootstrap
) -> tuple[list[Front], dict[float, Reference]]:
    """Every method's front per β (points ordered from the first objective's vertex to the last's)."""
    k = len(objectives)
    acc: dict[tuple[float, str, Setting], dict[tuple[float, ...], Point]] = defaultdict(dict)
    for res in runs:
        seed, beta = int(res["seed"]), float(res["beta"])
        for name in res["method_policies"]:
            parsed = parse_weights(name)
            metrics = res["policies"].get(name)
            if parsed is None or len(parsed[1]) != k or not isinstance(metrics, dict):
                continue
            weights = recorded_weights(res, name) or parsed[1]
            point = acc[(beta, parsed[0], front_setting(res, name))].setdefault(
                tuple(round(w, 12) for w in weights), Point(weights, name, {})
            )
            point.by_seed.setdefault(seed, (metrics, res))  # a duplicate: Table 1's note names it
    fronts = []
    for (beta, method, setting), by_w in sorted(acc.items(), key=lambda kv: (*kv[0][:2], str(kv[0][2]))):
        points = [summarise(by_w[w], objectives, boot) for w in sorted(by_w, reverse=True)]
        fronts.append(Front(beta, method, points, setting=setting))
    for f in fronts:
        others = {g.setting for g in fronts if (g.beta, g.method) == (f.beta, f.method)} - {f.setting}
        if others:
            f.detail = setting_text(f.setting, others)
    refs = {}
    for beta in sorted({f.beta for f in fronts}):
        at_beta = [f for f in fronts if f.beta == beta]
        grid = {p.weights for f in at_beta for p in f.points}
        for f in at_beta:
            f.missing = sorted(grid - {p.weights for p in f.points}, reverse=True)
            f.cost, f.cost_note = front_cost(f.points)
        pi_ref = _shared_point(runs, beta, "pi_ref", own=False)
        # MPO's own job, else MOD with MPO's lambda (the same policy; see load.row_name)
        mpo = _shared_point(runs, beta, "mpo", own=True) or _shared_point(
            runs, beta, "fixed_mix_mpo_lambda", own=True
        )
        ref = Reference(beta, *(summarise(p, objectives, boot) if p else None for p in (pi_ref, mpo)))
        if ref.pi_ref is not None and ref.pi_ref.ok:
            ref.corner, ref.corner_from = ref.pi_ref.xy, "π_ref's mean reward"
        else:
            pts = [p.xy for f in at_beta for p in f.points if p.ok]
            if pts:
                ref.corner = tuple(min(c) for c in zip(*pts, strict=True))
                ref.corner_from = "the minimum over all fronts' points (no π_ref)"
        if ref.corner is not None:
            for f in at_beta:
                f.hypervolume = hypervolume([p.xy for p in f.points if p.ok], ref.corner)
        refs[beta] = ref
    return fronts, refs
