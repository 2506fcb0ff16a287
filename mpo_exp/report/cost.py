"""The cost table: each method policy's total and post-processing cost, and its ratio to MPO's."""

from __future__ import annotations

import math

from mpo_exp.report.load import Records, ReportError, metric, parse_weights, shared_part

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
        beta, name, norm, setting = key
        if parse_weights(name) is not None:  # fixed user weights: their table has the whole front's cost
            continue
        items = []
        for entry in records.rows[key].values():
            if not entry.own:
                continue
            costs = policy_cost(entry.run, entry.source)
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
        row["shared"] = shared_part(setting)
        for k in items[0]:
            vals = [i[k] for i in items]
            row[k] = math.nan if any(v is None for v in vals) else math.fsum(vals) / len(vals)
        rows.append(row)
    for r in rows:
        # MPO on the same π_ref and π_k (the same shared setting)
        same = [m for m in rows if m["beta"] == r["beta"] and m["shared"] == r["shared"]]
        ref = next((m for m in same if m["policy"] == "mpo"), None)
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
