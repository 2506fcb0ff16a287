"""A task over a real prompt dataset with reward models or built-in functions as the oracle objectives.

Nothing is downloaded when the task is built: the dataset (via the optional ``datasets``
package) and the reward models load on first use, by hub name or local path, so a preset can be
composed and checked on a machine without network access or a GPU.

``task.objectives`` maps each objective name to one of

* a reward model: a hub name or local path (``helpful: Ray2333/gpt2-large-helpful-reward_model``),
  or a mapping with the details spelled out::

      sentiment: {model: lvwerra/distilbert-imdb, label: 1, output: logit, input: prompt_response}

  ``label`` is the class index of the head whose score is the reward (an int, or a label name
  looked up in the model's ``config.label2id``). Default: 0 for a single-logit head (the usual
  reward model); **1** for a two-class head (by convention the positive class — check the
  model's ``id2label``, which is logged when the model loads); required for three or more
  classes. ``output`` is ``logit`` (the raw score of that class; default for a single-logit
  head) or ``prob`` (its softmax probability, the sigmoid for a single logit; default for
  classification heads). ``input`` is ``prompt_response`` (default: the reward model reads
  prompt + response) or ``response`` (the response alone, e.g. for a humour classifier).
* a built-in programmatic objective, no model: ``{builtin: concise}`` or the string
  ``builtin:concise``, with the builtin's own parameters beside it
  (``{builtin: concise, scale: 0.1, free_words: 0}``). See :data:`BUILTIN_OBJECTIVES`.

Reward models are scored with :func:`mpo_exp.scoring.classifier_logits`, so a response's
reward does not depend on the other rows of its batch or on the tokenizer's padding side.

Rows become (prompt, response) pairs in one of three ways: a prompt field and a response field
(the default); a dialogue split at the last ``split_marker`` (HH-RLHF); or a text split after
its first ``prefix_words`` words, the continuation being the SFT target (IMDb).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from mpo_exp.scoring import classifier_logits
from mpo_exp.tasks.base import Task

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
OUTPUTS = ("logit", "prob")
INPUTS = ("prompt_response", "response")


def concise(prompt: str, response: str, scale: float = 1.0, free_words: int = 0) -> float:
    """-scale * max(number of whitespace-separated words in the response - free_words, 0)."""
    return -float(scale) * max(len(response.split()) - int(free_words), 0)


#: name -> (function(prompt, response, **params) -> float, {param: (type, check, description)})
BUILTIN_OBJECTIVES: dict[str, tuple[Callable[..., float], dict[str, tuple[type, Callable, str]]]] = {
    "concise": (
        concise,
        {
            "scale": (float, lambda v: v > 0, "a number > 0"),
            "free_words": (int, lambda v: v >= 0, "an integer >= 0"),
        },
    ),
}


@dataclass
class RewardModelObjective:
    """The score a sequence classifier gives one class, as the reward."""

    name: str
    model: str
    label: int | str | None = None
    output: str | None = None
    input: str = "prompt_response"


@dataclass
class BuiltinObjective:
    """A programmatic reward: ``BUILTIN_OBJECTIVES[builtin](prompt, response, **params)``."""

    name: str
    builtin: str
    params: dict = field(default_factory=dict)

    def __call__(self, prompt: str, response: str) -> float:
        return BUILTIN_OBJECTIVES[self.builtin][0](prompt, response, **self.params)


def parse_objective(name: str, spec) -> RewardModelObjective | BuiltinObjective:
    """One entry of ``task.objectives``; every error names the field."""
    where = f"task.objectives.{name}"
    if isinstance(spec, str):
        if spec.startswith(BUILTIN_PREFIX):
            spec = {"builtin": spec[len(BUILTIN_PREFIX) :].strip()}
        elif spec.strip():
            return RewardModelObjective(name, spec.strip())
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{where} must be a reward model (hub name or local path), a mapping {{model: ..., label: ..., "
            f"output: logit|prob}}, or a built-in objective {{builtin: ...}} / 'builtin:<name>'; got {spec!r}"
        )
    spec = {str(k): v for k, v in spec.items()}
    if ("model" in spec) == ("builtin" in spec):
        raise ValueError(f"{where} needs exactly one of 'model' (a reward model) or 'builtin'; got {spec}")
    if "builtin" in spec:
        builtin = str(spec.pop("builtin"))
        if builtin not in BUILTIN_OBJECTIVES:
            raise ValueError(
                f"{where}.builtin: unknown built-in {builtin!r}; known: {sorted(BUILTIN_OBJECTIVES)}"
            )
        allowed = BUILTIN_OBJECTIVES[builtin][1]
        params = {}
        for key, value in spec.items():
            if key not in allowed:
                raise ValueError(
                    f"{where}.{key}: unknown parameter of builtin '{builtin}'; it takes {sorted(allowed)}"
                )
            kind, ok, description = allowed[key]
            try:
                if isinstance(value, bool) or (kind is int and float(value) != int(value)):
                    raise TypeError
                cast = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}.{key} must be {description}, got {value!r}") from None
            if not ok(cast):
                raise ValueError(f"{where}.{key} must be {description}, got {value!r}")
            params[key] = cast
        return BuiltinObjective(name, builtin, params)
    unknown = sorted(set(spec) - {"model", "label", "output", "input"})
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown}; a reward model takes model, label, output, input"
        )
    model = spec["model"]
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"{where}.model must be a hub name or local path, got {model!r}")
    label = spec.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str)) or label == ""):
        raise ValueError(f"{where}.label must be a class index or a label name, got {label!r}")
    if isinstance(label, int) and label < 0:
        raise ValueError(f"{where}.label must be >= 0, got {label}")
    output = spec.get("output")
    if output is not None and output not in OUTPUTS:
        raise ValueError(f"{where}.output must be one of {list(OUTPUTS)}, got {output!r}")
    text = spec.get("input", "prompt_response")
    if text not in INPUTS:
        raise ValueError(f"{where}.input must be one of {list(INPUTS)}, got {text!r}")
    return RewardModelObjective(name, model.strip(), label, output, text)


def resolve_head(objective: RewardModelObjective, config) -> tuple[int, str]:
    """(class index, output) of a loaded reward model's head, defaults applied (see the module doc)."""
    where = f"task.objectives.{objective.name}"
    n = int(config.num_labels)
    label = objective.label
    if isinstance(label, str):
        label2id = dict(getattr(config, "label2id", None) or {})
        if label not in label2id:
            raise ValueError(
                f"{where}.label: {label!r} is not a label of {objective.model}; labels: {label2id}"
            )
        label = int(label2id[label])
    elif label is None:
        if n > 2:
            raise ValueError(
                f"{where}.label: {objective.model} has {n} classes ({getattr(config, 'id2label', {})}); "
                "say which class index is the reward"
            )
        label = 0 if n == 1 else 1
    if not 0 <= label < n:
        raise ValueError(f"{where}.label={label} is out of range for a head with {n} output(s)")
    output = objective.output or ("logit" if n == 1 else "prob")
    return label, output


