"""Cost-to-quality curves: worst-objective win rate against the FLOPs (and wall seconds) a policy cost.

A method that trains by RL or per weight vector is a curve: the policies saved along its training
(``<label>@it<n>`` from ``rl.checkpoints``, ``<label>@step<n>`` from MODPO's and RiC's
``method.checkpoints``) and its final policy, each charged its cost up to then (``cost_summary``).
Every other policy is a point. Values are means over the seeds of one β that hold the policy;
the x-axis is the policy's total cost (shared stages included: MPO pays for its π_k).

From the curves: the FLOPs a method needed to reach MPO's worst-objective win rate (the first
point at or above it), or "not reached" within its budget -- the paper's cost claim, on one meter.
A point estimate can "reach" MPO by noise alone, so each curve also gets the paired bootstrap
difference from MPO (same seeds, same resampled prompts: :mod:`mpo_exp.report.stats`) at that
point, and a verdict over all its points, family-wise: above MPO beyond noise (from which FLOPs),
below it beyond noise at every point, or within noise.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mpo_exp.report.stats import LEVEL, PromptBootstrap, family_level, interval, outcome_matrix

#: a policy saved along training: ``morlhf@it8`` (RL iterations), ``modpo@step12`` (optimiser steps)
CHECKPOINT = re.compile(r"^(?P<label>.+)@(?:it|step)(?P<it>\d+)$")
#: the MPO row the curves are compared with: the run's default (decoded) MPO, else the paper's
MPO_NAMES = ("mpo_decoded", "mpo")


def _family(name: str) -> tuple[str, int | None]:
    """(curve label, iteration) of a checkpoint; (name, None) for any other policy."""
    m = CHECKPOINT.match(name)
    return (m["label"], int(m["it"])) if m else (name, None)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def collect_curves(
    runs: Iterable[dict], boot: PromptBootstrap | None = None
) -> dict[float, dict[str, list[dict]]]:
    """Per β, per policy family: its points in order of cost (mean over seeds).

    A point: ``iteration`` (None for a final or a non-RL policy), ``flops``, ``wall_s``,
    ``min_win``, the number of seeds ``n`` and the ``seeds`` (runs are read in job order; a policy
    that several jobs of one seed evaluate, such as π_ref, is taken from the first). With ``boot``,
    ``draws`` holds the bootstrap draws of its min win (None without per-prompt outcomes). A family
    with checkpoints is a curve (its final policy last); the others are single points.
    """
    acc: dict[float, dict[tuple[str, int | None], dict[str, list]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    seen: set[tuple[float, str, object]] = set()
    for res in runs:
        beta = float(res.get("beta", math.nan))
        for name, pol in res.get("policies", {}).items():
            cost = res.get("cost_summary", {}).get(name, {}).get("total")
            if cost is None or (beta, name, res.get("seed")) in seen:
                continue  # a shared row (pi_ref, the pi_k) counts once per seed, from its first job
            seen.add((beta, name, res.get("seed")))
            family, it = _family(name)
            cell = acc[beta][(family, it)]
            cell["flops"].append(float(cost["flops"]))
            cell["wall_s"].append(float(cost["wall_s"]))
            cell["min_win"].append(float(pol["min_win_rate"]))
            cell["seed"].append(res.get("seed"))
            cell["outcomes"].append(outcome_matrix(pol, list(res.get("objectives", []))))
            cell["fingerprint"].append(res.get("pi_ref_fingerprint"))
    out: dict[float, dict[str, list[dict]]] = {}
    for beta, cells in acc.items():
        fams: dict[str, list[dict]] = defaultdict(list)
        for (family, it), v in cells.items():
            point = {k: _mean(v[k]) for k in ("flops", "wall_s", "min_win")}
            point |= {"n": len(v["min_win"]), "seeds": tuple(sorted(v["seed"], key=str))}
            if boot is not None:
                point["draws"] = _draws(boot, v)
            fams[family].append({"iteration": it, **point})
        for points in fams.values():  # the final policy has no iteration number: it comes last
            points.sort(key=lambda p: math.inf if p["iteration"] is None else p["iteration"])
        out[beta] = dict(fams)
    return out


def _draws(boot: PromptBootstrap, cell: dict[str, list]) -> np.ndarray | None:
    """Bootstrap draws of a point's min win over its seeds; None when a seed lacks per-prompt outcomes."""
    if any(w is None for w in cell["outcomes"]) or None in cell["seed"]:
        return None
    outcomes = {int(s): w for s, w in zip(cell["seed"], cell["outcomes"], strict=True)}
    fps = {int(s): fp for s, fp in zip(cell["seed"], cell["fingerprint"], strict=True)}
    return boot.min_draws(outcomes, fps)


