"""What a method is: something that, given the shared stages, produces policies to evaluate.

A method is a config entry (``conf/method/<name>.yaml``) whose ``_target_`` is a subclass of
:class:`Method`; adding one touches one config file and one module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.nodes import ConfigError, build_node

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from mpo_exp.context import RunContext


@dataclass(frozen=True)
class PolicyCost:
    """The cost-meter stages one policy needs beyond pi_ref.

    Entries are stage names, or prefixes ending in ``/`` (``"rm/"``: every reward-model stage).
    ``total`` is everything the policy needs (shared stages included); ``post_processing`` is
    the method's own work after the shared pieces (MPO: sampling, scoring, BSMD).
    """

    total: tuple[str, ...]
    post_processing: tuple[str, ...] = ()

    def resolve(self, stages: Iterable[str]) -> dict[str, list[str]]:
        stages = list(stages)

        def pick(entries: tuple[str, ...]) -> list[str]:
            return [
                s for s in stages if any(s == e or (e.endswith("/") and s.startswith(e)) for e in entries)
            ]

        return {"total": pick(self.total), "post_processing": pick(self.post_processing)}


def dpo_policies_cost(objectives: Iterable[str], *own: str) -> PolicyCost:
    """Cost of a policy built from the DPO pi_k: pairs, pi_ref's log-probs of them, each pi_k, ``own``."""
    return PolicyCost(("preferences", "dpo/ref_logp", *(f"dpo/{o}" for o in objectives), *own), own)


@dataclass
class MethodOutput:
    policies: list[MixedPolicy]
    #: what each policy (by name) costs; every policy in ``policies`` needs an entry
    costs: dict[str, PolicyCost]
    #: mixing weights by objective, if the method has them (MPO's lambda, fixed user weights)
    weights: dict[str, float] | None = None
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [p.name for p in self.policies if p.name not in self.costs]
        if missing:
            raise ValueError(f"method output has no cost entry for policies {missing}")


class Method(ABC):
    name: str

    def validate(self, objectives: list[str]) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` naming the bad ``method.*`` field."""

    @abstractmethod
    def run(self, ctx: RunContext) -> MethodOutput: ...


def build_method(cfg: DictConfig) -> Method:
    """The run's method from ``cfg.method``, validated against the task's objectives (one-line errors)."""
    method = build_node(cfg.method, "method")
    try:
        method.validate(list(cfg.task.objectives))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return method
