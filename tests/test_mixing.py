"""The mixed-policy decoder: exactness for one-hot weights, KV caching, and input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mpo_exp.data import pad, position_ids_from_mask
from mpo_exp.generation import encode_prompts, response_mask_until_eos, sample
from mpo_exp.mpo.mixing import MixedPolicy, MixtureLogitsProcessor
from mpo_exp.scoring import mixture_log_softmax, token_logprobs


def full_next_token_logits(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    return out.logits[:, -1]


def decode_with_processor(policies, weights, prompts, steps=4, seed=0):
    """Drive the processor as generate does (scores of model 0, then one token per step)."""
    models = [p.model for p in policies]
    ids, mask = pad(prompts, pad_id=0, left=True)
    proc = MixtureLogitsProcessor(weights, models[1:], mask)
    g = torch.Generator().manual_seed(seed)
    outputs = []
    for _ in range(steps):
        full_mask = torch.cat([mask, mask.new_ones(ids.shape[0], ids.shape[1] - mask.shape[1])], 1)
        scores = full_next_token_logits(models[0], ids, full_mask)
        mixed = proc(ids, scores)
        expected = [full_next_token_logits(m, ids, full_mask) for m in models]
        outputs.append((mixed, expected))
        nxt = torch.multinomial(mixed.softmax(-1), 1, generator=g)
        ids = torch.cat([ids, nxt], 1)
    return outputs


@pytest.fixture
def prompts(toy_task, tiny_policies):
    tok = tiny_policies[0].tokenizer
    return encode_prompts(tok, ["explain cats please <sep>", "cats <sep>", "tell me about space now <sep>"])


@pytest.mark.parametrize("k", [0, 1, 2])
def test_one_hot_weights_reproduce_pi_k_exactly(tiny_policies, prompts, k):
    weights = [0.0, 0.0, 0.0]
    weights[k] = 1.0
    with torch.no_grad():
        for mixed, expected in decode_with_processor(tiny_policies, weights, prompts):
            torch.testing.assert_close(mixed, F.log_softmax(expected[k], -1), atol=1e-5, rtol=0)


def test_cached_decoding_matches_full_recompute(tiny_policies, prompts):
    weights = [0.2, 0.5, 0.3]
    with torch.no_grad():
        for mixed, expected in decode_with_processor(tiny_policies, weights, prompts, steps=5):
            torch.testing.assert_close(mixed, mixture_log_softmax(expected, weights), atol=1e-5, rtol=0)
            torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(len(prompts)), atol=1e-5, rtol=0)


def spy_on_generate(monkeypatch, model) -> list:
    """Make ``model.generate`` also return its processed scores (what it sampled from), per call."""
    captured = []
    original = model.generate

    def generate(*args, **kwargs):
        out = original(*args, **kwargs, output_scores=True, return_dict_in_generate=True)
        captured.append((out.sequences, torch.stack(out.scores, 1)))  # (B, T), (B, R, V)
        return out.sequences

    monkeypatch.setattr(model, "generate", generate)
    return captured


@pytest.mark.parametrize("weights", [[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]], ids=["mixture", "single"])
def test_scoring_agrees_with_decoding(monkeypatch, tiny_policies, prompts, weights):
    """Teacher-forced log pi_lambda(y_t|x, y_<t) equals the log-prob the decoder sampled y_t with.

    The decoder's distribution is read from inside ``sample``: the scores ``generate`` sampled
    from after every logits processor (the mixture processor's log-softmax, or the single
    model's raw logits). Prompts of different lengths exercise left padding.
    """
    mix = MixedPolicy("mix", tiny_policies, weights)
    models, live_weights = mix.live
    captured = spy_on_generate(monkeypatch, models[0])
    torch.manual_seed(0)
    batch = sample(mix, prompts * 3, max_new_tokens=6)
    assert len(captured) == 1
    sequences, scores = captured[0]
    p = batch.prompt_ids.shape[1]
    assert len({len(x) for x in prompts}) == len(prompts) and bool((batch.prompt_mask == 0).any())
    assert torch.equal(sequences[:, :p], batch.prompt_ids)
    r = batch.response_ids.shape[1]
    assert scores.shape[:2] == (len(batch), r) and r == 6
    decoder = F.log_softmax(scores.float(), -1).gather(-1, sequences[:, p:].unsqueeze(-1)).squeeze(-1)
    decoder = decoder * batch.response_mask
    assert bool(torch.isfinite(decoder).all())
    with torch.no_grad():
        scored = token_logprobs(models, live_weights, batch)
    torch.testing.assert_close(scored, decoder, atol=1e-4, rtol=0)
    # and the sequence log-probs, the quantity MPO and the evaluation use
    torch.testing.assert_close(scored.sum(-1), decoder.sum(-1), atol=1e-4, rtol=0)


def test_mixed_sampling_is_seeded_and_stops_at_eos(tiny_policies, prompts):
    mix = MixedPolicy("mix", tiny_policies, [0.3, 0.3, 0.4])
    torch.manual_seed(3)
    a = sample(mix, prompts * 4, max_new_tokens=8)
    torch.manual_seed(3)
    b = sample(mix, prompts * 4, max_new_tokens=8)
    assert torch.equal(a.response_ids, b.response_ids)
    eos = tiny_policies[0].tokenizer.eos_token_id
    torch.testing.assert_close(a.response_mask, response_mask_until_eos(a.response_ids, eos))


def test_weights_must_be_on_the_simplex(tiny_policies):
    with pytest.raises(ValueError, match="sum to 1"):
        MixedPolicy("bad", tiny_policies, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        MixedPolicy("bad", tiny_policies, [1.5, -0.5, 0.0])


def test_policies_with_different_tokenizers_are_rejected(tiny_policies):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<eos>": 1, "<pad>": 2, "a": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    other = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>"
    )
    stranger = type(tiny_policies[0])("stranger", tiny_policies[0].model, other)
    with pytest.raises(ValueError, match="different tokenizers"):
        MixedPolicy("bad", [tiny_policies[0], stranger], [0.5, 0.5])


def test_response_mask_until_eos():
    ids = torch.tensor([[5, 6, 1, 0, 0], [1, 0, 0, 0, 0], [5, 5, 5, 5, 5]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(response_mask_until_eos(ids, eos_id=1), expected)
