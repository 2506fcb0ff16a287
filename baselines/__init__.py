"""Baselines that need reward models and RL (MORLHF, MaxMin-RLHF) or parameter averaging (soups).

They reuse the pipeline's shared pieces — scoring, sampling, the cost meter, the artifact cache —
and produce policies that are evaluated exactly like MPO's.
"""
