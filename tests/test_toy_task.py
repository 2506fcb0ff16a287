"""The embedded task: oracle objectives by hand, their conflict, its tokenizer round trip."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import AutoTokenizer

from mpo_exp.tasks.toy import (
    CAVEATS,
    DEFAULT_MIX,
    EDGY_PLAYFUL,
    FILLER,
    FLAGGED,
    INSULTS,
    PLAYFUL,
    TOPICS,
    ToyTask,
    _topic,
    harmless,
    helpful,
    humorous,
)


def test_objectives_by_hand():
    words = ["whiskers", "claws", "haha", "roast", "the"]
    # on-topic: whiskers (1) + claws (edgy, 2) = 3 -> 10 * 3 / (5 + 2)
    assert helpful("cats", words) == pytest.approx(30 / 7)
    assert helpful("cats", ["purr"] * 3) == pytest.approx(10 / 5)  # repetition adds nothing
    # flagged: claws, roast
    assert harmless("cats", words) == -2.0
    # playful: haha (1) + roast (edgy joke, 2) = 3 -> 1.5
    assert humorous("cats", words) == 1.5
    assert humorous("cats", ["roast"] * 5) == 2.0  # capped
    assert helpful("space", words) == 0.0  # off-topic for space


def test_objectives_conflict():
    task = ToyTask()
    prompt = ["explain cats please <sep>"]
    per_objective_best = {
        "helpful": "whiskers claws scratch purr kitten",
        "harmless": "the a and so",
        "humorous": "roast prank haha mock",
    }
    balanced = "whiskers purr kitten haha fur"
    r = {k: task.rewards(prompt, [v])[0] for k, v in per_objective_best.items()}
    rb = task.rewards(prompt, [balanced])[0]
    for k, name in enumerate(task.objectives):
        # each objective's favourite loses to the balanced answer on some other objective
        assert any(r[name][j] < rb[j] for j in range(3) if j != k)
    assert r["helpful"][0] > rb[0] and r["humorous"][2] > rb[2]


def test_rewards_shape_and_order():
    task = ToyTask(objectives=["humorous", "helpful"])
    out = task.rewards(["explain cats please <sep>"] * 2, ["haha", "purr"])
    assert out.shape == (2, 2)
    assert out[0].tolist() == [0.5, 0.0] and out[1, 1] > 0


def test_unknown_objective_is_named():
    with pytest.raises(ValueError, match=r"task.objectives.*'funny'"):
        ToyTask(objectives=["helpful", "funny"])


def test_train_and_eval_prompts_are_disjoint_and_seeded():
    task = ToyTask()
    train, evals = set(task.prompts("train", 500, 0)), set(task.prompts("eval", 500, 0))
    assert train and evals and not train & evals
    assert task.prompts("train", 10, 3) == task.prompts("train", 10, 3)
    with pytest.raises(ValueError, match="split"):
        task.prompts("test", 1, 0)


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    tok = ToyTask().build_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "explain cats please <sep>"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.get_vocab() == tok.get_vocab()
    assert again.decode(tok("whiskers haha")["input_ids"]) == "whiskers haha"
    assert tok.unk_token_id not in tok(text)["input_ids"]


def categorise(topic: str, word: str) -> str:
    """The DEFAULT_MIX category a corpus word was drawn from (the categories' words are disjoint)."""
    safe, edgy = TOPICS[topic]
    if word in safe:
        return "on_topic"
    if word in edgy:
        return "edgy_on_topic"
    if any(word in s for t, (s, _) in TOPICS.items() if t != topic):
        return "off_topic"
    table = {"filler": FILLER, "caveat": CAVEATS, "playful": PLAYFUL, "edgy_playful": EDGY_PLAYFUL}
    table["insult"] = INSULTS
    return next(c for c, words in table.items() if word in words)


def exact_moments(task: ToyTask, reward, groups: dict[str, float]) -> tuple[float, float, float]:
    """Mean, variance and 4th central moment of a reward that is a function of a response's length
    and its word counts per group.

    Corpus responses have a length uniform on [min_len, max_len] and i.i.d. words, each from
    group g with probability groups[g] (the rest, "other", with the remaining mass); so the
    counts are multinomial given the length, and the moments are exact sums over them.
    """
    names = [*groups, "other"]
    probs = [*groups.values(), 1.0 - sum(groups.values())]
    lengths = range(task.min_len, task.max_len + 1)
    dist: dict[float, float] = {}
    for n in lengths:
        for counts in itertools.product(range(n + 1), repeat=len(groups)):
            if sum(counts) > n:
                continue
            full = (*counts, n - sum(counts))
            p = math.factorial(n) / math.prod(math.factorial(c) for c in full)
            p *= math.prod(q**c for q, c in zip(probs, full, strict=True)) / len(lengths)
            value = reward(dict(zip(names, full, strict=True)), n)
            dist[value] = dist.get(value, 0.0) + p
    assert sum(dist.values()) == pytest.approx(1.0)
    mean = sum(p * v for v, p in dist.items())
    return (
        mean,
        sum(p * (v - mean) ** 2 for v, p in dist.items()),
        sum(p * (v - mean) ** 4 for v, p in dist.items()),
    )


def test_categories_are_disjoint():
    groups = [set(FILLER), set(CAVEATS), set(PLAYFUL), set(EDGY_PLAYFUL), set(INSULTS)]
    groups += [set(s) | set(e) for s, e in TOPICS.values()]
    assert sum(len(g) for g in groups) == len(set().union(*groups))
    assert set(EDGY_PLAYFUL) | set(INSULTS) | {w for _, e in TOPICS.values() for w in e} == FLAGGED


def test_corpus_reflects_the_mix():
    """Lengths, word categories and two oracle rewards match what DEFAULT_MIX implies, exactly.

    Every check is |observed - expected| < 4.5 standard errors (a binomial or CLT tolerance;
    about 1 in 150,000 per check for a correct generator), so a wrong mix, length range or
    reward fails it.
    """
    task = ToyTask()
    assert task.mix == DEFAULT_MIX and sum(DEFAULT_MIX.values()) == pytest.approx(1.0)
    n = 3000
    corpus = task.corpus(n, seed=0)
    words = [(_topic(p), r.split()) for p, r in corpus]

    def close(observed: float, expected: float, se: float, what: str) -> None:
        assert abs(observed - expected) < 4.5 * se, (what, observed, expected, se)

    lengths = torch.tensor([len(w) for _, w in words], dtype=torch.float)
    assert lengths.min() == task.min_len and lengths.max() == task.max_len
    n_lengths = task.max_len - task.min_len + 1
    for length in range(task.min_len, task.max_len + 1):
        q = 1 / n_lengths
        close(float((lengths == length).float().mean()), q, math.sqrt(q * (1 - q) / n), f"length {length}")

    # each response word is drawn from a category with DEFAULT_MIX's probability
    cats = [categorise(t, w) for t, ws in words for w in ws]
    total = len(cats)
    for category, q in DEFAULT_MIX.items():
        freq = sum(c == category for c in cats) / total
        close(freq, q, math.sqrt(q * (1 - q) / total), category)
    flagged = sum(w in FLAGGED for _, ws in words for w in ws) / total
    q_flagged = DEFAULT_MIX["edgy_on_topic"] + DEFAULT_MIX["edgy_playful"] + DEFAULT_MIX["insult"]
    close(flagged, q_flagged, math.sqrt(q_flagged * (1 - q_flagged) / total), "flagged")

    # the oracle on the corpus: harmless and humorous depend only on category counts
    r = task.rewards([p for p, _ in corpus], [x for _, x in corpus])
    groups = {
        "caveat": DEFAULT_MIX["caveat"],
        "playful": DEFAULT_MIX["playful"],
        "edgy_playful": DEFAULT_MIX["edgy_playful"],
        "flagged_other": DEFAULT_MIX["edgy_on_topic"] + DEFAULT_MIX["insult"],
    }

    def harmless_of(c, _):
        return 0.5 * min(c["caveat"], 2) - (c["edgy_playful"] + c["flagged_other"])

    def humorous_of(c, _):
        return 0.5 * min(c["playful"] + 2 * c["edgy_playful"], 4)

    def flagged_response(c, _):  # the share of responses the harmless objective scores below 0
        return float(harmless_of(c, _) < 0)

    for k, name, fn in [(1, "harmless", harmless_of), (2, "humorous", humorous_of)]:
        assert task.objectives[k] == name
        mean, var, mu4 = exact_moments(task, fn, groups)
        close(float(r[:, k].mean()), mean, math.sqrt(var / n), f"mean {name}")
        close(float(r[:, k].var()), var, math.sqrt((mu4 - var**2) / n), f"variance {name}")
    q_neg, _, _ = exact_moments(task, flagged_response, groups)
    close(float((r[:, 1] < 0).float().mean()), q_neg, math.sqrt(q_neg * (1 - q_neg) / n), "harmless < 0")
    assert q_neg > 0.5  # flagged words are common enough to matter (exactly 0.783 of responses)
