"""Experiment tracking through Lightning loggers (wandb offline by default, csv, or none)."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)


def build_logger(cfg: DictConfig, method: str, output_dir: Path) -> Logger | None:
    if cfg.logger is None or not cfg.logger.get("_target_"):
        return None
    kwargs: dict = {}
    if cfg.logger._target_.endswith("WandbLogger"):
        kwargs = {
            "name": f"{method}-beta{cfg.beta}-seed{cfg.seed}",
            "tags": [f"method:{method}", f"beta:{cfg.beta}", f"seed:{cfg.seed}", *cfg.logger.get("tags", [])],
            "save_dir": str(output_dir),
        }
        if not cfg.logger.get("group") and _in_multirun():
            kwargs["group"] = output_dir.parent.name  # the sweep directory: one group per sweep
    else:
        kwargs = {"save_dir": str(output_dir)}
    logger = instantiate(cfg.logger, **kwargs)
    if isinstance(logger, WandbLogger):
        logger.experiment.config.update(OmegaConf.to_container(cfg, resolve=True), allow_val_change=True)
    return logger


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def log_metrics(logger: Logger | None, metrics: dict, step: int | None = None) -> None:
    if logger is not None:
        logger.log_metrics(metrics, step=step)


def log_results(logger: Logger | None, results: dict) -> None:
    """Per-objective rewards, win rates and costs as summary metrics, plus a wandb Table."""
    if logger is None:
        return
    flat: dict[str, float] = {}
    for name, pol in results["policies"].items():
        for obj in results["objectives"]:
            flat[f"eval/{name}/reward/{obj}"] = pol["reward"][obj]
            flat[f"eval/{name}/reward_z/{obj}"] = pol["reward_z"][obj]
            flat[f"eval/{name}/win_rate/{obj}"] = pol["win_rate"][obj]
        flat[f"eval/{name}/min_win_rate"] = pol["min_win_rate"]
        flat[f"eval/{name}/min_reward_z"] = pol["min_reward_z"]
        flat[f"eval/{name}/kl"] = pol["kl"]
    for stage, cost in results["cost"].items():
        for key in ("wall_s", "flops", "tokens_fwd", "tokens_bwd"):
            flat[f"cost/{stage}/{key}"] = cost[key]
    logger.log_metrics(flat)
    if isinstance(logger, WandbLogger):
        objs = results["objectives"]
        columns = [
            "policy",
            *[f"win_{o}" for o in objs],
            "min_win_rate",
            *[f"z_{o}" for o in objs],
            "min_reward_z",
            "kl",
        ]
        rows = [
            [
                name,
                *[p["win_rate"][o] for o in objs],
                p["min_win_rate"],
                *[p["reward_z"][o] for o in objs],
                p["min_reward_z"],
                p["kl"],
            ]
            for name, p in results["policies"].items()
        ]
        logger.log_table("results", columns=columns, data=rows)
        if results.get("lambda") is not None:
            logger.experiment.summary["lambda"] = dict(zip(objs, results["lambda"], strict=True))


def finish(logger: Logger | None) -> None:
    """Close the wandb run so that jobs of a multirun never merge into one."""
    if logger is None:
        return
    logger.finalize("success")
    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish()