def _delta(point: dict, mpo: dict, level: float = LEVEL) -> tuple[float, float, float] | None:
    """Paired bootstrap difference (point − MPO) in min win: (mean, lo, hi); None when not paired."""
    a, b = point.get("draws"), mpo.get("draws")
    if a is None or b is None or point["seeds"] != mpo["seeds"]:
        return None
    lo, hi = interval(a - b, level)
    return point["min_win"] - mpo["min_win"], lo, hi


def _verdict(points: list[dict], mpo: dict) -> str:
    """Whether a curve is above or below MPO beyond noise, judged on all its points at once: each
    point's interval at level 1 − 0.05/m for m points (Bonferroni), so that a curve of six points
    is not six chances to pass by noise."""
    deltas = [_delta(p, mpo, family_level(len(points))) for p in points]
    if any(d is None for d in deltas):
        return "no interval (per-prompt outcomes missing or seeds differ)"
    above = next((p for p, d in zip(points, deltas, strict=True) if d[1] > 0), None)
    if above is not None:
        ratio = above["flops"] / mpo["flops"]
        return f"above MPO beyond noise from {above['flops']:.3g} FLOPs ({ratio:.1f}×)"
    if all(d[2] < 0 for d in deltas):
        return "below MPO beyond noise at every point"
    if any(d[2] < 0 for d in deltas):
        return "below MPO beyond noise at some points, never above"
    return "within noise of MPO at every point"


def _mpo(curves: dict[str, list[dict]]) -> tuple[str, dict] | None:
    """The MPO point the curves are compared with (:data:`MPO_NAMES`, first found)."""
    name = next((n for n in MPO_NAMES if n in curves), None)
    return None if name is None else (name, curves[name][0])


def is_curve(points: list[dict]) -> bool:
    return any(p["iteration"] is not None for p in points)


def reach_mpo(curves: dict[str, list[dict]]) -> list[dict]:
    """For each curve: FLOPs and wall seconds of its first point at or above MPO's mean min win, the
    paired difference from MPO there (``delta``: mean, lo, hi; None without draws), and a verdict
    on all its points (:func:`_verdict`)."""
    found = _mpo(curves)
    if found is None:
        return []
    mpo = found[1]
    rows = []
    for family, points in sorted(curves.items()):
        if not is_curve(points):
            continue
        hit = next((p for p in points if p["min_win"] >= mpo["min_win"]), None)
        rows.append(
            {
                "method": family,
                "target": mpo["min_win"],
                "mpo_flops": mpo["flops"],
                "reached": hit is not None,
                "flops": None if hit is None else hit["flops"],
                "wall_s": None if hit is None else hit["wall_s"],
                "budget_flops": points[-1]["flops"],
                "best_min_win": max(p["min_win"] for p in points),
                "delta": None if hit is None else _delta(hit, mpo),
                "verdict": _verdict(points, mpo),
            }
        )
    return rows


def _delta_text(delta: tuple[float, float, float] | None) -> str:
    if delta is None:
        return "–"
    mean, lo, hi = (100 * x for x in delta)
    return f"{mean:+.1f} [{lo:+.1f}, {hi:+.1f}]"


