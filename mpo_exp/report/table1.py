"""Table 1, the max-min setting: win rate vs π_ref per objective and the min, with bootstrap
intervals over prompts and a bold that does not overclaim.

MaxMin-RLHF and MPO choose their own weights; methods that take user weights (MOD, MORLHF, MODPO,
RiC) have a row for uniform weights and one for MPO's λ. Other fixed weights go to the Pareto fronts.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field

import numpy as np

from mpo_exp.report.cells import FLAG_NOTE, cell, flagged, pair, tex
from mpo_exp.report.load import Records, in_table1, mean_std, metric, pi_ref_fingerprint, pretty
from mpo_exp.report.stats import PromptBootstrap, interval, outcome_matrix


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
                cells = [tex(r[o]) for o in objs]
                mn = tex(r["min"])
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
                "label",  # names the differing config fields when one policy has several settings
            ]
        )
        for r in self.rows:
            w.writerow(
                [
                    r["beta"],
                    r["policy"],
                    *[v for o in self.objectives for v in pair(r[o])],
                    *pair(r["min"]),
                    *pair(r["ci"]),
                    *pair(r["min_z"]),
                    r["seeds"],
                    r["norm"] or "",
                    int(r["bold"]),
                    r["label"],
                ]
            )
        return buf.getvalue()


def latex_name(label: str) -> str:
    text = re.sub(r"π_(\w+)", r"$\\pi_{\\text{\1}}$", label)
    return text.replace("π", "$\\pi$").replace("_", "\\_").replace("$\\pi\\_{", "$\\pi_{")


def table1(objectives: list[str], records: Records, boot: PromptBootstrap) -> Table1:
    """Mean/std win rates per (β, policy[, normalisation]), the min's bootstrap interval and the bold."""
    rows = []
    for key in records.sorted_keys():
        beta, name, norm, _ = key
        if not in_table1(name):
            continue
        entries = records.rows[key]
        ms = [e.metrics for e in entries.values()]
        row: dict = {
            "beta": beta,
            "policy": name,
            "norm": norm,
            "label": records.label(key),
            "seeds": len(entries),
            "seed_ids": tuple(sorted(entries)),
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
            fps = {seed: pi_ref_fingerprint(e.run) for seed, e in entries.items()}
            row["draws"] = boot.min_draws(outcomes, fps)
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
