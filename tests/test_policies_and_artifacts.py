"""Loading real-model code paths on locally saved tiny models; the artifact cache's guarantees."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from mpo_exp.artifacts import ArtifactStore, config_key
from mpo_exp.policies import PretrainedSpec, TinyGPT2Spec, check_same_tokenizer, load_policy, save_policy


def test_saved_policy_loads_by_path_like_an_hf_model(tmp_path, toy_task):
    tok = toy_task.build_tokenizer()
    torch.manual_seed(0)
    policy = TinyGPT2Spec(n_layer=1, n_embd=32, n_head=2).build(tok)
    save_policy(policy, tmp_path / "m")
    loaded = load_policy(tmp_path / "m")
    ids = torch.tensor([tok("explain cats please <sep>")["input_ids"]])
    policy.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, policy.model(ids).logits)
    # the hf model spec goes through the same loader and checks the task's tokenizer
    again = PretrainedSpec(str(tmp_path / "m")).build(tok)
    assert again.tokenizer.get_vocab() == tok.get_vocab()


def test_pretrained_spec_with_a_foreign_tokenizer_is_rejected(tmp_path, toy_task, tiny_policies):
    from mpo_exp.tasks.toy import ToyTask

    save_policy(tiny_policies[0], tmp_path / "m")
    other = ToyTask().build_tokenizer()
    other.add_tokens(["brandnewword"])
    with pytest.raises(ValueError, match="different tokenizers"):
        PretrainedSpec(str(tmp_path / "m")).build(other)
    check_same_tokenizer({"a": tiny_policies[0].tokenizer, "b": tiny_policies[1].tokenizer})


def test_config_key_is_order_independent():
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})


def test_artifact_is_built_once_then_reused(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "x.txt").write_text("hello")
        return {"cost": {"s": 1}}

    first = store.get_or_build("kind", {"k": 1}, build)
    second = store.get_or_build("kind", {"k": 1}, build)
    assert not first.reused and second.reused and len(calls) == 1
    assert (second.path / "x.txt").read_text() == "hello"
    assert second.meta["cost"] == {"s": 1}
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["spec"] == {"k": 1}
    assert meta["files"]["x.txt"]["size"] == 5  # sizes and sha256 of every file, checked on reuse


def test_a_failed_build_leaves_nothing_that_looks_finished(tmp_path):
    store = ArtifactStore(tmp_path)

    def crash(tmp: Path) -> None:
        (tmp / "half.bin").write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.get_or_build("kind", {"k": 2}, crash)
    key = config_key({"k": 2})
    assert not store.path("kind", key).exists()
    # the failed build removed its temporary directory; the next builder succeeds
    assert not list((tmp_path / "kind").glob(f"{key}.tmp-*"))
    art = store.get_or_build("kind", {"k": 2}, lambda tmp: (tmp / "ok").write_text("1") and None)
    assert (art.path / "ok").exists()
    assert not list((tmp_path / "kind").glob(f"{key}.tmp-*"))


def _build_in_process(root: str, out: str) -> None:
    import time

    def build(tmp: Path) -> None:
        time.sleep(0.5)
        with open(out, "a") as f:
            f.write("built\n")
        (tmp / "v").write_text("1")

    ArtifactStore(root).get_or_build("kind", {"k": 3}, build)


def test_concurrent_jobs_build_an_artifact_once(tmp_path):
    log = tmp_path / "builds.log"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_build_in_process, args=(str(tmp_path / "store"), str(log))) for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert log.read_text().count("built") == 1
