"""Every config group composes, and bad values fail early with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from mpo_exp.config import ConfigError, build_method, build_task, validate_config
from tests.conftest import CONF_DIR, compose_config

GROUPS = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in Path(CONF_DIR).iterdir() if p.is_dir()}


@pytest.mark.parametrize(
    "override",
    [f"{group}={name}" for group, names in GROUPS.items() for name in names if group != "experiment"]
    + [f"experiment={name}" for name in GROUPS.get("experiment", [])],
)
def test_every_config_option_composes(override):
    cfg = compose_config([override, "paths.output_dir=/tmp/x"])
    assert cfg.task.objectives
    if not override.startswith("model=hf"):
        validate_config(cfg)


def test_default_config_builds_its_objects():
    cfg = compose_config(["paths.output_dir=/tmp/x"])
    task = build_task(cfg)
    assert task.objectives == ["helpful", "harmless", "humorous"]
    assert build_method(cfg).name == "mpo"
    assert cfg.dpo.module.beta == cfg.beta == 0.1
    assert instantiate(cfg.model).build(task.build_tokenizer()).model.config.n_layer == cfg.model.n_layer
    trainer = instantiate(cfg.trainer)(max_steps=1, logger=False)
    assert trainer.max_steps == 1


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["beta=0"], r"beta must be a number > 0, got beta=0"),
        (["beta=-0.5"], r"beta must be a number > 0"),
        (["sft.max_steps=0"], r"sft.max_steps must be an integer >= 1"),
        (["preferences.bt_temperature=-1"], r"preferences.bt_temperature"),
        (["task.objectives=[helpful,funny]"], r"task.objectives: unknown objective\(s\) \['funny'\]"),
        (["method=fixed_mix", "method.weights.helpful=0.9"], r"method.weights must sum to 1"),
        (["method=fixed_mix", "+method.weights.witty=0.0"], r"method.weights: unknown objective"),
        (["method.exclude=[kind]"], r"method.exclude: unknown objective"),
        (["method.steps=0"], r"method.steps must be >= 1"),
    ],
)
def test_bad_values_name_the_field(overrides, match):
    cfg = compose_config([*overrides, "paths.output_dir=/tmp/x"])
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg)
