"""The run: shared stages (pi_ref, preference pairs, pi_k) -> method -> evaluation -> results."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from mpo_exp import tracking
from mpo_exp.artifacts import config_key
from mpo_exp.config import build_method, to_plain
from mpo_exp.context import RunContext
from mpo_exp.evaluation import Evaluator
from mpo_exp.methods import Method, PolicyCost, dpo_policies_cost
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.results import write_results
from mpo_exp.runtime import configure_threads

log = logging.getLogger(__name__)


def run_pipeline(
    cfg: DictConfig, output_dir: str | Path, announce: Callable[[dict], None] | None = None
) -> dict:
    """Run one job end to end and write ``results.json`` / ``results.md`` into ``output_dir``.

    Each policy's evaluation is appended to ``evaluations.partial.jsonl`` as it completes, and
    ``announce(results)`` (the CLI prints the table) runs before the result files are written,
    so a failing disk at the end loses no computed number.
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    configure_threads(cfg.get("num_threads"))
    run_key = config_key(
        {
            k: to_plain(v) if isinstance(v, DictConfig) else v
            for k, v in cfg.items()
            if k not in ("paths", "logger", "trainer", "resume", "num_threads")
        }
    )
    previous = output_dir / "results.json"
    if cfg.get("resume", True) and previous.exists():
        done = json.loads(previous.read_text())
        if done.get("run_key") == run_key:
            log.info("job already complete (%s); skipping — set resume=false to run it again", previous)
            return done
    method: Method = build_method(cfg)
    logger = tracking.build_logger(cfg, method.name, output_dir)
    try:
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
        )
        with ctx.meter.stage("eval/pi_ref_baseline"):
            baseline = ev.reference_rewards(ctx.meter)
        policies, examples = {}, {}
        partial = output_dir / "evaluations.partial.jsonl"
        partial.unlink(missing_ok=True)
        for pol in candidates:
            with ctx.meter.stage(f"eval/{pol.name}"):
                res = ev.evaluate(pol, ctx.meter)
            policies[pol.name] = res.summary(ctx.task.objectives, baseline)
            examples[pol.name] = res.examples
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
            # the stages behind each policy, and their sums (MaxMin's two variants each pay for one RL run)
            "policy_costs": policy_costs,
            "cost_summary": {
                name: {part: ctx.meter.sum(names).as_dict() for part, names in parts.items()}
                for name, parts in policy_costs.items()
            },
            "artifacts": dict(ctx.keys),
            "run_key": run_key,
            "examples": examples,
            "wall_s_this_run": time.perf_counter() - start,
            **out.extras,
        }
        if announce is not None:
            announce(results)
        write_results(results, output_dir)
        partial.unlink(missing_ok=True)
        tracking.log_results(logger, results)
        return results
    finally:
        tracking.finish(logger)


def _append_partial(path: Path, record: dict) -> None:
    """Best effort: a failing disk here is reported at the end, when results.json is written."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        log.warning("could not append to %s (%s); results are kept in memory", path, e)
