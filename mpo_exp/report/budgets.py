"""What each trained baseline was allowed and whether it plateaued within it (``results.json``).

Reward models stop at their held-out plateau (``reward_model.plateau``) within ``max_steps``; RL
runs its ``rl.iterations`` and records whether its objective plateaued (``rl_budget``); MODPO
trains like a π_k (``dpo.max_steps``) and RiC for ``method.steps`` + ``method.online_steps``:
fixed budgets, whose checkpoints (the cost-to-quality curves) show whether more would have helped.
"""

from __future__ import annotations

import math
from collections import defaultdict


def _yes_no(value: object) -> str:
    return {True: "yes", False: "**no**"}.get(value, "–")  # type: ignore[arg-type]


def budget_rows(runs: list[dict]) -> list[dict]:
    """One row per (β, what was trained, seed), each counted once (a reward model serves many jobs)."""
    rows, seen = [], set()

    def add(beta: float, seed: int, what: str, budget: str, used: str, plateaued: object) -> None:
        if (beta, what, seed) in seen:
            return
        seen.add((beta, what, seed))
        rows.append(
            {"beta": beta, "seed": seed, "what": what, "budget": budget, "used": used, "plateaued": plateaued}
        )

    for res in runs:
        beta, seed, cfg = float(res.get("beta", math.nan)), res.get("seed"), res.get("config") or {}
        for objective, rm in (res.get("reward_models") or {}).items():
            b = rm.get("budget") or {}
            if b:
                used = f"{b.get('steps')} steps" + (f" (best {b['best_step']})" if b.get("best_step") else "")
                add(
                    beta,
                    seed,
                    f"reward model {objective}",
                    f"≤ {b.get('max_steps')} steps",
                    used,
                    b.get("plateaued"),
                )
        for label, b in (res.get("rl_budget") or {}).items():
            its = f"{b.get('iterations')} iterations × {b.get('prompts_per_iteration')} prompts"
            add(beta, seed, f"RL {label}", its, its, b.get("plateaued"))
        method = res.get("method")
        if method == "modpo":
            steps = (cfg.get("dpo") or {}).get("max_steps")
            for label in res.get("method_policies", []):
                if "@" not in label:
                    add(beta, seed, f"MODPO {label}", f"{steps} steps (a π_k's DPO)", f"{steps} steps", None)
        if method == "ric":
            m = cfg.get("method") or {}
            steps = f"{m.get('steps')} + {m.get('online_steps')} steps"
            add(beta, seed, "RiC model", steps, steps, None)
    return rows


def budgets_markdown(runs: list[dict]) -> str | None:
    rows = budget_rows(runs)
    if not rows:
        return None
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["beta"], r["what"])].append(r)
    lines = [
        "Budgets: what each trained baseline was allowed, what it used and whether it plateaued "
        "(reward models: held-out loss; RL: score − β·KL over the last quarter of iterations; "
        "MODPO and RiC: fixed budgets, see their curves). One entry per seed.",
        "",
        "| β | trained | budget | used | plateaued | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for (beta, what), rs in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        used = " / ".join(r["used"] for r in sorted(rs, key=lambda r: r["seed"] or 0))
        plateau = " / ".join(_yes_no(r["plateaued"]) for r in sorted(rs, key=lambda r: r["seed"] or 0))
        lines.append(f"| {beta:g} | {what} | {rs[0]['budget']} | {used} | {plateau} | {len(rs)} |")
    return "\n".join(lines)
