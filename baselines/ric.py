"""Rewards-in-Context (Yang et al., 2024): one policy conditioned on per-objective scores.

1. Offline: score every response of the preference pairs per objective, and fine-tune π_ref
   (SFT) on ``[score tokens] + prompt -> response``.
2. Online (one round): sample with target scores on the front (every objective at its top
   score but one, drawn at random), rescore what comes out, keep the samples in some
   objective's top ``1 - quantile`` (multi-objective rejection sampling, applied to the offline
   data too) and fine-tune on them, labelled with the scores they obtained.
3. Inference: user weights w map to target scores (the paper's "L∞" map: the largest weight's
   objective at its top score, the others at min(K·w_i, 1) of their range) in the prompt.

Scores come from the Bradley–Terry reward models (``rewards=rm``, as in the paper) or the π_k's
implicit rewards β·log π_k/π_ref (``rewards=implicit``), never from the task's oracle, which
is kept for evaluation. A score is written as one of ``bins`` quantile bins per objective (the
paper writes z-scores rounded to 0.1 as text; the toy word-level vocabulary has no digits).
Each (objective, bin) is a new embedding row appended after the model's vocabulary, so every
tokenizer works unchanged; :class:`ScoreConditionedLM` prepends the target's rows to every
input and hides them from the output, so the policy is an ordinary π(y|x) over π_ref's
vocabulary for sampling, scoring and the KL.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from baselines.checkpoints import STEPS, TrainingCheckpoints, add_checkpoints, load_checkpoints, write_points
from baselines.reward_model import REWARD_SOURCES, reward_models, reward_source_stages, score_with_rm
from mpo_exp.data import SequenceBatch, SequenceDataset, position_ids_from_mask
from mpo_exp.generation import encode_prompts, sample
from mpo_exp.methods import Method, MethodOutput, PolicyCost
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.mpo.user_weights import Weights, check_user_weights, resolve_user_weights
from mpo_exp.policies import Policy, load_policy, save_policy
from mpo_exp.scoring import score_policies
from mpo_exp.training.sft import SFTModule

if TYPE_CHECKING:
    from mpo_exp.context import RunContext
    from mpo_exp.mpo.method import MPOMethod

log = logging.getLogger(__name__)
STAGES = ("ric/scoring", "ric/sft", "ric/augment", "ric/online_sft")


# ---- scores as bins --------------------------------------------------------------------------
def bin_edges(scores: torch.Tensor, bins: int) -> torch.Tensor:
    """(K, bins-1) inner quantiles of each objective's scores: equally filled bins, any scale."""
    q = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    return torch.quantile(scores.double(), q, dim=0).T.contiguous()


