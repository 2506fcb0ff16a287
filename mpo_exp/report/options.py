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
from mpo_exp.report.load import Records, metric, pretty, variant_label
from mpo_exp.report.stats import PromptBootstrap, interval, outcome_matrix

PAPER, UNIFORM = "mpo", "uniform_mix"


def is_variant(name: str) -> bool:
    """MPO's policy or one of its variants (not leave-one-out, not another method's MPO-λ row)."""
    return name == PAPER or (name.startswith("mpo_") and "_without_" not in name)


def _outcomes(records: Records, beta: float, name: str, objectives: list[str]) -> dict[int, np.ndarray]:
    out = {}
    for key, by_seed in records.rows.items():
        if key[0] == beta and key[1] == name:
            for seed, entry in by_seed.items():
                w = outcome_matrix(entry.metrics, objectives)
                if w is not None:
                    out[seed] = w
    return out


def _fmt_diff(draws: np.ndarray) -> str:
    lo, hi = interval(draws)
    mark = " ▲" if lo > 0 else (" ▼" if hi < 0 else "")
    return f"{100 * draws.mean():+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]{mark}"


def options_markdown(
    objectives: list[str], runs: list[dict], records: Records, boot: PromptBootstrap
) -> str | None:
    """The variants table of one objective set; None when the runs hold no MPO variant besides MPO."""
    betas = sorted({k[0] for k in records.rows if is_variant(k[1]) and k[1] != PAPER})
    if not betas:
        return None
    lambdas: dict[tuple[float, str], list[list[float]]] = defaultdict(list)
    max_kl: dict[tuple[float, str], list[float]] = defaultdict(list)
    flops: dict[tuple[float, str], list[float]] = defaultdict(list)
    for res in runs:
        beta = float(res["beta"])
        for o in (res.get("landscape") or {}).get("options", {}).values():
            lambdas[beta, o["policy"]].append(o["lambda"])
            max_kl[beta, o["policy"]].append(o["max_kl"])
        if res.get("method") == "mpo" and res.get("lambda"):
            lambdas[beta, res["method_policies"][0]].append(res["lambda"])
        for name, parts in (res.get("cost_summary") or {}).items():
            if is_variant(name):
                value = metric(parts.get("post_processing", {}), "flops")
                if value is not None:
                    flops[beta, name].append(value)
    lines = [
        f"| β | variant | λ ({', '.join(objectives)}) | min win % [95% CI] | − uniform mixing "
        "| − paper's MPO | decoded max KL | post-proc. FLOPs | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for beta in betas:
        names = sorted(
            {k[1] for k in records.rows if k[0] == beta and is_variant(k[1])}, key=lambda n: (n != PAPER, n)
        )
        base = {ref: _outcomes(records, beta, ref, objectives) for ref in (UNIFORM, PAPER)}
        for name in [UNIFORM, *names]:
            w = _outcomes(records, beta, name, objectives)
            if not w:
                continue
            draws = boot.min_draws(w)
            point = float(np.mean([np.min(v.mean(axis=1)) for v in w.values()]))
            lo, hi = interval(draws)
            diffs = []
            for ref in (UNIFORM, PAPER):
                common = sorted(set(w) & set(base[ref]))
                if name == ref or not common:
                    diffs.append("–")
                    continue
                mine = boot.min_draws({s: w[s] for s in common})
                theirs = boot.min_draws({s: base[ref][s] for s in common})
                diffs.append(_fmt_diff(mine - theirs))
            lam = lambdas.get((beta, name))
            lam_txt = ", ".join(f"{x:.3f}" for x in np.mean(lam, axis=0)) if lam else "–"
            kl = max_kl.get((beta, name))
            kl_txt = f"{np.mean(kl):.2f}" if kl else "–"
            fl = flops.get((beta, name))
            fl_txt = f"{np.mean(fl):.2e}" if fl else ("0" if name == UNIFORM else "–")
            label = pretty(name) if name in (UNIFORM, PAPER) else variant_label(name)
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
