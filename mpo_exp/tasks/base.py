"""The contract every task fulfils; the pipeline sees tasks only through it."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from transformers import PreTrainedTokenizerBase


class Task(ABC):
    #: names of the objectives in use, in the order of every (.., K) tensor
    objectives: list[str]
    #: longest response any policy may generate
    max_new_tokens: int

    @abstractmethod
    def build_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The task's own tokenizer, or None to use the model's."""

    @abstractmethod
    def prompts(self, split: str, n: int, seed: int) -> list[str]:
        """``n`` prompt strings from ``split`` ('train' or 'eval': disjoint prompt sets)."""

    @abstractmethod
    def corpus(self, n: int, seed: int) -> list[tuple[str, str]]:
        """(prompt, response) pairs to fine-tune the reference policy on."""

    def bind_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:  # noqa: B027 -- optional hook
        """Called with pi_ref's tokenizer once it exists (when pi_ref is built and when it is loaded
        from the cache), before any prompt is drawn. A task that renders prompts with the model's
        chat template keeps it here; the default does nothing."""

    def prompt_length_bound(self) -> int | None:
        """The longest prompt in tokens if cheaply known (checked against the model context)."""
        return None

    @abstractmethod
    def rewards(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Oracle rewards, shape (n, K) in the order of :attr:`objectives`."""
