"""Every Table 1 row's raw numbers: mean reward per objective, KL to π_ref and total cost.

Table 1 compares policies by win rate; this table says what a win rate was bought with (how far
the policy moved from π_ref, in nats) and what it cost on the one meter (FLOPs, tokens, wall
seconds of every stage the policy needed, shared stages included, mean over seeds).
"""

from __future__ import annotations

import math

from mpo_exp.report.cells import cell
from mpo_exp.report.cost import COST_KEYS, policy_cost
from mpo_exp.report.load import Records, ReportError, in_table1, mean_std, metric


def _total(res: dict, name: str) -> tuple[dict, dict] | None:
    try:
        return policy_cost(res, name)
    except ReportError:  # a policy whose stages the run did not record: its cost shows as –
        return None


def policies_markdown(objectives: list[str], records: Records) -> str | None:
    head = [
        "β",
        "method",
        *[f"reward {o}" for o in objectives],
        "KL (nats)",
        "FLOPs",
        "tokens",
        "wall s",
        "seeds",
    ]
    lines = [
        "Mean reward per objective and KL(π‖π_ref) per response (mean ± std over seeds); total cost of "
        "the policy (every stage it needs, shared ones included; mean over seeds).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    n_rows = 0
    for key in records.sorted_keys():
        beta, name, _, _ = key
        if not in_table1(name):
            continue
        entries = list(records.rows[key].values())
        ms = [e.metrics for e in entries]
        rewards = [
            cell(mean_std([metric(m, "reward", o) for m in ms]), scale=1, digits=3) for o in objectives
        ]
        kl = cell(mean_std([metric(m, "kl") for m in ms]), scale=1, digits=2)
        totals = [c[0] for e in entries if (c := _total(e.run, e.source)) is not None]
        if len(totals) == len(entries):
            cost = {k: math.fsum(t[k] for t in totals) / len(totals) for k in COST_KEYS}
            tokens = cost["tokens_fwd"] + cost["tokens_bwd"]
            costs = [f"{cost['flops']:.3g}", f"{tokens:.3g}", f"{cost['wall_s']:.0f}"]
        else:
            costs = ["–", "–", "–"]
        lines.append(
            "| "
            + " | ".join([f"{beta:g}", records.label(key), *rewards, kl, *costs, str(len(entries))])
            + " |"
        )
        n_rows += 1
    return "\n".join(lines) if n_rows else None
