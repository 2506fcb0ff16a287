"""Table 1 (with bootstrap intervals and a bold that does not overclaim), ablation, cost and λ tables."""

from __future__ import annotations

import csv
import io
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from mpo_exp.report.load import Records, ReportError, is_ok, mean_std, metric, pretty
from mpo_exp.report.stats import PromptBootstrap, interval, outcome_matrix

Cell = tuple[float, float] | None
DAGGER = "†"
FLAG_NOTE = (
    f"{DAGGER} NaN: at least one seed's results.json has NaN (or inf) there; —: at least one seed's "
    "results.json lacks the value. Such values are not averaged, and such rows never get the bold."
)


def cell(v: Cell, scale: float = 100.0, digits: int = 1) -> str:
    if v is None:
        return "—" + DAGGER
    if not math.isfinite(v[0]):
        return "NaN" + DAGGER
    return f"{v[0] * scale:.{digits}f} ± {v[1] * scale:.{digits}f}"


def flagged(v: Cell) -> bool:
    return not is_ok(v)


# ---- Table 1 ------------------------------------------------------------------------------------
def caption(n_boot: int) -> str:
    return (
        "Win rate vs π_ref (%) on held-out prompts; per objective: mean ± std over seeds. "
        "**min** is the mean over seeds of each seed's minimum over objectives (not the minimum of the "
        "per-objective means); ± is the std over seeds; [95% CI] is a percentile bootstrap over eval "
        f"prompts (B={n_boot}: each seed's prompts resampled with replacement, independently per seed, "
        "its per-objective win rates and minimum recomputed, then averaged over seeds), so it shows "
        "prompt-sampling noise, not seed-to-seed variation (a resampled minimum is biased low when "
        "objectives are close, so an interval can sit mostly below its point). Bold: the best min of a "
        "β, only when the paired bootstrap interval (the same resampled prompts for both policies within "
        "a seed) of best − runner-up excludes 0. worst z: mean over seeds of the lowest z-normalised "
        "reward over objectives."
    )


