"""``mpo-exp``: compose the Hydra config, validate it, run the pipeline, print the table."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

# Set before transformers/wandb are imported anywhere: the default path never needs the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("mpo_exp")


def _config_dir() -> str:
    repo_conf = Path(__file__).resolve().parents[1] / "conf"
    return str(repo_conf) if repo_conf.is_dir() else "pkg://mpo_exp.conf"


@hydra.main(version_base="1.3", config_path=_config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    results = run_job(cfg, cfg.paths.output_dir or HydraConfig.get().runtime.output_dir)
    main_policy = results["method_policies"][0] if results["method_policies"] else None
    return results["policies"][main_policy]["min_win_rate"] if main_policy else None


def run_job(cfg: DictConfig, output_dir: str) -> dict:
    """Validate, then run one job. A user error exits with status 2 and one line naming the field;
    a bug still shows its traceback."""
    from mpo_exp.config import ConfigError, check_writable, validate_config

    try:
        validate_config(cfg)  # static: answers before torch / transformers / Lightning are imported
        check_writable("paths.output_dir", output_dir)
        check_writable("paths.cache_dir", cfg.paths.cache_dir)
        from mpo_exp.config import validate_runtime

        validate_runtime(cfg)
        from transformers.utils import logging as hf_logging

        from mpo_exp.pipeline import run_pipeline

        hf_logging.disable_progress_bar()
        results = run_pipeline(cfg, output_dir, announce=_print_results)
    except ConfigError as e:
        print(f"mpo-exp: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"results: {Path(output_dir) / 'results.json'}  ({results['wall_s_this_run']:.1f} s)")
    return results


def _print_results(results: dict) -> None:
    """The table goes to the terminal before any file is written: a full disk cannot lose it."""
    from mpo_exp.results import format_cost, format_table

    print("\n" + format_table(results) + "\n")
    print(format_cost(results) + "\n")
    if results.get("lambda") is not None:
        lam = dict(zip(results["objectives"], [round(x, 4) for x in results["lambda"]], strict=True))
        print("lambda:", lam)


if __name__ == "__main__":
    main()
