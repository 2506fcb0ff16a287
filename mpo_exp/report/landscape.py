"""The lambda landscape figure and table (from ``results.json["landscape"]`` of ``method=landscape``).

K = 2: the judge's win rate per objective and the decoded KL to each pi_k against lambda_1, with a
vertical line at every MPO variant's lambda. K = 3: two triangle heat-maps over the simplex (the
worst-objective win rate; max_k KL, MPO's own objective for the decoded policy), with the variants
marked.
"""

from __future__ import annotations

import math
from pathlib import Path

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _xy(lam: list[float]) -> tuple[float, float]:
    """Barycentric (l1, l2, l3) -> the plane: vertex 1 at (0, 0), 2 at (1, 0), 3 at (1/2, sqrt(3)/2)."""
    return lam[1] + 0.5 * lam[2], math.sqrt(3) / 2 * lam[2]


def plot_landscape(landscape: dict, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = landscape["objectives"]
    points = landscape["points"]
    options = landscape.get("options", {})
    path = Path(path)
    if len(names) == 2:
        fig, ax = plt.subplots(figsize=(9.5, 4.2))
        pts = sorted(points, key=lambda p: p["lambda"][0])
        x = [p["lambda"][0] for p in pts]
        for k, n in enumerate(names):
            ax.plot(x, [p["win_rate"][k] for p in pts], "-o", ms=3, label=f"win rate: {n}")
        ax.plot(x, [p["min_win"] for p in pts], "k-", lw=2, label="min win rate")
        ax.set_xlabel(f"λ_{names[0]}  (λ_{names[1]} = 1 − λ_{names[0]})")
        ax.set_ylabel("win rate vs π_ref")
        ax2 = ax.twinx()
        for k, n in enumerate(names):
            ax2.plot(x, [p["kl"][k] for p in pts], "--", label=f"KL(π‖π_{n})")
        ax2.set_ylabel("decoded KL (nats)")
        styles = [":", "-.", (0, (1, 3)), (0, (5, 2)), (0, (3, 1, 1, 1)), (0, (8, 3))]
        for i, (label, o) in enumerate(options.items()):
            ax.axvline(
                o["lambda"][0],
                color=f"C{(i + 3) % 10}",
                ls=styles[i % len(styles)],
                lw=1.6,
                label=f"λ: {label}",
            )
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center left", bbox_to_anchor=(1.12, 0.5))
        ax.set_title(title)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
        xy = [_xy(p["lambda"]) for p in points]
        for ax, key, cmap, label in [
            (axes[0], "min_win", "viridis", "worst-objective win rate"),
            (axes[1], "max_kl", "magma_r", "max_k KL(π^tok_λ ‖ π_k) (nats)"),
        ]:
            sc = ax.tricontourf(
                [p[0] for p in xy], [p[1] for p in xy], [p[key] for p in points], 14, cmap=cmap
            )
            ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=4, c="k", alpha=0.3)
            fig.colorbar(sc, ax=ax, label=label, shrink=0.85)
            best = (max if key == "min_win" else min)(points, key=lambda p: p[key])
            bx, by = _xy(best["lambda"])
            ax.scatter([bx], [by], s=160, facecolors="none", edgecolors="k", linewidths=2, label="grid best")
            for i, (name, o) in enumerate(options.items()):
                ox, oy = _xy(o["lambda"])
                ax.scatter([ox], [oy], marker=MARKERS[i % len(MARKERS)], s=45, edgecolors="w", label=name)
            for k, (vx, vy) in enumerate([(0, 0), (1, 0), (0.5, math.sqrt(3) / 2)]):
                ax.annotate(names[k], (vx, vy), ha="center", va="top" if vy == 0 else "bottom", fontsize=8)
            ax.set_aspect("equal")
            ax.axis("off")
        handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels))
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1) if len(names) == 3 else (0, 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def landscape_markdown(landscape: dict) -> str:
    """One run's landscape as a table: the grid's best points and every marked variant."""
    names = landscape["objectives"]
    points = landscape["points"]
    best_kl = min(points, key=lambda p: p["max_kl"])
    best_win = max(points, key=lambda p: p["min_win"])

    def fmt(lam):
        return ", ".join(f"{x:.3f}" for x in lam)

    def row(label: str, p: dict) -> str:
        kls = " / ".join(f"{x:.2f}" for x in p["kl"])
        return f"| {label} | {fmt(p['lambda'])} | {p['min_win']:.3f} | {p['max_kl']:.2f} | {kls} |"

    lines = [
        f"| point | λ ({', '.join(names)}) | min win | max KL | KL to each π_k |",
        "|---|---|---|---|---|",
        row("grid: smallest max-KL", best_kl),
        row("grid: best min win", best_win),
    ]
    lines += [row(f"{label} (`{o['policy']}`)", o) for label, o in landscape.get("options", {}).items()]
    return "\n".join(lines) + "\n"
