"""RL policies beside the fixed-weight mixture that is their KL-regularised optimum."""

from __future__ import annotations

from mpo_exp.report.cells import cell
from mpo_exp.report.load import Records, mean_std, metric, pretty
from mpo_exp.report.stats import PromptBootstrap, interval, outcome_matrix


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