class HFDatasetTask(Task):
    def __init__(
        self,
        dataset: str,
        objectives: Mapping,
        prompt_field: str = "prompt",
        response_field: str = "chosen",
        train_split: str = "train",
        eval_split: str = "test",
        dataset_config: str | None = None,
        prompt_template: str = "{prompt}",
        split_marker: str | None = None,
        prefix_words: int | None = None,
        response_words: int | None = None,
        max_new_tokens: int = 128,
        reward_batch_size: int = 16,
    ) -> None:
        if not isinstance(objectives, Mapping) or not objectives:
            raise ValueError(
                "task.objectives must map at least one objective name to a reward model or a builtin"
            )
        self.dataset, self.dataset_config = dataset, dataset_config
        self.objective_specs = {str(k): parse_objective(str(k), v) for k, v in objectives.items()}
        self.objectives = list(self.objective_specs)
        #: the reward-model objectives only: {objective: hub name or local path}
        self.reward_model_names = {
            k: o.model for k, o in self.objective_specs.items() if isinstance(o, RewardModelObjective)
        }
        self.prompt_field, self.response_field = prompt_field, response_field
        self.splits = {"train": train_split, "eval": eval_split}
        self.prompt_template, self.max_new_tokens = prompt_template, max_new_tokens
        # dialogue datasets (HH-RLHF) store prompt and answer in one string: split at the last marker
        self.split_marker = split_marker or None
        for name, value in (("prefix_words", prefix_words), ("response_words", response_words)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"task.{name} must be an integer >= 1 or null, got {value!r}")
        if prefix_words is not None and self.split_marker:
            raise ValueError("task.prefix_words and task.split_marker are two ways to split a row: set one")
        if response_words is not None and prefix_words is None:
            raise ValueError(
                "task.response_words truncates the continuation after task.prefix_words: set both"
            )
        # text-continuation datasets (IMDb): the prompt is the first prefix_words words, the SFT
        # target the next response_words (default: about max_new_tokens tokens, ~0.75 words each)
        self.prefix_words = prefix_words
        self.response_words = response_words or (max(1, (3 * max_new_tokens) // 4) if prefix_words else None)
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
        if len(rows) == 0:
            raise ValueError(f"task.dataset={self.dataset!r}: split {self.splits[split]!r} has no rows")
        self._cache[split] = rows
        return rows

    def _field(self, row: dict, name: str, setting: str) -> str:
        if name not in row:
            raise ValueError(
                f"task.{setting}={name!r} is not a field of the data set; the row has {sorted(row)}"
            )
        return row[name]

    def split_text(self, row: dict) -> tuple[str, str]:
        """(prompt, response) of one dataset row."""
        if self.split_marker:
            text = self._field(row, self.prompt_field, "prompt_field")
            at = text.rfind(self.split_marker)
            if at < 0:
                raise ValueError(
                    f"task.split_marker={self.split_marker!r} does not occur in this row's "
                    f"{self.prompt_field!r} field, which starts {text[:120]!r}"
                )
            cut = at + len(self.split_marker)
            return self.prompt_template.format(prompt=text[:cut]), text[cut:]
        if self.prefix_words:
            words = self._field(row, self.prompt_field, "prompt_field").split()
            prefix, rest = words[: self.prefix_words], words[self.prefix_words :][: self.response_words]
            continuation = " " + " ".join(rest) if rest else ""
            return self.prompt_template.format(prompt=" ".join(prefix)), continuation
        prompt = self._field(row, self.prompt_field, "prompt_field")
        response = self._field(row, self.response_field, "response_field")
        return self.prompt_template.format(prompt=prompt), response

    def _sample_rows(
        self, split: str, n: int, seed: int, need_response: bool = False
    ) -> list[tuple[str, str]]:
        rows = self._rows(split)
        rng = random.Random(seed)
        out: list[tuple[str, str]] = []
        for _ in range(20 * n + 100):  # rows without a response are skipped for the SFT corpus
            if len(out) == n:
                break
            prompt, response = self.split_text(rows[rng.randrange(len(rows))])
            if response.strip() or not need_response:
                out.append((prompt, response))
        if len(out) < n:
            raise ValueError(
                f"task.dataset={self.dataset!r}: too few {split} rows have a response after the prompt "
                f"(task.prefix_words={self.prefix_words}); found {len(out)} of {n}"
            )
        return out

    def prompts(self, split: str, n: int, seed: int) -> list[str]:
        return [p for p, _ in self._sample_rows(split, n, seed)]

    def corpus(self, n: int, seed: int) -> list[tuple[str, str]]:
        return self._sample_rows("train", n, seed, need_response=True)

    @cached_property
    def _reward_models(self) -> dict:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        out = {}
        for name, objective in self.objective_specs.items():
            if not isinstance(objective, RewardModelObjective):
                continue
            tok = AutoTokenizer.from_pretrained(objective.model)
            if tok.pad_token is None:  # GPT-2-style tokenizers; scoring does not depend on the pad id
                tok.pad_token = tok.eos_token or tok.unk_token
            tok.truncation_side = "left"  # a too-long text loses the start of the prompt, not the response
            model = AutoModelForSequenceClassification.from_pretrained(objective.model).eval()
            label, output = resolve_head(objective, model.config)
            label_name = (getattr(model.config, "id2label", None) or {}).get(label, "?")
            log.info(
                "objective %r: %s, class %d (%s) %s, reads %s",
                name,
                objective.model,
                label,
                label_name,
                output,
                objective.input,
            )
            limits = [tok.model_max_length]
            limits += [getattr(model.config, k, None) for k in ("max_position_embeddings", "n_positions")]
            max_length = min(int(x) for x in limits if isinstance(x, int) and x > 0)
            out[name] = (tok, model, label, output, max_length)
        return out

    @torch.no_grad()
    def reward_model_scores(self, name: str, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """One reward model's scores, (n,), padding-invariant (see :func:`classifier_logits`)."""
        objective = self.objective_specs[name]
        tok, model, label, output, max_length = self._reward_models[name]
        texts = [
            r if objective.input == "response" else p + r for p, r in zip(prompts, responses, strict=True)
        ]
        scores = []
        for s in range(0, len(texts), self.reward_batch_size):
            enc = tok(
                texts[s : s + self.reward_batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            logits = classifier_logits(model, enc["input_ids"], enc["attention_mask"])
            if output == "logit":
                scores.append(logits[:, label])
            elif logits.shape[-1] == 1:
                scores.append(torch.sigmoid(logits[:, label]))
            else:
                scores.append(logits.softmax(-1)[:, label])
        return torch.cat(scores).float() if scores else torch.zeros(0)

    def rewards(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        cols = []
        for name, objective in self.objective_specs.items():
            if isinstance(objective, BuiltinObjective):
                col = torch.tensor([objective(p, r) for p, r in zip(prompts, responses, strict=True)])
            else:
                col = self.reward_model_scores(name, prompts, responses)
            cols.append(col.float().reshape(len(prompts)))
        return torch.stack(cols, dim=-1)
