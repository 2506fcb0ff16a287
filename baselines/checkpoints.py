"""Policies saved along a baseline's training: the points of a cost-to-quality curve.

RL (``rl.checkpoints``, in iterations), MODPO and RiC (``method.checkpoints``, in optimiser
steps) save the policy after the chosen amounts of training, each with the training's cost up to
then. The run evaluates each as a policy of its own (``morlhf@it8``, ``modpo@step12``) and the
report draws them as a curve ending at the final policy (``mpo_exp/report/curves.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl

from mpo_exp.cost import CostMeter, StageCost
from mpo_exp.methods import PolicyCost
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.policies import Policy

if TYPE_CHECKING:
    from mpo_exp.context import RunContext

COST_FIELDS = ("wall_s", "tokens_fwd", "tokens_bwd", "flops")


@dataclass(frozen=True)
class Unit:
    """How a training counts its progress: the key of a point and the tag in a policy's name."""

    key: str  # "iteration" (RL) | "step" (MODPO, RiC)
    tag: str  # "it" | "step": ``morlhf@it8``, ``modpo@step12``

    def name(self, label: str, n: int) -> str:
        return f"{label}@{self.tag}{n}"

    def folder(self, n: int) -> str:
        return f"{self.tag}{n}"


ITERATIONS, STEPS = Unit("iteration", "it"), Unit("step", "step")


def steps_done(trainer: pl.Trainer, module: pl.LightningModule) -> int:
    return int(trainer.global_step)


class TrainingCheckpoints(pl.Callback):
    """Saves the model after the chosen amounts of training, with the cost up to then.

    ``progress``: how much training is done (optimiser steps by default; RL counts iterations).
    ``offset``: progress made by earlier fits of the same training (RiC's online round goes on
    from its offline steps); ``before``: their cost, added to every point. Saving is not timed.
    """

    def __init__(
        self,
        points: list[int],
        save: Callable[[int], None],
        meter: CostMeter,
        unit: Unit = STEPS,
        progress: Callable[[pl.Trainer, pl.LightningModule], int] = steps_done,
        offset: int = 0,
        before: StageCost | None = None,
    ) -> None:
        self.points_wanted, self.save, self.meter, self.unit = sorted(set(points)), save, meter, unit
        self.progress, self.offset, self.before = progress, offset, before
        self.points: list[dict] = []
        self.start, self.saving = 0.0, 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = self.offset + self.progress(trainer, pl_module)
        if done not in self.points_wanted or any(p[self.unit.key] == done for p in self.points):
            return
        cost = self.meter.current
        point = {k: 0.0 for k in COST_FIELDS} | (cost.as_dict() if cost is not None else {})
        point.pop("reused", None)
        point["wall_s"] = time.perf_counter() - self.start - self.saving
        if self.before is not None:
            for k in COST_FIELDS:
                point[k] += getattr(self.before, k)
        point = {self.unit.key: done, **point}
        t = time.perf_counter()
        self.save(done)
        self.saving += time.perf_counter() - t
        self.points.append(point)


def write_points(tmp: Path, points: list[dict]) -> None:
    (tmp / "checkpoints.json").write_text(json.dumps(points))


def load_checkpoints(
    path: Path, label: str, unit: Unit, load: Callable[[Path, str], Policy]
) -> list[tuple[Policy, dict]]:
    """The policies a training saved under ``path/checkpoints/`` with their points, in order."""
    f = path / "checkpoints.json"
    points = json.loads(f.read_text()) if f.exists() else []
    return [
        (load(path / "checkpoints" / unit.folder(p[unit.key]), unit.name(label, p[unit.key])), p)
        for p in points
    ]


def add_checkpoints(
    ctx: RunContext,
    replaced: tuple[str, ...],
    cost: PolicyCost,
    checkpoints: list[tuple[Policy | MixedPolicy, dict]],
    policies: list[MixedPolicy],
    costs: dict[str, PolicyCost],
) -> None:
    """Each saved policy as a policy of its own: its cost is the final policy's with the training
    stages ``replaced`` cut to a stage ``checkpoint/<name>`` holding their cost up to that point
    (outside every other policy's cost)."""
    reused = any(ctx.meter.stages[s].reused for s in replaced if s in ctx.meter.stages)

    def swap(entries: tuple[str, ...], stage: str) -> tuple[str, ...]:
        out: list[str] = []
        for e in entries:
            if e not in replaced:
                out.append(e)
            elif stage not in out:
                out.append(stage)
        return tuple(out)

    for ck, point in checkpoints:
        stage = f"checkpoint/{ck.name}"
        ctx.meter.record(stage, StageCost(**{k: point[k] for k in COST_FIELDS}, reused=reused))
        policies.append(ck if isinstance(ck, MixedPolicy) else MixedPolicy.single(ck))
        costs[ck.name] = PolicyCost(swap(cost.total, stage), swap(cost.post_processing, stage))
