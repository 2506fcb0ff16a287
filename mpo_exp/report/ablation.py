"""The leave-one-out ablation: MPO without one π_k, in z-normalised reward."""

from __future__ import annotations

from mpo_exp.report.cells import FLAG_NOTE, cell, flagged
from mpo_exp.report.load import Records, mean_std, metric


def ablation_markdown(objectives: list[str], records: Records) -> str | None:
    # an MPO variant (mpo, mpo_decoded, ...) and its leave-one-out runs <variant>_without_<k>
    bases = {
        k[1].split("_without_")[0] for k in records.rows if k[1].startswith("mpo") and "_without_" in k[1]
    }
    if not bases:
        return None
    keys = [k for k in records.sorted_keys() if k[1].split("_without_")[0] in bases]
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
