"""One cost meter for every stage of every method, so cost columns are comparable.

FLOPs use the standard analytic estimate (Kaplan et al.; nanoGPT): a forward pass costs
2·N FLOPs per token and a backward pass 4·N, so a training token costs 6·N, where N is the
number of non-embedding-free parameters (we count all parameters, the usual convention).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
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
    the innermost open stage (``with meter.stage("dpo/helpful")``) is charged. Stages nest: a
    stage opened inside another (a diagnostic inside a training stage) takes its tokens, FLOPs
    and wall time out of the outer one, so no second is counted twice.
    """

    stages: dict[str, StageCost] = field(default_factory=dict)
    _open: list[list] = field(default_factory=list)  # [name, seconds spent in nested stages]

    @contextmanager
    def stage(self, name: str) -> Iterator[StageCost]:
        cost = self.stages.setdefault(name, StageCost())
        frame = [name, 0.0]
        self._open.append(frame)
        start = time.perf_counter()
        try:
            yield cost
        finally:
            elapsed = time.perf_counter() - start
            cost.wall_s += elapsed - frame[1]
            self._open.pop()
            if self._open:
                self._open[-1][1] += elapsed

    @property
    def current(self) -> StageCost | None:
        return self.stages[self._open[-1][0]] if self._open else None

    def forward(self, n_parameters: int, tokens: int) -> None:
        if (cost := self.current) is not None:
            cost.tokens_fwd += int(tokens)
            cost.flops += 2.0 * n_parameters * int(tokens)

    def backward(self, n_parameters: int, tokens: int, n_trainable: int | None = None) -> None:
        """Backward pass only (the matching forward is charged by :meth:`forward`): per token 2·N for
        the activations' gradients plus 2·N_trainable for the weights' (4·N when every weight trains;
        about 2·N for LoRA, whose frozen base needs no weight gradients)."""
        if (cost := self.current) is not None:
            trainable = n_parameters if n_trainable is None else n_trainable
            cost.tokens_bwd += int(tokens)
            cost.flops += (2.0 * n_parameters + 2.0 * trainable) * int(tokens)

    def charge(
        self, n_parameters: int, tokens: int, backward: bool = False, n_trainable: int | None = None
    ) -> None:
        """A forward pass over ``tokens``, plus its backward pass when training (6·N per token in all
        when every weight trains)."""
        self.forward(n_parameters, tokens)
        if backward:
            self.backward(n_parameters, tokens, n_trainable)

    def record(self, name: str, cost: StageCost) -> None:
        """Attach a cost computed elsewhere (e.g. read back from a cached artifact)."""
        self.stages[name] = cost

    def as_dict(self) -> dict[str, dict]:
        return {name: cost.as_dict() for name, cost in self.stages.items()}

    def total(self, prefixes: tuple[str, ...] = ("",)) -> StageCost:
        """The sum over stages whose names start with any of ``prefixes``."""
        return self.sum(name for name in self.stages if name.startswith(prefixes))

    def sum(self, names: Iterable[str]) -> StageCost:
        """The sum over the named stages (each counted once)."""
        out = StageCost()
        for name in dict.fromkeys(names):
            c = self.stages[name]
            out.wall_s += c.wall_s
            out.tokens_fwd += c.tokens_fwd
            out.tokens_bwd += c.tokens_bwd
            out.flops += c.flops
        return out
