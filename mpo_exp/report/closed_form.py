"""RL policies beside the fixed-weight mixture that is their KL-regularised optimum."""

from __future__ import annotations

from mpo_exp.report.cells import cell
from mpo_exp.report.load import (
    MPO_LAMBDA,
    Entry,
    Records,
    RowKey,
    mean_std,
    metric,
    parse_weights,
    pi_ref_fingerprint,
    recorded_weights,
    same_weights,
    shared_part,
)
from mpo_exp.report.stats import PromptBootstrap, interval, outcome_matrix


def _weights(entry: Entry) -> tuple[float, ...] | None:
    """The weights an RL policy or a mixture was made with: its job's recorded λ (full precision);
    the 2-decimal weights of a fixed-weight name only for files without it."""
    lam = entry.run.get("lambda")
    if isinstance(lam, list) and lam and all(isinstance(x, (int, float)) for x in lam):
        return recorded_weights(entry.run, entry.source) or tuple(float(x) for x in lam)
    parsed = parse_weights(entry.source)
    return parsed[1] if parsed else None


def _targets(name: str, rl: dict[int, Entry], mix_name: str, mix: dict[int, Entry]) -> list[int]:
    """Seeds at which the mixture row is the RL row's closed form: MORLHF with uniform weights is uniform
    mixing; with MPO's λ it is MPO's policy (the λ of the same seed, MOD with MPO's λ being that row);
    with fixed weights w it is MOD with the same recorded w."""
    seeds = sorted(set(rl) & set(mix))
    if name == "morlhf":
        return seeds if mix_name == "uniform_mix" else []
    if name == f"morlhf_{MPO_LAMBDA}":
        variant = {str(e.run.get("mpo_policy", "mpo")) for e in rl.values()}
        if mix_name not in variant:
            return []
    elif parse_weights(mix_name) is None or parse_weights(mix_name)[0] != "fixed_mix":
        return []
    return [s for s in seeds if same_weights(_weights(rl[s]), _weights(mix[s]))]


def closed_form_counterpart(records: Records, key: RowKey) -> tuple[RowKey | None, list[int]]:
    """The row of the fixed-weight mixture that is the KL-regularised optimum an RL row targets, and
    the seeds the two share (the one with most such seeds; None when there is none).

    MORLHF with weights w at the shared β targets pi_ref·exp(sum_k w_k r_k/β) ∝ prod_k pi_k^{w_k}
    when the rewards keep their Bradley–Terry scale (the partition normalisation). The mixture must
    be built on the same π_ref and π_k (the same shared setting) and, per seed, with the same weights.
    """
    beta, name, _, setting = key
    if name != "morlhf" and not name.startswith("morlhf_"):
        return None, []
    best: tuple[RowKey | None, list[int]] = (None, [])
    for other in records.sorted_keys():
        if other[0] != beta or other[2] is not None or shared_part(other[3]) != shared_part(setting):
            continue
        seeds = _targets(name, records.rows[key], other[1], records.rows[other])
        if len(seeds) > len(best[1]):
            best = (other, seeds)
    return best


def closed_form_markdown(objectives: list[str], records: Records, boot: PromptBootstrap) -> str | None:
    """Per-objective win-rate difference RL − closed form, paired within each seed."""
    lines = []
    for key in records.sorted_keys():
        beta, name, norm, _ = key
        mix_key, seeds = closed_form_counterpart(records, key)
        if mix_key is None:
            continue
        rl, mix = records.rows[key], records.rows[mix_key]
        fa = {s: pi_ref_fingerprint(rl[s].run) for s in seeds}
        fb = {s: pi_ref_fingerprint(mix[s].run) for s in seeds}
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
                lo, hi = interval(boot.rate_draws(a, fa)[:, k] - boot.rate_draws(b, fb)[:, k])
                text += f" [{lo * 100:+.1f}, {hi * 100:+.1f}]"
            cells.append(text)
        kl = [
            cell(mean_std([metric(r[s].metrics, "kl") for s in seeds]), scale=1, digits=2) for r in (rl, mix)
        ]
        label = f"{records.label(key)} ({norm or 'normalisation not recorded'})"
        lines.append(
            f"| {beta:g} | {label} | {records.label(mix_key)} | "
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
