"""Process-level settings a job applies before any compute: the torch thread count.

On a shared machine, torch's default (one thread per core, in every process) oversubscribes the
cores: with four jobs on 2 cores one SFT stage went from 23 s to 504 s. ``num_threads: null``
(the default) gives each job ``cores // parallel jobs``, where the cores are those allotted to it
(the submitit launchers' ``cpus_per_task`` with ``hydra/launcher=slurm|local``, else
``SLURM_CPUS_PER_TASK`` inside a SLURM allocation, else the machine's) and the parallel jobs are
the joblib launcher's ``n_jobs`` in a local sweep (times torchrun's processes per node). An
integer sets it explicitly.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def _launcher_setting(name: str):
    """A field of this job's Hydra launcher config, or None outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        return HydraConfig.get().launcher.get(name)
    except Exception:  # no launcher config (compose API, tests)
        return None


def parallel_jobs() -> int:
    """How many processes share this machine's (or allocation's) cores: the sweep's jobs running at
    once (joblib's n_jobs, else 1) times this job's processes on this node (torchrun's
    ``LOCAL_WORLD_SIZE``, else 1)."""
    n_jobs = _launcher_setting("n_jobs")
    jobs = 1
    if isinstance(n_jobs, int) and n_jobs != 0:
        jobs = (os.cpu_count() or 1) if n_jobs < 0 else n_jobs
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return jobs * (int(local) if local.isdigit() and int(local) > 0 else 1)


def allotted_cpus() -> int | None:
    """CPUs the launcher gave this job: submitit's ``cpus_per_task`` or SLURM's, if either is set.

    submitit_local starts every job at once and enforces nothing, so its ``cpus_per_task`` is the
    only way a job knows its share; under SLURM the variable also covers plain ``sbatch`` runs.
    """
    n = _launcher_setting("cpus_per_task")
    if isinstance(n, int) and n >= 1:
        return n
    env = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(env) if env.isdigit() and int(env) > 0 else None


def configure_threads(num_threads: int | None) -> int:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if num_threads:
        n = int(num_threads)
    else:  # joblib inside a SLURM allocation splits the allocation, not the node
        allotted = allotted_cpus()
        n = max(1, (min(allotted, cores) if allotted else cores) // parallel_jobs())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    log.info("torch threads: %d (num_threads=%s, %d cores)", n, num_threads, cores)
    return n
