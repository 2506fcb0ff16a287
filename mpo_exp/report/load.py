"""Reading a sweep: results.json files, grouped by objective set; rows keyed by (β, policy, normalisation)."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("mpo_exp.report")

REQUIRED = ("objectives", "policies", "cost", "seed", "beta", "method", "method_policies")

# display order and names: single-objective policies first, MPO last (as in the paper)
ORDER = [
    "pi_ref",
    "pi_",
    "uniform_mix",
    "fixed_mix",
    "reward_soup",
    "weighted_reward_soup",
    "maxmin_rlhf",
    "morlhf",
    "modpo",
    "ric",
    "mpo_without",
    "mpo",
]
PRETTY = {
    "pi_ref": "π_ref",
    "uniform_mix": "Uniform mixing",
    "reward_soup": "Reward Soups",
    "reward_soups": "Reward Soups (Weighted RS λ)",
    "weighted_reward_soup": "Weighted RS",
    "maxmin_rlhf": "MaxMin-RLHF",
    "maxmin_rlhf_group_min": "MaxMin-RLHF (group-min)",
    "maxmin_rlhf_sample_min": "MaxMin-RLHF (sample-min)",
    "maxmin_rlhf_group_min_em": "MaxMin-RLHF (group-min, EM)",
    "maxmin_rlhf_sample_min_em": "MaxMin-RLHF (sample-min, EM)",
    "mpo": "MPO",
}
#: methods that take user weights (``method.weights``), by display name. Their policy is named
#: ``<method>`` for uniform weights, ``<method>_mpo_lambda`` for MPO's λ (baselines/user_weights.py)
#: and ``<method>_<w_1>_..._<w_K>`` for fixed weights (fixed_mix always so).
WEIGHTED = {"fixed_mix": "MOD", "morlhf": "MORLHF", "modpo": "MODPO", "ric": "RiC"}
MPO_LAMBDA = "mpo_lambda"
_WEIGHTS_RE = re.compile(r"^(?P<method>[a-z][a-z0-9_]*?)_(?P<w>\d+(?:\.\d+)?(?:_\d+(?:\.\d+)?)+)$")
#: a name's weights are printed with 2 decimals: uniform within this
UNIFORM_TOL = 0.005 + 1e-9
#: methods trained with RL on reward models, whose results say how the rewards were normalised
RL_METHODS = ("morlhf", "maxmin_rlhf")


class ReportError(ValueError):
    """The sweep cannot be summarised as it stands; the message names the run directory."""


def parse_weights(name: str) -> tuple[str, tuple[float, ...]] | None:
    """(method, weights) of a fixed-weight policy name ``<method>_<w_1>_..._<w_K>``; None otherwise."""
    m = _WEIGHTS_RE.match(name)
    if m is None:
        return None
    return m["method"], tuple(float(x) for x in m["w"].split("_"))


def is_uniform(weights: tuple[float, ...]) -> bool:
    return all(abs(w - 1 / len(weights)) <= UNIFORM_TOL for w in weights)


def weights_text(weights: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{w:g}" for w in weights) + ")"


def pretty(name: str) -> str:
    if name in PRETTY:
        return PRETTY[name]
    if name in WEIGHTED:
        return f"{WEIGHTED[name]} (uniform w)"
    for method in WEIGHTED:
        if name == f"{method}_{MPO_LAMBDA}":
            return f"{WEIGHTED[method]} (MPO's λ)"
    parsed = parse_weights(name)
    if parsed is not None:
        return f"{WEIGHTED.get(parsed[0], parsed[0])} (w={weights_text(parsed[1])})"
    if name.startswith("pi_"):
        return "π_" + name[3:]
    if name.startswith("mpo") and "_without_" in name:
        base, left_out = name.split("_without_", 1)
        return f"{pretty(base)} w/o π_{left_out}"
    if name.startswith("mpo_"):
        return variant_label(name)
    return name


def variant_label(name: str) -> str:
    """``mpo_decoded_cal_std`` -> "MPO (decoded, std-calibrated)"."""
    rest = name[len("mpo_") :]
    parts = []
    for token, text in (("decoded", "decoded"), ("mixture", "mixture proposal")):
        if rest.startswith(token):
            parts.append(text)
            rest = rest[len(token) :].lstrip("_")
    if rest.startswith("cal_"):
        parts.append(f"{rest[4:]}-calibrated")
    elif rest:
        parts.append(rest)
    return f"MPO ({', '.join(parts)})"


def order_key(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(ORDER):
        if (
            name == prefix
            or (prefix.endswith("_") and name.startswith(prefix))
            or name.startswith(prefix + "_")
        ):
            return (i, name)
    return (len(ORDER), name)


@dataclass
class Sweep:
    root: Path
    runs: list[dict]
    skipped: list[tuple[Path, str]]


def load_sweep(root: str | os.PathLike) -> Sweep:
    """Every job directory's results.json in directory order; missing or corrupt ones named and skipped."""
    root = Path(root)
    runs, skipped = [], []
    job_dirs = sorted(
        {p.parent for p in root.rglob(".hydra")} | {p.parent for p in root.rglob("results.json")}
    )
    for job in job_dirs:
        path = job / "results.json"
        if not path.exists():
            skipped.append((path, "missing (the job did not finish)"))
            continue
        try:
            res = json.loads(path.read_text())
            if not isinstance(res, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in REQUIRED if k not in res]
            if missing:
                raise ValueError(f"missing keys {missing}")
        except (json.JSONDecodeError, ValueError, UnicodeDecodeError) as e:
            skipped.append((path, f"corrupt: {e}"))
            continue
        res["_dir"] = str(job)
        res["_rel"] = str(job.relative_to(root)) if job != root else "."
        runs.append(res)
    for path, why in skipped:
        log.warning("skipping %s: %s", path, why)
    return Sweep(root, runs, skipped)


