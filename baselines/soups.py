"""Rewarded soups (Ramé et al., 2023): average the single-objective policies' parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mpo_exp.mpo.mixing import check_simplex


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """sum_k w_k theta_k for floating tensors; integer buffers must agree and are copied."""
    check_simplex(weights, field="soup weights")
    if len(state_dicts) != len(weights):
        raise ValueError(f"{len(state_dicts)} state dicts but {len(weights)} weights")
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if list(sd) != keys:
            raise ValueError(
                f"state dict {i} has different parameters from state dict 0 (architectures differ)"
            )
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [sd[key] for sd in state_dicts]
        if tensors[0].is_floating_point():
            out[key] = sum(w * t.double() for w, t in zip(weights, tensors, strict=True)).to(tensors[0].dtype)
        else:
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise ValueError(f"non-float buffer {key!r} differs between models; cannot average")
            out[key] = tensors[0].clone()
    return out
