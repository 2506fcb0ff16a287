"""Direct Preference Optimization (Rafailov et al., 2023): one single-objective policy pi_k."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpo_exp.adapters import disable_model_dropout
from mpo_exp.data import PreferenceBatch
from mpo_exp.scoring import pair_logprobs
from mpo_exp.training.common import PolicyModule


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-log sigmoid(beta * [(log pi/pi_ref)(y_w) - (log pi/pi_ref)(y_l)]), and the margins."""
    margin = beta * ((chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp))
    return -F.logsigmoid(margin).mean(), margin


class DPOModule(PolicyModule):
    config_group = "dpo"  # where its settings live (named in NonFiniteLossError hints)

    def __init__(
        self,
        model: torch.nn.Module,
        beta: float,
        lr: float,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        objective: str = "objective",
    ):
        super().__init__(model, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta, self.objective = beta, objective
        disable_model_dropout(self.model)  # as TRL; a LoRA adapter keeps its own dropout

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        chosen, rejected = pair_logprobs(self.model, batch)
        loss, margin = dpo_loss(chosen, rejected, batch.ref_chosen_logp, batch.ref_rejected_logp, self.beta)
        self.charge(batch.chosen.n_tokens + batch.rejected.n_tokens)
        tag = f"dpo_{self.objective}"
        self.log(f"{tag}/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log(f"{tag}/accuracy", (margin > 0).float().mean(), batch_size=len(batch))
        self.log(f"{tag}/margin", margin.mean(), batch_size=len(batch))
        return loss