def curves_markdown(curves_by_beta: dict[float, dict[str, list[dict]]]) -> str | None:
    """Per β: each curve's points, and how much it cost to reach MPO's worst-objective win rate."""
    parts = []
    for beta, curves in sorted(curves_by_beta.items()):
        if not any(is_curve(p) for p in curves.values()):
            continue
        lines = [
            f"β = {beta:g}: worst-objective win rate vs π_ref (%) against total FLOPs, mean over seeds",
            "",
            "| policy | iterations / steps | FLOPs | wall s | min win | seeds |",
            "|---|---|---|---|---|---|",
        ]
        for family, points in sorted(curves.items()):
            for p in points:
                it = "final" if p["iteration"] is None else str(p["iteration"])
                it = it if is_curve(points) else "–"
                lines.append(
                    f"| {family} | {it} | {p['flops']:.3g} | {p['wall_s']:.0f} | "
                    f"{100 * p['min_win']:.1f} | {p['n']} |"
                )
        reach = reach_mpo(curves)
        if reach:
            lines += [
                "",
                "| method | reaches MPO's min win? | FLOPs then | × MPO's FLOPs | Δ min win then [95% CI] "
                "| budget FLOPs | against MPO, all points |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in reach:
                target = f"{100 * r['target']:.1f}%"
                if r["reached"]:
                    head = (
                        f"| {r['method']} | yes ({target}) | {r['flops']:.3g} | "
                        f"{r['flops'] / r['mpo_flops']:.1f} | {_delta_text(r['delta'])} |"
                    )
                else:
                    head = (
                        f"| {r['method']} | not within its budget (best {100 * r['best_min_win']:.1f}% "
                        f"< {target}) | – | – | – |"
                    )
                lines.append(f"{head} {r['budget_flops']:.3g} | {r['verdict']} |")
            lines += [
                "",
                "Reaching MPO is judged on point estimates; Δ is the paired bootstrap difference from "
                "MPO at that point (same seeds, same resampled prompts; the point is chosen for being "
                "at or above MPO, so Δ leans high), and the last column judges all the curve's points "
                "together (95% family-wise: Bonferroni over its points).",
            ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) or None


def _mpo_band(curves: dict[str, list[dict]]) -> tuple[str, float, float] | None:
    """MPO's min-win interval in %, drawn as a band: a curve inside it is not apart from MPO by one
    point's noise (the paired verdict is in ``curves.md``)."""
    found = _mpo(curves)
    if found is None or found[1].get("draws") is None:
        return None
    lo, hi = interval(found[1]["draws"])
    return found[0], 100 * lo, 100 * hi


def curve_plots(
    curves_by_beta: dict[float, dict[str, list[dict]]], out: Path, suffix: str = ""
) -> list[Path]:
    """One PNG per β with a curve: min win rate against FLOPs and against wall seconds (log scales);
    policies without checkpoints as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for beta, curves in sorted(curves_by_beta.items()):
        if not any(is_curve(p) for p in curves.values()):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4), sharey=True)
        for ax, what, xlabel in (
            (axes[0], "flops", "total FLOPs (shared stages included)"),
            (axes[1], "wall_s", "total wall seconds (shared stages included)"),
        ):
            for family, points in sorted(curves.items()):
                xs, ys = [p[what] for p in points], [100 * p["min_win"] for p in points]
                if is_curve(points):
                    ax.plot(xs, ys, marker="o", label=family)
                elif all(x > 0 for x in xs):
                    marker = "*" if family in MPO_NAMES else "s"
                    ax.scatter(xs, ys, marker=marker, s=70, label=family, zorder=3)
            band = _mpo_band(curves)
            if band is not None:
                name, lo, hi = band
                ax.axhspan(lo, hi, color="tab:red", alpha=0.08, lw=0, label=f"{name}: 95% interval")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.axhline(50, color="grey", lw=0.6, ls=":")
        axes[0].set_ylabel("worst-objective win rate vs π_ref (%)")
        fig.suptitle(f"Cost to quality, β = {beta:g}")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        path = out / f"cost_to_quality_beta{beta:g}{suffix}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
