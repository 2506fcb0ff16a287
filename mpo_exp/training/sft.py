"""Supervised fine-tuning of the reference policy pi_ref on (prompt, response) pairs."""

from __future__ import annotations

import torch

from mpo_exp.data import SequenceBatch
from mpo_exp.scoring import token_logprobs
from mpo_exp.training.common import PolicyModule


def sft_loss(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Mean negative log-likelihood of response tokens (prompt and padding masked out)."""
    logp = token_logprobs([model], [1.0], batch)
    return -logp.sum() / batch.response_mask.sum().clamp(min=1)


class SFTModule(PolicyModule):
    config_group = "sft"

    def training_step(self, batch: SequenceBatch, batch_idx: int) -> torch.Tensor:
        loss = sft_loss(self.model, batch)
        self.charge(batch.n_tokens)
        self.log("sft/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss
