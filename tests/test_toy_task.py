"""The embedded task: oracle objectives by hand, their conflict, its tokenizer round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from mpo_exp.tasks.toy import ToyTask, harmless, helpful, humorous


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


def test_corpus_reflects_the_mix():
    task = ToyTask()
    corpus = task.corpus(400, seed=0)
    lengths = torch.tensor([len(r.split()) for _, r in corpus], dtype=torch.float)
    assert lengths.min() >= task.min_len and lengths.max() <= task.max_len
    r = task.rewards([p for p, _ in corpus], [x for _, x in corpus])
    assert (r[:, 1] < 0).float().mean() > 0.3  # flagged words are common enough to matter
    assert r.std(0).min() > 0.1
