"""PNG plots: per-objective bars, λ trajectories, min win rate vs cost, Pareto fronts of weight sweeps."""

from __future__ import annotations

import math
from pathlib import Path


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

    sweep_rows = [
        (res, name)
        for res in runs
        for name in res["method_policies"]
        if name.startswith(("fixed_mix_", "morlhf_"))  # weight-sweep rows, not uniform MORLHF
    ]
    if len(sweep_rows) > 2 and len(objectives) >= 2:
        pairs = [(a, b) for i, a in enumerate(objectives) for b in objectives[i + 1 :]]
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
        for ax, (a, b) in zip(axes[0], pairs, strict=True):
            for family, marker in (("fixed_mix", "o"), ("morlhf", "s")):
                pts = [_point(res["policies"][n], a, b) for res, n in sweep_rows if n.startswith(family)]
                if pts:
                    ax.scatter(
                        *zip(*pts, strict=True),
                        marker=marker,
                        alpha=0.7,
                        label="fixed-weight mixing" if family == "fixed_mix" else "MORLHF",
                    )
            mpo = [_point(res["policies"]["mpo"], a, b) for res in runs if "mpo" in res["policies"]]
            if mpo:
                ax.scatter(*zip(*mpo, strict=True), marker="*", s=200, color="red", label="MPO")
            ax.set_xlabel(f"win rate {a}")
            ax.set_ylabel(f"win rate {b}")
        axes[0][0].legend()
        fig.suptitle("Pareto fronts of weight sweeps")
        fig.tight_layout()
        written.append(_save(fig, out / f"pareto{suffix}.png"))
    return written


def _point(metrics: dict, a: str, b: str) -> tuple[float, float]:
    wr = metrics.get("win_rate") or {}
    return (wr.get(a, math.nan), wr.get(b, math.nan))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
