"""The token draw (``sampler``): inverse-CDF draws follow the distribution; the choice is scoped to a run."""

from __future__ import annotations

import pytest
import torch

from mpo_exp import draws


def test_inverse_cdf_draws_follow_the_probabilities_and_never_a_zero():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.0, 0.299, 0.001], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    torch.manual_seed(0)
    n = 40_000
    tokens = torch.stack([draws.inverse_cdf(probs) for _ in range(n)])  # (n, 2)
    freq = torch.stack([torch.bincount(tokens[:, r], minlength=6) for r in range(2)]).double() / n
    sd = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * sd + 1e-12).all(), freq
    assert freq[0, 1] == 0 and freq[0, 3] == 0 and freq[1, 5] == 1  # zero-probability tokens never drawn


def test_unnormalised_rows_are_drawn_in_proportion():
    torch.manual_seed(1)
    tokens = torch.stack([draws.inverse_cdf(torch.tensor([[3.0, 1.0]])) for _ in range(20_000)])
    assert float((tokens == 0).double().mean()) == pytest.approx(0.75, abs=0.015)


def test_the_sampler_is_scoped_and_checked():
    assert draws.current() == "multinomial"
    with pytest.raises(RuntimeError), draws.use("inverse_cdf"):
        assert draws.current() == "inverse_cdf"
        raise RuntimeError
    assert draws.current() == "multinomial"
    with pytest.raises(ValueError, match="sampler=.*'made_up'"), draws.use("made_up"):
        pass


def test_the_config_check_knows_every_sampler():
    from mpo_exp.config import CHOICES

    assert CHOICES["sampler"] == draws.SAMPLERS


def test_the_draw_processor_makes_greedy_decoding_emit_the_draw():
    scores = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1]]))
    torch.manual_seed(3)
    with draws.use("inverse_cdf"):
        out = draws.DrawProcessor()(torch.zeros(2, 1, dtype=torch.long), scores)
    torch.manual_seed(3)
    want = draws.inverse_cdf(torch.softmax(scores, -1))
    assert torch.equal(out.argmax(-1), want) and torch.isinf(out).sum() == 4
