"""Cluster sweeps through Hydra's submitit launcher (conf/hydra/launcher/{local,slurm}.yaml).

``hydra/launcher=local`` is the real submitit code path (each job pickled and run in its own
interpreter, all at once), so it shows what a SLURM array relies on: jobs that share nothing but
the artifact cache still build every shared stage once. The SLURM preset is checked down to the
sbatch script submitit writes, with ``srun``/``sbatch`` faked, since CI has no cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from hydra.core.hydra_config import HydraConfig

from tests.conftest import CONF_DIR

SHARED = ["sft", "preferences", "dpo/helpful", "dpo/harmless", "dpo/humorous"]


def _compose_with_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def _sweep(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """``mpo-exp -m experiment=smoke <overrides>`` in a subprocess, into tmp_path/sweep and tmp_path/cache."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "MPO_EXP_CACHE": str(tmp_path / "cache"),
    }
    return subprocess.run(
        [
            *(sys.executable, "-m", "mpo_exp.cli", "-m", "experiment=smoke", *overrides),
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )


def test_local_sweep_runs_each_job_in_its_own_process_and_builds_shared_stages_once(tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    out = _sweep(
        tmp_path,
        "hydra/launcher=local",
        "hydra.launcher.timeout_min=8",  # submitit kills a job past it: no hung CI run
        "logger=wandb",
        "seed=0",
        "method=mpo,fixed_mix",  # same pi_ref, pairs and pi_k: both jobs need them at once
        "num_threads=1",
    )
    submitit_logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert out.returncode == 0, (out.stderr + submitit_logs)[-4000:]
    # submitit ran the jobs: one folder per job, each with its pickled result
    assert len(list(sweep.glob(".submitit/*/*_result.pkl"))) == 2
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    results = [json.loads((d / "results.json").read_text()) for d in jobs]
    assert sorted(r["method"] for r in results) == ["fixed_mix", "mpo"]
    for d in jobs:  # each job logged its own (offline) wandb run
        assert len(list((d / "wandb").glob("offline-run-*/run-*.wandb"))) == 1

    logs = "".join((d / "cli.log").read_text() for d in jobs)
    for label in SHARED:
        keys = {r["artifacts"][label] for r in results}
        assert len(keys) == 1, label  # both jobs used the same artifact ...
        assert logs.count(f"building {label} ->") == 1, label  # ... built by one of them
        assert logs.count(f"reusing cached {label} from") == 1, label  # and reused by the other
    for kind in ("sft", "pairs", "dpo"):
        entries = [p.name for p in (cache / kind).iterdir() if not p.name.endswith(".lock")]
        assert all(re.fullmatch(r"[0-9a-f]{16}", e) for e in entries), entries  # no temporaries left
        assert all((cache / kind / e / "meta.json").exists() for e in entries)
    assert len(list((cache / "dpo").glob("*/meta.json"))) == 3  # one pi_k per objective, not per job


def test_joblib_sweep_runs_two_jobs_at_once_on_shared_stages(tmp_path):
    """``hydra/launcher=joblib`` (pip install -e '.[sweep]', part of ``make install``): two jobs in
    parallel processes, each given half the cores, the shared stages built once."""
    sweep = tmp_path / "sweep"
    out = _sweep(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "logger=none",
        "method=fixed_mix",
        "eval.n_prompts=16,32",  # two jobs on the same pi_ref, pairs and pi_k
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr  # Hydra's joblib launcher ran them
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert [d.name.split("_", 1)[1].split(",")[0] for d in jobs] == ["eval.n_prompts=16", "eval.n_prompts=32"]
    logs = "".join((d / "cli.log").read_text() for d in jobs)
    for label in SHARED:
        assert logs.count(f"building {label} ->") == 1, label
    cores = len(os.sched_getaffinity(0))
    if cores > 1:  # num_threads: null splits the cores between the n_jobs workers
        assert logs.count(f"torch threads: {max(1, cores // 2)} (num_threads=None") == 2


def test_slurm_preset_reaches_the_sbatch_script(tmp_path, monkeypatch):
    """The preset and command-line overrides become sbatch flags (SLURM itself is faked)."""
    import submitit
    from hydra.utils import instantiate

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    sbatch = f'#!/bin/sh\ncp "$1" "{tmp_path}/script.sh"\necho "Submitted batch job 4242"\n'
    (bin_dir / "sbatch").write_text(sbatch)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(submitit.core.core.Job, "results", lambda self: [self.job_id])

    cfg = _compose_with_hydra(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=30",
            "hydra.launcher.array_parallelism=1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.job.name=mpo-exp",
        ]
    )
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    job_ids = launcher.launch([["method=mpo"], ["method=fixed_mix"]], initial_job_idx=0)
    assert job_ids == ["4242_0", "4242_1"]  # one array, one task per job
    script = (tmp_path / "script.sh").read_text()
    for flag in (
        "--partition=gpu",
        "--gpus-per-node=1",
        "--cpus-per-task=8",
        "--time=30",
        "--mem=64GB",
        "--array=0-1%1",
        "--ntasks-per-node=1",
    ):
        assert f"#SBATCH {flag}\n" in script, (flag, script)


@pytest.mark.parametrize(
    ("overrides", "slurm_env", "expected"),
    [
        (["hydra/launcher=local", "hydra.launcher.cpus_per_task=1"], None, 1),
        (["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1"], "2", 1),  # the launcher's wins
        ([], "1", 1),  # a plain run inside a SLURM allocation
    ],
)
def test_null_num_threads_follows_the_cpus_a_job_was_given(overrides, slurm_env, expected, monkeypatch):
    import torch

    from mpo_exp.runtime import allotted_cpus, configure_threads

    if slurm_env is None:
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    else:
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", slurm_env)
    before = torch.get_num_threads()
    hydra_cfg = HydraConfig.instance()
    previous = hydra_cfg.cfg
    try:
        if overrides:
            hydra_cfg.set_config(_compose_with_hydra(overrides))
        else:  # a plain run: no launcher settings
            hydra_cfg.cfg = None
        assert allotted_cpus() == expected
        assert configure_threads(None) == expected == torch.get_num_threads()
        assert configure_threads(2) == 2  # an explicit num_threads still wins
    finally:
        torch.set_num_threads(before)
        hydra_cfg.cfg = previous


def test_joblib_jobs_inside_a_slurm_allocation_split_it(monkeypatch):
    import torch
    from omegaconf import open_dict

    from mpo_exp.runtime import configure_threads

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    cfg = _compose_with_hydra([])
    with open_dict(cfg):
        cfg.hydra.launcher = {"n_jobs": 2}  # as hydra/launcher=joblib sets it (that plugin is not installed)
    before, hydra_cfg = torch.get_num_threads(), HydraConfig.instance()
    previous = hydra_cfg.cfg
    try:
        hydra_cfg.set_config(cfg)
        assert configure_threads(None) == 1  # 2 allotted CPUs / 2 jobs, not 2 threads in each
    finally:
        torch.set_num_threads(before)
        hydra_cfg.cfg = previous


def test_torchrun_processes_on_a_node_split_its_cpus(monkeypatch):
    """torchrun --nproc_per_node=2 inside a 2-CPU allocation: one thread per process, not two."""
    import torch

    from mpo_exp.runtime import configure_threads

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    before, hydra_cfg = torch.get_num_threads(), HydraConfig.instance()
    previous = hydra_cfg.cfg
    try:
        hydra_cfg.cfg = None
        assert configure_threads(None) == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        assert configure_threads(None) == 2
    finally:
        torch.set_num_threads(before)
        hydra_cfg.cfg = previous
