"""Tests run offline, on CPU, on the real configs shrunk to seconds (experiment=smoke)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides or [])


@pytest.fixture
def smoke_cfg(tmp_path):
    """The real default config, shrunk to a seconds-long run writing into tmp_path."""

    def make(*extra: str):
        return compose_config(
            [
                "experiment=smoke",
                "logger=none",
                f"paths.cache_dir={tmp_path / 'cache'}",
                f"paths.output_dir={tmp_path / 'run'}",
                "trainer.enable_progress_bar=false",
                *extra,
            ]
        )

    return make


@pytest.fixture
def toy_task():
    from mpo_exp.tasks.toy import ToyTask

    return ToyTask()


@pytest.fixture
def tiny_policies(toy_task):
    """Three differently initialised tiny GPT-2s over the toy tokenizer."""
    from mpo_exp.policies import TinyGPT2Spec

    tok = toy_task.build_tokenizer()
    out = []
    for i in range(3):
        torch.manual_seed(i)
        p = TinyGPT2Spec(n_layer=1, n_embd=32, n_head=2).build(tok)
        p.name = f"p{i}"
        p.model.eval()
        out.append(p)
    return out
