"""One cost meter for every stage of every method, so cost columns are comparable.

FLOPs use the standard analytic estimate (Kaplan et al.; nanoGPT): a forward pass costs
2·N FLOPs per token and a backward pass 4·N, so a training token costs 6·N, where N is the
number of non-embedding-free parameters (we count all parameters, the usual convention).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class StageCost:
    wall_s: float = 0.0
    tokens_fwd: int = 0
    tokens_bwd: int = 0
    flops: float = 0.0
    reused: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CostMeter:
    """Accumulates wall time, tokens and FLOPs per named stage.

    Code that forwards or back-propagates tokens calls :meth:`forward` / :meth:`backward`;
    whatever stage is open (``with meter.stage("dpo/helpful")``) is charged.
    """

    stages: dict[str, StageCost] = field(default_factory=dict)
    _open: list[str] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[StageCost]:
        cost = self.stages.setdefault(name, StageCost())
        self._open.append(name)
        start = time.perf_counter()
        try:
            yield cost
        finally:
            cost.wall_s += time.perf_counter() - start
            self._open.pop()

    @property
    def current(self) -> StageCost | None:
        return self.stages[self._open[-1]] if self._open else None

    def forward(self, n_parameters: int, tokens: int) -> None:
        if (cost := self.current) is not None:
            cost.tokens_fwd += int(tokens)
            cost.flops += 2.0 * n_parameters * int(tokens)

    def backward(self, n_parameters: int, tokens: int) -> None:
        """Backward pass only (the matching forward is charged by :meth:`forward`): 4·N per token."""
        if (cost := self.current) is not None:
            cost.tokens_bwd += int(tokens)
            cost.flops += 4.0 * n_parameters * int(tokens)

    def charge(self, n_parameters: int, tokens: int, backward: bool = False) -> None:
        """A forward pass over ``tokens``, plus its backward pass when training (6·N per token in all)."""
        self.forward(n_parameters, tokens)
        if backward:
            self.backward(n_parameters, tokens)

    def record(self, name: str, cost: StageCost) -> None:
        """Attach a cost computed elsewhere (e.g. read back from a cached artifact)."""
        self.stages[name] = cost

    def as_dict(self) -> dict[str, dict]:
        return {name: cost.as_dict() for name, cost in self.stages.items()}

    def total(self, prefixes: tuple[str, ...] = ("",)) -> StageCost:
        out = StageCost()
        for name, c in self.stages.items():
            if name.startswith(prefixes):
                out.wall_s += c.wall_s
                out.tokens_fwd += c.tokens_fwd
                out.tokens_bwd += c.tokens_bwd
                out.flops += c.flops
        return out
