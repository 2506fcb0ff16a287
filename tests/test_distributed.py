"""Two CPU processes (gloo, launched like torchrun): DDP training and sharded scoring match one process.

One ``mp.spawn`` runs every 2-process check, as starting the processes is the slow part; each
worker saves what it saw and the assertions against the single-process runs happen here.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from mpo_exp import distributed as dist
from mpo_exp.cost import CostMeter, StageCost
from mpo_exp.data import PreferenceDataset, collate
from mpo_exp.training.common import fit, global_batch_loader

WORLD = 2
N_PAIRS, DPO_BATCH, DPO_STEPS = 24, 8, 5  # 3 global batches per epoch: the run crosses an epoch
N_SFT, SFT_BATCH, SFT_STEPS = 16, 8, 3


# ---- in-process checks ---------------------------------------------------------------------------
def test_shards_cover_rows_in_order():
    for n in (0, 1, 5, 8):
        bounds = [dist.shard_bounds(n, 3, r) for r in range(3)]
        assert [i for lo, hi in bounds for i in range(lo, hi)] == list(range(n))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


@pytest.mark.parametrize("n", [10, 11])
def test_global_batches_equal_the_single_process_loader(n):
    """World 1: the very batches of DataLoader(shuffle=True); world 2: each batch split in two halves."""
    rows = list(range(n))
    single = DataLoader(rows, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(3))
    expected = [b.tolist() for _ in range(3) for b in single]

    def batches(world: int, rank: int) -> list[list[int]]:
        loader = global_batch_loader(rows, 4, world, seed=3, collate=list, rank=rank)
        return [b for _ in range(3) for b in loader]  # three epochs of one loader

    assert batches(1, 0) == expected
    halves = [batches(2, r) for r in range(2)]
    # the last batch of an epoch: 2 rows (n=10) split over the ranks, 3 rows (n=11) trimmed to 2
    kept = [b[: len(b) - len(b) % 2] for b in expected]
    assert [a + b for a, b in zip(*halves, strict=True)] == kept
    assert all(len(a) == len(b) for a, b in zip(*halves, strict=True))
    assert (kept == expected) == (n == 10)


def test_global_batch_must_split_evenly_over_the_processes():
    module, data = _dpo_setup()
    factory = functools.partial(pl.Trainer, accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match=r"dpo.batch_size=7 is the global batch.*trainer.devices"):
        fit(module, data, data.collate, factory, batch_size=7, max_steps=1, meter=None)
    with pytest.raises(ValueError, match="1 training rows make no batch for 2 processes"):
        fit(module, data.subset([0]), data.collate, factory, batch_size=8, max_steps=1, meter=None)


# ---- shared builders ---------------------------------------------------------------------------
def _tiny_policies(task, n: int = 3):
    from mpo_exp.policies import TinyGPT2Spec

    tok = task.build_tokenizer()
    out = []
    for i in range(n):
        torch.manual_seed(i)
        p = TinyGPT2Spec(n_layer=1, n_embd=32, n_head=2).build(tok)
        p.name = f"p{i}"
        out.append(p.eval())
    return out


def _dpo_setup():
    """A tiny GPT-2 and preference pairs over random responses, identical in every process."""
    from mpo_exp.generation import encode_prompts
    from mpo_exp.scoring import sequence_logprobs
    from mpo_exp.tasks.toy import ToyTask
    from mpo_exp.training.dpo import DPOModule

    task = ToyTask()
    policy = _tiny_policies(task, 1)[0]
    tok = policy.tokenizer
    prompts = encode_prompts(tok, task.prompts("train", N_PAIRS, 0))
    g = torch.Generator().manual_seed(0)

    def responses() -> list[list[int]]:
        lengths = torch.randint(2, 6, (len(prompts),), generator=g).tolist()
        return [torch.randint(5, len(tok), (n,), generator=g).tolist() for n in lengths]

    chosen, rejected = responses(), responses()
    with torch.no_grad():
        ref_c = sequence_logprobs(policy.model, collate(prompts, chosen, tok.pad_token_id))
        ref_r = sequence_logprobs(policy.model, collate(prompts, rejected, tok.pad_token_id))
    data = PreferenceDataset(prompts, chosen, rejected, ref_c, ref_r, tok.pad_token_id)
    return DPOModule(policy.model, beta=0.1, lr=1e-2, warmup_steps=2), data


def _sft_setup():
    """A tiny GPT-2 without dropout and (prompt, response) rows of 1-9 response tokens."""
    from mpo_exp.data import SequenceDataset
    from mpo_exp.generation import encode_prompts
    from mpo_exp.tasks.toy import ToyTask
    from mpo_exp.training.sft import SFTModule

    task = ToyTask()
    policy = _tiny_policies(task, 1)[0]
    for module in policy.model.modules():  # dropout would draw differently in one and two processes
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    tok = policy.tokenizer
    prompts = encode_prompts(tok, task.prompts("train", N_SFT, 0))
    g = torch.Generator().manual_seed(4)  # the ranks' halves of each step differ in tokens (checked)
    lengths = torch.randint(1, 10, (N_SFT,), generator=g).tolist()
    responses = [torch.randint(5, len(tok), (n,), generator=g).tolist() for n in lengths]
    data = SequenceDataset(prompts, responses, tok.pad_token_id)
    return SFTModule(policy.model, lr=1e-2, warmup_steps=2), data


class _FirstGradients(pl.Callback):
    """The gradients the first optimiser step applies: under DDP, the ranks' average."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {
                n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None
            }


