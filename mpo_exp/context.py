"""The run context: what every method shares, and the shared stages built from it.

:class:`RunContext` owns the task, the artifact cache, the cost meter and the logger, and builds
the shared stages (pi_ref by SFT, the preference pairs, the pi_k by DPO) lazily and at most once
per config. Methods depend on this module, never on :mod:`mpo_exp.pipeline`, which drives them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from mpo_exp import distributed as dist
from mpo_exp import tracking
from mpo_exp.adapters import BASE, AdapterBank, with_adapter
from mpo_exp.artifacts import Artifact, ArtifactStore
from mpo_exp.cost import CostMeter, StageCost
from mpo_exp.data import SequenceDataset
from mpo_exp.generation import encode_prompts
from mpo_exp.mpo.mixing import MixedPolicy
from mpo_exp.nodes import build_task, to_plain
from mpo_exp.policies import Policy, load_policy, save_policy
from mpo_exp.preferences import PairSet, build_pairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageKind:
    """What, beyond its own spec, a kind of cached stage depends on: keyed by :meth:`RunContext.stage_key`.

    ``version`` is the stage's salt: bump it when its build changes what it computes, so that old
    artifacts are rebuilt rather than silently reused (the package version is not in the key: most
    releases change no stage). ``trains``: the result-changing trainer fields (precision, gradient
    accumulation and clipping, ...) shape its weights. ``samples``: it draws samples, whose random
    stream depends on how rows are batched (``sampling_batch_size``) and, under DDP, on the rank.
    """

    version: int
    trains: bool = False
    samples: bool = False


#: every kind of artifact a run caches (``cached_stage`` refuses any other)
STAGE_KINDS: dict[str, StageKind] = {
    "sft": StageKind(1, trains=True),
    "pairs": StageKind(2, samples=True),  # 2: pi_ref's log-probs are the sampler's own (fp32)
    "dpo": StageKind(1, trains=True),
    "mpo_scores": StageKind(2, samples=True),  # 2: pi_ref's column is the sampler's own (fp32)
    "mpo_decoded": StageKind(1, samples=True),
    "reward_model": StageKind(2, trains=True),  # 2: the plateau rule keeps its best check's weights
    "rm_reference_scores": StageKind(1, samples=True),
    "rl_policy": StageKind(1, trains=True, samples=True),
    "modpo": StageKind(1, trains=True),
    "ric": StageKind(1, trains=True, samples=True),
    "evaluation": StageKind(1, samples=True),  # the rows every job of a sweep shares (pi_ref, pi_k, uniform)
}

#: trainer fields that change how a run looks, not what it computes. Topology (accelerator,
#: devices, num_nodes, strategy) is here too: DDP training is the single-process computation
#: (tests/test_distributed.py); where processes change samples, ``world_size`` is keyed instead.
TRAINER_DISPLAY_FIELDS = frozenset(
    {
        "_target_",
        "_partial_",
        "enable_progress_bar",
        "enable_model_summary",
        "enable_checkpointing",
        "log_every_n_steps",
        "logger",
        "callbacks",
        "default_root_dir",
        "accelerator",
        "devices",
        "num_nodes",
        "strategy",
    }
)


def trainer_key(trainer: DictConfig) -> dict:
    """The trainer's result-changing fields (everything not in :data:`TRAINER_DISPLAY_FIELDS`)."""
    return {k: v for k, v in to_plain(trainer).items() if k not in TRAINER_DISPLAY_FIELDS}


def all_ranks_cost(cost: StageCost) -> StageCost:
    """A stage's cost summed over ranks (tokens, FLOPs); its wall time is the slowest rank's."""
    parts = dist.gather_objects(cost.as_dict())
    return StageCost(
        wall_s=max(p["wall_s"] for p in parts),
        tokens_fwd=sum(p["tokens_fwd"] for p in parts),
        tokens_bwd=sum(p["tokens_bwd"] for p in parts),
        flops=sum(p["flops"] for p in parts),
        reused=cost.reused,
    )