@dataclass
class Table1:
    objectives: list[str]
    rows: list[dict]
    n_boot: int
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        objs = self.objectives
        head = ["β", "method", *objs, "min ± std [95% CI]", "worst z", "seeds"]
        lines = [caption(self.n_boot), "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            mn = cell(r["min"])
            if r["bold"]:
                mn = f"**{mn}**"
            if r["ci"]:
                mn += f" [{r['ci'][0] * 100:.1f}, {r['ci'][1] * 100:.1f}]"
            cells = [f"{r['beta']:g}", r["label"], *[cell(r[o]) for o in objs]]
            cells += [mn, cell(r["min_z"], scale=1, digits=2), str(r["seeds"])]
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def latex(self) -> str:
        objs = self.objectives
        cols = "ll" + "c" * (len(objs) + 1)
        out = ["% " + caption(self.n_boot).replace("%", "\\%").replace("**", "")]
        out += [
            f"\\begin{{tabular}}{{{cols}}}",
            "\\toprule",
            "$\\beta$ & Method & " + " & ".join(o.capitalize() for o in objs) + " & Min [95\\% CI] \\\\",
            "\\midrule",
        ]
        for beta in sorted({r["beta"] for r in self.rows}):
            for r in (r for r in self.rows if r["beta"] == beta):
                cells = [_tex(r[o]) for o in objs]
                mn = _tex(r["min"])
                if r["bold"]:
                    mn = f"\\textbf{{{mn}}}"
                if r["ci"]:
                    mn += f" {{\\scriptsize [{r['ci'][0] * 100:.1f}, {r['ci'][1] * 100:.1f}]}}"
                cells.append(mn)
                out.append(f"{beta:g} & {latex_name(r['label'])} & " + " & ".join(cells) + " \\\\")
            out.append("\\midrule")
        out[-1] = "\\bottomrule"
        out.append("\\end{tabular}")
        if any(r["flags"] for r in self.rows):
            out.append("% $^\\dagger$ " + FLAG_NOTE[2:])
        return "\n".join(out) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(
            [
                "beta",
                "policy",
                *[f"{o}_{s}" for o in self.objectives for s in ("mean", "std")],
                "min_mean",
                "min_std",
                "min_ci_low",
                "min_ci_high",
                "worst_z_mean",
                "worst_z_std",
                "seeds",
                "reward_normalization",
                "bold",
            ]
        )
        for r in self.rows:
            w.writerow(
                [
                    r["beta"],
                    r["policy"],
                    *[v for o in self.objectives for v in _pair(r[o])],
                    *_pair(r["min"]),
                    *_pair(r["ci"]),
                    *_pair(r["min_z"]),
                    r["seeds"],
                    r["norm"] or "",
                    int(r["bold"]),
                ]
            )
        return buf.getvalue()


def _pair(v: Cell) -> tuple:
    return ("", "") if v is None else v


def _tex(v: Cell) -> str:
    if v is None:
        return "--$^\\dagger$"
    if not math.isfinite(v[0]):
        return "NaN$^\\dagger$"
    return f"{v[0] * 100:.1f}$\\pm${v[1] * 100:.1f}"


def latex_name(label: str) -> str:
    text = re.sub(r"π_(\w+)", r"$\\pi_{\\text{\1}}$", label)
    return text.replace("π", "$\\pi$").replace("_", "\\_").replace("$\\pi\\_{", "$\\pi_{")


TABLE1_SKIP = ("fixed_mix", "morlhf_", "mpo_without")  # weight sweeps: Pareto plot; leave-one-out: ablation


def table1(objectives: list[str], records: Records, boot: PromptBootstrap) -> Table1:
    """Mean/std win rates per (β, policy[, normalisation]), the min's bootstrap interval and the bold."""
    rows = []
    for key in records.sorted_keys():
        beta, name, norm = key
        if name.startswith(TABLE1_SKIP):
            continue
        entries = records.rows[key]
        ms = [e.metrics for e in entries.values()]
        row: dict = {
            "beta": beta,
            "policy": name,
            "norm": norm,
            "label": records.label(key),
            "seeds": len(entries),
            "objectives": list(objectives),
        }
        for o in objectives:
            row[o] = mean_std([metric(m, "win_rate", o) for m in ms])
        row["min"] = mean_std([metric(m, "min_win_rate") for m in ms])
        row["min_z"] = mean_std([metric(m, "min_reward_z") for m in ms])
        row["flags"] = any(flagged(row[c]) for c in (*objectives, "min", "min_z"))
        row["eligible"] = not any(flagged(row[c]) for c in (*objectives, "min"))
        outcomes = {seed: outcome_matrix(e.metrics, objectives) for seed, e in entries.items()}
        row["draws"] = row["ci"] = None
        if row["eligible"] and all(w is not None for w in outcomes.values()):
            row["draws"] = boot.min_draws(outcomes)
            row["ci"] = interval(row["draws"])
        row["bold"] = False
        rows.append(row)
    table = Table1(list(objectives), rows, boot.n_boot)
    for beta in sorted({r["beta"] for r in rows}):
        note = decide_bold([r for r in rows if r["beta"] == beta])
        if note:
            table.notes.append(note)
    if any(r["flags"] for r in rows):
        table.notes.append(FLAG_NOTE)
    no_ci = [r for r in rows if r["ci"] is None and r["eligible"]]
    if no_ci:
        which = "all rows" if len(no_ci) == len(rows) else ", ".join(sorted({r["label"] for r in no_ci}))
        table.notes.append(
            f"No per-prompt outcomes (win_per_prompt) for {which} (results written before they were "
            "recorded): no interval, and no bold where the best or the runner-up lacks them."
        )
    return table


def decide_bold(rows: list[dict]) -> str | None:
    """Bold the best min only if the paired bootstrap interval of best − runner-up excludes 0."""
    cands = sorted((r for r in rows if r["policy"] != "pi_ref" and r["eligible"]), key=lambda r: -r["min"][0])
    if not cands:
        return None
    beta = f"β={rows[0]['beta']:g}"
    best = cands[0]
    if len(cands) == 1:
        return f"{beta}: {best['label']} is the only method compared; no runner-up, no bold."
    ru = cands[1]
    if best["draws"] is None or ru["draws"] is None:
        return (
            f"{beta}: best min {best['label']}, runner-up {ru['label']}: no per-prompt outcomes to tell "
            "them apart, no bold."
        )
    lo, hi = interval(np.asarray(best["draws"]) - np.asarray(ru["draws"]))
    diff = (best["min"][0] - ru["min"][0]) * 100
    what = (
        f"{beta}: {best['label']} − runner-up {ru['label']} = {diff:+.1f} pts "
        f"[95% CI {lo * 100:+.1f}, {hi * 100:+.1f}]"
    )
    if lo > 0:
        best["bold"] = True
        return what + " (paired bootstrap over prompts): bold."
    return what + " (paired bootstrap over prompts): within noise, no bold."


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
def ablation_markdown(objectives: list[str], records: Records) -> str | None:
    keys = [k for k in records.sorted_keys() if k[1] == "mpo" or k[1].startswith("mpo_without_")]
    if not any(k[1].startswith("mpo_without_") for k in keys):
        return None
    lines = [
        "| β | policy | " + " | ".join(f"z {o}" for o in objectives) + " |",
        "|" + "---|" * (len(objectives) + 2),
    ]
    flags = False
    for key in keys:
        ms = [e.metrics for e in records.rows[key].values()]
        values = [mean_std([metric(m, "reward_z", o) for m in ms]) for o in objectives]
        flags = flags or any(flagged(v) for v in values)
        cells = [cell(v, scale=1, digits=2) for v in values]
        lines.append(f"| {key[0]:g} | {records.label(key)} | " + " | ".join(cells) + " |")
    if flags:
        lines += ["", FLAG_NOTE]
    return "\n".join(lines)


# ---- RL against its closed form -----------------------------------------------------------------
def closed_form_counterpart(name: str) -> str | None:
    """The fixed-weight mixture that is the KL-regularised optimum an RL policy targets.

    MORLHF with weights w at the shared β targets pi_ref·exp(sum_k w_k r_k/β) ∝ prod_k pi_k^{w_k}
    when the rewards keep their Bradley–Terry scale (the partition normalisation).
    """
    if name == "morlhf":
        return "uniform_mix"
    if name.startswith("morlhf_"):
        return "fixed_mix_" + name[len("morlhf_") :]
    return None


def closed_form_markdown(objectives: list[str], records: Records, boot: PromptBootstrap) -> str | None:
    """Per-objective win-rate difference RL − closed form, paired within each seed."""
    lines = []
    for key in records.sorted_keys():
        beta, name, norm = key
        other = closed_form_counterpart(name)
        mix = records.rows.get((beta, other, None)) if other else None
        if not mix:
            continue
        rl = records.rows[key]
        seeds = sorted(set(rl) & set(mix))
        if not seeds:
            continue
        cells = []
        for k, o in enumerate(objectives):
            pairs = [
                (metric(rl[s].metrics, "win_rate", o), metric(mix[s].metrics, "win_rate", o)) for s in seeds
            ]
            # a missing value stays missing (None) and a NaN stays NaN: cell() flags both
            diffs = [None if a is None or b is None else a - b for a, b in pairs]
            text = cell(mean_std(diffs))
            a = {s: outcome_matrix(rl[s].metrics, objectives) for s in seeds}
            b = {s: outcome_matrix(mix[s].metrics, objectives) for s in seeds}
            if all(v is not None for v in (*a.values(), *b.values())):
                lo, hi = interval(boot.rate_draws(a)[:, k] - boot.rate_draws(b)[:, k])
                text += f" [{lo * 100:+.1f}, {hi * 100:+.1f}]"
            cells.append(text)
        kl = [
            cell(mean_std([metric(r[s].metrics, "kl") for s in seeds]), scale=1, digits=2) for r in (rl, mix)
        ]
        label = f"{records.label(key)} ({norm or 'normalisation not recorded'})"
        lines.append(
            f"| {beta:g} | {label} | {pretty(other)} | "
            + " | ".join(cells)
            + f" | {kl[0]} | {kl[1]} | {len(seeds)} |"
        )
    if not lines:
        return None
    head = [
        "RL policy against the fixed-weight mixture it targets (its closed form at the same β): win rate "
        "vs π_ref, RL − mixture, in points; mean ± std over seeds of the paired per-seed differences, "
        "[95% CI] a paired bootstrap over eval prompts. KL: each policy's KL(π‖π_ref).",
        "",
        "| β | RL policy | closed form | "
        + " | ".join(f"Δ {o}" for o in objectives)
        + " | KL RL | KL mixture | seeds |",
        "|" + "---|" * (len(objectives) + 6),
    ]
    return "\n".join(head + lines)


# ---- cost ---------------------------------------------------------------------------------------
COST_KEYS = ("wall_s", "flops", "tokens_fwd", "tokens_bwd")


def _stage_sum(res: dict, name: str, what: str, stages: object) -> dict[str, float]:
    if not isinstance(stages, list):
        raise ReportError(
            f"{res['_dir']}: results.json policy_costs[{name!r}][{what!r}] is not a list of stage names"
        )
    for s in stages:
        if s not in res["cost"]:
            raise ReportError(
                f"{res['_dir']}: results.json policy_costs[{name!r}][{what!r}] names stage {s!r}, "
                f"which its cost section does not have (stages: {sorted(res['cost'])})"
            )
    return {k: math.fsum(float(res["cost"][s].get(k, 0)) for s in stages) for k in COST_KEYS}


def policy_cost(res: dict, name: str) -> tuple[dict, dict] | None:
    """(total, post-processing) sums over the stages results["policy_costs"][name] lists.

    Older results without policy_costs: the run's own cost_summary when it has one method policy,
    else None (the policy is left out of the cost table and the report says so).
    """
    pc = res.get("policy_costs")
    if pc is None:
        summary = res.get("cost_summary") or {}
        if len(res["method_policies"]) == 1 and isinstance(summary.get("total"), dict):
            post = summary.get("post_processing") or {}
            return (
                {k: float(summary["total"].get(k, 0)) for k in COST_KEYS},
                {k: float(post.get(k, 0)) for k in COST_KEYS},
            )
        return None
    if not isinstance(pc, dict) or not isinstance(pc.get(name), dict):
        raise ReportError(f"{res['_dir']}: results.json policy_costs has no entry for policy {name!r}")
    return (
        _stage_sum(res, name, "total", pc[name].get("total")),
        _stage_sum(res, name, "post_processing", pc[name].get("post_processing")),
    )


def cost_rows(records: Records) -> tuple[list[dict], list[str]]:
    rows, legacy, missing = [], set(), set()
    for key in records.sorted_keys():
        beta, name, norm = key
        items = []
        for entry in records.rows[key].values():
            if not entry.own:
                continue
            costs = policy_cost(entry.run, name)
            if "policy_costs" not in entry.run:
                (legacy if costs else missing).add(entry.run["_rel"])
            if costs is None:
                continue
            sums = {f"total_{k}": costs[0][k] for k in COST_KEYS}
            sums |= {f"post_{k}": costs[1][k] for k in COST_KEYS}
            sums["min_win_rate"] = metric(entry.metrics, "min_win_rate")
            items.append(sums)
        if not items:
            continue
        row = {"beta": beta, "policy": name, "norm": norm, "label": records.label(key), "seeds": len(items)}
        for k in items[0]:
            vals = [i[k] for i in items]
            row[k] = math.nan if any(v is None for v in vals) else math.fsum(vals) / len(vals)
        rows.append(row)
    for r in rows:
        ref = next((m for m in rows if m["beta"] == r["beta"] and m["policy"] == "mpo"), None)
        for key in ("total_wall_s", "total_flops"):
            r[f"{key}_vs_mpo"] = r[key] / ref[key] if ref and ref[key] else math.nan
    notes = []
    if legacy:
        notes.append(
            "No policy_costs in " + ", ".join(f"`{d}`" for d in sorted(legacy)) + ": costs from the run's "
            "cost_summary (one method policy per run)."
        )
    if missing:
        notes.append(
            "No policy_costs in " + ", ".join(f"`{d}`" for d in sorted(missing)) + " (several method "
            "policies, no per-policy stages): left out of the cost table."
        )
    return rows, notes


def cost_markdown(rows: list[dict], notes: list[str] | None = None) -> str:
    lines = [
        "| β | method | total wall s | total FLOPs | total tokens (fwd / bwd) | post-proc. wall s | "
        "post-proc. FLOPs | FLOPs ÷ MPO | wall ÷ MPO |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        lines.append(
            f"| {r['beta']:g} | {r['label']} | {r['total_wall_s']:.1f} | {r['total_flops']:.3g} | "
            f"{r['total_tokens_fwd']:.3g} / {r['total_tokens_bwd']:.3g} | {r['post_wall_s']:.1f} | "
            f"{r['post_flops']:.3g} | {r['total_flops_vs_mpo']:.2f} | {r['total_wall_s_vs_mpo']:.2f} |"
        )
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


# ---- MPO's lambda -------------------------------------------------------------------------------
LAMBDA_METHODS = ("mpo", "reward_soups")
LAMBDA_CAPTION = (
    "λ per objective: mean ± std over seeds. Bootstrap std: the std of λ over BSMD's bootstrap "
    "(lambda_std), mean over the seeds that recorded it. Max FW gap: the largest Frank–Wolfe gap over "
    "seeds. —: not recorded."
)


def _by_objective(res: dict, key: str, objectives: list[str]) -> dict[str, float | None] | None:
    values = res.get(key)
    if not isinstance(values, list) or len(values) != len(res["objectives"]):
        return None
    named = dict(zip(res["objectives"], values, strict=True))
    return {o: metric(named, o) for o in objectives}


def lambda_rows(objectives: list[str], runs: list[dict]) -> list[dict]:
    """Per (β, MPO-family row) with BSMD results: λ, its bootstrap std and the Frank–Wolfe gap."""
    acc: dict[tuple[float, str], dict[int, dict]] = defaultdict(dict)
    for res in runs:
        if res["method"] not in LAMBDA_METHODS or not res.get("bsmd") or res.get("lambda") is None:
            continue
        label = res["method"]
        if label == "mpo" and res["method_policies"]:
            label = res["method_policies"][0]  # mpo or a leave-one-out mpo_without_<k>
        acc[(float(res["beta"]), label)].setdefault(int(res["seed"]), res)
    rows = []
    for (beta, label), by_seed in sorted(acc.items()):
        runs_ = list(by_seed.values())
        lams = [_by_objective(r, "lambda", objectives) for r in runs_]
        stds = [s for s in (_by_objective(r, "lambda_std", objectives) for r in runs_) if s]
        gaps = [metric(r["bsmd"], "fw_gap") for r in runs_ if isinstance(r["bsmd"], dict)]
        gaps = [g for g in gaps if g is not None]
        row = {"beta": beta, "policy": label, "label": pretty(label), "seeds": len(runs_)}
        for o in objectives:
            row[f"lambda_{o}"] = mean_std([lam[o] if lam else None for lam in lams])
            vals = [s[o] for s in stds if s[o] is not None]
            row[f"lambda_std_{o}"] = math.fsum(vals) / len(vals) if vals else None
        row["fw_gap_max"] = max(gaps) if gaps else None
        rows.append(row)
    return rows


def lambda_markdown(objectives: list[str], rows: list[dict]) -> str:
    head = ["β", "method", *[f"λ {o}" for o in objectives], "bootstrap std (" + " / ".join(objectives) + ")"]
    head += ["max FW gap", "seeds"]
    lines = [LAMBDA_CAPTION, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    flags = False
    for r in rows:
        lam = [r[f"lambda_{o}"] for o in objectives]
        flags = flags or any(flagged(v) for v in lam)
        stds = [r[f"lambda_std_{o}"] for o in objectives]
        std = " / ".join("—" if v is None else f"{v:.3f}" for v in stds)
        gap = "—" if r["fw_gap_max"] is None else f"{r['fw_gap_max']:.2e}"
        cells = [f"{r['beta']:g}", r["label"], *[cell(v, scale=1, digits=3) for v in lam], std, gap]
        lines.append("| " + " | ".join([*cells, str(r["seeds"])]) + " |")
    if flags:
        lines += ["", FLAG_NOTE]
    return "\n".join(lines)
