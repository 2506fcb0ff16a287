"""The leave-one-out ablation: MPO without one π_k, in z-normalised reward."""

from __future__ import annotations

from mpo_exp.report.cells import FLAG_NOTE, cell, flagged
from mpo_exp.report.load import Records, mean_std, metric


def ablation_markdown(objectives: list[str], records: Records) -> str | None:
    keys = [k for k in records.sorted_keys() if k[1] == "mpo" or k[1].startswith("mpo_without_")]
    if not any(k[1].startswith("mpo_without_") for k in keys):
        return None
    lines = [
        "| β | policy | " + " | ".join(f"z {o}" for o in objectives) + " |",
        "|" + "---|" * (len(objectives) + 2),
    ]
    flags = False
    for key in keys:
        ms = [e.metrics for e in records.rows[key].values()]
        values = [mean_std([metric(m, "reward_z", o) for m in ms]) for o in objectives]
        flags = flags or any(flagged(v) for v in values)
        cells = [cell(v, scale=1, digits=2) for v in values]
        lines.append(f"| {key[0]:g} | {records.label(key)} | " + " | ".join(cells) + " |")
    if flags:
        lines += ["", FLAG_NOTE]
    return "\n".join(lines)
