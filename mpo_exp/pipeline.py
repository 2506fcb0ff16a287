"""The run: shared stages (pi_ref, preference pairs, pi_k) -> method -> evaluation -> results."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig

from mpo_exp import distributed as dist
from mpo_exp import draws, tracking
from mpo_exp.artifacts import config_key
from mpo_exp.context import RunContext, trainer_key
from mpo_exp.evaluation import Evaluator, PolicyEval
from mpo_exp.methods import Method, PolicyCost, build_method, dpo_policies_cost
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.nodes import ConfigError, to_plain
from mpo_exp.results import result_config, write_results
from mpo_exp.runtime import configure_threads

log = logging.getLogger(__name__)

#: trainer.strategy values the pipeline supports (docs/scaling.md, Distributed training)
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true")


def run_pipeline(
    cfg: DictConfig, output_dir: str | Path, announce: Callable[[dict], None] | None = None
) -> dict:
    """Run one job end to end and write ``results.json`` / ``results.md`` into ``output_dir``.

    Each policy's evaluation is appended to ``evaluations.partial.jsonl`` as it completes, and
    ``announce(results)`` (the CLI prints the table) runs before the result files are written,
    so a failing disk at the end loses no computed number.

    Under torchrun (``trainer.strategy=ddp``) every rank runs this function: the stages are built
    collectively, only rank 0 writes files and logs, and every rank returns the results.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    distributed = _join_launch(cfg)
    main = dist.is_main()
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
    configure_threads(cfg.get("num_threads"))
    run_key = config_key(
        {
            **{
                k: to_plain(v) if isinstance(v, DictConfig) else v
                for k, v in cfg.items()
                if k not in ("paths", "logger", "trainer", "resume", "num_threads")
            },
            "trainer": trainer_key(cfg.trainer),
        }
    )
    previous = output_dir / "results.json"
    done = None
    if main and cfg.get("resume", True) and previous.exists():
        done = json.loads(previous.read_text())
    done = dist.broadcast_object(done)  # every rank skips, or none does
    if done is not None and done.get("run_key") == run_key:
        log.info("job already complete (%s); skipping — set resume=false to run it again", previous)
        return done
    method: Method = build_method(cfg)
    # rank 0 alone logs and writes; every rank computes (training and caching are collective)
    logger = tracking.build_logger(cfg, method.name, output_dir) if main else None
    try:
        with draws.use(str(cfg.get("sampler") or "multinomial")):  # how tokens are drawn, this run only
            ctx = RunContext(cfg, output_dir, logger)
            ref = ctx.reference
            singles = ctx.single_objective_policies
            out = method.run(ctx)

            uniform = MixedPolicy("uniform_mix", list(singles.values()), [1.0 / len(singles)] * len(singles))
            candidates = [ref, *(MixedPolicy.single(p) for p in singles.values()), uniform, *out.policies]
            costs = {
                ref.name: PolicyCost(()),
                **{p.name: dpo_policies_cost([k]) for k, p in singles.items()},
                uniform.name: dpo_policies_cost(singles),
                **out.costs,
            }
            ctx.reseed(100)
            ev = Evaluator(
                ctx.task,
                ref,
                int(cfg.eval.n_prompts),
                ctx.seed + 2,
                ctx.batch_size,
                float(cfg.eval.temperature),
                int(cfg.eval.n_examples),
                sample_batch_size=ctx.sample_batch_size,
                own_logprobs=ctx.dtype == "float32",
            )
            # pi_ref, the pi_k and uniform mixing are the same in every job of a sweep: cached
            shared = {
                ref.name: [ctx.keys["sft"]],
                **{p.name: [ctx.keys[f"dpo/{k}"]] for k, p in singles.items()},
                uniform.name: [ctx.keys[f"dpo/{k}"] for k in singles],
            }
            baseline = _reference_rewards(ctx, ev)
            policies, examples = {}, {}
            partial = output_dir / "evaluations.partial.jsonl"
            if main:
                partial.unlink(missing_ok=True)
            for pol in candidates:
                if pol.name in shared:
                    res = _cached_evaluation(ctx, ev, pol, shared[pol.name])
                else:
                    with ctx.meter.stage(f"eval/{pol.name}"):
                        res = ev.evaluate(pol, ctx.meter)
                policies[pol.name] = res.summary(ctx.task.objectives, baseline)
                examples[pol.name] = res.examples
                if main:
                    _append_partial(partial, {"policy": pol.name, **policies[pol.name]})

            policy_costs = {name: cost.resolve(ctx.meter.stages) for name, cost in costs.items()}
            results = {
                "method": method.name,
                "seed": ctx.seed,
                "beta": ctx.beta,
                "objectives": ctx.task.objectives,
                "lambda": [out.weights[o] for o in ctx.task.objectives] if out.weights else None,
                "method_policies": [p.name for p in out.policies],
                "policies": policies,
                "cost": ctx.meter.as_dict(),
                # the stages behind each policy, and their sums (MaxMin's two variants: one RL run each)
                "policy_costs": policy_costs,
                "cost_summary": {
                    name: {part: ctx.meter.sum(names).as_dict() for part, names in parts.items()}
                    for name, parts in policy_costs.items()
                },
                "artifacts": dict(ctx.keys),
                "run_key": run_key,
                # what the report groups rows by, and the pi_ref responses its bootstrap pairs runs on
                "config": result_config(cfg),
                "pi_ref_fingerprint": ev.fingerprint,
                "examples": examples,
                "wall_s_this_run": time.perf_counter() - start,
                **out.extras,
            }
            if distributed:
                results["world_size"] = dist.world_size()
            if not main:
                return results
            if announce is not None:
                announce(results)
            write_results(results, output_dir)
            partial.unlink(missing_ok=True)
            tracking.log_results(logger, results)
            return results
    finally:
        tracking.finish(logger)


