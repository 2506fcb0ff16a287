"""Cell formatting shared by the tables: mean ± std, and the dagger for NaN or missing values."""

from __future__ import annotations

import math

from mpo_exp.report.load import is_ok

Cell = tuple[float, float] | None
DAGGER = "†"
FLAG_NOTE = (
    f"{DAGGER} NaN: at least one seed's results.json has NaN (or inf) there; —: at least one seed's "
    "results.json lacks the value. Such values are not averaged, and such rows never get the bold."
)


def cell(v: Cell, scale: float = 100.0, digits: int = 1) -> str:
    if v is None:
        return "—" + DAGGER
    if not math.isfinite(v[0]):
        return "NaN" + DAGGER
    return f"{v[0] * scale:.{digits}f} ± {v[1] * scale:.{digits}f}"


def flagged(v: Cell) -> bool:
    return not is_ok(v)


def pair(v: Cell) -> tuple:
    return ("", "") if v is None else v


def tex(v: Cell) -> str:
    if v is None:
        return "--$^\\dagger$"
    if not math.isfinite(v[0]):
        return "NaN$^\\dagger$"
    return f"{v[0] * 100:.1f}$\\pm${v[1] * 100:.1f}"