def _trainer_factory(devices: int, callbacks: tuple[pl.Callback, ...] = ()):
    kw = {}
    if devices > 1:
        from pytorch_lightning.strategies import DDPStrategy

        kw["strategy"] = DDPStrategy(process_group_backend="gloo")
    return functools.partial(
        pl.Trainer,
        accelerator="cpu",
        devices=devices,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kw,
    )


def _train_dpo(devices: int) -> dict[str, torch.Tensor]:
    module, data = _dpo_setup()
    fit(module, data, data.collate, _trainer_factory(devices), DPO_BATCH, DPO_STEPS, meter=None, seed=7)
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def _train_sft(devices: int) -> dict[str, dict[str, torch.Tensor]]:
    module, data = _sft_setup()
    grads = _FirstGradients()
    fit(module, data, data.collate, _trainer_factory(devices, (grads,)), SFT_BATCH, SFT_STEPS, None, seed=7)
    return {
        "weights": {k: v.detach().clone() for k, v in module.model.state_dict().items()},
        "grads": grads.grads,
    }


def _train_rl_on_one_rollout(estimator: str, devices: int) -> dict:
    """One iteration on one rollout of 8 prompts, drawn alike in every process, each rank taking its rows.

    Each rank's rollout would otherwise be its own random draw; fixing it leaves only the updates to
    compare with one process. The untrained policy seldom samples EOS, so the responses are cut to
    1-8 tokens: the ranks' rows hold different numbers of tokens. One PPO minibatch: each rank
    shuffles its own rows into minibatches.
    """
    import baselines.ppo as ppo
    from mpo_exp.generation import encode_prompts, sample
    from mpo_exp.tasks.toy import ToyTask
    from tests.test_ppo import build_module

    def reward_fn(batch):  # differs from row to row: the advantages are not rounding noise
        m = batch.response_mask.float()
        return (batch.response_ids.float() * m).sum(-1) / (100 * m.sum(-1).clamp(min=1)), {}

    task = ToyTask()
    module = build_module(task, estimator, beta=0.1, reward_fn=reward_fn)
    module.minibatches = 1
    rollout, tokens, pad = module.rollout, [], module.policy.tokenizer.pad_token_id

    def cut_sample(*args, **kwargs):
        batch = sample(*args, **kwargs)
        lengths = torch.randint(1, 9, (len(batch),), generator=torch.Generator().manual_seed(4)).tolist()
        cut = [r[:n] for r, n in zip(batch.responses(), lengths, strict=True)]
        return collate(batch.prompts(), cut, pad).to(batch.response_ids.device)

    def global_rollout(prompts: list[list[int]]) -> dict:
        everyone = [p for part in dist.gather_objects(prompts) for p in part]  # the global batch, in order
        with torch.random.fork_rng(), mock.patch.object(ppo, "sample", cut_sample):
            torch.manual_seed(5)
            ro = rollout(everyone)
        k = len(ro["mask"]) // len(everyone)  # RLOO: k rows per prompt
        lo, hi = dist.shard_bounds(len(everyone))
        mine = {key: v if key == "info" else v[k * lo : k * hi] for key, v in ro.items()}
        tokens.append(int(mine["mask"].sum()))
        return mine

    module.rollout = global_rollout
    prompts = encode_prompts(module.policy.tokenizer, task.prompts("train", 8, 0))
    grads = _FirstGradients()
    steps = module.optimizer_steps_per_iteration
    fit(module, prompts, ppo.prompt_collate, _trainer_factory(devices, (grads,)), 8, steps, None, seed=0)
    weights = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
    return {"weights": weights, "grads": grads.grads, "tokens": tokens}