def to_bins(scores: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bin index in [0, bins) of every score: (N, K) long."""
    cols = [torch.bucketize(scores[:, k].double().contiguous(), edges[k]) for k in range(edges.shape[0])]
    return torch.stack(cols, dim=-1)


def desired_bins(weights: Sequence[float], bins: int) -> list[int]:
    """RiC's L∞ preference-to-reward map on bins: argmax_i w_i at the top, others at min(K·w_i, 1)."""
    k, top = len(weights), bins - 1
    best = max(range(k), key=lambda i: weights[i])
    return [top if i == best else round(min(k * float(w), 1.0) * top) for i, w in enumerate(weights)]


def sample_goals(n: int, k: int, bins: int, generator: torch.Generator) -> torch.Tensor:
    """Targets on the front: all objectives at the top bin except one (the lowest draw), random."""
    goals = torch.randint(0, bins, (n, k), generator=generator)
    low = goals.argmin(-1, keepdim=True)
    return torch.full_like(goals, bins - 1).scatter(-1, low, goals.gather(-1, low))


def rejection_mask(scores: torch.Tensor, quantile: float) -> torch.Tensor:
    """Multi-objective rejection sampling: keep rows in some objective's top ``1 - quantile``."""
    thresholds = torch.quantile(scores.double(), quantile, dim=0)
    return (scores.double() >= thresholds).any(-1)


def condition_ids(bins: torch.Tensor, base: int, n_bins: int) -> torch.Tensor:
    """Token id of (objective k, bin b): ``base + k·n_bins + b`` (rows appended after the vocabulary)."""
    return base + torch.arange(bins.shape[-1]) * n_bins + bins


def conditioned_prompts(
    prompts: Sequence[list[int]], bins: torch.Tensor, base: int, n_bins: int
) -> list[list[int]]:
    """The training layout: each prompt with its row's score tokens in front (``bins``: (N, K))."""
    cond = condition_ids(bins, base, n_bins).tolist()
    return [c + list(p) for c, p in zip(cond, prompts, strict=True)]


# ---- the conditioned model ---------------------------------------------------------------------
def add_condition_rows(model: PreTrainedModel, n_new: int, generator: torch.Generator) -> int:
    """Append ``n_new`` embedding rows drawn around the existing ones; returns the old vocabulary size.

    Distinct random rows (not the mean) keep the conditions apart even when the embeddings
    stay frozen (LoRA).
    """
    base = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(base + n_new, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        old = emb[:base].float()
        noise = torch.randn(n_new, emb.shape[1], generator=generator)
        emb[base:] = (old.mean(0) + old.std(0) * noise).to(emb.dtype)
    return base


class _HideConditionTokens(LogitsProcessor):
    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores.index_fill(
            -1, torch.arange(self.vocab, scores.shape[-1], device=scores.device), -float("inf")
        )


class ScoreConditionedLM(torch.nn.Module):
    """π(y|x) = π_RiC(y | [score tokens] + x) over the first ``vocab`` tokens.

    The score tokens go in front of the left-padded input ([scores][pads][prompt]); positions
    follow the attention mask, so this computes what the training layout [pads][scores][prompt]
    does. Scoring and sampling only: no KV cache is passed in.
    """

    def __init__(self, model: PreTrainedModel, prefix: Sequence[int], vocab: int) -> None:
        super().__init__()
        self.model, self.vocab = model, int(vocab)
        self.register_buffer(
            "prefix", torch.tensor(list(prefix), dtype=torch.long).unsqueeze(0), persistent=False
        )

    @property
    def config(self):
        return self.model.config

    def _prepend(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prefix = self.prefix.to(input_ids.device).expand(input_ids.shape[0], -1)
        mask = torch.cat([torch.ones_like(prefix), attention_mask.to(prefix.dtype)], dim=1)
        return torch.cat([prefix, input_ids], dim=1), mask

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids=None,
        use_cache: bool = False,
        **kw,
    ) -> CausalLMOutput:
        if kw.get("past_key_values") is not None or kw.get("cache") is not None:
            raise NotImplementedError(
                "ScoreConditionedLM is scored and sampled on its own, without a KV cache"
            )
        ids, mask = self._prepend(input_ids, attention_mask)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        )
        return CausalLMOutput(logits=out.logits[:, self.prefix.shape[1] :, : self.vocab])

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, generation_config, logits_processor=None) -> torch.Tensor:
        ids, mask = self._prepend(input_ids, attention_mask)
        processors = LogitsProcessorList([_HideConditionTokens(self.vocab), *(logits_processor or [])])
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=generation_config,
            logits_processor=processors,
        )
        return out[:, self.prefix.shape[1] :]


# ---- the method --------------------------------------------------------------------------------
def response_scores(ctx: RunContext, source: str, batch: SequenceBatch) -> torch.Tensor:
    """(N, K) scores of responses per objective, from reward models or the implicit rewards."""
    if source == "rm":
        rms = reward_models(ctx)
        return torch.stack(
            [score_with_rm(rms[o].model, batch, ctx.batch_size, ctx.meter) for o in ctx.task.objectives],
            dim=-1,
        )
    models = [ctx.reference.policies[0].model, *(p.model for p in ctx.single_objective_policies.values())]
    logp = score_policies(models, batch, ctx.batch_size, ctx.meter)
    return ctx.beta * (logp[:, 1:] - logp[:, :1])


