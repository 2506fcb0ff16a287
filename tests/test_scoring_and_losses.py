"""Sequence log-prob scoring (prompt and padding masked), SFT and DPO losses, by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mpo_exp.data import SequenceBatch, collate, pad
from mpo_exp.scoring import score_sequences, sequence_logprobs
from mpo_exp.training.dpo import dpo_loss
from mpo_exp.training.sft import sft_loss


def hand_logprob(model, prompt: list[int], response: list[int]) -> float:
    """Unpadded forward pass, sum of log p(response token | everything before it)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0], -1)
    return sum(float(logp[len(prompt) + j - 1, tok]) for j, tok in enumerate(response))


def test_collate_pads_prompts_left_and_responses_right():
    b = collate([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=0)
    assert b.prompt_ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert b.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.response_ids.tolist() == [[5, 0], [6, 7]]
    assert b.response_mask.tolist() == [[1, 0], [1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 3], [0, 0, 0, 1, 2]]
    assert b.prompts() == [[1, 2, 3], [4]] and b.responses() == [[5], [6, 7]]
    assert b.n_tokens == 7 and b.n_response_tokens == 3


def test_sequence_logprob_matches_hand_computation_despite_padding(tiny_policies):
    model = tiny_policies[0].model
    prompts = [[8, 16, 12, 4], [20, 4], [9, 10, 30, 4]]
    responses = [[40, 41, 3], [50, 3], [60, 61, 62, 63, 3]]
    batch = collate(prompts, responses, pad_id=0)
    with torch.no_grad():
        got = sequence_logprobs(model, batch)
    want = torch.tensor([hand_logprob(model, p, r) for p, r in zip(prompts, responses, strict=True)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # mini-batched scoring gives the same numbers
    torch.testing.assert_close(score_sequences([model], [1.0], batch, batch_size=2), want, atol=1e-4, rtol=0)


def test_one_forward_over_chosen_and_rejected_gives_each_sides_own_log_probs(tiny_policies):
    """DPO's stacked forward: re-padding to common widths changes no row's log-prob or gradient."""
    from mpo_exp.data import PreferenceBatch
    from mpo_exp.scoring import pair_logprobs

    model = tiny_policies[0].model
    prompts = [[8, 16, 12, 4], [20, 4]]
    chosen = collate(prompts, [[40, 41, 3], [50, 3]], pad_id=0)
    rejected = collate(prompts, [[60, 3], [61, 62, 63, 64, 65, 3]], pad_id=0)
    pairs = PreferenceBatch(chosen, rejected, torch.zeros(2), torch.zeros(2))
    both = pairs.both()
    assert both.prompts() == prompts * 2
    assert both.responses() == chosen.responses() + rejected.responses()
    c, r = pair_logprobs(model, pairs)
    (c.sum() - r.sum()).backward()
    grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    c0, r0 = sequence_logprobs(model, chosen), sequence_logprobs(model, rejected)
    (c0.sum() - r0.sum()).backward()
    torch.testing.assert_close(torch.cat([c, r]), torch.cat([c0, r0]), atol=1e-5, rtol=0)
    for g, p in zip(grad, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def test_padding_tokens_do_not_change_scores(tiny_policies):
    model = tiny_policies[1].model
    alone = collate([[8, 16, 4]], [[40, 3]], pad_id=0)
    padded = collate([[8, 16, 4], [9, 10, 11, 12, 13, 4]], [[40, 3], [1, 2, 3, 4, 5, 6]], pad_id=0)
    with torch.no_grad():
        assert float(sequence_logprobs(model, alone)[0]) == pytest.approx(
            float(sequence_logprobs(model, padded)[0]), abs=1e-4
        )


def test_sft_loss_is_mean_nll_of_response_tokens_only(tiny_policies):
    model = tiny_policies[0].model
    prompts, responses = [[8, 16, 4], [20, 4]], [[40, 41, 3], [50, 3]]
    batch = collate(prompts, responses, pad_id=0)
    total = sum(hand_logprob(model, p, r) for p, r in zip(prompts, responses, strict=True))
    with torch.no_grad():
        assert float(sft_loss(model, batch)) == pytest.approx(-total / 5, abs=1e-4)


def test_dpo_loss_by_hand():
    beta = 0.1
    chosen, rejected = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    ref_c, ref_r = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -5.0])
    loss, margin = dpo_loss(chosen, rejected, ref_c, ref_r, beta)
    # margins: 0.1 * ((1) - (-1)) = 0.2 and 0.1 * ((1) - (2)) = -0.1
    torch.testing.assert_close(margin, torch.tensor([0.2, -0.1]))
    expected = -(math.log(1 / (1 + math.exp(-0.2))) + math.log(1 / (1 + math.exp(0.1)))) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    # at initialisation (policy == reference) the loss is log 2
    zero, _ = dpo_loss(ref_c, ref_r, ref_c, ref_r, beta)
    assert float(zero) == pytest.approx(math.log(2))


def test_dpo_gradient_raises_chosen_and_lowers_rejected(tiny_policies):
    model = tiny_policies[2].model
    chosen = collate([[8, 16, 4]], [[40, 41, 3]], pad_id=0)
    rejected = collate([[8, 16, 4]], [[70, 71, 3]], pad_id=0)
    with torch.no_grad():
        ref_c, ref_r = sequence_logprobs(model, chosen), sequence_logprobs(model, rejected)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        loss, _ = dpo_loss(
            sequence_logprobs(model, chosen), sequence_logprobs(model, rejected), ref_c, ref_r, 0.1
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert float(sequence_logprobs(model, chosen)) > float(ref_c)
        assert float(sequence_logprobs(model, rejected)) < float(ref_r)


def test_pad_handles_empty_sequences():
    ids, mask = pad([[], [1, 2]], pad_id=9, left=True)
    assert ids.tolist() == [[9, 9], [1, 2]] and mask.tolist() == [[0, 0], [1, 1]]
    assert isinstance(collate([[1]], [[2]], 0), SequenceBatch)


def test_preference_dataset_subset_and_concat():
    from mpo_exp.data import PreferenceDataset

    d = PreferenceDataset(
        [[1], [2], [3]],
        [[4], [5], [6]],
        [[7], [8], [9]],
        torch.tensor([0.1, 0.2, 0.3]),
        torch.tensor([1.0, 2.0, 3.0]),
        pad_id=0,
    )
    s = d.subset([2, 0])
    assert s.prompts == [[3], [1]] and s.chosen == [[6], [4]] and s.rejected == [[9], [7]]
    torch.testing.assert_close(s.ref_rejected_logp, torch.tensor([3.0, 1.0]))
    both = PreferenceDataset.concat([s, d.subset([1])])
    assert both.prompts == [[3], [1], [2]] and len(both) == 3
    torch.testing.assert_close(both.ref_chosen_logp, torch.tensor([0.3, 0.1, 0.2]))
