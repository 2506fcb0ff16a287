"""Pieces every training stage shares: the optimiser, cost accounting and the fit loop."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mpo_exp.cost import CostMeter, n_params


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

    def charge(self, tokens: int, passes: int = 1, backward: bool = True) -> None:
        """Charge ``passes`` forward passes over ``tokens`` (and one backward if training)."""
        if self.meter is not None:
            self.meter.charge(self._n_params, passes * tokens, backward)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if not self.warmup_steps:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


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
) -> None:
    """Train ``module`` for ``max_steps`` optimiser steps over shuffled ``dataset``."""
    module.meter = meter
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = trainer_factory(max_steps=max_steps, max_epochs=-1, logger=logger if logger else False)
    module.train()  # models loaded with from_pretrained arrive in eval mode; Lightning keeps submodule modes
    trainer.fit(module, train_dataloaders=loader)
    module.eval()
