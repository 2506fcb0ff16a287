"""Real text on a CPU: templated everyday requests, rendered with the policy's chat template.

Prompts are short requests written for this repository (so their licence is this repository's):
reviews of everyday things ("Write a short review of a coffee shop.") and descriptions of
everyday topics ("Describe thunderstorms in a few sentences."). Every prompt is one template
filled with one subject; the subjects, not just the prompt strings, are split into train and eval
halves by a fixed shuffle, so no eval prompt talks about a subject seen in training.

The prompts are rendered with the policy tokenizer's own chat template
(``apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)``), so the
task needs that tokenizer: :class:`mpo_exp.context.RunContext` calls :meth:`ChatTask.bind_tokenizer`
once pi_ref's tokenizer exists. :meth:`ChatTask.rewards` receives those rendered prompts (as
decoded from the token ids) and the responses with special tokens skipped, and maps each prompt
back to its raw user text.

Objectives, all programmatic and offline (no model download):

* ``sentiment``: the VADER compound score of the response, in [-1, 1] (``vaderSentiment``,
  a lexicon and rules, ~10k texts/s). Enthusiastic answers with many positive words score high.
* ``concise``: ``-concise_scale * words`` (whitespace-separated words of the response). It
  conflicts with sentiment the way the paper's IMDb pair does: VADER's compound score grows with
  every further positive word, conciseness pays for each word.
* ``informative`` (the third objective of the K=3 preset): ``informative_scale * (distinct
  content words of the response) + topic_bonus * (share of the subject's content words the
  response mentions)``. Content words are lower-cased alphabetic words of 3+ letters that are not
  stop words, compared after stripping a plural "s". Distinct words reward coverage, not
  repetition or padding with filler; the topic share keeps it on the subject (a word salad gets
  no bonus). It conflicts with ``concise`` (every new content word costs a word) and is roughly
  neutral to ``sentiment``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from functools import cached_property

import torch
from transformers import PreTrainedTokenizerBase

from mpo_exp.tasks.base import Task
from mpo_exp.tasks.hf import concise

#: templates for things one can review; {s} is the subject (with its article). Half of the
#: templates of each kind ask for a very short answer, so pi_ref's response lengths spread below
#: max_new_tokens (a conciseness signal beyond the truncation length)
REVIEW_TEMPLATES = [
    "Write a short review of {s}.",
    "Write a one-sentence review of {s}.",
    "Give a quick opinion of {s}.",
    "In one sentence, what do you think of {s}?",
    "Describe an experience with {s} in a few sentences.",
    "What is good or bad about {s}? Keep it short.",
]
# fmt: off
REVIEW_SUBJECTS = [
    "a pizza restaurant", "a new smartphone", "a science fiction film", "a public library",
    "a city park", "a coffee shop", "a mystery novel", "a hiking trail", "a train journey",
    "a budget hotel", "a pair of running shoes", "a history museum", "a farmers market",
    "a video game", "a small bakery", "a music festival", "a local gym", "a cooking class",
    "a board game", "an electric bike", "a dentist appointment", "a bus ride", "a camping trip",
    "a delayed flight", "a traffic jam", "a broken umbrella", "a long queue at the post office",
    "a noisy apartment", "a cheap laptop", "a romantic comedy", "a jazz concert", "a theme park",
    "a sushi bar", "a used car", "a swimming pool", "a language app", "a winter jacket",
    "a street food stall", "a horror film", "a comedy show", "a botanical garden", "a ferry trip",
    "a vegetarian cafe", "a children's playground", "a second-hand bookshop", "a tennis court",
    "a rainy holiday", "a cold cup of tea", "a crowded beach", "a wireless speaker",
]
#: templates for topics one can describe or explain
TOPIC_TEMPLATES = [
    "Describe {s} in a few sentences.",
    "Describe {s} in a few words.",
    "Tell me about {s}.",
    "Summarise {s} in one sentence.",
    "Explain {s} to a friend in simple words.",
    "What should someone know about {s}? Keep it short.",
]
TOPIC_SUBJECTS = [
    "autumn", "the ocean", "growing tomatoes", "learning to swim", "city traffic", "homework",
    "the first day at a new job", "winter mornings", "recycling", "public transport", "cats",
    "dogs", "thunderstorms", "baking bread", "moving house", "rainy days", "exams",
    "cleaning the kitchen", "birthdays", "a visit to the doctor", "waiting in line",
    "riding a bicycle", "volunteering", "gardening", "mountains", "old computers",
    "running a marathon", "street markets", "chess", "the night sky", "camping", "libraries",
    "coffee", "learning a language", "snow", "summer holidays", "bees", "trains", "deserts",
    "friendship", "cooking pasta", "saving money", "sleep", "rivers", "museums", "the moon",
    "football", "painting", "forests", "breakfast", "email", "taking photos", "bridges",
    "the weather", "music lessons", "board games", "tea", "birds", "the seaside", "Monday mornings",
]
# fmt: on
SUBJECTS: dict[str, tuple[list[str], list[str]]] = {
    "review": (REVIEW_TEMPLATES, REVIEW_SUBJECTS),
    "topic": (TOPIC_TEMPLATES, TOPIC_SUBJECTS),
}

_STOP_WORDS = """
    a about above after again against all also am an and any are aren't as at be because been before
    being below between both but by can can't cannot could couldn't did didn't do does doesn't doing
    don't down during each either else even ever every few for from further get gets got had hadn't
    has hasn't have haven't having he her here hers herself him himself his how however i if in into
    is isn't it it's its itself just let's like make makes many may me might more most much must my
    myself need no nor not now of off on once one only or other our ours ourselves out over own per
    quite rather really same she should shouldn't since so some such than that that's the their
    theirs them themselves then there there's these they this those though through to too under
    until up upon us very was wasn't we well were weren't what what's when where which while who
    whom why will with within without won't would wouldn't yes yet you your yours yourself
    yourselves thing things way lot lots also still always often sometimes something anything
    everything nothing someone anyone everyone one two three first new good great
"""
STOP_WORDS = frozenset(_STOP_WORDS.split())
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def content_words(text: str) -> set[str]:
    """Distinct content words: lower-cased, alphabetic, 3+ letters, not stop words, plural 's' off."""
    out = set()
    for w in _WORD.findall(text.lower()):
        if len(w) < 3 or w in STOP_WORDS or "'" in w:
            continue
        out.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def all_prompts() -> list[tuple[str, str, str]]:
    """Every (prompt, kind, subject) the task knows, in a fixed order."""
    return [
        (t.format(s=s), kind, s)
        for kind, (templates, subjects) in SUBJECTS.items()
        for s in subjects
        for t in templates
    ]


class ChatTask(Task):
    """Templated everyday requests in the model's chat format; VADER sentiment, conciseness and
    informativeness as oracle objectives (see the module docstring)."""

    OBJECTIVES = ("sentiment", "concise", "informative")

    def __init__(
        self,
        objectives: list[str] | tuple[str, ...] = ("sentiment", "concise"),
        max_new_tokens: int = 48,
        eval_fraction: float = 0.5,
        concise_scale: float = 0.1,
        informative_scale: float = 0.1,
        topic_bonus: float = 1.0,
        system_prompt: str | None = None,
    ) -> None:
        objectives = list(objectives)
        unknown = [o for o in objectives if o not in self.OBJECTIVES]
        if unknown:
            raise ValueError(
                f"task.objectives: unknown objective(s) {unknown}; task=chat knows {list(self.OBJECTIVES)}"
            )
        if not objectives or len(set(objectives)) != len(objectives):
            raise ValueError(f"task.objectives must be non-empty and distinct, got {objectives}")
        if not 0 < eval_fraction < 1:
            raise ValueError(f"task.eval_fraction must be in (0, 1), got {eval_fraction}")
        for name, value in (("concise_scale", concise_scale), ("informative_scale", informative_scale)):
            if not value > 0:
                raise ValueError(f"task.{name} must be > 0, got {value}")
        if not topic_bonus >= 0:
            raise ValueError(f"task.topic_bonus must be >= 0, got {topic_bonus}")
        if "sentiment" in objectives:
            self._vader  # noqa: B018 -- fail at build time (config check), not after sampling
        self.objectives = objectives
        self.max_new_tokens = int(max_new_tokens)
        self.concise_scale, self.informative_scale = float(concise_scale), float(informative_scale)
        self.topic_bonus = float(topic_bonus)
        self.system_prompt = system_prompt
        self.tokenizer: PreTrainedTokenizerBase | None = None
        # split by subject (fixed shuffle: the split is part of the task, not of the run's seed)
        rng = random.Random(1234)
        eval_subjects: set[str] = set()
        for _, subjects in SUBJECTS.values():
            order = list(subjects)
            rng.shuffle(order)
            eval_subjects |= set(order[: max(1, round(eval_fraction * len(order)))])
        self.subject_of = {p: s for p, _, s in all_prompts()}
        self._splits = {
            "train": [p for p, _, s in all_prompts() if s not in eval_subjects],
            "eval": [p for p, _, s in all_prompts() if s in eval_subjects],
        }
        self._raw_of: dict[str, str] = {}

    @cached_property
    def _vader(self):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError as e:
            raise ImportError(
                "task=chat's sentiment objective needs vaderSentiment: pip install vaderSentiment "
                "(or pip install -e '.[smollm2]')"
            ) from e
        return SentimentIntensityAnalyzer()

    # ---- tokenizer and rendering -----------------------------------------------------------
    def build_tokenizer(self) -> None:
        return None  # the policy model's own tokenizer (and its chat template)

    def bind_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "task=chat renders prompts with the model's chat template, and this tokenizer has none "
                "(use an instruct / chat model, e.g. model=smollm2)"
            )
        self.tokenizer = tokenizer
        self._raw_of = {}
        for split in self._splits.values():
            for p in split:
                rendered = self.render(p)
                self._raw_of[rendered] = p
                # what decode_prompts gives back: the ids decoded with special tokens kept
                ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
                self._raw_of[tokenizer.decode(ids, skip_special_tokens=False)] = p

    def render(self, user_text: str) -> str:
        if self.tokenizer is None:
            raise RuntimeError(
                "task=chat renders prompts with the policy's chat template: call "
                "task.bind_tokenizer(tokenizer) first (RunContext does when it builds or loads pi_ref)"
            )
        messages = [{"role": "user", "content": user_text}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def raw_prompt(self, prompt: str) -> str:
        """The user text of a rendered (or already raw) prompt."""
        if prompt in self.subject_of:
            return prompt
        if prompt in self._raw_of:
            return self._raw_of[prompt]
        found = [raw for raw in self.subject_of if raw in prompt]  # rendered some other way
        if found:
            return max(found, key=len)
        raise ValueError(f"task=chat: not one of this task's prompts: {prompt[-120:]!r}")

    # ---- data ------------------------------------------------------------------------------
    def raw_prompts(self, split: str, n: int, seed: int) -> list[str]:
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self._splits)}")
        pool = self._splits[split]
        rng = random.Random(seed)
        return [rng.choice(pool) for _ in range(n)]

    def prompts(self, split: str, n: int, seed: int) -> list[str]:
        return [self.render(p) for p in self.raw_prompts(split, n, seed)]

    def corpus(self, n: int, seed: int) -> list[tuple[str, str]]:
        raise NotImplementedError(
            "task=chat has no SFT corpus: set sft.max_steps=0, so pi_ref is the instruct model as loaded"
        )

    def prompt_length_bound(self) -> int | None:
        if self.tokenizer is None:
            return None
        return max(
            len(self.tokenizer(self.render(p), add_special_tokens=False)["input_ids"])
            for p in self.subject_of
        )

    # ---- oracle ----------------------------------------------------------------------------
    def sentiment(self, prompt: str, response: str) -> float:
        return float(self._vader.polarity_scores(response)["compound"])

    def concise(self, prompt: str, response: str) -> float:
        return concise(prompt, response, scale=self.concise_scale)  # the HF task's builtin, free_words=0

    def informative(self, prompt: str, response: str) -> float:
        said = content_words(response)
        topic = content_words(self.subject_of.get(prompt, prompt))
        share = len(said & topic) / len(topic) if topic else 0.0
        return self.informative_scale * len(said) + self.topic_bonus * share

    def rewards(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        fns: list[Callable[[str, str], float]] = [getattr(self, o) for o in self.objectives]
        rows = []
        for prompt, response in zip(prompts, responses, strict=True):
            raw = self.raw_prompt(prompt)
            rows.append([fn(raw, response) for fn in fns])
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(self.objectives))
