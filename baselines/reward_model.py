"""Bradley–Terry reward models, one per objective, trained on that objective's preference pairs.

The embedded default puts a scalar head on pi_ref's backbone (``AutoModelForSequenceClassification``
with one label, initialised from the SFT checkpoint — the usual RLHF recipe); any HF
sequence-classification reward model (e.g. Ray2333/gpt2-large-helpful-reward_model) loads through
the same :func:`load_reward_model`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from mpo_exp.cost import CostMeter, n_params
from mpo_exp.data import PreferenceBatch, PreferenceDataset, SequenceBatch
from mpo_exp.scoring import classifier_logits
from mpo_exp.training.common import PolicyModule

if TYPE_CHECKING:
    from mpo_exp.context import RunContext

log = logging.getLogger(__name__)


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood: -log sigmoid(r(y_w) - r(y_l))."""
    return -F.logsigmoid(chosen - rejected).mean()


def rm_scores(model: PreTrainedModel, batch: SequenceBatch) -> torch.Tensor:
    """Scalar reward per sequence, read at its last real token whatever the batch's padding: (B,)."""
    return classifier_logits(model, batch.input_ids, batch.attention_mask)[:, 0]


@torch.no_grad()
def score_with_rm(
    model: PreTrainedModel, batch: SequenceBatch, batch_size: int = 256, meter: CostMeter | None = None
) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(batch), batch_size):
        chunk = batch[s : s + batch_size].to(device)
        out.append(rm_scores(model, chunk).cpu())
        if meter is not None:
            meter.forward(n_params(model), chunk.n_tokens)
    return torch.cat(out)


class RewardModelModule(PolicyModule):
    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0):
        super().__init__(model, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        chosen, rejected = rm_scores(self.model, batch.chosen), rm_scores(self.model, batch.rejected)
        loss = bt_loss(chosen, rejected)
        self.charge(batch.chosen.n_tokens + batch.rejected.n_tokens)
        self.log("rm/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("rm/accuracy", (chosen > rejected).float().mean(), batch_size=len(batch))
        return loss


def pairwise_accuracy(
    model: PreTrainedModel, data: PreferenceDataset, meter: CostMeter | None = None
) -> float:
    if len(data) == 0:
        return float("nan")
    batch = data.collate(list(range(len(data))))
    chosen, rejected = (
        score_with_rm(model, batch.chosen, meter=meter),
        score_with_rm(model, batch.rejected, meter=meter),
    )
    return float((chosen > rejected).float().mean())


def load_reward_model(path: str | Path) -> PreTrainedModel:
    """A one-logit sequence classifier; its scores are read by :func:`rm_scores`, which does not
    depend on ``config.pad_token_id`` (set here only so HF's own forward accepts batches)."""
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.eval()


@dataclass
class RewardModel:
    """A trained reward model plus the statistics used to normalise its scores."""

    objective: str
    model: PreTrainedModel
    mean: float  # of its scores on pi_ref samples
    std: float
    heldout_accuracy: float


def split_pairs(data: PreferenceDataset, heldout_fraction: float, seed: int) -> tuple[PreferenceDataset, ...]:
    n = len(data)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = n - int(round(heldout_fraction * n))
    return data.subset(perm[:cut]), data.subset(perm[cut:])


def reward_models(ctx: RunContext) -> dict[str, RewardModel]:
    """Train (or reuse) one reward model per objective; memoised on the run context."""
    if "reward_models" in ctx.memo:
        return ctx.memo["reward_models"]
    import json

    from hydra.utils import instantiate

    cfg = ctx.cfg.reward_model
    pairs = ctx.pairs
    pad_id = ctx.reference.tokenizer.pad_token_id
    out: dict[str, RewardModel] = {}
    for k, objective in enumerate(ctx.task.objectives):
        spec = {
            "ref": ctx.keys["sft"],
            "pairs": ctx.keys["preferences"],
            "objective": objective,
            "reward_model": ctx.plain(cfg),
            "seed": ctx.seed,
        }

        def build(tmp: Path, k: int = k, objective: str = objective) -> None:
            ctx.reseed(20 + k)
            model = load_reward_model(ctx.store.path("sft", ctx.keys["sft"]))
            train, heldout = split_pairs(pairs.dataset(k, pad_id), float(cfg.heldout_fraction), ctx.seed)
            log.info("reward model for '%s' on %d pairs (%d held out)", objective, len(train), len(heldout))
            module = instantiate(cfg.module)(model=model)
            ctx.fit(module, train, train.collate, cfg)
            acc = pairwise_accuracy(model, heldout, ctx.meter)
            # normalisation statistics on pi_ref's own samples (both responses of every pair)
            scores = torch.cat(
                [score_with_rm(model, pairs.a, meter=ctx.meter), score_with_rm(model, pairs.b)]
            )
            model.save_pretrained(str(tmp))
            ctx.reference.tokenizer.save_pretrained(str(tmp))
            stats = {"mean": float(scores.mean()), "std": float(scores.std()), "heldout_accuracy": acc}
            (tmp / "stats.json").write_text(json.dumps(stats))

        art = ctx.cached_stage(f"rm/{objective}", "reward_model", spec, build)
        stats = json.loads((art.path / "stats.json").read_text())
        out[objective] = RewardModel(
            objective, load_reward_model(art.path), stats["mean"], stats["std"], stats["heldout_accuracy"]
        )
        log.info("reward model '%s': held-out pairwise accuracy %.3f", objective, stats["heldout_accuracy"])
    ctx.memo["reward_models"] = out
    return out
