"""Every Table 1 row against MPO: the paired difference in the worst-objective win rate.

Table 1's bold compares only the best row with the runner-up; the question a reader brings is where
MPO wins, ties or loses against each baseline. Each row's bootstrap draws share the resampled
prompts with MPO's (:mod:`mpo_exp.report.stats`), so row − MPO is a paired difference; a row is
compared only on the same seeds. ▲/▼ mark a 95% interval that excludes 0 for that comparison
alone; with a dozen rows, about one in twenty such marks is noise, so the family-wise reading
(Bonferroni over the β's comparisons) is given beside it.
"""

from __future__ import annotations

import numpy as np

from mpo_exp.report.curves import MPO_NAMES
from mpo_exp.report.stats import family_level, interval


def _reference(rows: list[dict]) -> dict | None:
    by_name = {r["policy"]: r for r in rows if r.get("draws") is not None}
    return next((by_name[n] for n in MPO_NAMES if n in by_name), None)


def versus_mpo(rows: list[dict]) -> list[dict]:
    """Per β: each row with bootstrap draws on MPO's seeds, its min − MPO's, with intervals."""
    out = []
    for beta in sorted({r["beta"] for r in rows}):
        group = [r for r in rows if r["beta"] == beta]
        ref = _reference(group)
        if ref is None:
            continue
        others = [
            r
            for r in group
            if r is not ref and r.get("draws") is not None and r["seed_ids"] == ref["seed_ids"]
        ]
        family = family_level(len(others))
        for r in others:
            diff = np.asarray(r["draws"]) - np.asarray(ref["draws"])
            out.append(
                {
                    "beta": beta,
                    "label": r["label"],
                    "reference": ref["label"],
                    "delta": r["min"][0] - ref["min"][0],
                    "ci": interval(diff),
                    "family_ci": interval(diff, family),
                }
            )
    return out


def _reading(v: dict) -> str:
    lo, hi = v["ci"]
    flo, fhi = v["family_ci"]
    if lo > 0:
        return "▲ above MPO" + (" (family-wise too)" if flo > 0 else " (not family-wise)")
    if hi < 0:
        return "▼ below MPO" + (" (family-wise too)" if fhi < 0 else " (not family-wise)")
    return "within noise"


def versus_markdown(rows: list[dict]) -> str | None:
    """The comparison as a table (None when no β has MPO with per-prompt outcomes)."""
    vs = versus_mpo(rows)
    if not vs:
        return None
    lines = [
        "Every row against MPO (worst-objective win rate, percentage points): the paired bootstrap "
        "difference row − MPO over the same seeds and resampled prompts, 95% interval for each "
        "comparison; family-wise: Bonferroni over the β's comparisons.",
        "",
        "| β | method | against | min − MPO [95% CI] | reading |",
        "|---|---|---|---|---|",
    ]
    for v in vs:
        lo, hi = (100 * x for x in v["ci"])
        lines.append(
            f"| {v['beta']:g} | {v['label']} | {v['reference']} | "
            f"{100 * v['delta']:+.1f} [{lo:+.1f}, {hi:+.1f}] | {_reading(v)} |"
        )
    return "\n".join(lines)
