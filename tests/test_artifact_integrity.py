"""The artifact cache never keeps a failed build, checks what it reuses, and training refuses NaN."""

from __future__ import annotations

import copy
import fcntl
import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from mpo_exp import artifacts
from mpo_exp.artifacts import ArtifactStore, CorruptArtifactError, config_key
from mpo_exp.training.common import NonFiniteLossError, fit

SPEC = {"k": 1}
KEY = config_key(SPEC)


def write_files(tmp: Path) -> dict:
    (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "pairs.json").write_text(json.dumps({"a": [1, 2, 3]}))
    return {"cost": {"s": 1}}


class Builder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, tmp: Path) -> dict:
        self.calls += 1
        return write_files(tmp)


def tmp_dirs(root: Path, kind: str = "kind") -> list[Path]:
    return sorted((root / kind).glob("*.tmp-*"))


def dead_pid() -> int:
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    return proc.pid


# ---- temporaries -----------------------------------------------------------------------------
def test_a_failing_build_removes_its_temporary_directory(tmp_path):
    store = ArtifactStore(tmp_path)

    def crash(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"partial")
        raise ValueError("bad input")

    for i in range(3):
        with pytest.raises(ValueError, match="bad input"):
            store.get_or_build("kind", {"bad": i}, crash)
    assert tmp_dirs(tmp_path) == []
    assert not [p for p in (tmp_path / "kind").iterdir() if not p.name.endswith(".lock")]


def test_temporaries_of_dead_builders_on_this_host_are_swept_live_ones_kept(tmp_path):
    store = ArtifactStore(tmp_path)
    host = store._host
    kind_dir = tmp_path / "kind"
    kind_dir.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = kind_dir / f"aaaa.tmp-{host}-{dead_pid()}-abc123"
        alive = kind_dir / f"bbbb.tmp-{host}-{live.pid}-abc123"
        mine = kind_dir / f"cccc.tmp-{host}-{os.getpid()}-abc123"
        other_host = kind_dir / f"dddd.tmp-some-other-node-{dead_pid()}-abc123"
        locked = kind_dir / f"eeee.tmp-{host}-{dead_pid()}-abc123"
        for d in (dead, alive, mine, other_host, locked):
            d.mkdir()
            (d / "weights.bin").write_bytes(b"x" * 10)
        with open(kind_dir / "eeee.lock", "w") as lock:  # a builder of key eeee is at work
            fcntl.flock(lock, fcntl.LOCK_EX)
            # any use of the kind sweeps it, even for another key
            store.get_or_build("kind", SPEC, Builder())
            fcntl.flock(lock, fcntl.LOCK_UN)
        assert not dead.exists()
        assert alive.exists() and mine.exists() and other_host.exists() and locked.exists()
        # once the lock is free, the next sweep (e.g. a new store) removes the dead builder's dir
        ArtifactStore(tmp_path)
        assert not locked.exists() and alive.exists() and other_host.exists()
    finally:
        live.kill()
        live.wait()
    # the live builder is gone now: its temporary is stale too
    assert store.sweep("kind") == [alive]
    assert other_host.exists()  # never judged by pid from this host ...


def test_a_builder_holding_the_lock_removes_every_temporary_of_its_key(tmp_path):
    store = ArtifactStore(tmp_path)
    kind_dir = tmp_path / "kind"
    kind_dir.mkdir()
    foreign = kind_dir / f"{KEY}.tmp-some-other-node-123-abc123"
    legacy = kind_dir / f"{KEY}.tmp-{dead_pid()}-abc123"  # the format before hostnames
    for d in (foreign, legacy):
        d.mkdir()
    store.get_or_build("kind", SPEC, Builder())
    assert tmp_dirs(tmp_path) == []


def test_temporary_names_carry_host_and_pid(tmp_path):
    seen = []
    ArtifactStore(tmp_path).get_or_build("kind", SPEC, lambda tmp: seen.append(tmp.name) or None)
    m = artifacts._TMP_RE.match(seen[0])
    assert m and m["key"] == KEY and m["host"] == artifacts._host() and int(m["pid"]) > 0


