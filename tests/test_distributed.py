"""Two CPU processes (gloo, launched like torchrun): DDP training and sharded scoring match one process.

One ``mp.spawn`` runs every 2-process check, as starting the processes is the slow part; each
worker saves what it saw and the assertions against the single-process runs happen here.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from mpo_exp import distributed as dist
from mpo_exp.data import PreferenceDataset, collate
from mpo_exp.training.common import fit, global_batch_loader

WORLD = 2
N_PAIRS, DPO_BATCH, DPO_STEPS = 24, 8, 5  # 3 global batches per epoch: the run crosses an epoch


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


def _trainer_factory(devices: int):
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
        **kw,
    )


def _train_dpo(devices: int) -> dict[str, torch.Tensor]:
    module, data = _dpo_setup()
    fit(module, data, data.collate, _trainer_factory(devices), DPO_BATCH, DPO_STEPS, meter=None, seed=7)
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


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


def _fake_context(task, policies, cache: Path):
    """What ``score_log_ratios`` reads from a RunContext, with the real cache and cost meter."""
    from mpo_exp.artifacts import ArtifactStore
    from mpo_exp.context import RunContext
    from mpo_exp.cost import CostMeter
    from mpo_exp.mpo.mixing import MixedPolicy

    ref, *singles = policies
    ctx = SimpleNamespace(
        seed=0,
        task=task,
        batch_size=5,  # several sampling/scoring batches per shard
        meter=CostMeter(),
        store=ArtifactStore(cache),
        keys={"sft": "ref", **{f"dpo/{p.name}": p.name for p in singles}},
        reference=MixedPolicy.single(ref, "pi_ref"),
        single_objective_policies={p.name: p for p in singles},
        reseed=lambda offset: pl.seed_everything(offset, verbose=False),
    )
    ctx.cached_stage = functools.partial(RunContext.cached_stage, ctx)
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
    seen: dict = {"dpo": _train_dpo(WORLD)}

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

    # MPO's cached stage: sampled and scored by shards, published once by rank 0, reused after
    ctx = _fake_context(task, policies, Path(out) / "cache")
    seen["ell"] = score_log_ratios(ctx, n_prompts=5, samples_per_prompt=3)
    seen["ell_reused"] = score_log_ratios(ctx, n_prompts=5, samples_per_prompt=3)
    seen["mpo_cost"] = ctx.meter.stages["mpo/scoring"].as_dict()

    # PPO / RLOO: each rank rolls out its half of every batch of prompts; DDP syncs manual_backward
    for estimator in ("ppo", "rloo"):
        seen[estimator] = _train_rl(estimator, devices=WORLD)
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


def test_ddp_dpo_matches_one_process_with_the_same_global_batch(two_ranks):
    torch.set_num_threads(1)
    single = _train_dpo(devices=1)
    initial = _dpo_setup()[0].model.state_dict()
    moved = max(float((single[k] - initial[k]).abs().max()) for k in single)
    assert moved > 1e-3  # DPO_STEPS of training did change the weights
    # attention's key bias adds the same score to every key: softmax ignores it, its gradient is
    # zero but for rounding, and Adam normalises that rounding noise to steps of ~lr. So it is no
    # evidence either way; every other entry must agree to float rounding.
    d = single["transformer.h.0.attn.c_attn.weight"].shape[0]
    no_key_bias = torch.ones(3 * d, dtype=torch.bool)
    no_key_bias[d : 2 * d] = False
    for seen in two_ranks:
        for k, v in single.items():
            got = seen["dpo"][k]
            if k.endswith("attn.c_attn.bias"):
                got, v = got[no_key_bias], v[no_key_bias]
            torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-6, msg=f"parameter {k}")


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
    assert a["ell"].shape == (5, 3, 2)
    assert torch.equal(a["ell"], b["ell"]) and torch.equal(a["ell"], a["ell_reused"])
    # both shards hold samples of their own: no two ranks' rows are copies of each other
    rows = a["ell"].reshape(15, 2)
    assert not torch.allclose(rows[:7], rows[8:15])
    published = list((a["out"] / "cache" / "mpo_scores").iterdir())
    assert len([p for p in published if not p.name.endswith(".lock")]) == 1  # one artifact, no temporaries
    assert a["mpo_cost"]["tokens_fwd"] > 0  # the stage's cost is both ranks' work (7 and 8 rows), on each
    assert (
        a["mpo_cost"]["tokens_fwd"] == b["mpo_cost"]["tokens_fwd"]
        and a["mpo_cost"]["flops"] == b["mpo_cost"]["flops"]
    )


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