def objective_groups(runs: Iterable[dict]) -> list[tuple[list[str], list[dict]]]:
    """Runs grouped by objective set (never merged under another run's objectives), in order of appearance.

    Runs that list the same objectives in another order share a group; columns follow the first run.
    """
    groups: dict[frozenset[str], tuple[list[str], list[dict]]] = {}
    for res in runs:
        groups.setdefault(frozenset(res["objectives"]), (list(res["objectives"]), []))[1].append(res)
    return list(groups.values())


# ---- rows ---------------------------------------------------------------------------------------
#: (beta, policy name, reward normalisation of the RL method that produced it, or None)
RowKey = tuple[float, str, "str | None"]


@dataclass
class Duplicate:
    """Two jobs that both produced the same (β, seed, policy) row of a method's own policy."""

    beta: float
    policy: str
    norm: str | None
    seed: int
    kept: str
    dropped: str


@dataclass
class Entry:
    """One seed's metrics for one row, and the run they come from."""

    metrics: dict
    run: dict
    own: bool  # a policy the job's method produced (not a shared pi_ref / pi_k / uniform row)
    source: str = ""  # the policy's name in the run (a row name may differ: see row_name)


@dataclass
class Records:
    rows: dict[RowKey, dict[int, Entry]] = field(default_factory=lambda: defaultdict(dict))
    duplicates: list[Duplicate] = field(default_factory=list)

    def norms(self, beta: float, name: str) -> set[str | None]:
        return {k[2] for k in self.rows if k[0] == beta and k[1] == name}

    def label(self, key: RowKey) -> str:
        """Display name; the reward normalisation is appended when one (β, policy) has several."""
        beta, name, norm = key
        if len(self.norms(beta, name)) > 1:
            return f"{pretty(name)} [{norm or 'normalisation not recorded'}]"
        return pretty(name)

    def sorted_keys(self) -> list[RowKey]:
        return sorted(self.rows, key=lambda k: (k[0], order_key(k[1]), k[2] or ""))


def row_normalization(res: dict, name: str) -> str | None:
    if name not in res["method_policies"]:
        return None
    norm = res.get("reward_normalization")
    return None if norm is None else str(norm)


