"""The RL stage shared by MORLHF and MaxMin-RLHF: train pi from pi_ref on one reward function."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.utils import instantiate

from baselines.checkpoints import ITERATIONS, TrainingCheckpoints, load_checkpoints, write_points
from baselines.ppo import RewardFn, prompt_collate
from mpo_exp.generation import encode_prompts
from mpo_exp.policies import Policy, load_policy, save_policy

if TYPE_CHECKING:
    from mpo_exp.context import RunContext

log = logging.getLogger(__name__)


def rl_train_prompts(ctx: RunContext) -> list[str]:
    """The prompts the RL stage trains on, in order (one per rollout row, repeats included):
    also what the per-prompt normalisation (``partition_prompt``) is fitted on."""
    cfg = ctx.cfg.rl
    return ctx.task.prompts("train", int(cfg.iterations) * int(cfg.batch_size), ctx.seed + 5)


def rl_budget(history: list[dict], beta: float, batch_size: int, tol: float) -> dict:
    """The RL budget spent and whether the RL objective plateaued within it.

    The objective of an iteration is its rollouts' mean score minus beta times their mean KL to
    pi_ref (what PPO maximises). It plateaued when its mean over the last quarter of iterations
    differs from its mean over the quarter before by at most ``tol`` (``rl.plateau_tol``, in the
    objective's units) or by at most twice that difference's standard error (an iteration's
    objective is a mean over a few prompts: a change within its noise is no change). Fewer than 8
    iterations cannot tell.
    """
    objective = [h["score"] - beta * h["kl"] for h in history]
    out: dict = {"iterations": len(history), "prompts_per_iteration": batch_size, "plateau_tol": tol}
    q = len(objective) // 4
    if q < 2:
        return {**out, "plateaued": None}
    last, before = objective[-q:], objective[-2 * q : -q]

    def mean_var(xs: list[float]) -> tuple[float, float]:
        m = sum(xs) / len(xs)
        return m, sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    (m_last, v_last), (m_before, v_before) = mean_var(last), mean_var(before)
    change, stderr = m_last - m_before, ((v_last + v_before) / q) ** 0.5
    return {
        **out,
        "objective_first": objective[0],
        "objective_last_quarter": m_last,
        "change_over_last_quarter": change,
        "change_stderr": stderr,
        "plateaued": abs(change) <= max(tol, 2 * stderr),
    }


def rl_spec(cfg: dict) -> dict:
    """The RL settings that change the trained artifact (its cache key): ``plateau_tol`` is a
    reading of the run, and ``checkpoints`` count only when there are some (older keys stay)."""
    spec = {k: v for k, v in cfg.items() if k != "plateau_tol"}
    if not spec.get("checkpoints"):
        spec.pop("checkpoints", None)
    return spec


def train_rl_policy(
    ctx: RunContext, name: str, spec: dict, make_reward_fn: Callable[[], RewardFn]
) -> tuple[Policy, list[dict], list[tuple[Policy, dict]]]:
    """Train (or reuse) an RL policy; ``spec`` must identify the reward function completely.

    Returns the policy, its per-iteration history and, for each of ``rl.checkpoints``, the policy
    after that many iterations with the RL stage's cost up to then.
    """
    cfg = ctx.cfg.rl
    full_spec = {
        "ref": ctx.keys["sft"],
        "rl": rl_spec(ctx.plain(cfg)),
        "beta": ctx.beta,
        "seed": ctx.seed,
        "max_new_tokens": ctx.task.max_new_tokens,
        **spec,
    }

    def build(tmp: Path) -> None:
        ctx.reseed(40)
        policy = load_policy(ctx.store.path("sft", ctx.keys["sft"]), name=name, dtype=ctx.dtype)
        policy.model = ctx.model_spec.trainable(policy.model)  # model.lora: LoRA, merged on save
        module = instantiate(cfg.module)(
            policy=policy,
            reference=ctx.reference,
            reward_fn=make_reward_fn(),
            beta=ctx.beta,
            max_new_tokens=ctx.task.max_new_tokens,
        )
        prompts = encode_prompts(policy.tokenizer, rl_train_prompts(ctx))
        log.info(
            "RL (%s, %s) for %d iterations of %d prompts, beta=%s",
            name,
            cfg.module.estimator,
            cfg.iterations,
            cfg.batch_size,
            ctx.beta,
        )

        def save_checkpoint(iteration: int) -> None:
            merged = ctx.model_spec.mergeable(copy.deepcopy(policy.model))  # training goes on
            save_policy(
                Policy(name, merged, policy.tokenizer), tmp / "checkpoints" / ITERATIONS.folder(iteration)
            )

        saver = TrainingCheckpoints(
            list(cfg.get("checkpoints") or []),
            save_checkpoint,
            ctx.meter,
            ITERATIONS,
            progress=lambda trainer, module: len(module.history),  # PPO takes several steps per iteration
        )
        ctx.fit(
            module,
            prompts,
            prompt_collate,
            cfg,
            max_steps=int(cfg.iterations) * module.optimizer_steps_per_iteration,
            callbacks=[saver] if saver.points_wanted else [],
        )
        policy.model = ctx.model_spec.mergeable(policy.model)
        save_policy(policy, tmp)
        (tmp / "history.json").write_text(json.dumps(module.history))
        write_points(tmp, saver.points)

    art = ctx.cached_stage(f"rl/{name}", "rl_policy", full_spec, build)
    history = json.loads((art.path / "history.json").read_text())
    checkpoints = load_checkpoints(
        art.path, name, ITERATIONS, lambda path, label: load_policy(path, name=label, dtype=ctx.dtype).eval()
    )
    return load_policy(art.path, name=name, dtype=ctx.dtype).eval(), history, checkpoints
