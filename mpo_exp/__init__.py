"""mpo-exp: Mixing Preference Optimization (arXiv 2502.18699) and its baselines.

The public solver is importable without Lightning or transformers::

    from mpo_exp import solve_bsmd
    result = solve_bsmd(log_ratios)      # (prompts, samples, K) tensor of log pi_k/pi_ref
    result.weights, result.trajectory, result.fw_gap   # lambda and its certificate

The names below load on first use, so ``import mpo_exp.config`` (config validation, ``--help``)
does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BSMDResult", "SimplexMirrorDescent", "frank_wolfe_gap", "mpo_objective", "solve_bsmd"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("mpo_exp.mpo.bsmd"), name)
    raise AttributeError(f"module 'mpo_exp' has no attribute {name!r}")
