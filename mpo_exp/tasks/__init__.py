"""Tasks: prompts, a reference corpus, and the oracle objectives used for labels and evaluation."""

from mpo_exp.tasks.base import Task

__all__ = ["Task"]