def _evaluation_spec(ctx: RunContext, ev: Evaluator) -> dict:
    """What an evaluation depends on besides the policy: the cache key of a shared row."""
    return {
        "ref": ctx.keys["sft"],
        "task": to_plain(ctx.cfg.task),
        "eval": {"n_prompts": len(ev.prompts), "temperature": ev.temperature, "n_examples": ev.n_examples},
        "seed": ev.seed,
        "batch_size": ev.batch_size,
        "own_logprobs": ev.own_logprobs,
        "dtype": ctx.dtype,
    }


def _reference_rewards(ctx: RunContext, ev: Evaluator) -> torch.Tensor:
    """pi_ref's responses every policy is compared with, from the cache when a job of the sweep drew them."""

    def build(tmp: Path) -> None:
        rewards = ev.reference_rewards(ctx.meter)
        torch.save(rewards, tmp / "rewards.pt")
        (tmp / "baseline.json").write_text(json.dumps({"fingerprint": ev.fingerprint}))

    spec = {**_evaluation_spec(ctx, ev), "baseline": True}
    art = ctx.cached_stage("eval/pi_ref_baseline", "evaluation", spec, build)
    ev.baseline = torch.load(art.path / "rewards.pt", weights_only=True)
    ev.fingerprint = json.loads((art.path / "baseline.json").read_text())["fingerprint"]
    return ev.baseline


def _cached_evaluation(ctx: RunContext, ev: Evaluator, pol: MixedPolicy, keys: list[str]) -> PolicyEval:
    """Evaluate a policy built from cached models (``keys``) once per sweep. Every policy draws
    from its own fixed random stream, so a reused evaluation is the one this job would compute."""

    def build(tmp: Path) -> None:
        res = ev.evaluate(pol, ctx.meter)
        torch.save(res.rewards, tmp / "rewards.pt")
        (tmp / "eval.json").write_text(json.dumps({"kl": res.kl, "examples": res.examples}))

    weights = [float(w) for w in pol.live[1]]
    spec = {**_evaluation_spec(ctx, ev), "policy": {"models": keys, "weights": weights}}
    art = ctx.cached_stage(f"eval/{pol.name}", "evaluation", spec, build)
    meta = json.loads((art.path / "eval.json").read_text())
    rewards = torch.load(art.path / "rewards.pt", weights_only=True)
    return PolicyEval(rewards, float(meta["kl"]), [tuple(e) for e in meta["examples"]])


def _join_launch(cfg: DictConfig) -> bool:
    """Join the torchrun process group; refuse a multi-process trainer launched as one process.

    Lightning would start the other processes itself inside the first ``fit``, re-running the
    script from the top while this one holds the cache lock of the stage being built; the
    supported launch is torchrun, whose processes all run the whole pipeline from the start.
    """
    strategy = cfg.trainer.get("strategy", "auto")
    target = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy)
    if "fsdp" in target.lower():
        raise ConfigError(
            f"trainer.strategy={target}: FSDP is not supported (the stages save a model without "
            "gathering FSDP's sharded state dict); use trainer.strategy=ddp"
        )
    if isinstance(strategy, str) and strategy not in STRATEGIES:
        raise ConfigError(
            f"trainer.strategy must be one of {STRATEGIES} (or a strategy object), got {strategy!r}: "
            "the stages between fits need every process from the start (torchrun), not spawned ones"
        )
    if dist.init_from_env(str(cfg.trainer.get("accelerator", "auto"))):
        return True
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    gpus = str(cfg.trainer.get("accelerator", "auto")) != "cpu"
    many = (
        (isinstance(devices, int) and devices > 1)
        or (isinstance(devices, ListConfig) and len(devices) > 1)
        or (str(devices) in ("-1", "auto") and gpus and _gpus() > 1)
    )
    if many or (isinstance(nodes, int) and nodes > 1):
        raise ConfigError(
            f"trainer.devices={devices}, trainer.num_nodes={nodes}: several processes are launched with "
            f"torchrun, e.g. `torchrun --nproc_per_node=N -m mpo_exp.cli trainer.strategy=ddp "
            f"trainer.devices=N ...` (see README, Distributed training)"
        )
    return False


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def _append_partial(path: Path, record: dict) -> None:
    """Best effort: a failing disk here is reported at the end, when results.json is written."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        log.warning("could not append to %s (%s); results are kept in memory", path, e)