# ---- integrity -------------------------------------------------------------------------------
def test_hashes_and_sizes_are_recorded(tmp_path):
    art = ArtifactStore(tmp_path).get_or_build("kind", SPEC, Builder())
    files = json.loads((art.path / "meta.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "sub/pairs.json"}
    assert files["model.safetensors"]["size"] == 256 * 64
    assert len(files["sub/pairs.json"]["sha256"]) == 64


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("corrupt", [truncate, flip_a_byte, empty])
@pytest.mark.parametrize("fresh_store", [True, False])
def test_a_corrupt_artifact_is_detected_named_and_rebuilt(tmp_path, caplog, corrupt, fresh_store):
    build = Builder()
    store = ArtifactStore(tmp_path)
    art = store.get_or_build("kind", SPEC, build)
    target = art.path / ("sub/pairs.json" if corrupt is empty else "model.safetensors")
    size = target.stat().st_size
    corrupt(target)
    if corrupt is flip_a_byte:
        assert target.stat().st_size == size
    if fresh_store:
        store = ArtifactStore(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mpo_exp.artifacts"):
        again = store.get_or_build("kind", SPEC, build)
    assert build.calls == 2 and not again.reused
    assert again.path == art.path
    assert (again.path / "model.safetensors").read_bytes() == bytes(range(256)) * 64
    rel = target.relative_to(art.path).as_posix()
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(art.path) in warning and rel in warning
    # the corrupt copy is kept aside (never read); the rebuilt one is reused from now on
    assert len(list((tmp_path / "kind").glob(f"{KEY}.corrupt-*"))) == 1
    assert ArtifactStore(tmp_path).get_or_build("kind", SPEC, build).reused and build.calls == 2


def test_verification_levels(tmp_path, monkeypatch):
    build = Builder()
    ArtifactStore(tmp_path).get_or_build("kind", SPEC, build)
    flip_a_byte(tmp_path / "kind" / KEY / "model.safetensors")
    assert ArtifactStore(tmp_path, verify="size").get_or_build("kind", SPEC, build).reused
    assert ArtifactStore(tmp_path, verify="none").get_or_build("kind", SPEC, build).reused
    monkeypatch.setenv("MPO_ARTIFACT_VERIFY", "size")
    assert ArtifactStore(tmp_path).verify == "size"
    truncate(tmp_path / "kind" / KEY / "model.safetensors")
    assert not ArtifactStore(tmp_path).get_or_build("kind", SPEC, build).reused  # size catches it
    monkeypatch.delenv("MPO_ARTIFACT_VERIFY")
    assert ArtifactStore(tmp_path).verify == "hash"
    with pytest.raises(ValueError, match="MPO_ARTIFACT_VERIFY"):
        ArtifactStore(tmp_path, verify="sometimes")


def test_a_corrupt_artifact_that_cannot_be_rebuilt_names_the_cache_directory(tmp_path):
    store = ArtifactStore(tmp_path)
    art = store.get_or_build("kind", SPEC, Builder())
    truncate(art.path / "model.safetensors")

    def unavailable(tmp: Path) -> None:
        raise OSError("the base model is no longer downloadable")

    with pytest.raises(CorruptArtifactError, match=str(art.path)) as info:
        store.get_or_build("kind", SPEC, unavailable)
    assert "model.safetensors" in str(info.value) and "no longer downloadable" in str(info.value)
    assert tmp_dirs(tmp_path) == [] and not art.path.exists()


def test_an_unreadable_meta_or_a_half_made_directory_is_rebuilt(tmp_path):
    build = Builder()
    store = ArtifactStore(tmp_path)
    art = store.get_or_build("kind", SPEC, build)
    (art.path / "meta.json").write_text('{"kind": "kin')
    assert not store.get_or_build("kind", SPEC, build).reused
    (art.path / "meta.json").unlink()  # a directory in place but never finished
    assert not store.get_or_build("kind", SPEC, build).reused and build.calls == 3


def test_an_artifact_without_hashes_is_accepted_with_one_warning(tmp_path, caplog):
    build = Builder()
    art = ArtifactStore(tmp_path).get_or_build("kind", SPEC, build)
    meta = json.loads((art.path / "meta.json").read_text())
    del meta["files"], meta["integrity"]
    (art.path / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="mpo_exp.artifacts"):
        for _ in range(2):
            again = ArtifactStore(tmp_path).get_or_build("kind", SPEC, build)
            assert again.reused and again.meta["cost"] == {"s": 1}
    warnings = [r.getMessage() for r in caplog.records if "predates integrity hashes" in r.getMessage()]
    assert len(warnings) == 1 and str(art.path) in warnings[0]
    assert build.calls == 1


# ---- non-finite losses -----------------------------------------------------------------------
def trainer_factory(**kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


@pytest.fixture
def sft_data(toy_task):
    from mpo_exp.data import SequenceDataset
    from mpo_exp.generation import encode_prompts
    from mpo_exp.policies import TinyGPT2Spec

    tok = toy_task.build_tokenizer()
    torch.manual_seed(0)
    policy = TinyGPT2Spec(n_layer=1, n_embd=32, n_head=2).build(tok)
    corpus = toy_task.corpus(16, 0)
    prompts = encode_prompts(tok, [p for p, _ in corpus])
    responses = [ids + [tok.eos_token_id] for ids in encode_prompts(tok, [r for _, r in corpus])]
    return policy, SequenceDataset(prompts, responses, tok.pad_token_id)


def test_a_diverging_learning_rate_stops_training_with_a_clear_error(sft_data):
    from mpo_exp.training.sft import SFTModule

    policy, data = sft_data
    module = SFTModule(policy.model, lr=1e30)
    with pytest.raises(NonFiniteLossError, match=r"SFTModule.*step \d+.*sft\.module\.lr, here 1e\+30"):
        fit(module, data, data.collate, trainer_factory, batch_size=4, max_steps=10, meter=None)


class NaNDPO(pl.LightningModule):
    """A DPO-like module whose loss turns NaN at its third step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.objective, self.lr, self.beta = "helpful", 0.1, 0.1

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch[0]).pow(2).mean()
        return loss * float("nan") if self.global_step >= 2 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_a_nan_loss_inside_a_cached_stage_caches_nothing(tmp_path):
    store = ArtifactStore(tmp_path)
    data = torch.utils.data.TensorDataset(torch.randn(32, 3))

    def build(tmp: Path) -> None:
        (tmp / "partial.bin").write_bytes(b"x")
        fit(NaNDPO(), data, None, trainer_factory, batch_size=4, max_steps=6, meter=None)

    with pytest.raises(NonFiniteLossError, match=r"NaNDPO\(objective='helpful'\).*nan at step 3") as info:
        store.get_or_build("dpo", {"objective": "helpful"}, build)
    assert "here 0.1" in str(info.value) and "`beta`" in str(info.value)
    assert not store.path("dpo", config_key({"objective": "helpful"})).exists()
    assert tmp_dirs(tmp_path, "dpo") == []


class InfParams(pl.LightningModule):
    """A finite loss while another parameter is overwritten with inf: caught after training."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.b.fill_(float("inf"))
        return self.a.pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD([self.a], lr=0.1)


def test_non_finite_parameters_after_training_are_an_error():
    data = torch.utils.data.TensorDataset(torch.randn(8, 2))
    with pytest.raises(NonFiniteLossError, match="parameter 'b'"):
        fit(InfParams(), data, None, trainer_factory, batch_size=4, max_steps=2, meter=None)


def test_a_nan_reward_stops_manually_optimised_ppo(toy_task):
    from baselines.ppo import PPOModule, prompt_collate
    from mpo_exp.generation import encode_prompts
    from mpo_exp.mpo.mixing import MixedPolicy
    from mpo_exp.policies import Policy, TinyGPT2Spec

    tok = toy_task.build_tokenizer()
    torch.manual_seed(0)
    ref = TinyGPT2Spec(n_layer=1, n_embd=32, n_head=2).build(tok)

    def reward_fn(batch):
        return torch.full((len(batch),), float("nan")), {}

    module = PPOModule(
        Policy("pi", copy.deepcopy(ref.model), tok),
        MixedPolicy.single(ref.eval(), "ref"),
        reward_fn,
        beta=0.1,
        max_new_tokens=4,
        minibatches=1,
        ppo_epochs=1,
    )
    prompts = encode_prompts(tok, toy_task.prompts("train", 8, 0))
    with pytest.raises(
        NonFiniteLossError,
        match=r"PPOModule\(estimator='ppo'\).*rl\.module\.lr.*`beta`, here 0\.1.*max_grad_norm",
    ):
        fit(module, prompts, prompt_collate, trainer_factory, batch_size=4, max_steps=2, meter=None)


class BackwardOutsideLightning(pl.LightningModule):
    """Manual optimisation that calls ``loss.backward()`` itself: caught through its logged loss."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.w = torch.nn.Parameter(torch.ones(2))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.w.pow(2).sum() * (float("nan") if batch_idx == 1 else 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        self.log("manual/pg_loss", loss.detach())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("max_steps", [2, 4])  # caught at the end of training, or at the next batch
def test_a_nan_logged_loss_is_caught_without_manual_backward(max_steps):
    data = torch.utils.data.TensorDataset(torch.randn(16, 2))
    with pytest.raises(NonFiniteLossError, match="logged metric 'manual/pg_loss' is nan"):
        fit(
            BackwardOutsideLightning(),
            data,
            None,
            trainer_factory,
            batch_size=2,
            max_steps=max_steps,
            meter=None,
        )


def test_fit_still_trains_a_finite_model(sft_data):
    from mpo_exp.training.sft import SFTModule

    policy, data = sft_data
    module = SFTModule(policy.model, lr=1e-3)
    fit(module, data, data.collate, functools.partial(trainer_factory), batch_size=4, max_steps=2, meter=None)
    assert all(torch.isfinite(p).all() for p in module.parameters())
