"""Reading a sweep: results.json files, grouped by objective set; rows keyed by (β, policy, normalisation,
setting), the setting being the job's result-changing config (``results["config"]``) less the seed."""

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

from mpo_exp.report.curves import CHECKPOINT

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
#: a name's weights are printed with 2 decimals: uniform within this (files without recorded weights)
UNIFORM_TOL = 0.005 + 1e-9
#: recorded weights (``results["lambda"]``) equal to this: float round-off, never a different setting
WEIGHT_TOL = 1e-9
#: two jobs' copies of a shared row (π_ref, π_k, uniform mixing) agree when their win rates do within this
AGREE_TOL = 1e-9
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


def is_uniform(weights: tuple[float, ...], tol: float = UNIFORM_TOL) -> bool:
    return all(abs(w - 1 / len(weights)) <= tol for w in weights)


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


def job_order(path: Path) -> tuple:
    """Natural order of job directories: numbers compare as numbers, so Hydra's job ``2_...`` comes
    before ``10_...`` (the job-number order; plain string order would put ``10_`` first)."""
    return tuple(
        tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", part) if t)
        for part in path.parts
    )


def load_sweep(root: str | os.PathLike) -> Sweep:
    """Every job directory's results.json in job order (:func:`job_order`); missing or corrupt ones
    named and skipped."""
    root = Path(root)
    runs, skipped = [], []
    job_dirs = sorted(
        {p.parent for p in root.rglob(".hydra")} | {p.parent for p in root.rglob("results.json")},
        key=lambda p: job_order(p.relative_to(root)),
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


# ---- settings -----------------------------------------------------------------------------------
#: sorted (dotted config path, JSON value) pairs: the config a row's jobs were run with, less the seed;
#: None for results written before the config was recorded (``results["config"]``)
Setting = tuple[tuple[str, str], ...] | None
#: never a grouping field: seeds pool into one row, and β is a row's own key
NOT_GROUPING = ("seed", "beta")
#: config sections that only a method's own policies read (π_ref, the π_k and uniform mixing do not)
METHOD_SECTIONS = ("method", "rl", "reward_model", "mpo_scores", "mpo_decoded", "modpo", "ric")
#: sections a method's policies are known not to read; any other method keeps every section (one
#: setting split in two rows shows in the labels, two settings merged in one row would not)
UNUSED_BY = {
    **{m: ("rl", "reward_model") for m in ("mpo", "fixed_mix", "landscape", "reward_soups")},
    "modpo": ("rl",),
    "ric": ("rl",),
}
#: how many differing config fields a row's label names before "+N more"
LABEL_FIELDS = 4


def _flatten(node: object, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(node, dict) and node:
        return [kv for k, v in node.items() for kv in _flatten(v, f"{prefix}{k}.")]
    return [(prefix[:-1], json.dumps(node, sort_keys=True))]


def row_setting(res: dict, source: str, own: bool) -> Setting:
    """What a row's policy depends on: for a shared row the config less the method's sections; for a
    method's own policy all of it but the sections its method never reads, with the nested MPO config
    (``method.mpo``) only when it made the weights (MOD with MPO's λ is MPO's policy: its
    ``method.mpo`` stands as ``method``, so it shares the MPO job's row). User weights count as
    resolved (``results["lambda"]``): ``weights=null`` and ``[0.5, 0.5]`` are one setting."""
    cfg = res.get("config")
    if not isinstance(cfg, dict):
        return None
    cfg = {k: v for k, v in cfg.items() if k not in NOT_GROUPING}
    dropped = UNUSED_BY.get(str(res["method"]), ()) if own else METHOD_SECTIONS
    cfg = {k: v for k, v in cfg.items() if k not in dropped}
    method = cfg.get("method")
    if own and isinstance(method, dict):
        if source == f"fixed_mix_{MPO_LAMBDA}" and isinstance(method.get("mpo"), dict):
            cfg["method"] = method["mpo"]
        elif method.get("weights") != "mpo":
            cfg["method"] = {k: v for k, v in method.items() if k != "mpo"}
            lam = res.get("lambda")
            if "weights" in method and isinstance(lam, list):  # null, a list or a mapping: as resolved
                cfg["method"]["weights"] = [round(float(x), 12) for x in lam]
    return tuple(sorted(_flatten(cfg)))


def shared_part(setting: Setting) -> Setting:
    """The part of a row's setting that π_ref, the π_k and uniform mixing depend on."""
    if setting is None:
        return None
    return tuple(kv for kv in setting if kv[0].split(".")[0] not in METHOD_SECTIONS)


def _shown(value: str | None) -> str:
    if value is None:
        return "unset"
    v = json.loads(value)
    return v if isinstance(v, str) else json.dumps(v)


def setting_text(setting: Setting, others: Iterable[Setting]) -> str:
    """The fields in which ``setting`` differs from the other settings of its row name, as
    ``path=value``; for results without a recorded config, say so."""
    if setting is None:
        return "config not recorded"
    known = [dict(s) for s in others if s is not None]
    mine = dict(setting)
    paths = sorted({p for s in known for p in s} | set(mine))
    diff = [p for p in paths if len({s.get(p) for s in known} | {mine.get(p)}) > 1]
    if not diff:
        return "config recorded"
    parts = [f"{p}={_shown(mine.get(p))}" for p in diff[:LABEL_FIELDS]]
    if len(diff) > LABEL_FIELDS:
        parts.append(f"+{len(diff) - LABEL_FIELDS} more fields")
    return ", ".join(parts)


def pi_ref_fingerprint(res: dict) -> str | None:
    """Hash of the π_ref responses a run's win rates were measured against (None in older files)."""
    fp = res.get("pi_ref_fingerprint")
    return fp if isinstance(fp, str) else None


def recorded_weights(res: dict, name: str) -> tuple[float, ...] | None:
    """The weights a fixed-weight policy ``<method>_<w_1>_..._<w_K>`` was made with, at full precision:
    its job's ``results["lambda"]`` (the name rounds them to 2 decimals). None when not recorded."""
    parsed = parse_weights(name)
    lam = res.get("lambda")
    if parsed is None or not isinstance(lam, list) or len(lam) != len(parsed[1]):
        return None
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in lam):
        return None
    return tuple(float(x) for x in lam)


def same_weights(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    return (
        a is not None
        and b is not None
        and len(a) == len(b)
        and all(abs(x - y) <= WEIGHT_TOL for x, y in zip(a, b, strict=True))
    )


# ---- rows ---------------------------------------------------------------------------------------
#: (beta, policy name, reward normalisation of the RL method that produced it or None, setting)
RowKey = tuple[float, str, "str | None", Setting]


@dataclass
class Duplicate:
    """Two jobs that both produced the same (β, seed, policy, setting) row of a method's own policy."""

    beta: float
    policy: str
    norm: str | None
    seed: int
    kept: str
    dropped: str
    key: RowKey | None = None


@dataclass
class Disagreement:
    """Two jobs whose copies of a shared row (π_ref, a π_k, uniform mixing) differ for one (β, seed)."""

    key: RowKey
    seed: int
    kept: str
    other: str


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
    disagreements: list[Disagreement] = field(default_factory=list)

    def norms(self, beta: float, name: str) -> set[str | None]:
        return {k[2] for k in self.rows if k[0] == beta and k[1] == name}

    def label(self, key: RowKey) -> str:
        """Display name; the reward normalisation is appended when one (β, policy) has several, and the
        differing config fields when one (β, policy, normalisation) has several settings."""
        beta, name, norm, setting = key
        text = pretty(name)
        if len(self.norms(beta, name)) > 1:
            text += f" [{norm or 'normalisation not recorded'}]"
        settings = {k[3] for k in self.rows if k[:3] == key[:3]}
        if len(settings) > 1:
            text += f" [{setting_text(setting, settings - {setting})}]"
        return text

    def sorted_keys(self) -> list[RowKey]:
        return sorted(
            self.rows, key=lambda k: (k[0], order_key(k[1]), k[2] or "", k[3] is not None, k[3] or ())
        )


def row_normalization(res: dict, name: str) -> str | None:
    if name not in res["method_policies"]:
        return None
    norm = res.get("reward_normalization")
    return None if norm is None else str(norm)


def in_table1(name: str) -> bool:
    """Every row but fixed user weights (the Pareto fronts' table), leave-one-out (the ablation) and
    checkpoints saved along training (``morlhf@it8``, ``modpo@step12``).

    Methods that take weights are here with uniform weights and with MPO's λ.
    """
    if CHECKPOINT.match(name):  # a point of a cost-to-quality curve, not a row
        return False
    return parse_weights(name) is None and not (name.startswith("mpo") and "_without_" in name)


def row_name(name: str, weights: tuple[float, ...] | None = None) -> str:
    """A fixed-weight policy at uniform weights is the method's uniform row (``morlhf_0.50_0.50`` is
    ``morlhf``), so a weight grid that holds the uniform point gives the max-min table its row; the
    recorded ``weights`` decide (``morlhf_0.33_0.33_0.33`` made with (0.333, 0.333, 0.334) is a
    front point), the name's 2 decimals only for files without them.
    MOD with MPO's λ (``fixed_mix_mpo_lambda``) is MPO's policy (the same λ, π_k and decoder;
    tests/test_user_weights.py), so it is MPO's row: the variant recorded in ``mpo_policy``
    (see :func:`collect`; ``mpo`` for runs that predate it)."""
    if name == f"fixed_mix_{MPO_LAMBDA}":
        return "mpo"
    parsed = parse_weights(name)
    uniform = parsed is not None and (
        is_uniform(parsed[1]) if weights is None else is_uniform(weights, WEIGHT_TOL)
    )
    if parsed is not None and parsed[0] in WEIGHTED and uniform:
        return parsed[0]
    return name


def _close(a: object, b: object) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        a, b = float(a), float(b)
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= AGREE_TOL
    return a == b


def same_win_rates(a: dict, b: dict) -> bool:
    """Two copies of one shared row agree: the same win rate per objective and minimum, up to round-off."""
    wa, wb = a.get("win_rate"), b.get("win_rate")
    if not isinstance(wa, dict) or not isinstance(wb, dict) or set(wa) != set(wb):
        return wa == wb and _close(a.get("min_win_rate"), b.get("min_win_rate"))
    return all(_close(wa[o], wb[o]) for o in wa) and _close(a.get("min_win_rate"), b.get("min_win_rate"))


def collect(runs: Iterable[dict]) -> Records:
    """(β, policy, normalisation, setting) -> seed -> metrics.

    Rows shared by every job (pi_ref, pi_k, uniform mixing) are taken once per seed and setting from
    the first job in job order (:func:`job_order`: the lowest Hydra job number); every other job's
    copy is checked against it, and one that differs is a :class:`Disagreement` the report names.
    A method's own policy given by two jobs for the same (β, seed, setting) is a duplicate: the first
    is kept and both directories are recorded for the report.
    """
    rec = Records()
    for res in runs:
        seed, beta = int(res["seed"]), float(res["beta"])
        for source, metrics in res["policies"].items():
            own = source in res["method_policies"]
            name = row_name(source, recorded_weights(res, source)) if own else source
            if name == "mpo" and source != "mpo":  # MOD with MPO's lambda: the MPO variant that made it
                name = str(res.get("mpo_policy", "mpo"))
            key = (beta, name, row_normalization(res, source), row_setting(res, source, own))
            metrics = metrics if isinstance(metrics, dict) else {}
            by_seed = rec.rows[key]
            if seed in by_seed:
                prev = by_seed[seed]
                if own and prev.own:
                    rec.duplicates.append(
                        Duplicate(beta, name, key[2], seed, prev.run["_rel"], res["_rel"], key)
                    )
                elif not own and not prev.own and not same_win_rates(prev.metrics, metrics):
                    rec.disagreements.append(Disagreement(key, seed, prev.run["_rel"], res["_rel"]))
                    log.warning(
                        "%s at β=%g, seed %d: jobs %s and %s disagree on its win rates; shown: %s's",
                        pretty(name),
                        beta,
                        seed,
                        prev.run["_rel"],
                        res["_rel"],
                        prev.run["_rel"],
                    )
                continue
            by_seed[seed] = Entry(metrics, res, own, source)
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
    split = sorted(
        {(k[0], k[1]) for k in records.rows if len(records.norms(k[0], k[1])) > 1}, key=lambda k: k[0]
    )
    if split:
        line += (
            " Different normalisations for the same method and β are never averaged: "
            + ", ".join(f"{pretty(n)} at β={b:g}" for b, n in split)
            + " appear as one row per normalisation."
        )
    return line


def settings_note(records: Records) -> str | None:
    """Says which rows were split by config (never averaged), when any was."""
    split = sorted(
        {(k[0], k[1]) for k in records.rows if len({j[3] for j in records.rows if j[:3] == k[:3]}) > 1},
        key=lambda k: (k[0], order_key(k[1])),
    )
    if not split:
        return None
    return (
        "Jobs run with different settings are never averaged (results.json `config`, seed aside): "
        + ", ".join(f"{pretty(n)} at β={b:g}" for b, n in split)
        + " appear as one row per setting, labelled by the fields that differ."
    )


def disagreements_note(records: Records) -> str | None:
    """One line per shared row whose copies differ between jobs (they should be the same policy)."""
    if not records.disagreements:
        return None
    items = [
        f"{records.label(d.key)} at β={d.key[0]:g}, seed {d.seed}: `{d.kept}` ≠ `{d.other}`"
        for d in records.disagreements
    ]
    return (
        "Shared rows that differ between jobs (the same π_ref, π_k or uniform mixing should give the same "
        "win rates in every job): " + "; ".join(items) + ". Shown: the lowest job number's copy."
    )


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
