"""``mpo-exp``: compose the Hydra config, validate it, run the pipeline, print the table."""

from __future__ import annotations

import logging
import os
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
    from transformers.utils import logging as hf_logging

    from mpo_exp.config import validate_config
    from mpo_exp.pipeline import run_pipeline
    from mpo_exp.results import format_cost, format_table

    hf_logging.disable_progress_bar()
    validate_config(cfg)
    output_dir = cfg.paths.output_dir or HydraConfig.get().runtime.output_dir
    results = run_pipeline(cfg, output_dir)
    print("\n" + format_table(results) + "\n")
    print(format_cost(results) + "\n")
    if results.get("lambda") is not None:
        print(
            "lambda:", dict(zip(results["objectives"], [round(x, 4) for x in results["lambda"]], strict=True))
        )
    print(f"results: {Path(output_dir) / 'results.json'}  ({results['wall_s_this_run']:.1f} s)")
    main_policy = results["method_policies"][0] if results["method_policies"] else None
    return results["policies"][main_policy]["min_win_rate"] if main_policy else None


if __name__ == "__main__":
    main()
