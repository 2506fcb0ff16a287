"""mpo-exp: Mixing Preference Optimization (arXiv 2502.18699) and its baselines.

The public solver is importable without Lightning or transformers::

    from mpo_exp import solve_bsmd
    result = solve_bsmd(log_ratios)      # (prompts, samples, K) tensor of log pi_k/pi_ref
    result.weights, result.trajectory
"""

from mpo_exp.mpo.bsmd import BSMDResult, SimplexMirrorDescent, mpo_objective, solve_bsmd

__all__ = ["BSMDResult", "SimplexMirrorDescent", "mpo_objective", "solve_bsmd"]
__version__ = "0.1.0"
