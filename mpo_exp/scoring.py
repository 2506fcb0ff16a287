"""Sequence log-probabilities under one model or a log-linear mixture of models.

Written once and used by SFT, DPO, MPO's log-ratio scoring, KL estimates and evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mpo_exp.adapters import shared_bank
from mpo_exp.cost import CostMeter, n_params
from mpo_exp.data import PreferenceBatch, SequenceBatch, position_ids_from_mask


def response_logits(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """Logits that predict each response token: shape (B, R, V)."""
    return policies_response_logits([model], batch)[0]


def policies_response_logits(models: Sequence[torch.nn.Module], batch: SequenceBatch) -> list[torch.Tensor]:
    """Response logits of ``batch`` under each model: a list of (B, R, V).

    Adapter views of one :class:`~mpo_exp.adapters.AdapterBank` run as one forward over the batch
    repeated once per view, each block of rows with its own adapter (peft's mixed-adapter batch).
    """
    r = batch.response_ids.shape[1]
    inputs = dict(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    )
    # the logit at position t predicts token t+1: response token j is predicted at p+j-1, i.e. the
    # last r+1 positions but the final one. logits_to_keep spares the head the prompt's rows (on
    # SmolLM2 the head is a fifth of a forward's FLOPs); reading from the end stays right for a
    # model that returns every position anyway
    keep = dict(logits_to_keep=r + 1, use_cache=False)
    bank = shared_bank(models) if len(models) > 1 else None
    if bank is not None:
        n, b = len(models), len(batch)
        rows = [m.adapter for m in models for _ in range(b)]
        out = bank.forward(rows, **{k: v.repeat(n, 1) for k, v in inputs.items()}, **keep)
        return list(out.logits[:, -(r + 1) : -1].float().split(b))
    return [m(**inputs, **keep).logits[:, -(r + 1) : -1].float() for m in models]


def mixture_log_softmax(logits: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """log pi_lambda(.|prefix) = log_softmax(sum_k lambda_k log_softmax(logits_k)).

    The token-level decoding rule of the mixed policy; one model with weight 1 is the model.
    """
    mixed = sum(
        w * F.log_softmax(lg.float(), dim=-1) for w, lg in zip(weights, logits, strict=True) if w != 0
    )
    return F.log_softmax(mixed, dim=-1)


def token_logprobs(
    models: Sequence[torch.nn.Module],
    weights: Sequence[float],
    batch: SequenceBatch,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probs of the response under the (mixed) policy, zero on padding: (B, R).

    ``temperature``: of the distribution ``generation.sample`` draws from at that temperature
    (the mixture's log-probs divided by it, renormalised).
    """
    live_models = [m for m, w in zip(models, weights, strict=True) if w != 0]
    logits = policies_response_logits(live_models, batch)
    live = [w for w in weights if w != 0]
    logp = mixture_log_softmax(logits, live)
    if temperature != 1.0:
        logp = F.log_softmax(logp / temperature, dim=-1)
    return _picked(logp, batch)


def sequence_logprobs(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    """sum_t log pi(y_t | x, y_<t) over response tokens only: (B,). Differentiable."""
    return token_logprobs([model], [1.0], batch).sum(-1)


def pair_logprobs(model: torch.nn.Module, pairs: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of the chosen and the rejected responses, from one forward. Differentiable."""
    return sequence_logprobs(model, pairs.both()).split(len(pairs))


@torch.no_grad()
def score_sequences(
    models: Sequence[torch.nn.Module],
    weights: Sequence[float],
    batch: SequenceBatch,
    batch_size: int = 256,
    meter: CostMeter | None = None,
    desc: str | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sequence log-probs of every row of ``batch`` under the (mixed) policy, in mini-batches."""
    device = next(models[0].parameters()).device
    out = []
    starts = range(0, len(batch), batch_size)
    for s in tqdm(starts, desc=desc, disable=True if desc is None else None, leave=False):
        chunk = batch[s : s + batch_size].to(device)
        out.append(token_logprobs(models, weights, chunk, temperature).sum(-1).cpu())
        if meter is not None:
            for m, w in zip(models, weights, strict=True):
                if w != 0:
                    meter.forward(n_params(m), chunk.n_tokens)
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def score_policies(
    models: Sequence[torch.nn.Module],
    batch: SequenceBatch,
    batch_size: int = 256,
    meter: CostMeter | None = None,
    desc: str | None = None,
) -> torch.Tensor:
    """Sequence log-probs of every row of ``batch`` under each of several policies: (B, n_models).

    The entry point for scoring many policies on the same samples (MPO's pi_ref and pi_k,
    evaluation's policy and pi_ref). Adapter views of one bank are scored together, one forward
    per chunk of ``batch_size // n_models`` rows (so a forward still holds ``batch_size`` rows).
    """
    if not models:
        return torch.zeros(len(batch), 0)
    if shared_bank(models) is None:
        cols = [score_sequences([m], [1.0], batch, batch_size, meter, desc) for m in models]
        return torch.stack(cols, dim=-1)
    device = next(models[0].parameters()).device
    step = max(1, batch_size // len(models))
    out = []
    for s in tqdm(range(0, len(batch), step), desc=desc, disable=True if desc is None else None, leave=False):
        chunk = batch[s : s + step].to(device)
        logits = policies_response_logits(models, chunk)
        cols = [_picked(F.log_softmax(lg, dim=-1), chunk).sum(-1) for lg in logits]
        out.append(torch.stack(cols, dim=-1).cpu())
        if meter is not None:
            for m in models:
                meter.forward(n_params(m), chunk.n_tokens)
    return torch.cat(out) if out else torch.zeros(0, len(models))


def _picked(logp: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """log-probs of the response tokens, zero on padding: (B, R)."""
    return logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) * batch.response_mask


def right_pack(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move every row's real tokens to the front (order kept), padding after them.

    Any layout (left-, right- or prompt-left/response-right-padded) maps to the same packed rows,
    so what a model reads from them cannot depend on how a batch happened to be padded.
    """
    order = torch.sort((attention_mask == 0).int(), dim=1, stable=True).indices
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def classifier_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """A sequence classifier's logits for each row, read at the row's last real token: (B, C).

    HF's decoder classifiers (GPT-2, Llama, Qwen ``...ForSequenceClassification``) pool at the
    rightmost token that differs from ``config.pad_token_id``. When padding reuses EOS, or a
    response ends in the pad token, that is the wrong token, and which one depends on the other
    rows of the batch. So for models with a ``score`` head we run the backbone and the head
    ourselves and gather at the last position the attention mask marks. Encoder classifiers
    (BERT-style, pooled at the first token) read the right-packed rows with their own pooling.
    """
    ids, mask = right_pack(input_ids, attention_mask)
    last = (mask.sum(-1) - 1).clamp(min=0)
    if hasattr(model, "score") and getattr(model, "base_model", model) is not model:
        out = model.base_model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        )
        hidden = out[0]
        hidden = hidden[torch.arange(len(ids), device=hidden.device), last]
        return model.score(hidden).float()
    return model(input_ids=ids, attention_mask=mask).logits.float()
