"""Bootstrap over eval prompts for the "min" of Table 1, paired across policies within a seed.

A row's "min" is the mean over seeds of each seed's minimum over objectives of the win rate. One
bootstrap draw resamples each seed's eval prompts with replacement (independently per seed),
recomputes that seed's per-objective win rates from the per-prompt outcomes (``win_per_prompt``)
and their minimum, and averages over seeds. Every policy evaluated on a seed's prompts uses the
same resampled indices, so the difference of two rows' draws is a paired bootstrap. Runs are paired
only when they measured against the same π_ref responses: the resample is keyed by (seed, number of
prompts, ``pi_ref_fingerprint``), so runs with different fingerprints (other prompts or other π_ref
samples) are resampled independently, as unpaired samples should be; results written before the
fingerprint was recorded are paired by (seed, number of prompts) alone, and the report says so. A
draw is a matrix product of resample counts (B, n) with outcomes (n, K), so B=1000 costs milliseconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

DEFAULT_B = 1000
LEVEL = 0.95


def outcome_matrix(metrics: dict, objectives: list[str]) -> np.ndarray | None:
    """Per-prompt outcomes (K, n) in {0, 0.5, 1}; None when absent, ragged or not finite."""
    wpp = metrics.get("win_per_prompt")
    if not isinstance(wpp, dict) or any(not isinstance(wpp.get(o), list) for o in objectives):
        return None
    cols = [wpp[o] for o in objectives]
    n = len(cols[0])
    if n == 0 or any(len(c) != n for c in cols):
        return None
    try:
        w = np.asarray(cols, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return w if np.isfinite(w).all() else None


Fingerprints = Mapping[int, str | None]


def _words(fingerprint: str | None) -> list[int]:
    """A fingerprint as seed words for the resample's generator (none for older results)."""
    if fingerprint is None:
        return []
    digest = hashlib.sha256(fingerprint.encode()).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


class PromptBootstrap:
    """Resample counts per (seed, number of prompts, π_ref fingerprint), shared by every row: the pairing."""

    def __init__(self, n_boot: int = DEFAULT_B, seed: int = 0) -> None:
        self.n_boot, self.seed = int(n_boot), int(seed)
        self._counts: dict[tuple[int, int, str | None], np.ndarray] = {}

    def counts(self, run_seed: int, n: int, fingerprint: str | None = None) -> np.ndarray:
        """(B, n): how often each of the n prompts is drawn in each resample."""
        key = (int(run_seed), int(n), fingerprint)
        if key not in self._counts:
            words = [self.seed, int(run_seed) & 0xFFFFFFFF, int(n), *_words(fingerprint)]
            rng = np.random.default_rng(words)
            idx = rng.integers(0, n, size=(self.n_boot, n))
            idx += np.arange(self.n_boot)[:, None] * n
            flat = np.bincount(idx.ravel(), minlength=self.n_boot * n)
            self._counts[key] = flat.reshape(self.n_boot, n).astype(np.float64)
        return self._counts[key]

    def min_draws(
        self, outcomes_by_seed: dict[int, np.ndarray], fingerprints: Fingerprints | None = None
    ) -> np.ndarray:
        """(B,) draws of mean over seeds of min over objectives of the resampled win rates."""
        fps = fingerprints or {}
        per_seed = []
        for run_seed, w in sorted(outcomes_by_seed.items()):
            n = w.shape[1]
            rates = self.counts(run_seed, n, fps.get(run_seed)) @ w.T / n  # (B, K)
            per_seed.append(rates.min(axis=1))
        return np.mean(per_seed, axis=0)

    def rate_draws(
        self, outcomes_by_seed: dict[int, np.ndarray], fingerprints: Fingerprints | None = None
    ) -> np.ndarray:
        """(B, K) draws of the per-objective win rates, averaged over seeds."""
        fps = fingerprints or {}
        per_seed = [
            self.counts(run_seed, w.shape[1], fps.get(run_seed)) @ w.T / w.shape[1]
            for run_seed, w in sorted(outcomes_by_seed.items())
        ]
        return np.mean(per_seed, axis=0)


def family_level(m: int, level: float = LEVEL) -> float:
    """Each of m comparisons' interval level so that all m hold together at ``level`` (Bonferroni)."""
    return 1 - (1 - level) / max(m, 1)


def interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap draws."""
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
