"""Every Table 1 row against MPO, paired (mpo_exp/report/versus.py), on hand-made bootstrap draws."""

from __future__ import annotations

import numpy as np
import pytest

from mpo_exp.report.versus import versus_markdown, versus_mpo

RNG = np.random.default_rng(0)
NOISE = RNG.normal(0, 0.02, 1000)  # shared by every row: the pairing


def _row(policy: str, shift: float, own_noise: float = 0.0, seeds=(0, 1)) -> dict:
    draws = 0.5 + shift + NOISE + RNG.normal(0, own_noise, 1000)
    return {
        "beta": 0.5,
        "policy": policy,
        "label": policy,
        "min": (0.5 + shift, 0.0),
        "draws": draws,
        "seed_ids": tuple(seeds),
    }


def test_each_row_is_read_against_mpo_on_shared_resamples():
    rows = [
        _row("mpo_decoded", 0.0),
        _row("tie", 0.001, own_noise=0.01),
        _row("clearly_worse", -0.10, own_noise=0.01),
        _row("slightly_better", 0.022, own_noise=0.01),  # 2.2 sd: 95% alone, not Bonferroni over 3
        _row("other_seeds", 0.3, seeds=(0,)),  # not paired with MPO's seeds: left out
        {**_row("no_outcomes", 0.0), "draws": None},
    ]
    vs = {v["label"]: v for v in versus_mpo(rows)}
    assert set(vs) == {"tie", "clearly_worse", "slightly_better"}
    assert vs["clearly_worse"]["delta"] == pytest.approx(-0.10)
    # the shared noise cancels: the interval is the rows' own noise, not the (wider) sum
    lo, hi = vs["tie"]["ci"]
    assert hi - lo < 0.05
    md = versus_markdown(rows)
    assert "| 0.5 | clearly_worse | mpo_decoded | -10.0 [" in md and "▼ below MPO (family-wise too)" in md
    assert "| slightly_better | mpo_decoded | +2.2 [" in md and "▲ above MPO (not family-wise)" in md
    assert md.count("within noise") == 1


def test_the_paper_estimator_is_the_reference_when_the_default_is_absent_and_none_without_mpo():
    rows = [_row("mpo", 0.0), _row("x", -0.2, own_noise=0.01)]
    (v,) = versus_mpo(rows)
    assert v["reference"] == "mpo"
    assert versus_markdown([_row("x", 0.0)]) is None
