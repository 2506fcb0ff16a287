"""What a method is: something that, given the shared stages, produces policies to evaluate.

A method is a config entry (``conf/method/<name>.yaml``) whose ``_target_`` is a subclass of
:class:`Method`; adding one touches one config file and one module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mpo_exp.mpo.mixing import MixedPolicy

if TYPE_CHECKING:
    from mpo_exp.context import RunContext


@dataclass
class MethodOutput:
    policies: list[MixedPolicy]
    #: mixing weights by objective, if the method has them (MPO's lambda, fixed user weights)
    weights: dict[str, float] | None = None
    #: cost-meter stage prefixes that are this method's own work beyond the shared stages
    own_stages: tuple[str, ...] = ()
    #: stage prefixes of the method's whole cost beyond pi_ref (default: preferences, DPO and own)
    total_stages: tuple[str, ...] | None = None
    extras: dict = field(default_factory=dict)


class Method(ABC):
    name: str

    def validate(self, objectives: list[str]) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` naming the bad ``method.*`` field."""

    @abstractmethod
    def run(self, ctx: RunContext) -> MethodOutput: ...
