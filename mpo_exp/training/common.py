"""Pieces every training stage shares: the optimiser, cost accounting and the fit loop.

:func:`fit` refuses to return a diverged model: every loss that Lightning backpropagates (the
``on_before_backward`` hook, which both automatic optimisation and ``manual_backward`` -- as in
PPO -- go through), every loss a step returns or logs (``*loss`` metrics), and after training
every parameter are checked to be finite. Otherwise :class:`NonFiniteLossError` is raised, so a
cached stage built around ``fit`` fails and caches nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mpo_exp import distributed as dist
from mpo_exp.cost import CostMeter, n_params


class NonFiniteLossError(RuntimeError):
    """A training stage's loss (or, after training, a parameter) became NaN or infinite."""


def stage_name(module: torch.nn.Module) -> str:
    """The module class plus what tells its instances apart (objective, estimator)."""
    name = type(module).__name__
    extra = [f"{a}={getattr(module, a)!r}" for a in ("objective", "estimator") if hasattr(module, a)]
    return f"{name}({', '.join(extra)})" if extra else name


def _group(module: torch.nn.Module) -> str:
    """The config group whose ``module`` builds the stage: each module class says (``config_group``)."""
    return getattr(module, "config_group", "<stage>")


def _hint(module: torch.nn.Module) -> str:
    group = _group(module)
    fields = [f"the learning rate ({group}.module.lr, here {getattr(module, 'lr', '?')})"]
    if hasattr(module, "beta") or group == "<stage>":
        fields.append(f"the KL coefficient (config `beta`, here {getattr(module, 'beta', '?')})")
    if hasattr(module, "warmup_steps"):
        fields.append(f"{group}.module.warmup_steps")
    if hasattr(module, "max_grad_norm"):
        fields.append(f"{group}.module.max_grad_norm")
    fields.append("trainer.precision")
    return f"Check {', '.join(fields)}. A cached stage that trains this way is not cached."


def _is_finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True  # not a number: nothing to check


def check_finite(loss, stage: str, step: int | str, hint: str = "", what: str = "loss") -> None:
    """Raise :class:`NonFiniteLossError` unless ``loss`` (tensor or number) is finite everywhere.

    The finite case costs one reduction; the message is only built on failure.
    """
    if loss is None or _is_finite(loss):
        return
    if isinstance(loss, torch.Tensor):
        shown = loss.detach().float().flatten()[:4].tolist()
        shown = shown[0] if len(shown) == 1 else shown
    else:
        shown = float(loss)
    raise NonFiniteLossError(f"{stage}: {what} is {shown} at step {step}. {hint}".rstrip())


