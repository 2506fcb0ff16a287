"""A task over a real prompt dataset with reward models as the oracle objectives (paper presets).

Nothing is downloaded when the task is built: the dataset (via the optional ``datasets``
package) and the reward models load on first use, by hub name or local path, so a preset can be
composed and checked on a machine without network access or a GPU.
"""

from __future__ import annotations

import json
import random
from functools import cached_property
from pathlib import Path

import torch

from mpo_exp.tasks.base import Task


class HFDatasetTask(Task):
    def __init__(
        self,
        dataset: str,
        objectives: dict[str, str],
        prompt_field: str = "prompt",
        response_field: str = "chosen",
        train_split: str = "train",
        eval_split: str = "test",
        dataset_config: str | None = None,
        prompt_template: str = "{prompt}",
        split_marker: str | None = None,
        max_new_tokens: int = 128,
        reward_batch_size: int = 16,
    ) -> None:
        if not objectives:
            raise ValueError("task.objectives must map at least one objective name to a reward model")
        self.dataset, self.dataset_config = dataset, dataset_config
        self.reward_model_names = {str(k): str(v) for k, v in dict(objectives).items()}
        self.objectives = list(self.reward_model_names)
        self.prompt_field, self.response_field = prompt_field, response_field
        self.splits = {"train": train_split, "eval": eval_split}
        self.prompt_template, self.max_new_tokens = prompt_template, max_new_tokens
        # dialogue datasets (HH-RLHF) store prompt and answer in one string: split at the last marker
        self.split_marker = split_marker
        self.reward_batch_size = reward_batch_size

    def build_tokenizer(self) -> None:
        return None  # the policy model's own tokenizer

    @cached_property
    def _cache(self) -> dict:
        return {}

    def _rows(self, split: str) -> list[dict]:
        """Rows of a split: ``<dataset>/<split>.jsonl`` for a local folder, else ``datasets.load_dataset``."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self.splits)}")
        if split in self._cache:
            return self._cache[split]
        local = Path(self.dataset) / f"{self.splits[split]}.jsonl"
        if local.exists():
            rows = [json.loads(line) for line in local.read_text().splitlines() if line.strip()]
        else:
            try:
                from datasets import load_dataset
            except ImportError as e:  # an optional dependency: only hub data sets need it
                raise ImportError("task=hf with a hub data set needs `datasets`: pip install datasets") from e
            rows = load_dataset(self.dataset, self.dataset_config, split=self.splits[split])
        self._cache[split] = rows
        return rows

    def split_text(self, row: dict) -> tuple[str, str]:
        """(prompt, response) of one dataset row."""
        if self.split_marker:
            text = row[self.prompt_field]
            cut = text.rfind(self.split_marker) + len(self.split_marker)
            return self.prompt_template.format(prompt=text[:cut]), text[cut:]
        return self.prompt_template.format(prompt=row[self.prompt_field]), row[self.response_field]

    def _sample_rows(self, split: str, n: int, seed: int) -> list[tuple[str, str]]:
        rows = self._rows(split)
        rng = random.Random(seed)
        return [self.split_text(rows[rng.randrange(len(rows))]) for _ in range(n)]

    def prompts(self, split: str, n: int, seed: int) -> list[str]:
        return [p for p, _ in self._sample_rows(split, n, seed)]

    def corpus(self, n: int, seed: int) -> list[tuple[str, str]]:
        return self._sample_rows("train", n, seed)

    @cached_property
    def _reward_models(self):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        out = {}
        for name, path in self.reward_model_names.items():
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path).eval()
            out[name] = (tok, model)
        return out

    @torch.no_grad()
    def rewards(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        cols = []
        for name in self.objectives:
            tok, model = self._reward_models[name]
            scores = []
            for s in range(0, len(prompts), self.reward_batch_size):
                enc = tok(
                    [
                        p + r
                        for p, r in zip(
                            prompts[s : s + self.reward_batch_size],
                            responses[s : s + self.reward_batch_size],
                            strict=True,
                        )
                    ],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                )
                logits = model(**enc).logits
                # a single-logit head is the reward; a two-class head (e.g. humor / no humor) gives P(class 1)
                scores.append(logits[:, 0] if logits.shape[-1] == 1 else logits.softmax(-1)[:, 1])
            cols.append(torch.cat(scores).float())
        return torch.stack(cols, dim=-1)
