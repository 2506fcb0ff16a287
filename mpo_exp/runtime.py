"""Process-level settings a job applies before any compute: the torch thread count.

On a shared machine, torch's default (one thread per core, in every process) oversubscribes the
cores: with four jobs on 2 cores one SFT stage went from 23 s to 504 s. ``num_threads: null``
(the default) gives each job ``cores // parallel jobs`` threads, where the parallel jobs are the
joblib launcher's ``n_jobs`` in a local sweep and 1 otherwise; an integer sets it explicitly.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def parallel_jobs() -> int:
    """How many jobs of this sweep run at once on this machine (joblib's n_jobs, else 1)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return 1
        n_jobs = HydraConfig.get().launcher.get("n_jobs")
    except Exception:  # no launcher config (compose API, tests)
        return 1
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    return os.cpu_count() or 1 if n_jobs < 0 else n_jobs


def configure_threads(num_threads: int | None) -> int:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = int(num_threads) if num_threads else max(1, cores // parallel_jobs())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
        log.info("torch threads: %d (num_threads=%s, %d cores)", n, num_threads, cores)
    return n