def check_parameters_finite(module: torch.nn.Module, stage: str, hint: str = "") -> None:
    """Raise :class:`NonFiniteLossError` naming the first parameter with a NaN or inf entry."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise NonFiniteLossError(
                    f"{stage}: parameter {name!r} has non-finite values after training. {hint}".rstrip()
                )


class FiniteLossGuard(pl.Callback):
    """Stops training at the first non-finite loss.

    * ``on_before_backward``: every tensor about to be backpropagated, for automatic optimisation
      (the loss a ``training_step`` returns) and for ``manual_backward`` alike (PPO/RLOO), before it
      can reach the weights;
    * ``on_train_batch_start`` / ``on_train_end``: logged metrics whose name ends in ``loss``
      (``trainer.callback_metrics``, refreshed after ``on_train_batch_end``, hence one batch late),
      for modules that backpropagate outside Lightning.
    """

    @staticmethod
    def _fail_if_nonfinite(trainer, module, value, what: str, step: int) -> None:
        if value is None or _is_finite(value):  # the hot path: no message, no hint
            return
        where = f"{step} (epoch {trainer.current_epoch})"
        check_finite(value, stage_name(module), where, _hint(module), what)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # global_step counts completed optimizer steps: this loss is for the next one
        self._fail_if_nonfinite(
            trainer, pl_module, loss, "the loss being backpropagated", trainer.global_step + 1
        )

    def _check_logged(self, trainer, pl_module) -> None:
        for name, value in trainer.callback_metrics.items():
            if name.endswith("loss"):
                what = f"the logged metric {name!r}"
                self._fail_if_nonfinite(trainer, pl_module, value, what, trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._check_logged(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._check_logged(trainer, pl_module)


class PolicyModule(pl.LightningModule):
    """Base for modules that fine-tune one causal LM with AdamW and charge a :class:`CostMeter`."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0):
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.model = model
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.meter: CostMeter | None = None
        self._n_params = n_params(model)
        # LoRA: only the adapters need weight gradients (the cost meter's backward FLOPs)
        self._n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def charge(self, tokens: int, passes: int = 1, backward: bool = True) -> None:
        """Charge ``passes`` forward passes over ``tokens`` (and one backward if training)."""
        if self.meter is not None:
            self.meter.charge(self._n_params, passes * tokens, backward, self._n_trainable)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if not self.warmup_steps:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of the batches a single process would draw: same global batches under DDP.

    One process shuffles with ``DataLoader(shuffle=True, generator=seed)``: a ``randperm`` per
    epoch from one generator, cut into batches of ``batch_size``. Every rank draws the same
    permutations and keeps a contiguous ``batch_size / world`` slice of each batch, so the union
    of the ranks' batches is exactly the single-process batch and DDP's gradient average equals
    its gradient (Lightning's ``DistributedSampler`` would interleave one permutation instead).
    An epoch's incomplete last batch is trimmed to a multiple of ``world`` (at most ``world - 1``
    rows per epoch left out), so that every rank's rows still weigh the same in the average.
    The rank (``None``) is read when iterating, i.e. after the strategy has joined the process group.
    """

    def __init__(self, n: int, batch_size: int, world: int, seed: int, rank: int | None = None) -> None:
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.generator = torch.Generator().manual_seed(seed)

    def _sizes(self) -> list[int]:
        full, rest = divmod(self.n, self.batch_size)
        rest -= rest % self.world
        return [self.batch_size] * full + ([rest] if rest else [])

    def __len__(self) -> int:
        return len(self._sizes())

    def __iter__(self) -> Iterator[list[int]]:
        at = dist.rank() if self.rank is None else self.rank
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        start = 0
        for size in self._sizes():
            lo, hi = dist.shard_bounds(size, self.world, at)
            yield perm[start + lo : start + hi]
            start += size
        # RandomSampler draws one more (unused) permutation at the end of each epoch: stay in step
        torch.randperm(self.n, generator=self.generator)


def global_batch_loader(
    dataset: Dataset,
    batch_size: int,
    world: int,
    seed: int,
    collate: Callable | None,
    rank: int | None = None,
) -> DataLoader:
    """This rank's loader over the global batches of ``DataLoader(shuffle=True, generator=seed)``.

    The loader shares the sampler's generator, as the single-process loader does (it draws each
    epoch's worker base seed from it before the permutation), so the streams stay in step.
    """
    sampler = GlobalBatchSampler(len(dataset), batch_size, world, seed, rank)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=sampler.generator)


def fit(
    module: pl.LightningModule,
    dataset: Dataset,
    collate: Callable,
    trainer_factory: Callable[..., pl.Trainer],
    batch_size: int,
    max_steps: int,
    meter: CostMeter | None,
    logger=None,
    seed: int = 0,
    callbacks: Sequence[pl.Callback] = (),
) -> int:
    """Train ``module`` for ``max_steps`` optimiser steps over shuffled ``dataset``; the steps taken
    (fewer when a callback stops training early).

    ``batch_size`` is the global batch: under DDP (``trainer.strategy=ddp``, ``trainer.devices``
    processes) each rank trains on ``batch_size / world`` rows of the same batches one process
    would draw (:class:`GlobalBatchSampler`), so the averaged gradient is the same.
    Raises :class:`NonFiniteLossError` if a loss or, after training, a parameter is NaN or inf.
    """
    module.meter = meter
    trainer = trainer_factory(
        max_steps=max_steps,
        max_epochs=-1,
        logger=logger if logger else False,
        use_distributed_sampler=False,  # GlobalBatchSampler shards the batches itself
    )
    world = trainer.world_size
    if world == 1:
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed),
        )
    else:
        if batch_size % world:
            raise ValueError(
                f"{_group(module)}.batch_size={batch_size} is the global batch: it must be divisible by "
                f"the number of processes (trainer.devices x trainer.num_nodes = {world})"
            )
        loader = global_batch_loader(dataset, batch_size, world, seed, collate)
        if len(loader) == 0:
            raise ValueError(
                f"{_group(module)}: {len(dataset)} training rows make no batch for {world} processes "
                "(trainer.devices x trainer.num_nodes): use fewer processes or more data"
            )
    # appended rather than passed, so a trainer factory that sets its own callbacks keeps working
    trainer.callbacks.extend([FiniteLossGuard(), *callbacks])
    module.train()  # models loaded with from_pretrained arrive in eval mode; Lightning keeps submodule modes
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        module.eval()
    check_parameters_finite(module, stage_name(module), _hint(module))
    return int(trainer.global_step)