def _train_rl(estimator: str, devices: int) -> dict:
    """Two rollouts of 8 prompts: the trained weights and the logged statistics of each iteration."""
    from baselines.ppo import prompt_collate
    from mpo_exp.generation import encode_prompts
    from mpo_exp.tasks.toy import ToyTask
    from tests.test_ppo import build_module

    task = ToyTask()
    module = build_module(task, estimator, beta=0.1)
    prompts = encode_prompts(module.policy.tokenizer, task.prompts("train", 16, 0))
    steps = 2 * module.optimizer_steps_per_iteration
    fit(module, prompts, prompt_collate, _trainer_factory(devices), 8, steps, meter=None, seed=0)
    weights = {k: v.detach().clone() for k, v in module.net.state_dict().items()}
    return {"weights": weights, "history": module.history}


def _whiten_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=g) * 3 + 1
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    return x, mask


@dataclass
class _RankCostMeter(CostMeter):
    """A CostMeter that keeps what each stage cost this rank before ``cached_stage`` records all ranks'."""

    own: dict[str, dict] = field(default_factory=dict)

    def record(self, name: str, cost: StageCost) -> None:
        if name in self.stages and name not in self.own:
            self.own[name] = self.stages[name].as_dict()
        super().record(name, cost)


def _fake_context(task, policies, cache: Path):
    """What ``score_log_ratios`` reads from a RunContext, with the real cache and cost meter."""
    from mpo_exp.artifacts import ArtifactStore
    from mpo_exp.context import RunContext
    from mpo_exp.mpo.mixing import MixedPolicy

    ref, *singles = policies
    ctx = SimpleNamespace(
        seed=0,
        task=task,
        batch_size=5,  # several sampling/scoring batches per shard
        sample_batch_size=5,
        sampler="multinomial",
        dtype="float32",
        meter=_RankCostMeter(),
        store=ArtifactStore(cache),
        keys={"sft": "ref", **{f"dpo/{p.name}": p.name for p in singles}},
        reference=MixedPolicy.single(ref, "pi_ref"),
        single_objective_policies={p.name: p for p in singles},
        reseed=lambda offset: pl.seed_everything(offset, verbose=False),
    )
    ctx.cached_stage = functools.partial(RunContext.cached_stage, ctx)
    ctx.stage_key = functools.partial(RunContext.stage_key, ctx)
    return ctx


