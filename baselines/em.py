"""Hard-assignment EM over users whose preference group is unknown (MaxMin-RLHF, Sec. 4).

E-step: assign each user to the reward model with the highest Bradley–Terry log-likelihood on
that user's pairs. M-step: retrain each reward model on the pairs of its users. Written against
two callables so the same loop drives tiny linear models in tests and transformer reward models
in the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class EMResult:
    assignment: list[int]  # group index per user
    models: list[Any]
    history: list[list[int]]  # assignment after every iteration
    iterations: int


def em_user_groups(
    n_users: int,
    n_groups: int,
    fit: Callable[[Sequence[int]], Any],
    user_loglik: Callable[[Any, int], float],
    iterations: int = 10,
    seed: int = 0,
    init: Sequence[int] | None = None,
) -> EMResult:
    """Alternate E and M steps until assignments stop changing (or ``iterations`` run out).

    ``fit(users)`` trains a reward model on those users' pairs; ``user_loglik(model, u)`` is the
    BT log-likelihood of user u's pairs under a model. A group that loses all its users is
    re-seeded with the user it explains worst, so no reward model is left untrained.
    """
    if n_groups < 1 or n_users < n_groups:
        raise ValueError(f"need 1 <= n_groups <= n_users, got {n_groups} groups for {n_users} users")
    g = torch.Generator().manual_seed(seed)
    assignment = list(init) if init is not None else torch.randint(n_groups, (n_users,), generator=g).tolist()
    history: list[list[int]] = []
    models: list[Any] = []
    for it in range(iterations):
        for k in range(n_groups):  # keep every group non-empty
            if k not in assignment:
                assignment[int(torch.randint(n_users, (1,), generator=g))] = k
        models = [fit([u for u in range(n_users) if assignment[u] == k]) for k in range(n_groups)]  # M-step
        ll = torch.tensor([[user_loglik(m, u) for m in models] for u in range(n_users)])  # E-step
        new = ll.argmax(1).tolist()
        history.append(new)
        if new == assignment:
            return EMResult(new, models, history, it + 1)
        assignment = new
    return EMResult(assignment, models, history, iterations)


def purity(assignment: Sequence[int], truth: Sequence[int]) -> float:
    """Share of users whose recovered group, matched to the majority true group, is right."""
    total = 0
    for k in set(assignment):
        members = [truth[u] for u, a in enumerate(assignment) if a == k]
        total += max(members.count(t) for t in set(members))
    return total / len(truth)
