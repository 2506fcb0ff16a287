"""How a token is drawn from each row's next-token distribution: the run's ``sampler`` setting.

* ``multinomial`` (the default): ``torch.multinomial``, what ``generate`` itself does. On CPU it
  is an exponential race: a vocabulary-sized tensor of exponential variates per row and step,
  about a fifth of SmolLM2-135M's decoding time on 2 cores (49,152 tokens a row).
* ``inverse_cdf``: one uniform per row, located in the float64 cumulative sum of the row's
  probabilities. The same distribution (up to float64 rounding), other draws from the same seed,
  and decoding about a quarter faster (``benchmarks/bench_stages.py``).

The choice holds for a whole run (:func:`use`, entered by ``run_pipeline``), as torch's thread
count does; every sampler (``generate``, the adapter and decoded-policy steppers) draws through
:func:`draw`. It changes every sample, so it is in the key of every sampling stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import LogitsProcessor

SAMPLERS = ("multinomial", "inverse_cdf")
_sampler = "multinomial"


def current() -> str:
    return _sampler


@contextmanager
def use(name: str) -> Iterator[None]:
    """Draw with ``name`` inside the block; the previous sampler is restored on exit."""
    global _sampler
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got sampler={name!r}")
    before, _sampler = _sampler, name
    try:
        yield
    finally:
        _sampler = before


def inverse_cdf(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (B, V), by inverting the cumulative distribution: (B,).

    ``right=True`` finds the first token whose cumulative mass exceeds u·total, so a token of
    zero probability (a flat step of the cumulative sum) is never returned.
    """
    cdf = probs.double().cumsum(-1)
    u = torch.rand(len(probs), 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (B, V) with the run's sampler: (B,)."""
    if _sampler == "inverse_cdf":
        return inverse_cdf(probs)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


class DrawProcessor(LogitsProcessor):
    """The last processor of a greedy ``generate`` that draws the token itself (``inverse_cdf``).

    It samples from softmax(scores) with :func:`draw` and returns scores that are 0 at the drawn
    token and -inf elsewhere, so greedy decoding's argmax emits exactly that draw.
    """

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = draw(torch.softmax(scores.float(), dim=-1))
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token.view(-1, 1), 0.0)
