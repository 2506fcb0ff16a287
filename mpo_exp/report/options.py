"""MPO's variants side by side (``options.md``): objective, proposal and calibration against uniform
mixing and the paper's estimator, with paired intervals; and the lambda landscapes of the sweep.

A variant's row pools the seeds of one β: its worst-objective win rate (mean over seeds of each
seed's minimum, 95% bootstrap interval over prompts), and its paired differences from uniform
mixing and from the paper's MPO (the same eval prompts, the same pi_ref responses and the same
bootstrap resamples: tables' pairing in :mod:`mpo_exp.report.stats`). ``max KL`` is the decoded
policy's max_k KL(pi || pi_k) from ``method=landscape`` runs (MPO's own objective for the policy
that is decoded), and the cost is the variant's post-processing FLOPs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from mpo_exp.report.landscape import landscape_markdown, plot_landscape
from mpo_exp.report.load import (
    Records,
    RowKey,
    metric,
    pi_ref_fingerprint,
    pretty,
    row_setting,
    shared_part,
    variant_label,
)
from mpo_exp.report.stats import PromptBootstrap, interval, outcome_matrix

PAPER, UNIFORM = "mpo", "uniform_mix"


def is_variant(name: str) -> bool:
    """MPO's policy or one of its variants (not leave-one-out, not another method's MPO-λ row)."""
    return name == PAPER or (name.startswith("mpo_") and "_without_" not in name)


Outcomes = tuple[dict[int, np.ndarray], dict[int, str | None]]


def _outcomes(records: Records, key: RowKey | None, objectives: list[str]) -> Outcomes:
    """One row's per-prompt outcomes by seed, and each seed's π_ref fingerprint (the pairing)."""
    out, fps = {}, {}
    for seed, entry in (records.rows[key] if key is not None else {}).items():
        w = outcome_matrix(entry.metrics, objectives)
        if w is not None:
            out[seed], fps[seed] = w, pi_ref_fingerprint(entry.run)
    return out, fps


def _base(records: Records, key: RowKey, name: str) -> RowKey | None:
    """The row ``name`` that ``key`` is compared with: the same β and π_ref / π_k (shared setting);
    None when there is none, or several (MPO run with different settings) and no way to choose."""
    shared = shared_part(key[3])
    found = [k for k in records.rows if k[:2] == (key[0], name) and shared_part(k[3]) == shared]
    return found[0] if len(found) == 1 else None


def _point(w: dict[int, np.ndarray]) -> float:
    """The worst-objective win rate over seeds: the mean of each seed's minimum (Table 1's)."""
    return float(np.mean([np.min(v.mean(axis=1)) for v in w.values()]))


def _fmt_diff(point: float, draws: np.ndarray) -> str:
    """The difference of the two rows' points, with the paired interval of the draws. Not the
    draws' mean: a resampled minimum is biased low when objectives are close, so that mean can sit
    a point or more away from the difference of the two numbers printed beside it."""
    lo, hi = interval(draws)
    mark = " ▲" if lo > 0 else (" ▼" if hi < 0 else "")
    return f"{100 * point:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}"


def options_markdown(
    objectives: list[str], runs: list[dict], records: Records, boot: PromptBootstrap
) -> str | None:
    """The variants table of one objective set; None when the runs hold no MPO variant besides MPO."""
    betas = sorted({k[0] for k in records.rows if is_variant(k[1]) and k[1] != PAPER})
    if not betas:
        return None
    # keyed like the rows: (β, policy, setting)
    lambdas: dict[tuple, list[list[float]]] = defaultdict(list)
    max_kl: dict[tuple, list[float]] = defaultdict(list)
    flops: dict[tuple, list[float]] = defaultdict(list)
    for res in runs:
        beta = float(res["beta"])
        for o in (res.get("landscape") or {}).get("options", {}).values():
            at = (beta, o["policy"], row_setting(res, o["policy"], True))
            lambdas[at].append(o["lambda"])
            max_kl[at].append(o["max_kl"])
        if res.get("method") == "mpo" and res.get("lambda"):
            name = res["method_policies"][0]
            lambdas[beta, name, row_setting(res, name, True)].append(res["lambda"])
        for name, parts in (res.get("cost_summary") or {}).items():
            if is_variant(name):
                value = metric(parts.get("post_processing", {}), "flops")
                if value is not None:
                    flops[beta, name, row_setting(res, name, True)].append(value)
    lines = [
        f"| β | variant | λ ({', '.join(objectives)}) | min win % [95% CI] | − uniform mixing "
        "| − paper's MPO | decoded max KL | post-proc. FLOPs | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for beta in betas:
        keys = [k for k in records.sorted_keys() if k[0] == beta and (is_variant(k[1]) or k[1] == UNIFORM)]
        keys.sort(key=lambda k: (k[1] != UNIFORM, k[1] != PAPER, k[1]))
        for key in keys:
            name = key[1]
            w, fps = _outcomes(records, key, objectives)
            if not w:
                continue
            draws = boot.min_draws(w, fps)
            point = _point(w)
            lo, hi = interval(draws)
            diffs = []
            for ref in (UNIFORM, PAPER):
                bw, bfps = _outcomes(records, _base(records, key, ref), objectives)
                common = sorted(set(w) & set(bw))
                if name == ref or not common:
                    diffs.append("–")
                    continue
                mine, theirs = ({s: m[s] for s in common} for m in (w, bw))
                draws_diff = boot.min_draws(mine, fps) - boot.min_draws(theirs, bfps)
                diffs.append(_fmt_diff(_point(mine) - _point(theirs), draws_diff))
            lam = lambdas.get((beta, name, key[3]))
            lam_txt = ", ".join(f"{x:.3f}" for x in np.mean(lam, axis=0)) if lam else "–"
            kl = max_kl.get((beta, name, key[3]))
            kl_txt = f"{np.mean(kl):.2f}" if kl else "–"
            fl = flops.get((beta, name, key[3]))
            fl_txt = f"{np.mean(fl):.2e}" if fl else ("0" if name == UNIFORM else "–")
            label = pretty(name) if name in (UNIFORM, PAPER) else variant_label(name)
            label += records.label(key)[len(pretty(name)) :]  # the setting's fields, when a name has several
            lines.append(
                f"| {beta:g} | {label} | {lam_txt} | {100 * point:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
                f"{diffs[0]} | {diffs[1]} | {kl_txt} | {fl_txt} | {len(w)} |"
            )
    note = "▲/▼: the paired 95% interval (bootstrap over eval prompts, pooled over seeds) lies above/below 0."
    return "\n".join(lines) + "\n\n" + note + "\n"


def landscapes(runs: list[dict], out: Path, suffix: str, plots: bool) -> tuple[str | None, list[Path]]:
    """Every ``method=landscape`` run's table (and figure, ``landscape_beta<β>_seed<s>{suffix}.png``)."""
    parts, images = [], []
    for res in runs:
        land = res.get("landscape")
        if not land:
            continue
        title = f"β={float(res['beta']):g}, seed {res['seed']}"
        parts.append(f"**{title}** ({land['eval_prompts']} eval prompts, grid step {land['step']:g})\n\n")
        parts.append(landscape_markdown(land))
        if plots:
            images.append(
                plot_landscape(
                    land, out / f"landscape_beta{float(res['beta']):g}_seed{res['seed']}{suffix}.png", title
                )
            )
    return ("\n".join(parts) if parts else None), images
