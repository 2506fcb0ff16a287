"""The real-model code path (model=hf, task=hf) on a tiny model, reward model and data set saved locally."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from mpo_exp.pipeline import run_pipeline
from mpo_exp.policies import TinyGPT2Spec, save_policy
from mpo_exp.tasks.hf import HFDatasetTask
from mpo_exp.tasks.toy import ToyTask


def make_local_assets(root):
    """A tiny causal LM, a tiny reward model and a JSONL data set, as a user's local checkpoints would be."""
    toy = ToyTask()
    tok = toy.build_tokenizer()
    torch.manual_seed(0)
    save_policy(TinyGPT2Spec(n_layer=1, n_embd=32, n_head=2).build(tok), root / "lm")
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_layer=1,
        n_embd=32,
        n_head=2,
        n_positions=64,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    for name in ("rm_a", "rm_b"):
        GPT2ForSequenceClassification(cfg).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    data = root / "data"
    data.mkdir()
    for split, seed in (("train", 0), ("test", 1)):
        rows = [{"prompt": p, "chosen": r} for p, r in toy.corpus(64, seed)]
        (data / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return data


def test_hf_task_reads_local_jsonl_and_scores_with_local_reward_models(tmp_path):
    data = make_local_assets(tmp_path)
    task = HFDatasetTask(str(data), {"a": str(tmp_path / "rm_a"), "b": str(tmp_path / "rm_b")})
    prompts = task.prompts("eval", 5, seed=0)
    assert len(prompts) == 5 and all(p.endswith("<sep>") for p in prompts)
    corpus = task.corpus(4, seed=0)
    rewards = task.rewards([p for p, _ in corpus], [r for _, r in corpus])
    assert rewards.shape == (4, 2) and torch.isfinite(rewards).all()


def test_pipeline_runs_on_a_local_hf_model_and_data_set(smoke_cfg, tmp_path):
    data = make_local_assets(tmp_path)
    cfg = smoke_cfg(
        "task=hf",
        f"task.dataset={data}",
        "task.max_new_tokens=8",
        f"+task.objectives={{a: {tmp_path / 'rm_a'}, b: {tmp_path / 'rm_b'}}}",
        "model=hf",
        f"model.name_or_path={tmp_path / 'lm'}",
    )
    res = run_pipeline(cfg, tmp_path / "run")
    assert res["objectives"] == ["a", "b"]
    assert {"pi_ref", "pi_a", "pi_b", "uniform_mix", "mpo"} <= set(res["policies"])
    assert sum(res["lambda"]) == pytest.approx(1, abs=1e-5)