class RiCMethod(Method):
    """One RiC model (cached; shared by every weight setting) read out at ``weights``.

    ``weights``: null (uniform), ``mpo`` (MPO's λ from this run), a list or a mapping.
    ``rewards``: ``rm`` | ``implicit``. ``bins``: score levels per objective. ``steps`` /
    ``online_steps``: SFT steps offline / after the online round (0: no online round).
    ``online_samples``: responses drawn in the online round. ``quantile``: rejection threshold.
    ``precision``: the SFT's Lightning precision (null: trainer.precision). ``checkpoints``: SFT
    steps (offline, then online counted on) after which the model is also saved and evaluated.
    """

    name = "ric"

    def __init__(
        self,
        weights: Mapping[str, float] | Sequence[float] | str | None = None,
        rewards: str = "rm",
        bins: int = 10,
        steps: int = 300,
        online_steps: int = 100,
        online_samples: int = 512,
        quantile: float = 0.7,
        lr: float = 1e-3,
        warmup_steps: int = 10,
        batch_size: int = 64,
        precision: str | None = None,
        checkpoints: Sequence[int] | None = None,
        mpo: MPOMethod | None = None,
    ) -> None:
        if rewards not in REWARD_SOURCES:
            raise ValueError(f"method.rewards must be one of {REWARD_SOURCES}, got {rewards!r}")
        for field, value, low in [
            ("bins", bins, 2),
            ("steps", steps, 1),
            ("online_steps", online_steps, 0),
            ("online_samples", online_samples, 1),
            ("batch_size", batch_size, 1),
            ("warmup_steps", warmup_steps, 0),
        ]:
            if int(value) < low:
                raise ValueError(f"method.{field} must be >= {low}, got {value}")
        if not 0 <= quantile < 1:
            raise ValueError(f"method.quantile must be in [0, 1), got {quantile}")
        if not lr > 0:
            raise ValueError(f"method.lr must be > 0, got {lr}")
        self.weights: Weights = weights
        self.rewards, self.bins, self.mpo = rewards, int(bins), mpo
        self.steps, self.online_steps = int(steps), int(online_steps)
        self.online_samples, self.batch_size = int(online_samples), int(batch_size)
        self.quantile, self.lr, self.warmup_steps = float(quantile), float(lr), int(warmup_steps)
        self.precision = None if precision is None else str(precision)
        self.checkpoints = sorted(int(c) for c in checkpoints or ())
        bad = [c for c in self.checkpoints if not 1 <= c < self.steps + self.online_steps]
        if bad or len(set(self.checkpoints)) != len(self.checkpoints):
            raise ValueError(
                f"method.checkpoints must be distinct steps in [1, method.steps + method.online_steps="
                f"{self.steps + self.online_steps}), got {list(checkpoints or ())}"
            )

    def validate(self, objectives: list[str]) -> None:
        check_user_weights(self.weights, self.mpo, objectives)

    def _fit(
        self,
        ctx: RunContext,
        model,
        prompts,
        responses,
        steps: int,
        saver: TrainingCheckpoints | None = None,
    ) -> None:
        pad = ctx.reference.tokenizer.pad_token_id
        data = SequenceDataset(prompts, responses, pad)
        module = SFTModule(model, lr=self.lr, warmup_steps=self.warmup_steps)
        stage = SimpleNamespace(batch_size=self.batch_size, max_steps=steps, precision=self.precision)
        wanted = saver and [c for c in saver.points_wanted if saver.offset < c <= saver.offset + steps]
        ctx.fit(module, data, data.collate, stage, callbacks=[saver] if wanted else [])

    def train(self, ctx: RunContext) -> Path:
        """Build (or reuse) the RiC model: offline SFT, one online round; returns its directory."""
        objectives, k = ctx.task.objectives, len(ctx.task.objectives)
        sources = reward_source_stages(self.rewards, objectives)
        if self.rewards == "rm":
            reward_models(ctx)
        else:
            ctx.single_objective_policies  # noqa: B018 - builds or loads the pi_k (their keys enter the spec)
        fields = (
            "bins",
            "steps",
            "online_steps",
            "online_samples",
            "quantile",
            "lr",
            "warmup_steps",
            "batch_size",
            "precision",
            "checkpoints",
        )
        spec = {
            "ref": ctx.keys["sft"],
            "pairs": ctx.keys["preferences"],
            "rewards": self.rewards,
            "sources": {o: ctx.keys[s] for o, s in zip(objectives, sources, strict=True)},
            "beta": ctx.beta,
            # precision and checkpoints only when set: older keys stay
            **{f: getattr(self, f) for f in fields if getattr(self, f) not in (None, [])},
            "max_new_tokens": ctx.task.max_new_tokens,
            "seed": ctx.seed,
        }

        def build(tmp: Path) -> None:
            ctx.reseed(60)
            pairs, tok = ctx.pairs, ctx.reference.tokenizer
            data = SequenceBatch.concat([pairs.a, pairs.b], tok.pad_token_id)
            with ctx.meter.stage("ric/scoring"):
                scores = response_scores(ctx, self.rewards, data)
            edges = bin_edges(scores, self.bins)
            policy = load_policy(ctx.store.path("sft", ctx.keys["sft"]), name="ric", dtype=ctx.dtype)
            gen = torch.Generator().manual_seed(ctx.seed)
            base = add_condition_rows(policy.model, k * self.bins, gen)
            model = ctx.model_spec.trainable(policy.model)

            def conditioned(prompts: list[list[int]], bins: torch.Tensor) -> list[list[int]]:
                return conditioned_prompts(prompts, bins, base, self.bins)

            prompts, responses = data.prompts(), data.responses()
            labels = to_bins(scores, edges)

            def save_checkpoint(step: int) -> None:
                merged = ctx.model_spec.mergeable(copy.deepcopy(model))  # training goes on
                save_policy(Policy("ric", merged, tok), tmp / "checkpoints" / STEPS.folder(step))

            def saver(offset: int, before: tuple[str, ...]) -> TrainingCheckpoints:
                cost = ctx.meter.sum(before)
                return TrainingCheckpoints(
                    self.checkpoints, save_checkpoint, ctx.meter, STEPS, offset=offset, before=cost
                )

            log.info("RiC offline SFT on %d responses, %d score bins per objective", len(prompts), self.bins)
            offline = saver(0, ("ric/scoring",))
            with ctx.meter.stage("ric/sft"):
                self._fit(ctx, model, conditioned(prompts, labels), responses, self.steps, offline)
            points = offline.points
            info: dict = {"offline_examples": len(prompts)}
            if self.online_steps:
                with ctx.meter.stage("ric/augment"):
                    new, new_scores = self._augment(ctx, model, base, gen)
                old_idx = rejection_mask(scores, self.quantile).nonzero().squeeze(-1).tolist()
                new_idx = rejection_mask(new_scores, self.quantile).nonzero().squeeze(-1).tolist()
                new_prompts, new_responses = new.prompts(), new.responses()
                merged_p = [prompts[i] for i in old_idx] + [new_prompts[i] for i in new_idx]
                merged_r = [responses[i] for i in old_idx] + [new_responses[i] for i in new_idx]
                merged_bins = torch.cat([labels[old_idx], to_bins(new_scores, edges)[new_idx]])
                info |= {
                    "online_samples": len(new),
                    "online_kept": len(new_idx),
                    "offline_kept": len(old_idx),
                }
                log.info(
                    "RiC online round: kept %d of %d samples and %d of %d offline responses",
                    len(new_idx),
                    len(new),
                    len(old_idx),
                    len(prompts),
                )
                online = saver(self.steps, ("ric/scoring", "ric/sft", "ric/augment"))
                with ctx.meter.stage("ric/online_sft"):
                    self._fit(
                        ctx, model, conditioned(merged_p, merged_bins), merged_r, self.online_steps, online
                    )
                points = points + online.points
            policy.model = ctx.model_spec.mergeable(model)
            save_policy(policy, tmp)
            write_points(tmp, points)
            meta = {
                "vocab": base,
                "bins": self.bins,
                "objectives": objectives,
                "edges": edges.tolist(),
                **info,
            }
            (tmp / "ric.json").write_text(json.dumps(meta))

        return ctx.cached_stage("ric/model", "ric", spec, build, stages=STAGES).path

    def _augment(
        self, ctx: RunContext, model, base: int, gen: torch.Generator
    ) -> tuple[SequenceBatch, torch.Tensor]:
        """Sample with targets on the front (one call per distinct target) and rescore."""
        tok, k = ctx.reference.tokenizer, len(ctx.task.objectives)
        prompts = encode_prompts(tok, ctx.task.prompts("train", self.online_samples, ctx.seed + 11))
        goals = sample_goals(len(prompts), k, self.bins, gen)
        pieces = []
        for goal in torch.unique(goals, dim=0):
            rows = (goals == goal).all(-1).nonzero().squeeze(-1).tolist()
            lm = ScoreConditionedLM(model, condition_ids(goal, base, self.bins).tolist(), base)
            policy = MixedPolicy.single(Policy("ric_online", lm, tok))
            pieces.append(
                sample(
                    policy,
                    [prompts[i] for i in rows],
                    ctx.task.max_new_tokens,
                    ctx.sample_batch_size,
                    meter=ctx.meter,
                )
            )
        batch = SequenceBatch.concat(pieces, tok.pad_token_id) if len(pieces) > 1 else pieces[0]
        return batch, response_scores(ctx, self.rewards, batch)

    def run(self, ctx: RunContext) -> MethodOutput:
        objectives = ctx.task.objectives
        path = self.train(ctx)
        meta = json.loads((path / "ric.json").read_text())
        w = resolve_user_weights(self.weights, self.mpo, ctx)
        target = desired_bins(w.vector, self.bins)
        label = "ric" + (f"_{w.suffix}" if w.suffix else "")
        prefix = condition_ids(torch.tensor(target), meta["vocab"], self.bins).tolist()

        def conditioned(folder: Path, name: str) -> Policy:
            inner = load_policy(folder, name=name, dtype=ctx.dtype)
            return Policy(
                name, ScoreConditionedLM(inner.model, prefix, meta["vocab"]).eval(), inner.tokenizer
            )

        policy = conditioned(path, label)
        sources = reward_source_stages(self.rewards, objectives)
        own = (*(sources if self.rewards == "rm" else ()), *w.own, *STAGES)
        shared = (*w.shared, *(("dpo/ref_logp", *sources) if self.rewards == "implicit" else ()))
        cost = PolicyCost(tuple(dict.fromkeys(("preferences", *shared, *own))), own)
        extras = {
            **w.extras,
            "ric": {
                "rewards": self.rewards,
                "target_bins": dict(zip(objectives, target, strict=True)),
                **{key: meta[key] for key in meta if key.endswith(("_examples", "_samples", "_kept"))},
            },
        }
        policies, costs = [MixedPolicy.single(policy)], {label: cost}
        checkpoints = load_checkpoints(path, label, STEPS, conditioned)
        add_checkpoints(ctx, STAGES, cost, checkpoints, policies, costs)
        extras["checkpoints"] = {label: [p for _, p in checkpoints]}
        return MethodOutput(
            policies, costs=costs, weights=dict(zip(objectives, w.vector, strict=True)), extras=extras
        )
