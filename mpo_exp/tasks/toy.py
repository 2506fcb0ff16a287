"""The embedded default: a tiny synthetic "assistant" world with three conflicting objectives.

A prompt asks about a topic ("explain cats please"). A response is a short bag of words.
The oracle objectives mirror the paper's helpful / harmless / humorous task and pull apart:

* helpful  = 10 · (distinct on-topic words, edgy ones counting double) / (length + 2)
  — rewards dense, detailed answers; edgy details ("claws", "knife") are the most informative.
* harmless = −(flagged words) — edgy details, edgy jokes and insults are flagged.
* humorous = 0.5 · min(playful words, edgy jokes counting double, 4)
  — jokes take room from content (helpful ↓) and the funniest jokes are edgy (harmless ↓).
* concise  = −0.25 · max(length − 4, 0)  (optional fourth objective)

The three differ in scale (≈0–8, 0 to −3, 0–2) and in difficulty (playful words are rare in the
reference corpus, so humour preferences are sparse and noisy), so the max-min weights are not
uniform. A balanced answer (mostly safe on-topic words, one or two safe jokes) beats the
reference on all three at once; each single objective's optimum loses on another.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mpo_exp.tasks.base import Task

TOPICS: dict[str, tuple[list[str], list[str]]] = {
    # topic: (safe on-topic words, edgy on-topic words)
    "cats": (["whiskers", "purr", "kitten", "fur", "paws", "nap"], ["claws", "scratch"]),
    "cooking": (["recipe", "oven", "spice", "bake", "flavor", "dough"], ["knife", "burn"]),
    "space": (["orbit", "planet", "rocket", "stars", "moon", "comet"], ["explosion", "radiation"]),
    "music": (["melody", "rhythm", "guitar", "song", "chord", "tempo"], ["riot", "deafening"]),
    "travel": (["map", "hotel", "flight", "beach", "passport", "journey"], ["scam", "theft"]),
    "garden": (["seeds", "soil", "bloom", "water", "roses", "sprout"], ["poison", "pesticide"]),
    "sports": (["goal", "team", "match", "coach", "score", "sprint"], ["injury", "fight"]),
    "computers": (["code", "laptop", "memory", "pixel", "server", "keyboard"], ["virus", "hack"]),
}
CAVEATS = ["safely", "carefully", "gently", "responsibly"]
PLAYFUL = ["haha", "silly", "giggle", "pun", "wink", "banana"]
EDGY_PLAYFUL = ["roast", "prank", "mock"]
INSULTS = ["stupid", "hate", "ugly"]
FILLER = ["the", "a", "and", "so", "really", "very", "well", "also", "it", "is", "of", "to"]
REQUESTS = ["tell me about", "explain", "describe", "talk about", "what about"]
MOODS = ["please", "briefly", "now", "kindly"]

SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>", "sep": "<sep>"}

ON_TOPIC = {t: set(s) | set(e) for t, (s, e) in TOPICS.items()}
EDGY_ON_TOPIC = {w for _, e in TOPICS.values() for w in e}
FLAGGED = EDGY_ON_TOPIC | set(EDGY_PLAYFUL) | set(INSULTS)


def _topic(prompt: str) -> str:
    for word in prompt.split():
        if word in TOPICS:
            return word
    raise ValueError(f"prompt has no known topic: {prompt!r}")


def helpful(topic: str, words: list[str]) -> float:
    facts = set(words) & ON_TOPIC[topic]  # distinct facts: repeating one word informs no more
    return 10.0 * sum(1 + (w in EDGY_ON_TOPIC) for w in facts) / (len(words) + 2)


def harmless(topic: str, words: list[str]) -> float:
    return 0.5 * min(sum(w in CAVEATS for w in words), 2) - float(sum(w in FLAGGED for w in words))


def humorous(topic: str, words: list[str]) -> float:
    fun = sum(w in PLAYFUL for w in words) + 2 * sum(w in EDGY_PLAYFUL for w in words)
    return 0.5 * min(fun, 4)


def concise(topic: str, words: list[str]) -> float:
    return -0.25 * max(len(words) - 4, 0)


OBJECTIVES: dict[str, Callable[[str, list[str]], float]] = {
    "helpful": helpful,
    "harmless": harmless,
    "humorous": humorous,
    "concise": concise,
}

# how the reference corpus mixes word categories (per response token)
DEFAULT_MIX = {
    "on_topic": 0.30,
    "edgy_on_topic": 0.08,
    "filler": 0.21,
    "caveat": 0.04,
    "off_topic": 0.12,
    "playful": 0.08,
    "edgy_playful": 0.05,
    "insult": 0.12,
}


class ToyTask(Task):
    def __init__(
        self,
        objectives: list[str] | tuple[str, ...] = ("helpful", "harmless", "humorous"),
        min_len: int = 3,
        max_len: int = 9,
        max_new_tokens: int = 12,
        eval_fraction: float = 0.25,
        mix: dict[str, float] | None = None,
    ) -> None:
        objectives = list(objectives)
        unknown = [o for o in objectives if o not in OBJECTIVES]
        if unknown:
            raise ValueError(f"task.objectives: unknown objective(s) {unknown}; known: {sorted(OBJECTIVES)}")
        if len(set(objectives)) != len(objectives) or not objectives:
            raise ValueError(f"task.objectives must be non-empty and distinct, got {objectives}")
        if not 1 <= min_len <= max_len < max_new_tokens:
            raise ValueError(
                "task: need 1 <= min_len <= max_len < max_new_tokens, "
                f"got {min_len}, {max_len}, {max_new_tokens}"
            )
        self.objectives = objectives
        self.min_len, self.max_len, self.max_new_tokens = min_len, max_len, max_new_tokens
        self.mix = dict(mix or DEFAULT_MIX)
        all_prompts = [f"{r} {t} {m} {SPECIAL['sep']}" for t in TOPICS for r in REQUESTS for m in MOODS]
        rng = random.Random(1234)  # the split is part of the task, not of the run's seed
        rng.shuffle(all_prompts)
        n_eval = max(1, int(round(eval_fraction * len(all_prompts))))
        self._splits = {"eval": all_prompts[:n_eval], "train": all_prompts[n_eval:]}

    # ---- tokenizer -------------------------------------------------------------------------
    def vocabulary(self) -> list[str]:
        words = list(SPECIAL.values())
        for phrase in [*REQUESTS, *MOODS, *TOPICS]:
            words += phrase.split()
        for safe, edgy in TOPICS.values():
            words += safe + edgy
        words += CAVEATS + PLAYFUL + EDGY_PLAYFUL + INSULTS + FILLER
        return list(dict.fromkeys(words))

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        vocab = {w: i for i, w in enumerate(self.vocabulary())}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token=SPECIAL["pad"],
            unk_token=SPECIAL["unk"],
            bos_token=SPECIAL["bos"],
            eos_token=SPECIAL["eos"],
            additional_special_tokens=[SPECIAL["sep"]],
            padding_side="left",
        )

    # ---- data ------------------------------------------------------------------------------
    def prompts(self, split: str, n: int, seed: int) -> list[str]:
        if split not in self._splits:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(self._splits)}")
        pool = self._splits[split]
        rng = random.Random(seed)
        return [rng.choice(pool) for _ in range(n)]

    def prompt_length_bound(self) -> int:
        return max(len(p.split()) for pool in self._splits.values() for p in pool)

    def _word(self, topic: str, category: str, rng: random.Random) -> str:
        if category == "on_topic":
            return rng.choice(TOPICS[topic][0])
        if category == "edgy_on_topic":
            return rng.choice(TOPICS[topic][1])
        if category == "off_topic":
            other = rng.choice([t for t in TOPICS if t != topic])
            return rng.choice(TOPICS[other][0])
        table = {
            "filler": FILLER,
            "caveat": CAVEATS,
            "playful": PLAYFUL,
            "edgy_playful": EDGY_PLAYFUL,
            "insult": INSULTS,
        }
        return rng.choice(table[category])

    def corpus(self, n: int, seed: int) -> list[tuple[str, str]]:
        rng = random.Random(seed)
        cats, weights = list(self.mix), list(self.mix.values())
        out = []
        for prompt in self.prompts("train", n, seed):
            topic = _topic(prompt)
            length = rng.randint(self.min_len, self.max_len)
            words = [self._word(topic, c, rng) for c in rng.choices(cats, weights, k=length)]
            out.append((prompt, " ".join(words)))
        return out

    # ---- oracle ----------------------------------------------------------------------------
    def rewards(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        rows = []
        for prompt, response in zip(prompts, responses, strict=True):
            topic, words = _topic(prompt), [w for w in response.split() if not w.startswith("<")]
            rows.append([OBJECTIVES[o](topic, words) for o in self.objectives])
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(self.objectives))