# ---- the two processes --------------------------------------------------------------------------
def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(  # what torchrun sets
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        GROUP_RANK="0",
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
    )
    from baselines.ppo import masked_whiten, whiten_global
    from mpo_exp.evaluation import Evaluator
    from mpo_exp.generation import encode_prompts, sample
    from mpo_exp.mpo.method import score_log_ratios
    from mpo_exp.mpo.mixing import MixedPolicy
    from mpo_exp.scoring import score_policies
    from mpo_exp.tasks.toy import ToyTask

    assert dist.init_from_env("cpu") and dist.world_size() == WORLD and dist.rank() == rank
    seen: dict = {"dpo": _train_dpo(WORLD), "sft": _train_sft(WORLD)}

    # sharded scoring of one fixed batch (every rank draws the same one), gathered in rank order
    task = ToyTask()
    policies = _tiny_policies(task)
    torch.manual_seed(11)
    prompts = encode_prompts(policies[0].tokenizer, task.prompts("train", 7, 1))
    rows = [p for p in prompts for _ in range(3)]
    batch = sample(MixedPolicy.single(policies[0]), rows, task.max_new_tokens)
    lo, hi = dist.shard_bounds(len(batch))
    models = [p.model for p in policies]
    seen["batch"] = batch
    seen["scores"] = dist.gather_cat(score_policies(models, batch[lo:hi], batch_size=4))

    # MPO's cached stage: sampled and scored by shards, published once by rank 0, reused after.
    # One prompt, 15 samples: both ranks sample the same prompt (7 and 8 rows)
    ctx = _fake_context(task, policies, Path(out) / "cache")
    seen["ell"] = score_log_ratios(ctx, n_prompts=1, samples_per_prompt=15)
    seen["ell_reused"] = score_log_ratios(ctx, n_prompts=1, samples_per_prompt=15)
    seen["mpo_cost"] = {s: ctx.meter.stages[f"mpo/{s}"].as_dict() for s in ("sampling", "scoring")}
    seen["mpo_own_cost"] = {s: ctx.meter.own[f"mpo/{s}"] for s in ("sampling", "scoring")}

    # PPO / RLOO: each rank rolls out its half of every batch of prompts; DDP syncs manual_backward
    for estimator in ("ppo", "rloo"):
        seen[estimator] = _train_rl(estimator, devices=WORLD)
        seen[f"{estimator}_one_rollout"] = _train_rl_on_one_rollout(estimator, devices=WORLD)
    x, mask = _whiten_inputs()
    lo, hi = dist.shard_bounds(len(x))
    seen["whitened"] = dist.gather_cat(masked_whiten(x[lo:hi], mask[lo:hi]))
    seen["whitened_scores"] = dist.gather_cat(whiten_global(x[lo:hi, 0]))

    ev = Evaluator(task, ctx.reference, n_prompts=9, seed=2, batch_size=4)
    seen["eval_ref"] = ev.reference_rewards()
    seen["eval"] = ev.evaluate(MixedPolicy.single(policies[1]))
    torch.save(seen, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    seen = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return [{**s, "out": out} for s in seen]


def _assert_same_weights(got: dict, want: dict, what: str) -> None:
    """Equal to float rounding, but for attention's key bias.

    The key bias adds the same score to every key: softmax ignores it, its gradient is zero but
    for rounding, and Adam normalises that rounding noise to steps of ~lr. So it is no evidence
    either way; every other entry must agree.
    """
    assert got.keys() == want.keys()
    for k, v in want.items():
        g = got[k]
        if k.endswith("attn.c_attn.bias"):
            d = len(v) // 3
            no_key_bias = torch.ones(3 * d, dtype=torch.bool)
            no_key_bias[d : 2 * d] = False
            g, v = g[no_key_bias], v[no_key_bias]
        torch.testing.assert_close(g, v, rtol=1e-5, atol=1e-6, msg=f"{what}: parameter {k}")


def _assert_same_gradients(got: dict, want: dict, what: str) -> None:
    """Equal to float rounding, relative to the largest entry (the attention key bias's are rounding).

    No gradient counts as a zero one: RLOO under DDP gives its unused value head zero gradients.
    """
    assert want
    scale = max(float(g.abs().max()) for g in want.values())
    assert scale > 1e-6  # a gradient worth comparing
    for k in got.keys() | want.keys():
        g, v = got.get(k), want.get(k)
        g, v = (torch.zeros_like(v) if g is None else g), (torch.zeros_like(g) if v is None else v)
        torch.testing.assert_close(g, v, rtol=1e-4, atol=1e-5 * scale, msg=f"{what}: gradient of {k}")


def test_ddp_dpo_matches_one_process_with_the_same_global_batch(two_ranks):
    torch.set_num_threads(1)
    single = _train_dpo(devices=1)
    initial = _dpo_setup()[0].model.state_dict()
    moved = max(float((single[k] - initial[k]).abs().max()) for k in single)
    assert moved > 1e-3  # DPO_STEPS of training did change the weights
    for seen in two_ranks:
        _assert_same_weights(seen["dpo"], single, "dpo")


def test_ddp_sft_matches_one_process_when_the_ranks_hold_unequal_token_counts(two_ranks):
    """SFT's loss is a mean over tokens: each rank's share divides by the global count, not its own."""
    data = _sft_setup()[1]
    loaders = [global_batch_loader(data, SFT_BATCH, WORLD, 7, data.collate, rank=r) for r in range(WORLD)]
    halves = [[b for _ in range(2) for b in loader][:SFT_STEPS] for loader in loaders]  # crosses an epoch
    counts = [[int(b.response_mask.sum()) for b in rank] for rank in halves]
    # every step's halves hold different numbers of tokens: a per-rank mean would weigh them unequally
    assert all(c0 != c1 for c0, c1 in zip(*counts, strict=True)), counts
    torch.set_num_threads(1)
    single = _train_sft(devices=1)
    for seen in two_ranks:
        _assert_same_gradients(seen["sft"]["grads"], single["grads"], "sft")
        _assert_same_weights(seen["sft"]["weights"], single["weights"], "sft")


@pytest.mark.parametrize("estimator", ["ppo", "rloo"])
def test_ddp_rl_updates_match_one_process_when_the_ranks_hold_unequal_token_counts(two_ranks, estimator):
    """PPO's losses are means over tokens (the global count); RLOO's a mean over rows, equal per rank."""
    torch.set_num_threads(1)
    single = _train_rl_on_one_rollout(estimator, devices=1)
    a, b = (seen[f"{estimator}_one_rollout"] for seen in two_ranks)
    assert a["tokens"][0] != b["tokens"][0] and a["tokens"][0] + b["tokens"][0] == single["tokens"][0]
    for seen in (a, b):
        _assert_same_gradients(seen["grads"], single["grads"], estimator)
        _assert_same_weights(seen["weights"], single["weights"], estimator)


def test_gathered_scores_equal_one_process_scoring(two_ranks, toy_task):
    from mpo_exp.scoring import score_policies

    torch.set_num_threads(1)
    batch = two_ranks[0]["batch"]
    assert torch.equal(batch.response_ids, two_ranks[1]["batch"].response_ids)  # the same samples
    full = score_policies([p.model for p in _tiny_policies(toy_task)], batch, batch_size=4)
    for seen in two_ranks:
        torch.testing.assert_close(seen["scores"], full, rtol=0, atol=1e-5)
    ell = full[:, 1:] - full[:, :1]  # what score_log_ratios keeps: log pi_k - log pi_ref
    assert float(ell.abs().max()) > 1e-2  # the policies differ: a row out of place would show


def test_mpo_scores_are_gathered_published_once_and_reused(two_ranks):
    a, b = two_ranks
    assert a["ell"].shape == (1, 15, 2)
    assert torch.equal(a["ell"], b["ell"]) and torch.equal(a["ell"], a["ell_reused"])
    # Both ranks sample the same prompt in batches of the same shapes: only their own random
    # streams (per-rank seeding) keep rank 1's i-th sample from being a copy of rank 0's.
    rows = a["ell"].reshape(15, 2)
    copies = [i for i in range(7) if torch.equal(rows[i], rows[7 + i])]
    assert not copies, f"rank 1 repeats rank 0's samples {copies}"
    published = list((a["out"] / "cache" / "mpo_scores").iterdir())
    assert len([p for p in published if not p.name.endswith(".lock")]) == 1  # one artifact, no temporaries
    for stage in ("sampling", "scoring"):  # the stage's cost is both ranks' work (7 and 8 rows), on each
        own = [seen["mpo_own_cost"][stage] for seen in two_ranks]
        assert 0 < own[0]["tokens_fwd"] != own[1]["tokens_fwd"]  # the sum is neither rank's own cost
        for seen in two_ranks:
            cost = seen["mpo_cost"][stage]
            assert cost["tokens_fwd"] == own[0]["tokens_fwd"] + own[1]["tokens_fwd"], stage
            assert cost["flops"] == pytest.approx(own[0]["flops"] + own[1]["flops"], rel=1e-12), stage
            assert cost["wall_s"] == max(o["wall_s"] for o in own), stage


def test_sharded_evaluation_is_gathered_on_every_rank(two_ranks):
    a, b = two_ranks
    assert a["eval_ref"].shape == (9, 3) and torch.equal(a["eval_ref"], b["eval_ref"])
    assert torch.equal(a["eval"].rewards, b["eval"].rewards) and a["eval"].kl == b["eval"].kl
    assert a["eval"].examples == b["eval"].examples and len(a["eval"].examples) == 3


def test_ppo_under_ddp_whitens_globally_and_keeps_ranks_in_sync(two_ranks):
    from baselines.ppo import masked_whiten, whiten_global

    x, mask = _whiten_inputs()
    a, b = two_ranks
    for seen in two_ranks:  # whitening the halves with global statistics = whitening the whole batch
        torch.testing.assert_close(seen["whitened"], masked_whiten(x, mask), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(seen["whitened_scores"], whiten_global(x[:, 0]), rtol=1e-6, atol=1e-6)
    for estimator in ("ppo", "rloo"):
        wa, wb = a[estimator]["weights"], b[estimator]["weights"]
        assert any(not torch.equal(wa[k], w0) for k, w0 in _initial_rl_weights(estimator).items())
        for k in wa:  # every optimiser step applied the same averaged gradient on both ranks
            torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=f"{estimator}: {k}")
        assert len(a[estimator]["history"]) == 2
        assert a[estimator]["history"] == b[estimator]["history"]  # statistics are means over ranks


def _initial_rl_weights(estimator: str) -> dict[str, torch.Tensor]:
    from mpo_exp.tasks.toy import ToyTask
    from tests.test_ppo import build_module

    return build_module(ToyTask(), estimator, beta=0.1).net.state_dict()


# ---- the pipeline's launch ----------------------------------------------------------------------
def test_several_devices_without_torchrun_are_refused(smoke_cfg, tmp_path):
    from mpo_exp.config import ConfigError
    from mpo_exp.pipeline import run_pipeline

    cfg = smoke_cfg("trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
    with pytest.raises(ConfigError, match=r"trainer.devices=2.*torchrun"):
        run_pipeline(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="trainer.strategy must be one of"):
        run_pipeline(smoke_cfg("trainer.strategy=ddp_spawn"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was built or written


@pytest.mark.slow
def test_torchrun_runs_the_pipeline_on_two_processes(tmp_path):
    """The supported launch, end to end: collective cache builds, sharded MPO and eval, rank 0 writes."""
    import json
    import subprocess
    import sys

    run = tmp_path / "run"
    args = [
        *("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"),
        *("-m", "mpo_exp.cli", "experiment=smoke", "logger=none", "num_threads=1"),
        *("trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"),
        *("trainer.enable_progress_bar=false", f"paths.cache_dir={tmp_path / 'cache'}"),
        *(f"paths.output_dir={run}", f"hydra.run.dir={run}"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and sum(results["lambda"]) == pytest.approx(1, abs=1e-5)
    for o in results["objectives"]:  # every pi_k was trained (DDP DPO ran its steps)
        assert results["cost"][f"dpo/{o}"]["tokens_bwd"] > 0
        assert results["policies"][f"pi_{o}"]["kl"] > 0.01
    assert out.stdout.count("| mpo_decoded |") == 1  # rank 0 alone prints the table
    for kind in ("sft", "pairs", "dpo", "mpo_scores"):  # published once, no temporaries left behind
        assert all(".tmp-" not in p.name for p in (tmp_path / "cache" / kind).iterdir())
