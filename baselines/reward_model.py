"""Bradley–Terry reward models, one per objective, trained on that objective's preference pairs.

The embedded default puts a scalar head on pi_ref's backbone (``AutoModelForSequenceClassification``
with one label, initialised from the SFT checkpoint — the usual RLHF recipe); any HF
sequence-classification reward model (e.g. Ray2333/gpt2-large-helpful-reward_model) loads through
the same :func:`load_reward_model`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from mpo_exp.artifacts import config_key
from mpo_exp.cost import CostMeter, n_params
from mpo_exp.data import PreferenceBatch, PreferenceDataset, SequenceBatch
from mpo_exp.generation import encode_prompts, sample
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
    config_group = "reward_model"

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0, warmup_steps: int = 0):
        super().__init__(model, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)

    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        chosen, rejected = rm_scores(self.model, batch.both()).split(len(batch))
        loss = bt_loss(chosen, rejected)
        self.charge(batch.chosen.n_tokens + batch.rejected.n_tokens)
        self.log("rm/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("rm/accuracy", (chosen > rejected).float().mean(), batch_size=len(batch))
        return loss


def heldout_metrics(
    model: PreTrainedModel, data: PreferenceDataset, meter: CostMeter | None = None
) -> tuple[float, float]:
    """(Bradley–Terry loss, pairwise accuracy) of ``model`` on ``data``; NaN for no pairs."""
    if len(data) == 0:
        return float("nan"), float("nan")
    batch = data.collate(list(range(len(data)))).both()
    chosen, rejected = score_with_rm(model, batch, meter=meter).split(len(data))
    return float(bt_loss(chosen, rejected)), float((chosen > rejected).float().mean())


def pairwise_accuracy(
    model: PreTrainedModel, data: PreferenceDataset, meter: CostMeter | None = None
) -> float:
    return heldout_metrics(model, data, meter)[1]


class HeldoutPlateau(pl.Callback):
    """Early stopping on the held-out pairs: stop when the Bradley–Terry loss stops improving,
    and keep the weights of its best check.

    Every ``every`` optimiser steps the held-out pairs are scored; training stops after
    ``patience`` evaluations in a row without a loss ``min_delta`` below the best so far (or at
    ``max_steps``), and the model goes back to the weights it had at the best check
    (:meth:`restore_best`). The loss, not the accuracy, decides: on a few dozen pairs the accuracy
    moves in steps of several points. ``curve`` is what ``results.json`` reports as the budget.
    """

    def __init__(self, heldout: PreferenceDataset, every: int, patience: int, min_delta: float) -> None:
        self.heldout, self.every, self.patience, self.min_delta = heldout, every, patience, min_delta
        self.curve: list[dict[str, float]] = []
        self.best, self.waited, self.plateaued = float("inf"), 0, False
        self.best_step: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None

    def restore_best(self, model: torch.nn.Module) -> None:
        if self._best_state is not None:
            model.load_state_dict(self._best_state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or (self.curve and self.curve[-1]["step"] == step):
            return  # not due, or already measured this step (gradient accumulation)
        loss, acc = heldout_metrics(pl_module.model, self.heldout, pl_module.meter)
        pl_module.model.train()  # score_with_rm leaves the model in eval mode
        self.curve.append({"step": step, "heldout_loss": loss, "heldout_accuracy": acc})
        if loss < self.best - self.min_delta:
            self.best, self.waited, self.best_step = loss, 0, step
            self._best_state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        else:
            self.waited += 1
        if self.waited >= self.patience:
            self.plateaued = trainer.should_stop = True


def load_reward_model(path: str | Path) -> PreTrainedModel:
    """A one-logit sequence classifier; its scores are read by :func:`rm_scores`, which does not
    depend on ``config.pad_token_id`` (set here only so HF's own forward accepts batches)."""
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model.eval()


@dataclass
class RewardModel:
    """A trained reward model and its held-out pairwise accuracy (a diagnostic, not a cost)."""

    objective: str
    model: PreTrainedModel
    heldout_accuracy: float
    budget: dict = field(default_factory=dict)  # steps trained, max_steps, held-out curve, plateau


def rm_training_spec(cfg: dict) -> dict:
    """The reward-model settings that change a trained model (its cache key).

    The normaliser has its own stage; the plateau rule only when it is on (``every > 0``), so
    that turning it off keeps the keys of models trained before it existed.
    """
    spec = {k: v for k, v in cfg.items() if k != "normalizer"}
    if not int(spec.get("plateau", {}).get("every", 0)):
        spec.pop("plateau", None)
    return spec


def split_pairs(data: PreferenceDataset, heldout_fraction: float, seed: int) -> tuple[PreferenceDataset, ...]:
    n = len(data)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = n - int(round(heldout_fraction * n))
    return data.subset(perm[:cut]), data.subset(perm[cut:])


def reward_models(ctx: RunContext) -> dict[str, RewardModel]:
    """Train (or reuse) one reward model per objective; memoised on the run context.

    Cost: training is charged to ``rm/<objective>``; the held-out accuracy, which no method
    needs, to ``diagnostics/rm/<objective>`` (outside every method's total).
    """
    if "reward_models" in ctx.memo:
        return ctx.memo["reward_models"]
    cfg = ctx.cfg.reward_model
    pairs = ctx.pairs
    pad_id = ctx.reference.tokenizer.pad_token_id
    out: dict[str, RewardModel] = {}
    for k, objective in enumerate(ctx.task.objectives):
        spec = {
            "ref": ctx.keys["sft"],
            "pairs": ctx.keys["preferences"],
            "objective": objective,
            "reward_model": rm_training_spec(ctx.plain(cfg)),
            "seed": ctx.seed,
        }
        stage, diagnostic = f"rm/{objective}", f"diagnostics/rm/{objective}"

        def build(tmp: Path, k: int = k, objective: str = objective, stage=stage, diagnostic=diagnostic):
            ctx.reseed(20 + k)
            model = load_reward_model(ctx.store.path("sft", ctx.keys["sft"]))
            train, heldout = split_pairs(pairs.dataset(k, pad_id), float(cfg.heldout_fraction), ctx.seed)
            log.info("reward model for '%s' on %d pairs (%d held out)", objective, len(train), len(heldout))
            plateau = cfg.plateau
            stop = HeldoutPlateau(
                heldout, int(plateau.every), int(plateau.patience), float(plateau.min_delta)
            )
            module = instantiate(cfg.module)(model=model)
            with ctx.meter.stage(stage):  # the plateau checks decide the budget: the method pays
                steps = ctx.fit(module, train, train.collate, cfg, callbacks=[stop] if stop.every else [])
                stop.restore_best(model)
            with ctx.meter.stage(diagnostic):
                acc = pairwise_accuracy(model, heldout, ctx.meter)
            model.save_pretrained(str(tmp))
            ctx.reference.tokenizer.save_pretrained(str(tmp))
            budget = {"steps": steps, "max_steps": int(cfg.max_steps), "batch_size": int(cfg.batch_size)}
            if stop.every:
                budget.update(plateaued=stop.plateaued, best_step=stop.best_step)
                budget.update(plateau=ctx.plain(plateau), curve=stop.curve)
            (tmp / "stats.json").write_text(json.dumps({"heldout_accuracy": acc, "budget": budget}))

        art = ctx.cached_stage(stage, "reward_model", spec, build, stages=(stage, diagnostic))
        stats = json.loads((art.path / "stats.json").read_text())
        out[objective] = RewardModel(
            objective, load_reward_model(art.path), stats["heldout_accuracy"], stats.get("budget", {})
        )
        log.info("reward model '%s': held-out pairwise accuracy %.3f", objective, stats["heldout_accuracy"])
    ctx.memo["reward_models"] = out
    return out


def reference_scores(
    ctx: RunContext,
    models: Sequence[PreTrainedModel],
    keys: Sequence[str],
    prompts: Sequence[str] | None = None,
) -> torch.Tensor:
    """Reward-model scores of π_ref samples, (N prompts, m samples, K): what normalisation is fitted on.

    ``keys`` identify the reward models (artifact keys); the scores are cached with them. The N
    prompts are ``reward_model.normalizer.n_prompts`` training prompts, or the given ``prompts``
    (the per-prompt normalisation's: every distinct prompt RL trains on), keyed by their digest.
    Sampling is charged to ``rm/ref_samples`` and scoring to ``rm/normalizer``: costs of the RL
    baselines only.
    """
    cfg = ctx.cfg.reward_model.normalizer
    m = int(cfg.samples_per_prompt)
    n = int(cfg.n_prompts) if prompts is None else len(prompts)
    spec = {
        "ref": ctx.keys["sft"],
        "reward_models": list(keys),
        "n_prompts": n,
        "samples_per_prompt": m,
        "max_new_tokens": ctx.task.max_new_tokens,
        "seed": ctx.seed,
    }
    if prompts is not None:  # absent for the default prompts: their cache keys stay as they were
        spec["prompts"] = config_key(list(prompts))

    def build(tmp: Path) -> None:
        ctx.reseed(4)
        ref = ctx.reference
        texts = ctx.task.prompts("train", n, ctx.seed + 7) if prompts is None else list(prompts)
        encoded = encode_prompts(ref.tokenizer, texts)
        with ctx.meter.stage("rm/ref_samples"):
            batch = sample(
                ref,
                [p for p in encoded for _ in range(m)],
                ctx.task.max_new_tokens,
                ctx.sample_batch_size,
                meter=ctx.meter,
                desc="reward normalisation: sampling pi_ref",
            )
        with ctx.meter.stage("rm/normalizer"):
            scores = torch.stack(
                [score_with_rm(model, batch, ctx.batch_size, ctx.meter) for model in models], dim=-1
            )
        torch.save(scores.reshape(n, m, len(models)), tmp / "scores.pt")

    art = ctx.cached_stage(
        "rm/normalizer", "rm_reference_scores", spec, build, stages=("rm/ref_samples", "rm/normalizer")
    )
    return torch.load(art.path / "scores.pt")


#: where a method that needs the other objectives' rewards r_j reads them (MODPO, RiC): reward
#: models, or the pi_j's implicit rewards beta*log(pi_j/pi_ref)
REWARD_SOURCES = ("rm", "implicit")


def reward_source_stages(source: str, objectives: Sequence[str]) -> tuple[str, ...]:
    """The shared stages behind the rewards r_j: reward models, or the π_j's DPO runs."""
    return tuple(f"rm/{o}" if source == "rm" else f"dpo/{o}" for o in objectives)
