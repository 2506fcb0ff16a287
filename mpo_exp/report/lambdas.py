"""MPO's λ per objective, its bootstrap std and the Frank–Wolfe gap."""

from __future__ import annotations

import math
from collections import defaultdict

from mpo_exp.report.cells import FLAG_NOTE, cell, flagged
from mpo_exp.report.load import mean_std, metric, pretty, row_setting, setting_text

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
    acc: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for res in runs:
        if res["method"] not in LAMBDA_METHODS or not res.get("bsmd") or res.get("lambda") is None:
            continue
        label = res["method"]
        if label == "mpo" and res["method_policies"]:
            label = res["method_policies"][0]  # mpo or a leave-one-out mpo_without_<k>
        # jobs run with different settings are never averaged (as in Table 1)
        setting = row_setting(res, label, own=True)
        acc[(float(res["beta"]), label, setting)].setdefault(int(res["seed"]), res)
    rows = []
    for (beta, label, setting), by_seed in sorted(acc.items(), key=lambda kv: (*kv[0][:2], str(kv[0][2]))):
        others = {k[2] for k in acc if k[:2] == (beta, label)} - {setting}
        shown = pretty(label) + (f" [{setting_text(setting, others)}]" if others else "")
        runs_ = list(by_seed.values())
        lams = [_by_objective(r, "lambda", objectives) for r in runs_]
        stds = [s for s in (_by_objective(r, "lambda_std", objectives) for r in runs_) if s]
        gaps = [metric(r["bsmd"], "fw_gap") for r in runs_ if isinstance(r["bsmd"], dict)]
        gaps = [g for g in gaps if g is not None]
        row = {"beta": beta, "policy": label, "label": shown, "seeds": len(runs_)}
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
