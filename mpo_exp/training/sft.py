"""Supervised fine-tuning of the reference policy pi_ref on (prompt, response) pairs."""

from __future__ import annotations

import torch

from mpo_exp import distributed as dist
from mpo_exp.data import SequenceBatch
from mpo_exp.scoring import token_logprobs
from mpo_exp.training.common import PolicyModule


def sft_loss(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Mean negative log-likelihood of response tokens (prompt and padding masked out).

    The mean is over the global batch's tokens: under DDP each rank returns its share
    (:func:`~mpo_exp.distributed.ddp_mean`), so the averaged gradient is the single-process one
    even when the ranks' halves hold different numbers of response tokens.
    """
    logp = token_logprobs([model], [1.0], batch)
    return dist.ddp_mean(-logp.sum(), batch.response_mask.sum())


class SFTModule(PolicyModule):
    config_group = "sft"

    def training_step(self, batch: SequenceBatch, batch_idx: int) -> torch.Tensor:
        loss = sft_loss(self.model, batch)
        self.charge(batch.n_tokens)
        # under DDP a rank's loss is its share: their mean (sync_dist) is the global batch's loss
        self.log("sft/loss", loss, prog_bar=True, batch_size=len(batch), sync_dist=True)
        return loss
