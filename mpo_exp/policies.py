"""Building, saving and loading policies: the tiny embedded GPT-2 and any HF causal LM.

Every policy, the tiny one included, goes through ``save_pretrained`` / ``from_pretrained``,
so the code path that loads a real model by HF name or local path is the one the default run
and the tests exercise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)


@dataclass
class Policy:
    """A named causal LM with its tokenizer."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    def eval(self) -> Policy:
        self.model.eval()
        return self


class TinyGPT2Spec:
    """A GPT-2 built from a config (no download) over the task's own tokenizer."""

    def __init__(self, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 64) -> None:
        self.kwargs = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions)

    def build(self, tokenizer: PreTrainedTokenizerBase | None) -> Policy:
        if tokenizer is None:
            raise ValueError("model=tiny_gpt2 needs a tokenizer from the task (task.build_tokenizer)")
        cfg = GPT2Config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **self.kwargs,
        )
        return Policy("init", GPT2LMHeadModel(cfg), tokenizer)

    def trainable(self, model: PreTrainedModel) -> PreTrainedModel:
        return model

    def mergeable(self, model: PreTrainedModel) -> PreTrainedModel:
        return model


class PretrainedSpec:
    """Any HF causal LM by hub name or local path; its own tokenizer unless the task brings one."""

    def __init__(self, name_or_path: str, dtype: str = "float32", lora: dict | None = None) -> None:
        self.name_or_path, self.dtype = name_or_path, dtype
        self.lora = dict(lora) if lora else None

    def build(self, tokenizer: PreTrainedTokenizerBase | None) -> Policy:
        policy = load_policy(self.name_or_path, name="init", dtype=self.dtype)
        if tokenizer is not None:
            check_same_tokenizer({"model": policy.tokenizer, "task": tokenizer})
        return policy

    def trainable(self, model: PreTrainedModel) -> PreTrainedModel:
        """Wrap in LoRA adapters when ``model.lora`` is set (needs the optional ``peft`` package)."""
        if not self.lora:
            return model
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ImportError("model.lora needs the `peft` package: pip install peft") from e
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **self.lora))

    def mergeable(self, model) -> PreTrainedModel:
        """Fold LoRA adapters back in, so every saved artifact is a plain ``from_pretrained`` model."""
        return model.merge_and_unload() if self.lora else model


def load_policy(path: str | os.PathLike, name: str | None = None, dtype: str = "float32") -> Policy:
    """Load model and tokenizer with ``from_pretrained`` (a local dir or an HF hub name)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:  # common for decoder-only LMs; EOS doubles as padding
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    return Policy(name or Path(str(path)).name, model, tokenizer)


def save_policy(policy: Policy, path: str | os.PathLike) -> None:
    policy.model.save_pretrained(str(path))
    policy.tokenizer.save_pretrained(str(path))


def check_same_tokenizer(tokenizers: dict[str, PreTrainedTokenizerBase]) -> None:
    """Mixing log-probabilities token by token only makes sense over one shared vocabulary."""
    items = list(tokenizers.items())
    name0, tok0 = items[0]
    vocab0 = tok0.get_vocab()
    for name, tok in items[1:]:
        if tok.get_vocab() != vocab0 or tok.eos_token_id != tok0.eos_token_id:
            raise ValueError(
                f"policies '{name0}' and '{name}' have different tokenizers "
                f"(vocab sizes {len(vocab0)} vs {len(tok.get_vocab())}); "
                "mixing needs every policy to share pi_ref's tokenizer"
            )
