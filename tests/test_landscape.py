"""method=landscape end to end at reduced size, and MPO's option fields refused in one line.

The reduced-size form of the decoded objective's acceptance check: on a simplex grid of decoded
policies, the lambda that ``method.objective=decoded`` returns has a max-KL no larger than the
grid's smallest (within the estimates' noise) and lies next to that grid point.
"""

from __future__ import annotations

import json

import pytest

from mpo_exp.pipeline import run_pipeline


@pytest.fixture(scope="module")
def landscape_run(tmp_path_factory):
    from tests.conftest import compose_config

    tmp = tmp_path_factory.mktemp("landscape")
    cfg = compose_config(
        [
            "experiment=smoke",
            "logger=none",
            f"paths.cache_dir={tmp / 'cache'}",
            "trainer.enable_progress_bar=false",
            "dpo.max_steps=100",  # pi_k far enough apart that the landscape has a shape
            "eval.n_prompts=400",
            "method=landscape",
            "method.step=0.25",
            "method.options=[paper,decoded,decoded_std]",
            "method.mpo.decoded.rounds=12",
            "method.mpo.decoded.prompts=48",
            "method.mpo.decoded.certify_prompts=128",
        ]
    )
    return run_pipeline(cfg, tmp / "run"), tmp / "run"


def test_the_decoded_lambda_minimises_the_decoded_max_kl(landscape_run):
    res, _ = landscape_run
    land = res["landscape"]
    assert len(land["points"]) == 15 and set(land["options"]) == {"paper", "decoded", "decoded_std"}
    best = min(land["points"], key=lambda p: p["max_kl"])
    dec = land["options"]["decoded"]
    se = max(max(best["kl_se"]), max(dec["kl_se"]))
    assert dec["max_kl"] <= best["max_kl"] + 3 * se
    # and it sits in the grid's best cell (the grid step is 0.25)
    assert max(abs(a - b) for a, b in zip(dec["lambda"], best["lambda"], strict=True)) <= 0.25
    # the landscape is not flat: the vertices are far worse on MPO's own objective than the answer
    vertices = [p for p in land["points"] if max(p["lambda"]) == 1.0]
    assert min(p["max_kl"] for p in vertices) > dec["max_kl"] + 5 * se
    # the decoded fit reports its certificate and dual weights
    extras = res["option_extras"]["decoded"]["decoded"]
    assert extras["at_weights"]["certificate"] >= 0 and sum(extras["at_weights"]["mu"]) == pytest.approx(1)


def test_every_variant_is_evaluated_and_charged_its_own_stages(landscape_run):
    res, run_dir = landscape_run
    assert set(res["method_policies"]) == {"mpo", "mpo_decoded", "mpo_decoded_cal_std"}
    for name in res["method_policies"]:
        assert name in res["policies"]
        prefix = name + "/"
        assert any(s.startswith(prefix + "bsmd") for s in res["policy_costs"][name]["post_processing"])
    # the decoded variants pay for their decoding; the paper's MPO does not
    assert "mpo_decoded/decoded" in res["policy_costs"]["mpo_decoded"]["post_processing"]
    assert not any("decoded" in s for s in res["policy_costs"]["mpo"]["total"])
    # the calibrated variant mixes pi_ref in with an exponent that makes the exponents sum to 1
    ex = res["option_extras"]["decoded_std"]["exponents"]
    assert "pi_ref" in ex and sum(ex.values()) == pytest.approx(1.0)
    assert (run_dir / "landscape.png").stat().st_size > 10_000
    saved = json.loads((run_dir / "results.json").read_text())
    assert (
        saved["landscape"]["options"]["decoded"]["lambda"] == res["landscape"]["options"]["decoded"]["lambda"]
    )


def test_the_report_draws_the_landscape_and_the_variants_table(landscape_run, tmp_path):
    import shutil

    from mpo_exp.report import build_report

    _, run_dir = landscape_run
    shutil.copytree(run_dir, tmp_path / "sweep" / "0_job")
    report = build_report(tmp_path / "sweep", n_boot=200)
    text = (tmp_path / "sweep" / "options.md").read_text()
    assert "MPO (decoded)" in text and "MPO (decoded, std-calibrated)" in text and "Uniform mixing" in text
    assert any(p.name.startswith("landscape_beta") for p in report["images"])
    assert "grid: smallest max-KL" in (tmp_path / "sweep" / "landscape.md").read_text()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("method.objective=decode", "method.objective"),
        ("method.proposal=pi_k", "method.proposal"),
        ("method.calibration=z", "method.calibration"),
        ("method.decoded.rounds=0", "method.decoded.rounds"),
        ("method.decoded.samples_per_prompt=1", "method.decoded.samples_per_prompt"),
        ("+method.decoded.steps=3", "method.decoded.steps"),
        ("method.decoded.radius=0", "method.decoded.radius"),
    ],
)
def test_bad_mpo_options_are_refused_naming_the_field(smoke_cfg, tmp_path, override, field):
    from mpo_exp.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match=field.replace(".", r"\.")):
        run_pipeline(smoke_cfg(override), tmp_path / "run")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))


def test_a_landscape_needs_two_or_three_objectives(smoke_cfg, tmp_path):
    from mpo_exp.config import ConfigError

    with pytest.raises(ConfigError, match="method=landscape"):
        run_pipeline(
            smoke_cfg("method=landscape", "task.objectives=[helpful,harmless,humorous,concise]"), tmp_path
        )
    with pytest.raises(ConfigError, match=r"method\.options: unknown variant 'decoded_z'"):
        run_pipeline(smoke_cfg("method=landscape", "method.options=[paper,decoded_z]"), tmp_path)
