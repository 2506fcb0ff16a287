"""PNG plots: per-objective bars, λ trajectories, min win rate vs cost, Pareto fronts of fixed weights."""

from __future__ import annotations

import math
from pathlib import Path

from mpo_exp.report.fronts import Front, Reference
from mpo_exp.report.load import weights_text


def _v(row: dict, key: str) -> tuple[float, float]:
    return row[key] if row.get(key) is not None else (math.nan, math.nan)


def make_plots(
    objectives: list[str], runs: list[dict], rows: list[dict], costs: list[dict], out: Path, suffix: str = ""
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for beta in sorted({r["beta"] for r in rows}):
        sel = [r for r in rows if r["beta"] == beta and r["policy"] != "pi_ref"]
        if not sel:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(sel)), 4))
        width = 0.8 / len(objectives)
        for j, o in enumerate(objectives):
            xs = [i + j * width for i in range(len(sel))]
            ax.bar(
                xs,
                [_v(r, o)[0] * 100 for r in sel],
                width,
                yerr=[_v(r, o)[1] * 100 for r in sel],
                label=o,
                capsize=2,
            )
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set_xticks([i + width * (len(objectives) - 1) / 2 for i in range(len(sel))])
        ax.set_xticklabels([r["label"] for r in sel], rotation=30, ha="right")
        ax.set_ylabel("win rate vs π_ref (%)")
        ax.set_title(f"Per-objective win rate, β={beta:g}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        written.append(_save(fig, out / f"bars_beta{beta:g}{suffix}.png"))

    mpo_runs = [r for r in runs if isinstance(r.get("bsmd"), dict) and r["bsmd"].get("trajectory")]
    if mpo_runs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for res in mpo_runs:
            traj, names = res["bsmd"]["trajectory"], res["bsmd"]["objectives"]
            for k, name in enumerate(names):
                series = [t[k] for t in traj]
                running = [sum(series[: i + 1]) / (i + 1) for i in range(len(series))]
                color = f"C{objectives.index(name) if name in objectives else k}"
                ax.plot(res["bsmd"]["step"], series, color=color, alpha=0.25)
                ax.plot(res["bsmd"]["step"], running, color=color, label=name if res is mpo_runs[0] else None)
        ax.set_xlabel("BSMD step")
        ax.set_ylabel("λ")
        ax.set_title("MPO λ over mirror-descent steps (faint: iterates; solid: running average)")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / f"lambda_trajectory{suffix}.png"))

    costs = [r for r in costs if math.isfinite(r["total_flops"])]
    if costs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        methods = list(dict.fromkeys(r["label"] for r in costs))
        betas = sorted({r["beta"] for r in costs})
        for r in costs:
            ax.scatter(
                r["total_flops"],
                r["min_win_rate"] * 100,
                s=60,
                color=f"C{methods.index(r['label']) % 10}",
                marker="osD^v"[betas.index(r["beta"]) % 5],
            )
        for m in methods:
            ax.scatter([], [], color=f"C{methods.index(m) % 10}", label=m)
        for b in betas:
            ax.scatter([], [], color="grey", marker="osD^v"[betas.index(b) % 5], label=f"β={b:g}")
        flops = [r["total_flops"] for r in costs]
        if min(flops) > 0 and max(flops) > 10 * min(flops):
            ax.set_xscale("log")
        else:
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.set_xlabel("total FLOPs beyond π_ref")
        ax.set_ylabel("min win rate vs π_ref (%)")
        ax.set_title("Balance vs cost")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        written.append(_save(fig, out / f"min_win_vs_cost{suffix}.png"))

    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def front_plots(
    objectives: list[str], fronts: list[Front], refs: dict[float, Reference], out: Path, suffix: str = ""
) -> list[Path]:
    """Per β, every method's front in mean reward (the paper's Figure 3): one line per method, its
    points in weight order and labelled by w; π_ref and MPO as markers. Flagged points are not drawn
    and are named under the plot. No figure when no front has two points to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pairs = [(i, j) for i in range(len(objectives)) for j in range(i + 1, len(objectives))]
    for beta, ref in refs.items():
        at_beta = [f for f in fronts if f.beta == beta]
        if len(objectives) < 2 or not any(sum(p.ok for p in f.points) >= 2 for f in at_beta):
            continue
        fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 5), squeeze=False)
        for ax, (i, j) in zip(axes[0], pairs, strict=True):
            for n, f in enumerate(at_beta):
                pts = [p for p in f.points if p.ok]
                label = f.label + (f" (front: {f.cost.flops[0]:.3g} FLOPs)" if f.cost else "")
                xs, ys = [p.xy[i] for p in pts], [p.xy[j] for p in pts]
                # a line through the points is the front only with two objectives
                ax.plot(xs, ys, marker="osD^v<>"[n % 7], ls="-" if len(objectives) == 2 else "", label=label)
                if len(objectives) == 2:  # coinciding points share one label
                    at: dict[tuple[float, float], list[str]] = {}
                    for p in pts:
                        at.setdefault((p.xy[i], p.xy[j]), []).append(weights_text(p.weights))
                    for xy, texts in at.items():
                        ax.annotate(
                            " = ".join(texts),
                            xy,
                            fontsize=7,
                            alpha=0.8,
                            xytext=(4, 4),
                            textcoords="offset points",
                        )
            for point, style in (
                (ref.pi_ref, {"marker": "X", "color": "grey", "s": 80, "label": "π_ref"}),
                (ref.mpo, {"marker": "*", "color": "red", "s": 220, "label": "MPO (λ)"}),
            ):
                if point is not None and point.ok:
                    ax.scatter(point.xy[i], point.xy[j], zorder=3, **style)
            ax.set_xlabel(f"mean reward: {objectives[i]}")
            ax.set_ylabel(f"mean reward: {objectives[j]}")
        axes[0][0].legend(fontsize=8)
        bad = [f"{f.label} w={weights_text(p.weights)}" for f in at_beta for p in f.bad]
        if bad:
            fig.text(
                0.01, 0.01, "not plotted (NaN or missing value): " + ", ".join(bad), fontsize=8, color="red"
            )
        fig.suptitle(f"Pareto fronts for fixed user weights, β={beta:g}")
        fig.tight_layout(rect=(0, 0.04 if bad else 0, 1, 1))
        written.append(_save(fig, out / f"pareto_beta{beta:g}{suffix}.png"))
    return written
