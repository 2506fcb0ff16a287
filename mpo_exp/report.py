"""``mpo-exp-report <sweep dir>``: rebuild the paper's tables and plots from a sweep's results.json files.

Writes into the sweep directory: Table 1 (win rate vs pi_ref per objective and the minimum,
mean ± std over seeds, one block per beta) as Markdown, LaTeX and CSV; the leave-one-out
ablation; the cost table (total and post-processing, ratio to MPO); and PNG plots (per-objective
bars, lambda trajectories, min win rate vs cost, Pareto fronts of weight sweeps). A missing or
corrupt results.json is named and skipped.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mpo_exp.report")

REQUIRED = ("objectives", "policies", "cost", "seed", "beta", "method", "method_policies")

# display order and names: single-objective policies first, MPO last (as in the paper)
ORDER = [
    "pi_ref",
    "pi_",
    "uniform_mix",
    "fixed_mix",
    "reward_soup",
    "weighted_reward_soup",
    "maxmin_rlhf",
    "morlhf",
    "mpo_without",
    "mpo",
]
PRETTY = {
    "pi_ref": "π_ref",
    "uniform_mix": "Uniform mixing",
    "reward_soup": "Reward Soups",
    "weighted_reward_soup": "Weighted RS",
    "maxmin_rlhf_group_min": "MaxMin-RLHF (group-min)",
    "maxmin_rlhf_sample_min": "MaxMin-RLHF (sample-min)",
    "maxmin_rlhf_group_min_em": "MaxMin-RLHF (group-min, EM)",
    "maxmin_rlhf_sample_min_em": "MaxMin-RLHF (sample-min, EM)",
    "morlhf": "MORLHF (uniform w)",
    "mpo": "MPO",
}


def pretty(name: str) -> str:
    if name in PRETTY:
        return PRETTY[name]
    if name.startswith("pi_"):
        return "π_" + name[3:]
    if name.startswith("mpo_without_"):
        return "MPO w/o π_" + name[len("mpo_without_") :]
    return name


def order_key(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(ORDER):
        if (
            name == prefix
            or (prefix.endswith("_") and name.startswith(prefix))
            or name.startswith(prefix + "_")
        ):
            return (i, name)
    return (len(ORDER), name)


# ---- loading ------------------------------------------------------------------------------------
@dataclass
class Sweep:
    root: Path
    runs: list[dict]
    skipped: list[tuple[Path, str]]


def load_sweep(root: str | os.PathLike) -> Sweep:
    root = Path(root)
    runs, skipped = [], []
    job_dirs = sorted(
        {p.parent for p in root.rglob(".hydra")} | {p.parent for p in root.rglob("results.json")}
    )
    for job in job_dirs:
        path = job / "results.json"
        if not path.exists():
            skipped.append((path, "missing (the job did not finish)"))
            continue
        try:
            res = json.loads(path.read_text())
            missing = [k for k in REQUIRED if k not in res]
            if missing:
                raise ValueError(f"missing keys {missing}")
        except (json.JSONDecodeError, ValueError, UnicodeDecodeError) as e:
            skipped.append((path, f"corrupt: {e}"))
            continue
        res["_dir"] = str(job)
        runs.append(res)
    for path, why in skipped:
        log.warning("skipping %s: %s", path, why)
    return Sweep(root, runs, skipped)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def policy_records(runs: Iterable[dict]) -> dict[tuple[float, str], dict[int, dict]]:
    """(beta, policy) -> seed -> metrics; rows shared by several jobs (pi_k, uniform) count once per seed."""
    out: dict[tuple[float, str], dict[int, dict]] = defaultdict(dict)
    for res in runs:
        for name, metrics in res["policies"].items():
            out[(float(res["beta"]), name)].setdefault(int(res["seed"]), metrics)
    return out


def fmt(m: float, s: float, scale: float = 100.0, digits: int = 1) -> str:
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


# ---- Table 1 ------------------------------------------------------------------------------------
def table1(runs: list[dict]) -> tuple[list[str], list[dict]]:
    """Mean/std win rates per (beta, policy); fixed-weight sweep rows are left to the Pareto plot."""
    objectives = runs[0]["objectives"]
    records = policy_records(runs)
    rows = []
    for (beta, name), by_seed in sorted(records.items(), key=lambda kv: (kv[0][0], order_key(kv[0][1]))):
        if name.startswith(("fixed_mix", "morlhf_", "mpo_without")):
            continue
        row = {"beta": beta, "policy": name, "seeds": len(by_seed)}
        for o in objectives:
            row[o] = mean_std([m["win_rate"][o] for m in by_seed.values()])
        row["min"] = mean_std([m["min_win_rate"] for m in by_seed.values()])
        row["min_z"] = mean_std([m["min_reward_z"] for m in by_seed.values()])
        rows.append(row)
    return objectives, rows


def best_min(rows: list[dict], beta: float) -> str | None:
    candidates = [r for r in rows if r["beta"] == beta and r["policy"] != "pi_ref"]
    return max(candidates, key=lambda r: r["min"][0])["policy"] if candidates else None


def table1_markdown(objectives: list[str], rows: list[dict], paper: bool = False) -> str:
    head = ["β", "method", *objectives, "min", "worst z", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for beta in sorted({r["beta"] for r in rows}):
        best = best_min(rows, beta)
        for r in (r for r in rows if r["beta"] == beta):
            cells = [f"{beta:g}", pretty(r["policy"]), *[fmt(*r[o]) for o in objectives]]
            mn = fmt(*r["min"])
            cells += [
                f"**{mn}**" if r["policy"] == best else mn,
                fmt(*r["min_z"], scale=1, digits=2),
                str(r["seeds"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    if paper:
        text += "\n\n" + paper_table_markdown()
    return text


def table1_latex(objectives: list[str], rows: list[dict]) -> str:
    cols = "ll" + "c" * (len(objectives) + 1)
    out = [
        f"\\begin{{tabular}}{{{cols}}}",
        "\\toprule",
        "$\\beta$ & Method & " + " & ".join(o.capitalize() for o in objectives) + " & Min \\\\",
        "\\midrule",
    ]
    for beta in sorted({r["beta"] for r in rows}):
        best = best_min(rows, beta)
        for r in (r for r in rows if r["beta"] == beta):
            name = latex_name(r["policy"])
            cells = [f"{r[o][0] * 100:.1f}$\\pm${r[o][1] * 100:.1f}" for o in objectives]
            mn = f"{r['min'][0] * 100:.1f}$\\pm${r['min'][1] * 100:.1f}"
            cells.append(f"\\textbf{{{mn}}}" if r["policy"] == best else mn)
            out.append(f"{beta:g} & {name} & " + " & ".join(cells) + " \\\\")
        out.append("\\midrule")
    out[-1] = "\\bottomrule"
    out.append("\\end{tabular}")
    return "\n".join(out) + "\n"


def latex_name(name: str) -> str:
    text = re.sub(r"π_(\w+)", r"$\\pi_{\\text{\1}}$", pretty(name))
    return text.replace("π", "$\\pi$")


def table1_csv(objectives: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "beta",
            "policy",
            *[f"{o}_{s}" for o in objectives for s in ("mean", "std")],
            "min_mean",
            "min_std",
            "worst_z_mean",
            "worst_z_std",
            "seeds",
        ]
    )
    for r in rows:
        w.writerow(
            [
                r["beta"],
                r["policy"],
                *[v for o in objectives for v in r[o]],
                *r["min"],
                *r["min_z"],
                r["seeds"],
            ]
        )
    return buf.getvalue()


def paper_table_markdown() -> str:
    from mpo_exp.paper import OBJECTIVES, SOURCE, TABLE1

    lines = [
        f"Published numbers ({SOURCE}).",
        "Different models, data and judge: compare the pattern, not the values.",
        "",
        "| β | method | " + " | ".join(OBJECTIVES) + " | min |",
        "|---|---|---|---|---|---|",
    ]
    for (method, beta), wr in TABLE1.items():
        lines.append(
            f"| {beta:g} | {pretty(method)} | " + " | ".join(f"{x:.1f}" for x in wr) + f" | {min(wr):.1f} |"
        )
    return "\n".join(lines)


# ---- ablation -----------------------------------------------------------------------------------
def ablation_markdown(runs: list[dict]) -> str | None:
    records = policy_records(runs)
    names = sorted({n for (_, n) in records if n == "mpo" or n.startswith("mpo_without_")}, key=order_key)
    if not any(n.startswith("mpo_without_") for n in names):
        return None
    objectives = runs[0]["objectives"]
    lines = [
        "| β | policy | " + " | ".join(f"z {o}" for o in objectives) + " |",
        "|" + "---|" * (len(objectives) + 2),
    ]
    for beta in sorted({b for (b, _) in records}):
        for n in names:
            by_seed = records.get((beta, n))
            if by_seed:
                cells = [
                    fmt(*mean_std([m["reward_z"][o] for m in by_seed.values()]), scale=1, digits=2)
                    for o in objectives
                ]
                lines.append(f"| {beta:g} | {pretty(n)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- cost ---------------------------------------------------------------------------------------
def policy_cost_stages(name: str, stages: Iterable[str]) -> tuple[list[str], list[str]]:
    """(total, post-processing) stages behind one policy, beyond the shared pi_ref."""
    stages = list(stages)
    if name.startswith(("maxmin_rlhf", "morlhf")):
        own = [s for s in stages if s.startswith("rm/") or s == f"rl/{name}"]
        return ["preferences", *own], own
    dpo = [s for s in stages if s.startswith("dpo/")]
    if name.startswith("mpo"):
        own = [s for s in stages if s.startswith("mpo/")]
    elif name == "reward_soup":
        own = ["soup/reward_soup"]
    elif name == "weighted_reward_soup":
        own = ["soup/weighted_reward_soup", *[s for s in stages if s.startswith("mpo/")]]
    else:
        own = []
    return ["preferences", *dpo, *own], own


def cost_rows(runs: list[dict]) -> list[dict]:
    acc: dict[tuple[float, str], list[dict]] = defaultdict(list)
    for res in runs:
        for name in res["method_policies"]:
            total, own = policy_cost_stages(name, res["cost"])
            sums = {}
            for label, stages in (("total", total), ("post", own)):
                for key in ("wall_s", "flops", "tokens_fwd", "tokens_bwd"):
                    sums[f"{label}_{key}"] = sum(res["cost"][s][key] for s in stages if s in res["cost"])
            sums["min_win_rate"] = res["policies"][name]["min_win_rate"]
            acc[(float(res["beta"]), name)].append(sums)
    rows = []
    for (beta, name), items in sorted(acc.items(), key=lambda kv: (kv[0][0], order_key(kv[0][1]))):
        row = {"beta": beta, "policy": name, "seeds": len(items)}
        for key in items[0]:
            row[key] = statistics.fmean(i[key] for i in items)
        rows.append(row)
    for r in rows:
        ref = next((m for m in rows if m["beta"] == r["beta"] and m["policy"] == "mpo"), None)
        for key in ("total_wall_s", "total_flops"):
            r[f"{key}_vs_mpo"] = r[key] / ref[key] if ref and ref[key] else math.nan
    return rows


def cost_markdown(rows: list[dict]) -> str:
    lines = [
        "| β | method | total wall s | total FLOPs | total tokens (fwd / bwd) | post-proc. wall s | "
        "post-proc. FLOPs | FLOPs ÷ MPO | wall ÷ MPO |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        lines.append(
            f"| {r['beta']:g} | {pretty(r['policy'])} | {r['total_wall_s']:.1f} | {r['total_flops']:.3g} | "
            f"{r['total_tokens_fwd']:.3g} / {r['total_tokens_bwd']:.3g} | {r['post_wall_s']:.1f} | "
            f"{r['post_flops']:.3g} | {r['total_flops_vs_mpo']:.2f} | {r['total_wall_s_vs_mpo']:.2f} |"
        )
    return "\n".join(lines)


# ---- plots --------------------------------------------------------------------------------------
def make_plots(runs: list[dict], rows: list[dict], costs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = runs[0]["objectives"]
    written = []
    for beta in sorted({r["beta"] for r in rows}):
        sel = [r for r in rows if r["beta"] == beta and r["policy"] != "pi_ref"]
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(sel)), 4))
        width = 0.8 / len(objectives)
        for j, o in enumerate(objectives):
            xs = [i + j * width for i in range(len(sel))]
            ax.bar(
                xs, [r[o][0] * 100 for r in sel], width, yerr=[r[o][1] * 100 for r in sel], label=o, capsize=2
            )
        ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set_xticks([i + width * (len(objectives) - 1) / 2 for i in range(len(sel))])
        ax.set_xticklabels([pretty(r["policy"]) for r in sel], rotation=30, ha="right")
        ax.set_ylabel("win rate vs π_ref (%)")
        ax.set_title(f"Per-objective win rate, β={beta:g}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        written.append(_save(fig, out / f"bars_beta{beta:g}.png"))

    mpo_runs = [r for r in runs if r.get("bsmd")]
    if mpo_runs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for res in mpo_runs:
            traj, names = res["bsmd"]["trajectory"], res["bsmd"]["objectives"]
            for k, name in enumerate(names):
                series = [t[k] for t in traj]
                running = [sum(series[: i + 1]) / (i + 1) for i in range(len(series))]
                color = f"C{objectives.index(name)}"
                ax.plot(res["bsmd"]["step"], series, color=color, alpha=0.25)
                ax.plot(res["bsmd"]["step"], running, color=color, label=name if res is mpo_runs[0] else None)
        ax.set_xlabel("BSMD step")
        ax.set_ylabel("λ")
        ax.set_title("MPO λ over mirror-descent steps (faint: iterates; solid: running average)")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "lambda_trajectory.png"))

    if costs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        methods = list(dict.fromkeys(r["policy"] for r in costs))
        betas = sorted({r["beta"] for r in costs})
        for r in costs:
            ax.scatter(
                r["total_flops"],
                r["min_win_rate"] * 100,
                s=60,
                color=f"C{methods.index(r['policy']) % 10}",
                marker="osD^v"[betas.index(r["beta"]) % 5],
            )
        for m in methods:
            ax.scatter([], [], color=f"C{methods.index(m) % 10}", label=pretty(m))
        for b in betas:
            ax.scatter([], [], color="grey", marker="osD^v"[betas.index(b) % 5], label=f"β={b:g}")
        flops = [r["total_flops"] for r in costs]
        if max(flops) > 10 * min(flops):
            ax.set_xscale("log")
        else:
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
        ax.set_xlabel("total FLOPs beyond π_ref")
        ax.set_ylabel("min win rate vs π_ref (%)")
        ax.set_title("Balance vs cost")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        written.append(_save(fig, out / "min_win_vs_cost.png"))

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
                pts = [
                    (res["policies"][n]["win_rate"][a], res["policies"][n]["win_rate"][b])
                    for res, n in sweep_rows
                    if n.startswith(family)
                ]
                if pts:
                    ax.scatter(
                        *zip(*pts, strict=True),
                        marker=marker,
                        alpha=0.7,
                        label="fixed-weight mixing" if family == "fixed_mix" else "MORLHF",
                    )
            mpo = [
                (res["policies"]["mpo"]["win_rate"][a], res["policies"]["mpo"]["win_rate"][b])
                for res in runs
                if "mpo" in res["policies"]
            ]
            if mpo:
                ax.scatter(*zip(*mpo, strict=True), marker="*", s=200, color="red", label="MPO")
            ax.set_xlabel(f"win rate {a}")
            ax.set_ylabel(f"win rate {b}")
        axes[0][0].legend()
        fig.suptitle("Pareto fronts of weight sweeps")
        fig.tight_layout()
        written.append(_save(fig, out / "pareto.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---- entry point --------------------------------------------------------------------------------
def build_report(root: str | os.PathLike, paper: bool = False, plots: bool = True) -> dict:
    sweep = load_sweep(root)
    if not sweep.runs:
        raise SystemExit(f"no readable results.json under {root}")
    out = Path(root)
    objectives, rows = table1(sweep.runs)
    md = table1_markdown(objectives, rows, paper=paper)
    (out / "table1.md").write_text(md + "\n")
    (out / "table1.tex").write_text(table1_latex(objectives, rows))
    (out / "table1.csv").write_text(table1_csv(objectives, rows))
    costs = cost_rows(sweep.runs)
    cost_md = cost_markdown(costs)
    (out / "cost.md").write_text(cost_md + "\n")
    ablation = ablation_markdown(sweep.runs)
    if ablation:
        (out / "ablation.md").write_text(ablation + "\n")
    images = make_plots(sweep.runs, rows, costs, out) if plots else []
    parts = ["# Sweep report", "", f"{len(sweep.runs)} runs read from `{out}`."]
    if sweep.skipped:
        parts += ["", "Skipped:"] + [f"- `{p}`: {why}" for p, why in sweep.skipped]
    parts += [
        "",
        "## Table 1: win rate vs π_ref (%), mean ± std over seeds",
        "",
        md,
        "",
        "## Cost",
        "",
        cost_md,
    ]
    if ablation:
        parts += ["", "## Leave-one-out ablation (z-normalised reward)", "", ablation]
    parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    (out / "report.md").write_text("\n".join(parts) + "\n")
    return {
        "runs": sweep.runs,
        "skipped": sweep.skipped,
        "table1": md,
        "cost": cost_md,
        "ablation": ablation,
        "images": images,
        "rows": rows,
        "costs": costs,
    }


def log_to_wandb(report: dict, root: Path, mode: str) -> None:
    import wandb

    run = wandb.init(
        project="mpo-exp",
        name=f"report-{root.name}",
        group=root.name,
        job_type="report",
        mode=mode,
        dir=str(root),
    )
    try:
        objectives = report["runs"][0]["objectives"]
        cols = ["beta", "policy", *objectives, "min", "seeds"]
        data = [
            [r["beta"], r["policy"], *[r[o][0] for o in objectives], r["min"][0], r["seeds"]]
            for r in report["rows"]
        ]
        run.log({"table1": wandb.Table(columns=cols, data=data)})
        run.log({p.stem: wandb.Image(str(p)) for p in report["images"]})
    finally:
        wandb.finish()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", help="a Hydra multirun directory (or any folder of run directories)")
    parser.add_argument(
        "--paper", action="store_true", help="print the paper's published Table 1 beside ours"
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--wandb",
        choices=["disabled", "offline", "online"],
        default="disabled",
        help="also log tables and plots to wandb (default: disabled)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    report = build_report(args.sweep_dir, paper=args.paper, plots=not args.no_plots)
    print(report["table1"])
    print()
    print(report["cost"])
    if report["ablation"]:
        print()
        print(report["ablation"])
    for path, why in report["skipped"]:
        print(f"skipped {path}: {why}")
    print(f"\nwrote {Path(args.sweep_dir) / 'report.md'} and {len(report['images'])} plots")
    if args.wandb != "disabled":
        log_to_wandb(report, Path(args.sweep_dir), args.wandb)


if __name__ == "__main__":
    main()
