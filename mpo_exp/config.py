"""Validate the composed config at the door: every error names the field and the bad value."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from mpo_exp.methods import Method
    from mpo_exp.tasks.base import Task


class ConfigError(ValueError):
    """A config value is invalid; the message names the field."""


def _build(node: DictConfig, group: str):
    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise ConfigError(f"{group}: {cause}") from cause
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{group}: {e}") from e


def build_task(cfg: DictConfig) -> Task:
    return _build(cfg.task, "task")


def build_method(cfg: DictConfig) -> Method:
    method = _build(cfg.method, "method")
    try:
        method.validate(list(cfg.task.objectives))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return method


def _get(cfg: DictConfig, field: str):
    return OmegaConf.select(cfg, field, throw_on_missing=True)


POSITIVE_INTS = [
    "sft.n_examples",
    "sft.batch_size",
    "sft.max_steps",
    "preferences.n_prompts",
    "dpo.batch_size",
    "dpo.max_steps",
    "eval.n_prompts",
    "inference_batch_size",
]
POSITIVE_FLOATS = ["beta", "dpo.module.beta", "sft.module.lr", "dpo.module.lr", "eval.temperature"]


def validate_config(cfg: DictConfig) -> None:
    """Cheap structural checks before any compute; raises :class:`ConfigError`."""
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
    if missing:
        raise ConfigError(
            f"missing mandatory value(s): {', '.join(missing)} (set them as overrides, e.g. {missing[0]}=...)"
        )
    for field in POSITIVE_FLOATS:
        value = _get(cfg, field)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ConfigError(f"{field} must be a number > 0, got {field}={value!r}")
    for field in POSITIVE_INTS:
        value = _get(cfg, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{field} must be an integer >= 1, got {field}={value!r}")
    seed = _get(cfg, "seed")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got seed={seed!r}")
    bt = _get(cfg, "preferences.bt_temperature")
    if not isinstance(bt, (int, float)) or bt < 0:
        raise ConfigError(f"preferences.bt_temperature must be >= 0, got {bt!r}")
    build_task(cfg)  # the task checks its own fields (e.g. unknown objective names)
    build_method(cfg)  # likewise the method (weights on the simplex, known objectives)