def in_table1(name: str) -> bool:
    """Every row but fixed user weights (the Pareto fronts' table) and leave-one-out (the ablation).

    Methods that take weights are here with uniform weights and with MPO's λ.
    """
    return parse_weights(name) is None and not (name.startswith("mpo") and "_without_" in name)


def row_name(name: str) -> str:
    """A fixed-weight policy at uniform weights is the method's uniform row (``morlhf_0.50_0.50`` is
    ``morlhf``), so a weight grid that holds the uniform point gives the max-min table its row.
    MOD with MPO's λ (``fixed_mix_mpo_lambda``) is MPO's policy (the same λ, π_k and decoder;
    tests/test_user_weights.py), so it is MPO's row: the variant recorded in ``mpo_policy``
    (see :func:`collect`; ``mpo`` for runs that predate it)."""
    if name == f"fixed_mix_{MPO_LAMBDA}":
        return "mpo"
    parsed = parse_weights(name)
    if parsed is not None and parsed[0] in WEIGHTED and is_uniform(parsed[1]):
        return parsed[0]
    return name


def collect(runs: Iterable[dict]) -> Records:
    """(β, policy, normalisation) -> seed -> metrics.

    Rows shared by every job (pi_ref, pi_k, uniform mixing) are taken once per seed, from the first
    job in directory order. A method's own policy given by two jobs for the same (β, seed) is a
    duplicate: the first is kept and both directories are recorded for the report.
    """
    rec = Records()
    for res in runs:
        seed, beta = int(res["seed"]), float(res["beta"])
        for source, metrics in res["policies"].items():
            name = row_name(source) if source in res["method_policies"] else source
            if name == "mpo" and source != "mpo":  # MOD with MPO's lambda: the MPO variant that made it
                name = str(res.get("mpo_policy", "mpo"))
            key = (beta, name, row_normalization(res, source))
            own = source in res["method_policies"]
            by_seed = rec.rows[key]
            if seed in by_seed:
                prev = by_seed[seed]
                if own and prev.own:
                    rec.duplicates.append(Duplicate(beta, name, key[2], seed, prev.run["_rel"], res["_rel"]))
                continue
            by_seed[seed] = Entry(metrics if isinstance(metrics, dict) else {}, res, own, source)
    return rec


def normalization_line(runs: Iterable[dict], records: Records) -> str | None:
    """Which reward normalisation each RL baseline used (None when the group has no RL runs)."""
    used: dict[str, set[str]] = defaultdict(set)
    for res in runs:
        if res["method"] in RL_METHODS or "reward_normalization" in res:
            norm = res.get("reward_normalization")
            used[res["method"]].add("not recorded" if norm is None else str(norm))
    if not used:
        return None
    parts = [f"{pretty(m).split(' (')[0]} → {', '.join(sorted(v))}" for m, v in sorted(used.items())]
    line = "Reward normalisation of the RL baselines: " + "; ".join(parts) + "."
    split = sorted({(b, n) for (b, n, _) in records.rows if len(records.norms(b, n)) > 1}, key=lambda k: k[0])
    if split:
        line += (
            " Different normalisations for the same method and β are never averaged: "
            + ", ".join(f"{pretty(n)} at β={b:g}" for b, n in split)
            + " appear as one row per normalisation."
        )
    return line


# ---- values -------------------------------------------------------------------------------------
def metric(metrics: dict, key: str, objective: str | None = None) -> float | None:
    """One number from a policy's metrics; None when missing or not a number, NaN kept as NaN."""
    value = metrics.get(key)
    if objective is not None:
        value = value.get(objective) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    """Mean and std over seeds; None if any seed lacks the value, (nan, nan) if any is NaN or inf."""
    if not values or any(v is None for v in values):
        return None
    if any(not math.isfinite(v) for v in values):
        return (math.nan, math.nan)
    m = math.fsum(values) / len(values)
    s = math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def is_ok(value: tuple[float, float] | None) -> bool:
    return value is not None and math.isfinite(value[0])
