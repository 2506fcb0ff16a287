"""The fixed-weight table: per method and weight vector the per-objective rewards and win rates, and
per front its hypervolume and the cost of producing the whole front."""

from __future__ import annotations

import csv
import io

from mpo_exp.report.cells import DAGGER, FLAG_NOTE, Cell, cell, pair
from mpo_exp.report.fronts import Front, Point, Reference
from mpo_exp.report.load import weights_text


def caption(objectives: list[str]) -> str:
    return (
        f"Fixed user weights w = ({', '.join(objectives)}): each method's policy for each w. reward: "
        "mean reward per objective, mean ± std over seeds; win: win rate vs π_ref (%), mean ± std over "
        "seeds, [95% CI] a bootstrap over eval prompts (as in Table 1). π_ref and MPO (its own λ) are "
        "given for reference."
    )


def front_caption() -> str:
    return (
        "Whole fronts. Hypervolume: the area (volume for more than 2 objectives) the front's points "
        "dominate above the corner named below, in reward units (higher is better; only fronts of one β "
        f"share a corner). {DAGGER}: the front has points with a NaN or missing value (left out of the "
        "hypervolume and the figure) or lacks weights other methods have. Front cost: FLOPs and wall "
        "time beyond π_ref of every policy on the front, a stage that several jobs list (the same "
        "artifact key or the same cached measurement) counted once; mean ± std over seeds. Sum of the "
        "points' totals counts shared stages every time, as the per-policy cost table does."
    )


def _win(v: Cell, ci: tuple[float, float] | None) -> str:
    text = cell(v)
    return text + (f" [{ci[0] * 100:.1f}, {ci[1] * 100:.1f}]" if ci else "")


def _row(beta: float, label: str, w: str, p: Point) -> str:
    cells = [f"{beta:g}", label, w, *[cell(v, scale=1, digits=3) for v in p.reward]]
    cells += [_win(v, ci) for v, ci in zip(p.win, p.win_ci, strict=True)]
    return "| " + " | ".join([*cells, str(len(p.by_seed))]) + " |"


def flags(front: Front) -> list[str]:
    out = []
    if front.bad:
        out.append(
            "not plotted (NaN or missing value): " + ", ".join(weights_text(p.weights) for p in front.bad)
        )
    if front.missing:
        out.append("no policy for " + ", ".join(weights_text(w) for w in front.missing))
    if front.cost_note:
        out.append(front.cost_note)
    return out


def fronts_markdown(objectives: list[str], fronts: list[Front], refs: dict[float, Reference]) -> str:
    head = ["β", "method", "w", *[f"reward {o}" for o in objectives]]
    head += [f"win {o} [95% CI]" for o in objectives] + ["seeds"]
    lines = [caption(objectives), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for beta, ref in refs.items():
        if ref.pi_ref:
            lines.append(_row(beta, "π_ref", "—", ref.pi_ref))
        if ref.mpo:
            lines.append(_row(beta, "MPO", "λ", ref.mpo))
        for f in (f for f in fronts if f.beta == beta):
            lines += [_row(beta, f.label, weights_text(p.weights), p) for p in f.points]
    if any(not p.ok for f in fronts for p in f.points):
        lines += ["", FLAG_NOTE]
    head = ["β", "method", "points", "hypervolume", "front FLOPs", "front wall s", "jobs per seed"]
    head += ["sum of the points' totals (FLOPs)", "flags"]
    lines += ["", front_caption(), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in fronts:
        hv = "—" if f.hypervolume is None else f"{f.hypervolume:.4g}"
        if f.bad or f.missing:
            hv += DAGGER
        c = f.cost
        cost = ["—", "—", "—", "—"]
        if c:
            cost = [
                f"{c.flops[0]:.3g} ± {c.flops[1]:.2g}",
                f"{c.wall_s[0]:.1f} ± {c.wall_s[1]:.1f}",
                str(c.jobs),
                f"{c.naive_flops:.3g}",
            ]
        n_ok = sum(p.ok for p in f.points)
        cells = [f"{f.beta:g}", f.label, f"{n_ok} of {len(f.points)}", hv, *cost, "; ".join(flags(f)) or ""]
        lines.append("| " + " | ".join(cells) + " |")
    corners = [
        f"β={b:g}: {r.corner_from} {weights_text(tuple(round(x, 4) for x in r.corner))}"
        for b, r in refs.items()
        if r.corner is not None
    ]
    if corners:
        lines += ["", "Hypervolume corner: " + "; ".join(corners) + "."]
    return "\n".join(lines)


def fronts_csv(objectives: list[str], fronts: list[Front]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "beta",
            "method",
            "policy",
            *[f"w_{o}" for o in objectives],
            *[f"reward_{o}_{s}" for o in objectives for s in ("mean", "std")],
            *[f"win_{o}_{s}" for o in objectives for s in ("mean", "std", "ci_low", "ci_high")],
            "seeds",
            "ok",
            "hypervolume",
            "front_flops_mean",
            "front_wall_s_mean",
            "label",
        ]
    )
    for f in fronts:
        for p in f.points:
            wins = [x for v, ci in zip(p.win, p.win_ci, strict=True) for x in (*pair(v), *(ci or ("", "")))]
            w.writerow(
                [
                    f.beta,
                    f.method,
                    p.name,
                    *p.weights,
                    *[x for v in p.reward for x in pair(v)],
                    *wins,
                    len(p.by_seed),
                    int(p.ok),
                    "" if f.hypervolume is None else f.hypervolume,
                    f.cost.flops[0] if f.cost else "",
                    f.cost.wall_s[0] if f.cost else "",
                    f.label,
                ]
            )
    return buf.getvalue()
