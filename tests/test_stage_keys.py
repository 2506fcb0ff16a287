"""A setting that changes a result changes its key; a setting that only says where or how it shows does not.

Every cached stage goes through ``RunContext.stage_key``, which adds what its kind depends on beyond
its own spec (``STAGE_KINDS``): a version salt, the trainer's result-changing fields for stages that
train, ``sampling_batch_size`` for stages that sample. The pipeline test then shows the same on
real runs: which stages are rebuilt, which reused, and whether a finished job is run again.
"""

from __future__ import annotations

import pytest

from mpo_exp.artifacts import config_key
from mpo_exp.context import STAGE_KINDS, RunContext
from mpo_exp.pipeline import run_pipeline

#: (override, which stage kinds it must re-key): "trains" or "samples"
RESULT_CHANGING = [
    ("trainer.precision=bf16-mixed", "trains"),
    ("+trainer.accumulate_grad_batches=2", "trains"),
    ("+trainer.gradient_clip_val=0.5", "trains"),
    ("+trainer.gradient_clip_algorithm=value", "trains"),
    ("inference_batch_size=7", "samples"),  # the sampling batch follows it unless set
    ("sampling_batch_size=7", "samples"),
    ("sampler=inverse_cdf", "samples"),
]
WHERE_NOT_WHAT = [
    "paths.cache_dir=/elsewhere/cache",
    "paths.output_dir=/elsewhere/run",
    "logger=csv",
    "trainer.enable_progress_bar=true",
    "trainer.log_every_n_steps=1",
    "num_threads=1",
    "resume=false",
]


def _keys(cfg, tmp_path) -> dict[str, str]:
    ctx = RunContext(cfg, tmp_path)
    return {kind: config_key(ctx.stage_key(kind, {"own": 1})) for kind in STAGE_KINDS}


@pytest.mark.parametrize(("override", "depends"), RESULT_CHANGING)
def test_result_changing_fields_rekey_exactly_the_stages_that_read_them(
    smoke_cfg, tmp_path, override, depends
):
    base, changed = _keys(smoke_cfg(), tmp_path), _keys(smoke_cfg(override), tmp_path)
    for kind, what in STAGE_KINDS.items():
        assert (base[kind] != changed[kind]) == getattr(what, depends), (kind, override)
    assert any(getattr(w, depends) for w in STAGE_KINDS.values())


@pytest.mark.parametrize("override", WHERE_NOT_WHAT)
def test_where_not_what_fields_keep_every_key(smoke_cfg, tmp_path, override):
    assert _keys(smoke_cfg(override), tmp_path) == _keys(smoke_cfg(), tmp_path)


def test_the_scoring_batch_alone_keeps_every_key(smoke_cfg, tmp_path):
    """Scoring's batch changes float rounding only; the sampling batch draws the random numbers."""
    fixed = smoke_cfg("sampling_batch_size=256")
    assert _keys(smoke_cfg("sampling_batch_size=256", "inference_batch_size=7"), tmp_path) == _keys(
        fixed, tmp_path
    )


def test_every_kind_is_salted_and_unknown_kinds_are_refused(smoke_cfg, tmp_path):
    ctx = RunContext(smoke_cfg(), tmp_path)
    for kind, what in STAGE_KINDS.items():
        assert ctx.stage_key(kind, {})["stage_version"] == what.version
    with pytest.raises(KeyError, match="declare it in mpo_exp.context.STAGE_KINDS"):
        ctx.stage_key("made_up", {})
    with pytest.raises(KeyError, match="stage_version"):  # a spec cannot shadow the salt
        ctx.stage_key("sft", {"stage_version": 0})


def test_bumping_a_stage_version_rebuilds_it(smoke_cfg, tmp_path, monkeypatch):
    from mpo_exp import context

    before = _keys(smoke_cfg(), tmp_path)
    monkeypatch.setitem(STAGE_KINDS, "dpo", context.StageKind(STAGE_KINDS["dpo"].version + 1, trains=True))
    after = _keys(smoke_cfg(), tmp_path)
    assert [k for k in STAGE_KINDS if before[k] != after[k]] == ["dpo"]


def test_runs_rebuild_on_result_changes_and_reuse_across_display_changes(smoke_cfg, tmp_path):
    """fixed_mix: SFT, the pairs and the K DPO runs, the stages every method shares."""
    first = run_pipeline(smoke_cfg("method=fixed_mix"), tmp_path / "job")
    shared = ["sft", "preferences", "dpo/helpful"]
    assert not any(first["cost"][s]["reused"] for s in shared)

    # the same output dir: a finished job with another trainer setting is run again, not skipped
    clipped = run_pipeline(smoke_cfg("method=fixed_mix", "+trainer.gradient_clip_val=0.5"), tmp_path / "job")
    assert clipped["run_key"] != first["run_key"]
    assert not clipped["cost"]["sft"]["reused"] and not clipped["cost"]["dpo/helpful"]["reused"]

    # another inference batch: pi_ref's training is reused, its samples (the pairs) are drawn again
    batched = run_pipeline(smoke_cfg("method=fixed_mix", "inference_batch_size=7"), tmp_path / "b")
    assert batched["cost"]["sft"]["reused"]
    assert not batched["cost"]["preferences"]["reused"] and not batched["cost"]["dpo/helpful"]["reused"]

    # a stage's own precision re-keys that stage (and what is built on it) only
    bf16 = run_pipeline(smoke_cfg("method=fixed_mix", "dpo.precision=bf16-mixed"), tmp_path / "bf16")
    assert bf16["cost"]["sft"]["reused"] and bf16["cost"]["preferences"]["reused"]
    assert not bf16["cost"]["dpo/helpful"]["reused"]

    shown = run_pipeline(
        smoke_cfg("method=fixed_mix", "num_threads=1", "trainer.enable_progress_bar=true", "logger=csv"),
        tmp_path / "shown",
    )
    assert all(shown["cost"][s]["reused"] for s in shared) and shown["run_key"] == first["run_key"]
    assert shown["policies"]["uniform_mix"]["win_rate"] == first["policies"]["uniform_mix"]["win_rate"]

    # results.json carries what the report groups and pairs by: the result-changing config and a
    # fingerprint of pi_ref's evaluation responses (the same samples, the same fingerprint)
    assert first["config"] == shown["config"] and "paths" not in first["config"]
    assert first["config"]["trainer"] != clipped["config"]["trainer"]
    assert first["pi_ref_fingerprint"] == shown["pi_ref_fingerprint"]
    assert first["pi_ref_fingerprint"] != batched["pi_ref_fingerprint"]  # other batches, other samples


@pytest.mark.parametrize(
    ("stage_precision", "trainer_precision"), [(None, "32-true"), ("bf16-mixed", "bf16-mixed")]
)
def test_a_stage_trains_at_its_own_precision_else_the_trainers(
    smoke_cfg, tmp_path, monkeypatch, stage_precision, trainer_precision
):
    from omegaconf import OmegaConf

    from mpo_exp.training import common

    seen = {}

    def fake_fit(module, dataset, collate, factory, *args, **kwargs):
        seen["precision"] = factory(max_steps=1, logger=False).precision
        return 0

    monkeypatch.setattr(common, "fit", fake_fit)
    cfg = smoke_cfg(f"dpo.precision={stage_precision or 'null'}")
    RunContext(cfg, tmp_path).fit(None, None, None, cfg.dpo)
    assert seen["precision"] == trainer_precision
    assert OmegaConf.select(cfg, "trainer.precision") == "32-true"
