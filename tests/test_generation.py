"""Sampling draws from exactly the configured distribution, whatever a checkpoint's generation_config says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from mpo_exp import draws
from mpo_exp.data import pad, position_ids_from_mask
from mpo_exp.generation import encode_prompts, sample
from mpo_exp.mpo.mixing import MixedPolicy, MixtureLogitsProcessor
from mpo_exp.policies import TinyGPT2Spec, load_policy, save_policy
from mpo_exp.scoring import mixture_log_softmax
from mpo_exp.tasks.toy import ToyTask

PROMPTS = ["explain cats please <sep>", "tell me about space now <sep>", "describe music kindly <sep>"] * 3
MAX_NEW = 10


def polluted_generation_config(tok) -> GenerationConfig:
    """What a Qwen-style checkpoint ships, pushed to values that change every draw."""
    return GenerationConfig(
        do_sample=True,
        temperature=0.3,
        top_k=5,
        top_p=0.5,
        min_p=0.05,
        typical_p=0.9,
        repetition_penalty=3.0,
        no_repeat_ngram_size=1,
        min_new_tokens=6,
        suppress_tokens=[tok.convert_tokens_to_ids("cats")],
        bad_words_ids=[[tok.convert_tokens_to_ids("purr")]],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


@pytest.fixture(scope="module")
def saved_policies(tmp_path_factory):
    """Three tiny GPT-2s saved with a polluting generation_config.json and reloaded like hub models."""
    root = tmp_path_factory.mktemp("gen")
    tok = ToyTask().build_tokenizer()
    paths = []
    for i in range(3):
        torch.manual_seed(10 + i)
        policy = TinyGPT2Spec(n_layer=1, n_embd=32, n_head=2).build(tok)
        policy.model.generation_config = polluted_generation_config(tok)
        save_policy(policy, root / f"p{i}")
        paths.append(root / f"p{i}")
    policies = [load_policy(p, name=f"p{i}").eval() for i, p in enumerate(paths)]
    assert (
        policies[0].model.generation_config.repetition_penalty == 3.0
    )  # the pollution survived the round trip
    return policies


@torch.no_grad()
def hand_rolled_sampler(models, weights, prompts, max_new_tokens, temperature, tok) -> list[list[int]]:
    """Ancestral sampling from softmax(mixture_log_softmax / T), full forward passes, one draw over
    the batch per step with the current sampler: the RNG stream ``generate`` uses."""
    ids, mask = pad(prompts, tok.pad_token_id, left=True)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    steps = []
    for _ in range(max_new_tokens):
        pos = position_ids_from_mask(mask)
        logits = [
            m(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float() for m in models
        ]
        scores = logits[0] if len(models) == 1 else mixture_log_softmax(logits, weights)
        if temperature != 1.0:
            scores = scores / temperature
        nxt = draws.draw(F.softmax(scores, dim=-1))
        nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
        steps.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        done |= nxt == tok.eos_token_id
        if done.all():
            break
    out = []
    for row in torch.stack(steps, dim=1).tolist():
        cut = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        out.append(row[:cut])
    return out


@pytest.mark.parametrize("sampler", draws.SAMPLERS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_single_policy_samples_exactly_pi(saved_policies, temperature, sampler):
    policy = saved_policies[0]
    tok = policy.tokenizer
    prompts = encode_prompts(tok, PROMPTS)
    with draws.use(sampler):
        torch.manual_seed(123)
        batch = sample(MixedPolicy.single(policy), prompts, MAX_NEW, temperature=temperature)
        torch.manual_seed(123)
        expected = hand_rolled_sampler([policy.model], [1.0], prompts, MAX_NEW, temperature, tok)
    assert batch.responses() == expected
    torch.manual_seed(123)
    other = "inverse_cdf" if sampler == "multinomial" else "multinomial"
    with draws.use(other):  # the setting is not ignored: the same seed draws other tokens
        assert (
            sample(MixedPolicy.single(policy), prompts, MAX_NEW, temperature=temperature).responses()
            != expected
        )


def test_mixed_policy_samples_exactly_the_mixture_and_sees_raw_scores(saved_policies, monkeypatch):
    tok = saved_policies[0].tokenizer
    weights = [0.5, 0.3, 0.2]
    mixed = MixedPolicy("mix", saved_policies, weights)
    prompts = encode_prompts(tok, PROMPTS)
    seen = []
    original = MixtureLogitsProcessor.__call__

    def spy(self, input_ids, scores):
        seen.append((input_ids.clone(), scores.clone(), self.prompt_mask.clone()))
        return original(self, input_ids, scores)

    monkeypatch.setattr(MixtureLogitsProcessor, "__call__", spy)
    torch.manual_seed(7)
    batch = sample(mixed, prompts, MAX_NEW, temperature=0.8)
    torch.manual_seed(7)
    expected = hand_rolled_sampler([p.model for p in saved_policies], weights, prompts, MAX_NEW, 0.8, tok)
    assert batch.responses() == expected
    # the mixture receives the driving model's raw logits, untouched by any processor
    assert seen
    driver = saved_policies[0].model
    for input_ids, scores, prompt_mask in seen:
        extra = input_ids.shape[1] - prompt_mask.shape[1]
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(input_ids), extra)], dim=1)
        with torch.no_grad():
            raw = driver(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
        torch.testing.assert_close(scores, raw.logits[:, -1].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_generate_adds_no_processor_of_its_own(saved_policies, monkeypatch, temperature):
    policy = saved_policies[1]
    model = policy.model
    built = []
    original = model._get_logits_processor

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        built.append([type(p).__name__ for p in out])
        return out

    monkeypatch.setattr(model, "_get_logits_processor", spy)
    sample(
        MixedPolicy.single(policy), encode_prompts(policy.tokenizer, PROMPTS[:2]), 4, temperature=temperature
    )
    assert built == [[] if temperature == 1.0 else ["TemperatureLogitsWarper"]]
    # the checkpoint's own settings are untouched (they are saved with the model)
    assert model.generation_config.repetition_penalty == 3.0 and model.generation_config.top_k == 5


def test_sample_rejects_a_non_positive_temperature(saved_policies):
    policy = saved_policies[0]
    with pytest.raises(ValueError, match="temperature"):
        sample(MixedPolicy.single(policy), encode_prompts(policy.tokenizer, PROMPTS[:1]), 2, temperature=0.0)


@pytest.mark.parametrize("sampler", draws.SAMPLERS)
@pytest.mark.parametrize(("weights", "temperature"), [([1.0], 1.0), ([0.2, 0.5, 0.3], 0.7)])
def test_the_samplers_own_log_probs_are_the_scored_ones(saved_policies, weights, temperature, sampler):
    """with_logprobs: the same samples (same random stream), and each response's log-prob under the
    distribution it was drawn from equals teacher-forced scoring at that temperature (fp32)."""
    from mpo_exp.scoring import score_sequences

    policies = saved_policies[: len(weights)]
    pol = MixedPolicy("m", policies, weights) if len(weights) > 1 else MixedPolicy.single(policies[0])
    prompts = encode_prompts(policies[0].tokenizer, PROMPTS * 6)
    n = 40  # long enough that some rows draw EOS: the mask matters
    with draws.use(sampler):
        torch.manual_seed(5)
        plain = sample(pol, prompts, n, batch_size=16, temperature=temperature)
        torch.manual_seed(5)
        batch, logp = sample(pol, prompts, n, batch_size=16, temperature=temperature, with_logprobs=True)
    assert batch.responses() == plain.responses()
    assert (batch.response_mask.sum(-1) < n).any()
    scored = score_sequences(*pol.live, batch, temperature=temperature)
    torch.testing.assert_close(logp, scored, atol=1e-4, rtol=0)