class RunContext:
    def __init__(self, cfg: DictConfig, output_dir: str | Path, logger=None) -> None:
        self.cfg = cfg
        self.seed: int = int(cfg.seed)
        self.beta: float = float(cfg.beta)
        self.output_dir = Path(output_dir)
        self.task = build_task(cfg)
        self.store = ArtifactStore(cfg.paths.cache_dir)
        self.meter = CostMeter()
        self.logger = logger
        self.batch_size: int = int(cfg.inference_batch_size)  # scoring
        self.sample_batch_size: int = int(cfg.get("sampling_batch_size") or cfg.inference_batch_size)
        self.sampler: str = str(cfg.get("sampler") or "multinomial")  # how tokens are drawn (mpo_exp.draws)
        self.keys: dict[str, str] = {}
        self.bank: AdapterBank | None = None  # with dpo.lora: pi_ref's weights and the pi_k adapters
        self.memo: dict[str, object] = {}  # stages added by methods (e.g. reward models) memoise here
        self._trainer = instantiate(cfg.trainer)

    # ---- helpers ---------------------------------------------------------------------------
    def reseed(self, offset: int) -> None:
        """Each stage seeds itself, so a cached stage is reproducible whatever ran before it."""
        pl.seed_everything(self.seed * 1000 + offset, workers=True, verbose=False)

    def log_metrics(self, metrics: dict) -> None:
        tracking.log_metrics(self.logger, metrics)

    def cached_stage(
        self,
        name: str,
        kind: str,
        spec: dict,
        build: Callable[[Path], None],
        stages: tuple[str, ...] | None = None,
    ) -> Artifact:
        """Build (or reuse) an artifact; its cost is charged to ``stages`` (default: ``name``).

        On reuse the cost recorded at build time is reported (flagged ``reused``), so a result's
        cost columns do not depend on what happened to be cached.
        """
        stages = stages or (name,)
        spec = self.stage_key(kind, spec)

        def run(tmp: Path) -> dict:
            if stages == (name,):
                with self.meter.stage(name):
                    build(tmp)
            else:
                build(tmp)
            costs = {s: self.meter.stages[s] for s in stages if s in self.meter.stages}
            if dist.world_size() > 1:  # every rank builds: the stage costs all ranks' work
                for s, cost in costs.items():
                    self.meter.record(s, all_ranks_cost(cost))
            return {"cost": {s: self.meter.stages[s].as_dict() for s in costs}}

        art = self.store.get_or_build(kind, spec, run, label=name)
        self.keys[name] = art.key
        if art.reused:
            recorded = dict(art.meta.get("cost", {}))
            if set(recorded) - set(stages) and len(recorded) == len(stages):
                # built under other stage names (an MPO variant's prefix): charged to ours, in order
                recorded = dict(zip(stages, recorded.values(), strict=True))
            for s, c in recorded.items():
                self.meter.record(s, StageCost(**{**c, "reused": True}))
        return art

    def stage_key(self, kind: str, spec: dict) -> dict:
        """``spec`` plus what every stage of ``kind`` depends on (:class:`StageKind`): the cache key."""
        if kind not in STAGE_KINDS:
            raise KeyError(f"unknown stage kind {kind!r}: declare it in mpo_exp.context.STAGE_KINDS")
        what = STAGE_KINDS[kind]
        extra: dict = {"stage_version": what.version}
        if what.trains:
            extra["trainer"] = trainer_key(self.cfg.trainer)
        if what.samples:
            extra["sampling_batch_size"] = self.sample_batch_size
            if self.sampler != "multinomial":  # the default adds nothing: older keys stay valid
                extra["sampler"] = self.sampler
            if dist.world_size() > 1:
                extra["world_size"] = dist.world_size()
        clash = sorted(set(extra) & set(spec))
        if clash:
            raise KeyError(f"stage spec field {clash[0]!r} is set by RunContext.stage_key")
        return {**spec, **extra}

    def plain(self, node) -> dict:
        """A config node as a plain dict: the spec that keys an artifact."""
        return to_plain(node)

    def fit(self, module, dataset, collate, stage_cfg, max_steps: int | None = None, callbacks=()) -> int:
        """Train a Lightning module with the run's trainer, logger, meter and seed: the steps taken."""
        from mpo_exp.training.common import fit

        steps = int(stage_cfg.max_steps) if max_steps is None else max_steps
        precision = getattr(stage_cfg, "precision", None)  # the stage's own, over trainer.precision
        factory = self._trainer if precision is None else partial(self._trainer, precision=precision)
        return fit(
            module,
            dataset,
            collate,
            factory,
            int(stage_cfg.batch_size),
            steps,
            self.meter,
            self.logger,
            seed=self.seed,
            callbacks=callbacks,
        )

    # ---- shared stages ---------------------------------------------------------------------
    @cached_property
    def model_spec(self):
        return instantiate(self.cfg.model)

    @cached_property
    def tokenizer(self):
        return self.task.build_tokenizer()

    @cached_property
    def reference(self) -> MixedPolicy:
        """pi_ref: the SFT model, as a one-model mixed policy."""
        cfg = self.cfg
        model = {k: v for k, v in to_plain(cfg.model).items() if k != "cache_dir"}  # where, not what
        steps = int(cfg.sft.max_steps)
        if steps == 0 and getattr(self.model_spec, "deterministic", False) and self.tokenizer is None:
            # pi_ref is the model as loaded: the same for every task, seed and SFT setting
            spec = {"model": model, "sft": {"max_steps": 0}}
        else:
            spec = {"task": to_plain(cfg.task), "model": model, "sft": to_plain(cfg.sft), "seed": self.seed}

        def build(tmp: Path) -> None:
            self.reseed(1)
            policy: Policy = self.model_spec.build(self.tokenizer)
            tok = policy.tokenizer
            self.task.bind_tokenizer(tok)
            if steps == 0:  # sft.max_steps=0: no corpus, no training
                log.info("sft.max_steps=0: pi_ref is the model as loaded")
                save_policy(policy, tmp)
                return
            corpus = self.task.corpus(int(cfg.sft.n_examples), self.seed)
            prompts = encode_prompts(tok, [p for p, _ in corpus])
            responses = [ids + [tok.eos_token_id] for ids in encode_prompts(tok, [r for _, r in corpus])]
            data = SequenceDataset(prompts, responses, tok.pad_token_id)
            model = self.model_spec.trainable(policy.model)
            self.fit(instantiate(cfg.sft.module)(model=model), data, data.collate, cfg.sft)
            policy.model = self.model_spec.mergeable(model)
            save_policy(policy, tmp)

        art = self.cached_stage("sft", "sft", spec, build)
        policy = load_policy(art.path, name="pi_ref", dtype=self.dtype).eval()
        self.task.bind_tokenizer(policy.tokenizer)
        if self.lora:  # the pi_k will be adapters on these weights: pi_ref is the bank's base
            self.bank = AdapterBank(policy.model)
            policy.model = self.bank.view(BASE)
        return MixedPolicy.single(policy, name="pi_ref")

    def dpo_trainable(self, model):
        """The model a DPO-style stage trains: a fresh LoRA adapter with ``dpo.lora``, else as the
        model spec says (full weights, or ``model.lora``)."""
        return with_adapter(model, self.lora) if self.lora else self.model_spec.trainable(model)

    def dpo_merged(self, model):
        """A trained :meth:`dpo_trainable` model as a plain ``from_pretrained`` model."""
        return model.merge_and_unload() if self.lora else self.model_spec.mergeable(model)

    @property
    def lora(self) -> dict | None:
        """``dpo.lora`` when ``dpo.lora.r > 0``: the pi_k are LoRA adapters on pi_ref (None: full models)."""
        lora = self.cfg.dpo.get("lora")
        return to_plain(lora) if lora and int(lora.get("r") or 0) > 0 else None

    @property
    def dtype(self) -> str:
        """The model spec's dtype (``model.dtype``), used for every policy loaded from the cache."""
        return str(getattr(self.model_spec, "dtype", "float32"))

    @cached_property
    def pairs(self) -> PairSet:
        """Two pi_ref samples per training prompt, labelled per objective."""
        ref = self.reference
        cfg = self.cfg.preferences
        spec = {
            "ref": self.keys["sft"],
            "task": to_plain(self.cfg.task),
            "preferences": to_plain(cfg),
            "seed": self.seed,
        }

        def build(tmp: Path) -> None:
            self.reseed(2)
            with self.meter.stage("preferences"):
                pairs = build_pairs(
                    ref,
                    self.task,
                    int(cfg.n_prompts),
                    float(cfg.bt_temperature),
                    self.seed,
                    self.meter,
                    self.sample_batch_size,
                    with_logprobs=self.dtype == "float32",  # bf16 decoding != bf16 scoring (~0.3 nats)
                )
            with self.meter.stage("dpo/ref_logp"):  # only DPO reads them: charged to DPO's methods
                if pairs.ref_logp_a is None:
                    pairs.score_reference(ref, self.batch_size, self.meter)
            pairs.save(tmp)

        art = self.cached_stage("preferences", "pairs", spec, build, stages=("preferences", "dpo/ref_logp"))
        pairs = PairSet.load(art.path)
        informative = (~pairs.tie).float().mean(0).tolist()
        log.info(
            "preference pairs: %d prompts; non-tied share per objective %s",
            len(pairs.a),
            dict(zip(self.task.objectives, [round(x, 3) for x in informative], strict=True)),
        )
        return pairs

    @cached_property
    def single_objective_policies(self) -> dict[str, Policy]:
        """pi_k for every objective: DPO from pi_ref with the shared beta."""
        ref = self.reference
        pairs = self.pairs
        cfg = self.cfg.dpo
        out: dict[str, Policy] = {}
        for k, objective in enumerate(self.task.objectives):
            spec = {
                "ref": self.keys["sft"],
                "pairs": self.keys["preferences"],
                "objective": objective,
                "beta": self.beta,
                # LoRA off keeps the key of a full-model pi_k whatever the (unused) LoRA settings
                "dpo": {k: v for k, v in to_plain(cfg).items() if k != "lora" or self.lora},
                "seed": self.seed,
            }

            def build(tmp: Path, k: int = k, objective: str = objective) -> None:
                self.reseed(10 + k)
                policy = load_policy(
                    self.store.path("sft", self.keys["sft"]), name=objective, dtype=self.dtype
                )
                data = pairs.dataset(k, ref.tokenizer.pad_token_id, drop_ties=bool(cfg.drop_ties))
                log.info("DPO for '%s' on %d pairs (beta=%s)", objective, len(data), self.beta)
                model = self.dpo_trainable(policy.model)
                self.fit(instantiate(cfg.module)(model=model, objective=objective), data, data.collate, cfg)
                if self.lora:  # the adapter only: pi_k = pi_ref's weights + this adapter
                    model.save_pretrained(str(tmp))
                    return
                policy.model = self.model_spec.mergeable(model)
                save_policy(policy, tmp)

            art = self.cached_stage(f"dpo/{objective}", "dpo", spec, build)
            if self.lora:
                out[objective] = Policy(f"pi_{objective}", self.bank.add(objective, art.path), ref.tokenizer)
            else:
                out[objective] = load_policy(art.path, name=f"pi_{objective}", dtype=self.dtype).eval()
        return out
