"""What a sequence scores cannot depend on the batch it is scored in (how much padding it got).

Sequence log-probs (``token_logprobs`` / ``score_sequences`` over ``collate``'s layout: prompts
left-padded, responses right-padded), reward-model scores (``rm_scores`` via
``classifier_logits``) and the toy oracle on decoded responses: each row scored alone equals
the same row inside batches whose other rows have longer and shorter prompts and responses,
and inside batches with extra all-pad columns on both sides.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from baselines.reward_model import rm_scores
from mpo_exp.data import SequenceBatch, collate, pad
from mpo_exp.generation import decode_prompts, decode_responses, encode_prompts
from mpo_exp.policies import TinyGPT2Spec
from mpo_exp.scoring import classifier_logits, score_sequences, token_logprobs

PROMPTS = [
    "cats <sep>",
    "explain cats please <sep>",
    "tell me about space now <sep>",
    "what about music kindly <sep>",
]
RESPONSES = [
    "whiskers <eos>",  # short, ends with EOS
    "purr kitten the fur haha claws <eos>",
    "orbit",  # no EOS: cut at max_new_tokens
    "melody rhythm guitar song chord tempo riot so <eos>",
]


@pytest.fixture
def tok(toy_task):
    return toy_task.build_tokenizer()


@pytest.fixture
def rows(tok):
    prompts = encode_prompts(tok, PROMPTS)
    responses = encode_prompts(tok, RESPONSES)
    assert len({len(p) for p in prompts}) == len(prompts) and len({len(r) for r in responses}) == len(
        responses
    )
    return prompts, responses


def with_pad_columns(batch: SequenceBatch, pad_id: int, left: int = 2, right: int = 3) -> SequenceBatch:
    """The same rows with ``left`` all-pad columns before the prompts and ``right`` after the responses."""
    b = len(batch)
    return SequenceBatch(
        torch.cat([torch.full((b, left), pad_id), batch.prompt_ids], 1),
        torch.cat([torch.zeros(b, left, dtype=torch.long), batch.prompt_mask], 1),
        torch.cat([batch.response_ids, torch.full((b, right), pad_id)], 1),
        torch.cat([batch.response_mask, torch.zeros(b, right, dtype=torch.long)], 1),
    )


def layouts(prompts, responses, pad_id):
    """(name, batch, row index of each pair) for several batchings of the same pairs."""
    n = len(prompts)
    full = collate(prompts, responses, pad_id)
    rev = list(reversed(range(n)))
    # pair i's prompt with longer/shorter other prompts and longer/shorter other responses
    mixed_p = [prompts[(i + 1) % n] for i in range(n)] + prompts
    mixed_r = [responses[(i + 2) % n] for i in range(n)] + responses
    yield "together", full, list(range(n))
    yield "reversed", collate([prompts[i] for i in rev], [responses[i] for i in rev], pad_id), rev
    yield "among others", collate(mixed_p, mixed_r, pad_id), list(range(n, 2 * n))
    yield "extra pad columns", with_pad_columns(full, pad_id), list(range(n))
    yield (
        "others + extra pad columns",
        with_pad_columns(collate(mixed_p, mixed_r, pad_id), pad_id),
        list(range(n, 2 * n)),
    )


@pytest.fixture
def policy(tok):
    torch.manual_seed(0)
    return TinyGPT2Spec(n_layer=2, n_embd=32, n_head=2).build(tok).eval()


def test_sequence_logprobs_do_not_depend_on_padding(policy, tok, rows):
    prompts, responses = rows
    model = policy.model
    with torch.no_grad():
        alone = [
            token_logprobs([model], [1.0], collate([p], [r], tok.pad_token_id))[0]
            for p, r in zip(prompts, responses, strict=True)
        ]
        for name, batch, where in layouts(prompts, responses, tok.pad_token_id):
            assert bool((batch.prompt_mask == 0).any()) and bool((batch.response_mask == 0).any()), name
            per_token = token_logprobs([model], [1.0], batch)
            assert bool(torch.isfinite(per_token).all()), name
            for i, row in enumerate(where):
                r = len(responses[i])
                torch.testing.assert_close(per_token[row, :r], alone[i], atol=1e-5, rtol=0, msg=name)
                assert bool((per_token[row, r:] == 0).all()), name
            sequences = score_sequences([model], [1.0], batch, batch_size=3)  # in mini-batches
            expected = torch.stack([a.sum() for a in alone])
            torch.testing.assert_close(sequences[where], expected, atol=1e-5, rtol=0, msg=name)


def build_reward_model(tok, pad_is_eos: bool) -> GPT2ForSequenceClassification:
    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=64,
        num_labels=1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id if pad_is_eos else tok.pad_token_id,
    )
    return GPT2ForSequenceClassification(cfg).eval()


@torch.no_grad()
def reference_score(model, ids: list[int]) -> float:
    """The score head on the last token of the unpadded sequence: no mask, no pooling rule."""
    hidden = model.transformer(input_ids=torch.tensor([ids])).last_hidden_state
    return float(model.score(hidden[0, -1]))


@pytest.mark.parametrize("pad_is_eos", [True, False], ids=["config-pad-is-eos", "config-pad-is-pad"])
def test_reward_model_scores_do_not_depend_on_padding(tok, rows, pad_is_eos):
    prompts, responses = rows
    model = build_reward_model(tok, pad_is_eos)
    truth = torch.tensor([reference_score(model, p + r) for p, r in zip(prompts, responses, strict=True)])
    with torch.no_grad():
        alone = torch.stack(
            [
                rm_scores(model, collate([p], [r], tok.pad_token_id))[0]
                for p, r in zip(prompts, responses, strict=True)
            ]
        )
        torch.testing.assert_close(alone, truth, atol=1e-5, rtol=0)
        # prompt-left / response-right layout (what sampling produces), with and without extra columns
        for name, batch, where in layouts(prompts, responses, tok.pad_token_id):
            torch.testing.assert_close(rm_scores(model, batch)[where], truth, atol=1e-5, rtol=0, msg=name)
        # whole sequences left-padded and right-padded, straight into classifier_logits
        seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
        for left in (True, False):
            ids, mask = pad(seqs + [seqs[0] + seqs[1]], tok.pad_token_id, left=left)  # a longer extra row
            out = classifier_logits(model, ids, mask)[: len(seqs), 0]
            torch.testing.assert_close(out, truth, atol=1e-5, rtol=0, msg=f"left={left}")


def test_toy_oracle_rewards_do_not_depend_on_padding(toy_task, tok, rows):
    prompts, responses = rows
    alone = torch.cat(
        [
            toy_task.rewards(decode_prompts(tok, b), decode_responses(tok, b))
            for b in (collate([p], [r], tok.pad_token_id) for p, r in zip(prompts, responses, strict=True))
        ]
    )
    # the oracle on the original strings, EOS stripped
    texts = [r.replace("<eos>", "").strip() for r in RESPONSES]
    torch.testing.assert_close(alone, toy_task.rewards(PROMPTS, texts))
    assert bool((alone != 0).any(0).all())  # every objective is exercised
    for name, batch, where in layouts(prompts, responses, tok.pad_token_id):
        r = toy_task.rewards(decode_prompts(tok, batch), decode_responses(tok, batch))
        torch.testing.assert_close(r[where], alone, msg=name)
